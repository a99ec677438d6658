//! The node's room hub: local room membership and delivery, and the [`Hub`] handle through
//! which an application observes and controls the node.
//!
//! The hub itself knows nothing about Redis: it maps each room that has members on this
//! node to those sockets' bounded outbound queues, and offers each delivered frame to them
//! without waiting. A member whose queue is full is closed with 1013 (slow reader) instead
//! of delaying everybody else, and all recipients share one frame buffer.
//!
//! # Example
//!
//! ```
//! use thinws::ThinWsLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = ThinWsLayer::in_memory();
//! let hub = layer.hub();
//! assert_eq!(hub.socket_count(), 0);
//! assert!(hub.health().await.is_ready());
//! # }
//! ```

mod rooms;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub(crate) use self::rooms::{Outbox, Refused, RoomHub, SocketControl, SocketId};
use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::broker::Broker;
use crate::config::Config;
use crate::protocol::server;
use crate::{Error, Publisher};

/// Everything one node shares between its sockets.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) rooms: RoomHub,
    pub(crate) broker: Broker,
    pub(crate) config: Config,
    /// Random per process; makes server-generated identities unique across nodes.
    pub(crate) instance: u64,
    /// Why the broker cannot work at all (a malformed Redis URL), if so.
    pub(crate) broken: Option<Arc<str>>,
}

/// A handle to the node's hub: health, local statistics and shutdown.
///
/// Obtained from [`ThinWsLayer::hub`](crate::ThinWsLayer::hub); cheap to clone, `Send` and
/// `Sync`. Every service built from the same layer shares one hub.
#[derive(Clone)]
pub struct Hub {
    pub(crate) node: Arc<Node>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("sockets", &self.socket_count())
            .field("rooms", &self.room_count())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Number of open sockets on this node.
    pub fn socket_count(&self) -> usize {
        self.node.rooms.socket_count()
    }

    /// Number of rooms with at least one member on this node.
    pub fn room_count(&self) -> usize {
        self.node.rooms.room_count()
    }

    /// Bytes waiting in the outbound queues of this node's sockets (each bounded by
    /// [`ThinWsBuilder::max_queued_bytes`](crate::ThinWsBuilder::max_queued_bytes)).
    pub fn queued_bytes(&self) -> usize {
        self.node.rooms.queued_bytes()
    }

    /// Number of this node's sockets in `room`.
    pub fn member_count(&self, room: &str) -> usize {
        self.node.rooms.member_count(room)
    }

    /// Publishes `payload` (serialised to JSON) to every subscriber of `room` on every node,
    /// exactly as a client's `message`, with the layer's server sender id as `connectionID`
    /// (see [`ThinWsBuilder::server_sender_id`](crate::ThinWsBuilder::server_sender_id)).
    /// Returns once the broker accepted it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), thinws::Error> {
    /// let hub = thinws::ThinWsLayer::in_memory().hub();
    /// hub.publish("news", &serde_json::json!({"headline": "thinws ships"})).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        payload: &T,
    ) -> Result<(), Error> {
        self.publish_raw(room, &crate::error::raw_payload(payload)?)
            .await
    }

    /// Publishes an already-serialised JSON payload; see [`Hub::publish`].
    pub async fn publish_raw(&self, room: &str, payload: &RawValue) -> Result<(), Error> {
        if let Some(reason) = &self.node.broken {
            return Err(Error::Unavailable(reason.to_string()));
        }
        let frame = server::delivery(room, &self.node.config.server_sender_id, payload);
        self.node
            .broker
            .publish(room, Utf8Bytes::from(frame), 0)
            .result()
            .await
            .map_err(|e| Error::Unavailable(e.0))
    }

    /// A [`Publisher`] for processes that run no sockets (a worker, a cron job): it
    /// publishes to the rooms of every node on the Redis at `redis_url`. Same as
    /// [`Publisher::new`].
    pub fn publisher(redis_url: &str) -> Result<Publisher, Error> {
        Publisher::new(redis_url)
    }

    /// Probes whether this node can serve: for Redis, a `PING` through the publish pool and
    /// one on the pub/sub connection that holds the room subscriptions, each within the
    /// layer's Redis timeout. The in-memory hub is always ready.
    pub async fn health(&self) -> Health {
        let accepting = self.node.rooms.is_accepting();
        if let Some(reason) = &self.node.broken {
            return Health {
                publish: Err(reason.to_string()),
                subscriptions: Err(reason.to_string()),
                accepting,
            };
        }
        let probe = self
            .node
            .broker
            .health(self.node.config.redis_timeout)
            .await;
        Health {
            publish: probe.publish,
            subscriptions: probe.subscriptions,
            accepting,
        }
    }

    /// Gracefully closes the node: stops accepting sockets, asks every socket to close with
    /// 1001 (going away) after the frames already queued for it, and waits until all are
    /// closed or `deadline` has passed. Returns the number of sockets still open.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.node
            .rooms
            .close_all(CloseCode::Away, "server shutting down");
        let _ = tokio::time::timeout(deadline, self.node.rooms.all_closed()).await;
        self.socket_count()
    }
}

/// The result of [`Hub::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the publish path answered, or why not.
    pub publish: Result<(), String>,
    /// Whether the subscription connection answered, or why not.
    pub subscriptions: Result<(), String>,
    /// Whether the node accepts new sockets (false once shutdown has begun).
    pub accepting: bool,
}

impl Health {
    /// True when the node can serve sockets.
    pub fn is_ready(&self) -> bool {
        self.publish.is_ok() && self.subscriptions.is_ok() && self.accepting
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ready() {
            return f.write_str("ok");
        }
        let mut sep = "";
        if let Err(e) = &self.publish {
            write!(f, "publish: {e}")?;
            sep = "; ";
        }
        if let Err(e) = &self.subscriptions {
            write!(f, "{sep}subscriptions: {e}")?;
            sep = "; ";
        }
        if !self.accepting {
            write!(f, "{sep}shutting down")?;
        }
        Ok(())
    }
}
