//! One socket's life: one task that handles the client's frames in order and drains the
//! socket's bounded outbound queue into it, heartbeats, its identity and its rooms.
//!
//! The reader handles one frame at a time: a frame's hooks and broker work (subscribe
//! confirmation, queueing a publish) finish before the next frame is handled, so a socket's
//! publishes reach Redis in the order it sent them; up to 64 publishes may await Redis's
//! answer at once, and their acks go out in frame order. While a frame is being handled the
//! task keeps reading (at most one frame ahead) and writing, so a socket that ends mid-way
//! is cleaned up at once. Everything queued since the last write goes out in one write,
//! framed by thinws (`wire`); tungstenite only reads. Deliveries from the rooms never wait
//! on this socket: when its outbound queue is full, the queue asks it to close with 1013.
//!
//! Heartbeats: the task pings every `ping_interval`, and drops a socket from which nothing
//! (not even a pong) arrived for `idle_timeout`.

mod halves;
mod in_flight;
pub(crate) mod outbound;
pub(crate) mod pending;
mod rate_limit;
mod reader;
mod recovery;
mod refusal;
mod request_head;
mod socket;
mod task;
mod wire;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::Instrument;

use self::outbound::OutboundQueue;
use self::socket::Socket;
use crate::node::Node;
use crate::rooms::{Refused, SocketId};

/// How long a closing socket may take to write its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A socket's slot on the node, taken before the upgrade is answered: every upgrade that
/// gets 101 has one, and one that cannot get a slot is answered 503 instead.
pub(crate) struct Admitted {
    id: SocketId,
    queue: Arc<OutboundQueue>,
}

/// Takes a slot for a new socket, unless the node is shutting down or full.
pub(crate) fn admit(node: &Node) -> Result<Admitted, Refused> {
    let queue = Arc::new(OutboundQueue::new(
        node.config.outbound_queue,
        node.config.max_queued_bytes,
    ));
    let id = node.rooms.register(queue.clone())?;
    Ok(Admitted { id, queue })
}

impl Admitted {
    /// Gives the slot back (the upgrade was not answered 101).
    pub(crate) fn release(self, node: &Node) {
        node.rooms.unregister(self.id);
    }
}

/// Completes the upgrade, then spawns the socket's task, which runs the socket until it
/// closes (giving its slot back).
///
/// The socket's state is built before the future, so that the future does not keep room
/// for the upgrade request's head all the socket's life.
pub(crate) fn serve(
    node: Arc<Node>,
    admitted: Admitted,
    upgrade: OnUpgrade,
    config: WebSocketConfig,
    parts: Parts,
) -> impl std::future::Future<Output = ()> + Send {
    let Admitted { id, queue } = admitted;
    let socket = Box::new(Socket::new(node.clone(), id, queue.clone(), parts));
    async move {
        node.start();
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                node.rooms.unregister(id);
                return;
            }
        };
        let halves = wire::open(upgraded, config, queue.clone()).await;
        // A task of its own, so that the socket's life does not keep room for this one's
        // state (the upgrade and the stream's set-up, and what they captured).
        let run = task::run(node, halves, socket, queue);
        // The span takes room in the socket's task all its life: only when a subscriber
        // takes it (debug logging, or a filter naming the `socket` span).
        let span = tracing::debug_span!("socket", id, identity = tracing::field::Empty);
        if span.is_disabled() {
            tokio::spawn(run);
        } else {
            tokio::spawn(run.instrument(span));
        }
    }
}
