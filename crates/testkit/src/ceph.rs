//! A throw-away Ceph cluster for the RBD tests: one monitor and one OSD on 127.0.0.1, one replica per object,
//! cephx off, every file (config, monmap, mon store, OSD store, run dir, logs) in one test directory, no mgr.
//!
//! The OSD keeps its objects in RAM (`memstore`, a 2 GiB device) by default: the cluster is up in 7.3-8.3 s
//! where bluestore on a sparse file takes 10.9-11.6 s, and a volume test writes a few MiB (measured RSS of the
//! memstore OSD: 39 MB idle, 171 MB after 64 MiB written; bluestore: 47 and 65 MB);
//! [`ObjectStore::Bluestore`] (on a sparse 10 GiB file in the test directory) is there for tests that need
//! data to survive an OSD restart. Without a mgr the cluster serves RBD normally; what needs a mgr (pool
//! usage statistics, and with them pool quotas) is not available: [`CephCluster::start_mgr`] adds one (about
//! 300 MB of RSS; it sets the cluster's usage reports to every second, so that a pool over its quota is flagged
//! `full_quota` 1-2.5 s after the write that passed the quota).
//!
//! Addresses: the monitor listens on `127.0.0.1:P` (msgr v2) and `P+1` (v1), with `P` chosen free per cluster,
//! so that two test binaries can each run one; the OSD binds its public and cluster messengers to 127.0.0.1
//! (`cluster addr` set: without it the cluster and heartbeat messengers listen on 0.0.0.0) on ports Ceph picks
//! from 6800-7300.
//!
//! Daemons run in the foreground as children of the test and are stopped by PID in `Drop`, also on panic:
//! first the clients of this cluster (processes whose command line names its directory, such as the rbd-fuse
//! processes of a lamina configured with its `ceph.conf`), then the OSD while the monitor is still up (an OSD
//! whose monitor is gone waits 5 s more), then the monitor.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Programs a cluster and lamina's rbd volumes need.
const CEPH_BINS: &[&str] = &[
    "ceph-mon",
    "ceph-osd",
    "monmaptool",
    "ceph",
    "rbd",
    "rbd-fuse",
    "losetup",
    "mkfs.ext4",
];
/// Debian packages that provide them (`losetup` and `mkfs.ext4` come with every Debian).
const CEPH_PACKAGES: &[&str] = &["ceph-mon", "ceph-osd", "ceph-common", "rbd-fuse"];

/// True if the Ceph programs are installed.
pub fn have_ceph() -> bool {
    CEPH_BINS.iter().all(|b| find_bin(b).is_some())
}

/// True if `ceph-mgr` is installed (package ceph-mgr; only the pool quota test needs it).
pub fn have_ceph_mgr() -> bool {
    find_bin("ceph-mgr").is_some()
}

/// [`require_ceph`] and the ceph-mgr package (installed with apt-get when missing).
pub fn require_ceph_mgr(test: &str) -> bool {
    if !require_ceph(test) {
        return false;
    }
    if !have_ceph_mgr() {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            eprintln!("installing ceph-mgr with apt-get");
            let st = Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "ceph-mgr"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            eprintln!("apt-get: {st:?}");
        });
    }
    have_ceph_mgr() || super::skip(test, "the ceph-mgr package")
}

/// True if this kernel has the rbd block driver (`rbd device map` works). Not needed by the tests: images
/// reach the host through rbd-fuse and a loop device.
pub fn have_krbd() -> bool {
    Path::new("/sys/bus/rbd").exists()
}

/// Root, FUSE, loop devices and the Ceph programs (installed with apt-get when missing and we are root). A
/// missing package is a failure under CI; missing FUSE or loop support is a skip naming the kernel feature.
pub fn require_ceph(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    if !require_kernel_feature(test, "FUSE (/dev/fuse)", Path::new("/dev/fuse").exists())
        || !require_kernel_feature(
            test,
            "loop devices (/dev/loop-control)",
            Path::new("/dev/loop-control").exists(),
        )
    {
        return false;
    }
    super::require_packages(
        test,
        "the Ceph packages (ceph-mon, ceph-osd, ceph-common, rbd-fuse)",
        have_ceph,
        CEPH_PACKAGES,
    )
}

/// The `[store]` table of a lamina whose layers are images `<prefix><n>` in `pool` of the cluster configured by
/// `ceph_conf`, reached through rbd-fuse, base layers of 1 GiB (thin) with filesystem `fs` (`ext4` or `xfs`),
/// `timeout_secs` per cluster call.
pub fn rbd_store_toml(ceph_conf: &Path, pool: &str, prefix: &str, fs: &str, timeout_secs: u64) -> String {
    format!(
        "[store]\nbackend = \"rbd\"\n[store.rbd]\nceph_conf = \"{}\"\npool = \"{pool}\"\n\
         image_prefix = \"{prefix}\"\nmap = \"fuse\"\nsize = \"1G\"\nfs = \"{fs}\"\ntimeout_secs = {timeout_secs}\n",
        ceph_conf.display(),
    )
}

/// Removes every image of `pool` whose name starts with `prefix`, with its snapshots (unprotected first),
/// newest layer number first so that clones go before their parents; images that are still busy are retried
/// for `timeout`. Returns how many were removed.
pub fn remove_images(ceph_conf: &Path, pool: &str, prefix: &str, timeout: Duration) -> Result<usize, String> {
    let rbd = |args: &[&str]| -> Output {
        Command::new(find_bin("rbd").unwrap_or_else(|| "rbd".into()))
            .arg("-c")
            .arg(ceph_conf)
            .args(["--client_mount_timeout", "10", "--rados_mon_op_timeout", "10"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn rbd: {e}"))
    };
    let deadline = Instant::now() + timeout;
    let mut removed = 0;
    loop {
        // `rbd ls`, not `-l`: that opens every image of the pool and fails when one of another user goes
        // meanwhile.
        let out = rbd(&["ls", "--format", "json", pool]);
        let text = stdout_of(&format!("rbd ls {pool}"), &out)?;
        let all: Vec<String> = serde_json::from_str(&text).map_err(|e| format!("rbd ls: {e}: {text}"))?;
        let mut images: Vec<&String> = all.iter().filter(|i| i.starts_with(prefix)).collect();
        if images.is_empty() {
            return Ok(removed);
        }
        // Layer numbers are hex after the prefix; longer is bigger, then by text.
        images.sort_by_key(|i| std::cmp::Reverse((i.len(), i.to_string())));
        let mut failed = Vec::new();
        for img in images {
            let spec = format!("{pool}/{img}");
            let out = rbd(&["snap", "ls", "--format", "json", &spec]);
            let snaps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for name in snaps.iter().filter_map(|snap| snap["name"].as_str()) {
                // refused (and harmless) when it is not protected
                let _ = rbd(&["snap", "unprotect", &format!("{spec}@{name}")]);
            }
            if !snaps.is_empty() {
                let _ = rbd(&["snap", "purge", "--no-progress", &spec]);
            }
            let out = rbd(&["rm", "--no-progress", &spec]);
            match check_output(&format!("rbd rm {spec}"), &out) {
                Ok(()) => removed += 1,
                Err(e) => failed.push(e),
            }
        }
        if !failed.is_empty() && Instant::now() >= deadline {
            return Err(failed.join("\n"));
        }
        if !failed.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Loop devices (`loopN`) whose backing file is below `root`.
pub fn loops_under(root: &Path) -> Vec<String> {
    let root = root.display().to_string();
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let b = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            b.trim_end().starts_with(&root).then_some(name)
        })
        .collect()
}

/// Takes down what an rbd data root's lamina leaves attached when it stops (it keeps attachments for the
/// containers that may use them): the layer filesystems, their loop devices, the rbd-fuse mounts, then the
/// rbd-fuse processes (waited for, they close their images; SIGKILL after `timeout`). Returns what was left.
pub fn detach_rbd_layers(data_root: &Path, timeout: Duration) -> Result<(), String> {
    let umount = |m: &Path| {
        let _ = Command::new("umount").arg(m).stderr(Stdio::null()).status();
    };
    // The filesystems on the loop devices first (below `<hex n>/fs`), then the devices, then FUSE.
    for m in mounts_under(data_root) {
        if m.file_name().is_some_and(|n| n == "fs") {
            umount(&m);
        }
    }
    for dev in loops_under(data_root) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(format!("/dev/{dev}"))
            .status();
    }
    // A FUSE mount stays busy for a moment while the kernel lets go of a loop device over its file.
    let _ = poll(timeout, || {
        for m in mounts_under(data_root) {
            umount(&m);
        }
        mounts_under(data_root).is_empty().then_some(())
    });
    let gone = poll(timeout, || pids_referencing(data_root).is_empty().then_some(()));
    if gone.is_none() {
        for p in pids_referencing(data_root) {
            signal(p, "KILL");
        }
    }
    let (mounts, loops) = (mounts_under(data_root), loops_under(data_root));
    if mounts.is_empty() && loops.is_empty() && gone.is_some() {
        Ok(())
    } else {
        Err(format!(
            "left under {}: mounts {mounts:?}, loop devices {loops:?}{}",
            data_root.display(),
            if gone.is_some() {
                ""
            } else {
                ", rbd-fuse processes killed"
            }
        ))
    }
}

/// Where the OSD keeps its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStore {
    /// In RAM (a 2 GiB device); fast to create, gone when the OSD stops.
    Memstore,
    /// bluestore on a sparse 10 GiB file in the cluster directory.
    Bluestore,
}

/// The opening of a test on a throw-away Ceph cluster: `None` (the test returns) when a requirement is
/// missing (root, dockerd too with `docker`, and Ceph's programs), else the test's serial guard and a memstore
/// cluster tagged `tag`. Bind both in one pattern before anything that uses the cluster: they are dropped
/// last, the cluster before the guard.
pub fn ceph_test(
    test: &str,
    docker: bool,
    tag: &str,
) -> Option<(Option<std::sync::MutexGuard<'static, ()>>, CephCluster)> {
    let present = if docker {
        require_docker(test)
    } else {
        require_root(test)
    };
    let serial = serial_if(present && require_ceph(test))?;
    Some((serial, CephCluster::start_with(tag, ObjectStore::Memstore)))
}

/// A running test cluster.
pub struct CephCluster {
    /// The monitor's msgr v2 port (v1 is the next one).
    pub mon_port: u16,
    /// Time from the first command until the pool `rbd` was usable.
    pub start_time: Duration,
    /// The pool created at start.
    pub pool: String,
    mon: Option<Child>,
    osd: Option<Child>,
    mgr: Option<Child>,
    osd_id: String,
    dir: PathBuf,
    _dir: Option<TestDir>,
}

/// A free pair of ports `P`, `P+1` on 127.0.0.1 (starting at a point derived from our PID, so that test
/// binaries running side by side start apart).
fn free_port_pair() -> u16 {
    let start = 13300 + (std::process::id() % 400) as u16 * 4;
    for i in 0..1000u16 {
        let p = 13300 + (start - 13300 + i * 2) % 4000;
        let ok =
            TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 1)).is_ok();
        if ok {
            return p;
        }
    }
    panic!("no free port pair in 13300-17300 on 127.0.0.1");
}

fn new_uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_string()
}

impl CephCluster {
    /// Starts a memstore cluster in a fresh test directory `ceph-<tag>` with the pool `rbd` initialised for
    /// RBD.
    pub fn start(tag: &str) -> CephCluster {
        CephCluster::start_with(tag, ObjectStore::Memstore)
    }

    /// Like [`CephCluster::start`] with the given object store.
    pub fn start_with(tag: &str, store: ObjectStore) -> CephCluster {
        let dir = TestDir::new(&unique_name(&format!("ceph-{tag}")));
        let mut c = CephCluster::start_in(dir.path(), store);
        c._dir = Some(dir);
        c
    }

    /// Like [`CephCluster::start_with`] with every file in `dir` (created, not removed).
    pub fn start_in(dir: &Path, store: ObjectStore) -> CephCluster {
        let t0 = Instant::now();
        for d in ["run", "log", "crash", "mon.a"] {
            fs::create_dir_all(dir.join(d)).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        let port = free_port_pair();
        let fsid = new_uuid();
        let b = dir.display().to_string();
        let mon_addr = format!("[v2:127.0.0.1:{port},v1:127.0.0.1:{}]", port + 1);
        let objectstore = match store {
            ObjectStore::Memstore => "memstore",
            ObjectStore::Bluestore => "bluestore",
        };
        let conf = format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon host = {mon_addr}\n\
             public addr = 127.0.0.1\n\
             cluster addr = 127.0.0.1\n\
             public network = 127.0.0.0/8\n\
             cluster network = 127.0.0.0/8\n\
             ms bind ipv6 = false\n\
             auth cluster required = none\n\
             auth service required = none\n\
             auth client required = none\n\
             auth allow insecure global id reclaim = false\n\
             run dir = {b}/run\n\
             admin socket = {b}/run/$name.asok\n\
             pid file = {b}/run/$name.pid\n\
             log file = {b}/log/$name.log\n\
             crash dir = {b}/crash\n\
             mon cluster log file = {b}/log/$cluster.$channel.log\n\
             mon data avail warn = 2\n\
             mon data avail crit = 1\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             osd pool default pg num = 8\n\
             osd pool default pgp num = 8\n\
             osd pool default pg autoscale mode = off\n\
             osd crush chooseleaf type = 0\n\
             mon allow pool size one = true\n\
             mon allow pool delete = true\n\
             mon warn on pool no redundancy = false\n\
             rbd default features = layering\n\
             [mon]\n\
             mon data = {b}/$name\n\
             [mgr]\n\
             mgr data = {b}/$name\n\
             [osd]\n\
             osd data = {b}/$name\n\
             osd objectstore = {objectstore}\n\
             bluestore block create = true\n\
             bluestore block size = 10737418240\n\
             bluestore fsck on mkfs = false\n\
             memstore device bytes = 2147483648\n\
             osd memory target = 1073741824\n\
             [client]\n\
             admin socket = {b}/run/$name.$pid.asok\n\
             pid file = {b}/run/$name.$pid.pid\n\
             log file = {b}/log/$name.$pid.log\n"
        );
        fs::write(dir.join("ceph.conf"), conf).unwrap();
        let mut c = CephCluster {
            mon_port: port,
            start_time: Duration::ZERO,
            pool: "rbd".into(),
            mon: None,
            osd: None,
            mgr: None,
            osd_id: String::new(),
            dir: dir.to_path_buf(),
            _dir: None,
        };
        run_ok(
            Command::new(find_bin("monmaptool").unwrap())
                .args(["--create", "--fsid", &fsid, "--addv", "a", &mon_addr])
                .args(["--enable-all-features", "--set-min-mon-release", "pacific"])
                .arg(dir.join("monmap"))
                .stdout(Stdio::null()),
        );
        let mut mkfs = c.daemon_cmd("ceph-mon");
        mkfs.args(["--mkfs", "-i", "a", "--monmap"])
            .arg(dir.join("monmap"));
        run_ok(&mut mkfs);
        c.start_mon();
        let osd_uuid = new_uuid();
        let id = c.ceph_ok(&["osd", "new", &osd_uuid]).trim().to_string();
        c.osd_id = id.clone();
        fs::create_dir_all(dir.join(format!("osd.{id}"))).unwrap();
        let mut mkfs = c.daemon_cmd("ceph-osd");
        mkfs.args(["-i", &id, "--mkfs", "--osd-uuid", &osd_uuid]);
        let out = mkfs.output().unwrap();
        check_output("ceph-osd --mkfs", &out).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        c.start_osd();
        c.create_pool("rbd");
        c.start_time = t0.elapsed();
        eprintln!(
            "Ceph cluster ({objectstore}) at 127.0.0.1:{port} up in {:?} ({})",
            c.start_time,
            dir.display()
        );
        c
    }

    fn daemon_cmd(&self, prog: &str) -> Command {
        let mut cmd = Command::new(find_bin(prog).unwrap_or_else(|| prog.into()));
        cmd.arg("-c").arg(self.conf()).stdin(Stdio::null());
        cmd
    }

    fn spawn_logged(&self, mut cmd: Command, log: &str) -> Child {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log").join(log))
            .unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
    }

    /// Starts the monitor in the foreground and waits until it answers (30 s).
    pub fn start_mon(&mut self) {
        let mut cmd = self.daemon_cmd("ceph-mon");
        cmd.args(["-i", "a", "-f"]);
        self.mon = Some(self.spawn_logged(cmd, "mon.a.out"));
        let up = poll(Duration::from_secs(30), || {
            self.ceph(&["mon", "stat"]).status.success().then_some(())
        });
        assert!(
            up.is_some(),
            "ceph-mon did not answer within 30 s:\n{}",
            self.logs()
        );
    }

    /// Starts the OSD in the foreground and waits until the monitor reports it up (60 s).
    pub fn start_osd(&mut self) {
        let mut cmd = self.daemon_cmd("ceph-osd");
        cmd.args(["-i", &self.osd_id, "-f"]);
        self.osd = Some(self.spawn_logged(cmd, &format!("osd.{}.out", self.osd_id)));
        let want = format!("osd.{} up", self.osd_id);
        let up = poll(Duration::from_secs(60), || {
            let out = self.ceph(&["osd", "dump"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with(&want))
                .then_some(())
        });
        assert!(up.is_some(), "the OSD was not up within 60 s:\n{}", self.logs());
    }

    /// Starts a mgr (`mgr.x`) in the foreground and waits until the monitor reports it available (60 s).
    pub fn start_mgr(&mut self) {
        fs::create_dir_all(self.dir.join("mgr.x")).unwrap();
        let mut cmd = self.daemon_cmd("ceph-mgr");
        cmd.args(["-i", "x", "-f"]);
        self.mgr = Some(self.spawn_logged(cmd, "mgr.x.out"));
        let up = poll(Duration::from_secs(60), || {
            let out = self.ceph(&["mgr", "stat", "--format", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            (v["available"] == true).then_some(())
        });
        assert!(
            up.is_some(),
            "ceph-mgr was not available within 60 s:\n{}",
            self.logs()
        );
        // The monitors flag a pool over its quota from the usage the OSD reports to the mgr (every
        // `mgr_stats_period`), the mgr to the monitors (every `mgr_tick_period`) and the monitors' check
        // (every `mon_tick_interval`): 5, 2 and 5 s by default, 3.7-9.6 s from the write past the quota to
        // the flag; at 1 s each, 1.1-2.3 s.
        for (who, key) in [
            ("mgr", "mgr_stats_period"),
            ("mgr", "mgr_tick_period"),
            ("mon", "mon_tick_interval"),
        ] {
            self.ceph_ok(&["config", "set", who, key, "1"]);
        }
    }

    /// The flags of `pool` (`full`, `full_quota`, ...).
    pub fn pool_flags(&self, pool: &str) -> Vec<String> {
        let out = self.ceph_ok(&["osd", "pool", "ls", "detail", "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v.as_array()
            .and_then(|a| a.iter().find(|p| p["pool_name"] == pool))
            .and_then(|p| p["flags_names"].as_str())
            .map(|f| f.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Creates a pool of 8 placement groups initialised for RBD.
    pub fn create_pool(&self, pool: &str) {
        self.ceph_ok(&["osd", "pool", "create", pool, "8", "8"]);
        self.rbd_ok(&["pool", "init", pool]);
    }

    /// Stops the whole cluster by PID (clients, OSD, mgr, monitor), as `Drop` does; the directory stays.
    pub fn stop(&mut self) {
        self.stop_clients();
        if let Some(mut o) = self.osd.take() {
            stop_child(&mut o, Duration::from_secs(15));
        }
        if let Some(mut m) = self.mgr.take() {
            stop_child(&mut m, Duration::from_secs(10));
        }
        if let Some(mut m) = self.mon.take() {
            stop_child(&mut m, Duration::from_secs(10));
        }
    }

    /// SIGKILLs the monitor and the OSD (the cluster disappears mid-operation); clients are left alone.
    pub fn kill(&mut self) {
        for c in [self.osd.take(), self.mgr.take(), self.mon.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the OSD where it stands (SIGSTOP by PID): it keeps its objects (even memstore) and its place in
    /// the map, and every operation on it waits, as when an OSD host hangs. [`CephCluster::resume_osd`]
    /// lets it go on.
    pub fn pause_osd(&self) {
        let pid = self.osd.as_ref().expect("the OSD runs").id();
        signal(pid, "STOP");
    }

    /// Lets an OSD stopped by [`CephCluster::pause_osd`] go on (SIGCONT), and waits (up to 60 s) until every
    /// pool serves operations again: a resumed OSD first reports back to the monitor and its placement groups
    /// peer, and until then every read waits.
    pub fn resume_osd(&self) {
        let pid = self.osd.as_ref().expect("the OSD runs").id();
        signal(pid, "CONT");
        let pools = self.tool("rados", &["--connect-timeout", "10"], &["lspools"]);
        let pools = String::from_utf8_lossy(&pools.stdout).into_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        for pool in pools.split_whitespace() {
            loop {
                // A stat of an object that does not exist: "No such file" once the pool answers, a timeout before.
                let out = self.tool(
                    "rados",
                    &["--connect-timeout", "10", "--rados_osd_op_timeout", "3"],
                    &["-p", pool, "stat", "lamina-testkit-probe"],
                );
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() || err.contains("No such file") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "pool {pool} serves no operations 60 s after the OSD was resumed: {err}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Client processes of this cluster (their command line names its directory), other than its daemons.
    pub fn client_pids(&self) -> Vec<u32> {
        let own = self.daemon_pids();
        pids_referencing(&self.dir)
            .into_iter()
            .filter(|p| !own.contains(p))
            .collect()
    }

    fn stop_clients(&self) {
        let pids = self.client_pids();
        if pids.is_empty() {
            return;
        }
        eprintln!(
            "stopping clients of the Ceph cluster {}: {pids:?}",
            self.dir.display()
        );
        for &p in &pids {
            signal(p, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &p in &pids {
            if pid_alive(p) {
                signal(p, "KILL");
            }
        }
    }

    /// PIDs of the monitor, the OSD and the mgr while they run.
    pub fn daemon_pids(&self) -> Vec<u32> {
        [&self.mon, &self.osd, &self.mgr]
            .iter()
            .filter_map(|c| c.as_ref().map(Child::id))
            .collect()
    }

    /// The cluster's `ceph.conf`.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `ceph ARGS` against this cluster (10 s connect timeout).
    pub fn ceph(&self, args: &[&str]) -> Output {
        self.tool("ceph", &["--connect-timeout", "10"], args)
    }

    /// `ceph ARGS`, panicking with the output on failure; returns stdout.
    pub fn ceph_ok(&self, args: &[&str]) -> String {
        self.tool_ok("ceph", args, self.ceph(args))
    }

    /// Runs `rbd ARGS` against this cluster (10 s mon timeouts).
    pub fn rbd(&self, args: &[&str]) -> Output {
        self.tool(
            "rbd",
            &["--client_mount_timeout", "10", "--rados_mon_op_timeout", "10"],
            args,
        )
    }

    /// `rbd ARGS`, panicking with the output on failure; returns stdout.
    pub fn rbd_ok(&self, args: &[&str]) -> String {
        self.tool_ok("rbd", args, self.rbd(args))
    }

    /// Runs the Ceph tool `bin` with this cluster's config, its `timeouts` options and `args`.
    fn tool(&self, bin: &str, timeouts: &[&str], args: &[&str]) -> Output {
        Command::new(find_bin(bin).unwrap_or_else(|| bin.into()))
            .arg("-c")
            .arg(self.conf())
            .args(timeouts)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
    }

    /// The stdout of `bin ARGS` that gave `out`; panics with the output unless it succeeded.
    fn tool_ok(&self, bin: &str, args: &[&str], out: Output) -> String {
        stdout_of(&format!("{bin} {}", args.join(" ")), &out).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The images of `pool` (`rbd ls`).
    pub fn images(&self, pool: &str) -> Vec<String> {
        let out = self.rbd_ok(&["ls", "--format", "json", pool]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("rbd ls: {e}: {out}"))
    }

    /// [`remove_images`] of this cluster's pool `pool`.
    pub fn remove_images(&self, pool: &str, prefix: &str) -> Result<usize, String> {
        remove_images(&self.conf(), pool, prefix, Duration::from_secs(30))
    }

    /// The advisory locks of `pool/image` as (lock id, locker) pairs.
    pub fn locks(&self, pool: &str, image: &str) -> Vec<(String, String)> {
        let out = self.rbd_ok(&["lock", "ls", "--format", "json", &format!("{pool}/{image}")]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("rbd lock ls: {e}: {out}"));
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|l| {
                        (
                            l["id"].as_str().unwrap_or_default().to_string(),
                            l["locker"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The watchers of `pool/image` (`rbd status`): clients that have it open.
    pub fn watchers(&self, pool: &str, image: &str) -> usize {
        let out = self.rbd_ok(&["status", "--format", "json", &format!("{pool}/{image}")]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["watchers"].as_array().map_or(0, Vec::len)
    }

    /// The daemons' logs (last lines each).
    pub fn logs(&self) -> String {
        let mut names: Vec<String> = fs::read_dir(self.dir.join("log"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("mon.") || n.starts_with("osd.") || n.starts_with("mgr."))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|l| format!("--- {l} ---\n{}", tail(&self.dir.join("log").join(l), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- Ceph cluster {} -----\n{}", self.dir.display(), self.logs());
        }
        self.stop();
    }
}
