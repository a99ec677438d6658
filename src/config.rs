//! The node's settings, set through [`ThinWsBuilder`](crate::ThinWsBuilder).

use std::time::Duration;

use crate::hooks::Hooks;
use crate::protocol::Limits;

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
    /// tungstenite's read buffer per socket.
    pub(crate) read_buffer_size: usize,
    /// How long any one Redis operation may take.
    pub(crate) redis_timeout: Duration,
    /// The `connectionID` of frames published with `Hub::publish`.
    pub(crate) server_sender_id: String,
    pub(crate) hooks: Hooks,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            path: None,
            key_prefix: "thinws:".into(),
            limits: Limits::default(),
            max_frame_size: 64 * 1024,
            outbound_queue: 1024,
            read_buffer_size: 4 * 1024,
            redis_timeout: Duration::from_secs(2),
            server_sender_id: "server".into(),
            hooks: Hooks::default(),
        }
    }
}
