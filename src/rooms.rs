//! The node's local rooms: which of this node's sockets are in which room, and delivery of
//! a frame to them.
//!
//! The rooms know nothing about Redis nor about sockets' insides: a member is anything that
//! takes a frame without waiting ([`Member`]; a socket's outbound queue in practice). Each
//! delivered frame is offered to every local member of its room, and all recipients share
//! one frame buffer. A member that cannot take it (a slow reader) deals with that itself,
//! without delaying the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockWriteGuard};

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::{mpsc, watch};

/// A socket's id, unique on this node.
pub(crate) type SocketId = u64;

/// What the rooms need of a member socket.
pub(crate) trait Member: Send + Sync + std::fmt::Debug {
    /// Takes a delivered frame without waiting; returns whether it was taken.
    fn offer(&self, frame: &Utf8Bytes) -> bool;
    /// Takes a run of delivered frames of one room without waiting, in order, as
    /// [`Member::offer`] one by one would (none after the first it cannot take). The run is
    /// shared by every member it goes to: a member may keep it rather than its frames.
    fn offer_run(&self, run: &Arc<[Utf8Bytes]>) {
        for frame in run.iter() {
            if !self.offer(frame) {
                break;
            }
        }
    }
    /// Bytes waiting to be written to the socket.
    fn queued_bytes(&self) -> usize;
    /// Asks the socket to close with `code`.
    fn close(&self, code: CloseCode, reason: &'static str);
}

/// A member, as the rooms hold it.
pub(crate) type SharedMember = Arc<dyn Member>;

type Members = HashMap<SocketId, SharedMember>;

/// Local room membership and delivery; cheap to clone (all clones share state).
#[derive(Debug, Clone)]
pub(crate) struct Rooms {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rooms: RwLock<HashMap<Arc<str>, Members>>,
    sockets: Mutex<HashMap<SocketId, SharedMember>>,
    socket_count: watch::Sender<usize>,
    next_id: AtomicU64,
    accepting: AtomicBool,
    /// Sockets this node accepts at most.
    max_sockets: usize,
    /// Told when a room gets its first local member or loses its last, in the order that
    /// happens (sent under the rooms' lock), if anyone watches (see `occupancy`).
    watcher: Option<mpsc::UnboundedSender<RoomChange>>,
}

/// A room got its first local member (`occupied`) or lost its last.
#[derive(Debug)]
pub(crate) struct RoomChange {
    pub(crate) room: Arc<str>,
    pub(crate) occupied: bool,
}

/// Why a socket was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    ShuttingDown,
    Full,
}

impl Rooms {
    /// Rooms of a node that accepts at most `max_sockets` sockets.
    #[cfg(test)]
    pub(crate) fn new(max_sockets: usize) -> Self {
        Self::watched(max_sockets, None)
    }

    /// [`Rooms::new`], telling `watcher` of every [`RoomChange`].
    pub(crate) fn watched(
        max_sockets: usize,
        watcher: Option<mpsc::UnboundedSender<RoomChange>>,
    ) -> Self {
        Rooms {
            inner: Arc::new(Inner {
                rooms: RwLock::default(),
                sockets: Mutex::default(),
                socket_count: watch::Sender::new(0),
                next_id: AtomicU64::new(1),
                accepting: AtomicBool::new(true),
                max_sockets,
                watcher,
            }),
        }
    }

    /// Registers a new socket, unless the node is shutting down or full.
    pub(crate) fn register(&self, member: SharedMember) -> Result<SocketId, Refused> {
        let mut sockets = self.sockets();
        // Checked under the lock so that `close_all` cannot miss a socket.
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(Refused::ShuttingDown);
        }
        if sockets.len() >= self.inner.max_sockets {
            return Err(Refused::Full);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        sockets.insert(id, member);
        self.inner.socket_count.send_replace(sockets.len());
        crate::metrics::sockets(sockets.len());
        Ok(id)
    }

    /// Bytes waiting to be written to every socket.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.sockets().values().map(|m| m.queued_bytes()).sum()
    }

    /// Forgets a socket (after it left all its rooms).
    pub(crate) fn unregister(&self, id: SocketId) {
        let mut sockets = self.sockets();
        sockets.remove(&id);
        self.inner.socket_count.send_replace(sockets.len());
        crate::metrics::sockets(sockets.len());
    }

    /// Adds a socket to a room's local members; returns the shared room name.
    pub(crate) fn join(&self, room: &str, id: SocketId, member: &SharedMember) -> Arc<str> {
        let mut rooms = self.rooms_mut();
        if let Some((key, members)) = rooms.get_key_value(room) {
            let key = key.clone();
            if !members.contains_key(&id) {
                if let Some(members) = rooms.get_mut(room) {
                    members.insert(id, member.clone());
                }
            }
            return key;
        }
        let key: Arc<str> = Arc::from(room);
        rooms.insert(key.clone(), HashMap::from([(id, member.clone())]));
        crate::metrics::room_opened();
        self.tell(&key, true);
        key
    }

    fn tell(&self, room: &Arc<str>, occupied: bool) {
        if let Some(watcher) = &self.inner.watcher {
            let _ = watcher.send(RoomChange {
                room: room.clone(),
                occupied,
            });
        }
    }

    /// Removes a socket from a room's local members.
    pub(crate) fn leave(&self, room: &str, id: SocketId) {
        let mut rooms = self.rooms_mut();
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                if let Some((key, _)) = rooms.remove_entry(room) {
                    self.tell(&key, false);
                }
                crate::metrics::room_closed();
            }
        }
    }

    /// Offers `frame` to every local member of `room` without waiting; returns how many
    /// took it.
    pub(crate) fn deliver(&self, room: &str, frame: &Utf8Bytes) -> usize {
        let rooms = self
            .inner
            .rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        rooms.get(room).map_or(0, |members| {
            members.values().filter(|m| m.offer(frame)).count()
        })
    }

    /// Offers a run of frames of `room`, in order, to every local member of the room: one
    /// lookup of the room and one [`Member::offer_run`] per member for the whole run.
    pub(crate) fn deliver_run(&self, room: &str, run: &Arc<[Utf8Bytes]>) {
        let rooms = self
            .inner
            .rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(members) = rooms.get(room) {
            for member in members.values() {
                member.offer_run(run);
            }
        }
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
        for member in sockets.values() {
            member.close(code, reason);
        }
    }

    /// Stops accepting sockets; those open go on.
    pub(crate) fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::Release);
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

    fn sockets(&self) -> MutexGuard<'_, HashMap<SocketId, SharedMember>> {
        self.inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn rooms_mut(&self) -> RwLockWriteGuard<'_, HashMap<Arc<str>, Members>> {
        self.inner
            .rooms
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that keeps what it is offered, up to `capacity` frames.
    #[derive(Debug, Default)]
    struct Inbox {
        capacity: usize,
        frames: Mutex<Vec<Utf8Bytes>>,
        closed: Mutex<Option<CloseCode>>,
    }

    impl Member for Inbox {
        fn offer(&self, frame: &Utf8Bytes) -> bool {
            let mut frames = self.frames.lock().unwrap();
            let taken = frames.len() < self.capacity;
            if taken {
                frames.push(frame.clone());
            }
            taken
        }
        fn queued_bytes(&self) -> usize {
            self.frames.lock().unwrap().iter().map(|f| f.len()).sum()
        }
        fn close(&self, code: CloseCode, _: &'static str) {
            *self.closed.lock().unwrap() = Some(code);
        }
    }

    fn inbox(capacity: usize) -> Arc<Inbox> {
        Arc::new(Inbox {
            capacity,
            ..Inbox::default()
        })
    }

    #[test]
    fn deliver_reaches_members_only_and_shares_the_buffer() {
        let rooms = Rooms::new(usize::MAX);
        let (a, b) = (inbox(4), inbox(4));
        let (ma, mb): (SharedMember, SharedMember) = (a.clone(), b.clone());
        let ida = rooms.register(ma.clone()).unwrap();
        let idb = rooms.register(mb.clone()).unwrap();
        rooms.join("r", ida, &ma);
        rooms.join("other", idb, &mb);
        let frame = Utf8Bytes::from("x".repeat(100));
        assert_eq!(rooms.deliver("r", &frame), 1);
        let got = a.frames.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].as_ptr(),
            frame.as_ptr(),
            "recipients share one buffer"
        );
        drop(got);
        assert!(b.frames.lock().unwrap().is_empty());
        assert_eq!(rooms.queued_bytes(), 100);
        rooms.leave("r", ida);
        assert_eq!(rooms.room_count(), 1);
        assert_eq!(rooms.deliver("r", &frame), 0);
    }

    #[test]
    fn a_member_that_takes_nothing_does_not_stop_the_others() {
        let rooms = Rooms::new(usize::MAX);
        let (full, open): (SharedMember, SharedMember) = (inbox(0), inbox(8));
        let idf = rooms.register(full.clone()).unwrap();
        let ido = rooms.register(open.clone()).unwrap();
        rooms.join("r", idf, &full);
        rooms.join("r", ido, &open);
        assert_eq!(rooms.member_count("r"), 2);
        assert_eq!(rooms.deliver("r", &Utf8Bytes::from_static("m")), 1);
    }

    #[test]
    fn sockets_beyond_the_limit_are_refused() {
        let rooms = Rooms::new(1);
        assert!(rooms.register(inbox(1)).is_ok());
        assert_eq!(rooms.register(inbox(1)), Err(Refused::Full));
    }

    #[tokio::test]
    async fn close_all_stops_accepting() {
        let rooms = Rooms::new(usize::MAX);
        let member = inbox(1);
        let id = rooms.register(member.clone()).unwrap();
        rooms.close_all(CloseCode::Away, "bye");
        assert_eq!(*member.closed.lock().unwrap(), Some(CloseCode::Away));
        assert_eq!(rooms.register(inbox(1)), Err(Refused::ShuttingDown));
        rooms.unregister(id);
        rooms.all_closed().await;
    }
}
