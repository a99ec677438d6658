//! One pub/sub connection of the subscriber (to the one Redis, or to one cluster master),
//! the rooms subscribed on it, and when to connect again after it was lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::future::{select_all, BoxFuture};
use tokio::time::Instant;

use super::super::connect::{within, RedisTarget};
use super::super::resp::{Reply, RespConnection};
use super::forward::{Forward, Held};
use super::topology::ShardKey;
use crate::error::BrokerError;

/// One pub/sub connection and its rooms.
pub(super) struct Shard {
    pub(super) key: ShardKey,
    pub(super) target: RedisTarget,
    pub(super) connection: Option<RespConnection>,
    /// The rooms subscribed on this connection (confirmed by Redis).
    pub(super) rooms: HashSet<Arc<str>>,
    /// When to try connecting again, while there is no connection.
    retry_at: Instant,
    delays: ExponentialBackoff,
    /// Whether a connection was ever made (the next one is a reconnection).
    pub(super) connected_before: bool,
}

fn delays() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Shard {
    /// A shard to connect to at once.
    pub(super) fn new(key: ShardKey, target: RedisTarget) -> Self {
        Shard {
            key,
            target,
            connection: None,
            rooms: HashSet::new(),
            retry_at: Instant::now(),
            delays: delays(),
            connected_before: false,
        }
    }

    /// When to try connecting, if there is no connection.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.connection.is_none().then_some(self.retry_at)
    }

    /// A connection was made; returns whether it replaces a lost one.
    pub(super) fn connected(&mut self, connection: RespConnection) -> bool {
        self.connection = Some(connection);
        self.delays = delays();
        std::mem::replace(&mut self.connected_before, true)
    }

    /// No connection (lost, or not made): try again after the next delay, which it
    /// returns. Gives back the rooms that were subscribed on it.
    pub(super) fn lost(&mut self) -> (Duration, HashSet<Arc<str>>) {
        self.connection = None;
        let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
        self.retry_at = Instant::now() + delay;
        (delay, std::mem::take(&mut self.rooms))
    }

    /// Sends `command` and waits (within `timeout`) for `count` replies that `expected`
    /// accepts, handing the messages that arrive meanwhile to `forward` (but those
    /// `held`). An error reply is [`BrokerError::Refused`] and leaves the connection in
    /// step; any other error means it is lost.
    pub(super) async fn command(
        &mut self,
        command: &redis::Cmd,
        expected: fn(&Reply) -> bool,
        count: usize,
        forward: Forward<'_>,
        held: Held<'_>,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let connection = self
            .connection
            .as_mut()
            .ok_or(BrokerError::SubscriberDown)?;
        within(timeout, async {
            connection.send(command).await?;
            connection
                .expect(count, expected, |channel, payload| {
                    forward.message(channel, payload, held)
                })
                .await
        })
        .await
    }
}

/// Reads every connected shard at once, handing messages to `forward`, until one of them
/// gives a reply (none is asked for between commands) or fails: that shard's index and
/// what it read. Pending forever when no shard is connected.
pub(super) async fn read_any(
    shards: &mut [Shard],
    forward: Forward<'_>,
) -> (usize, Result<Reply, BrokerError>) {
    let reads: Vec<BoxFuture<'_, (usize, Result<Reply, BrokerError>)>> = shards
        .iter_mut()
        .enumerate()
        .filter_map(|(index, shard)| {
            let connection = shard.connection.as_mut()?;
            let read: BoxFuture<'_, _> = Box::pin(async move {
                let reply = connection
                    .next_reply(|channel, payload| forward.message(channel, payload, Held::Nothing))
                    .await;
                (index, reply)
            });
            Some(read)
        })
        .collect();
    if reads.is_empty() {
        return std::future::pending().await;
    }
    select_all(reads).await.0
}
