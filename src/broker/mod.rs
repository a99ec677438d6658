//! The fan-out backend: where published frames go and where identities keep their rooms.
//!
//! Two brokers sit behind one interface:
//! - the in-memory broker (single node; the default when no Redis URL is given) delivers a
//!   published frame straight into the local [`RoomHub`](crate::hub) and keeps identities in
//!   process memory;
//! - the Redis broker publishes through a `deadpool-redis` pool, and one subscriber task per
//!   node owns the pub/sub connection: it holds one Redis subscription per room that has
//!   local members (reference-counted), confirms each subscribe before the socket is acked,
//!   forwards every received frame to the hub unchanged, and after a lost connection
//!   reconnects with backoff and resubscribes every room it holds.
//!
//! # Redis layout
//! With the default prefix `thinws:`:
//! - channel `thinws:room:{roomID}`: one per room; each message is a complete delivered
//!   `message` frame (see [`protocol::server::delivery`](crate::protocol::server::delivery)),
//!   forwarded to sockets byte for byte;
//! - set `thinws:identity:{connectionID}`: the rooms that identity subscribed to.
//!
//! No other keys are written.

mod memory;
mod redis;
mod resp;

use std::time::Duration;

use hyper_tungstenite::tungstenite::Utf8Bytes;

pub(crate) use self::memory::MemoryBroker;
pub(crate) use self::redis::{create_pool, publish, RedisBroker};

/// A broker operation that could not be done; nothing was published or changed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unavailable(pub(crate) String);

/// A pending [`Broker::publish`].
#[derive(Debug)]
pub(crate) enum Publish {
    Done(Result<(), Unavailable>),
    Pending(tokio::sync::oneshot::Receiver<Result<(), Unavailable>>),
}

impl Publish {
    /// Waits for the broker's answer. Cancel-safe: awaiting it again after a drop goes on
    /// waiting for the same answer.
    pub(crate) async fn result(&mut self) -> Result<(), Unavailable> {
        if let Publish::Pending(answer) = self {
            let result = answer
                .await
                .unwrap_or_else(|_| Err(Unavailable("publishing lane stopped".into())));
            *self = Publish::Done(result);
        }
        match self {
            Publish::Done(result) => result.clone(),
            Publish::Pending(_) => Err(Unavailable("publish still pending".into())),
        }
    }
}

/// A pending [`Broker::acquire`].
#[derive(Debug)]
pub(crate) enum Acquire {
    Ready,
    Pending(tokio::sync::oneshot::Receiver<Result<(), Unavailable>>),
    Failed(Unavailable),
}

impl Acquire {
    /// Waits until the node is subscribed, or the broker says it cannot be.
    pub(crate) async fn wait(self) -> Result<(), Unavailable> {
        match self {
            Acquire::Ready => Ok(()),
            Acquire::Failed(e) => Err(e),
            Acquire::Pending(answer) => answer
                .await
                .unwrap_or_else(|_| Err(Unavailable("subscriber task stopped".into()))),
        }
    }
}

/// The names of the Redis keys and channels, under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    room_prefix: String,
    identity_prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            room_prefix: format!("{prefix}room:"),
            identity_prefix: format!("{prefix}identity:"),
        }
    }

    pub(crate) fn room_channel(&self, room: &str) -> String {
        let mut s = String::with_capacity(self.room_prefix.len() + room.len());
        s.push_str(&self.room_prefix);
        s.push_str(room);
        s
    }

    pub(crate) fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&*self.room_prefix)
    }

    pub(crate) fn identity_set(&self, identity: &str) -> String {
        format!("{}{identity}", self.identity_prefix)
    }
}

/// What a health probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerHealth {
    pub(crate) publish: Result<(), String>,
    pub(crate) subscriptions: Result<(), String>,
}

/// The node's broker.
#[derive(Debug)]
pub(crate) enum Broker {
    Memory(MemoryBroker),
    Redis(Box<RedisBroker>),
}

impl Broker {
    /// Publishes a delivered frame to every subscriber of `room` on every node. The publish
    /// is queued at once (not when the returned [`Publish`] is awaited); publishes with the
    /// same `lane` (a socket id) reach the broker in the order of these calls. The
    /// [`Publish`] resolves once the broker accepted it.
    pub(crate) fn publish(&self, room: &str, frame: Utf8Bytes, lane: u64) -> Publish {
        match self {
            Broker::Memory(b) => {
                b.publish(room, &frame);
                Publish::Done(Ok(()))
            }
            Broker::Redis(b) => b.publish(room, frame, lane),
        }
    }

    /// Asks that this node receive `room`'s frames. The request is made at once (not when
    /// the returned [`Acquire`] is awaited), and every call must be matched by exactly one
    /// [`Broker::release`], whatever the outcome: that keeps the per-room counts right even
    /// when the waiting socket goes away mid-way. Once the [`Acquire`] resolves to `Ok`,
    /// every frame published afterwards reaches the hub.
    pub(crate) fn acquire(&self, room: &std::sync::Arc<str>) -> Acquire {
        match self {
            Broker::Memory(_) => Acquire::Ready,
            Broker::Redis(b) => b.acquire(room.clone()),
        }
    }

    /// Gives back one `acquire` of `room`.
    pub(crate) fn release(&self, room: &std::sync::Arc<str>) {
        match self {
            Broker::Memory(_) => {}
            Broker::Redis(b) => b.release(room.clone()),
        }
    }

    /// Remembers `room` for `identity`.
    pub(crate) async fn record(&self, identity: &str, room: &str) -> Result<(), Unavailable> {
        match self {
            Broker::Memory(b) => {
                b.record(identity, room);
                Ok(())
            }
            Broker::Redis(b) => b.record(identity, room).await,
        }
    }

    /// Forgets `room` for `identity`.
    pub(crate) async fn forget(&self, identity: &str, room: &str) -> Result<(), Unavailable> {
        match self {
            Broker::Memory(b) => {
                b.forget(identity, room);
                Ok(())
            }
            Broker::Redis(b) => b.forget(identity, room).await,
        }
    }

    /// The rooms recorded for `identity`.
    pub(crate) async fn rooms_of(&self, identity: &str) -> Result<Vec<String>, Unavailable> {
        match self {
            Broker::Memory(b) => Ok(b.rooms_of(identity)),
            Broker::Redis(b) => b.rooms_of(identity).await,
        }
    }

    /// Probes the publish path and the subscriptions.
    pub(crate) async fn health(&self, timeout: Duration) -> BrokerHealth {
        match self {
            Broker::Memory(_) => BrokerHealth {
                publish: Ok(()),
                subscriptions: Ok(()),
            },
            Broker::Redis(b) => b.health(timeout).await,
        }
    }

    /// Waits until the broker can publish and its subscriber is connected, or fails.
    pub(crate) async fn ready(&self, timeout: Duration) -> Result<(), Unavailable> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(b) => b.ready(timeout).await,
        }
    }
}
