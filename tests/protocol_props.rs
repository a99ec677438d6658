//! Property tests of the frame parser: it never panics, accepts every well-formed frame
//! with its fields intact, and every error it reports encodes to a valid error frame.

use proptest::prelude::*;
use serde_json::{json, Value};
use thinws::protocol::{self, server, Command, Limits};

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frames built from the protocol's own keys with arbitrary values (mostly invalid).
fn frame_like() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("messageID".to_owned()),
        Just("roomID".to_owned()),
        Just("connectionID".to_owned()),
        Just("payload".to_owned()),
        Just("message".to_owned()),
        ".{0,8}",
    ];
    let value = prop_oneof![
        prop_oneof![
            Just(json!("connect")),
            Just(json!("subscribe")),
            Just(json!("unsubscribe")),
            Just(json!("message")),
            Just(json!("disconnect"))
        ],
        any_json(),
    ];
    prop::collection::hash_map(key, value, 0..7)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn check_error_encoding(text: &str) {
    if let Err(e) = protocol::parse(text, &Limits::default()) {
        let encoded = server::error(e.message_id, e.code, &e.message);
        let v: Value = serde_json::from_str(&encoded).expect("error frames are valid JSON");
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], e.code.as_str());
        let id = &v["messageID"];
        assert!(
            id.is_null() || id.is_string() || id.is_number(),
            "{encoded}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn never_panics_on_any_text(text in ".{0,200}") {
        check_error_encoding(&text);
    }

    #[test]
    fn never_panics_on_any_bytes_that_are_utf8(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            check_error_encoding(text);
        }
    }

    #[test]
    fn never_panics_on_frame_like_json(frame in frame_like()) {
        check_error_encoding(&frame.to_string());
    }

    #[test]
    fn well_formed_frames_parse_with_their_fields_intact(
        kind in 0..5usize,
        id in prop_oneof![".{0,12}".prop_map(Value::String), any::<i64>().prop_map(|n| json!(n))],
        room in ".{1,40}",
        identity in ".{1,40}",
        payload in any_json(),
        alias in any::<bool>(),
        extra in any_json(),
    ) {
        let mut frame = json!({"messageID": id, "extra": extra});
        let kind = ["connect", "subscribe", "unsubscribe", "message", "disconnect"][kind];
        frame["type"] = json!(kind);
        match kind {
            "connect" => frame["connectionID"] = json!(identity),
            "disconnect" => {}
            _ => frame["roomID"] = json!(room),
        }
        if kind == "message" {
            frame[if alias { "message" } else { "payload" }] = payload.clone();
        }
        let text = frame.to_string();
        let parsed = protocol::parse(&text, &Limits::default());
        prop_assume!(room.len() <= 256 && identity.len() <= 256);
        let parsed = parsed.unwrap_or_else(|e| panic!("{text}: {e}"));
        // The messageID is echoed verbatim.
        let ack: Value = serde_json::from_str(&server::ack(parsed.message_id)).unwrap();
        prop_assert_eq!(&ack["messageID"], &id);
        match parsed.command {
            Command::Connect { connection_id, .. } => prop_assert_eq!(connection_id, identity.as_str()),
            Command::Subscribe { room: r, .. } | Command::Unsubscribe { room: r } => prop_assert_eq!(r, room.as_str()),
            Command::Message { room: r, payload: p, .. } => {
                prop_assert_eq!(r, room.as_str());
                // Byte for byte as it was in the frame (no re-serialisation).
                prop_assert_eq!(p.get(), payload.to_string());
            }
            Command::Disconnect => prop_assert_eq!(kind, "disconnect"),
            Command::History { room: r, .. } => prop_assert_eq!(r, room.as_str()),
            other => prop_assert!(false, "a command this test does not build: {other:?}"),
        }
    }
}

proptest! {
    /// A lone UTF-16 surrogate escape anywhere in a string of a frame (payload, roomID,
    /// connectionID, messageID) is refused as invalid JSON, never forwarded.
    #[test]
    fn lone_surrogates_are_refused_wherever_they_are(
        surrogate in 0xD800u32..=0xDFFF,
        before in "[a-z]{0,4}",
        field in 0usize..4,
    ) {
        let s = format!("{before}\\u{surrogate:04x}");
        let text = match field {
            0 => format!(r#"{{"type":"message","messageID":1,"roomID":"r","payload":["{s}"]}}"#),
            1 => format!(r#"{{"type":"subscribe","messageID":1,"roomID":"{s}"}}"#),
            2 => format!(r#"{{"type":"connect","messageID":1,"connectionID":"{s}"}}"#),
            _ => format!(r#"{{"type":"subscribe","messageID":"{s}","roomID":"r"}}"#),
        };
        let err = protocol::parse(&text, &Limits::default()).expect_err(&text);
        prop_assert_eq!(err.code, protocol::ErrorCode::InvalidJson);
    }
}
