//! The client's outbox: each message sent carries an idempotency key (protocol 1.2), and a
//! message whose outcome is unknown (the server answered `timeout`, or the connection
//! dropped before the ack) is sent again with the same key, in the order the messages were
//! sent, until it is acked (`duplicate` or not: published once) or fails for good. The
//! server's window for a key is 2 minutes by default, far longer than a request's deadline
//! (10 s by default), so a resend is never published twice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;

use super::Reply;

/// A message on its way: what is sent again, as it was first sent.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) room: String,
    pub(crate) payload: Box<RawValue>,
    pub(crate) key: String,
    /// The order the messages were sent in (this client's).
    pub(crate) seq: u64,
    /// An earlier send may have been published (it was answered `timeout`, or its
    /// connection dropped first): a later refusal leaves the outcome unknown.
    pub(crate) maybe_published: bool,
}

/// Makes each message's key: this client's random prefix and a count.
#[derive(Debug)]
pub(crate) struct Keys {
    prefix: String,
    next: AtomicU64,
}

impl Keys {
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        let seed = (std::time::SystemTime::now(), std::process::id());
        Keys {
            prefix: format!("{:016x}", RandomState::new().hash_one(seed)),
            next: AtomicU64::new(0),
        }
    }

    /// A message to `room` with a key of its own (at most 37 bytes).
    pub(crate) fn outgoing(&self, room: String, payload: Box<RawValue>) -> Outgoing {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        Outgoing {
            room,
            payload,
            key: format!("{}-{seq}", self.prefix),
            seq,
            maybe_published: false,
        }
    }
}

/// Is an error code one after which a message is sent again: `timeout` (the outcome is
/// unknown) or `unavailable` (nothing was published)?
pub(crate) fn resend_after(code: &str) -> bool {
    code == "timeout" || code == "unavailable"
}

/// Messages to send again once a pause is over, the pause growing while Redis stays
/// unavailable (100 ms, doubling, at most 2 s) and starting over after an ack.
#[derive(Debug, Default)]
pub(crate) struct Retries {
    waiting: Vec<(Outgoing, Reply)>,
    pause: Option<Duration>,
    at: Option<Instant>,
}

const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

impl Retries {
    /// `message` is sent again after the pause.
    pub(crate) fn later(&mut self, message: Outgoing, reply: Reply) {
        if self.at.is_none() {
            let pause = self
                .pause
                .map_or(FIRST_PAUSE, |p| (p * 2).min(LONGEST_PAUSE));
            self.pause = Some(pause);
            self.at = Some(Instant::now() + pause);
        }
        self.waiting.push((message, reply));
    }

    /// A message was acked: the next pause starts short again.
    pub(crate) fn acked(&mut self) {
        if self.at.is_none() {
            self.pause = None;
        }
    }

    /// Waits until the pause is over (forever while nothing waits).
    pub(crate) async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// The messages to send again, in the order they were first sent.
    pub(crate) fn take(&mut self) -> Vec<(Outgoing, Reply)> {
        self.at = None;
        let mut waiting = std::mem::take(&mut self.waiting);
        waiting.sort_by_key(|(message, _)| message.seq);
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(keys: &Keys) -> Outgoing {
        keys.outgoing("r".into(), RawValue::from_string("1".into()).unwrap())
    }

    #[test]
    fn keys_are_unique_and_short() {
        let (a, b) = (Keys::new(), Keys::new());
        let (m1, m2, n1) = (message(&a), message(&a), message(&b));
        assert_ne!(m1.key, m2.key);
        assert_ne!(m1.key, n1.key, "another client's keys differ");
        assert!(m1.key.len() <= crate::protocol::MAX_KEY_LEN);
        assert_eq!((m1.seq, m2.seq), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_come_back_in_order_after_a_growing_pause() {
        let keys = Keys::new();
        let (first, second) = (message(&keys), message(&keys));
        let mut retries = Retries::default();
        retries.later(second, tokio::sync::oneshot::channel().0);
        retries.later(first, tokio::sync::oneshot::channel().0);
        let started = Instant::now();
        retries.due().await;
        assert_eq!(started.elapsed(), FIRST_PAUSE);
        let seqs: Vec<u64> = retries.take().iter().map(|(m, _)| m.seq).collect();
        assert_eq!(seqs, [0, 1]);
        retries.later(message(&keys), tokio::sync::oneshot::channel().0);
        let started = Instant::now();
        retries.due().await;
        assert_eq!(started.elapsed(), 2 * FIRST_PAUSE, "doubled");
        retries.take();
        retries.acked();
        retries.later(message(&keys), tokio::sync::oneshot::channel().0);
        let started = Instant::now();
        retries.due().await;
        assert_eq!(started.elapsed(), FIRST_PAUSE, "short again after an ack");
    }
}
