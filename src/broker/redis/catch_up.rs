//! Node-side catch-up for history rooms: the subscriber task remembers the last offset it
//! delivered in each history room with local members, drops a frame it already delivered,
//! and after its pub/sub connection was lost and came back, reads what was published
//! meanwhile from the history and delivers it before the live frames that waited on the
//! connection. Where the history cannot fill the gap (another epoch: the history was lost;
//! or it no longer reaches back), the room's local members get a `gap` frame instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::history::HistoryStore;
use crate::broker::FrameSink;
use crate::protocol::server;
use crate::settings::{History, RoomPolicy};

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

    /// After a reconnection: for every history room that had delivered something, what was
    /// published since goes to `sink` (or a `gap` frame when it cannot), before any live
    /// frame is read.
    pub(super) async fn catch_up(&self, store: &HistoryStore, sink: &dyn FrameSink) {
        let rooms: Vec<Arc<str>> = self.rooms().keys().cloned().collect();
        let mut caught = 0usize;
        for room in rooms {
            caught += self.catch_up_room(&room, store, sink).await;
        }
        if caught > 0 {
            tracing::info!(
                messages = caught,
                "caught up on history rooms after reconnecting"
            );
        }
    }

    /// [`Tracks::catch_up`] for one room (a sharded subscription that came back); returns
    /// how many frames it delivered.
    pub(super) async fn catch_up_room(
        &self,
        room: &Arc<str>,
        store: &HistoryStore,
        sink: &dyn FrameSink,
    ) -> usize {
        let Some((history, offset, epoch)) = self.rooms().get(room).and_then(|track| {
            let (offset, epoch) = track.last.clone()?;
            Some((track.history, offset, epoch))
        }) else {
            return 0;
        };
        let recovery = match store.recover(room, history, offset, false).await {
            Ok(recovery) => recovery,
            Err(e) => {
                tracing::warn!(room = &**room, error = %e.report(), "history catch-up failed");
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
