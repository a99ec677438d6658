//! A Redis Cluster: its seeds, its client and shared connection, and a connection to each
//! master for pipelines (see [`super::query_commands`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::RedisError;
use tokio::time::Instant;

use super::{read_slot_map, SlotMap};
use crate::broker::redis::connect::{redis_error, InvalidUrl, RedisTarget};
use crate::error::BrokerError;

/// The seed URLs of a Redis Cluster (any of its nodes; the rest is discovered), and a
/// private CA for `rediss://`.
#[derive(Debug, Clone)]
pub(crate) struct ClusterTarget {
    urls: Vec<redis::ConnectionInfo>,
    /// The first seed: its settings (TLS, user, password) reach every master.
    seed: RedisTarget,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    ca_pem: Option<Vec<u8>>,
}

impl ClusterTarget {
    /// Checks every seed URL (the error redacts passwords).
    pub(crate) fn parse(urls: &[String], ca_pem: Option<&[u8]>) -> Result<Self, InvalidUrl> {
        let mut seeds = Vec::with_capacity(urls.len());
        for url in urls {
            // The same checks as a single Redis URL (TLS support included).
            seeds.push(RedisTarget::parse(url, ca_pem)?);
        }
        let Some(seed) = seeds.first().cloned() else {
            return Err(InvalidUrl::new(
                "(no cluster URL)",
                "a Redis Cluster needs at least one seed URL",
            ));
        };
        Ok(ClusterTarget {
            urls: seeds.iter().map(|seed| seed.info().clone()).collect(),
            seed,
            ca_pem: ca_pem.map(<[u8]>::to_vec),
        })
    }

    /// The first seed node's target: its settings reach every master.
    pub(crate) fn seed(&self) -> &RedisTarget {
        &self.seed
    }

    /// A cluster client for commands.
    pub(crate) fn client(&self, timeout: Duration) -> Result<Cluster, BrokerError> {
        // Fail fast, so that a command for a dead master comes back in time to replace the
        // connection (see `Cluster`) rather than retrying the dead address for long.
        let builder = redis::cluster::ClusterClientBuilder::new(self.urls.clone())
            .connection_timeout(timeout / 2)
            .response_timeout(timeout / 2)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100);
        #[cfg(feature = "tls")]
        let builder = match &self.ca_pem {
            Some(ca) => builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            }),
            None => builder,
        };
        let client = builder.build().map_err(BrokerError::connection)?;
        Ok(Cluster {
            client,
            seed: self.seed.clone(),
            timeout,
            connection: tokio::sync::Mutex::new(None),
            slots: std::sync::RwLock::new(None),
            masters: std::sync::Mutex::new(Vec::new()),
            connecting: std::sync::Mutex::default(),
        })
    }
}

/// A Redis Cluster: its client, and the one connection every user shares once it is made.
///
/// redis-rs refreshes its slot map on `MOVED`, but a command for a slot whose master died
/// only reconnects to the dead address until its retries run out, so a failover would go
/// unnoticed for as long as no command gets `MOVED`. So a command that fails as if a node
/// were gone (an I/O error, a timeout, `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`) drops the
/// shared connection, at most every [`RECONNECT_EVERY`]: the next user makes a new one, with
/// the topology as the live nodes see it now.
pub(crate) struct Cluster {
    client: redis::cluster::ClusterClient,
    /// The first seed: its settings (TLS, user, password) reach every master.
    seed: RedisTarget,
    /// The Redis timeout: connecting to a master, and each of its answers, may take half.
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<(ClusterConnection, Instant)>>,
    /// The slot map pipelines are grouped by (see [`query_pipeline`]), read on first use
    /// and again after a redirection or a failure.
    slots: std::sync::RwLock<Option<Arc<SlotMap>>>,
    /// A connection to each master pipelines went to, shared, or of one owner (see
    /// [`Cluster::master`]).
    masters: std::sync::Mutex<Vec<KnownMaster>>,
    /// Per master address, a lock held while a connection to it is made.
    connecting: std::sync::Mutex<Vec<ConnectLock>>,
}

/// A master's host and port, and the lock held while a connection to it is made.
type ConnectLock = (String, u16, Arc<tokio::sync::Mutex<()>>);

/// A master's host and port, the owner of the connection (`None`: shared), and the
/// connection.
type KnownMaster = (String, u16, Option<usize>, Master);

/// A connection to one master, shared by every pipeline to it (or its owner's).
#[derive(Clone)]
pub(super) struct Master {
    pub(super) connection: MultiplexedConnection,
    /// Set when Redis closed it, or a pipeline on it failed: the next user connects again.
    lost: Arc<AtomicBool>,
}

impl Master {
    /// A pipeline on this connection failed: it is not used again.
    pub(super) fn failed(&self) {
        self.lost.store(true, Ordering::Release);
    }
}

/// How often a failing cluster connection is replaced, at most.
const RECONNECT_EVERY: Duration = Duration::from_millis(250);

impl Cluster {
    /// The connection to the master at `host`:`port` that every pipeline to it without an
    /// owner shares (it is multiplexed), made on first use, and again once it was lost
    /// (Redis closed it, or a pipeline on it failed: [`Master::failed`]). One task at a
    /// time connects to each master, so that the lanes do not all connect to a master at
    /// once after it failed, and a master that does not answer holds up no connect to the
    /// others.
    ///
    /// With an `owner` (a publishing lane whose pipelines end with `WAIT`, which holds the
    /// connection it runs on), the connection is that owner's alone.
    pub(super) async fn master(
        &self,
        host: &str,
        port: u16,
        owner: Option<usize>,
    ) -> Result<Master, RedisError> {
        if let Some(master) = self.known_master(host, port, owner) {
            return Ok(master);
        }
        let _one_at_a_time = self.connecting_to(host, port).lock_owned().await;
        if let Some(master) = self.known_master(host, port, owner) {
            return Ok(master);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let seen = lost.clone();
        // RESP3, so that the connection reports its own loss, as the single Redis's pooled
        // connections do: a publish is then not sent on a connection known to be closed.
        // Fail fast, as the cluster client does: a master that stopped answering (frozen,
        // cut off without a reset) fails its pipelines in time for the next one to connect
        // again, by the slot map as the live nodes see it then.
        let half = self.timeout / 2;
        let (info, config) = (self.seed.at(host, port)).resp3(half, Some(half), move || {
            seen.store(true, Ordering::Release)
        });
        let connection = redis::Client::open(info)?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let master = Master { connection, lost };
        let mut masters = self.lock_masters();
        // Lost connections go too (an address failed over and gone, other owners' ones).
        masters.retain(|(h, p, o, m)| {
            let replaced = h == host && *p == port && *o == owner;
            !replaced && !m.lost.load(Ordering::Acquire)
        });
        masters.push((host.to_owned(), port, owner, master.clone()));
        Ok(master)
    }

    /// The lock held while a connection to `host`:`port` is made (one per address: a master
    /// that does not answer holds up connects to it, not to the others).
    fn connecting_to(&self, host: &str, port: u16) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .connecting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, lock)) = locks.iter().find(|(h, p, _)| h == host && *p == port) {
            return lock.clone();
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.push((host.to_owned(), port, lock.clone()));
        lock
    }

    /// The connection to `host`:`port`, unless there is none or it was lost.
    fn known_master(&self, host: &str, port: u16, owner: Option<usize>) -> Option<Master> {
        self.lock_masters()
            .iter()
            .find(|(h, p, o, m)| {
                h == host && *p == port && *o == owner && !m.lost.load(Ordering::Acquire)
            })
            .map(|(_, _, _, m)| m.clone())
    }

    fn lock_masters(&self) -> std::sync::MutexGuard<'_, Vec<KnownMaster>> {
        self.masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared connection, made on first use (and again after [`Cluster::failed`]).
    pub(crate) async fn connection(&self) -> Result<ClusterConnection, BrokerError> {
        let mut held = self.connection.lock().await;
        if let Some((connection, _)) = &*held {
            return Ok(connection.clone());
        }
        let connection = self
            .client
            .get_async_connection()
            .await
            .map_err(redis_error)?;
        *held = Some((connection.clone(), Instant::now()));
        Ok(connection)
    }

    /// The slot map, read from the cluster if none is known.
    pub(super) async fn slot_map(&self, connection: &ClusterConnection) -> Option<Arc<SlotMap>> {
        let known = self
            .slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if known.is_some() {
            return known;
        }
        let map = Arc::new(read_slot_map(&mut connection.clone()).await?);
        *self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(map.clone());
        Some(map)
    }

    /// The slot map changed: read it again before the next pipeline.
    pub(super) fn forget_slot_map(&self) {
        *self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// A pipeline to `host`:`port` failed with `e`: if the node seems gone, every owner's
    /// connection to it is taken as lost too (their next pipelines connect again instead of
    /// each waiting out its response timeout).
    pub(crate) fn master_failed(&self, host: &str, port: u16, e: &redis::RedisError) {
        if node_gone(e) {
            for (_, _, _, master) in self
                .lock_masters()
                .iter()
                .filter(|(h, p, _, _)| h == host && *p == port)
            {
                master.failed();
            }
        }
        self.failed(e);
    }

    /// A command failed with `e`: if it looks like a node is gone, the next user gets a new
    /// connection (see the type's docs).
    pub(crate) fn failed(&self, e: &redis::RedisError) {
        if !node_gone(e) {
            return;
        }
        self.forget_slot_map();
        if let Ok(mut held) = self.connection.try_lock() {
            if held
                .as_ref()
                .is_some_and(|(_, made)| made.elapsed() >= RECONNECT_EVERY)
            {
                tracing::info!(error = %e, "a Redis Cluster node seems gone: reconnecting with a fresh topology");
                *held = None;
            }
        }
    }
}

/// Whether `e` says that a node is unreachable or not serving its slots.
fn node_gone(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
            )
        )
}
