//! The fan-out backend: where published frames go and where identities keep their rooms.
//!
//! The broker knows nothing of sockets or of the local rooms: frames it receives for this
//! node go to a [`FrameSink`] (the node's local rooms, wired up in `node`). Two brokers sit
//! behind one interface:
//! - the in-memory broker (single node; the default when no Redis URL is given) hands a
//!   published frame straight to the sink and keeps identities in process memory;
//! - the Redis broker (see `redis`) publishes through publishing lanes that each hold a
//!   connection of a `deadpool-redis` pool, and one subscriber task per node owns the
//!   pub/sub connection, holding one Redis subscription per room with local members.
//!
//! # Redis layout
//! With the default prefix `thinws:` (braces literal: the room is a Cluster hash tag):
//! - channel `thinws:room:{ROOM}` (sharded on a Redis Cluster: `SPUBLISH`/`SSUBSCRIBE`):
//!   one per room; each message is a complete delivered
//!   `message` frame (see [`protocol::server::delivery`](crate::protocol::server::delivery)),
//!   forwarded to sockets byte for byte;
//! - set `thinws:identity:{connectionID}`: the rooms that identity subscribed to; it
//!   expires after the identity TTL (24 h by default) without a socket of the identity;
//! - for rooms with history, hash `thinws:meta:{ROOM}` and list `thinws:frames:{ROOM}`
//!   (see `redis::history`);
//! - for rooms with presence, hashes `thinws:presence:{ROOM}` and
//!   `thinws:presence-node:{ROOM}:NODE`, sorted set `thinws:presence-nodes:{ROOM}` and,
//!   with a notification hook, string `thinws:presence-seq:{ROOM}` (see
//!   `redis::presence`); the channel also carries the room's `join` and `leave` frames;
//! - with a notification hook, the occupancy keys (see `redis::occupancy` and
//!   docs/PROTOCOL.md).
//!
//! No other keys are written.

mod idempotency;
mod keys;
mod memory;
pub(crate) mod presence;
pub(crate) mod redis;

use std::sync::Arc;
use std::time::Duration;

use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::oneshot;

pub(crate) use self::keys::Keys;
pub(crate) use self::memory::MemoryBroker;
use self::presence::Members;
pub(crate) use self::redis::RedisBroker;
use crate::error::BrokerError;
use crate::settings::{History, Presence, RoomSettings};

/// Where the broker hands the frames published to rooms this node receives.
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// Delivers `frame` to this node's members of `room`, without waiting.
    fn deliver(&self, room: &str, frame: &Utf8Bytes);
    /// Delivers a run of frames of `room`, in order, as [`FrameSink::deliver`] one by one
    /// would; every member shares the run.
    fn deliver_run(&self, room: &str, run: &std::sync::Arc<[Utf8Bytes]>) {
        for frame in run.iter() {
            self.deliver(room, frame);
        }
    }
}

/// A [`FrameSink`] shared by the broker's tasks.
pub(crate) type SharedSink = Arc<dyn FrameSink>;

/// Where a message sits in its room's history: its offset (1 for the room's first) in one
/// incarnation of the history, named by the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) offset: u64,
    pub(crate) epoch: Arc<str>,
}

/// What a room's history holds for a client that has it up to some offset.
#[derive(Debug, Clone)]
pub(crate) struct Recovery {
    /// Where the history stands.
    pub(crate) top: Position,
    /// The oldest offset still kept (`top + 1` when none is).
    pub(crate) oldest: u64,
    /// The kept frames after the client's offset, in order: all of them, or none when they
    /// cannot all be recovered or do not fit in the read's budget (`fits` says which).
    pub(crate) frames: Vec<Utf8Bytes>,
    /// Whether the frames missed fit in the read's byte budget.
    pub(crate) fits: bool,
}

impl Recovery {
    /// Whether a client at `since` in `epoch` can get every message it missed from here:
    /// same epoch, and no more than `size` (the room's history size) missed, all still kept.
    /// (Redis trims a history approximately and may keep a few more; the size is the
    /// promise, on every broker.)
    pub(crate) fn recovers(&self, since: u64, epoch: &str, size: usize) -> bool {
        self.fits
            && recoverable(
                self.top.offset,
                &self.top.epoch,
                self.oldest,
                since,
                epoch,
                size,
            )
    }
}

/// [`Recovery::recovers`], from where the history stands (`top`, `top_epoch`, its `oldest`
/// kept offset): the rule the Redis recovery script applies too, before reading anything.
pub(crate) fn recoverable(
    top: u64,
    top_epoch: &str,
    oldest: u64,
    since: u64,
    epoch: &str,
    size: usize,
) -> bool {
    top_epoch == epoch
        && since <= top
        && top - since <= size as u64
        && (since == top || oldest <= since + 1)
}

/// Which messages of a room's history a read asks for: the last `limit` before offset
/// `before` (if given), the newest of them that fit in `budget` bytes (if given; at least
/// one).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Page {
    pub(crate) limit: usize,
    pub(crate) before: Option<u64>,
    pub(crate) budget: Option<usize>,
}

/// A page of a room's history: where the history stands, the frames (oldest first), and
/// whether older ones asked for were left out to keep within the budget.
pub(crate) type HistoryPage = (Position, Vec<Utf8Bytes>, bool);

/// A publish the broker accepted: where the message sits, in a room with history, and
/// whether it was a duplicate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub(crate) position: Option<Position>,
    /// The publish carried an idempotency key recorded within its window: the message went
    /// out before (at `position`, in a room with history) and was not published again.
    pub(crate) duplicate: bool,
}

/// The broker's answer to a publish.
pub(crate) type Published = Result<Accepted, BrokerError>;

/// An idempotency key on a publish: with the room and the publisher's identity, it names
/// one message for `window` after its first publish (protocol 1.2).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Once<'a> {
    pub(crate) identity: &'a str,
    /// The identity is the server's (`Hub`, `Publisher`, the HTTP API): its keys never
    /// match a client's, whatever identity a client claims.
    pub(crate) server: bool,
    pub(crate) key: &'a str,
    pub(crate) window: std::time::Duration,
}

impl<'a> Once<'a> {
    /// The idempotency key of a publish by `identity` (the server's when `server`) to a room
    /// with `settings`: `None` without a key, and in a room whose window is zero.
    pub(crate) fn in_room(
        settings: &RoomSettings,
        identity: &'a str,
        server: bool,
        key: Option<&'a str>,
    ) -> Option<Self> {
        key.zip(settings.idempotency()).map(|(key, window)| Once {
            identity,
            server,
            key,
            window,
        })
    }
}

/// A fresh epoch: random, so that a history recreated after a loss never reuses one.
pub(crate) fn new_epoch() -> Arc<str> {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let seed = (std::time::SystemTime::now(), std::process::id(), n);
    format!("{:016x}", RandomState::new().hash_one(seed)).into()
}

/// A pending [`Broker::publish`].
#[derive(Debug)]
pub(crate) enum Publish {
    Done(Published),
    Pending(oneshot::Receiver<Published>),
}

impl Publish {
    /// Waits for the broker's answer. Cancel-safe: awaiting it again after a drop goes on
    /// waiting for the same answer.
    pub(crate) async fn result(&mut self) -> Published {
        let result = match self {
            Publish::Done(result) => return result.clone(),
            Publish::Pending(answer) => answer
                .await
                .unwrap_or(Err(BrokerError::Stopped("publishing lane"))),
        };
        *self = Publish::Done(result.clone());
        result
    }

    /// The broker's answer if it came; `None` while it has not.
    pub(crate) fn try_result(&mut self) -> Option<Published> {
        let result = match self {
            Publish::Done(result) => return Some(result.clone()),
            Publish::Pending(answer) => match answer.try_recv() {
                Ok(result) => result,
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => {
                    Err(BrokerError::Stopped("publishing lane"))
                }
            },
        };
        *self = Publish::Done(result.clone());
        Some(result)
    }
}

/// A pending [`Broker::acquire`] or [`Broker::presence_join`]: the broker's word that it
/// is done.
#[derive(Debug)]
pub(crate) enum Confirmation {
    Done(Result<(), BrokerError>),
    /// Answered by the named task.
    Pending(oneshot::Receiver<Result<(), BrokerError>>, &'static str),
}

impl Confirmation {
    /// Waits until the broker is done, or says it cannot be.
    pub(crate) async fn wait(self) -> Result<(), BrokerError> {
        match self {
            Confirmation::Done(result) => result,
            Confirmation::Pending(answer, task) => {
                answer.await.unwrap_or(Err(BrokerError::Stopped(task)))
            }
        }
    }
}

/// What a health probe of every Redis path found.
#[derive(Debug, Clone)]
pub(crate) struct BrokerHealth {
    /// The publishing lanes' connections.
    pub(crate) publish: Result<(), BrokerError>,
    /// The pub/sub connection.
    pub(crate) subscriptions: Result<(), BrokerError>,
    /// The pool (identities, and the lanes' next connections).
    pub(crate) pool: Result<(), BrokerError>,
}

impl BrokerHealth {
    fn all(result: Result<(), BrokerError>) -> Self {
        BrokerHealth {
            publish: result.clone(),
            subscriptions: result.clone(),
            pool: result,
        }
    }
}

/// The node's broker.
#[derive(Debug)]
pub(crate) enum Broker {
    Memory(Box<MemoryBroker>),
    Redis(Box<RedisBroker>),
}

impl Broker {
    /// Publishes a delivered frame to every subscriber of `room` on every node. The publish
    /// is queued at once (not when the returned [`Publish`] is awaited); publishes with the
    /// same `lane` (a socket id) reach the broker in the order of these calls. The
    /// [`Publish`] resolves once the broker accepted it. In a room with `history`, one
    /// atomic step takes the next offset, keeps the frame and publishes it with its
    /// `offset` and `epoch`, and the [`Publish`] resolves to the message's position. With
    /// `once`, the check of its key, the publish and the key's record are one atomic step:
    /// a key recorded within its window publishes nothing and answers as a duplicate.
    pub(crate) fn publish(
        &self,
        room: &str,
        frame: String,
        lane: u64,
        history: Option<History>,
        once: Option<Once<'_>>,
    ) -> Publish {
        match self {
            Broker::Memory(b) => Publish::Done(Ok(b.publish(room, frame, history, once))),
            Broker::Redis(b) => b.publish(room, frame, lane, history, once),
        }
    }

    /// Where `room`'s history stands (creating its epoch if it has none yet).
    pub(crate) async fn top(&self, room: &str, history: History) -> Result<Position, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.top(room, history)),
            Broker::Redis(b) => b.history().top(room, history).await,
        }
    }

    /// A page of `room`'s history (see [`Page`]), and where it stands.
    pub(crate) async fn history(
        &self,
        room: &str,
        history: History,
        page: Page,
    ) -> Result<HistoryPage, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.history(room, history, page)),
            Broker::Redis(b) => b.history().last(room, history, page).await,
        }
    }

    /// Where `room`'s history stands, what it still keeps, and its frames after `since` in
    /// `epoch`: read only when they can all be recovered and fit in `budget` bytes, if
    /// given (else none are).
    pub(crate) async fn recover(
        &self,
        room: &str,
        history: History,
        (since, epoch): (u64, &str),
        budget: Option<usize>,
    ) -> Result<Recovery, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.recover(room, history, (since, epoch), budget)),
            Broker::Redis(b) => {
                b.history()
                    .recover(room, history, (since, epoch), budget, true)
                    .await
            }
        }
    }

    /// Asks that this node receive `room`'s frames. The request is made at once (not when
    /// the returned [`Confirmation`] is awaited), and every call must be matched by exactly one
    /// [`Broker::release`], whatever the outcome: that keeps the per-room counts right even
    /// when the waiting socket goes away mid-way. Once the [`Confirmation`] resolves to `Ok`,
    /// every frame published afterwards reaches the sink.
    pub(crate) fn acquire(&self, room: &Arc<str>) -> Confirmation {
        match self {
            Broker::Memory(_) => Confirmation::Done(Ok(())),
            Broker::Redis(b) => b.acquire(room.clone()),
        }
    }

    /// Gives back one `acquire` of `room`.
    pub(crate) fn release(&self, room: &Arc<str>) {
        if let Broker::Redis(b) = self {
            b.release(room.clone());
        }
    }

    /// One more socket of `identity` in `room` (a room with `presence` on); confirmed once
    /// every node can see it, after the `join` event if it was the identity's first socket
    /// there. Every call must be matched by one [`Broker::presence_leave`].
    pub(crate) fn presence_join(
        &self,
        room: &Arc<str>,
        identity: &Arc<str>,
        presence: Presence,
    ) -> Confirmation {
        match self {
            Broker::Memory(b) => {
                b.presence().join(room, identity, presence);
                Confirmation::Done(Ok(()))
            }
            Broker::Redis(b) => b.presence().join(room, identity, presence),
        }
    }

    /// One socket of `identity` fewer in `room`. The change is queued at once; the
    /// confirmation may be dropped.
    pub(crate) fn presence_leave(
        &self,
        room: &Arc<str>,
        identity: &Arc<str>,
        presence: Presence,
    ) -> Confirmation {
        match self {
            Broker::Memory(b) => {
                b.presence().leave(room, identity, presence);
                Confirmation::Done(Ok(()))
            }
            Broker::Redis(b) => b.presence().leave(room, identity, presence),
        }
    }

    /// Waits until every presence change queued so far has reached the broker.
    pub(crate) async fn presence_flush(&self) -> Result<(), BrokerError> {
        match self {
            Broker::Redis(b) => b.presence().flush().wait().await,
            _ => Ok(()),
        }
    }

    /// Who is in `room` on every node, listing at most `max`.
    pub(crate) async fn presence(
        &self,
        room: &str,
        presence: Presence,
        max: usize,
    ) -> Result<Members, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.presence().members(room, max)),
            Broker::Redis(b) => b.presence().members(room, presence, max).await,
        }
    }

    /// Remembers `room` for `identity` unless the identity already has `max` rooms (one
    /// atomic step); returns whether the room is recorded.
    pub(crate) async fn record(
        &self,
        identity: &str,
        room: &str,
        max: usize,
    ) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.record(identity, room, max)),
            Broker::Redis(b) => b.identities().record(identity, room, max).await,
        }
    }

    /// Whether [`Broker::record`] would record `room` for `identity` now (it is recorded,
    /// or the identity holds fewer than `max` rooms); changes nothing. A subscribe asks
    /// first, so that a full identity is refused before its socket joins the room.
    pub(crate) async fn fits(
        &self,
        identity: &str,
        room: &str,
        max: usize,
    ) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.fits(identity, room, max)),
            Broker::Redis(b) => b.identities().fits(identity, room, max).await,
        }
    }

    /// Forgets `room` for `identity`.
    pub(crate) async fn forget(&self, identity: &str, room: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.forget(identity, room);
                Ok(())
            }
            Broker::Redis(b) => b.identities().forget(identity, room).await,
        }
    }

    /// The rooms recorded for `identity`.
    pub(crate) async fn rooms_of(&self, identity: &str) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.rooms_of(identity)),
            Broker::Redis(b) => b.identities().rooms_of(identity).await,
        }
    }

    /// A socket bound `identity`: its record does not expire while any socket holds it.
    pub(crate) fn hold(&self, identity: &Arc<str>) {
        match self {
            Broker::Memory(b) => b.hold(identity),
            Broker::Redis(b) => b.hold(identity),
        }
    }

    /// A socket bound to `identity` went away; the record's time to live runs from the
    /// last one.
    pub(crate) fn unhold(&self, identity: &Arc<str>) {
        match self {
            Broker::Memory(b) => b.unhold(identity),
            Broker::Redis(b) => b.identities().unhold(identity),
        }
    }

    /// Probes every path a publish and a delivery take, each within `timeout`.
    pub(crate) async fn health(&self, timeout: Duration) -> BrokerHealth {
        match self {
            Broker::Memory(_) => BrokerHealth::all(Ok(())),
            Broker::Redis(b) => b.health(timeout).await,
        }
    }
}
