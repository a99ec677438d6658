//! The Redis broker.
//!
//! - `connect`: the URL, parsed once, and the `deadpool-redis` pool built on it;
//! - `commands`: where commands go (the pool, or a Redis Cluster's shared connection, with
//!   pipelines split per slot);
//! - `lanes`: publishing lanes, each holding a pooled connection and sending pipelines;
//! - `subscriber`: the task that holds the node's room subscriptions, on one pub/sub
//!   connection (`SUBSCRIBE`) or one per cluster master (`SSUBSCRIBE`), read by `resp`;
//! - `tls`: `rediss://` for the pub/sub connection (feature `tls`);
//! - `identities`: the rooms recorded per identity, through the pool;
//! - `presence`: who is in each presence room, on every node (one task per node);
//! - `occupancy`: which nodes have members in each room (for `occupied`/`vacated`).
//!
//! Nothing connects when the broker is built (it may be built outside a Tokio runtime):
//! the lanes and the subscriber task start together on first use.

mod commands;
mod connect;
mod history;
mod identities;
mod lanes;
mod occupancy;
mod presence;
mod resp;
mod subscriber;
#[cfg(feature = "tls")]
mod tls;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub(crate) use self::commands::{ClusterTarget, Commands};

pub(crate) use self::connect::{Disconnects, RedisTarget};
use self::history::HistoryStore;
use self::identities::Identities;
pub(crate) use self::lanes::Lanes;
pub(crate) use self::occupancy::OccupancyStore;
use self::presence::PresenceStore;
use self::subscriber::{Subscriber, Subscriptions, Topology};
use super::{BrokerHealth, Confirmation, Keys, Publish, SharedSink};
use crate::config::Config;
use crate::error::{BrokerError, ConnectError};
use crate::notifier::Notifier;
use crate::settings::RoomPolicy;

/// How many publishing lanes (and held pooled connections) a node keeps.
const PUBLISH_LANES: usize = 4;

/// The Redis broker.
pub(crate) struct RedisBroker {
    commands: Commands,
    disconnects: Disconnects,
    keys: Keys,
    timeout: Duration,
    /// Replicas that must confirm a history or keyed publish (0: none).
    wait_replicas: u32,
    sink: SharedSink,
    identities: Identities,
    history: Arc<HistoryStore>,
    presence: PresenceStore,
    rooms: RoomPolicy,
    /// Where the subscriber task, once started, holds its subscriptions.
    topology: Topology,
    running: OnceLock<Running>,
}

/// One Redis, or a Redis Cluster.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Single(RedisTarget),
    Cluster(ClusterTarget),
}

/// The broker's tasks, once started.
struct Running {
    lanes: Lanes,
    /// The task that holds the node's room subscriptions: `SUBSCRIBE` on one pub/sub
    /// connection to one Redis, or `SSUBSCRIBE` on each shard of a cluster.
    subscriber: Subscriptions,
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
    /// Builds the broker without connecting, with `config`'s key prefix, timeout, lifetimes
    /// and room settings.
    pub(crate) fn new(
        target: Target,
        config: &Config,
        sink: SharedSink,
        notifier: Option<Notifier>,
    ) -> Result<Self, BrokerError> {
        let (prefix, timeout) = (&config.key_prefix, config.redis_timeout);
        let (identity_ttl, presence_ttl) = (config.identity_ttl, config.presence_ttl);
        let rooms = config.rooms.clone();
        let (commands, disconnects, topology) = match target {
            Target::Single(single) => {
                let (pool, disconnects) = single.pool(PUBLISH_LANES, timeout)?;
                (
                    Commands::Single(pool),
                    disconnects,
                    Topology::Single(single),
                )
            }
            Target::Cluster(cluster) => {
                let client = Arc::new(cluster.client(timeout)?);
                let topology = Topology::cluster(cluster.seed().clone(), client.clone());
                (Commands::Cluster(client), Disconnects::default(), topology)
            }
        };
        let keys = Keys::new(prefix);
        Ok(RedisBroker {
            identities: Identities::new(commands.clone(), keys.clone(), timeout, identity_ttl),
            history: Arc::new(HistoryStore::new(commands.clone(), keys.clone(), timeout)),
            presence: PresenceStore::new(
                commands.clone(),
                keys.clone(),
                timeout,
                presence_ttl,
                notifier,
            ),
            rooms,
            commands,
            disconnects,
            keys,
            timeout,
            wait_replicas: config.redis_wait_replicas,
            sink,
            topology,
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
                    self.wait_replicas,
                ),
                subscriber: Subscriber::start(
                    self.topology.clone(),
                    self.keys.clone(),
                    self.timeout,
                    self.sink.clone(),
                    self.rooms.clone(),
                    self.history.clone(),
                ),
            }
        })
    }

    /// Queues a publish on lane `lane` at once (a script in a room with `history`, or with
    /// `once`); the returned [`Publish`] resolves when Redis accepted it.
    pub(crate) fn publish(
        &self,
        room: &str,
        frame: String,
        lane: u64,
        history: Option<crate::settings::History>,
        once: Option<crate::broker::Once<'_>>,
    ) -> Publish {
        self.running()
            .lanes
            .publish(lane, &self.keys, room, frame, history, once)
    }

    /// Room occupancy on this Redis, with leases that live `lifetime`.
    pub(crate) fn occupancy(&self, lifetime: Duration) -> OccupancyStore {
        OccupancyStore::new(
            self.commands.clone(),
            self.keys.clone(),
            self.timeout,
            lifetime,
        )
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
            self.commands.ping(timeout),
        );
        BrokerHealth {
            publish,
            subscriptions,
            pool,
        }
    }

    /// Waits until every lane, the pool and the pub/sub connection work, or fails; fails
    /// too on a Redis older than thinws's scripts need (where it says its version).
    pub(crate) async fn ready(&self, timeout: Duration) -> Result<(), ConnectError> {
        let running = self.running();
        connect::within(timeout, running.lanes.ping()).await?;
        self.commands.ping(timeout).await?;
        if let Some(found) = self.commands.version(timeout).await? {
            if !connect::is_supported(&found) {
                return Err(ConnectError::RedisTooOld { found });
            }
        }
        Ok(running.subscriber.wait_live(timeout).await?)
    }
}
