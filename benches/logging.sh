#!/usr/bin/env bash
# What the access log costs: cache hits on a finished job with wrk (1 thread,
# 64 connections, 5 s), the release gateway pinned to CPU 0 and wrk to CPU 1,
# at RUST_LOG=info (its log to a file, as users run it) and at RUST_LOG=off,
# alternating over three rounds. Installs wrk from Debian's packages if missing.
# Everything it starts it stops; its files live in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
cargo build --release --bin progress-gateway -q
bin="$PWD/target/release/progress-gateway"
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

# Waits for "<prefix>http://ADDR" on stdout file $1; prints ADDR.
address() {
  for _ in $(seq 100); do
    grep -o "$2http://[0-9.:]*" "$1" 2>/dev/null | head -1 | sed "s|$2http://||" && return
    sleep 0.05
  done
  echo "no address in $1" >&2; exit 1
}

echo bench-token > "$dir/token"
PGW_T=bench-token "$bin" simulate --listen 127.0.0.1:0 --token-env PGW_T > "$dir/sim.out" 2>/dev/null &
pids+=($!)
sim=$(address "$dir/sim.out" "on ")
cat > "$dir/gateway.toml" <<EOT
listen = "127.0.0.1:0"
[admin]
listen = ""
[regions.sim]
drs = "http://$sim"
roma = "http://$sim"
[credentials.main]
kind = "token"
token_file = "$dir/token"
[[projects]]
id = "0123456789abcdef0123456789abcdef"
region = "sim"
credential = "main"
EOT
for round in 1 2 3; do
  for level in info off; do
    RUST_LOG=$level taskset -c 0 "$bin" serve --config "$dir/gateway.toml" > "$dir/gw.out" 2> "$dir/gw-$level.log" &
    gw=$!
    addr=$(address "$dir/gw.out" "proxy=")
    url="http://$addr/v2/0123456789abcdef0123456789abcdef/instances/i/assets/jobs/hot_d0"
    curl -s "$url" > /dev/null
    echo "round $round, RUST_LOG=$level: $(taskset -c 1 wrk -t1 -c64 -d5s "$url" | grep Requests/sec)"
    kill "$gw"; wait "$gw" 2>/dev/null || true
  done
done
