//! The writer task: drains one socket's outbound queue into the socket, sends heartbeat
//! pings, and writes the close frame when a close is requested.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use metrics::Counter;
use tokio::time::MissedTickBehavior;

use super::outbound::OutboundQueue;
use super::wire::{Control, FrameWriter};
use super::CLOSE_TIMEOUT;

/// Closes the socket's queue when the writer ends, however it ends, so that nothing waits
/// for a writer that is gone.
struct CloseQueueOnDrop<'a>(&'a OutboundQueue);

impl Drop for CloseQueueOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close_queue();
    }
}

/// Everything queued is fed, then flushed once. Ends when the reader has finished and the
/// queue is written, when a write fails, or when a close is requested; gives the writer
/// back, so that the socket can shut down its write half and linger (see `task::run`).
pub(super) async fn write_loop(
    mut sink: FrameWriter,
    queue: Arc<OutboundQueue>,
    control: Arc<Control>,
    ping_interval: Duration,
    frames_out: Counter,
) -> FrameWriter {
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
            let outcome = {
                let write = write_batch(&mut sink, &control, &mut batch);
                tokio::pin!(write);
                tokio::select! {
                    biased;
                    close = &mut closing => Written::Interrupted(close),
                    written = &mut write => Written::Done(written),
                }
            };
            let close = match outcome {
                Written::Done(Ok(frames)) => {
                    frames_out.increment(frames);
                    None
                }
                Written::Done(Err(e)) => {
                    tracing::debug!(error = %e, "socket write failed");
                    return sink;
                }
                Written::Interrupted(close) if !sink.is_unfinished() => Some(close),
                Written::Interrupted(close) => {
                    // A frame cut short would garble the close frame: what the write had
                    // begun goes out first, if the client takes it in time.
                    match tokio::time::timeout(CLOSE_TIMEOUT, sink.finish()).await {
                        Ok(Ok(())) => Some(close),
                        _ => return sink,
                    }
                }
            };
            if let Some(close) = close {
                send_close(&mut sink, &queue, &control, &mut batch, close).await;
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
                Some(close) => send_close(&mut sink, &queue, &control, &mut batch, close).await,
                None => {
                    // After the client's close, tungstenite's reply is in `control`.
                    let close = async {
                        match control.is_peer_closed() {
                            true => sink
                                .write_texts(&control.take(), &mut batch)
                                .await
                                .map(drop),
                            false => sink.close(&control.take(), None).await,
                        }
                    };
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
                }
            }
            return sink;
        }
        tokio::select! {
            biased;
            close = &mut closing => {
                send_close(&mut sink, &queue, &control, &mut batch, close).await;
                return sink;
            }
            () = queue.ready() => {
                // Woken for tungstenite's bytes (a pong), or for frames taken next round.
                let bytes = control.take();
                if !bytes.is_empty() {
                    if let Err(e) = sink.write_texts(&bytes, &mut VecDeque::new()).await {
                        tracing::debug!(error = %e, "socket write failed");
                        return sink;
                    }
                }
            }
            _ = ping.tick() => {
                if let Err(e) = sink.ping(&control.take()).await {
                    tracing::debug!(error = %e, "ping failed");
                    return sink;
                }
            }
        }
    }
}

/// How a write of a batch ended.
enum Written {
    Done(io::Result<u64>),
    /// A close was requested first.
    Interrupted((CloseCode, &'static str)),
}

/// Writes tungstenite's bytes and every frame of `batch` (emptying it), then flushes;
/// returns the frame count.
async fn write_batch(
    sink: &mut FrameWriter,
    control: &Control,
    batch: &mut VecDeque<Utf8Bytes>,
) -> io::Result<u64> {
    sink.write_texts(&control.take(), batch).await
}

async fn send_close(
    sink: &mut FrameWriter,
    queue: &OutboundQueue,
    control: &Control,
    batch: &mut VecDeque<Utf8Bytes>,
    (code, reason): (CloseCode, &'static str),
) {
    tracing::debug!(code = u16::from(code), reason, "closing socket");
    let close = async {
        // What was queued (the replies to every frame read, deliveries) still goes out
        // first; only a slow reader's backlog, the reason it is closed, is dropped.
        if code != CloseCode::Again {
            queue.take(batch);
            sink.write_texts(&control.take(), batch).await?;
        }
        batch.clear();
        queue.close_queue();
        sink.close(&control.take(), Some((code, reason))).await
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}
