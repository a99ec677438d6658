//! [`ThinWsBuilder`]: every setting of a [`ThinWsLayer`].

use std::sync::Arc;
use std::time::Duration;

use tower_service::Service;

use super::ThinWsLayer;
use crate::broker::Broker;
use crate::config::{Config, NotificationHook};
use crate::error::ConnectError;
use crate::hooks::{
    self, BoxError, ConnectEvent, ConnectVerdict, DisconnectEvent, MessageEvent, MessageVerdict,
    Notification, RefreshEvent, RefreshVerdict, SubscribeEvent, UnsubscribeEvent, Verdict,
};
use crate::node::{Node, RedisAddress};
use crate::settings::{History, Presence, RoomSettings};

/// Builds a [`ThinWsLayer`]; see each setting for its default.
///
/// ```
/// use std::time::Duration;
///
/// let layer = thinws::ThinWsLayer::builder()
///     .path("/ws")
///     .max_frame_size(16 * 1024)
///     .max_room_id_len(64)
///     .outbound_queue(256)
///     .redis_timeout(Duration::from_secs(1))
///     .build(); // no Redis URL: the in-memory single-node broker
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ThinWsBuilder {
    redis: Option<RedisAddress>,
    config: Config,
}

impl ThinWsBuilder {
    /// Fan out through Redis at this URL (`redis://[:password@]host:port[/db]`, or
    /// `rediss://` for TLS with the `tls` feature). Without it, the layer uses the
    /// in-memory single-node broker.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .redis_url("redis://:password@127.0.0.1:6379/0")
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(RedisAddress::Url(url.into()));
        self
    }

    /// Fan out through a Redis Cluster (Redis 7 or newer), given the URLs of some of its
    /// nodes (the rest are discovered). Each room's channel is then sharded: published with
    /// `SPUBLISH` to, and subscribed with `SSUBSCRIBE` on, the shard that owns the room's
    /// slot, where its history and presence keys live too. The node follows slot
    /// migrations and failovers on its own.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .redis_cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn redis_cluster(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.redis = Some(RedisAddress::Cluster(
            urls.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// For `rediss://`: a private CA (PEM) to trust beside the system's root certificates,
    /// e.g. that of a self-hosted Redis. Managed offerings' certificates chain to public
    /// roots and need none.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .redis_url("rediss://redis.internal:6380")
    ///     .redis_ca_pem(std::fs::read("ca.pem").unwrap_or_default())
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn redis_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.config.redis_ca_pem = Some(pem.into().into());
        self
    }

    /// Take over upgrade requests on this path only (exact match, e.g. `"/ws"`). Default:
    /// every path.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .path("/ws")
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config.path = Some(path.into());
        self
    }

    /// Prefix of every Redis channel and key this node uses. Default `"thinws:"`.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .key_prefix("chat:")
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }

    /// Largest accepted client frame, in bytes; a larger one closes the socket with 1009.
    /// Default 64 KiB.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_frame_size(16 * 1024)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_size = bytes;
        self
    }

    /// Longest accepted `roomID`, in bytes (`too_large` error beyond). Default 256.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_room_id_len(64)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_room_id_len(mut self, bytes: usize) -> Self {
        self.config.limits.max_room_id_len = bytes;
        self
    }

    /// Longest accepted `connectionID`, in bytes (`too_large` error beyond). Default 256.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_connection_id_len(64)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_connection_id_len(mut self, bytes: usize) -> Self {
        self.config.limits.max_connection_id_len = bytes;
        self
    }

    /// Deepest accepted nesting of arrays and objects in a `payload` (`too_large` error
    /// beyond). Default 64.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_payload_depth(16)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_payload_depth(mut self, levels: usize) -> Self {
        self.config.limits.max_payload_depth = levels;
        self
    }

    /// How many frames may wait to be written to one socket; when a socket's queue is
    /// full, it is closed with 1013 (slow reader). Default 16,384: the byte bound
    /// ([`max_queued_bytes`](Self::max_queued_bytes), 1 MiB) is the one that normally
    /// applies, this one only for very small frames. The queue takes memory as it fills,
    /// not up front.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .outbound_queue(1024)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn outbound_queue(mut self, frames: usize) -> Self {
        self.config.outbound_queue = frames.max(1);
        self
    }

    /// Size of each socket's read buffer (tungstenite's, allocated up front). Default 512
    /// bytes: an idle socket then costs little memory, and larger frames are read in
    /// several steps. Raise it for sockets that mostly receive large frames.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .read_buffer_size(4096)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.config.read_buffer_size = bytes.max(64);
        self
    }

    /// How many bytes may wait to be written to one socket; beyond that it is closed with
    /// 1013 like a full queue. Default 1 MiB. A node's outbound memory is bounded by this
    /// times its sockets.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_queued_bytes(256 * 1024)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.config.max_queued_bytes = bytes;
        self
    }

    /// How many sockets this node accepts; beyond that, upgrade requests get `503` (and a
    /// socket that raced past the check is closed with 1013). Default 100,000.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_sockets(50_000)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_sockets(mut self, sockets: usize) -> Self {
        self.config.max_sockets = sockets;
        self
    }

    /// How many rooms one socket may be in (`limit_exceeded` beyond). Default 256.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .max_rooms_per_socket(32)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn max_rooms_per_socket(mut self, rooms: usize) -> Self {
        self.config.max_rooms_per_socket = rooms;
        self
    }

    /// How often the server pings each socket. Default 25 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .ping_interval(Duration::from_secs(15))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.config.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long a socket may stay silent (no frame, no pong) before it is dropped and its
    /// `disconnect` hook fires with [`DisconnectReason::TimedOut`](crate::hooks::DisconnectReason::TimedOut).
    /// Default 60 s. Keep it longer than the [ping interval](Self::ping_interval), or quiet
    /// sockets are dropped before they are pinged (the layer logs a warning when built so).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .idle_timeout(Duration::from_secs(45))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// Each socket's frame rate: `per_second` on average, in bursts of up to `burst`
    /// (a token bucket). A frame over the rate gets `rate_limited`; default 100 per second
    /// with bursts of 200. `per_second = 0` disables the limit.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .rate_limit(20, 40) // 20 frames/s on average, bursts of 40
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn rate_limit(mut self, per_second: u32, burst: u32) -> Self {
        self.config.rate.per_second = per_second;
        self.config.rate.burst = burst;
        self
    }

    /// After this many `rate_limited` frames in a row, the socket is closed with 1008 (a
    /// flood). Default 100.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .flood_close_after(50)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn flood_close_after(mut self, refusals: u32) -> Self {
        self.config.rate.flood_after = refusals;
        self
    }

    /// How long one Redis operation (publish, subscribe, identity lookup, health probe) may
    /// take before the client gets `unavailable`. Default 2 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .redis_timeout(Duration::from_millis(500))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.config.redis_timeout = timeout;
        self
    }

    /// How many Redis replicas must confirm a message published to a history room, or with
    /// an idempotency key, before its `ack` (Redis's `WAIT`, after each round of publishes
    /// that carries such messages). Default 0: an `ack` means the master took it, and a
    /// master that dies before replicating can take it with it (replication is
    /// asynchronous). With 1 on a Redis Cluster with a replica per master, an acked
    /// message outlives the failover of its master; where fewer replicas confirm within
    /// 40 % of the [`redis_timeout`](Self::redis_timeout), the client gets `timeout` (the
    /// message was published, but may be lost on a failover) instead of an `ack`. Costs a
    /// round trip to the replicas per round of such publishes. `WAIT` holds the connection
    /// it runs on, so each publishing lane then has connections of its own (on a cluster,
    /// one per master and lane, 4 lanes): while replicas are slow to confirm, the
    /// publishes that share a lane with a waiting one wait too (plain rooms' included),
    /// other lanes and presence, identity and history commands do not (a node then holds
    /// up to five connections per master: count them against Redis's `maxclients`). Not
    /// applied to [`Publisher`](crate::Publisher)s.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .redis_cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
    ///     .redis_wait_replicas(1)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn redis_wait_replicas(mut self, replicas: u32) -> Self {
        self.config.redis_wait_replicas = replicas;
        self
    }

    /// Gives every room a history (unless a [`room_settings`](Self::room_settings) rule or
    /// the [`room_policy`](Self::room_policy) says otherwise): messages then carry an
    /// `offset` and an `epoch`, and clients can ask for the last ones. Off by default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use thinws::settings::History;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .history(History::new(100, Duration::from_secs(300)))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn history(mut self, history: History) -> Self {
        let settings = self.config.rooms.defaults().history(Some(history));
        self.config.rooms.default_settings(settings);
        self
    }

    /// Makes every room track presence (unless a [`room_settings`](Self::room_settings)
    /// rule or the [`room_policy`](Self::room_policy) says otherwise): who is in it, on any
    /// node, with `join` and `leave` events for [`Presence::WithJoinLeave`]. Off by default.
    ///
    /// ```
    /// use thinws::settings::Presence;
    ///
    /// let layer = thinws::ThinWsLayer::builder().presence(Presence::WithJoinLeave).build();
    /// # let _ = layer;
    /// ```
    pub fn presence(mut self, presence: Presence) -> Self {
        let settings = self.config.rooms.defaults().presence(presence);
        self.config.rooms.default_settings(settings);
        self
    }

    /// How long a message with an idempotency key (protocol 1.2) is remembered after it
    /// was published: a resend with the same key, room and identity within this window is
    /// answered as a duplicate rather than published again. Every room's, unless a
    /// [`room_settings`](Self::room_settings) rule or the
    /// [`room_policy`](Self::room_policy) says otherwise. Default 2 minutes; zero turns
    /// keys off.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .idempotency_window(Duration::from_secs(600))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        let settings = self.config.rooms.defaults().idempotency_window(window);
        self.config.rooms.default_settings(settings);
        self
    }

    /// How long a node's presence entries outlive it: a node that dies without saying
    /// goodbye has its members taken out of every room (with `leave` events) within this
    /// time. Nodes refresh their entries every sixth of it. Default 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .presence_ttl(Duration::from_secs(10))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.config.presence_ttl = ttl.max(Duration::from_millis(60));
        self
    }

    /// The most identities a `presence` reply lists (its `count` stays exact). Default 1,000.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .presence_members_max(100)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn presence_members_max(mut self, max: usize) -> Self {
        self.config.presence_members_max = max;
        self
    }

    /// Gives rooms matching `pattern` (an exact room name, or a prefix ending in `*`) these
    /// settings; the first matching rule wins. See [`settings`](crate::settings).
    ///
    /// ```
    /// use std::time::Duration;
    /// use thinws::settings::{History, RoomSettings};
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .room_settings(
    ///     "chat:*",
    ///     RoomSettings::with_history(History::new(100, Duration::from_secs(300))),
    ///     )
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn room_settings(mut self, pattern: impl Into<String>, settings: RoomSettings) -> Self {
        self.config.rooms.rule(pattern, settings);
        self
    }

    /// Decides the settings of rooms that no [`room_settings`](Self::room_settings) rule
    /// matches. It must answer the same for a room every time, on every node.
    pub fn room_policy(
        mut self,
        policy: impl Fn(&str) -> RoomSettings + Send + Sync + 'static,
    ) -> Self {
        self.config.rooms.function(Arc::new(policy));
        self
    }

    /// Closes sockets that have not bound an identity (a `connect` the `connect` hook
    /// accepted) within `grace` of opening, with 1008 (policy violation). With an
    /// authenticating `connect` hook, this keeps unauthenticated sockets from lingering.
    /// Off by default.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .require_connect_within(Duration::from_secs(5))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn require_connect_within(mut self, grace: Duration) -> Self {
        self.config.connect_within = Some(grace);
        self
    }

    /// How long an identity's recorded rooms are kept after its last socket went away (on
    /// every node); while any socket of the identity is connected they are kept. Default
    /// 24 h. On Redis the identity's set gets this time to live; in memory the same rule
    /// applies.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .identity_ttl(Duration::from_secs(60 * 60))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn identity_ttl(mut self, ttl: Duration) -> Self {
        self.config.identity_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Serves the browser client: `GET /thinws.js` (a plain script defining
    /// `ThinWSClient`), `GET /thinws.mjs` (the same as an ES module) and
    /// `GET /thinws-compat.js` (a drop-in for the original ThinWS client), with a
    /// JavaScript content type, an `ETag` and `Cache-Control: public, max-age=3600`, the
    /// way Socket.IO serves its client. Off by default; the standalone server turns it on.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder().serve_client(true).build();
    /// # let _ = layer;
    /// ```
    pub fn serve_client(mut self, serve: bool) -> Self {
        self.config.serve_client = serve;
        self
    }

    /// Allows browser pages from `origin` (`"https://app.example.com"`; `"*"` for any) to
    /// open sockets; call it once per origin. While no origin rule is set, every origin may
    /// (the default, for compatibility); once one is, an upgrade from any other `Origin` gets
    /// `403`. Requests without an `Origin` header (non-browser clients) are always allowed.
    /// This is the defence against cross-site WebSocket hijacking: set it in production.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .allow_origin("https://app.example.com")
    ///     .allow_same_host_origin()
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn allow_origin(mut self, origin: impl AsRef<str>) -> Self {
        self.config.origins.allow(origin.as_ref());
        self
    }

    /// Allows pages served from the upgrade request's own host (an `http`/`https` `Origin`
    /// naming the request's `Host`, with the same port), in addition to
    /// [`allow_origin`](Self::allow_origin)'s list, when that host is a loopback name
    /// (`localhost`, `*.localhost`), an IP address, or named by
    /// [`public_host`](Self::public_host). Any other name is refused: it could be an
    /// attacker's domain rebound to this server's address (DNS rebinding).
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .allow_same_host_origin()
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn allow_same_host_origin(mut self) -> Self {
        self.config.origins.allow_same_host();
        self
    }

    /// Names a host (`chat.example.com`, or with its port: `chat.example.com:8443`) that
    /// pages open sockets from with [`allow_same_host_origin`](Self::allow_same_host_origin)
    /// (which this turns on).
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .public_host("chat.example.com")
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn public_host(mut self, host: impl AsRef<str>) -> Self {
        self.config.origins.public_host(host.as_ref());
        self
    }

    /// The `connectionID` that frames published with [`Hub::publish`](crate::Hub::publish) carry. Default
    /// `"server"`. No socket may `connect` as this identity (claimed or assigned by a hook), so
    /// recipients can trust it.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .server_sender_id("system")
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn server_sender_id(mut self, id: impl Into<String>) -> Self {
        self.config.server_sender_id = id.into();
        self
    }

    /// Sets the hook called when a client sends `connect`: it can accept the claimed
    /// `connectionID`, assign another, or refuse (see [`hooks`](crate::hooks)).
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use thinws::hooks::{ConnectEvent, ConnectVerdict};
    /// use tower::service_fn;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_connect(service_fn(|event: ConnectEvent| async move {
    ///         Ok::<_, Infallible>(if event.connection_id() == "server" {
    ///             ConnectVerdict::refuse("reserved identity")
    ///         } else {
    ///             ConnectVerdict::Accept
    ///         })
    ///     }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_connect<S>(mut self, hook: S) -> Self
    where
        S: Service<ConnectEvent, Response = ConnectVerdict> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.hooks.connect = Some(hooks::boxed(hook));
        self
    }

    /// Sets the hook called before a socket joins a room (on `subscribe`, and for each
    /// recorded room on `connect`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use thinws::hooks::{SubscribeEvent, Verdict};
    /// use tower::ServiceBuilder;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_subscribe(
    ///         ServiceBuilder::new()
    ///             .timeout(Duration::from_millis(500))
    ///             .service_fn(|event: SubscribeEvent| async move {
    ///                 let user = event.socket().request().headers.get("x-user");
    ///                 Ok::<_, std::convert::Infallible>(match user {
    ///                     Some(_) => Verdict::Allow,
    ///                     None => Verdict::refuse("who are you?"),
    ///                 })
    ///             }),
    ///     )
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_subscribe<S>(mut self, hook: S) -> Self
    where
        S: Service<SubscribeEvent, Response = Verdict> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.hooks.subscribe = Some(hooks::boxed(hook));
        self
    }

    /// Sets the hook called before a socket leaves a room on `unsubscribe`.
    ///
    /// ```
    /// use thinws::hooks::{UnsubscribeEvent, Verdict};
    /// use tower::service_fn;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_unsubscribe(service_fn(|event: UnsubscribeEvent| async move {
    ///         Ok::<_, std::convert::Infallible>(if event.room() == "announcements" {
    ///             Verdict::refuse("everyone stays in announcements")
    ///         } else {
    ///             Verdict::Allow
    ///         })
    ///     }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_unsubscribe<S>(mut self, hook: S) -> Self
    where
        S: Service<UnsubscribeEvent, Response = Verdict> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.hooks.unsubscribe = Some(hooks::boxed(hook));
        self
    }

    /// Sets the hook called before a `message` is published: it can allow it, replace its
    /// payload, or refuse it.
    ///
    /// ```
    /// use thinws::hooks::{MessageEvent, MessageVerdict};
    /// use tower::service_fn;
    ///
    /// #[derive(serde::Deserialize, serde::Serialize)]
    /// struct Chat { text: String }
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_message(service_fn(|event: MessageEvent| async move {
    ///         let Ok(mut chat) = event.payload_as::<Chat>() else {
    ///             return Ok(MessageVerdict::refuse("expected {text: ...}"));
    ///         };
    ///         chat.text = chat.text.replace("darn", "d**n");
    ///         MessageVerdict::replace(&chat)
    ///     }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_message<S>(mut self, hook: S) -> Self
    where
        S: Service<MessageEvent, Response = MessageVerdict> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.hooks.message = Some(hooks::boxed(hook));
        self
    }

    /// Sets the hook called exactly once per socket, when it says `disconnect` or ends.
    ///
    /// ```
    /// use thinws::hooks::DisconnectEvent;
    /// use tower::service_fn;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_disconnect(service_fn(|event: DisconnectEvent| async move {
    ///         tracing::info!(id = event.socket().connection_id(), reason = ?event.reason(), "gone");
    ///         Ok::<_, std::convert::Infallible>(())
    ///     }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_disconnect<S>(mut self, hook: S) -> Self
    where
        S: Service<DisconnectEvent, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.hooks.disconnect = Some(hooks::boxed(hook));
        self
    }

    /// Sets the hook asked when a client sends `refresh` with a new token: it grants the
    /// socket new values and a new deadline ([`hooks::Grant`]), or refuses (the socket
    /// keeps its grant, and is closed at its deadline). Without it, `refresh` is answered
    /// `not_enabled`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use thinws::hooks::{Grant, RefreshEvent, RefreshVerdict};
    /// use tower::service_fn;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_refresh(service_fn(|event: RefreshEvent| async move {
    ///         // A real hook checks `event.token()` here.
    ///         let renewed = SystemTime::now() + Duration::from_secs(600);
    ///         Ok::<_, std::convert::Infallible>(match event.token() {
    ///             "" => RefreshVerdict::refuse("empty token"),
    ///             _ => RefreshVerdict::Grant(Grant::new().expires_at(renewed)),
    ///         })
    ///     }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_refresh<S>(mut self, hook: S) -> Self
    where
        S: Service<RefreshEvent, Response = RefreshVerdict> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.hooks.refresh = Some(hooks::boxed(hook));
        self
    }

    /// Sets the hook told what happened, after the fact (webhooks): a room became occupied or
    /// vacant across every node, an identity joined or left a presence room, a socket ended
    /// ([`hooks::Happened`]). The node queues each [`hooks::Notification`] (see
    /// [`notification_queue`](Self::notification_queue)) and calls the hook with it in turn,
    /// in order per room, again after a growing pause while it fails (one it refuses with
    /// [`hooks::HookError::Refused`] is dropped, counted and logged instead); no socket ever
    /// waits for it. [`hooks::http::Backend::webhook`] POSTs them to a URL.
    ///
    /// ```
    /// use thinws::hooks::{Happened, Notification};
    /// use tower::service_fn;
    ///
    /// let layer = thinws::ThinWsLayer::builder()
    ///     .on_notification(service_fn(|n: Notification| async move {
    ///         if let Happened::RoomVacated { room, .. } = n.what() {
    ///             tracing::info!(%room, "nobody left");
    ///         }
    ///         Ok::<_, std::convert::Infallible>(())
    ///     }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_notification<S>(mut self, hook: S) -> Self
    where
        S: Service<Notification, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError> + 'static,
        S::Future: Send + 'static,
    {
        self.config.notifications = Some(NotificationHook(hooks::boxed(hook)));
        self
    }

    /// How many room notifications the node holds for the notification hook while it is
    /// slow or failing (default 10,000, spread over 4 lanes by room), and as many
    /// disconnects; each lane also holds at most 16 MiB of each kind. Past it a lane's
    /// oldest of the kind are dropped and counted in `thinws_notifications_dropped_total`.
    /// A room's newer notification replaces its older one that is still waiting (see
    /// `docs/hooks/webhooks.md`).
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::builder().notification_queue(50_000).build();
    /// # let _ = layer;
    /// ```
    pub fn notification_queue(mut self, notifications: usize) -> Self {
        self.config.notification_queue = notifications.max(1);
        self
    }

    /// Builds the layer without connecting to Redis.
    pub fn build(self) -> ThinWsLayer {
        self.warn_of_settings();
        let config = Arc::new(self.config);
        let node = Node::new(self.redis.as_ref(), config.clone()).map(Arc::new);
        if let Err(e) = &node {
            tracing::error!(error = %e.report(), "thinws cannot use its Redis URL and will serve no sockets");
        }
        ThinWsLayer { config, node }
    }

    /// Builds the layer and checks now that Redis (if configured) can be used: the URL
    /// parses, and every publishing lane, the pool and the subscription connection answer.
    pub async fn connect(self) -> Result<ThinWsLayer, ConnectError> {
        self.warn_of_settings();
        let config = Arc::new(self.config);
        let node = Arc::new(Node::new(self.redis.as_ref(), config.clone())?);
        if let Broker::Redis(broker) = &node.broker {
            broker.ready(config.redis_timeout).await?;
        }
        Ok(ThinWsLayer {
            config,
            node: Ok(node),
        })
    }

    /// Logs (warning) settings that make every socket fail, which the setters take as
    /// given (the `thinws` binary refuses them).
    fn warn_of_settings(&self) {
        let (idle, ping) = (self.config.idle_timeout, self.config.ping_interval);
        if idle <= ping {
            tracing::warn!(
                ?idle,
                ?ping,
                "the idle timeout is not longer than the ping interval: every socket that \
                 stays quiet is dropped before it is pinged"
            );
        }
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A log that tests read: what a `tracing` subscriber wrote.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What building a layer with `builder` logs.
    fn logged_building(builder: super::ThinWsBuilder) -> String {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || drop(builder.build()));
        let bytes = log.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[tokio::test]
    async fn an_idle_timeout_not_past_the_ping_interval_is_warned_of() {
        let quiet = crate::layer::ThinWsLayer::builder();
        assert!(!logged_building(quiet).contains("idle timeout"));
        let zero = crate::layer::ThinWsLayer::builder().idle_timeout(Duration::ZERO);
        assert!(logged_building(zero).contains("WARN"));
        let short = crate::layer::ThinWsLayer::builder()
            .ping_interval(Duration::from_secs(30))
            .idle_timeout(Duration::from_secs(30));
        assert!(logged_building(short).contains("idle timeout is not longer"));
    }
}
