//! Publishing to rooms from a process that runs no sockets (a worker, a cron job).
//!
//! Every node subscribes to one Redis channel per room, `{prefix}room:{roomID}` (prefix
//! `thinws:` by default), and forwards each message on it to the room's sockets byte for
//! byte. So a message is published by sending a complete delivered frame to that channel:
//!
//! ```json
//! {"type":"message","roomID":"lobby","connectionID":"server","payload":{"text":"hi"}}
//! ```
//!
//! [`Publisher`] does exactly that, with only a Redis URL: it needs no hub, runs no task
//! and holds no subscription. From any language, `PUBLISH thinws:room:lobby '<frame>'` does
//! the same.
//!
//! # Example
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), thinws::Error> {
//! let publisher = thinws::Publisher::new("redis://127.0.0.1:6379")?
//!     .sender_id("nightly-report");
//! publisher
//!     .publish("dashboards", &serde_json::json!({"revenue": 1234}))
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::broker::{self, Keys};
use crate::protocol::server;
use crate::Error;

/// Publishes to rooms through Redis without running sockets. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    pool: deadpool_redis::Pool,
    keys: Keys,
    sender_id: String,
    timeout: Duration,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("keys", &self.keys)
            .field("sender_id", &self.sender_id)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher for the Redis at `redis_url`, with prefix `thinws:` and sender id
    /// `"server"`. Connects lazily; fails only on a malformed URL.
    pub fn new(redis_url: &str) -> Result<Self, Error> {
        let timeout = Duration::from_secs(2);
        Ok(Publisher {
            pool: broker::create_pool(redis_url, timeout)?,
            keys: Keys::new("thinws:"),
            sender_id: "server".into(),
            timeout,
        })
    }

    /// The key prefix the nodes use (`ThinWsBuilder::key_prefix`).
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.keys = Keys::new(prefix);
        self
    }

    /// The `connectionID` recipients see as the sender.
    pub fn sender_id(mut self, id: impl Into<String>) -> Self {
        self.sender_id = id.into();
        self
    }

    /// How long one publish may take. Default 2 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publishes `payload` (serialised to JSON) to every subscriber of `room` on every
    /// node; returns once Redis accepted it.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        payload: &T,
    ) -> Result<(), Error> {
        self.publish_raw(room, &crate::error::raw_payload(payload)?)
            .await
    }

    /// Publishes an already-serialised JSON payload.
    pub async fn publish_raw(&self, room: &str, payload: &RawValue) -> Result<(), Error> {
        let frame = server::delivery(room, &self.sender_id, payload);
        broker::publish(
            &self.pool,
            self.keys.room_channel(room),
            frame.as_bytes(),
            self.timeout,
        )
        .await
        .map_err(|e| Error::Unavailable(e.0))
    }
}
