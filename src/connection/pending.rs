//! The frames waiting for a socket's writer, in order: single frames (replies, deliveries
//! one at a time) and runs of one room's frames shared by every member the run went to.
//!
//! A run is handed to each member as one reference-counted slice: queuing a run of `k`
//! frames for a member costs one count increment and one entry, instead of `k` of each, and
//! the writer writes the frames from where they are. In a large room, that is most of what
//! a delivery costs a node besides the kernel (BENCHMARKS.md finding 30).

use std::collections::VecDeque;
use std::sync::Arc;

use hyper_tungstenite::tungstenite::Utf8Bytes;

/// Frames in order, counted one by one (a run of `k` frames counts `k`).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    entries: VecDeque<Entry>,
    frames: usize,
}

#[derive(Debug)]
enum Entry {
    One(Utf8Bytes),
    /// `run[from..to]`.
    Run {
        run: Arc<[Utf8Bytes]>,
        from: u32,
        to: u32,
    },
}

impl Entry {
    fn frames(&self) -> &[Utf8Bytes] {
        match self {
            Entry::One(frame) => std::slice::from_ref(frame),
            Entry::Run { run, from, to } => &run[*from as usize..*to as usize],
        }
    }
}

impl Pending {
    /// How many frames wait.
    pub(crate) fn len(&self) -> usize {
        self.frames
    }

    /// Whether no frame waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Adds `frame` at the back.
    pub(crate) fn push(&mut self, frame: Utf8Bytes) {
        self.entries.push_back(Entry::One(frame));
        self.frames += 1;
    }

    /// Adds the first `count` frames of `run` at the back, sharing them.
    pub(crate) fn push_run(&mut self, run: &Arc<[Utf8Bytes]>, count: usize) {
        let count = count.min(run.len());
        match count {
            0 => return,
            1 => self.entries.push_back(Entry::One(run[0].clone())),
            // A run holds what one read from Redis held: far fewer than 2^32 frames.
            _ => self.entries.push_back(Entry::Run {
                run: run.clone(),
                from: 0,
                to: u32::try_from(count).unwrap_or(u32::MAX),
            }),
        }
        self.frames += count;
    }

    /// Moves every frame of `other` to the back, leaving it empty.
    pub(crate) fn append(&mut self, other: &mut Pending) {
        self.entries.append(&mut other.entries);
        self.frames += std::mem::take(&mut other.frames);
    }

    /// The frames, front first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Utf8Bytes> + Clone {
        self.entries.iter().flat_map(Entry::frames)
    }

    /// The bytes of every frame's payload.
    pub(crate) fn bytes(&self) -> usize {
        self.iter().map(|frame| frame.len()).sum()
    }

    /// Drops the first `count` frames (all of them if there are fewer).
    pub(crate) fn advance(&mut self, mut count: usize) {
        while count > 0 {
            let Some(front) = self.entries.front_mut() else {
                break;
            };
            let here = front.frames().len();
            if here > count {
                if let Entry::Run { from, .. } = front {
                    // `count` < `here` ≤ u32::MAX.
                    *from += count as u32;
                }
                self.frames -= count;
                return;
            }
            self.entries.pop_front();
            self.frames -= here;
            count -= here;
        }
    }

    /// Drops every frame.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.frames = 0;
    }

    /// How many entries the buffer holds without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.entries.capacity()
    }
}

impl<T: Into<Utf8Bytes>> FromIterator<T> for Pending {
    fn from_iter<I: IntoIterator<Item = T>>(frames: I) -> Self {
        let mut pending = Pending::default();
        frames
            .into_iter()
            .for_each(|frame| pending.push(frame.into()));
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(pending: &Pending) -> Vec<String> {
        pending.iter().map(|frame| frame.to_string()).collect()
    }

    #[test]
    fn runs_and_single_frames_keep_their_order_and_their_count() {
        let run: Arc<[Utf8Bytes]> = ["b", "c", "d"].map(Utf8Bytes::from).into();
        let mut pending: Pending = ["a"].into_iter().collect();
        pending.push_run(&run, 2);
        pending.push(Utf8Bytes::from("e"));
        assert_eq!(texts(&pending), ["a", "b", "c", "e"]);
        assert_eq!((pending.len(), pending.bytes()), (4, 4));
        assert_eq!(Arc::strong_count(&run), 2, "the run is shared, not copied");
    }

    #[test]
    fn advancing_may_stop_inside_a_run() {
        let run: Arc<[Utf8Bytes]> = ["b", "c", "d"].map(Utf8Bytes::from).into();
        let mut pending: Pending = ["a"].into_iter().collect();
        pending.push_run(&run, 3);
        pending.advance(2);
        assert_eq!(texts(&pending), ["c", "d"]);
        assert_eq!(pending.len(), 2);
        let mut more: Pending = ["e"].into_iter().collect();
        pending.append(&mut more);
        assert!(more.is_empty());
        pending.advance(2);
        assert_eq!(texts(&pending), ["e"]);
        assert_eq!(Arc::strong_count(&run), 1, "a run gone past is released");
        pending.advance(5);
        assert!(pending.is_empty());
    }
}
