use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::scan::{
    check_payload, fits_f64, has_lone_surrogate, is_string_or_number, truncate, PayloadProblem,
};
use super::{ErrorCode, FrameError};

/// Limits applied while parsing a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
pub struct ClientFrame<'a> {
    /// The client's `messageID` (a JSON string or number), kept verbatim for echoing.
    pub message_id: &'a RawValue,
    /// The operation.
    pub command: Command<'a>,
}

/// The operation a client frame asks for. New protocol versions add operations.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Command<'a> {
    /// Bind the socket to an identity and rejoin its rooms.
    Connect {
        /// The claimed identity.
        connection_id: Cow<'a, str>,
        /// A credential for the server to check (protocol 1.1; e.g. a signed token that
        /// names the identity), when the client sent one.
        token: Option<Cow<'a, str>>,
        /// Where the client's copy of each of its history rooms ends (protocol 1.1), by
        /// room; `Some` (perhaps empty) when the client sent `since`.
        since: Option<Vec<(Cow<'a, str>, Since<'a>)>>,
    },
    /// Join a room and remember it for the identity.
    Subscribe {
        /// The room.
        room: Cow<'a, str>,
        /// Where the client's copy of the room's history ends (protocol 1.1): the server
        /// sends what followed, if it still can.
        since: Option<Since<'a>>,
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
        /// The idempotency key (protocol 1.2; 1 to [`MAX_KEY_LEN`] bytes): within the room's
        /// window, a second publish with the same room, identity and key is answered as the
        /// first was and not published again.
        key: Option<Cow<'a, str>>,
    },
    /// Leave every room on this socket; the identity keeps its rooms.
    Disconnect,
    /// The last messages kept in a room with history (protocol 1.1).
    History {
        /// The room.
        room: Cow<'a, str>,
        /// How many, at most (the server caps it at the room's history size).
        limit: Option<u64>,
        /// Only messages before this offset: the next page back, after a reply that said
        /// `more` (the offset of its first message).
        before: Option<u64>,
    },
    /// Who is in a room with presence (protocol 1.1).
    Presence {
        /// The room.
        room: Cow<'a, str>,
    },
    /// Replace the socket's credential before it expires (protocol 1.1): the server checks
    /// the new token (same identity) and, when it is valid, the socket's grant and deadline
    /// become the new token's.
    Refresh {
        /// The new credential.
        token: Cow<'a, str>,
    },
}

/// A place in a room's history: `{"offset": 40, "epoch": "7f3a9c"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Since<'a> {
    /// The last offset the client has.
    pub offset: u64,
    /// The epoch that offset belongs to.
    pub epoch: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawSince<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
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
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    limit: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    before: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    /// The original JavaScript client sends the payload under `message`.
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    key: Option<&'a RawValue>,
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

/// The longest idempotency key a `message` may carry, in bytes (protocol 1.2).
pub const MAX_KEY_LEN: usize = 64;

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
    // serde_json keeps a raw value's escapes unchecked, so a lone UTF-16 surrogate would be
    // forwarded in a delivery that no JSON parser reads back. Refused as invalid JSON,
    // echoing the messageID unless it holds one itself.
    if has_lone_surrogate(text) {
        let echo = (!has_lone_surrogate(message_id.get())).then_some(message_id);
        return Err(FrameError::new(
            echo,
            ErrorCode::InvalidJson,
            "a string has a lone UTF-16 surrogate escape (\\uD800-\\uDFFF must come in pairs)",
        ));
    }
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
            let token = match raw.token {
                None => None,
                Some(token) if token.get() == "null" => None,
                Some(token) => match as_str(token) {
                    Some(token) => Some(token),
                    None => return Err(fail(ErrorCode::InvalidMessage, "token must be a string")),
                },
            };
            let since = match raw.since {
                None => None,
                Some(since) if since.get() == "null" => None,
                Some(since) => {
                    match serde_json::from_str::<std::collections::BTreeMap<Cow<'a, str>, RawSince<'a>>>(
                        since.get(),
                    ) {
                        Ok(rooms) => Some(
                            rooms
                                .into_iter()
                                .map(|(room, s)| {
                                    (
                                        room,
                                        Since {
                                            offset: s.offset,
                                            epoch: s.epoch,
                                        },
                                    )
                                })
                                .collect(),
                        ),
                        Err(_) => {
                            return Err(fail(
                                ErrorCode::InvalidMessage,
                                "since must map rooms to {\"offset\": a whole number, \"epoch\": a string}",
                            ))
                        }
                    }
                }
            };
            Command::Connect {
                connection_id,
                token,
                since,
            }
        }
        "subscribe" => {
            let room = room()?;
            let since = match raw.since {
                None => None,
                Some(since) if since.get() == "null" => None,
                Some(since) => match serde_json::from_str::<RawSince<'a>>(since.get()) {
                    Ok(since) => Some(Since {
                        offset: since.offset,
                        epoch: since.epoch,
                    }),
                    Err(_) => {
                        return Err(fail(
                            ErrorCode::InvalidMessage,
                            "since must be {\"offset\": a whole number, \"epoch\": a string}",
                        ))
                    }
                },
            };
            Command::Subscribe { room, since }
        }
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
            let key = match raw.key {
                None => None,
                Some(key) => match as_str(key) {
                    Some(key) if key.is_empty() => {
                        return Err(fail(ErrorCode::InvalidMessage, "key must not be empty"))
                    }
                    Some(key) if key.len() > MAX_KEY_LEN => {
                        return Err(fail(
                            ErrorCode::InvalidMessage,
                            "key is longer than 64 bytes",
                        ))
                    }
                    Some(key) => Some(key),
                    None => return Err(fail(ErrorCode::InvalidMessage, "key must be a string")),
                },
            };
            Command::Message { room, payload, key }
        }
        "disconnect" => Command::Disconnect,
        "history" => {
            let room = room()?;
            let whole = |field: Option<&RawValue>, error| match field {
                None => Ok(None),
                Some(value) if value.get() == "null" => Ok(None),
                Some(value) => value
                    .get()
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| fail(ErrorCode::InvalidMessage, error)),
            };
            let limit = whole(raw.limit, "limit must be a whole number")?;
            let before = whole(raw.before, "before must be a whole number")?;
            Command::History {
                room,
                limit,
                before,
            }
        }
        "presence" => Command::Presence { room: room()? },
        "refresh" => match raw.token.map(as_str) {
            Some(Some(token)) if !token.is_empty() => Command::Refresh { token },
            Some(Some(_)) => {
                return Err(fail(ErrorCode::InvalidMessage, "token must not be empty"))
            }
            Some(None) => return Err(fail(ErrorCode::InvalidMessage, "token must be a string")),
            None => return Err(fail(ErrorCode::InvalidMessage, "token is required")),
        },
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

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
