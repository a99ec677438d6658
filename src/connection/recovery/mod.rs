//! A socket's membership of one history room while it recovers what it missed.
//!
//! The socket joins the room through a [`HoldingMember`]: frames delivered live from then on
//! are held while the missed ones are read from the history and queued; then the held ones
//! follow, without those already sent, and from then on frames pass straight through. So
//! the socket gets every message after its `since` exactly once, in offset order.
//!
//! A Redis failover that lost writes gives their offsets again: a live frame at an offset
//! the client holds is told apart from the one it holds by a fingerprint of the
//! [`skipping::REMEMBERED`] highest offsets it was sent, and a `gap` moves the client back,
//! after which the room goes on from the gap as for every other member, without what the
//! client was sent already (see [`skipping`]).

mod skipping;

use std::hash::RandomState;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::outbound::OutboundQueue;
use crate::broker::Position;
use crate::protocol::server;
use crate::rooms::Member;
use skipping::{Skipping, Verdict};

/// Holds a room's live frames for one socket until [`HoldingMember::release`].
#[derive(Debug)]
pub(crate) struct HoldingMember {
    queue: Arc<OutboundQueue>,
    /// The room, for the `gap` frames this member tells itself.
    room: Arc<str>,
    phase: Mutex<Phase>,
    /// Frames held at most; beyond that the socket is a slow reader.
    max_held: usize,
    /// Keys the fingerprints of the frames read (random keys: no client can make its
    /// frame's fingerprint that of another).
    hasher: RandomState,
}

/// Where a [`HoldingMember`] stands.
#[derive(Debug)]
enum Phase {
    /// Live frames wait here while the missed ones are read (`bytes`: their length).
    Holding {
        frames: Vec<Utf8Bytes>,
        bytes: usize,
    },
    /// Released after the history read: a live frame the read returned is dropped (the
    /// read returns on another Redis connection than the node's pub/sub one, so a frame it
    /// covered can still reach the node after it). Live frames come in offset order, so
    /// the first one beyond the read ends this phase.
    Skipping(Skipping),
    /// Frames pass straight through.
    Passing,
}

/// What a live frame turns into for the socket's queue.
enum Out {
    Nothing,
    Frame,
    /// The frame, after this `gap`.
    AfterGap(Utf8Bytes),
}

impl HoldingMember {
    pub(crate) fn new(queue: Arc<OutboundQueue>, room: Arc<str>, max_held: usize) -> Self {
        HoldingMember {
            queue,
            room,
            phase: Mutex::new(Phase::Holding {
                frames: Vec::new(),
                bytes: 0,
            }),
            max_held,
            hasher: RandomState::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `frame` turns into while skipping (the phase may end).
    fn skip(&self, phase: &mut Phase, frame: &str) -> Out {
        let Phase::Skipping(skipping) = phase else {
            return Out::Frame;
        };
        match skipping.verdict(frame, &self.hasher) {
            Verdict::Covered => Out::Nothing,
            Verdict::Out => Out::Frame,
            Verdict::OutAfterGap(offset) => {
                // Not counted in `thinws_gaps_total`, which counts rooms, not sockets.
                tracing::debug!(room = &*self.room, offset, "a history room's offsets went back (a failover lost writes); telling a recovering socket a gap");
                let gap = server::gap(&self.room, offset, skipping.epoch());
                Out::AfterGap(Utf8Bytes::from(gap))
            }
            Verdict::Beyond => {
                *phase = Phase::Passing;
                Out::Frame
            }
        }
    }

    /// Queues the held frames beyond `after` (the position the history read ended at), in
    /// order, and stops holding (under the lock, so that a frame delivered meanwhile comes
    /// after them). `read` holds the frames the read returned, queued already.
    pub(crate) fn release(&self, after: &Position, read: &[Utf8Bytes]) {
        let skipping = Skipping::new(after.offset, after.epoch.clone(), read, &self.hasher);
        let mut phase = self.phase();
        let held = std::mem::replace(&mut *phase, Phase::Skipping(skipping));
        let Phase::Holding { frames, bytes } = held else {
            *phase = held;
            return;
        };
        // Their bytes were counted toward the socket's bound when they were held.
        for frame in frames {
            match self.skip(&mut phase, &frame) {
                Out::Nothing => self.queue.unreserve(frame.len()),
                Out::Frame => {
                    self.queue.offer_reserved(&frame);
                }
                // A gap the queue refuses (the socket is closing) takes its frame along.
                Out::AfterGap(gap) if !self.queue.offer(&gap) => {
                    self.queue.unreserve(frame.len());
                }
                Out::AfterGap(_) => {
                    self.queue.offer_reserved(&frame);
                }
            }
        }
        self.queue.unhold(bytes);
    }
}

impl Drop for HoldingMember {
    /// A member dropped while holding (the socket left the room before its recovery ended)
    /// gives the held bytes back.
    fn drop(&mut self) {
        if let Phase::Holding { bytes, .. } = &*self.phase() {
            self.queue.unreserve(*bytes);
            self.queue.unhold(*bytes);
        }
    }
}

impl Member for HoldingMember {
    fn offer(&self, frame: &Utf8Bytes) -> bool {
        let mut phase = self.phase();
        match &mut *phase {
            Phase::Holding { frames, .. } if frames.len() >= self.max_held => {
                drop(phase);
                self.queue.slow_reader();
                false
            }
            // Held bytes count toward the socket's byte bound (across all the rooms it
            // recovers at once) like queued ones.
            Phase::Holding { frames, bytes } => {
                if !self.queue.hold(frame.len()) {
                    return false;
                }
                *bytes += frame.len();
                frames.push(frame.clone());
                true
            }
            Phase::Skipping(_) | Phase::Passing => {
                let out = self.skip(&mut phase, frame);
                drop(phase);
                match out {
                    Out::Nothing => true,
                    Out::Frame => self.queue.offer(frame),
                    Out::AfterGap(gap) => self.queue.offer(&gap) && self.queue.offer(frame),
                }
            }
        }
    }

    fn queued_bytes(&self) -> usize {
        self.queue.queued()
    }

    fn close(&self, code: CloseCode, reason: &'static str) {
        self.queue.request_close(code, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_frames_follow_without_the_ones_already_sent() {
        let queue = Arc::new(OutboundQueue::new(100, usize::MAX));
        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        for offset in [3, 4, 5] {
            let frame =
                format!(r#"{{"type":"message","payload":0,"offset":{offset},"epoch":"e"}}"#);
            assert!(member.offer(&Utf8Bytes::from(frame)));
        }
        assert!(queue.drain().is_empty(), "held");
        member.release(&at(4), &[]);
        let got = queue.drain();
        assert_eq!(got.len(), 1);
        assert_eq!(server::offset_of(&got[0]), Some(5));
        assert!(member.offer(&Utf8Bytes::from_static(r#"{"offset":6,"epoch":"e"}"#)));
        assert_eq!(queue.drain().len(), 1, "straight through once released");
    }

    fn frame(offset: u64, epoch: &str) -> Utf8Bytes {
        server::with_position(r#"{"type":"message","payload":0}"#, offset, epoch).into()
    }

    fn at(offset: u64) -> Position {
        Position {
            offset,
            epoch: "e".into(),
        }
    }

    /// The history read and the node's pub/sub connection are two Redis connections: a
    /// frame the read covered can reach the member after the release. It is dropped; the
    /// frames after it, and frames of another epoch, pass.
    #[test]
    fn held_frames_count_toward_the_byte_bound_of_the_socket() {
        let queue = Arc::new(OutboundQueue::new(100, 250));
        let first = frame(1, "e");
        // Two rooms recovering at once share the socket's bound.
        let one = HoldingMember::new(queue.clone(), "h".into(), 10);
        let two = HoldingMember::new(queue.clone(), "h".into(), 10);
        assert!(one.offer(&first));
        assert!(two.offer(&first));
        assert_eq!(queue.queued(), 2 * first.len());
        // Released: queued without being counted twice.
        one.release(&at(0), &[]);
        assert_eq!(queue.queued(), 2 * first.len());
        assert_eq!(queue.drain().len(), 1);
        assert_eq!(queue.queued(), first.len());
        drop(two);
        assert_eq!(
            queue.queued(),
            0,
            "a member dropped while holding gives its bytes back"
        );

        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        assert!(member.offer(&first));
        let big = Utf8Bytes::from(format!(
            r#"{{"offset":2,"epoch":"e","p":"{}"}}"#,
            "x".repeat(200)
        ));
        assert!(!member.offer(&big), "held bytes would exceed 250");
        assert!(queue.is_closing());
    }

    /// Live frames held while a room recovers wait for its catch-up, so the catch-up does
    /// not wait for them to drain (they cannot before it is queued).
    #[tokio::test]
    async fn held_frames_do_not_hold_up_the_catch_up() {
        let queue = Arc::new(OutboundQueue::new(100, 1000));
        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        let payload = format!(r#"{{"type":"message","payload":"{}"}}"#, "x".repeat(560));
        let live: Utf8Bytes = server::with_position(&payload, 9, "e").into();
        assert!(member.offer(&live));
        assert!(queue.queued() > 500, "more than half the bound held");
        let missed = queue.push_draining(frame(1, "e"));
        tokio::time::timeout(std::time::Duration::from_secs(5), missed)
            .await
            .expect("the catch-up waited for the frames held behind it")
            .unwrap();
        member.release(&at(1), &[]);
        let got: Vec<_> = queue.drain().iter().map(|f| server::offset_of(f)).collect();
        assert_eq!(got, [Some(1), Some(9)]);
    }

    /// A catch-up frame that does not fit beside the held ones and the rest of the queue
    /// waits for the rest to drain, rather than closing the socket.
    #[tokio::test]
    async fn a_catch_up_frame_waits_until_it_fits_beside_the_held_ones() {
        let queue = Arc::new(OutboundQueue::new(100, 1000));
        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        let sized = |offset, len: usize| -> Utf8Bytes {
            let payload = format!(r#"{{"type":"message","payload":"{}"}}"#, "x".repeat(len));
            let frame = server::with_position(&payload, offset, "e");
            let pad = len.saturating_sub(frame.len() - len);
            server::with_position(
                &format!(r#"{{"type":"message","payload":"{}"}}"#, "x".repeat(pad)),
                offset,
                "e",
            )
            .into()
        };
        assert!(member.offer(&sized(9, 300)));
        // Something else queued: 500 bytes, half the bound.
        queue.push(sized(0, 500)).await.unwrap();
        let catch_up = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push_draining(sized(1, 250)).await }
        });
        tokio::task::yield_now().await;
        assert!(!catch_up.is_finished(), "it waits: 300 + 500 + 250 > 1000");
        assert_eq!(queue.drain().len(), 1);
        let pushed = tokio::time::timeout(std::time::Duration::from_secs(5), catch_up);
        pushed.await.unwrap().unwrap().unwrap();
        assert!(!queue.is_closing(), "no 1013");
        member.release(&at(1), &[]);
        let got: Vec<_> = queue.drain().iter().map(|f| server::offset_of(f)).collect();
        assert_eq!(got, [Some(1), Some(9)]);
    }

    #[test]
    fn a_covered_frame_arriving_after_the_release_is_dropped() {
        let queue = Arc::new(OutboundQueue::new(100, usize::MAX));
        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        member.release(&at(4), &[]);
        // A frame without a position goes out and does not end the skipping.
        let plain = Utf8Bytes::from_static(r#"{"type":"message","payload":0}"#);
        assert!(member.offer(&plain));
        for offset in [3, 4, 5, 6] {
            assert!(member.offer(&frame(offset, "e")));
        }
        let got: Vec<_> = queue.drain().iter().map(|f| server::offset_of(f)).collect();
        assert_eq!(got, [None, Some(5), Some(6)]);

        let other = HoldingMember::new(queue.clone(), "h".into(), 10);
        other.release(&at(4), &[]);
        assert!(other.offer(&frame(1, "new")));
        assert_eq!(queue.drain().len(), 1, "another epoch is not covered");
    }

    /// A late copy of a frame read is dropped; a failover gave offsets again, and the node
    /// tells a `gap` back to before the first new frame: the gap goes out, the room goes
    /// on from it (a new frame goes out, the one read does not), and the first frame beyond
    /// the read ends the skipping.
    #[test]
    fn a_gap_goes_out_and_the_room_goes_on_from_it() {
        let queue = Arc::new(OutboundQueue::new(100, usize::MAX));
        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        let read = [frame(4, "e"), frame(5, "e"), frame(6, "e")];
        member.release(&at(6), &read);
        let gap = Utf8Bytes::from(server::gap("h", 3, "e"));
        assert!(server::is_gap(&gap));
        assert!(!server::is_gap(&frame(3, "e")));
        assert!(member.offer(&frame(5, "e")), "a late copy");
        assert!(member.offer(&gap));
        let new: Utf8Bytes =
            server::with_position(r#"{"type":"message","payload":1}"#, 4, "e").into();
        assert!(member.offer(&new));
        assert!(member.offer(&frame(5, "e")), "the one read");
        assert!(member.offer(&frame(7, "e")));
        assert!(member.offer(&frame(5, "e")));
        let got: Vec<_> = queue.drain().iter().map(|f| server::offset_of(f)).collect();
        assert_eq!(got, [Some(3), Some(4), Some(7), Some(5)]);
    }

    /// A new frame at an offset the read returned, held while the read ran, and with no
    /// gap from the node before it: the member tells the gap itself.
    #[test]
    fn a_held_new_frame_at_an_offset_read_goes_out_after_a_gap() {
        let queue = Arc::new(OutboundQueue::new(100, usize::MAX));
        let member = HoldingMember::new(queue.clone(), "h".into(), 10);
        let new: Utf8Bytes =
            server::with_position(r#"{"type":"message","payload":1}"#, 5, "e").into();
        assert!(member.offer(&new));
        member.release(&at(6), &[frame(5, "e"), frame(6, "e")]);
        let got = queue.drain();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], server::gap("h", 4, "e"));
        assert_eq!(got[1], new);
        assert_eq!(queue.queued(), 0, "the reserved bytes are accounted for");
    }
}
