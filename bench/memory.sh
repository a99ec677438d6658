#!/usr/bin/env bash
# One node of BINARY in memory (no Redis) under the rooms scenario, every message with an
# idempotency key unless KEYS=0: deliveries/s and the node's CPU seconds. For the memory
# broker's costs (BENCHMARKS finding 40); alternate two binaries to compare them.
#
#   bench/memory.sh BINARY [ROUNDS]
#   ROOMS_ARGS="--subscribers 200 --messages 100 --window 16" KEYS=0 bench/memory.sh BIN
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$1 rounds=${2:-1}
(cd bench/loadgen && cargo build --quiet --release)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
keys=(--keys); [ "${KEYS:-1}" = 0 ] && keys=()
for _ in $(seq "$rounds"); do
  port=$(free_port)
  "$binary" --listen "127.0.0.1:$port" --rate-limit 0 --max-sockets 300000 --no-demo >/dev/null 2>&1 &
  pid=$!
  trap 'kill "$pid" 2>/dev/null || true' EXIT
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
  start=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  # shellcheck disable=SC2086 # the scenario's arguments, word-split on purpose
  report=$(bench/loadgen/target/release/thinws-bench run --target thinws --label memory \
    --nodes "http://127.0.0.1:$port" --scenario rooms \
    ${ROOMS_ARGS:---subscribers 1000 --messages 1000 --window 16} "${keys[@]}" 2>/dev/null)
  used=$(( $(awk '{print $14 + $15}' "/proc/$pid/stat") - start ))
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$report" "$used" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r, used, ticks = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"{r['deliveries_per_sec']:>10,.0f} deliveries/s  missing {r['missing']}  node CPU {used / ticks:5.2f} s")
PY
done
