//! The node's notification queue: hands each [`Notification`] to the notification hook,
//! after the fact, without ever making a socket wait.
//!
//! Notifications go to one of a few lanes, chosen by their room (a disconnect by its
//! socket), so that a room's notifications keep their order while other rooms' go on. Each
//! lane is a task that calls the hook with its oldest notification and, while that fails,
//! calls it again with the same one after a growing pause (100 ms doubling to 10 s, with
//! jitter).
//!
//! What a peer can make a lane hold is bounded, and one kind of churn cannot push out
//! another kind's notifications:
//! - A room notification supersedes the queued one of the same room's occupancy (or the
//!   same identity's presence in the room) that the lane has not tried to send yet: only
//!   the newer is kept (by `seq`), since it says all the backend needs.
//!   One the lane has tried is never taken back (the backend may have taken it though the
//!   call failed). So a client that keeps entering and leaving rooms makes a lane hold at
//!   most two notifications per room (and identity) it touches, not one per change; each
//!   superseded one is counted (`thinws_notifications_superseded_total`).
//! - A lane keeps room notifications and disconnects apart, each within the lane's share of
//!   the queue's bounds, in notifications and in bytes (a disconnect holds its socket's
//!   upgrade request, which a peer chose). Past them, the oldest of the same kind is
//!   dropped and counted (`thinws_notifications_dropped_total`): sockets opened and closed
//!   in a loop push out other disconnects, never a room's `room_vacated`.
//!
//! A backend that is down for long costs the node a bounded amount of memory and nothing
//! else.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Notify;
use tower::{Service, ServiceExt};

use crate::hooks::{Happened, Hook, HookError, Notification};

/// How many lanes (hook calls at once) a node has.
const LANES: usize = 4;
/// The most bytes (roughly: what the notifications hold) the queue keeps of each kind.
const MAX_BYTES: usize = 64 * 1024 * 1024;

/// The node's notification queue (cheap to clone; the lanes stop once every clone is gone).
#[derive(Clone)]
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    hook: Hook<Notification, ()>,
    lanes: Vec<Arc<Lane>>,
    per_lane: usize,
    bytes_per_lane: usize,
    hasher: RandomState,
    started: OnceLock<()>,
}

struct Lane {
    queue: Mutex<Queued>,
    ready: Notify,
    /// Woken whenever the lane took a notification off (for [`Notifier::drained`]).
    emptied: Notify,
    /// Set when the notifier is gone: the lane sends what it holds, once each, and ends.
    closed: AtomicBool,
}

/// A queued notification: its number (in the order of [`Notifier::notify`] calls, across
/// both kinds), the notification and its size (see [`size_of`]).
type Item = (u64, Notification, usize);

/// One kind of a lane's notifications, oldest first.
#[derive(Default)]
struct Kind {
    items: VecDeque<Item>,
    bytes: usize,
}

impl Kind {
    fn pop_front(&mut self) -> Option<Item> {
        let item = self.items.pop_front()?;
        self.taken(&item);
        Some(item)
    }

    /// Takes out the item numbered `number`, if it is here.
    fn remove(&mut self, number: u64) -> Option<Item> {
        let at = self
            .items
            .binary_search_by_key(&number, |item| item.0)
            .ok()?;
        let item = self.items.remove(at)?;
        self.taken(&item);
        Some(item)
    }

    fn taken(&mut self, item: &Item) {
        self.bytes -= item.2;
        crate::metrics::notifications_queued(-1.0);
    }
}

/// What a room notification is about: a room's occupancy, or an identity's presence in a
/// room. The newest notification of a subject says all the backend needs of it.
#[derive(PartialEq, Eq, Hash)]
enum Subject {
    Occupancy(Arc<str>),
    Presence(Arc<str>, Arc<str>),
}

/// The subject of a room notification `what`, and its `seq`.
fn subject(what: &Happened) -> Option<(Subject, u64)> {
    Some(match what {
        Happened::RoomOccupied { room, seq } | Happened::RoomVacated { room, seq } => {
            (Subject::Occupancy(room.clone()), *seq)
        }
        Happened::Join {
            room,
            identity,
            seq,
        }
        | Happened::Leave {
            room,
            identity,
            seq,
        } => (Subject::Presence(room.clone(), identity.clone()), *seq),
        Happened::Disconnect { .. } => return None,
    })
}

/// What [`Queued::supersede`] decided for a new room notification.
enum Superseded {
    /// No queued notification of its subject can be replaced: queue it.
    Nothing,
    /// The queued one of its subject was taken off: queue it.
    Older,
    /// The queued one of its subject is newer (a higher `seq`): drop it.
    Itself,
}

#[derive(Default)]
struct Queued {
    /// Room notifications (occupancy, presence).
    rooms: Kind,
    /// Disconnects.
    sockets: Kind,
    /// The newest queued room notification of each subject: its number and `seq`.
    newest: HashMap<Subject, (u64, u64)>,
    /// The number of the notification the lane has tried to send (the backend may have
    /// taken it even if the call failed): it is never replaced.
    attempted: Option<u64>,
    /// The number the next pushed notification gets.
    next: u64,
    dropped: u64,
}

impl Queued {
    /// The oldest notification of either kind.
    fn front(&self) -> Option<&Item> {
        match (self.rooms.items.front(), self.sockets.items.front()) {
            (Some(room), Some(socket)) => Some(if room.0 < socket.0 { room } else { socket }),
            (room, socket) => room.or(socket),
        }
    }

    fn kind(&mut self, what: &Happened) -> &mut Kind {
        match what {
            Happened::Disconnect { .. } => &mut self.sockets,
            _ => &mut self.rooms,
        }
    }

    /// Takes the notification numbered `number` off, if it is still queued.
    fn remove(&mut self, number: u64) -> bool {
        let Some(item) = self
            .rooms
            .remove(number)
            .or_else(|| self.sockets.remove(number))
        else {
            return false;
        };
        self.forget(&item);
        true
    }

    /// Drops the oldest of `what`'s kind.
    fn drop_oldest(&mut self, what: &Happened) {
        if let Some(item) = self.kind(what).pop_front() {
            self.forget(&item);
        }
    }

    fn forget(&mut self, item: &Item) {
        if let Some((subject, _)) = subject(&item.1.what) {
            if self.newest.get(&subject).is_some_and(|(n, _)| *n == item.0) {
                self.newest.remove(&subject);
            }
        }
    }

    /// Where `what` has a queued notification of its subject that the lane has not tried
    /// to send, only the newer of the two is kept (by `seq`): a room
    /// holds at most two notifications of a subject, the one being sent and the newest.
    fn supersede(&mut self, what: &Happened) -> Superseded {
        let Some((about, seq)) = subject(what) else {
            return Superseded::Nothing;
        };
        match self.newest.get(&about) {
            Some(&(number, queued)) if self.attempted != Some(number) => {
                if seq <= queued {
                    return Superseded::Itself;
                }
                self.remove(number);
                Superseded::Older
            }
            _ => Superseded::Nothing,
        }
    }
}

/// Roughly the bytes `notification` holds.
fn size_of(notification: &Notification) -> usize {
    let held = match &notification.what {
        Happened::RoomOccupied { room, .. } | Happened::RoomVacated { room, .. } => room.len(),
        Happened::Join { room, identity, .. } | Happened::Leave { room, identity, .. } => {
            room.len() + identity.len()
        }
        Happened::Disconnect { socket, .. } => {
            let request = socket.request();
            let headers: usize = request
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 64)
                .sum();
            headers + request.uri.to_string().len() + socket.connection_id().len() + 512
        }
    };
    held + std::mem::size_of::<Notification>()
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("per_lane", &self.inner.per_lane)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for lane in &self.lanes {
            lane.closed.store(true, Ordering::Release);
            lane.ready.notify_one();
        }
    }
}

impl Lane {
    fn queue(&self) -> MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Notifier {
    /// A queue that holds at most `capacity` notifications (at least one per lane) for `hook`.
    /// Its tasks start with the first notification.
    pub(crate) fn new(hook: Hook<Notification, ()>, capacity: usize) -> Self {
        let lanes = (0..LANES)
            .map(|_| {
                Arc::new(Lane {
                    queue: Mutex::default(),
                    ready: Notify::new(),
                    emptied: Notify::new(),
                    closed: AtomicBool::new(false),
                })
            })
            .collect();
        Notifier {
            inner: Arc::new(Inner {
                hook,
                lanes,
                per_lane: capacity.div_ceil(LANES).max(1),
                bytes_per_lane: MAX_BYTES / LANES,
                hasher: RandomState::new(),
                started: OnceLock::new(),
            }),
        }
    }

    /// Queues `what` (dropping its lane's oldest if the lane is full). Never waits. Must be
    /// called within a Tokio runtime.
    pub(crate) fn notify(&self, what: Happened) {
        let inner = &*self.inner;
        inner.started.get_or_init(|| {
            for lane in &inner.lanes {
                tokio::spawn(run(lane.clone(), inner.hook.clone()));
            }
        });
        let notification = Notification::now(what);
        let hash = match &notification.what {
            Happened::Disconnect { socket, .. } => inner.hasher.hash_one(socket.id()),
            _ => inner
                .hasher
                .hash_one(notification.room().unwrap_or_default()),
        };
        let lane = &inner.lanes[(hash % LANES as u64) as usize];
        let size = size_of(&notification);
        {
            let mut queued = lane.queue();
            match queued.supersede(&notification.what) {
                Superseded::Nothing => {}
                Superseded::Older => crate::metrics::notification_superseded(),
                Superseded::Itself => {
                    crate::metrics::notification_superseded();
                    return;
                }
            }
            loop {
                let kind = queued.kind(&notification.what);
                let full = !kind.items.is_empty()
                    && (kind.items.len() >= inner.per_lane
                        || kind.bytes + size > inner.bytes_per_lane);
                if !full {
                    break;
                }
                queued.drop_oldest(&notification.what);
                queued.dropped += 1;
                crate::metrics::notification_dropped();
                // Once, then at every power of two: a long outage does not flood the log.
                if queued.dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = queued.dropped,
                        "notification queue full: dropped the oldest notifications"
                    );
                }
            }
            let number = queued.next;
            queued.next += 1;
            if let Some((subject, seq)) = subject(&notification.what) {
                queued.newest.insert(subject, (number, seq));
            }
            let kind = queued.kind(&notification.what);
            kind.bytes += size;
            kind.items.push_back((number, notification, size));
        }
        crate::metrics::notifications_queued(1.0);
        lane.ready.notify_one();
    }
}

impl Notifier {
    /// Resolves once every queued notification was taken by the hook (or dropped): a node
    /// shutting down waits for it, bounded by its deadline.
    pub(crate) async fn drained(&self) {
        for lane in &self.inner.lanes {
            loop {
                let emptied = lane.emptied.notified();
                if lane.queue().front().is_none() {
                    break;
                }
                emptied.await;
            }
        }
    }
}

/// Waits the next of a lane's growing pauses after a failure.
async fn pause(backoff: &mut impl Iterator<Item = Duration>) {
    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(10))).await;
}

/// One lane: sends its oldest notification until the hook takes it, then the next.
async fn run(lane: Arc<Lane>, mut hook: Hook<Notification, ()>) {
    let pauses = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = pauses();
    loop {
        let front = {
            let mut queued = lane.queue();
            let front = queued.front().map(|(n, item, _)| (*n, item.clone()));
            if let Some((n, _)) = &front {
                queued.attempted = Some(*n);
            }
            front
        };
        let Some((number, notification)) = front else {
            if lane.closed.load(Ordering::Acquire) {
                return;
            }
            lane.ready.notified().await;
            continue;
        };
        let sent = match hook.ready().await {
            Ok(hook) => hook.call(notification).await,
            Err(e) => Err(e),
        };
        let closed = lane.closed.load(Ordering::Acquire);
        // Whether the front is given up (counted as dropped if it is still there: a full
        // lane may have pushed it out, and counted it, meanwhile).
        let given_up = match sent {
            Ok(()) => {
                crate::metrics::notification_sent();
                backoff = pauses();
                false
            }
            // Refused for good (a webhook answered 400, say): sending it again cannot
            // help, and it would hold up its lane for ever. Dropped and logged, after the
            // pause a failure takes, so that a backend refusing everything is not sent the
            // whole queue at once.
            Err(e) if matches!(e.downcast_ref(), Some(HookError::Refused { .. })) => {
                crate::metrics::notification_failed();
                tracing::warn!(error = %e, "notification hook refused a notification; dropped");
                if !closed {
                    pause(&mut backoff).await;
                }
                true
            }
            Err(e) if closed => {
                // The node is shutting down: no time to try again.
                crate::metrics::notification_failed();
                tracing::warn!(error = %e, "notification hook failed at shutdown; dropped");
                true
            }
            Err(e) => {
                crate::metrics::notification_failed();
                tracing::warn!(error = %e, "notification hook failed; retrying");
                // The whole pause, even if the front is dropped meanwhile: a backend that is
                // down gets no more calls because events keep coming.
                pause(&mut backoff).await;
                continue;
            }
        };
        let mut queued = lane.queue();
        // Still there unless a full lane pushed it out (and counted it) meanwhile.
        if queued.remove(number) && given_up {
            crate::metrics::notification_dropped();
        }
        drop(queued);
        lane.emptied.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::hooks::boxed;

    fn occupied(room: &str, seq: u64) -> Happened {
        Happened::RoomOccupied {
            room: room.into(),
            seq,
        }
    }

    fn vacated(room: &str, seq: u64) -> Happened {
        Happened::RoomVacated {
            room: room.into(),
            seq,
        }
    }

    fn described(n: &Notification) -> String {
        match n.what() {
            Happened::RoomOccupied { room, seq } => format!("occupied {room} {seq}"),
            Happened::RoomVacated { room, seq } => format!("vacated {room} {seq}"),
            Happened::Join { room, identity, .. } => format!("join {room} {identity}"),
            Happened::Leave { room, identity, .. } => format!("leave {room} {identity}"),
            Happened::Disconnect { socket, .. } => format!("disconnect {}", socket.id()),
        }
    }

    /// A hook that fails its first `failures` calls and records the rest.
    fn recording(failures: usize) -> (Hook<Notification, ()>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let hook = {
            let seen = seen.clone();
            tower::service_fn(move |n: Notification| {
                let (seen, calls) = (seen.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < failures {
                        return Err("backend down");
                    }
                    seen.lock().unwrap().push(described(&n));
                    Ok(())
                }
            })
        };
        (boxed(hook), seen)
    }

    fn disconnect(id: u64, head: &Arc<http::request::Parts>) -> Happened {
        Happened::Disconnect {
            socket: Box::new(crate::hooks::SocketInfo {
                id,
                connection_id: "c".into(),
                bound: false,
                request: head.clone(),
                granted: Arc::default(),
            }),
            reason: crate::hooks::DisconnectReason::Closed,
        }
    }

    /// Identity `n` joining `room` (distinct subjects of one room: none supersedes another).
    fn joined(room: &str, n: u64) -> Happened {
        Happened::Join {
            room: room.into(),
            identity: n.to_string().into(),
            seq: n,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_hook_gets_the_same_notification_again_and_order_is_kept() {
        let (hook, seen) = recording(5);
        let notifier = Notifier::new(hook, 100);
        for n in 0..10 {
            notifier.notify(joined("lobby", n));
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        let expected: Vec<String> = (0..10).map(|n| format!("join lobby {n}")).collect();
        assert_eq!(*seen.lock().unwrap(), expected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_lane_drops_its_oldest() {
        let (hook, seen) = recording(usize::MAX);
        let notifier = Notifier::new(hook, LANES * 3);
        for n in 0..10 {
            notifier.notify(joined("lobby", n));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lane = notifier
            .inner
            .lanes
            .iter()
            .find(|lane| lane.queue().front().is_some())
            .expect("one lane holds the room");
        let held: Vec<String> = lane
            .queue()
            .rooms
            .items
            .iter()
            .map(|(_, n, _)| described(n))
            .collect();
        assert_eq!(
            held,
            ["join lobby 7", "join lobby 8", "join lobby 9"],
            "the newest three are kept"
        );
        assert!(seen.lock().unwrap().is_empty());
    }

    /// A client entering and leaving rooms in a loop while the backend is down: each room's
    /// newest notification supersedes the queued one, instead of pushing out another
    /// room's.
    #[tokio::test(start_paused = true)]
    async fn a_newer_notification_of_a_room_supersedes_the_queued_one() {
        let (hook, seen) = recording(usize::MAX);
        let notifier = Notifier::new(hook, LANES * 200);
        notifier.notify(vacated("victim", 1));
        let join = |room: &str, identity: &str, seq: u64| Happened::Join {
            room: room.into(),
            identity: identity.into(),
            seq,
        };
        let leave = |room: &str, identity: &str, seq: u64| Happened::Leave {
            room: room.into(),
            identity: identity.into(),
            seq,
        };
        for round in 0..1_000u64 {
            let room = format!("churn-{}", round % 50);
            notifier.notify(occupied(&room, round * 2));
            // The lanes try (and fail) in between.
            tokio::task::yield_now().await;
            notifier.notify(join(&room, "mallory", round * 2));
            tokio::task::yield_now().await;
            notifier.notify(vacated(&room, round * 2 + 1));
            notifier.notify(leave(&room, "mallory", round * 2 + 1));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A stale one (a lower `seq`) does not supersede a newer one.
        notifier.notify(occupied("churn-0", 5));
        notifier.notify(join("churn-0", "alice", 1));
        let held: Vec<String> = notifier
            .inner
            .lanes
            .iter()
            .flat_map(|lane| {
                let queued = lane.queue();
                assert_eq!(queued.dropped, 0);
                let held: Vec<String> = queued
                    .rooms
                    .items
                    .iter()
                    .map(|(_, n, _)| described(n))
                    .collect();
                held
            })
            .collect();
        assert!(held.contains(&"vacated victim 1".to_owned()), "{held:?}");
        assert!(held.contains(&"join churn-0 alice".to_owned()), "{held:?}");
        for k in 0..50u64 {
            let last = format!("vacated churn-{k} {}", (950 + k) * 2 + 1);
            assert!(held.contains(&last), "{last} missing: {held:?}");
            assert!(
                held.contains(&format!("leave churn-{k} mallory")),
                "{held:?}"
            );
        }
        // At most the one each lane tried besides the newest of each subject.
        assert!(held.len() <= 2 + 100 + LANES, "{}: {held:?}", held.len());
        assert!(seen.lock().unwrap().is_empty());
    }

    /// What the lane tried to send is never superseded: the backend may have taken it.
    #[tokio::test(start_paused = true)]
    async fn a_notification_the_lane_tried_is_not_superseded() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let hook = {
            let (release, seen) = (release.clone(), seen.clone());
            tower::service_fn(move |n: Notification| {
                let (release, seen, calls) = (release.clone(), seen.clone(), calls.clone());
                async move {
                    release.acquire().await.unwrap().forget();
                    // The first call fails (after the backend may have acted on it).
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err("timed out");
                    }
                    seen.lock().unwrap().push(described(&n));
                    Ok(())
                }
            })
        };
        let notifier = Notifier::new(boxed(hook), 100);
        notifier.notify(occupied("lobby", 1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        for seq in 2..=5 {
            notifier.notify(if seq % 2 == 0 {
                vacated("lobby", seq)
            } else {
                occupied("lobby", seq)
            });
        }
        // Stale: dropped.
        notifier.notify(vacated("lobby", 4));
        release.add_permits(1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        notifier.notify(vacated("lobby", 6));
        notifier.notify(occupied("lobby", 7));
        release.add_permits(10);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            *seen.lock().unwrap(),
            ["occupied lobby 1", "occupied lobby 7"],
            "2 to 6 superseded"
        );
        notifier.notify(vacated("lobby", 8));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            *seen.lock().unwrap(),
            ["occupied lobby 1", "occupied lobby 7", "vacated lobby 8"]
        );
    }

    /// A presence notification older (a lower `seq`) than the one of its identity waiting
    /// in the queue does not replace it: a presence read's sweep can report a leave after
    /// a later join.
    #[tokio::test(start_paused = true)]
    async fn a_stale_presence_notification_does_not_supersede_a_newer_one() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let (release, seen) = (release.clone(), seen.clone());
            tower::service_fn(move |n: Notification| {
                let (release, seen) = (release.clone(), seen.clone());
                async move {
                    release.acquire().await.unwrap().forget();
                    seen.lock().unwrap().push(described(&n));
                    Ok::<_, &str>(())
                }
            })
        };
        let notifier = Notifier::new(boxed(hook), 100);
        let presence = |joined: bool, seq: u64| {
            let (room, identity) = ("r".into(), "a".into());
            match joined {
                true => Happened::Join {
                    room,
                    identity,
                    seq,
                },
                false => Happened::Leave {
                    room,
                    identity,
                    seq,
                },
            }
        };
        notifier.notify(presence(false, 1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        notifier.notify(presence(true, 5));
        notifier.notify(presence(false, 4));
        release.add_permits(10);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*seen.lock().unwrap(), ["leave r a", "join r a"]);
    }

    /// Sockets opened and closed in a loop while the backend is down push out other
    /// disconnects, not a room's notification.
    #[tokio::test(start_paused = true)]
    async fn disconnects_push_out_disconnects_only() {
        let (hook, seen) = recording(30);
        let notifier = Notifier::new(hook, LANES * 10);
        let head = Arc::new(http::Request::new(()).into_parts().0);
        for id in 0..10 {
            notifier.notify(vacated(&format!("room-{id}"), 1));
        }
        for id in 0..2_000 {
            notifier.notify(disconnect(id, &head));
        }
        tokio::time::sleep(Duration::from_secs(300)).await;
        let seen = seen.lock().unwrap();
        for id in 0..10 {
            let room = format!("vacated room-{id} 1");
            assert!(seen.contains(&room), "{room} was lost: {seen:?}");
        }
        let dropped: u64 = notifier.inner.lanes.iter().map(|l| l.queue().dropped).sum();
        assert!(dropped > 1_900, "{dropped}");
        assert_eq!(seen.len() as u64, 2_010 - dropped, "the rest was sent");
    }

    #[tokio::test(start_paused = true)]
    async fn disconnects_with_big_request_heads_are_bounded_in_bytes() {
        let (hook, _) = recording(usize::MAX);
        let notifier = Notifier::new(hook, 1_000_000);
        let mut head = http::Request::new(()).into_parts().0;
        head.headers
            .insert("cookie", "x".repeat(60 * 1024).parse().unwrap());
        let head = Arc::new(head);
        for id in 0..2_000 {
            notifier.notify(disconnect(id, &head));
        }
        // 2,000 × 60 KiB would be ~120 MiB: each lane keeps at most its share of 64 MiB.
        for lane in &notifier.inner.lanes {
            let queued = lane.queue();
            assert!(
                queued.sockets.bytes <= MAX_BYTES / LANES,
                "{}",
                queued.sockets.bytes
            );
            assert!(queued.dropped > 0, "every lane got more than its share");
        }
    }
}
