//! Slots and pipelines on a Redis Cluster: the slot of a key, the slot map as the cluster
//! reports it, pipelines sent one per master, and a `PING` to every master.

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{SingleNodeRoutingInfo, Slot};
use redis::{Cmd, Pipeline, Value};

use super::Connection;
use crate::error::BrokerError;

/// Sends `pipeline` (which answers each command's error in its place, `ignore_errors`) and
/// returns the replies in order (see [`query_commands`]).
pub(crate) async fn query_pipeline(
    connection: &mut Connection,
    pipeline: &Pipeline,
) -> Result<Vec<Value>, redis::RedisError> {
    if let Connection::Pooled(c) = connection {
        return pipeline.query_async(c).await;
    }
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut scratch = redis::pipe();
    query_commands(
        connection,
        &mut scratch,
        commands.len(),
        |n| key_of(commands[n]),
        |n, into| {
            into.add_command(commands[n].clone());
        },
    )
    .await
}

/// Sends `count` commands and returns their replies in order (each command's error in its
/// place). Command `n` is what `build(n, pipeline)` appends to a pipeline, and names the
/// key `key(n)` (`None` for a command without one).
///
/// On one Redis, the commands go as one pipeline, built in `scratch` (kept for the next
/// call). On a cluster: one pipeline per master, built directly (no command is copied),
/// sent concurrently by the slot map the cluster last reported; a shard takes commands of
/// many slots in one pipeline (only redis-rs's own routing insists on one slot). Commands
/// that come back `MOVED`, `ASK` or `TRYAGAIN` (the map changed) are built again and go one
/// pipeline per slot through redis-rs's routing, which follows the redirection. The
/// commands of one slot keep their order.
pub(crate) async fn query_commands<'k>(
    connection: &mut Connection,
    scratch: &mut Pipeline,
    count: usize,
    key: impl Fn(usize) -> Option<&'k [u8]>,
    mut build: impl FnMut(usize, &mut Pipeline),
) -> Result<Vec<Value>, redis::RedisError> {
    let (cluster, shared) = match connection {
        Connection::Pooled(c) => {
            scratch.clear();
            (0..count).for_each(|n| build(n, scratch));
            return scratch.query_async(c).await;
        }
        Connection::Cluster(c, shared) => (c.clone(), shared.clone()),
    };
    let mut replies = vec![Value::Nil; count];
    let mut again: Vec<usize> = (0..count).collect();
    if let Some(map) = shared.slot_map(&cluster).await {
        // By master: each group is one pipeline to that node.
        let mut groups: Vec<Group<Option<(&str, u16)>>> = Vec::new();
        for n in 0..count {
            let owner = key(n).and_then(|key| map.owner_of(key_slot(key)));
            Group::of(&mut groups, owner, |_| true).add(n, &mut build);
        }
        let (sends, indices): (Vec<_>, Vec<_>) = groups
            .into_iter()
            .map(|group| {
                let mut c = cluster.clone();
                let route = match group.to {
                    Some((host, port)) => SingleNodeRoutingInfo::ByAddress {
                        host: host.to_owned(),
                        port,
                    },
                    None => SingleNodeRoutingInfo::Random,
                };
                let count = group.indices.len();
                let pipeline = group.pipeline;
                let send = async move { c.route_pipeline(pipeline, 0, count, route).await };
                (send, group.indices)
            })
            .unzip();
        let answers = futures_util::future::join_all(sends).await;
        again.clear();
        for (indices, answer) in indices.iter().zip(answers) {
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
    let mut groups: Vec<Group<Option<Slot>>> = Vec::new();
    for &n in &again {
        let slot = key(n).map(Slot::for_key);
        Group::of(&mut groups, slot, |slot| slot.is_some()).add(n, &mut build);
    }
    let sends = groups.iter().map(|group| {
        let mut c = Connection::Cluster(cluster.clone(), shared.clone());
        async move { group.pipeline.query_async::<Vec<Value>>(&mut c).await }
    });
    let answers = futures_util::future::join_all(sends).await;
    for (group, answer) in groups.iter().zip(answers) {
        for (index, reply) in group.indices.iter().zip(answer?) {
            replies[*index] = reply;
        }
    }
    Ok(replies)
}

/// Commands that go together: one pipeline to one place (`to`), and the index of each of
/// its commands in the caller's order.
struct Group<T> {
    to: T,
    pipeline: Pipeline,
    indices: Vec<usize>,
}

impl<T: PartialEq> Group<T> {
    /// The group in `groups` that goes to `to`, added if there is none (or if `shared(to)`
    /// says that commands for `to` may not share a pipeline).
    fn of(groups: &mut Vec<Self>, to: T, shared: impl Fn(&T) -> bool) -> &mut Self {
        let at = match groups.iter().position(|g| g.to == to && shared(&to)) {
            Some(at) => at,
            None => {
                groups.push(Group {
                    to,
                    pipeline: super::pipeline(),
                    indices: Vec::new(),
                });
                groups.len() - 1
            }
        };
        &mut groups[at]
    }

    /// Appends command `n`, as `build` makes it.
    fn add(&mut self, n: usize, build: &mut impl FnMut(usize, &mut Pipeline)) {
        build(n, &mut self.pipeline);
        self.indices.push(n);
    }
}

/// `PING` to every master the slot map lists (each by its address: redis-rs's own
/// all-masters routing skips a master it cannot reach), concurrently; all must answer.
pub(crate) async fn ping_every_master(
    connection: &mut ClusterConnection,
) -> Result<(), BrokerError> {
    let map = read_slot_map(connection)
        .await
        .ok_or_else(|| BrokerError::Protocol("no slot map from the cluster".into()))?;
    let pings = map.masters().into_iter().map(|(host, port)| {
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

/// Which master serves each slot, as `CLUSTER SLOTS` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotMap(pub(super) Vec<(u16, u16, String, u16)>);

impl SlotMap {
    /// Every master's address, once each.
    pub(crate) fn masters(&self) -> Vec<(String, u16)> {
        let mut masters: Vec<(String, u16)> =
            self.0.iter().map(|(_, _, h, p)| (h.clone(), *p)).collect();
        masters.sort();
        masters.dedup();
        masters
    }

    /// The master that serves `slot`, if any does.
    pub(crate) fn owner(&self, slot: u16) -> Option<(String, u16)> {
        self.owner_of(slot)
            .map(|(host, port)| (host.to_owned(), port))
    }

    /// The master that serves `slot`, if any does, borrowed from the map.
    pub(crate) fn owner_of(&self, slot: u16) -> Option<(&str, u16)> {
        let at = self.0.partition_point(|(_, end, ..)| *end < slot);
        self.0
            .get(at)
            .filter(|(start, ..)| *start <= slot)
            .map(|(_, _, host, port)| (host.as_str(), *port))
    }
}

/// Reads the slot map from any node.
pub(crate) async fn read_slot_map(connection: &mut ClusterConnection) -> Option<SlotMap> {
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
