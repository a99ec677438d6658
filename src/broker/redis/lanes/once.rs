//! The once script: publishes with idempotency keys to rooms without history, each
//! published only if its key is not recorded, the check, the record and the publish in one
//! atomic step on the room's hash slot. (In a room with history, the publish script does the same;
//! see `history`.)

use std::sync::LazyLock;

use redis::Value;

use super::script_call::unknown;
use super::{Kind, Request};
use crate::broker::redis::commands::RoomScript;
use crate::broker::redis::connect::refused;
use crate::broker::{Accepted, Published};

/// KEYS: each publish's record (in its room's hash slot). ARGV: per publish, the room's
/// channel, the window (ms) and the frame. For each publish in order: records its key for
/// the window and publishes the frame, answering 1, or answers 0 and does nothing when the
/// key is recorded already. A refused publish takes its record back and answers its error:
/// nothing happened. The publish permission is checked first where Redis can (7.0 and
/// later: `redis.acl_check_cmd`); on Redis 6 the `PUBLISH` refuses, and the record is
/// taken back. A lane sends the consecutive keyed publishes of a round as one call
/// (of one room on a cluster), as it does history publishes.
const TEXT: &str = r#"
local answers = {}
for i = 1, #KEYS do
  local channel, window, frame = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if redis.acl_check_cmd and not redis.acl_check_cmd('PUBLISH', channel, '') then
    answers[i] = redis.error_reply("NOPERM this user may not publish to the room's channel")
  elseif not redis.call('SET', KEYS[i], '', 'NX', 'PX', window) then
    answers[i] = 0
  else
    local ok, e = pcall(redis.call, 'PUBLISH', channel, frame)
    if ok then
      answers[i] = 1
    else
      redis.call('DEL', KEYS[i])
      if type(e) == 'table' and e.err then e = e.err end
      answers[i] = redis.error_reply(tostring(e))
    end
  end
end
return answers
"#;

static SCRIPT: LazyLock<RoomScript> = LazyLock::new(|| RoomScript::new(TEXT));

/// The once script, for a cluster or not.
pub(crate) fn script(cluster: bool) -> &'static redis::Script {
    SCRIPT.get(cluster)
}

/// Appends to `pipeline` one once script call for `requests` (keyed publishes to rooms
/// without history: of one room on a cluster, of any rooms on one Redis).
pub(super) fn append(requests: &[Request], cluster: bool, pipeline: &mut redis::Pipeline) {
    let command = pipeline
        .cmd("EVALSHA")
        .arg(script(cluster).get_hash())
        .arg(requests.len());
    for request in requests {
        if let Kind::Once(once) = &request.kind {
            command.arg(&once.record);
        }
    }
    for request in requests {
        if let Kind::Once(once) = &request.kind {
            let frame = once.frame.as_bytes();
            command.arg(&once.channel).arg(once.window_ms).arg(frame);
        }
    }
}

/// Each of `n` publishes' result from the once script's answer. Any answer it should not
/// give leaves the outcome unknown: the script ran.
pub(super) fn results(answer: Value, n: usize) -> Vec<Published> {
    let answers = match answer {
        Value::Array(answers) if answers.len() == n => answers,
        other => return vec![Err(unknown(format!("{other:?} from the once script"))); n],
    };
    answers
        .into_iter()
        .map(|answer| match answer {
            Value::Int(1) => Ok(Accepted::default()),
            Value::Int(0) => Ok(Accepted {
                position: None,
                duplicate: true,
            }),
            // Taken back: nothing happened.
            Value::ServerError(e) => Err(refused(e)),
            other => Err(unknown(format!("{other:?} from the once script"))),
        })
        .collect()
}
