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

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::json::{push_key, push_raw_field, push_str_field};
use super::ErrorCode;

/// `{"type":"ack","messageID":…}`: the operation with this `messageID` is done.
pub fn ack(message_id: &RawValue) -> String {
    let mut out = String::with_capacity(32 + message_id.get().len());
    out.push('{');
    push_str_field(&mut out, "type", "ack");
    push_raw_field(&mut out, "messageID", message_id);
    out.push('}');
    out
}

/// `{"type":"error","messageID":…,"code":…,"message":…}`; `messageID` is `null` when the
/// frame had no readable one.
pub fn error(message_id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    let mut out = String::with_capacity(64 + message.len());
    out.push('{');
    push_str_field(&mut out, "type", "error");
    match message_id {
        Some(id) => push_raw_field(&mut out, "messageID", id),
        None => out.push_str(",\"messageID\":null"),
    }
    push_str_field(&mut out, "code", code.as_str());
    push_str_field(&mut out, "message", message);
    out.push('}');
    out
}

/// `{"type":"message","roomID":…,"connectionID":…,"payload":…}`: a delivered message, with
/// the payload embedded verbatim.
pub fn delivery(room: &str, connection_id: &str, payload: &RawValue) -> String {
    let mut out =
        String::with_capacity(64 + room.len() + connection_id.len() + payload.get().len());
    out.push('{');
    push_str_field(&mut out, "type", "message");
    push_str_field(&mut out, "roomID", room);
    push_str_field(&mut out, "connectionID", connection_id);
    push_raw_field(&mut out, "payload", payload);
    out.push('}');
    out
}

/// `{"type":"ack","messageID":…,"offset":…,"epoch":…}`: the ack of a `message` to, or a
/// `subscribe` of, a room with history (protocol 1.1): where the room's history stands.
pub(crate) fn ack_at(message_id: &RawValue, offset: u64, epoch: &str) -> String {
    let mut out = String::with_capacity(64 + message_id.get().len() + epoch.len());
    out.push('{');
    push_str_field(&mut out, "type", "ack");
    push_raw_field(&mut out, "messageID", message_id);
    push_position(&mut out, offset, epoch);
    out.push('}');
    out
}

/// The ack of a `message` whose idempotency key was recorded (protocol 1.2): it went out
/// before, at `position` in a room with history, and was not published again.
pub(crate) fn ack_duplicate(message_id: &RawValue, position: Option<(u64, &str)>) -> String {
    let mut out = match position {
        Some((offset, epoch)) => ack_at(message_id, offset, epoch),
        None => ack(message_id),
    };
    out.pop();
    out.push_str(",\"duplicate\":true}");
    out
}

/// The ack of a `subscribe` with `since` to a room with history: where it stands, and
/// whether the messages after `since` follow (`recovered`).
pub(crate) fn ack_recovered(
    message_id: &RawValue,
    offset: u64,
    epoch: &str,
    recovered: bool,
) -> String {
    let mut out = ack_at(message_id, offset, epoch);
    out.pop();
    out.push_str(if recovered {
        ",\"recovered\":true}"
    } else {
        ",\"recovered\":false}"
    });
    out
}

/// What the ack of a `connect` with `since` says of one rejoined room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoomAck<'a> {
    /// A room without history: `{}`.
    Plain,
    /// A history room: where it stands, and whether the messages after the client's
    /// `since` follow (absent when the client sent none for this room).
    History {
        /// The room's top offset.
        offset: u64,
        /// The room's epoch.
        epoch: &'a str,
        /// `recovered`, when the client sent `since` for the room.
        recovered: Option<bool>,
    },
}

/// The ack of a `connect` with `since`: every room the identity rejoined.
pub(crate) fn connect_ack(message_id: &RawValue, rooms: &[(&str, RoomAck<'_>)]) -> String {
    let mut out = String::with_capacity(64 + rooms.len() * 64);
    out.push('{');
    push_str_field(&mut out, "type", "ack");
    push_raw_field(&mut out, "messageID", message_id);
    out.push_str(",\"rooms\":{");
    for (n, (room, ack)) in rooms.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        super::json::push_string(&mut out, room);
        out.push_str(":{");
        if let RoomAck::History {
            offset,
            epoch,
            recovered,
        } = ack
        {
            out.push_str("\"offset\":");
            out.push_str(&offset.to_string());
            push_str_field(&mut out, "epoch", epoch);
            if let Some(recovered) = recovered {
                out.push_str(if *recovered {
                    ",\"recovered\":true"
                } else {
                    ",\"recovered\":false"
                });
            }
        }
        out.push('}');
    }
    out.push_str("}}");
    out
}

/// The `offset` a delivered frame carries at its end (see [`with_position`]), if any.
#[cfg(test)]
pub(crate) fn offset_of(frame: &str) -> Option<u64> {
    position_of(frame).map(|(offset, _)| offset)
}

/// The `offset` and `epoch` a delivered frame of a history room carries at its end (see
/// [`with_position`]), if it does.
pub(crate) fn position_of(frame: &str) -> Option<(u64, &str)> {
    let at = frame.rfind(",\"offset\":")? + ",\"offset\":".len();
    let rest = &frame[at..];
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    let epoch = rest[digits.len()..]
        .strip_prefix(",\"epoch\":\"")?
        .strip_suffix("\"}")?;
    Some((digits.parse().ok()?, epoch))
}

/// Whether `frame` is a `gap` frame (as [`gap`] and [`gap_unplaced`] write them).
pub(crate) fn is_gap(frame: &str) -> bool {
    frame.starts_with(r#"{"type":"gap","#)
}

/// `{"type":"gap","roomID":…,"offset":…,"epoch":…}` (protocol 1.1): messages of this
/// history room may have been missed and cannot be sent (the history was lost, or no longer
/// reaches back); the room goes on from this offset and epoch.
pub(crate) fn gap(room: &str, offset: u64, epoch: &str) -> String {
    let mut out = gap_unplaced(room);
    out.pop();
    push_position(&mut out, offset, epoch);
    out.push('}');
    out
}

/// `{"type":"gap","roomID":…}`: messages of this room may have been missed (the node's
/// pub/sub connection was lost, or Redis cut it), and no history says which; an
/// application that must not miss any refetches what it shows.
pub(crate) fn gap_unplaced(room: &str) -> String {
    let mut out = String::with_capacity(96 + room.len());
    out.push('{');
    push_str_field(&mut out, "type", "gap");
    push_str_field(&mut out, "roomID", room);
    out.push('}');
    out
}

/// `frame` (an ack) with `"expiresIn": seconds` added: how long the socket's grant lasts
/// (the ack of a `connect` or `refresh` whose grant has a deadline).
pub(crate) fn with_expires_in(mut frame: String, seconds: u64) -> String {
    frame.pop();
    frame.push_str(",\"expiresIn\":");
    frame.push_str(&seconds.to_string());
    frame.push('}');
    frame
}

/// The ack of `history`: the room's top `offset` and `epoch`, and the kept messages (oldest
/// first), each a delivered frame as it was sent; `more` when older messages were left out
/// to keep the reply within its byte budget (ask again with `before`).
pub(crate) fn history_ack(
    message_id: &RawValue,
    offset: u64,
    epoch: &str,
    messages: &[&str],
    more: bool,
) -> String {
    let mut out = String::with_capacity(
        64 + epoch.len() + messages.iter().map(|m| m.len() + 1).sum::<usize>(),
    );
    out.push('{');
    push_str_field(&mut out, "type", "ack");
    push_raw_field(&mut out, "messageID", message_id);
    push_position(&mut out, offset, epoch);
    out.push_str(",\"messages\":[");
    for (n, message) in messages.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(message);
    }
    out.push(']');
    if more {
        out.push_str(",\"more\":true");
    }
    out.push('}');
    out
}

/// The ack of `presence` (protocol 1.1): `{"type":"ack","messageID":…,"count":2,"members":["alice","bob"]}`.
/// `members` are JSON string literals, as [`presence_event_prefix`]'s frames end them
/// (brokers keep identities encoded, so that no reply re-encodes them).
pub(crate) fn presence_ack<'m>(
    message_id: &RawValue,
    count: u64,
    members: impl IntoIterator<Item = &'m str>,
) -> String {
    let mut out = String::with_capacity(64);
    out.push('{');
    push_str_field(&mut out, "type", "ack");
    push_raw_field(&mut out, "messageID", message_id);
    out.push_str(",\"count\":");
    out.push_str(&count.to_string());
    out.push_str(",\"members\":[");
    for (n, member) in members.into_iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(member);
    }
    out.push_str("]}");
    out
}

/// An identity as presence keeps it: a JSON string literal.
pub(crate) fn presence_member(connection_id: &str) -> String {
    let mut out = String::with_capacity(connection_id.len() + 2);
    super::json::push_string(&mut out, connection_id);
    out
}

/// Which presence event a frame announces (protocol 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PresenceEvent {
    /// An identity's first socket joined the room.
    Join,
    /// An identity's last socket left the room.
    Leave,
}

/// The start of a `join` or `leave` frame, up to its `connectionID`'s value:
/// `{"type":"join","roomID":"lobby","connectionID":`. A [`presence_member`] and `}` end it;
/// the Redis broker's presence script does so for the members of a node that died.
pub(crate) fn presence_event_prefix(event: PresenceEvent, room: &str) -> String {
    let mut out = String::with_capacity(48 + room.len());
    out.push('{');
    let kind = match event {
        PresenceEvent::Join => "join",
        PresenceEvent::Leave => "leave",
    };
    push_str_field(&mut out, "type", kind);
    push_str_field(&mut out, "roomID", room);
    push_key(&mut out, "connectionID");
    out
}

/// `{"type":"join","roomID":…,"connectionID":…}` (or `leave`).
pub(crate) fn presence_event(event: PresenceEvent, room: &str, connection_id: &str) -> String {
    let mut out = presence_event_prefix(event, room);
    super::json::push_string(&mut out, connection_id);
    out.push('}');
    out
}

/// A delivered frame (see [`delivery`]) with its place in the room's history appended:
/// `…,"offset":42,"epoch":"7f3a9c"}`. The Redis broker's publish script does the same in
/// Lua.
pub(crate) fn with_position(frame: &str, offset: u64, epoch: &str) -> String {
    debug_assert!(frame.ends_with('}'), "a delivered frame is a JSON object");
    let mut out = String::with_capacity(frame.len() + 40 + epoch.len());
    out.push_str(frame.strip_suffix('}').unwrap_or(frame));
    push_position(&mut out, offset, epoch);
    out.push('}');
    out
}

fn push_position(out: &mut String, offset: u64, epoch: &str) {
    out.push_str(",\"offset\":");
    out.push_str(&offset.to_string());
    push_str_field(out, "epoch", epoch);
}

/// A frame the server sends, as a client reads it (see [`parse`]). New protocol versions
/// add frames and fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerFrame<'a> {
    /// The operation with this `messageID` is done.
    Ack {
        /// The operation's `messageID`.
        message_id: &'a RawValue,
        /// For a history room (1.1): where its history stands.
        offset: Option<u64>,
        /// For a history room (1.1): its epoch.
        epoch: Option<Cow<'a, str>>,
        /// For a `subscribe` with `since` (1.1): whether what followed `since` comes next.
        recovered: Option<bool>,
        /// For `history` (1.1): the kept messages, a JSON array of delivered frames.
        messages: Option<&'a RawValue>,
        /// For `history` (1.1): older messages were left out to keep the reply within its
        /// byte budget; ask again with `before` set to the first message's offset.
        more: Option<bool>,
        /// For a `connect` with `since` (1.1): each rejoined room, a JSON object.
        rooms: Option<&'a RawValue>,
        /// For `presence` (1.1): how many identities are in the room.
        count: Option<u64>,
        /// For `presence` (1.1): who is in the room (perhaps cut), a JSON array of strings.
        members: Option<&'a RawValue>,
        /// For a `connect` or `refresh` (1.1) whose credential expires: seconds until the
        /// socket is closed unless it sends `refresh` with a new one.
        expires_in: Option<u64>,
    },
    /// The operation failed, or a frame could not be read (`message_id` is then `None`).
    Error {
        /// The operation's `messageID`, if the server could read one.
        message_id: Option<&'a RawValue>,
        /// The code, as sent (see [`ErrorCode`]'s `FromStr`).
        code: Cow<'a, str>,
        /// The server's explanation.
        message: Cow<'a, str>,
    },
    /// A message delivered to a subscribed room.
    Message {
        /// The room.
        room: Cow<'a, str>,
        /// The sender's `connectionID` (thinws always sends it; the original ThinWS server
        /// does not).
        connection_id: Option<Cow<'a, str>>,
        /// The payload, verbatim.
        payload: &'a RawValue,
        /// Its offset, in a history room (1.1).
        offset: Option<u64>,
        /// Its room's epoch, in a history room (1.1).
        epoch: Option<Cow<'a, str>>,
    },
    /// Messages of a room may have been missed (1.1; see docs/PROTOCOL.md): in a history room, up
    /// to `offset` in `epoch`; in any room when the node lost its pub/sub connection (no
    /// position then).
    Gap {
        /// The room.
        room: Cow<'a, str>,
        /// Where a history room goes on from.
        offset: Option<u64>,
        /// Its epoch.
        epoch: Option<Cow<'a, str>>,
    },
    /// An identity's first socket joined a room with join/leave events (1.1).
    Join {
        /// The room.
        room: Cow<'a, str>,
        /// The identity.
        connection_id: Cow<'a, str>,
    },
    /// An identity's last socket left a room with join/leave events (1.1), or its node
    /// died.
    Leave {
        /// The room.
        room: Cow<'a, str>,
        /// The identity.
        connection_id: Cow<'a, str>,
    },
    /// A frame of a type this version does not know (ignored by clients).
    Other,
}

/// The fields of a server frame, as they come.
#[derive(Deserialize)]
struct RawServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "messageID", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(rename = "roomID", borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(rename = "connectionID", borrow, default)]
    connection_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(default)]
    more: Option<bool>,
    #[serde(borrow, default)]
    rooms: Option<&'a RawValue>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(borrow, default)]
    members: Option<&'a RawValue>,
    #[serde(rename = "expiresIn", default)]
    expires_in: Option<u64>,
}

/// Reads a frame the server sent; an error when it is not one of the shapes above.
///
/// ```
/// use thinws::protocol::server::{self, ServerFrame};
///
/// let text = r#"{"type":"error","messageID":3,"code":"forbidden","message":"no"}"#;
/// match server::parse(text).unwrap() {
///     ServerFrame::Error { message_id, code, .. } => {
///         assert_eq!(message_id.unwrap().get(), "3");
///         assert_eq!(code, "forbidden");
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn parse(text: &str) -> Result<ServerFrame<'_>, serde_json::Error> {
    use serde::de::Error as _;
    let raw: RawServerFrame<'_> = serde_json::from_str(text)?;
    let missing = |field: &'static str| serde_json::Error::missing_field(field);
    // `null` parses as a raw value too; for `messageID` it means "none".
    let message_id = raw.message_id.filter(|id| id.get() != "null");
    Ok(match &*raw.kind {
        "ack" => ServerFrame::Ack {
            message_id: message_id.ok_or_else(|| missing("messageID"))?,
            offset: raw.offset,
            epoch: raw.epoch,
            recovered: raw.recovered,
            messages: raw.messages,
            more: raw.more,
            rooms: raw.rooms,
            count: raw.count,
            members: raw.members,
            expires_in: raw.expires_in,
        },
        "error" => ServerFrame::Error {
            message_id,
            code: raw.code.ok_or_else(|| missing("code"))?,
            message: raw.message.unwrap_or_default(),
        },
        "message" => ServerFrame::Message {
            room: raw.room.ok_or_else(|| missing("roomID"))?,
            connection_id: raw.connection_id,
            payload: raw.payload.ok_or_else(|| missing("payload"))?,
            offset: raw.offset,
            epoch: raw.epoch,
        },
        "gap" => ServerFrame::Gap {
            room: raw.room.ok_or_else(|| missing("roomID"))?,
            offset: raw.offset,
            epoch: raw.epoch,
        },
        "join" => ServerFrame::Join {
            room: raw.room.ok_or_else(|| missing("roomID"))?,
            connection_id: raw.connection_id.ok_or_else(|| missing("connectionID"))?,
        },
        "leave" => ServerFrame::Leave {
            room: raw.room.ok_or_else(|| missing("roomID"))?,
            connection_id: raw.connection_id.ok_or_else(|| missing("connectionID"))?,
        },
        _ => ServerFrame::Other,
    })
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

    #[test]
    fn positions_are_appended_to_acks_and_frames() {
        let id = RawValue::from_string("7".into()).unwrap();
        assert_eq!(
            ack_at(&id, 42, "e1"),
            r#"{"type":"ack","messageID":7,"offset":42,"epoch":"e1"}"#
        );
        let payload = RawValue::from_string("1".into()).unwrap();
        let frame = with_position(&delivery("r", "a", &payload), 3, "e1");
        assert_eq!(
            frame,
            r#"{"type":"message","roomID":"r","connectionID":"a","payload":1,"offset":3,"epoch":"e1"}"#
        );
        assert_eq!(offset_of(&frame), Some(3));
        assert_eq!(position_of(&frame), Some((3, "e1")));
        let ack = connect_ack(
            &id,
            &[
                ("a", RoomAck::Plain),
                (
                    "b",
                    RoomAck::History {
                        offset: 4,
                        epoch: "e",
                        recovered: Some(true),
                    },
                ),
            ],
        );
        assert_eq!(
            ack,
            r#"{"type":"ack","messageID":7,"rooms":{"a":{},"b":{"offset":4,"epoch":"e","recovered":true}}}"#
        );
        assert_eq!(
            gap("r", 9, "e2"),
            r#"{"type":"gap","roomID":"r","offset":9,"epoch":"e2"}"#
        );
        assert_eq!(offset_of(&delivery("r", "a", &payload)), None);
        assert_eq!(
            ack_recovered(&id, 3, "e1", false),
            r#"{"type":"ack","messageID":7,"offset":3,"epoch":"e1","recovered":false}"#
        );
        let ack = history_ack(&id, 3, "e1", &[&frame, &frame], false);
        let v: serde_json::Value = serde_json::from_str(&ack).unwrap();
        assert_eq!(v["messages"][1]["offset"], 3);
        assert_eq!(v["offset"], 3);
    }

    #[test]
    fn what_the_encoders_write_parses_back() {
        let id = RawValue::from_string("7".into()).unwrap();
        let payload = RawValue::from_string(r#"{"a":[1]}"#.into()).unwrap();
        assert!(
            matches!(parse(&ack(&id)).unwrap(), ServerFrame::Ack { message_id, offset: None, .. } if message_id.get() == "7")
        );
        match parse(&error(None, ErrorCode::TooLarge, "big \"x\"")).unwrap() {
            ServerFrame::Error {
                message_id,
                code,
                message,
            } => {
                assert!(message_id.is_none());
                assert_eq!(code.parse(), Ok(ErrorCode::TooLarge));
                assert_eq!(message, "big \"x\"");
            }
            other => panic!("{other:?}"),
        }
        match parse(&delivery("r", "é", &payload)).unwrap() {
            ServerFrame::Message {
                room,
                connection_id,
                payload,
                ..
            } => {
                assert_eq!(
                    (&*room, connection_id.as_deref(), payload.get()),
                    ("r", Some("é"), r#"{"a":[1]}"#)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"type":"later"}"#).unwrap(),
            ServerFrame::Other
        ));
        assert!(parse(r#"{"type":"ack"}"#).is_err());
    }

    #[test]
    fn presence_frames_round_trip() {
        let id = RawValue::from_string("9".into()).unwrap();
        let members = [presence_member("alice"), presence_member("b\"ob")];
        let ack = presence_ack(&id, 3, members.iter().map(String::as_str));
        assert_eq!(
            ack,
            r#"{"type":"ack","messageID":9,"count":3,"members":["alice","b\"ob"]}"#
        );
        match parse(&ack).unwrap() {
            ServerFrame::Ack { count, members, .. } => {
                assert_eq!(count, Some(3));
                let members: Vec<String> = serde_json::from_str(members.unwrap().get()).unwrap();
                assert_eq!(members, ["alice", "b\"ob"]);
            }
            other => panic!("{other:?}"),
        }
        let join = presence_event(PresenceEvent::Join, "lo\"bby", "é");
        assert_eq!(
            join,
            format!(
                "{}{}}}",
                presence_event_prefix(PresenceEvent::Join, "lo\"bby"),
                presence_member("é")
            )
        );
        match parse(&join).unwrap() {
            ServerFrame::Join {
                room,
                connection_id,
            } => assert_eq!((&*room, &*connection_id), ("lo\"bby", "é")),
            other => panic!("{other:?}"),
        }
        let leave = presence_event(PresenceEvent::Leave, "r", "x");
        assert_eq!(leave, r#"{"type":"leave","roomID":"r","connectionID":"x"}"#);
        assert!(matches!(parse(&leave).unwrap(), ServerFrame::Leave { .. }));
        assert!(position_of(&leave).is_none());
    }
}
