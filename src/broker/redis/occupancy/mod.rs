//! Room occupancy on Redis: which nodes have members in each room, so that "occupied"
//! and "vacated" are decided once for the whole cluster, and what happens when a node dies.
//!
//! # Layout
//! - hash `occupancy:{ROOM}` (the room's hash slot): each node with members there, with
//!   the lease it holds them under, and `#`, the room's sequence number. `room.lua` adds
//!   or takes out one node atomically and says whether the room went from no node to one
//!   (occupied) or from one to none (vacated), with the next sequence number.
//! - set `occupancy-lease:{LEASE}`: the rooms a node holds under one lease, for sweeping.
//! - sorted sets `occupancy-leases:{leases}:live` (every lease, scored by when it runs
//!   out) and `…:sweeping` (leases claimed for a sweep), handled by `leases.lua`.
//!
//! A node renews its lease every third of its lifetime. A lease that ran out is claimed by
//! whichever node sweeps first: it takes the dead lease's rooms out, each only if it still
//! holds that lease (so a node that came back under a new lease keeps its rooms), and the
//! rooms that become vacant are the sweeper's to announce. A node whose lease was swept
//! while it stalled finds out at its next renewal and registers its rooms again under a
//! new lease (the backend then hears `vacated` and `occupied` again, which is what it
//! looked like from outside). Every few renewals a node also checks its rooms'
//! registrations ([`OccupancyStore::check`]), and registers again those Redis lost while
//! its lease survived (one cluster shard lost its data, or failed over to a replica that
//! was behind).

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use super::commands::{pipeline, Commands};
use super::connect::{millis, redis_error, refused, within};
use crate::broker::Keys;
use crate::error::BrokerError;

/// Script calls sent in one pipeline, at most.
const BATCH: usize = 256;
/// The shortest lease.
const MIN_LIFETIME: Duration = Duration::from_secs(3);
/// Leases one sweep claims, at most.
const CLAIM: usize = 16;
/// How long a vacant room's sequence number is kept: long enough that a room occupied
/// again soon goes on counting; after it, numbers start again from Redis's clock (ms ×
/// 1000), which is past them (see `room.lua`). Short, because a peer can make rooms.
const SEQ_KEPT: Duration = Duration::from_secs(60);

/// This node's side of occupancy on Redis.
pub(crate) struct OccupancyStore {
    commands: Commands,
    keys: Keys,
    timeout: Duration,
    /// This node's id in every room's hash: random per store.
    node: Arc<str>,
    lifetime: Duration,
    room: redis::Script,
    leases: redis::Script,
}

impl std::fmt::Debug for OccupancyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OccupancyStore")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl OccupancyStore {
    pub(crate) fn new(
        commands: Commands,
        keys: Keys,
        timeout: Duration,
        lifetime: Duration,
    ) -> Self {
        OccupancyStore {
            commands,
            keys,
            timeout,
            node: crate::broker::new_epoch(),
            // Renewed every third of it, by a task that may be busy for a timeout or two.
            lifetime: lifetime.max(MIN_LIFETIME),
            room: redis::Script::new(include_str!("room.lua")),
            leases: redis::Script::new(include_str!("leases.lua")),
        }
    }

    /// How long after sending a renewal (or the lease's start) the node may still write
    /// under the lease: its lifetime, less the time a write may take to reach Redis (at
    /// most a third of the lifetime, so that a node renewing on time never stops).
    pub(crate) fn writable_for(&self) -> Duration {
        self.lifetime - self.timeout.min(self.lifetime / 3)
    }

    /// How often the lease is renewed.
    pub(crate) fn renew_every(&self) -> Duration {
        self.lifetime / 3
    }

    /// How often the task looks at its lease (and sends again what failed).
    pub(crate) fn tick(&self) -> Duration {
        (self.lifetime / 6).min(Duration::from_secs(1))
    }

    /// Gives up `lease`, which holds no room any more (a node shutting down).
    pub(crate) async fn release(&self, lease: &str) -> Result<(), BrokerError> {
        let mut call = self.leases_call("release");
        call.arg(lease);
        call.cmd("DEL").arg(self.keys.occupancy_lease(lease));
        self.send(&call).await.map(drop)
    }

    /// The `n`th lease of this node.
    pub(crate) fn lease(&self, n: u64) -> String {
        format!("{}:{n}", self.node)
    }

    /// Sends `pipeline`; if Redis lost the scripts, loads them and sends again the calls
    /// that failed for it (every call that ran keeps its first reply).
    async fn send(&self, pipeline: &redis::Pipeline) -> Result<Vec<Value>, BrokerError> {
        let scripts = [&self.room, &self.leases];
        self.commands.send(self.timeout, pipeline, &scripts).await
    }

    fn leases_call(&self, mode: &str) -> redis::Pipeline {
        let mut pipeline = pipeline();
        let [live, sweeping] = self.keys.occupancy_leases();
        pipeline
            .cmd("EVALSHA")
            .arg(self.leases.get_hash())
            .arg(2)
            .arg(live)
            .arg(sweeping)
            .arg(mode);
        pipeline
    }

    /// One call of the leases script; its reply.
    async fn leases_reply(&self, pipeline: redis::Pipeline) -> Result<Value, BrokerError> {
        match self.send(&pipeline).await?.into_iter().next() {
            Some(Value::ServerError(e)) => Err(refused(e)),
            Some(value) => Ok(value),
            None => Err(unexpected(&"no reply")),
        }
    }

    /// Registers `lease` (live for the lifetime from now).
    pub(crate) async fn start(&self, lease: &str) -> Result<(), BrokerError> {
        let mut call = self.leases_call("start");
        call.arg(lease).arg(millis(self.lifetime));
        self.leases_reply(call).await.map(drop)
    }

    /// Renews `lease`; `false` if it was swept (the node must take a new one).
    pub(crate) async fn renew(&self, lease: &str) -> Result<bool, BrokerError> {
        let mut call = self.leases_call("renew");
        call.arg(lease).arg(millis(self.lifetime));
        match self.leases_reply(call).await? {
            Value::Int(renewed) => Ok(renewed == 1),
            other => Err(unexpected(&other)),
        }
    }

    /// Registers (`true`) or takes out (`false`) this node in each room under `lease`. Per
    /// change, in order: `Some(seq)` if it was applied (`seq` > 0 if the room became
    /// occupied or vacant across every node), `None` if it was not (send it again: a call
    /// that ran but whose reply was lost answers the same again).
    ///
    /// In three steps, so that the lease's set of rooms (what a sweep reads) always holds
    /// every room registered under it: the rooms to register are added to it first, then
    /// the room scripts run, then the rooms taken out leave it.
    pub(crate) async fn apply(
        &self,
        lease: &str,
        changes: &[(Arc<str>, bool)],
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        let registering: Vec<&str> = changes
            .iter()
            .filter(|(_, occupied)| *occupied)
            .map(|(room, _)| &**room)
            .collect();
        self.add_to_lease(lease, &registering).await?;
        let calls = changes.iter().map(|(room, occupied)| {
            let mode = if *occupied { "occupy" } else { "vacate" };
            (&**room, mode)
        });
        let applied = self.room_calls(lease, calls).await?;
        let left: Vec<&str> = changes
            .iter()
            .zip(&applied)
            .filter(|((_, occupied), applied)| !occupied && applied.is_some())
            .map(|((room, _), _)| &**room)
            .collect();
        if !left.is_empty() {
            let mut remove = pipeline();
            remove
                .cmd("SREM")
                .arg(self.keys.occupancy_lease(lease))
                .arg(&left);
            // A room left in the set is taken out again by a sweep of the lease, which
            // answers this taking out's number again (a `room_vacated` sent twice).
            if let Err(e) = self.send(&remove).await {
                tracing::debug!(error = %e, "occupancy: rooms left in the lease's set");
            }
        }
        Ok(applied)
    }

    /// Checks this node's registration under `lease` in each of `rooms` (which it holds),
    /// registering it again where Redis lost it: per room, `Some(seq)` (`seq` > 0 if that
    /// made the room occupied again), or `None` if the call failed. The rooms go into the
    /// lease's set again first (it may have been lost too), as in [`Self::apply`].
    pub(crate) async fn check(
        &self,
        lease: &str,
        rooms: &[Arc<str>],
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let rooms: Vec<&str> = rooms.iter().map(|room| &**room).collect();
        self.add_to_lease(lease, &rooms).await?;
        self.room_calls(lease, rooms.iter().map(|room| (*room, "check")))
            .await
    }

    /// Adds `rooms` to `lease`'s set of rooms (what a sweep reads).
    async fn add_to_lease(&self, lease: &str, rooms: &[&str]) -> Result<(), BrokerError> {
        if rooms.is_empty() {
            return Ok(());
        }
        let mut add = pipeline();
        add.cmd("SADD")
            .arg(self.keys.occupancy_lease(lease))
            .arg(rooms);
        match self.send(&add).await?.first() {
            Some(Value::Int(_)) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs `room.lua` in each call's mode for its room under `lease`, in one pipeline: per
    /// call, `Some(seq)`, or `None` where it failed.
    async fn room_calls<'r>(
        &self,
        lease: &str,
        calls: impl Iterator<Item = (&'r str, &'static str)>,
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        let mut scripts = pipeline();
        for (room, mode) in calls {
            self.room_call(&mut scripts, room, mode, &self.node, lease);
        }
        Ok(self
            .send(&scripts)
            .await?
            .iter()
            .map(|reply| match reply {
                Value::Int(seq) => u64::try_from(*seq).ok(),
                _ => None,
            })
            .collect())
    }

    fn room_call(
        &self,
        pipeline: &mut redis::Pipeline,
        room: &str,
        mode: &str,
        node: &str,
        lease: &str,
    ) {
        pipeline
            .cmd("EVALSHA")
            .arg(self.room.get_hash())
            .arg(2)
            .arg(self.keys.occupancy(room))
            .arg(self.keys.occupancy_done(room))
            .arg(mode)
            .arg(node)
            .arg(lease)
            .arg(millis(SEQ_KEPT))
            // A taking out is sent again within a tick, or by a sweep within two lifetimes.
            .arg(millis(self.lifetime * 3));
    }

    /// Claims leases that ran out (other nodes', or this node's own after a stall) and
    /// takes their rooms out; tells `vacated` of each room that became vacant, with its
    /// sequence number, as soon as it is known. A sweep that fails half-way is taken up
    /// again once its claim runs out (what it did is answered the same again).
    pub(crate) async fn sweep(
        &self,
        mut vacated: impl FnMut(Arc<str>, u64),
    ) -> Result<(), BrokerError> {
        let mut call = self.leases_call("claim");
        call.arg(CLAIM).arg(millis(self.lifetime));
        let claimed = match self.leases_reply(call).await? {
            Value::Array(leases) => leases
                .into_iter()
                .map(|lease| match lease {
                    Value::BulkString(bytes) => {
                        String::from_utf8(bytes).map_err(|e| unexpected(&e))
                    }
                    other => Err(unexpected(&other)),
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => return Err(unexpected(&other)),
        };
        for lease in claimed {
            let node = lease.rsplit_once(':').map_or(&*lease, |(node, _)| node);
            let set = self.keys.occupancy_lease(&lease);
            let rooms: Vec<String> = within(self.timeout, async {
                let mut connection = self.commands.get().await?;
                redis::cmd("SMEMBERS")
                    .arg(&set)
                    .query_async(&mut connection)
                    .await
                    .map_err(redis_error)
            })
            .await?;
            for chunk in rooms.chunks(BATCH) {
                let mut pipeline = pipeline();
                for room in chunk {
                    self.room_call(&mut pipeline, room, "sweep", node, &lease);
                }
                let replies = self.send(&pipeline).await?;
                let mut failed = None;
                for (room, reply) in chunk.iter().zip(replies) {
                    match reply {
                        Value::Int(0) => {}
                        Value::Int(seq) => vacated(Arc::from(room.as_str()), seq as u64),
                        other => failed = Some(unexpected(&other)),
                    }
                }
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            let mut done = self.leases_call("done");
            done.arg(&lease);
            done.cmd("DEL").arg(&set);
            self.send(&done).await?;
        }
        Ok(())
    }
}

fn unexpected(reply: &dyn std::fmt::Debug) -> BrokerError {
    BrokerError::Protocol(format!("{reply:?} from the occupancy scripts"))
}
