//! Where commands go: one Redis, through the `deadpool-redis` pool, or a Redis Cluster.
//!
//! On a cluster, single commands (loading a script, reading the slot map, `PING`) go
//! through redis-rs's cluster connection, which routes each to the master of its key's
//! slot, follows `MOVED`/`ASK`, refreshes the topology and reconnects on its own; it is
//! multiplexed and cheap to clone, so every user shares one. Pipelines do not: redis-rs
//! keeps a pipeline within one slot and sends it whole again when one of its commands is
//! redirected or its connection fails, so that commands that had run would run twice.
//! [`query_commands`] sends one pipeline per master on a multiplexed connection to that
//! master (one per master, shared by every user), answers each command for itself and
//! follows redirections per command. [`query_pipeline`] does the same for a pipeline built
//! beforehand (its commands are copied into the per-master pipelines: fine off the hot
//! path).

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;
use redis::aio::ConnectionLike;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::time::Instant;

mod per_master;
mod slots;

pub(crate) use self::per_master::{query_commands, query_pipeline, Failure};
pub(crate) use self::slots::{key_slot, ping_every_master, read_slot_map, SlotMap};

/// An empty pipeline that answers each command's error in its place.
pub(crate) fn pipeline() -> redis::Pipeline {
    let mut pipeline = redis::pipe();
    pipeline.ignore_errors();
    pipeline
}

/// Whether `reply` says that Redis does not have the script called (it lost its scripts).
pub(crate) fn no_script(reply: &redis::Value) -> bool {
    matches!(reply, redis::Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// Sends `pipeline` (see [`query_pipeline`]); if Redis lost the scripts it calls, loads
/// `scripts` and sends it again. Each call keeps its first reply unless that was the lost
/// script's error: a call that ran is not answered by its second run (the callers' scripts
/// are harmless to run twice, and the first reply holds what they decided).
pub(crate) async fn query_with_scripts(
    connection: &mut Connection,
    pipeline: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> Result<Vec<redis::Value>, redis::RedisError> {
    let replies = query_pipeline(connection, pipeline).await?;
    if !replies.iter().any(no_script) {
        return Ok(replies);
    }
    for script in scripts {
        script.load_async(connection).await?;
    }
    let again = query_pipeline(connection, pipeline).await?;
    Ok(replies
        .into_iter()
        .zip(again)
        .map(|(first, again)| if no_script(&first) { again } else { first })
        .collect())
}
use super::connect::{pool_error, redis_error};
use crate::error::BrokerError;

/// Where commands go.
#[derive(Clone)]
pub(crate) enum Commands {
    Single(Pool),
    Cluster(Arc<Cluster>),
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Commands::Single(_) => "Commands::Single",
            Commands::Cluster(_) => "Commands::Cluster",
        })
    }
}

/// The seed URLs of a Redis Cluster (any of its nodes; the rest is discovered), and a
/// private CA for `rediss://`.
#[derive(Debug, Clone)]
pub(crate) struct ClusterTarget {
    urls: Vec<redis::ConnectionInfo>,
    /// The first seed: its settings (TLS, user, password) reach every master.
    seed: super::connect::RedisTarget,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    ca_pem: Option<Vec<u8>>,
}

impl ClusterTarget {
    /// Checks every seed URL (the error redacts passwords).
    pub(crate) fn parse(
        urls: &[String],
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, super::connect::InvalidUrl> {
        let mut seeds = Vec::with_capacity(urls.len());
        for url in urls {
            // The same checks as a single Redis URL (TLS support included).
            seeds.push(super::connect::RedisTarget::parse(url, ca_pem)?);
        }
        let Some(seed) = seeds.first().cloned() else {
            return Err(super::connect::InvalidUrl::new(
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
    pub(crate) fn seed(&self) -> &super::connect::RedisTarget {
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
    seed: super::connect::RedisTarget,
    /// The Redis timeout: connecting to a master, and each of its answers, may take half.
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<(ClusterConnection, Instant)>>,
    /// The slot map pipelines are grouped by (see [`query_pipeline`]), read on first use
    /// and again after a redirection or a failure.
    slots: std::sync::RwLock<Option<Arc<SlotMap>>>,
    /// A connection to each master pipelines went to (see [`Cluster::master`]).
    masters: std::sync::Mutex<Vec<((String, u16), MultiplexedConnection)>>,
}

/// How often a failing cluster connection is replaced, at most.
const RECONNECT_EVERY: Duration = Duration::from_millis(250);

impl Cluster {
    /// The connection to the master at `host`:`port` that every pipeline to it shares (it
    /// is multiplexed), made on first use and again after [`Cluster::master_failed`].
    async fn master(&self, host: &str, port: u16) -> Result<MultiplexedConnection, RedisError> {
        let known = self
            .lock_masters()
            .iter()
            .find(|((h, p), _)| h == host && *p == port)
            .map(|(_, c)| c.clone());
        if let Some(connection) = known {
            return Ok(connection);
        }
        let client = redis::Client::open(self.seed.at(host, port).info().clone())?;
        // Fail fast, as the cluster client does: a master that stopped answering (frozen,
        // cut off without a reset) fails its pipelines in time for the next one to connect
        // again, by the slot map as the live nodes see it then.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout / 2))
            .set_response_timeout(Some(self.timeout / 2));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut masters = self.lock_masters();
        masters.retain(|((h, p), _)| !(h == host && *p == port));
        masters.push(((host.to_owned(), port), connection.clone()));
        Ok(connection)
    }

    /// A pipeline to `host`:`port` failed: the next one connects again.
    fn master_failed(&self, host: &str, port: u16) {
        self.lock_masters()
            .retain(|((h, p), _)| !(h == host && *p == port));
    }

    fn lock_masters(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<((String, u16), MultiplexedConnection)>> {
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
    async fn slot_map(&self, connection: &ClusterConnection) -> Option<Arc<SlotMap>> {
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
    fn forget_slot_map(&self) {
        *self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
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
pub(crate) fn node_gone(e: &redis::RedisError) -> bool {
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

/// A connection for commands.
pub(crate) enum Connection {
    Pooled(deadpool_redis::Connection),
    /// The cluster connection, and the cluster to tell when a command fails.
    Cluster(ClusterConnection, Arc<Cluster>),
}

impl Commands {
    /// A connection: one out of the pool, or the cluster connection.
    pub(crate) async fn get(&self) -> Result<Connection, BrokerError> {
        match self {
            Commands::Single(pool) => pool.get().await.map(Connection::Pooled).map_err(pool_error),
            Commands::Cluster(cluster) => cluster
                .connection()
                .await
                .map(|c| Connection::Cluster(c, cluster.clone())),
        }
    }

    /// The pool's state (`None` on a cluster).
    pub(crate) fn pool_status(&self) -> Option<deadpool_redis::Status> {
        match self {
            Commands::Single(pool) => Some(pool.status()),
            Commands::Cluster(_) => None,
        }
    }

    /// Whether commands go to a cluster (rooms' channels are then sharded: `SPUBLISH`).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Commands::Cluster(_))
    }

    /// Whether the single Redis behind the pool is a node of a Redis Cluster (`INFO
    /// cluster` says `cluster_enabled:1`); `false` on a cluster target, and when Redis
    /// refuses `INFO` (an ACL without it, a renamed command: logged).
    pub(crate) async fn is_cluster_node(&self, timeout: Duration) -> Result<bool, BrokerError> {
        let asked = super::connect::within(timeout, async {
            match self.get().await? {
                Connection::Pooled(mut c) => redis::cmd("INFO")
                    .arg("cluster")
                    .query_async::<String>(&mut c)
                    .await
                    .map(|info| info.lines().any(|line| line.trim() == "cluster_enabled:1"))
                    .map_err(redis_error),
                Connection::Cluster(..) => Ok(false),
            }
        })
        .await;
        match asked {
            Err(BrokerError::Refused(e)) => {
                tracing::warn!(error = %e, "cannot tell whether this Redis is a cluster node (INFO refused); taking it for a single Redis");
                Ok(false)
            }
            asked => asked,
        }
    }

    /// `PING`: on a cluster, to every master, each of which must answer.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), BrokerError> {
        super::connect::within(timeout, async {
            match self.get().await? {
                Connection::Pooled(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .map(drop)
                    .map_err(redis_error),
                Connection::Cluster(mut c, cluster) => {
                    let pinged = ping_every_master(&mut c).await;
                    if pinged.is_err() {
                        cluster.forget_slot_map();
                    }
                    pinged
                }
            }
        })
        .await
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Pooled(c) => c.req_packed_command(cmd),
            Connection::Cluster(c, cluster) => Box::pin(async move {
                let reply = c.req_packed_command(cmd).await;
                if let Err(e) = &reply {
                    cluster.failed(e);
                }
                reply
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Pooled(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c, cluster) => Box::pin(async move {
                let replies = c.req_packed_commands(cmd, offset, count).await;
                match &replies {
                    Err(e) => cluster.failed(e),
                    Ok(replies) => {
                        for reply in replies {
                            if let Value::ServerError(e) = reply {
                                cluster.failed(&redis::RedisError::from(e.clone()));
                            }
                        }
                    }
                }
                replies
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Pooled(c) => c.get_db(),
            Connection::Cluster(c, _) => c.get_db(),
        }
    }
}
