//! The subscriber's bookkeeping of its rooms: how many local acquisitions each room has,
//! and which of them have no subscription (a subscribe that failed or a connection lost
//! while the room is still counted).
//!
//! A failed subscribe leaves the room counted until its caller releases it (the caller's
//! cleanup always does): giving the count back at the failure too would release it twice,
//! and the second release could unsubscribe a room that another socket acquired meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What to do for an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acquired {
    /// The room is subscribed already: confirm at once.
    Subscribed,
    /// Subscribe (the room is new, or its last subscribe failed), then call
    /// [`RoomCounts::subscribed`] with the outcome.
    Subscribe,
}

/// Acquisitions per room, and their subscriptions' state.
#[derive(Debug, Default)]
pub(super) struct RoomCounts {
    counts: HashMap<Arc<str>, usize>,
    /// Counted rooms whose last subscribe failed.
    failed: HashSet<Arc<str>>,
    /// Counted rooms Redis subscribed at least once: a room among them that lost its
    /// subscription may have missed messages; one never subscribed has no member that
    /// was told it joined.
    confirmed: HashSet<Arc<str>>,
}

impl RoomCounts {
    /// Counts one acquisition of `room`.
    pub(super) fn acquire(&mut self, room: &Arc<str>) -> Acquired {
        let count = self.counts.entry(room.clone()).or_insert(0);
        *count += 1;
        if *count > 1 && !self.failed.contains(room) {
            Acquired::Subscribed
        } else {
            Acquired::Subscribe
        }
    }

    /// The subscribe that an acquisition asked for succeeded, or not.
    pub(super) fn subscribed(&mut self, room: &Arc<str>, ok: bool) {
        if !self.counts.contains_key(room) {
            return;
        }
        if ok {
            self.failed.remove(room);
            self.confirmed.insert(room.clone());
        } else {
            self.failed.insert(room.clone());
        }
    }

    /// Gives one acquisition back; `true` when it was the room's last (unsubscribe then).
    pub(super) fn release(&mut self, room: &str) -> bool {
        match self.counts.get_mut(room) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(room);
                self.failed.remove(room);
                self.confirmed.remove(room);
                true
            }
            None => false,
        }
    }

    /// The counted rooms whose last subscribe failed: not receiving anything until a
    /// subscribe succeeds (retried by the subscriber).
    pub(super) fn failed(&self) -> Vec<Arc<str>> {
        self.failed.iter().cloned().collect()
    }

    /// Whether some counted room's last subscribe failed.
    pub(super) fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Whether `room` is counted and Redis subscribed it at least once since.
    pub(super) fn was_subscribed(&self, room: &str) -> bool {
        self.confirmed.contains(room)
    }

    /// The counted room equal to `room`, if any.
    pub(super) fn get(&self, room: &str) -> Option<&Arc<str>> {
        self.counts.get_key_value(room).map(|(room, _)| room)
    }

    /// How many counted rooms are subscribed (not failed).
    pub(super) fn subscribed_count(&self) -> usize {
        self.counts.len() - self.failed.len()
    }

    /// Whether no room is counted.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed subscribe racing a successful one: socket A's subscribe fails, socket B acquires the same room
    /// before A's cleanup releases it. B's acquisition subscribes again, and A's release
    /// does not unsubscribe B's room.
    #[test]
    fn a_failed_subscribe_racing_a_successful_one_keeps_the_survivor_subscribed() {
        let room: Arc<str> = "r".into();
        let mut counts = RoomCounts::default();
        assert_eq!(counts.acquire(&room), Acquired::Subscribe);
        counts.subscribed(&room, false);
        // B, before A's cleanup: the room must be subscribed again, not taken as done.
        assert_eq!(counts.acquire(&room), Acquired::Subscribe);
        counts.subscribed(&room, true);
        // A's cleanup: not the last acquisition, so no unsubscribe.
        assert!(!counts.release(&room));
        assert_eq!(
            counts.acquire(&room),
            Acquired::Subscribed,
            "still subscribed"
        );
        assert!(!counts.release(&room));
        assert!(counts.release(&room), "B's release is the last");
        assert!(counts.is_empty());
    }

    /// A held room whose subscription was lost and could not be made again is listed
    /// for a retry until one succeeds, and no longer once it is released.
    #[test]
    fn a_room_whose_subscribe_failed_is_retried_until_it_succeeds() {
        let room: Arc<str> = "r".into();
        let mut counts = RoomCounts::default();
        counts.acquire(&room);
        counts.subscribed(&room, true);
        assert!(counts.failed().is_empty());
        // Its slot moved and subscribing on the new owner failed.
        counts.subscribed(&room, false);
        assert_eq!(counts.failed(), vec![room.clone()]);
        assert_eq!(
            counts.acquire(&room),
            Acquired::Subscribe,
            "a new member does not take a lost subscription as done"
        );
        counts.subscribed(&room, true);
        assert!(counts.failed().is_empty());
        counts.subscribed(&room, false);
        counts.release(&room);
        counts.release(&room);
        assert!(counts.failed().is_empty(), "released: nothing to retry");
    }
}
