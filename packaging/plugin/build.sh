#!/usr/bin/env bash
# Builds the lamina Docker managed (v2) plugin directory: OUTDIR/config.json and OUTDIR/rootfs/.
#
#   packaging/plugin/build.sh OUTDIR
#   docker plugin create lamina:latest OUTDIR && docker plugin enable lamina:latest
#
# The rootfs holds only what lamina needs at run time, copied from this machine (no registry, no base image):
# the lamina binary and its shared libraries, and, for the MooseFS volume backend, mfsmount, the mfs* tools
# and their libraries. Environment:
#   LAMINA_BIN=PATH         use this lamina binary instead of building target/release/lamina with cargo
#   LAMINA_PLUGIN_MOOSEFS   auto (default: include MooseFS when mfsmount is installed), yes (fail without it), no
# The plugin's settings, paths and the reasons for them: docs/packaging.md.
set -euo pipefail

die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MOOSEFS=${LAMINA_PLUGIN_MOOSEFS:-auto}

if [[ -n ${LAMINA_BIN:-} ]]; then
    BIN=$LAMINA_BIN
else
    (cd "$ROOT" && cargo build --release -p lamina)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/lamina
fi
[[ -x $BIN ]] || die "lamina binary $BIN not found or not executable"
command -v ldd >/dev/null || die "ldd not found (package libc-bin)"

rm -rf "$OUT/rootfs" "$OUT/config.json"
mkdir -p "$OUT"
RFS=$OUT/rootfs

# Directories lamina uses inside the plugin: the plugin socket dir (dockerd binds the host's
# /run/docker/plugins/<plugin id>/ there), the propagated mount (data root and volume mountpoints), /tmp,
# /etc for the files dockerd binds in with a host network.
for d in usr/bin run/docker/plugins lamina tmp etc proc sys dev; do
    mkdir -p "$RFS/$d"
done
chmod 1777 "$RFS/tmp"
: >"$RFS/etc/hosts"
: >"$RFS/etc/resolv.conf"
printf 'root:x:0:0:root:/:/usr/bin/nologin\n' >"$RFS/etc/passwd"
printf 'root:x:0:\n' >"$RFS/etc/group"

# copy_elf SRC DEST: the program and every shared library ldd lists, at the path the loader looks for it.
copy_elf() {
    local src=$1 dest=$2 lib
    install -D -m 0755 "$src" "$RFS$dest"
    while read -r lib; do
        [[ -n $lib ]] || continue
        [[ -e $RFS$lib ]] && continue
        install -D -m 0755 "$(readlink -f "$lib")" "$RFS$lib"
    done < <(ldd "$src" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }')
}

copy_elf "$BIN" /usr/bin/lamina
# Symbols and debug line tables are not needed at run time (the .deb moves them to lamina-dbgsym).
if command -v strip >/dev/null; then
    strip "$RFS/usr/bin/lamina"
fi

have_mfs=false
if [[ $MOOSEFS != no ]] && command -v mfsmount >/dev/null; then
    have_mfs=true
elif [[ $MOOSEFS == yes ]]; then
    die "LAMINA_PLUGIN_MOOSEFS=yes but mfsmount is not installed (apt-get install moosefs-client)"
fi
if $have_mfs; then
    copy_elf "$(command -v mfsmount)" /usr/bin/mfsmount
    # mfstools is one program that acts by the name it is called with; lamina's default goal and quota
    # commands are mfssetgoal, mfsgetgoal and mfssetquota.
    if command -v mfstools >/dev/null; then
        copy_elf "$(command -v mfstools)" /usr/bin/mfstools
        for t in mfssetgoal mfsgetgoal mfssetquota mfsgetquota; do
            ln -sf mfstools "$RFS/usr/bin/$t"
        done
    fi
fi

# The managed plugin's manifest. Paths below /lamina are inside the propagated mount, so dockerd on the
# host sees the merged layer directories and volume mountpoints lamina returns.
cat >"$OUT/config.json" <<'JSON'
{
  "description": "lamina: Docker storage driver (graphdriver) and volume driver over one overlayfs layer store",
  "documentation": "docs/packaging.md in the lamina sources",
  "entrypoint": [
    "/usr/bin/lamina", "serve",
    "--data-root", "/lamina/store",
    "--socket", "/run/docker/plugins/lamina.sock",
    "--snapshotter-socket", "none",
    "--volumes-mount-base", "/lamina/volumes"
  ],
  "workdir": "/",
  "interface": {
    "types": ["docker.graphdriver/1.0", "docker.volumedriver/1.0"],
    "socket": "lamina.sock"
  },
  "network": { "type": "host" },
  "propagatedMount": "/lamina",
  "linux": {
    "capabilities": ["CAP_SYS_ADMIN"],
    "allowAllDevices": false,
    "devices": [{ "path": "/dev/fuse" }]
  },
  "env": [
    {
      "name": "NO_COLOR",
      "description": "plain log lines (dockerd copies the plugin's stderr into its own log)",
      "value": "1"
    },
    {
      "name": "LAMINA_LOG_LEVEL",
      "description": "log filter: error, warn, info, debug or trace",
      "settable": ["value"],
      "value": "info"
    },
    {
      "name": "LAMINA_CONFIG_TOML",
      "description": "config in TOML, the keys of /etc/lamina/config.toml (e.g. the [volumes] and [volumes.moosefs] tables); data_root, sockets and mount_base are fixed by the plugin",
      "settable": ["value"],
      "value": ""
    },
    {
      "name": "REMOTE_PATH",
      "description": "MooseFS/LizardFS directory of the volumes (overrides [volumes.moosefs] remote_path)",
      "settable": ["value"],
      "value": ""
    }
  ],
  "args": {
    "name": "args",
    "description": "extra arguments to lamina serve",
    "settable": ["value"],
    "value": []
  }
}
JSON

size=$(du -sk "$RFS" | cut -f1)
echo "build.sh: wrote $OUT/config.json and $OUT/rootfs ($size KiB; MooseFS tools: $have_mfs)"
