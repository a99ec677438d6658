//! Tests of client-frame parsing and encoding.

use super::*;
use crate::protocol::encode;

fn code_of(text: &str) -> (ErrorCode, Option<String>, String) {
    let e = parse(text, &Limits::default()).expect_err(text);
    (
        e.code,
        e.message_id.map(|id| id.get().to_owned()),
        e.message.into_owned(),
    )
}

#[test]
fn valid_frames() {
    let l = Limits::default();
    let f = parse(
        r#"{"type":"connect","messageID":1,"connectionID":"alice"}"#,
        &l,
    )
    .unwrap();
    assert_eq!(f.message_id.get(), "1");
    assert!(
        matches!(f.command, Command::Connect { ref connection_id, token: None, since: None } if connection_id == "alice")
    );

    let f = parse(
        r#" {"type":"subscribe","messageID":"x","roomID":"r","extra":[1]}"#,
        &l,
    )
    .unwrap();
    assert_eq!(f.message_id.get(), r#""x""#);
    assert!(matches!(f.command, Command::Subscribe { ref room, since: None } if room == "r"));

    let f = parse(
        r#"{"type":"unsubscribe","messageID":-2.5e3,"roomID":"r"}"#,
        &l,
    )
    .unwrap();
    assert_eq!(f.message_id.get(), "-2.5e3");
    assert!(matches!(f.command, Command::Unsubscribe { .. }));

    // The original client's alias, and a null payload.
    let f = parse(
        r#"{"type":"message","messageID":3,"roomID":"r","message":"hi"}"#,
        &l,
    )
    .unwrap();
    assert!(matches!(f.command, Command::Message { payload, .. } if payload.get() == r#""hi""#));
    let f = parse(
        r#"{"type":"message","messageID":3,"roomID":"r","payload":null}"#,
        &l,
    )
    .unwrap();
    assert!(matches!(f.command, Command::Message { payload, .. } if payload.get() == "null"));
    // payload wins over message when both are present.
    let f = parse(
        r#"{"type":"message","messageID":3,"roomID":"r","payload":1,"message":2}"#,
        &l,
    )
    .unwrap();
    assert!(matches!(f.command, Command::Message { payload, .. } if payload.get() == "1"));

    // An idempotency key (protocol 1.2), up to 64 bytes.
    let text = format!(
        r#"{{"type":"message","messageID":1,"roomID":"r","payload":1,"key":"{}"}}"#,
        "k".repeat(64)
    );
    let f = parse(&text, &l).unwrap();
    assert!(matches!(f.command, Command::Message { key: Some(key), .. } if key.len() == 64));

    // Escapes in strings are decoded.
    let f = parse(
        r#"{"type":"subscr\u0069be","messageID":1,"roomID":"a\"b"}"#,
        &l,
    )
    .unwrap();
    assert!(matches!(f.command, Command::Subscribe { ref room, .. } if room == "a\"b"));

    let f = parse(r#"{"type":"disconnect","messageID":9}"#, &l).unwrap();
    assert!(matches!(f.command, Command::Disconnect));
}

#[test]
fn invalid_frames_table() {
    use ErrorCode::*;
    let long = "x".repeat(257);
    let deep = format!(
        r#"{{"type":"message","messageID":1,"roomID":"r","payload":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let cases: Vec<(String, ErrorCode, Option<&str>, &str)> = vec![
        ("".into(), InvalidJson, None, "EOF"),
        ("{".into(), InvalidJson, None, "EOF"),
        ("not json".into(), InvalidJson, None, "expected"),
        (
            r#"{"type":"message","messageID":1,}"#.into(),
            InvalidJson,
            None,
            "trailing comma",
        ),
        (
            format!(
                r#"{{"type":"message","messageID":1,"roomID":"r","payload":1,"key":"{}"}}"#,
                "k".repeat(65)
            ),
            InvalidMessage,
            Some("1"),
            "key is longer than 64 bytes",
        ),
        (
            r#"{"type":"message","messageID":1,"roomID":"r","payload":1,"key":""}"#.into(),
            InvalidMessage,
            Some("1"),
            "key must not be empty",
        ),
        (
            r#"{"type":"message","messageID":1,"roomID":"r","payload":1,"key":7}"#.into(),
            InvalidMessage,
            Some("1"),
            "key must be a string",
        ),
        ("[1,2]".into(), InvalidMessage, None, "JSON object"),
        ("42".into(), InvalidMessage, None, "JSON object"),
        (r#""connect""#.into(), InvalidMessage, None, "JSON object"),
        ("null".into(), InvalidMessage, None, "JSON object"),
        (
            r#"{"type":"subscribe","roomID":"r"}"#.into(),
            InvalidMessage,
            None,
            "messageID is required",
        ),
        (
            r#"{"type":"subscribe","messageID":null,"roomID":"r"}"#.into(),
            InvalidMessage,
            None,
            "messageID must be",
        ),
        (
            r#"{"type":"subscribe","messageID":{},"roomID":"r"}"#.into(),
            InvalidMessage,
            None,
            "messageID must be",
        ),
        (
            r#"{"type":"subscribe","messageID":true,"roomID":"r"}"#.into(),
            InvalidMessage,
            None,
            "messageID must be",
        ),
        (
            r#"{"messageID":1,"roomID":"r"}"#.into(),
            InvalidMessage,
            Some("1"),
            "type is required",
        ),
        (
            r#"{"type":5,"messageID":1}"#.into(),
            InvalidMessage,
            Some("1"),
            "type must be a string",
        ),
        (
            r#"{"type":"shout","messageID":"m"}"#.into(),
            UnknownType,
            Some(r#""m""#),
            "unknown type",
        ),
        (
            r#"{"type":"subscribe","messageID":1}"#.into(),
            InvalidMessage,
            Some("1"),
            "roomID is required",
        ),
        (
            r#"{"type":"subscribe","messageID":1,"roomID":5}"#.into(),
            InvalidMessage,
            Some("1"),
            "roomID must be a string",
        ),
        (
            r#"{"type":"subscribe","messageID":1,"roomID":null}"#.into(),
            InvalidMessage,
            Some("1"),
            "roomID must be a string",
        ),
        (
            r#"{"type":"subscribe","messageID":1,"roomID":""}"#.into(),
            InvalidMessage,
            Some("1"),
            "must not be empty",
        ),
        (
            format!(r#"{{"type":"subscribe","messageID":1,"roomID":"{long}"}}"#),
            TooLarge,
            Some("1"),
            "longer than 256",
        ),
        (
            r#"{"type":"unsubscribe","messageID":1,"roomID":["r"]}"#.into(),
            InvalidMessage,
            Some("1"),
            "roomID must be a string",
        ),
        (
            r#"{"type":"message","messageID":1,"roomID":"r"}"#.into(),
            InvalidMessage,
            Some("1"),
            "payload is required",
        ),
        (
            r#"{"type":"message","messageID":1,"payload":1}"#.into(),
            InvalidMessage,
            Some("1"),
            "roomID is required",
        ),
        (
            r#"{"type":"connect","messageID":1}"#.into(),
            InvalidMessage,
            Some("1"),
            "connectionID is required",
        ),
        (
            r#"{"type":"connect","messageID":1,"connectionID":7}"#.into(),
            InvalidMessage,
            Some("1"),
            "connectionID must be a string",
        ),
        (
            r#"{"type":"connect","messageID":1,"connectionID":""}"#.into(),
            InvalidMessage,
            Some("1"),
            "must not be empty",
        ),
        (
            format!(r#"{{"type":"connect","messageID":1,"connectionID":"{long}"}}"#),
            TooLarge,
            Some("1"),
            "connectionID is longer",
        ),
        (
            r#"{"type":"subscribe","type":"subscribe","messageID":1,"roomID":"r"}"#.into(),
            InvalidMessage,
            None,
            "duplicate field",
        ),
        (deep, TooLarge, Some("1"), "nests deeper than 64"),
        // Numbers that overflow an f64 would make frames some parsers refuse (a fuzz seed).
        (
            r#"{"type":"message","messageID":7777e777773}"#.into(),
            InvalidMessage,
            None,
            "messageID is a number too large",
        ),
        (
            r#"{"type":"message","messageID":1,"roomID":"r","payload":[1,{"a":-2e400}]}"#.into(),
            InvalidMessage,
            Some("1"),
            "too large for a 64-bit float",
        ),
    ];
    for (text, code, id, needle) in cases {
        let (got_code, got_id, msg) = code_of(&text);
        let shown = &text[..text.len().min(80)];
        assert_eq!(got_code, code, "{shown}: {msg}");
        assert_eq!(got_id.as_deref(), id, "{shown}");
        assert!(msg.contains(needle), "{shown}: {msg:?} lacks {needle:?}");
    }
}

#[test]
fn payload_checks_skip_strings_and_accept_ordinary_numbers() {
    assert_eq!(
        check_payload(
            r#"{"e":"1e999 [[[[","n":[0,-1.5e-400,1e308,true,false,null]}"#,
            2
        ),
        Ok(())
    );
    assert_eq!(
        check_payload("[1e309]", 2),
        Err(PayloadProblem::NumberOutOfRange)
    );
    assert_eq!(
        check_payload(&"9".repeat(400), 2),
        Err(PayloadProblem::NumberOutOfRange)
    );
    assert_eq!(check_payload("[[[]]]", 2), Err(PayloadProblem::TooDeep));
    assert_eq!(
        check_payload(r#""\\"[[[["#, 2),
        Err(PayloadProblem::TooDeep)
    );
}

#[test]
fn payload_checks_skip_escaped_quotes_and_parse_only_the_numbers_that_may_not_fit() {
    // Brackets after an escaped quote are inside the string; after `\\` they are not.
    assert_eq!(check_payload(r#"["a\"[[[[","b"]"#, 2), Ok(()));
    assert_eq!(
        check_payload(r#"["a\\",[[[]]]]"#, 2),
        Err(PayloadProblem::TooDeep)
    );
    assert_eq!(check_payload(r#"{"k":"\u005c\"[["}"#, 1), Ok(()));
    // Without an exponent, up to 300 characters always fits; 309 nines do not.
    assert_eq!(check_payload(&"9".repeat(300), 1), Ok(()));
    assert_eq!(check_payload(&format!("-{}.5", "9".repeat(298)), 1), Ok(()));
    assert_eq!(
        check_payload(&"9".repeat(309), 1),
        Err(PayloadProblem::NumberOutOfRange)
    );
    assert_eq!(check_payload(&"9".repeat(308), 1), Ok(()));
    assert_eq!(
        check_payload("[1E309]", 2),
        Err(PayloadProblem::NumberOutOfRange)
    );
    assert!(fits_f64("12345678901234567890"));
    assert!(!fits_f64("1e400"));
    assert!(!fits_f64(&"1".repeat(320)));
}

#[test]
fn limits_are_configurable() {
    let l = Limits {
        max_room_id_len: 3,
        max_connection_id_len: 2,
        max_payload_depth: 2,
    };
    assert!(parse(
        r#"{"type":"message","messageID":1,"roomID":"a","payload":[{"x":"[[[["}]}"#,
        &l
    )
    .is_ok());
    let e = parse(
        r#"{"type":"message","messageID":1,"roomID":"a","payload":[[[]]]}"#,
        &l,
    )
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
    assert!(parse(r#"{"type":"subscribe","messageID":1,"roomID":"abc"}"#, &l).is_ok());
    let e = parse(r#"{"type":"subscribe","messageID":1,"roomID":"abcd"}"#, &l).unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
    let e = parse(
        r#"{"type":"connect","messageID":1,"connectionID":"abc"}"#,
        &l,
    )
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
}

#[test]
fn unknown_type_is_truncated_at_a_char_boundary() {
    let kind = "é".repeat(100);
    let text = format!(r#"{{"type":"{kind}","messageID":1}}"#);
    let e = parse(&text, &Limits::default()).unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownType);
    assert!(e.message.len() < 100);
}

#[test]
fn encoded_frames_parse_back_to_the_same_command() {
    let l = Limits::default();
    let payload = RawValue::from_string(r#"{"t":"a\"b"}"#.into()).unwrap();
    let commands = [
        Command::Connect {
            connection_id: Cow::Borrowed("al\nice"),
            token: None,
            since: None,
        },
        Command::Connect {
            connection_id: Cow::Borrowed("x"),
            token: Some(Cow::Borrowed("a.b.c")),
            since: Some(vec![
                (
                    Cow::Borrowed("a"),
                    Since {
                        offset: 1,
                        epoch: Cow::Borrowed("e"),
                    },
                ),
                (
                    Cow::Borrowed("b\""),
                    Since {
                        offset: 9,
                        epoch: Cow::Borrowed("f"),
                    },
                ),
            ]),
        },
        Command::Subscribe {
            room: Cow::Borrowed("r"),
            since: None,
        },
        Command::Subscribe {
            room: Cow::Borrowed("r"),
            since: Some(Since {
                offset: 40,
                epoch: Cow::Borrowed("e\"1"),
            }),
        },
        Command::Unsubscribe {
            room: Cow::Borrowed("r"),
        },
        Command::Message {
            room: Cow::Borrowed("r\"1"),
            payload: &payload,
            key: None,
        },
        Command::Message {
            room: Cow::Borrowed("r"),
            payload: &payload,
            key: Some(Cow::Borrowed("k\"1")),
        },
        Command::Disconnect,
    ];
    for command in &commands {
        let text = encode(u64::MAX, command);
        let frame = parse(&text, &l).unwrap();
        assert_eq!(frame.message_id.get(), u64::MAX.to_string());
        assert_eq!(
            format!("{:?}", frame.command),
            format!("{command:?}"),
            "{text}"
        );
    }
}

#[test]
fn lone_surrogates_are_invalid_json_everywhere() {
    let lone = [r"\ud800", r"\udfff", r"\ud800\u0041", r"x\udbff"];
    for s in lone {
        let frames = [
            (
                format!(r#"{{"type":"message","messageID":1,"roomID":"r","payload":"{s}"}}"#),
                Some("1"),
            ),
            (
                format!(r#"{{"type":"message","messageID":1,"roomID":"r","payload":{{"{s}":1}}}}"#),
                Some("1"),
            ),
            (
                format!(r#"{{"type":"subscribe","messageID":2,"roomID":"{s}"}}"#),
                Some("2"),
            ),
            (
                format!(r#"{{"type":"connect","messageID":3,"connectionID":"{s}"}}"#),
                Some("3"),
            ),
            (
                format!(r#"{{"type":"subscribe","messageID":"{s}","roomID":"r"}}"#),
                None,
            ),
        ];
        for (text, id) in frames {
            let (code, echoed, message) = code_of(&text);
            assert_eq!(code, ErrorCode::InvalidJson, "{text}: {message}");
            assert_eq!(echoed.as_deref(), id, "{text}");
        }
    }
    // Pairs, and escaped backslashes that only look like escapes, are fine.
    for ok in [r"\ud83d\ude00", r"\\ud800", r"\u00e9"] {
        let text = format!(r#"{{"type":"subscribe","messageID":1,"roomID":"{ok}"}}"#);
        assert!(parse(&text, &Limits::default()).is_ok(), "{text}");
    }
}
