//! One socket's outbound queue: the frames waiting for the socket's writer, bounded in frames
//! and in bytes, and the socket's close request.
//!
//! Deliveries from the rooms never wait here: [`OutboundQueue::offer`] takes a frame or,
//! when the queue is over either bound, asks the socket to close with 1013 (slow reader) and
//! takes nothing more from then on. The socket's own replies count toward the same bytes
//! ([`OutboundQueue::push`]): a reply that would exceed them closes the socket with 1013
//! too. Catch-up frames wait for the queue to drain to half its bytes
//! ([`OutboundQueue::push_draining`]).
//!
//! The queue is a [`Pending`] (a `VecDeque`) under a mutex rather than a tokio channel: a
//! channel allocates its first block of 32 slots (1 KiB) up front, for every socket, idle or
//! not; an empty `VecDeque` allocates nothing, and the writer takes the whole queue in one
//! swap. A run of one room's frames is queued as one shared entry.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::Notify;

use super::pending::Pending;
use crate::rooms::Member;

/// The outbound queue and close request of one socket, shared by its reader, its writer and
/// the rooms it is in.
#[derive(Debug)]
pub(crate) struct OutboundQueue {
    close: Mutex<Option<(CloseCode, &'static str)>>,
    /// Set with the first close request: from then on the socket gets no more frames, so a
    /// dropped slow reader never sees a gap followed by later frames.
    closing: AtomicBool,
    close_requested: Notify,
    /// Bytes counted toward the bound: queued, reserved to be queued, and held.
    queued_bytes: AtomicUsize,
    /// Of those, the bytes of live frames held while rooms recover: they leave only once
    /// the catch-up is queued, so the catch-up does not wait for them.
    held_bytes: AtomicUsize,
    queue: Mutex<Queue>,
    /// Most frames the queue holds.
    max_frames: usize,
    /// Most bytes the queue holds before the socket is dropped as a slow reader.
    max_bytes: usize,
    /// Wakes the writer: frames were queued, or the queue was finished.
    ready: Notify,
    /// Wakes replies waiting for free space in the queue (or for it to close).
    space: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    frames: Pending,
    /// The socket's reader is done: the writer sends what is queued, then closes.
    finished: bool,
    /// The writer has stopped: frames are refused.
    closed: bool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// The queue holds its most frames.
    Full,
    /// The socket is ending: nobody will write the frame.
    Closed,
}

impl OutboundQueue {
    /// A queue that holds at most `max_frames` frames and `max_bytes` bytes.
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> Self {
        OutboundQueue {
            close: Mutex::default(),
            closing: AtomicBool::new(false),
            close_requested: Notify::new(),
            queued_bytes: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            queue: Mutex::default(),
            max_frames: max_frames.max(1),
            max_bytes,
            ready: Notify::new(),
            space: Notify::new(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `frame` unless the queue holds its most frames or is closed. Bytes are
    /// counted by the callers.
    fn try_push(&self, frame: &Utf8Bytes) -> Result<(), Rejected> {
        let mut queue = self.queue();
        if queue.closed || queue.finished {
            return Err(Rejected::Closed);
        }
        if queue.frames.len() >= self.max_frames {
            return Err(Rejected::Full);
        }
        queue.frames.push(frame.clone());
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// Offers a delivered frame without waiting; returns whether it was queued. Over either
    /// bound, the socket is asked to close with 1013 (once) and gets nothing more.
    pub(crate) fn offer(&self, frame: &Utf8Bytes) -> bool {
        self.reserve(frame.len()) && self.offer_reserved(frame)
    }

    /// Offers a run of delivered frames of one room, in order, as [`OutboundQueue::offer`]
    /// would one by one (the frames up to the first that does not fit are queued, and the
    /// socket is dropped as a slow reader from there), with one count of their bytes, one
    /// lock, one wake-up of the writer and one shared entry in the queue for the whole run.
    pub(crate) fn offer_run(&self, run: &Arc<[Utf8Bytes]>) {
        let frames = &run[..];
        if let [frame] = frames {
            self.offer(frame);
            return;
        }
        let bytes: usize = frames.iter().map(|frame| frame.len()).sum();
        if self.is_closing() {
            return;
        }
        if self.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max_bytes {
            // Over the bound somewhere in the run: find where, one frame at a time.
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            for frame in frames {
                if !self.offer(frame) {
                    break;
                }
            }
            return;
        }
        let mut queue = self.queue();
        let (taken, full) = if queue.closed || queue.finished {
            (0, false)
        } else {
            let taken = self
                .max_frames
                .saturating_sub(queue.frames.len())
                .min(frames.len());
            queue.frames.push_run(run, taken);
            (taken, taken < frames.len())
        };
        drop(queue);
        if taken > 0 {
            self.ready.notify_one();
        }
        if taken < frames.len() {
            self.unreserve(frames[taken..].iter().map(|frame| frame.len()).sum());
            if full {
                self.slow_reader();
            }
        }
    }

    /// Counts `len` bytes toward the socket's byte bound: bytes about to be queued, or held
    /// for the socket elsewhere (live frames held while a room recovers). `false`, and the
    /// socket asked to close with 1013, when they do not fit.
    pub(crate) fn reserve(&self, len: usize) -> bool {
        !self.is_closing() && self.count(len)
    }

    /// Adds `len` bytes to the count, unless that would pass the bound: then the socket is
    /// dropped as a slow reader and `false` returned.
    fn count(&self, len: usize) -> bool {
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.slow_reader();
            return false;
        }
        true
    }

    /// Gives back `len` reserved bytes that will not be queued (a catch-up waiting for
    /// room is told).
    pub(crate) fn unreserve(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        self.space.notify_waiters();
    }

    /// [Reserves](Self::reserve) `len` bytes for a live frame held while a room recovers.
    /// Held bytes are counted as held before they are counted in, and out after (see
    /// [`Self::unhold`]), so that a catch-up reading both never overestimates what it waits
    /// for.
    pub(crate) fn hold(&self, len: usize) -> bool {
        self.held_bytes.fetch_add(len, Ordering::SeqCst);
        if !self.reserve(len) {
            self.held_bytes.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        // A catch-up that read the counts in between looks again.
        self.space.notify_waiters();
        true
    }

    /// `len` held bytes are held no more: still reserved, to be queued or given back (give
    /// them back first).
    pub(crate) fn unhold(&self, len: usize) {
        self.held_bytes.fetch_sub(len, Ordering::SeqCst);
        self.space.notify_waiters();
    }

    /// Offers a frame whose bytes are [reserved](Self::reserve) already: queued, or its bytes
    /// given back.
    pub(crate) fn offer_reserved(&self, frame: &Utf8Bytes) -> bool {
        match self.try_push(frame) {
            Ok(()) => true,
            Err(rejected) => {
                self.unreserve(frame.len());
                if rejected == Rejected::Full {
                    self.slow_reader();
                }
                // Closed: the socket is ending; its cleanup removes it from its rooms.
                false
            }
        }
    }

    /// Drops the socket as a slow reader: counted, and closed with 1013 (once).
    pub(crate) fn slow_reader(&self) {
        if !self.is_closing() {
            crate::metrics::slow_reader_dropped();
            self.request_close(CloseCode::Again, "outbound queue full");
        }
    }

    /// Queues one of the socket's own replies, waiting for space if the queue holds its
    /// most frames; `Err` when the socket is ending. Replies count toward the byte bound
    /// like deliveries: one that would exceed it closes the socket with 1013 (a socket that
    /// asks for more than it reads is a slow reader), and is not queued.
    pub(crate) async fn push(&self, frame: Utf8Bytes) -> Result<(), Rejected> {
        // Not `reserve`: a reply still goes out once a close is requested (every frame read
        // gets its reply before the close frame).
        if !self.count(frame.len()) {
            return Err(Rejected::Closed);
        }
        self.push_counted(frame).await
    }

    /// Queues a catch-up frame (what a socket missed, sent after its ack) once the queue is
    /// under half its byte bound and the frame fits, so that catch-up goes out as the
    /// socket drains and leaves room for live deliveries; `Err` when the socket is ending.
    /// Held live frames wait for the catch-up, so it does not wait for them to drain: only
    /// for the rest. Should a frame not fit beside the held ones with nothing else queued,
    /// it closes the socket with 1013, as any frame past the bound.
    pub(crate) async fn push_draining(&self, frame: Utf8Bytes) -> Result<(), Rejected> {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if self.is_closing() || self.queue().closed {
                return Err(Rejected::Closed);
            }
            let held = self.held_bytes.load(Ordering::SeqCst);
            let queued = self.queued_bytes.load(Ordering::SeqCst);
            let draining = queued.saturating_sub(held);
            let counted = queued + frame.len();
            if draining <= self.max_bytes / 2 && counted <= self.max_bytes {
                // Counted in only if nothing was counted meanwhile (a live frame of
                // another room): otherwise look again.
                let swapped = self.queued_bytes.compare_exchange(
                    queued,
                    counted,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                if swapped.is_ok() {
                    return self.push_counted(frame).await;
                }
                continue;
            }
            if draining == 0 {
                // It cannot fit beside the held frames however long it waits.
                break;
            }
            space.await;
        }
        self.push(frame).await
    }

    /// [`OutboundQueue::push`] without waiting: `Some(frame)` back when the queue holds its
    /// most frames (its bytes are counted in: queue it with [`OutboundQueue::push_counted`]);
    /// `None` when it was queued, or dropped because the socket is ending.
    pub(crate) fn push_now(&self, frame: Utf8Bytes) -> Option<Utf8Bytes> {
        if !self.count(frame.len()) {
            return None;
        }
        match self.try_push(&frame) {
            Ok(()) => None,
            Err(Rejected::Full) => Some(frame),
            Err(Rejected::Closed) => {
                self.unreserve(frame.len());
                None
            }
        }
    }

    /// [`OutboundQueue::push`] of a frame whose bytes are counted in already.
    pub(crate) async fn push_counted(&self, frame: Utf8Bytes) -> Result<(), Rejected> {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            // Registered before the check, so a wake-up between the two is not lost.
            space.as_mut().enable();
            match self.try_push(&frame) {
                Ok(()) => return Ok(()),
                Err(Rejected::Full) => space.await,
                Err(Rejected::Closed) => {
                    self.unreserve(frame.len());
                    return Err(Rejected::Closed);
                }
            }
        }
    }

    /// The most bytes the queue holds.
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Moves every queued frame to the back of `batch` and counts their bytes out; returns
    /// whether the reader has finished.
    pub(crate) fn take(&self, batch: &mut Pending) -> bool {
        let mut queue = self.queue();
        let finished = queue.finished;
        let (taken, bytes) = if batch.is_empty() {
            std::mem::swap(&mut queue.frames, batch);
            drop(queue);
            (batch.len(), batch.bytes())
        } else {
            // Moved over, so that the queue keeps its buffer for the next frames.
            let taken = (queue.frames.len(), queue.frames.bytes());
            batch.append(&mut queue.frames);
            taken
        };
        if bytes > 0 {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        if taken > 0 {
            self.space.notify_waiters();
        }
        finished
    }

    /// Wakes the writer (bytes of its own to write).
    pub(crate) fn wake_writer(&self) {
        self.ready.notify_one();
    }

    /// Waits until frames are queued or the reader has finished (it may wake spuriously).
    pub(crate) async fn ready(&self) {
        self.ready.notified().await
    }

    /// The socket's reader is done: no frame is taken any more, and the writer sends what
    /// is queued, then closes the socket.
    pub(crate) fn finish(&self) {
        self.queue().finished = true;
        self.ready.notify_one();
    }

    /// The writer has stopped: what is queued is dropped, and nothing more is taken.
    pub(crate) fn close_queue(&self) {
        self.queue().closed = true;
        // Taken out (and counted out) like a batch, then dropped.
        self.take(&mut Pending::default());
        self.space.notify_waiters();
    }

    /// Bytes waiting in the queue.
    pub(crate) fn queued(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Whether a close was requested.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Asks the socket's writer to send a close frame with `code` and stop. The first
    /// request wins.
    pub(crate) fn request_close(&self, code: CloseCode, reason: &'static str) {
        let mut close = self.close.lock().unwrap_or_else(PoisonError::into_inner);
        if close.is_none() {
            *close = Some((code, reason));
            self.closing.store(true, Ordering::Release);
            self.close_requested.notify_one();
            // Catch-up waiting for the queue to drain stops waiting.
            self.space.notify_waiters();
        }
    }

    /// The close requested so far, if any.
    pub(crate) fn close_request(&self) -> Option<(CloseCode, &'static str)> {
        *self.close.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a close request.
    pub(crate) async fn close_requested(&self) -> (CloseCode, &'static str) {
        loop {
            if let Some(close) = self.close_request() {
                return close;
            }
            self.close_requested.notified().await;
        }
    }

    /// Takes what is queued (tests).
    #[cfg(test)]
    pub(crate) fn drain(&self) -> Vec<Utf8Bytes> {
        let mut batch = Pending::default();
        self.take(&mut batch);
        batch.iter().cloned().collect()
    }
}

impl Member for OutboundQueue {
    fn offer(&self, frame: &Utf8Bytes) -> bool {
        OutboundQueue::offer(self, frame)
    }

    fn offer_run(&self, run: &Arc<[Utf8Bytes]>) {
        OutboundQueue::offer_run(self, run)
    }

    fn queued_bytes(&self) -> usize {
        self.queued()
    }

    fn close(&self, code: CloseCode, reason: &'static str) {
        self.request_close(code, reason)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn frame(text: &str) -> Utf8Bytes {
        Utf8Bytes::from(text.to_owned())
    }

    #[tokio::test]
    async fn a_full_queue_asks_its_socket_to_close() {
        let queue = OutboundQueue::new(1, usize::MAX);
        assert!(queue.offer(&frame("a")));
        assert!(!queue.offer(&frame("b")));
        assert_eq!(queue.close_requested().await.0, CloseCode::Again);
        assert_eq!(queue.drain(), ["a"]);
    }

    #[tokio::test]
    async fn a_queue_over_its_byte_bound_asks_its_socket_to_close() {
        let queue = OutboundQueue::new(100, 250);
        let big = frame(&"x".repeat(100));
        assert!(queue.offer(&big));
        assert!(queue.offer(&big));
        assert_eq!(queue.queued(), 200);
        assert!(!queue.offer(&big), "a third frame would exceed 250 bytes");
        assert_eq!(queue.close_requested().await.0, CloseCode::Again);
        assert_eq!(queue.queued(), 200);
        assert_eq!(queue.drain().len(), 2);
        assert_eq!(queue.queued(), 0);
    }

    #[test]
    fn a_dropped_slow_reader_gets_nothing_after_the_first_frame_it_missed() {
        let queue = OutboundQueue::new(2, usize::MAX);
        for n in 0..3 {
            queue.offer(&frame(&n.to_string()));
        }
        // The queue had space for two; the third overflowed and closed the socket.
        assert_eq!(queue.drain(), ["0", "1"]);
        // Even with space again, later frames must not arrive after the gap.
        assert!(!queue.offer(&frame("3")));
        assert!(queue.drain().is_empty());
    }

    #[tokio::test]
    async fn a_reply_waits_for_space_and_fails_once_the_writer_stopped() {
        let queue = Arc::new(OutboundQueue::new(1, usize::MAX));
        queue.push(frame("a")).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(frame("b")).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the queue is full");
        assert_eq!(queue.drain(), ["a"]);
        waiting.await.unwrap().unwrap();
        assert_eq!(queue.drain(), ["b"]);
        assert_eq!(queue.queued(), 0);

        queue.push(frame("c")).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(frame("d")).await }
        });
        tokio::task::yield_now().await;
        queue.close_queue();
        assert_eq!(waiting.await.unwrap(), Err(Rejected::Closed));
        assert_eq!(queue.queued(), 0, "dropped frames are counted out");
        assert!(!queue.offer(&frame("e")));
    }

    #[tokio::test]
    async fn replies_count_toward_the_byte_bound() {
        let queue = OutboundQueue::new(100, 250);
        let big = frame(&"x".repeat(100));
        queue.push(big.clone()).await.unwrap();
        queue.push(big.clone()).await.unwrap();
        assert_eq!(
            queue.push(big.clone()).await,
            Err(Rejected::Closed),
            "a third reply would exceed 250 bytes"
        );
        assert_eq!(queue.close_requested().await.0, CloseCode::Again);
        assert_eq!(queue.queued(), 200);
    }

    #[tokio::test]
    async fn catch_up_waits_for_the_queue_to_drain_to_half() {
        let queue = Arc::new(OutboundQueue::new(100, 300));
        let big = frame(&"x".repeat(100));
        queue.push(big.clone()).await.unwrap();
        queue.push(big.clone()).await.unwrap();
        let waiting = tokio::spawn({
            let (queue, big) = (queue.clone(), big.clone());
            async move { queue.push_draining(big).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "200 bytes queued: over half of 300");
        assert_eq!(queue.drain().len(), 2);
        waiting.await.unwrap().unwrap();
        assert_eq!(queue.queued(), 100);
        // A close ends the wait.
        queue.push(big.clone()).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push_draining(big).await }
        });
        tokio::task::yield_now().await;
        queue.request_close(CloseCode::Away, "bye");
        assert_eq!(waiting.await.unwrap(), Err(Rejected::Closed));
    }

    #[tokio::test]
    async fn a_run_is_queued_like_its_frames_one_by_one() {
        let run: Arc<[Utf8Bytes]> = (0..4)
            .map(|n| frame(&format!("{n}{}", "x".repeat(99))))
            .collect();
        // Room for all of it, queued as one entry that shares the run.
        let queue = OutboundQueue::new(10, 1_000);
        queue.offer_run(&run);
        assert_eq!(Arc::strong_count(&run), 2);
        assert_eq!(queue.drain(), run[..]);
        assert!(queue.close_request().is_none());
        // Two frames fit the frame bound: they are queued, then the socket is dropped.
        let queue = OutboundQueue::new(2, 1_000);
        queue.offer_run(&run);
        assert_eq!(queue.close_requested().await.0, CloseCode::Again);
        assert_eq!(queue.queued(), 200);
        assert_eq!(queue.drain(), run[..2]);
        assert_eq!(queue.queued(), 0);
        // Three frames fit the byte bound.
        let queue = OutboundQueue::new(10, 350);
        queue.offer_run(&run);
        assert_eq!(queue.close_requested().await.0, CloseCode::Again);
        assert_eq!(queue.drain(), run[..3]);
        assert_eq!(queue.queued(), 0);
        // A dropped socket takes no more.
        queue.offer_run(&run);
        assert!(queue.drain().is_empty());
        assert_eq!(queue.queued(), 0);
        // Nor does a finished one, and its bytes are not counted.
        let queue = OutboundQueue::new(10, 1_000);
        queue.finish();
        queue.offer_run(&run);
        assert_eq!(queue.queued(), 0);
        assert!(queue.close_request().is_none());
    }

    #[test]
    fn a_finished_queue_takes_nothing_and_says_so() {
        let queue = OutboundQueue::new(4, usize::MAX);
        assert!(queue.offer(&frame("a")));
        queue.finish();
        assert!(!queue.offer(&frame("b")));
        let mut batch = Pending::default();
        assert!(queue.take(&mut batch), "finished");
        assert_eq!(batch.iter().map(|f| f.as_str()).collect::<Vec<_>>(), ["a"]);
    }
}
