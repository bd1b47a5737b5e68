#!/usr/bin/env bash
# Idle memory of a node: starts the release `tollgate` as (1) a single bootstrapped node
# and (2) a 3-node cluster on loopback, with docs/examples/cluster-spec.yaml, lets them sit
# idle, and reports each process's resident memory from /proc (VmRSS, anonymous, file-backed,
# transparent huge pages) and thread count. Target: an idle node under 30 MB RSS.
#
#   benches/idle_rss.sh [IDLE_SECONDS]      (default 10; builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${1:-10}
cargo build --release --quiet -p tollgate --bin tollgate
BIN=$PWD/target/release/tollgate
WORK=$(mktemp -d /tmp/tollgate-idle-rss.XXXXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

node() { # id, extra args...
  local id=$1; shift
  "$BIN" node --id "$id" --data-dir "$WORK/n$id" --access-log off \
    --grpc-addr "127.0.0.1:2707$id" --proxy-addr "127.0.0.1:2808$id" \
    --admin-addr "127.0.0.1:2908$id" "$@" 2> "$WORK/n$id.log" &
  PIDS+=($!)
}
ready() { curl -sf --retry 30 --retry-connrefused --retry-delay 1 -o /dev/null "http://127.0.0.1:2908$1/readyz"; }
report() { # label, pid
  local s; s=/proc/$2/status
  printf '%-28s %8s %8s %8s %8s %7s\n' "$1" \
    "$(awk '/^VmRSS/{print $2}' "$s")" "$(awk '/^RssAnon/{print $2}' "$s")" \
    "$(awk '/^RssFile/{print $2}' "$s")" "$(awk '/^AnonHugePages/{print $2}' /proc/$2/smaps_rollup)" \
    "$(awk '/^Threads/{print $2}' "$s")"
}

echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)   idle: ${IDLE}s   $(git rev-parse --short HEAD)"
printf '%-28s %8s %8s %8s %8s %7s\n' process "RSS kB" "anon kB" "file kB" "THP kB" threads

node 1 --bootstrap --spec docs/examples/cluster-spec.yaml
ready 1; sleep "$IDLE"
report "single node" "${PIDS[0]}"
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
rm -rf "$WORK"/n1

node 1 --bootstrap --spec docs/examples/cluster-spec.yaml
ready 1
node 2 --join 127.0.0.1:27071
node 3 --join 127.0.0.1:27071
ready 2; ready 3; sleep "$IDLE"
for i in 0 1 2; do report "3-node cluster, node $((i + 1))" "${PIDS[$i]}"; done
