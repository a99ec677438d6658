//! The tower layer ([`ThinWsLayer`]), its builder, service, future and body, re-exported
//! at the crate root.

mod body;
mod builder;
mod client_script;
mod future;
mod service;

use std::sync::Arc;

use tower_layer::Layer;

pub use self::body::ResponseBody;
pub use self::builder::ThinWsBuilder;
pub use self::future::ResponseFuture;
pub use self::service::ThinWsService;
use crate::config::Config;
use crate::error::ConnectError;
use crate::hub::Hub;
use crate::node::Node;

/// The tower [`Layer`] that serves ThinWS sockets in front of an inner service.
///
/// Upgrade requests on the configured path (every path by default) are answered with
/// `101 Switching Protocols` and handed to the node's hub; every other request, including a
/// plain `GET` on that path, reaches the inner service untouched. All services built from
/// one layer (axum builds one per route) share one hub.
///
/// # When Redis is misconfigured or down
/// [`ThinWsLayer::new`] does not connect: it only parses the URL. A malformed URL is logged
/// and the layer answers upgrade requests with `503 Service Unavailable` and the reason; an
/// unreachable Redis shows as `unavailable` errors on `subscribe`, `connect` and `message`
/// and as a failing [`Hub::health`]. To fail fast at start-up instead, build the layer with
/// [`ThinWsLayer::connect`] (or [`ThinWsBuilder::connect`]), which checks the URL and every
/// Redis path (each publishing lane, the pool, the subscription connection) and returns a
/// [`ConnectError`].
///
/// ```
/// use thinws::ThinWsLayer;
///
/// let layer = ThinWsLayer::builder()
///     .redis_url("redis://127.0.0.1:6379")
///     .path("/ws")
///     .key_prefix("chat:")
///     .build();
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ThinWsLayer {
    pub(crate) config: Arc<Config>,
    /// The node, or why it could not be built on the Redis URL.
    pub(crate) node: Result<Arc<Node>, ConnectError>,
}

impl ThinWsLayer {
    /// A layer that fans out through Redis at `redis_url`, with default settings.
    ///
    /// Connects lazily; see
    /// [when Redis is misconfigured or down](ThinWsLayer#when-redis-is-misconfigured-or-down)
    /// for what happens when the URL is malformed or Redis is down, and
    /// [`ThinWsLayer::connect`] for an eager check.
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self::builder().redis_url(redis_url).build()
    }

    /// A single-node layer with the in-memory broker: no Redis, identities kept in this
    /// process.
    ///
    /// ```
    /// let layer = thinws::ThinWsLayer::in_memory();
    /// # let _ = layer;
    /// ```
    pub fn in_memory() -> Self {
        Self::builder().build()
    }

    /// Connects to Redis at `redis_url` now and returns the layer once every publishing
    /// lane, the pool and the subscription connection answer, or a clear error.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), thinws::ConnectError> {
    /// let layer = thinws::ThinWsLayer::connect("redis://127.0.0.1:6379").await?;
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(redis_url: impl Into<String>) -> Result<Self, ConnectError> {
        Self::builder().redis_url(redis_url).connect().await
    }

    /// A builder for every setting.
    pub fn builder() -> ThinWsBuilder {
        ThinWsBuilder::default()
    }

    /// The handle to this layer's hub (shared by every service the layer builds).
    pub fn hub(&self) -> Hub {
        Hub {
            node: self.node.clone(),
        }
    }
}

impl<S> Layer<S> for ThinWsLayer {
    type Service = ThinWsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ThinWsService::new(inner, self.clone())
    }
}
