//! One socket's life: the reader loop that handles the client's frames in order, the writer
//! task that drains the socket's bounded outbound queue, heartbeats, its identity and its
//! rooms.
//!
//! The reader handles one frame at a time: a frame's hooks and broker work (subscribe
//! confirmation, publish) finish before the reply is queued and before the next frame is
//! handled, so a socket's publishes reach Redis in the order it sent them. While a frame is
//! being handled the reader keeps watching the socket (reading at most one frame ahead), so
//! a socket that ends mid-way is cleaned up at once. The writer feeds everything queued and
//! flushes once per batch. Deliveries from the hub never wait on this socket: when its
//! queue is full, the hub asks it to close with 1013.
//!
//! Heartbeats: the writer pings every `ping_interval`; the reader drops a socket from which
//! nothing (not even a pong) arrived for `idle_timeout`.

mod rate_limit;
mod socket;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::request::Parts;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::CloseFrame;
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use hyper_tungstenite::{HyperWebsocket, HyperWebsocketStream};
use tokio::time::Instant;
use tracing::Instrument;

pub(crate) use self::rate_limit::RateConfig;
use self::socket::Socket;
use crate::hooks::DisconnectReason;
use crate::hub::{Node, Outbox, Refused, SocketControl, SocketId};

/// How long a closing socket may take to write its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Completes the upgrade and runs the socket until it closes.
pub(crate) async fn serve(node: Arc<Node>, upgrade: HyperWebsocket, parts: Parts) {
    let stream = match upgrade.await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            return;
        }
    };
    let control = Arc::new(SocketControl::new(node.config.outbound_queue));
    let id = match node.rooms.register(control.clone()) {
        Ok(id) => id,
        Err(refused) => {
            let close = match refused {
                Refused::ShuttingDown => close_frame(CloseCode::Away, "server shutting down"),
                Refused::Full => close_frame(CloseCode::Again, "server full, try again later"),
            };
            let mut stream = stream;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.close(Some(close))).await;
            return;
        }
    };
    let span = tracing::debug_span!("socket", id, identity = tracing::field::Empty);
    run(node, stream, parts, id, control).instrument(span).await
}

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }
}

/// What a read from the socket means for the loop.
enum Read {
    Frame(Message),
    End(DisconnectReason),
}

fn read_result(read: Option<Result<Message, WsError>>, control: &SocketControl) -> Read {
    match read {
        Some(Ok(Message::Close(_))) | None => Read::End(DisconnectReason::Closed),
        Some(Ok(message)) => Read::Frame(message),
        Some(Err(WsError::Capacity(e))) => {
            tracing::debug!(error = %e, "frame over the size limit");
            control.request_close(CloseCode::Size, "frame too large");
            Read::End(DisconnectReason::Server)
        }
        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
            Read::End(DisconnectReason::Closed)
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "socket read failed");
            Read::End(DisconnectReason::Lost)
        }
    }
}

async fn run(
    node: Arc<Node>,
    stream: HyperWebsocketStream,
    parts: Parts,
    id: SocketId,
    control: Arc<SocketControl>,
) {
    let (sink, mut source) = stream.split();
    let idle_timeout = node.config.idle_timeout;
    let mut socket = Socket::new(
        node,
        id,
        Outbox {
            control: control.clone(),
        },
        parts,
    );
    let writer_future = writer::write_loop(
        sink,
        control.clone(),
        socket.node.config.ping_interval,
        socket.metrics().frames_out.clone(),
    )
    .in_current_span();
    let mut writer = tokio::spawn(writer_future);
    let frames_in = socket.metrics().frames_in.clone();
    tracing::debug!("socket open");

    let mut writer_done = false;
    // Anything received (a pong included) proves the peer alive; one timer is reset lazily.
    let mut last_seen = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // At most one frame read ahead while the previous one is being handled; it is handled
    // next, so frames are still handled one at a time and in order.
    let mut read_ahead: Option<Message> = None;
    let reason = 'socket: loop {
        let message = match read_ahead.take() {
            Some(message) => message,
            None => tokio::select! {
                biased;
                _ = &mut writer, if !writer_done => {
                    writer_done = true;
                    break 'socket DisconnectReason::Server;
                }
                // The broker answered the oldest publish in flight: send its ack.
                () = socket.front_published(), if socket.has_in_flight() => {
                    socket.settle_front().await;
                    continue;
                }
                read = source.next() => {
                    last_seen = Instant::now();
                    match read_result(read, &control) {
                        Read::Frame(message) => message,
                        Read::End(reason) => break 'socket reason,
                    }
                }
                () = &mut idle => {
                    if last_seen.elapsed() >= idle_timeout {
                        break 'socket DisconnectReason::TimedOut;
                    }
                    idle.as_mut().reset(last_seen + idle_timeout);
                    continue;
                }
            },
        };
        match message {
            Message::Text(text) => {
                frames_in.increment(1);
                // Keep watching the socket while the frame is handled (hooks and the broker
                // may take a while): a socket that ends meanwhile stops the handling, and
                // its cleanup undoes whatever the handling had begun.
                // Boxed: the handling future is large (hooks, broker calls), and inline it
                // would stay in every idle socket's task for the socket's whole life.
                let mut handling = Box::pin(socket.on_text(&text));
                loop {
                    tokio::select! {
                        biased;
                        () = &mut handling => break,
                        _ = &mut writer, if !writer_done => {
                            writer_done = true;
                            break 'socket DisconnectReason::Server;
                        }
                        read = source.next(), if read_ahead.is_none() => {
                            last_seen = Instant::now();
                            match read_result(read, &control) {
                                Read::Frame(message) => read_ahead = Some(message),
                                Read::End(reason) => break 'socket reason,
                            }
                        }
                        () = &mut idle => {
                            if last_seen.elapsed() >= idle_timeout {
                                break 'socket DisconnectReason::TimedOut;
                            }
                            idle.as_mut().reset(last_seen + idle_timeout);
                        }
                    }
                }
            }
            Message::Binary(_) => {
                frames_in.increment(1);
                Box::pin(socket.on_binary()).await
            }
            Message::Close(_) => break DisconnectReason::Closed,
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };

    let mut socket = socket.leave_all();
    Box::pin(socket.fire_disconnect(reason)).await;
    let node = socket.node.clone();
    // The socket has left its rooms: the writer drains what is queued, closes the socket
    // and ends.
    drop(socket);
    control.finish();
    if !writer_done {
        if reason == DisconnectReason::TimedOut || reason == DisconnectReason::Lost {
            // Nobody is reading: don't wait for a flush that may never come.
            control.request_close(CloseCode::Away, "idle timeout");
        }
        let _ = writer.await;
    }
    // Only now, so that a node waiting for its sockets to close also waits for the flush.
    node.rooms.unregister(id);
    tracing::debug!(?reason, "socket closed");
}
