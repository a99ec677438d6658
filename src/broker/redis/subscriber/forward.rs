//! What the subscriber does with a message read from a pub/sub connection: hand it to the
//! sink unchanged (copied once out of the read buffer; see `resp`), unless it is one the
//! room's members have had already, or one a catch-up about to run will read from the
//! history in its place.

use std::collections::HashSet;
use std::sync::Arc;

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::super::resp::Messages;
use super::catch_up::{Admit, Tracks};
use crate::broker::{FrameSink, Keys};
use crate::protocol::server;

/// Which messages read from Redis are not delivered when they arrive.
#[derive(Debug, Clone, Copy)]
pub(super) enum Held<'a> {
    Nothing,
    /// History frames of these rooms, which are being subscribed (again) and will then be
    /// caught up from their history: delivered now, a live frame of a room subscribed in
    /// an early chunk would come before older missed ones, and the catch-up would start
    /// after it.
    Rooms(&'a HashSet<Arc<str>>),
}

/// The shared parts a message needs on its way to the sink.
#[derive(Clone, Copy)]
pub(super) struct Forward<'a> {
    pub(super) keys: &'a Keys,
    pub(super) sink: &'a dyn FrameSink,
    pub(super) tracks: &'a Tracks,
}

impl<'a> Forward<'a> {
    /// Where a connection's messages go: to the sink, but those `held`.
    pub(super) fn messages(self, held: Held<'a>) -> Forwarding<'a> {
        Forwarding {
            forward: self,
            held,
            room: String::new(),
            run: Vec::new(),
        }
    }
}

/// The messages of one read from a connection on their way to the sink. Consecutive
/// messages of one room go as one run (in fanout, a read holds many messages of one room:
/// each member's queue is then locked and its socket woken once for all of them); a run
/// ends with a message of another room, or when the connection
/// [flushes](Messages::flush), before it waits for bytes or returns.
pub(super) struct Forwarding<'a> {
    forward: Forward<'a>,
    held: Held<'a>,
    /// The room of the run, when `run` is not empty.
    room: String,
    run: Vec<Utf8Bytes>,
}

impl Messages for Forwarding<'_> {
    /// Adds a message received on `channel` to the run, unless it is held.
    fn message(&mut self, channel: &[u8], payload: &[u8]) {
        let Forward { keys, tracks, .. } = self.forward;
        let Some(room) = room_of(keys, channel) else {
            return;
        };
        match std::str::from_utf8(payload) {
            // Only frames the history keeps (those with an offset): a join or leave event
            // is not in it and would be lost.
            Ok(frame) if is_held(self.held, room, frame, tracks) => {}
            Ok(frame) => {
                let frame = Utf8Bytes::from(frame.to_owned());
                // A history room's frame already delivered (after a catch-up) is dropped.
                let gap = match tracks.admit(room, &frame) {
                    Admit::Drop => return,
                    Admit::Deliver => None,
                    Admit::AfterGap(gap) => Some(gap),
                };
                if self.room != room {
                    self.flush();
                    room.clone_into(&mut self.room);
                }
                self.run.extend(gap);
                self.run.push(frame);
            }
            Err(_) => tracing::warn!(room, "dropped a non-UTF-8 frame received from Redis"),
        }
    }

    fn flush(&mut self) {
        match self.run.as_slice() {
            [] => return,
            [frame] => self.forward.sink.deliver(&self.room, frame),
            _ => {
                let run: std::sync::Arc<[Utf8Bytes]> = self.run.drain(..).collect();
                self.forward.sink.deliver_run(&self.room, &run);
            }
        }
        self.run.clear();
    }
}

impl Drop for Forwarding<'_> {
    /// Nothing kept back is lost (a connection flushes before every wait, so there is
    /// nothing left here unless a caller forgot to).
    fn drop(&mut self) {
        self.flush();
    }
}

/// The room whose channel `channel` is, if it is one of ours.
pub(super) fn room_of<'c>(keys: &Keys, channel: &'c [u8]) -> Option<&'c str> {
    keys.room_of_channel(std::str::from_utf8(channel).ok()?)
}

fn is_held(held: Held<'_>, room: &str, frame: &str, tracks: &Tracks) -> bool {
    match held {
        Held::Nothing => false,
        Held::Rooms(rooms) => {
            rooms.contains(room) && tracks.holds(room) && server::position_of(frame).is_some()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::protocol::server::PresenceEvent;
    use crate::settings::{History, RoomPolicy, RoomSettings};

    /// Every frame delivered, and the runs (room and length) delivered as runs.
    #[derive(Default)]
    struct Delivered(Mutex<Vec<String>>, Mutex<Vec<(String, usize)>>);

    impl FrameSink for Delivered {
        fn deliver(&self, _room: &str, frame: &Utf8Bytes) {
            self.0.lock().unwrap().push(frame.to_string());
        }
        fn deliver_run(&self, room: &str, run: &std::sync::Arc<[Utf8Bytes]>) {
            self.1.lock().unwrap().push((room.to_owned(), run.len()));
            for frame in run.iter() {
                self.deliver(room, frame);
            }
        }
    }

    /// Consecutive messages of one room reach the sink as one run, in order; a message of
    /// another room ends the run, and so does a flush; nothing waits past a flush.
    #[test]
    fn consecutive_messages_of_a_room_go_as_one_run() {
        let tracks = Tracks::new(RoomPolicy::default());
        let keys = Keys::new("thinws");
        let sink = Delivered::default();
        let forward = Forward {
            keys: &keys,
            sink: &sink,
            tracks: &tracks,
        };
        let mut messages = forward.messages(Held::Nothing);
        let sent = [("a", "1"), ("a", "2"), ("a", "3"), ("b", "4"), ("a", "5")];
        for (room, frame) in sent {
            messages.message(keys.room_channel(room).as_bytes(), frame.as_bytes());
        }
        assert_eq!(*sink.0.lock().unwrap(), ["1", "2", "3", "4"]);
        messages.flush();
        assert_eq!(*sink.0.lock().unwrap(), ["1", "2", "3", "4", "5"]);
        let runs = [("a".to_owned(), 3)];
        assert_eq!(*sink.1.lock().unwrap(), runs, "single frames go one by one");
        messages.message(keys.room_channel("b").as_bytes(), b"6");
        drop(messages);
        assert_eq!(sink.0.lock().unwrap().len(), 6, "dropped, it flushes");
    }

    /// While rooms are subscribed again, a history room's messages wait for the catch-up
    /// (which reads them from the history), but its join and leave events, which the
    /// history does not keep, are delivered: held, they would be lost. A history room not
    /// being subscribed again is not held at all.
    #[test]
    fn held_history_rooms_keep_their_join_and_leave_events() {
        let mut policy = RoomPolicy::default();
        let history = History::new(10, Duration::from_secs(60));
        policy.default_settings(RoomSettings::with_history(history));
        let tracks = Tracks::new(policy);
        let keys = Keys::new("thinws");
        let sink = Delivered::default();
        let forward = Forward {
            keys: &keys,
            sink: &sink,
            tracks: &tracks,
        };
        let (room, other): (Arc<str>, Arc<str>) = ("chat".into(), "other".into());
        tracks.opened(&room);
        tracks.opened(&other);
        let held: HashSet<Arc<str>> = [room.clone()].into();
        let payload = serde_json::value::RawValue::from_string("1".into()).unwrap();
        let frame = |room: &str, offset| {
            server::with_position(&server::delivery(room, "c1", &payload), offset, "e")
        };
        let (message, elsewhere) = (frame(&room, 4), frame(&other, 9));
        let join = server::presence_event(PresenceEvent::Join, &room, "c2");
        for (room, frame) in [(&room, &message), (&room, &join), (&other, &elsewhere)] {
            let channel = keys.room_channel(room);
            let mut messages = forward.messages(Held::Rooms(&held));
            messages.message(channel.as_bytes(), frame.as_bytes());
        }
        assert_eq!(*sink.0.lock().unwrap(), [join.clone(), elsewhere.clone()]);
        let channel = keys.room_channel(&room);
        forward
            .messages(Held::Nothing)
            .message(channel.as_bytes(), message.as_bytes());
        assert_eq!(*sink.0.lock().unwrap(), [join, elsewhere, message]);
    }
}
