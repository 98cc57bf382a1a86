#!/usr/bin/env bash
# The cargo test step of scripts/test-all.sh: builds every test binary of the workspace once
# (`cargo test --workspace --no-run`), then runs them JOBS at a time instead of one after another, plus the
# doc tests (`cargo test --workspace --doc`) as one more job.
#
# Most of the time of the e2e tiers is waiting (daemons starting, fsyncs, Ceph and MooseFS coming up), so
# binaries overlap well on two cores. Each binary is isolated from the others by crates/testkit: its own
# directories under /var/tmp/lamina-e2e, plugin socket names, dockerd exec roots and containerd namespaces
# (all carrying the PID), Ceph ports and MooseFS network namespaces picked per process. Inside one binary,
# the daemon-starting tests still run one at a time (testkit::serial). Every test dockerd still sees every
# plugin socket in /run/docker/plugins, so a test acts only on volumes it made (no `docker volume prune`).
#
# The binaries that took longest in the previous run start first (times kept in
# <target>/lamina-test-times.tsv; on a first run, the slowest of a CI run, then the other e2e, reliability and
# bench tiers).
# The two binaries that assert call latencies under load they make themselves (e2e_protocol,
# reliability_protocol) run alone, one after the other, before the pool starts: on a machine nothing else of
# this step loads yet (no Ceph clusters stopping, no writeback of what the e2e tiers wrote). A binary's output
# goes to <target>/test-logs/<name>.log and is printed in full when it fails.
#
# Usage: scripts/cargo-test-pool.sh [SUMMARY_FILE]
#   Appends one line per binary ("<name> <seconds>s test result: ...") to SUMMARY_FILE (default: stdout
#   at the end). Exits non-zero when any binary fails, after all have run.
# JOBS=3 takes the step from 897 s to 516 s on 2 idle cores. A test's `umount` of its own mount can answer
# "target is busy" for a moment while another process walks a path through it (more likely with binaries side by
# side); testkit::umount retries for 2 s and names the processes holding the mount if it stays busy.
# Environment: JOBS (3), TEST_TIMEOUT (1800: seconds a binary may run), CARGO_TARGET_DIR, and whatever the
# tests read (CI, LAMINA_E2E_*).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

JOBS=${JOBS:-3}
TEST_TIMEOUT=${TEST_TIMEOUT:-1800}
SUMMARY=${1:-}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
LOGS=$TARGET/test-logs
TIMES=$TARGET/lamina-test-times.tsv
START=$(date +%s)
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log

say() { printf '[%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# ---- build, and list the test executables -------------------------------------------------------
# One line per executable: name, manifest directory, executable. The name is the source below crates/
# ("integration-tests/tests/e2e_docker.rs") for a test target, "<crate> (unit)" for unit tests of a library
# or binary.
LIST=$(mktemp /tmp/lamina-test-list.XXXXXX)
trap 'rm -f "$LIST"' EXIT
cargo test --workspace --no-run --message-format=json-render-diagnostics |
    python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    if "test" in t["kind"]:
        name = os.path.relpath(t["src_path"], "crates")
    else:
        name = t["name"] + " (unit)"
    print(name, os.path.dirname(m["manifest_path"]), m["executable"], sep="\t")
' | sort -u >"$LIST"
[[ -s $LIST ]] || { echo "cargo-test-pool: no test executables" >&2; exit 1; }

# ---- order: longest first -----------------------------------------------------------------------
# Without a previous run: the slowest binaries of a CI run on an idle 2-core machine, in seconds (the two RBD
# layer binaries: each run alone with other work on the machine, load 6-9).
declare -A WEIGHT=(
    [integration-tests/tests/e2e_rbd_layers.rs]=268 [integration-tests/tests/e2e_rbd_layers_faults.rs]=261
    [integration-tests/tests/e2e_packaging.rs]=99
    [integration-tests/tests/e2e_rbd_volumes.rs]=92 [integration-tests/tests/e2e_docker.rs]=92
    [integration-tests/tests/bench_quick.rs]=78 [integration-tests/tests/e2e_cluster.rs]=73
    [integration-tests/tests/reliability_powercut.rs]=46
)
# A binary of the table that the previous run did not time (new, or split from another) gets its table figure
# scaled by how much longer the previous run took than the table for the binaries both name.
if [[ -f $TIMES ]]; then
    declare -A LAST=()
    while IFS=$'\t' read -r n s; do LAST[$n]=$s; done <"$TIMES"
    ran=0 table=0
    for n in "${!WEIGHT[@]}"; do
        if [[ -n ${LAST[$n]:-} ]]; then
            ran=$((ran + LAST[$n]))
            table=$((table + WEIGHT[$n]))
        fi
    done
    if ((ran > 0 && table > 0)); then
        for n in "${!WEIGHT[@]}"; do
            if [[ -z ${LAST[$n]:-} ]]; then WEIGHT[$n]=$((WEIGHT[$n] * ran / table)); fi
        done
    fi
    for n in "${!LAST[@]}"; do WEIGHT[$n]=${LAST[$n]}; done
fi
weight() {
    if [[ -n ${WEIGHT[$1]:-} ]]; then
        echo "${WEIGHT[$1]}"
    elif [[ $1 == */e2e_* || $1 == */reliability_* || $1 == */bench_* ]]; then
        echo 20
    else
        echo 1
    fi
}
# Binaries that assert how long a call takes under load they make themselves: run alone, before the others.
SOLO=(integration-tests/tests/e2e_protocol.rs integration-tests/tests/reliability_protocol.rs)
is_solo() {
    local s
    for s in "${SOLO[@]}"; do
        if [[ $1 == "$s" ]]; then return 0; fi
    done
    return 1
}
declare -a ORDER=()
declare -A DIR=() EXE=()
while IFS=$'\t' read -r n d e; do
    DIR[$n]=$d
    EXE[$n]=$e
done <"$LIST"
DOC="doc tests"
while IFS=$'\t' read -r _ n; do ORDER+=("$n"); done < <(
    { for n in "${!EXE[@]}" "$DOC"; do is_solo "$n" || printf '%s\t%s\n' "$(weight "$n")" "$n"; done; } |
        sort -t$'\t' -k1,1nr -k2,2
)
ALONE=()
for n in "${SOLO[@]}"; do
    if [[ -n ${EXE[$n]:-} ]]; then ALONE+=("$n"); fi
done

# ---- the pool -----------------------------------------------------------------------------------
log_of() { printf '%s/%s.log' "$LOGS" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9_.-' '_')"; }

run_one() {
    local n=$1 log
    log=$(log_of "$n")
    if [[ $n == "$DOC" ]]; then
        cargo test --workspace --doc >"$log" 2>&1
    else
        # A binary that hangs (say, a tool blocked on a dead FUSE mount) fails after TEST_TIMEOUT seconds.
        (cd "${DIR[$n]}" && CARGO_MANIFEST_DIR=${DIR[$n]} exec timeout --kill-after=30 "$TEST_TIMEOUT" "${EXE[$n]}") >"$log" 2>&1
    fi
}

declare -A PID_NAME=() BEGAN=()
declare -a FAILED=()
RESULTS=$(mktemp /tmp/lamina-test-results.XXXXXX)
trap 'rm -f "$LIST" "$RESULTS"' EXIT

finish() {
    local pid=$1 rc=$2 n secs log
    n=${PID_NAME[$pid]}
    unset "PID_NAME[$pid]"
    secs=$(( $(date +%s) - BEGAN[$n] ))
    log=$(log_of "$n")
    printf '%s\t%s\n' "$n" "$secs" >>"$RESULTS.times"
    # A binary prints one "test result:" line; the doc tests one per library, after "Doc-tests <crate>".
    awk -v n="$n" -v secs="$secs" '
        /^ *Doc-tests / { n = $2 " (doc)"; next }
        /^test result:/ { printf "%-50s %4ss  %s\n", n, secs, $0 }
    ' "$log" >>"$RESULTS"
    if ((rc == 0)); then
        say "ok     $n (${secs}s)"
    else
        FAILED+=("$n")
        say "FAILED $n (${secs}s, exit $rc); its output:"
        sed 's/^/    | /' "$log"
        grep -q '^test result:' "$log" || printf '%-50s %4ss  test result: FAILED (exit %s, no result line)\n' "$n" "$secs" "$rc" >>"$RESULTS"
    fi
}

say "running ${#ALONE[@]} test jobs alone, then ${#ORDER[@]} $JOBS at a time (logs in $LOGS)"
: >"$RESULTS.times"
for n in "${ALONE[@]}"; do
    say "alone: $n"
    BEGAN[$n]=$(date +%s)
    run_one "$n" &
    PID_NAME[$!]=$n
    set +e
    wait "$!"
    rc=$?
    set -e
    finish "$!" "$rc"
done
next=0
while ((next < ${#ORDER[@]})) || ((${#PID_NAME[@]} > 0)); do
    while ((next < ${#ORDER[@]})) && ((${#PID_NAME[@]} < JOBS)); do
        n=${ORDER[$next]}
        next=$((next + 1))
        BEGAN[$n]=$(date +%s)
        run_one "$n" &
        PID_NAME[$!]=$n
    done
    set +e
    wait -n -p done_pid "${!PID_NAME[@]}"
    rc=$?
    set -e
    finish "$done_pid" "$rc"
done

# The times of this run order the next one.
sort -t$'\t' -k2,2nr "$RESULTS.times" >"$TIMES"
rm -f "$RESULTS.times"
say "all test jobs done"
if [[ -n $SUMMARY ]]; then
    sort "$RESULTS" >>"$SUMMARY"
else
    sort "$RESULTS"
fi
if ((${#FAILED[@]})); then
    echo "cargo-test-pool: failed: ${FAILED[*]}" >&2
    exit 1
fi
