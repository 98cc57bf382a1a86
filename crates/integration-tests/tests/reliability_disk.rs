//! Reliability tier, part 5 (issue 8): full and failing disks. The data root lives on a small loop-backed ext4
//! (`disk.img` in the test's directory, 96 MiB, no reserved blocks) and is pushed to ENOSPC in the middle of an
//! ApplyDiff (a layer larger than the free space), in the middle of a snapshot Commit and of a Create (the
//! filesystem filled first), remounted read-only, and given EIO at the store's write points (fault points armed
//! with `eio`, one hit each). After every failure: the answer is an error that names the cause, the layer list
//! and records are unchanged (nothing half visible), the staged bytes are given back (`df` back to where it
//! was), no staging directory is left, and once space returns (or the filesystem is writable again, or the
//! fault has passed) the same operation succeeds on the same running daemon.

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lamina_testkit::faults::*;
use lamina_testkit::reliability::Rng;
use lamina_testkit::*;
use serde_json::json;

const DISK_MIB: u64 = 96;

/// An operation to try on a full disk, and its name.
type NamedOp<'a> = (&'a str, Box<dyn Fn() -> Result<(), String> + 'a>);

/// A tar with one regular file of `size` pseudo-random bytes (incompressible, no holes), generated while read.
struct BigTar {
    head: Vec<u8>,
    size: u64,
    pos: u64,
    rng: Rng,
}

impl BigTar {
    fn new(name: &str, size: u64) -> BigTar {
        let mut hd = lamina_testkit::reliability::Hdr::new(name.as_bytes(), b'0');
        hd.size = size;
        BigTar {
            head: lamina_testkit::reliability::header_block(&hd).to_vec(),
            size,
            pos: 0,
            rng: Rng::new(size),
        }
    }

    fn total(&self) -> u64 {
        512 + self.size.div_ceil(512) * 512 + 1024
    }
}

impl Read for BigTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let total = self.total();
        if self.pos >= total {
            return Ok(0);
        }
        let mut n = 0;
        while n < buf.len() && self.pos < total {
            let p = self.pos;
            if p < 512 {
                let k = ((512 - p) as usize).min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&self.head[p as usize..p as usize + k]);
                n += k;
                self.pos += k as u64;
            } else if p < 512 + self.size
                && p.is_multiple_of(8)
                && buf.len() - n >= 8
                && 512 + self.size - p >= 8
            {
                buf[n..n + 8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
                n += 8;
                self.pos += 8;
            } else if p < 512 + self.size {
                buf[n] = self.rng.next_u64() as u8;
                n += 1;
                self.pos += 1;
            } else {
                buf[n] = 0;
                n += 1;
                self.pos += 1;
            }
        }
        Ok(n)
    }
}

/// Used bytes of the filesystem holding `p`.
fn used(p: &Path) -> u64 {
    let out = run_ok(Command::new("df").args(["-B1", "--output=used"]).arg(p));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The layer records that matter (name, state, kind, digest, size), sorted: what must not change when an
/// operation fails.
fn records(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = d
        .cli(&["layers", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let r = &l["record"];
            format!(
                "{}/{} {} {} {} {}",
                r["ns"], r["name"], r["state"], r["kind"], r["digest"], r["size"]
            )
        })
        .collect();
    v.sort();
    v
}

fn staging_empty(d: &Daemon) -> bool {
    fs::read_dir(d.root().join("staging")).map_or(true, |mut rd| rd.next().is_none())
}

/// Fills the filesystem of `dir` with `filler` until ENOSPC.
fn fill(filler: &Path) {
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=1M", "status=none"])
        .status();
    // The last blocks one by one (dd stops at the first short write of a 1 MiB block).
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=4096", "oflag=append", "conv=notrunc", "status=none"])
        .status();
    let _ = Command::new("sync").arg("-f").arg(filler).status();
}

struct Findings {
    checks: u64,
    problems: Vec<String>,
}

impl Findings {
    fn expect(&mut self, cond: bool, what: impl Into<String>) {
        self.checks += 1;
        if !cond {
            let w = what.into();
            eprintln!("PROBLEM: {w}");
            self.problems.push(w);
        }
    }

    /// Expects the refusal `e` of the call `what` to mention `cause`.
    fn expect_answer(&mut self, e: Option<&str>, cause: &str, what: &str) {
        self.expect(
            e.is_some_and(|e| e.contains(cause)),
            format!("{what}: answer {e:?}"),
        );
    }

    /// Expects the layer records to be the same as `before` after `what`.
    fn expect_records(&mut self, d: &Daemon, before: &[String], what: &str) {
        let now = records(d);
        self.expect(now == before, format!("{what}: records changed: {now:?}"));
    }
}

fn err_text(r: Result<(), String>) -> Option<String> {
    r.err().map(|e| e.to_lowercase())
}

/// Waits until the used bytes fall to `limit` (background deletion), returns the last value.
fn used_settles(p: &Path, limit: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let u = used(p);
        if u <= limit || Instant::now() > deadline {
            return u;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const RO_OPS: [&str; 3] = ["ApplyDiff", "Create", "volume Create"];

fn ro_op(d: &Daemon, i: usize, small: &[u8]) -> Result<(), String> {
    match i {
        0 => apply(d, "ro-apply", "base", small),
        1 => gcreate(d, "ro-c", "base"),
        _ => vcall(d, "Create", json!({"Name": "vol3", "Opts": {}})).map(|_| ()),
    }
}

#[test]
fn full_readonly_and_failing_disks() {
    let Some(_serial) = serial_if(
        require_root("full_readonly_and_failing_disks")
            && require_bin("full_readonly_and_failing_disks", "mkfs.ext4"),
    ) else {
        return;
    };
    let t0 = Instant::now();
    let mut d = Daemon::new(&unique_name("faults-disk"));
    let fsdir = d.base.dir().join("disk");
    let img = d.base.dir().join("disk.img");
    fs::create_dir_all(&fsdir).unwrap();
    run_ok(
        Command::new("truncate")
            .arg("-s")
            .arg(format!("{DISK_MIB}M"))
            .arg(&img),
    );
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&img));
    run_ok(
        Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&img)
            .arg(&fsdir),
    );
    // Unmounted by the harness (TestDir unmounts everything below the test directory, the loop device goes
    // with it: `mount -o loop` sets autoclear) and the image is deleted with the directory.
    d.base.data_root = fsdir.join("data");
    let hits = d.base.dir().join("hits.log");
    // Every apply/create/commit/volume write point fails once (the first hit of each), in order.
    // The apply's points from its first commit up to its finishing one.
    let apply_points = lamina_testkit::crash::points_of("apply");
    let finish = apply_points
        .iter()
        .position(|p| *p == "store.apply.finish.commit")
        .unwrap();
    let eio_points = &apply_points[..=finish];
    assert_eq!(eio_points.first(), Some(&"store.apply.begin.commit"));
    let armed: Vec<String> = eio_points.iter().map(|p| format!("{p}=eio@1")).collect();
    let mut f = Findings {
        checks: 0,
        problems: Vec::new(),
    };
    let mut rng = Rng::new(lamina_testkit::reliability::base_seed() ^ 0xd15c);

    // ---- EIO at the apply write points (one daemon; each ApplyDiff fails at the next point) ----
    assert!(d.start(Some(&armed.join(",")), &hits));
    gcreate(&d, "base", "").unwrap();
    let (small, small_files) = make_tar(&mut rng, false);
    gcreate(&d, "eio", "base").unwrap();
    let before = records(&d);
    let used_before = used(&fsdir);
    for p in eio_points {
        let e = err_text(apply(&d, "eio", "base", &small));
        f.expect_answer(e.as_deref(), "input/output error", &format!("EIO at {p}"));
        f.expect_records(&d, &before, &format!("EIO at {p}"));
        f.expect(staging_empty(&d), format!("EIO at {p}: staging left"));
        f.expect(
            files_in(&layer_dir(&d, "eio").join("diff")).is_empty(),
            format!("EIO at {p}: content visible in the layer"),
        );
    }
    let r = apply(&d, "eio", "base", &small);
    f.expect(r.is_ok(), format!("apply after the EIO faults: {r:?}"));
    f.expect(
        files_in(&layer_dir(&d, "eio").join("diff")) == small_files,
        "apply after the EIO faults: content",
    );
    let u = used_settles(&fsdir, used_before + (2 << 20));
    f.expect(
        u <= used_before + (2 << 20),
        format!("EIO: used {used_before} -> {u}"),
    );
    d.stop();

    // ---- EIO at Create, snapshot Commit and volume Create (one daemon, first hit of each) ----
    let other = [
        "store.create.mkdir",
        "store.create.commit",
        "store.commit.syncfs",
        "store.commit.commit",
        "volume.create.mkdir",
        "volume.create.write",
        "volume.create.rename",
        "volume.create.commit",
    ];
    let armed: Vec<String> = other.iter().map(|p| format!("{p}=eio@1")).collect();
    assert!(d.start(Some(&armed.join(",")), &hits));
    let before = records(&d);
    for p in &other[..2] {
        let e = err_text(gcreate(&d, "c1", "base"));
        f.expect_answer(e.as_deref(), "input/output error", &format!("EIO at {p}"));
        f.expect_records(&d, &before, &format!("EIO at {p}"));
    }
    let r = gcreate(&d, "c1", "base");
    f.expect(r.is_ok(), format!("Create after EIO: {r:?}"));
    let s = Snap::connect(&d.snap_socket);
    s.prepare("active", "").unwrap();
    fs::write(layer_dir(&d, "active").join("diff/data"), b"snapshot data").unwrap();
    let before = records(&d);
    for p in &other[2..4] {
        let e = err_text(s.commit("committed", "active"));
        f.expect_answer(e.as_deref(), "input/output error", &format!("EIO at {p}"));
        f.expect_records(&d, &before, &format!("EIO at {p}"));
    }
    let r = s.commit("committed", "active");
    f.expect(r.is_ok(), format!("Commit after EIO: {r:?}"));
    for p in &other[4..] {
        let e = vcall(&d, "Create", json!({"Name": "vol", "Opts": {}}))
            .err()
            .map(|e| e.to_lowercase());
        f.expect_answer(e.as_deref(), "input/output error", &format!("EIO at {p}"));
        let vols = names_in(&d.root().join("volumes/local"));
        let recs = names_in(&d.root().join("volumes/local/.lamina"));
        f.expect(
            !vols.contains("vol") && !recs.iter().any(|n| n.contains("vol")) || *p == "volume.create.commit",
            format!("EIO at {p}: half-made volume left: {vols:?} {recs:?}"),
        );
    }
    let r = vcall(&d, "Create", json!({"Name": "vol", "Opts": {}}));
    f.expect(r.is_ok(), format!("volume Create after EIO: {r:?}"));
    d.stop();

    // ---- ENOSPC in the middle of an ApplyDiff: a layer larger than the free space ----
    assert!(d.start(None, &hits));
    gcreate(&d, "big", "base").unwrap();
    let before = records(&d);
    let used_before = used(&fsdir);
    let mut tar = BigTar::new("huge", (DISK_MIB + 32) << 20);
    let r = match d.client().apply_diff("big", "base", &mut tar) {
        Ok(r) => ok(&r, "ApplyDiff"),
        Err(e) => Err(format!("transport {e}")),
    };
    let used_full = used(&fsdir);
    eprintln!("ENOSPC apply answer: {r:?}");
    let e = err_text(r);
    f.expect_answer(e.as_deref(), "no space left on device", "ENOSPC apply");
    f.expect_records(&d, &before, "ENOSPC apply");
    f.expect(staging_empty(&d), "ENOSPC apply: staging left");
    let u = used_settles(&fsdir, used_before + (2 << 20));
    eprintln!("ENOSPC apply: used before {used_before}, at the answer {used_full}, settled {u}");
    f.expect(
        u <= used_before + (2 << 20),
        format!("ENOSPC apply: staged bytes not reclaimed: used {used_before} -> {u}"),
    );
    let r = apply(&d, "big", "base", &small);
    f.expect(r.is_ok(), format!("apply after ENOSPC: {r:?}"));

    // ---- A full filesystem: Create, snapshot Commit, ApplyDiff, volume Create; then space returns ----
    let s = Snap::connect(&d.snap_socket);
    s.prepare("active2", "").unwrap();
    fs::write(layer_dir(&d, "active2").join("diff/data"), vec![7u8; 100_000]).unwrap();
    gcreate(&d, "full-apply", "base").unwrap();
    // A commit whose record needs new database pages (800 labels of 4,000 bytes: 3.2 MB).
    s.prepare("active3", "").unwrap();
    let big_labels: std::collections::HashMap<String, String> =
        (0..800).map(|i| (format!("l{i}"), "x".repeat(3990))).collect();
    let filler = fsdir.join("filler");
    fill(&filler);
    let before = records(&d);
    let (mid, mid_files) = make_tar(&mut rng, true);
    let full_ops: Vec<NamedOp> = vec![
        ("Create", Box::new(|| gcreate(&d, "full-c", "base"))),
        ("Commit", Box::new(|| s.commit("committed2", "active2"))),
        (
            "Commit with 3 MB of labels",
            Box::new(|| s.commit_labels("committed3", "active3", big_labels.clone())),
        ),
        ("ApplyDiff", Box::new(|| apply(&d, "full-apply", "base", &mid))),
        (
            "volume Create",
            Box::new(|| vcall(&d, "Create", json!({"Name": "vol2", "Opts": {}})).map(|_| ())),
        ),
    ];
    let mut full_answers = Vec::new();
    for (what, op) in &full_ops {
        let r = op();
        full_answers.push(format!("{what}: {r:?}"));
        // Succeeding is fine (metadata may fit in free blocks); failing must say why.
        if let Some(e) = err_text(r) {
            f.expect(
                e.contains("no space left on device"),
                format!("full disk, {what}: answer {e:?}"),
            );
        }
        f.expect(staging_empty(&d), format!("full disk, {what}: staging left"));
    }
    let after_full = records(&d);
    fs::remove_file(&filler).unwrap();
    let _ = Command::new("sync").arg("-f").arg(&fsdir).status();
    // Space is back: whatever failed now succeeds, on the same daemon.
    for (what, op) in &full_ops {
        let r = op();
        let again_ok = r.is_ok()
            || r.as_ref()
                .err()
                .is_some_and(|e| e.contains("already exists") || e.contains("has content"))
            || (*what == "Commit" && layer_state(&d, "committed2").is_some())
            || (what.starts_with("Commit with") && layer_state(&d, "committed3").is_some());
        f.expect(again_ok, format!("space returned, {what}: {r:?}"));
    }
    f.expect(
        files_in(&layer_dir(&d, "full-apply").join("diff")) == mid_files,
        "space returned: applied content",
    );
    f.expect(
        before.len() <= after_full.len() + 1,
        format!("full disk: records {before:?} -> {after_full:?}"),
    );

    // ---- The data root turns read-only under the running daemon, then comes back writable ----
    // A plain `mount -o remount,ro` is refused while lamina holds files open for writing (its database), so
    // the read-only switch is what the kernel does on a filesystem error with `errors=remount-ro`
    // (ext4's `trigger_fs_error`); it lasts until the filesystem is unmounted, checked and mounted again.
    gcreate(&d, "ro-apply", "base").unwrap();
    drop(full_ops);
    let before = records(&d);
    let dev =
        String::from_utf8(run_ok(Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&fsdir)).stdout)
            .unwrap();
    let dev = dev.trim().trim_start_matches("/dev/").to_string();
    fs::write(
        format!("/sys/fs/ext4/{dev}/trigger_fs_error"),
        "lamina reliability_disk: read-only data root",
    )
    .unwrap();
    let mut ro_answers = Vec::new();
    for (i, what) in RO_OPS.iter().enumerate() {
        let r = ro_op(&d, i, &small);
        ro_answers.push(format!("{what}: {r:?}"));
        let e = err_text(r);
        f.expect_answer(
            e.as_deref(),
            "read-only file system",
            &format!("read-only, {what}"),
        );
    }
    f.expect_records(&d, &before, "read-only");
    d.stop();
    run_ok(Command::new("umount").arg(&fsdir));
    let fsck = Command::new("e2fsck").arg("-fy").arg(&img).output().unwrap();
    f.expect(
        fsck.status.code().is_some_and(|c| c <= 1),
        format!("e2fsck: {}", String::from_utf8_lossy(&fsck.stdout)),
    );
    run_ok(
        Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&img)
            .arg(&fsdir),
    );
    assert!(d.start(None, &hits));
    f.expect_records(&d, &before, "writable again");
    f.expect(staging_empty(&d), "writable again: staging left");
    for (i, what) in RO_OPS.iter().enumerate() {
        let r = ro_op(&d, i, &small);
        f.expect(r.is_ok(), format!("writable again, {what}: {r:?}"));
    }

    // A restart finds a consistent store.
    d.stop();
    assert!(d.start(None, &hits));
    let gc = d.cli(&["gc", "--dry-run"]);
    f.expect(
        gc["items"].as_array().is_some_and(|a| a.is_empty()),
        format!("after restart, gc finds garbage: {}", gc["items"]),
    );
    let verify = d.cli(&["verify", "--all"]).to_string();
    f.expect(!verify.contains("\"mismatch\""), format!("verify: {verify}"));
    d.stop();

    eprintln!("full disk answers: {full_answers:#?}");
    eprintln!("read-only answers: {ro_answers:#?}");
    eprintln!(
        "disk faults: {} checks, {} problems, time {:.1} s",
        f.checks,
        f.problems.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(f.problems.is_empty(), "{:#?}", f.problems);
}
