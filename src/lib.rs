//! WebSocket rooms that scale out.
//!
//! `thinws` is a tower [`Layer`](tower_layer::Layer) for any hyper 1 stack (axum, warp,
//! plain hyper). [`ThinWsLayer`] takes over WebSocket upgrade requests and hands each socket
//! to the node's room hub. Clients speak the ThinWS protocol ([`protocol`]): they `connect`
//! with an identity, `subscribe` to rooms and send `message`s to them, and every server
//! node behind a load balancer delivers each message to every subscriber of the room,
//! through Redis pub/sub. Without a Redis URL, one node runs on its own with an in-memory
//! broker.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use thinws::ThinWsLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(ThinWsLayer::new("redis://127.0.0.1:6379"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! What an `ack` guarantees: for `subscribe` and `connect`, the node is subscribed at the
//! broker, so every message published after the ack reaches the socket; for `message`, the
//! broker accepted the publish. Messages from one socket to one room reach every subscriber
//! in the order they were sent.
//!
//! # API conventions
//! - Every public item has one path: the layer, hub, publisher and errors at the root,
//!   the rest in [`settings`], [`hooks`], [`protocol`], [`metrics`] and `client`.
//! - `#[non_exhaustive]`, by one rule: on every public enum thinws hands out (errors,
//!   events, frames, codes, reasons) and on every public struct with public fields, so
//!   that a variant or a field can be added without breaking anyone; such structs that
//!   you fill in have a constructor (`History::new`, `Limits::default`). Enums that you
//!   hand to thinws and it alone reads (the hooks' verdicts, `Presence`) are exhaustive.
//! - Builders, layers, services and futures are `#[must_use]`; setters take
//!   `impl Into<…>` where a value has more than one natural form.
//! - Each operation has its own error type ([`ConnectError`], [`PublishError`],
//!   [`HistoryError`], [`PresenceError`]); [`BrokerError`] says why Redis could not do it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod broker;
#[cfg(feature = "client")]
pub mod client;
mod config;
mod connection;
mod error;
pub mod hooks;
mod hub;
mod idempotent;
mod layer;
pub mod metrics;
mod node;
mod notifier;
mod occupancy;
mod origin;
pub mod protocol;
mod publisher;
mod rooms;
pub mod settings;
#[cfg(feature = "tls")]
mod tls;

pub use error::{
    BrokerError, ConnectError, ErrorSource, HistoryError, PresenceError, PublishError,
};
pub use hub::{Health, Hub, PoolStatus, RoomHistory, RoomPresence};
pub use idempotent::Idempotent;
pub use layer::{ResponseBody, ResponseFuture, ThinWsBuilder, ThinWsLayer, ThinWsService};
pub use publisher::{Publisher, PublisherBuilder};

/// The README's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
