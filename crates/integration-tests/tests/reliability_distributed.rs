//! Reliability tier, part 7 (issue 8): distributed faults on a real MooseFS cluster (master + 3 chunkservers
//! in a network namespace, see `common/moosefs.rs`), through lamina's VolumeDriver protocol, volumes with
//! goal 2.
//!
//! - `chunkserver_killed_during_writes`: a writer writes files into a lamina volume (mounted with the
//!   protocol's Mount) and fsyncs each; a chunkserver is SIGKILLed (by PID) mid-way. Every file whose fsync
//!   returned OK must have exactly its content, read through a fresh mount with the chunkserver still down
//!   and again after it is back.
//! - `master_restarted`: the master is stopped (by PID) while a volume is mounted and written to. While it is
//!   down, Create, Mount of another volume, Mount of the mounted one, List, Get and Path must answer within a
//!   bound, with success or a classed error naming the cause; after the master is back, the protocol and the
//!   mounted volume work again without anything done to lamina, and every acknowledged file is intact.
//! - `lamina_restarted`: lamina is stopped with SIGTERM and with SIGKILL while volumes are mounted (several
//!   mount IDs); after each start, Path/Get/List know the mounts, the counts are right, data written before
//!   and after is intact, the last Unmount really unmounts, and once everything is unmounted and lamina is
//!   stopped no mount and no `mfsmount` process of it is left.
//! - `mfsmount_killed`: lamina's own `mfsmount` is SIGKILLed while a volume is mounted; the next calls mount
//!   the cluster again and a Mount of the volume hands out a live mountpoint again; data intact.
//!
//! The writes come from a writer process (this binary again, running only `writer_process`), not a thread of
//! the test: see `Writer`. Sizes: `LAMINA_RELIABILITY=full` (more files, more kill rounds, also a SIGKILLed master), or
//! `LAMINA_RELIABILITY_DIST_FILES`, `LAMINA_RELIABILITY_DIST_ROUNDS`. Needs root and the MooseFS packages
//! (installed with apt-get when missing; SKIPPED otherwise, a failure under CI=true).
//! Run: `cargo test -p lamina --test reliability_distributed -- --nocapture --test-threads 1`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::hash::{DefaultHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use lamina_testkit::moosefs::{mfsmount_pids, require_moosefs, MooseCluster};
use lamina_testkit::reliability::*;
use lamina_testkit::*;

const ID1: &str = "d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1";
const ID2: &str = "d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2";
const ID3: &str = "d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3";
const ID4: &str = "d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4";

/// lamina's deadline for cluster operations (`timeout_secs`).
const TIMEOUT_SECS: u64 = 8;
/// The most a protocol call may take while the cluster is degraded: dockerd gives most calls 30 s.
const CALL_BOUND: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------------------------
// A lamina on the cluster, protocol calls with timing
// ------------------------------------------------------------------------------------------------------------

struct Host {
    lamina: Lamina,
    c: PluginClient,
    mount_base: PathBuf,
}

fn host(tag: &str, cluster: &MooseCluster) -> Host {
    let (lamina, mount_base) =
        Lamina::start_with_volumes(tag, &cluster.volumes_toml(TIMEOUT_SECS, "default_goal = \"2\"\n"));
    let mut c = lamina.client();
    // Longer than any bound asserted here, so a hang shows up as a measured time, not a transport error.
    c.timeout = Duration::from_secs(180);
    Host {
        lamina,
        c,
        mount_base,
    }
}

/// One protocol call: the answer (or transport error) and how long it took.
struct Call {
    what: String,
    took: Duration,
    status: u16,
    body: serde_json::Value,
    err: Option<String>,
}

impl Call {
    fn ok(&self) -> bool {
        self.status == 200 && self.err.is_none()
    }

    fn expect_ok(&self) -> &serde_json::Value {
        assert!(
            self.ok(),
            "{}: expected success, got HTTP {} {:?}",
            self.what,
            self.status,
            self.err
        );
        &self.body
    }
}

fn vcall(c: &PluginClient, method: &str, args: serde_json::Value) -> Call {
    let mut body = serde_json::to_vec(&args).unwrap();
    body.push(b'\n');
    let what = format!("{method} {args}");
    let t = Instant::now();
    let r = c.post_raw(&format!("/VolumeDriver.{method}"), &body);
    let took = t.elapsed();
    match r {
        Ok(r) => Call {
            what,
            took,
            status: r.status,
            body: serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
            err: r.err(),
        },
        Err(e) => Call {
            what,
            took,
            status: 0,
            body: serde_json::Value::Null,
            err: Some(format!("transport error: {e}")),
        },
    }
}

fn mount(c: &PluginClient, name: &str, id: &str) -> PathBuf {
    let r = vcall(c, "Mount", json!({"Name": name, "ID": id}));
    PathBuf::from(r.expect_ok()["Mountpoint"].as_str().unwrap())
}

fn unmount(c: &PluginClient, name: &str, id: &str) {
    vcall(c, "Unmount", json!({"Name": name, "ID": id})).expect_ok();
}

// ------------------------------------------------------------------------------------------------------------
// Writing with fsync, recording what was acknowledged; checking it later
// ------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Acked {
    name: String,
    seed: u64,
    len: usize,
    hash: u64,
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_random(seed, &mut b);
    b
}

fn hash_of(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(b);
    h.finish()
}

/// Creates `path` with `data` and fsyncs it; OK means acknowledged.
fn write_fsync(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// One write of the writer.
#[derive(Debug, Clone)]
struct Op {
    /// When the write+fsync returned.
    end: SystemTime,
    took: Duration,
    result: Result<(), String>,
}

#[derive(Debug, Default)]
struct WriterLog {
    acked: Vec<Acked>,
    ops: Vec<Op>,
}

impl WriterLog {
    /// Time from `at` to the first acknowledged write that returned after it.
    fn first_ack_after(&self, at: SystemTime) -> Option<Duration> {
        self.ops
            .iter()
            .filter(|o| o.result.is_ok())
            .filter_map(|o| o.end.duration_since(at).ok())
            .min()
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The writer runs in a child process (this test binary again, running only `writer_process`): a test
/// process with a thread blocked in a FUSE write was seen to delay the start of other programs (the restarted
/// mfsmaster) until that write gave up, about 2 minutes later. The child writes `prefix-NNNNN` files of 4 KiB
/// to `max_len` bytes into `dir`, fsyncs each, and appends one line per write to a log on the local disk.
struct Writer {
    child: Option<std::process::Child>,
    log: PathBuf,
    stop: PathBuf,
}

const WRITER_ENV: &str = "LAMINA_DIST_WRITER";

impl Writer {
    fn spawn(dir: PathBuf, prefix: &str, max_files: usize, max_len: usize, seed: u64) -> Writer {
        let tmp = std::env::temp_dir();
        let tag = format!("lamina-dist-writer-{}-{prefix}-{seed:x}", std::process::id());
        let (log, stop) = (tmp.join(format!("{tag}.log")), tmp.join(format!("{tag}.stop")));
        let _ = fs::remove_file(&log);
        let _ = fs::remove_file(&stop);
        let spec = json!({
            "dir": dir, "prefix": prefix, "max_files": max_files, "max_len": max_len, "seed": seed,
            "log": log, "stop": stop,
        });
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "writer_process", "--nocapture", "--test-threads", "1"])
            .env(WRITER_ENV, spec.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawning the writer process");
        Writer {
            child: Some(child),
            log,
            stop,
        }
    }

    fn lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with('\t'))
            .map(str::to_string)
            .collect()
    }

    fn progress(&self) -> usize {
        self.lines().len()
    }

    fn wait_progress(&self, n: usize, bound: Duration) {
        let t = Instant::now();
        while self.progress() < n {
            assert!(
                t.elapsed() < bound,
                "writer stuck at {} of {n} files for {bound:?}",
                self.progress()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops (if `stop`) and waits for the writer; panics if it is stuck longer than `bound`.
    fn finish(mut self, stop: bool, bound: Duration) -> WriterLog {
        if stop {
            fs::write(&self.stop, b"").unwrap();
        }
        let mut child = self.child.take().unwrap();
        let st = wait_timeout(&mut child, bound);
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the writer did not finish within {bound:?} (at {} files): a write or fsync hangs",
                self.progress()
            );
        }
        let mut log = WriterLog::default();
        for l in self.lines() {
            let f: Vec<&str> = l.trim_end_matches('\t').splitn(7, '\t').collect();
            let (end, took) = (f[2].parse::<u64>().unwrap(), f[3].parse::<u64>().unwrap());
            let end = UNIX_EPOCH + Duration::from_millis(end);
            let took = Duration::from_millis(took);
            if f[0] == "ok" {
                log.acked.push(Acked {
                    name: f[1].to_string(),
                    seed: f[4].parse().unwrap(),
                    len: f[5].parse().unwrap(),
                    hash: f[6].parse().unwrap(),
                });
                log.ops.push(Op {
                    end,
                    took,
                    result: Ok(()),
                });
            } else {
                log.ops.push(Op {
                    end,
                    took,
                    result: Err(format!("{}: {}", f[1], f[4])),
                });
            }
        }
        assert!(
            st.unwrap().success(),
            "the writer process failed (log {})",
            self.log.display()
        );
        log
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(&self.stop);
    }
}

/// The writer's body, run only in the child process [`Writer`] starts (a no-op test otherwise). One line
/// per write, tab-separated and ending with a tab (a line without it was cut): `ok NAME END_MS TOOK_MS SEED
/// LEN HASH` or `err NAME END_MS TOOK_MS MESSAGE`.
#[test]
fn writer_process() {
    let Ok(spec) = std::env::var(WRITER_ENV) else {
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let dir = PathBuf::from(spec["dir"].as_str().unwrap());
    let prefix = spec["prefix"].as_str().unwrap();
    let max_files = spec["max_files"].as_u64().unwrap();
    let max_len = spec["max_len"].as_u64().unwrap();
    let stop = PathBuf::from(spec["stop"].as_str().unwrap());
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec["log"].as_str().unwrap())
        .unwrap();
    let mut rng = Rng::new(spec["seed"].as_u64().unwrap());
    for i in 0..max_files {
        if stop.exists() {
            break;
        }
        let name = format!("{prefix}-{i:05}");
        let seed = rng.next_u64();
        let len = rng.range(4096, max_len) as usize;
        let data = content(seed, len);
        let start = Instant::now();
        let r = write_fsync(&dir.join(&name), &data);
        let took = start.elapsed().as_millis();
        let end = epoch_ms(SystemTime::now());
        let line = match r {
            Ok(()) => format!("ok\t{name}\t{end}\t{took}\t{seed}\t{len}\t{}\t\n", hash_of(&data)),
            Err(e) => format!(
                "err\t{name}\t{end}\t{took}\t{}\t\n",
                e.to_string().replace('\t', " ")
            ),
        };
        log.write_all(line.as_bytes()).unwrap();
    }
}

/// Reads every acknowledged file below `dir` on a helper thread (bounded) and returns the problems.
fn verify(dir: &Path, acked: &[Acked], bound: Duration) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    let (dir, acked) = (dir.to_path_buf(), acked.to_vec());
    thread::spawn(move || {
        let mut bad = Vec::new();
        for a in &acked {
            let p = dir.join(&a.name);
            match fs::read(&p) {
                Ok(b) if b.len() != a.len => {
                    bad.push(format!("{}: {} bytes, wrote {}", a.name, b.len(), a.len))
                }
                Ok(b) if hash_of(&b) != a.hash || b != content(a.seed, a.len) => {
                    bad.push(format!("{}: content differs (hash {:x})", a.name, hash_of(&b)))
                }
                Ok(_) => {}
                Err(e) => bad.push(format!("{}: {e}", a.name)),
            }
        }
        let _ = tx.send(bad);
    });
    rx.recv_timeout(bound)
        .unwrap_or_else(|_| panic!("reading the acknowledged files took more than {bound:?}"))
}

/// A bare `mfsmount` of the whole cluster (a client with no cache of lamina's), unmounted on drop.
struct FreshView {
    at: PathBuf,
}

impl FreshView {
    fn new(cluster: &MooseCluster, name: &str) -> FreshView {
        let at = cluster.scratch(name);
        cluster.mount(&at, "/");
        FreshView { at }
    }

    fn volume(&self, name: &str) -> PathBuf {
        self.at.join("docker/volumes").join(name)
    }
}

impl Drop for FreshView {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.at)
            .stderr(std::process::Stdio::null())
            .status();
        if is_mounted(&self.at) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.at)
                .status();
        }
    }
}

/// Checks `acked` through a fresh client mount and through `lamina_dir` (lamina's mountpoint), if given.
fn check_acked(cluster: &MooseCluster, view: &str, volume: &str, lamina_dir: Option<&Path>, acked: &[Acked]) {
    let v = FreshView::new(cluster, view);
    let bad = verify(&v.volume(volume), acked, Duration::from_secs(180));
    assert!(
        bad.is_empty(),
        "{} of {} acknowledged files lost or wrong (fresh mount, {view}): {:?}",
        bad.len(),
        acked.len(),
        &bad[..bad.len().min(10)]
    );
    if let Some(d) = lamina_dir {
        let bad = verify(d, acked, Duration::from_secs(180));
        assert!(
            bad.is_empty(),
            "{} of {} acknowledged files lost or wrong (lamina mountpoint, {view}): {:?}",
            bad.len(),
            acked.len(),
            &bad[..bad.len().min(10)]
        );
    }
}

/// Error messages with numbers and paths folded, so that repeats count as one.
fn fold(msg: &str) -> String {
    let mut out = String::new();
    let mut digits = false;
    for ch in msg.chars() {
        if ch.is_ascii_digit() {
            if !digits {
                out.push('N');
            }
            digits = true;
        } else {
            digits = false;
            out.push(ch);
        }
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

// ------------------------------------------------------------------------------------------------------------
// 1. A chunkserver killed during writes
// ------------------------------------------------------------------------------------------------------------

#[test]
fn chunkserver_killed_during_writes() {
    let test = "chunkserver_killed_during_writes";
    let Some(_serial) = serial_if(require_moosefs(test)) else {
        return;
    };
    let files = count("LAMINA_RELIABILITY_DIST_FILES", 120, 1000) as usize;
    let rounds = count("LAMINA_RELIABILITY_DIST_ROUNDS", 1, 3).max(1) as usize;
    let t_all = Instant::now();
    // Declared first, dropped last: lamina stops (and unmounts) before the cluster goes away.
    let mut cluster = MooseCluster::start_n("dist-cs", 3);
    let h = host("dist-cs", &cluster);
    let c = &h.c;
    vcall(
        c,
        "Create",
        json!({"Name": "cskill", "Opts": {"ReplicationGoal": "2"}}),
    )
    .expect_ok();
    let g = vcall(c, "Get", json!({"Name": "cskill"}));
    assert_eq!(
        g.expect_ok()["Volume"]["Status"]["ReplicationGoal"],
        "2",
        "{}",
        g.body
    );
    let mp = mount(c, "cskill", ID1);
    assert_eq!(mp, h.mount_base.join("cskill"));

    let w = Writer::spawn(mp.clone(), "f", files, 1 << 20, base_seed() ^ 0xc5);
    let mut kills = Vec::new();
    let mut victim = 0;
    for r in 0..rounds {
        w.wait_progress(files * (2 * r + 1) / (2 * rounds + 1), Duration::from_secs(300));
        victim = (r + 1) % cluster.chunkserver_count();
        let pid = cluster.chunkserver_pid(victim).unwrap();
        let at = SystemTime::now();
        cluster.kill_chunkserver(victim);
        eprintln!(
            "[{test}] round {r}: SIGKILL chunkserver {} (pid {pid}) at file {}",
            victim + 1,
            w.progress()
        );
        // The protocol keeps working with a chunkserver gone.
        let g = vcall(c, "Get", json!({"Name": "cskill"}));
        g.expect_ok();
        let cr = vcall(c, "Create", json!({"Name": format!("during-{r}"), "Opts": {}}));
        cr.expect_ok();
        kills.push((at, g.took.max(cr.took)));
        if r + 1 < rounds {
            // Back after a few more files; the next round kills another one.
            w.wait_progress(files * (2 * r + 2) / (2 * rounds + 1), Duration::from_secs(300));
            cluster.start_chunkserver(victim);
            let reg = cluster.wait_registered(3, Duration::from_secs(60));
            eprintln!(
                "[{test}] round {r}: chunkserver {} registered again after {}",
                victim + 1,
                ms(reg)
            );
        }
    }
    let log = w.finish(false, Duration::from_secs(600));
    let errors: Vec<&String> = log.ops.iter().filter_map(|o| o.result.as_ref().err()).collect();
    let max_op = log.ops.iter().map(|o| o.took).max().unwrap_or_default();
    // The first acknowledged write that started after each kill: how long the writer stalled.
    let stalls: Vec<Duration> = kills
        .iter()
        .filter_map(|(at, _)| log.first_ack_after(*at))
        .collect();
    eprintln!(
        "[{test}] {} writes, {} acknowledged, {} failed, slowest write+fsync {}, first acknowledged write after each kill: {:?}",
        log.ops.len(),
        log.acked.len(),
        errors.len(),
        ms(max_op),
        stalls.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    for e in errors.iter().take(5) {
        eprintln!("[{test}]   write error: {e}");
    }

    // Read back with the last victim still down (the remaining chunkservers serve), then with it back.
    let t = Instant::now();
    check_acked(&cluster, "view-down", "cskill", Some(&mp), &log.acked);
    let read_down = t.elapsed();
    cluster.start_chunkserver(victim);
    let reg = cluster.wait_registered(3, Duration::from_secs(60));
    check_acked(&cluster, "view-back", "cskill", Some(&mp), &log.acked);
    eprintln!(
        "[{test}] acknowledged {} files, lost 0 (checked with chunkserver {} down in {}, and again after it \
         registered again in {})",
        log.acked.len(),
        victim + 1,
        ms(read_down),
        ms(reg)
    );
    assert!(
        log.acked.len() * 10 >= log.ops.len() * 9,
        "fewer than 90% of the writes were acknowledged with one chunkserver of three gone: {errors:?}"
    );
    unmount(c, "cskill", ID1);
    assert!(!is_mounted(&mp));
    eprintln!("[{test}] total {:.1} s", t_all.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------------------------------
// 2. The master restarted while a volume is mounted and in use
// ------------------------------------------------------------------------------------------------------------

/// Protocol calls while the master is down: each must answer within [`CALL_BOUND`], successes and classed
/// errors only; returns (calls, folded error messages with counts).
fn calls_while_down(c: &PluginClient, n: usize, round: usize) -> (Vec<Call>, BTreeMap<String, usize>) {
    let mut calls = Vec::new();
    let create_name = format!("down-{round}-{n}");
    calls.push(vcall(c, "Create", json!({"Name": create_name, "Opts": {}})));
    calls.push(vcall(c, "Mount", json!({"Name": "m-other", "ID": ID2})));
    calls.push(vcall(c, "Mount", json!({"Name": "m-used", "ID": ID3})));
    calls.push(vcall(c, "Unmount", json!({"Name": "m-used", "ID": ID3})));
    calls.push(vcall(c, "Get", json!({"Name": "m-used"})));
    calls.push(vcall(c, "Get", json!({"Name": "m-other"})));
    calls.push(vcall(c, "List", json!({})));
    calls.push(vcall(c, "Path", json!({"Name": "m-used"})));
    calls.push(vcall(c, "Remove", json!({"Name": "m-other"})));
    let mut errs = BTreeMap::new();
    for k in &calls {
        assert!(
            k.took < CALL_BOUND,
            "{} took {:?} with the master down",
            k.what,
            k.took
        );
        if let Some(e) = &k.err {
            assert!(
                k.status == 500 && classed(e),
                "{}: unclassed answer {} {e:?}",
                k.what,
                k.status
            );
            let method = k.what.split(' ').next().unwrap_or_default().to_string();
            *errs.entry(format!("{method}: {}", fold(e))).or_insert(0) += 1;
        }
    }
    (calls, errs)
}

#[test]
fn master_restarted() {
    let test = "master_restarted";
    let Some(_serial) = serial_if(require_moosefs(test)) else {
        return;
    };
    let rounds = count("LAMINA_RELIABILITY_DIST_ROUNDS", 1, 3).max(1) as usize;
    let down_for = Duration::from_secs(if full() { 20 } else { 10 });
    let t_all = Instant::now();
    let mut cluster = MooseCluster::start_n("dist-master", 3);
    let h = host("dist-master", &cluster);
    let c = &h.c;
    for v in ["m-used", "m-other"] {
        vcall(c, "Create", json!({"Name": v, "Opts": {"ReplicationGoal": "2"}})).expect_ok();
    }
    let mp = mount(c, "m-used", ID1);
    let mut acked: Vec<Acked> = Vec::new();
    let mut all_errs: BTreeMap<String, usize> = BTreeMap::new();
    let mut tried = 0usize;
    let mut forced_losses = 0usize;
    for r in 0..rounds {
        // A writer keeps writing through the whole outage.
        let w = Writer::spawn(
            mp.clone(),
            &format!("r{r}"),
            100_000,
            256 << 10,
            base_seed() ^ r as u64,
        );
        w.wait_progress(10, Duration::from_secs(120));
        // Round 1 of the full run SIGKILLs the master (it then starts with -a, recovering from its changelogs).
        let hard = full() && r == 1;
        let down_at = Instant::now();
        let clean = if hard {
            cluster.kill_master();
            false
        } else {
            cluster.stop_master()
        };
        let stopped = down_at.elapsed();
        let at_stop = w.progress();
        eprintln!(
            "[{test}] round {r}: master {} by PID after {} files (took {})",
            if hard {
                "SIGKILLed"
            } else if clean {
                "stopped (SIGTERM)"
            } else {
                "killed after SIGTERM timed out"
            },
            at_stop,
            ms(stopped)
        );
        let mut n = 0;
        let mut max_call = Duration::ZERO;
        while down_at.elapsed() < down_for {
            let (calls, errs) = calls_while_down(c, n, r);
            tried += calls.len();
            max_call = max_call.max(calls.iter().map(|k| k.took).max().unwrap_or_default());
            // Get of a known volume answers (from the cache), naming the fault.
            let get = &calls[4];
            let state = get.expect_ok()["Volume"]["Status"]["State"]
                .as_str()
                .unwrap_or("")
                .to_string();
            assert!(
                state.contains("unreachable") || state.contains("no answer"),
                "Get while down: {}",
                get.body
            );
            // Path of the mounted volume and Mount/Unmount of it (only counted) succeed.
            assert_eq!(calls[7].expect_ok()["Mountpoint"], mp.display().to_string());
            calls[2].expect_ok();
            calls[3].expect_ok();
            let listed = calls[6].expect_ok()["Volumes"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0);
            assert!(listed >= 2, "List while down: {}", calls[6].body);
            for (k, v) in errs {
                assert!(
                    k.contains("unreachable") || k.contains("no answer") || k.contains("not connected"),
                    "an error while the master is down does not name the cause: {k}"
                );
                *all_errs.entry(k).or_insert(0) += v;
            }
            n += 1;
            thread::sleep(Duration::from_millis(500));
        }
        let during = w.progress() - at_stop;
        // After a SIGKILL the master needs -a (recover from its changelogs); if even that fails, only an
        // operator's -i (ignore metadata errors) starts it: reported as a finding, and the loss counted.
        let mut forced = false;
        let master_start = if hard || !clean {
            match cluster.try_start_master(&["-a"]) {
                Ok(d) => d,
                Err(e) => {
                    let log = fs::read_to_string(cluster.dir().join("master.log")).unwrap_or_default();
                    let why: Vec<&str> = log
                        .lines()
                        .filter(|l| l.contains("changelog") || l.contains("metadata manager failed"))
                        .collect();
                    eprintln!(
                        "[{test}] round {r}: FINDING: the SIGKILLed master does not start with -a ({e}): {:?}; \
                         starting it with -a -i (an operator's action)",
                        &why[why.len().saturating_sub(3)..]
                    );
                    forced = true;
                    cluster
                        .try_start_master(&["-a", "-i"])
                        .unwrap_or_else(|e| panic!("mfsmaster -a -i: {e}:\n{}", cluster.logs()))
                }
            }
        } else {
            cluster.start_master(false)
        };
        let up_at = Instant::now();
        let up_sys = SystemTime::now();
        // Self-recovery: the protocol (a Create needs the cluster mount) and the mounted volume.
        let back = poll(Duration::from_secs(120), || {
            vcall(c, "Create", json!({"Name": format!("after-{r}"), "Opts": {}}))
                .ok()
                .then(Instant::now)
        })
        .unwrap_or_else(|| panic!("Create does not succeed within 120 s of the master's restart"));
        let proto_recovery = back - up_at;
        let m2 = vcall(c, "Mount", json!({"Name": "m-other", "ID": ID2}));
        m2.expect_ok();
        unmount(c, "m-other", ID2);
        let before = w.progress();
        w.wait_progress(before + 5, Duration::from_secs(180));
        let data_back = w.progress();
        let log = w.finish(true, Duration::from_secs(300));
        let errors: Vec<&String> = log.ops.iter().filter_map(|o| o.result.as_ref().err()).collect();
        let first_ok_after = log.first_ack_after(up_sys).unwrap_or_default();
        let max_op = log.ops.iter().map(|o| o.took).max().unwrap_or_default();
        eprintln!(
            "[{test}] round {r}: {n} rounds of calls while down (slowest call {}), {during} writes completed \
             while down; master listening {} after its start; after that: Create OK after {}, first \
             acknowledged write after {}; writer: {} writes, {} acknowledged, {} failed, slowest write+fsync {} \
             (files at recovery: {data_back})",
            ms(max_call),
            ms(master_start),
            ms(proto_recovery),
            ms(first_ok_after),
            log.ops.len(),
            log.acked.len(),
            errors.len(),
            ms(max_op)
        );
        for e in errors.iter().take(5) {
            eprintln!("[{test}]   write error: {e}");
        }
        acked.extend(log.acked);
        if forced {
            // Counted, not asserted: what a forced start (-i) of a SIGKILLed master loses is MooseFS's.
            let v = FreshView::new(&cluster, &format!("view-forced-{r}"));
            let bad = verify(&v.volume("m-used"), &acked, Duration::from_secs(180));
            eprintln!(
                "[{test}] round {r}: after the forced start, {} of {} acknowledged files lost or wrong: {:?}",
                bad.len(),
                acked.len(),
                &bad[..bad.len().min(5)]
            );
            let lost: BTreeSet<&str> = bad.iter().filter_map(|b| b.split(':').next()).collect();
            acked.retain(|a| !lost.contains(a.name.as_str()));
            forced_losses += bad.len();
        }
        // The master restarted with its metadata: everything acknowledged so far is there.
        check_acked(&cluster, &format!("view-{r}"), "m-used", Some(&mp), &acked);
    }
    for (k, v) in &all_errs {
        eprintln!("[{test}] error while down ({v}x): {k}");
    }
    eprintln!(
        "[{test}] {tried} protocol calls while down; {} files acknowledged, lost 0 (plus {forced_losses} lost \
         by a forced master start); total {:.1} s",
        acked.len(),
        t_all.elapsed().as_secs_f64()
    );
    unmount(c, "m-used", ID1);
    assert!(!is_mounted(&mp));
    let p = vcall(c, "Path", json!({"Name": "m-used"}));
    assert_eq!(p.expect_ok()["Mountpoint"], "");
}

// ------------------------------------------------------------------------------------------------------------
// 3. lamina restarted (SIGTERM and SIGKILL) while volumes are mounted
// ------------------------------------------------------------------------------------------------------------

fn write_batch(dir: &Path, prefix: &str, n: usize, seed: u64, acked: &mut Vec<Acked>) {
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let name = format!("{prefix}-{i:03}");
        let (seed, len) = (rng.next_u64(), rng.range(1, 200_000) as usize);
        let data = content(seed, len);
        write_fsync(&dir.join(&name), &data).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        acked.push(Acked {
            name,
            seed,
            len,
            hash: hash_of(&data),
        });
    }
}

/// Mount counts as Get reports them, and the mountpoints Path reports.
fn known_mounts(c: &PluginClient, names: &[&str]) -> Vec<(String, String, String)> {
    names
        .iter()
        .map(|n| {
            let g = vcall(c, "Get", json!({"Name": n}));
            let p = vcall(c, "Path", json!({"Name": n}));
            (
                n.to_string(),
                g.expect_ok()["Volume"]["Status"]["Mounts"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                p.expect_ok()["Mountpoint"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

#[test]
fn lamina_restarted() {
    let test = "lamina_restarted";
    let Some(_serial) = serial_if(require_moosefs(test)) else {
        return;
    };
    let cycles = count("LAMINA_RELIABILITY_DIST_ROUNDS", 1, 5).max(1) as usize;
    let t_all = Instant::now();
    let cluster = MooseCluster::start_n("dist-lamina", 3);
    let mut h = host("dist-lamina", &cluster);
    let c = h.c.clone();
    let data_root = h.lamina.data_root.clone();
    for v in ["r1", "r2", "r3"] {
        vcall(&c, "Create", json!({"Name": v, "Opts": {"ReplicationGoal": "2"}})).expect_ok();
    }
    let mp1 = mount(&c, "r1", ID1);
    assert_eq!(mount(&c, "r1", ID2), mp1);
    let mp2 = mount(&c, "r2", ID1);
    let mut acked1 = Vec::new();
    let mut acked2 = Vec::new();
    write_batch(&mp1, "before", 20, 1, &mut acked1);
    write_batch(&mp2, "before", 20, 2, &mut acked2);
    // A file held open across the restarts, appended to and fsynced after each.
    let mut held = OpenOptions::new()
        .create(true)
        .append(true)
        .open(mp1.join("held"))
        .unwrap();
    let mut held_data = b"start\n".to_vec();
    held.write_all(b"start\n").unwrap();
    held.sync_all().unwrap();
    let pids0 = mfsmount_pids(&data_root);
    assert_eq!(
        pids0.len(),
        1,
        "one mfsmount for lamina's cluster mount: {pids0:?}"
    );
    let mut restarts = Vec::new();
    for cycle in 0..cycles {
        for sig in ["TERM", "KILL"] {
            let t = Instant::now();
            if sig == "TERM" {
                let st = h.lamina.stop();
                assert!(
                    st.success(),
                    "lamina exited with {st} on SIGTERM:\n{}",
                    h.lamina.log_tail()
                );
            } else {
                h.lamina.kill9();
            }
            // While lamina is down the volumes stay mounted and usable.
            assert!(
                is_mounted(&mp1) && is_mounted(&mp2),
                "volumes unmounted by lamina's SIG{sig}"
            );
            write_batch(
                &mp1,
                &format!("down{cycle}{sig}"),
                3,
                10 + cycle as u64,
                &mut acked1,
            );
            h.lamina.start_again();
            let ready = t.elapsed();
            let km = known_mounts(&c, &["r1", "r2", "r3"]);
            assert_eq!(
                km,
                vec![
                    ("r1".into(), "2".into(), mp1.display().to_string()),
                    ("r2".into(), "1".into(), mp2.display().to_string()),
                    ("r3".into(), "0".into(), String::new()),
                ],
                "mounts known after SIG{sig}"
            );
            let list = vcall(&c, "List", json!({}));
            let vols = list.expect_ok()["Volumes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let with_mp: BTreeSet<String> = vols
                .iter()
                .filter(|v| v["Mountpoint"].as_str().is_some_and(|s| !s.is_empty()))
                .map(|v| v["Name"].as_str().unwrap_or("").to_string())
                .collect();
            assert_eq!(
                with_mp,
                BTreeSet::from(["r1".to_string(), "r2".to_string()]),
                "{}",
                list.body
            );
            // Writes after the restart, through the volumes and through the held file.
            write_batch(
                &mp1,
                &format!("after{cycle}{sig}"),
                5,
                20 + cycle as u64,
                &mut acked1,
            );
            write_batch(
                &mp2,
                &format!("after{cycle}{sig}"),
                5,
                30 + cycle as u64,
                &mut acked2,
            );
            let line = format!("after {cycle} {sig}\n");
            held.write_all(line.as_bytes()).unwrap();
            held.sync_all().unwrap();
            held_data.extend_from_slice(line.as_bytes());
            // A new mount ID is counted and released without touching the mount.
            assert_eq!(mount(&c, "r1", ID3), mp1);
            unmount(&c, "r1", ID3);
            assert!(is_mounted(&mp1));
            // r3, not mounted before, mounts and unmounts.
            let mp3 = mount(&c, "r3", ID4);
            write_batch(&mp3, &format!("c{cycle}{sig}"), 1, 40, &mut Vec::new());
            unmount(&c, "r3", ID4);
            assert!(!is_mounted(&mp3), "the last Unmount of r3 unmounts");
            let pids = mfsmount_pids(&data_root);
            eprintln!(
                "[{test}] cycle {cycle}: SIG{sig}, ready again after {}, mounts known, mfsmount pids {pids:?}",
                ms(ready)
            );
            restarts.push(ready);
        }
    }
    let bad1 = verify(&mp1, &acked1, Duration::from_secs(120));
    let bad2 = verify(&mp2, &acked2, Duration::from_secs(120));
    assert!(bad1.is_empty() && bad2.is_empty(), "data lost: {bad1:?} {bad2:?}");
    drop(held);
    assert_eq!(fs::read(mp1.join("held")).unwrap(), held_data, "the held file");
    // Counts are consistent: the first Unmount of r1 keeps it, the second releases it.
    unmount(&c, "r1", ID1);
    assert!(is_mounted(&mp1), "r1 still has ID2");
    unmount(&c, "r1", ID2);
    assert!(!is_mounted(&mp1), "the last Unmount of r1 unmounts");
    unmount(&c, "r2", ID1);
    assert!(!is_mounted(&mp2), "the last Unmount of r2 unmounts");
    unmount(&c, "r2", ID1); // an ID that holds nothing any more
    assert_eq!(
        mounts_under(&h.mount_base),
        Vec::<PathBuf>::new(),
        "mounts left under the mount base"
    );
    // Old mfsmount instances (detached at a SIGTERM, kept alive by the volumes' bind mounts) exit once the
    // last of them is gone; lamina's current one stays.
    let settled = poll(Duration::from_secs(20), || {
        let p = mfsmount_pids(&data_root);
        (p.len() == 1).then_some(p)
    });
    assert!(
        settled.is_some(),
        "mfsmount processes of lamina after every Unmount: {:?} (want only the current one)",
        mfsmount_pids(&data_root)
    );
    // Acknowledged data through a fresh client, lamina not involved.
    check_acked(&cluster, "view-r1", "r1", None, &acked1);
    check_acked(&cluster, "view-r2", "r2", None, &acked2);
    // Stopped: no mount and no mfsmount process of this lamina is left.
    let st = h.lamina.stop();
    assert!(st.success());
    let gone = poll(Duration::from_secs(20), || {
        (mfsmount_pids(&data_root).is_empty() && mounts_under(&data_root).is_empty()).then_some(())
    });
    assert!(
        gone.is_some(),
        "left after lamina stopped: mfsmount {:?}, mounts {:?}",
        mfsmount_pids(&data_root),
        mounts_under(&data_root)
    );
    assert_eq!(mounts_under(&h.mount_base), Vec::<PathBuf>::new());
    eprintln!(
        "[{test}] {} restarts (SIGTERM and SIGKILL), ready again after {:?}; acknowledged {} + {} files and \
         {} held-file appends, lost 0; total {:.1} s",
        restarts.len(),
        restarts.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        acked1.len(),
        acked2.len(),
        restarts.len() + 1,
        t_all.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------------------------------------------------
// 4. lamina's mfsmount killed while a volume is mounted
// ------------------------------------------------------------------------------------------------------------

fn stat_errno(p: &Path) -> Option<i32> {
    fs::symlink_metadata(p).err().and_then(|e| e.raw_os_error())
}

#[test]
fn mfsmount_killed() {
    let test = "mfsmount_killed";
    let Some(_serial) = serial_if(require_moosefs(test)) else {
        return;
    };
    let t_all = Instant::now();
    let cluster = MooseCluster::start_n("dist-client", 3);
    let mut h = host("dist-client", &cluster);
    let c = h.c.clone();
    let data_root = h.lamina.data_root.clone();
    vcall(
        &c,
        "Create",
        json!({"Name": "k1", "Opts": {"ReplicationGoal": "2"}}),
    )
    .expect_ok();
    let mp = mount(&c, "k1", ID1);
    let mut acked = Vec::new();
    write_batch(&mp, "before", 20, 7, &mut acked);
    let pids = mfsmount_pids(&data_root);
    assert_eq!(pids.len(), 1, "{pids:?}");
    signal(pids[0], "KILL");
    assert!(
        poll(Duration::from_secs(10), || (!pid_alive(pids[0])).then_some(())).is_some(),
        "mfsmount {} survived SIGKILL",
        pids[0]
    );
    // The fault as containers see it.
    // ENOTCONN, or ECONNABORTED on recent kernels.
    let e = stat_errno(&mp);
    assert!(
        matches!(e, Some(107 | 103)),
        "the volume's mount after its mfsmount died: errno {e:?}"
    );
    // The next calls mount the cluster again by themselves; a Mount of the dead volume makes it anew.
    let t = Instant::now();
    let g = vcall(&c, "Get", json!({"Name": "k1"}));
    g.expect_ok();
    assert!(g.body["Volume"]["Status"].get("State").is_none(), "{}", g.body);
    let get_took = t.elapsed();
    vcall(&c, "Create", json!({"Name": "k2", "Opts": {}})).expect_ok();
    let t = Instant::now();
    assert_eq!(mount(&c, "k1", ID2), mp);
    let mount_took = t.elapsed();
    assert_eq!(stat_errno(&mp), None, "the volume's mount after the next Mount");
    let bad = verify(&mp, &acked, Duration::from_secs(120));
    assert!(bad.is_empty(), "{bad:?}");
    write_batch(&mp, "after", 10, 8, &mut acked);
    let g = vcall(&c, "Get", json!({"Name": "k1"}));
    assert_eq!(g.expect_ok()["Volume"]["Status"]["Mounts"], "2");
    unmount(&c, "k1", ID1);
    assert!(is_mounted(&mp));
    unmount(&c, "k1", ID2);
    assert!(!is_mounted(&mp), "the last Unmount unmounts");
    check_acked(&cluster, "view-k1", "k1", None, &acked);
    let left = mfsmount_pids(&data_root);
    assert_eq!(left.len(), 1, "only lamina's new mfsmount: {left:?}");
    assert!(h.lamina.stop().success());
    let gone = poll(Duration::from_secs(20), || {
        (mfsmount_pids(&data_root).is_empty() && mounts_under(&data_root).is_empty()).then_some(())
    });
    assert!(
        gone.is_some(),
        "left after lamina stopped: {:?}",
        mfsmount_pids(&data_root)
    );
    eprintln!(
        "[{test}] mfsmount SIGKILLed: Get answered (cluster mounted again) in {}, Mount of the dead volume \
         made it again in {}; {} files acknowledged, lost 0; total {:.1} s",
        ms(get_took),
        ms(mount_took),
        acked.len(),
        t_all.elapsed().as_secs_f64()
    );
}
