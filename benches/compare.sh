#!/usr/bin/env bash
# Side-by-side benchmark of progress-gateway, nginx and Varnish (see
# benches/compare.rs). Installs nginx, Varnish and wrk from Debian's packages when
# they are missing, builds the gateway, then runs the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v varnishd >/dev/null || missing+=(varnish)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
# Debian starts the packaged services on install; this benchmark runs its own.
for service in nginx varnish; do
  (systemctl stop "$service" 2>/dev/null || service "$service" stop 2>/dev/null) >/dev/null || true
done
cargo build --release --bin progress-gateway
# The gateway runs with its default logging (to a file); see benches/compare.rs.
cargo bench --bench compare
