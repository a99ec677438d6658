//! A socket's membership of one history room while it recovers what it missed.
//!
//! The socket joins the room through a [`HoldingMember`]: frames delivered live from then on
//! are held while the missed ones are read from the history and queued; then the held ones
//! follow, without those already sent (told apart by offset), and from then on frames pass
//! straight through. So the socket gets every message after its `since` exactly once, in
//! offset order.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::outbound::OutboundQueue;
use crate::protocol::server;
use crate::rooms::Member;

/// Holds a room's live frames for one socket until [`HoldingMember::release`].
#[derive(Debug)]
pub(crate) struct HoldingMember {
    queue: Arc<OutboundQueue>,
    /// `Some` while holding.
    held: Mutex<Option<Vec<Utf8Bytes>>>,
    /// Frames held at most; beyond that the socket is a slow reader.
    max_held: usize,
}

impl HoldingMember {
    pub(crate) fn new(queue: Arc<OutboundQueue>, max_held: usize) -> Self {
        HoldingMember {
            queue,
            held: Mutex::new(Some(Vec::new())),
            max_held,
        }
    }

    fn held(&self) -> MutexGuard<'_, Option<Vec<Utf8Bytes>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the held frames with an offset above `after`, in order, and stops holding
    /// (under the lock, so that a frame delivered meanwhile comes after them).
    pub(crate) fn release(&self, after: u64) {
        let mut held = self.held();
        for frame in held.take().unwrap_or_default() {
            if server::offset_of(&frame).is_none_or(|offset| offset > after) {
                self.queue.offer(&frame);
            }
        }
    }
}

impl Member for HoldingMember {
    fn offer(&self, frame: &Utf8Bytes) -> bool {
        let mut held = self.held();
        match held.as_mut() {
            Some(frames) if frames.len() >= self.max_held => {
                drop(held);
                self.queue
                    .request_close(CloseCode::Again, "outbound queue full");
                false
            }
            Some(frames) => {
                frames.push(frame.clone());
                true
            }
            None => {
                drop(held);
                self.queue.offer(frame)
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
        let member = HoldingMember::new(queue.clone(), 10);
        for offset in [3, 4, 5] {
            let frame =
                format!(r#"{{"type":"message","payload":0,"offset":{offset},"epoch":"e"}}"#);
            assert!(member.offer(&Utf8Bytes::from(frame)));
        }
        assert!(queue.drain().is_empty(), "held");
        member.release(4);
        let got = queue.drain();
        assert_eq!(got.len(), 1);
        assert_eq!(server::offset_of(&got[0]), Some(5));
        assert!(member.offer(&Utf8Bytes::from_static(r#"{"offset":6,"epoch":"e"}"#)));
        assert_eq!(queue.drain().len(), 1, "straight through once released");
    }
}
