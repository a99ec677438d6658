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
    /// That frame (shared with its deliveries).
    last_frame: Option<Utf8Bytes>,
}

/// What to do with a frame received for a history room (see [`Tracks::admit`]).
#[derive(Debug)]
pub(super) enum Admit {
    /// Deliver it.
    Deliver,
    /// Delivered already: drop it.
    Drop,
    /// The history went back: deliver this `gap` frame, then the frame.
    AfterGap(Utf8Bytes),
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
                    last_frame: None,
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
    ///
    /// A frame at the last offset delivered that is not the frame delivered there means
    /// that the history went back: a Redis failover lost writes this node had delivered
    /// (replication is asynchronous), and the new master gives their offsets again. The
    /// frame is delivered after a `gap` that moves the members back to the offset before
    /// it (the clients then take it): what the failover lost, and any new frame before this
    /// one, may be missing, and the members are told so.
    pub(super) fn admit(&self, room: &str, frame: &Utf8Bytes) -> Admit {
        if !self.enabled {
            return Admit::Deliver;
        }
        let mut rooms = self.rooms();
        let Some(track) = rooms.get_mut(room) else {
            return Admit::Deliver;
        };
        let Some((offset, epoch)) = server::position_of(frame) else {
            return Admit::Deliver;
        };
        if let Some((last, last_epoch)) = &track.last {
            if **last_epoch == *epoch && offset <= *last {
                let went_back =
                    offset == *last && track.last_frame.as_ref().is_some_and(|last| last != frame);
                if !went_back {
                    return Admit::Drop;
                }
                tracing::warn!(room, offset, "a history room's offsets went back (a failover lost writes); telling its members a gap");
                crate::metrics::gap();
                track.last_frame = Some(frame.clone());
                let gap = server::gap(room, offset.saturating_sub(1), epoch);
                return Admit::AfterGap(Utf8Bytes::from(gap));
            }
        }
        track.last = Some((offset, epoch.into()));
        track.last_frame = Some(frame.clone());
        Admit::Deliver
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
        // Read from one frame back: the frame at `offset` says whether the history is still
        // the one delivered (see `admit`).
        let since = offset.saturating_sub(1);
        let recovery = match store
            .recover(room, history, (since, &epoch), None, false)
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
        // A history whose top is below what was delivered went back (a failover lost
        // writes): told as a gap below, and the members go on from its top.
        let went_back = *recovery.top.epoch == *epoch && recovery.top.offset < offset;
        if !went_back && recovery.recovers(since, &epoch, history.size) {
            for frame in &recovery.frames {
                match self.admit(room, frame) {
                    Admit::Drop => continue,
                    Admit::Deliver => {}
                    Admit::AfterGap(gap) => sink.deliver(room, &gap),
                }
                caught += 1;
                sink.deliver(room, frame);
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
                track.last_frame = None;
            }
        }
        caught
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::settings::RoomSettings;

    fn frame(offset: u64, payload: &str) -> Utf8Bytes {
        let body = format!(r#"{{"type":"message","roomID":"h","payload":"{payload}"}}"#);
        server::with_position(&body, offset, "e").into()
    }

    /// A frame delivered again is dropped; another frame at the last offset delivered (a
    /// failover lost the writes that had it, and the new master gave the offset again) goes
    /// after a gap that moves the members back to the offset before it.
    #[test]
    fn a_history_that_went_back_is_told_as_a_gap() {
        let mut policy = RoomPolicy::default();
        let history = History::new(100, Duration::from_secs(60));
        policy.rule("h", RoomSettings::with_history(history));
        let tracks = Tracks::new(policy);
        let room: Arc<str> = "h".into();
        tracks.opened(&room);
        assert!(matches!(tracks.admit("h", &frame(1, "a")), Admit::Deliver));
        assert!(matches!(tracks.admit("h", &frame(2, "b")), Admit::Deliver));
        assert!(matches!(tracks.admit("h", &frame(2, "b")), Admit::Drop));
        assert!(matches!(tracks.admit("h", &frame(1, "a")), Admit::Drop));
        let Admit::AfterGap(gap) = tracks.admit("h", &frame(2, "new")) else {
            panic!("a new frame at offset 2 was not told");
        };
        assert_eq!(server::position_of(&gap).map(|(at, _)| at), Some(1));
        assert!(matches!(tracks.admit("h", &frame(2, "new")), Admit::Drop));
        assert!(matches!(tracks.admit("h", &frame(3, "c")), Admit::Deliver));
    }
}
