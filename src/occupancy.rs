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

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::broker::redis::OccupancyStore;
use crate::hooks::Happened;
use crate::notifier::Notifier;
use crate::rooms::RoomChange;

/// Changes sent at once, at most.
const BATCH: usize = 256;
/// How often failed changes are sent again.
const RETRY: Duration = Duration::from_secs(1);

/// Where occupancy is decided.
pub(crate) enum Ledger {
    /// This node is the whole cluster.
    Local,
    /// Redis decides, across every node.
    Redis(Box<OccupancyStore>),
}

/// The occupancy task, until it starts.
pub(crate) struct Occupancy {
    waiting: Mutex<Option<Task>>,
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
        let task = Task {
            ledger,
            notifier,
            changes,
            held: HashSet::new(),
            wanted: HashMap::new(),
            lease: None,
            leases: 0,
            renewed: Instant::now(),
            seq: 0,
        };
        Occupancy {
            waiting: Mutex::new(Some(task)),
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
}

struct Task {
    ledger: Ledger,
    notifier: Notifier,
    changes: mpsc::UnboundedReceiver<RoomChange>,
    /// Rooms registered in the ledger.
    held: HashSet<Arc<str>>,
    /// Rooms whose registration should change: `true` to register.
    wanted: HashMap<Arc<str>, bool>,
    /// The lease the rooms are held under (Redis), once registered.
    lease: Option<String>,
    leases: u64,
    renewed: Instant,
    /// The local ledger's sequence number (one for every room: it only grows).
    seq: u64,
}

impl Task {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(RETRY);
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
                _ = tick.tick() => self.maintain().await,
            }
            self.send().await;
        }
    }

    fn want(&mut self, change: RoomChange) {
        if change.occupied == self.held.contains(&change.room) {
            self.wanted.remove(&change.room);
        } else {
            self.wanted.insert(change.room, change.occupied);
        }
    }

    /// Sends the wanted changes, a batch at a time, until none is left or one fails.
    async fn send(&mut self) {
        while !self.wanted.is_empty() {
            let batch: Vec<(Arc<str>, bool)> = self
                .wanted
                .iter()
                .take(BATCH)
                .map(|(room, occupied)| (room.clone(), *occupied))
                .collect();
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
                            return;
                        }
                    }
                }
            };
            let mut progress = false;
            for ((room, occupied), applied) in batch.into_iter().zip(applied) {
                let Some(seq) = applied else { continue };
                progress = true;
                self.wanted.remove(&room);
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
            if !progress {
                return;
            }
        }
    }

    /// On Redis: takes a lease (or a new one, if this node's was swept), renews it, and
    /// sweeps out dead nodes' leases.
    async fn maintain(&mut self) {
        let Ledger::Redis(store) = &self.ledger else {
            return;
        };
        match &self.lease {
            None => {
                let lease = store.lease(self.leases);
                if let Err(e) = store.start(&lease).await {
                    tracing::warn!(error = %e, "occupancy: cannot take a lease; retrying");
                    return;
                }
                self.leases += 1;
                self.renewed = Instant::now();
                self.lease = Some(lease);
            }
            Some(_) if self.renewed.elapsed() < store.renew_every() => return,
            Some(lease) => match store.renew(lease).await {
                Ok(true) => self.renewed = Instant::now(),
                Ok(false) => {
                    tracing::warn!("occupancy: this node's lease was swept (it stalled); registering its rooms again");
                    self.lease = None;
                    for room in self.held.drain() {
                        self.wanted.entry(room).or_insert(true);
                    }
                    self.wanted.retain(|_, occupied| *occupied);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "occupancy: cannot renew the lease");
                    return;
                }
            },
        }
        match store.sweep().await {
            Ok(vacated) => {
                for (room, seq) in vacated {
                    self.notifier.notify(Happened::RoomVacated { room, seq });
                }
            }
            Err(e) => tracing::warn!(error = %e, "occupancy: sweep failed"),
        }
    }
}
