//! One pub/sub connection of the subscriber (to the one Redis, or to one cluster master),
//! the rooms subscribed on it, and when to connect again after it was lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::future::{select_all, BoxFuture};
use tokio::task::JoinHandle;
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
    /// A connection being made, in a task of its own: a master that does not answer does
    /// not hold up the others.
    pub(super) connecting: Option<JoinHandle<Result<RespConnection, BrokerError>>>,
    /// The rooms subscribed on this connection (confirmed by Redis).
    pub(super) rooms: HashSet<Arc<str>>,
    /// Channels a cluster master dropped on its own (their slot left it), read while a
    /// command waited for its replies: the task takes them.
    pub(super) dropped: Vec<Vec<u8>>,
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
            connecting: None,
            rooms: HashSet::new(),
            dropped: Vec::new(),
            retry_at: Instant::now(),
            delays: delays(),
            connected_before: false,
        }
    }

    /// Whether this is a cluster master, which drops a subscription on its own when the
    /// channel's slot leaves it (an unasked `sunsubscribe`).
    pub(super) fn drops_on_its_own(&self) -> bool {
        self.key.is_some()
    }

    /// When to try connecting, if there is no connection and none is being made.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        (self.connection.is_none() && self.connecting.is_none()).then_some(self.retry_at)
    }

    /// Starts making a connection (within `timeout`) if it is time.
    pub(super) fn connect_if_due(&mut self, now: Instant, timeout: Duration) {
        if self.retry_at().is_none_or(|at| at > now) {
            return;
        }
        let target = self.target.clone();
        self.connecting = Some(tokio::spawn(async move {
            within(timeout, RespConnection::connect(&target)).await
        }));
    }

    /// A connection was made; returns whether it replaces a lost one.
    pub(super) fn connected(&mut self, connection: RespConnection) -> bool {
        self.connection = Some(connection);
        std::mem::replace(&mut self.connected_before, true)
    }

    /// The connection works (its rooms are subscribed): the next loss starts the backoff
    /// afresh.
    pub(super) fn settled(&mut self) {
        self.delays = delays();
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
        expected: &(dyn Fn(&Reply) -> bool + Sync),
        count: usize,
        forward: Forward<'_>,
        held: Held<'_>,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let cluster = self.drops_on_its_own();
        let connection = self
            .connection
            .as_mut()
            .ok_or(BrokerError::SubscriberDown)?;
        let dropped = &mut self.dropped;
        within(timeout, async {
            connection.send(command).await?;
            connection
                .expect(
                    count,
                    expected,
                    |reply| match reply {
                        Reply::Unsubscribed(channel) if cluster => {
                            dropped.push(channel.clone());
                            true
                        }
                        _ => false,
                    },
                    &mut forward.messages(held),
                )
                .await
        })
        .await
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(connecting) = &self.connecting {
            connecting.abort();
        }
    }
}

/// What happened first on the shards.
pub(super) enum Event {
    /// Shard `.0` gave a reply (none is asked for between commands) or failed.
    Read(usize, Result<Reply, BrokerError>),
    /// Shard `.0`'s connection being made is done.
    Connected(usize, Result<RespConnection, BrokerError>),
}

/// Reads every connected shard at once, handing messages to `forward`, and waits for the
/// connections being made, until one of them has something to say. Pending forever when
/// no shard is connected or connecting.
pub(super) async fn next_event(shards: &mut [Shard], forward: Forward<'_>) -> Event {
    let mut waits: Vec<BoxFuture<'_, Event>> = Vec::new();
    for (index, shard) in shards.iter_mut().enumerate() {
        if let Some(connection) = shard.connection.as_mut() {
            waits.push(Box::pin(async move {
                let reply = connection
                    .next_reply(&mut forward.messages(Held::Nothing))
                    .await;
                Event::Read(index, reply)
            }));
        }
        if let Some(connecting) = shard.connecting.as_mut() {
            waits.push(Box::pin(async move {
                Event::Connected(index, joined(connecting.await))
            }));
        }
    }
    if waits.is_empty() {
        return std::future::pending().await;
    }
    select_all(waits).await.0
}

/// A connecting task's outcome (one that panicked or was aborted did not connect).
pub(super) fn joined(
    outcome: Result<Result<RespConnection, BrokerError>, tokio::task::JoinError>,
) -> Result<RespConnection, BrokerError> {
    outcome.unwrap_or_else(|e| {
        Err(BrokerError::connection(std::io::Error::other(
            e.to_string(),
        )))
    })
}
