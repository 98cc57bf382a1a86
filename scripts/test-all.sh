#!/usr/bin/env bash
# Runs every test tier of lamina, in this order:
#   1. cargo fmt --check            4. cargo test --workspace (unit, protocol and e2e tiers), its test binaries
#                                      run side by side by scripts/cargo-test-pool.sh
#   2. cargo clippy -D warnings     5. containerd's snapshotter conformance suite (Go, scripts/conformance.sh)
#   3. one cargo build of all targets, reused by the tiers (it also builds target/debug/lamina with its
#      fault points and lamina-bench, which crates/integration-tests starts)
#                                   6. fuzz smoke runs (30 s per target) for every crates/*/fuzz
# Installs missing system packages (docker.io, containerd, protobuf-compiler, Go and containerd's Go
# sources, busybox-static, btrfs-progs and xfsprogs for the quota and benchmark filesystems, MooseFS,
# erofs-utils for the cluster tier's layer images) with
# apt-get. The e2e tiers (crates/integration-tests) need root: they start their own lamina and dockerd
# processes (see crates/testkit).
# Exits non-zero on the first failing tier. Environment: FUZZ_SECONDS (30), SKIP_FUZZ=1, JOBS (3: test binaries
# run at once, see scripts/cargo-test-pool.sh), CI=true (tests that lack a prerequisite fail instead of printing SKIPPED).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

FUZZ_SECONDS=${FUZZ_SECONDS:-30}
START=$(date +%s)
SUMMARY=$(mktemp /tmp/lamina-test-summary.XXXXXX)
trap 'rm -f "$SUMMARY"' EXIT

step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf 'test-all: error: %s\n' "$*" >&2; exit 1; }

# ---- prerequisites ----------------------------------------------------------------------------
step "checking prerequisites"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain with rustup (https://rustup.rs), then re-run"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for pkg in python3 docker.io containerd protobuf-compiler golang-go golang-github-containerd-containerd-dev busybox-static docker-registry btrfs-progs xfsprogs moosefs-master moosefs-chunkserver moosefs-client moosefs-cli iproute2 util-linux erofs-utils ceph-mon ceph-osd ceph-mgr ceph-common rbd-fuse; do
    installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || die "missing packages ${missing[*]}; run as root or install them first"
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
# crates/integration-tests/tests/e2e_packaging.rs: the .deb test builds the package with cargo-deb (the
# managed-plugin test's private registry is Debian's docker-registry, in the list above, started by the test on 127.0.0.1).
if ! cargo deb --version >/dev/null 2>&1; then
    step "installing cargo-deb"
    cargo install cargo-deb --locked
fi
[[ $EUID -eq 0 ]] || echo "test-all: warning: not root, the e2e tests will be SKIPPED (or fail under CI=true)" >&2

# ---- static checks and build ------------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets
# The integration tests, the bench and the conformance suite start these binaries; a test build of lamina carries
# the fault points.
for bin in lamina lamina-bench lamina-testkit-serve; do
    [[ -x ${CARGO_TARGET_DIR:-target}/debug/$bin ]] || die "${CARGO_TARGET_DIR:-target}/debug/$bin was not built"
done

# ---- tests ------------------------------------------------------------------------------------
# scripts/cargo-test-pool.sh: every test binary of `cargo test --workspace` (and the doc tests), JOBS (3) at a
# time, longest first; one summary line per binary, the full output of a failing one; fails after all have run.
step "cargo test --workspace (scripts/cargo-test-pool.sh, ${JOBS:-3} binaries at a time)"
scripts/cargo-test-pool.sh "$SUMMARY" || {
    step "cargo test summary"
    cat "$SUMMARY"
    die "cargo test failed"
}

# ---- containerd's snapshotter conformance suite (Go), against lamina (overlay and rbd backends) and the overlayfs reference ----
step "containerd snapshotter conformance suite (scripts/conformance.sh)"
CONF_LOG=$(mktemp /tmp/lamina-conformance.XXXXXX)
set +e
NO_BUILD=1 scripts/conformance.sh test 2>&1 | tee "$CONF_LOG"
conf_rc=${PIPESTATUS[0]}
set -e
grep -E '^conformance\[' "$CONF_LOG" >>"$SUMMARY" || true
rm -f "$CONF_LOG"
((conf_rc == 0)) || die "conformance suite failed (exit $conf_rc)"

# ---- fuzz smoke runs --------------------------------------------------------------------------
fuzz_dirs=()
for d in crates/*/fuzz; do
    [[ -f $d/Cargo.toml ]] && fuzz_dirs+=("$d")
done
if ((${#fuzz_dirs[@]})) && [[ ${SKIP_FUZZ:-0} != 1 ]]; then
    rustup toolchain list 2>/dev/null | grep -q '^nightly' || die "fuzzing needs a nightly toolchain: rustup toolchain install nightly"
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        step "installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
    # One target directory for every fuzz crate: the dependencies they share (lamina-sys, serde, ...) are
    # built once with the fuzzing flags instead of once per crate.
    fuzz_target=$(realpath -m "${CARGO_TARGET_DIR:-target}")/fuzz
    for d in "${fuzz_dirs[@]}"; do
        crate=$(dirname "$d")
        for target in $(cd "$crate" && cargo +nightly fuzz list); do
            step "fuzz $crate $target (${FUZZ_SECONDS}s)"
            (cd "$crate" && cargo +nightly fuzz run --target-dir "$fuzz_target" "$target" -- -max_total_time="$FUZZ_SECONDS")
            echo "fuzz $crate/$target: ok (${FUZZ_SECONDS}s, no crash)" >>"$SUMMARY"
        done
    done
fi

step "summary"
cat "$SUMMARY"
printf 'test-all: all tiers passed in %ss\n' "$(( $(date +%s) - START ))"
# One closing line with the totals of every cargo test binary.
awk '/test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$SUMMARY"
