use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::{watch, Notify};

/// A socket's id, unique on this node.
pub(crate) type SocketId = u64;

/// The cross-task controls of one socket: its outbound queue (frames waiting for its
/// writer), a close request that any task may make (the first one wins) and that the
/// writer acts on, and the bytes waiting in the queue.
///
/// The queue is a `VecDeque` under a mutex rather than a tokio channel: a channel allocates
/// its first block of 32 slots (1 KiB) up front, for every socket, idle or not; an empty
/// `VecDeque` allocates nothing, and the writer takes the whole queue in one swap.
#[derive(Debug)]
pub(crate) struct SocketControl {
    close: Mutex<Option<(CloseCode, &'static str)>>,
    /// Set with the first close request: from then on the socket gets no more frames, so a
    /// dropped slow reader never sees a gap followed by later frames.
    closing: AtomicBool,
    notify: Notify,
    queued_bytes: AtomicUsize,
    queue: Mutex<Queue>,
    /// Most frames the queue holds.
    capacity: usize,
    /// Wakes the writer: frames were queued, or the queue was finished.
    ready: Notify,
    /// Wakes replies waiting for room in the queue (or for it to close).
    room: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Utf8Bytes>,
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

impl Default for SocketControl {
    fn default() -> Self {
        SocketControl::new(usize::MAX)
    }
}

impl SocketControl {
    /// Controls for a socket whose queue holds at most `capacity` frames.
    pub(crate) fn new(capacity: usize) -> Self {
        SocketControl {
            close: Mutex::default(),
            closing: AtomicBool::new(false),
            notify: Notify::new(),
            queued_bytes: AtomicUsize::new(0),
            queue: Mutex::default(),
            capacity: capacity.max(1),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `frame` unless the queue is full or closed. The caller counts the frame's
    /// bytes in (and checks the byte bound) and out again if it is rejected.
    pub(crate) fn try_push(&self, frame: &Utf8Bytes) -> Result<(), Rejected> {
        let mut queue = self.queue();
        if queue.closed || queue.finished {
            return Err(Rejected::Closed);
        }
        if queue.frames.len() >= self.capacity {
            return Err(Rejected::Full);
        }
        queue.frames.push_back(frame.clone());
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues `frame`, waiting for room if the queue is full; `Err` when the socket is
    /// ending. Counts the frame's bytes in and out itself.
    pub(crate) async fn push(&self, frame: Utf8Bytes) -> Result<(), Rejected> {
        self.add_queued(frame.len());
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a wake-up between the two is not lost.
            room.as_mut().enable();
            match self.try_push(&frame) {
                Ok(()) => return Ok(()),
                Err(Rejected::Full) => room.await,
                Err(Rejected::Closed) => {
                    self.remove_queued(frame.len());
                    return Err(Rejected::Closed);
                }
            }
        }
    }

    /// Moves every queued frame to the back of `batch` and counts their bytes out; returns
    /// whether the reader has finished.
    pub(crate) fn take(&self, batch: &mut VecDeque<Utf8Bytes>) -> bool {
        let before = batch.len();
        let mut queue = self.queue();
        if batch.is_empty() {
            std::mem::swap(&mut queue.frames, batch);
        } else {
            batch.extend(queue.frames.drain(..));
        }
        let finished = queue.finished;
        drop(queue);
        let bytes: usize = batch.iter().skip(before).map(|frame| frame.len()).sum();
        if bytes > 0 {
            self.remove_queued(bytes);
        }
        if batch.len() > before {
            self.room.notify_waiters();
        }
        finished
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
        self.take(&mut VecDeque::new());
        self.room.notify_waiters();
    }

    /// Counts `len` more bytes into the outbound queue; returns the new total.
    pub(crate) fn add_queued(&self, len: usize) -> usize {
        self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len
    }

    /// Counts `len` bytes out of the outbound queue.
    pub(crate) fn remove_queued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Bytes waiting in the outbound queue.
    pub(crate) fn queued(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Whether a close was requested.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Asks the socket's writer to send a close frame with `code` and stop.
    pub(crate) fn request_close(&self, code: CloseCode, reason: &'static str) {
        let mut close = self.close.lock().unwrap_or_else(PoisonError::into_inner);
        if close.is_none() {
            *close = Some((code, reason));
            self.closing.store(true, Ordering::Release);
            self.notify.notify_one();
        }
    }

    /// Waits for a close request.
    pub(crate) async fn close_requested(&self) -> (CloseCode, &'static str) {
        loop {
            if let Some(close) = *self.close.lock().unwrap_or_else(PoisonError::into_inner) {
                return close;
            }
            self.notify.notified().await;
        }
    }

    /// Takes what is queued (tests).
    #[cfg(test)]
    pub(crate) fn drain(&self) -> Vec<Utf8Bytes> {
        let mut batch = VecDeque::new();
        self.take(&mut batch);
        batch.into()
    }
}

/// Where the hub puts frames for one socket.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    pub(crate) control: Arc<SocketControl>,
}

type Members = HashMap<SocketId, Outbox>;

/// Local room membership and delivery; cheap to clone (all clones share state).
#[derive(Debug, Clone)]
pub(crate) struct RoomHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rooms: RwLock<HashMap<Arc<str>, Members>>,
    sockets: Mutex<HashMap<SocketId, Arc<SocketControl>>>,
    socket_count: watch::Sender<usize>,
    next_id: AtomicU64,
    accepting: AtomicBool,
    /// Bytes one socket's outbound queue may hold before it is dropped as a slow reader.
    max_queued_bytes: usize,
    /// Sockets this node accepts at most.
    max_sockets: usize,
}

/// Why a socket was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    ShuttingDown,
    Full,
}

impl Default for RoomHub {
    fn default() -> Self {
        RoomHub::new(usize::MAX, usize::MAX)
    }
}

impl RoomHub {
    pub(crate) fn new(max_queued_bytes: usize, max_sockets: usize) -> Self {
        RoomHub {
            inner: Arc::new(Inner {
                rooms: RwLock::default(),
                sockets: Mutex::default(),
                socket_count: watch::Sender::new(0),
                next_id: AtomicU64::new(1),
                accepting: AtomicBool::new(true),
                max_queued_bytes,
                max_sockets,
            }),
        }
    }

    /// Registers a new socket, unless the node is shutting down or full.
    pub(crate) fn register(&self, control: Arc<SocketControl>) -> Result<SocketId, Refused> {
        let mut sockets = self.sockets();
        // Checked under the lock so that `close_all` cannot miss a socket.
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(Refused::ShuttingDown);
        }
        if sockets.len() >= self.inner.max_sockets {
            return Err(Refused::Full);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        sockets.insert(id, control);
        self.inner.socket_count.send_replace(sockets.len());
        crate::metrics::sockets(sockets.len());
        Ok(id)
    }

    /// Whether the node has room for another socket (a hint: `register` decides).
    pub(crate) fn has_capacity(&self) -> bool {
        self.socket_count() < self.inner.max_sockets
    }

    /// Bytes waiting in every socket's outbound queue.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.sockets()
            .values()
            .map(|control| control.queued())
            .sum()
    }

    /// Forgets a socket (after it left all its rooms).
    pub(crate) fn unregister(&self, id: SocketId) {
        let mut sockets = self.sockets();
        sockets.remove(&id);
        self.inner.socket_count.send_replace(sockets.len());
        crate::metrics::sockets(sockets.len());
    }

    /// Adds a socket to a room's local members; returns the shared room name.
    pub(crate) fn join(&self, room: &str, id: SocketId, outbox: &Outbox) -> Arc<str> {
        let mut rooms = self.rooms_mut();
        if let Some((key, members)) = rooms.get_key_value(room) {
            let key = key.clone();
            if !members.contains_key(&id) {
                if let Some(members) = rooms.get_mut(room) {
                    members.insert(id, outbox.clone());
                }
            }
            return key;
        }
        let key: Arc<str> = Arc::from(room);
        rooms.insert(key.clone(), HashMap::from([(id, outbox.clone())]));
        crate::metrics::room_opened();
        key
    }

    /// Removes a socket from a room's local members.
    pub(crate) fn leave(&self, room: &str, id: SocketId) {
        let mut rooms = self.rooms_mut();
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
                crate::metrics::room_closed();
            }
        }
    }

    /// Offers `frame` to every local member of `room` without waiting; returns how many
    /// queues took it. Members whose queue is full (in frames or in bytes) are asked to
    /// close with 1013 and get nothing more.
    pub(crate) fn deliver(&self, room: &str, frame: &Utf8Bytes) -> usize {
        let rooms = self
            .inner
            .rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(members) = rooms.get(room) else {
            return 0;
        };
        let len = frame.len();
        let mut delivered = 0;
        for outbox in members.values() {
            let control = &outbox.control;
            if control.is_closing() {
                continue;
            }
            if control.add_queued(len) > self.inner.max_queued_bytes {
                control.remove_queued(len);
                slow_reader(control);
                continue;
            }
            match control.try_push(frame) {
                Ok(()) => delivered += 1,
                Err(Rejected::Full) => {
                    control.remove_queued(len);
                    slow_reader(control);
                }
                // The socket is ending; its cleanup removes it from the room.
                Err(Rejected::Closed) => control.remove_queued(len),
            }
        }
        delivered
    }

    /// Number of sockets on this node.
    pub(crate) fn socket_count(&self) -> usize {
        *self.inner.socket_count.borrow()
    }

    /// Number of rooms with local members.
    pub(crate) fn room_count(&self) -> usize {
        self.inner
            .rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Number of local members of `room`.
    pub(crate) fn member_count(&self, room: &str) -> usize {
        self.inner
            .rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(room)
            .map_or(0, HashMap::len)
    }

    /// Stops accepting sockets and asks every socket to close with `code`.
    pub(crate) fn close_all(&self, code: CloseCode, reason: &'static str) {
        let sockets = self.sockets();
        self.inner.accepting.store(false, Ordering::Release);
        for control in sockets.values() {
            control.request_close(code, reason);
        }
    }

    /// Whether new sockets are accepted.
    pub(crate) fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire)
    }

    /// Waits until no socket is left.
    pub(crate) async fn all_closed(&self) {
        let mut count = self.inner.socket_count.subscribe();
        // `wait_for` only fails when the sender is gone, and `self` holds it.
        let _ = count.wait_for(|n| *n == 0).await;
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, HashMap<SocketId, Arc<SocketControl>>> {
        self.inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn rooms_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Members>> {
        self.inner
            .rooms
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops a slow reader: its queue is full, so it is closed with 1013 (once).
fn slow_reader(control: &SocketControl) {
    if !control.is_closing() {
        crate::metrics::slow_reader_dropped();
        control.request_close(CloseCode::Again, "outbound queue full");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(cap: usize) -> Outbox {
        Outbox {
            control: Arc::new(SocketControl::new(cap)),
        }
    }

    #[tokio::test]
    async fn deliver_reaches_members_only_and_shares_the_buffer() {
        let hub = RoomHub::default();
        let a = outbox(4);
        let b = outbox(4);
        let ida = hub.register(a.control.clone()).unwrap();
        let idb = hub.register(b.control.clone()).unwrap();
        hub.join("r", ida, &a);
        hub.join("other", idb, &b);
        let frame = Utf8Bytes::from("x".repeat(100));
        assert_eq!(hub.deliver("r", &frame), 1);
        let got = a.control.drain();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].as_ptr(),
            frame.as_ptr(),
            "recipients share one buffer"
        );
        assert!(b.control.drain().is_empty());
        hub.leave("r", ida);
        assert_eq!(hub.room_count(), 1);
        assert_eq!(hub.deliver("r", &frame), 0);
    }

    #[tokio::test]
    async fn a_full_queue_asks_that_socket_to_close_and_spares_the_rest() {
        let hub = RoomHub::default();
        let slow = outbox(1);
        let fast = outbox(8);
        let ids = hub.register(slow.control.clone()).unwrap();
        let idf = hub.register(fast.control.clone()).unwrap();
        hub.join("r", ids, &slow);
        hub.join("r", idf, &fast);
        for _ in 0..3 {
            hub.deliver("r", &Utf8Bytes::from_static("m"));
        }
        assert_eq!(slow.control.close_requested().await.0, CloseCode::Again);
        assert_eq!(fast.control.drain(), ["m", "m", "m"]);
    }

    #[tokio::test]
    async fn a_queue_over_its_byte_limit_asks_that_socket_to_close() {
        let hub = RoomHub::new(250, usize::MAX);
        let slow = outbox(100);
        let id = hub.register(slow.control.clone()).unwrap();
        hub.join("r", id, &slow);
        let frame = Utf8Bytes::from("x".repeat(100));
        assert_eq!(hub.deliver("r", &frame), 1);
        assert_eq!(hub.deliver("r", &frame), 1);
        assert_eq!(hub.queued_bytes(), 200);
        assert_eq!(
            hub.deliver("r", &frame),
            0,
            "a third frame would exceed 250 bytes"
        );
        assert_eq!(slow.control.close_requested().await.0, CloseCode::Again);
        assert_eq!(hub.queued_bytes(), 200);
        assert_eq!(slow.control.drain().len(), 2);
        assert_eq!(hub.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_dropped_slow_reader_gets_nothing_after_the_first_frame_it_missed() {
        let hub = RoomHub::new(usize::MAX, usize::MAX);
        let slow = outbox(2);
        let id = hub.register(slow.control.clone()).unwrap();
        hub.join("r", id, &slow);
        for n in 0..3 {
            hub.deliver("r", &Utf8Bytes::from(n.to_string()));
        }
        // The queue had room for two; the third overflowed and closed the socket.
        assert_eq!(slow.control.drain(), ["0", "1"]);
        // Even with room again, later frames must not arrive after the gap.
        assert_eq!(hub.deliver("r", &Utf8Bytes::from_static("3")), 0);
        assert!(slow.control.drain().is_empty());
    }

    #[tokio::test]
    async fn a_reply_waits_for_room_and_fails_once_the_writer_stopped() {
        let control = Arc::new(SocketControl::new(1));
        control.push(Utf8Bytes::from_static("a")).await.unwrap();
        let waiting = tokio::spawn({
            let control = control.clone();
            async move { control.push(Utf8Bytes::from_static("b")).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the queue is full");
        assert_eq!(control.drain(), ["a"]);
        waiting.await.unwrap().unwrap();
        assert_eq!(control.drain(), ["b"]);
        assert_eq!(control.queued(), 0);

        control.push(Utf8Bytes::from_static("c")).await.unwrap();
        let waiting = tokio::spawn({
            let control = control.clone();
            async move { control.push(Utf8Bytes::from_static("d")).await }
        });
        tokio::task::yield_now().await;
        control.close_queue();
        assert_eq!(waiting.await.unwrap(), Err(Rejected::Closed));
        assert_eq!(control.queued(), 0, "dropped frames are counted out");
        assert_eq!(
            control.try_push(&Utf8Bytes::from_static("e")),
            Err(Rejected::Closed)
        );
    }

    #[test]
    fn a_finished_queue_takes_nothing_and_says_so() {
        let control = SocketControl::new(4);
        control.try_push(&Utf8Bytes::from_static("a")).unwrap();
        control.finish();
        assert_eq!(
            control.try_push(&Utf8Bytes::from_static("b")),
            Err(Rejected::Closed)
        );
        let mut batch = VecDeque::new();
        assert!(control.take(&mut batch), "finished");
        assert_eq!(batch, ["a"]);
    }

    #[test]
    fn sockets_beyond_the_limit_are_refused() {
        let hub = RoomHub::new(usize::MAX, 1);
        assert!(hub.register(Arc::default()).is_ok());
        assert!(!hub.has_capacity());
        assert_eq!(hub.register(Arc::default()), Err(Refused::Full));
    }

    #[tokio::test]
    async fn close_all_stops_accepting() {
        let hub = RoomHub::default();
        let control = Arc::new(SocketControl::default());
        let id = hub.register(control.clone()).unwrap();
        hub.close_all(CloseCode::Away, "bye");
        assert_eq!(control.close_requested().await.0, CloseCode::Away);
        assert_eq!(hub.register(Arc::default()), Err(Refused::ShuttingDown));
        hub.unregister(id);
        hub.all_closed().await;
    }
}
