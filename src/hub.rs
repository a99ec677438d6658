//! The application's handle to its node ([`Hub`], re-exported at the crate root).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::broker::{Accepted, Broker, Once, Page};
use crate::error::{BrokerError, ConnectError, HistoryError, PresenceError, PublishError};
use crate::idempotent::{check_key, Idempotent};
use crate::node::Node;
use crate::protocol::server;
use crate::rooms::Rooms;

/// A handle to the node: health, local statistics, publishing from server code, and
/// shutdown.
///
/// Obtained from [`ThinWsLayer::hub`](crate::ThinWsLayer::hub); cheap to clone, `Send` and
/// `Sync`. Every service built from the same layer shares one node.
///
/// # Example
///
/// ```
/// use thinws::ThinWsLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = ThinWsLayer::in_memory();
/// let hub = layer.hub();
/// assert_eq!(hub.socket_count(), 0);
/// assert!(hub.health().await.is_ready());
/// # }
/// ```
#[derive(Clone)]
pub struct Hub {
    /// The node, or why the layer could not build it (then every operation fails with
    /// [`BrokerError::Misconfigured`] and every count is 0).
    pub(crate) node: Result<Arc<Node>, ConnectError>,
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
    /// The node, or the layer's reason for having none.
    fn node(&self) -> Result<&Arc<Node>, BrokerError> {
        self.node
            .as_ref()
            .map_err(|e| BrokerError::Misconfigured(Arc::new(e.clone())))
    }

    /// `count` of this node's rooms, or 0 when the layer serves nothing.
    fn count(&self, count: impl FnOnce(&Rooms) -> usize) -> usize {
        self.node.as_ref().map_or(0, |node| count(&node.rooms))
    }

    /// Number of open sockets on this node.
    pub fn socket_count(&self) -> usize {
        self.count(Rooms::socket_count)
    }

    /// Number of rooms with at least one member on this node.
    pub fn room_count(&self) -> usize {
        self.count(Rooms::room_count)
    }

    /// Bytes waiting in the outbound queues of this node's sockets (each bounded by
    /// [`ThinWsBuilder::max_queued_bytes`](crate::ThinWsBuilder::max_queued_bytes)).
    pub fn queued_bytes(&self) -> usize {
        self.count(Rooms::queued_bytes)
    }

    /// Number of this node's sockets in `room`.
    pub fn member_count(&self, room: &str) -> usize {
        self.count(|rooms| rooms.member_count(room))
    }

    /// Publishes `payload` (serialised to JSON) to every subscriber of `room` on every node,
    /// exactly as a client's `message`, with the layer's server sender id as `connectionID`
    /// (see [`ThinWsBuilder::server_sender_id`](crate::ThinWsBuilder::server_sender_id)).
    /// Returns once the broker accepted it. Calls from one task reach subscribers in order.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = thinws::ThinWsLayer::in_memory().hub();
    /// hub.publish("news", &serde_json::json!({"headline": "thinws ships"})).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        payload: &T,
    ) -> Result<(), PublishError> {
        self.publish_raw(room, &crate::error::raw_payload(payload)?)
            .await
    }

    /// Publishes an already-serialised JSON payload; see [`Hub::publish`].
    pub async fn publish_raw(&self, room: &str, payload: &RawValue) -> Result<(), PublishError> {
        self.send(room, payload, None).await.map(drop)
    }

    /// Publishes `payload` to `room` as the server sender id, with an idempotency key if
    /// given; what the broker answered.
    async fn send(
        &self,
        room: &str,
        payload: &RawValue,
        key: Option<&str>,
    ) -> Result<Accepted, PublishError> {
        let node = self.node()?;
        let sender = &node.config.server_sender_id;
        let frame = server::delivery(room, sender, payload);
        let settings = node.config.rooms.settings(room);
        let once = Once::in_room(&settings, sender, true, key);
        let mut publish = node.broker.publish(room, frame, 0, settings.history, once);
        Ok(publish.result().await?)
    }

    /// Publishes `payload` to `room` as [`Hub::publish`] does, at most once for `key` (1 to
    /// 64 bytes): within the room's idempotency window after the first publish with this
    /// key (two minutes unless set, see
    /// [`RoomSettings::idempotency_window`](crate::settings::RoomSettings::idempotency_window)),
    /// another with the same key is not published and answers [`Idempotent::Duplicate`].
    /// Keys are the server sender id's: they never match a client's. After an error that
    /// leaves the outcome unknown ([`BrokerError::outcome_unknown`]), call again with the
    /// same key.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use thinws::Idempotent;
    ///
    /// let hub = thinws::ThinWsLayer::in_memory().hub();
    /// let order = serde_json::json!({"order": 17, "status": "shipped"});
    /// assert_eq!(hub.publish_once("orders", "17-shipped", &order).await?, Idempotent::Published);
    /// assert_eq!(hub.publish_once("orders", "17-shipped", &order).await?, Idempotent::Duplicate);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish_once<T: Serialize + ?Sized>(
        &self,
        room: &str,
        key: &str,
        payload: &T,
    ) -> Result<Idempotent, PublishError> {
        check_key(key)?;
        let payload = crate::error::raw_payload(payload)?;
        let accepted = self.send(room, &payload, Some(key)).await?;
        Ok(Idempotent::of(&accepted))
    }

    /// The last `limit` messages `room` keeps (all it keeps when `None`), oldest first, as
    /// delivered frames: what a chat shows on join. `Ok(None)` for a room without history.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use thinws::settings::History;
    ///
    /// let hub = thinws::ThinWsLayer::builder()
    ///     .history(History::new(100, Duration::from_secs(300)))
    ///     .build()
    ///     .hub();
    /// hub.publish("lobby", &serde_json::json!({"text": "hi"})).await?;
    /// let history = hub.history("lobby", Some(50)).await?.expect("lobby keeps a history");
    /// assert_eq!(history.offset, 1);
    /// assert!(history.messages[0].contains(r#""offset":1"#));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn history(
        &self,
        room: &str,
        limit: Option<usize>,
    ) -> Result<Option<RoomHistory>, HistoryError> {
        let node = self.node()?;
        let Some(history) = node.config.rooms.settings(room).history else {
            return Ok(None);
        };
        let limit = limit.map_or(history.size, |limit| limit.min(history.size));
        let page = Page {
            limit,
            before: None,
            budget: None,
        };
        let (at, frames, _) = node.broker.history(room, history, page).await?;
        Ok(Some(RoomHistory {
            offset: at.offset,
            epoch: at.epoch.to_string(),
            messages: frames.iter().map(|f| f.as_str().to_owned()).collect(),
        }))
    }

    /// Who is in `room`, on every node: its member count, and the identities (at most
    /// [`ThinWsBuilder::presence_members_max`](crate::ThinWsBuilder::presence_members_max)
    /// of them, in no particular order). `Ok(None)` for a room without presence. On Redis,
    /// one script call, which first takes out the members of nodes that died.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use thinws::settings::Presence;
    ///
    /// let hub = thinws::ThinWsLayer::builder().presence(Presence::On).build().hub();
    /// let presence = hub.presence("lobby").await?.expect("every room tracks presence");
    /// assert_eq!(presence.count, 0);
    /// assert!(presence.members.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn presence(&self, room: &str) -> Result<Option<RoomPresence>, PresenceError> {
        let node = self.node()?;
        let presence = node.config.rooms.settings(room).presence;
        if !presence.is_on() {
            return Ok(None);
        }
        let max = node.config.presence_members_max;
        let found = node.broker.presence(room, presence, max).await?;
        let members = found
            .listed
            .iter()
            .map(|member| {
                serde_json::from_str(member).map_err(|e| PresenceError::InvalidMember {
                    member: member.clone(),
                    source: Arc::new(e),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(RoomPresence {
            count: found.count,
            members,
        }))
    }

    /// Probes whether this node can serve: for Redis, a `PING` through every publishing
    /// lane's connection, one on the pub/sub connection that holds the room subscriptions,
    /// and one on a connection of the pool, each within the layer's Redis timeout. The
    /// in-memory node is always ready.
    pub async fn health(&self) -> Health {
        let node = match self.node() {
            Ok(node) => node,
            Err(unusable) => {
                return Health {
                    publish: Err(unusable.clone()),
                    subscriptions: Err(unusable.clone()),
                    pool: Err(unusable),
                    accepting: false,
                }
            }
        };
        let probe = node.broker.health(node.config.redis_timeout).await;
        Health {
            publish: probe.publish,
            subscriptions: probe.subscriptions,
            pool: probe.pool,
            accepting: node.rooms.is_accepting(),
        }
    }

    /// The Redis connection pool's state (`None` for the in-memory node). The publishing
    /// lanes each hold one connection of it for as long as it works.
    pub fn redis_pool(&self) -> Option<PoolStatus> {
        match &self.node.as_ref().ok()?.broker {
            Broker::Redis(broker) => {
                let status = broker.pool_status()?;
                Some(PoolStatus {
                    max_size: status.max_size,
                    size: status.size,
                    available: status.available,
                    waiting: status.waiting,
                })
            }
            _ => None,
        }
    }

    /// Starts draining: from now on upgrades are answered 503 and [`Hub::health`] is not
    /// ready (so a load balancer's health check takes the node out), while the open
    /// sockets go on being served. [`Hub::shutdown`] then closes them.
    pub fn drain(&self) {
        if let Ok(node) = &self.node {
            node.rooms.stop_accepting();
        }
    }

    /// Gracefully closes the node: stops accepting sockets, asks every socket to close with
    /// 1001 (going away) after the frames already queued for it, and waits until all are
    /// closed (and their presence entries removed, and the notifications they made taken
    /// by the notification hook) or `deadline` has passed. Returns the number of sockets
    /// still open.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let Ok(node) = &self.node else { return 0 };
        node.rooms
            .close_all(CloseCode::Away, "server shutting down");
        let until = tokio::time::Instant::now() + deadline;
        let _ = tokio::time::timeout_at(until, node.rooms.all_closed()).await;
        // The closed sockets' presence leaves reach Redis now, not after the presence TTL.
        if tokio::time::timeout_at(until, node.broker.presence_flush())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline passed before the closed sockets' presence leaves reached Redis: they go with the presence TTL");
        }
        // Their rooms' vacated, leaves and disconnects reach the notification hook.
        if tokio::time::timeout_at(until, node.flush_notifications())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline passed before every notification reached the notification hook: the rest are dropped");
        }
        self.socket_count()
    }
}

/// What a room's history keeps; see [`Hub::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomHistory {
    /// The room's top offset.
    pub offset: u64,
    /// Its epoch.
    pub epoch: String,
    /// The kept messages, oldest first, each a delivered `message` frame (JSON text).
    pub messages: Vec<String>,
}

/// Who is in a room; see [`Hub::presence`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomPresence {
    /// How many identities have at least one socket in the room, on any node.
    pub count: u64,
    /// Which (all of them, unless there are more than the configured maximum).
    pub members: Vec<String>,
}

/// The state of the node's Redis connection pool; see [`Hub::redis_pool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The most connections the pool opens.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open connections not checked out.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

impl PoolStatus {
    /// Connections checked out now (the publishing lanes' among them).
    pub fn in_use(&self) -> usize {
        self.size.saturating_sub(self.available)
    }
}

/// The result of [`Hub::health`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Health {
    /// Whether every publishing lane's connection answered, or why not.
    pub publish: Result<(), BrokerError>,
    /// Whether the subscription connection answered, or why not.
    pub subscriptions: Result<(), BrokerError>,
    /// Whether a pooled connection (identities; the lanes' next connections) answered.
    pub pool: Result<(), BrokerError>,
    /// Whether the node accepts new sockets (false once shutdown has begun).
    pub accepting: bool,
}

impl Health {
    /// True when the node can serve sockets.
    pub fn is_ready(&self) -> bool {
        self.publish.is_ok() && self.subscriptions.is_ok() && self.pool.is_ok() && self.accepting
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ready() {
            return f.write_str("ok");
        }
        let mut sep = "";
        for (path, result) in [
            ("publish", &self.publish),
            ("subscriptions", &self.subscriptions),
            ("pool", &self.pool),
        ] {
            if let Err(e) = result {
                write!(f, "{sep}{path}: {}", e.report())?;
                sep = "; ";
            }
        }
        if !self.accepting {
            write!(f, "{sep}shutting down")?;
        }
        Ok(())
    }
}
