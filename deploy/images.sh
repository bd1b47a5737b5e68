#!/usr/bin/env bash
# Builds the container images from binaries built on this host. No base image is pulled:
# each image is FROM scratch with a root filesystem assembled here, holding the binary and
# exactly the shared libraries `ldd` says it loads.
#
#   deploy/images.sh            # release build, images tagged :local
#   TAG=v1 deploy/images.sh
#   deploy/images.sh wan        # only the named images (node cp rotel prometheus wan)
#
# Images: tollgate-node (tollgate-node, the tollgate CLI, busybox for the entrypoint
# script), tollgate-cp, tollgate-rotel (the rotel OTLP collector from PyPI) and
# tollgate-prometheus (Debian's prometheus package). deploy/test adds tollgate-wan (its
# delaying TCP relay between regions: deploy/check).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-local}
WANT=${*:-node cp rotel prometheus}
want() { case " $WANT " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
WORK=${WORK:-$PWD/target/deploy}
mkdir -p "$WORK/cache"

say() { echo "== $*"; }

# The host-built binaries.
if [ -z "${SKIP_CARGO:-}" ] && { want node || want cp; }; then
  say "cargo build --release (tollgate, tollgate-node, tollgate-cp)"
  cargo build --release -p tollgate --bin tollgate -p tollgate-node --bin tollgate-node -p tollgate-control-plane --bin tollgate-cp
fi
BIN=$PWD/target/release

# Debian packages we take files from: downloaded, unpacked, never installed.
deb() { # deb PACKAGE -> prints the unpacked directory
  local pkg=$1 dir=$WORK/cache/$1
  if [ ! -d "$dir" ]; then
    (cd "$WORK/cache" && { apt-get download "$pkg" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download "$pkg" >/dev/null; }; })
    mkdir -p "$dir" && dpkg-deb -x "$WORK/cache/${pkg}"_*.deb "$dir"
  fi
  echo "$dir"
}

# rootfs DIR BINARY... : a root filesystem with the binaries in /bin and their libraries.
rootfs() {
  local dir=$1; shift
  rm -rf "$dir" && mkdir -p "$dir"/{bin,etc,tmp} && chmod 1777 "$dir/tmp"
  for b in "$@"; do
    cp "$b" "$dir/bin/"
    # Release builds carry debug info (for profiling); images do not need it.
    strip --strip-debug "$dir/bin/$(basename "$b")" 2>/dev/null || true
    for lib in $( (ldd "$b" 2>/dev/null || true) | grep -o '/[^ ]*'); do  # none for a static binary
      mkdir -p "$dir$(dirname "$lib")" && cp -L "$lib" "$dir$lib"
    done
  done
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/data:/bin/false\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$dir/etc/group"
  # Root certificates, for webhooks and collectors over https.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$dir/etc/ssl/certs" && cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
  fi
}

# image NAME DIR ENTRYPOINT-JSON [WRITABLE-DIR...]: the writable directories (and /data)
# belong to nobody, which the process runs as (COPY makes everything else root's).
image() {
  local name=$1 dir=$2 entry=$3; shift 3
  rm -rf "$dir.ctx" && mkdir -p "$dir.ctx/writable" && mv "$dir" "$dir.ctx/rootfs"
  touch "$dir.ctx/writable/.keep"
  {
    echo "FROM scratch"
    echo "COPY rootfs/ /"
    for w in /data "$@"; do echo "COPY --chown=65534:65534 writable/ $w/"; done
    echo "USER 65534:65534"
    echo "WORKDIR /data"
    echo "ENTRYPOINT $entry"
  } > "$dir.Dockerfile"
  say "docker build $name:$TAG"
  # (its log only on failure: the legacy builder's deprecation notice is noise here)
  if ! docker build -t "$name:$TAG" -f "$dir.Dockerfile" "$dir.ctx" > "$dir.log" 2>&1; then
    cat "$dir.log"; exit 1
  fi
}

if want node; then
  # tollgate-node: the node, the CLI (tollgate echo, apply, cluster status from inside), and
  # busybox's sh for deploy/node-entrypoint.sh (id and role from the host name).
  BUSYBOX=$(deb busybox-static)/bin/busybox
  rootfs "$WORK/node" "$BIN/tollgate-node" "$BIN/tollgate" "$BUSYBOX"
  # od, tr, mkdir, mv: a learner's random id; kill, sleep: the learners' preStop hook.
  for applet in sh cat hostname ls od tr mkdir mv kill sleep; do ln -sf busybox "$WORK/node/bin/$applet"; done
  cp deploy/node-entrypoint.sh "$WORK/node/bin/tollgate-entrypoint"
  chmod 755 "$WORK/node/bin/tollgate-entrypoint"
  # /bootstrap: where compose's tollgate-0 leaves the bootstrap join token.
  image tollgate-node "$WORK/node" '["/bin/tollgate-entrypoint"]' /bootstrap
fi

if want cp; then
  rootfs "$WORK/cp" "$BIN/tollgate-cp"
  image tollgate-cp "$WORK/cp" '["/bin/tollgate-cp"]' /bootstrap
fi

if want rotel; then
  # rotel: the collector binary the PyPI wheel ships.
  ROTEL_VENV=$WORK/cache/rotel-venv
  if [ ! -x "$ROTEL_VENV/bin/pip" ]; then python3 -m venv "$ROTEL_VENV"; fi
  ROTEL=$(ls "$ROTEL_VENV"/lib/python3*/site-packages/rotel/rotel-agent 2>/dev/null || true)
  if [ -z "$ROTEL" ]; then
    "$ROTEL_VENV/bin/pip" install -q rotel==0.0.1a15
    ROTEL=$(ls "$ROTEL_VENV"/lib/python3*/site-packages/rotel/rotel-agent)
  fi
  rootfs "$WORK/rotel" "$ROTEL"
  image tollgate-rotel "$WORK/rotel" '["/bin/rotel-agent"]'
fi

if want prometheus; then
  # prometheus: Debian's binary, and a place for its data.
  PROM=$(deb prometheus)/usr/bin/prometheus
  rootfs "$WORK/prometheus" "$PROM"
  image tollgate-prometheus "$WORK/prometheus" '["/bin/prometheus"]' /prometheus
fi

if want wan; then
  rootfs "$WORK/wan" "$BIN/tollgate-deploy-check"
  image tollgate-wan "$WORK/wan" '["/bin/tollgate-deploy-check", "wan"]'
fi

docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "^tollgate-.*:$TAG "
