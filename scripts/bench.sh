#!/usr/bin/env bash
# Benchmarks lamina's GraphDriver face on a fresh loop-backed ext4 (never on the root fs):
#   1. ApplyDiff of a ~250 MB / 44k-entry reference tar vs GNU tar -xf + sync -f
#   2. Get+Put latency of a RW layer over chains of 1, 10 and 128 layers (RPC included), and
#      the kernel floor: the same overlay mount + umount without the daemon
#   3. lamina's peak RSS while applying a 250 MB and a 1 GB tar
# Prints one summary table on stdout; progress goes to stderr. Needs root (loop devices,
# mounts, drop_caches). Everything it creates is torn down on exit, also on failure.
#
# Environment knobs: RUNS (5), ITERS (1000), DEPTHS ("1 10 128"), IMG_SIZE (8G),
# WORK_PARENT (/var/tmp), LAMINA (binary to test), NO_BUILD=1 (use existing binaries), SAVE_RESULTS=FILE (keep the raw
# result lines), SKIP="throughput getput rss" (any subset, to skip parts).
set -euo pipefail
export LC_ALL=C RUST_BACKTRACE=0

RUNS=${RUNS:-5}
ITERS=${ITERS:-1000}
DEPTHS=${DEPTHS:-"1 10 128"}
IMG_SIZE=${IMG_SIZE:-8G}
WORK_PARENT=${WORK_PARENT:-/var/tmp}
SKIP=${SKIP:-}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAMINA=${LAMINA:-$ROOT/target/release/lamina}
BENCH=$ROOT/target/release/examples/bench

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
skip() { [[ " $SKIP " == *" $1 "* ]]; }

[[ $EUID -eq 0 ]] || die "run as root (loop devices, mounts, drop_caches)"
for tool in losetup mkfs.ext4 mount umount mountpoint tar sync awk; do
    command -v "$tool" >/dev/null || die "missing $tool"
done

if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -p lamina --bins --examples) >&2
fi
[[ -x $LAMINA && -x $BENCH ]] || die "missing $LAMINA or $BENCH"

WORK=$(mktemp -d "$WORK_PARENT/lamina-bench.XXXXXX")
IMG=$WORK/ext4.img
MNT=$WORK/mnt
SOCK=$WORK/lamina.sock
RESULTS=$WORK/results.txt
LAMINA_LOG=$WORK/lamina.log
REF_TAR=$WORK/ref.tar
BIG_TAR=$WORK/big.tar
LOOP=""
LAMINA_PID=""

stop_lamina() {
    if [[ -n $LAMINA_PID ]]; then
        kill -TERM "$LAMINA_PID" 2>/dev/null || true
        wait "$LAMINA_PID" 2>/dev/null || true
        LAMINA_PID=""
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_lamina
    if [[ $rc -ne 0 && -s $LAMINA_LOG ]]; then
        log "lamina log (last 30 lines):"
        tail -n 30 "$LAMINA_LOG" >&2
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        umount -R "$MNT" 2>/dev/null || umount -R -l "$MNT"
    fi
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    [[ -n ${SAVE_RESULTS:-} && -f $RESULTS ]] && cp "$RESULTS" "$SAVE_RESULTS"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the filesystem under test ------------------------------------------------------------------
# Sparse backing file on /var/tmp, loop device with direct I/O (no double caching through the
# backing file), ext4 with default features (journal on), inode tables initialised up front so
# no ext4lazyinit thread writes in the background during the runs.
log "creating a $IMG_SIZE loop-backed ext4 in $WORK"
truncate -s "$IMG_SIZE" "$IMG"
LOOP=$(losetup --find --show --direct-io=on "$IMG")
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP"
mkdir -p "$MNT"
mount "$LOOP" "$MNT"
FS_DESC="ext4 (mkfs defaults, journal, no lazy init) on a $IMG_SIZE sparse file in $WORK_PARENT, \
losetup --direct-io=on; $(findmnt -n -o SOURCE,FSTYPE,OPTIONS "$MNT" | tr -s ' ' ' ')"

# A clean mount between runs: commits and forgets everything the previous run left behind.
remount() {
    sync -f "$MNT"
    umount "$MNT"
    mount "$LOOP" "$MNT"
}

start_lamina() {
    rm -f "$SOCK"
    "$LAMINA" serve --data-root "$MNT/lamina" --socket "$SOCK" --snapshotter-socket none --log-level warn 2>>"$LAMINA_LOG" &
    LAMINA_PID=$!
    for _ in $(seq 200); do
        [[ -S $SOCK ]] && return 0
        kill -0 "$LAMINA_PID" 2>/dev/null || die "lamina exited at start"
        sleep 0.05
    done
    die "lamina did not create $SOCK within 10 s"
}

# Cold caches for the filesystem under test, but the input tar in page cache.
cold_caches_warm_tar() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    cat "$1" >/dev/null
}

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }

# --- inputs -------------------------------------------------------------------------------------
log "generating the reference tar (42,000 files, 2,000 dirs, median 2 KiB)"
line=$("$BENCH" gen-tar --out "$REF_TAR")
echo "reftar $line" >>"$RESULTS"
# Other work on the machine skews everything; record the load so the report can say so.
echo "load avg1=$(cut -d' ' -f1 /proc/loadavg)" >>"$RESULTS"

# --- 1. ApplyDiff throughput vs GNU tar ---------------------------------------------------------
# Runs alternate GNU tar / lamina so drift hits both alike. Each run starts on a fresh mount; its
# output is deleted afterwards and the fs remounted. (This ext4 has a journal, so the allocator's
# skip over recently deleted inodes, which only applies to journal-less ext4, does not trigger;
# the per-run figures in the table show whether later runs drift from the first.)
if ! skip throughput; then
    for i in $(seq "$RUNS"); do
        log "throughput run $i/$RUNS: GNU tar"
        remount
        out=$MNT/gnutar-$i
        mkdir "$out"
        cold_caches_warm_tar "$REF_TAR"
        t0=$(now)
        TIMEFORMAT='%U %S'
        { time tar -xf "$REF_TAR" -C "$out"; } 2>"$WORK/tar.time"
        t1=$(now)
        sync -f "$out"
        t2=$(now)
        cpu=$(awk 'END { printf "%.2f", $1 + $2 }' "$WORK/tar.time")
        echo "gnutar run=$i extract_s=$(elapsed "$t0" "$t1") total_s=$(elapsed "$t0" "$t2") cpu_s=$cpu" \
            >>"$RESULTS"
        rm -rf "$out"

        log "throughput run $i/$RUNS: lamina"
        remount
        start_lamina
        cold_caches_warm_tar "$REF_TAR"
        line=$("$BENCH" apply --socket "$SOCK" --tar "$REF_TAR" --cpu-pid "$LAMINA_PID" --remove)
        echo "lamina run=$i $line" >>"$RESULTS"
        stop_lamina
    done
fi

# --- 2. Get+Put latency -------------------------------------------------------------------------
if ! skip getput; then
    remount
    start_lamina
    sleep 2 # let the journal settle after the mount (jbd2 commits every 5 s)
    for d in $DEPTHS; do
        log "Get+Put at depth $d ($ITERS pairs)"
        line=$("$BENCH" getput --socket "$SOCK" --depth "$d" --iters "$ITERS")
        echo "getput $line" >>"$RESULTS"
    done
    stop_lamina
    # The same mounts without the daemon: what the kernel alone costs on this fs.
    for d in $DEPTHS; do
        log "overlay mount/umount floor at depth $d"
        line=$("$BENCH" overlay-floor --dir "$MNT" --depth "$d" --iters "$ITERS")
        echo "floor $line" >>"$RESULTS"
    done
fi

# --- 3. Peak RSS during ApplyDiff ---------------------------------------------------------------
# A fresh daemon per tar; the example also resets VmHWM (clear_refs 5) right before Create.
if ! skip rss; then
    log "generating a ~1 GB tar (4 x 192 MiB files + the reference set)"
    "$BENCH" gen-tar --out "$BIG_TAR" --large-files 4 --large-mb 192 --seed 2 >/dev/null
    for t in "$REF_TAR" "$BIG_TAR"; do
        log "RSS during ApplyDiff of $(basename "$t")"
        remount
        start_lamina
        cold_caches_warm_tar "$t"
        line=$("$BENCH" apply --socket "$SOCK" --tar "$t" --rss-pid "$LAMINA_PID" --cpu-pid "$LAMINA_PID" \
            --sample-ms 20 --remove)
        echo "rss $line" >>"$RESULTS"
        stop_lamina
    done
fi

echo "load avg1=$(cut -d' ' -f1 /proc/loadavg)" >>"$RESULTS"
"$BENCH" report --results "$RESULTS" --fs "$FS_DESC"
