//! The subscriber task on a Redis Cluster: one `SSUBSCRIBE` per room with local members,
//! on the shard that owns the room's slot, through redis-rs's cluster connection (RESP3,
//! messages as pushes). redis-rs holds one connection per shard it needs, follows `MOVED`,
//! refreshes the topology and resubscribes after a reconnection or a failover.
//!
//! What this task adds, as the single-Redis subscriber does: reference counts per room, a
//! subscribe confirmed before its caller goes on, and history rooms that lose nothing. A
//! room's subscription that comes back (a new `ssubscribe` push after a failover, or after
//! the server dropped it when its slot moved: an unasked `sunsubscribe` push, answered by
//! subscribing again on the new owner) is caught up from the room's history before any
//! later push is read.
//!
//! redis-rs notices a changed topology only when a command gets `MOVED`, and a subscriber
//! sends no commands: so twice a second the task reads the slot map (`CLUSTER SLOTS`, from
//! any node) and pings every master (for health). When the map changed (a replica was
//! promoted, a slot migrated), it drops its connection (the subscriptions go with it),
//! subscribes to every room again on a new one, which follows the new map, and catches
//! history rooms up.

use std::sync::Arc;
use std::time::Duration;

use hyper_tungstenite::tungstenite::Utf8Bytes;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};

use super::catch_up::Tracks;
use super::commands::{ping_every_master, read_slot_map, Cluster, SlotMap};
use super::connect::within;
use super::history::HistoryStore;
use super::room_counts::{Acquired, RoomCounts};
use super::subscriptions::{Command, Subscriptions};
use crate::broker::{Keys, SharedSink};
use crate::error::BrokerError;
use crate::settings::RoomPolicy;

/// How often the task pings every master.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// At most this many rooms whose subscribe failed are tried again per check.
const RETRY_AT_ONCE: usize = 64;

/// The subscriber task on a Redis Cluster.
pub(crate) struct ShardedSubscriber;

impl ShardedSubscriber {
    /// Starts the task on `cluster` (a client of its own, built with `pushes` as its push
    /// sender), inside a Tokio runtime; the returned handle drives it.
    pub(crate) fn start(
        cluster: Cluster,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        keys: Keys,
        timeout: Duration,
        sink: SharedSink,
        rooms: RoomPolicy,
        store: Arc<HistoryStore>,
    ) -> Subscriptions {
        let (handle, ends) = Subscriptions::new("sharded subscriber task");
        let task = Task {
            cluster,
            keys,
            timeout,
            sink,
            live: ends.live,
            slots: None,
            counts: RoomCounts::default(),
            tracks: Tracks::new(rooms),
            store,
        };
        tokio::spawn(task.run(ends.commands, pushes));
        handle
    }
}

struct Task {
    cluster: Cluster,
    keys: Keys,
    timeout: Duration,
    sink: SharedSink,
    live: watch::Sender<bool>,
    /// The slot map last read.
    slots: Option<SlotMap>,
    /// Local acquisitions per room; the room is subscribed while its count is > 0.
    counts: RoomCounts,
    tracks: Tracks,
    store: Arc<HistoryStore>,
}

impl Task {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    ) {
        // Connect at once, so that health and readiness know.
        if self.connection().await.is_ok() {
            let _ = self.live.send(true);
        }
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                Some(push) = pushes.recv() => self.push(push).await,
                _ = check.tick() => self.check().await,
            }
        }
    }

    /// Reads the slot map and pings every master; see the module docs.
    async fn check(&mut self) {
        let read = async {
            let mut connection = self.connection().await?;
            within(CHECK_EVERY, async {
                read_slot_map(&mut connection)
                    .await
                    .ok_or(BrokerError::Protocol("no slot map from the cluster".into()))
            })
            .await
        };
        match read.await {
            Ok(slots) if self.slots.as_ref().is_some_and(|known| *known != slots) => {
                self.slots = Some(slots);
                tracing::info!(
                    "the Redis Cluster's slot map changed: subscribing again on a new connection"
                );
                self.cluster.reset().await;
                let rooms: Vec<Arc<str>> = self.counts.rooms().cloned().collect();
                self.resubscribe(rooms).await;
            }
            Ok(slots) => {
                self.slots = Some(slots);
                // Rooms left without a subscription (a subscribe again that failed) are
                // retried while the cluster answers; until then they receive nothing, and
                // once back they catch up (or get a gap) like any subscription that came
                // back.
                let failed = self.counts.failed();
                self.retry(failed).await;
            }
            Err(e) => tracing::debug!(error = %e.report(), "could not read the slot map"),
        }
        let pinged = async {
            let mut connection = self.connection().await?;
            within(CHECK_EVERY, ping_every_master(&mut connection)).await
        };
        let _ = self.live.send(pinged.await.is_ok());
    }

    /// Subscribes to each of `rooms` again; one that fails is marked for a retry at the
    /// next check.
    async fn resubscribe(&mut self, rooms: Vec<Arc<str>>) {
        for room in rooms {
            let subscribed = self.subscribe(&room).await;
            if let Err(e) = &subscribed {
                tracing::warn!(room = &*room, error = %e.report(), "could not subscribe again: retrying at the next check");
            }
            self.counts.subscribed(&room, subscribed.is_ok());
        }
        crate::metrics::redis_subscriptions(self.counts.subscribed_count());
    }

    /// Subscribes again to rooms whose last subscribe failed, quietly (each was warned
    /// about when it failed), at most [`RETRY_AT_ONCE`] per check and only while the
    /// cluster answers: one not refused but unanswered ends this round, so that a shard
    /// that is away costs one timeout per check, not one per room.
    async fn retry(&mut self, rooms: Vec<Arc<str>>) {
        for room in rooms.into_iter().take(RETRY_AT_ONCE) {
            let subscribed = self.subscribe(&room).await;
            self.counts.subscribed(&room, subscribed.is_ok());
            match subscribed {
                Ok(()) => tracing::info!(room = &*room, "subscribed again"),
                Err(BrokerError::Refused(e)) => {
                    tracing::debug!(room = &*room, error = %e, "still refused")
                }
                Err(e) => {
                    tracing::debug!(room = &*room, error = %e.report(), "no answer: retrying at the next check");
                    break;
                }
            }
        }
        crate::metrics::redis_subscriptions(self.counts.subscribed_count());
    }

    async fn connection(&self) -> Result<ClusterConnection, BrokerError> {
        let connection = within(self.timeout, self.cluster.connection()).await;
        if connection.is_ok() {
            let _ = self.live.send(true);
        }
        connection
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Acquire { room, reply } => {
                let first = self.counts.get(&room).is_none();
                if self.counts.acquire(&room) == Acquired::Subscribed {
                    let _ = reply.send(Ok(()));
                    return;
                }
                if first {
                    // Not for a held room whose subscribe failed: its position stays, for
                    // the catch-up when the subscription comes back.
                    self.tracks.opened(&room);
                }
                // On failure the room stays counted until its caller releases it (see
                // `room_counts`).
                let subscribed = self.subscribe(&room).await;
                self.counts.subscribed(&room, subscribed.is_ok());
                crate::metrics::redis_subscriptions(self.counts.subscribed_count());
                let _ = reply.send(subscribed);
            }
            Command::Release { room } => self.decrement(&room).await,
            Command::Ping { reply } => {
                let pinged = async {
                    let mut connection = self.connection().await?;
                    within(self.timeout, ping_every_master(&mut connection)).await
                };
                let _ = reply.send(pinged.await);
            }
        }
    }

    async fn subscribe(&self, room: &str) -> Result<(), BrokerError> {
        let mut connection = self.connection().await?;
        let channel = self.keys.room_channel(room);
        within(self.timeout, async {
            connection
                .ssubscribe(&channel)
                .await
                .map_err(super::connect::redis_error)
        })
        .await
    }

    async fn decrement(&mut self, room: &str) {
        if !self.counts.release(room) {
            return;
        }
        crate::metrics::redis_subscriptions(self.counts.subscribed_count());
        self.tracks.closed(room);
        let channel = self.keys.room_channel(room);
        if let Ok(mut connection) = self.connection().await {
            let unsubscribed = within(self.timeout, async {
                connection
                    .sunsubscribe(&channel)
                    .await
                    .map_err(super::connect::redis_error)
            });
            if let Err(e) = unsubscribed.await {
                tracing::debug!(error = %e.report(), room, "sunsubscribe failed");
            }
        }
    }

    /// The room a push is about, if it is a room this node holds.
    fn room_of(&self, push: &PushInfo) -> Option<Arc<str>> {
        let Some(Value::BulkString(channel)) = push.data.first() else {
            return None;
        };
        let channel = std::str::from_utf8(channel).ok()?;
        let room = self.keys.room_of_channel(channel)?;
        self.counts.get(room).cloned()
    }

    async fn push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                let Some(room) = self.room_of(&push) else {
                    return;
                };
                // The payload's bytes become the frame without a copy.
                let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) else {
                    return;
                };
                let Ok(frame) = String::from_utf8(payload) else {
                    tracing::warn!(room = &*room, "dropped a non-UTF-8 frame");
                    return;
                };
                if self.tracks.admit(&room, &frame) {
                    self.sink.deliver(&room, &Utf8Bytes::from(frame));
                }
            }
            // A subscription confirmed again: after a reconnection or a failover, what was
            // published meanwhile comes from the history, before any later push (a room
            // without history gets a gap).
            PushKind::SSubscribe => {
                let Some(room) = self.room_of(&push) else {
                    return;
                };
                if self.counts.confirmed(&room) {
                    let plain = self
                        .tracks
                        .catch_up(std::iter::once(&room), &self.store, &*self.sink)
                        .await;
                    if plain > 0 {
                        tracing::debug!(
                            room = &*room,
                            "a subscription came back: its members got a gap"
                        );
                    }
                }
            }
            // The server dropped a subscription we hold: its slot moved to another shard.
            PushKind::SUnsubscribe => {
                if let Some(room) = self.room_of(&push) {
                    tracing::info!(room = &*room, "sharded subscription dropped by the server (slot moved): subscribing again");
                    self.resubscribe(vec![room]).await;
                }
            }
            _ => {}
        }
    }
}
