//! The writer task: drains one socket's outbound queue into the socket, sends heartbeat
//! pings, and writes the close frame when a close is requested.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use hyper_tungstenite::HyperWebsocketStream;
use metrics::Counter;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::{close_frame, CLOSE_TIMEOUT};
use crate::hub::SocketControl;

type WsSink = SplitSink<HyperWebsocketStream, Message>;

/// Everything queued is fed, then flushed once. Ends when the queue closes, a write fails,
/// or a close is requested.
pub(super) async fn write_loop(
    mut sink: WsSink,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    control: Arc<SocketControl>,
    ping_interval: Duration,
    frames_out: Counter,
) {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // One close future for the task's life (registering a fresh one per batch showed up in
    // profiles).
    let closing = control.close_requested();
    tokio::pin!(closing);
    loop {
        let first = tokio::select! {
            biased;
            close = &mut closing => return send_close(sink, rx, &control, close).await,
            frame = rx.recv() => match frame {
                Some(frame) => frame,
                None => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
                    return;
                }
            },
            _ = ping.tick() => {
                if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                    tracing::debug!(error = %e, "ping failed");
                    return;
                }
                continue;
            }
        };
        let close = tokio::select! {
            biased;
            close = &mut closing => Some(close),
            written = write_batch(&mut sink, &mut rx, &control, first) => match written {
                Ok(frames) => {
                    frames_out.increment(frames);
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "socket write failed");
                    return;
                }
            },
        };
        if let Some(close) = close {
            return send_close(sink, rx, &control, close).await;
        }
    }
}

/// Writes `first` and everything queued behind it, then flushes; returns the frame count.
async fn write_batch(
    sink: &mut WsSink,
    rx: &mut mpsc::Receiver<Utf8Bytes>,
    control: &SocketControl,
    first: Utf8Bytes,
) -> Result<u64, WsError> {
    control.remove_queued(first.len());
    sink.feed(Message::Text(first)).await?;
    let mut frames = 1;
    while let Ok(frame) = rx.try_recv() {
        control.remove_queued(frame.len());
        sink.feed(Message::Text(frame)).await?;
        frames += 1;
    }
    sink.flush().await?;
    Ok(frames)
}

async fn send_close(
    mut sink: WsSink,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    control: &SocketControl,
    (code, reason): (CloseCode, &'static str),
) {
    tracing::debug!(code = u16::from(code), reason, "closing socket");
    let close = async {
        // Going away is graceful: what was queued still goes out first. A slow reader's
        // backlog is dropped.
        if code == CloseCode::Away {
            while let Ok(frame) = rx.try_recv() {
                control.remove_queued(frame.len());
                sink.feed(Message::Text(frame)).await?;
            }
        }
        rx.close();
        sink.send(Message::Close(Some(close_frame(code, reason))))
            .await
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}
