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

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::super::history::HistoryStore;
use crate::broker::{FrameSink, Recovery};
use crate::protocol::server;
use crate::settings::{History, RoomPolicy};

/// History rooms read at once while catching up.
const CONCURRENT_READS: usize = 16;
/// How many of the last frames delivered in a history room the subscriber remembers (by
/// fingerprint), to tell a frame delivered again from a new frame at a reused offset.
const REMEMBERED: usize = 16;

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
    /// Fingerprints of the frames delivered at the offsets up to `last`, one per offset,
    /// `last`'s at the back (at most [`REMEMBERED`]).
    recent: VecDeque<u64>,
}

impl Track {
    /// Forgets where the room stands: it stands at `top` (if any) with nothing remembered.
    fn reset(&mut self, top: Option<(u64, Arc<str>)>) {
        self.last = top;
        self.recent.clear();
    }

    /// The history's top is `top` in `epoch`: if that is below the last frame delivered in
    /// the same epoch, the room stands at `top` again, remembering the frames up to it.
    /// Returns whether it went back.
    fn cut_back(&mut self, top: u64, epoch: &str) -> bool {
        match &self.last {
            Some((last, last_epoch)) if **last_epoch == *epoch && *last > top => {
                let above = (*last - top) as usize;
                self.recent
                    .truncate(self.recent.len().saturating_sub(above));
                self.last = Some((top, last_epoch.clone()));
                true
            }
            _ => false,
        }
    }
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
    /// Fingerprints frames (keyed per node: a publisher cannot choose a frame whose
    /// fingerprint matches another's).
    hasher: RandomState,
}

impl Tracks {
    pub(super) fn new(policy: RoomPolicy) -> Self {
        Tracks {
            enabled: policy.may_have_history(),
            policy,
            rooms: Mutex::default(),
            hasher: RandomState::new(),
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
                    recent: VecDeque::new(),
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
    /// A frame at an offset delivered already that is not the frame delivered there means
    /// that the history went back: a Redis failover lost writes this node had delivered
    /// (replication is asynchronous), and the new master gives their offsets again. The
    /// frame is delivered after a `gap` that moves the members back to the offset before
    /// it (the clients then take it), and the room goes on from there. The subscriber can
    /// tell so for the last [`REMEMBERED`] offsets; a frame older than those is dropped.
    pub(super) fn admit(&self, room: &str, frame: &Utf8Bytes) -> Admit {
        if !self.enabled {
            return Admit::Deliver;
        }
        let Some((offset, epoch)) = server::position_of(frame) else {
            return Admit::Deliver;
        };
        let fingerprint = self.hasher.hash_one(frame.as_bytes());
        let mut rooms = self.rooms();
        let Some(track) = rooms.get_mut(room) else {
            return Admit::Deliver;
        };
        let Some((last, last_epoch)) = &track.last else {
            track.reset(Some((offset, epoch.into())));
            track.recent.push_back(fingerprint);
            return Admit::Deliver;
        };
        let last = *last;
        if **last_epoch != *epoch || offset > last {
            if **last_epoch != *epoch || offset != last + 1 {
                track.reset(None);
            }
            track.last = Some((offset, epoch.into()));
            track.recent.push_back(fingerprint);
            if track.recent.len() > REMEMBERED {
                track.recent.pop_front();
            }
            return Admit::Deliver;
        }
        // At or below the last offset: delivered already, unless the frame remembered
        // there is another one.
        let back = (last - offset) as usize;
        let Some(at) = track.recent.len().checked_sub(back + 1) else {
            return Admit::Drop;
        };
        if track.recent[at] == fingerprint {
            return Admit::Drop;
        }
        tracing::warn!(room, offset, "a history room's offsets went back (a failover lost writes); telling its members a gap");
        crate::metrics::gap();
        track.recent.truncate(at);
        track.recent.push_back(fingerprint);
        track.last = Some((offset, epoch.into()));
        let gap = server::gap(room, offset.saturating_sub(1), epoch);
        Admit::AfterGap(Utf8Bytes::from(gap))
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

    /// Reads `room`'s history after `since`, logging a failure.
    async fn read(
        &self,
        room: &str,
        store: &HistoryStore,
        history: History,
        since: u64,
        epoch: &str,
    ) -> Option<Recovery> {
        match store
            .recover(room, history, (since, epoch), None, false)
            .await
        {
            Ok(recovery) => Some(recovery),
            Err(e) => {
                tracing::warn!(room, error = %e.report(), "history catch-up failed");
                None
            }
        }
    }

    /// [`Tracks::catch_up`] for one history room; returns how many frames it delivered.
    async fn catch_up_room(
        &self,
        room: &Arc<str>,
        store: &HistoryStore,
        sink: &dyn FrameSink,
    ) -> usize {
        let Some((history, last, remembered)) = self
            .rooms()
            .get(room)
            .map(|track| (track.history, track.last.clone(), track.recent.len() as u64))
        else {
            return 0;
        };
        let Some((offset, epoch)) = last else {
            // Nothing delivered here yet: nothing says where the room's members stand.
            gap_unplaced(room, sink);
            return 0;
        };
        // Read back over the remembered frames: they say whether the history is still the
        // one delivered (see `admit`). Where the history does not reach back that far (a
        // small one that wrapped), or has more than its size since, read from as far back
        // as it can be recovered, at most from the last frame delivered.
        let mut since = offset.saturating_sub(remembered);
        let mut recovery = self.read(room, store, history, since, &epoch).await;
        let retry = recovery.as_ref().and_then(|r| {
            if r.recovers(since, &epoch, history.size) || *r.top.epoch != *epoch {
                return None;
            }
            let top = r.top.offset;
            let from = since
                .max(r.oldest.saturating_sub(1))
                .max(top.saturating_sub(history.size as u64))
                .min(top)
                .min(offset);
            (from != since).then_some(from)
        });
        if let Some(from) = retry {
            since = from;
            recovery = self.read(room, store, history, since, &epoch).await;
        }
        let Some(recovery) = recovery else {
            crate::metrics::gap();
            sink.deliver(room, &Utf8Bytes::from(server::gap(room, offset, &epoch)));
            return 0;
        };
        let top = &recovery.top;
        if !recovery.recovers(since, &epoch, history.size) {
            crate::metrics::gap();
            sink.deliver(
                room,
                &Utf8Bytes::from(server::gap(room, top.offset, &top.epoch)),
            );
            if let Some(track) = self.rooms().get_mut(room) {
                track.reset((!top.epoch.is_empty()).then(|| (top.offset, top.epoch.clone())));
            }
            return 0;
        }
        let mut caught = 0;
        for frame in &recovery.frames {
            match self.admit(room, frame) {
                Admit::Drop => continue,
                Admit::Deliver => {}
                Admit::AfterGap(gap) => sink.deliver(room, &gap),
            }
            caught += 1;
            sink.deliver(room, frame);
        }
        // A history whose top is below what was delivered went back (a failover lost
        // writes, and nothing new took their offsets yet): the members are told, and the
        // room goes on from its top.
        let mut rooms = self.rooms();
        if let Some(track) = rooms.get_mut(room) {
            if track.cut_back(top.offset, &top.epoch) {
                drop(rooms);
                crate::metrics::gap();
                sink.deliver(
                    room,
                    &Utf8Bytes::from(server::gap(room, top.offset, &top.epoch)),
                );
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

    /// A failover that lost several writes: the first new frame at a reused offset goes
    /// after a gap, and the room goes on from it; only frames older than what the
    /// subscriber remembers are dropped unchecked.
    #[test]
    fn a_history_that_went_back_several_offsets_loses_no_new_frame() {
        let mut policy = RoomPolicy::default();
        let history = History::new(100, Duration::from_secs(60));
        policy.rule("h", RoomSettings::with_history(history));
        let tracks = Tracks::new(policy);
        tracks.opened(&"h".into());
        for offset in 1..=5 {
            assert!(matches!(
                tracks.admit("h", &frame(offset, "old")),
                Admit::Deliver
            ));
        }
        // Offsets 3 to 5 were lost; the catch-up reads 2 and 3 again, then 4.
        assert!(matches!(tracks.admit("h", &frame(2, "old")), Admit::Drop));
        let Admit::AfterGap(gap) = tracks.admit("h", &frame(3, "new")) else {
            panic!("a new frame at offset 3 was not told");
        };
        assert_eq!(server::position_of(&gap).map(|(at, _)| at), Some(2));
        assert!(matches!(
            tracks.admit("h", &frame(4, "new")),
            Admit::Deliver
        ));
        // The same frames live, after the catch-up delivered them: dropped.
        assert!(matches!(tracks.admit("h", &frame(3, "new")), Admit::Drop));
        assert!(matches!(tracks.admit("h", &frame(4, "new")), Admit::Drop));
        assert!(matches!(
            tracks.admit("h", &frame(5, "new")),
            Admit::Deliver
        ));
        for offset in 6..=40 {
            assert!(matches!(
                tracks.admit("h", &frame(offset, "new")),
                Admit::Deliver
            ));
        }
        // The history's top fell below what was delivered, with nothing new yet: the room
        // stands at the top again, remembering the frames up to it.
        let mut rooms = tracks.rooms();
        let track = rooms.get_mut("h").unwrap();
        assert!(!track.cut_back(40, "e"));
        assert!(!track.cut_back(30, "other"));
        assert!(track.cut_back(37, "e"));
        assert_eq!(track.recent.len(), REMEMBERED - 3);
        drop(rooms);
        assert!(matches!(tracks.admit("h", &frame(37, "new")), Admit::Drop));
        assert!(matches!(
            tracks.admit("h", &frame(38, "newer")),
            Admit::Deliver
        ));
        for offset in 39..=40 {
            assert!(matches!(
                tracks.admit("h", &frame(offset, "new")),
                Admit::Deliver
            ));
        }
        // Older than what it remembers: dropped.
        let old = 40 - REMEMBERED as u64;
        assert!(matches!(
            tracks.admit("h", &frame(old, "other")),
            Admit::Drop
        ));
        assert!(matches!(
            tracks.admit("h", &frame(old + 1, "other")),
            Admit::AfterGap(_)
        ));
    }
}
