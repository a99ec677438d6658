//! The rooms each identity subscribed to, in one Redis set per identity, through the pool.

use std::time::Duration;

use deadpool_redis::Pool;

use super::connect::{redis_error, within};
use super::lanes::pool_error;
use crate::broker::Keys;
use crate::error::BrokerError;

/// Adds a room to an identity's set unless the set already holds `ARGV[2]` rooms: one
/// atomic step, so that sockets of one identity on several nodes cannot pass the limit
/// together. Returns 1 when the room is (or already was) recorded, 0 when the set is full.
const RECORD: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

/// Identity records on Redis.
#[derive(Debug)]
pub(crate) struct Identities {
    pool: Pool,
    keys: Keys,
    timeout: Duration,
    record: redis::Script,
}

impl Identities {
    pub(crate) fn new(pool: Pool, keys: Keys, timeout: Duration) -> Self {
        Identities {
            pool,
            keys,
            timeout,
            record: redis::Script::new(RECORD),
        }
    }

    /// Remembers `room` for `identity` unless it already has `max` rooms; returns whether
    /// the room is recorded. `EVALSHA`, with the script loaded again after `NOSCRIPT`.
    pub(crate) async fn record(
        &self,
        identity: &str,
        room: &str,
        max: usize,
    ) -> Result<bool, BrokerError> {
        let key = self.keys.identity_set(identity);
        within(self.timeout, async {
            let mut connection = self.pool.get().await.map_err(pool_error)?;
            self.record
                .key(key)
                .arg(room)
                .arg(max)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(|recorded| recorded == 1)
                .map_err(redis_error)
        })
        .await
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
