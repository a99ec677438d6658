//! Node-side catch-up for history rooms: the subscriber task remembers the last offset it
//! delivered in each history room with local members, drops a frame it already delivered,
//! and after its pub/sub connection was lost and came back, reads what was published
//! meanwhile from the history and delivers it before the live frames that waited on the
//! connection. Where the history cannot fill the gap (another epoch: the history was lost;
//! or it no longer reaches back), the room's local members get a `gap` frame instead; so do
//! the members of every room without history (nothing can say what they missed), and of a
//! history room the node had delivered nothing in yet (nothing says where to start).
//! Rooms are read a few at a time, so that thousands of history rooms do not queue behind
//! one another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::super::history::HistoryStore;
use crate::broker::FrameSink;
use crate::protocol::server;
use crate::settings::{History, RoomPolicy};

/// History rooms read at once while catching up.
const CONCURRENT_READS: usize = 16;

/// Tells `room`'s local members that they may have missed messages.
fn gap_unplaced(room: &str, sink: &dyn FrameSink) {
    crate::metrics::gap();
    sink.deliver(room, &Utf8Bytes::from(server::gap_unplaced(room)));
}

/// What the subscriber knows of one history room.
#[derive(Debug)]
struct Track {
    history: History,
    /// The offset and epoch of the last frame delivered to the room's local members.
    last: Option<(u64, Arc<str>)>,
}

/// The history rooms this node holds, and where each stands.
pub(super) struct Tracks {
    policy: RoomPolicy,
    /// False when no room can have a history: plain rooms pay nothing here.
    enabled: bool,
    rooms: Mutex<HashMap<Arc<str>, Track>>,
}

impl Tracks {
    pub(super) fn new(policy: RoomPolicy) -> Self {
        Tracks {
            enabled: policy.may_have_history(),
            policy,
            rooms: Mutex::default(),
        }
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<Arc<str>, Track>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node subscribed to `room`.
    pub(super) fn opened(&self, room: &Arc<str>) {
        if let Some(history) = self.policy.settings(room).history {
            self.rooms().insert(
                room.clone(),
                Track {
                    history,
                    last: None,
                },
            );
        }
    }

    /// The node no longer holds `room`.
    pub(super) fn closed(&self, room: &str) {
        self.rooms().remove(room);
    }

    /// Whether `room` is a history room the node holds.
    pub(super) fn holds(&self, room: &str) -> bool {
        self.enabled && self.rooms().contains_key(room)
    }

    /// Whether a frame received for `room` is to be delivered: not one already delivered
    /// (by offset, within one epoch). Remembers it as the room's last.
    pub(super) fn admit(&self, room: &str, frame: &str) -> bool {
        if !self.enabled {
            return true;
        }
        let mut rooms = self.rooms();
        let Some(track) = rooms.get_mut(room) else {
            return true;
        };
        let Some((offset, epoch)) = server::position_of(frame) else {
            return true;
        };
        if let Some((last, last_epoch)) = &track.last {
            if **last_epoch == *epoch && offset <= *last {
                return false;
            }
        }
        track.last = Some((offset, epoch.into()));
        true
    }

    /// After a reconnection, for each of `rooms` (every room the node holds): in a history
    /// room, what was published since goes to `sink`, or a `gap` frame when it cannot; any
    /// other room gets a `gap` frame. All before any live frame is read. Returns how many
    /// rooms without history got a gap.
    pub(super) async fn catch_up<'r>(
        &self,
        rooms: impl Iterator<Item = &'r Arc<str>>,
        store: &HistoryStore,
        sink: &dyn FrameSink,
    ) -> usize {
        let (history_rooms, plain): (Vec<Arc<str>>, Vec<Arc<str>>) = {
            let tracked = self.rooms();
            rooms.cloned().partition(|room| tracked.contains_key(room))
        };
        for room in &plain {
            gap_unplaced(room, sink);
        }
        let mut caught = 0;
        for rooms in history_rooms.chunks(CONCURRENT_READS) {
            let mut reads = Vec::with_capacity(rooms.len());
            for room in rooms {
                reads.push(self.catch_up_room(room, store, sink));
            }
            caught += futures_util::future::join_all(reads)
                .await
                .into_iter()
                .sum::<usize>();
        }
        if caught > 0 {
            tracing::info!(
                messages = caught,
                "caught up on history rooms after reconnecting"
            );
        }
        plain.len()
    }

    /// [`Tracks::catch_up`] for one history room; returns how many frames it delivered.
    async fn catch_up_room(
        &self,
        room: &Arc<str>,
        store: &HistoryStore,
        sink: &dyn FrameSink,
    ) -> usize {
        let Some((history, last)) = self
            .rooms()
            .get(room)
            .map(|track| (track.history, track.last.clone()))
        else {
            return 0;
        };
        let Some((offset, epoch)) = last else {
            // Nothing delivered here yet: nothing says where the room's members stand.
            gap_unplaced(room, sink);
            return 0;
        };
        let recovery = match store
            .recover(room, history, (offset, &epoch), None, false)
            .await
        {
            Ok(recovery) => recovery,
            Err(e) => {
                tracing::warn!(room = &**room, error = %e.report(), "history catch-up failed");
                crate::metrics::gap();
                sink.deliver(room, &Utf8Bytes::from(server::gap(room, offset, &epoch)));
                return 0;
            }
        };
        let mut caught = 0;
        if recovery.recovers(offset, &epoch, history.size) {
            for frame in &recovery.frames {
                if self.admit(room, frame) {
                    caught += 1;
                    sink.deliver(room, frame);
                }
            }
        } else {
            let top = &recovery.top;
            crate::metrics::gap();
            sink.deliver(
                room,
                &Utf8Bytes::from(server::gap(room, top.offset, &top.epoch)),
            );
            if let Some(track) = self.rooms().get_mut(room) {
                track.last = (!top.epoch.is_empty()).then(|| (top.offset, top.epoch.clone()));
            }
        }
        caught
    }
}
