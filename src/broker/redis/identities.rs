//! The rooms each identity subscribed to, in one Redis set per identity, through the pool.

use std::time::Duration;

use deadpool_redis::Pool;

use super::connect::{redis_error, within};
use super::lanes::pool_error;
use crate::broker::Keys;
use crate::error::BrokerError;

/// Identity records on Redis.
#[derive(Debug)]
pub(crate) struct Identities {
    pool: Pool,
    keys: Keys,
    timeout: Duration,
}

impl Identities {
    pub(crate) fn new(pool: Pool, keys: Keys, timeout: Duration) -> Self {
        Identities {
            pool,
            keys,
            timeout,
        }
    }

    /// Remembers `room` for `identity` (`SADD`).
    pub(crate) async fn record(&self, identity: &str, room: &str) -> Result<(), BrokerError> {
        self.query::<i64>(
            redis::cmd("SADD")
                .arg(self.keys.identity_set(identity))
                .arg(room),
        )
        .await
        .map(drop)
    }

    /// Forgets `room` for `identity` (`SREM`).
    pub(crate) async fn forget(&self, identity: &str, room: &str) -> Result<(), BrokerError> {
        self.query::<i64>(
            redis::cmd("SREM")
                .arg(self.keys.identity_set(identity))
                .arg(room),
        )
        .await
        .map(drop)
    }

    /// The rooms recorded for `identity` (`SMEMBERS`).
    pub(crate) async fn rooms_of(&self, identity: &str) -> Result<Vec<String>, BrokerError> {
        self.query(redis::cmd("SMEMBERS").arg(self.keys.identity_set(identity)))
            .await
    }

    /// `PING` on a pooled connection.
    pub(crate) async fn ping(&self) -> Result<(), BrokerError> {
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, BrokerError> {
        within(self.timeout, async {
            let mut connection = self.pool.get().await.map_err(pool_error)?;
            command
                .query_async::<T>(&mut connection)
                .await
                .map_err(redis_error)
        })
        .await
    }
}
