//! The publish script call that carries a round's history publishes (see
//! `history::PUBLISH_TEXT`), and each request's result from its answer.

use redis::Value;

use super::{Kind, Request};
use crate::broker::redis::connect::refused;
use crate::broker::redis::history;
use crate::broker::{new_epoch, Accepted, Position, Published};
use crate::error::BrokerError;

/// Whether `a` and `b` are publishes to the same history room (one run of a script call).
pub(super) fn same_room(a: &Request, b: &Request) -> bool {
    matches!((&a.kind, &b.kind),
        (Kind::History(a), Kind::History(b)) if a.meta == b.meta)
}

/// Appends to `pipeline` one publish script call for `requests` (history publishes, of one
/// room on a cluster, of any rooms on one Redis), in runs of one room each.
pub(super) fn append(requests: &[Request], cluster: bool, pipeline: &mut redis::Pipeline) {
    let runs = || requests.chunk_by(same_room);
    let keys: usize = runs().map(|run| 2 + records(run).count()).sum();
    let command = pipeline
        .cmd("EVALSHA")
        .arg(history::publish_script(cluster).get_hash())
        .arg(keys);
    for run in runs() {
        if let Kind::History(history) = &run[0].kind {
            command.arg(&history.meta).arg(&history.list);
        }
        for record in records(run) {
            command.arg(record);
        }
    }
    // Used only for rooms that have no history yet (or lost it).
    command.arg(&*new_epoch());
    for run in runs() {
        // Which frames have a key (none: empty), and the room's window.
        let mut mask = String::new();
        let mut window_ms = 0;
        for request in run {
            if let Kind::History(history) = &request.kind {
                let once = &history.once;
                mask.push(if once.is_some() { '1' } else { '0' });
                if let Some((_, window)) = once {
                    window_ms = *window;
                }
            }
        }
        if window_ms == 0 {
            mask.clear();
        }
        if let Kind::History(history) = &run[0].kind {
            command
                .arg(&history.channel)
                .arg(history.size)
                .arg(history.ttl_ms)
                .arg(run.len())
                .arg(mask)
                .arg(window_ms);
        }
        for request in run {
            if let Kind::History(history) = &request.kind {
                command.arg(&history.frame);
            }
        }
    }
}

/// The record keys of the keyed publishes of `run`, in order.
fn records(run: &[Request]) -> impl Iterator<Item = &String> {
    run.iter().filter_map(|request| match &request.kind {
        Kind::History(history) => history.once.as_ref().map(|(record, _)| record),
        _ => None,
    })
}

/// Each request's result from the publish script's `answers`, one per run of `group` in
/// one room: consecutive offsets from the run's first for the frames published, where the
/// first publish went for those whose key was recorded, or the error that stopped the room.
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
        let run = match answer {
            // The room's frames went out in part, or it could not be put back as it was.
            Value::ServerError(e) if e.code() == "UNKNOWN" => Err(BrokerError::Lost(
                std::sync::Arc::new(redis::RedisError::from(e)),
            )),
            // The room was put back as it was: nothing happened.
            Value::ServerError(e) => Err(refused(e)),
            answer => run_answer(answer, n).map_err(|e| unknown(e.to_string())),
        };
        match run {
            Ok(run) => results.extend(run.into_iter().map(Ok)),
            Err(e) => results.extend((0..n).map(|_| Err(e.clone()))),
        }
    }
    results
}

/// A command that ran but whose answer does not say what it did: the outcome is unknown.
pub(super) fn unknown(what: String) -> BrokerError {
    BrokerError::Lost(std::sync::Arc::new(std::io::Error::other(what)))
}

/// Each of a run's `n` publishes from its answer: `{first, epoch}`, or `{first, epoch,
/// {i, offset, epoch, …}}` when the frames at indexes `i` had their keys recorded (they
/// went out before, at `offset`; -1 when the record names no position).
fn run_answer(reply: Value, n: usize) -> Result<Vec<Accepted>, BrokerError> {
    let unexpected =
        |reply: &Value| BrokerError::Protocol(format!("{reply:?} from the publish script"));
    let Value::Array(items) = &reply else {
        return Err(unexpected(&reply));
    };
    let (first, epoch, seen) = match items.as_slice() {
        [Value::Int(first), epoch] => (first, epoch, &[][..]),
        [Value::Int(first), epoch, Value::Array(seen)] if seen.len() % 3 == 0 => {
            (first, epoch, &seen[..])
        }
        _ => return Err(unexpected(&reply)),
    };
    let text = |value: &Value| {
        <String as redis::FromRedisValue>::from_redis_value_ref(value)
            .map_err(|_| unexpected(&reply))
    };
    let epoch: std::sync::Arc<str> = text(epoch)?.into();
    let mut offset = u64::try_from(*first).map_err(|_| unexpected(&reply))?;
    let mut recorded = seen.chunks(3).peekable();
    let mut accepted = Vec::with_capacity(n);
    for i in 0..n {
        match recorded.peek() {
            Some([Value::Int(at), Value::Int(was), was_epoch]) if *at == i as i64 => {
                let position = match *was {
                    -1 => None,
                    was => Some(Position {
                        offset: u64::try_from(was).map_err(|_| unexpected(&reply))?,
                        epoch: text(was_epoch)?.into(),
                    }),
                };
                accepted.push(Accepted {
                    position,
                    duplicate: true,
                });
                recorded.next();
            }
            Some([Value::Int(_), Value::Int(_), _]) | None => {
                accepted.push(Accepted {
                    position: Some(Position {
                        offset,
                        epoch: epoch.clone(),
                    }),
                    duplicate: false,
                });
                offset += 1;
            }
            Some(_) => return Err(unexpected(&reply)),
        }
    }
    if recorded.next().is_some() {
        return Err(unexpected(&reply));
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::run_answer;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn at(accepted: &crate::broker::Accepted) -> (Option<u64>, bool) {
        (
            accepted.position.as_ref().map(|p| p.offset),
            accepted.duplicate,
        )
    }

    #[test]
    fn a_run_answer_places_recorded_keys_among_the_frames_published() {
        // Four frames: the second's key was recorded at offset 3, the fourth's by a room
        // without history (no position); the others went out at 10 and 11.
        let seen = vec![
            Value::Int(1),
            Value::Int(3),
            bulk("old"),
            Value::Int(3),
            Value::Int(-1),
            bulk(""),
        ];
        let answer = Value::Array(vec![Value::Int(10), bulk("e"), Value::Array(seen)]);
        let accepted = run_answer(answer, 4).unwrap();
        let got: Vec<_> = accepted.iter().map(at).collect();
        assert_eq!(
            got,
            [
                (Some(10), false),
                (Some(3), true),
                (Some(11), false),
                (None, true)
            ]
        );
        assert_eq!(&*accepted[1].position.as_ref().unwrap().epoch, "old");
        assert_eq!(&*accepted[2].position.as_ref().unwrap().epoch, "e");
    }

    #[test]
    fn an_answer_that_does_not_fit_its_run_is_refused() {
        let plain = || Value::Array(vec![Value::Int(1), bulk("e")]);
        assert_eq!(run_answer(plain(), 2).unwrap().len(), 2);
        // A recorded index beyond the run, out of order, or a malformed triple.
        for seen in [
            vec![Value::Int(5), Value::Int(1), bulk("e")],
            vec![
                Value::Int(1),
                Value::Int(1),
                bulk("e"),
                Value::Int(0),
                Value::Int(1),
                bulk("e"),
            ],
            vec![Value::Int(0), bulk("x"), bulk("e")],
            vec![Value::Int(0), Value::Int(1)],
        ] {
            let answer = Value::Array(vec![Value::Int(1), bulk("e"), Value::Array(seen)]);
            assert!(run_answer(answer, 2).is_err());
        }
        assert!(run_answer(Value::Int(1), 1).is_err());
    }
}
