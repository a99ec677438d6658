//! Publishing lanes: tasks that each hold one pooled connection and send whatever is queued
//! to them as one redis-rs pipeline.
//!
//! A caller always uses the same lane (a socket uses lane `id % lanes`), and a lane sends
//! its batches one after the other and answers them in order, so a socket's publishes
//! reach Redis in the order it sent them even with many in flight.
//!
//! Every request has a deadline, the Redis timeout after it was queued, and is answered by
//! then: a request whose time ran out while it waited for the lane is never sent
//! ([`BrokerError::NotSent`]); one that was sent and got no answer by the earliest deadline
//! of its pipeline has an unknown outcome ([`BrokerError::Timeout`]). A lane checks its
//! connection out of the pool once and keeps it. It hands the connection back (to be
//! recycled, or replaced if it is dead) after any error, and before sending when any
//! pooled connection was reported lost since it was checked out, so that a publish is not
//! sent on a connection already known to be closed.

use std::ops::Range;
use std::time::Duration;

use hyper_tungstenite::tungstenite::Utf8Bytes;
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use self::script_call::{history_results, unknown};
use super::commands::{no_script, query_commands, Commands, Connection, Pipelines, Wait};
use super::connect::{millis, redis_error, refused, Disconnects};
use super::history;
use crate::broker::{Accepted, Keys, Once, Publish, Published};
use crate::error::BrokerError;
use crate::settings::History;

/// The most requests one pipeline carries. It also bounds the frames of one room in one
/// publish script call, which go to one `RPUSH` through Lua's `unpack` (Redis's Lua takes
/// at most about 8,000 values there).
const MAX_BATCH: usize = 512;

mod once;
mod script_call;

type Reply = oneshot::Sender<Published>;

/// One request waiting in a lane.
struct Request {
    kind: Kind,
    reply: Reply,
    /// When the caller must have its answer.
    deadline: Instant,
}

enum Kind {
    Publish {
        channel: String,
        frame: Utf8Bytes,
    },
    /// A publish with an idempotency key to a room without history: the once script (see
    /// `once`). Boxed, as is `History`, so that a request, which is moved from the caller
    /// to the lane's batch and on, stays as small as a plain publish's.
    Once(Box<OncePublish>),
    /// A publish to a room with history: the publish script (see `history`).
    History(Box<HistoryPublish>),
    /// A health probe: `PING` on the lane's connection, in order with the publishes.
    Ping,
}

struct OncePublish {
    record: String,
    channel: String,
    frame: Utf8Bytes,
    window_ms: u64,
}

struct HistoryPublish {
    meta: String,
    list: String,
    channel: String,
    /// The delivered frame without its closing `}`.
    frame: String,
    size: usize,
    ttl_ms: u64,
    /// The record of its idempotency key and the window in ms.
    once: Option<(String, u64)>,
}

impl Kind {
    /// The key the command for this request names: the channel, or the history's meta key
    /// (the publish script's first key); `None` for a `PING`.
    fn key(&self) -> Option<&[u8]> {
        match self {
            Kind::Publish { channel, .. } => Some(channel.as_bytes()),
            Kind::Once(once) => Some(once.channel.as_bytes()),
            Kind::History(history) => Some(history.meta.as_bytes()),
            Kind::Ping => None,
        }
    }
}

/// Appends to `pipeline` the one command that answers `requests`: a publish, a `PING`, or
/// one publish script call for consecutive history publishes (of one room on a cluster, of
/// any rooms on one Redis), in runs of one room each.
fn command(requests: &[Request], cluster: bool, pipeline: &mut redis::Pipeline) {
    match &requests[0].kind {
        Kind::Publish { channel, frame } => {
            let publish = match cluster {
                true => "SPUBLISH",
                false => "PUBLISH",
            };
            // Sized up front: one allocation for the command's bytes, none to grow them.
            let mut command = redis::Cmd::with_capacity(3, 8 + channel.len() + frame.len());
            command.arg(publish).arg(channel).arg(frame.as_bytes());
            pipeline.add_command(command);
        }
        Kind::Ping => {
            pipeline.cmd("PING");
        }
        Kind::Once(_) => once::append(requests, cluster, pipeline),
        Kind::History(_) => script_call::append(requests, cluster, pipeline),
    }
}

impl Request {
    fn reply(self, result: Published) {
        // The caller may have gone away; the outcome is the same for everyone else.
        let _ = self.reply.send(result);
    }
}

/// What a pipelined command's reply says to the requests it carried.
enum Outcome {
    /// The same result for each (a plain publish or a ping carries one request).
    Same(Published),
    /// A result for each, in order.
    Each(Vec<Published>),
    /// Nothing was done (`NOSCRIPT`): to be sent again once the script is loaded.
    Retry,
}

/// A set of running publishing lanes.
#[derive(Debug)]
pub(crate) struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Request>>,
    timeout: Duration,
}

impl Lanes {
    /// Starts `count` lanes sending to `commands` (inside a Tokio runtime); each round trip
    /// takes at most `timeout`.
    ///
    /// With `wait_replicas` above 0, a round that carries history or keyed publishes
    /// ends with `WAIT` for that many replicas, and those publishes are answered as done
    /// only once they confirmed.
    pub(crate) fn start(
        count: usize,
        commands: &Commands,
        disconnects: &Disconnects,
        timeout: Duration,
        wait_replicas: u32,
    ) -> Self {
        let senders = (0..count.max(1))
            .map(|index| {
                let (sender, requests) = mpsc::unbounded_channel();
                let lane = Lane {
                    index,
                    commands: commands.clone(),
                    disconnects: disconnects.clone(),
                    timeout,
                    wait_replicas,
                    held: None,
                };
                tokio::spawn(lane.run(requests));
                sender
            })
            .collect();
        Lanes { senders, timeout }
    }

    fn lane(&self, lane: u64) -> &mpsc::UnboundedSender<Request> {
        &self.senders[(lane % self.senders.len() as u64) as usize]
    }

    /// Queues a publish of `frame` to `room` on lane `lane` at once: `PUBLISH`, the once
    /// script for a publish with an idempotency key, or the publish script in a room with
    /// `history`. The returned [`Publish`] resolves when Redis answered.
    pub(crate) fn publish(
        &self,
        lane: u64,
        keys: &Keys,
        room: &str,
        mut frame: String,
        history: Option<History>,
        once: Option<Once<'_>>,
    ) -> Publish {
        // The publish script writes a history frame's closing brace itself, after the
        // offset and epoch it adds.
        if history.is_some() && frame.pop() != Some('}') {
            let e = BrokerError::Protocol("a history frame that is not a JSON object".into());
            return Publish::Done(Err(e));
        }
        let once = once.map(|once| {
            let record = keys.published_key(room, once.identity, once.server, once.key);
            (record, millis(once.window))
        });
        let kind = match (history, once) {
            (None, None) => Kind::Publish {
                channel: keys.room_channel(room),
                frame: Utf8Bytes::from(frame),
            },
            (None, Some((record, window_ms))) => Kind::Once(Box::new(OncePublish {
                record,
                channel: keys.room_channel(room),
                frame: Utf8Bytes::from(frame),
                window_ms,
            })),
            (Some(history), once) => Kind::History(Box::new(HistoryPublish {
                meta: keys.history_meta(room),
                list: keys.history_frames(room),
                channel: keys.room_channel(room),
                frame,
                size: history.size,
                ttl_ms: millis(history.ttl),
                once,
            })),
        };
        self.queue(lane, kind)
    }

    fn queue(&self, lane: u64, kind: Kind) -> Publish {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            kind,
            reply,
            deadline: Instant::now() + self.timeout,
        };
        match self.lane(lane).send(request) {
            Ok(()) => Publish::Pending(answer),
            Err(_) => Publish::Done(Err(BrokerError::Stopped("publishing lane"))),
        }
    }

    /// Pings Redis through every lane's connection.
    pub(crate) async fn ping(&self) -> Result<(), BrokerError> {
        let lanes = 0..self.senders.len() as u64;
        let pings: Vec<Publish> = lanes.map(|lane| self.queue(lane, Kind::Ping)).collect();
        for mut ping in pings {
            ping.result().await?;
        }
        Ok(())
    }
}

/// One lane's task state.
struct Lane {
    commands: Commands,
    disconnects: Disconnects,
    timeout: Duration,
    /// Replicas that must confirm a history or keyed publish (0: none).
    wait_replicas: u32,
    /// Which lane it is (with `wait_replicas`, its connections to a cluster's masters are
    /// its own).
    index: usize,
    /// The connection this lane holds, and the disconnect count when it was checked out.
    held: Option<(Connection, u64)>,
}

impl Lane {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut batch = Vec::with_capacity(64);
        // Error replies come back as values, so that each request gets its own answer.
        let mut pipeline = Pipelines::default();
        while let Some(first) = requests.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            // What waited past its deadline (behind a slow pipeline) is not sent at all.
            let now = Instant::now();
            let mut i = 0;
            while i < batch.len() {
                if batch[i].deadline <= now {
                    batch
                        .remove(i)
                        .reply(Err(BrokerError::NotSent(self.timeout)));
                } else {
                    i += 1;
                }
            }
            let Some(deadline) = batch.iter().map(|request| request.deadline).min() else {
                continue;
            };
            // A script missing from Redis's cache (`SCRIPT FLUSH`, a failover) ran nothing:
            // its requests go once more after the script is loaded again.
            let retry = self.round(&mut pipeline, &mut batch, deadline).await;
            if !retry.is_empty() {
                batch = retry;
                let cluster = self.commands.is_cluster();
                let loaded = match &mut self.held {
                    Some((connection, _)) => {
                        let history = history::publish_script(cluster).load_async(connection);
                        match history.await {
                            Ok(_) => once::script(cluster).load_async(connection).await,
                            Err(e) => Err(e),
                        }
                        .map_err(redis_error)
                    }
                    None => Err(BrokerError::Protocol(
                        "no connection to load a script on".into(),
                    )),
                };
                match loaded {
                    Ok(_) => {
                        let again = self.round(&mut pipeline, &mut batch, deadline).await;
                        let e = BrokerError::Protocol("NOSCRIPT after SCRIPT LOAD".into());
                        again
                            .into_iter()
                            .for_each(|request| request.reply(Err(e.clone())));
                    }
                    Err(e) => batch
                        .drain(..)
                        .for_each(|request| request.reply(Err(e.clone()))),
                }
            }
        }
    }

    /// Sends `batch` as one pipeline and answers each request, emptying `batch`; gives back
    /// the requests that Redis refused with `NOSCRIPT` (they did nothing).
    async fn round(
        &mut self,
        pipeline: &mut Pipelines,
        batch: &mut Vec<Request>,
        deadline: Instant,
    ) -> Vec<Request> {
        // The requests each pipelined command answers: consecutive history publishes go as
        // one script call.
        let cluster = self.commands.is_cluster();
        let mut commands: Vec<Range<usize>> = Vec::with_capacity(batch.len());
        let mut i = 0;
        while i < batch.len() {
            let mut end = i + 1;
            // A script call's keys must share a slot on a cluster: one room there.
            let joins = |next: &Request| {
                let (first, next) = (&batch[i].kind, &next.kind);
                let scripted = matches!(
                    (first, next),
                    (Kind::History(_), Kind::History(_)) | (Kind::Once(_), Kind::Once(_))
                );
                scripted && (!cluster || first.key() == next.key())
            };
            while batch.get(end).is_some_and(joins) {
                end += 1;
            }
            commands.push(i..end);
            i = end;
        }
        let requests = &batch[..];
        // History and keyed publishes are what a failover must not lose once acked.
        let durable = |n: usize| {
            matches!(
                requests[commands[n].start].kind,
                Kind::History(_) | Kind::Once(_)
            )
        };
        let sent = self
            .send(
                pipeline,
                commands.len(),
                |n| requests[commands[n].start].kind.key(),
                |n, into| command(&requests[commands[n].clone()], cluster, into),
                &durable,
                deadline,
            )
            .await;
        let mut retry = Vec::new();
        match sent {
            Ok(replies) => {
                // Each command's outcome first (reading its requests), then the answers.
                let outcomes: Vec<Outcome> = replies
                    .into_iter()
                    .zip(&commands)
                    .map(|(reply, range)| self.outcome(&batch[range.clone()], reply))
                    .collect();
                let mut requests = batch.drain(..);
                for (outcome, range) in outcomes.into_iter().zip(&commands) {
                    let group = requests.by_ref().take(range.len());
                    match outcome {
                        Outcome::Retry => retry.extend(group),
                        Outcome::Same(result) => {
                            group.for_each(|request| request.reply(result.clone()))
                        }
                        Outcome::Each(results) => {
                            let mut results = results.into_iter();
                            for request in group {
                                let missing = || Err(unknown("no result for a request".into()));
                                request.reply(results.next().unwrap_or_else(missing));
                            }
                        }
                    }
                }
            }
            Err(e) => {
                // Handed back: the pool's recycle check keeps it or replaces it.
                self.held = None;
                batch
                    .drain(..)
                    .for_each(|request| request.reply(Err(e.clone())));
            }
        }
        retry
    }

    /// What one pipelined command's `reply` means for its requests, `group`.
    fn outcome(&mut self, group: &[Request], reply: super::commands::Reply) -> Outcome {
        let n = group.len();
        let reply = match reply {
            Ok(reply) => reply,
            Err(failure) => {
                // Handed back: the pool's recycle check keeps it or replaces it. (Not for a
                // command that ran but that too few replicas confirmed: the connection is
                // fine.)
                if failure.replicated.is_none() {
                    self.held = None;
                }
                return Outcome::Same(Err(BrokerError::from(failure)));
            }
        };
        match (&group[0].kind, reply) {
            (_, reply) if no_script(&reply) => Outcome::Retry,
            // Refused as a whole: it did nothing. (The script answers its rooms' own errors
            // one by one.)
            (_, Value::ServerError(e)) => Outcome::Same(Err(refused(e))),
            (Kind::Publish { .. }, Value::Int(_)) => Outcome::Same(Ok(Accepted::default())),
            (Kind::Once(_), answer) => Outcome::Each(once::results(answer, n)),
            (Kind::History(_), Value::Array(answers)) => {
                Outcome::Each(history_results(group, answers))
            }
            (Kind::Ping, Value::SimpleString(_) | Value::Okay) => {
                Outcome::Same(Ok(Accepted::default()))
            }
            (Kind::History(_), other) => {
                Outcome::Same(Err(unknown(format!("{other:?} from the publish script"))))
            }
            (_, other) => Outcome::Same(Err(BrokerError::Protocol(format!("{other:?}")))),
        }
    }

    /// Sends `count` commands (see [`query_commands`]) on the held connection (checking one
    /// out first if needed), and waits for their replies until `deadline`: each command's
    /// reply or error, or one error for all.
    async fn send<'k>(
        &mut self,
        scratch: &mut Pipelines,
        count: usize,
        key: impl Fn(usize) -> Option<&'k [u8]>,
        build: impl FnMut(usize, &mut redis::Pipeline),
        durable: &(dyn Fn(usize) -> bool + Sync),
        deadline: Instant,
    ) -> Result<Vec<super::commands::Reply>, BrokerError> {
        let lost = self.disconnects.current();
        if self.held.as_ref().is_some_and(|(_, seen)| *seen != lost) {
            // Some pooled connection was lost since this one was checked out: it may be
            // this one, so don't send on it.
            self.held = None;
        }
        let connection = match &mut self.held {
            Some((connection, _)) => connection,
            None => {
                let connection = tokio::time::timeout_at(deadline, self.commands.get())
                    .await
                    .map_err(|_| BrokerError::NotSent(self.timeout))??;
                &mut self.held.insert((connection, lost)).0
            }
        };
        // From here on the pipeline may have reached Redis.
        // `WAIT` ends within the round's time, and within the response timeout of a
        // cluster's master connections (half the Redis timeout), less a margin for its
        // reply: past that the connection itself would be taken as failed.
        let wait = (self.wait_replicas > 0).then(|| {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = Wait {
                replicas: self.wait_replicas,
                owner: self.index,
                timeout: left.min(self.timeout / 2).mul_f64(0.8),
            };
            (wait, durable)
        });
        let query = query_commands(connection, scratch, count, key, build, wait);
        match tokio::time::timeout_at(deadline, query).await {
            Err(_) => Err(BrokerError::Timeout(self.timeout)),
            Ok(replies) => Ok(replies),
        }
    }
}
