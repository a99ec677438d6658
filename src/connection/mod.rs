//! One socket's life: the reader loop that handles the client's frames in order, the writer
//! task that drains the socket's bounded outbound queue, heartbeats, its identity and its
//! rooms.
//!
//! The reader handles one frame at a time: a frame's hooks and broker work (subscribe
//! confirmation, queueing a publish) finish before the next frame is handled, so a socket's
//! publishes reach Redis in the order it sent them; up to 64 publishes may await Redis's
//! answer at once, and their acks go out in frame order. While a frame is being handled the
//! reader keeps watching the socket (reading at most one frame ahead), so a socket that
//! ends mid-way is cleaned up at once. The writer feeds everything queued and flushes once
//! per batch. Deliveries from the rooms never wait on this socket: when its outbound queue
//! is full, the queue asks it to close with 1013.
//!
//! Heartbeats: the writer pings every `ping_interval`; the reader drops a socket from which
//! nothing (not even a pong) arrived for `idle_timeout`.

mod in_flight;
pub(crate) mod outbound;
mod rate_limit;
mod recovery;
mod refusal;
mod request_head;
mod socket;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use http::request::Parts;
use hyper_tungstenite::tungstenite::error::ProtocolError;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::CloseFrame;
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use hyper_tungstenite::{HyperWebsocket, HyperWebsocketStream};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use self::outbound::OutboundQueue;
use self::rate_limit::{Rate, RateLimit};
use self::socket::Socket;
use crate::hooks::DisconnectReason;
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

/// Completes the upgrade and runs the socket until it closes (giving its slot back).
pub(crate) async fn serve(
    node: Arc<Node>,
    admitted: Admitted,
    upgrade: HyperWebsocket,
    parts: Parts,
) {
    let Admitted { id, queue } = admitted;
    node.start();
    let stream = match upgrade.await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            node.rooms.unregister(id);
            return;
        }
    };
    let span = tracing::debug_span!("socket", id, identity = tracing::field::Empty);
    run(node, stream, parts, id, queue).instrument(span).await
}

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }
}

/// What a read from the socket means for the loop.
enum Read {
    /// A frame to handle (text or binary).
    Frame(Message),
    /// A ping (tungstenite answers it itself); it counts toward the rate limit.
    Ping,
    /// A pong or a raw frame.
    Control,
    End(DisconnectReason),
}

fn read_result(read: Option<Result<Message, WsError>>, queue: &OutboundQueue) -> Read {
    match read {
        Some(Ok(Message::Close(_))) | None => Read::End(DisconnectReason::Closed),
        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => Read::Frame(message),
        Some(Ok(Message::Ping(_))) => Read::Ping,
        Some(Ok(Message::Pong(_) | Message::Frame(_))) => Read::Control,
        Some(Err(WsError::Capacity(e))) => {
            tracing::debug!(error = %e, "frame over the size limit");
            queue.request_close(CloseCode::Size, "frame too large");
            Read::End(DisconnectReason::Server)
        }
        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
            Read::End(DisconnectReason::Closed)
        }
        // RFC 6455 §7.4.1: 1007 for text that is not UTF-8, 1002 for any other violation
        // (unmasked frames, reserved bits or opcodes, oversized control frames).
        Some(Err(WsError::Utf8(e))) => {
            tracing::debug!(error = %e, "invalid UTF-8 from the client");
            queue.request_close(CloseCode::Invalid, "text frame is not UTF-8");
            Read::End(DisconnectReason::Server)
        }
        Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
            Read::End(DisconnectReason::Lost)
        }
        Some(Err(WsError::Protocol(e))) => {
            tracing::debug!(error = %e, "WebSocket protocol error from the client");
            queue.request_close(CloseCode::Protocol, "WebSocket protocol error");
            Read::End(DisconnectReason::Server)
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "socket read failed");
            Read::End(DisconnectReason::Lost)
        }
    }
}

type Handling = Pin<Box<dyn Future<Output = Box<Socket>> + Send>>;

/// The reader's state: free, or handling one frame (the handling owns the socket, and
/// gives it back when done or stopped). The socket is boxed so that the socket's task
/// holds one pointer to it rather than room for it in every state.
enum Reader {
    Free(Box<Socket>),
    Handling(Handling),
}

/// What the reader's work produced.
enum Progress {
    /// A frame was handled (or its handling stopped); the socket is free again.
    Handled(Box<Socket>),
    /// The broker answered the oldest publish in flight: its reply can go out.
    Answered,
}

impl Reader {
    /// Starts handling `frame` if the socket is free; otherwise gives it back.
    fn start(self, frame: Frame, stop: &Arc<Notify>) -> (Reader, Option<Frame>) {
        match self {
            Reader::Free(socket) => (Reader::Handling(handle(socket, frame, stop.clone())), None),
            busy => (busy, Some(frame)),
        }
    }

    /// Waits for the handling to finish, or, while free, for the broker to answer the
    /// oldest publish in flight (never, while none is). Cancel-safe.
    async fn progress(&mut self) -> Progress {
        match self {
            Reader::Handling(handling) => Progress::Handled(handling.await),
            Reader::Free(socket) => {
                socket.oldest_answered().await;
                Progress::Answered
            }
        }
    }

    /// Stops any handling (undone by the socket's cleanup) and returns the socket.
    async fn into_socket(self, stop: &Notify) -> Box<Socket> {
        match self {
            Reader::Free(socket) => socket,
            Reader::Handling(handling) => {
                stop.notify_one();
                handling.await
            }
        }
    }
}

/// A frame waiting to be handled, and the rate limit's verdict when it arrived.
type Frame = (Message, Rate);

/// The rate limit's verdict on one incoming frame (a ping included).
fn check_rate(rate: &mut Option<RateLimit>) -> Rate {
    rate.as_mut()
        .map_or(Rate::Allowed, |rate| rate.check(Instant::now()))
}

/// Handles one frame; stops early, keeping the socket, when `stop` is notified.
///
/// Boxed: the handling future is large (hooks, broker calls), and inline it would stay in
/// every idle socket's task for the socket's whole life.
fn handle(mut socket: Box<Socket>, (message, rate): Frame, stop: Arc<Notify>) -> Handling {
    Box::pin(async move {
        let work = async {
            let allowed = rate == Rate::Allowed;
            match &message {
                Message::Text(text) => socket.on_text(text, allowed).await,
                _ => socket.on_binary(allowed).await,
            }
            if rate == Rate::Flood {
                // After this frame's reply: every frame read got its reply.
                tracing::debug!("flood: closing the socket");
                socket.close(CloseCode::Policy, "too many frames");
            }
        };
        tokio::select! {
            biased;
            () = stop.notified() => {}
            () = work => {}
        }
        socket
    })
}

/// The monotonic instant of a wall-clock deadline (now, if it has passed; a century ahead
/// at most).
fn instant_of(at: SystemTime) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    Instant::now() + left.min(CENTURY)
}

/// RFC 6455 §7.1.1: once the close frame is out, shut the write half down and read (and
/// drop) what the client still sends until it closes too, for at most [`CLOSE_TIMEOUT`].
/// Closing with unread data in the kernel's buffer would reset the connection, and the
/// client could lose the close frame and the replies before it.
async fn linger(sink: writer::WsSink, source: SplitStream<HyperWebsocketStream>) {
    let Ok(mut stream) = sink.reunite(source) else {
        return;
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = stream.get_mut().shutdown().await;
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

async fn run(
    node: Arc<Node>,
    stream: HyperWebsocketStream,
    parts: Parts,
    id: SocketId,
    queue: Arc<OutboundQueue>,
) {
    let (sink, mut source) = stream.split();
    let idle_timeout = node.config.idle_timeout;
    let ping_interval = node.config.ping_interval;
    let mut rate = RateLimit::new(node.config.rate, Instant::now());
    let socket = Box::new(Socket::new(node, id, queue.clone(), parts));
    let frames_in = socket.metrics().frames_in.clone();
    let writer_future = writer::write_loop(
        sink,
        queue.clone(),
        ping_interval,
        socket.metrics().frames_out.clone(),
    )
    .in_current_span();
    let mut writer = tokio::spawn(writer_future);
    tracing::debug!("socket open");

    let mut writer_done = false;
    let mut sink = None;
    // Anything received (a pong included) proves the peer alive; one timer is reset lazily.
    let mut last_seen = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // Armed when the node requires a `connect` within a grace period.
    let connect_within = socket.node.config.connect_within;
    let unbound = tokio::time::sleep(connect_within.unwrap_or(Duration::MAX / 4));
    tokio::pin!(unbound);
    // A deadline waits for the frame being handled (perhaps the `connect` or `refresh` that
    // meets it), but no longer than this past the deadline.
    const DEADLINE_GRACE: Duration = Duration::from_secs(5);
    let unbound_at = connect_within.map(|within| Instant::now() + within);
    let mut bind_checked = connect_within.is_none();
    // Armed while the socket's grant has a deadline (a token's `exp`).
    let expiry = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(expiry);
    let mut expires_at: Option<SystemTime> = None;
    let mut expired = false;
    let stop = Arc::new(Notify::new());
    let mut reader = Reader::Free(socket);
    // At most one frame read ahead while another is being handled; it is handled next, so
    // frames are still handled one at a time and in order.
    let mut ahead: Option<Frame> = None;
    let mut flooded = false;
    let reason = loop {
        if let Some(message) = ahead.take() {
            (reader, ahead) = reader.start(message, &stop);
        }
        tokio::select! {
            biased;
            written = &mut writer, if !writer_done => {
                writer_done = true;
                sink = written.ok();
                break DisconnectReason::Server;
            }
            progress = reader.progress() => match progress {
                Progress::Handled(socket) => {
                    if socket.expires_at() != expires_at {
                        expires_at = socket.expires_at();
                        if let Some(at) = expires_at {
                            expiry.as_mut().reset(instant_of(at));
                        }
                    }
                    reader = Reader::Free(socket);
                }
                Progress::Answered => {
                    if let Reader::Free(socket) = &mut reader {
                        socket.settle_oldest().await;
                    }
                }
            },
            read = source.next(), if ahead.is_none() && !flooded => {
                last_seen = Instant::now();
                match read_result(read, &queue) {
                    Read::Frame(message) => {
                        frames_in.increment(1);
                        let verdict = check_rate(&mut rate);
                        // Nothing more is read after a flood: the socket closes once this
                        // frame is answered.
                        flooded = verdict == Rate::Flood;
                        ahead = Some((message, verdict));
                    }
                    Read::Ping => {
                        if check_rate(&mut rate) == Rate::Flood {
                            tracing::debug!("ping flood: closing the socket");
                            flooded = true;
                            queue.request_close(CloseCode::Policy, "too many frames");
                        }
                    }
                    Read::Control => {}
                    Read::End(reason) => break reason,
                }
            }
            () = &mut unbound, if !bind_checked => match &reader {
                Reader::Free(socket) if socket.is_bound() => bind_checked = true,
                // A frame (perhaps the `connect`) is being handled: look again shortly.
                Reader::Handling(_)
                    if unbound_at.is_some_and(|at| Instant::now() < at + DEADLINE_GRACE) =>
                {
                    unbound.as_mut().reset(Instant::now() + Duration::from_millis(100));
                }
                _ => {
                    tracing::debug!("no identity bound in time: closing the socket");
                    queue.request_close(CloseCode::Policy, "connect first");
                    bind_checked = true;
                }
            },
            () = &mut expiry, if expires_at.is_some() && !expired => match &reader {
                // Perhaps a `refresh`: look again once it is handled.
                Reader::Handling(_)
                    if expires_at.is_some_and(|at| Instant::now() < instant_of(at) + DEADLINE_GRACE) =>
                {
                    expiry.as_mut().reset(Instant::now() + Duration::from_millis(100));
                }
                _ => {
                    tracing::debug!("the socket's grant expired: closing the socket");
                    queue.request_close(CloseCode::Policy, "token expired");
                    expired = true;
                }
            },
            () = &mut idle => {
                if last_seen.elapsed() >= idle_timeout {
                    break DisconnectReason::TimedOut;
                }
                idle.as_mut().reset(last_seen + idle_timeout);
            }
        }
    };

    // Whatever was being handled stops here; leaving the rooms undoes what it had begun.
    let mut socket = reader.into_socket(&stop).await;
    socket.leave_all();
    Box::pin(socket.fire_disconnect(reason)).await;
    socket.release_identity();
    let node = socket.node.clone();
    drop(socket);
    // The socket has left its rooms: the writer drains what is queued, closes the socket
    // and ends.
    queue.finish();
    if !writer_done {
        if reason == DisconnectReason::TimedOut || reason == DisconnectReason::Lost {
            // Nobody is reading: don't wait for a flush that may never come.
            queue.request_close(CloseCode::Away, "idle timeout");
        }
        sink = writer.await.ok();
    }
    let gone = matches!(reason, DisconnectReason::Lost | DisconnectReason::TimedOut);
    if let (Some(sink), false) = (sink, gone) {
        linger(sink, source).await;
    }
    // Only now, so that a node waiting for its sockets to close also waits for the flush.
    node.rooms.unregister(id);
    tracing::debug!(?reason, "socket closed");
}
