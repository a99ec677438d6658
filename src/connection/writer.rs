//! The socket's writing side, driven by the socket's own task: it drains the outbound
//! queue into the socket, queues heartbeat pings, and writes the close frame.
//!
//! While the socket runs, [`Writer::write`] is one of the events the socket's task waits
//! for (cancel-safe: a write cut short by another event goes on at the next one). Once
//! the socket ends, [`Writer::drain`] writes what is left and closes.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::outbound::OutboundQueue;
use super::pending::Pending;
use super::wire::{Control, FrameWriter};
use super::CLOSE_TIMEOUT;
use crate::metrics::SocketCounts;

/// Closes the socket's queue when the writing ends, however it ends, so that nothing waits
/// for a writer that is gone.
struct CloseQueueOnDrop<'a>(&'a OutboundQueue);

impl Drop for CloseQueueOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close_queue();
    }
}

/// One socket's writing side.
pub(super) struct Writer {
    sink: FrameWriter,
    queue: Arc<OutboundQueue>,
    control: Arc<Control>,
    /// Frames taken from the queue and not yet written.
    batch: Pending,
    /// The socket's metric handles (`thinws_frames_out_total` is counted here).
    metrics: Arc<SocketCounts>,
    /// A write began and has not finished (it waits for the client, or was cut short by
    /// another event and goes on at the next write).
    writing: bool,
    /// A write failed: nothing more is written.
    failed: bool,
    /// The reply to the client's close frame is handed to the sink: no frame follows it.
    answered_close: bool,
}

impl Writer {
    pub(super) fn new(
        sink: FrameWriter,
        queue: Arc<OutboundQueue>,
        control: Arc<Control>,
        metrics: Arc<SocketCounts>,
    ) -> Self {
        Writer {
            sink,
            queue,
            control,
            batch: Pending::default(),
            metrics,
            writing: false,
            failed: false,
            answered_close: false,
        }
    }

    /// Takes what is queued, unless a write is under way; whether anything waits to be
    /// written. While a write waits for the client, new frames stay in the queue, where
    /// they count toward the socket's bounds.
    pub(super) fn has_work(&mut self) -> bool {
        if self.failed {
            return false;
        }
        if self.writing && self.batch.is_empty() && !self.sink.is_unfinished() {
            // A write cut short after it had handed everything to the socket.
            self.writing = false;
        }
        if !self.writing && !self.answered_close {
            self.queue.take(&mut self.batch);
        }
        !self.batch.is_empty() || self.sink.is_unfinished() || self.control.has_bytes()
    }

    /// Whether a write failed.
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    /// Writes tungstenite's bytes and the frames taken, then flushes. Cancel-safe, and its
    /// future holds nothing but `self` (it is one of the socket task's events, kept in the
    /// task all the socket's life): what a write has begun is in the sink and the batch.
    pub(super) async fn write(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write(cx)).await
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writing = true;
        // Once the client closed first, tungstenite's bytes hold the reply to its close:
        // they go after the frames taken, and nothing goes after them (RFC 6455 §5.5.1).
        let peer_closed = self.control.is_peer_closed();
        if !peer_closed || self.batch.is_empty() {
            let control = self.control.take();
            self.answered_close |= peer_closed && !control.is_empty();
            self.sink.add_control(&control);
        }
        self.metrics.add_counted();
        let mut frames = 0;
        let polled = self.sink.poll_write_texts(cx, &mut self.batch, &mut frames);
        self.metrics.wrote(frames);
        if let Err(e) = std::task::ready!(polled) {
            tracing::debug!(error = %e, "socket write failed");
            self.failed = true;
            return Poll::Ready(Err(e));
        }
        self.writing = false;
        // Keep a small batch's buffer for next time; give a large one back.
        if self.batch.capacity() > 64 {
            self.batch = Pending::default();
        }
        Poll::Ready(Ok(()))
    }

    /// Runs `work` to completion, writing meanwhile: work that waits for room in the queue
    /// (a reply) gets it as the writer drains it.
    pub(super) async fn while_writing<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let queue = self.queue.clone();
        loop {
            let work_to_do = self.has_work();
            tokio::select! {
                biased;
                done = &mut work => return done,
                _ = self.write(), if work_to_do => {}
                () = queue.ready(), if !work_to_do => {}
            }
        }
    }

    /// Queues a ping, written with the next write.
    pub(super) fn ping(&mut self) {
        self.sink.queue_ping();
    }

    /// Writes the close frame for a requested close (what is queued first, unless the
    /// socket is closed as a slow reader), within [`CLOSE_TIMEOUT`]; nothing is written
    /// after it.
    pub(super) async fn close(&mut self, (code, reason): (CloseCode, &'static str)) {
        self.metrics.add_counted();
        let Writer {
            sink,
            queue,
            control,
            batch,
            ..
        } = self;
        let _close_queue = CloseQueueOnDrop(queue);
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

    /// Once the socket's reader has finished: writes everything queued, then the close
    /// frame (a requested one, or a plain one unless the client's close was answered).
    /// Gives up after `within`: a client that takes nothing cannot keep its socket.
    pub(super) async fn drain(&mut self, within: Duration) {
        let drained = tokio::time::timeout(within, self.drain_all()).await;
        if drained.is_err() {
            tracing::debug!(?within, "the client took nothing: socket dropped");
            self.failed = true;
        }
    }

    async fn drain_all(&mut self) {
        let queue = self.queue.clone();
        let _close_queue = CloseQueueOnDrop(&queue);
        let closing = queue.close_requested();
        tokio::pin!(closing);
        loop {
            let finished = match self.answered_close {
                // Nothing follows the reply to the client's close.
                true => true,
                false => queue.take(&mut self.batch),
            };
            if self.has_work() {
                let outcome = tokio::select! {
                    biased;
                    close = &mut closing => Err(close),
                    written = self.write() => Ok(written),
                };
                match outcome {
                    Ok(Ok(())) => continue,
                    // Logged by `write`.
                    Ok(Err(_)) => return,
                    Err(close) => {
                        // A frame cut short would garble the close frame: what the write
                        // had begun goes out first, if the client takes it in time.
                        let finished = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.finish());
                        if let Ok(Ok(())) = finished.await {
                            self.close(close).await;
                        }
                        return;
                    }
                }
            }
            if finished {
                if self.answered_close {
                    return;
                }
                // A close requested just before the reader finished (a protocol error, a
                // flood) keeps its code; otherwise the socket ends with a plain close.
                match queue.close_request() {
                    Some(close) => self.close(close).await,
                    None if self.control.is_peer_closed() => {}
                    None => {
                        let control = self.control.take();
                        let plain = self.sink.close(&control, None);
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, plain).await;
                    }
                }
                return;
            }
            tokio::select! {
                biased;
                close = &mut closing => {
                    self.close(close).await;
                    return;
                }
                () = queue.ready() => {}
            }
        }
    }

    /// The socket's write half, once the writing is over; `None` when a write failed or
    /// the client took nothing.
    pub(super) fn into_sink(self) -> Option<FrameWriter> {
        self.queue.close_queue();
        (!self.failed).then_some(self.sink)
    }
}
