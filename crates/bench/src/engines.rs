//! The engines a benchmark measures, on `lamina-testkit`'s launchers: `lamina serve`, dockerd (with its own containerd),
//! plus the helpers every workload needs (a busybox image, an RSS sampler, dropping caches).
//!
//! Every process gets its own directories under the workload's scratch dir and is stopped **by PID** in
//! `Drop` (SIGTERM, then SIGKILL after a grace period), also when the workload fails half-way. Children that
//! dockerd starts (containerd, shims) are found by PID through their command lines, which name the daemon's
//! own directory; nothing is ever killed by name.

// A toolkit shared by every workload module: not each helper is used by each workload.
#![allow(dead_code)]

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use lamina_testkit::{
    busybox_image, kill_pids_referencing, unique_name, unmount_under, Dockerd, Lamina, Session, PLUGIN_DIR,
};

use super::Ctx;

/// Short-pathed runtime directories of the dockerds a run starts (exec roots, API sockets).
pub const RUN_DIR: &str = "/run/lamina-bench";

/// Runs a command to completion (stdin closed); fails with its output unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    lamina_testkit::check_output(&format!("{cmd:?}"), &out).map_err(anyhow::Error::msg)?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------------------------
// lamina serve
// ------------------------------------------------------------------------------------------------------------

/// A `lamina serve` (not started) whose data root, plugin socket and log live in `ctx.scratch/<tag>/`; no
/// snapshotter socket.
pub fn lamina(ctx: &Ctx, tag: &str) -> Lamina {
    let dir = ctx.scratch.join(tag);
    let mut l = Lamina::in_dir(tag, &dir).plugin_socket(&dir.join("plugin.sock"));
    l.log_level = "warn".into();
    l.exe = ctx.lamina_exe.clone();
    l
}

/// Starts `l` and waits until its sockets answer.
pub fn start(mut l: Lamina) -> Lamina {
    l.spawn();
    l.wait_ready();
    l
}

/// SIGTERM and wait; fails unless lamina exits 0.
pub fn stop(l: &mut Lamina) -> Result<()> {
    let st = l.stop();
    if !st.success() {
        bail!("lamina serve exited with {st}; log:\n{}", l.log_tail());
    }
    Ok(())
}

/// A keep-alive session on the plugin socket (600 s per call).
pub fn session(l: &Lamina) -> Session {
    let mut c = l.client().session();
    c.set_timeout(Duration::from_secs(600));
    c
}

/// A session that has done dockerd's handshake (`Plugin.Activate`, `GraphDriver.Init`).
pub fn graph_session(l: &Lamina) -> Result<Session> {
    let mut c = session(l);
    c.handshake(&l.dir().join("home"))?;
    Ok(c)
}

// ------------------------------------------------------------------------------------------------------------
// dockerd
// ------------------------------------------------------------------------------------------------------------

/// Starts a dockerd (`-s <driver>`) with its data in `ctx.scratch/<tag>/` and its exec root and API socket in
/// [`RUN_DIR`]`/<pid>-<n>`, and waits until `docker info` reports that driver.
///
/// dockerd 20.10 starts its own containerd unless a system one answers on /run/containerd/containerd.sock;
/// the unique namespaces keep this daemon's images and containers apart in both cases.
pub fn dockerd(ctx: &Ctx, tag: &str, driver: &str) -> Result<Dockerd> {
    let mut d = Dockerd::in_dirs(driver, &ctx.scratch.join(tag), &Path::new(RUN_DIR).join(run_id()));
    d.log_level = "warn".into();
    d.spawn();
    d.wait_ready();
    Ok(d)
}

/// `<pid>-<n>`, unique to this process and call: the name of a runtime directory under [`RUN_DIR`].
pub fn run_id() -> String {
    unique_name("bench")
        .trim_start_matches("lamina-test-bench-")
        .to_string()
}

// ------------------------------------------------------------------------------------------------------------
// Measuring helpers
// ------------------------------------------------------------------------------------------------------------

/// A value in KiB from `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `RssAnon`, ...).
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    status_kib(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?, key)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU seconds (user + sys, all threads) of a process, from `/proc/<pid>/stat` (`pid` may be `self`).
pub fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state is field 3, utime 14, stime 15 (USER_HZ = 100).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Samples a process's memory in a thread until [`RssSampler::finish`].
pub struct RssSampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(u64, u64)>,
}

/// What [`RssSampler::finish`] returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct RssPeak {
    /// Highest sampled VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM at the end (the kernel's own peak since the reset), KiB.
    pub hwm_kib: u64,
    /// Samples taken.
    pub samples: u64,
}

impl RssPeak {
    /// The larger of the sampled peak and VmHWM, in MiB.
    pub fn peak_mib(&self) -> f64 {
        self.rss_kib.max(self.hwm_kib) as f64 / 1024.0
    }
}

impl RssSampler {
    /// Resets the process's VmHWM (`clear_refs` 5) and samples VmRSS every `every`.
    pub fn start(pid: u32, every: Duration) -> Self {
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let (mut peak, mut n) = (0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                if let Some(v) = proc_status_kib(pid, "VmRSS") {
                    peak = peak.max(v);
                    n += 1;
                }
                thread::sleep(every);
            }
            (peak, n)
        });
        RssSampler { pid, stop, handle }
    }

    /// Stops sampling; returns the peak.
    pub fn finish(self) -> RssPeak {
        self.stop.store(true, Ordering::Relaxed);
        let (rss_kib, samples) = self.handle.join().unwrap_or((0, 0));
        RssPeak {
            rss_kib,
            hwm_kib: proc_status_kib(self.pid, "VmHWM").unwrap_or(0),
            samples,
        }
    }
}

/// Writes the dirty data of the measured filesystem out (`sync -f`: one `syncfs` of the filesystem holding
/// `scratch`) and drops the page, dentry and inode caches, for cold figures. Not a global `sync`: that waits for
/// every filesystem of the machine, and one that cannot write (a wedged FUSE or loop device of another user)
/// would hang the run.
pub fn drop_caches(scratch: &Path) -> Result<()> {
    run_checked(Command::new("sync").arg("-f").arg(scratch))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .context("opening /proc/sys/vm/drop_caches (root needed)")?;
    f.write_all(b"3\n").context("writing /proc/sys/vm/drop_caches")?;
    Ok(())
}

/// Reads a file to the end (into nothing), so it sits in the page cache before a timed run.
pub fn warm_file(path: &Path) -> Result<()> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut std::io::sink()).with_context(|| format!("reading {}", path.display()))?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// lamina's own metrics
// ------------------------------------------------------------------------------------------------------------

/// lamina's latency histogram of one `protocol`/`op` (`--metrics-address unix:PATH`) at one moment: the
/// cumulative count per bucket bound in seconds (`+Inf` last), the sum and the count. Two readings
/// subtracted give the calls in between; lamina times a call from its dispatch to its answer, without the RPC.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Served {
    /// Reads the histogram of `protocol`/`op` (e.g. `graphdriver`/`Get`) from lamina's metrics socket.
    pub fn read(metrics: &Path, protocol: &str, op: &str) -> Result<Served> {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(metrics)
            .with_context(|| format!("connect {}", metrics.display()))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lamina\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let name = "lamina_request_duration_seconds";
        let labels = format!("protocol=\"{protocol}\",op=\"{op}\"");
        let mut out = Served::default();
        let bucket = format!("{name}_bucket{{{labels},le=\"");
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix(&bucket) {
                let (le, v) = rest.split_once("\"} ").unwrap_or_default();
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse()? };
                out.buckets.push((le, v.trim().parse()?));
            } else if let Some(v) = l.strip_prefix(&format!("{name}_sum{{{labels}}} ")) {
                out.sum = v.trim().parse()?;
            } else if let Some(v) = l.strip_prefix(&format!("{name}_count{{{labels}}} ")) {
                out.count = v.trim().parse()?;
            }
        }
        Ok(out)
    }

    /// Calls made since `before`: their count, mean and the `q`-quantile (0..1), in seconds. The quantile is
    /// interpolated linearly inside its bucket (as Prometheus' `histogram_quantile`); one in the `+Inf`
    /// bucket is given as the last finite bound.
    pub fn since(&self, before: &Served, q: f64) -> (f64, f64, f64) {
        let n = self.count - before.count;
        if n <= 0.0 {
            return (0.0, f64::NAN, f64::NAN);
        }
        let mean = (self.sum - before.sum) / n;
        let rank = q * n;
        let mut lower = (0.0, 0.0);
        for (i, (le, c)) in self.buckets.iter().enumerate() {
            let c = c - before.buckets.get(i).map_or(0.0, |b| b.1);
            if c >= rank {
                if le.is_infinite() {
                    return (n, mean, lower.0);
                }
                let width = c - lower.1;
                let frac = if width > 0.0 {
                    (rank - lower.1) / width
                } else {
                    1.0
                };
                return (n, mean, lower.0 + (le - lower.0) * frac);
            }
            lower = (*le, c);
        }
        (n, mean, lower.0)
    }
}
