//! Pipelines on a Redis Cluster, one per master: each goes as it is on a connection of its
//! own to that master, so that Redis's answer to each command comes back in its place, and
//! thinws follows `MOVED`, `ASK` and `TRYAGAIN` itself, for the commands that got them
//! only. (redis-rs's cluster routing sends a whole pipeline again when one of its commands
//! is redirected, or when its connection fails: the commands that had run would run twice.)

use std::time::Duration;

use redis::{Cmd, Pipeline, Value};

use super::slots::{key_of, key_slot};
use super::Connection;
use crate::error::BrokerError;

/// How many times a command redirected (`MOVED`, `ASK`, `TRYAGAIN`) is sent again.
const REDIRECTS: usize = 3;

/// How long to wait before sending again commands answered `TRYAGAIN` (their keys are
/// being migrated).
const TRY_AGAIN_AFTER: Duration = Duration::from_millis(20);

/// One command's reply from [`query_commands`]: what Redis answered (an error reply
/// included), or why no reply came.
pub(crate) type Reply = Result<Value, Failure>;

/// Why a command got no reply, and whether it may have reached Redis.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) error: redis::RedisError,
    /// `false` when the command was never sent (no connection to its master could be had).
    pub(crate) sent: bool,
    /// The command ran, but `WAIT` counted fewer replicas than asked (see [`Wait`]): how
    /// many it counted.
    pub(crate) replicated: Option<i64>,
}

impl Failure {
    pub(crate) fn new(error: redis::RedisError, sent: bool) -> Self {
        Failure {
            error,
            sent,
            replicated: None,
        }
    }
}

impl From<Failure> for BrokerError {
    /// Nothing was done if the command was never sent; otherwise its outcome is unknown.
    fn from(failure: Failure) -> Self {
        match (failure.sent, failure.replicated) {
            (_, Some(replicas)) => BrokerError::NotReplicated(replicas),
            (false, None) => BrokerError::connection(failure.error),
            (true, None) => BrokerError::Lost(std::sync::Arc::new(failure.error)),
        }
    }
}

/// Commands that must reach replicas before they are answered: after a pipeline that
/// carries any, `WAIT replicas timeout` on the same connection; a command it carried is
/// answered with a [`Failure`] (`replicated`) when fewer replicas confirmed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wait {
    pub(crate) replicas: u32,
    /// Whose connections to a cluster's masters the pipelines go on (a publishing lane's:
    /// not shared with other lanes, presence or identity commands).
    pub(crate) owner: usize,
    /// `WAIT`'s own timeout (at least 1 ms: 0 would wait for ever).
    pub(crate) timeout: Duration,
}

impl Wait {
    fn append(&self, pipeline: &mut Pipeline) {
        let millis = self.timeout.as_millis().clamp(1, u64::MAX as u128) as u64;
        pipeline.cmd("WAIT").arg(self.replicas).arg(millis);
    }

    /// `None` if `reply` (to `WAIT`) counts enough replicas; otherwise what it counted.
    fn short(&self, reply: Option<Value>) -> Option<i64> {
        match reply {
            Some(Value::Int(n)) if n >= i64::from(self.replicas) => None,
            Some(Value::Int(n)) => Some(n),
            // Refused (an ACL without `WAIT`, a proxy that lacks it): nothing confirms, and
            // every such publish is answered `timeout` until it is allowed.
            other => {
                tracing::warn!(reply = ?other, "WAIT did not answer with a count of replicas");
                Some(0)
            }
        }
    }
}

/// Sends `pipeline` (which answers each command's error in its place, `ignore_errors`) and
/// returns the replies in order, or the first command's failure (see [`query_commands`]).
pub(crate) async fn query_pipeline(
    connection: &mut Connection,
    pipeline: &Pipeline,
) -> Result<Vec<Value>, Failure> {
    if let Connection::Pooled(c) = connection {
        let answer = pipeline.query_async(c).await;
        return answer.map_err(|error| Failure::new(error, true));
    }
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    query_commands(
        connection,
        &mut Pipelines::default(),
        commands.len(),
        |n| key_of(commands[n]),
        |n, into| {
            into.add_command(commands[n].clone());
        },
        None,
    )
    .await
    .into_iter()
    .collect()
}

/// Sends `count` commands and returns their replies in order: each command's reply (an
/// error reply in its place), or why none came. Command `n` is what `build(n, pipeline)`
/// appends to a pipeline, and names the key `key(n)` (`None` for a command without one).
///
/// On one Redis, the commands go as one pipeline. On a cluster: one pipeline per master,
/// by the slot map the cluster last reported, built directly (no command is copied) and
/// sent concurrently; a master takes commands of many slots in one pipeline. The pipelines
/// are built in `pipelines`, whose buffers the next call reuses. A command answered
/// `MOVED` (its slot moved) or `TRYAGAIN` (its keys are moving) did not run: it is built
/// again and sent by the map read again; one answered `ASK` goes to the node named, after
/// `ASKING`. Each is sent again at
/// most [`REDIRECTS`] times, then answered with its last redirection. The commands naming
/// one key (a room's) keep their order: a re-send carries them in one pipeline, and a
/// command redirected after which one naming the same key ran is not sent again (its
/// redirection answers it: it did not run).
///
/// A pipeline that fails answers its own commands with its error, and no other: the
/// pipelines to the other masters may have been carried out.
///
/// With `wait`, each pipeline that carries a command `wait`'s second part says must be
/// replicated ends with `WAIT` (see [`Wait`]).
pub(crate) async fn query_commands<'k>(
    connection: &mut Connection,
    pipelines: &mut Pipelines,
    count: usize,
    key: impl Fn(usize) -> Option<&'k [u8]>,
    mut build: impl FnMut(usize, &mut Pipeline),
    wait: Option<(Wait, &(dyn Fn(usize) -> bool + Sync))>,
) -> Vec<Reply> {
    // `WAIT` holds the connection it runs on: a pipeline that may end with it goes on
    // connections of its own owner (see `Wait::owner`).
    let owner = wait.as_ref().map(|(wait, _)| wait.owner);
    let (cluster, shared) = match connection {
        Connection::Pooled(c) => {
            let pipeline = &mut pipelines.single;
            pipeline.clear();
            (0..count).for_each(|n| build(n, pipeline));
            let wait = wait.filter(|(_, durable)| (0..count).any(durable));
            if let Some((wait, _)) = &wait {
                wait.append(pipeline);
            }
            let sent = count + usize::from(wait.is_some());
            let answer = pipeline.query_async::<Vec<Value>>(c).await;
            return match answer.and_then(|answer| whole(answer, sent)) {
                Ok(mut replies) => {
                    let short = wait
                        .and_then(|(wait, durable)| Some((wait.short(replies.pop())?, durable)));
                    replies
                        .into_iter()
                        .enumerate()
                        .map(|(n, reply)| confirmed(short, n, reply))
                        .collect()
                }
                Err(error) => vec![Err(Failure::new(error, true)); count],
            };
        }
        Connection::Cluster(c, shared) => (c.clone(), shared.clone()),
    };
    let mut replies: Vec<Option<Reply>> = vec![None; count];
    // The commands to send in this attempt, each to its slot's master or to the node that
    // answered `ASK`.
    let pending = &mut pipelines.pending;
    pending.clear();
    pending.extend((0..count).map(|n| (n, None)));
    for attempt in 0..=REDIRECTS {
        let Some(map) = shared.slot_map(&cluster).await else {
            let error =
                redis::RedisError::from(std::io::Error::other("no slot map from the cluster"));
            for (n, _) in pending.drain(..) {
                replies[n] = Some(Err(Failure::new(error.clone(), false)));
            }
            break;
        };
        let groups = &mut pipelines.nodes;
        if groups.len() > KEPT_PIPELINES {
            groups.clear();
        }
        groups.iter_mut().for_each(Group::clear);
        // In a re-send, where the first command naming each key goes (see below).
        let mut first_of_key: Vec<(&[u8], Destination<'static>)> = Vec::new();
        for (n, asked) in pending.drain(..) {
            let to = match &asked {
                Some(Asked(host, port)) => Some((host.as_str(), *port, true)),
                None => match key(n) {
                    Some(key) => map.owner_of(key_slot(key)),
                    None => map
                        .0
                        .first()
                        .map(|(_, _, host, port)| (host.as_str(), *port)),
                }
                .map(|(host, port)| (host, port, false)),
            };
            let Some((host, port, asking)) = to else {
                let error = redis::RedisError::from(std::io::Error::other(format!(
                    "no master serves slot {}",
                    key(n).map(key_slot).unwrap_or_default()
                )));
                replies[n] = Some(Err(Failure::new(error, false)));
                continue;
            };
            let mut to: Destination = (std::borrow::Cow::Borrowed(host), port, asking);
            // Commands naming one key (one room) keep their order: in a re-send, each goes
            // in one pipeline with the first of them, wherever that one goes (where Redis
            // sends the others elsewhere, they come back redirected, and are answered by
            // the rule below).
            if let (true, Some(key)) = (attempt > 0, key(n)) {
                match first_of_key.iter().find(|(k, _)| *k == key) {
                    Some((_, first)) => to = first.clone(),
                    None => {
                        let owned = std::borrow::Cow::Owned(host.to_owned());
                        first_of_key.push((key, (owned, port, asking)));
                    }
                }
            }
            let at = groups
                .iter()
                .position(|g| g.to.0 == *to.0 && g.to.1 == to.1 && g.to.2 == to.2);
            let group = match at {
                Some(at) => &mut groups[at],
                None => {
                    groups.push(Group::new((to.0.into_owned(), to.1, to.2)));
                    groups.last_mut().expect("just pushed")
                }
            };
            if group.to.2 {
                group.pipeline.cmd("ASKING");
            }
            build(n, &mut group.pipeline);
            group.indices.push(n);
            if wait.as_ref().is_some_and(|(_, durable)| durable(n)) {
                group.waits = true;
            }
        }
        if let Some((wait, _)) = &wait {
            for group in groups.iter_mut().filter(|g| g.waits) {
                wait.append(&mut group.pipeline);
            }
        }
        let sends = groups.iter().filter(|g| g.used()).map(|group| {
            let shared = &shared;
            async move {
                let (host, port, _) = &group.to;
                let mut master = match shared.master(host, *port, owner).await {
                    Ok(master) => master,
                    Err(error) => {
                        shared.failed(&error);
                        return Err(Failure::new(error, false));
                    }
                };
                let answer = group
                    .pipeline
                    .query_async::<Vec<Value>>(&mut master.connection);
                let answer = answer.await;
                let sent = group.pipeline.cmd_iter().count();
                match answer.and_then(|answer| whole(answer, sent)) {
                    Ok(answer) => Ok(answer),
                    Err(error) => {
                        master.failed();
                        shared.master_failed(host, *port, &error);
                        Err(Failure::new(error, true))
                    }
                }
            }
        });
        let answers = futures_util::future::join_all(sends).await;
        let mut try_again = false;
        for (group, answer) in groups.iter().filter(|g| g.used()).zip(answers) {
            let mut answer = match answer {
                Ok(answer) => answer,
                Err(failure) => {
                    for &n in &group.indices {
                        replies[n] = Some(Err(failure.clone()));
                    }
                    continue;
                }
            };
            // `WAIT`'s reply comes last: what it says applies to the commands answered.
            let short = match (&wait, group.waits) {
                (Some((wait, durable)), true) => wait
                    .short(answer.pop())
                    .map(|replicated| (replicated, *durable)),
                _ => None,
            };
            // After `ASKING`, every other reply is its `OK`.
            let step = if group.to.2 { 2 } else { 1 };
            let redirected = |reply: &Value| match reply {
                Value::ServerError(e) if attempt < REDIRECTS => redirection(e),
                _ => None,
            };
            // Only a pipeline with a redirection needs the keys looked at.
            let mut replies_to_commands = answer.iter().skip(step - 1).step_by(step);
            let any = replies_to_commands.any(|reply| redirected(reply).is_some());
            // From the last command back: the keys of the commands that got an answer (not a
            // redirection) so far, that is, later in the caller's order.
            let mut answered_later: Vec<&[u8]> = Vec::new();
            let answer = answer.into_iter().skip(step - 1).step_by(step);
            for (n, reply) in group.indices.iter().copied().zip(answer).rev() {
                let mut again = redirected(&reply);
                let key = key(n).filter(|_| any);
                match (&again, key) {
                    // A command redirected after which one naming the same key ran is not
                    // sent again: it would run after it. Its redirection answers it (it did
                    // not run).
                    (Some(_), Some(key)) if answered_later.contains(&key) => again = None,
                    (None, Some(key)) if !answered_later.contains(&key) => answered_later.push(key),
                    _ => {}
                }
                match again {
                    None => replies[n] = Some(confirmed(short, n, reply)),
                    Some(Redirect::Moved) => {
                        shared.forget_slot_map();
                        pending.push((n, None));
                    }
                    Some(Redirect::TryAgain) => {
                        try_again = true;
                        pending.push((n, None));
                    }
                    Some(Redirect::Ask(asked)) => pending.push((n, Some(asked))),
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        // In the caller's order, so that the commands naming one key keep theirs.
        pending.sort_unstable_by_key(|(n, _)| *n);
        if try_again {
            tokio::time::sleep(TRY_AGAIN_AFTER).await;
        }
    }
    replies
        .into_iter()
        .map(|reply| reply.expect("every command is answered or failed"))
        .collect()
}

/// Where a pipeline goes: a node's host and port, and whether each command is preceded by
/// `ASKING`.
type Destination<'a> = (std::borrow::Cow<'a, str>, u16, bool);

/// The pipelines [`query_commands`] builds, kept from one call to the next so that their
/// buffers are reused: the one to a single Redis, and those to a cluster's nodes.
pub(crate) struct Pipelines {
    single: Pipeline,
    nodes: Vec<Group>,
    /// The commands to send in an attempt, each with the node that answered `ASK`.
    pending: Vec<(usize, Option<Asked>)>,
}

impl Default for Pipelines {
    fn default() -> Self {
        Pipelines {
            single: super::pipeline(),
            nodes: Vec::new(),
            pending: Vec::new(),
        }
    }
}

/// How many nodes' pipelines are kept between calls (the masters, and nodes an `ASK`
/// named); past it, all are made again.
const KEPT_PIPELINES: usize = 16;

/// Commands that go together: one pipeline to one node (`to`: its host, its port, and
/// whether each command is preceded by `ASKING`), and each command's index in the caller's
/// order (none: not used in this attempt).
struct Group {
    to: (String, u16, bool),
    pipeline: Pipeline,
    indices: Vec<usize>,
    /// It carries a command that must be replicated: it ends with `WAIT`.
    waits: bool,
}

impl Group {
    fn new(to: (String, u16, bool)) -> Self {
        Group {
            to,
            pipeline: super::pipeline(),
            indices: Vec::new(),
            waits: false,
        }
    }

    /// Empties it for the next attempt, keeping its buffers.
    fn clear(&mut self) {
        self.pipeline.clear();
        self.indices.clear();
        self.waits = false;
    }

    /// Whether this attempt sends commands to its node.
    fn used(&self) -> bool {
        !self.indices.is_empty()
    }
}

/// The node an `ASK` named.
#[derive(Debug, Clone)]
struct Asked(String, u16);

/// What a redirection asks for.
enum Redirect {
    /// The slot moved: send it by the slot map, read again.
    Moved,
    /// The keys are being migrated: send it again, a little later.
    TryAgain,
    /// Send it once to this node, after `ASKING`.
    Ask(Asked),
}

/// Whether an error reply says that its command did not run and where it goes instead.
fn redirection(e: &redis::ServerError) -> Option<Redirect> {
    use redis::ServerErrorKind;
    match e.kind()? {
        ServerErrorKind::Moved => Some(Redirect::Moved),
        ServerErrorKind::TryAgain => Some(Redirect::TryAgain),
        ServerErrorKind::Ask => {
            // `ASK <slot> <host>:<port>`
            let (host, port) = e.details()?.split_whitespace().nth(1)?.rsplit_once(':')?;
            Some(Redirect::Ask(Asked(host.to_owned(), port.parse().ok()?)))
        }
        _ => None,
    }
}

/// `answer`, if it holds a reply for each of the `sent` commands; otherwise an error that
/// leaves their outcome unknown.
/// Whether a command answered `reply` may have written anything: an error reply (`NOSCRIPT`,
/// a refusal) means it did not run, and is answered as it is, whatever `WAIT` says.
fn ran(reply: &Value) -> bool {
    !matches!(reply, Value::ServerError(_))
}

/// Command `n`'s answer, `reply`, as a pipeline whose `WAIT` was `short` (how many replicas
/// confirmed, and which commands had to be) leaves it: a command that had to be confirmed
/// and ran fails with [`not_replicated`]; any other keeps its reply.
fn confirmed(
    short: Option<(i64, &(dyn Fn(usize) -> bool + Sync))>,
    n: usize,
    reply: Value,
) -> Reply {
    match short {
        Some((replicated, durable)) if ran(&reply) && durable(n) => Err(not_replicated(replicated)),
        _ => Ok(reply),
    }
}

/// The failure of a command that ran but that fewer replicas than asked confirmed.
fn not_replicated(replicated: i64) -> Failure {
    let error = redis::RedisError::from(std::io::Error::other(format!(
        "WAIT: {replicated} replicas confirmed the write in time"
    )));
    Failure {
        error,
        sent: true,
        replicated: Some(replicated),
    }
}

fn whole(answer: Vec<Value>, sent: usize) -> Result<Vec<Value>, redis::RedisError> {
    if answer.len() == sent {
        return Ok(answer);
    }
    Err(redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("{} replies to a pipeline of {sent} commands", answer.len()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_reply(resp: &[u8]) -> redis::ServerError {
        match redis::parse_redis_value(resp).unwrap() {
            Value::ServerError(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redirections_say_where_a_command_goes() {
        let ask = error_reply(b"-ASK 3999 127.0.0.1:6381\r\n");
        assert!(matches!(
            redirection(&ask),
            Some(Redirect::Ask(Asked(host, 6381))) if host == "127.0.0.1"
        ));
        let moved = error_reply(b"-MOVED 3999 127.0.0.1:6381\r\n");
        assert!(matches!(redirection(&moved), Some(Redirect::Moved)));
        let again = error_reply(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n");
        assert!(matches!(redirection(&again), Some(Redirect::TryAgain)));
        // Not redirections: the command did not run, and is answered so.
        for reply in [
            &b"-CLUSTERDOWN The cluster is down\r\n"[..],
            b"-ERR unknown\r\n",
        ] {
            assert!(redirection(&error_reply(reply)).is_none());
        }
    }

    #[test]
    fn a_failure_is_unknown_only_if_the_command_may_have_been_sent() {
        let error = || redis::RedisError::from(std::io::Error::other("gone"));
        let sent = BrokerError::from(Failure::new(error(), true));
        assert!(sent.outcome_unknown(), "{sent}");
        let unsent = BrokerError::from(Failure::new(error(), false));
        assert!(!unsent.outcome_unknown(), "{unsent}");
        let short = BrokerError::from(not_replicated(0));
        assert!(short.outcome_unknown(), "{short}");
        assert!(matches!(short, BrokerError::NotReplicated(0)));
    }

    #[test]
    fn a_short_answer_leaves_its_commands_unknown() {
        assert_eq!(whole(vec![Value::Nil; 2], 2).unwrap().len(), 2);
        let e = whole(vec![Value::Nil], 2).unwrap_err();
        assert!(e.is_io_error(), "{e}");
    }
}
