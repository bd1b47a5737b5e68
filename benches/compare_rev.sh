#!/usr/bin/env bash
# Data-plane regression check: this checkout's `tollgate` against an earlier revision's,
# beside nginx, in the same interleaved run (benches/baseline/http_bench.py). Everything
# listens on 127.0.0.1; every wrk run is bounded in time.
#
#   benches/compare_rev.sh REV                 # e.g. 0240937 (the end of issue 2)
#   ROUNDS=3 DURATION=5 benches/compare_rev.sh REV
#   H2_ROUNDS=5 benches/compare_rev.sh REV     # also HTTP/2 with h2load, interleaved
#
# REV is built in a worktree under $BASELINE_WORK (its own target dir, kept between runs),
# unless OLD_BIN names a binary already built from it.
# A revision from before the Raft cluster takes --spec alone; a later one needs --bootstrap
# and a data dir, which this script gives when the binary knows the flag.
set -euo pipefail
REV=${1:?usage: benches/compare_rev.sh REV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The peer scripts: benches/baseline, or BASELINE=DIR (SHARED=DIR, the older form, means DIR/baseline).
BASE=${BASELINE:-${SHARED:+$SHARED/baseline}}
BASE=${BASE:-$ROOT/benches/baseline}
export BASELINE_WORK=${BASELINE_WORK:-${TMPDIR:-/tmp}/tollgate-baseline}
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5}
TAG=${TAG:-compare-$REV-$(date +%Y%m%d-%H%M%S)}
WORK=$BASELINE_WORK/compare; mkdir -p "$WORK"

need=(); for t in nginx haproxy wrk; do command -v $t >/dev/null || need+=($t); done
if ((${#need[@]})); then
  echo "installing ${need[*]}"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build --release --bin tollgate)
NEW=$ROOT/target/release/tollgate
if [[ -n ${OLD_BIN:-} ]]; then
  OLD=$OLD_BIN   # already built from REV
else
  OLD_TREE=$BASELINE_WORK/rev-$REV
  if [[ ! -d $OLD_TREE ]]; then git -C "$ROOT" worktree add -f "$OLD_TREE" "$REV"; fi
  (cd "$OLD_TREE" && CARGO_TARGET_DIR=$BASELINE_WORK/rev-target cargo build --release --bin tollgate)
  OLD=$BASELINE_WORK/rev-target/release/tollgate
fi

cat > "$WORK/spec.yaml" <<YAML
upstreams:
  origin:
    endpoints:
      - address: 127.0.0.1:18080
routes:
  all:
    match:
      path: { prefix: / }
    upstream: origin
YAML

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  "$BASE/http_peers.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$BASE/http_peers.sh" start

start() { # NAME BIN PORT ADMIN GRPC
  local name=$1 bin=$2 port=$3 admin=$4 grpc=$5 cluster=()
  rm -rf "$WORK/$name.data" "$WORK/$name.addrs.json"
  if "$bin" node --help | grep -q -- --bootstrap; then
    cluster=(--bootstrap --data-dir "$WORK/$name.data")
  fi
  "$bin" node "${cluster[@]}" --spec "$WORK/spec.yaml" --proxy-addr 127.0.0.1:$port \
    --admin-addr 127.0.0.1:$admin --grpc-addr 127.0.0.1:$grpc --access-log off \
    --addr-file "$WORK/$name.addrs.json" --log-format json >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -s $WORK/$name.addrs.json ]] && return; sleep 0.1; done
  echo "node $name did not start"; cat "$WORK/$name.log"; exit 1
}
start tollgate-old "$OLD" 18086 17077 17076
OLD_PID=${PIDS[0]}
start tollgate-new "$NEW" 18087 17079 17078
NEW_PID=${PIDS[1]}

NGINX_PID=$(cat "$BASELINE_WORK/run/nginx-proxy.pid")
python3 "$BASE/http_bench.py" --only \
  --target nginx=http://127.0.0.1:18081 \
  --target tollgate-old=http://127.0.0.1:18086 \
  --target tollgate-new=http://127.0.0.1:18087 \
  --baseline tollgate-old --cpu nginx="$NGINX_PID" --cpu tollgate-old="$OLD_PID" --cpu tollgate-new="$NEW_PID" \
  --rounds "$ROUNDS" --duration "$DURATION" --tag "$TAG" \
  --note "tollgate-old: $REV; tollgate-new: $(git -C "$ROOT" rev-parse --short HEAD)"
echo "summary: $BASELINE_WORK/out/http-$TAG/summary.md"

# HTTP/2 (h2c, prior knowledge) with h2load: H2_ROUNDS interleaved rounds of H2_SECS
# seconds per binary, order alternating; the median of per-round new/old ratios.
H2_ROUNDS=${H2_ROUNDS:-0}; H2_SECS=${H2_SECS:-5}
if ((H2_ROUNDS > 0)); then
  command -v h2load >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
  ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user+sys CPU, in clock ticks
  h2rate() { # URL PID: "requests/s CPU-µs-per-request" over H2_SECS s, 16 connections x 32 streams
    local before after out
    before=$(ticks "$2")
    out=$(h2load -t 2 -c 16 -m 32 -D "$H2_SECS" --warm-up-time 1 "$1" 2>/dev/null)
    after=$(ticks "$2")
    awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" '
      /^finished in/ { gsub(",", "", $4); rps = $4 }
      /^requests:/ { done = $6 }
      END { printf "%s %.1f\n", rps, t / hz * 1e6 / (done > 0 ? done : 1) }' <<<"$out"
  }
  ratios=(); cpu_ratios=()
  for r in $(seq "$H2_ROUNDS"); do
    if ((r % 2)); then old=$(h2rate http://127.0.0.1:18086/ "$OLD_PID"); sleep 1; new=$(h2rate http://127.0.0.1:18087/ "$NEW_PID")
    else new=$(h2rate http://127.0.0.1:18087/ "$NEW_PID"); sleep 1; old=$(h2rate http://127.0.0.1:18086/ "$OLD_PID"); fi
    read -r old_rps old_cpu <<<"$old"; read -r new_rps new_cpu <<<"$new"
    ratio=$(python3 -c "print(f'{$new_rps / $old_rps:.3f}')")
    cpu_ratio=$(python3 -c "print(f'{$new_cpu / $old_cpu:.3f}')")
    echo "h2 round $r: old $old_rps req/s ${old_cpu} µs CPU/req, new $new_rps req/s ${new_cpu} µs CPU/req; new/old req/s $ratio, CPU/req $cpu_ratio"
    ratios+=("$ratio"); cpu_ratios+=("$cpu_ratio"); sleep 1
  done
  median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
  echo "h2 median new/old: req/s $(median "${ratios[@]}"), CPU per request $(median "${cpu_ratios[@]}")"
fi
