//! Room occupancy: tells the notification hook when a room becomes occupied (a first
//! member on any node) or vacant (no member left on any node), once for the whole cluster.
//!
//! The local rooms tell one task, in order, when a room gets its first member on this node
//! or loses its last ([`RoomChange`]). The task keeps which rooms it has registered and
//! brings the ledger in line: on one node (the in-memory broker) the local rooms are the
//! whole truth; on Redis, each node registers itself in the rooms it has, under a lease it
//! renews, and Redis decides which registration made a room occupied or vacant (see
//! `broker::redis::occupancy`). Changes that cancel out before they were sent (a room left
//! and joined again) send nothing; changes that fail are sent again every second.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::broker::redis::OccupancyStore;
use crate::hooks::{local_seq_base, Happened};
use crate::notifier::Notifier;
use crate::rooms::RoomChange;

/// Changes sent at once, at most.
const BATCH: usize = 256;
/// How often failed changes are sent again.
const RETRY: Duration = Duration::from_secs(1);
/// Every how many lease renewal periods a node checks its rooms' registrations on Redis
/// (about every 2 minutes with the default 30 s presence TTL).
const CHECK_EVERY: u32 = 12;

/// Where occupancy is decided.
pub(crate) enum Ledger {
    /// This node is the whole cluster.
    Local,
    /// Redis decides, across every node.
    Redis(Box<OccupancyStore>),
}

/// The occupancy task, until it starts, and the way to ask it for a flush.
pub(crate) struct Occupancy {
    waiting: Mutex<Option<Task>>,
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Occupancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Occupancy").finish_non_exhaustive()
    }
}

impl Occupancy {
    pub(crate) fn new(
        ledger: Ledger,
        notifier: Notifier,
        changes: mpsc::UnboundedReceiver<RoomChange>,
    ) -> Self {
        let (flushes, flush_requests) = mpsc::unbounded_channel();
        let task = Task {
            ledger,
            notifier,
            changes,
            flushes: flush_requests,
            held: HashSet::new(),
            wanted: HashMap::new(),
            unsure: HashMap::new(),
            lease: None,
            leases: 0,
            renewed: Instant::now(),
            checked: Instant::now(),
            swept: Instant::now(),
            seq: local_seq_base(),
        };
        Occupancy {
            waiting: Mutex::new(Some(task)),
            flushes,
        }
    }

    /// Starts the task (once; later calls do nothing). Must be called within a Tokio
    /// runtime; the task ends with the node's rooms.
    pub(crate) fn start(&self) {
        let task = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            tokio::spawn(task.run());
        }
    }

    /// Resolves once every change made so far was sent (or failed once more), and, if this
    /// node holds no room any more, its lease was given up: a node shutting down waits for
    /// it, so that its rooms are vacated now rather than when its lease runs out.
    pub(crate) async fn flush(&self) {
        if self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return; // never started: no socket, no change
        }
        let (done, flushed) = oneshot::channel();
        if self.flushes.send(done).is_ok() {
            let _ = flushed.await;
        }
    }
}

struct Task {
    ledger: Ledger,
    notifier: Notifier,
    changes: mpsc::UnboundedReceiver<RoomChange>,
    flushes: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    /// Rooms registered in the ledger.
    held: HashSet<Arc<str>>,
    /// Rooms whose registration should change: `true` to register.
    wanted: HashMap<Arc<str>, bool>,
    /// Rooms whose last change (`true`: register) went to Redis without an answer: it may
    /// or may not have been applied, so `held` may not be what Redis has. That change is
    /// sent again first (the script answers a call sent again the same, so its
    /// notification is not lost), then the wanted state, whatever `held` says.
    unsure: HashMap<Arc<str>, bool>,
    /// The lease the rooms are held under (Redis), once registered.
    lease: Option<String>,
    leases: u64,
    renewed: Instant,
    /// When the rooms' registrations were last checked (see [`CHECK_EVERY`]).
    checked: Instant,
    /// When dead nodes' leases were last swept.
    swept: Instant,
    /// The local ledger's last sequence number (one for every room: it only grows).
    seq: u64,
}

impl Task {
    async fn run(mut self) {
        let every = match &self.ledger {
            Ledger::Local => RETRY,
            Ledger::Redis(store) => store.tick(),
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                received = self.changes.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    for change in batch.drain(..) {
                        self.want(change);
                    }
                }
                Some(done) = self.flushes.recv() => {
                    self.drain();
                    self.send().await;
                    self.release().await;
                    let _ = done.send(());
                    continue;
                }
                _ = tick.tick() => self.maintain().await,
            }
            self.send().await;
        }
    }

    fn want(&mut self, change: RoomChange) {
        let settled = !self.unsure.contains_key(&change.room);
        if settled && change.occupied == self.held.contains(&change.room) {
            self.wanted.remove(&change.room);
        } else {
            self.wanted.insert(change.room, change.occupied);
        }
    }

    /// Takes in every change waiting in the channel: they coalesce in `wanted` (bounded by
    /// the rooms), however far behind Redis is.
    fn drain(&mut self) {
        while let Ok(change) = self.changes.try_recv() {
            self.want(change);
        }
    }

    /// Sends the wanted changes, a batch at a time, until none is left or none of a batch
    /// went through (the rest wait for the next tick). A change that failed is not sent
    /// again in this call, so that rooms that keep failing cannot hold up the others.
    async fn send(&mut self) {
        // A lease swept while this node stalled is found out before anything is written
        // under it.
        self.renew().await;
        let mut failed: HashSet<Arc<str>> = HashSet::new();
        loop {
            self.drain();
            let batch: Vec<(Arc<str>, bool)> = self
                .wanted
                .iter()
                .filter(|(room, _)| !failed.contains(*room))
                .take(BATCH)
                .map(|(room, occupied)| {
                    let first = self.unsure.get(room).unwrap_or(occupied);
                    (room.clone(), *first)
                })
                .collect();
            if batch.is_empty() || self.lease_may_have_run_out() {
                return;
            }
            let applied = match &self.ledger {
                Ledger::Local => batch
                    .iter()
                    .map(|_| {
                        self.seq += 1;
                        Some(self.seq)
                    })
                    .collect(),
                Ledger::Redis(store) => {
                    let Some(lease) = &self.lease else { return };
                    match store.apply(lease, &batch).await {
                        Ok(applied) => applied,
                        Err(e) => {
                            tracing::warn!(error = %e, "occupancy: Redis did not take the changes; retrying");
                            if e.outcome_unknown() {
                                for (room, occupied) in batch {
                                    self.unsure.entry(room).or_insert(occupied);
                                }
                            }
                            return;
                        }
                    }
                }
            };
            for ((room, occupied), applied) in batch.into_iter().zip(applied) {
                let Some(seq) = applied else {
                    failed.insert(room);
                    continue;
                };
                self.unsure.remove(&room);
                // What was sent again for an unsure room may not be the wanted state: that
                // goes next.
                if self.wanted.get(&room) == Some(&occupied) {
                    self.wanted.remove(&room);
                }
                match occupied {
                    true => self.held.insert(room.clone()),
                    false => self.held.remove(&room),
                };
                if seq > 0 {
                    self.notifier.notify(match occupied {
                        true => Happened::RoomOccupied { room, seq },
                        false => Happened::RoomVacated { room, seq },
                    });
                }
            }
            // A long send must not let the lease run out.
            self.renew().await;
        }
    }

    /// On Redis, at a shutdown: gives the lease up if it holds no room any more.
    async fn release(&mut self) {
        let (Ledger::Redis(store), Some(lease)) = (&self.ledger, &self.lease) else {
            return;
        };
        if !self.held.is_empty() || !self.wanted.is_empty() {
            return;
        }
        match store.release(lease).await {
            Ok(()) => self.lease = None,
            Err(e) => tracing::warn!(error = %e, "occupancy: cannot give the lease up"),
        }
    }

    /// On Redis: takes a lease if there is none, renews it when due (taking a new one if
    /// this node's was swept), and sweeps out dead nodes' leases.
    async fn maintain(&mut self) {
        let Ledger::Redis(store) = &self.ledger else {
            return;
        };
        if self.lease.is_some() {
            let renew_every = store.renew_every();
            // Renewed first: a check under a lease swept while this node stalled would
            // write under it.
            let renewed = self.renew().await;
            if self.lease.is_some() && self.checked.elapsed() >= renew_every * CHECK_EVERY {
                self.check().await;
            }
            // Sweeps once a renewal period, whichever path renewed (`send` renews too).
            if self.lease.is_none() || !renewed && self.swept.elapsed() < renew_every {
                return;
            }
        } else {
            let lease = store.lease(self.leases);
            let sent = Instant::now();
            if let Err(e) = store.start(&lease).await {
                tracing::warn!(error = %e, "occupancy: cannot take a lease; retrying");
                return;
            }
            self.leases += 1;
            self.renewed = sent;
            self.lease = Some(lease);
        }
        let Ledger::Redis(store) = &self.ledger else {
            return;
        };
        self.swept = Instant::now();
        let notifier = &self.notifier;
        let swept = store
            .sweep(|room, seq| notifier.notify(Happened::RoomVacated { room, seq }))
            .await;
        if let Err(e) = swept {
            tracing::warn!(error = %e, "occupancy: sweep failed");
        }
    }

    /// Checks the registrations of the rooms this node holds (none of them changing), and
    /// registers again the ones Redis lost while the lease survived: one cluster shard lost
    /// its data, or failed over to a replica that was behind. Without it, the room's
    /// `room_vacated` would never come (this node's taking out would find nothing to take
    /// out). The room's first node to register again tells it occupied again. A chunk at a
    /// time, taking in the changes that came meanwhile (a room changing is the change's)
    /// and renewing the lease between chunks; it stops if the lease was swept.
    async fn check(&mut self) {
        self.checked = Instant::now();
        let rooms: Vec<Arc<str>> = self.held.iter().cloned().collect();
        for chunk in rooms.chunks(BATCH) {
            self.drain();
            let chunk: Vec<Arc<str>> = chunk
                .iter()
                .filter(|room| {
                    self.held.contains(*room)
                        && !self.wanted.contains_key(*room)
                        && !self.unsure.contains_key(*room)
                })
                .cloned()
                .collect();
            if self.lease_may_have_run_out() {
                return;
            }
            let (Ledger::Redis(store), Some(lease)) = (&self.ledger, &self.lease) else {
                return;
            };
            match store.check(lease, &chunk).await {
                Ok(checked) => {
                    for (room, seq) in chunk.into_iter().zip(checked) {
                        if let Some(seq @ 1..) = seq {
                            tracing::warn!(room = &*room, "occupancy: Redis had lost this node's registration; registered again");
                            self.notifier.notify(Happened::RoomOccupied { room, seq });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "occupancy: cannot check the registrations");
                    return;
                }
            }
            // A long check must not let the lease run out.
            self.renew().await;
            if self.lease.is_none() {
                return;
            }
        }
    }

    /// Whether the lease may have run out by the time a write reaches Redis (on Redis, no
    /// renewal answered for nearly a lifetime: Redis is failing, or this node stalled):
    /// nothing is written under it until a renewal answers, since a sweep may take it out
    /// meanwhile.
    fn lease_may_have_run_out(&self) -> bool {
        match &self.ledger {
            Ledger::Redis(store) => self.renewed.elapsed() >= store.writable_for(),
            Ledger::Local => false,
        }
    }

    /// Renews the lease if a third of its lifetime went by since the last renewal; whether
    /// it was renewed. A lease that was swept (this node stalled) is replaced at the next
    /// tick, and every room registered again.
    async fn renew(&mut self) -> bool {
        let (Ledger::Redis(store), Some(lease)) = (&self.ledger, &self.lease) else {
            return false;
        };
        if self.renewed.elapsed() < store.renew_every() {
            return false;
        }
        // Redis counts the lifetime from when the renewal ran, which is after this.
        let sent = Instant::now();
        match store.renew(lease).await {
            Ok(true) => {
                self.renewed = sent;
                true
            }
            Ok(false) => {
                tracing::warn!("occupancy: this node's lease was swept (it stalled); registering its rooms again");
                self.lease = None;
                for room in self.held.drain() {
                    self.wanted.entry(room).or_insert(true);
                }
                self.wanted.retain(|_, occupied| *occupied);
                // Whatever the swept lease had, its rooms are registered anew.
                self.unsure.clear();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "occupancy: cannot renew the lease");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        let hook = tower::util::BoxCloneSyncService::new(tower::service_fn(
            |_: crate::hooks::Notification| async { Ok::<_, crate::hooks::BoxError>(()) },
        ));
        let (_changes, received) = mpsc::unbounded_channel();
        let occupancy = Occupancy::new(Ledger::Local, Notifier::new(hook, 16), received);
        let task = occupancy.waiting.lock().unwrap().take();
        task.expect("not started")
    }

    fn change(room: &Arc<str>, occupied: bool) -> RoomChange {
        RoomChange {
            room: room.clone(),
            occupied,
        }
    }

    /// A change sent without an answer may or may not have been applied: the room's state
    /// is sent again, even when it is back to what the node last knew it held.
    #[tokio::test]
    async fn a_room_whose_change_went_unanswered_is_sent_again_whatever_it_held() {
        let mut task = task();
        let room: Arc<str> = "r".into();
        task.held.insert(room.clone());
        // Settled: a change undone before it was sent is not sent at all.
        task.want(change(&room, false));
        task.want(change(&room, true));
        assert!(task.wanted.is_empty());
        // Its vacate went without an answer; a member came back meanwhile.
        task.want(change(&room, false));
        task.unsure.insert(room.clone(), false);
        task.want(change(&room, true));
        assert_eq!(task.wanted.get(&room), Some(&true));
        // The vacate goes again first (its notification is not lost), then the occupy.
        let before = task.seq;
        task.send().await;
        assert!(task.wanted.is_empty() && task.unsure.is_empty());
        assert!(task.held.contains(&room));
        assert_eq!(task.seq, before + 2, "two changes applied");
    }
}
