#!/usr/bin/env bash
# Redis's own CPU per history frame for three ways a Lua script could keep and publish a
# room's run of frames, measured with redis-benchmark calling each script on a private
# redis-server with two subscribers of the room's channel (as two nodes): what any change to the history
# layout could save, before building it (BENCHMARKS finding 44).
#
#   bench/history-floor.sh [FRAMES_PER_RUN] [CALLS]
#
#   today: thinws's publish script (src/broker/redis/history.rs): frames built with their
#          offset and epoch in Lua, one RPUSH, one PUBLISH per frame;
#   as-sent: the frames kept and published as the node sent them: RPUSH straight from
#          ARGV, one PUBLISH per run (the frames joined by 0x1E), the same per-run calls;
#   run-entry: the node sends the run already joined: one list entry and one PUBLISH per
#          run, no per-frame work in Lua at all.
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${1:-14} calls=${2:-40000}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
setsid redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
redis_pid=$!
subs=()
trap 'kill "${subs[@]}" "$redis_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
for _ in 1 2; do redis-cli -p "$port" subscribe 'thinws:{r}' >/dev/null & subs+=("$!"); done
sleep 0.3
today=$(sed -n '/^const PUBLISH_TEXT: &str = r#"/,/^"#;/p' src/broker/redis/history.rs | sed '1d;$d')
as_sent=$(cat <<'LUA'
local meta, list, channel, size, ttl, n = KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local state = redis.call('HMGET', meta, 'epoch', 'top')
local epoch, top = state[1], tonumber(state[2])
if not epoch then epoch = ARGV[1]; top = 0; redis.call('HSET', meta, 'epoch', epoch, 'top', 0) end
redis.call('HINCRBY', meta, 'top', n)
local len = redis.call('RPUSH', list, unpack(ARGV, 8, 7 + n))
if len > size + 16 then redis.call('LTRIM', list, -size, -1) end
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', list, ttl)
redis.call('PUBLISH', channel, (top + 1) .. ' ' .. epoch .. '\30' .. table.concat(ARGV, '\30', 8, 7 + n))
return {top + 1, epoch}
LUA
)
run_entry=$(cat <<'LUA'
local meta, list, channel, size, ttl, n = KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local state = redis.call('HMGET', meta, 'epoch', 'top')
local epoch, top = state[1], tonumber(state[2])
if not epoch then epoch = ARGV[1]; top = 0; redis.call('HSET', meta, 'epoch', epoch, 'top', 0) end
redis.call('HINCRBY', meta, 'top', n)
local len = redis.call('RPUSH', list, (top + 1) .. ' ' .. n, ARGV[8])
if len > 2 * (size / n) + 16 then redis.call('LTRIM', list, -2 * math.ceil(size / n), -1) end
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', list, ttl)
redis.call('PUBLISH', channel, (top + 1) .. ' ' .. epoch)
redis.call('PUBLISH', channel, ARGV[8])
return {top + 1, epoch}
LUA
)
frame='{"type":"message","roomID":"room-17","connectionID":"sock-1234","payload":{"n":123456,"sent":1733600000000,"pad":"abcdefgh"}'
cpu() { redis-cli -p "$port" info cpu | awk -F: '/used_cpu_(user|sys):/ {s += $2} END {printf "%.3f", s}'; }
measure() { # name sha args...
  local name=$1; shift
  redis-cli -p "$port" flushall >/dev/null
  local before after
  before=$(cpu)
  redis-benchmark -p "$port" -n "$calls" -c 8 -q "$@" >/dev/null
  after=$(cpu)
  python3 -c "import sys; b,a,c,f=map(float,sys.argv[1:5]); print(f'{sys.argv[5]:10s} Redis CPU {a-b:6.2f} s for {int(c*f):,} frames: {(a-b)/(c*f)*1e6:5.2f} us per frame')" "$before" "$after" "$calls" "$frames" "$name"
}
sha_today=$(redis-cli -p "$port" script load "$today")
sha_sent=$(redis-cli -p "$port" script load "$as_sent")
sha_run=$(redis-cli -p "$port" script load "$run_entry")
mask=""
today_args=(EVALSHA "$sha_today" 2 'thinws:meta:{r}' 'thinws:frames:{r}' e1 'thinws:{r}' 1000 60000 "$frames" "$mask" 120000)
sent_args=(EVALSHA "$sha_sent" 2 'thinws:meta:{r}' 'thinws:frames:{r}' e1 'thinws:{r}' 1000 60000 "$frames" "" 120000)
for _ in $(seq "$frames"); do today_args+=("$frame"); sent_args+=("$frame}"); done
joined=$(for _ in $(seq "$frames"); do printf '%s}\x1e' "$frame"; done)
run_args=(EVALSHA "$sha_run" 2 'thinws:meta:{r}' 'thinws:frames:{r}' e1 'thinws:{r}' 1000 60000 "$frames" "" 120000 "${joined%$'\x1e'}")
plain_args=(PUBLISH 'thinws:{r}' "$frame}")
for round in 1 2 3; do
  measure today "${today_args[@]}"
  measure as-sent "${sent_args[@]}"
  measure run-entry "${run_args[@]}"
  before=$(cpu)
  redis-benchmark -p "$port" -n "$((calls * frames))" -c 8 -P "$frames" -q "${plain_args[@]}" >/dev/null
  after=$(cpu)
  python3 -c "import sys; b,a,n=map(float,sys.argv[1:4]); print(f'plain      Redis CPU {a-b:6.2f} s for {int(n):,} frames: {(a-b)/n*1e6:5.2f} us per frame (PUBLISH, pipelined {sys.argv[4]} at a time)')" "$before" "$after" "$((calls * frames))" "$frames"
done
