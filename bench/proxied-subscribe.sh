#!/usr/bin/env bash
# What a subscribe that asks the backend (--proxy-subscribe-url) costs: one thinws node on a
# private redis-server, the Node example backend, and the join-burst scenario (SOCKETS
# sockets connect and subscribe to one presence room, 256 at a time), in alternating rounds
# of three settings of the same binary: no hook, the hook on every room, and the hook with
# the room opted out (--proxy-room-prefix private:). Prints the node's and the backend's CPU
# per subscribe and the burst's duration.
#
#   bench/proxied-subscribe.sh BINARY [SOCKETS] [ROUNDS]
#
# One round per invocation is the default, with a minute between invocations: on this
# machine a second round in the same invocation ran slower for all three settings and the
# third stopped (12,000 loopback connections a round; the closed ones wait in TIME_WAIT).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$1 sockets=${2:-4000} rounds=${3:-1}
(cd bench/loadgen && cargo build --quiet --release)
loadgen=bench/loadgen/target/release/thinws-bench
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret=$(mktemp); echo "a bench secret of at least 32 bytes!" > "$secret"
redis_port=$(free_port) backend_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
redis_pid=$!
THINWS_SECRET="$(cat "$secret")" PORT=$backend_port node examples/backends/node/backend.js >/dev/null &
backend_pid=$!
node_pid=
trap 'kill $node_pid "$redis_pid" "$backend_pid" 2>/dev/null || true; rm -f "$secret"; wait 2>/dev/null || true' EXIT
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
until (exec 3<>"/dev/tcp/127.0.0.1/$backend_port") 2>/dev/null; do sleep 0.05; done
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hook=(--proxy-subscribe-url "http://127.0.0.1:$backend_port/thinws/subscribe"
      --proxy-secret-file "$secret" --proxy-max-in-flight 4096)

one() { # label node-args...
  local label=$1; shift
  local port; port=$(free_port)
  "$binary" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$redis_port" --presence \
    --rate-limit 0 --max-sockets 300000 --no-demo "$@" >/dev/null 2>&1 &
  node_pid=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
  local node_start backend_start report
  node_start=$(cpu_ticks "$node_pid"); backend_start=$(cpu_ticks "$backend_pid")
  report=$("$loadgen" run --target thinws --label "$label" --nodes "http://127.0.0.1:$port" \
    --scenario join-burst --subscribers "$sockets" 2>/dev/null)
  local node_used=$(( $(cpu_ticks "$node_pid") - node_start ))
  local backend_used=$(( $(cpu_ticks "$backend_pid") - backend_start ))
  kill "$node_pid"; wait "$node_pid" 2>/dev/null || true; node_pid=
  redis-cli -p "$redis_port" flushall >/dev/null
  python3 - "$label" "$node_used" "$backend_used" "$ticks" "$report" <<'PY'
import json, sys
label, node_used, backend_used, ticks, report = sys.argv[1:]
r = json.loads(report)
n = r["sockets"]
per = lambda used: int(used) / int(ticks) / n * 1e6
print(f"{label:10} {n} sockets: connect + subscribe burst {r['seconds'] * 1000:7.0f} ms "
      f"(counted {r['delivered']}), node CPU {per(node_used):6.1f} us per socket, "
      f"backend CPU {per(backend_used):6.1f} us per socket")
PY
}

for _ in $(seq "$rounds"); do
  one no-hook
  one hook "${hook[@]}"
  one opted-out "${hook[@]}" --proxy-room-prefix private:
done
