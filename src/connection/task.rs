//! The socket's task: its state between events ([`SocketTask`]), one method per event,
//! and the loop that waits for the next event and hands it to that method.
//!
//! One task per socket does both the reading and the writing. Events, in the order the
//! loop prefers them: a close was requested; a write of what is queued finished (first only
//! once it is due, see [`EVENTS_BEFORE_WRITING`]); the frame being handled finished (or,
//! while none is, the broker answered the oldest publish in flight); a read from the
//! socket; a write finished (otherwise); frames were queued; the socket's one timer fired
//! (heartbeat ping, `connect` grace period, grant expiry, idle timeout).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, StreamExt};
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio::time::Instant;

use super::outbound::OutboundQueue;
use super::rate_limit::{Rate, RateLimit};
use super::reader::{check_rate, handle, read_result, Frame, Progress, Read, Reader, Stop};
use super::socket::Socket;
use super::wire::{Control, FrameWriter, WsStream};
use super::writer::Writer;
use super::CLOSE_TIMEOUT;
use crate::config::Config;
use crate::hooks::DisconnectReason;
use crate::metrics::SocketCounts;
use crate::node::Node;

/// A deadline waits for the frame being handled (perhaps the `connect` or `refresh` that
/// meets it), but no longer than this past the deadline.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// How soon a deadline looks again while a frame is being handled.
const RECHECK: Duration = Duration::from_millis(100);

/// At most this many events are handled while frames wait to be written.
const EVENTS_BEFORE_WRITING: u32 = 32;

/// A deadline that is never meant to come (until moved): a century.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// What one socket's task keeps between events. Its deadlines share one timer (see
/// [`SocketTask::next_deadline`]): each `tokio::time::Sleep` would stay in the socket's task
/// all its life.
struct SocketTask {
    /// The socket, free or handling a frame.
    reader: Reader,
    /// At most one frame read ahead while another is being handled; it is handled next, so
    /// frames are still handled one at a time and in order.
    ahead: Option<Frame>,
    /// A flood was seen: nothing more is read, and the socket closes once the last frame
    /// read is answered.
    flooded: bool,
    /// The close the server asked for, once it did: made at once, except a shutdown's
    /// (1001), which waits until every frame read is answered; nothing more is read
    /// meanwhile.
    closing: Option<(CloseCode, &'static str)>,
    rate: Option<RateLimit>,
    /// Stops the frame being handled when the socket ends.
    stop: Stop,
    queue: Arc<OutboundQueue>,
    /// Told when the client's close frame is read (tungstenite answers it).
    control: Arc<Control>,
    /// The socket's metric handles (`thinws_frames_in_total` is counted here).
    metrics: Arc<SocketCounts>,
    /// The layer's settings (idle timeout, ping interval).
    config: Arc<Config>,
    /// Anything received (a pong included) proves the peer alive; the idle timer is reset
    /// lazily from it.
    last_seen: Instant,
    /// When the `connect` grace period ends, if the node requires one.
    unbound_at: Option<Instant>,
    /// The socket was bound in time, or closed for not being (or no `connect` is required).
    bind_checked: bool,
    /// The socket's grant's deadline (a token's `exp`), if it has one.
    expires_at: Option<SystemTime>,
    /// Closed for an expired grant.
    expired: bool,
    /// When to look at the idle timeout, the `connect` grace period and the grant's
    /// deadline next, and when the next heartbeat ping is due.
    idle_check: Instant,
    unbound_check: Instant,
    expiry_check: Instant,
    ping_at: Instant,
}

impl SocketTask {
    fn new(
        node: &Node,
        socket: Box<Socket>,
        queue: Arc<OutboundQueue>,
        control: Arc<Control>,
    ) -> Self {
        let config = &node.config;
        let now = Instant::now();
        SocketTask {
            metrics: socket.metrics().clone(),
            config: config.clone(),
            reader: Reader::Free(socket),
            ahead: None,
            flooded: false,
            closing: None,
            rate: RateLimit::new(config.rate, now),
            stop: Stop::default(),
            queue,
            control,
            last_seen: now,
            unbound_at: config.connect_within.map(|within| now + within),
            bind_checked: config.connect_within.is_none(),
            expires_at: None,
            expired: false,
            idle_check: now + config.idle_timeout,
            unbound_check: now + config.connect_within.unwrap_or(FAR),
            expiry_check: now + FAR,
            ping_at: now + config.ping_interval,
        }
    }

    /// Starts handling the frame read ahead, if there is one and the socket is free.
    fn start_ahead(&mut self) {
        if !matches!(self.reader, Reader::Free(_)) {
            return;
        }
        let Some(frame) = self.ahead.take() else {
            return;
        };
        // A stand-in for the two lines the socket is out (a zero-sized future: no
        // allocation).
        let stand_in = Reader::Handling(Box::pin(std::future::pending()));
        if let Reader::Free(socket) = std::mem::replace(&mut self.reader, stand_in) {
            self.reader = Reader::Handling(handle(socket, frame, self.stop.clone()));
        }
    }

    /// Whether the loop reads from the socket: not while a frame waits, nor after a flood.
    fn reads(&self) -> bool {
        self.ahead.is_none() && !self.flooded && self.closing.is_none()
    }

    /// Whether a frame read has no reply yet: one read ahead, one being handled, or a
    /// publish the broker has not answered.
    fn unanswered(&self) -> bool {
        self.ahead.is_some()
            || match &self.reader {
                Reader::Handling(_) => true,
                Reader::Free(socket) => socket.has_in_flight(),
            }
    }

    /// The frame being handled finished, or the oldest publish in flight was answered (its
    /// reply may wait for room in the queue: the writer goes on meanwhile).
    async fn on_progress(&mut self, progress: Progress, writer: &mut Writer) {
        match progress {
            Progress::Handled(socket) => {
                if socket.expires_at() != self.expires_at {
                    self.expires_at = socket.expires_at();
                    if let Some(at) = self.expires_at {
                        self.expiry_check = instant_of(at);
                    }
                }
                self.reader = Reader::Free(socket);
            }
            Progress::Answered => {
                let Reader::Free(socket) = &mut self.reader else {
                    return;
                };
                // Most often the queue has room for the reply at once.
                let full = socket
                    .oldest_reply()
                    .and_then(|reply| self.queue.push_now(Utf8Bytes::from(reply)));
                if let Some(reply) = full {
                    // Boxed: inline, its state would stay in the socket's task all its life.
                    let idle_timeout = self.config.idle_timeout;
                    Box::pin(wait_for_room(writer, &self.queue, reply, idle_timeout)).await;
                }
            }
        }
    }

    /// A read from the socket; the reason the socket ends, if it does.
    fn on_read(&mut self, read: Option<Result<Message, WsError>>) -> Option<DisconnectReason> {
        self.last_seen = Instant::now();
        if let Some(Ok(Message::Close(_))) = &read {
            self.control.peer_closed();
        }
        match read_result(read, &self.queue) {
            Read::Frame(message) => {
                self.metrics.frame_in();
                let verdict = check_rate(&mut self.rate);
                // Nothing more is read after a flood: the socket closes once this frame is
                // answered.
                self.flooded = verdict == Rate::Flood;
                self.ahead = Some((message, verdict));
            }
            Read::Ping => {
                if check_rate(&mut self.rate) == Rate::Flood {
                    tracing::debug!("ping flood: closing the socket");
                    self.flooded = true;
                    self.queue
                        .request_close(CloseCode::Policy, "too many frames");
                }
            }
            Read::Control => {}
            Read::End(reason) => return Some(reason),
        }
        None
    }

    /// Whether the `connect` grace period is still watched.
    fn watches_binding(&self) -> bool {
        !self.bind_checked
    }

    /// The `connect` grace period ran out.
    fn on_unbound(&mut self) {
        match &self.reader {
            Reader::Free(socket) if socket.is_bound() => self.bind_checked = true,
            // A frame (perhaps the `connect`) is being handled: look again shortly.
            Reader::Handling(_)
                if self
                    .unbound_at
                    .is_some_and(|at| Instant::now() < at + DEADLINE_GRACE) =>
            {
                self.unbound_check = Instant::now() + RECHECK;
            }
            _ => {
                tracing::debug!("no identity bound in time: closing the socket");
                self.queue.request_close(CloseCode::Policy, "connect first");
                self.bind_checked = true;
            }
        }
    }

    /// Whether the grant's deadline is watched.
    fn watches_expiry(&self) -> bool {
        self.expires_at.is_some() && !self.expired
    }

    /// The socket's grant expired.
    fn on_expiry(&mut self) {
        match &self.reader {
            // Perhaps a `refresh`: look again once it is handled.
            Reader::Handling(_)
                if self
                    .expires_at
                    .is_some_and(|at| Instant::now() < instant_of(at) + DEADLINE_GRACE) =>
            {
                self.expiry_check = Instant::now() + RECHECK;
            }
            _ => {
                tracing::debug!("the socket's grant expired: closing the socket");
                self.queue.request_close(CloseCode::Policy, "token expired");
                self.expired = true;
            }
        }
    }

    /// The idle check is due; the socket ends if nothing arrived for the idle timeout.
    fn on_idle(&mut self) -> Option<DisconnectReason> {
        if self.last_seen.elapsed() >= self.config.idle_timeout {
            return Some(DisconnectReason::TimedOut);
        }
        self.idle_check = self.last_seen + self.config.idle_timeout;
        None
    }

    /// The earliest of the deadlines watched.
    fn next_deadline(&self) -> Instant {
        let mut next = self.idle_check.min(self.ping_at);
        if self.watches_binding() {
            next = next.min(self.unbound_check);
        }
        if self.watches_expiry() {
            next = next.min(self.expiry_check);
        }
        next
    }

    /// The timer fired: every deadline that is due is handled; the reason the socket ends,
    /// if it does.
    fn on_timer(&mut self, writer: &mut Writer) -> Option<DisconnectReason> {
        let now = Instant::now();
        if self.ping_at <= now {
            writer.ping();
            self.ping_at = now + self.config.ping_interval;
        }
        if self.watches_binding() && self.unbound_check <= now {
            self.on_unbound();
        }
        if self.watches_expiry() && self.expiry_check <= now {
            self.on_expiry();
        }
        match self.idle_check <= now {
            true => self.on_idle(),
            false => None,
        }
    }

    /// The socket ends: whatever was being handled stops, and leaving the rooms undoes
    /// what it had begun; the disconnect hook runs and the identity is given back.
    async fn end(self, reason: DisconnectReason) {
        let mut socket = self.reader.into_socket(&self.stop).await;
        socket.leave_all();
        Box::pin(socket.fire_disconnect(reason)).await;
        socket.release_identity();
    }
}

/// Runs the socket until it ends, then closes it and gives its slot back.
pub(super) async fn run(
    node: Arc<Node>,
    (mut source, sink, control): (WsStream, FrameWriter, Arc<Control>),
    socket: Box<Socket>,
    queue: Arc<OutboundQueue>,
) {
    let id = socket.id();
    let metrics = socket.metrics().clone();
    let mut writer = Writer::new(sink, queue.clone(), control.clone(), metrics);
    let mut task = SocketTask::new(&node, socket, queue.clone(), control);
    tracing::debug!("socket open");

    let (reason, written_off) = events(&mut task, &mut writer, &mut source, &queue).await;
    if task.control.is_peer_closed() {
        // tungstenite hands over its reply to the client's close when it is next polled
        // (its read writes what is pending first); once is enough, and the read that
        // follows may wait, so it is not awaited.
        let _ = source.next().now_or_never();
    }

    // The socket leaves its rooms while the writer writes what is queued; then it closes
    // the socket.
    // Boxed, like the drain: the socket's task keeps room for its largest state all its life.
    let end = Box::pin(async {
        task.end(reason).await;
        queue.finish();
    });
    if !written_off {
        if reason == DisconnectReason::TimedOut || reason == DisconnectReason::Lost {
            // Nobody is reading: don't wait for a flush that may never come.
            queue.request_close(CloseCode::Away, "idle timeout");
        }
        // Boxed: the socket's task keeps room for its largest state all its life.
        let drain = Box::pin(writer.drain(node.config.idle_timeout));
        tokio::join!(end, drain);
    } else {
        end.await;
    }
    let sink = writer.into_sink();
    let gone = matches!(reason, DisconnectReason::Lost | DisconnectReason::TimedOut);
    if let (Some(sink), false) = (sink, gone) {
        linger(sink, source).await;
    }
    // Only now, so that a node waiting for its sockets to close also waits for the flush.
    node.rooms.unregister(id);
    tracing::debug!(?reason, "socket closed");
}

/// Hands each event to its method until the socket ends; returns why, and whether the
/// writing is over (the close frame written, or a write failed). A function of its own so
/// that its timers are not kept in the socket's task while the socket closes.
async fn events(
    task: &mut SocketTask,
    writer: &mut Writer,
    source: &mut WsStream,
    queue: &OutboundQueue,
) -> (DisconnectReason, bool) {
    let timer = tokio::time::sleep_until(task.next_deadline());
    tokio::pin!(timer);
    // One close future for the socket's life rather than one per turn: registering it
    // costs a lock and a waker.
    let closing = queue.close_requested();
    tokio::pin!(closing);
    // Reads and replies come first, so that what they queue goes out in one write with
    // the rest; the write comes first once nothing else was ready, or after
    // `EVENTS_BEFORE_WRITING` events, so that a client that floods still gets its replies.
    let mut write_first = false;
    let mut events = 0;
    loop {
        if writer.failed() {
            break (DisconnectReason::Server, true);
        }
        // A shutdown's close waits for the frames read to be answered (a publish in flight
        // its ack, within the broker's timeout), as before any close the server starts.
        let now = |(code, _): &(CloseCode, _)| *code != CloseCode::Away || !task.unanswered();
        if let Some(close) = task.closing.filter(now) {
            // Boxed: inline, its state would stay in the socket's task all its life.
            Box::pin(writer.close(close)).await;
            break (DisconnectReason::Server, true);
        }
        task.start_ahead();
        let next = task.next_deadline();
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
        let work = writer.has_work();
        write_first |= work && events >= EVENTS_BEFORE_WRITING;
        events += 1;
        tokio::select! {
            biased;
            close = &mut closing, if task.closing.is_none() => task.closing = Some(close),
            written = writer.write(), if work && write_first => {
                if written.is_err() {
                    break (DisconnectReason::Server, true);
                }
                (write_first, events) = (false, 0);
            }
            progress = task.reader.progress() => {
                task.on_progress(progress, writer).await;
            }
            read = source.next(), if task.reads() => {
                if let Some(reason) = task.on_read(read) {
                    break (reason, false);
                }
            }
            () = std::future::ready(()), if work && !write_first => write_first = true,
            () = queue.ready(), if !work => {}
            () = &mut timer => {
                if let Some(reason) = task.on_timer(writer) {
                    break (reason, false);
                }
            }
        }
    }
}

/// Queues `reply` (its bytes counted in already) once the queue has room, writing
/// meanwhile. A client that takes nothing for `within` while its reply waits is a slow
/// reader: the reply is dropped and the socket asked to close with 1013, so that a client
/// that stops reading cannot keep its socket (the socket's other events wait meanwhile).
async fn wait_for_room(
    writer: &mut Writer,
    queue: &OutboundQueue,
    reply: Utf8Bytes,
    within: Duration,
) {
    let len = reply.len();
    let queued = writer.while_writing(queue.push_counted(reply));
    if tokio::time::timeout(within, queued).await.is_err() {
        queue.unreserve(len);
        queue.slow_reader();
    }
}

/// The monotonic instant of a wall-clock deadline (now, if it has passed; a century ahead
/// at most).
fn instant_of(at: SystemTime) -> Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    Instant::now() + left.min(FAR)
}

/// RFC 6455 §7.1.1: once the close frame is out, shut the write half down and read (and
/// drop) what the client still sends until it closes too, for at most [`CLOSE_TIMEOUT`].
/// Closing with unread data in the kernel's buffer would reset the connection, and the
/// client could lose the close frame and the replies before it.
async fn linger(mut sink: FrameWriter, mut source: WsStream) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = sink.shutdown().await;
        while let Some(Ok(_)) = source.next().await {}
    })
    .await;
}
