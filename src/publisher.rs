//! Publishing from a process that runs no sockets ([`Publisher`], re-exported at the crate
//! root).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::broker::redis::{ClusterTarget, Commands, Disconnects, Lanes, RedisTarget};
use crate::broker::{Accepted, Keys, Once};
use crate::config::Config;
use crate::error::{ConnectError, PublishError};
use crate::idempotent::{check_key, Idempotent};
use crate::node::RedisAddress;
use crate::protocol::server;
use crate::settings::{RoomPolicy, RoomSettings};

/// Publishes to rooms through Redis without running sockets. Cheap to clone; clones share
/// one pooled connection, and publishes from one task reach subscribers in order.
///
/// Publishing to rooms from a process that runs no sockets (a worker, a cron job).
///
/// Every node subscribes to one Redis channel per room, `{prefix}room:{ROOM}` (prefix
/// `thinws:` by default; the braces are literal, a Redis Cluster hash tag), and forwards each message on it to the room's sockets byte for
/// byte. So a message is published by sending a complete delivered frame to that channel:
///
/// ```json
/// {"type":"message","roomID":"lobby","connectionID":"server","payload":{"text":"hi"}}
/// ```
///
/// [`Publisher`] does exactly that, with only a Redis URL, through the same publishing lane
/// a node uses (one pooled connection, pipelined): it needs no hub and holds no
/// subscription. On a Redis Cluster, build it with [`Publisher::cluster_builder`]: rooms'
/// channels are sharded there (`SPUBLISH`), and a single-URL publisher pointed at a
/// cluster node refuses to publish (a plain `PUBLISH` would reach no node). From any
/// language, on one Redis, `PUBLISH 'thinws:room:{lobby}' '<frame>'` does the same for a
/// room without history (`SPUBLISH` on a cluster; a room with history needs the nodes'
/// publish script: give the publisher the same
/// [`room_settings`](PublisherBuilder::room_settings)).
///
/// # Example
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let publisher = thinws::Publisher::builder("redis://127.0.0.1:6379")
///     .sender_id("nightly-report")
///     .build()?;
/// publisher
///     .publish("dashboards", &serde_json::json!({"revenue": 1234}))
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keys,
    sender_id: String,
    commands: Commands,
    disconnects: Disconnects,
    timeout: Duration,
    /// The lane, started on the first publish (inside a Tokio runtime).
    lane: OnceLock<Lanes>,
    /// For a single URL: whether it is a cluster node, asked before the first publish.
    cluster_node: tokio::sync::OnceCell<bool>,
    rooms: RoomPolicy,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("keys", &self.inner.keys)
            .field("sender_id", &self.inner.sender_id)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`Publisher`]; the defaults are the layer's
/// ([`ThinWsBuilder`](crate::ThinWsBuilder)).
#[derive(Debug, Clone)]
#[must_use]
pub struct PublisherBuilder {
    redis: RedisAddress,
    key_prefix: String,
    sender_id: String,
    timeout: Duration,
    rooms: RoomPolicy,
    ca_pem: Option<Vec<u8>>,
}

impl PublisherBuilder {
    /// For `rediss://`: a private CA (PEM) to trust, as `ThinWsBuilder::redis_ca_pem`.
    ///
    /// ```
    /// let builder = thinws::Publisher::builder("rediss://redis.internal:6380")
    ///     .redis_ca_pem(std::fs::read("ca.pem").unwrap_or_default());
    /// # let _ = builder;
    /// ```
    pub fn redis_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// The key prefix the nodes use (`ThinWsBuilder::key_prefix`). Default `"thinws:"`.
    ///
    /// ```
    /// let publisher = thinws::Publisher::builder("redis://127.0.0.1:6379")
    ///     .key_prefix("chat:")
    ///     .build()?;
    /// # let _ = publisher;
    /// # Ok::<(), thinws::ConnectError>(())
    /// ```
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The `connectionID` recipients see as the sender. Default `"server"`.
    ///
    /// ```
    /// let publisher = thinws::Publisher::builder("redis://127.0.0.1:6379")
    ///     .sender_id("billing")
    ///     .build()?;
    /// # let _ = publisher;
    /// # Ok::<(), thinws::ConnectError>(())
    /// ```
    pub fn sender_id(mut self, id: impl Into<String>) -> Self {
        self.sender_id = id.into();
        self
    }

    /// How long one publish may take (`ThinWsBuilder::redis_timeout`). Default 2 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let publisher = thinws::Publisher::builder("redis://127.0.0.1:6379")
    ///     .timeout(Duration::from_millis(500))
    ///     .build()?;
    /// # let _ = publisher;
    /// # Ok::<(), thinws::ConnectError>(())
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Gives rooms matching `pattern` (an exact name, or a prefix ending in `*`) these
    /// settings: use the nodes' own, so that a message to a history room gets its offset.
    ///
    /// ```
    /// use std::time::Duration;
    /// use thinws::settings::{History, RoomSettings};
    ///
    /// let publisher = thinws::Publisher::builder("redis://127.0.0.1:6379")
    ///     .room_settings(
    ///     "chat:*",
    ///     RoomSettings::with_history(History::new(100, Duration::from_secs(300))),
    ///     )
    ///     .build()?;
    /// # let _ = publisher;
    /// # Ok::<(), thinws::ConnectError>(())
    /// ```
    pub fn room_settings(mut self, pattern: impl Into<String>, settings: RoomSettings) -> Self {
        self.rooms.rule(pattern, settings);
        self
    }

    /// Builds the publisher. Connects lazily; fails only on a malformed URL.
    pub fn build(self) -> Result<Publisher, ConnectError> {
        let ca = self.ca_pem.as_deref();
        let (commands, disconnects) = match &self.redis {
            RedisAddress::Url(url) => {
                let (pool, disconnects) = RedisTarget::parse(url, ca)?.pool(1, self.timeout)?;
                (Commands::Single(pool), disconnects)
            }
            RedisAddress::Cluster(urls) => {
                let cluster = ClusterTarget::parse(urls, ca)?.client(self.timeout)?;
                (Commands::Cluster(Arc::new(cluster)), Disconnects::default())
            }
        };
        Ok(Publisher {
            inner: Arc::new(Inner {
                keys: Keys::new(&self.key_prefix),
                sender_id: self.sender_id,
                commands,
                disconnects,
                timeout: self.timeout,
                lane: OnceLock::new(),
                cluster_node: tokio::sync::OnceCell::new(),
                rooms: self.rooms,
            }),
        })
    }
}

impl Publisher {
    /// A publisher for the Redis at `redis_url` with the layer's defaults (prefix
    /// `thinws:`, sender id `"server"`, 2 s timeout). Connects lazily; fails only on a
    /// malformed URL.
    pub fn new(redis_url: &str) -> Result<Self, ConnectError> {
        Self::builder(redis_url).build()
    }

    /// Settings for a publisher of the Redis at `redis_url`.
    pub fn builder(redis_url: impl Into<String>) -> PublisherBuilder {
        Self::builder_for(RedisAddress::Url(redis_url.into()))
    }

    /// Settings for a publisher of a Redis Cluster, by seed URLs (any of its nodes), as
    /// `ThinWsBuilder::redis_cluster`: rooms' channels are sharded (`SPUBLISH`).
    ///
    /// ```
    /// let publisher = thinws::Publisher::cluster_builder(["redis://10.0.0.1:6379"]).build();
    /// assert!(publisher.is_ok());
    /// ```
    pub fn cluster_builder(urls: impl IntoIterator<Item = impl Into<String>>) -> PublisherBuilder {
        Self::builder_for(RedisAddress::Cluster(
            urls.into_iter().map(Into::into).collect(),
        ))
    }

    fn builder_for(redis: RedisAddress) -> PublisherBuilder {
        let defaults = Config::default();
        PublisherBuilder {
            redis,
            key_prefix: defaults.key_prefix,
            sender_id: defaults.server_sender_id,
            timeout: defaults.redis_timeout,
            rooms: defaults.rooms,
            ca_pem: None,
        }
    }

    /// Publishes `payload` (serialised to JSON) to every subscriber of `room` on every
    /// node; returns once Redis accepted it.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        payload: &T,
    ) -> Result<(), PublishError> {
        self.publish_raw(room, &crate::error::raw_payload(payload)?)
            .await
    }

    /// Publishes an already-serialised JSON payload.
    pub async fn publish_raw(&self, room: &str, payload: &RawValue) -> Result<(), PublishError> {
        self.send(room, payload, None).await.map(drop)
    }

    /// Publishes `payload` to `room` at most once for `key` (1 to 64 bytes), as
    /// [`Hub::publish_once`](crate::Hub::publish_once) does: within the room's idempotency
    /// window (the publisher's room settings say it, as the nodes' must), a publish with a
    /// key already published answers [`Idempotent::Duplicate`] and sends nothing to the
    /// room. Keys are the sender id's. After an error whose outcome is unknown, call again
    /// with the same key.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let publisher = thinws::Publisher::new("redis://127.0.0.1:6379")?;
    /// let status = serde_json::json!({"order": 17, "status": "shipped"});
    /// publisher.publish_once("orders", "17-shipped", &status).await?;
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

    async fn send(
        &self,
        room: &str,
        payload: &RawValue,
        key: Option<&str>,
    ) -> Result<Accepted, PublishError> {
        let inner = &*self.inner;
        let cluster_node = inner
            .cluster_node
            .get_or_try_init(|| inner.commands.is_cluster_node(inner.timeout))
            .await?;
        if *cluster_node {
            return Err(PublishError::ClusterNode);
        }
        let frame = server::delivery(room, &inner.sender_id, payload);
        let lane = inner
            .lane
            .get_or_init(|| Lanes::start(1, &inner.commands, &inner.disconnects, inner.timeout, 0));
        let settings = inner.rooms.settings(room);
        let once = Once::in_room(&settings, &inner.sender_id, true, key);
        let mut publish = lane.publish(0, &inner.keys, room, frame, settings.history, once);
        Ok(publish.result().await?)
    }
}
