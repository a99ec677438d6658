//! Where each room's subscription lives. On one Redis, every room is on the one pub/sub
//! connection (`SUBSCRIBE`, up to 1,024 channels a command). On a Redis Cluster, each room
//! is on a connection to the master that serves its channel's slot (`SSUBSCRIBE`, one slot
//! a command), by the slot map the subscriber reads twice a second.

use std::sync::Arc;
use std::time::Duration;

use super::super::commands::{key_slot, read_slot_map, Cluster, SlotMap};
use super::super::connect::{within, RedisTarget};
use crate::broker::Keys;
use crate::error::BrokerError;

/// Channels in one `SUBSCRIBE`.
const CHUNK: usize = 1024;

/// Which shard a subscription is on: `None` on one Redis, a master's address on a cluster.
pub(super) type ShardKey = Option<(String, u16)>;

/// One Redis, or a Redis Cluster and its slot map.
#[derive(Clone)]
pub(crate) enum Topology {
    Single(RedisTarget),
    Cluster {
        /// A seed node's settings (TLS, user, password), used for every master.
        seed: RedisTarget,
        /// The broker's cluster client, for reading the slot map.
        cluster: Arc<Cluster>,
        map: Option<SlotMap>,
    },
}

impl Topology {
    /// On a cluster of `seed`'s nodes, with the broker's client `cluster`.
    pub(crate) fn cluster(seed: RedisTarget, cluster: Arc<Cluster>) -> Self {
        Topology::Cluster {
            seed,
            cluster,
            map: None,
        }
    }

    /// The command that subscribes to channels.
    pub(super) fn subscribe(&self) -> redis::Cmd {
        redis::cmd(match self {
            Topology::Single(_) => "SUBSCRIBE",
            Topology::Cluster { .. } => "SSUBSCRIBE",
        })
    }

    /// The command that unsubscribes from channels.
    pub(super) fn unsubscribe(&self) -> redis::Cmd {
        redis::cmd(match self {
            Topology::Single(_) => "UNSUBSCRIBE",
            Topology::Cluster { .. } => "SUNSUBSCRIBE",
        })
    }

    /// Every shard there is: the one Redis, or every master of the slot map (none before
    /// the map is read).
    pub(super) fn shards(&self) -> Vec<ShardKey> {
        match self {
            Topology::Single(_) => vec![None],
            Topology::Cluster { map, .. } => {
                map.iter().flat_map(SlotMap::masters).map(Some).collect()
            }
        }
    }

    /// The shard that serves `room`; `None` while no master is known for its slot.
    pub(super) fn owner(&self, keys: &Keys, room: &str) -> Option<ShardKey> {
        match self {
            Topology::Single(_) => Some(None),
            Topology::Cluster { map, .. } => map.as_ref()?.owner(slot_of(keys, room)).map(Some),
        }
    }

    /// Where to connect for shard `key`.
    pub(super) fn target(&self, key: &ShardKey) -> RedisTarget {
        match (self, key) {
            (Topology::Single(target), _) => target.clone(),
            (Topology::Cluster { seed, .. }, Some((host, port))) => seed.at(host, *port),
            (Topology::Cluster { seed, .. }, None) => seed.clone(),
        }
    }

    /// `rooms` in groups that one subscribe command takes.
    pub(super) fn groups(&self, keys: &Keys, rooms: &[Arc<str>]) -> Vec<Vec<Arc<str>>> {
        match self {
            Topology::Single(_) => rooms.chunks(CHUNK).map(<[_]>::to_vec).collect(),
            Topology::Cluster { .. } => {
                let mut by_slot: Vec<(u16, Arc<str>)> = rooms
                    .iter()
                    .map(|room| (slot_of(keys, room), room.clone()))
                    .collect();
                by_slot.sort_unstable();
                by_slot
                    .chunk_by(|(a, _), (b, _)| a == b)
                    .flat_map(|same| same.chunks(CHUNK))
                    .map(|group| group.iter().map(|(_, room)| room.clone()).collect())
                    .collect()
            }
        }
    }

    /// Reads the cluster's slot map (within `timeout`); `true` when it differs from the one
    /// known. Always `false` on one Redis.
    pub(super) async fn refresh(&mut self, timeout: Duration) -> Result<bool, BrokerError> {
        let Topology::Cluster { cluster, map, .. } = self else {
            return Ok(false);
        };
        // From any node: one that is gone fails this read, and the next asks another.
        let read = within(timeout, async {
            let mut connection = cluster.connection().await?;
            read_slot_map(&mut connection)
                .await
                .ok_or(BrokerError::Protocol("no slot map from the cluster".into()))
        })
        .await?;
        if map.as_ref() == Some(&read) {
            return Ok(false);
        }
        *map = Some(read);
        Ok(true)
    }
}

/// The slot of `room`'s channel.
fn slot_of(keys: &Keys, room: &str) -> u16 {
    key_slot(keys.room_channel(room).as_bytes())
}
