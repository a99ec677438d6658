//! Notifications: what the backend only needs to hear about, after it happened (webhooks).

use std::sync::Arc;
use std::time::SystemTime;

use super::{DisconnectReason, SocketInfo};

/// Something that happened, for a notification hook (set with
/// [`ThinWsBuilder::on_notification`](crate::ThinWsBuilder::on_notification)).
///
/// Notifications are sent after the fact and never delay a socket: the node queues them
/// (bounded: past the bound the oldest is dropped and counted), calls the hook with each in
/// turn, in order per room, and calls it again with the same notification, after a growing
/// pause, while it fails. See [`hooks::http::Backend::webhook`](crate::hooks::http::Backend::webhook)
/// for one that POSTs them to a URL.
#[derive(Debug, Clone)]
pub struct Notification {
    pub(crate) what: Happened,
    pub(crate) at: SystemTime,
}

impl Notification {
    pub(crate) fn now(what: Happened) -> Self {
        Notification {
            what,
            at: SystemTime::now(),
        }
    }

    /// What happened.
    pub fn what(&self) -> &Happened {
        &self.what
    }

    /// When this node learnt it.
    pub fn at(&self) -> SystemTime {
        self.at
    }

    /// The room it is about, if any (notifications of one room keep their order).
    pub fn room(&self) -> Option<&str> {
        match &self.what {
            Happened::RoomOccupied { room, .. }
            | Happened::RoomVacated { room, .. }
            | Happened::Join { room, .. }
            | Happened::Leave { room, .. } => Some(room),
            Happened::Disconnect { .. } => None,
        }
    }
}

/// What a [`Notification`] is about.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Happened {
    /// A room got its first member on any node. Sent once, by one node, however many
    /// nodes the room spreads over.
    RoomOccupied {
        /// The room.
        room: Arc<str>,
        /// Counts up with every occupied and vacated of the room, so that a backend can
        /// order them when two nodes send them at once (see `docs/hooks/webhooks.md`).
        seq: u64,
    },
    /// A room lost its last member on every node (or the last node that had members died
    /// and its lease ran out). Sent once.
    RoomVacated {
        /// The room.
        room: Arc<str>,
        /// As in [`Happened::RoomOccupied`].
        seq: u64,
    },
    /// An identity's first socket entered a presence room (on any node). Sent once.
    Join {
        /// The room.
        room: Arc<str>,
        /// The identity.
        identity: Arc<str>,
        /// Counts up with every join and leave of the room, so that a backend can order
        /// them when two nodes send them at once (see `docs/hooks/webhooks.md`).
        seq: u64,
    },
    /// An identity's last socket left a presence room (on every node). Sent once.
    Leave {
        /// The room.
        room: Arc<str>,
        /// The identity.
        identity: Arc<str>,
        /// As in [`Happened::Join`].
        seq: u64,
    },
    /// A socket ended (sent once per socket, by its node).
    Disconnect {
        /// The socket.
        socket: Box<SocketInfo>,
        /// Why.
        reason: DisconnectReason,
    },
}

/// Where a node's own sequence numbers start (occupancy and presence without Redis): the
/// clock (ms × 1000), so that they keep growing across restarts, as Redis's do.
pub(crate) fn local_seq_base() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis())
        .unwrap_or(0)
        .saturating_mul(1000)
}
