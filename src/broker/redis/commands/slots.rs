//! Slots and pipelines on a Redis Cluster: the slot of a key, the slot map as the cluster
//! reports it, pipelines sent one per master, and a `PING` to every master.

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{SingleNodeRoutingInfo, Slot};
use redis::{Cmd, Pipeline, Value};

use super::Connection;
use crate::error::BrokerError;

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

/// A node's host and port.
type Address = (String, u16);

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
        let at = self.0.partition_point(|(_, end, ..)| *end < slot);
        self.0
            .get(at)
            .filter(|(start, ..)| *start <= slot)
            .map(|(_, _, host, port)| (host.clone(), *port))
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
