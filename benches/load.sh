#!/usr/bin/env bash
# Load comparison: Tollgate vs nginx (reverse proxy) vs direct, same origin, interleaved
# rounds, using the baseline peer scripts in benches/baseline (BASELINE=DIR to use another
# copy). Also measures the RSS of an idle node. Everything listens on 127.0.0.1 only; every
# wrk run is bounded in time.
#
#   benches/load.sh                    # 5 rounds x 10 s, paths / and /4k, 64 and 8 connections
#   ROUNDS=3 DURATION=5 benches/load.sh
#   ACCESS_LOG=stdout benches/load.sh  # with Tollgate's access log on (nginx's is off)
#
# Contenders: direct (the origin itself), nginx (reverse proxy, keepalive upstream),
# tollgate-normal (--cpu-scheduling normal), tollgate-batch (--cpu-scheduling batch, the
# default) and tollgate-api (batch, the origin served as an API with a 50/50 version split).
#
# Output: a summary table (markdown) under $BASELINE_WORK/out/http-<tag>/summary.md, and the
# idle RSS figure on stdout. Needs: nginx haproxy wrk (installed with apt-get when missing).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The peer scripts: benches/baseline, or BASELINE=DIR (SHARED=DIR, the older form, means DIR/baseline).
BASE=${BASELINE:-${SHARED:+$SHARED/baseline}}
BASE=${BASE:-$ROOT/benches/baseline}
export BASELINE_WORK=${BASELINE_WORK:-${TMPDIR:-/tmp}/tollgate-baseline}
ROUNDS=${ROUNDS:-5}; DURATION=${DURATION:-10}; ACCESS_LOG=${ACCESS_LOG:-off}
TAG=${TAG:-tollgate-$(date +%Y%m%d-%H%M%S)}
WORK=$BASELINE_WORK/tollgate; mkdir -p "$WORK"

need=(); for t in nginx haproxy wrk; do command -v $t >/dev/null || need+=($t); done
if ((${#need[@]})); then
  echo "installing ${need[*]}"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build --release --bin tollgate)
BIN=$ROOT/target/release/tollgate

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

cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  "$BASE/http_peers.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

PIDS=()
"$BASE/http_peers.sh" start

start_node() { # NAME PORT ADMIN GRPC EXTRA...
  local name=$1 port=$2 admin=$3 grpc=$4; shift 4
  rm -f "$WORK/$name.addrs.json"; rm -rf "$WORK/$name.data"
  "$BIN" node --bootstrap --data-dir "$WORK/$name.data" --spec "$WORK/spec.yaml" --proxy-addr 127.0.0.1:$port \
    --admin-addr 127.0.0.1:$admin --grpc-addr 127.0.0.1:$grpc \
    --access-log "$ACCESS_LOG" --addr-file "$WORK/$name.addrs.json" --log-format json "$@" \
    >"$WORK/$name.access.log" 2>"$WORK/$name.log" &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -s $WORK/$name.addrs.json ]] && return; sleep 0.1; done
  echo "node $name did not start"; cat "$WORK/$name.log"; exit 1
}
start_node tollgate-normal 18083 17071 17070 --cpu-scheduling normal
NODE_PID=${PIDS[0]}
start_node tollgate-batch 18084 17073 17072 --cpu-scheduling batch
BATCH_PID=${PIDS[1]}
# The same, serving the origin as an API (mounted at /api, auth none: wrk sends no
# headers) with a 50/50 split between two published versions: the API stages' cost.
start_node tollgate-api 18085 17075 17074 --cpu-scheduling batch
API_PID=${PIDS[2]}
cat > "$WORK/api.yaml" <<YAML
tenants:
  bench: {}
apis:
  origin:
    tenant: bench
    base_path: /api
    auth: none
    versions:
      1.0.0: { stage: published, spec: { upstreams: { o: { endpoints: [{ address: "127.0.0.1:18080" }] } }, routes: { all: { match: { path: { prefix: / } }, upstream: o } } } }
      2.0.0: { stage: published, spec: { upstreams: { o: { endpoints: [{ address: "127.0.0.1:18080" }] } }, routes: { all: { match: { path: { prefix: / } }, upstream: o } } } }
    split: { 1.0.0: 50, 2.0.0: 50 }
YAML
"$BIN" apply -f "$WORK/api.yaml" --node 127.0.0.1:17074 --token "$(cat "$WORK/tollgate-api.data/operator-token")" >/dev/null
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:18085/api/ && break; sleep 0.1; done

# Idle memory: the first node after a few requests and a second of rest.
for _ in $(seq 20); do curl -s -o /dev/null http://127.0.0.1:18083/; done
sleep 1
IDLE_RSS_KB=$(awk '/VmRSS/ {print $2}' /proc/$NODE_PID/status)
echo "idle node RSS: $((IDLE_RSS_KB / 1024)) MB ($IDLE_RSS_KB kB)"

NGINX_PID=$(cat "$BASELINE_WORK/run/nginx-proxy.pid")
python3 "$BASE/http_bench.py" --only \
  --target direct=http://127.0.0.1:18080 \
  --target nginx=http://127.0.0.1:18081 \
  --target tollgate-normal=http://127.0.0.1:18083 \
  --target tollgate-batch=http://127.0.0.1:18084 \
  --target tollgate-api=http://127.0.0.1:18085/api \
  --baseline nginx --cpu nginx="$NGINX_PID" --cpu tollgate-normal="$NODE_PID" --cpu tollgate-batch="$BATCH_PID" --cpu tollgate-api="$API_PID" \
  --rounds "$ROUNDS" --duration "$DURATION" --tag "$TAG" \
  --note "tollgate: $(nproc) data-plane threads, access log $ACCESS_LOG; idle RSS $((IDLE_RSS_KB / 1024)) MB"
echo "summary: $BASELINE_WORK/out/http-$TAG/summary.md"
