//! The publish script call that carries a round's history publishes (see
//! `history::PUBLISH_TEXT`), and each request's result from its answer.

use redis::Value;

use super::{Kind, Request};
use crate::broker::redis::connect::refused;
use crate::broker::redis::history;
use crate::broker::{new_epoch, Accepted, Position, Published};
use crate::error::BrokerError;

/// Whether `a` and `b` are publishes to the same history room that may share a run (a
/// publish with an idempotency key is a run of its own).
pub(super) fn same_room(a: &Request, b: &Request) -> bool {
    matches!((&a.kind, &b.kind),
        (Kind::History { meta: a, once: None, .. }, Kind::History { meta: b, once: None, .. })
            if a == b)
}

/// Appends to `pipeline` one publish script call for `requests` (history publishes, of one
/// room on a cluster, of any rooms on one Redis), in runs of one room each.
pub(super) fn append(requests: &[Request], cluster: bool, pipeline: &mut redis::Pipeline) {
    let runs = || requests.chunk_by(same_room);
    let keys: usize = runs()
        .map(|run| match &run[0].kind {
            Kind::History { once: Some(_), .. } => 3,
            _ => 2,
        })
        .sum();
    let command = pipeline
        .cmd("EVALSHA")
        .arg(history::publish_script(cluster).get_hash())
        .arg(keys);
    for run in runs() {
        if let Kind::History {
            meta, list, once, ..
        } = &run[0].kind
        {
            command.arg(meta).arg(list);
            if let Some((record, _)) = once {
                command.arg(record);
            }
        }
    }
    // Used only for rooms that have no history yet (or lost it).
    command.arg(&*new_epoch());
    for run in runs() {
        if let Kind::History {
            channel,
            size,
            ttl_ms,
            once,
            ..
        } = &run[0].kind
        {
            let window_ms = once.as_ref().map_or(0, |(_, window_ms)| *window_ms);
            command
                .arg(channel)
                .arg(*size)
                .arg(*ttl_ms)
                .arg(run.len())
                .arg(window_ms);
        }
        for request in run {
            if let Kind::History { frame, .. } = &request.kind {
                command.arg(frame);
            }
        }
    }
}

/// Each request's result from the publish script's `answers`, one per run of `group` in
/// one room: consecutive offsets from the run's first, or the error that stopped its room.
/// The script ran, so an answer it should not have given leaves the outcome unknown.
pub(super) fn history_results(group: &[Request], answers: Vec<Value>) -> Vec<Published> {
    let runs: Vec<usize> = group.chunk_by(same_room).map(<[Request]>::len).collect();
    if answers.len() != runs.len() {
        let e = unknown(format!(
            "{} answers from the publish script for {} rooms",
            answers.len(),
            runs.len()
        ));
        return vec![Err(e); group.len()];
    }
    let mut results = Vec::with_capacity(group.len());
    for (n, answer) in runs.into_iter().zip(answers) {
        let first = match answer {
            // The room's frames went out in part, or it could not be put back as it was.
            Value::ServerError(e) if e.code() == "UNKNOWN" => Err(BrokerError::Lost(
                std::sync::Arc::new(redis::RedisError::from(e)),
            )),
            // The room was put back as it was: nothing happened.
            Value::ServerError(e) => Err(refused(e)),
            answer => position(answer).map_err(|e| unknown(e.to_string())),
        };
        results.extend((0..n as u64).map(|k| match &first {
            Ok((first, duplicate)) => Ok(Accepted {
                position: first.as_ref().map(|first| Position {
                    offset: first.offset + k,
                    epoch: first.epoch.clone(),
                }),
                duplicate: *duplicate,
            }),
            Err(e) => Err(e.clone()),
        }));
    }
    results
}

/// A command that ran but whose answer does not say what it did: the outcome is unknown.
pub(super) fn unknown(what: String) -> BrokerError {
    BrokerError::Lost(std::sync::Arc::new(std::io::Error::other(what)))
}

/// The publish script's answer: `{offset, epoch}`, or `{offset, epoch, 1}` for a publish
/// whose idempotency key was recorded (it went out before, there; `{-1, '', 1}` when the
/// record names no position); with whether it was a duplicate.
fn position(reply: Value) -> Result<(Option<Position>, bool), BrokerError> {
    let unexpected =
        |reply: &Value| BrokerError::Protocol(format!("{reply:?} from the publish script"));
    let Value::Array(items) = &reply else {
        return Err(unexpected(&reply));
    };
    let (offset, epoch, duplicate) = match items.as_slice() {
        [Value::Int(offset), epoch] => (offset, epoch, false),
        [Value::Int(-1), _, Value::Int(1)] => return Ok((None, true)),
        [Value::Int(offset), epoch, Value::Int(1)] => (offset, epoch, true),
        _ => return Err(unexpected(&reply)),
    };
    let epoch = <String as redis::FromRedisValue>::from_redis_value_ref(epoch)
        .map_err(|_| unexpected(&reply))?;
    let position = Position {
        offset: u64::try_from(*offset).map_err(|_| unexpected(&reply))?,
        epoch: epoch.into(),
    };
    Ok((Some(position), duplicate))
}
