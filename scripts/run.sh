#!/usr/bin/env bash
# Builds lamina (release) and runs it in the foreground: dockerd storage driver plugin "lamina" and
# containerd proxy snapshotter.
# Defaults: data root /var/lib/lamina, plugin socket /run/docker/plugins/lamina.sock, containerd
# snapshotter socket /run/lamina/snapshotter.sock, config
# /etc/lamina/config.toml when that file exists. Override with LAMINA_DATA_ROOT, LAMINA_SOCKET,
# LAMINA_SNAPSHOTTER_SOCKET, LAMINA_CONFIG, LAMINA_LOG_LEVEL ("none" turns a socket off); extra arguments are passed to `lamina serve`.
# Then start dockerd with:  dockerd --experimental -s lamina
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

die() { printf 'run: error: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "lamina mounts overlay filesystems: run as root"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain with rustup (https://rustup.rs), then re-run"
if ! command -v cc >/dev/null 2>&1; then
    # the Rust toolchain links through the system C compiler
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends gcc libc6-dev
fi

cargo build --release -p lamina

DATA_ROOT=${LAMINA_DATA_ROOT:-/var/lib/lamina}
SOCKET=${LAMINA_SOCKET:-/run/docker/plugins/lamina.sock}
SNAPSHOTTER_SOCKET=${LAMINA_SNAPSHOTTER_SOCKET:-/run/lamina/snapshotter.sock}
CONFIG=${LAMINA_CONFIG:-/etc/lamina/config.toml}
args=(serve --data-root "$DATA_ROOT" --socket "$SOCKET" --snapshotter-socket "$SNAPSHOTTER_SOCKET")
[[ -f $CONFIG ]] && args+=(--config "$CONFIG")
[[ -n ${LAMINA_LOG_LEVEL:-} ]] && args+=(--log-level "$LAMINA_LOG_LEVEL")
mkdir -p "$(dirname "$SOCKET")"
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/lamina" "${args[@]}" "$@"
