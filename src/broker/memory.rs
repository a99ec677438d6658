//! The single-node broker: delivery straight into the sink, identities in process memory
//! with the same expiry as on Redis.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::time::Instant;

use super::idempotency::KeyRecords;
use super::presence::MemoryPresence;
use super::{
    new_epoch, recoverable, Accepted, HistoryPage, Once, Page, Position, Recovery, SharedSink,
};
use crate::notifier::Notifier;
use crate::protocol::server;
use crate::settings::History;

/// Single-node broker.
pub(crate) struct MemoryBroker {
    sink: SharedSink,
    presence: MemoryPresence,
    identities: Mutex<Identities>,
    histories: Mutex<Histories>,
    /// Idempotency keys published within their windows. Taken before `histories`.
    keys: Mutex<KeyRecords>,
}

/// How often expired room histories are swept out, at most.
const HISTORY_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The rooms' histories.
struct Histories {
    rooms: HashMap<String, RoomHistory>,
    /// When expired histories were last swept out.
    swept: Instant,
}

/// One room's history: a ring of its last frames, with the same semantics as on Redis (a
/// new epoch when the history was lost: here, when it expired or the node started).
struct RoomHistory {
    epoch: Arc<str>,
    top: u64,
    kept: VecDeque<(u64, Utf8Bytes)>,
    expires: Instant,
}

/// The identities' rooms. An identity's record expires `ttl` after its last socket went
/// away (or it was last changed, if no socket ever held it).
struct Identities {
    records: HashMap<String, Record>,
    ttl: Duration,
    /// When expired records were last swept out.
    swept: Instant,
}

#[derive(Default)]
struct Record {
    rooms: HashSet<String>,
    /// Sockets bound to the identity now; the record does not expire while any is.
    held: usize,
    /// When the record expires if nobody holds it.
    expires: Option<Instant>,
}

impl Record {
    fn expired(&self, now: Instant) -> bool {
        self.held == 0 && self.expires.is_some_and(|at| at <= now)
    }

    /// Whether `room` may be recorded: it is already, or there are fewer than `max`.
    fn fits(&self, room: &str, max: usize) -> bool {
        self.rooms.contains(room) || self.rooms.len() < max
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    pub(crate) fn new(
        sink: SharedSink,
        identity_ttl: Duration,
        notifier: Option<Notifier>,
    ) -> Self {
        MemoryBroker {
            presence: MemoryPresence::new(sink.clone(), notifier),
            sink,
            identities: Mutex::new(Identities {
                records: HashMap::new(),
                ttl: identity_ttl,
                swept: Instant::now(),
            }),
            histories: Mutex::new(Histories {
                rooms: HashMap::new(),
                swept: Instant::now(),
            }),
            keys: Mutex::default(),
        }
    }

    /// `room`'s history, created (with a new epoch) if it has none or it expired.
    fn room_history<'a>(
        histories: &'a mut HashMap<String, RoomHistory>,
        room: &str,
        history: History,
        now: Instant,
    ) -> &'a mut RoomHistory {
        let fresh = || RoomHistory {
            epoch: new_epoch(),
            top: 0,
            kept: VecDeque::new(),
            expires: now + history.ttl,
        };
        let entry = histories.entry(room.to_owned()).or_insert_with(fresh);
        if entry.expires <= now {
            *entry = fresh();
        }
        entry
    }

    /// The rooms' histories, with expired ones swept out (at most once per
    /// [`HISTORY_SWEEP_EVERY`], so that memory stays bounded by live rooms while a publish
    /// stays O(1) on average).
    fn histories(&self, now: Instant) -> MutexGuard<'_, Histories> {
        let mut histories = self
            .histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(histories.swept) >= HISTORY_SWEEP_EVERY {
            histories.rooms.retain(|_, h| h.expires > now);
            histories.swept = now;
        }
        histories
    }

    /// Presence rooms.
    pub(crate) fn presence(&self) -> &MemoryPresence {
        &self.presence
    }

    /// Appends `frame` to `room`'s history with the next offset and delivers it, in one
    /// step (under the lock, so that offsets reach the sink in order).
    fn publish_history(&self, room: &str, frame: &str, history: History) -> Position {
        let now = Instant::now();
        let mut histories = self.histories(now);
        let room_history = Self::room_history(&mut histories.rooms, room, history, now);
        room_history.top += 1;
        room_history.expires = now + history.ttl;
        let offset = room_history.top;
        let framed = Utf8Bytes::from(server::with_position(frame, offset, &room_history.epoch));
        room_history.kept.push_back((offset, framed.clone()));
        while room_history.kept.len() > history.size {
            room_history.kept.pop_front();
        }
        let position = Position {
            offset,
            epoch: room_history.epoch.clone(),
        };
        self.sink.deliver(room, &framed);
        position
    }

    /// Where `room`'s history stands.
    pub(crate) fn top(&self, room: &str, history: History) -> Position {
        let now = Instant::now();
        let mut histories = self.histories(now);
        let h = Self::room_history(&mut histories.rooms, room, history, now);
        Position {
            offset: h.top,
            epoch: h.epoch.clone(),
        }
    }

    /// Where `room`'s history stands, what it keeps, and its frames after `since`.
    /// As with the Redis broker's: the frames after `since` in `epoch` only when they can all be
    /// recovered and fit in `budget` bytes (if given).
    pub(crate) fn recover(
        &self,
        room: &str,
        history: History,
        (since, epoch): (u64, &str),
        budget: Option<usize>,
    ) -> Recovery {
        let now = Instant::now();
        let mut histories = self.histories(now);
        let h = Self::room_history(&mut histories.rooms, room, history, now);
        let oldest = h.kept.front().map_or(h.top + 1, |(offset, _)| *offset);
        let mut frames = Vec::new();
        let mut fits = true;
        if recoverable(h.top, &h.epoch, oldest, since, epoch, history.size) {
            frames = (h.kept.iter())
                .filter(|(offset, _)| *offset > since)
                .map(|(_, f)| f.clone())
                .collect();
            let bytes: usize = frames.iter().map(|frame| frame.len()).sum();
            if budget.is_some_and(|budget| bytes > budget) {
                frames.clear();
                fits = false;
            }
        }
        Recovery {
            top: Position {
                offset: h.top,
                epoch: h.epoch.clone(),
            },
            oldest,
            frames,
            fits,
        }
    }

    /// A page of `room`'s history (see [`Page`]): the same frames the Redis broker reads.
    pub(crate) fn history(&self, room: &str, history: History, page: Page) -> HistoryPage {
        let now = Instant::now();
        let mut histories = self.histories(now);
        let h = Self::room_history(&mut histories.rooms, room, history, now);
        let before = page.before.unwrap_or(u64::MAX);
        let asked: Vec<&Utf8Bytes> = (h.kept.iter().rev())
            .filter(|(offset, _)| *offset < before)
            .take(page.limit)
            .map(|(_, f)| f)
            .collect();
        let mut bytes = 0;
        let kept = asked
            .iter()
            .take_while(|frame| {
                bytes += frame.len() + 1;
                page.budget.is_none_or(|budget| bytes <= budget)
            })
            .count()
            .max(asked.len().min(1));
        let frames = asked[..kept].iter().rev().map(|f| (*f).clone()).collect();
        let position = Position {
            offset: h.top,
            epoch: h.epoch.clone(),
        };
        (position, frames, kept < asked.len())
    }

    /// Publishes `frame` to `room` (into its history, if it has one). With `once`, unless
    /// its key is recorded within its window: then nothing is published and the answer is a
    /// duplicate's. The check and the record happen under one lock, with a history
    /// room's publish between them; any other frame goes out after both.
    pub(crate) fn publish(
        &self,
        room: &str,
        frame: String,
        history: Option<History>,
        once: Option<Once<'_>>,
    ) -> Accepted {
        let mut keys = once.map(|_| self.keys.lock().unwrap_or_else(PoisonError::into_inner));
        if let (Some(keys), Some(once)) = (&mut keys, &once) {
            if let Some(position) = keys.seen(room, once) {
                return Accepted {
                    position,
                    duplicate: true,
                };
            }
        }
        // A history frame is kept and delivered under the lock (its offset goes into the
        // record); any other is delivered once its key is recorded and the lock released
        // (nothing can fail in between), so that the lock is not held through the fanout.
        let position = history.map(|history| self.publish_history(room, &frame, history));
        if let (Some(keys), Some(once)) = (&mut keys, &once) {
            keys.record(room, once, position.clone());
        }
        drop(keys);
        if history.is_none() {
            self.sink.deliver(room, &Utf8Bytes::from(frame));
        }
        Accepted {
            position,
            duplicate: false,
        }
    }

    /// The identities, with expired records swept out (at most once per third of the TTL,
    /// so that a lookup stays O(1) on average).
    fn identities(&self) -> MutexGuard<'_, Identities> {
        let mut identities = self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(identities.swept) >= identities.ttl / 3 {
            identities.records.retain(|_, record| !record.expired(now));
            identities.swept = now;
        }
        identities
    }

    /// Records `room` unless `identity` has `max` rooms already; returns whether it is.
    pub(crate) fn record(&self, identity: &str, room: &str, max: usize) -> bool {
        let mut identities = self.identities();
        let ttl = identities.ttl;
        let now = Instant::now();
        let record = identities.records.entry(identity.to_owned()).or_default();
        if record.expired(now) {
            *record = Record::default();
        }
        record.expires = Some(now + ttl);
        if !record.fits(room, max) {
            return false;
        }
        record.rooms.insert(room.to_owned());
        true
    }

    /// Whether [`MemoryBroker::record`] would record `room` now; changes nothing.
    pub(crate) fn fits(&self, identity: &str, room: &str, max: usize) -> bool {
        let identities = self.identities();
        match identities.records.get(identity) {
            Some(record) if !record.expired(Instant::now()) => record.fits(room, max),
            _ => Record::default().fits(room, max),
        }
    }

    pub(crate) fn forget(&self, identity: &str, room: &str) {
        let mut identities = self.identities();
        if let Some(record) = identities.records.get_mut(identity) {
            record.rooms.remove(room);
            if record.rooms.is_empty() && record.held == 0 {
                identities.records.remove(identity);
            }
        }
    }

    pub(crate) fn rooms_of(&self, identity: &str) -> Vec<String> {
        let now = Instant::now();
        self.identities()
            .records
            .get(identity)
            .filter(|record| !record.expired(now))
            .map(|record| record.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A socket bound `identity`: its record does not expire until the last one goes.
    pub(crate) fn hold(&self, identity: &str) {
        let mut identities = self.identities();
        let now = Instant::now();
        let record = identities.records.entry(identity.to_owned()).or_default();
        if record.expired(now) {
            *record = Record::default();
        }
        record.held += 1;
    }

    /// A socket bound to `identity` went away; the TTL runs from now when it was the last.
    pub(crate) fn unhold(&self, identity: &str) {
        let mut identities = self.identities();
        let ttl = identities.ttl;
        if let Some(record) = identities.records.get_mut(identity) {
            record.held = record.held.saturating_sub(1);
            record.expires = Some(Instant::now() + ttl);
            if record.held == 0 && record.rooms.is_empty() {
                identities.records.remove(identity);
            }
        }
    }
}
