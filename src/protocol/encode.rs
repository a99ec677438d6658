//! Encoding client frames (the Rust client's side of [`parse`](super::parse)).

use super::client::Command;
use super::json::{push_key, push_raw_field, push_str_field};

/// Encodes a client frame: what a client sends for `command` with a numeric `messageID`
/// (the inverse of [`parse`](super::parse)).
///
/// ```
/// use std::borrow::Cow;
/// use thinws::protocol::{self, Command, Limits};
///
/// let text = protocol::encode(1, &Command::Subscribe { room: Cow::Borrowed("lobby"), since: None });
/// assert_eq!(text, r#"{"type":"subscribe","messageID":1,"roomID":"lobby"}"#);
/// assert!(protocol::parse(&text, &Limits::default()).is_ok());
/// ```
pub fn encode(message_id: u64, command: &Command<'_>) -> String {
    let mut out = String::with_capacity(64);
    out.push('{');
    let kind = match command {
        Command::Connect { .. } => "connect",
        Command::Subscribe { .. } => "subscribe",
        Command::Unsubscribe { .. } => "unsubscribe",
        Command::Message { .. } => "message",
        Command::Disconnect => "disconnect",
        Command::History { .. } => "history",
        Command::Presence { .. } => "presence",
        Command::Refresh { .. } => "refresh",
    };
    push_str_field(&mut out, "type", kind);
    push_key(&mut out, "messageID");
    out.push_str(&message_id.to_string());
    match command {
        Command::Connect {
            connection_id,
            token,
            since,
        } => {
            push_str_field(&mut out, "connectionID", connection_id);
            if let Some(token) = token {
                push_str_field(&mut out, "token", token);
            }
            if let Some(rooms) = since {
                push_key(&mut out, "since");
                out.push('{');
                for (room, since) in rooms {
                    if !out.ends_with('{') {
                        out.push(',');
                    }
                    super::json::push_string(&mut out, room);
                    out.push_str(":{\"offset\":");
                    out.push_str(&since.offset.to_string());
                    push_str_field(&mut out, "epoch", &since.epoch);
                    out.push('}');
                }
                out.push('}');
            }
        }
        Command::Subscribe { room, since } => {
            push_str_field(&mut out, "roomID", room);
            if let Some(since) = since {
                push_key(&mut out, "since");
                out.push_str("{\"offset\":");
                out.push_str(&since.offset.to_string());
                push_str_field(&mut out, "epoch", &since.epoch);
                out.push('}');
            }
        }
        Command::Unsubscribe { room } | Command::Presence { room } => {
            push_str_field(&mut out, "roomID", room)
        }
        Command::Message { room, payload, key } => {
            push_str_field(&mut out, "roomID", room);
            push_raw_field(&mut out, "payload", payload);
            if let Some(key) = key {
                push_str_field(&mut out, "key", key);
            }
        }
        Command::Disconnect => {}
        Command::Refresh { token } => push_str_field(&mut out, "token", token),
        Command::History {
            room,
            limit,
            before,
        } => {
            push_str_field(&mut out, "roomID", room);
            for (key, value) in [("limit", limit), ("before", before)] {
                if let Some(value) = value {
                    push_key(&mut out, key);
                    out.push_str(&value.to_string());
                }
            }
        }
    }
    out.push('}');
    out
}
