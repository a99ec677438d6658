//! The Redis broker.
//!
//! - `connect`: the URL, parsed once, and the `deadpool-redis` pool built on it;
//! - `lanes`: publishing lanes, each holding a pooled connection and sending pipelines;
//! - `subscriber`: the task that owns the pub/sub connection (read by `resp`);
//! - `identities`: the rooms recorded per identity, through the pool;
//! - `presence`: who is in each presence room, on every node (one task per node).
//!
//! Nothing connects when the broker is built (it may be built outside a Tokio runtime):
//! the lanes and the subscriber task start together on first use.

mod catch_up;
mod commands;
mod connect;
mod history;
mod identities;
mod lanes;
mod presence;
mod resp;
mod subscriber;
#[cfg(feature = "tls")]
mod tls;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub(crate) use self::commands::Commands;
pub(crate) use self::connect::{Disconnects, RedisTarget};
use self::history::HistoryStore;
use self::identities::Identities;
pub(crate) use self::lanes::Lanes;
use self::presence::PresenceStore;
use self::subscriber::Subscriber;
use super::{BrokerHealth, Confirmation, Keys, Publish, SharedSink};
use crate::error::BrokerError;
use crate::settings::RoomPolicy;

/// How many publishing lanes (and held pooled connections) a node keeps.
const PUBLISH_LANES: usize = 4;

/// The Redis broker.
pub(crate) struct RedisBroker {
    target: RedisTarget,
    commands: Commands,
    disconnects: Disconnects,
    keys: Keys,
    timeout: Duration,
    sink: SharedSink,
    identities: Identities,
    history: Arc<HistoryStore>,
    presence: PresenceStore,
    rooms: RoomPolicy,
    running: OnceLock<Running>,
}

/// The broker's tasks, once started.
struct Running {
    lanes: Lanes,
    subscriber: Subscriber,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("keys", &self.keys)
            .field("running", &self.running.get().is_some())
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Builds the broker without connecting.
    pub(crate) fn new(
        target: RedisTarget,
        prefix: &str,
        timeout: Duration,
        identity_ttl: Duration,
        presence_ttl: Duration,
        rooms: RoomPolicy,
        sink: SharedSink,
    ) -> Result<Self, BrokerError> {
        let (pool, disconnects) = target.pool(PUBLISH_LANES, timeout)?;
        let commands = Commands::Single(pool);
        let keys = Keys::new(prefix);
        Ok(RedisBroker {
            identities: Identities::new(commands.clone(), keys.clone(), timeout, identity_ttl),
            history: Arc::new(HistoryStore::new(commands.clone(), keys.clone(), timeout)),
            presence: PresenceStore::new(commands.clone(), keys.clone(), timeout, presence_ttl),
            rooms,
            target,
            commands,
            disconnects,
            keys,
            timeout,
            sink,
            running: OnceLock::new(),
        })
    }

    /// The running tasks, started on first use.
    fn running(&self) -> &Running {
        self.running.get_or_init(|| {
            self.identities.start_refreshing();
            self.presence.start();
            Running {
                lanes: Lanes::start(
                    PUBLISH_LANES,
                    &self.commands,
                    &self.disconnects,
                    self.timeout,
                ),
                subscriber: Subscriber::start(
                    self.target.clone(),
                    self.keys.clone(),
                    self.timeout,
                    self.sink.clone(),
                    self.rooms.clone(),
                    self.history.clone(),
                ),
            }
        })
    }

    /// Queues a publish on lane `lane` at once (the publish script in a room with
    /// `history`); the returned [`Publish`] resolves when Redis accepted it.
    pub(crate) fn publish(
        &self,
        room: &str,
        frame: String,
        lane: u64,
        history: Option<crate::settings::History>,
    ) -> Publish {
        self.running()
            .lanes
            .publish(lane, &self.keys, room, frame, history)
    }

    /// Reads of history rooms.
    pub(crate) fn history(&self) -> &HistoryStore {
        &self.history
    }

    pub(crate) fn acquire(&self, room: Arc<str>) -> Confirmation {
        self.running().subscriber.acquire(room)
    }

    pub(crate) fn release(&self, room: Arc<str>) {
        if let Some(running) = self.running.get() {
            running.subscriber.release(room);
        }
    }

    /// Presence rooms (the task starts with the broker's others).
    pub(crate) fn presence(&self) -> &PresenceStore {
        self.running();
        &self.presence
    }

    pub(crate) fn identities(&self) -> &Identities {
        &self.identities
    }

    /// See [`Broker::hold`](crate::broker::Broker::hold).
    pub(crate) fn hold(&self, identity: &Arc<str>) {
        // The refresher starts with the broker's tasks.
        self.running();
        self.identities.hold(identity);
    }

    /// The pool's state (`None` on a cluster): the lanes' connections are among those in
    /// use.
    pub(crate) fn pool_status(&self) -> Option<deadpool_redis::Status> {
        self.commands.pool_status()
    }

    /// Probes the lanes, the subscriber and the pool, each within `timeout`.
    pub(crate) async fn health(&self, timeout: Duration) -> BrokerHealth {
        let running = self.running();
        let (publish, subscriptions, pool) = tokio::join!(
            connect::within(timeout, running.lanes.ping()),
            running.subscriber.ping(timeout),
            connect::within(timeout, self.identities.ping()),
        );
        BrokerHealth {
            publish,
            subscriptions,
            pool,
        }
    }

    /// Waits until every lane, the pool and the pub/sub connection work, or fails.
    pub(crate) async fn ready(&self, timeout: Duration) -> Result<(), BrokerError> {
        let running = self.running();
        connect::within(timeout, running.lanes.ping()).await?;
        connect::within(timeout, self.identities.ping()).await?;
        running.subscriber.wait_live(timeout).await
    }
}
