#!/usr/bin/env bash
# Upgrade test: a data directory made by an older Tollgate (before node identity and sealed
# secrets) goes through the steps of docs/security.md ("Upgrading a data directory from
# before node identity") and keeps its tenants, APIs and keys. Everything listens on
# 127.0.0.1; every wait is bounded.
#
#   tests/upgrade_from.sh 0ab0ef1        # the last commit before node identity
#
# REV is built in a worktree under $UPGRADE_WORK (its own target dir, kept between runs)
# unless OLD_BIN names a binary built from it; NEW_BIN defaults to this checkout's debug
# build.
set -euo pipefail
REV=${1:-0ab0ef1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export UPGRADE_WORK=${UPGRADE_WORK:-${TMPDIR:-/tmp}/tollgate-upgrade}
mkdir -p "$UPGRADE_WORK"

if [[ -n ${OLD_BIN:-} ]]; then
  OLD=$OLD_BIN
else
  TREE=$UPGRADE_WORK/rev-$REV
  [[ -d $TREE ]] || git -C "$ROOT" worktree add -f "$TREE" "$REV"
  (cd "$TREE" && CARGO_TARGET_DIR=$UPGRADE_WORK/rev-target cargo build --bin tollgate)
  OLD=$UPGRADE_WORK/rev-target/debug/tollgate
fi
if [[ -n ${NEW_BIN:-} ]]; then
  NEW=$NEW_BIN
else
  (cd "$ROOT" && cargo build --bin tollgate)
  NEW=$ROOT/target/debug/tollgate
fi

RUN=$(mktemp -d "$UPGRADE_WORK/run.XXXXXX")
D=$RUN/data
P=28180 G=27170 A=27171 CP=27180 ECHO=27190
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$RUN"/*.log; do echo "== $f"; tail -20 "$f"; done; exit 1; }
step() { echo "== $*"; }

wait_port() { # PORT: until something listens, 30 s at most
  for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done
  fail "nothing listens on port $1"
}
wait_log() { # FILE TEXT: until the log says it, 30 s at most
  for _ in $(seq 300); do grep -q -- "$2" "$1" 2>/dev/null && return; sleep 0.1; done
  fail "$1 never said: $2"
}
stop() { # PID: SIGTERM and wait, 30 s at most
  kill -TERM "$1"
  for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  fail "process $1 did not stop"
}
status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }
node() { # BIN LOG ARGS...: a node on the fixed ports, its pid in NODE_PID
  local bin=$1 log=$2; shift 2
  "$bin" node --id 1 --data-dir "$D" --proxy-addr 127.0.0.1:$P --grpc-addr 127.0.0.1:$G \
    --admin-addr 127.0.0.1:$A --access-log off "$@" >"$RUN/$log" 2>&1 &
  NODE_PID=$!; PIDS+=("$NODE_PID")
  wait_port $P; wait_port $G
}

"$NEW" echo --listen 127.0.0.1:$ECHO >"$RUN/echo.log" 2>&1 &
PIDS+=($!)
wait_port $ECHO
cat >"$RUN/orders-v1.yaml" <<YAML
upstreams:
  orders:
    endpoints:
      - address: 127.0.0.1:$ECHO
routes:
  hello:
    match:
      path: { prefix: /hello }
    upstream: orders
YAML

step "the old version ($REV) makes a cluster with a tenant, an API and a key"
node "$OLD" old-node.log --bootstrap
wait_log "$D/operator-token" "tg"
export TOLLGATE_TOKEN
TOLLGATE_TOKEN=$(cat "$D/operator-token")
"$OLD" cp --listen 127.0.0.1:$CP --nodes 127.0.0.1:$G >"$RUN/old-cp.log" 2>&1 &
CP_PID=$!; PIDS+=("$CP_PID")
wait_port $CP
export TOLLGATE_CP=127.0.0.1:$CP
"$OLD" tenant create acme >/dev/null
"$OLD" api create orders --tenant acme --base-path /orders >/dev/null
"$OLD" version create orders 1.0.0 -f "$RUN/orders-v1.yaml" >/dev/null
"$OLD" version publish orders 1.0.0 >/dev/null
"$OLD" api promote orders 1.0.0 >/dev/null
KEY=$("$OLD" key create --tenant acme --quiet)
[[ $(status "http://127.0.0.1:$P/orders/v1/hello" -H "x-api-key: $KEY") == 200 ]] || fail "the old cluster does not serve the key"
stop "$CP_PID"; stop "$NODE_PID"

step "the new version without a sealing key stops and says what to do"
rc=0; timeout 30 "$NEW" node --id 1 --data-dir "$D" --proxy-addr 127.0.0.1:$P --grpc-addr 127.0.0.1:$G \
  --admin-addr 127.0.0.1:$A --access-log off >"$RUN/no-key.log" 2>&1 || rc=$?
[[ $rc != 0 && $rc != 124 ]] || fail "a node of an old cluster without a sealing key did not stop (exit $rc)"
grep -q "sealing key" "$RUN/no-key.log" || fail "its message does not mention the sealing key"

step "step 1: one sealing key"
"$NEW" secret keygen >"$RUN/sealing-key"

step "step 2: start once with --insecure-cluster: the leader makes the CA and seals the hash key"
node "$NEW" insecure-node.log --insecure-cluster --sealing-key-file "$RUN/sealing-key"
wait_log "$RUN/insecure-node.log" "made the cluster CA"
wait_log "$RUN/insecure-node.log" "sealed the cluster's hash key"
# This version's API uses a loopback upstream, which tenants' versions may no longer reach
# unless the cluster's spec allows it (docs/security.md, "Tenant upstreams").
wait_log "$RUN/insecure-node.log" "is a loopback address"
printf 'tenant_upstreams:\n  allow: ["127.0.0.0/8"]\n' >"$RUN/allow.yaml"
"$NEW" apply --insecure -f "$RUN/allow.yaml" --node 127.0.0.1:$G >/dev/null || fail "apply tenant_upstreams"
for _ in $(seq 50); do
  [[ $(status "http://127.0.0.1:$P/orders/v1/hello" -H "x-api-key: $KEY") == 200 ]] && break; sleep 0.1
done
[[ $(status "http://127.0.0.1:$P/orders/v1/hello" -H "x-api-key: $KEY") == 200 ]] || fail "the key made by the old version no longer works"
stop "$NODE_PID"

step "step 3: restart without --insecure-cluster: mutual TLS from now on"
node "$NEW" secure-node.log --sealing-key-file "$RUN/sealing-key"
wait_log "$RUN/secure-node.log" "issued this node's certificate"
[[ -s $D/cluster-ca.pem ]] || fail "no $D/cluster-ca.pem"
export TOLLGATE_CA=$D/cluster-ca.pem TOLLGATE_NODE=127.0.0.1:$G
[[ $(status "http://127.0.0.1:$P/orders/v1/hello" -H "x-api-key: $KEY") == 200 ]] || fail "the old key does not work on the secure cluster"
"$NEW" cluster status >/dev/null || fail "the CLI cannot reach the node over TLS"
"$NEW" cluster status --insecure >/dev/null 2>&1 && fail "the node still answers plain gRPC"

step "a control plane enrolls with a join token; the CLI manages the upgraded state through it"
JT=$("$NEW" cluster join-token create --uses 1)
"$NEW" cp --listen 127.0.0.1:$CP --nodes 127.0.0.1:$G --join-token "$JT" >"$RUN/cp.log" 2>&1 &
PIDS+=($!)
wait_port $CP
"$NEW" api list | grep -q orders || fail "the API made by the old version is not listed"
KEY2=$("$NEW" key create --tenant acme --quiet)
[[ $(status "http://127.0.0.1:$P/orders/v1/hello" -H "x-api-key: $KEY2") == 200 ]] || fail "a new key does not work"
[[ $(status "http://127.0.0.1:$P/orders/v1/hello" -H "x-api-key: $KEY") == 200 ]] || fail "the old key stopped working"
[[ $(status "http://127.0.0.1:$P/orders/v1/hello") == 401 ]] || fail "no key is not refused"

echo "PASS: the data directory of $REV upgraded by the documented steps (logs in $RUN)"
