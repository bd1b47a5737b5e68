#!/usr/bin/env bash
# Quota benchmarks (benches/quotas.rs) with the central-counter comparison: starts a
# Redis on loopback (Debian's redis-server, installed if missing), runs the bench, stops it.
#   benches/quotas.sh [--windows 30]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${REDIS_PORT:-6399}
if ! command -v redis-server >/dev/null; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
DIR=$(mktemp -d)
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log"
trap 'kill "$(cat "$DIR/redis.pid")" 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
cargo bench --bench quotas -- --redis-port "$PORT" "$@"
