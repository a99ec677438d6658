//! Compatibility with the original ThinWS JavaScript client: it sends `messageID` as a
//! number, `connectionID` only in `connect`, the payload under `message`, and never a
//! `payload` key. These are its frames, replayed byte for byte.

mod support;

use serde_json::json;
use support::{Client, Node, RedisServer};
use thinws::ThinWsLayer;

async fn replay(url_a: &str, url_b: &str) {
    let mut alice = Client::connect(url_a).await;
    let mut bob = Client::connect(url_b).await;
    let frames_alice = [
        r#"{"type":"connect","messageID":1,"connectionID":"alice"}"#,
        r#"{"type":"subscribe","messageID":2,"roomID":"general"}"#,
    ];
    let frames_bob = [
        r#"{"type":"connect","messageID":1,"connectionID":"bob"}"#,
        r#"{"type":"subscribe","messageID":2,"roomID":"general"}"#,
    ];
    for (i, frame) in frames_alice.iter().enumerate() {
        alice.send_text(*frame).await;
        assert_eq!(
            alice.recv().await,
            json!({"type": "ack", "messageID": i + 1})
        );
    }
    for (i, frame) in frames_bob.iter().enumerate() {
        bob.send_text(*frame).await;
        assert_eq!(bob.recv().await, json!({"type": "ack", "messageID": i + 1}));
    }
    alice
        .send_text(r#"{"type":"message","messageID":3,"roomID":"general","message":{"text":"hello from the old client"}}"#)
        .await;
    alice
        .send_text(
            r#"{"type":"message","messageID":4,"roomID":"general","message":"plain string"}"#,
        )
        .await;
    let expected = [
        json!({"type": "message", "roomID": "general", "connectionID": "alice", "payload": {"text": "hello from the old client"}}),
        json!({"type": "message", "roomID": "general", "connectionID": "alice", "payload": "plain string"}),
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
        got.contains(&json!({"type": "ack", "messageID": 3})),
        "{got:?}"
    );
    assert!(
        got.contains(&json!({"type": "ack", "messageID": 4})),
        "{got:?}"
    );
    assert!(
        got.contains(&expected[0]) && got.contains(&expected[1]),
        "{got:?}"
    );

    bob.send_text(r#"{"type":"unsubscribe","messageID":5,"roomID":"general"}"#)
        .await;
    assert_eq!(bob.recv().await, json!({"type": "ack", "messageID": 5}));
    bob.send_text(r#"{"type":"disconnect","messageID":6}"#)
        .await;
    assert_eq!(bob.recv().await, json!({"type": "ack", "messageID": 6}));
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
