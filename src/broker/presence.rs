//! Presence: who is in each room, by identity, with the number of sockets of each.
//!
//! [`Counts`] is one node's own view (its sockets, per room and identity). The in-memory
//! broker needs nothing more ([`MemoryPresence`]); the Redis broker sends each change of it
//! to Redis, where the views of every node add up (see `redis::presence`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::SharedSink;
use crate::hooks::{local_seq_base, Happened};
use crate::notifier::Notifier;
use crate::protocol::server::{self, PresenceEvent};
use crate::settings::Presence;

/// Who is in a room: how many identities, and (up to a maximum) which, each as a JSON
/// string literal (see [`server::presence_member`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Members {
    pub(crate) count: u64,
    pub(crate) listed: Vec<String>,
}

/// Sockets per identity per room, on one node.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
}

impl Counts {
    /// One more socket of `identity` in `room`; returns its number of sockets there now.
    pub(crate) fn add(&mut self, room: &Arc<str>, identity: &Arc<str>) -> u32 {
        let count = self
            .rooms
            .entry(room.clone())
            .or_default()
            .entry(identity.clone())
            .or_insert(0);
        *count += 1;
        *count
    }

    /// One socket fewer; returns the number left (a room or identity with none is
    /// forgotten). Removing what is not there changes nothing and returns `None`.
    pub(crate) fn remove(&mut self, room: &str, identity: &str) -> Option<u32> {
        let identities = self.rooms.get_mut(room)?;
        let left = match identities.get_mut(identity) {
            Some(count) if *count > 1 => {
                *count -= 1;
                Some(*count)
            }
            Some(_) => {
                identities.remove(identity);
                Some(0)
            }
            None => None,
        };
        if identities.is_empty() {
            self.rooms.remove(room);
        }
        left
    }

    /// The identities in `room`, with their socket counts.
    pub(crate) fn room(&self, room: &str) -> Option<&HashMap<Arc<str>, u32>> {
        self.rooms.get(room)
    }
}

/// Presence on the single-node broker: its counts are the whole truth, and events go
/// straight to the sink.
pub(crate) struct MemoryPresence {
    counts: Mutex<Counts>,
    sink: SharedSink,
    notifier: Option<Notifier>,
    /// The last join or leave number (one counter for every room: it only grows).
    seq: AtomicU64,
}

impl MemoryPresence {
    pub(crate) fn new(sink: SharedSink, notifier: Option<Notifier>) -> Self {
        MemoryPresence {
            counts: Mutex::default(),
            sink,
            notifier,
            seq: AtomicU64::new(local_seq_base()),
        }
    }

    fn notify(&self, what: Happened) {
        if let Some(notifier) = &self.notifier {
            notifier.notify(what);
        }
    }

    /// The next join or leave number (taken with the counts locked, so in their order).
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn announce(&self, event: PresenceEvent, room: &str, identity: &str) {
        let frame = server::presence_event(event, room, identity);
        self.sink.deliver(room, &Utf8Bytes::from(frame));
    }

    // Joins and leaves are announced with the counts locked, so that one identity's leave
    // (its last socket) and join (a new one, on another thread) go out in the order they
    // were counted.

    pub(crate) fn join(&self, room: &Arc<str>, identity: &Arc<str>, presence: Presence) {
        let mut counts = self.counts();
        if counts.add(room, identity) != 1 {
            return;
        }
        if presence.announces() {
            self.announce(PresenceEvent::Join, room, identity);
        }
        let (room, identity, seq) = (room.clone(), identity.clone(), self.next_seq());
        self.notify(Happened::Join {
            room,
            identity,
            seq,
        });
        drop(counts);
    }

    pub(crate) fn leave(&self, room: &str, identity: &str, presence: Presence) {
        let mut counts = self.counts();
        if counts.remove(room, identity) != Some(0) {
            return;
        }
        if presence.announces() {
            self.announce(PresenceEvent::Leave, room, identity);
        }
        let (room, identity, seq) = (Arc::from(room), Arc::from(identity), self.next_seq());
        self.notify(Happened::Leave {
            room,
            identity,
            seq,
        });
        drop(counts);
    }

    /// Who is in `room`, listing at most `max` (in no particular order).
    pub(crate) fn members(&self, room: &str, max: usize) -> Members {
        let counts = self.counts();
        let Some(identities) = counts.room(room) else {
            return Members::default();
        };
        Members {
            count: identities.len() as u64,
            listed: identities
                .keys()
                .take(max)
                .map(|identity| server::presence_member(identity))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_forget_empty_rooms() {
        let (room, alice, bob): (Arc<str>, Arc<str>, Arc<str>) =
            ("r".into(), "alice".into(), "bob".into());
        let mut counts = Counts::default();
        assert_eq!(counts.add(&room, &alice), 1);
        assert_eq!(counts.add(&room, &alice), 2);
        assert_eq!(counts.add(&room, &bob), 1);
        assert_eq!(counts.remove("r", "alice"), Some(1));
        assert_eq!(counts.remove("r", "alice"), Some(0));
        assert_eq!(
            counts.remove("r", "alice"),
            None,
            "not there: nothing changes"
        );
        assert_eq!(counts.room("r").map(HashMap::len), Some(1));
        assert_eq!(counts.remove("r", "bob"), Some(0));
        assert!(counts.room("r").is_none());
        assert!(counts.rooms.is_empty());
    }
}
