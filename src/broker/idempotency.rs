//! The idempotency keys the memory broker recorded (protocol 1.2): for each room, publisher
//! identity and key published within its window, where the message went. (On Redis, each
//! record is a key that expires with its window, written by the publish scripts.)
//!
//! Bounded: at most [`MAX_RECORDS`] records. When more come, the publisher holding the most
//! records gives up its oldest, so a publisher that floods keyed messages pushes out its own
//! records, not other publishers'. A publisher whose records are given up before their
//! window ends may see a resend of one published again: as after the window.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Once, Position};

/// The most records the memory broker holds.
pub(crate) const MAX_RECORDS: usize = 100_000;

/// How often every publisher's expired records are swept out, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Recorded keys, with when each record expires, by publisher.
#[derive(Debug, Default)]
pub(crate) struct KeyRecords {
    /// Each record, by its name (see [`name`]).
    records: HashMap<Arc<str>, Record>,
    /// Each publisher holding records, by its name (see [`publisher_name`]).
    publishers: HashMap<Arc<str>, Publisher>,
    /// The publishers by how many records they hold: the last holds the most.
    by_count: BTreeSet<(usize, Arc<str>)>,
    /// When the expired records were last swept out.
    swept: Option<Instant>,
}

#[derive(Debug)]
struct Record {
    position: Option<Position>,
    expires: Instant,
    publisher: Arc<str>,
}

/// One publisher's records, oldest first, by name and expiry. An entry whose record was
/// made again later (after its window ended) no longer names it: it is skipped when met.
#[derive(Debug, Default)]
struct Publisher {
    order: VecDeque<(Arc<str>, Instant)>,
    count: usize,
}

impl KeyRecords {
    /// Where the message named by `once` in `room` went, if its key is recorded and its
    /// window has not ended.
    pub(crate) fn seen(&mut self, room: &str, once: &Once<'_>) -> Option<Option<Position>> {
        let now = Instant::now();
        self.sweep(now);
        match self.records.get(name(room, once).as_str()) {
            Some(record) if record.expires > now => Some(record.position.clone()),
            _ => None,
        }
    }

    /// Records `once` in `room`, published at `position`, for its window.
    pub(crate) fn record(&mut self, room: &str, once: &Once<'_>, position: Option<Position>) {
        let expires = Instant::now() + once.window;
        let name: Arc<str> = name(room, once).into();
        // A record of the same name is one whose window ended (`seen` said so).
        self.remove(&name);
        while self.records.len() >= MAX_RECORDS && self.give_up_heaviest() {}
        let publisher: Arc<str> = publisher_name(once).into();
        let entry = self.publishers.entry(publisher.clone()).or_default();
        let before = entry.count;
        entry.count += 1;
        entry.order.push_back((name.clone(), expires));
        if entry.order.len() > 2 * entry.count + 16 {
            // Entries of records made again later: dropped once they are half of the list.
            let records = &self.records;
            entry
                .order
                .retain(|(name, expires)| records.get(name).is_some_and(|r| r.expires == *expires));
        }
        self.recount(&publisher, before, before + 1);
        let record = Record {
            position,
            expires,
            publisher,
        };
        self.records.insert(name, record);
    }

    /// Forgets the records whose window has ended, at most every [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant) {
        if self.swept.is_some_and(|at| now < at + SWEEP_EVERY) {
            return;
        }
        self.swept = Some(now);
        let mut ended = Vec::new();
        for publisher in self.publishers.values() {
            for (name, expires) in &publisher.order {
                match self.records.get(name) {
                    Some(record) if record.expires == *expires => {
                        if *expires > now {
                            // Recorded in order: the rest mostly expire later.
                            break;
                        }
                        ended.push(name.clone());
                    }
                    _ => {}
                }
            }
        }
        for name in ended {
            self.remove(&name);
        }
    }

    /// The publisher holding the most records gives up its oldest; `false` if none could.
    fn give_up_heaviest(&mut self) -> bool {
        let Some((_, heaviest)) = self.by_count.last().cloned() else {
            return false;
        };
        let Some(publisher) = self.publishers.get_mut(&heaviest) else {
            return false;
        };
        while let Some((name, expires)) = publisher.order.pop_front() {
            if self
                .records
                .get(&name)
                .is_some_and(|r| r.expires == expires)
            {
                self.remove(&name);
                return true;
            }
        }
        false
    }

    /// Forgets the record `name`, if there is one.
    fn remove(&mut self, name: &str) {
        let Some(record) = self.records.remove(name) else {
            return;
        };
        let Some(publisher) = self.publishers.get_mut(&record.publisher) else {
            return;
        };
        let before = publisher.count;
        publisher.count -= 1;
        if publisher.count == 0 {
            self.publishers.remove(&record.publisher);
        } else if publisher
            .order
            .front()
            .is_some_and(|(front, _)| **front == *name)
        {
            publisher.order.pop_front();
        }
        self.recount(&record.publisher, before, before - 1);
    }

    /// `publisher` went from `before` records to `after`.
    fn recount(&mut self, publisher: &Arc<str>, before: usize, after: usize) {
        if before > 0 {
            self.by_count.remove(&(before, publisher.clone()));
        }
        if after > 0 {
            self.by_count.insert((after, publisher.clone()));
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

/// The name of a record's publisher: sender kind and identity (a client's never names the
/// server's).
fn publisher_name(once: &Once<'_>) -> String {
    let kind = if once.server { 's' } else { 'c' };
    format!("{kind}{}", once.identity)
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
    async fn a_publisher_flooding_keys_pushes_out_its_own_records_not_others() {
        let mut records = KeyRecords::default();
        for n in 0..10 {
            records.record("r", &once("bob", &n.to_string(), 60_000), None);
        }
        // The server's identity of the same name is another publisher.
        let server = Once {
            server: true,
            ..once("mallory", "s", 60_000)
        };
        records.record("r", &server, None);
        for n in 0..MAX_RECORDS + 10 {
            records.record("r", &once("mallory", &n.to_string(), 60_000), None);
        }
        assert_eq!(records.len(), MAX_RECORDS);
        for n in 0..10 {
            let key = n.to_string();
            assert_eq!(
                records.seen("r", &once("bob", &key, 60_000)),
                Some(None),
                "key {n}"
            );
        }
        assert_eq!(records.seen("r", &server), Some(None));
        assert_eq!(records.seen("r", &once("mallory", "0", 60_000)), None);
        let last = (MAX_RECORDS + 9).to_string();
        assert_eq!(
            records.seen("r", &once("mallory", &last, 60_000)),
            Some(None)
        );
        // Once bob holds the most, his oldest go first.
        let mut records = KeyRecords::default();
        for n in 0..MAX_RECORDS / 2 + 1 {
            records.record("r", &once("bob", &n.to_string(), 60_000), None);
        }
        for n in 0..MAX_RECORDS / 2 {
            records.record("r", &once("eve", &n.to_string(), 60_000), None);
        }
        assert_eq!(records.seen("r", &once("bob", "0", 60_000)), None);
        assert_eq!(records.seen("r", &once("eve", "0", 60_000)), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_recorded_again_after_its_window_is_held_once() {
        let mut records = KeyRecords::default();
        records.record("r", &once("a", "k", 1_000), None);
        tokio::time::advance(Duration::from_millis(500)).await;
        records.record("r", &once("a", "later", 2_000), None);
        tokio::time::advance(Duration::from_millis(501)).await;
        assert_eq!(records.seen("r", &once("a", "k", 1_000)), None);
        records.record("r", &once("a", "k", 1_000), None);
        assert_eq!(records.len(), 2);
        assert_eq!(records.seen("r", &once("a", "k", 1_000)), Some(None));
        // Both expire and are swept out; nothing is left of the publisher.
        tokio::time::advance(Duration::from_millis(2_000)).await;
        assert_eq!(records.seen("r", &once("a", "k", 1_000)), None);
        assert_eq!(records.len(), 0);
        assert!(records.publishers.is_empty() && records.by_count.is_empty());
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
