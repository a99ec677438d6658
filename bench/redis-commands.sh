#!/usr/bin/env bash
# Where Redis's CPU goes under the rooms scenario: two nodes of BINARY on a private
# redis-server, its statistics reset once the nodes are up, then the load generator's rooms
# run, then Redis's per-command time (`INFO commandstats`: each command's own time, the
# commands a script calls included) and its CPU seconds. A script's time minus the commands
# it called is what its Lua costs (BENCHMARKS finding 39).
#
#   bench/redis-commands.sh BINARY [NODE_ARGS...]
#   bench/redis-commands.sh target/release/thinws --history-size 100
#   ROOMS_ARGS="--subscribers 200 --messages 100 --window 16" bench/redis-commands.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$1; shift
(cd bench/loadgen && cargo build --quiet --release)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
setsid redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids=("$!")
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
urls=()
for _ in 1 2; do
  port=$(free_port)
  "$binary" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$redis_port" \
    --rate-limit 0 --max-sockets 300000 --no-demo "$@" >/dev/null 2>&1 &
  pids+=("$!"); urls+=("http://127.0.0.1:$port")
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
done
redis-cli -p "$redis_port" config resetstat >/dev/null
# shellcheck disable=SC2086 # the scenario's arguments, word-split on purpose
bench/loadgen/target/release/thinws-bench run --target thinws --label redis-commands \
  --nodes "$(IFS=,; echo "${urls[*]}")" --scenario rooms \
  ${ROOMS_ARGS:---subscribers 1000 --messages 1000 --window 16} 2>/dev/null > /tmp/redis-commands-report.$$
stats=$(redis-cli -p "$redis_port" info commandstats)
cpu=$(redis-cli -p "$redis_port" info cpu)
python3 - "$stats" "$cpu" /tmp/redis-commands-report.$$ <<'PY'
import json, re, sys
stats, cpu, report = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
print(f"deliveries/s {report['deliveries_per_sec']:,.0f}  delivered {report['delivered']:,}  missing {report['missing']}")
rows = []
for m in re.finditer(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", stats):
    rows.append((m.group(1), int(m.group(2)), int(m.group(3))))
rows.sort(key=lambda r: -r[2])
used = sum(float(v) for k, v in re.findall(r"used_cpu_(sys|user):([\d.]+)", cpu))
print(f"Redis CPU {used:.2f} s")
print(f"{'command':12} {'calls':>10} {'s':>7} {'µs/call':>8}")
for name, calls, usec in rows:
    print(f"{name:12} {calls:>10,} {usec / 1e6:7.2f} {usec / calls:8.2f}")
PY
rm -f /tmp/redis-commands-report.$$
