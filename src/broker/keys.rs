//! The names of the Redis keys and channels, under one prefix.
//!
//! A room's channel and keys carry the room in a hash tag (`{…}`), so that they all live in
//! one Redis Cluster slot: one atomic script can touch them, and sharded pub/sub can route
//! the channel with them.

/// The names of the Redis keys and channels, under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    room_prefix: String,
    meta_prefix: String,
    frames_prefix: String,
    published_prefix: String,
    identity_prefix: String,
    presence_prefix: String,
    presence_nodes_prefix: String,
    presence_node_prefix: String,
    presence_seq_prefix: String,
    occupancy_prefix: String,
    occupancy_done_prefix: String,
    occupancy_lease_prefix: String,
    occupancy_leases: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            room_prefix: format!("{prefix}room:{{"),
            meta_prefix: format!("{prefix}meta:{{"),
            frames_prefix: format!("{prefix}frames:{{"),
            published_prefix: format!("{prefix}published:"),
            identity_prefix: format!("{prefix}identity:"),
            presence_prefix: format!("{prefix}presence:{{"),
            presence_nodes_prefix: format!("{prefix}presence-nodes:{{"),
            presence_node_prefix: format!("{prefix}presence-node:{{"),
            presence_seq_prefix: format!("{prefix}presence-seq:{{"),
            occupancy_prefix: format!("{prefix}occupancy:{{"),
            occupancy_done_prefix: format!("{prefix}occupancy-done:{{"),
            occupancy_lease_prefix: format!("{prefix}occupancy-lease:{{"),
            occupancy_leases: format!("{prefix}occupancy-leases:{{leases}}"),
        }
    }

    /// The hash of which nodes have members in `room`: `{prefix}occupancy:{ROOM}`.
    pub(crate) fn occupancy(&self, room: &str) -> String {
        Self::tagged(&self.occupancy_prefix, room)
    }

    /// The hash of each node's last taking out of `room` (see `room.lua`):
    /// `{prefix}occupancy-done:{ROOM}`.
    pub(crate) fn occupancy_done(&self, room: &str) -> String {
        Self::tagged(&self.occupancy_done_prefix, room)
    }

    /// The set of rooms a node holds under `lease`: `{prefix}occupancy-lease:{LEASE}`.
    pub(crate) fn occupancy_lease(&self, lease: &str) -> String {
        Self::tagged(&self.occupancy_lease_prefix, lease)
    }

    /// The two sorted sets of the nodes' leases (live, and claimed for a sweep), in one
    /// hash slot.
    pub(crate) fn occupancy_leases(&self) -> [String; 2] {
        [
            format!("{}:live", self.occupancy_leases),
            format!("{}:sweeping", self.occupancy_leases),
        ]
    }

    fn tagged(prefix: &str, room: &str) -> String {
        let mut s = String::with_capacity(prefix.len() + room.len() + 1);
        s.push_str(prefix);
        s.push_str(room);
        s.push('}');
        s
    }

    /// The channel of `room`'s frames: `{prefix}room:{ROOM}`.
    pub(crate) fn room_channel(&self, room: &str) -> String {
        Self::tagged(&self.room_prefix, room)
    }

    /// The room whose frames `channel` carries, if it is a room channel.
    pub(crate) fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&*self.room_prefix)?.strip_suffix('}')
    }

    /// The hash of a history room's epoch and top offset: `{prefix}meta:{ROOM}`.
    pub(crate) fn history_meta(&self, room: &str) -> String {
        Self::tagged(&self.meta_prefix, room)
    }

    /// The list of a history room's kept frames: `{prefix}frames:{ROOM}`.
    pub(crate) fn history_frames(&self, room: &str) -> String {
        Self::tagged(&self.frames_prefix, room)
    }

    /// The hash of a presence room's members and their sockets on every node:
    /// `{prefix}presence:{ROOM}`.
    pub(crate) fn presence_members(&self, room: &str) -> String {
        Self::tagged(&self.presence_prefix, room)
    }

    /// The sorted set of the nodes with members in a presence room, by expiry:
    /// `{prefix}presence-nodes:{ROOM}`.
    pub(crate) fn presence_nodes(&self, room: &str) -> String {
        Self::tagged(&self.presence_nodes_prefix, room)
    }

    /// The counter of a presence room's joins and leaves (their `seq` in notifications):
    /// `{prefix}presence-seq:{ROOM}`.
    pub(crate) fn presence_seq(&self, room: &str) -> String {
        Self::tagged(&self.presence_seq_prefix, room)
    }

    /// What every node's hash of its own members in a presence room starts with:
    /// `{prefix}presence-node:{ROOM}:` (the node's id follows).
    pub(crate) fn presence_node_prefix(&self, room: &str) -> String {
        let mut key = Self::tagged(&self.presence_node_prefix, room);
        key.push(':');
        key
    }

    /// The record of an idempotency key published to `room` by `identity` (a socket's, or
    /// the server's when `server`), in the room's hash slot:
    /// `{prefix}published:LEN:KIND LEN:{ROOM}IDENTITYKEY`, the room's length, `c` (a
    /// client) or `s` (the server) and the identity's length before the room, the identity
    /// and the key run together after it. Every length comes before what it measures, so
    /// no two records share a name, and a client's record never names the server's; the
    /// room is the key's first hash tag, as in its channel.
    pub(crate) fn published_key(
        &self,
        room: &str,
        identity: &str,
        server: bool,
        key: &str,
    ) -> String {
        let kind = if server { 's' } else { 'c' };
        format!(
            "{}{}:{kind}{}:{{{room}}}{identity}{key}",
            self.published_prefix,
            room.len(),
            identity.len()
        )
    }

    /// The set of rooms recorded for `identity`.
    pub(crate) fn identity_set(&self, identity: &str) -> String {
        format!("{}{identity}", self.identity_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn channels_and_rooms_round_trip() {
        let keys = Keys::new("p:");
        assert_eq!(keys.room_channel("a"), "p:room:{a}");
        assert_eq!(keys.room_of_channel("p:room:{a}"), Some("a"));
        assert_eq!(keys.room_of_channel("p:room:{a}}"), Some("a}"));
        assert_eq!(keys.room_of_channel("q:room:{a}"), None);
        assert_eq!(keys.history_meta("a"), "p:meta:{a}");
        assert_eq!(keys.history_frames("a"), "p:frames:{a}");
        assert_eq!(keys.identity_set("alice"), "p:identity:alice");
        assert_eq!(keys.presence_members("a"), "p:presence:{a}");
        assert_eq!(keys.presence_nodes("a"), "p:presence-nodes:{a}");
        assert_eq!(keys.presence_node_prefix("a"), "p:presence-node:{a}:");
    }

    #[test]
    fn records_of_keys_have_one_name_each() {
        let keys = Keys::new("p:");
        assert_eq!(
            keys.published_key("a", "bob", false, "k"),
            "p:published:1:c3:{a}bobk"
        );
        assert_eq!(
            keys.published_key("a", "bob", true, "k"),
            "p:published:1:s3:{a}bobk"
        );
        // What the reviewer found colliding without the room's length in front.
        assert_ne!(
            keys.published_key("r", "5", false, "}:1:ab"),
            keys.published_key("r}:1:5", "a", false, "b")
        );
        assert_ne!(
            keys.published_key("r", "ab", false, "c"),
            keys.published_key("r", "a", false, "bc")
        );
    }
}
