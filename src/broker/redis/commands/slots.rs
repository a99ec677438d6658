//! Slots on a Redis Cluster: the slot of a key, the slot map as the cluster reports it,
//! and a `PING` to every master.

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{Cmd, Value};

use crate::error::BrokerError;

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
pub(super) fn key_of(cmd: &Cmd) -> Option<&[u8]> {
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
pub(crate) use redis_protocol::redis_keyslot as key_slot;

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

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
