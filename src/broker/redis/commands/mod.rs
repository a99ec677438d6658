//! Where commands go: one Redis, through the `deadpool-redis` pool, or a Redis Cluster.
//!
//! On a cluster, single commands (loading a script, reading the slot map, `PING`) go
//! through redis-rs's cluster connection, which routes each to the master of its key's
//! slot, follows `MOVED`/`ASK`, refreshes the topology and reconnects on its own; it is
//! multiplexed and cheap to clone, so every user shares one. Pipelines do not: redis-rs
//! keeps a pipeline within one slot and sends it whole again when one of its commands is
//! redirected or its connection fails, so that commands that had run would run twice.
//! [`query_commands`] sends one pipeline per master on a multiplexed connection to that
//! master (one per master, shared by every user; with `WAIT`, one per master and
//! publishing lane, see [`Wait`]), answers each command for itself and
//! follows redirections per command. [`query_pipeline`] does the same for a pipeline built
//! beforehand (its commands are copied into the per-master pipelines: fine off the hot
//! path).

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::connect::{pool_error, redis_error};
use crate::error::BrokerError;

mod cluster;
mod per_master;
mod slots;

pub(crate) use self::cluster::{Cluster, ClusterTarget};
pub(crate) use self::per_master::{
    query_commands, query_pipeline, Failure, Pipelines, Reply, Wait,
};
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
/// are harmless to run twice, and the first reply holds what they decided). If the scripts
/// cannot be loaded, the outcome is unknown (the calls that found their script ran).
pub(crate) async fn query_with_scripts(
    connection: &mut Connection,
    pipeline: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> Result<Vec<redis::Value>, Failure> {
    let replies = query_pipeline(connection, pipeline).await?;
    if !replies.iter().any(no_script) {
        return Ok(replies);
    }
    for script in scripts {
        script
            .load_async(connection)
            .await
            .map_err(|error| Failure::new(error, true))?;
    }
    let again = query_pipeline(connection, pipeline).await?;
    Ok(replies
        .into_iter()
        .zip(again)
        .map(|(first, again)| if no_script(&first) { again } else { first })
        .collect())
}

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

    /// Sends `pipeline` on a connection of its own (see [`query_with_scripts`]: `scripts`
    /// are loaded again if Redis lost them), all within `timeout`.
    pub(crate) async fn send(
        &self,
        timeout: Duration,
        pipeline: &Pipeline,
        scripts: &[&redis::Script],
    ) -> Result<Vec<Value>, BrokerError> {
        super::connect::within(timeout, async {
            let mut connection = self.get().await?;
            query_with_scripts(&mut connection, pipeline, scripts)
                .await
                .map_err(BrokerError::from)
        })
        .await
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
    /// The `redis_version` one Redis reports in `INFO server` (`None` on a cluster, or
    /// where the server does not say).
    pub(crate) async fn version(&self, timeout: Duration) -> Result<Option<String>, BrokerError> {
        super::connect::within(timeout, async {
            let Connection::Pooled(mut c) = self.get().await? else {
                return Ok(None);
            };
            // A user without `INFO` (`-@dangerous`), or a server that renamed it, connects
            // as before: its version is not known.
            let info: String = match redis::cmd("INFO").arg("server").query_async(&mut c).await {
                Ok(info) => info,
                Err(e) if e.is_io_error() || e.is_timeout() => return Err(redis_error(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "INFO server refused: the Redis version is not checked");
                    return Ok(None);
                }
            };
            Ok(info
                .lines()
                .find_map(|line| line.strip_prefix("redis_version:"))
                .map(|version| version.trim().to_owned()))
        })
        .await
    }

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
            // No pipeline of ours goes through here on a cluster: `query_commands` sends
            // each master's on a connection of its own.
            Connection::Cluster(c, cluster) => Box::pin(async move {
                let replies = c.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &replies {
                    cluster.failed(e);
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

/// A Lua script that publishes to rooms' channels, in its two forms: with `PUBLISH` on one
/// Redis, with `SPUBLISH` on a Redis Cluster, where rooms' channels are sharded (the
/// script's text names the command as `'PUBLISH'`).
pub(crate) struct RoomScript {
    single: redis::Script,
    cluster: redis::Script,
}

impl RoomScript {
    pub(crate) fn new(text: &str) -> Self {
        RoomScript {
            single: redis::Script::new(text),
            cluster: redis::Script::new(&text.replace("'PUBLISH'", "'SPUBLISH'")),
        }
    }

    /// The script for a cluster or not.
    pub(crate) fn get(&self, cluster: bool) -> &redis::Script {
        match cluster {
            true => &self.cluster,
            false => &self.single,
        }
    }
}
