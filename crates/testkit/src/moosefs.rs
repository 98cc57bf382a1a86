//! A throw-away MooseFS cluster for the volume tests: one master and two (or more) chunkservers in their own
//! network namespace (MooseFS refuses 127.0.0.0/8 on both sides, so they use 198.18.X.1, .2, ... on the
//! namespace's `lo`), with a veth pair that gives the host 198.18.X.254, so that lamina's `mfsmount` and the
//! `mfs*` tools run unmodified in the root namespace. Daemons run in the foreground (`-f`) as children of the
//! test and are stopped by PID on drop; the namespace (and with it the veth pair) is deleted last.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Programs the cluster needs.
const MFS_BINS: &[&str] = &[
    "mfsmaster",
    "mfschunkserver",
    "mfsmount",
    "mfssetgoal",
    "mfsgetgoal",
    "mfscli",
];
/// Debian packages that provide them.
const MFS_PACKAGES: &[&str] = &[
    "moosefs-master",
    "moosefs-chunkserver",
    "moosefs-client",
    "moosefs-cli",
];
/// The empty metadata file shipped by moosefs-master.
const EMPTY_METADATA: &str = "/var/lib/mfs/metadata.mfs.empty";

/// True if the MooseFS programs and the empty metadata file are installed.
pub fn have_moosefs() -> bool {
    MFS_BINS.iter().all(|b| find_bin(b).is_some()) && Path::new(EMPTY_METADATA).exists()
}

/// Root, `ip`, `nsenter` and the MooseFS programs (installed with apt-get when missing and we are root).
pub fn require_moosefs(test: &str) -> bool {
    if !require_root(test) || !require_bin(test, "ip") || !require_bin(test, "nsenter") {
        return false;
    }
    super::require_packages(
        test,
        "the MooseFS packages (moosefs-master, -chunkserver, -client, -cli)",
        have_moosefs,
        MFS_PACKAGES,
    )
}

/// A running test cluster.
pub struct MooseCluster {
    /// Network namespace name.
    pub ns: String,
    /// `198.18.X`.
    pub prefix: String,
    /// Time from the first command to all chunkservers registered.
    pub start_time: Duration,
    master: Option<Child>,
    chunkservers: Vec<Option<Child>>,
    dir: PathBuf,
    _dir: Option<TestDir>,
}

/// A free `198.18.X` block (no address of it on the host yet).
fn free_prefix() -> String {
    let out = Command::new("ip")
        .args(["-o", "addr"])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&out).into_owned();
    let start = (std::process::id() % 200) as usize + 20;
    for i in 0..200 {
        let x = (start + i) % 250 + 1;
        let p = format!("198.18.{x}");
        if !text.contains(&format!("{p}.")) {
            return p;
        }
    }
    panic!("no free 198.18.X/24 block");
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

impl MooseCluster {
    /// Builds the namespace, writes the configs, starts the master and two chunkservers, and waits until
    /// both chunkservers are registered and report space.
    pub fn start(tag: &str) -> MooseCluster {
        MooseCluster::start_n(tag, 2)
    }

    /// Like [`MooseCluster::start`] with `n` chunkservers (1-8) at `198.18.X.2` .. `198.18.X.(n+1)`.
    pub fn start_n(tag: &str, n_cs: usize) -> MooseCluster {
        let dir = TestDir::new(&unique_name(&format!("mfs-{tag}")));
        let mut c = MooseCluster::start_in(dir.path(), n_cs);
        c._dir = Some(dir);
        c
    }

    /// Like [`MooseCluster::start_n`] with configs, disks and logs in `dir` (created, not removed).
    pub fn start_in(dir: &Path, n_cs: usize) -> MooseCluster {
        assert!((1..=8).contains(&n_cs), "1-8 chunkservers");
        let t0 = Instant::now();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let n = SEQ_MFS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ns = format!("lmfs{}-{n}", std::process::id());
        let prefix = free_prefix();
        let veth = format!("lv{}{n}", std::process::id() % 100_000);
        let mut c = MooseCluster {
            ns: ns.clone(),
            prefix: prefix.clone(),
            start_time: Duration::ZERO,
            master: None,
            chunkservers: (0..n_cs).map(|_| None).collect(),
            dir: dir.to_path_buf(),
            _dir: None,
        };
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        for i in 1..=n_cs + 1 {
            ip(&["-n", &ns, "addr", "add", &format!("{prefix}.{i}/32"), "dev", "lo"]);
        }
        ip(&[
            "link",
            "add",
            &format!("{veth}h"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("{veth}n"),
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{prefix}.10/24"),
            "dev",
            &format!("{veth}n"),
        ]);
        ip(&["-n", &ns, "link", "set", &format!("{veth}n"), "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{prefix}.254/24"),
            "dev",
            &format!("{veth}h"),
        ]);
        ip(&["link", "set", &format!("{veth}h"), "up"]);

        let b = c.dir.clone();
        fs::create_dir_all(b.join("master")).unwrap();
        for i in 1..=n_cs {
            fs::create_dir_all(b.join(format!("cs{i}/hdd"))).unwrap();
        }
        fs::copy(EMPTY_METADATA, b.join("master/metadata.mfs")).unwrap();
        fs::write(b.join("mfsexports.cfg"), "*  /  rw,alldirs,admin,maproot=0:0\n").unwrap();
        fs::write(b.join("mfstopology.cfg"), "").unwrap();
        fs::write(
            b.join("mfsmaster.cfg"),
            format!(
                "WORKING_USER = root\nWORKING_GROUP = root\nNICE_LEVEL = 0\nDATA_PATH = {m}\nEXPORTS_FILENAME = {b}/mfsexports.cfg\n\
                 TOPOLOGY_FILENAME = {b}/mfstopology.cfg\nMATOML_LISTEN_HOST = {prefix}.1\nMATOCS_LISTEN_HOST = {prefix}.1\n\
                 MATOCL_LISTEN_HOST = {prefix}.1\nREPLICATIONS_DELAY_INIT = 0\nCHUNKS_LOOP_MIN_TIME = 1\n",
                m = b.join("master").display(),
                b = b.display()
            ),
        )
        .unwrap();
        for i in 1..=n_cs {
            let cs = b.join(format!("cs{i}"));
            fs::write(cs.join("mfshdd.cfg"), format!("{}\n", cs.join("hdd").display())).unwrap();
            fs::write(
                cs.join("mfschunkserver.cfg"),
                format!(
                    "WORKING_USER = root\nWORKING_GROUP = root\nNICE_LEVEL = 0\nDATA_PATH = {d}\nHDD_CONF_FILENAME = {d}/mfshdd.cfg\n\
                     HDD_LEAVE_SPACE_DEFAULT = 64MiB\nBIND_HOST = {prefix}.{ip}\nCSSERV_LISTEN_HOST = {prefix}.{ip}\n\
                     MASTER_HOST = {prefix}.1\nMASTER_RECONNECTION_DELAY = 1\n",
                    d = cs.display(),
                    ip = i + 1
                ),
            )
            .unwrap();
        }
        c.start_master(false);
        for i in 0..n_cs {
            c.start_chunkserver(i);
        }
        c.wait_registered(n_cs, Duration::from_secs(30));
        c.start_time = t0.elapsed();
        eprintln!("MooseFS cluster {} ({prefix}.1) up in {:?}", c.ns, c.start_time);
        c
    }

    /// Waits until `n` chunkservers are registered with the master; panics with the logs after `timeout`.
    /// The time it took.
    pub fn wait_registered(&self, n: usize, timeout: Duration) -> Duration {
        let t = Instant::now();
        let ok = poll(timeout, || (self.registered_chunkservers() >= n).then_some(()));
        assert!(
            ok.is_some(),
            "{n} chunkservers not registered within {timeout:?}:\n{}",
            self.logs()
        );
        t.elapsed()
    }

    fn in_ns(&self, prog: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns)).arg(prog);
        cmd
    }

    fn spawn_logged(&self, mut cmd: Command, log: &str) -> Child {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
    }

    /// Starts the master in the foreground; `recover` adds `-a` (needed after a kill -9). Waits up to 180 s
    /// for it to listen: a restarted master was seen to take about 2 minutes on a loaded machine.
    pub fn start_master(&mut self, recover: bool) -> Duration {
        let extra: &[&str] = if recover { &["-a"] } else { &[] };
        self.try_start_master(extra)
            .unwrap_or_else(|e| panic!("{e}:\n{}", self.logs()))
    }

    /// Starts the master with `extra` options (`-a`, `-i`, ...); returns how long it took to listen, or why
    /// not (it exited, or did not listen within 180 s).
    pub fn try_start_master(&mut self, extra: &[&str]) -> Result<Duration, String> {
        let t0 = Instant::now();
        let mut cmd = self.in_ns("mfsmaster");
        cmd.arg("-f").args(extra);
        cmd.arg("-c").arg(self.dir.join("mfsmaster.cfg")).arg("start");
        self.master = Some(self.spawn_logged(cmd, "master.log"));
        let addr = self.master_addr();
        let up = poll(Duration::from_secs(180), || {
            if let Some(Ok(Some(st))) = self.master.as_mut().map(|m| m.try_wait()) {
                return Some(Err(format!("mfsmaster {} exited ({st})", extra.join(" "))));
            }
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(300))
                .ok()
                .map(|_| Ok(()))
        });
        match up {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                self.master = None;
                return Err(e);
            }
            None => return Err(format!("mfsmaster did not listen on {addr} within 180 s")),
        }
        let took = t0.elapsed();
        if took > Duration::from_secs(10) {
            eprintln!("warning: mfsmaster took {took:?} to listen on {addr}");
        }
        Ok(took)
    }

    /// Starts chunkserver `i` (0-based) in the foreground (again, after [`MooseCluster::kill_chunkserver`]).
    pub fn start_chunkserver(&mut self, i: usize) {
        let mut cmd = self.in_ns("mfschunkserver");
        cmd.arg("-f")
            .arg("-c")
            .arg(self.dir.join(format!("cs{}/mfschunkserver.cfg", i + 1)))
            .arg("start");
        self.chunkservers[i] = Some(self.spawn_logged(cmd, &format!("cs{}.log", i + 1)));
    }

    /// SIGKILLs the master and waits until it is gone.
    pub fn kill_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        // Its data-writer helper is a child of the master: wait until nothing listens.
        let addr = self.master_addr();
        poll(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
                .is_err()
                .then_some(())
        });
    }

    /// SIGTERMs the master by PID and waits (up to 60 s, then SIGKILL) until it has exited and nothing
    /// listens on its port. Returns true when it exited by itself (metadata saved: no `-a` needed to start).
    pub fn stop_master(&mut self) -> bool {
        let clean = match self.master.take() {
            Some(mut m) => stop_child(&mut m, Duration::from_secs(60)).is_some(),
            None => true,
        };
        let addr = self.master_addr();
        poll(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
                .is_err()
                .then_some(())
        });
        clean
    }

    /// PID of the running master.
    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// PID of chunkserver `i` while it runs.
    pub fn chunkserver_pid(&self, i: usize) -> Option<u32> {
        self.chunkservers[i].as_ref().map(Child::id)
    }

    /// Number of chunkservers configured.
    pub fn chunkserver_count(&self) -> usize {
        self.chunkservers.len()
    }

    /// SIGKILLs chunkserver `i` by PID and reaps it.
    pub fn kill_chunkserver(&mut self, i: usize) {
        if let Some(mut c) = self.chunkservers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `198.18.X.1:9421`.
    pub fn master_addr(&self) -> String {
        format!("{}.1:9421", self.prefix)
    }

    /// Master host.
    pub fn master_host(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Keys of lamina's `[volumes]` for volumes on this cluster with a deadline of `timeout_secs`, then its
    /// `[volumes.moosefs]` table naming this master followed by the lines `more` (newline-terminated).
    pub fn volumes_toml(&self, timeout_secs: u64, more: &str) -> String {
        format!(
            "backend = \"moosefs\"\ntimeout_secs = {timeout_secs}\n[volumes.moosefs]\nmaster = \"{}\"\n{more}",
            self.master_addr()
        )
    }

    /// Chunkservers registered with space, as `mfscli -SCS` reports.
    pub fn registered_chunkservers(&self) -> usize {
        let out = Command::new(find_bin("mfscli").unwrap())
            .args(["-H", &self.master_host(), "-SCS"])
            .stderr(Stdio::null())
            .output();
        let Ok(out) = out else { return 0 };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                f.first() == Some(&"chunk servers:")
                    && f.get(9).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0) > 0.0
            })
            .count()
    }

    /// A bare `mfsmount` of `subfolder` at `at` (the caller unmounts it, or the test directory's drop does).
    pub fn mount(&self, at: &Path, subfolder: &str) {
        fs::create_dir_all(at).unwrap();
        run_ok(Command::new(find_bin("mfsmount").unwrap()).arg(at).args([
            "-H",
            &self.master_host(),
            "-S",
            subfolder,
        ]));
    }

    /// The cluster's own directory (logs, configs, disks).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemons' logs (last lines each).
    pub fn logs(&self) -> String {
        let mut logs = vec!["master.log".to_string()];
        logs.extend((1..=self.chunkservers.len()).map(|i| format!("cs{i}.log")));
        logs.iter()
            .map(|l| format!("--- {l} ---\n{}", tail(&self.dir.join(l), 20)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Where a test may create its own mountpoints (removed with the cluster).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// `mfsmount` processes serving `dir` (their command line names the mountpoint below it).
pub fn mfsmount_pids(dir: &Path) -> Vec<u32> {
    pids_referencing(dir)
        .into_iter()
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    // A mounted mfsmount renames itself "mfsmount (mounted on: PATH)".
                    let argv0 = c.split(|b| *b == 0).next().unwrap_or_default();
                    argv0.starts_with(b"mfsmount") || argv0.ends_with(b"/mfsmount")
                })
                .unwrap_or(false)
        })
        .collect()
}

static SEQ_MFS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for MooseCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- MooseFS cluster {} -----\n{}", self.ns, self.logs());
        }
        // Client mounts of this cluster first (they would block on a dead master), then the daemons by PID.
        unmount_under(&self.dir);
        for c in self.chunkservers.iter_mut().flatten() {
            stop_child(c, Duration::from_secs(10));
        }
        if let Some(m) = self.master.as_mut() {
            stop_child(m, Duration::from_secs(15));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
