#!/usr/bin/env bash
# Runs the benchmark scenarios against thinws, Socket.IO 4 (Node, @socket.io/redis-adapter)
# and socketioxide 0.18 (socketioxide-redis): each server as two nodes on one private
# redis-server, the same load generator, the same scenario. Prints a Markdown table and
# writes bench/results/{results.jsonl,table.md,fanout.svg}.
#
#   bench/run.sh            # everything (about 10 minutes on 2 cores)
#   bench/run.sh fanout     # only some scenarios: fanout rooms latency idle chart
#   TARGETS="thinws" bench/run.sh fanout
#   TARGETS=thinws bench/run.sh rooms rooms-history fanout fanout-history recovery   # history rooms
#   TARGETS=thinws bench/run.sh rooms rooms-presence fanout fanout-presence join-burst  # presence
#   TARGETS=thinws bench/run.sh rooms rooms-cluster fanout fanout-cluster   # 3-master Redis Cluster
#   THINWS_BIN=/tmp/thinws-before TARGETS=thinws bench/run.sh idle latency   # another build
#                                 # of thinws (e.g. an earlier commit's) instead of this tree's
#   REDIS_SESSION=shared bench/run.sh ...   # Redis in this script's session (see below)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scenarios=${*:-fanout rooms latency idle chart}
targets=${TARGETS:-thinws socketio socketioxide}
out=bench/results
mkdir -p "$out"
results=${RESULTS:-$out/results.jsonl}
: > "$results"
# Each process needs a descriptor per socket; raise the limit as far as allowed (this
# workplace caps it at 20,000, which caps the idle scenario too).
ulimit -n 300000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "building (release)…" >&2
thinws_bin=${THINWS_BIN:-$root/target/release/thinws}
[ -n "${THINWS_BIN:-}" ] || cargo build --quiet --release --features server --bin thinws
(cd bench/loadgen && cargo build --quiet --release)
[[ " $targets " == *" socketioxide "* ]] && (cd bench/peers/socketioxide && cargo build --quiet --release)
[[ " $targets " == *" socketio "* ]] && { [ -d bench/peers/socketio/node_modules ] || (cd bench/peers/socketio && npm ci --no-audit --no-fund --silent); }
loadgen=$root/bench/loadgen/target/release/thinws-bench

# Redis runs as a service of its own would: in its own session, so that the kernel's
# autogroup scheduling (on here) gives its one thread a group's share of the CPU rather than
# one thread's share among the nodes' and the load generator's (BENCHMARKS finding 25).
# REDIS_SESSION=shared runs it in this script's session instead, as before that finding.
own_session=(setsid); [ "${REDIS_SESSION:-own}" = shared ] && own_session=()
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
"${own_session[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null &
redis_pid=$!
pids=()
# shellcheck disable=SC2086 # redis_pid lists the cluster's servers too
cleanup() { kill "${pids[@]}" $redis_pid 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
redis_url=redis://127.0.0.1:$redis_port

cluster_urls=()
start_cluster() { # a 3-master Redis Cluster (no replicas), once: sets cluster_urls
  [ ${#cluster_urls[@]} -gt 0 ] && return
  local ports=() p
  for _ in 1 2 3; do
    p=$(free_port); while (( p > 55000 )); do p=$(free_port); done
    rm -rf "$out/cluster-$p"; mkdir -p "$out/cluster-$p"
    "${own_session[@]}" redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --dir "$out/cluster-$p" \
      --cluster-config-file nodes.conf --save "" --appendonly no --daemonize no >/dev/null &
    redis_pid="$redis_pid $!"
    ports+=("$p")
  done
  for p in "${ports[@]}"; do until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.05; done; done
  redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-yes >/dev/null
  for p in "${ports[@]}"; do until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done; done
  for p in "${ports[@]}"; do cluster_urls+=("redis://127.0.0.1:$p"); done
}

start_nodes() { # target [extra thinws args...] -> sets nodes (URLs) and node_pids
  local target=$1 urls=() ids=()
  shift
  local extra=("$@")
  for i in 1 2; do
    local port; port=$(free_port)
    case $target in
      thinws)
        local redis_args=(--redis-url "$redis_url")
        if [ -n "${CLUSTER:-}" ]; then
          redis_args=()
          for url in "${cluster_urls[@]}"; do redis_args+=(--redis-cluster-url "$url"); done
        fi
        "$thinws_bin" --listen "127.0.0.1:$port" "${redis_args[@]}" \
                --rate-limit 0 --max-sockets 300000 --no-demo "${extra[@]}" >/dev/null 2>&1 & ;;
      socketio) node bench/peers/socketio/server.js "$port" "$redis_url" >/dev/null 2>&1 & ;;
      socketioxide) bench/peers/socketioxide/target/release/socketioxide-peer "$port" "$redis_url" >/dev/null 2>&1 & ;;
    esac
    local pid=$!
    ids+=("$pid")
    urls+=("http://127.0.0.1:$port")
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
      kill -0 "$pid" 2>/dev/null || { echo "$target node on port $port died at start-up" >&2; exit 1; }
      sleep 0.05
    done
  done
  pids=("${ids[@]}")
  nodes=$(IFS=,; echo "${urls[*]}")
  node_pids=$(IFS=,; echo "${ids[*]}")
}
stop_nodes() {
  kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=()
  redis-cli -p "$redis_port" flushall >/dev/null
  local url; for url in "${cluster_urls[@]}"; do redis-cli -p "${url##*:}" flushall >/dev/null 2>&1 || true; done
}

run_one_node() { # like run, against the first node only
  local target=$1 scenario=$2; shift 2
  start_nodes "$target"
  echo "$target $scenario (one node) $*" >&2
  "$loadgen" run --target thinws --label "$target" --nodes "${nodes%%,*}" --pids "${node_pids%%,*}" \
    --scenario "$scenario" --out "$results" "$@" >/dev/null 2>"$out/last-run.log" || { echo "  (run failed; see $out/last-run.log)" >&2; tail -3 "$out/last-run.log" >&2; }
  stop_nodes
}

run() { # target scenario args...  (NODE_ARGS: extra thinws arguments; LABEL: the result's label)
  local target=$1 scenario=$2; shift 2
  local protocol=thinws; [ "$target" = thinws ] || protocol=socketio
  # shellcheck disable=SC2086
  start_nodes "$target" ${NODE_ARGS:-}
  echo "$target $scenario ${NODE_ARGS:-} $*" >&2
  "$loadgen" run --target "$protocol" --label "${LABEL:-$target}" --nodes "$nodes" --pids "$node_pids" \
    --scenario "$scenario" --out "$results" "$@" >/dev/null 2>"$out/last-run.log" || { echo "  (run failed; see $out/last-run.log)" >&2; tail -3 "$out/last-run.log" >&2; }
  stop_nodes
}

for target in $targets; do
  for scenario in $scenarios; do
    case $scenario in
      fanout) run "$target" fanout --subscribers 1000 --messages 2000 --window 64 ;;
      rooms) run "$target" rooms --subscribers 1000 --messages 200 --window 16 ;;
      # The same, with every room keeping a history (thinws only).
      fanout-history) [ "$target" = thinws ] && NODE_ARGS="--history-size 1000" LABEL=thinws-history \
        run "$target" fanout --subscribers 1000 --messages 2000 --window 64 ;;
      rooms-history) [ "$target" = thinws ] && NODE_ARGS="--history-size 1000" LABEL=thinws-history \
        run "$target" rooms --subscribers 1000 --messages 200 --window 16 ;;
      # 1,000 subscribers come back after 1,000 messages and each recovers them all.
      recovery) [ "$target" = thinws ] && NODE_ARGS="--history-size 1000" LABEL=thinws-history \
        run "$target" recovery --subscribers 1000 --messages 1000 --window 64 ;;
      # The same with presence and join/leave events on every room (thinws only): a message
      # costs nothing more.
      fanout-presence) [ "$target" = thinws ] && NODE_ARGS="--join-leave" LABEL=thinws-presence \
        run "$target" fanout --subscribers 1000 --messages 2000 --window 64 ;;
      rooms-presence) [ "$target" = thinws ] && NODE_ARGS="--join-leave" LABEL=thinws-presence \
        run "$target" rooms --subscribers 1000 --messages 200 --window 16 ;;
      # The same on a 3-master Redis Cluster: rooms' channels sharded (thinws only).
      fanout-cluster) [ "$target" = thinws ] && { start_cluster; CLUSTER=1 LABEL=thinws-cluster \
        run "$target" fanout --subscribers 1000 --messages 2000 --window 64; } ;;
      rooms-cluster) [ "$target" = thinws ] && { start_cluster; CLUSTER=1 LABEL=thinws-cluster \
        run "$target" rooms --subscribers 1000 --messages 200 --window 16; } ;;
      # 1,000 sockets join one room with join/leave events at once.
      join-burst) [ "$target" = thinws ] && NODE_ARGS="--join-leave" LABEL=thinws-join-leave \
        run "$target" join-burst --subscribers 1000 --redis-port "$redis_port" ;;
      latency) run "$target" latency --subscribers 1000 --messages 2000 --rate 200 ;;
      idle) run "$target" idle --subscribers 10000 ;;
      chart)
        run "$target" fanout --subscribers 100 --messages 2000 --window 64
        run "$target" fanout --subscribers 5000 --messages 400 --window 64 ;;
    esac
  done
done
if [[ " $targets " == *" thinws "* && " $scenarios " == *" idle "* ]]; then
  # As many idle sockets on one node as the descriptor limit allows (50,000 is the target):
  # the node keeps 1,024 descriptors for connections still upgrading
  # (--max-pending-connections) and 64 for itself, and answers 503 past the rest.
  big=$(( $(ulimit -n) - 1024 - 64 )); (( big > 50000 )) && big=50000
  run_one_node thinws idle --subscribers "$big"
fi

"$loadgen" table "$results" | tee "$out/table.md"
if [[ " $scenarios " == *" chart "* ]]; then
  "$loadgen" chart "$results" "$out/fanout.svg" >&2
fi
