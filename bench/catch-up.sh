#!/usr/bin/env bash
# How long a node's history rooms take to catch up after Redis cuts its pub/sub connection,
# for two thinws binaries (e.g. before and after a change) on the same machine: ROOMS sockets,
# each in a history room of its own on one node; `CLIENT KILL TYPE pubsub`, then one message
# to every room; the time until every socket has it. Alternating rounds.
#
#   bench/catch-up.sh BEFORE_BINARY AFTER_BINARY [ROOMS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 rooms=${3:-2000} rounds=${4:-3}
(cd bench/loadgen && cargo build --quiet --release)
loadgen=bench/loadgen/target/release/thinws-bench
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
redis_pid=$!
node_pid=
trap 'kill $node_pid "$redis_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done

one() { # label binary
  local port; port=$(free_port)
  "$2" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$redis_port" --rate-limit 0 \
    --max-sockets 300000 --history-size 100 --no-demo >/dev/null 2>&1 &
  node_pid=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
  "$loadgen" run --target thinws --label "$1" --nodes "http://127.0.0.1:$port" --pids "$node_pid" \
    --scenario catch-up --subscribers "$rooms" --redis-port "$redis_port" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%6s: %d history rooms caught up and delivered in %.0f ms" % (r["label"], r["sockets"], r["seconds"] * 1000))'
  kill "$node_pid"; wait "$node_pid" 2>/dev/null || true
  redis-cli -p "$redis_port" flushall >/dev/null
}

for _ in $(seq "$rounds"); do
  one before "$before"
  one after "$after"
done
