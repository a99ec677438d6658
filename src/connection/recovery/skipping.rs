//! What a recovering socket does with a live frame of its room after the history read:
//! drop the late copies of frames the read returned (the read runs on another Redis
//! connection than the node's pub/sub one, so a frame it covered can still reach the node
//! after it), and let out the rest, with a `gap` first where the client would drop a new
//! frame as one it holds.
//!
//! The socket follows what the client holds as the clients do: its last offset (a frame
//! moves it forward, a `gap` sets it) and, for the [`REMEMBERED`] highest offsets it was
//! sent, a fingerprint of the frame sent there. A Redis failover that lost writes gives
//! their offsets again, so a frame at an offset the client holds is a late copy only if it
//! is the frame the client holds there; and a frame the client holds is not sent again
//! after a `gap` moved it back.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use crate::protocol::server;

/// How many offsets sent (the highest) a recovering socket remembers by fingerprint, as the
/// node's subscriber remembers the last frames it delivered per room.
pub(super) const REMEMBERED: usize = 16;

/// A recovering socket's room after its history read, until a frame beyond the read.
#[derive(Debug)]
pub(super) struct Skipping {
    /// Where the read ended.
    offset: u64,
    epoch: Arc<str>,
    /// The offset the client holds in `epoch`.
    holds: u64,
    /// The offsets and fingerprints of the frames the client was sent at the highest
    /// offsets (the read's, then what went out; at most [`REMEMBERED`], one per offset).
    sent: Vec<(u64, u64)>,
}

/// What becomes of a live frame while skipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Verdict {
    /// A late copy of a frame the client holds: dropped.
    Covered,
    /// It goes out, and the skipping goes on.
    Out,
    /// It goes out after a `gap` back to `.0`: a new frame at an offset the client holds
    /// already (a failover gave it again, and nothing told the client so), which the
    /// client would otherwise drop as one it has.
    OutAfterGap(u64),
    /// It goes out, and ends the skipping: beyond the read, or of another epoch.
    Beyond,
}

impl Skipping {
    /// After a read that ended at `offset` in `epoch` and returned `read` (in order).
    pub(super) fn new(
        offset: u64,
        epoch: Arc<str>,
        read: &[impl AsRef<str>],
        hasher: &RandomState,
    ) -> Self {
        let mut sent: Vec<(u64, u64)> = read
            .iter()
            .rev()
            .filter_map(|frame| {
                let frame = frame.as_ref();
                let (at, at_epoch) = server::position_of(frame)?;
                (*at_epoch == *epoch).then(|| (at, hasher.hash_one(frame)))
            })
            .take(REMEMBERED)
            .collect();
        sent.reverse();
        Skipping {
            offset,
            epoch,
            holds: offset,
            sent,
        }
    }

    pub(super) fn epoch(&self) -> &str {
        &self.epoch
    }

    /// What becomes of `frame`.
    ///
    /// - A frame without a position (not a history frame) or a `gap` goes out; a gap of
    ///   the epoch moves the client back to its offset (a failover gave offsets again, or
    ///   the node could not catch up).
    /// - A frame the client was sent at its offset (remembered) is a late copy.
    /// - Any other frame above the offset the client holds (after such a gap) goes out, as
    ///   it does to every other member of the room: rather a copy the client may have had
    ///   (older than those remembered) than a loss nothing told.
    /// - A frame at or below it, up to the read's end, is a late copy if the offset is
    ///   older than those remembered (the read returned it, or the client had it before);
    ///   a frame other than the one sent there goes out after a gap of this socket's own.
    /// - A frame beyond the read, or of another epoch, ends the skipping.
    pub(super) fn verdict(&mut self, frame: &str, hasher: &RandomState) -> Verdict {
        let gap = server::is_gap(frame);
        let Some((at, epoch)) = server::position_of(frame) else {
            return Verdict::Out;
        };
        if epoch != &*self.epoch {
            return if gap { Verdict::Out } else { Verdict::Beyond };
        }
        if gap {
            self.holds = at;
            return Verdict::Out;
        }
        if at > self.offset {
            return Verdict::Beyond;
        }
        let fingerprint = hasher.hash_one(frame);
        let sent = self
            .sent
            .iter()
            .find(|(sent_at, _)| *sent_at == at)
            .map(|(_, sent)| *sent);
        let verdict = match sent {
            Some(sent) if sent == fingerprint => return Verdict::Covered,
            _ if at > self.holds => Verdict::Out,
            Some(_) => Verdict::OutAfterGap(at.saturating_sub(1)),
            None => return Verdict::Covered,
        };
        self.holds = at;
        self.sent.retain(|(sent_at, _)| *sent_at != at);
        self.sent.push((at, fingerprint));
        if self.sent.len() > REMEMBERED {
            let oldest = (0..self.sent.len()).min_by_key(|&i| self.sent[i].0);
            if let Some(oldest) = oldest {
                self.sent.swap_remove(oldest);
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offset: u64, payload: u64) -> String {
        server::with_position(
            &format!(r#"{{"type":"message","payload":{payload}}}"#),
            offset,
            "e",
        )
    }

    fn gap(offset: u64) -> String {
        server::gap("h", offset, "e")
    }

    /// Runs `frames` through a skipping that read `read` up to `offset`.
    fn verdicts(offset: u64, read: &[String], frames: &[String]) -> Vec<Verdict> {
        let hasher = RandomState::new();
        let mut skipping = Skipping::new(offset, "e".into(), read, &hasher);
        frames
            .iter()
            .map(|frame| skipping.verdict(frame, &hasher))
            .collect()
    }

    use Verdict::{Beyond, Covered, Out, OutAfterGap};

    #[test]
    fn late_copies_are_covered_and_a_frame_beyond_the_read_ends_the_skipping() {
        let read = [frame(3, 0), frame(4, 0)];
        let plain = r#"{"type":"message","payload":0}"#.to_owned();
        let other_epoch = server::with_position(&plain, 1, "new");
        let got = verdicts(
            4,
            &read,
            &[plain, frame(2, 0), frame(3, 0), frame(4, 0), frame(5, 0)],
        );
        assert_eq!(got, [Out, Covered, Covered, Covered, Beyond]);
        assert_eq!(verdicts(4, &read, &[other_epoch]), [Beyond]);
    }

    /// A failover gave the read's offsets 5 and 6 again: the node tells a gap back to 4,
    /// then sends the frames at 5 and 6. A new one goes out as to every other member; the
    /// one the client was sent already does not.
    #[test]
    fn after_the_nodes_gap_the_room_goes_on_from_it() {
        let read = [frame(5, 0), frame(6, 0)];
        let got = verdicts(6, &read, &[gap(4), frame(5, 1), frame(6, 0), frame(7, 1)]);
        assert_eq!(got, [Out, Out, Covered, Beyond]);
    }

    /// The node's catch-up could not reach back and told a gap below the read (no
    /// failover): the frames the read returned, arriving live after it, are not sent
    /// again; one older than those remembered is (a copy rather than a silent loss).
    #[test]
    fn a_gap_below_the_read_sends_again_only_what_is_not_remembered() {
        let read: Vec<String> = (3..=20).map(|offset| frame(offset, 0)).collect();
        let live: Vec<String> = std::iter::once(gap(2))
            .chain((3..=21).map(|offset| frame(offset, 0)))
            .collect();
        let got = verdicts(20, &read, &live);
        let mut expected = vec![Out, Out, Out];
        expected.extend([Covered; 16]);
        expected.push(Beyond);
        assert_eq!(got, expected);
    }

    /// The node's own pub/sub connection had not delivered the lost frames (it lagged
    /// behind the read), so it tells no gap: the socket tells one, or the client would
    /// drop the new frame at an offset it holds.
    #[test]
    fn a_new_frame_without_the_nodes_gap_gets_one() {
        let read = [frame(5, 0), frame(6, 0)];
        let got = verdicts(6, &read, &[frame(5, 1), frame(6, 1), frame(7, 1)]);
        assert_eq!(got, [OutAfterGap(4), Out, Beyond]);
    }

    /// The read ran on the new master; the lost writes, still on their way through the
    /// node's pub/sub connection, go out after a gap, and the new master's frames that
    /// the node then sends after its own gap go out again: the client ends with them.
    #[test]
    fn lost_writes_arriving_late_do_not_stay_the_clients_last_word() {
        let read = [frame(5, 1), frame(6, 1)];
        let frames = [frame(5, 0), frame(6, 0), gap(4), frame(5, 1), frame(6, 1)];
        let got = verdicts(6, &read, &frames);
        assert_eq!(got, [OutAfterGap(4), Out, Out, Out, Out]);
    }

    /// The read returned nothing (the client was up to date at 6) and the failover lost
    /// offset 6: after the node's gap the new frame at 6 goes out.
    #[test]
    fn a_new_frame_at_an_offset_not_read_goes_out_after_the_nodes_gap() {
        let none: [String; 0] = [];
        let got = verdicts(6, &none, &[frame(6, 1), gap(5), frame(6, 1)]);
        assert_eq!(got, [Covered, Out, Out]);
    }

    /// Only the last [`REMEMBERED`] offsets sent are remembered: an older one is taken
    /// for a late copy.
    #[test]
    fn older_frames_read_are_not_remembered() {
        let read: Vec<String> = (1..=20).map(|offset| frame(offset, 0)).collect();
        let got = verdicts(20, &read, &[frame(4, 1), frame(5, 1)]);
        assert_eq!(got, [Covered, OutAfterGap(4)]);
        // The highest offsets stay remembered as frames go out below them.
        let got = verdicts(20, &read, &[gap(0), frame(1, 1), frame(2, 1), frame(20, 0)]);
        assert_eq!(got, [Out, Out, Out, Covered]);
    }

    /// What a peer can make a recovering socket remember is bounded: however many frames
    /// the read returned or went out since, at most [`REMEMBERED`] fingerprints.
    #[test]
    fn what_is_remembered_is_bounded() {
        let hasher = RandomState::new();
        let read: Vec<String> = (1..=1_000).map(|offset| frame(offset, 0)).collect();
        let mut skipping = Skipping::new(1_000, "e".into(), &read, &hasher);
        assert_eq!(skipping.sent.len(), REMEMBERED);
        assert_eq!(skipping.verdict(&gap(0), &hasher), Verdict::Out);
        for offset in 1..=1_000 {
            assert_eq!(skipping.verdict(&frame(offset, 1), &hasher), Verdict::Out);
            assert!(skipping.sent.len() <= REMEMBERED);
        }
    }
}
