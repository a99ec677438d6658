//! The once script: a publish with an idempotency key to a room without history, published
//! only if its key is not recorded, the check, the record and the publish in one atomic
//! step on the room's hash slot. (In a room with history, the publish script does the same;
//! see `history`.)

use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;

use super::script_call::unknown;
use crate::broker::{Accepted, Published};

/// KEYS: the key's record (in the room's hash slot). ARGV: the room's channel, the window
/// (ms), the frame. Records the key for the window and publishes the frame, answering 1;
/// answers 0 and does nothing when the key is recorded already. A refused publish takes
/// the record back: its error means that nothing happened.
const TEXT: &str = r#"
if not redis.acl_check_cmd('PUBLISH', ARGV[1], '') then
  return redis.error_reply("NOPERM this user may not publish to the room's channel")
end
if not redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[2]) then
  return 0
end
local ok, e = pcall(redis.call, 'PUBLISH', ARGV[1], ARGV[3])
if not ok then
  redis.call('DEL', KEYS[1])
  if type(e) == 'table' and e.err then e = e.err end
  return redis.error_reply(tostring(e))
end
return 1
"#;

static PUBLISH: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TEXT));

/// The same on a Redis Cluster, where rooms' channels are sharded (`SPUBLISH`).
static SPUBLISH: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&TEXT.replace("'PUBLISH'", "'SPUBLISH'")));

/// The once script, for a cluster or not.
pub(crate) fn script(cluster: bool) -> &'static redis::Script {
    match cluster {
        true => &SPUBLISH,
        false => &PUBLISH,
    }
}

/// A window in whole milliseconds, at least 1 (Redis refuses `PX 0`).
pub(crate) fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What the once script's answer says (an error reply is handled by the lane: the script
/// did nothing). Any other answer leaves the outcome unknown: the script ran.
pub(super) fn result(answer: Value) -> Published {
    match answer {
        Value::Int(1) => Ok(Accepted::default()),
        Value::Int(0) => Ok(Accepted {
            position: None,
            duplicate: true,
        }),
        other => Err(unknown(format!("{other:?} from the once script"))),
    }
}
