//! What a `connect` or `refresh` hook grants a socket: its identity, values that later
//! events carry (e.g. the rooms a token allows), and when the grant ends.
//!
//! A grant is kept by the socket itself, so it lives and dies with it, and it changes only
//! when the request that carried it succeeds: a refused `connect` or `refresh` leaves the
//! socket's identity, grant and deadline as they were.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::{Duration, SystemTime};
//! use thinws::hooks::{ConnectEvent, ConnectVerdict, Grant, SubscribeEvent, Verdict};
//! use thinws::ThinWsLayer;
//! use tower::service_fn;
//!
//! #[derive(Clone)]
//! struct Rooms(Vec<String>);
//!
//! let layer = ThinWsLayer::builder()
//!     .on_connect(service_fn(|event: ConnectEvent| async move {
//!         // A real hook checks `event.token()` here.
//!         Ok::<_, Infallible>(ConnectVerdict::Grant(
//!             Grant::new()
//!                 .identity("alice")
//!                 .with(Rooms(vec!["chat:lobby".into()]))
//!                 .expires_at(SystemTime::now() + Duration::from_secs(3600)),
//!         ))
//!     }))
//!     .on_subscribe(service_fn(|event: SubscribeEvent| async move {
//!         let rooms = event.socket().granted().get::<Rooms>();
//!         Ok::<_, Infallible>(match rooms {
//!             Some(Rooms(rooms)) if rooms.iter().any(|r| r == event.room()) => Verdict::Allow,
//!             _ => Verdict::refuse("not granted"),
//!         })
//!     }))
//!     .build();
//! # let _ = layer;
//! ```

use std::time::SystemTime;

use http::Extensions;

use super::SocketInfo;

/// What a `connect` or `refresh` hook grants the socket.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Grant {
    pub(crate) identity: Option<String>,
    pub(crate) values: Extensions,
    pub(crate) expires_at: Option<SystemTime>,
    pub(crate) rooms: Vec<String>,
}

impl Grant {
    /// A grant of nothing in particular: the claimed identity, no values, no deadline.
    pub fn new() -> Self {
        Grant::default()
    }

    /// Binds the socket to this identity instead of the one the client claimed (for a
    /// `refresh`, it must be the socket's identity: a socket never changes identity).
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Attaches `value` to the socket: every later event carries it in
    /// [`SocketInfo::granted`] until the socket ends or a `refresh` replaces the grant.
    pub fn with<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.values.insert(value);
        self
    }

    /// At `connect` only: joins the socket to `room` too, besides the identity's recorded
    /// rooms, without asking the `subscribe` hook (this hook decided) and without recording
    /// it for the identity (the hook decides again at the next `connect`). A room that is
    /// empty or too long makes the `connect` fail with `internal`; past the socket's room
    /// limit it fails with `limit_exceeded`. Ignored in a `refresh` verdict.
    pub fn room(mut self, room: impl Into<String>) -> Self {
        self.rooms.push(room.into());
        self
    }

    /// Closes the socket at `at` (1008, "token expired") unless a `refresh` grants a new
    /// deadline first. The client is told how long it has (`expiresIn` in the ack).
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// A client sent `refresh` with a new credential.
#[derive(Debug, Clone)]
pub struct RefreshEvent {
    pub(crate) socket: SocketInfo,
    pub(crate) token: String,
}

impl RefreshEvent {
    /// The socket (its current grant in [`SocketInfo::granted`]).
    pub fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    /// The new credential.
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// What a `refresh` hook decided.
#[derive(Debug, Clone)]
pub enum RefreshVerdict {
    /// Replace the socket's grant (its values and deadline) with this one.
    Grant(Grant),
    /// Refuse: the client gets `forbidden` with this reason, and the socket keeps its
    /// grant and deadline.
    Refuse(String),
}

impl RefreshVerdict {
    /// [`RefreshVerdict::Refuse`] with `reason`.
    pub fn refuse(reason: impl Into<String>) -> Self {
        RefreshVerdict::Refuse(reason.into())
    }
}
