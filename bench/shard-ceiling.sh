#!/usr/bin/env bash
# The publish ceiling of one Redis shard: redis-benchmark against a private redis-server
# (one process is what a Cluster shard is), PUBLISH and SPUBLISH of a 120-byte frame (the
# size of a delivered thinws message), one at a time and pipelined by 16, with no
# subscriber and with 2 (two thinws nodes subscribed to the room). Prints requests/s.
#
#   bench/shard-ceiling.sh
set -euo pipefail
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
server=$!
subs=()
trap 'kill "$server" "${subs[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
frame='{"type":"message","roomID":"lobby","connectionID":"alice","payload":{"s":1,"t":1,"f":1,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}'
one() { # label command pipeline
  local rps
  rps=$(redis-benchmark -p "$port" -n 300000 -c 50 -P "$3" -q "$2" 'thinws:room:{lobby}' "$frame" 2>/dev/null \
        | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1)
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "${rps% requests per second}"
}
echo "| subscribers | command | pipeline | requests/s |"
echo "| ---: | --- | ---: | ---: |"
for cmd in PUBLISH SPUBLISH; do one 0 "$cmd" 1; one 0 "$cmd" 16; done
redis-cli -p "$port" subscribe 'thinws:room:{lobby}' >/dev/null & subs+=($!)
redis-cli -p "$port" subscribe 'thinws:room:{lobby}' >/dev/null & subs+=($!)
redis-cli -p "$port" ssubscribe 'thinws:room:{lobby}' >/dev/null & subs+=($!)
redis-cli -p "$port" ssubscribe 'thinws:room:{lobby}' >/dev/null & subs+=($!)
sleep 0.3
for cmd in PUBLISH SPUBLISH; do one 2 "$cmd" 1; one 2 "$cmd" 16; done
