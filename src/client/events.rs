//! What the client hands the application: deliveries, gaps, history, presence, and the
//! callbacks it calls.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// A message delivered to a room the client subscribed to.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Delivery {
    /// The room.
    pub room: String,
    /// The sender's `connectionID` (absent when the server sent none: the original ThinWS
    /// server omits it).
    pub sender: Option<String>,
    /// The payload.
    pub payload: serde_json::Value,
    /// Its offset, in a room with history.
    pub offset: Option<u64>,
    /// Its room's epoch, in a room with history.
    pub epoch: Option<String>,
}

/// Messages of a room may have been missed, and the server could not send them: see
/// [`ClientBuilder::on_gap`](super::ClientBuilder::on_gap). In a history room (the room's history was lost, or no longer
/// reached back) the room goes on from `offset` in `epoch`, and
/// [`ThinWsClient::history`](super::ThinWsClient::history) tells what it still keeps; in any room when the server's node
/// lost its Redis pub/sub connection (no position then): refetch what the application
/// shows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gap {
    /// The room.
    pub room: String,
    /// Where a history room goes on from.
    pub offset: Option<u64>,
    /// Its epoch.
    pub epoch: Option<String>,
}

/// What [`ThinWsClient::history`](super::ThinWsClient::history) returns: one page of a
/// room's history, as deliveries (the server side's [`RoomHistory`](crate::RoomHistory)
/// holds frames).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HistoryPage {
    /// The room's top offset.
    pub offset: u64,
    /// Its epoch.
    pub epoch: String,
    /// The kept messages, oldest first.
    pub messages: Vec<Delivery>,
}

/// The application's gap callback.
#[derive(Clone)]
pub(crate) struct OnGap(pub(crate) Arc<dyn Fn(Gap) + Send + Sync>);

impl fmt::Debug for OnGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnGap")
    }
}

impl Delivery {
    /// The payload deserialized into `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }
}

/// The stream of [`Delivery`]s; ends when the client is closed.
///
/// Read it, or drop it: deliveries and replies come in one order on the connection, so a
/// stream kept but not read holds the client back once 1,024 deliveries wait in it (acks
/// wait behind them, requests time out, and the server closes the socket as a slow reader).
/// Dropped, deliveries are thrown away.
#[derive(Debug)]
pub struct Messages {
    pub(crate) rx: mpsc::Receiver<Delivery>,
}

impl Stream for Messages {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

/// An identity that joined or left a room with join/leave events: see
/// [`ClientBuilder::on_join`](super::ClientBuilder::on_join).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Member {
    /// The room.
    pub room: String,
    /// The identity.
    pub connection_id: String,
}

/// The application's join and leave callbacks.
#[derive(Clone, Default)]
pub(crate) struct OnPresence {
    pub(crate) join: Option<Arc<dyn Fn(Member) + Send + Sync>>,
    pub(crate) leave: Option<Arc<dyn Fn(Member) + Send + Sync>>,
}

impl fmt::Debug for OnPresence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnPresence")
            .field("join", &self.join.is_some())
            .field("leave", &self.leave.is_some())
            .finish()
    }
}
