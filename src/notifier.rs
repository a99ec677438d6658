//! The node's notification queue: hands each [`Notification`] to the notification hook,
//! after the fact, without ever making a socket wait.
//!
//! Notifications go to one of a few lanes, chosen by their room (a disconnect by its
//! socket), so that a room's notifications keep their order while other rooms' go on. Each
//! lane is a task that calls the hook with its oldest notification and, while that fails,
//! calls it again with the same one after a growing pause (100 ms doubling to 10 s, with
//! jitter). A lane holds at most its share of the queue's bounds, in notifications and in
//! bytes (a disconnect holds its socket's upgrade request, which a peer chose); past them
//! the lane's oldest is dropped and counted (`thinws_notifications_dropped_total`), so a
//! backend that is down for long costs the node a bounded amount of memory and nothing
//! else.

use std::collections::VecDeque;
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
/// The most bytes (roughly: what the notifications hold) the queue keeps.
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

#[derive(Default)]
struct Queued {
    /// Each notification with its number and its size (see [`size_of`]).
    items: VecDeque<(u64, Notification, usize)>,
    bytes: usize,
    /// The number the next pushed notification gets (tells whether the front changed).
    next: u64,
    dropped: u64,
}

impl Queued {
    fn pop_front(&mut self) {
        if let Some((_, _, size)) = self.items.pop_front() {
            self.bytes -= size;
            crate::metrics::notifications_queued(-1.0);
        }
    }
}

/// Roughly the bytes `notification` holds.
fn size_of(notification: &Notification) -> usize {
    let held = match &notification.what {
        Happened::RoomOccupied { room, .. } | Happened::RoomVacated { room, .. } => room.len(),
        Happened::Join { room, identity } | Happened::Leave { room, identity } => {
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
            while !queued.items.is_empty()
                && (queued.items.len() >= inner.per_lane
                    || queued.bytes + size > inner.bytes_per_lane)
            {
                queued.pop_front();
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
            queued.bytes += size;
            queued.items.push_back((number, notification, size));
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
                if lane.queue().items.is_empty() {
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
        let front = lane
            .queue()
            .items
            .front()
            .map(|(n, item, _)| (*n, item.clone()));
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
        if queued.items.front().is_some_and(|(n, _, _)| *n == number) {
            queued.pop_front();
            if given_up {
                crate::metrics::notification_dropped();
            }
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

    fn seq_of(n: &Notification) -> u64 {
        match n.what() {
            Happened::RoomOccupied { seq, .. } => *seq,
            _ => unreachable!(),
        }
    }

    /// A hook that fails its first `failures` calls and records the rest.
    fn recording(failures: usize) -> (Hook<Notification, ()>, Arc<Mutex<Vec<u64>>>) {
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
                    seen.lock().unwrap().push(seq_of(&n));
                    Ok(())
                }
            })
        };
        (boxed(hook), seen)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_hook_gets_the_same_notification_again_and_order_is_kept() {
        let (hook, seen) = recording(5);
        let notifier = Notifier::new(hook, 100);
        for seq in 0..10 {
            notifier.notify(occupied("lobby", seq));
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(*seen.lock().unwrap(), (0..10).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_lane_drops_its_oldest() {
        let (hook, seen) = recording(usize::MAX);
        let notifier = Notifier::new(hook, LANES * 3);
        for seq in 0..10 {
            notifier.notify(occupied("lobby", seq));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lane = notifier
            .inner
            .lanes
            .iter()
            .find(|lane| !lane.queue().items.is_empty())
            .expect("one lane holds the room");
        let held: Vec<u64> = lane
            .queue()
            .items
            .iter()
            .map(|(_, n, _)| seq_of(n))
            .collect();
        assert_eq!(held, vec![7, 8, 9], "the newest three are kept");
        assert!(seen.lock().unwrap().is_empty());
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
            notifier.notify(Happened::Disconnect {
                socket: Box::new(crate::hooks::SocketInfo {
                    id,
                    connection_id: "c".into(),
                    bound: false,
                    request: head.clone(),
                    granted: Arc::default(),
                }),
                reason: crate::hooks::DisconnectReason::Closed,
            });
        }
        // 2,000 × 60 KiB would be ~120 MiB: each lane keeps at most its share of 64 MiB.
        for lane in &notifier.inner.lanes {
            let queued = lane.queue();
            assert!(queued.bytes <= MAX_BYTES / LANES, "{}", queued.bytes);
            assert!(queued.dropped > 0, "every lane got more than its share");
        }
    }
}
