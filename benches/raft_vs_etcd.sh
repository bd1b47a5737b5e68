#!/usr/bin/env bash
# Tollgate's 3-node Raft cluster beside a 3-member etcd on the same machine, same run:
# sequential write latency (our apply vs etcd put, 256-byte payload, via the leader and
# via a follower) and failover after kill -9 of the leader.
#
#   benches/raft_vs_etcd.sh              # ROUNDS=2 N=500 ITER=5
#
# Latency runs alternate etcd / Tollgate ROUNDS times so machine noise hits both alike.
# Needs: etcd-server etcd-client (apt), python3-venv; installs them when missing.
# Writes the tables to out/raft-vs-etcd-<time>.md. Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
# The etcd scripts: benches/baseline, or BASELINE=DIR.
BASE=$(cd "${BASELINE:-benches/baseline}" && pwd)
export BASELINE_WORK=${BASELINE_WORK:-${TMPDIR:-/tmp}/tollgate-baseline}
ROUNDS=${ROUNDS:-2}; N=${N:-500}; ITER=${ITER:-5}
PY=$BASELINE_WORK/venv/bin/python

if ! command -v etcd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
if ! [ -x "$PY" ] || ! "$PY" -c 'import grpc' 2>/dev/null; then
  python3 -m venv "$BASELINE_WORK/venv" && "$BASELINE_WORK/venv/bin/pip" install -q grpcio
fi
BIN=$(cargo bench --bench raft_cluster --no-run 2>&1 | grep -o 'target/release/deps/raft_cluster-[a-z0-9]*' | head -1)
[ -x "$BIN" ] || { echo "could not build the raft_cluster bench" >&2; exit 1; }

mkdir -p out
OUT=out/raft-vs-etcd-$(date +%Y%m%d-%H%M%S).md
say() { echo "$@" | tee -a "$OUT"; }
etcd_up() { (cd "$BASE" && ./etcd_cluster.sh wipe >/dev/null 2>&1 || true; ./etcd_cluster.sh start >/dev/null); }
etcd_down() { (cd "$BASE" && ./etcd_cluster.sh wipe >/dev/null 2>&1 || true); }
trap etcd_down EXIT
ETCD_ROOT=${ETCD_ROOT:-${TMPDIR:-/tmp}/tollgate-baseline/etcd}
etcd_cpu_ticks() {
  local t=0 i p
  for i in 1 2 3; do
    p=$(cat "$ETCD_ROOT/e$i.pid")
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}

say "# Tollgate Raft vs etcd, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
say ""
say "Command: \`benches/raft_vs_etcd.sh\` (ROUNDS=$ROUNDS N=$N ITER=$ITER)"
for r in $(seq 1 "$ROUNDS"); do
  say ""; say "## latency round $r"
  etcd_up
  before=$(etcd_cpu_ticks)
  (cd "$BASE" && "$PY" raft_bench.py latency --n "$N" --transport grpc --value-size 256 --via leader follower) \
    | grep '^|' | sed 's/^/etcd /' | tee -a "$OUT"
  after=$(etcd_cpu_ticks)
  # 2N puts plus 40 warm-up puts; ticks are 10 ms.
  say "etcd CPU (user+sys) of all 3 members per put: $(awk -v t=$((after - before)) -v n=$((2 * N + 40)) 'BEGIN { printf "%.2f ms", t * 10 / n }')"
  etcd_down
  "$BIN" latency --n "$N" | grep -E '^\| apply|^CPU' | sed 's/^/tollgate /' | tee -a "$OUT"
done

say ""; say "## failover (kill -9 of the leader)"
etcd_up
(cd "$BASE" && "$PY" raft_bench.py failover --iterations "$ITER") | grep -E '^\||median|first' | sed 's/^/etcd /' | tee -a "$OUT"
etcd_down
"$BIN" failover --iterations "$ITER" 2>/dev/null | grep '^| ' | sed 's/^/tollgate /' | tee -a "$OUT"

say ""; say "## propagation (ack -> served on every node)"
"$BIN" propagation --n 200 | grep '^| ack' | sed 's/^/tollgate /' | tee -a "$OUT"
echo "wrote $OUT"
