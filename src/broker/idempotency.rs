//! The idempotency keys the memory broker recorded (protocol 1.2): for each room, publisher
//! identity and key published within its window, where the message went. (On Redis, each
//! record is a key that expires with its window, written by the publish scripts.)
//!
//! Bounded: at most [`MAX_RECORDS`] records, the oldest given up first when more come. A
//! publisher who sends more keyed messages than that within one window may see a resend of
//! one of its oldest published again: as after the window.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Once, Position};

/// The most records the memory broker holds.
pub(crate) const MAX_RECORDS: usize = 100_000;

/// Recorded keys, with when each record expires.
#[derive(Debug, Default)]
pub(crate) struct KeyRecords {
    records: HashMap<Arc<str>, (Option<Position>, Instant)>,
    /// Records in the order they were made, to give up the oldest first (each name is
    /// kept once, shared with `records`).
    order: VecDeque<(Arc<str>, Instant)>,
}

impl KeyRecords {
    /// Where the message named by `once` in `room` went, if its key is recorded and its
    /// window has not ended.
    pub(crate) fn seen(&mut self, room: &str, once: &Once<'_>) -> Option<Option<Position>> {
        let now = Instant::now();
        self.sweep(now);
        match self.records.get(name(room, once).as_str()) {
            Some((position, expires)) if *expires > now => Some(position.clone()),
            _ => None,
        }
    }

    /// Records `once` in `room`, published at `position`, for its window.
    pub(crate) fn record(&mut self, room: &str, once: &Once<'_>, position: Option<Position>) {
        let expires = Instant::now() + once.window;
        let name: Arc<str> = name(room, once).into();
        while self.order.len() >= MAX_RECORDS {
            self.give_up_oldest();
        }
        self.order.push_back((name.clone(), expires));
        self.records.insert(name, (position, expires));
    }

    /// Forgets the records at the front whose window has ended.
    fn sweep(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, expires)| *expires <= now)
        {
            self.give_up_oldest();
        }
    }

    fn give_up_oldest(&mut self) {
        if let Some((name, expires)) = self.order.pop_front() {
            // Unless the same key was recorded again later (after its window ended).
            if self.records.get(&name).is_some_and(|(_, e)| *e == expires) {
                self.records.remove(&name);
            }
        }
    }

    /// How many records are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }
}

/// One record's name: room, sender kind, identity and key, the lengths first, so that no
/// two share a name and a client's never names the server's.
fn name(room: &str, once: &Once<'_>) -> String {
    let kind = if once.server { 's' } else { 'c' };
    format!(
        "{}:{kind}{}:{room}{}{}",
        room.len(),
        once.identity.len(),
        once.identity,
        once.key
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn once<'a>(identity: &'a str, key: &'a str, ms: u64) -> Once<'a> {
        Once {
            identity,
            server: false,
            key,
            window: Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_seen_within_its_window_only_for_its_room_and_identity() {
        let mut records = KeyRecords::default();
        let at = Position {
            offset: 3,
            epoch: "e".into(),
        };
        records.record("r", &once("alice", "k", 1_000), Some(at.clone()));
        assert_eq!(
            records.seen("r", &once("alice", "k", 1_000)),
            Some(Some(at))
        );
        assert_eq!(records.seen("r2", &once("alice", "k", 1_000)), None);
        assert_eq!(records.seen("r", &once("bob", "k", 1_000)), None);
        // The length prefixes keep "alice"+"k" apart from "alic"+"ek".
        assert_eq!(records.seen("r", &once("alic", "ek", 1_000)), None);
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(records.seen("r", &once("alice", "k", 1_000)), None);
        assert_eq!(records.len(), 0, "swept once its window ended");
    }

    #[tokio::test(start_paused = true)]
    async fn the_records_are_bounded_and_the_oldest_go_first() {
        let mut records = KeyRecords::default();
        for n in 0..MAX_RECORDS + 10 {
            records.record("r", &once("a", &n.to_string(), 60_000), None);
        }
        assert_eq!(records.len(), MAX_RECORDS);
        assert_eq!(records.seen("r", &once("a", "0", 60_000)), None);
        let last = (MAX_RECORDS + 9).to_string();
        assert_eq!(records.seen("r", &once("a", &last, 60_000)), Some(None));
    }
}
