//! A socket's publishes in flight: queued at the broker, their acks not sent yet.
//!
//! The broker may answer them in any order across lanes, but their replies must reach the
//! client in the order of its frames, so each reply waits for the answers of the publishes
//! before it.

use std::collections::VecDeque;

use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::broker::{Publish, Published};

/// How many publishes one socket may have in flight before it waits for the oldest.
pub(super) const MAX_IN_FLIGHT: usize = 64;

/// The publishes in flight, oldest first.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    queue: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    message_id: Box<RawValue>,
    started: Instant,
    publish: Publish,
}

/// The broker's answer to the oldest publish in flight.
#[derive(Debug)]
pub(super) struct Answered {
    /// The `messageID` of the frame that asked for the publish.
    pub(super) message_id: Box<RawValue>,
    /// When the frame was handled.
    pub(super) started: Instant,
    pub(super) result: Published,
}

impl InFlight {
    /// Adds a publish the broker has queued.
    pub(super) fn push(&mut self, message_id: Box<RawValue>, publish: Publish) {
        self.queue.push_back(Pending {
            message_id,
            started: Instant::now(),
            publish,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the window is full (the oldest must be answered before another goes out).
    pub(super) fn is_full(&self) -> bool {
        self.queue.len() > MAX_IN_FLIGHT
    }

    /// Waits until the broker answered the oldest publish; never resolves while none is in
    /// flight. Cancel-safe: nothing is taken off the queue.
    pub(super) async fn oldest_answered(&mut self) {
        match self.queue.front_mut() {
            Some(oldest) => {
                let _ = oldest.publish.result().await;
            }
            None => std::future::pending().await,
        }
    }

    /// The broker's answer to the oldest publish, taken off the queue, if it came.
    pub(super) fn answered(&mut self) -> Option<Answered> {
        let result = self.queue.front_mut()?.publish.try_result()?;
        let oldest = self.queue.pop_front()?;
        Some(Answered {
            message_id: oldest.message_id,
            started: oldest.started,
            result,
        })
    }

    /// Waits for the broker's answer to the oldest publish and takes it off the queue;
    /// `None` when none is in flight.
    pub(super) async fn next_answer(&mut self) -> Option<Answered> {
        let result = self.queue.front_mut()?.publish.result().await;
        let oldest = self.queue.pop_front()?;
        Some(Answered {
            message_id: oldest.message_id,
            started: oldest.started,
            result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Accepted;

    fn id(n: u32) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).unwrap()
    }

    #[tokio::test]
    async fn answers_come_out_in_the_order_the_publishes_went_in() {
        let mut in_flight = InFlight::default();
        let (first_reply, first) = tokio::sync::oneshot::channel();
        let (second_reply, second) = tokio::sync::oneshot::channel();
        in_flight.push(id(1), Publish::Pending(first));
        in_flight.push(id(2), Publish::Pending(second));
        // The broker answers the second first; the first still comes out first.
        second_reply.send(Ok(Accepted::default())).unwrap();
        first_reply
            .send(Err(crate::error::BrokerError::SubscriberDown))
            .unwrap();
        let a = in_flight.next_answer().await.unwrap();
        assert_eq!(a.message_id.get(), "1");
        assert!(a.result.is_err());
        let b = in_flight.next_answer().await.unwrap();
        assert_eq!(b.message_id.get(), "2");
        assert!(b.result.is_ok());
        assert!(in_flight.next_answer().await.is_none());
    }

    #[test]
    fn the_window_is_full_past_its_size() {
        let mut in_flight = InFlight::default();
        for n in 0..=MAX_IN_FLIGHT as u32 {
            assert!(!in_flight.is_full());
            in_flight.push(id(n), Publish::Done(Ok(Accepted::default())));
        }
        assert!(in_flight.is_full());
    }
}
