//! The node's settings, set through [`ThinWsBuilder`](crate::ThinWsBuilder).

use std::time::Duration;

use crate::hooks::{Hook, Hooks, Notification};
use crate::origin::OriginPolicy;
use crate::protocol::Limits;
use crate::settings::RoomPolicy;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The only path whose upgrade requests become sockets; `None` for every path.
    pub(crate) path: Option<String>,
    pub(crate) key_prefix: String,
    pub(crate) limits: Limits,
    /// Largest accepted frame (and message), in bytes; larger ones close the socket with 1009.
    pub(crate) max_frame_size: usize,
    /// Frames that may wait in one socket's outbound queue.
    pub(crate) outbound_queue: usize,
    /// Bytes that may wait in one socket's outbound queue.
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_sockets: usize,
    pub(crate) max_rooms_per_socket: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) rate: RateConfig,
    /// tungstenite's read buffer per socket.
    pub(crate) read_buffer_size: usize,
    /// A private CA to trust for `rediss://`.
    pub(crate) redis_ca_pem: Option<std::sync::Arc<[u8]>>,
    /// How long any one Redis operation may take.
    pub(crate) redis_timeout: Duration,
    /// Replicas that must confirm a history or keyed publish before it is acked (0: none).
    pub(crate) redis_wait_replicas: u32,
    /// How long an identity's rooms are kept after its last socket went away.
    pub(crate) identity_ttl: Duration,
    /// The `connectionID` of frames published with `Hub::publish`.
    pub(crate) server_sender_id: String,
    pub(crate) hooks: Hooks,
    /// Whether `GET /thinws.js` and `/thinws.mjs` serve the browser client.
    pub(crate) serve_client: bool,
    /// Sockets that have not bound an identity this long after opening are closed (1008).
    pub(crate) connect_within: Option<Duration>,
    /// The `Origin`s allowed to open sockets.
    pub(crate) origins: OriginPolicy,
    /// Each room's settings (history, presence).
    pub(crate) rooms: RoomPolicy,
    /// How long a node's presence entries outlive its last refresh and sweep.
    pub(crate) presence_ttl: Duration,
    /// The most identities a `presence` reply lists.
    pub(crate) presence_members_max: usize,
    /// The notification hook (webhooks), if any.
    pub(crate) notifications: Option<NotificationHook>,
    /// The most notifications the node queues for it.
    pub(crate) notification_queue: usize,
}

/// The notification hook, in a [`Config`].
#[derive(Clone)]
pub(crate) struct NotificationHook(pub(crate) Hook<Notification, ()>);

impl std::fmt::Debug for NotificationHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotificationHook")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            path: None,
            key_prefix: "thinws:".into(),
            limits: Limits::default(),
            max_frame_size: 64 * 1024,
            outbound_queue: 16 * 1024,
            max_queued_bytes: 1024 * 1024,
            max_sockets: 100_000,
            max_rooms_per_socket: 256,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            rate: RateConfig {
                per_second: 100,
                burst: 200,
                flood_after: 100,
            },
            read_buffer_size: 512,
            redis_ca_pem: None,
            redis_timeout: Duration::from_secs(2),
            redis_wait_replicas: 0,
            identity_ttl: Duration::from_secs(24 * 60 * 60),
            server_sender_id: "server".into(),
            hooks: Hooks::default(),
            serve_client: false,
            origins: OriginPolicy::any(),
            rooms: RoomPolicy::default(),
            connect_within: None,
            presence_ttl: Duration::from_secs(30),
            presence_members_max: 1000,
            notifications: None,
            notification_queue: 10_000,
        }
    }
}

/// The settings of every socket's frame-rate bucket (see `connection::rate_limit`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateConfig {
    /// Frames per second on average; `0` disables the limit.
    pub(crate) per_second: u32,
    pub(crate) burst: u32,
    /// Refusals in a row after which the socket is closed with 1008.
    pub(crate) flood_after: u32,
}
