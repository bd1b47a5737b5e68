#!/bin/sh
# The node image's entrypoint. Two roles:
#
# Voters (the default), as in a Kubernetes StatefulSet (tollgate-0, tollgate-1, ...) or the
# compose file: a node's id comes from its host name.
#   tollgate-N  ->  --id N+1; tollgate-0 bootstraps the cluster, the others join it
#                   through $TOLLGATE_SEED (the first node's gRPC address).
#   It advertises HOSTNAME[.TOLLGATE_PEER_DOMAIN]:7070, a DNS name that survives restarts
#   on a new IP.
#
# Learners (TOLLGATE_ROLE=learner), as in a Deployment an autoscaler sizes: any host name.
#   The id is random (above 1,000,000, clear of the voters') and kept in the data
#   directory, so a container restarted in the same pod comes back as the same node; a new
#   pod is a new node. It joins through $TOLLGATE_SEED and advertises $TOLLGATE_ADVERTISE_ADDR
#   (the pod's IP, from the downward API) or its host name. With more voters than the
#   cluster's --voters it stays a learner, and leaves the membership when it stops.
#
# Any arguments are passed to tollgate-node. A node that already has a cluster in its data
# directory ignores --bootstrap and re-asks to join (harmless).
set -eu
host=${TOLLGATE_HOSTNAME:-$(hostname)}
port=${TOLLGATE_GRPC_PORT:-7070}
need_seed() { : "${TOLLGATE_SEED:?set TOLLGATE_SEED to the first node gRPC address, e.g. tollgate-0:7070}"; }
if [ "${TOLLGATE_ROLE:-voter}" = learner ]; then
  data=${TOLLGATE_DATA_DIR:-/data}
  if [ -z "${TOLLGATE_ID:-}" ]; then
    if [ ! -s "$data/node-id" ]; then
      mkdir -p "$data"
      # 40 random bits, offset past the voters' ordinals.
      n=$(od -An -N5 -tu8 /dev/urandom | tr -d ' ')
      echo $((1000000 + n)) > "$data/node-id.tmp" && mv "$data/node-id.tmp" "$data/node-id"
    fi
    TOLLGATE_ID=$(cat "$data/node-id")
    export TOLLGATE_ID
  fi
  export TOLLGATE_ADVERTISE_ADDR=${TOLLGATE_ADVERTISE_ADDR:-$host:$port}
  need_seed
  exec /bin/tollgate-node --join "$TOLLGATE_SEED" "$@"
fi
ordinal=${host##*-}
case $ordinal in
  ''|*[!0-9]*) echo "tollgate-entrypoint: host name $host does not end in -N (set TOLLGATE_HOSTNAME, or TOLLGATE_ROLE=learner)" >&2; exit 2 ;;
esac
export TOLLGATE_ID=${TOLLGATE_ID:-$((ordinal + 1))}
export TOLLGATE_ADVERTISE_ADDR=${TOLLGATE_ADVERTISE_ADDR:-$host${TOLLGATE_PEER_DOMAIN:+.$TOLLGATE_PEER_DOMAIN}:$port}
if [ "$ordinal" = 0 ]; then
  exec /bin/tollgate-node --bootstrap "$@"
fi
need_seed
exec /bin/tollgate-node --join "$TOLLGATE_SEED" "$@"
