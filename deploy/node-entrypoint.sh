#!/bin/sh
# The node image's entrypoint: a node's id and role come from its host name, as in a
# Kubernetes StatefulSet (tollgate-0, tollgate-1, ...) or the compose file.
#   tollgate-N  ->  --id N+1; tollgate-0 bootstraps the cluster, the others join it
#                   through $TOLLGATE_SEED (the first node's gRPC address).
# It advertises HOSTNAME[.TOLLGATE_PEER_DOMAIN]:7070, a DNS name that survives restarts
# on a new IP. Any arguments are passed to tollgate-node. A node that already has a
# cluster in its data directory ignores --bootstrap and re-asks to join (harmless).
set -eu
host=${TOLLGATE_HOSTNAME:-$(hostname)}
ordinal=${host##*-}
case $ordinal in
  ''|*[!0-9]*) echo "tollgate-entrypoint: host name $host does not end in -N (set TOLLGATE_HOSTNAME)" >&2; exit 2 ;;
esac
export TOLLGATE_ID=${TOLLGATE_ID:-$((ordinal + 1))}
export TOLLGATE_ADVERTISE_ADDR=${TOLLGATE_ADVERTISE_ADDR:-$host${TOLLGATE_PEER_DOMAIN:+.$TOLLGATE_PEER_DOMAIN}:${TOLLGATE_GRPC_PORT:-7070}}
if [ "$ordinal" = 0 ]; then
  exec /bin/tollgate-node --bootstrap "$@"
fi
exec /bin/tollgate-node --join "${TOLLGATE_SEED:?set TOLLGATE_SEED to the first node gRPC address, e.g. tollgate-0:7070}" "$@"
