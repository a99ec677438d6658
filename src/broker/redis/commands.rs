//! Where commands go: one Redis, through the `deadpool-redis` pool, or a Redis Cluster,
//! through redis-rs's cluster connection, which routes each command to the master of its
//! key's slot, follows `MOVED`/`ASK`, refreshes the topology and reconnects on its own. It
//! is multiplexed and cheap to clone, so every user shares one instead of pooling several
//! (each would hold a connection to every node).
//!
//! A cluster pipeline must stay within one slot: [`query_pipeline`] sends a pipeline's
//! commands as one pipeline per slot, concurrently, and answers in the original order.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::time::Instant;

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
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    ca_pem: Option<Vec<u8>>,
}

impl ClusterTarget {
    /// Checks every seed URL (the error redacts passwords).
    pub(crate) fn parse(
        urls: &[String],
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, super::connect::InvalidUrl> {
        let mut infos = Vec::with_capacity(urls.len());
        for url in urls {
            // The same checks as a single Redis URL (TLS support included).
            let single = super::connect::RedisTarget::parse(url, ca_pem)?;
            infos.push(single.info().clone());
        }
        if infos.is_empty() {
            return Err(super::connect::InvalidUrl::new(
                "(no cluster URL)",
                "a Redis Cluster needs at least one seed URL",
            ));
        }
        Ok(ClusterTarget {
            urls: infos,
            ca_pem: ca_pem.map(<[u8]>::to_vec),
        })
    }

    /// A cluster client; with `pushes`, it speaks RESP3 and hands pushes (sharded messages)
    /// to that channel.
    pub(crate) fn client(
        &self,
        timeout: Duration,
        pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<Cluster, BrokerError> {
        // Fail fast, so that a command for a dead master comes back in time to replace the
        // connection (see `Cluster`) rather than retrying the dead address for long.
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.urls.clone())
            .connection_timeout(timeout / 4)
            .response_timeout(timeout / 2)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100);
        if let Some(pushes) = pushes {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes);
        }
        #[cfg(feature = "tls")]
        if let Some(ca) = &self.ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            });
        }
        let client = builder.build().map_err(BrokerError::connection)?;
        Ok(Cluster::new(client))
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
    connection: tokio::sync::Mutex<Option<(ClusterConnection, Instant)>>,
    /// The slot map pipelines are grouped by (see [`query_pipeline`]), read on first use
    /// and again after a redirection or a failure.
    slots: std::sync::RwLock<Option<Arc<SlotMap>>>,
}

/// How often a failing cluster connection is replaced, at most.
const RECONNECT_EVERY: Duration = Duration::from_millis(250);

impl Cluster {
    pub(crate) fn new(client: redis::cluster::ClusterClient) -> Self {
        Cluster {
            client,
            connection: tokio::sync::Mutex::new(None),
            slots: std::sync::RwLock::new(None),
        }
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

    /// Drops the shared connection: the next user makes a new one.
    pub(crate) async fn reset(&self) {
        *self.connection.lock().await = None;
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

    /// A connection for one user to hold (a publishing lane): out of the pool, or on a
    /// cluster a cluster connection of its own, so that lanes do not queue behind one
    /// another in one connection's routing task.
    pub(crate) async fn get_own(&self) -> Result<Connection, BrokerError> {
        match self {
            Commands::Single(_) => self.get().await,
            Commands::Cluster(cluster) => cluster
                .client
                .get_async_connection()
                .await
                .map(|c| Connection::Cluster(c, cluster.clone()))
                .map_err(redis_error),
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

/// The slot of the key a command of ours names (see [`key_of`]).
fn slot_of(cmd: &Cmd) -> Option<Slot> {
    key_of(cmd).map(Slot::for_key)
}

/// Sends `pipeline` (which answers each command's error in its place, `ignore_errors`) and
/// returns the replies in order. On a cluster: one pipeline per master, concurrently, by
/// the slot map the cluster last reported (a shard takes commands of many slots in one
/// pipeline; only redis-rs's own routing insists on one slot); commands that come back
/// `MOVED`, `ASK` or `TRYAGAIN` (the map changed) go again one pipeline per slot, where
/// redis-rs follows the redirection. The commands of one slot keep their order.
pub(crate) async fn query_pipeline(
    connection: &mut Connection,
    pipeline: &Pipeline,
) -> Result<Vec<Value>, redis::RedisError> {
    let (cluster, shared) = match connection {
        Connection::Pooled(c) => return pipeline.query_async(c).await,
        Connection::Cluster(c, shared) => (c.clone(), shared.clone()),
    };
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut replies = vec![Value::Nil; commands.len()];
    let mut again: Vec<usize> = (0..commands.len()).collect();
    if let Some(map) = shared.slot_map(&cluster).await {
        // By master: each group is one pipeline to that node.
        let mut groups: Vec<(Option<Address>, Vec<usize>)> = Vec::new();
        for (n, cmd) in commands.iter().enumerate() {
            let owner = key_of(cmd).and_then(|key| map.owner(key_slot(key)));
            match groups.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, indices)) => indices.push(n),
                None => groups.push((owner, vec![n])),
            }
        }
        let sends = groups.iter().map(|(owner, indices)| {
            let mut sub = redis::pipe();
            sub.ignore_errors();
            for &n in indices {
                sub.add_command(commands[n].clone());
            }
            let mut c = cluster.clone();
            let route = match owner {
                Some((host, port)) => SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                },
                None => SingleNodeRoutingInfo::Random,
            };
            async move { c.route_pipeline(sub, 0, indices.len(), route).await }
        });
        let answers = futures_util::future::join_all(sends).await;
        again.clear();
        for ((_, indices), answer) in groups.iter().zip(answers) {
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    // Whatever it was, the map may be wrong: read it again next time.
                    shared.forget_slot_map();
                    shared.failed(&e);
                    return Err(e);
                }
            };
            for (&n, reply) in indices.iter().zip(answer) {
                match &reply {
                    Value::ServerError(e) if redirected(e) => {
                        shared.forget_slot_map();
                        again.push(n);
                    }
                    _ => replies[n] = reply,
                }
            }
        }
        if again.is_empty() {
            return Ok(replies);
        }
        again.sort_unstable();
    }
    // One pipeline per slot through redis-rs's routing (it follows `MOVED` and `ASK`).
    let mut groups: Vec<(Option<Slot>, Pipeline, Vec<usize>)> = Vec::new();
    for &n in &again {
        let slot = slot_of(commands[n]);
        let group = match groups
            .iter_mut()
            .find(|(s, ..)| *s == slot && slot.is_some())
        {
            Some(group) => group,
            None => {
                let mut sub = redis::pipe();
                sub.ignore_errors();
                groups.push((slot, sub, Vec::new()));
                groups.last_mut().expect("just pushed")
            }
        };
        group.1.add_command(commands[n].clone());
        group.2.push(n);
    }
    let sends = groups.iter().map(|(_, sub, _)| {
        let mut c = Connection::Cluster(cluster.clone(), shared.clone());
        async move { sub.query_async::<Vec<Value>>(&mut c).await }
    });
    let answers = futures_util::future::join_all(sends).await;
    for ((_, _, indices), answer) in groups.iter().zip(answers) {
        for (index, reply) in indices.iter().zip(answer?) {
            replies[*index] = reply;
        }
    }
    Ok(replies)
}

/// `PING` to every master the slot map lists (each by its address: redis-rs's own
/// all-masters routing skips a master it cannot reach), concurrently; all must answer.
pub(crate) async fn ping_every_master(
    connection: &mut ClusterConnection,
) -> Result<(), BrokerError> {
    let map = read_slot_map(connection)
        .await
        .ok_or_else(|| BrokerError::Protocol("no slot map from the cluster".into()))?;
    let mut masters: Vec<(String, u16)> =
        map.0.iter().map(|(_, _, h, p)| (h.clone(), *p)).collect();
    masters.sort();
    masters.dedup();
    let pings = masters.into_iter().map(|(host, port)| {
        let mut c = connection.clone();
        async move {
            c.route_command(
                redis::cmd("PING"),
                redis::cluster_routing::RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                }),
            )
            .await
            .map_err(|e| {
                BrokerError::connection(std::io::Error::other(format!("master {host}:{port}: {e}")))
            })
        }
    });
    for pinged in futures_util::future::join_all(pings).await {
        pinged?;
    }
    Ok(())
}

/// Whether a reply says that the command's slot is served elsewhere now.
fn redirected(e: &redis::ServerError) -> bool {
    use redis::ServerErrorKind;
    matches!(
        e.kind(),
        Some(ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain)
    )
}

/// A node's host and port.
type Address = (String, u16);

/// Which master serves each slot, as `CLUSTER SLOTS` said.
pub(crate) struct SlotMap(Vec<(u16, u16, String, u16)>);

impl SlotMap {
    fn owner(&self, slot: u16) -> Option<(String, u16)> {
        let at = self.0.partition_point(|(_, end, ..)| *end < slot);
        self.0
            .get(at)
            .filter(|(start, ..)| *start <= slot)
            .map(|(_, _, host, port)| (host.clone(), *port))
    }
}

/// Reads the slot map from any node.
async fn read_slot_map(connection: &mut ClusterConnection) -> Option<SlotMap> {
    let reply = connection
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            redis::cluster_routing::RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await
        .ok()?;
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        match fields.as_slice() {
            [Value::Int(start), Value::Int(end), Value::Array(master), ..] => {
                match master.as_slice() {
                    [Value::BulkString(host), Value::Int(port), ..] => map.push((
                        u16::try_from(*start).ok()?,
                        u16::try_from(*end).ok()?,
                        String::from_utf8(host.clone()).ok()?,
                        u16::try_from(*port).ok()?,
                    )),
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    map.sort();
    Some(SlotMap(map))
}

/// The key a command of ours names: `EVALSHA`'s first key, or the first argument of
/// anything else (`PUBLISH`, `SPUBLISH`, `PEXPIRE`…); `None` for `PING`.
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    match name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        true => args.nth(2),
        false => args.next(),
    }
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (or of the whole key)
/// modulo 16384, as Redis computes it.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tag {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_own() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"thinws:room:{foo}"), 12182);
        assert_eq!(
            key_slot(b"{}foo"),
            key_slot(b"{}foo"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot(b"a{foo}b{bar}"), 12182);
        for key in [&b"foo"[..], b"thinws:room:{x}", b"{user1000}.following"] {
            assert_eq!(Slot::for_key(key), Slot::new(key_slot(key)).unwrap());
        }
    }

    #[test]
    fn the_slot_map_finds_each_slots_master() {
        let map = SlotMap(vec![
            (0, 5460, "a".into(), 1),
            (5461, 10922, "b".into(), 2),
            (10923, 16383, "c".into(), 3),
        ]);
        assert_eq!(map.owner(0), Some(("a".into(), 1)));
        assert_eq!(map.owner(5461), Some(("b".into(), 2)));
        assert_eq!(map.owner(16383), Some(("c".into(), 3)));
        let gap = SlotMap(vec![(10, 20, "a".into(), 1)]);
        assert_eq!(gap.owner(5), None);
        assert_eq!(gap.owner(21), None);
    }
}
