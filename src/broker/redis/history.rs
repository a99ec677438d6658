//! Room history on Redis: per history room, a hash `{prefix}meta:{ROOM}` (its `epoch` and
//! `top` offset) and a list `{prefix}frames:{ROOM}` (its last frames, oldest first, the
//! newest at offset `top`), both in the room's hash slot and both expiring after the history
//! TTL without a publish.
//!
//! Publishes go through one Lua script (by `EVALSHA`, see `lanes`; one call can carry
//! several rooms): for each room it takes the next offsets, appends the frames with their
//! `offset` and `epoch` to the list (one `RPUSH`, then trimmed to the history size),
//! publishes them and refreshes both keys' time to live, with no other client's command in
//! between. A list rather than a stream (whose entry ids could be the offsets): the frames
//! of a run go in one command, where a stream takes one `XADD` each, and Redis spends
//! about 0.6 µs less per frame (BENCHMARKS finding 25). The list always ends at `top` and
//! holds consecutive offsets, so the offset of its first frame is `top - LLEN + 1`; the read
//! scripts check that against the offsets written in the frames at both ends of what they
//! read, and read nothing when they disagree. The epoch is made when the hash is missing:
//! on the room's first use, after its history expired, or after Redis lost its data, so
//! that offsets from a lost history are never taken for current ones.

use std::sync::LazyLock;
use std::time::Duration;

use hyper_tungstenite::tungstenite::Utf8Bytes;

use super::commands::{Commands, RoomScript};
use super::connect::{millis, redis_error, within};
use crate::broker::{new_epoch, HistoryPage, Keys, Page, Position, Recovery};
use crate::error::BrokerError;
use crate::settings::History;

/// KEYS: per run of one room's frames, its meta and frames keys, then the record key of
/// each of its frames that has an idempotency key, in order. ARGV: a new epoch (used for
/// any room that has none), then per run its channel, size, ttl (ms), how many frames
/// (`n`), which frames have a key (a string of `n` `0`/`1`, or empty when none does), the
/// idempotency window in ms, and the `n` frames (JSON objects without their closing `}`,
/// which the script writes after the `offset` and `epoch` it adds) in order. Gives each
/// run's frames consecutive offsets, keeps them, refreshes the room's time to live, then
/// publishes each, and returns per run `{first offset, epoch}` or the error that stopped
/// that run.
///
/// A frame whose key is recorded (published within the window) is left out: it is not
/// kept, published or given an offset, and the run's answer lists it as
/// `{first, epoch, {i, offset, epoch, …}}` (its index from 0 and where it went: `-1, ''`
/// when its record names no position, made while the room had no history). Every other
/// keyed frame's key is recorded with its position, before anything is kept or published,
/// by one `SET … NX GET` (on Redis 7; `GET` then `SET` before), and taken back with the
/// rest when the room is put back as it was: a keyed publish costs one command more.
///
/// Each room runs under its own `pcall`, so one room's error leaves the others' answers
/// true. The publish permission on a room's channel is checked before anything is written
/// (on Redis 7; on Redis 6, which cannot check it, the first `PUBLISH` refuses and the
/// room is put back), and a room that fails before any of its frames went out is put back
/// as it was (its offsets, kept frames and key records taken back, a history it made
/// deleted): its error means that nothing happened. A room whose frames went out in part, or that could not be
/// put back, answers `UNKNOWN …`: its outcome is unknown.
///
/// A lane sends all the history publishes of one round as one call on one Redis (on a
/// cluster, each room's run on its own: a call's keys must share a slot): a call costs
/// Redis about 4 µs before any command runs, as much as a few frames' commands, so rooms
/// with one publish each in a round cost Redis about half as much this way (BENCHMARKS
/// finding 25).
///
/// The list is trimmed to the size once it holds `max(16, size / 8)` frames more, not on
/// every call: it keeps at least the last `size` frames and a few more, and a room's call
/// mostly saves an `LTRIM` (about 1 µs of Redis's time on a full list).
const PUBLISH_TEXT: &str = r#"
local set_nx_get = redis.REDIS_VERSION_NUM ~= nil and redis.REDIS_VERSION_NUM >= 0x070000
local function record(key, value, window)
  if set_nx_get then
    return redis.call('SET', key, value, 'NX', 'PX', window, 'GET')
  end
  local old = redis.call('GET', key)
  if not old then redis.call('SET', key, value, 'PX', window) end
  return old
end
local function publish(meta, list, records, channel, size, ttl, window, a, n, done)
  if redis.acl_check_cmd and not redis.acl_check_cmd('PUBLISH', channel, '') then
    return redis.error_reply("NOPERM this user may not publish to the room's channel")
  end
  size = tonumber(size)
  local state = redis.call('HMGET', meta, 'epoch', 'top')
  local epoch, top = state[1], tonumber(state[2])
  if not epoch then
    epoch = ARGV[1]
    top = 0
    redis.call('DEL', list)
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
    done.created = true
  end
  local tail = ',"epoch":"' .. epoch .. '"}'
  local frames, seen = {}, {}
  for i = 1, n do
    local old = false
    if records[i] then
      old = record(records[i], string.format('%d', top + #frames + 1) .. ' ' .. epoch, window)
      if not old then done.recorded[#done.recorded + 1] = records[i] end
    end
    if old then
      local offset, was = string.match(old, '^(%d+) (.+)$')
      seen[#seen + 1] = i - 1
      seen[#seen + 1] = offset and tonumber(offset) or -1
      seen[#seen + 1] = was or ''
    else
      frames[#frames + 1] = ARGV[a + i - 1] .. ',"offset":' .. string.format('%d', top + #frames + 1) .. tail
    end
  end
  local kept = #frames
  done.count = kept
  if kept > 0 then
    redis.call('HINCRBY', meta, 'top', kept)
    done.counted = true
    local len = redis.call('RPUSH', list, unpack(frames))
    done.kept = true
    redis.call('PEXPIRE', meta, ttl)
    redis.call('PEXPIRE', list, ttl)
    for i = 1, kept do
      redis.call('PUBLISH', channel, frames[i])
      done.published = i
    end
    -- Trimmed once published: a refused first PUBLISH (Redis 6, which cannot check the
    -- permission first) is undone without losing older frames.
    if len > size + math.max(16, math.floor(size / 8)) then
      redis.call('LTRIM', list, -size, -1)
    end
  end
  if #seen > 0 then return {top + 1, epoch, seen} end
  return {top + 1, epoch}
end
local function undo(meta, list, done)
  for _, key in ipairs(done.recorded) do redis.call('DEL', key) end
  if done.created then
    redis.call('DEL', meta, list)
    return
  end
  if done.kept then redis.call('RPOP', list, done.count) end
  if done.counted then redis.call('HINCRBY', meta, 'top', -done.count) end
end
local answers = {}
local a, k, r = 2, 1, 0
while k <= #KEYS do
  r = r + 1
  local meta, list, n, mask, window = KEYS[k], KEYS[k + 1], tonumber(ARGV[a + 3]), ARGV[a + 4], ARGV[a + 5]
  k = k + 2
  local records = {}
  for i = 1, #mask do
    if string.byte(mask, i) == 49 then
      records[i] = KEYS[k]
      k = k + 1
    end
  end
  local done = {published = 0, recorded = {}}
  local ok, answer = pcall(publish, meta, list, records, ARGV[a], ARGV[a + 1], ARGV[a + 2], window, a + 6, n, done)
  if ok then
    answers[r] = answer
  else
    local e = tostring(answer)
    if type(answer) == 'table' and answer.err then e = answer.err end
    if done.published == 0 and pcall(undo, meta, list, done) then
      answers[r] = redis.error_reply(e)
    else
      answers[r] = redis.error_reply('UNKNOWN ' .. e)
    end
  end
  a = a + 6 + n
end
return answers
"#;

static PUBLISH: LazyLock<RoomScript> = LazyLock::new(|| RoomScript::new(PUBLISH_TEXT));

/// The publish script, for a cluster or not.
pub(crate) fn publish_script(cluster: bool) -> &'static redis::Script {
    PUBLISH.get(cluster)
}

/// The start of the read scripts (KEYS: meta, frames; ARGV: a new epoch, ttl (ms)): the
/// room's epoch, made (with an empty history and its time to live) if it has none.
const READ_EPOCH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
"#;
/// Then its `top` offset, the offset of the list's first frame (`oldest`, one past the top
/// when the list is empty), and `wrote(frame, offset)`: whether `frame` was kept at
/// `offset` in this epoch (the end the publish script wrote).
const MAKE_EPOCH: &str = r#"
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local top = tonumber(redis.call('HGET', KEYS[1], 'top'))
local oldest = top - redis.call('LLEN', KEYS[2]) + 1
-- More frames than offsets: not what the publish script writes. Count none as kept.
if oldest < 1 then oldest = top + 1 end
local function wrote(frame, offset)
  local tail = ',"offset":' .. string.format('%d', offset) .. ',"epoch":"' .. epoch .. '"}'
  return frame ~= nil and string.sub(frame, -#tail) == tail
end
"#;

/// KEYS: meta, frames. ARGV: a new epoch, ttl (ms), how many frames, before which offset
/// (empty: the newest), a byte budget (`0`: none), the history's size. Returns `{top, epoch,
/// {frames, oldest first}, more}`: the newest of those frames that fit in the budget (at
/// least one), and `more` = 1 when older ones were left out for it; never a frame older
/// than the last `size` (the list may hold a few more, see the publish script). Makes the
/// epoch if the room has none.
static READ: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        &[
            READ_EPOCH,
            MAKE_EPOCH,
            r#"
local frames = {}
local more = 0
local limit = tonumber(ARGV[3])
local before = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local lowest = math.max(oldest, top - tonumber(ARGV[6]) + 1)
local newest = top
if before ~= nil and before - 1 < top then newest = before - 1 end
if limit > 0 and newest >= lowest then
  -- Read from the newest end in growing chunks, and stop once over the budget: a page
  -- never makes Redis copy much more than it returns.
  local from = math.max(lowest, newest - limit + 1)
  local newest_first, bytes, hi, step, last = {}, 0, newest, 8, nil
  while hi >= from and more == 0 do
    local lo = math.max(from, hi - step + 1)
    local entries = redis.call('LRANGE', KEYS[2], lo - oldest, hi - oldest)
    for i = #entries, 1, -1 do
      bytes = bytes + #entries[i] + 1
      if budget > 0 and bytes > budget and last ~= nil then more = 1 break end
      newest_first[#newest_first + 1] = entries[i]
      last = lo + i - 1
    end
    hi, step = lo - 1, step * 2
  end
  if last ~= nil and wrote(newest_first[1], newest) and wrote(newest_first[#newest_first], last) then
    for i = #newest_first, 1, -1 do frames[#frames + 1] = newest_first[i] end
  else
    more = 0
  end
end
return {top, epoch, frames, more}
"#,
        ]
        .concat(),
    )
});

/// KEYS: meta, frames. ARGV: a new epoch, ttl (ms), the client's offset, whether to make
/// the epoch when there is none (`1`) or answer an empty one (`0`), the client's epoch, the
/// history's size, a byte budget (`0`: none). Returns `{top, epoch, oldest kept offset
/// (one past the top when none), {frames after the offset}, fits}`: the frames only when
/// every missed one can be recovered (`broker::recoverable`) and they fit in the budget
/// (`fits` = 0 when they do not), so that nothing is read for a client that cannot be
/// recovered. Frames whose offsets are not where the list says count as none kept.
static RECOVER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        &[
            READ_EPOCH,
            "if not epoch and ARGV[4] == '0' then return {0, '', 1, {}, 1} end",
            MAKE_EPOCH,
            r#"
local frames = {}
local since = tonumber(ARGV[3])
local recoverable = epoch == ARGV[5] and since <= top and top - since <= tonumber(ARGV[6])
  and (since == top or oldest <= since + 1)
if not recoverable or since == top then return {top, epoch, oldest, frames, 1} end
-- Read oldest first in growing chunks, and stop once over the budget: a catch-up that
-- cannot fit never makes Redis copy all of it.
local budget, bytes = tonumber(ARGV[7]), 0
local lo, last, step = since + 1 - oldest, top - oldest, 8
while lo <= last do
  local hi = math.min(last, lo + step - 1)
  local entries = redis.call('LRANGE', KEYS[2], lo, hi)
  if #frames == 0 and not wrote(entries[1], since + 1) then return {top, epoch, top + 1, {}, 1} end
  for i = 1, #entries do
    bytes = bytes + #entries[i]
    if budget > 0 and bytes > budget then return {top, epoch, oldest, {}, 0} end
    frames[#frames + 1] = entries[i]
  end
  lo, step = hi + 1, step * 2
end
if not wrote(frames[#frames], top) then return {top, epoch, top + 1, {}, 1} end
return {top, epoch, oldest, frames, 1}
"#,
        ]
        .concat(),
    )
});

/// A byte budget as the read scripts take it: `0` for none, at least `1` for one.
fn script_budget(budget: Option<usize>) -> usize {
    budget.map_or(0, |budget| budget.max(1))
}

/// Reads of history rooms, through the pool.
#[derive(Debug)]
pub(crate) struct HistoryStore {
    commands: Commands,
    keys: Keys,
    timeout: Duration,
}

impl HistoryStore {
    pub(crate) fn new(commands: Commands, keys: Keys, timeout: Duration) -> Self {
        HistoryStore {
            commands,
            keys,
            timeout,
        }
    }

    /// Where `room`'s history stands.
    pub(crate) async fn top(&self, room: &str, history: History) -> Result<Position, BrokerError> {
        let nothing = Page {
            limit: 0,
            before: None,
            budget: None,
        };
        self.last(room, history, nothing)
            .await
            .map(|(position, _, _)| position)
    }

    /// A page of the history (see [`Page`]), and where it stands.
    pub(crate) async fn last(
        &self,
        room: &str,
        history: History,
        page: Page,
    ) -> Result<HistoryPage, BrokerError> {
        let (meta, frames) = (self.keys.history_meta(room), self.keys.history_frames(room));
        let (top, epoch, frames, more): (u64, String, Vec<String>, u8) =
            within(self.timeout, async {
                let mut connection = self.commands.get().await?;
                READ.key(meta)
                    .key(frames)
                    .arg(&*new_epoch())
                    .arg(millis(history.ttl))
                    .arg(page.limit)
                    .arg(
                        page.before
                            .map(|before| before.to_string())
                            .unwrap_or_default(),
                    )
                    .arg(script_budget(page.budget))
                    .arg(history.size)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(redis_error)
            })
            .await?;
        Ok((
            Position {
                offset: top,
                epoch: epoch.into(),
            },
            frames.into_iter().map(Utf8Bytes::from).collect(),
            more == 1,
        ))
    }

    /// Where the history stands, its oldest kept offset, and the frames after `since` in
    /// `epoch` (only when they can all be recovered and fit in `budget` bytes, if given);
    /// with `create`, a room without history gets its epoch (else its epoch is
    /// empty).
    pub(crate) async fn recover(
        &self,
        room: &str,
        history: History,
        (since, epoch): (u64, &str),
        budget: Option<usize>,
        create: bool,
    ) -> Result<Recovery, BrokerError> {
        let (meta, frames) = (self.keys.history_meta(room), self.keys.history_frames(room));
        let (top, top_epoch, oldest, frames, fits): (u64, String, u64, Vec<String>, u8) =
            within(self.timeout, async {
                let mut connection = self.commands.get().await?;
                RECOVER
                    .key(meta)
                    .key(frames)
                    .arg(&*new_epoch())
                    .arg(millis(history.ttl))
                    .arg(since)
                    .arg(if create { "1" } else { "0" })
                    .arg(epoch)
                    .arg(history.size)
                    .arg(script_budget(budget))
                    .invoke_async(&mut connection)
                    .await
                    .map_err(redis_error)
            })
            .await?;
        Ok(Recovery {
            top: Position {
                offset: top,
                epoch: top_epoch.into(),
            },
            oldest,
            frames: frames.into_iter().map(Utf8Bytes::from).collect(),
            fits: fits == 1,
        })
    }
}
