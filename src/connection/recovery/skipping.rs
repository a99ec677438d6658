//! What a recovering socket does with a live frame of its room after the history read:
//! drop the ones the read returned (they can reach the node after the read, which ran on
//! another Redis connection), and let out the rest, with a `gap` first where the client
//! would take a new frame for one it has.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use crate::protocol::server;

/// How many of the last frames a history read returned a recovering socket remembers (by
/// fingerprint), as the node's subscriber remembers the last frames it delivered per room.
pub(super) const REMEMBERED: usize = 16;

/// A recovering socket's room after its history read, until a frame beyond the read.
#[derive(Debug)]
pub(super) struct Skipping {
    /// Where the read ended.
    offset: u64,
    epoch: Arc<str>,
    /// The offsets and fingerprints of the last frames read (at most [`REMEMBERED`]).
    read: Box<[(u64, u64)]>,
    /// The offset the client holds in `epoch`, as what went out moved it: a frame moves it
    /// forward, a `gap` back.
    holds: u64,
    /// The lowest offset a `gap` that went out while skipping moved the client back to.
    gap: Option<u64>,
}

/// What becomes of a live frame while skipping.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// The read returned it: dropped.
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
    /// After a read that ended at `offset` in `epoch` and returned `read` (in order; its
    /// frames of `epoch` are remembered).
    pub(super) fn new(
        offset: u64,
        epoch: Arc<str>,
        read: &[impl AsRef<str>],
        hasher: &RandomState,
    ) -> Self {
        let read = read
            .iter()
            .rev()
            .filter_map(|frame| {
                let frame = frame.as_ref();
                let (at, at_epoch) = server::position_of(frame)?;
                (*at_epoch == *epoch).then(|| (at, hasher.hash_one(frame)))
            })
            .take(REMEMBERED)
            .collect();
        Skipping {
            offset,
            epoch,
            read,
            holds: offset,
            gap: None,
        }
    }

    pub(super) fn epoch(&self) -> &str {
        &self.epoch
    }

    /// What becomes of `frame`.
    ///
    /// - A frame without a position (not a history frame) or a `gap` goes out: a gap tells
    ///   the client messages may be missing (a failover gave offsets again) and moves it
    ///   back.
    /// - A frame at an offset the read covered is the one read, unless it differs from
    ///   the remembered one there, or the offset is above a gap that went out (the node
    ///   tells a gap before the first new frame of a failover, then sends the new ones;
    ///   what the read returned came before that gap). Such a new frame goes out, after a
    ///   gap of this socket's own if the client holds its offset already.
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
            self.gap = Some(self.gap.map_or(at, |lowest| lowest.min(at)));
            return Verdict::Out;
        }
        if at > self.offset {
            return Verdict::Beyond;
        }
        let new = match self.read.iter().find(|(read_at, _)| *read_at == at) {
            Some((_, fingerprint)) => *fingerprint != hasher.hash_one(frame),
            None => self.gap.is_some_and(|lowest| lowest < at),
        };
        if !new {
            return Verdict::Covered;
        }
        let holds = std::mem::replace(&mut self.holds, at);
        if at <= holds {
            Verdict::OutAfterGap(at.saturating_sub(1))
        } else {
            Verdict::Out
        }
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

    #[test]
    fn what_the_read_returned_is_covered_and_what_follows_it_ends_the_skipping() {
        let read = [frame(3, 0), frame(4, 0)];
        let plain = r#"{"type":"message","payload":0}"#.to_owned();
        let other_epoch = server::with_position(&plain, 1, "new");
        assert_eq!(
            verdicts(
                4,
                &read,
                &[plain, frame(2, 0), frame(3, 0), frame(4, 0), frame(5, 0)]
            ),
            [
                Verdict::Out,
                Verdict::Covered,
                Verdict::Covered,
                Verdict::Covered,
                Verdict::Beyond
            ]
        );
        assert_eq!(verdicts(4, &read, &[other_epoch]), [Verdict::Beyond]);
    }

    /// A failover gave the read's offsets 5 and 6 again: the node tells a gap, then sends
    /// the new frames; a copy of a frame read is still dropped.
    #[test]
    fn new_frames_after_the_nodes_gap_go_out() {
        let read = [frame(5, 0), frame(6, 0)];
        let got = verdicts(
            6,
            &read,
            &[gap(4), frame(5, 0), frame(5, 1), frame(6, 1), frame(7, 1)],
        );
        let expected = [
            Verdict::Out,
            Verdict::Covered,
            Verdict::Out,
            Verdict::Out,
            Verdict::Beyond,
        ];
        assert_eq!(got, expected);
    }

    /// The node's own pub/sub connection never delivered the lost frames (it lagged
    /// behind the read), so it tells no gap: the socket tells one, or the client would
    /// drop the new frame at an offset it holds.
    #[test]
    fn a_new_frame_without_the_nodes_gap_gets_one() {
        let read = [frame(5, 0), frame(6, 0)];
        let got = verdicts(6, &read, &[frame(5, 1), frame(6, 1), frame(7, 1)]);
        assert_eq!(
            got,
            [Verdict::OutAfterGap(4), Verdict::Out, Verdict::Beyond]
        );
    }

    /// The read returned nothing (the client was up to date at 6) and the failover lost
    /// offset 6: after the node's gap the new frame at 6 goes out; one below the gap is
    /// not taken for new.
    #[test]
    fn a_new_frame_at_an_offset_not_read_goes_out_after_a_gap() {
        let none: [String; 0] = [];
        let got = verdicts(6, &none, &[frame(6, 1), gap(5), frame(5, 1), frame(6, 1)]);
        assert_eq!(
            got,
            [
                Verdict::Covered,
                Verdict::Out,
                Verdict::Covered,
                Verdict::Out
            ]
        );
    }

    /// Only the last [`REMEMBERED`] frames read are remembered.
    #[test]
    fn older_frames_read_are_not_remembered() {
        let read: Vec<String> = (1..=20).map(|offset| frame(offset, 0)).collect();
        let got = verdicts(20, &read, &[frame(4, 1), frame(5, 1)]);
        assert_eq!(got, [Verdict::Covered, Verdict::OutAfterGap(4)]);
    }
}
