//! Hooks: application code that decides, per socket and per frame, what is allowed.
//!
//! A hook is any [`tower::Service`] of one of the six events ([`ConnectEvent`],
//! [`SubscribeEvent`], [`UnsubscribeEvent`], [`MessageEvent`], [`DisconnectEvent`],
//! [`RefreshEvent`]), set on
//! [`ThinWsBuilder`](crate::ThinWsBuilder) with `on_connect`, `on_subscribe`, and so on. So
//! the usual tower middleware composes: wrap a hook in `ServiceBuilder::new().timeout(..)`,
//! `.concurrency_limit(..)` or `.rate_limit(..)`.
//!
//! - Every event carries the socket's [`SocketInfo`]: its id on this node, its identity,
//!   and the head of the upgrade request (headers, URI, and the extensions that an auth
//!   layer placed outside `ThinWsLayer` filled in).
//! - A hook can allow, refuse with a reason (the client gets an `error` frame with code
//!   `forbidden` and that reason, and nothing happens), or, for `message`, replace the
//!   payload; a `connect` hook can also assign the identity (e.g. the authenticated user)
//!   and grant the socket values and a deadline ([`Grant`]), which a `refresh` hook renews.
//! - A hook that fails (returns `Err`, e.g. a `timeout` that elapsed) refuses safely: the
//!   client gets `internal`, the error is logged, and the socket goes on. A hook that fails
//!   with a [`HookError`] chooses what the client gets instead: `unavailable`, or a
//!   refusal with a code of its own.
//! - Each socket calls its own clone of the hook, one frame at a time and in order, so a
//!   slow hook on one socket never delays another. State that should be shared between
//!   sockets (a global concurrency limit, a cache) belongs behind an `Arc` in the service.
//!   At `connect`, the `subscribe` events of the identity's recorded rooms go through
//!   further clones, up to 8 at once (one at a time from the first `unavailable` answer
//!   on), so state kept in a clone is not the socket's.
//! - `disconnect` fires exactly once per socket: when the client sends `disconnect`, or else
//!   when the socket ends (closed, lost, or shut down).
//! - Without hooks everything is allowed, and no event is even built.
//!
//! When a client `connect`s, the rooms its identity had recorded are rejoined through the
//! `subscribe` hook too; a room it refuses is skipped (and stays recorded). A `connect`
//! hook can also put the socket in rooms of its own choosing ([`Grant::room`]).
//!
//! Besides these hooks, which decide, a notification hook
//! ([`ThinWsBuilder::on_notification`](crate::ThinWsBuilder::on_notification)) is told what
//! happened, after the fact ([`Notification`]): a room became occupied or vacant across
//! every node, an identity joined or left a presence room, a socket ended. It never delays
//! a socket; [`http::Backend::webhook`] sends them to a URL.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use thinws::hooks::{ConnectEvent, ConnectVerdict, SubscribeEvent, Verdict};
//! use thinws::ThinWsLayer;
//! use tower::{service_fn, ServiceBuilder};
//!
//! #[derive(Clone)]
//! struct User(String); // inserted by an auth layer outside ThinWsLayer
//!
//! let layer = ThinWsLayer::builder()
//!     .on_connect(service_fn(|event: ConnectEvent| async move {
//!         Ok::<_, Infallible>(match event.socket().extensions().get::<User>() {
//!             Some(User(name)) => ConnectVerdict::Assign(name.clone()),
//!             None => ConnectVerdict::refuse("log in first"),
//!         })
//!     }))
//!     .on_subscribe(
//!         ServiceBuilder::new()
//!             .timeout(Duration::from_secs(1))
//!             .service_fn(|event: SubscribeEvent| async move {
//!                 Ok::<_, Infallible>(if event.room().starts_with("admin:") {
//!                     Verdict::refuse("admins only")
//!                 } else {
//!                     Verdict::Allow
//!                 })
//!             }),
//!     )
//!     .build();
//! # let _ = layer;
//! ```

use std::fmt;
use std::sync::Arc;

mod error;
mod grant;
#[cfg(feature = "http-hooks")]
pub mod http;
mod notification;

pub use self::error::HookError;
pub use self::grant::{Grant, RefreshEvent, RefreshVerdict};
pub(crate) use self::notification::local_seq_base;
pub use self::notification::{Happened, Notification};

use ::http::request::Parts;
use ::http::Extensions;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

/// The error type hooks are boxed into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The socket an event comes from.
#[derive(Debug, Clone)]
pub struct SocketInfo {
    pub(crate) id: u64,
    pub(crate) connection_id: Arc<str>,
    pub(crate) bound: bool,
    pub(crate) request: Arc<Parts>,
    pub(crate) granted: Arc<Extensions>,
}

impl SocketInfo {
    /// The socket's id, unique on this node.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The socket's identity: the `connectionID` it bound with `connect`, or a
    /// server-generated one until then.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// Whether the client bound an identity with `connect` (until then, the identity is a
    /// server-generated one).
    pub fn has_bound_identity(&self) -> bool {
        self.bound
    }

    /// The head of the upgrade request: method, URI, headers, extensions.
    pub fn request(&self) -> &Parts {
        &self.request
    }

    /// The upgrade request's extensions (where an auth layer puts what it verified).
    pub fn extensions(&self) -> &Extensions {
        &self.request.extensions
    }

    /// The values the `connect` (or latest `refresh`) hook attached with its [`Grant`];
    /// empty until a `connect` succeeded.
    pub fn granted(&self) -> &Extensions {
        &self.granted
    }
}

/// A client sent `connect`.
#[derive(Debug, Clone)]
pub struct ConnectEvent {
    pub(crate) socket: SocketInfo,
    pub(crate) connection_id: String,
    pub(crate) token: Option<String>,
}

impl ConnectEvent {
    /// The socket.
    pub fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    /// The `connectionID` the client claims.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// The `token` the client sent with `connect`, if any (a credential for the hook to
    /// check, e.g. a signed token; a token in the upgrade URL is in
    /// [`SocketInfo::request`]).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// A client sent `subscribe` (or a `connect` is rejoining a recorded room).
#[derive(Debug, Clone)]
pub struct SubscribeEvent {
    pub(crate) socket: SocketInfo,
    pub(crate) room: String,
}

impl SubscribeEvent {
    /// The socket.
    pub fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    /// The room it wants to join.
    pub fn room(&self) -> &str {
        &self.room
    }
}

/// A client sent `unsubscribe`.
#[derive(Debug, Clone)]
pub struct UnsubscribeEvent {
    pub(crate) socket: SocketInfo,
    pub(crate) room: String,
}

impl UnsubscribeEvent {
    /// The socket.
    pub fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    /// The room it wants to leave.
    pub fn room(&self) -> &str {
        &self.room
    }
}

/// A client sent `message`.
#[derive(Debug, Clone)]
pub struct MessageEvent {
    pub(crate) socket: SocketInfo,
    pub(crate) room: String,
    pub(crate) payload: Box<RawValue>,
}

impl MessageEvent {
    /// The socket.
    pub fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    /// The room it publishes to.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The payload, as the client sent it.
    pub fn payload(&self) -> &RawValue {
        &self.payload
    }

    /// The payload deserialized into `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.payload.get())
    }
}

/// Why a socket's `disconnect` hook fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client sent a `disconnect` frame.
    Requested,
    /// The client closed the socket.
    Closed,
    /// The connection failed (a read error, or the client vanished).
    Lost,
    /// Nothing arrived from the client (not even a pong) for the idle timeout.
    TimedOut,
    /// The server closed the socket (shutdown, a slow reader, an oversized frame).
    Server,
}

/// A socket said `disconnect` or ended. Fires exactly once per socket.
#[derive(Debug, Clone)]
pub struct DisconnectEvent {
    pub(crate) socket: SocketInfo,
    pub(crate) reason: DisconnectReason,
}

impl DisconnectEvent {
    /// The socket.
    pub fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    /// Why.
    pub fn reason(&self) -> DisconnectReason {
        self.reason
    }
}

/// What a `connect` hook decided.
#[derive(Debug, Clone)]
pub enum ConnectVerdict {
    /// Bind the socket to the `connectionID` the client claimed.
    Accept,
    /// Bind the socket to this identity instead (e.g. the authenticated user's id).
    Assign(String),
    /// Refuse: the client gets `forbidden` with this reason and stays as it was.
    Refuse(String),
    /// Bind the socket as the [`Grant`] says (its identity, or the claimed one), attach its
    /// values and set its deadline, once the `connect` succeeds.
    Grant(Grant),
}

impl ConnectVerdict {
    /// [`ConnectVerdict::Refuse`] with `reason`.
    pub fn refuse(reason: impl Into<String>) -> Self {
        ConnectVerdict::Refuse(reason.into())
    }
}

/// What a `subscribe` or `unsubscribe` hook decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Refuse: the client gets `forbidden` with this reason, and nothing happens.
    Refuse(String),
}

impl Verdict {
    /// [`Verdict::Refuse`] with `reason`.
    pub fn refuse(reason: impl Into<String>) -> Self {
        Verdict::Refuse(reason.into())
    }
}

/// What a `message` hook decided.
#[derive(Debug, Clone)]
pub enum MessageVerdict {
    /// Publish the payload as sent.
    Allow,
    /// Publish this payload instead.
    Replace(Box<RawValue>),
    /// Refuse: the client gets `forbidden` with this reason, and nothing is published.
    Refuse(String),
}

impl MessageVerdict {
    /// [`MessageVerdict::Refuse`] with `reason`.
    pub fn refuse(reason: impl Into<String>) -> Self {
        MessageVerdict::Refuse(reason.into())
    }

    /// [`MessageVerdict::Replace`] with `payload` serialised to JSON.
    pub fn replace<T: Serialize + ?Sized>(payload: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(payload).map(MessageVerdict::Replace)
    }
}

/// One boxed hook.
pub(crate) type Hook<E, R> = BoxCloneSyncService<E, R, BoxError>;

/// Boxes a user's service as a hook.
pub(crate) fn boxed<S, E, R>(service: S) -> Hook<E, R>
where
    S: Service<E, Response = R> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError> + 'static,
    S::Future: Send + 'static,
    E: 'static,
    R: 'static,
{
    BoxCloneSyncService::new(service.map_err(Into::into))
}

/// Asks `hook`, if one is set, about the event that `event` builds (built only then);
/// `None` when no hook is set.
pub(crate) async fn ask<E, R>(
    hook: Option<&mut Hook<E, R>>,
    event: impl FnOnce() -> E,
) -> Option<Result<R, BoxError>> {
    let hook = hook?;
    Some(async { hook.ready().await?.call(event()).await }.await)
}

/// A socket's own clones of the layer's hooks: nothing but a null pointer when the layer
/// has none, as most sockets' layers have.
#[derive(Default)]
pub(crate) struct SocketHooks(Option<Box<Hooks>>);

impl SocketHooks {
    /// Clones of `hooks` (none kept if none is set).
    pub(crate) fn new(hooks: &Hooks) -> Self {
        SocketHooks((!hooks.is_empty()).then(|| Box::new(hooks.clone())))
    }

    /// Whether no hook is set.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The hook `pick` chooses, if it is set.
    pub(crate) fn get<T>(
        &mut self,
        pick: impl FnOnce(&mut Hooks) -> &mut Option<T>,
    ) -> Option<&mut T> {
        self.0.as_deref_mut().and_then(|hooks| pick(hooks).as_mut())
    }
}

/// The hooks of a layer; each socket takes its own clone.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) connect: Option<Hook<ConnectEvent, ConnectVerdict>>,
    pub(crate) subscribe: Option<Hook<SubscribeEvent, Verdict>>,
    pub(crate) unsubscribe: Option<Hook<UnsubscribeEvent, Verdict>>,
    pub(crate) message: Option<Hook<MessageEvent, MessageVerdict>>,
    pub(crate) disconnect: Option<Hook<DisconnectEvent, ()>>,
    pub(crate) refresh: Option<Hook<RefreshEvent, RefreshVerdict>>,
}

impl Hooks {
    /// Whether no hook is set (then no event is ever built).
    pub(crate) fn is_empty(&self) -> bool {
        self.connect.is_none()
            && self.subscribe.is_none()
            && self.unsubscribe.is_none()
            && self.message.is_none()
            && self.disconnect.is_none()
            && self.refresh.is_none()
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("connect", &self.connect.is_some())
            .field("subscribe", &self.subscribe.is_some())
            .field("unsubscribe", &self.unsubscribe.is_some())
            .field("message", &self.message.is_some())
            .field("disconnect", &self.disconnect.is_some())
            .field("refresh", &self.refresh.is_some())
            .finish()
    }
}
