//! The names of the Redis keys and channels, under one prefix.

/// The names of the Redis keys and channels, under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    room_prefix: String,
    identity_prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            room_prefix: format!("{prefix}room:"),
            identity_prefix: format!("{prefix}identity:"),
        }
    }

    /// The channel of `room`'s frames.
    pub(crate) fn room_channel(&self, room: &str) -> String {
        let mut s = String::with_capacity(self.room_prefix.len() + room.len());
        s.push_str(&self.room_prefix);
        s.push_str(room);
        s
    }

    /// The room whose frames `channel` carries, if it is a room channel.
    pub(crate) fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&*self.room_prefix)
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
        assert_eq!(keys.room_channel("a"), "p:room:a");
        assert_eq!(keys.room_of_channel("p:room:a"), Some("a"));
        assert_eq!(keys.room_of_channel("q:room:a"), None);
        assert_eq!(keys.identity_set("alice"), "p:identity:alice");
    }
}
