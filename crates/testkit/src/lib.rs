//! lamina's test kit: the one harness of the integration tests (`crates/integration-tests`) and the benchmark
//! (`crates/bench`).
//!
//! - [`Lamina`]: a `lamina serve` process with its own data root and a unique plugin socket under
//!   `/run/docker/plugins/` (the only place dockerd looks for v1 plugins, shared by every test, hence the
//!   unique names from [`unique_name`]).
//! - [`Dockerd`]: a dockerd with its own data root, exec root, API socket and its own containerd (started and
//!   stopped by that dockerd, with unique containerd namespaces).
//! - [`PluginClient`]: a raw HTTP/1.1 client over the plugin socket that talks like dockerd 20.10 does
//!   (POST, no Content-Type, compact JSON with a trailing newline, chunked ApplyDiff with ids in the query).
//! - [`TarBuilder`] and [`RandomTar`]: hand-written ustar streams, including ones no well-behaved tool writes.
//! - [`Sentinel`]: records a tree outside the data root and proves later that nothing in it changed.
//!
//! Clean-up rules: every process is stopped through its PID (SIGTERM, then SIGKILL) in `Drop`, also when the
//! test panics. Processes that dockerd started (containerd, shims, container inits) are found by PID through
//! the pid files and command lines that name the test's own unique directory; nothing is ever killed by name.
//! Mounts left under a test directory are lazily unmounted and the directory is removed (set
//! `LAMINA_E2E_KEEP=1` to keep it). On failure the daemons' logs are printed.
//!
//! Test directories live under `/var/tmp/lamina-e2e` (the root filesystem here, ext4). Overlay upper dirs on
//! tmpfs also work on this kernel (checked on 6.18: whiteouts and opaque dirs are created), but a
//! disk-backed directory keeps large layers out of memory.
pub mod ceph;
pub mod cluster;
pub mod containerd;
pub mod crash;
pub mod cri;
pub mod docker_fixtures;
pub mod faults;
mod lamina;
mod loopfs;
pub mod moosefs;
pub mod plugin;
pub mod rbd_layers;
pub mod reliability;
pub mod snapshots;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use lamina::{Lamina, Ready};
pub use loopfs::{teardown_all as teardown_loop_filesystems, LoopFs};

/// Where every test directory is created.
pub const E2E_ROOT: &str = "/var/tmp/lamina-e2e";
/// Where dockerd looks for v1 plugin sockets (hard-coded in dockerd).
pub const PLUGIN_DIR: &str = "/run/docker/plugins";

/// The lamina binary under test: `LAMINA_BIN` if set, else `lamina` in the cargo target directory of the
/// running executable (`target/debug/deps/<test>-<hash>` -> `target/debug/lamina`).
pub fn lamina_bin() -> PathBuf {
    workspace_bin("lamina", "LAMINA_BIN")
}

/// `lamina <args> --data-root <root>` (the CLI of the binary under test), whatever the outcome.
pub fn lamina_cli(root: &Path, args: &[&str]) -> Output {
    Command::new(lamina_bin())
        .args(args)
        .arg("--data-root")
        .arg(root)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", lamina_bin().display()))
}

/// [`lamina_cli`]; panics unless it succeeds; returns stdout.
pub fn lamina_cli_ok(root: &Path, args: &[&str]) -> String {
    stdout_of(&format!("lamina {args:?}"), &lamina_cli(root, args)).unwrap_or_else(|e| panic!("{e}"))
}

/// [`lamina_cli_ok`] with `--json`, parsed.
pub fn lamina_cli_json(root: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = lamina_cli_ok(root, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lamina {args:?}: not JSON ({e}): {out}"))
}

/// The benchmark binary: `LAMINA_BENCH_BIN` if set, else `lamina-bench` next to [`lamina_bin`]'s default place.
pub fn lamina_bench_bin() -> PathBuf {
    workspace_bin("lamina-bench", "LAMINA_BENCH_BIN")
}

/// A binary of this workspace: the path in `env_var` if set, else `name` next to the running executable (or
/// one directory up, from `deps/`). Panics with the command that builds it when it is missing.
pub fn workspace_bin(name: &str, env_var: &str) -> PathBuf {
    find_workspace_bin(name, env_var).unwrap_or_else(|e| panic!("{e}"))
}

/// [`workspace_bin`] without the panic: the error says how to build the binary.
pub fn find_workspace_bin(name: &str, env_var: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding the running executable: {e}"))?;
    let mut dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let bin = dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it first (`cargo build --workspace --all-targets` for the tests, whose lamina carries \
             the fault points; `cargo build --release -p lamina -p lamina-bench` for the benchmark), or point {env_var} \
             at a binary",
            bin.display()
        ))
    }
}

// ------------------------------------------------------------------------------------------------------------
// Gating
// ------------------------------------------------------------------------------------------------------------

// The one rule for prerequisites: a test whose prerequisite (root, a program, a package) is missing says so
// loudly and is skipped, but under `CI=true` it fails, since CI must run every tier. The exception is a kernel
// feature the machine lacks (xfs/ext4 project quota, kernel rbd): no set-up provides it, so the test skips
// naming the feature, also under CI.

/// True when running under CI (`CI=true` or `CI=1`): missing prerequisites then fail the test instead of
/// skipping it.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Returns `present`; when it is false, prints a loud SKIPPED line for `test` naming `what` is missing, or
/// panics under CI.
pub fn require(test: &str, what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if in_ci() {
        panic!("{test} needs {what}, and CI=true forbids skipping");
    }
    eprintln!("\n******** SKIPPED: {test} needs {what} ********\n");
    false
}

/// Returns `present`; when it is false, prints a loud SKIPPED line naming the kernel `feature` this machine
/// lacks, under CI too.
pub fn require_kernel_feature(test: &str, feature: &str, present: bool) -> bool {
    if !present {
        eprintln!("\n******** SKIPPED: {test} needs the kernel feature {feature}, which this machine lacks ********\n");
    }
    present
}

fn skip(test: &str, what: &str) -> bool {
    require(test, what, false)
}

/// Effective uid from `/proc/self/status`.
pub fn euid() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Returns true if the test runs as root; otherwise prints a loud SKIPPED line (or panics under CI).
pub fn require_root(test: &str) -> bool {
    euid() == 0 || skip(test, "root")
}

/// Finds an executable in `PATH`, then in the sbin directories a non-login PATH may lack.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Returns true if `name` is installed; otherwise prints a loud SKIPPED line (or panics under CI).
pub fn require_bin(test: &str, name: &str) -> bool {
    find_bin(name).is_some() || skip(test, &format!("the `{name}` program"))
}

/// Everything a dockerd test needs: root, dockerd, containerd, runc, the docker CLI and a static busybox.
pub fn require_docker(test: &str) -> bool {
    require_root(test)
        && ["dockerd", "containerd", "runc", "docker", "tar", "umount"]
            .iter()
            .all(|b| require_bin(test, b))
        && (Path::new(BUSYBOX).exists() || skip(test, "busybox-static (/bin/busybox)"))
}

/// Serialises tests of one test binary that start daemons (set `LAMINA_E2E_PARALLEL=1` to allow overlap).
pub fn serial() -> Option<MutexGuard<'static, ()>> {
    static LOCK: Mutex<()> = Mutex::new(());
    if std::env::var_os("LAMINA_E2E_PARALLEL").is_some() {
        return None;
    }
    Some(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A test's start: when `present` (its `require_*` checks) holds, the [`serial`] guard; `None` (skip the test)
/// otherwise. `let Some(_serial) = serial_if(require_root(test)) else { return; };`
pub fn serial_if(present: bool) -> Option<Option<MutexGuard<'static, ()>>> {
    present.then(serial)
}

// ------------------------------------------------------------------------------------------------------------
// Names, directories, mounts, processes
// ------------------------------------------------------------------------------------------------------------

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this process and call: `lamina-test-<base>-<pid>-<n>` (short enough for socket paths).
pub fn unique_name(base: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let base: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    format!("lamina-test-{base}-{}-{n}", std::process::id())
}

/// A fresh directory under [`E2E_ROOT`], unmounted and removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<E2E_ROOT>/<name>` (removing a leftover of the same name) after sweeping directories left by
    /// dead test processes.
    pub fn new(name: &str) -> TestDir {
        sweep_stale();
        let path = Path::new(E2E_ROOT).join(name);
        if path.exists() {
            unmount_under(&path);
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        fs::write(path.join("owner.pid"), std::process::id().to_string()).unwrap();
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        kill_pids_referencing(&self.path);
        unmount_under(&self.path);
        if std::env::var_os("LAMINA_E2E_KEEP").is_some() {
            eprintln!("LAMINA_E2E_KEEP: kept {}", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Removes directories of [`E2E_ROOT`] whose owning test process is gone (a test binary killed with SIGKILL
/// cannot run its destructors): stops the processes that name that directory, unmounts, deletes.
fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(E2E_ROOT) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let owner = fs::read_to_string(dir.join("owner.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if owner.is_some_and(pid_alive) || std::env::var_os("LAMINA_E2E_KEEP").is_some() {
                continue;
            }
            eprintln!("sweeping stale test directory {}", dir.display());
            kill_pids_referencing(&dir);
            unmount_under(&dir);
            let _ = fs::remove_dir_all(&dir);
        }
    });
}

/// The most spare layer directories a running lamina keeps in `layers/` (`crates/store/src/spare.rs`).
pub const MAX_SPARES: usize = 8;

/// Whether `dir` looks like a spare layer directory: exactly `diff/`, `merged/` and `work/`, each an empty
/// directory. A layer created and never written looks the same.
pub fn is_spare_like(dir: &Path) -> bool {
    let empty_dir = |p: &Path| {
        fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
            && fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_none())
    };
    let Ok(rd) = fs::read_dir(dir) else {
        return false;
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names == ["diff", "merged", "work"] && names.iter().all(|n| empty_dir(&dir.join(n)))
}

/// The entries of a data root's `layers/` (sorted), leaving out the spare layer directories a running lamina
/// keeps ready there, for checks of what a test's calls left: at most [`MAX_SPARES`] trees of empty directories.
/// Where there are more such trees, all of them are kept (some are not spares).
pub fn layer_dirs_without_spares(layers: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = fs::read_dir(layers)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    all.sort();
    let spares = all.iter().filter(|p| is_spare_like(p)).count();
    if spares > MAX_SPARES {
        return all;
    }
    all.into_iter().filter(|p| !is_spare_like(p)).collect()
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    lamina_sys::mount::mounts_under(dir).unwrap_or_default()
}

/// Whether something is mounted exactly at `p`.
pub fn is_mounted(p: &Path) -> bool {
    mounts_under(p).iter().any(|m| m == p)
}

/// Lazily unmounts everything mounted at or below `dir`.
pub fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stderr(Stdio::null())
                .status();
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!("warning: mounts left under {}: {left:?}", dir.display());
    }
}

/// Unmounts `target` (not lazily) and panics if it stays mounted. A mount answers "busy" while anything
/// holds a reference into it, also for a moment (a path walk of another process): the unmount is retried for
/// up to 2 s, and a failure names the processes whose working directory, root or open files are under it.
pub fn umount(target: &Path) {
    let mut last = String::new();
    for _ in 0..20 {
        let out = Command::new("umount").arg(target).output().unwrap();
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !last.contains("busy") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "umount {}: {last}; processes using it: {:?}",
        target.display(),
        pids_using(target)
    );
}

/// `(pid, path)` of processes whose working directory, root or an open file is at or below `dir`.
pub fn pids_using(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    for (pid, proc_dir) in processes() {
        let fds = fs::read_dir(proc_dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| f.path());
        for link in [proc_dir.join("cwd"), proc_dir.join("root")]
            .into_iter()
            .chain(fds)
        {
            if let Ok(to) = fs::read_link(&link) {
                if to.starts_with(dir) {
                    found.push((pid, to));
                }
            }
        }
    }
    found
}

/// True if `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Sends `sig` (`TERM`, `KILL`, ...) to one PID with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for a child to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => return None,
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status when the process ended by itself.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    signal(child.id(), "TERM");
    if let Some(st) = wait_timeout(child, grace) {
        return Some(st);
    }
    eprintln!("pid {} ignored SIGTERM for {grace:?}: SIGKILL", child.id());
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// [`stop_child`] on the child in `child`, if any, saying so when `what` had to be killed.
pub fn stop_owned_child(child: &mut Option<Child>, grace: Duration, what: &str) {
    if let Some(mut c) = child.take() {
        if stop_child(&mut c, grace).is_none() {
            eprintln!("{what} had to be killed");
        }
    }
}

/// While a test panics, prints the end of `what`'s log for the failure report.
pub fn print_log_if_panicking(what: &str, log: &Path) {
    if thread::panicking() {
        eprintln!(
            "----- {what} log ({}) -----\n{}\n-----",
            log.display(),
            log_excerpt(log)
        );
    }
}

/// Every process as `(pid, /proc/<pid>)`.
fn processes() -> impl Iterator<Item = (u32, PathBuf)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, e.path()))
        })
}

/// PIDs (other than ours) whose command line mentions `dir`: containerd, shims, daemons of that test.
pub fn pids_referencing(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let needle = dir.as_os_str().as_bytes();
    let mut pids = Vec::new();
    for (pid, proc_dir) in processes() {
        if pid == me {
            continue;
        }
        let Ok(cmd) = fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        if cmd.windows(needle.len()).any(|w| w == needle) && pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs container processes recorded in `init.pid` files below `dir`, then every process whose command
/// line names `dir`, and waits (up to 10 s) until they are gone.
pub fn kill_pids_referencing(dir: &Path) {
    let mut pids: Vec<u32> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !mounts_under(&e.path()).contains(&e.path()) {
                    stack.push(e.path());
                }
            } else if e.file_name() == "init.pid" {
                if let Some(pid) = fs::read_to_string(e.path())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    pids.push(pid);
                }
            }
        }
    }
    pids.retain(|&p| pid_alive(p) && p != std::process::id());
    pids.extend(pids_referencing(dir));
    if pids.is_empty() {
        return;
    }
    eprintln!("killing leftover processes of {}: {pids:?}", dir.display());
    for &p in &pids {
        signal(p, "KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of a text file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What to print of a daemon log on failure: its warnings and errors (last 60), then its last lines.
pub fn log_excerpt(path: &Path) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let important: Vec<&str> = text
        .lines()
        .filter(|l| {
            let warn = l.contains(" WARN ") || l.contains("level=warning");
            let about_driver = ["GraphDriver", "graphdriver", "plugin", "lamina", "layer"]
                .iter()
                .any(|w| l.contains(w));
            l.contains(" ERROR ")
                || l.contains("level=error")
                || l.contains("level=fatal")
                || l.contains("panicked")
                || (warn && about_driver)
        })
        .collect();
    format!(
        "--- errors, and warnings about the driver (last 60 of {}) ---\n{}\n--- last {} lines ---\n{}",
        important.len(),
        important[important.len().saturating_sub(60)..].join("\n"),
        log_lines(),
        tail(path, log_lines())
    )
}

pub(crate) fn log_lines() -> usize {
    std::env::var("LAMINA_E2E_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

/// Polls `f` every 100 ms until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `Ok` if `out` is a success, else an error naming `what` with the exit status, stdout and stderr.
pub fn check_output(what: &str, out: &Output) -> Result<(), String> {
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// True when `have()` holds, once `packages` are installed if it did not (one `apt-get install` per package
/// list and test process); otherwise a skip (a failure under CI) saying that `test` needs `what`.
pub fn require_packages(test: &str, what: &str, have: fn() -> bool, packages: &[&str]) -> bool {
    static TRIED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if !have() {
        let key = packages.join(" ");
        let mut tried = TRIED.lock().unwrap_or_else(|e| e.into_inner());
        if !tried.contains(&key) {
            eprintln!("installing {key} with apt-get");
            let st = Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            eprintln!("apt-get: {st:?}");
            tried.push(key);
        }
    }
    have() || skip(test, what)
}

/// The stdout of the command `what` that gave `out`, or the error of [`check_output`].
pub fn stdout_of(what: &str, out: &Output) -> Result<String, String> {
    check_output(what, out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The stderr of the command `what` that gave `out`; panics if it succeeded.
pub fn stderr_of_failure(what: &str, out: &Output) -> String {
    assert!(
        !out.status.success(),
        "`{what}` succeeded but must fail:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command line tool with stdin closed and the variables `unset` removed from the inherited
/// environment (those that would aim it at another daemon than the test's).
pub fn tool_command(program: impl AsRef<std::ffi::OsStr>, unset: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    for var in unset {
        cmd.env_remove(var);
    }
    cmd
}

/// The log file of an engine, opened for appending with a line that marks the start of `engine` (a restart
/// goes on in the same file).
pub fn start_log(path: &Path, engine: &str) -> fs::File {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let _ = writeln!(&log, "===== harness: starting {engine} =====");
    log
}

/// Calls `check` every 100 ms until the engine `what` is up (`Ok(true)`); panics with the end of its `log` if it
/// exited first (`check` gives its exit status) or `timeout` passed.
pub fn wait_up(
    what: &str,
    log: &Path,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, ExitStatus>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(true) => return,
            Ok(false) => {}
            Err(st) => panic!(
                "{what} exited during start-up ({st}); log:\n{}",
                tail(log, log_lines())
            ),
        }
        if Instant::now() > deadline {
            panic!(
                "{what} not ready within {} s; log:\n{}",
                timeout.as_secs(),
                tail(log, log_lines())
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The exit status of `child` if it has exited.
pub fn exited(child: &mut Option<Child>) -> Option<ExitStatus> {
    child.as_mut().and_then(|c| c.try_wait().ok().flatten())
}

/// Runs `cmd` with `input` written to its stdin (from a thread, so a large input cannot block on a full
/// stdout); its output, and whether all of `input` was written.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> (Output, std::io::Result<()>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    (out, writer.join().unwrap())
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    check_output(&format!("{cmd:?}"), &out).unwrap_or_else(|e| panic!("{e}"));
    out
}

// ------------------------------------------------------------------------------------------------------------
// dockerd
// ------------------------------------------------------------------------------------------------------------

/// The docker CLI to use: Debian's 20.10 client when present (it matches the daemon), else the one in PATH.
pub fn docker_cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        return debian.to_path_buf();
    }
    find_bin("docker").unwrap_or_else(|| PathBuf::from("docker"))
}

/// A dockerd (with its own containerd, which it starts and stops) for one test or benchmark: Debian's docker.io
/// 20.10 (the last series that loads graph-driver plugins), with its own data root, exec root, API socket and
/// containerd namespaces, and no networking set-up (`--iptables=false --bridge=none --ip-forward=false
/// --ip-masq=false`).
pub struct Dockerd {
    /// `-s` value.
    pub driver: String,
    /// `unix://<run>/docker.sock`, for `DOCKER_HOST`.
    pub host: String,
    /// dockerd's log (all runs, appended).
    pub log: PathBuf,
    /// `--log-level` (`debug` by default).
    pub log_level: String,
    /// Extra daemon flags.
    pub extra_args: Vec<String>,
    child: Option<Child>,
    id: String,
    /// `root/`, `cli/` and the log.
    dir: PathBuf,
    /// The exec root (`exec/`), API socket and pid file: a short path, as containerd's sockets below the exec
    /// root must fit in a unix socket address.
    run: PathBuf,
    _dir: Option<TestDir>,
}

impl Dockerd {
    /// Starts dockerd with `--experimental -s <driver>` and waits until `docker info` answers.
    pub fn start(driver: &str) -> Dockerd {
        let mut d = Dockerd::new(driver);
        d.spawn();
        d.wait_ready();
        d
    }

    /// Prepares a fresh test directory (removed on drop) without starting the daemon.
    pub fn new(driver: &str) -> Dockerd {
        let id = unique_name("dockerd")
            .trim_start_matches("lamina-test-")
            .to_string();
        let dir = TestDir::new(&format!("d-{id}"));
        let mut d = Dockerd::in_dirs(driver, dir.path(), dir.path());
        d._dir = Some(dir);
        d
    }

    /// A daemon with its data in `dir` and its exec root and API socket in `run` (both created; `run` is removed
    /// on drop when it is not `dir`); not started.
    pub fn in_dirs(driver: &str, dir: &Path, run: &Path) -> Dockerd {
        let id = unique_name("dockerd")
            .trim_start_matches("lamina-test-")
            .to_string();
        for sub in [dir.join("root"), dir.join("cli"), run.join("exec")] {
            fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("create {}: {e}", sub.display()));
        }
        Dockerd {
            driver: driver.to_string(),
            host: format!("unix://{}", run.join("docker.sock").display()),
            log: dir.join("dockerd.log"),
            log_level: "debug".into(),
            extra_args: Vec::new(),
            child: None,
            id,
            dir: dir.to_path_buf(),
            run: run.to_path_buf(),
            _dir: None,
        }
    }

    /// The daemon's directory (`root/`, `cli/`, the log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// dockerd's `--data-root`.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Starts the process (no readiness wait).
    pub fn spawn(&mut self) {
        let log = start_log(&self.log, "dockerd");
        let mut cmd = Command::new(find_bin("dockerd").expect("dockerd"));
        cmd.arg("--data-root")
            .arg(self.dir.join("root"))
            .arg("--exec-root")
            .arg(self.run.join("exec"))
            .arg("--pidfile")
            .arg(self.run.join("dockerd.pid"))
            .arg("-H")
            .arg(&self.host)
            .arg("--experimental")
            .arg("-s")
            .arg(&self.driver)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-forward=false",
            ])
            .args([
                "--ip-masq=false",
                "--userland-proxy=false",
                "--shutdown-timeout=3",
            ])
            .arg(format!("--log-level={}", self.log_level))
            .arg(format!("--containerd-namespace=e2e-{}", self.id))
            .arg(format!("--containerd-plugins-namespace=e2e-{}-p", self.id))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn dockerd: {e}")));
    }

    /// Waits until `docker info` reports our storage driver; panics (with the log) if dockerd exits or 90 s pass.
    pub fn wait_ready(&mut self) {
        // dockerd retries a missing plugin for ~15 s before giving up, so allow more than that.
        let (what, log) = (format!("dockerd -s {}", self.driver), self.log.clone());
        wait_up(&what, &log, Duration::from_secs(90), || {
            if let Some(st) = exited(&mut self.child) {
                return Err(st);
            }
            let out = self.docker(&["info", "--format", "{{.Driver}}"]);
            if out.status.success() {
                let driver = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert_eq!(driver, self.driver, "docker info reports another storage driver");
            }
            Ok(out.status.success())
        });
    }

    /// A docker CLI command aimed at this daemon (classic builder, private CLI config).
    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = tool_command(docker_cli(), &["DOCKER_CONTEXT", "DOCKER_TLS_VERIFY"]);
        cmd.args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "0");
        cmd
    }

    /// Runs `docker <args>` and returns its output, whatever the status.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_cmd(args).output().expect("run docker CLI")
    }

    /// Runs `docker <args>`, panics unless it succeeds; returns trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.try_ok(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Removes the unused volumes of the `local` driver (what `docker volume prune` does to them). Unlike a prune,
    /// it leaves alone the volumes of the plugin sockets other test binaries serve meanwhile, which dockerd 20.10
    /// would prune too.
    pub fn remove_unused_local_volumes(&self) {
        let unused = self.ok(&["volume", "ls", "-q", "-f", "dangling=true", "-f", "driver=local"]);
        for name in unused.lines().filter(|l| !l.is_empty()) {
            self.ok(&["volume", "rm", name]);
        }
    }

    /// `docker run -d --name <name> <image> sh -c <script>`: a background container; panics unless it starts.
    pub fn run_detached(&self, name: &str, image: &str, script: &str) {
        self.ok(&["run", "-d", "--name", name, image, "sh", "-c", script]);
    }

    /// Runs `docker <args>`, panics if it succeeds; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        stderr_of_failure(&format!("docker {}", args.join(" ")), &self.docker(args))
    }

    /// Runs `docker <args>`; its trimmed stdout, or an error with its output unless it succeeds.
    pub fn try_ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.docker(args);
        self.check(args, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Runs `docker <args>` with `input` on stdin; panics unless it succeeds; returns trimmed stdout.
    pub fn ok_stdin(&self, args: &[&str], input: &[u8]) -> String {
        // The CLI may stop reading early (a refused load); its status tells.
        let (out, _) = output_with_stdin(&mut self.docker_cmd(args), input);
        self.check(args, &out).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    fn check(&self, args: &[&str], out: &Output) -> Result<(), String> {
        check_output(&format!("docker {}", args.join(" ")), out)
            .map_err(|e| format!("{e} (dockerd -s {})", self.driver))
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait (60 s). Panics if dockerd does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("dockerd is not running");
        signal(c.id(), "TERM");
        let st = wait_timeout(&mut c, Duration::from_secs(60));
        let st = st.unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "dockerd did not exit within 60 s of SIGTERM; log:\n{}",
                self.log_tail()
            )
        });
        // Its containerd exits on its own shortly after.
        let exec = self.run.join("exec");
        poll(Duration::from_secs(10), || {
            pids_referencing(&exec).is_empty().then_some(())
        });
        st
    }

    /// Clean stop and start again with the same directories.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, log_lines())
    }

    /// `docker info` storage-driver status rows.
    pub fn driver_status(&self) -> Vec<(String, String)> {
        let json = self.ok(&["info", "--format", "{{json .DriverStatus}}"]);
        let rows: Vec<Vec<String>> = serde_json::from_str(&json).unwrap_or_default();
        rows.into_iter()
            .filter(|r| r.len() == 2)
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let what = format!("dockerd -s {}", self.driver);
        stop_owned_child(&mut self.child, Duration::from_secs(30), &what);
        print_log_if_panicking(&what, &self.log);
        // containerd, shims and containers of this daemon, then mounts (TestDir's drop does the rest).
        for d in [&self.run, &self.dir] {
            kill_pids_referencing(d);
            unmount_under(d);
        }
        if self.run != self.dir {
            let _ = fs::remove_dir_all(&self.run);
            if let Some(parent) = self.run.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// busybox image
// ------------------------------------------------------------------------------------------------------------

/// The static busybox installed by Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";

/// Writes a minimal root filesystem: `/bin/busybox` plus one symlink per applet, `/etc/passwd`, `/etc/group`,
/// `/tmp` (1777), `/root`.
pub fn busybox_rootfs(dir: &Path) {
    let bin = fs::read(BUSYBOX).unwrap_or_else(|e| panic!("read {BUSYBOX}: {e}"));
    assert!(
        !elf_has_interpreter(&bin),
        "{BUSYBOX} is dynamically linked: install busybox-static"
    );
    for d in ["bin", "etc", "tmp", "root"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::write(dir.join("bin/busybox"), &bin).unwrap();
    fs::set_permissions(dir.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    let list = run_ok(Command::new(BUSYBOX).arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// True if a 64-bit little-endian ELF image has a `PT_INTERP` program header (is dynamically linked).
fn elf_has_interpreter(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) == 3)
    })
}

/// Writes each `(path, content)` of `files` below `dir`, creating the directories on the way.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
        }
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }
}

/// Writes `mb` MiB of zeros to a new file at `path` and syncs it: the write error is what a size limit answers.
pub fn write_mb(path: &Path, mb: usize) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    let buf = vec![0u8; 1 << 20];
    for _ in 0..mb {
        f.write_all(&buf)?;
    }
    f.sync_all()
}

/// Removes the file at `path` and syncs the filesystem it was on: btrfs gives a deleted file's space back to its
/// qgroup only when the transaction that deletes it commits, and a write before that can still be refused.
pub fn remove_and_sync(path: &Path) {
    fs::remove_file(path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("/"));
    lamina_sys::mount::syncfs(dir).unwrap_or_else(|e| panic!("syncfs {}: {e}", dir.display()));
}

/// Whether `e` is what a quota answers: EDQUOT or ENOSPC.
pub fn is_quota_error(e: &std::io::Error) -> bool {
    use lamina_sys::fs::errno::{EDQUOT, ENOSPC};
    matches!(e.raw_os_error(), Some(EDQUOT | ENOSPC))
}

/// Tars the contents of `dir` into `tarball` with the `tar` CLI, every entry owned by 0:0.
pub fn tar_dir(dir: &Path, tarball: &Path) {
    run_ok(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(tarball)
            .arg("."),
    );
}

/// Builds a busybox rootfs, tars it with the `tar` CLI and `docker import`s it as `tag`. Returns the image id.
pub fn busybox_image(docker: &Dockerd, tag: &str) -> String {
    let safe: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let rootfs = docker.dir().join(format!("bb-rootfs-{safe}"));
    let tarball = docker.dir().join(format!("bb-{safe}.tar"));
    if !tarball.exists() {
        busybox_rootfs(&rootfs);
        tar_dir(&rootfs, &tarball);
        let _ = fs::remove_dir_all(&rootfs);
    }
    docker.ok(&[
        "import",
        "--change",
        "CMD [\"/bin/sh\"]",
        tarball.to_str().unwrap(),
        tag,
    ])
}

// ------------------------------------------------------------------------------------------------------------
// Raw plugin protocol client
// ------------------------------------------------------------------------------------------------------------

/// Non-empty layer ids the Docker plugin protocol refuses as `invalid id`: path escapes and separators, NUL and
/// other control characters, a leading dot, dash or space, non-ASCII and bidi characters. The protocol crate's
/// own tests and the daemon's end-to-end tests refuse every one of them.
pub const BAD_IDS: &[&str] = &[
    "/",
    ".",
    "..",
    "a/b",
    "../../etc",
    "a\\b",
    "\u{0}",
    "a\u{0}b",
    "a\nb",
    "a\tb",
    "\u{1}",
    "\u{1b}[31m",
    "-rf",
    ".hidden",
    "ünïcødé",
    "a\u{202e}b",
    " a",
];

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `Err` field when the body is a JSON object with a non-empty one.
    pub fn err(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("Err")
            .and_then(|e| e.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Panics unless the status is 200 and there is no `Err`; returns the JSON body.
    pub fn ok(&self, what: &str) -> serde_json::Value {
        assert!(
            self.status == 200 && self.err().is_none(),
            "{what}: expected success, got HTTP {} {:?}",
            self.status,
            self.text()
        );
        self.json()
    }

    /// Panics unless this is a refusal (HTTP 500) whose `Err` starts with `class`.
    pub fn expect_err(&self, what: &str, class: &str) -> String {
        let err = self.err().unwrap_or_default();
        assert!(
            self.status == 500 && err.starts_with(&format!("{class}:")),
            "{what}: expected HTTP 500 with Err \"{class}: ...\", got HTTP {} {:?}",
            self.status,
            truncate(&self.text(), 400)
        );
        err
    }

    /// [`Self::expect_err`], and panics unless the `Err` also mentions `needle`.
    #[track_caller]
    pub fn expect_err_containing(&self, what: &str, class: &str, needle: &str) -> String {
        let err = self.expect_err(what, class);
        assert!(err.contains(needle), "{what}: {err}");
        err
    }
}

/// Shortens `s` to at most `n` bytes (on a char boundary) for messages.
pub fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &s[..end], s.len())
}

/// A request body.
pub enum Body<'a> {
    /// `Content-Length: <len>`.
    Fixed(&'a [u8]),
    /// `Transfer-Encoding: chunked`, streamed from the reader in 64 KiB chunks.
    Chunked(&'a mut dyn Read),
}

/// Size of each chunk of a chunked upload.
const PIECE: usize = 64 * 1024;

/// An HTTP/1.1 client for the plugin socket that behaves like dockerd 20.10's plugin client (POST, no
/// Content-Type, compact JSON with a trailing newline, chunked ApplyDiff with the ids in the query). Each
/// request opens a connection; [`PluginClient::session`] keeps one open, as dockerd does.
#[derive(Debug, Clone)]
pub struct PluginClient {
    pub socket: PathBuf,
    /// Read timeout per response.
    pub timeout: Duration,
}

impl PluginClient {
    pub fn new(socket: &Path) -> PluginClient {
        PluginClient {
            socket: socket.to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    /// `POST /Plugin.Activate` with an empty body.
    pub fn activate(&self) -> io::Result<HttpResponse> {
        self.request("POST", "/Plugin.Activate", &[], Body::Fixed(b""))
    }

    /// `POST <path>` with `body` verbatim (Content-Length).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> io::Result<HttpResponse> {
        self.request("POST", path, &[], Body::Fixed(body))
    }

    /// `POST /GraphDriver.<method>` with `json` encoded as Go's json.Encoder does (compact + `\n`).
    /// Panics on transport errors (the daemon must always answer).
    pub fn call(&self, method: &str, json: serde_json::Value) -> HttpResponse {
        let path = format!("/GraphDriver.{method}");
        self.post_raw(&path, &go_json(&json))
            .unwrap_or_else(|e| panic!("{path}: transport error {e}"))
    }

    /// `/VolumeDriver.Get` of `name` (panics unless it succeeds): the `Status.State` it reports, `""` if none.
    pub fn volume_state(&self, name: &str) -> String {
        let g = self
            .volume_call("Get", serde_json::json!({"Name": name}))
            .ok(&format!("Get {name}"));
        g["Volume"]["Status"]["State"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Makes each `(method, body, cause)` volume call and panics unless it is refused with an `Err` of `class`
    /// that names `cause` (`when` completes the messages, e.g. `with the cluster down`); the time they took.
    pub fn expect_volume_refusals(
        &self,
        calls: &[(&str, serde_json::Value, &str)],
        when: &str,
        class: &str,
    ) -> Duration {
        let t = Instant::now();
        for (method, body, cause) in calls {
            self.volume_call(method, body.clone()).expect_err_containing(
                &format!("{method} {when}"),
                class,
                cause,
            );
        }
        t.elapsed()
    }

    /// `POST /VolumeDriver.<method>`, encoded like [`PluginClient::call`]; panics on transport errors.
    pub fn volume_call(&self, method: &str, json: serde_json::Value) -> HttpResponse {
        let path = format!("/VolumeDriver.{method}");
        self.post_raw(&path, &go_json(&json))
            .unwrap_or_else(|e| panic!("{path}: transport error {e}"))
    }

    /// `Init` with `home`; panics unless it succeeds.
    pub fn init(&self, home: &Path) {
        self.call("Init", serde_json::json!({"Home": home})).ok("Init");
    }

    /// `Create` of the layer `id` on `parent` (`""`: none), then `ApplyDiff` of `tar` into it; panics unless both
    /// succeed.
    pub fn layer(&self, id: &str, parent: &str, tar: &mut dyn Read) {
        self.call("Create", serde_json::json!({"ID": id, "Parent": parent}))
            .ok(&format!("Create {id}"));
        self.apply_diff(id, parent, tar)
            .unwrap_or_else(|e| panic!("ApplyDiff {id}: {e}"))
            .ok(&format!("ApplyDiff {id}"));
    }

    /// `POST /GraphDriver.ApplyDiff?id=<id>&parent=<parent>` (not escaped, like dockerd) with a chunked tar.
    pub fn apply_diff(&self, id: &str, parent: &str, tar: &mut dyn Read) -> io::Result<HttpResponse> {
        self.apply_diff_query(&format!("id={id}&parent={parent}"), tar)
    }

    /// ApplyDiff with a hand-made query string.
    pub fn apply_diff_query(&self, query: &str, tar: &mut dyn Read) -> io::Result<HttpResponse> {
        self.request(
            "POST",
            &format!("/GraphDriver.ApplyDiff?{query}"),
            &[],
            Body::Chunked(tar),
        )
    }

    /// Sends one request on a new connection and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> io::Result<HttpResponse> {
        let mut r = self.connect()?;
        let write_result = send_request(r.get_mut(), method, path, extra_headers, body);
        // A server may refuse before reading the whole body and close: still try to read its answer.
        match read_response(&mut r) {
            Ok(resp) => Ok(resp),
            Err(read_err) => Err(write_result.err().unwrap_or(read_err)),
        }
    }

    /// A keep-alive session on this socket (nothing is connected yet).
    pub fn session(&self) -> Session {
        Session {
            client: self.clone(),
            conn: None,
            connects: 0,
        }
    }

    fn connect(&self) -> io::Result<BufReader<UnixStream>> {
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(BufReader::with_capacity(PIECE, stream))
    }
}

/// `json` as Go's json.Encoder writes it: compact, with a trailing newline.
fn go_json(json: &serde_json::Value) -> Vec<u8> {
    let mut body = serde_json::to_vec(json).expect("JSON");
    body.push(b'\n');
    body
}

/// One keep-alive connection of a [`PluginClient`], reopened when the server closes it; calls decode the reply
/// and turn a plugin `Err` (or a status other than 200) into an error.
pub struct Session {
    client: PluginClient,
    conn: Option<BufReader<UnixStream>>,
    /// Connections opened so far (1 when keep-alive held throughout).
    pub connects: u64,
}

impl Session {
    /// Read/write timeout per call.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.client.timeout = timeout;
        self.conn = None;
    }

    fn stream(&mut self) -> io::Result<&mut BufReader<UnixStream>> {
        if self.conn.is_none() {
            self.conn = Some(self.client.connect()?);
            self.connects += 1;
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Sends one request on the kept connection and reads the whole response. A request that cannot be sent
    /// on a reused connection (closed by the server's idle timeout) is sent once more on a new one.
    pub fn request(&mut self, method: &str, path: &str, body: Body<'_>) -> io::Result<HttpResponse> {
        let reused = self.conn.is_some();
        let sent = match body {
            Body::Fixed(bytes) => {
                let first = send_request(self.stream()?.get_mut(), method, path, &[], Body::Fixed(bytes));
                match first {
                    Err(_) if reused => {
                        self.conn = None;
                        send_request(self.stream()?.get_mut(), method, path, &[], Body::Fixed(bytes))
                    }
                    other => other,
                }
            }
            Body::Chunked(r) => send_request(self.stream()?.get_mut(), method, path, &[], Body::Chunked(r)),
        };
        let resp = read_response(self.stream()?);
        let close = match (&sent, &resp) {
            (Ok(()), Ok(r)) => {
                r.header("Connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    || (r.header("Content-Length").is_none() && r.header("Transfer-Encoding").is_none())
            }
            _ => true,
        };
        if close {
            self.conn = None;
        }
        match (sent, resp) {
            (_, Ok(r)) => Ok(r),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
        }
    }

    /// POST `/endpoint` with a JSON body; returns the decoded reply, or the plugin's `Err` as an error.
    pub fn call(&mut self, endpoint: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let resp = self
            .request("POST", &format!("/{endpoint}"), Body::Fixed(&go_json(body)))
            .map_err(|e| anyhow::anyhow!("{endpoint}: {e}"))?;
        decode(endpoint, &resp)
    }

    /// What dockerd sends first after discovering a graph-driver plugin: `Plugin.Activate` and
    /// `GraphDriver.Init` (with `home` as the driver home).
    pub fn handshake(&mut self, home: &Path) -> anyhow::Result<()> {
        self.call("Plugin.Activate", &serde_json::json!({}))?;
        self.call(
            "GraphDriver.Init",
            &serde_json::json!({"Home": home, "Opts": null, "UIDMaps": null, "GIDMaps": null}),
        )?;
        Ok(())
    }

    /// `GraphDriver.ApplyDiff` with a chunked body read from `input`; returns the `Size` reply.
    pub fn apply_diff(&mut self, id: &str, parent: &str, input: &mut dyn Read) -> anyhow::Result<u64> {
        let path = format!("/GraphDriver.ApplyDiff?id={id}&parent={parent}");
        let resp = self
            .request("POST", &path, Body::Chunked(input))
            .map_err(|e| anyhow::anyhow!("GraphDriver.ApplyDiff: {e}"))?;
        let v = decode("GraphDriver.ApplyDiff", &resp)?;
        v.get("Size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| anyhow::anyhow!("ApplyDiff reply without Size: {v}"))
    }
}

/// The JSON of a plugin reply; its `Err`, a status other than 200 or a body that is not JSON as an error.
fn decode(endpoint: &str, resp: &HttpResponse) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value = if resp.body.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(&resp.body).map_err(|e| {
            anyhow::anyhow!(
                "{endpoint}: HTTP {} with a non-JSON body ({e}): {}",
                resp.status,
                resp.text()
            )
        })?
    };
    if let Some(err) = resp.err() {
        anyhow::bail!("{endpoint}: HTTP {}: {err}", resp.status);
    }
    if resp.status != 200 {
        anyhow::bail!("{endpoint}: HTTP {}: {v}", resp.status);
    }
    Ok(v)
}

/// Writes the request head (the headers dockerd 20.10 sends) and the body.
fn send_request(
    stream: &mut UnixStream,
    method: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
    body: Body<'_>,
) -> io::Result<()> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n\
         Accept: application/vnd.docker.plugins.v1.2+json\r\n"
    );
    for (k, v) in extra_headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    match body {
        Body::Fixed(bytes) => {
            let _ = write!(
                head,
                "Content-Length: {}\r\nAccept-Encoding: gzip\r\n\r\n",
                bytes.len()
            );
            let mut req = head.into_bytes();
            req.extend_from_slice(bytes);
            stream.write_all(&req)
        }
        Body::Chunked(reader) => {
            head.push_str("Transfer-Encoding: chunked\r\nAccept-Encoding: gzip\r\n\r\n");
            stream.write_all(head.as_bytes())?;
            write_chunked(stream, reader)
        }
    }
}

/// Streams `r` as HTTP chunks of up to 64 KiB, one write each.
fn write_chunked(w: &mut impl Write, r: &mut dyn Read) -> io::Result<()> {
    const PREFIX: usize = 8; // "ffff\r\n" fits; the size is right-aligned in the prefix.
    let mut buf = vec![0u8; PREFIX + PIECE + 2];
    loop {
        let n = read_full(r, &mut buf[PREFIX..PREFIX + PIECE])?;
        if n == 0 {
            break;
        }
        let size = format!("{n:x}\r\n");
        let start = PREFIX - size.len();
        buf[start..PREFIX].copy_from_slice(size.as_bytes());
        buf[PREFIX + n..PREFIX + n + 2].copy_from_slice(b"\r\n");
        w.write_all(&buf[start..PREFIX + n + 2])?;
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

/// Reads until `buf` is full or the reader ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_response(r: &mut impl BufRead) -> io::Result<HttpResponse> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size =
                usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
                })?;
            if size == 0 {
                // trailers
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(len) = get("Content-Length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

// ------------------------------------------------------------------------------------------------------------
// Tar streams
// ------------------------------------------------------------------------------------------------------------

/// Builds ustar streams by hand in memory, so that entries well-behaved tools refuse to write can be made: a
/// [`TarWriter`] into a `Vec`.
#[derive(Default)]
pub struct TarBuilder {
    w: TarWriter<Vec<u8>>,
}

/// ustar header of one entry.
pub fn tar_header(name: &[u8], typeflag: u8, mode: u32, size: u64, linkname: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    let (prefix, name) = if name.len() > 100 {
        // split at a '/' so that prefix <= 155 and name <= 100
        let split = name
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'/' && i <= 155 && name.len() - i - 1 <= 100)
            .map(|(i, _)| i)
            .next()
            .unwrap_or_else(|| panic!("name too long for ustar: {}", String::from_utf8_lossy(name)));
        (&name[..split], &name[split + 1..])
    } else {
        (&name[..0], name)
    };
    h[..name.len()].copy_from_slice(name);
    let octal = |h: &mut [u8; 512], off: usize, len: usize, v: u64| {
        let s = format!("{:0width$o}", v, width = len - 1);
        h[off..off + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[156] = typeflag;
    assert!(linkname.len() <= 100, "linkname too long");
    h[157..157 + linkname.len()].copy_from_slice(linkname);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    octal(&mut h, 329, 8, 0);
    octal(&mut h, 337, 8, 0);
    h[345..345 + prefix.len()].copy_from_slice(prefix);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Writes ustar entries to any writer, streaming (file contents are never held whole when they come from
/// [`TarWriter::random_file`]).
#[derive(Default)]
pub struct TarWriter<W: Write> {
    out: W,
}

impl<W: Write> TarWriter<W> {
    /// Wraps `out`.
    pub fn new(out: W) -> Self {
        TarWriter { out }
    }

    /// Any entry: header, data, padding. Names that do not fit ustar are an error.
    pub fn entry(
        &mut self,
        name: &[u8],
        typeflag: u8,
        mode: u32,
        data: &[u8],
        linkname: &[u8],
    ) -> io::Result<()> {
        self.header(name, typeflag, mode, data.len() as u64, linkname)?;
        self.out.write_all(data)?;
        self.pad(data.len() as u64)
    }

    fn header(&mut self, name: &[u8], typeflag: u8, mode: u32, size: u64, linkname: &[u8]) -> io::Result<()> {
        if name.len() > 255 || linkname.len() > 100 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "tar name too long"));
        }
        self.out
            .write_all(&tar_header(name, typeflag, mode, size, linkname))
    }

    /// A directory (`name` ends with `/`).
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name.as_bytes(), b'5', mode, b"", b"")
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name.as_bytes(), b'2', 0o777, b"", target.as_bytes())
    }

    /// A hard link to an earlier entry.
    pub fn hardlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name.as_bytes(), b'1', 0o644, b"", target.as_bytes())
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name.as_bytes(), b'0', mode, data, b"")
    }

    /// A regular file of `size` pseudo-random bytes generated from `seed`, written in 1 MiB pieces.
    pub fn random_file(&mut self, name: &str, size: u64, seed: u64) -> io::Result<()> {
        self.header(name.as_bytes(), b'0', 0o644, size, b"")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        let mut piece = 0u64;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill_random(seed ^ (piece << 32) ^ piece, &mut buf[..n]);
            self.out.write_all(&buf[..n])?;
            left -= n as u64;
            piece += 1;
        }
        self.pad(size)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let pad = ((512 - size % 512) % 512) as usize;
        self.out.write_all(&[0u8; 512][..pad])
    }

    /// The end-of-archive blocks; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 1024])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A tar of regular files `(name, size, seed)` of pseudo-random bytes ([`TarWriter::random_file`]), written
/// by a thread into one end of a socket pair and read from the returned end: the layer is never whole on disk
/// or in memory. The writer stops when the reader goes away.
pub fn streamed_random_tar(files: Vec<(String, u64, u64)>) -> std::os::unix::net::UnixStream {
    let (r, w) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    std::thread::spawn(move || {
        let mut t = TarWriter::new(io::BufWriter::with_capacity(1 << 20, w));
        for (name, size, seed) in &files {
            if t.random_file(name, *size, *seed).is_err() {
                return;
            }
        }
        let _ = t.finish();
    });
    r
}

impl TarBuilder {
    pub fn new() -> TarBuilder {
        TarBuilder::default()
    }

    /// Any entry: header, data, padding.
    pub fn entry(&mut self, name: &[u8], typeflag: u8, mode: u32, data: &[u8], linkname: &[u8]) -> &mut Self {
        self.w
            .entry(name, typeflag, mode, data, linkname)
            .unwrap_or_else(|e| panic!("tar entry {}: {e}", String::from_utf8_lossy(name)));
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(name.as_bytes(), b'0', mode, data, b"")
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.entry(name.as_bytes(), b'5', mode, b"", b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name.as_bytes(), b'2', 0o777, b"", target.as_bytes())
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name.as_bytes(), b'1', 0o644, b"", target.as_bytes())
    }

    /// The stream with its two zero blocks.
    pub fn finish(&self) -> Vec<u8> {
        let mut v = self.w.out.clone();
        v.extend(std::iter::repeat_n(0u8, 1024));
        v
    }

    /// The stream without end-of-archive blocks.
    pub fn unterminated(&self) -> Vec<u8> {
        self.w.out.clone()
    }
}

/// xorshift64*: fast, deterministic content for big test files.
pub fn fill_random(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A streaming tar of `files` regular files `big/f<i>` of `file_size` bytes of pseudo-random content, produced
/// on the fly (never held in memory). Counts the bytes handed out so a test can act mid-stream.
pub struct RandomTar {
    files: u64,
    file_size: u64,
    index: u64,
    pending: Vec<u8>,
    pos: usize,
    done: bool,
    /// Bytes produced so far.
    pub produced: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RandomTar {
    pub fn new(files: u64, file_size: u64) -> RandomTar {
        RandomTar {
            files,
            file_size,
            index: 0,
            pending: Vec::new(),
            pos: 0,
            done: false,
            produced: Default::default(),
        }
    }

    /// Name of file `i`.
    pub fn name(i: u64) -> String {
        format!("big/f{i:05}")
    }

    /// Content of file `i`.
    pub fn content(i: u64, size: u64) -> Vec<u8> {
        let mut v = vec![0u8; size as usize];
        fill_random(i + 1, &mut v);
        v
    }

    /// Checks a directory holding a fully applied RandomTar; returns a description of the first mismatch.
    pub fn verify(dir: &Path, files: u64, file_size: u64) -> Result<(), String> {
        for i in 0..files {
            let p = dir.join(Self::name(i));
            let got = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if got != Self::content(i, file_size) {
                return Err(format!("{}: content differs ({} bytes)", p.display(), got.len()));
            }
        }
        Ok(())
    }

    fn refill(&mut self) {
        self.pending.clear();
        self.pos = 0;
        if self.index == 0 {
            self.pending
                .extend_from_slice(&tar_header(b"big/", b'5', 0o755, 0, b""));
        }
        if self.index < self.files {
            let i = self.index;
            self.pending.extend_from_slice(&tar_header(
                Self::name(i).as_bytes(),
                b'0',
                0o644,
                self.file_size,
                b"",
            ));
            self.pending.extend_from_slice(&Self::content(i, self.file_size));
            let pad = ((512 - self.file_size % 512) % 512) as usize;
            self.pending.extend(std::iter::repeat_n(0u8, pad));
            self.index += 1;
        } else if !self.done {
            self.pending.extend(std::iter::repeat_n(0u8, 1024));
            self.done = true;
        }
    }
}

impl Read for RandomTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.pending.len() {
            self.refill();
            if self.pending.is_empty() {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        self.produced.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

// ------------------------------------------------------------------------------------------------------------
// Sentinel trees and directory listings
// ------------------------------------------------------------------------------------------------------------

/// What is recorded about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryState {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub mtime: (i64, i64),
    pub content: u64,
    pub link: Option<PathBuf>,
}

/// Type, mode, owner, size, link count, mtime and content hash of `p` (not following symlinks).
pub fn entry_state(p: &Path) -> Option<EntryState> {
    let m = fs::symlink_metadata(p).ok()?;
    Some(entry_state_of(p, &m))
}

/// [`entry_state`] of `p`, whose metadata (not following it) is `m`.
pub(crate) fn entry_state_of(p: &Path, m: &fs::Metadata) -> EntryState {
    let ft = m.file_type();
    EntryState {
        kind: reliability::kind_of(&ft),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: if ft.is_dir() { 0 } else { m.size() },
        nlink: if ft.is_dir() { 0 } else { m.nlink() },
        mtime: (m.mtime(), m.mtime_nsec()),
        content: if ft.is_file() {
            reliability::content_hash(p)
        } else {
            0
        },
        link: fs::read_link(p).ok(),
    }
}

/// Every path below `root` (not following symlinks, not crossing into mounts below it), sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A recorded set of paths outside the data root: every entry of some trees, some single files, and names
/// that must stay absent.
pub struct Sentinel {
    recorded: BTreeMap<PathBuf, Option<EntryState>>,
    trees: Vec<PathBuf>,
}

impl Sentinel {
    /// Creates a sentinel tree in `dir`: files, a directory, a symlink, a setuid file, a hardlink.
    pub fn make_tree(dir: &Path) {
        fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        fs::write(dir.join("file"), b"sentinel file\n").unwrap();
        fs::write(dir.join("sub/deeper/data"), vec![7u8; 10_000]).unwrap();
        fs::write(dir.join("setuid"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(dir.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
        let _ = std::os::unix::fs::symlink("/etc/passwd", dir.join("link"));
        let _ = fs::hard_link(dir.join("file"), dir.join("hardlink"));
    }

    /// Records every entry below each of `trees` plus each of `files` (which may not exist).
    pub fn capture(trees: &[&Path], files: &[&Path]) -> Sentinel {
        let mut recorded = record_trees(trees, entry_state);
        for f in files {
            recorded.insert(f.to_path_buf(), entry_state(f));
        }
        Sentinel {
            recorded,
            trees: trees.iter().map(|p| p.to_path_buf()).collect(),
        }
    }

    /// Panics with every difference since `capture`.
    pub fn assert_unchanged(&self, case: &str) {
        let diffs = tree_diffs(&self.recorded, &self.trees, entry_state);
        assert!(
            diffs.is_empty(),
            "{case}: changed outside the layer:\n{}",
            diffs.join("\n")
        );
    }
}

/// The state of every entry at and below each of `trees`.
pub(crate) fn record_trees<S>(trees: &[&Path], state: impl Fn(&Path) -> S) -> BTreeMap<PathBuf, S> {
    let mut recorded = BTreeMap::new();
    for t in trees {
        recorded.insert(t.to_path_buf(), state(t));
        for p in walk(t) {
            let st = state(&p);
            recorded.insert(p, st);
        }
    }
    recorded
}

/// Every difference between `recorded` and now: changed or removed entries, and entries new below `trees`.
pub(crate) fn tree_diffs<S: PartialEq + std::fmt::Debug>(
    recorded: &BTreeMap<PathBuf, S>,
    trees: &[PathBuf],
    state: impl Fn(&Path) -> S,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (p, before) in recorded {
        let now = state(p);
        if &now != before {
            diffs.push(format!("{}: {before:?} -> {now:?}", p.display()));
        }
    }
    for t in trees {
        for p in walk(t) {
            if !recorded.contains_key(&p) {
                diffs.push(format!("{}: new entry", p.display()));
            }
        }
    }
    diffs
}

/// Names (non-recursively) in `dir` that contain `marker`.
pub fn names_containing(dir: &Path, marker: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .as_bytes()
                        .windows(marker.len())
                        .any(|w| w == marker.as_bytes())
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshot of a data root for leak checks: every path below it, with directories marked.
pub fn tree_snapshot(root: &Path) -> BTreeSet<(PathBuf, bool)> {
    walk(root)
        .into_iter()
        .map(|p| {
            let is_dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
            (p, is_dir)
        })
        .collect()
}

/// Paths present in `after` but not in `before`, ignoring empty directories.
pub fn leaked_paths(before: &BTreeSet<(PathBuf, bool)>, after: &BTreeSet<(PathBuf, bool)>) -> Vec<PathBuf> {
    let before_paths: BTreeSet<&PathBuf> = before.iter().map(|(p, _)| p).collect();
    after
        .iter()
        .filter(|(p, is_dir)| {
            let empty_dir = *is_dir && fs::read_dir(p).map(|mut rd| rd.next().is_none()).unwrap_or(true);
            !before_paths.contains(p) && !empty_dir
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// Sum of regular-file sizes below `root`.
pub fn bytes_under(root: &Path) -> u64 {
    walk(root)
        .iter()
        .filter_map(|p| fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
