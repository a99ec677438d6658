//! Encoders for the frames the server sends.
//!
//! A delivered `message` frame is encoded once, by the node that accepted the publish, and
//! the same bytes reach every recipient on every node. A process that publishes without
//! running sockets (see the crate docs) builds the same bytes with [`delivery`].
//!
//! ```
//! use serde_json::value::RawValue;
//! use thinws::protocol::{server, ErrorCode};
//!
//! let id = RawValue::from_string("42".into()).unwrap();
//! assert_eq!(server::ack(&id), r#"{"type":"ack","messageID":42}"#);
//! assert_eq!(
//!     server::error(Some(&id), ErrorCode::Forbidden, "no"),
//!     r#"{"type":"error","messageID":42,"code":"forbidden","message":"no"}"#
//! );
//! let payload = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
//! assert_eq!(
//!     server::delivery("lobby", "alice", &payload),
//!     r#"{"type":"message","roomID":"lobby","connectionID":"alice","payload":{"text":"hi"}}"#
//! );
//! ```

use serde::Serialize;
use serde_json::value::RawValue;

use super::ErrorCode;

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "messageID")]
    message_id: &'a RawValue,
}

#[derive(Serialize)]
struct Error<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "messageID")]
    message_id: Option<&'a RawValue>,
    code: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct Delivery<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "roomID")]
    room: &'a str,
    #[serde(rename = "connectionID")]
    connection_id: &'a str,
    payload: &'a RawValue,
}

// Serialising these types cannot fail: they hold only strings and already-valid raw JSON,
// and the writer is a `Vec`. The fallbacks below are unreachable in practice but keep the
// encoders total without a panic path.
fn encode<T: Serialize>(value: &T, capacity: usize) -> String {
    let mut out = Vec::with_capacity(capacity);
    match serde_json::to_writer(&mut out, value) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `{"type":"ack","messageID":…}`: the operation with this `messageID` is done.
pub fn ack(message_id: &RawValue) -> String {
    encode(
        &Ack {
            kind: "ack",
            message_id,
        },
        32 + message_id.get().len(),
    )
}

/// `{"type":"error","messageID":…,"code":…,"message":…}`; `messageID` is `null` when the
/// frame had no readable one.
pub fn error(message_id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    encode(
        &Error {
            kind: "error",
            message_id,
            code: code.as_str(),
            message,
        },
        64 + message.len(),
    )
}

/// `{"type":"message","roomID":…,"connectionID":…,"payload":…}`: a delivered message, with
/// the payload embedded verbatim.
pub fn delivery(room: &str, connection_id: &str, payload: &RawValue) -> String {
    encode(
        &Delivery {
            kind: "message",
            room,
            connection_id,
            payload,
        },
        64 + room.len() + connection_id.len() + payload.get().len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_and_ids_verbatim() {
        let id = RawValue::from_string(r#""a\"b""#.into()).unwrap();
        assert_eq!(ack(&id), r#"{"type":"ack","messageID":"a\"b"}"#);
        assert_eq!(
            error(None, ErrorCode::InvalidJson, "bad \"x\""),
            r#"{"type":"error","messageID":null,"code":"invalid_json","message":"bad \"x\""}"#
        );
        let payload = RawValue::from_string("[1, 2]".into()).unwrap();
        let d = delivery("r\n", "é", &payload);
        assert_eq!(
            d,
            "{\"type\":\"message\",\"roomID\":\"r\\n\",\"connectionID\":\"é\",\"payload\":[1, 2]}"
        );
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["roomID"], "r\n");
    }
}
