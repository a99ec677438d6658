use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{ErrorCode, FrameError};

/// Limits applied while parsing a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest accepted `roomID`, in bytes (default 256).
    pub max_room_id_len: usize,
    /// Longest accepted `connectionID`, in bytes (default 256).
    pub max_connection_id_len: usize,
    /// Deepest accepted nesting of arrays and objects in a `payload` (default 64), so that
    /// every delivered frame stays readable by parsers with a recursion limit (serde_json's
    /// is 128).
    pub max_payload_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_room_id_len: 256,
            max_connection_id_len: 256,
            max_payload_depth: 64,
        }
    }
}

/// One parsed client frame: its `messageID` and what it asks for.
#[derive(Debug, Clone)]
pub struct ClientFrame<'a> {
    /// The client's `messageID` (a JSON string or number), kept verbatim for echoing.
    pub message_id: &'a RawValue,
    /// The operation.
    pub command: Command<'a>,
}

/// The operation a client frame asks for.
#[derive(Debug, Clone)]
pub enum Command<'a> {
    /// Bind the socket to an identity and rejoin its rooms.
    Connect {
        /// The claimed identity.
        connection_id: Cow<'a, str>,
    },
    /// Join a room and remember it for the identity.
    Subscribe {
        /// The room.
        room: Cow<'a, str>,
    },
    /// Leave a room and forget it for the identity.
    Unsubscribe {
        /// The room.
        room: Cow<'a, str>,
    },
    /// Publish a payload to a room.
    Message {
        /// The room.
        room: Cow<'a, str>,
        /// The payload, as raw JSON (any value, `null` included).
        payload: &'a RawValue,
    },
    /// Leave every room on this socket; the identity keeps its rooms.
    Disconnect,
}

/// The known fields of a frame, each kept raw so that a mistyped field can be named in the
/// error (and so that `null` is told apart from a missing field). Unknown fields are ignored.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(rename = "messageID", borrow, default, deserialize_with = "present")]
    message_id: Option<&'a RawValue>,
    #[serde(rename = "roomID", borrow, default, deserialize_with = "present")]
    room_id: Option<&'a RawValue>,
    #[serde(rename = "connectionID", borrow, default, deserialize_with = "present")]
    connection_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    /// The original JavaScript client sends the payload under `message`.
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct JsonStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// Reads a raw value as a string, borrowing when it has no escapes.
fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str::<JsonStr<'_>>(raw.get())
        .ok()
        .map(|s| s.0)
}

/// Parses one client text frame.
///
/// Never panics, whatever the input. On failure, the [`FrameError`] carries the code to
/// answer with and the frame's `messageID` when it could be read.
pub fn parse<'a>(text: &'a str, limits: &Limits) -> Result<ClientFrame<'a>, FrameError<'a>> {
    // serde's derived struct visitor would also accept a JSON array (fields by position);
    // the protocol wants an object. Reject anything else before reading it.
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\r']);
    if !trimmed.starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => FrameError::new(
                None,
                ErrorCode::InvalidMessage,
                "frame must be a JSON object",
            ),
            Err(e) => FrameError::new(None, ErrorCode::InvalidJson, e.to_string()),
        });
    }
    let raw: RawFrame<'a> = serde_json::from_str(text).map_err(|e| {
        let code = if e.is_data() {
            // Valid JSON of the wrong shape, e.g. a duplicated known field.
            ErrorCode::InvalidMessage
        } else {
            ErrorCode::InvalidJson
        };
        FrameError::new(None, code, e.to_string())
    })?;

    let message_id = match raw.message_id {
        None => {
            return Err(FrameError::new(
                None,
                ErrorCode::InvalidMessage,
                "messageID is required",
            ))
        }
        Some(id) if is_string_or_number(id) => {
            if !id.get().starts_with('"') && !fits_f64(id.get()) {
                return Err(FrameError::new(
                    None,
                    ErrorCode::InvalidMessage,
                    "messageID is a number too large for a 64-bit float",
                ));
            }
            id
        }
        Some(_) => {
            return Err(FrameError::new(
                None,
                ErrorCode::InvalidMessage,
                "messageID must be a string or a number",
            ))
        }
    };
    let fail = |code, message: &'static str| FrameError::new(Some(message_id), code, message);

    let kind = match raw.kind {
        None => return Err(fail(ErrorCode::InvalidMessage, "type is required")),
        Some(kind) => match as_str(kind) {
            Some(kind) => kind,
            None => return Err(fail(ErrorCode::InvalidMessage, "type must be a string")),
        },
    };

    let room = || -> Result<Cow<'a, str>, FrameError<'a>> {
        let room = match raw.room_id {
            None => return Err(fail(ErrorCode::InvalidMessage, "roomID is required")),
            Some(room) => match as_str(room) {
                Some(room) => room,
                None => return Err(fail(ErrorCode::InvalidMessage, "roomID must be a string")),
            },
        };
        if room.is_empty() {
            return Err(fail(ErrorCode::InvalidMessage, "roomID must not be empty"));
        }
        if room.len() > limits.max_room_id_len {
            return Err(FrameError::new(
                Some(message_id),
                ErrorCode::TooLarge,
                format!("roomID is longer than {} bytes", limits.max_room_id_len),
            ));
        }
        Ok(room)
    };

    let command = match &*kind {
        "connect" => {
            let connection_id = match raw.connection_id {
                None => return Err(fail(ErrorCode::InvalidMessage, "connectionID is required")),
                Some(id) => match as_str(id) {
                    Some(id) => id,
                    None => {
                        return Err(fail(
                            ErrorCode::InvalidMessage,
                            "connectionID must be a string",
                        ))
                    }
                },
            };
            if connection_id.is_empty() {
                return Err(fail(
                    ErrorCode::InvalidMessage,
                    "connectionID must not be empty",
                ));
            }
            if connection_id.len() > limits.max_connection_id_len {
                return Err(FrameError::new(
                    Some(message_id),
                    ErrorCode::TooLarge,
                    format!(
                        "connectionID is longer than {} bytes",
                        limits.max_connection_id_len
                    ),
                ));
            }
            Command::Connect { connection_id }
        }
        "subscribe" => Command::Subscribe { room: room()? },
        "unsubscribe" => Command::Unsubscribe { room: room()? },
        "message" => {
            let room = room()?;
            let payload = match raw.payload.or(raw.message) {
                Some(payload) => payload,
                None => return Err(fail(ErrorCode::InvalidMessage, "payload is required")),
            };
            match check_payload(payload.get(), limits.max_payload_depth) {
                Ok(()) => {}
                Err(PayloadProblem::TooDeep) => {
                    return Err(FrameError::new(
                        Some(message_id),
                        ErrorCode::TooLarge,
                        format!(
                            "payload nests deeper than {} levels",
                            limits.max_payload_depth
                        ),
                    ))
                }
                Err(PayloadProblem::NumberOutOfRange) => {
                    return Err(fail(
                        ErrorCode::InvalidMessage,
                        "payload has a number too large for a 64-bit float",
                    ))
                }
            }
            Command::Message { room, payload }
        }
        "disconnect" => Command::Disconnect,
        _ => {
            return Err(FrameError::new(
                Some(message_id),
                ErrorCode::UnknownType,
                format!("unknown type {:?}", truncate(&kind, 64)),
            ))
        }
    };
    Ok(ClientFrame {
        message_id,
        command,
    })
}

/// What is wrong with a (syntactically valid) payload, if anything.
#[derive(Debug, PartialEq, Eq)]
enum PayloadProblem {
    TooDeep,
    NumberOutOfRange,
}

/// Checks a payload in one pass over its text: arrays and objects nest at most `max_depth`
/// deep, and every number fits an `f64`. JSON allows any number, but many parsers
/// (serde_json among them) refuse one that overflows, and a delivery must stay readable by
/// every client.
fn check_payload(json: &str, max_depth: usize) -> Result<(), PayloadProblem> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(PayloadProblem::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                if !fits_f64(&json[start..i]) {
                    return Err(PayloadProblem::NumberOutOfRange);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Whether a JSON number's value is a finite `f64`.
fn fits_f64(number: &str) -> bool {
    number.parse::<f64>().is_ok_and(f64::is_finite)
}

fn is_string_or_number(raw: &RawValue) -> bool {
    matches!(
        raw.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9')
    )
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

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
            matches!(f.command, Command::Connect { ref connection_id } if connection_id == "alice")
        );

        let f = parse(
            r#" {"type":"subscribe","messageID":"x","roomID":"r","extra":[1]}"#,
            &l,
        )
        .unwrap();
        assert_eq!(f.message_id.get(), r#""x""#);
        assert!(matches!(f.command, Command::Subscribe { ref room } if room == "r"));

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
        assert!(
            matches!(f.command, Command::Message { payload, .. } if payload.get() == r#""hi""#)
        );
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

        // Escapes in strings are decoded.
        let f = parse(
            r#"{"type":"subscr\u0069be","messageID":1,"roomID":"a\"b"}"#,
            &l,
        )
        .unwrap();
        assert!(matches!(f.command, Command::Subscribe { ref room } if room == "a\"b"));

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
            // Found by the fuzzer: numbers that overflow an f64 make frames some parsers refuse.
            (
                r#"{"type":"message","messageID":7777e777773}"#.into(),
                InvalidMessage,
                None,
                "messageID is a number too large",
            ),
            (
                r#"{"type":"message","messageID":1,"roomID":"r","payload":[1,{"a":-2e400}]}"#
                    .into(),
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
}
