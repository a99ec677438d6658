//! The node's notification queue: hands each [`Notification`] to the notification hook,
//! after the fact, without ever making a socket wait.
//!
//! Notifications go to one of a few lanes, chosen by their room (a disconnect by its
//! socket), so that a room's notifications keep their order while other rooms' go on. Each
//! lane is a task that calls the hook with its oldest notification and, while that fails,
//! calls it again with the same one after a growing pause (100 ms doubling to 10 s, with
//! jitter). A lane holds at most its share of the queue's bound; past it the oldest is
//! dropped and counted (`thinws_notifications_dropped_total`), so a backend that is down
//! for long costs the node a bounded amount of memory and nothing else.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Notify;
use tower::{Service, ServiceExt};

use crate::hooks::{Happened, Hook, Notification};

/// How many lanes (hook calls at once) a node has.
const LANES: usize = 4;

/// The node's notification queue (cheap to clone; the lanes stop once every clone is gone).
#[derive(Clone)]
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    hook: Hook<Notification, ()>,
    lanes: Vec<Arc<Lane>>,
    per_lane: usize,
    hasher: RandomState,
    started: OnceLock<()>,
}

struct Lane {
    queue: Mutex<Queued>,
    ready: Notify,
    /// Set when the notifier is gone: the lane sends what it holds, once each, and ends.
    closed: AtomicBool,
}

#[derive(Default)]
struct Queued {
    items: VecDeque<(u64, Notification)>,
    /// The number the next pushed notification gets (tells whether the front changed).
    next: u64,
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
                    closed: AtomicBool::new(false),
                })
            })
            .collect();
        Notifier {
            inner: Arc::new(Inner {
                hook,
                lanes,
                per_lane: capacity.div_ceil(LANES).max(1),
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
        {
            let mut queued = lane.queue();
            if queued.items.len() >= inner.per_lane {
                queued.items.pop_front();
                crate::metrics::notification_dropped();
                crate::metrics::notifications_queued(-1.0);
                tracing::warn!("notification queue full: dropped the oldest notification");
            }
            let number = queued.next;
            queued.next += 1;
            queued.items.push_back((number, notification));
        }
        crate::metrics::notifications_queued(1.0);
        lane.ready.notify_one();
    }
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
        let front = lane.queue().items.front().cloned();
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
        match sent {
            Ok(()) => {
                crate::metrics::notification_sent();
                backoff = pauses();
            }
            Err(e) => {
                crate::metrics::notification_failed();
                tracing::warn!(error = %e, "notification hook failed; retrying");
                if !closed {
                    let pause = backoff.next().unwrap_or(Duration::from_secs(10));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        // A full lane dropped the front: go on with the new front at once.
                        _ = wait_until_dropped(&lane, number) => {}
                    }
                    continue;
                }
            }
        }
        let mut queued = lane.queue();
        if queued.items.front().is_some_and(|(n, _)| *n == number) {
            queued.items.pop_front();
            crate::metrics::notifications_queued(-1.0);
        }
    }
}

/// Resolves once notification `number` is no longer the lane's front.
async fn wait_until_dropped(lane: &Lane, number: u64) {
    loop {
        let notified = lane.ready.notified();
        if lane.queue().items.front().is_none_or(|(n, _)| *n != number) {
            return;
        }
        notified.await;
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
        let held: Vec<u64> = lane.queue().items.iter().map(|(_, n)| seq_of(n)).collect();
        assert_eq!(held, vec![7, 8, 9], "the newest three are kept");
        assert!(seen.lock().unwrap().is_empty());
    }
}
