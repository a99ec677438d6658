//! The socket's reading side: what a read means ([`Read`]), and the socket while free or
//! while handling one frame ([`Reader`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use hyper_tungstenite::tungstenite::error::ProtocolError;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::{Error as WsError, Message};
use tokio::time::Instant;

use super::outbound::OutboundQueue;
use super::rate_limit::{Rate, RateLimit};
use super::socket::Socket;
use crate::hooks::DisconnectReason;

/// What a read from the socket means for the loop.
pub(super) enum Read {
    /// A frame to handle (text or binary).
    Frame(Message),
    /// A ping (tungstenite answers it itself); it counts toward the rate limit.
    Ping,
    /// A pong or a raw frame.
    Control,
    End(DisconnectReason),
}

/// What `read` (the socket's next item) means; asks for the RFC close its error calls for.
pub(super) fn read_result(read: Option<Result<Message, WsError>>, queue: &OutboundQueue) -> Read {
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

pub(super) type Handling = Pin<Box<dyn Future<Output = Box<Socket>> + Send>>;

/// The reader's state: free, or handling one frame (the handling owns the socket, and
/// gives it back when done or stopped). The socket is boxed so that the socket's task
/// holds one pointer to it rather than room for it in every state.
pub(super) enum Reader {
    Free(Box<Socket>),
    Handling(Handling),
}

/// What the reader's work produced.
pub(super) enum Progress {
    /// A frame was handled (or its handling stopped); the socket is free again.
    Handled(Box<Socket>),
    /// The broker answered the oldest publish in flight: its reply can go out.
    Answered,
}

impl Reader {
    /// Waits for the handling to finish, or, while free, for the broker to answer the
    /// oldest publish in flight (never, while none is). Cancel-safe.
    pub(super) async fn progress(&mut self) -> Progress {
        match self {
            Reader::Handling(handling) => Progress::Handled(handling.await),
            Reader::Free(socket) => {
                socket.oldest_answered().await;
                Progress::Answered
            }
        }
    }

    /// Stops any handling (undone by the socket's cleanup) and returns the socket.
    pub(super) async fn into_socket(self, stop: &Stop) -> Box<Socket> {
        match self {
            Reader::Free(socket) => socket,
            Reader::Handling(handling) => {
                stop.0.store(true, Ordering::Relaxed);
                handling.await
            }
        }
    }
}

/// Tells the frame being handled to stop. The socket's task both sets it and then polls
/// the handling, which looks at it first: a flag is enough, with no waker to register per
/// frame (a `Notify` took its waiter list's lock twice per frame, ~2 % of a node).
#[derive(Debug, Default, Clone)]
pub(super) struct Stop(Arc<AtomicBool>);

/// A frame waiting to be handled, and the rate limit's verdict when it arrived.
pub(super) type Frame = (Message, Rate);

/// The rate limit's verdict on one incoming frame (a ping included).
pub(super) fn check_rate(rate: &mut Option<RateLimit>) -> Rate {
    rate.as_mut()
        .map_or(Rate::Allowed, |rate| rate.check(Instant::now()))
}

/// Handles one frame; stops early, keeping the socket, when `stop` is notified.
///
/// Boxed: the handling future is large (hooks, broker calls), and inline it would stay in
/// every idle socket's task for the socket's whole life.
pub(super) fn handle(mut socket: Box<Socket>, (message, rate): Frame, stop: Stop) -> Handling {
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
        {
            let mut work = std::pin::pin!(work);
            std::future::poll_fn(|cx| match stop.0.load(Ordering::Relaxed) {
                true => Poll::Ready(()),
                false => work.as_mut().poll(cx),
            })
            .await;
        }
        socket
    })
}
