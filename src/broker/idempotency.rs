//! The idempotency keys the memory broker recorded (protocol 1.2): for each room, publisher
//! identity and key published within its window, where the message went. (On Redis, each
//! record is a key that expires with its window, written by the publish scripts.)
//!
//! Bounded: at most [`MAX_RECORDS`] records. When more come, the publisher holding the most
//! records gives up its oldest, so a publisher that floods keyed messages pushes out its own
//! records, not other publishers'. A publisher whose records are given up before their
//! window ends may see a resend of one published again: as after the window.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Once, Position};

/// The most records the memory broker holds.
pub(crate) const MAX_RECORDS: usize = 100_000;

/// Recorded keys, with when each record expires, by publisher.
///
/// Each record has one entry in its publisher's list (oldest first) and one in the
/// expiries; an entry names its record by name and serial, so that one left behind by a
/// record already gone (expired, given up, or made again) is known and skipped. Both
/// collections are compacted when such entries outnumber the live ones.
#[derive(Debug, Default)]
pub(crate) struct KeyRecords {
    /// Each record, by its name (see [`name`]).
    records: HashMap<Arc<str>, Record>,
    /// Each publisher holding records, by its name (see [`publisher_name`]).
    publishers: HashMap<Arc<str>, Publisher>,
    /// The publishers by how many records they hold: the last holds the most.
    by_count: BTreeSet<(usize, Arc<str>)>,
    /// Every record's expiry, the soonest first.
    expiries: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    /// The serial of the last record made.
    serial: u64,
}

#[derive(Debug)]
struct Record {
    position: Option<Position>,
    expires: Instant,
    serial: u64,
    publisher: Arc<str>,
}

/// One publisher's records, oldest first, by name and serial.
#[derive(Debug, Default)]
struct Publisher {
    order: VecDeque<(Arc<str>, u64)>,
    count: usize,
}

impl KeyRecords {
    /// Where the message named by `once` in `room` went, if its key is recorded and its
    /// window has not ended.
    pub(crate) fn seen(&mut self, room: &str, once: &Once<'_>) -> Option<Option<Position>> {
        self.sweep(Instant::now());
        let record = self.records.get(name(room, once).as_str())?;
        Some(record.position.clone())
    }

    /// Records `once` in `room`, published at `position`, for its window.
    pub(crate) fn record(&mut self, room: &str, once: &Once<'_>, position: Option<Position>) {
        let now = Instant::now();
        self.sweep(now);
        let name: Arc<str> = name(room, once).into();
        // Made again: the record of the same name goes first.
        self.remove(&name);
        while self.records.len() >= MAX_RECORDS && self.give_up_heaviest() {}
        self.serial += 1;
        let serial = self.serial;
        let publisher: Arc<str> = publisher_name(once).into();
        let entry = self.publishers.entry(publisher.clone()).or_default();
        entry.count += 1;
        entry.order.push_back((name.clone(), serial));
        let count = entry.count;
        self.recount(&publisher, count - 1, count);
        let expires = now + once.window;
        self.expiries.push(Reverse((expires, serial, name.clone())));
        let record = Record {
            position,
            expires,
            serial,
            publisher,
        };
        self.records.insert(name, record);
        self.compact_expiries();
    }

    /// Makes the expiries again from the records once dead entries outnumber them, and
    /// gives back the memory of a burst once they are a quarter of it.
    fn compact_expiries(&mut self) {
        if self.expiries.len() > 2 * self.records.len() + 1024 {
            let records = self.records.iter();
            let live = records.map(|(name, r)| Reverse((r.expires, r.serial, name.clone())));
            self.expiries = live.collect();
        } else if self.expiries.capacity() > 4 * self.expiries.len() + 1024 {
            self.expiries.shrink_to(2 * self.expiries.len() + 512);
        }
    }

    /// Forgets the records whose window has ended.
    fn sweep(&mut self, now: Instant) {
        while let Some(Reverse((expires, serial, _))) = self.expiries.peek() {
            if *expires > now {
                break;
            }
            let serial = *serial;
            let Some(Reverse((_, _, name))) = self.expiries.pop() else {
                break;
            };
            if self.is_live(&name, serial) {
                self.remove(&name);
            }
        }
        self.compact_expiries();
    }

    /// The publisher holding the most records gives up its oldest; `false` if none could.
    fn give_up_heaviest(&mut self) -> bool {
        let Some((_, heaviest)) = self.by_count.last().cloned() else {
            return false;
        };
        loop {
            let front = self
                .publishers
                .get_mut(&heaviest)
                .and_then(|p| p.order.pop_front());
            let Some((name, serial)) = front else {
                return false;
            };
            if self.is_live(&name, serial) {
                self.remove(&name);
                return true;
            }
        }
    }

    /// Whether the entry `name`, `serial` names a record still held.
    fn is_live(&self, name: &str, serial: u64) -> bool {
        self.records.get(name).is_some_and(|r| r.serial == serial)
    }

    /// Forgets the record `name`, if there is one.
    fn remove(&mut self, name: &str) {
        let Some(record) = self.records.remove(name) else {
            return;
        };
        let Some(publisher) = self.publishers.get_mut(&record.publisher) else {
            return;
        };
        publisher.count -= 1;
        let count = publisher.count;
        if count == 0 {
            self.publishers.remove(&record.publisher);
        } else if publisher.order.len() > 2 * count + 16 {
            let records = &self.records;
            let live = |(name, serial): &(Arc<str>, u64)| {
                records.get(name).is_some_and(|r| r.serial == *serial)
            };
            publisher.order.retain(live);
        }
        if let Some(order) = self
            .publishers
            .get_mut(&record.publisher)
            .map(|p| &mut p.order)
        {
            // The memory of a burst is given back once the list is a quarter of it.
            if order.capacity() > 4 * order.len() + 64 {
                order.shrink_to(2 * order.len() + 16);
            }
        }
        self.recount(&record.publisher, count + 1, count);
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

    /// Checks that the collections agree: each record counted once for its publisher, with
    /// one live entry in its list and in the expiries, and the lists bounded.
    #[cfg(test)]
    fn check(&self) {
        let mut counted = 0;
        for (publisher, p) in &self.publishers {
            assert!(p.count > 0 && self.by_count.contains(&(p.count, publisher.clone())));
            assert!(
                p.order.len() <= 2 * p.count + 16 && p.order.capacity() <= 8 * p.count + 160,
                "{} entries in {}",
                p.order.len(),
                p.order.capacity()
            );
            let live = p.order.iter().filter(|(n, s)| self.is_live(n, *s)).count();
            assert_eq!(live, p.count, "{publisher}'s live entries");
            counted += p.count;
        }
        assert_eq!(counted, self.records.len());
        assert_eq!(self.by_count.len(), self.publishers.len());
        let live = self
            .expiries
            .iter()
            .filter(|Reverse((_, s, n))| self.is_live(n, *s));
        assert_eq!(live.count(), self.records.len());
        assert!(self.expiries.len() <= 2 * self.records.len() + 1025);
        assert!(self.records.len() <= MAX_RECORDS);
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
        records.check();
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
    async fn expired_records_go_before_a_live_one_is_given_up() {
        let mut records = KeyRecords::default();
        records.record("long", &once("q", "K", 60_000), None);
        for n in 0..60_000 {
            records.record("short", &once("q", &n.to_string(), 1_000), None);
        }
        for n in 0..MAX_RECORDS - 60_001 {
            records.record("long", &once("r", &n.to_string(), 60_000), None);
        }
        assert_eq!(records.len(), MAX_RECORDS);
        tokio::time::advance(Duration::from_secs(2)).await;
        // q's 60,000 ended: r's next record gives up nothing of q's.
        records.record("long", &once("r", "more", 60_000), None);
        assert_eq!(records.seen("long", &once("q", "K", 60_000)), Some(None));
        assert_eq!(records.len(), MAX_RECORDS - 60_000 + 1);
        records.check();
    }

    #[tokio::test(start_paused = true)]
    async fn any_sequence_keeps_the_records_lists_and_expiries_in_step() {
        // Publishers making keys again, windows of 1 to 8 s, time moving on: after every
        // step each record is counted once, with one live entry in its publisher's list
        // and in the expiries, and nothing expired is held.
        let mut records = KeyRecords::default();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for step in 0..20_000 {
            let identity = format!("p{}", next(6));
            let key = format!("k{}", next(40));
            let window = 1_000 * (1 + next(8));
            let o = once(&identity, &key, window);
            if records.seen("r", &o).is_none() {
                records.record("r", &o, None);
            }
            if next(4) == 0 {
                tokio::time::advance(Duration::from_millis(next(1_500))).await;
            }
            if step % 97 == 0 {
                records.check();
            }
        }
        records.check();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(records.seen("r", &once("p0", "k0", 1_000)), None);
        assert_eq!(records.len(), 0);
        records.check();
        assert!(records.publishers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_given_up_and_made_again_lasts_its_new_window() {
        let mut records = KeyRecords::default();
        for n in 0..MAX_RECORDS {
            records.record("r", &once("a", &n.to_string(), 60_000), None);
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        // "0" is given up for "new", then made again: its first expiry is not its own.
        records.record("r", &once("a", "new", 60_000), None);
        assert_eq!(records.seen("r", &once("a", "0", 60_000)), None);
        records.record("r", &once("a", "0", 60_000), None);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(records.seen("r", &once("a", "0", 60_000)), Some(None));
        records.check();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_s_memory_is_given_back() {
        let mut records = KeyRecords::default();
        for n in 0..50_000 {
            records.record("r", &once("a", &n.to_string(), 1_000), None);
        }
        records.record("r", &once("a", "later", 60_000), None);
        tokio::time::advance(Duration::from_millis(1_200)).await;
        records.record("r", &once("a", "again", 60_000), None);
        assert_eq!(records.len(), 2);
        // The list holds a few entries, not the burst's 50,000 places; the expiries too.
        records.check();
        assert!(records.expiries.capacity() < 2_000);
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
