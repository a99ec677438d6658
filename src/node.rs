//! The composition root: one node's settings, local rooms and broker, wired together.
//!
//! [`Node`] owns everything the node's sockets share. It builds the broker and hands it the
//! local rooms as its [`FrameSink`], so that the broker delivers into the rooms without
//! knowing them, and the rooms never know the broker.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hyper_tungstenite::tungstenite::Utf8Bytes;

use crate::broker::redis::{ClusterTarget, RedisTarget, Target};
use crate::broker::{Broker, FrameSink, MemoryBroker, RedisBroker};
use crate::config::Config;
use crate::error::ConnectError;
use crate::notifier::Notifier;
use crate::occupancy::{Ledger, Occupancy};
use crate::rooms::Rooms;

/// Where the node's Redis is.
#[derive(Debug, Clone)]
pub(crate) enum RedisAddress {
    /// One Redis (`redis://` or `rediss://`).
    Url(String),
    /// A Redis Cluster, by seed URLs.
    Cluster(Vec<String>),
}

/// Everything one node shares between its sockets.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) config: Arc<Config>,
    pub(crate) rooms: Rooms,
    pub(crate) broker: Broker,
    /// Random per process; makes server-generated identities unique across nodes.
    pub(crate) instance: u64,
    /// The notification hook's queue, if there is a hook.
    pub(crate) notifier: Option<Notifier>,
    /// Decides when rooms become occupied or vacant, for the notification hook.
    occupancy: Option<Occupancy>,
    /// The metric handles every socket clones, taken when the first socket opens (taking
    /// them per socket costs a registry lookup and ~100 bytes each).
    socket_metrics: std::sync::OnceLock<Arc<crate::metrics::SocketMetrics>>,
}

impl FrameSink for Rooms {
    fn deliver(&self, room: &str, frame: &Utf8Bytes) {
        Rooms::deliver(self, room, frame);
    }

    fn deliver_run(&self, room: &str, run: &std::sync::Arc<[Utf8Bytes]>) {
        Rooms::deliver_run(self, room, run);
    }
}

impl Node {
    /// Metric handles for a new socket.
    pub(crate) fn socket_metrics(&self) -> Arc<crate::metrics::SocketMetrics> {
        self.socket_metrics
            .get_or_init(|| Arc::new(crate::metrics::SocketMetrics::new()))
            .clone()
    }

    /// Builds a node: on Redis at `redis`, or in memory without one. Connects nothing;
    /// fails when the Redis URL is unusable or the broker cannot be built on it.
    pub(crate) fn new(
        redis: Option<&RedisAddress>,
        config: Arc<Config>,
    ) -> Result<Node, ConnectError> {
        crate::metrics::describe_once();
        let notifier = config
            .notifications
            .as_ref()
            .map(|hook| Notifier::new(hook.0.clone(), config.notification_queue));
        let (watcher, changes) = match notifier {
            Some(_) => {
                let (watcher, changes) = tokio::sync::mpsc::unbounded_channel();
                (Some(watcher), Some(changes))
            }
            None => (None, None),
        };
        let rooms = Rooms::watched(config.max_sockets, watcher);
        let sink = Arc::new(rooms.clone());
        let ca = config.redis_ca_pem.as_deref();
        let broker = match redis {
            None => Broker::Memory(Box::new(MemoryBroker::new(
                sink,
                config.identity_ttl,
                notifier.clone(),
            ))),
            Some(address) => {
                let target = match address {
                    RedisAddress::Url(url) => RedisTarget::parse(url, ca).map(Target::Single),
                    RedisAddress::Cluster(urls) => {
                        ClusterTarget::parse(urls, ca).map(Target::Cluster)
                    }
                }?;
                let broker = RedisBroker::new(target, &config, sink, notifier.clone())?;
                Broker::Redis(Box::new(broker))
            }
        };
        let occupancy = match (&notifier, changes) {
            (Some(notifier), Some(changes)) => {
                let ledger = match &broker {
                    Broker::Memory(_) => Ledger::Local,
                    Broker::Redis(b) => Ledger::Redis(Box::new(b.occupancy(config.presence_ttl))),
                };
                Some(Occupancy::new(ledger, notifier.clone(), changes))
            }
            _ => None,
        };
        Ok(Node {
            config,
            rooms,
            broker,
            instance: RandomState::new().hash_one(std::process::id()),
            notifier,
            occupancy,
            socket_metrics: std::sync::OnceLock::new(),
        })
    }

    /// Sends what the notification hook is still owed: the occupancy changes of the
    /// sockets that closed (giving up the lease if no room is left), then every queued
    /// notification. A node shutting down waits for it, bounded by its deadline.
    pub(crate) async fn flush_notifications(&self) {
        if let Some(occupancy) = &self.occupancy {
            occupancy.flush().await;
        }
        if let Some(notifier) = &self.notifier {
            notifier.drained().await;
        }
    }

    /// Starts the node's own tasks, once (later calls cost an uncontended lock at most).
    /// Must be called within a Tokio runtime.
    pub(crate) fn start(&self) {
        if let Some(occupancy) = &self.occupancy {
            occupancy.start();
        }
    }
}
