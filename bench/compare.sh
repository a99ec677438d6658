#!/usr/bin/env bash
# Compares two thinws binaries (e.g. before and after a change) on the same machine in one
# session: alternating rounds of the rooms and fanout scenarios (longer than bench/run.sh's,
# so that one round lasts several seconds), each against two fresh nodes of one binary on a
# private redis-server. Prints, per round, deliveries/s and the nodes' CPU seconds (user +
# system, from /proc) per million deliveries; the CPU figure is the steadier one on a shared
# 2-core machine.
#
#   bench/compare.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]
#   AFTER_ARGS="--history-size 1000" bench/compare.sh BIN BIN 1   # one binary, two settings
#   ROOMS_ARGS="--subscribers 200 --messages 100 --window 16" bench/compare.sh ...  # smaller
#   PERF=1 bench/compare.sh ...   # also records the first node with `perf record` into
#                                 # bench/results/perf-{before,after}-{scenario}.data
#   PERF_RECORD_ARGS="--call-graph dwarf" PERF=1 ...   # with call graphs
#   PERF=stat bench/compare.sh ...   # instead counts both nodes' context switches and system
#                                 # calls into bench/results/perf-stat-{side}-{scenario}.txt
#   CLUSTER_REPLICAS=1 BEFORE_REDIS=cluster AFTER_REDIS=cluster AFTER_ARGS="--redis-wait-replicas 1" ...
#                                 # a replica per master, e.g. to measure WAIT
#   AFTER_REDIS=cluster bench/compare.sh BIN BIN 3   # the "after" side on a local 3-master
#                                 # Redis Cluster (no replicas), the "before" on one Redis;
#                                 # BEFORE_REDIS=cluster likewise (both: two binaries on it)
#   REDIS_SESSION=shared bench/compare.sh ...   # Redis in this script's session (see below)
#   REDIS_CPUS=1 OTHER_CPUS=0 bench/compare.sh ...   # Redis pinned to CPU 1, the nodes and
#                                 # the load generator to CPU 0 (taskset): Redis on a core of
#                                 # its own, as on a host of its own (BENCHMARKS finding 34)
#   AFTER_LOAD_ARGS=--keys bench/compare.sh BIN BIN 3   # extra load generator arguments for
#                                 # the "after" side (BEFORE_LOAD_ARGS likewise), e.g. every
#                                 # message with an idempotency key
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 rounds=${3:-3}
(cd bench/loadgen && cargo build --quiet --release)
loadgen=bench/loadgen/target/release/thinws-bench
# Redis runs as a service of its own would: in its own session, so that the kernel's
# autogroup scheduling (on here) gives its one thread a group's share of the CPU rather than
# one thread's share among the nodes' and the load generator's (BENCHMARKS finding 25).
# REDIS_SESSION=shared runs it in this script's session instead, as before that finding.
own_session=(setsid); [ "${REDIS_SESSION:-own}" = shared ] && own_session=()
pin_redis=() pin_other=()
[ -n "${REDIS_CPUS:-}" ] && pin_redis=(taskset -c "$REDIS_CPUS")
[ -n "${OTHER_CPUS:-}" ] && pin_other=(taskset -c "$OTHER_CPUS")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
"${own_session[@]}" "${pin_redis[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
redis_pid=$!
pids=()
trap 'kill "${pids[@]}" "$redis_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
cluster_pids=() cluster_ports=()
if [ "${AFTER_REDIS:-}" = cluster ] || [ "${BEFORE_REDIS:-}" = cluster ]; then
  cluster_dir=$(mktemp -d)
  # CLUSTER_REPLICAS=1: a replica per master (6 servers), e.g. to measure
  # --redis-wait-replicas.
  replicas=${CLUSTER_REPLICAS:-0}
  for _ in $(seq $(( 3 * (1 + replicas) ))); do
    p=$(free_port); while (( p > 55000 )); do p=$(free_port); done
    mkdir -p "$cluster_dir/$p"
    "${own_session[@]}" "${pin_redis[@]}" redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --dir "$cluster_dir/$p" \
      --cluster-config-file nodes.conf --save "" --appendonly no >/dev/null &
    cluster_pids+=("$!"); cluster_ports+=("$p")
  done
  trap 'kill "${pids[@]}" "$redis_pid" "${cluster_pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$cluster_dir"' EXIT
  for p in "${cluster_ports[@]}"; do until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.05; done; done
  redis-cli --cluster create "${cluster_ports[@]/#/127.0.0.1:}" --cluster-replicas "$replicas" --cluster-yes >/dev/null
  for p in "${cluster_ports[@]}"; do until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done; done
fi
ticks=$(getconf CLK_TCK)
cpu_ticks() { local t=0 p; for p in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done; echo "$t"; }

one() { # label binary scenario args...
  local label=$1 binary=$2 scenario=$3; shift 3
  local urls=() ids=() node_args=() redis_args=(--redis-url "redis://127.0.0.1:$redis_port")
  local redis_pids=("$redis_pid")
  if [ "$label" = after ]; then read -ra node_args <<< "${AFTER_ARGS:-}"; else read -ra node_args <<< "${BEFORE_ARGS:-}"; fi
  local on_redis=${BEFORE_REDIS:-}; [ "$label" = after ] && on_redis=${AFTER_REDIS:-}
  local load_args=()
  if [ "$label" = after ]; then read -ra load_args <<< "${AFTER_LOAD_ARGS:-}"; else read -ra load_args <<< "${BEFORE_LOAD_ARGS:-}"; fi
  if [ "$on_redis" = cluster ]; then
    redis_args=(--redis-cluster-url "redis://127.0.0.1:${cluster_ports[0]}")
    redis_pids=("${cluster_pids[@]}")
  fi
  for _ in 1 2; do
    local port; port=$(free_port)
    "${pin_other[@]}" "$binary" --listen "127.0.0.1:$port" "${redis_args[@]}" \
      --rate-limit 0 --max-sockets 300000 --no-demo "${node_args[@]}" >/dev/null 2>&1 &
    ids+=("$!"); urls+=("http://127.0.0.1:$port")
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
  done
  pids=("${ids[@]}")
  local perf_pid=
  if [ "${PERF:-}" = stat ]; then
    mkdir -p bench/results
    perf stat -e task-clock,context-switches,raw_syscalls:sys_enter -p "$(IFS=,; echo "${ids[*]}")" \
      -o "bench/results/perf-stat-$label-$scenario.txt" >/dev/null 2>&1 &
    perf_pid=$!
  elif [ -n "${PERF:-}" ]; then
    mkdir -p bench/results
    # shellcheck disable=SC2086 # PERF_RECORD_ARGS, e.g. "--call-graph dwarf", word-split on purpose
    perf record -q -F 999 ${PERF_RECORD_ARGS:-} -p "${ids[0]}" -o "bench/results/perf-$label-$scenario.data" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  local start; start=$(cpu_ticks "${ids[@]}")
  local redis_start; redis_start=$(cpu_ticks "${redis_pids[@]}")
  local report
  report=$("${pin_other[@]}" "$loadgen" run --target thinws --label "$label" --nodes "$(IFS=,; echo "${urls[*]}")" \
    --scenario "$scenario" "$@" "${load_args[@]}" 2>/dev/null)
  local used=$(( $(cpu_ticks "${ids[@]}") - start ))
  local redis_used=$(( $(cpu_ticks "${redis_pids[@]}") - redis_start ))
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi
  kill "${ids[@]}"; wait "${ids[@]}" 2>/dev/null || true; pids=()
  redis-cli -p "$redis_port" flushall >/dev/null
  # (A replica refuses FLUSHALL; its master's reaches it.)
  for p in "${cluster_ports[@]}"; do redis-cli -p "$p" flushall >/dev/null 2>&1 || true; done
  python3 - "$label" "$scenario" "$used" "$ticks" "$report" "$redis_used" <<'PY'
import json, sys
label, scenario, used, ticks, report, redis_used = sys.argv[1:]
r = json.loads(report)
cpu = int(used) / int(ticks)
redis_cpu = int(redis_used) / int(ticks)
print(f"{label:8} {scenario:7} {r['deliveries_per_sec']:>12,.0f}/s  missing {r['missing']}  "
      f"p50 {r['p50_ms']:6.1f} ms  node CPU {cpu:6.2f} s = {cpu / r['delivered'] * 1e6:5.2f} s per 1M deliveries  "
      f"Redis CPU {redis_cpu:5.2f} s over {r['seconds']:.2f} s")
PY
}

for round in $(seq "$rounds"); do
  for side in before after; do
    binary=$before; [ "$side" = after ] && binary=$after
    # shellcheck disable=SC2086 # the scenarios' arguments, word-split on purpose
    one "$side" "$binary" rooms ${ROOMS_ARGS:---subscribers 1000 --messages 1000 --window 16}
    # shellcheck disable=SC2086
    one "$side" "$binary" fanout ${FANOUT_ARGS:---subscribers 1000 --messages 5000 --window 64}
  done
done
