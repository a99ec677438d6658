//! The subscriber task: it owns the node's pub/sub connection and the reference counts of
//! the rooms this node is subscribed to, confirms each subscribe before its caller goes
//! on, forwards every frame received to the sink unchanged, and after a lost connection
//! reconnects with backoff and resubscribes every room it holds.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::{mpsc, watch};

use super::catch_up::Tracks;
use super::connect::{within, RedisTarget};
use super::history::HistoryStore;
use super::resp::{Reply, RespConnection};
use super::room_counts::{Acquired, RoomCounts};
use super::subscriptions::{Command, Subscriptions};
use crate::broker::{Keys, SharedSink};
use crate::error::BrokerError;
use crate::settings::RoomPolicy;

/// The subscriber task on one Redis.
pub(crate) struct Subscriber;

impl Subscriber {
    /// Starts the task (inside a Tokio runtime); the returned handle drives it.
    pub(crate) fn start(
        target: RedisTarget,
        keys: Keys,
        timeout: Duration,
        sink: SharedSink,
        rooms: RoomPolicy,
        store: Arc<HistoryStore>,
    ) -> Subscriptions {
        let (handle, ends) = Subscriptions::new("subscriber task");
        let task = Task {
            target,
            keys,
            timeout,
            sink,
            live: ends.live,
            counts: RoomCounts::default(),
            tracks: Tracks::new(rooms),
            store,
        };
        tokio::spawn(task.run(ends.commands));
        handle
    }
}

/// Why the task stopped serving one connection.
enum Stop {
    /// The connection was lost: reconnect.
    Lost(BrokerError),
    /// The broker was dropped: end the task.
    Exit,
}

/// The task's state.
struct Task {
    target: RedisTarget,
    keys: Keys,
    timeout: Duration,
    sink: SharedSink,
    live: watch::Sender<bool>,
    /// Acquisitions per room not yet released, and which of them Redis refused (or could
    /// not take, while down): a room is subscribed at Redis while it is counted and not
    /// failed (and the connection is up).
    counts: RoomCounts,
    /// Where each history room stands, for the catch-up after a reconnection.
    tracks: Tracks,
    store: Arc<HistoryStore>,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times();
        let mut delays = policy.build();
        let mut connected_before = false;
        loop {
            let stop = match within(self.timeout, RespConnection::connect(&self.target)).await {
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
                    if closed_by_redis(&e) {
                        crate::metrics::redis_pubsub_cut();
                        tracing::warn!(
                            retry_in = ?delay,
                            "Redis closed this node's pub/sub connection: what it had buffered for the node is lost (Redis does this to a subscriber past its `client-output-buffer-limit pubsub`, see the README's deployment section); members of its rooms get a gap"
                        );
                    } else {
                        tracing::warn!(error = %e.report(), retry_in = ?delay, "Redis pub/sub connection down");
                    }
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
        commands: &mut mpsc::UnboundedReceiver<Command>,
        delay: Duration,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                command = commands.recv() => match command {
                    None => return false,
                    Some(Command::Acquire { room, reply }) => {
                        // Counted all the same: the matching release will come, and a
                        // room still wanted at reconnection is resubscribed.
                        if self.counts.get(&room).is_none() {
                            self.tracks.opened(&room);
                        }
                        self.counts.acquire(&room);
                        self.counts.subscribed(&room, false);
                        let _ = reply.send(Err(BrokerError::SubscriberDown));
                    }
                    Some(Command::Ping { reply }) => {
                        let _ = reply.send(Err(BrokerError::SubscriberDown));
                    }
                    Some(Command::Release { room }) => {
                        self.release(&room);
                    }
                },
            }
        }
    }

    /// Gives one acquisition of `room` back; `true` when it was the last (the room is no
    /// longer wanted).
    fn release(&mut self, room: &str) -> bool {
        let last = self.counts.release(room);
        if last {
            self.tracks.closed(room);
        }
        last
    }

    async fn serve(
        &mut self,
        mut connection: RespConnection,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        reconnection: bool,
    ) -> Stop {
        // Resubscribe every room this node holds (after a reconnect).
        let rooms: Vec<Arc<str>> = self.counts.rooms().cloned().collect();
        let channels: Vec<String> = rooms
            .iter()
            .map(|room| self.keys.room_channel(room))
            .collect();
        // While a later chunk is being confirmed, live frames of rooms in earlier chunks
        // arrive. After a reconnection, a history room's are left to the catch-up, which
        // reads them from the history in order with what was missed: delivered now, they
        // would come before older missed ones, and the catch-up would start after them.
        let held = match reconnection {
            true => Held::HistoryRooms,
            false => Held::Nothing,
        };
        for chunk in channels.chunks(1024) {
            let mut subscribe = redis::cmd("SUBSCRIBE");
            subscribe.arg(chunk);
            if let Err(e) = self
                .command(
                    &mut connection,
                    &subscribe,
                    Reply::Subscribed,
                    chunk.len(),
                    held,
                )
                .await
            {
                return Stop::Lost(e);
            }
        }
        for room in &rooms {
            self.counts.subscribed(room, true);
        }
        if reconnection {
            // What was published while the connection was down, before any live frame
            // (which waits, unread, on the connection meanwhile).
            let plain = self
                .tracks
                .catch_up(rooms.iter(), &self.store, &*self.sink)
                .await;
            if plain > 0 {
                tracing::warn!(
                    rooms = plain,
                    "messages published while the pub/sub connection was down are lost in rooms without history: their members got a gap"
                );
            }
            crate::metrics::redis_reconnected();
            tracing::info!(
                rooms = channels.len(),
                "reconnected to Redis and resubscribed"
            );
        }
        crate::metrics::redis_subscriptions(self.counts.subscribed_count());
        self.live.send_replace(true);

        loop {
            tokio::select! {
                // Between commands, nothing but messages may arrive.
                read = connection.next_reply(|channel, payload| forward(&self.keys, &*self.sink, &self.tracks, channel, payload, Held::Nothing)) => {
                    return Stop::Lost(match read {
                        Ok(reply) => BrokerError::Protocol(format!("{reply:?} between commands")),
                        Err(e) => e,
                    });
                }
                command = commands.recv() => {
                    let Some(command) = command else { return Stop::Exit };
                    if let Err(e) = self.handle(&mut connection, command).await {
                        return Stop::Lost(e);
                    }
                }
            }
        }
    }

    /// Carries out one command on the live connection; an error means the connection is
    /// lost.
    async fn handle(
        &mut self,
        connection: &mut RespConnection,
        command: Command,
    ) -> Result<(), BrokerError> {
        match command {
            Command::Acquire { room, reply } => {
                let first = self.counts.get(&room).is_none();
                if self.counts.acquire(&room) == Acquired::Subscribed {
                    // Already subscribed (commands are handled in order).
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                if first {
                    self.tracks.opened(&room);
                }
                let subscribe = redis::cmd("SUBSCRIBE")
                    .arg(self.keys.room_channel(&room))
                    .clone();
                // On failure the room stays counted until its release (see
                // `Broker::acquire`).
                let result = self
                    .command(connection, &subscribe, Reply::Subscribed, 1, Held::Nothing)
                    .await;
                self.counts.subscribed(&room, result.is_ok());
                let _ = reply.send(result.clone());
                crate::metrics::redis_subscriptions(self.counts.subscribed_count());
                still_connected(result)
            }
            Command::Release { room } => {
                if !self.release(&room) {
                    return Ok(());
                }
                let unsubscribe = redis::cmd("UNSUBSCRIBE")
                    .arg(self.keys.room_channel(&room))
                    .clone();
                let result = self
                    .command(
                        connection,
                        &unsubscribe,
                        Reply::Unsubscribed,
                        1,
                        Held::Nothing,
                    )
                    .await;
                crate::metrics::redis_subscriptions(self.counts.subscribed_count());
                still_connected(result)
            }
            Command::Ping { reply } => {
                let result = self
                    .command(
                        connection,
                        &redis::cmd("PING"),
                        Reply::Pong,
                        1,
                        Held::Nothing,
                    )
                    .await;
                let _ = reply.send(result.clone());
                result
            }
        }
    }

    /// Sends `command` and waits (within the timeout) for `count` replies of kind
    /// `expected`, delivering the messages that arrive meanwhile (but those `held`).
    async fn command(
        &self,
        connection: &mut RespConnection,
        command: &redis::Cmd,
        expected: Reply,
        count: usize,
        held: Held,
    ) -> Result<(), BrokerError> {
        within(self.timeout, async {
            connection.send(command).await?;
            connection
                .expect(
                    count,
                    |reply| *reply == expected,
                    |channel, payload| {
                        forward(
                            &self.keys,
                            &*self.sink,
                            &self.tracks,
                            channel,
                            payload,
                            held,
                        )
                    },
                )
                .await
        })
        .await
    }
}

/// A one-reply command's outcome for the connection: Redis answering it with an error
/// (e.g. a channel its ACL refuses) leaves the connection in step and every other room
/// subscribed; anything else wrong means the connection is lost.
fn still_connected(result: Result<(), BrokerError>) -> Result<(), BrokerError> {
    match result {
        Err(BrokerError::Refused(_)) => Ok(()),
        other => other,
    }
}

/// Whether Redis itself closed the connection (an orderly end of stream, as when it cuts
/// a client past its output buffer limit), rather than it failing or timing out.
fn closed_by_redis(e: &BrokerError) -> bool {
    match e {
        BrokerError::Connection(source) => source
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof),
        _ => false,
    }
}

/// Which frames received from Redis are not delivered when they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Nothing,
    /// History rooms' frames: a catch-up that follows reads them from the history.
    HistoryRooms,
}

/// Hands a frame received from Redis to the sink, unchanged (copied once out of the read
/// buffer; see `resp`), unless it is `held`.
fn forward(
    keys: &Keys,
    sink: &dyn crate::broker::FrameSink,
    tracks: &Tracks,
    channel: &[u8],
    payload: &[u8],
    held: Held,
) {
    let Some(room) = std::str::from_utf8(channel)
        .ok()
        .and_then(|channel| keys.room_of_channel(channel))
    else {
        return;
    };
    if held == Held::HistoryRooms && tracks.holds(room) {
        return;
    }
    match std::str::from_utf8(payload) {
        // A history room's frame already delivered (after a catch-up) is dropped.
        Ok(frame) if !tracks.admit(room, frame) => {}
        Ok(frame) => sink.deliver(room, &Utf8Bytes::from(frame.to_owned())),
        Err(_) => tracing::warn!(room, "dropped a non-UTF-8 frame received from Redis"),
    }
}
