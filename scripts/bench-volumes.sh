#!/usr/bin/env bash
# Figures for lamina's volumes (issue 5), as root:
#  1. Mount/Unmount latency of a local volume through the plugin socket (examples/volume_bench.rs).
#  2. Sequential write/read (dd, 1 MiB blocks, conv=fsync, caches dropped before reads) through a lamina
#     MooseFS volume vs a bare mfsmount of the same cluster, and the cluster's start time.
# The MooseFS cluster is the test recipe: master + 2 chunkservers in netns "lbench", 198.18.250.0/24.
# Everything lives under $B (default /var/tmp/lamina-bench-vol) and is removed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${B:-/var/tmp/lamina-bench-vol}; NS=lbench; P=198.18.250; MB=${MB:-500}; CYCLES=${CYCLES:-1000}
cd "$ROOT"
cargo build --release -p lamina --bin lamina --example volume_bench >/dev/null
T=${CARGO_TARGET_DIR:-$ROOT/target}/release
LPID=""; PIDS=()
cleanup() {
    [ -n "$LPID" ] && kill "$LPID" 2>/dev/null && wait "$LPID" 2>/dev/null || true
    for m in $(awk -v b="$B/" 'index($2,b)==1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
    ip netns del $NS 2>/dev/null || true
    rm -rf "$B"
}
trap cleanup EXIT
rm -rf "$B"; mkdir -p "$B"
start_lamina() { # $1 = [volumes] body
    printf '[volumes]\nmount_base = "%s/mnt"\n%s\n' "$B" "$1" > "$B/config.toml"
    "$T/lamina" serve --data-root "$B/data" --socket "$B/lamina.sock" --config "$B/config.toml" --log-level warn 2>"$B/lamina.log" &
    LPID=$!
    for _ in $(seq 100); do [ -S "$B/lamina.sock" ] && break; sleep 0.05; done
}
stop_lamina() { kill "$LPID"; wait "$LPID" || true; LPID=""; }

echo "== local volume, $CYCLES Mount/Unmount cycles through the socket"
start_lamina 'backend = "local"'
"$T/examples/volume_bench" "$B/lamina.sock" "$CYCLES" local1
stop_lamina

echo "== MooseFS cluster"
s=$(date +%s.%N)
IN="nsenter --net=/run/netns/$NS"
ip netns add $NS; ip -n $NS link set lo up
for i in 1 2 3; do ip -n $NS addr add $P.$i/32 dev lo; done
ip link add $NS-h type veth peer name $NS-n netns $NS
ip -n $NS addr add $P.10/24 dev $NS-n; ip -n $NS link set $NS-n up
ip addr add $P.254/24 dev $NS-h; ip link set $NS-h up
mkdir -p $B/c/master $B/c/cs1/hdd $B/c/cs2/hdd $B/bare
cp /var/lib/mfs/metadata.mfs.empty $B/c/master/metadata.mfs
echo "* / rw,alldirs,admin,maproot=0:0" > $B/c/exports.cfg; : > $B/c/topology.cfg
printf 'WORKING_USER = root\nWORKING_GROUP = root\nDATA_PATH = %s\nEXPORTS_FILENAME = %s\nTOPOLOGY_FILENAME = %s\nMATOML_LISTEN_HOST = %s\nMATOCS_LISTEN_HOST = %s\nMATOCL_LISTEN_HOST = %s\n' \
    $B/c/master $B/c/exports.cfg $B/c/topology.cfg $P.1 $P.1 $P.1 > $B/c/master.cfg
$IN mfsmaster -f -c $B/c/master.cfg start >$B/c/master.log 2>&1 & PIDS+=($!)
for i in 1 2; do
    echo "$B/c/cs$i/hdd" > $B/c/cs$i/hdd.cfg
    printf 'WORKING_USER = root\nWORKING_GROUP = root\nDATA_PATH = %s\nHDD_CONF_FILENAME = %s\nHDD_LEAVE_SPACE_DEFAULT = 64MiB\nBIND_HOST = %s\nCSSERV_LISTEN_HOST = %s\nMASTER_HOST = %s\nMASTER_RECONNECTION_DELAY = 1\n' \
        $B/c/cs$i $B/c/cs$i/hdd.cfg $P.$((i+1)) $P.$((i+1)) $P.1 > $B/c/cs$i/cs.cfg
    $IN mfschunkserver -f -c $B/c/cs$i/cs.cfg start >$B/c/cs$i.log 2>&1 & PIDS+=($!)
done
n=0; for _ in $(seq 150); do
    n=$(mfscli -H $P.1 -SCS 2>/dev/null | awk -F'\t' '$1=="chunk servers:" && $10>0' | wc -l); [ "$n" -ge 2 ] && break; sleep 0.2
done
[ "$n" -ge 2 ] || { echo "chunkservers did not register" >&2; exit 1; }
echo "cluster start: $(echo "$(date +%s.%N) - $s" | bc) s (netns, master, 2 chunkservers registered)"
mkdir -p $B/bare && mfsmount $B/bare -H $P.1 -S / >/dev/null 2>&1
start_lamina "backend = \"moosefs\"
[volumes.moosefs]
master = \"$P.1:9421\""
"$T/examples/volume_bench" "$B/lamina.sock" 200 mfsvol --keep-mounted
VOL=$B/mnt/mfsvol; mkdir -p $B/bare/direct
head -c $((MB << 20)) /dev/urandom > /dev/shm/lamina-bench-src
dd_mb() { LC_ALL=C dd "$@" bs=1M 2>&1 | awk '/copied/ {print $(NF-1), $NF}'; }
for run in 1 2; do
    for target in "$VOL" "$B/bare/direct"; do
        w=$(dd_mb if=/dev/shm/lamina-bench-src of=$target/f$run conv=fsync)
        sync; echo 3 > /proc/sys/vm/drop_caches
        r=$(dd_mb if=$target/f$run of=/dev/null)
        echo "run $run $( [ "$target" = "$VOL" ] && echo 'lamina volume' || echo 'bare mfsmount' ): write $w, read $r"
    done
done
rm -f /dev/shm/lamina-bench-src
"$T/examples/volume_bench" "$B/lamina.sock" 0 mfsvol --unmount
stop_lamina
