//! Bad input over a real socket: every case gets its error code (with the messageID when
//! readable) and the connection keeps working; nobody else is disturbed.

mod support;

use serde_json::{json, Value};
use support::{Client, Node};
use thinws::ThinWsLayer;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_frame_gets_its_error_and_the_socket_keeps_working() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    let mut bad = Client::connect(&node.url()).await;
    let mut bystander = Client::connect(&node.url()).await;
    bystander.subscribe("calm").await;
    let mut publisher = Client::connect(&node.url()).await;

    let long = "x".repeat(257);
    let deep = format!(
        r#"{{"type":"message","messageID":1,"roomID":"r","payload":{}{}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let cases: Vec<(String, &str, Value)> = vec![
        ("{oops".into(), "invalid_json", Value::Null),
        ("".into(), "invalid_json", Value::Null),
        ("[1,2,3]".into(), "invalid_message", Value::Null),
        ("17".into(), "invalid_message", Value::Null),
        (
            r#"{"type":"subscribe","roomID":"r"}"#.into(),
            "invalid_message",
            Value::Null,
        ),
        (
            r#"{"type":"subscribe","messageID":[1],"roomID":"r"}"#.into(),
            "invalid_message",
            Value::Null,
        ),
        (r#"{"messageID":"a"}"#.into(), "invalid_message", json!("a")),
        (
            r#"{"type":true,"messageID":"a"}"#.into(),
            "invalid_message",
            json!("a"),
        ),
        (
            r#"{"type":"dance","messageID":"a"}"#.into(),
            "unknown_type",
            json!("a"),
        ),
        (
            r#"{"type":"subscribe","messageID":2}"#.into(),
            "invalid_message",
            json!(2),
        ),
        (
            r#"{"type":"subscribe","messageID":2,"roomID":{}}"#.into(),
            "invalid_message",
            json!(2),
        ),
        (
            r#"{"type":"message","messageID":3,"roomID":"r"}"#.into(),
            "invalid_message",
            json!(3),
        ),
        (
            r#"{"type":"connect","messageID":4,"connectionID":1}"#.into(),
            "invalid_message",
            json!(4),
        ),
        (
            format!(r#"{{"type":"subscribe","messageID":5,"roomID":"{long}"}}"#),
            "too_large",
            json!(5),
        ),
        (
            format!(r#"{{"type":"connect","messageID":6,"connectionID":"{long}"}}"#),
            "too_large",
            json!(6),
        ),
        (deep, "too_large", json!(1)),
    ];
    for (text, code, id) in cases {
        bad.send_text(text.clone()).await;
        let v = bad.recv().await;
        let shown = &text[..text.len().min(60)];
        assert_eq!(v["type"], "error", "{shown}: {v}");
        assert_eq!(v["code"], code, "{shown}: {v}");
        assert_eq!(v["messageID"], id, "{shown}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        // Nobody else is disturbed.
        publisher.publish("calm", json!(shown)).await;
        assert_eq!(bystander.delivery().await["payload"], shown);
    }

    // Binary frames are refused, and the socket stays open.
    bad.send_message(Message::binary(vec![0u8, 159, 146, 150]))
        .await;
    let v = bad.recv().await;
    assert_eq!(v["code"], "invalid_frame", "{v}");
    assert_eq!(v["messageID"], Value::Null);

    // After all that, the socket works normally.
    bad.subscribe("r").await;
    publisher.publish("r", json!("fine")).await;
    assert_eq!(bad.delivery().await["payload"], "fine");
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_spares_the_others() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    let mut big = Client::connect(&node.url()).await;
    let mut other = Client::connect(&node.url()).await;
    other.subscribe("r").await;
    big.subscribe("r").await;

    // Just under the 64 KiB default is fine.
    let payload = "y".repeat(64 * 1024 - 200);
    big.publish("r", json!(payload)).await;
    assert_eq!(other.delivery().await["payload"], payload);
    assert_eq!(big.delivery().await["payload"], payload);

    let text =
        json!({"type": "message", "messageID": 1, "roomID": "r", "payload": "z".repeat(70 * 1024)})
            .to_string();
    big.send_text(text).await;
    assert_eq!(big.closed().await, CloseCode::Size);

    support::members(&node.hub, "r", 1).await;
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("r", json!("after")).await;
    assert_eq!(other.delivery().await["payload"], "after");
}

#[tokio::test]
async fn the_frame_limit_is_configurable() {
    let node = Node::start(
        ThinWsLayer::builder()
            .max_frame_size(1024)
            .max_room_id_len(4)
            .build(),
    )
    .await;
    let mut c = Client::connect(&node.url()).await;
    let reply = c
        .request(json!({"type": "subscribe", "roomID": "12345"}))
        .await;
    assert_eq!(reply["code"], "too_large");
    c.subscribe("1234").await;
    c.send_text(
        json!({"type": "message", "messageID": 1, "roomID": "1234", "payload": "z".repeat(2000)})
            .to_string(),
    )
    .await;
    assert_eq!(c.closed().await, CloseCode::Size);
}

#[tokio::test]
async fn message_ids_are_echoed_verbatim() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    let mut c = Client::connect(&node.url()).await;
    for id in [r#""text-id""#, "12", "1.5", "-3", r#""""#, r#""é\"x""#] {
        c.send_text(format!(
            r#"{{"type":"subscribe","messageID":{id},"roomID":"r"}}"#
        ))
        .await;
        let v = c.recv().await;
        assert_eq!(v["type"], "ack");
        assert_eq!(v["messageID"], serde_json::from_str::<Value>(id).unwrap());
    }
}
