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
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use lamina_testkit::{
    kill_pids_referencing, pids_referencing, signal, stop_child, tail, unique_name, unmount_under, Lamina,
    Session, PLUGIN_DIR,
};

use super::Ctx;
/// Short-pathed runtime directories of the dockerds a run starts (exec roots, API sockets).
pub const RUN_DIR: &str = "/run/lamina-bench";
/// dockerd of Debian's docker.io (20.10, the last series with graph-driver plugins).
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The docker CLI matching it (not whichever `docker` comes first in PATH).
pub const DOCKER_CLI: &str = "/usr/bin/docker";

fn open_log(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Runs a command to completion; fails with its stderr unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end()
        );
    }
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

/// A dockerd with its own data root (in `ctx.scratch/<tag>/`), exec root and API socket (in [`RUN_DIR`]) and
/// containerd namespaces.
///
/// dockerd 20.10 starts its own containerd unless a system one answers on /run/containerd/containerd.sock;
/// the unique namespaces keep this daemon's images and containers apart in both cases.
pub struct Dockerd {
    /// `-s` value: `overlay2` or a plugin name.
    pub driver: String,
    /// `unix://<dir>/docker.sock`, for `DOCKER_HOST`.
    pub host: String,
    /// dockerd's log.
    pub log: PathBuf,
    dir: PathBuf,
    run: PathBuf,
    child: Option<Child>,
    cleaned: bool,
}

impl Dockerd {
    /// Starts dockerd with `-s <driver>` (plus `--experimental` unless the driver is built in) and waits
    /// (up to 90 s: dockerd retries a plugin that is not up yet) until `docker info` reports that driver.
    pub fn start(ctx: &Ctx, tag: &str, driver: &str) -> Result<Dockerd> {
        let dir = ctx.scratch.join(tag);
        for sub in ["root", "cli"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.display()))?;
        }
        let id = unique_name("bench");
        // The exec root and API socket go to a short path on /run: containerd's sockets below the exec root
        // must fit in a unix socket address (104 bytes for containerd), which a scratch path may not.
        let run = Path::new(RUN_DIR).join(id.trim_start_matches("lamina-bench-"));
        fs::create_dir_all(run.join("exec")).with_context(|| format!("creating {}", run.display()))?;
        let log_path = dir.join("dockerd.log");
        let log = open_log(&log_path)?;
        let builtin = matches!(
            driver,
            "overlay2" | "vfs" | "btrfs" | "devicemapper" | "fuse-overlayfs"
        );
        let host = format!("unix://{}", run.join("docker.sock").display());
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(run.join("exec"))
            .arg("--pidfile")
            .arg(run.join("dockerd.pid"))
            .arg("-H")
            .arg(&host)
            .arg("-s")
            .arg(driver)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-forward=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--shutdown-timeout=3",
                "--log-level=warn",
            ])
            .arg(format!("--containerd-namespace={id}"))
            .arg(format!("--containerd-plugins-namespace={id}-p"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !builtin {
            cmd.arg("--experimental");
        }
        let child = cmd.spawn().with_context(|| format!("starting {DOCKERD}"))?;
        let mut d = Dockerd {
            driver: driver.to_string(),
            host,
            log: log_path,
            dir,
            run,
            child: Some(child),
            cleaned: false,
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!(
                    "dockerd -s {} exited during start-up ({st}); log:\n{}",
                    self.driver,
                    tail(&self.log, 20)
                );
            }
            let out = self.docker_cmd(&["info", "--format", "{{.Driver}}"]).output();
            if let Ok(out) = out {
                if out.status.success() {
                    let driver = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if driver != self.driver {
                        bail!(
                            "dockerd reports storage driver {driver:?}, asked for {:?}",
                            self.driver
                        );
                    }
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd -s {} not ready within 90 s; log:\n{}",
                    self.driver,
                    tail(&self.log, 20)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// This daemon's directory on the scratch filesystem (`root/`, `cli/`, `dockerd.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// dockerd's `--data-root`.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// PID of dockerd.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A `docker` CLI command (Debian's 20.10 client) aimed at this daemon, with a private CLI config.
    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER_CLI);
        cmd.args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "0")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `docker <args>`; fails (with stderr) unless it exits 0.
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        let out = self
            .docker_cmd(args)
            .output()
            .with_context(|| format!("running {DOCKER_CLI}"))?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed ({}) on dockerd -s {}: {}",
                args.join(" "),
                out.status,
                self.driver,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(out)
    }

    /// Runs `docker <args>` and returns its trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// SIGTERM and wait (60 s, then SIGKILL); then its containerd and shims, then its mounts.
    pub fn stop(&mut self) -> Result<()> {
        let st = self
            .child
            .take()
            .map(|mut c| stop_child(&mut c, Duration::from_secs(60)));
        self.cleanup();
        match st {
            Some(None) => bail!("dockerd ignored SIGTERM for 60 s and was killed"),
            _ => Ok(()),
        }
    }

    /// The exec root (`/run/lamina-bench/<pid>-<n>/exec`).
    pub fn exec_root(&self) -> PathBuf {
        self.run.join("exec")
    }

    fn cleanup(&mut self) {
        self.cleaned = true;
        // containerd exits on its own shortly after dockerd; give it a moment, then kill what is left.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (!pids_referencing(&self.run).is_empty() || !pids_referencing(&self.dir).is_empty())
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(100));
        }
        kill_pids_referencing(&self.run);
        kill_pids_referencing(&self.dir);
        unmount_under(&self.run);
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.run);
        let _ = fs::remove_dir(RUN_DIR);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(30));
        }
        // Also after a failed start: the containerd it started may still run.
        if !self.cleaned {
            self.cleanup();
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// busybox image
// ------------------------------------------------------------------------------------------------------------

/// The static busybox (Debian's busybox-static).
fn busybox_path() -> Result<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("busybox not found: install busybox-static")
}

/// Writes a minimal root filesystem to `dir`: busybox plus one symlink per applet, `/etc/passwd`, `/etc/group`,
/// `/tmp` (1777), `/root`.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = busybox_path()?;
    for d in ["bin", "etc", "tmp", "root"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy(&busybox, dir.join("bin/busybox"))?;
    fs::set_permissions(dir.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700))?;
    let list = run_checked(Command::new(&busybox).arg("--list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// `docker import`s a busybox rootfs (tarred with GNU tar) as `tag`; returns the image id.
pub fn busybox_image(docker: &Dockerd, tag: &str) -> Result<String> {
    let safe: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let rootfs = docker.dir().join(format!("bb-rootfs-{safe}"));
    let tarball = docker.dir().join(format!("bb-{safe}.tar"));
    busybox_rootfs(&rootfs)?;
    run_checked(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    )?;
    fs::remove_dir_all(&rootfs).ok();
    let tarball_s = tarball.to_string_lossy().into_owned();
    let id = docker.ok(&["import", "--change", "CMD [\"/bin/sh\"]", &tarball_s, tag])?;
    fs::remove_file(&tarball).ok();
    Ok(id)
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

/// Writes dirty data out (`sync`) and drops the page, dentry and inode caches, for cold figures.
pub fn drop_caches() -> Result<()> {
    run_checked(&mut Command::new("sync"))?;
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
