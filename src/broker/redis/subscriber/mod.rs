//! The subscriber task: it holds the node's room subscriptions, on one Redis or on a Redis
//! Cluster, with one bookkeeping for both.
//!
//! - `topology`: where each room's subscription lives: the one pub/sub connection
//!   (`SUBSCRIBE`), or the connection to the master serving its slot (`SSUBSCRIBE`);
//! - `shard`: one pub/sub connection (read by hand, see `resp`), its rooms, its backoff;
//! - `room_counts`: acquisitions per room, and which rooms are not subscribed (refused, or
//!   their connection lost);
//! - `catch_up`: history rooms' positions, and what members missed while a room was not
//!   subscribed;
//! - `forward`: a message read from Redis on its way to the sink;
//! - `handle`: the handle that drives the task, and the commands it sends;
//! - `commands`: how the task carries them out;
//! - `subscribe`: subscribing a shard's rooms in groups, each caught up once confirmed.
//!
//! Every subscribe is confirmed before its caller goes on. A room that is not subscribed
//! while it is held (its connection was lost, Redis refused it, its slot moved) is
//! subscribed again as soon as it can be, and then caught up: what was published meanwhile
//! comes from the history, before any later message, or its members get a `gap`. Twice a
//! second the task retries such rooms and, on a cluster, reads the slot map: rooms whose
//! slot moved go to their new master; the others stay where they are.

mod catch_up;
mod commands;
mod forward;
mod handle;
mod room_counts;
mod shard;
mod subscribe;
mod topology;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use self::catch_up::Tracks;
use self::forward::{Forward, Held};
use self::handle::Command;
pub(crate) use self::handle::Subscriptions;
use self::room_counts::RoomCounts;
use self::shard::{joined, next_event, Event, Shard};
pub(crate) use self::topology::Topology;
use super::history::HistoryStore;
use super::resp::{Reply, RespConnection};
use crate::broker::{Keys, SharedSink};
use crate::error::BrokerError;
use crate::settings::RoomPolicy;

/// How often rooms left without a subscription are retried and a cluster's slot map read.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// How often every pub/sub connection is pinged: one that went silent without closing (a
/// host that rebooted, a network that dropped it) is found and replaced, and its rooms
/// caught up.
const PING_EVERY: Duration = Duration::from_secs(15);

/// At most this many refused rooms are tried one at a time per check (a command each).
const ONE_BY_ONE: usize = 64;

/// The subscriber task.
pub(crate) struct Subscriber;

impl Subscriber {
    /// Starts the task (inside a Tokio runtime); the returned handle drives it.
    pub(crate) fn start(
        topology: Topology,
        keys: Keys,
        timeout: Duration,
        sink: SharedSink,
        rooms: RoomPolicy,
        store: Arc<HistoryStore>,
    ) -> Subscriptions {
        let (handle, ends) = Subscriptions::new("subscriber task");
        let shards = topology
            .shards()
            .into_iter()
            .map(|key| Shard::new(key.clone(), topology.target(&key)))
            .collect();
        let task = Task {
            topology,
            shards,
            book: Book {
                keys,
                sink,
                counts: RoomCounts::default(),
                tracks: Tracks::new(rooms),
                store,
            },
            timeout,
            live: ends.live,
            next_check: Instant::now(),
            next_ping: Instant::now() + PING_EVERY,
        };
        tokio::spawn(task.run(ends.commands));
        handle
    }
}

/// The bookkeeping, whatever the topology.
struct Book {
    keys: Keys,
    sink: SharedSink,
    /// Acquisitions per room not yet released, and which rooms are not subscribed.
    counts: RoomCounts,
    /// Where each history room stands, for catch-ups.
    tracks: Tracks,
    store: Arc<HistoryStore>,
}

impl Book {
    fn forward(&self) -> Forward<'_> {
        Forward {
            keys: &self.keys,
            sink: &*self.sink,
            tracks: &self.tracks,
        }
    }

    /// What `rooms`' members missed: from the history, or a `gap`. Returns how many rooms
    /// without history got a gap.
    async fn catch_up(&self, rooms: &[Arc<str>]) -> usize {
        self.tracks
            .catch_up(rooms.iter(), &self.store, &*self.sink)
            .await
    }
}

struct Task {
    topology: Topology,
    shards: Vec<Shard>,
    book: Book,
    timeout: Duration,
    live: watch::Sender<bool>,
    next_check: Instant,
    next_ping: Instant,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            self.take_dropped();
            if Instant::now() >= self.next_check {
                self.next_check = Instant::now() + CHECK_EVERY;
                self.check().await;
            }
            self.connect_due();
            let live =
                !self.shards.is_empty() && self.shards.iter().all(|s| s.connection.is_some());
            self.live
                .send_if_modified(|was| std::mem::replace(was, live) != live);
            let wake = self
                .shards
                .iter()
                .filter_map(Shard::retry_at)
                .fold(self.next_check, Instant::min);
            tokio::select! {
                event = next_event(&mut self.shards, self.book.forward()) => match event {
                    Event::Read(index, read) => self.between_commands(index, read).await,
                    Event::Connected(index, outcome) => self.connected(index, outcome).await,
                },
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Reads the slot map (on a cluster) and moves the rooms whose slot moved; subscribes
    /// rooms left without a subscription again where their shard is connected.
    async fn check(&mut self) {
        match self.topology.refresh(CHECK_EVERY).await {
            Ok(true) => self.follow_map().await,
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e.report(), "could not read the slot map"),
        }
        if Instant::now() >= self.next_ping {
            self.next_ping = Instant::now() + PING_EVERY;
            // A failure is logged by `lost`.
            let _ = self.ping().await;
        }
        if !self.book.counts.has_failed() {
            return;
        }
        for (index, rooms) in self.failed_by_shard().into_iter().enumerate() {
            if self.shards[index].connection.is_some() {
                if let Err(e) = self.subscribe_failed(index, rooms, ONE_BY_ONE, false).await {
                    self.lost(index, e);
                }
            }
        }
    }

    /// A new slot map: shards for new masters, none for former ones, and every room whose
    /// slot moved off the shard it is on (subscribed on its new master by the caller).
    async fn follow_map(&mut self) {
        let masters = self.topology.shards();
        let mut moved = Vec::new();
        self.shards.retain_mut(|shard| {
            let keep = masters.contains(&shard.key);
            if !keep {
                moved.extend(std::mem::take(&mut shard.rooms));
            }
            keep
        });
        for key in masters {
            if !self.shards.iter().any(|shard| shard.key == key) {
                let target = self.topology.target(&key);
                self.shards.push(Shard::new(key, target));
            }
        }
        for index in 0..self.shards.len() {
            let shard = &self.shards[index];
            let away: Vec<Arc<str>> = shard
                .rooms
                .iter()
                .filter(|room| {
                    self.topology.owner(&self.book.keys, room) != Some(shard.key.clone())
                })
                .cloned()
                .collect();
            // Not unsubscribed: Redis drops a channel whose slot leaves a master on its
            // own (a `sunsubscribe` it sends, ignored for a room no longer on the shard),
            // and answers an unsubscribe for it with an error.
            for room in away {
                self.shards[index].rooms.remove(&room);
                moved.push(room);
            }
        }
        for room in &moved {
            self.book.counts.subscribed(room, false);
        }
        tracing::info!(rooms = moved.len(), "the Redis Cluster's slot map changed: subscribing the rooms whose slot moved on their new master");
        crate::metrics::redis_subscriptions(self.book.counts.subscribed_count());
        self.connect_due();
    }

    /// The index of the shard that serves `room`, if there is one.
    fn shard_of(&self, room: &str) -> Option<usize> {
        let owner = self.topology.owner(&self.book.keys, room)?;
        self.shards.iter().position(|shard| shard.key == owner)
    }

    /// The rooms without a subscription, by the shard that serves them (a room no known
    /// master serves is in none).
    fn failed_by_shard(&self) -> Vec<Vec<Arc<str>>> {
        let mut by_shard = vec![Vec::new(); self.shards.len()];
        for room in self.book.counts.failed() {
            if let Some(index) = self.shard_of(&room) {
                by_shard[index].push(room);
            }
        }
        by_shard
    }

    /// Redis confirmed `room`'s subscription on shard `index`.
    fn subscribed_on(&mut self, index: usize, room: &Arc<str>) {
        self.book.counts.subscribed(room, true);
        self.shards[index].rooms.insert(room.clone());
    }

    /// Sends `command` on shard `index` and waits for `count` replies that `expected`
    /// accepts (see [`Shard::command`]).
    async fn on_shard(
        &mut self,
        index: usize,
        command: &redis::Cmd,
        expected: &(dyn Fn(&Reply) -> bool + Sync),
        count: usize,
        held: Held<'_>,
    ) -> Result<(), BrokerError> {
        let forward = self.book.forward();
        self.shards[index]
            .command(command, expected, count, forward, held, self.timeout)
            .await
    }

    /// Waits for shard `index`'s first connection if it is being made (a node just
    /// started); after a loss, for nothing: its rooms fail at once, as while it is down.
    async fn first_connection(&mut self, index: usize) {
        if !self.shards[index].connected_before {
            self.finish_connecting(index).await;
        }
    }

    /// Starts connecting every shard whose time has come.
    fn connect_due(&mut self) {
        let now = Instant::now();
        for shard in &mut self.shards {
            shard.connect_if_due(now, self.timeout);
        }
    }

    /// Waits for shard `index`'s connection being made, if one is.
    async fn finish_connecting(&mut self, index: usize) {
        if let Some(connecting) = self.shards[index].connecting.as_mut() {
            let outcome = joined(connecting.await);
            self.connected(index, outcome).await;
        }
    }

    /// A connection for shard `index` was made (its rooms are subscribed on it), or not.
    async fn connected(&mut self, index: usize, outcome: Result<RespConnection, BrokerError>) {
        self.shards[index].connecting = None;
        match outcome {
            Ok(connection) => {
                let reconnection = self.shards[index].connected(connection);
                let rooms = self.failed_by_shard().swap_remove(index);
                match self
                    .subscribe_failed(index, rooms, usize::MAX, reconnection)
                    .await
                {
                    Ok(rooms) => {
                        self.shards[index].settled();
                        if reconnection {
                            crate::metrics::redis_reconnected();
                            tracing::info!(rooms, "reconnected to Redis and resubscribed");
                        }
                    }
                    Err(e) => self.lost(index, e),
                }
            }
            Err(e) => {
                let (retry_in, _) = self.shards[index].lost();
                tracing::warn!(error = %e.report(), ?retry_in, "Redis pub/sub connection down");
            }
        }
    }

    /// Shard `index` is lost: its rooms wait for a new connection (or, on a cluster, a new
    /// master), and are caught up then.
    fn lost(&mut self, index: usize, e: BrokerError) {
        let (retry_in, rooms) = self.shards[index].lost();
        for room in &rooms {
            self.book.counts.subscribed(room, false);
        }
        crate::metrics::redis_subscriptions(self.book.counts.subscribed_count());
        if closed_by_redis(&e) {
            crate::metrics::redis_pubsub_cut();
            tracing::warn!(?retry_in, "Redis closed this node's pub/sub connection: what it had buffered for the node is lost (Redis does this to a subscriber past its `client-output-buffer-limit pubsub`, see the README's deployment section); members of its rooms get a gap");
        } else {
            tracing::warn!(error = %e.report(), ?retry_in, "Redis pub/sub connection down");
        }
    }

    /// Channels cluster masters dropped on their own (their slot moved): their rooms wait
    /// for the next check, which reads the slot map at once and subscribes them on their
    /// new master.
    fn take_dropped(&mut self) {
        for index in 0..self.shards.len() {
            for channel in std::mem::take(&mut self.shards[index].dropped) {
                let room = forward::room_of(&self.book.keys, &channel)
                    .and_then(|room| self.shards[index].rooms.take(room));
                if let Some(room) = room {
                    tracing::info!(
                        room = &*room,
                        "sharded subscription dropped by Redis (its slot moved): subscribing again"
                    );
                    self.book.counts.subscribed(&room, false);
                    self.next_check = Instant::now();
                    crate::metrics::redis_subscriptions(self.book.counts.subscribed_count());
                }
            }
        }
    }

    /// Shard `index` gave a reply while no command was waiting for one.
    async fn between_commands(&mut self, index: usize, read: Result<Reply, BrokerError>) {
        let e = match read {
            // A cluster master dropped a sharded subscription: its slot moved.
            Ok(Reply::Unsubscribed(channel)) if self.shards[index].drops_on_its_own() => {
                self.shards[index].dropped.push(channel);
                return;
            }
            Ok(reply) => BrokerError::Protocol(format!("{reply:?} between commands")),
            Err(e) => e,
        };
        self.lost(index, e);
    }
}

fn is_subscribed(reply: &Reply) -> bool {
    matches!(reply, Reply::Subscribed)
}

/// Whether Redis answered `MOVED`: the slot map known is out of date.
fn moved(e: &BrokerError) -> bool {
    refused_with(e, "MOVED ")
}

/// Whether Redis refused a command for a channel its ACL denies (`NOPERM`).
fn denied(e: &BrokerError) -> bool {
    refused_with(e, "NOPERM")
}

/// Whether Redis answered the command with an error reply that starts with `code`.
fn refused_with(e: &BrokerError, code: &str) -> bool {
    matches!(e, BrokerError::Refused(reply) if reply.to_string().starts_with(code))
}

/// A one-command outcome for the connection: Redis answering it with an error (e.g. a
/// channel its ACL refuses) leaves the connection in step; anything else wrong means the
/// connection is lost.
fn still_connected(result: Result<(), BrokerError>) -> Result<(), BrokerError> {
    match result {
        Err(BrokerError::Refused(_)) => Ok(()),
        other => other,
    }
}

/// Whether Redis itself closed the connection (an orderly end of stream, as when it cuts
/// a client past its output buffer limit), rather than it failing or timing out.
fn closed_by_redis(e: &BrokerError) -> bool {
    match e {
        BrokerError::Connection(source) => source
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof),
        _ => false,
    }
}
