use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use deadpool_redis::{Pool, Runtime};
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::resp::{encode_publish, Reply, RespConnection};
use super::{Acquire, BrokerHealth, Keys, Publish, Unavailable};
use crate::hub::RoomHub;

/// Commands for the subscriber task, which owns the pub/sub connection and the reference
/// counts of the rooms this node is subscribed to.
///
/// The channel is unbounded on purpose: a `Release` is sent from cleanup paths that cannot
/// wait, and every queued command stands for one membership or one waiting caller, so the
/// queue is bounded by the node's sockets and rooms.
enum SubCommand {
    Acquire {
        room: Arc<str>,
        reply: oneshot::Sender<Result<(), Unavailable>>,
    },
    Release {
        room: Arc<str>,
    },
    Ping {
        reply: oneshot::Sender<Result<(), Unavailable>>,
    },
}

/// What the subscriber task needs, kept until the task is started on first use (the
/// broker may be built outside a Tokio runtime).
struct Pending {
    commands: mpsc::UnboundedReceiver<SubCommand>,
    live: watch::Sender<bool>,
    hub: RoomHub,
}

/// The Redis broker.
pub(crate) struct RedisBroker {
    pool: Pool,
    /// Publishing lanes: each is a task that sends whatever is queued to it as one Redis
    /// pipeline on a connection of its own (taking a pooled object per publish cost
    /// deadpool's recycle `PING` and a wait for one of its few objects). A socket always
    /// uses the same lane, and a lane keeps the order it was given, so a socket's
    /// publishes reach Redis in order even with many in flight.
    lanes: Vec<mpsc::UnboundedSender<PublishRequest>>,
    pending_lanes: Mutex<Option<Vec<mpsc::UnboundedReceiver<PublishRequest>>>>,
    client: redis::Client,
    keys: Keys,
    timeout: Duration,
    commands: mpsc::UnboundedSender<SubCommand>,
    live: watch::Receiver<bool>,
    pending: Mutex<Option<Pending>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("keys", &self.keys)
            .field("live", &*self.live.borrow())
            .finish_non_exhaustive()
    }
}

/// How many publishing lanes (and connections) a node keeps.
const PUBLISH_LANES: usize = 4;

/// The most publishes one pipeline carries.
const MAX_BATCH: usize = 512;

/// One publish waiting in a lane.
pub(crate) struct PublishRequest {
    channel: String,
    frame: Utf8Bytes,
    reply: oneshot::Sender<Result<(), Unavailable>>,
}

/// A lane: sends everything queued as one pipeline, waits for Redis, answers each request
/// in order, and goes again. It keeps one connection of its own (see `resp`), opened on
/// first use and again after any failure.
async fn run_lane(
    info: redis::ConnectionInfo,
    mut requests: mpsc::UnboundedReceiver<PublishRequest>,
    timeout: Duration,
) {
    let mut connection: Option<RespConnection> = None;
    let mut batch = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(16 * 1024);
    while let Some(first) = requests.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        out.clear();
        for request in &batch {
            encode_publish(
                &mut out,
                request.channel.as_bytes(),
                request.frame.as_bytes(),
            );
        }
        let result = within(timeout, async {
            let conn = match &mut connection {
                Some(conn) => conn,
                None => connection.insert(RespConnection::connect(&info).await?),
            };
            conn.write(&out).await?;
            conn.expect(
                batch.len(),
                |reply| matches!(reply, Reply::Integer(_)),
                |_, _| {},
            )
            .await
        })
        .await;
        if result.is_err() {
            // The replies may be out of step now: connect afresh next time.
            connection = None;
        }
        for request in batch.drain(..) {
            let _ = request.reply.send(result.clone());
        }
        if out.capacity() > 1024 * 1024 {
            // One burst of large frames should not pin a large buffer.
            out = Vec::with_capacity(16 * 1024);
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Unavailable {
    Unavailable(e.to_string())
}

async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Unavailable> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(Unavailable(format!(
            "no answer from Redis within {timeout:?}"
        ))),
    }
}

impl RedisBroker {
    /// Builds the broker without connecting; fails only on a malformed URL.
    pub(crate) fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        hub: RoomHub,
    ) -> Result<Self, crate::Error> {
        let client = redis::Client::open(url).map_err(|e| crate::Error::InvalidRedisUrl {
            url: redact(url),
            reason: e.to_string(),
        })?;
        let pool = create_pool(url, timeout)?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let (live_tx, live) = watch::channel(false);
        let (lanes, lane_receivers): (Vec<_>, Vec<_>) = (0..PUBLISH_LANES)
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        Ok(RedisBroker {
            pool,
            lanes,
            pending_lanes: Mutex::new(Some(lane_receivers)),
            client,
            keys: Keys::new(prefix),
            timeout,
            commands,
            live,
            pending: Mutex::new(Some(Pending {
                commands: receiver,
                live: live_tx,
                hub,
            })),
        })
    }

    /// Starts the publishing lanes if they are not running yet.
    fn start_lanes(&self) {
        let pending = self
            .pending_lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for receiver in pending.into_iter().flatten() {
            tokio::spawn(run_lane(
                self.client.get_connection_info().clone(),
                receiver,
                self.timeout,
            ));
        }
    }

    /// Starts the subscriber task if it is not running yet.
    fn start(&self) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(pending) = pending {
            let task = Subscriber {
                info: self.client.get_connection_info().clone(),
                keys: self.keys.clone(),
                timeout: self.timeout,
                hub: pending.hub,
                live: pending.live,
                counts: HashMap::new(),
            };
            tokio::spawn(task.run(pending.commands));
        }
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, Unavailable> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Queues a publish on lane `lane` at once; the returned [`Publish`] resolves when Redis
    /// accepted it.
    pub(crate) fn publish(&self, room: &str, frame: Utf8Bytes, lane: u64) -> Publish {
        self.start_lanes();
        let (reply, answer) = oneshot::channel();
        let request = PublishRequest {
            channel: self.keys.room_channel(room),
            frame,
            reply,
        };
        match self.lanes[(lane % PUBLISH_LANES as u64) as usize].send(request) {
            Ok(()) => Publish::Pending(answer),
            Err(_) => Publish::Done(Err(Unavailable("publishing lane stopped".into()))),
        }
    }

    pub(crate) fn acquire(&self, room: Arc<str>) -> Acquire {
        self.start();
        let (reply, answer) = oneshot::channel();
        match self.commands.send(SubCommand::Acquire { room, reply }) {
            Ok(()) => Acquire::Pending(answer),
            Err(_) => Acquire::Failed(Unavailable("subscriber task stopped".into())),
        }
    }

    pub(crate) fn release(&self, room: Arc<str>) {
        // Fails only when the task is gone, and then there is nothing left to release.
        let _ = self.commands.send(SubCommand::Release { room });
    }

    pub(crate) async fn record(&self, identity: &str, room: &str) -> Result<(), Unavailable> {
        self.identity_set_command("SADD", identity, room).await
    }

    pub(crate) async fn forget(&self, identity: &str, room: &str) -> Result<(), Unavailable> {
        self.identity_set_command("SREM", identity, room).await
    }

    /// `SADD` or `SREM` of `room` in `identity`'s set, through the pool.
    async fn identity_set_command(
        &self,
        command: &str,
        identity: &str,
        room: &str,
    ) -> Result<(), Unavailable> {
        let key = self.keys.identity_set(identity);
        within(self.timeout, async {
            let mut conn = self.connection().await?;
            redis::cmd(command)
                .arg(key)
                .arg(room)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(unavailable)
        })
        .await
        .map(drop)
    }

    pub(crate) async fn rooms_of(&self, identity: &str) -> Result<Vec<String>, Unavailable> {
        let key = self.keys.identity_set(identity);
        within(self.timeout, async {
            let mut conn = self.connection().await?;
            redis::cmd("SMEMBERS")
                .arg(key)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .map_err(unavailable)
        })
        .await
    }

    async fn ping_pool(&self, timeout: Duration) -> Result<(), Unavailable> {
        within(timeout, async {
            let mut conn = self.connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(unavailable)
        })
        .await
        .map(drop)
    }

    async fn ping_subscriber(&self, timeout: Duration) -> Result<(), Unavailable> {
        self.start();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(SubCommand::Ping { reply })
            .map_err(|_| Unavailable("subscriber task stopped".into()))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Unavailable("subscriber task stopped".into())),
            Err(_) => Err(Unavailable(format!(
                "pub/sub connection gave no answer within {timeout:?}"
            ))),
        }
    }

    pub(crate) async fn health(&self, timeout: Duration) -> BrokerHealth {
        let (publish, subscriptions) =
            tokio::join!(self.ping_pool(timeout), self.ping_subscriber(timeout));
        BrokerHealth {
            publish: publish.map_err(|e| e.0),
            subscriptions: subscriptions.map_err(|e| e.0),
        }
    }

    pub(crate) async fn ready(&self, timeout: Duration) -> Result<(), Unavailable> {
        self.start();
        self.ping_pool(timeout).await?;
        let mut live = self.live.clone();
        let up = tokio::time::timeout(timeout, live.wait_for(|up| *up))
            .await
            .is_ok_and(|changed| changed.is_ok());
        match up {
            true => Ok(()),
            false => Err(Unavailable(format!(
                "pub/sub connection not up within {timeout:?}"
            ))),
        }
    }
}

/// A `deadpool-redis` pool for `url` whose waits, connects and recycles each take at most
/// `timeout`. Connects lazily; fails only on a malformed URL.
pub(crate) fn create_pool(url: &str, timeout: Duration) -> Result<Pool, crate::Error> {
    let invalid = |reason: String| crate::Error::InvalidRedisUrl {
        url: redact(url),
        reason,
    };
    // Parse first: deadpool only reports a bad URL at the first connection.
    redis::Client::open(url).map_err(|e| invalid(e.to_string()))?;
    let mut config = deadpool_redis::Config::from_url(url);
    let mut pool_config = deadpool_redis::PoolConfig::default();
    pool_config.timeouts.wait = Some(timeout);
    pool_config.timeouts.create = Some(timeout);
    pool_config.timeouts.recycle = Some(timeout);
    config.pool = Some(pool_config);
    config
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|e| invalid(e.to_string()))
}

/// PUBLISHes a frame through the pool; returns once Redis accepted it.
pub(crate) async fn publish(
    pool: &Pool,
    channel: String,
    frame: &[u8],
    timeout: Duration,
) -> Result<(), Unavailable> {
    within(timeout, async {
        let mut conn = pool.get().await.map_err(unavailable)?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(frame)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(unavailable)
    })
    .await
    .map(drop)
}

/// Hides a password in a Redis URL before it reaches an error message or a log.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Why the subscriber stopped serving one connection.
enum Stop {
    /// The connection was lost: reconnect.
    Lost(Unavailable),
    /// The broker was dropped: end the task.
    Exit,
}

/// The task that owns the pub/sub connection.
struct Subscriber {
    info: redis::ConnectionInfo,
    keys: Keys,
    timeout: Duration,
    hub: RoomHub,
    live: watch::Sender<bool>,
    /// Acquisitions per room not yet released; a room is subscribed at Redis while its
    /// count is > 0 (and the connection is up).
    counts: HashMap<Arc<str>, usize>,
}

impl Subscriber {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<SubCommand>) {
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times();
        let mut delays = policy.build();
        let mut connected_before = false;
        loop {
            let stop = match within(self.timeout, RespConnection::connect(&self.info)).await {
                Ok(connection) => {
                    self.serve(connection, &mut commands, connected_before)
                        .await
                }
                Err(e) => Stop::Lost(e),
            };
            if self.live.send_replace(false) {
                // The connection had been up: start the backoff afresh.
                delays = policy.build();
                connected_before = true;
            }
            crate::metrics::redis_subscriptions(0);
            match stop {
                Stop::Exit => return,
                Stop::Lost(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::warn!(error = %e.0, retry_in = ?delay, "Redis pub/sub connection down");
                    if !self.answer_while_down(&mut commands, delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Answers commands while there is no connection: acquisitions and pings fail at once.
    /// Returns `false` when the broker is gone.
    async fn answer_while_down(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<SubCommand>,
        delay: Duration,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                command = commands.recv() => match command {
                    None => return false,
                    Some(SubCommand::Acquire { room, reply }) => {
                        // Counted all the same: the matching release will come, and a
                        // room still wanted at reconnection is resubscribed.
                        *self.counts.entry(room).or_insert(0) += 1;
                        let _ = reply.send(Err(Unavailable("Redis pub/sub connection is down".into())));
                    }
                    Some(SubCommand::Ping { reply }) => {
                        let _ = reply.send(Err(Unavailable("Redis pub/sub connection is down".into())));
                    }
                    Some(SubCommand::Release { room }) => {
                        self.decrement(&room);
                    }
                },
            }
        }
    }

    /// Returns `true` when the count reached zero (the room is no longer wanted).
    fn decrement(&mut self, room: &str) -> bool {
        match self.counts.get_mut(room) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(room);
                true
            }
            None => false,
        }
    }

    async fn serve(
        &mut self,
        mut connection: RespConnection,
        commands: &mut mpsc::UnboundedReceiver<SubCommand>,
        reconnection: bool,
    ) -> Stop {
        // Resubscribe every room this node holds (after a reconnect).
        let channels: Vec<String> = self
            .counts
            .keys()
            .map(|room| self.keys.room_channel(room))
            .collect();
        for chunk in channels.chunks(1024) {
            let mut subscribe = redis::cmd("SUBSCRIBE");
            subscribe.arg(chunk);
            if let Err(e) = self
                .command(&mut connection, &subscribe, Reply::Subscribed, chunk.len())
                .await
            {
                return Stop::Lost(e);
            }
        }
        if reconnection {
            crate::metrics::redis_reconnected();
            tracing::info!(
                rooms = channels.len(),
                "reconnected to Redis and resubscribed"
            );
        }
        crate::metrics::redis_subscriptions(self.counts.len());
        self.live.send_replace(true);

        loop {
            tokio::select! {
                // Between commands, nothing but messages may arrive.
                read = connection.next_reply(|channel, payload| forward(&self.keys, &self.hub, channel, payload)) => {
                    return Stop::Lost(match read {
                        Ok(reply) => Unavailable(format!("unexpected reply from Redis: {reply:?}")),
                        Err(e) => e,
                    });
                }
                command = commands.recv() => match command {
                    None => return Stop::Exit,
                    Some(SubCommand::Acquire { room, reply }) => {
                        let count = self.counts.entry(room.clone()).or_insert(0);
                        *count += 1;
                        if *count > 1 {
                            // Already subscribed (commands are handled in order).
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        let subscribe = redis::cmd("SUBSCRIBE").arg(self.keys.room_channel(&room)).clone();
                        match self.command(&mut connection, &subscribe, Reply::Subscribed, 1).await {
                            Ok(()) => {
                                let _ = reply.send(Ok(()));
                                crate::metrics::redis_subscriptions(self.counts.len());
                            }
                            Err(e) => {
                                // Stays counted until its release (see `Broker::acquire`).
                                let _ = reply.send(Err(e.clone()));
                                return Stop::Lost(e);
                            }
                        }
                    }
                    Some(SubCommand::Release { room }) => {
                        if self.decrement(&room) {
                            let unsubscribe = redis::cmd("UNSUBSCRIBE").arg(self.keys.room_channel(&room)).clone();
                            if let Err(e) = self.command(&mut connection, &unsubscribe, Reply::Unsubscribed, 1).await {
                                return Stop::Lost(e);
                            }
                            crate::metrics::redis_subscriptions(self.counts.len());
                        }
                    }
                    Some(SubCommand::Ping { reply }) => {
                        match self.command(&mut connection, &redis::cmd("PING"), Reply::Pong, 1).await {
                            Ok(()) => {
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e.clone()));
                                return Stop::Lost(e);
                            }
                        }
                    }
                },
            }
        }
    }

    /// Sends `command` and waits (within the timeout) for `count` replies of kind
    /// `expected`, delivering the messages that arrive meanwhile.
    async fn command(
        &self,
        connection: &mut RespConnection,
        command: &redis::Cmd,
        expected: Reply,
        count: usize,
    ) -> Result<(), Unavailable> {
        within(self.timeout, async {
            connection.send(command).await?;
            connection
                .expect(
                    count,
                    |reply| *reply == expected,
                    |channel, payload| forward(&self.keys, &self.hub, channel, payload),
                )
                .await
        })
        .await
    }
}

/// Hands a frame received from Redis to the hub, unchanged (copied once out of the read
/// buffer; see `resp`).
fn forward(keys: &Keys, hub: &RoomHub, channel: &[u8], payload: &[u8]) {
    let Some(room) = std::str::from_utf8(channel)
        .ok()
        .and_then(|channel| keys.room_of_channel(channel))
    else {
        return;
    };
    match std::str::from_utf8(payload) {
        Ok(frame) => {
            hub.deliver(room, &Utf8Bytes::from(frame.to_owned()));
        }
        Err(_) => tracing::warn!(room, "dropped a non-UTF-8 frame received from Redis"),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
