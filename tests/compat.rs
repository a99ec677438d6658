//! Compatibility with the original ThinWS JavaScript client (cloverstudio/ThinWS v1.0.x): it
//! sends `messageID` as a number counting up from a random start below 2^53 (16 digits),
//! `connectionID` only in `connect` and as a hash of its argument (Java's `hashCode` as a
//! decimal string: `"alice"` becomes `"92903040"`), the payload under `message`, and never a
//! `payload` key. These are such frames, replayed byte for byte.

mod support;

use serde_json::json;
use support::{Client, Node, RedisServer};
use thinws::ThinWsLayer;

async fn replay(url_a: &str, url_b: &str) {
    let mut alice = Client::connect(url_a).await;
    let mut bob = Client::connect(url_b).await;
    let frames_alice = [
        r#"{"type":"connect","messageID":4503599627370495,"connectionID":"92903040"}"#,
        r#"{"type":"subscribe","messageID":4503599627370496,"roomID":"general"}"#,
    ];
    let frames_bob = [
        r#"{"type":"connect","messageID":1234567890123456,"connectionID":"97717"}"#,
        r#"{"type":"subscribe","messageID":1234567890123457,"roomID":"general"}"#,
    ];
    // Acks echo the messageID byte for byte.
    for (i, frame) in frames_alice.iter().enumerate() {
        alice.send_text(*frame).await;
        let ack = format!(
            r#"{{"type":"ack","messageID":{}}}"#,
            4503599627370495u64 + i as u64
        );
        assert_eq!(alice.recv_text().await, ack);
    }
    for (i, frame) in frames_bob.iter().enumerate() {
        bob.send_text(*frame).await;
        let ack = format!(
            r#"{{"type":"ack","messageID":{}}}"#,
            1234567890123456u64 + i as u64
        );
        assert_eq!(bob.recv_text().await, ack);
    }
    alice
        .send_text(r#"{"type":"message","messageID":4503599627370497,"roomID":"general","message":{"text":"hello from the old client"}}"#)
        .await;
    alice
        .send_text(
            r#"{"type":"message","messageID":4503599627370498,"roomID":"general","message":"plain string"}"#,
        )
        .await;
    let expected = [
        json!({"type": "message", "roomID": "general", "connectionID": "92903040", "payload": {"text": "hello from the old client"}}),
        json!({"type": "message", "roomID": "general", "connectionID": "92903040", "payload": "plain string"}),
    ];
    for e in &expected {
        assert_eq!(&bob.recv().await, e);
    }
    // Alice gets her acks and her own copies (she is subscribed).
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(alice.recv().await);
    }
    assert!(
        got.contains(&json!({"type": "ack", "messageID": 4503599627370497u64})),
        "{got:?}"
    );
    assert!(
        got.contains(&json!({"type": "ack", "messageID": 4503599627370498u64})),
        "{got:?}"
    );
    assert!(
        got.contains(&expected[0]) && got.contains(&expected[1]),
        "{got:?}"
    );

    bob.send_text(r#"{"type":"unsubscribe","messageID":1234567890123458,"roomID":"general"}"#)
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "ack", "messageID": 1234567890123458u64})
    );
    bob.send_text(r#"{"type":"disconnect","messageID":1234567890123459}"#)
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "ack", "messageID": 1234567890123459u64})
    );
}

#[tokio::test]
async fn the_original_clients_frames_in_memory() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    replay(&node.url(), &node.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_clients_frames_across_two_nodes() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    replay(&a.url(), &b.url()).await;
}
