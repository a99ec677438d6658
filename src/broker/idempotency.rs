//! The idempotency keys the memory broker recorded (protocol 1.2): for each room, publisher
//! identity and key published within its window, where the message went. (On Redis, each
//! record is a key that expires with its window, written by the publish scripts.)
//!
//! Bounded: at most [`MAX_RECORDS`] records. When more come, the publisher holding the most
//! records gives up its oldest, so a publisher that floods keyed messages pushes out its own
//! records, not other publishers'. A publisher whose records are given up before their
//! window ends may see a resend of one published again: as after the window.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Once, Position};

/// The most records the memory broker holds.
pub(crate) const MAX_RECORDS: usize = 100_000;

/// Recorded keys, with when each record expires, by publisher.
///
/// Each record has one entry in its publisher's list (oldest first) and one in the queue
/// of its window (records of one window expire in the order they were made); an entry
/// names its record by name and serial, so that one left behind by a record already gone
/// (expired, given up, or made again) is known and skipped. Lists and queues are compacted
/// when such entries outnumber the live ones.
#[derive(Debug, Default)]
pub(crate) struct KeyRecords {
    /// Each record, by its name (see [`name`]).
    records: HashMap<Arc<str>, Record>,
    /// Each publisher holding records, by its identity: a client's, then the server's.
    publishers: [HashMap<Arc<str>, Publisher>; 2],
    /// The publishers by how many records they hold (the last holds the most) and their
    /// number: kind and identity.
    by_count: BTreeMap<(usize, u64), (bool, Arc<str>)>,
    /// Per window with records, their expiries in order, and how many entries the queues
    /// hold in all.
    expiries: HashMap<Duration, VecDeque<Expiry>>,
    queued: usize,
    /// Each queue's first expiry, the soonest first: what a sweep looks at.
    fronts: BTreeSet<(Instant, Duration)>,
    /// The serial of the last record or publisher made.
    serial: u64,
}

/// When a record expires: the time, its serial and its name.
type Expiry = (Instant, u64, Arc<str>);

#[derive(Debug)]
struct Record {
    position: Option<Position>,
    serial: u64,
    server: bool,
    publisher: Arc<str>,
}

/// One publisher's number, and its records, oldest first, by name and serial.
#[derive(Debug)]
struct Publisher {
    number: u64,
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

    /// Records `once` in `room`, published at `position`, for its window. The caller asked
    /// [`KeyRecords::seen`] first, which found none (any record of the name had expired
    /// and was swept out).
    pub(crate) fn record(&mut self, room: &str, once: &Once<'_>, position: Option<Position>) {
        let now = Instant::now();
        self.sweep(now);
        let name: Arc<str> = name(room, once).into();
        debug_assert!(!self.records.contains_key(&name), "recorded twice: {name}");
        while self.records.len() >= MAX_RECORDS && self.give_up_heaviest() {}
        self.serial += 1;
        let serial = self.serial;
        let publishers = &mut self.publishers[usize::from(once.server)];
        let publisher = match publishers.get_mut(once.identity) {
            Some(publisher) => publisher,
            None => publishers.entry(once.identity.into()).or_insert(Publisher {
                number: serial,
                order: VecDeque::new(),
                count: 0,
            }),
        };
        publisher.count += 1;
        publisher.order.push_back((name.clone(), serial));
        let (number, count) = (publisher.number, publisher.count);
        let identity: Arc<str> = match self.by_count.remove(&(count - 1, number)) {
            Some((_, identity)) => identity,
            None => once.identity.into(),
        };
        self.by_count
            .insert((count, number), (once.server, identity.clone()));
        let expires = now + once.window;
        let queue = self.expiries.entry(once.window).or_default();
        if queue.is_empty() {
            self.fronts.insert((expires, once.window));
        }
        queue.push_back((expires, serial, name.clone()));
        self.queued += 1;
        let record = Record {
            position,
            serial,
            server: once.server,
            publisher: identity,
        };
        self.records.insert(name, record);
        self.compact_expiries();
    }

    /// Forgets the records whose window has ended: the queues whose first expiry has come,
    /// each up to its first expiry still to come (a queue emptied is dropped).
    fn sweep(&mut self, now: Instant) {
        while let Some(&(first, window)) = self.fronts.first() {
            if first > now {
                break;
            }
            self.fronts.pop_first();
            let Some(mut queue) = self.expiries.remove(&window) else {
                continue;
            };
            while let Some(&(expires, serial, _)) = queue.front() {
                if expires > now {
                    self.fronts.insert((expires, window));
                    break;
                }
                let Some((_, _, name)) = queue.pop_front() else {
                    break;
                };
                self.queued -= 1;
                if self.is_live(&name, serial) {
                    self.remove(&name);
                }
            }
            if !queue.is_empty() {
                give_back(&mut queue);
                self.expiries.insert(window, queue);
            }
        }
    }

    /// Drops the queues' entries of records already gone once they outnumber the records.
    fn compact_expiries(&mut self) {
        if self.queued <= 2 * self.records.len() + 1024 {
            return;
        }
        let records = &self.records;
        let live = |(_, serial, name): &Expiry| is_live(records, name, *serial);
        self.queued = 0;
        self.fronts.clear();
        for (window, queue) in &mut self.expiries {
            queue.retain(live);
            queue.shrink_to(2 * queue.len() + 16);
            self.queued += queue.len();
            if let Some((first, ..)) = queue.front() {
                self.fronts.insert((*first, *window));
            }
        }
        self.expiries.retain(|_, queue| !queue.is_empty());
    }

    /// The publisher holding the most records gives up its oldest; `false` if none could.
    fn give_up_heaviest(&mut self) -> bool {
        let Some((_, (server, identity))) = self.by_count.last_key_value() else {
            return false;
        };
        let (server, identity) = (*server, identity.clone());
        loop {
            let publishers = &mut self.publishers[usize::from(server)];
            let front = publishers
                .get_mut(&identity)
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
        is_live(&self.records, name, serial)
    }

    /// Forgets the record `name`, if there is one.
    fn remove(&mut self, name: &str) {
        let Some(record) = self.records.remove(name) else {
            return;
        };
        let publishers = &mut self.publishers[usize::from(record.server)];
        let Some(publisher) = publishers.get_mut(&record.publisher) else {
            return;
        };
        publisher.count -= 1;
        let (number, count) = (publisher.number, publisher.count);
        let entry = self.by_count.remove(&(count + 1, number));
        if count == 0 {
            publishers.remove(&record.publisher);
            return;
        }
        if let Some(entry) = entry {
            self.by_count.insert((count, number), entry);
        }
        let order = &mut publisher.order;
        if order.len() > 2 * count + 16 {
            let records = &self.records;
            order.retain(|(name, serial)| is_live(records, name, *serial));
        }
        give_back(order);
    }

    /// How many records are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }

    /// Checks that the collections agree: each record counted once for its publisher, with
    /// one live entry in its list and in the queues, and the lists bounded.
    #[cfg(test)]
    fn check(&self) {
        let mut counted = 0;
        for (server, publishers) in [false, true].into_iter().zip(&self.publishers) {
            for (identity, p) in publishers {
                let entry = self.by_count.get(&(p.count, p.number));
                assert_eq!(entry, Some(&(server, identity.clone())));
                let order = &p.order;
                assert!(
                    order.len() <= 2 * p.count + 16 && order.capacity() <= 8 * p.count + 160,
                    "{} entries in {}",
                    order.len(),
                    order.capacity()
                );
                let live = order.iter().filter(|(n, s)| self.is_live(n, *s)).count();
                assert_eq!(live, p.count, "{identity}'s live entries");
                counted += p.count;
            }
        }
        assert_eq!(counted, self.records.len());
        let publishers = self.publishers.iter().map(HashMap::len).sum::<usize>();
        assert_eq!(self.by_count.len(), publishers);
        let queues = self.expiries.values().flatten();
        let live = queues.filter(|(_, s, n)| self.is_live(n, *s)).count();
        assert_eq!(live, self.records.len());
        let queued: usize = self.expiries.values().map(VecDeque::len).sum();
        assert_eq!(queued, self.queued);
        // Each queue is there while it holds entries, its first in the fronts.
        assert_eq!(self.fronts.len(), self.expiries.len());
        for (window, queue) in &self.expiries {
            let first = queue.front().map(|(first, ..)| *first);
            assert!(first.is_some_and(|f| self.fronts.contains(&(f, *window))));
        }
        assert!(self.queued <= 2 * self.records.len() + 1024);
        assert!(self.records.len() <= MAX_RECORDS);
    }
}

/// Whether the entry `name`, `serial` names a record of `records`.
fn is_live(records: &HashMap<Arc<str>, Record>, name: &str, serial: u64) -> bool {
    records.get(name).is_some_and(|r| r.serial == serial)
}

/// Gives back the memory of a burst once `entries` hold a quarter of it.
fn give_back<T>(entries: &mut VecDeque<T>) {
    if entries.capacity() > 4 * entries.len() + 64 {
        entries.shrink_to(2 * entries.len() + 16);
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
        assert!(records.publishers.iter().all(HashMap::is_empty) && records.by_count.is_empty());
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
        assert!(records.publishers.iter().all(HashMap::is_empty));
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
        assert!(records.expiries.values().all(|q| q.capacity() < 2_000));
    }

    #[tokio::test(start_paused = true)]
    async fn windows_no_record_uses_any_more_cost_nothing() {
        // Rooms may each have a window of their own: a window's queue goes with its last
        // record, so a sweep looks only at windows with records in them.
        let mut records = KeyRecords::default();
        for n in 1..=1_000 {
            records.record("r", &once("a", &n.to_string(), n), None);
        }
        records.record("r", &once("a", "long", 60_000), None);
        records.check();
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(records.seen("r", &once("a", "1", 1)), None);
        assert_eq!(records.len(), 1);
        assert_eq!((records.expiries.len(), records.fronts.len()), (1, 1));
        records.check();
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
