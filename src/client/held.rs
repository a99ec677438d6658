//! What the client holds across connections: the rooms it subscribed to (and has not left),
//! and where its copy of each history room ends.
//!
//! After a reconnection the server rejoins the identity's recorded rooms and lists them in
//! the `connect` ack. A room the client holds that the ack does not list (the server lost
//! the identity's record: Redis lost its data) is subscribed again, with `since` in a
//! history room, and the application hears of it through a gap unless every message was
//! recovered: no room vanishes without an event.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::value::RawValue;

use super::Gap;
use crate::protocol::{self, Command, Since};

/// The rooms a client holds, and its position in each history room.
#[derive(Debug, Default)]
pub(super) struct Held {
    rooms: HashSet<String>,
    /// Held rooms whose `unsubscribe` was in flight when a connection dropped: the server
    /// may have applied it, and the next `connect` ack says.
    leaving: HashSet<String>,
    /// `(offset, epoch)` of the last message seen, by history room.
    positions: HashMap<String, (u64, String)>,
    /// The length of a `connect` frame with positions that the server refused as too large
    /// (closed with 1009): the next one, if at least as long, goes without them, and each
    /// history room whose position the ack does not match is then told a gap instead of
    /// recovered. For the next connect only: another server may take them.
    refused_length: Option<usize>,
}

/// How one room stood in a `connect` ack.
#[derive(serde::Deserialize)]
struct RoomAck {
    offset: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
}

impl Held {
    /// The `connect` frame (request 0): with `since` for every history room, and an empty
    /// `since` when the client holds rooms but no position, so that the ack lists the
    /// rooms the server rejoined.
    pub(super) fn connect_frame(&mut self, connection_id: &str, token: Option<&str>) -> String {
        let since: Vec<_> = self
            .positions
            .iter()
            .map(|(room, (offset, epoch))| (Cow::Borrowed(room.as_str()), since(*offset, epoch)))
            .collect();
        let ask = !self.rooms.is_empty() || !since.is_empty();
        let frame = |since| {
            protocol::encode(
                0,
                &Command::Connect {
                    connection_id: Cow::Borrowed(connection_id),
                    token: token.map(Cow::Borrowed),
                    since: ask.then_some(since),
                },
            )
        };
        let with_positions = frame(since);
        match self.refused_length.take() {
            Some(refused) if !self.positions.is_empty() && with_positions.len() >= refused => {
                frame(Vec::new())
            }
            _ => with_positions,
        }
    }

    /// The server closed the socket with 1009 (too large) after a `connect` frame of
    /// `length` bytes.
    pub(super) fn connect_too_large(&mut self, length: usize) {
        if !self.positions.is_empty() {
            self.refused_length = Some(length);
        }
    }

    /// Reads the rooms of a `connect` ack: rooms the server rejoined are held; a history
    /// room it could not recover is a gap, and so is every room without history the client
    /// held (it was away). Returns the held rooms it did not list, to be
    /// subscribed again (each with its `since`, if any).
    pub(super) fn rejoined(&mut self, rooms: Option<&RawValue>, gap: impl Fn(Gap)) -> Vec<String> {
        let Some(rooms) =
            rooms.and_then(|r| serde_json::from_str::<HashMap<String, RoomAck>>(r.get()).ok())
        else {
            return Vec::new();
        };
        // A room being left that the server no longer lists was left: forgotten, not
        // subscribed again (that would undo the unsubscribe).
        for room in std::mem::take(&mut self.leaving) {
            if !rooms.contains_key(&room) {
                self.left(&room);
            }
        }
        let missing: Vec<String> = self
            .rooms
            .iter()
            .filter(|room| !rooms.contains_key(*room))
            .cloned()
            .collect();
        for (room, ack) in rooms {
            let held = self.rooms.contains(&room);
            let recovered = ack.recovered;
            match (ack.recovered, ack.offset, ack.epoch) {
                // A room without history that this client held: what was published while
                // it was away is gone, and the application is told so.
                (None, None, _) if held => gap(Gap {
                    room: room.clone(),
                    offset: None,
                    epoch: None,
                }),
                // A history room the server could not recover, or one the client held
                // and did not ask to recover (its position left out of a `connect` too
                // large with it) unless nothing was published meanwhile: it goes on from
                // where the server stands.
                (Some(false), Some(offset), Some(epoch)) | (None, Some(offset), Some(epoch))
                    if recovered.is_some()
                        || (held
                            && self.positions.get(&room) != Some(&(offset, epoch.clone()))) =>
                {
                    self.positions.insert(room.clone(), (offset, epoch.clone()));
                    gap(Gap {
                        room: room.clone(),
                        offset: Some(offset),
                        epoch: Some(epoch),
                    });
                }
                // A history room the client did not hold (the server rejoined it, or
                // granted it): it starts where the ack says.
                (None, Some(offset), Some(epoch)) => {
                    self.positions
                        .entry(room.clone())
                        .or_insert((offset, epoch));
                }
                _ => {}
            }
            self.rooms.insert(room);
        }
        missing
    }

    /// The frame that subscribes to `room` again after the server lost it (request `id`).
    pub(super) fn resubscribe_frame(&self, id: u64, room: &str) -> String {
        let since = self
            .positions
            .get(room)
            .map(|(offset, epoch)| since(*offset, epoch));
        protocol::encode(
            id,
            &Command::Subscribe {
                room: Cow::Borrowed(room),
                since,
            },
        )
    }

    /// The server answered a `subscribe` to `room`: held from now on; in a history room the
    /// client starts where the ack says, unless it has a position already.
    pub(super) fn subscribed(&mut self, room: String, at: Option<(u64, String)>) {
        if let Some(at) = at {
            self.positions.entry(room.clone()).or_insert(at);
        }
        self.rooms.insert(room);
    }

    /// The server answered an `unsubscribe` of `room` (or refused to subscribe to it
    /// again): no longer held.
    pub(super) fn left(&mut self, room: &str) {
        self.rooms.remove(room);
        self.positions.remove(room);
        self.leaving.remove(room);
    }

    /// The connection dropped while an `unsubscribe` of `room` was in flight: whether the
    /// server applied it, the next `connect` ack tells (see [`Held::rejoined`]).
    pub(super) fn maybe_left(&mut self, room: String) {
        if self.rooms.contains(&room) {
            self.leaving.insert(room);
        }
    }

    /// Records a delivery at `offset` in `room`; false when the client had it already.
    pub(super) fn advance(&mut self, room: &str, offset: u64, epoch: &str) -> bool {
        match self.positions.get_mut(room) {
            Some((last, last_epoch)) if last_epoch == epoch => {
                if offset <= *last {
                    return false;
                }
                *last = offset;
            }
            Some(position) => *position = (offset, epoch.to_owned()),
            None => {
                self.positions
                    .insert(room.to_owned(), (offset, epoch.to_owned()));
            }
        }
        true
    }

    /// A history room goes on from `offset` in `epoch` (after a gap).
    pub(super) fn jump(&mut self, room: &str, offset: u64, epoch: &str) {
        self.positions
            .insert(room.to_owned(), (offset, epoch.to_owned()));
    }
}

fn since(offset: u64, epoch: &str) -> Since<'_> {
    Since {
        offset,
        epoch: Cow::Borrowed(epoch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(rooms: &str) -> Box<RawValue> {
        RawValue::from_string(rooms.to_owned()).unwrap()
    }

    fn holding(rooms: &[&str]) -> Held {
        let mut held = Held::default();
        for room in rooms {
            held.subscribed((*room).to_owned(), None);
        }
        held
    }

    #[test]
    fn a_room_the_server_no_longer_lists_is_subscribed_again_unless_it_was_being_left() {
        // Lost by the server: subscribed again. The room without history it still had is a
        // gap (the client was away); a history room recovered is not.
        let mut held = holding(&["a", "b", "h"]);
        let gaps = std::cell::RefCell::new(Vec::new());
        let listed = r#"{"b":{},"h":{"offset":3,"epoch":"e","recovered":true}}"#;
        let missing = held.rejoined(Some(&ack(listed)), |gap| gaps.borrow_mut().push(gap.room));
        assert_eq!(missing, ["a"]);
        assert_eq!(*gaps.borrow(), ["b"]);
        // Its unsubscribe was in flight when the connection dropped, and the server
        // applied it: forgotten, with no gap.
        let mut held = holding(&["a", "b"]);
        held.maybe_left("a".into());
        let gaps = std::cell::RefCell::new(Vec::new());
        let missing = held.rejoined(Some(&ack(r#"{"b":{}}"#)), |gap| {
            gaps.borrow_mut().push(gap.room)
        });
        assert!(missing.is_empty());
        assert_eq!(*gaps.borrow(), ["b"], "none for the room left");
        assert!(!held.rooms.contains("a") && held.leaving.is_empty());
        // The server did not apply it: still held, and no longer being left.
        let mut held = holding(&["a", "b"]);
        held.maybe_left("a".into());
        let missing = held.rejoined(Some(&ack(r#"{"a":{},"b":{}}"#)), |_| {});
        assert!(missing.is_empty());
        assert!(held.rooms.contains("a") && held.leaving.is_empty());
    }

    #[test]
    fn positions_refused_as_too_large_are_left_out_and_their_rooms_told_a_gap() {
        let mut held = holding(&["h"]);
        held.advance("h", 4, "e");
        let with = held.connect_frame("ann", None);
        assert!(with.contains(r#""offset":4"#), "{with}");
        held.connect_too_large(with.len());
        let without = held.connect_frame("ann", None);
        assert!(without.contains(r#""since":{}"#), "{without}");
        // For the next connect only: another server may take them.
        assert_eq!(held.connect_frame("ann", None), with);
        // A room whose position the ack matches missed nothing: no gap.
        let quiet = r#"{"h":{"offset":4,"epoch":"e"}}"#;
        held.rejoined(Some(&ack(quiet)), |gap| panic!("{gap:?}"));
        // The server rejoined the room without recovering it: a gap, and the client goes
        // on from where the server stands. A history room it did not hold is no gap.
        let gaps = std::cell::RefCell::new(Vec::new());
        let listed = r#"{"h":{"offset":9,"epoch":"e"},"g":{"offset":2,"epoch":"e"}}"#;
        held.rejoined(Some(&ack(listed)), |gap| {
            gaps.borrow_mut().push((gap.room, gap.offset))
        });
        assert_eq!(*gaps.borrow(), [("h".to_owned(), Some(9))]);
        assert_eq!(held.positions["h"], (9, "e".to_owned()));
        assert_eq!(held.positions["g"], (2, "e".to_owned()), "where g starts");
    }
}
