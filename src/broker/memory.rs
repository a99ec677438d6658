use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::SharedSink;

/// Single-node broker: delivery straight into the sink, identities in memory.
pub(crate) struct MemoryBroker {
    sink: SharedSink,
    identities: Mutex<HashMap<String, HashSet<String>>>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    pub(crate) fn new(sink: SharedSink) -> Self {
        MemoryBroker {
            sink,
            identities: Mutex::default(),
        }
    }

    pub(crate) fn publish(&self, room: &str, frame: &Utf8Bytes) {
        self.sink.deliver(room, frame);
    }

    fn identities(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `room` unless `identity` has `max` rooms already; returns whether it is.
    pub(crate) fn record(&self, identity: &str, room: &str, max: usize) -> bool {
        let mut identities = self.identities();
        let rooms = identities.entry(identity.to_owned()).or_default();
        if rooms.contains(room) {
            return true;
        }
        if rooms.len() >= max {
            return false;
        }
        rooms.insert(room.to_owned())
    }

    pub(crate) fn forget(&self, identity: &str, room: &str) {
        let mut identities = self.identities();
        if let Some(rooms) = identities.get_mut(identity) {
            rooms.remove(room);
            if rooms.is_empty() {
                identities.remove(identity);
            }
        }
    }

    pub(crate) fn rooms_of(&self, identity: &str) -> Vec<String> {
        self.identities()
            .get(identity)
            .map(|rooms| rooms.iter().cloned().collect())
            .unwrap_or_default()
    }
}
