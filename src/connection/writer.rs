//! The writer task: drains one socket's outbound queue into the socket, sends heartbeat
//! pings, and writes the close frame when a close is requested.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use hyper_tungstenite::HyperWebsocketStream;
use metrics::Counter;
use tokio::time::MissedTickBehavior;

use super::outbound::OutboundQueue;
use super::{close_frame, CLOSE_TIMEOUT};

pub(super) type WsSink = SplitSink<HyperWebsocketStream, Message>;

/// Closes the socket's queue when the writer ends, however it ends, so that nothing waits
/// for a writer that is gone.
struct CloseQueueOnDrop<'a>(&'a OutboundQueue);

impl Drop for CloseQueueOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close_queue();
    }
}

/// Everything queued is fed, then flushed once. Ends when the reader has finished and the
/// queue is written, when a write fails, or when a close is requested; gives the sink back,
/// so that the socket can shut down its write half and linger (see `connection::run`).
pub(super) async fn write_loop(
    mut sink: WsSink,
    queue: Arc<OutboundQueue>,
    ping_interval: Duration,
    frames_out: Counter,
) -> WsSink {
    let _close_queue = CloseQueueOnDrop(&queue);
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // One close future for the task's life rather than one per batch: registering it costs
    // a lock and a waker.
    let closing = queue.close_requested();
    tokio::pin!(closing);
    let mut batch = VecDeque::new();
    loop {
        let finished = queue.take(&mut batch);
        if !batch.is_empty() {
            let close = tokio::select! {
                biased;
                close = &mut closing => Some(close),
                written = write_batch(&mut sink, &mut batch) => match written {
                    Ok(frames) => {
                        frames_out.increment(frames);
                        None
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "socket write failed");
                        return sink;
                    }
                },
            };
            if let Some(close) = close {
                send_close(&mut sink, &queue, &mut batch, close).await;
                return sink;
            }
            // Keep a small batch's buffer for next time; give a large one back.
            if batch.capacity() > 64 {
                batch = VecDeque::new();
            }
            continue;
        }
        if finished {
            // A close requested just before the reader finished (a protocol error, a
            // flood) keeps its code; otherwise the socket ends with a plain close.
            match queue.close_request() {
                Some(close) => send_close(&mut sink, &queue, &mut batch, close).await,
                None => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
                }
            }
            return sink;
        }
        tokio::select! {
            biased;
            close = &mut closing => {
                send_close(&mut sink, &queue, &mut batch, close).await;
                return sink;
            }
            () = queue.ready() => {}
            _ = ping.tick() => {
                if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                    tracing::debug!(error = %e, "ping failed");
                    return sink;
                }
            }
        }
    }
}

/// Feeds every frame of `batch` (emptying it), then flushes; returns the frame count.
async fn write_batch(sink: &mut WsSink, batch: &mut VecDeque<Utf8Bytes>) -> Result<u64, WsError> {
    let frames = batch.len() as u64;
    while let Some(frame) = batch.pop_front() {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await?;
    Ok(frames)
}

async fn send_close(
    sink: &mut WsSink,
    queue: &OutboundQueue,
    batch: &mut VecDeque<Utf8Bytes>,
    (code, reason): (CloseCode, &'static str),
) {
    tracing::debug!(code = u16::from(code), reason, "closing socket");
    let close = async {
        // What was queued (the replies to every frame read, deliveries) still goes out
        // first; only a slow reader's backlog, the reason it is closed, is dropped.
        if code != CloseCode::Again {
            queue.take(batch);
            while let Some(frame) = batch.pop_front() {
                sink.feed(Message::Text(frame)).await?;
            }
        }
        queue.close_queue();
        sink.send(Message::Close(Some(close_frame(code, reason))))
            .await
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}
