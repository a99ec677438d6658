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

/// How often rooms Redis refused (while the node holds them) are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// At most this many refused rooms are tried one at a time per retry (a `SUBSCRIBE` each);
/// the rest wait for the next.
const RETRY_ONE_BY_ONE: usize = 64;

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
        // While a later chunk is being confirmed, live frames of rooms in earlier chunks
        // arrive. After a reconnection, a history room's are left to the catch-up, which
        // reads them from the history in order with what was missed: delivered now, they
        // would come before older missed ones, and the catch-up would start after them.
        let held = match reconnection {
            true => Held::HistoryRooms,
            false => Held::Nothing,
        };
        let refused = match self
            .subscribe_rooms(&mut connection, &rooms, held, usize::MAX)
            .await
        {
            Ok(refused) => refused,
            Err(e) => return Stop::Lost(e),
        };
        if refused > 0 {
            tracing::warn!(
                rooms = refused,
                retry_every = ?RETRY_EVERY,
                "Redis refused to subscribe to rooms this node holds (an ACL?): their members receive nothing until a retry succeeds, and get a gap or the history then"
            );
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
            tracing::info!(rooms = rooms.len(), "reconnected to Redis and resubscribed");
        }
        crate::metrics::redis_subscriptions(self.counts.subscribed_count());
        self.live.send_replace(true);

        let mut retry =
            tokio::time::interval_at(tokio::time::Instant::now() + RETRY_EVERY, RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = retry.tick(), if self.counts.has_failed() => {
                    if let Err(e) = self.retry_failed(&mut connection).await {
                        return Stop::Lost(e);
                    }
                }
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

    /// Subscribes to `rooms` (chunks of 1,024 channels a command) and records each room's
    /// outcome in the counts; returns how many Redis refused. Redis refuses a whole
    /// `SUBSCRIBE` for one channel it will not give (an ACL): the rooms of a refused chunk
    /// are then subscribed one at a time (at most `one_by_one` of them; the rest stay
    /// failed), so that only those refused go without. An error means the connection is
    /// lost.
    async fn subscribe_rooms(
        &mut self,
        connection: &mut RespConnection,
        rooms: &[Arc<str>],
        held: Held,
        mut one_by_one: usize,
    ) -> Result<usize, BrokerError> {
        let mut refused = 0;
        for chunk in rooms.chunks(1024) {
            let mut subscribe = redis::cmd("SUBSCRIBE");
            for room in chunk {
                subscribe.arg(self.keys.room_channel(room));
            }
            let result = self
                .command(connection, &subscribe, Reply::Subscribed, chunk.len(), held)
                .await;
            match result {
                Ok(()) => {
                    for room in chunk {
                        self.counts.subscribed(room, true);
                    }
                    continue;
                }
                Err(BrokerError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
            for room in chunk {
                if one_by_one == 0 {
                    // Not tried this time: still failed.
                    refused += 1;
                    self.counts.subscribed(room, false);
                    continue;
                }
                one_by_one -= 1;
                let subscribe = redis::cmd("SUBSCRIBE")
                    .arg(self.keys.room_channel(room))
                    .clone();
                let result = self
                    .command(connection, &subscribe, Reply::Subscribed, 1, held)
                    .await;
                if result.is_err() {
                    refused += 1;
                }
                self.counts.subscribed(room, result.is_ok());
                still_connected(result)?;
            }
        }
        Ok(refused)
    }

    /// Subscribes again to the rooms Redis refused (see [`Task::subscribe_rooms`]); those it
    /// takes now catch up (or get a gap) for what they missed meanwhile.
    async fn retry_failed(&mut self, connection: &mut RespConnection) -> Result<(), BrokerError> {
        let failed = self.counts.failed();
        self.subscribe_rooms(connection, &failed, Held::Nothing, RETRY_ONE_BY_ONE)
            .await?;
        let back: Vec<Arc<str>> = failed
            .into_iter()
            .filter(|room| self.counts.is_subscribed(room))
            .collect();
        if !back.is_empty() {
            tracing::info!(rooms = back.len(), "Redis took rooms it had refused");
            self.tracks
                .catch_up(back.iter(), &self.store, &*self.sink)
                .await;
            crate::metrics::redis_subscriptions(self.counts.subscribed_count());
        }
        Ok(())
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
                if !first && result.is_ok() {
                    // A room Redis had refused (or could not take): its members missed
                    // what was published meanwhile.
                    self.tracks
                        .catch_up(std::iter::once(&room), &self.store, &*self.sink)
                        .await;
                }
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
    match std::str::from_utf8(payload) {
        // Only frames the history keeps (those with an offset): a join or leave event
        // is not in it and would be lost.
        Ok(frame)
            if held == Held::HistoryRooms
                && tracks.holds(room)
                && crate::protocol::server::position_of(frame).is_some() => {}
        // A history room's frame already delivered (after a catch-up) is dropped.
        Ok(frame) if !tracks.admit(room, frame) => {}
        Ok(frame) => sink.deliver(room, &Utf8Bytes::from(frame.to_owned())),
        Err(_) => tracing::warn!(room, "dropped a non-UTF-8 frame received from Redis"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::protocol::server::{self, PresenceEvent};
    use crate::settings::{History, RoomSettings};

    #[derive(Default)]
    struct Delivered(Mutex<Vec<String>>);

    impl crate::broker::FrameSink for Delivered {
        fn deliver(&self, _room: &str, frame: &Utf8Bytes) {
            self.0.lock().unwrap().push(frame.to_string());
        }
    }

    /// While rooms are subscribed again after a reconnection, a history room's messages
    /// wait for the catch-up (which reads them from the history), but its join and leave
    /// events, which the history does not keep, are delivered: held, they would be lost.
    #[test]
    fn held_history_rooms_keep_their_join_and_leave_events() {
        let mut policy = RoomPolicy::default();
        let history = History::new(10, Duration::from_secs(60));
        policy.default_settings(RoomSettings::with_history(history));
        let tracks = Tracks::new(policy);
        let room: Arc<str> = "chat".into();
        tracks.opened(&room);
        let keys = Keys::new("thinws");
        let channel = keys.room_channel(&room);
        let sink = Delivered::default();
        let payload = serde_json::value::RawValue::from_string("1".into()).unwrap();
        let message = server::with_position(&server::delivery(&room, "c1", &payload), 4, "e");
        let join = server::presence_event(PresenceEvent::Join, &room, "c2");
        for frame in [&message, &join] {
            let (channel, frame) = (channel.as_bytes(), frame.as_bytes());
            forward(&keys, &sink, &tracks, channel, frame, Held::HistoryRooms);
        }
        assert_eq!(*sink.0.lock().unwrap(), std::slice::from_ref(&join));
        forward(
            &keys,
            &sink,
            &tracks,
            channel.as_bytes(),
            message.as_bytes(),
            Held::Nothing,
        );
        assert_eq!(*sink.0.lock().unwrap(), [join, message]);
    }
}
