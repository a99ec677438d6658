//! The rooms each identity subscribed to, in one Redis set per identity, through the pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::commands::Commands;
use super::connect::{millis, redis_error, refused, within};
use crate::broker::Keys;
use crate::error::BrokerError;

/// The start of both scripts below: returns 0 unless the room `ARGV[1]` may be recorded in
/// the identity's set `KEYS[1]` (it is already, or the set holds fewer than `ARGV[2]`).
const UNLESS_IT_FITS: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0
    and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
";

/// Adds a room to an identity's set unless the set already holds `ARGV[2]` rooms, and
/// sets the set's time to live to `ARGV[3]` ms: one atomic step, so that sockets of one
/// identity on several nodes cannot pass the limit together. Returns 1 when the room is (or
/// already was) recorded, 0 when the set is full.
const RECORD: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Whether the room could be recorded now (1 or 0); changes nothing.
const FITS: &str = "return 1";

/// How often the records of identities with sockets on this node get their TTL back, as
/// a share of the TTL.
const REFRESHES_PER_TTL: u32 = 3;

/// Identity records on Redis. Each set expires `ttl` after it was last changed or
/// refreshed; this node refreshes the sets of the identities its sockets are bound to.
#[derive(Debug)]
pub(crate) struct Identities {
    commands: Commands,
    keys: Keys,
    timeout: Duration,
    ttl: Duration,
    record: redis::Script,
    fits: redis::Script,
    /// Identities bound by this node's sockets, with their socket counts.
    held: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

impl Identities {
    pub(crate) fn new(commands: Commands, keys: Keys, timeout: Duration, ttl: Duration) -> Self {
        Identities {
            commands,
            keys,
            timeout,
            ttl,
            record: redis::Script::new(&[UNLESS_IT_FITS, RECORD].concat()),
            fits: redis::Script::new(&[UNLESS_IT_FITS, FITS].concat()),
            held: Arc::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A socket of this node bound `identity`: its set is refreshed while any is.
    pub(crate) fn hold(&self, identity: &Arc<str>) {
        *self.held().entry(identity.clone()).or_insert(0) += 1;
    }

    /// A socket bound to `identity` went away. When it was this node's last, the set gets
    /// its full TTL from now (in the background: nothing waits for it).
    pub(crate) fn unhold(&self, identity: &Arc<str>) {
        let mut held = self.held();
        match held.get_mut(identity) {
            Some(count) if *count > 1 => *count -= 1,
            Some(_) => {
                held.remove(identity);
                drop(held);
                let key = self.keys.identity_set(identity);
                let (commands, timeout, ttl) =
                    (self.commands.clone(), self.timeout, millis(self.ttl));
                tokio::spawn(async move {
                    let expire = within(timeout, async {
                        let mut connection = commands.get().await?;
                        redis::cmd("PEXPIRE")
                            .arg(key)
                            .arg(ttl)
                            .query_async::<i64>(&mut connection)
                            .await
                            .map_err(redis_error)
                    });
                    if let Err(e) = expire.await {
                        tracing::debug!(error = %e.report(), "could not refresh an identity's TTL");
                    }
                });
            }
            None => {}
        }
    }

    /// Refreshes the sets of the held identities every third of the TTL, until the broker
    /// is dropped. Started with the broker's other tasks.
    pub(crate) fn start_refreshing(&self) {
        let held = Arc::downgrade(&self.held);
        let (commands, keys, timeout, ttl) = (
            self.commands.clone(),
            self.keys.clone(),
            self.timeout,
            millis(self.ttl),
        );
        let every = (self.ttl / REFRESHES_PER_TTL).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(held) = held.upgrade() else { return };
                let identities: Vec<Arc<str>> = held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .keys()
                    .cloned()
                    .collect();
                drop(held);
                for chunk in identities.chunks(512) {
                    let mut pipeline = redis::pipe();
                    for identity in chunk {
                        pipeline
                            .cmd("PEXPIRE")
                            .arg(keys.identity_set(identity))
                            .arg(ttl)
                            .ignore();
                    }
                    if let Err(e) = commands.send(timeout, &pipeline, &[]).await {
                        tracing::warn!(error = %e.report(), "could not refresh identities' TTL");
                    }
                }
            }
        });
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
        let call = redis::cmd("EVALSHA")
            .arg(self.record.get_hash())
            .arg(1)
            .arg(key)
            .arg(room)
            .arg(max)
            .arg(millis(self.ttl))
            .clone();
        self.query::<i64>(&call, &[&self.record])
            .await
            .map(|recorded| recorded == 1)
    }

    /// Whether `room` could be recorded for `identity` now (see [`FITS`]).
    pub(crate) async fn fits(
        &self,
        identity: &str,
        room: &str,
        max: usize,
    ) -> Result<bool, BrokerError> {
        let call = redis::cmd("EVALSHA")
            .arg(self.fits.get_hash())
            .arg(1)
            .arg(self.keys.identity_set(identity))
            .arg(room)
            .arg(max)
            .clone();
        self.query::<i64>(&call, &[&self.fits])
            .await
            .map(|fits| fits == 1)
    }

    /// Forgets `room` for `identity` (`SREM`).
    pub(crate) async fn forget(&self, identity: &str, room: &str) -> Result<(), BrokerError> {
        self.query::<i64>(
            redis::cmd("SREM")
                .arg(self.keys.identity_set(identity))
                .arg(room),
            &[],
        )
        .await
        .map(drop)
    }

    /// The rooms recorded for `identity` (`SMEMBERS`).
    pub(crate) async fn rooms_of(&self, identity: &str) -> Result<Vec<String>, BrokerError> {
        self.query(
            redis::cmd("SMEMBERS").arg(self.keys.identity_set(identity)),
            &[],
        )
        .await
    }

    /// Sends `command` alone (as a one-command pipeline, see `query_pipeline`: on a cluster
    /// it is not sent twice), with `scripts` loaded again if Redis lost them; its reply as
    /// `T`. A failure after sending leaves the outcome unknown.
    async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
        scripts: &[&redis::Script],
    ) -> Result<T, BrokerError> {
        let mut pipeline = super::commands::pipeline();
        pipeline.add_command(command.clone());
        let replies = self.commands.send(self.timeout, &pipeline, scripts).await?;
        match replies.into_iter().next() {
            None => Err(BrokerError::Protocol("no reply".into())),
            Some(redis::Value::ServerError(e)) => Err(refused(e)),
            Some(reply) => {
                T::from_redis_value(reply).map_err(|e| BrokerError::Protocol(e.to_string()))
            }
        }
    }
}
