//! Reliability tier, part 2 (issue 8): differential correctness against GNU tar, through the real binary.
//!
//! For each generated tree (directories, regular files of random sizes, sparse files, symlinks with short,
//! long, absolute and dangling targets, hardlinks, FIFOs, character and block devices; modes including
//! setuid/setgid/sticky, random owners, `user.*` xattrs, nanosecond times, long and odd names), GNU tar writes
//! one stream (the format varies: PAX with sparse 1.0 or 0.1, or GNU with `L`/`K` records and old sparse
//! headers). Then:
//! 1. the layer lamina applies from it (ApplyDiff over the plugin socket onto an empty layer, read on disk)
//!    equals GNU tar's extraction of the same stream as root (`--xattrs --numeric-owner --same-owner -p`):
//!    names, types, modes, owners, sizes, device numbers, times, `user.*` xattrs, content hashes, and the
//!    hardlink groups;
//! 2. lamina's `Diff` of that layer, extracted by GNU tar, gives the same tree again (times in whole seconds:
//!    lamina's Diff, like Docker's archive writer, drops sub-second times);
//! 3. `Diff` → `ApplyDiff` on a new layer → `Diff` is stable: the second stream is byte-identical to the
//!    first and the two layers are equal.
//!
//! Ordinary archives only: no `.wh.` names (whiteouts are overlay-specific and covered by the e2e and archive
//! tests).
//!
//! Sizes: 12 trees by default (CI), `LAMINA_RELIABILITY=full` 200, or `LAMINA_RELIABILITY_TREES=N`.
//! Run: `cargo test -p lamina --test reliability_differential -- --nocapture`.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Instant;

use serde_json::json;

use lamina_testkit::reliability::*;
use lamina_testkit::*;

const UIDS: &[u32] = &[0, 1, 33, 1000, 65534, 123_456, 4_000_000];
const FILE_MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6755, 0o444, 0o000, 0o1644, 0o7777,
];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o1777, 0o2755, 0o750, 0o555, 0o711];

fn odd_name(r: &mut Rng, i: usize) -> String {
    match r.below(10) {
        0 => format!("{}-{i}", "n".repeat(r.range(90, 250) as usize)),
        1 => format!("with space {i}"),
        2 => format!("ünïcødé-{i}"),
        3 => format!("semi;colon,{i}"),
        4 => format!("-dash-{i}"),
        5 => format!(".hidden-{i}"),
        _ => format!("e{i}"),
    }
}

/// Builds a random tree in `root` (which exists); returns how many entries it made.
fn make_tree(root: &Path, r: &mut Rng, with_xattrs: bool) -> usize {
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut all: Vec<PathBuf> = Vec::new();
    let n = r.range(20, 70) as usize;
    for i in 0..n {
        let parent = r.pick(&dirs).clone();
        let p = parent.join(odd_name(r, i));
        if p.as_os_str().len() - root.as_os_str().len() > 3000 {
            continue;
        }
        let pd = File::open(&parent).unwrap();
        let name = p.file_name().unwrap().as_bytes().to_vec();
        match r.below(12) {
            0..=2 => {
                fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
            }
            3..=6 => {
                let size = *r.pick(&[0u64, 1, 511, 512, 513, 4096, 70_000, 300_000]);
                let mut d = vec![0u8; size as usize];
                fill_random(r.next_u64(), &mut d);
                fs::write(&p, &d).unwrap();
                files.push(p.clone());
            }
            7 => {
                // sparse: holes with a few data chunks
                let mut f = File::create(&p).unwrap();
                let real = *r.pick(&[64u64 << 10, 1 << 20, 8 << 20]);
                for _ in 0..r.range(1, 4) {
                    let off = r.below(real / 4096) * 4096;
                    f.seek(SeekFrom::Start(off)).unwrap();
                    let n = r.range(1, 9000) as usize;
                    f.write_all(&r.bytes(n)).unwrap();
                }
                f.set_len(real).unwrap();
                files.push(p.clone());
            }
            8 => {
                let target = match r.below(5) {
                    0 => "/etc/passwd".to_string(),
                    1 => "../../../../outside".to_string(),
                    2 => format!("{}/t", "long-target".repeat(15)),
                    3 => "dangling".to_string(),
                    _ => all
                        .last()
                        .and_then(|x: &PathBuf| x.file_name())
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "x".into()),
                };
                std::os::unix::fs::symlink(&target, &p).unwrap();
            }
            9 if !files.is_empty() => {
                let target = r.pick(&files).clone();
                fs::hard_link(&target, &p).unwrap();
            }
            10 => {
                lamina_sys::fs::mkfifo(pd.as_fd(), &name, 0o644).unwrap();
            }
            _ => {
                let block = r.chance(1, 2);
                lamina_sys::fs::mknod_device(
                    pd.as_fd(),
                    &name,
                    block,
                    0o660,
                    r.below(300) as u32,
                    r.below(300) as u32,
                )
                .unwrap();
            }
        }
        all.push(p);
    }
    // owners, modes, xattrs, times: deepest first so directory times are set after their content
    all.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in &all {
        let m = fs::symlink_metadata(p).unwrap();
        let parent = File::open(p.parent().unwrap()).unwrap();
        let name = p.file_name().unwrap().as_bytes();
        let (uid, gid) = (*r.pick(UIDS), *r.pick(UIDS));
        lamina_sys::fs::chown_at(parent.as_fd(), name, uid, gid).unwrap();
        if !m.file_type().is_symlink() {
            let mode = if m.is_dir() {
                *r.pick(DIR_MODES)
            } else {
                *r.pick(FILE_MODES)
            };
            lamina_sys::fs::chmod_at(parent.as_fd(), name, mode).unwrap();
            if with_xattrs && (m.is_dir() || m.is_file()) && r.chance(1, 3) {
                let n = r.range(0, 200) as usize;
                let v = r.bytes(n);
                lamina_sys::fs::set_xattr_at(parent.as_fd(), name, b"user.test", &v).unwrap();
                if r.chance(1, 3) {
                    lamina_sys::fs::set_xattr_at(parent.as_fd(), name, b"user.second.key", b"text value")
                        .unwrap();
                }
            }
        }
        let sec = r.range(0, 4_102_444_800) as i64;
        let nsec = if r.chance(1, 2) {
            r.below(1_000_000_000) as u32
        } else {
            0
        };
        lamina_sys::fs::set_times_at(parent.as_fd(), name, sec, nsec).unwrap();
    }
    all.len()
}

/// Runs GNU tar with `args`, feeding `input` (if any); returns stdout. Panics with stderr on failure.
fn gnu_tar(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("tar")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tar");
    let writer = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(w) = writer {
        w.join().unwrap();
    }
    assert!(
        out.status.success(),
        "tar {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const EXTRACT: &[&str] = &[
    "-x",
    "-f",
    "-",
    "--xattrs",
    "--xattrs-include=*",
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
];

fn gnu_extract(tar: &[u8], into: &Path) {
    fs::create_dir_all(into).unwrap();
    let mut args = vec!["-C", into.to_str().unwrap()];
    args.extend_from_slice(EXTRACT);
    gnu_tar(&args, Some(tar));
}

fn user_xattrs(k: &[u8]) -> bool {
    k.starts_with(b"user.")
}

/// Applies `tar` to a new empty layer `id`; returns its on-disk content directory.
fn apply(c: &PluginClient, id: &str, tar: &[u8]) -> PathBuf {
    c.call("Create", json!({"ID": id})).ok(&format!("Create {id}"));
    let mut body: &[u8] = tar;
    c.apply_diff(id, "", &mut body)
        .unwrap_or_else(|e| panic!("ApplyDiff {id}: {e}"))
        .ok(&format!("ApplyDiff {id}"));
    let v = c.call("Get", json!({"ID": id})).ok("Get");
    let dir = PathBuf::from(v["Dir"].as_str().unwrap());
    c.call("Put", json!({"ID": id})).ok("Put");
    dir.parent().unwrap().join("diff")
}

fn diff(c: &PluginClient, id: &str) -> Vec<u8> {
    let r = c.call("Diff", json!({"ID": id, "Parent": ""}));
    assert_eq!(r.status, 200, "Diff {id}: {}", r.text());
    r.body
}

/// The tree with sub-second times dropped: lamina's Diff writes whole seconds, as Docker's archive writer does
/// (`ModTime.Truncate(time.Second)`, which keeps DiffIDs reproducible).
fn seconds_only(mut t: Tree) -> Tree {
    for e in t.entries.values_mut() {
        if let Some((_, ns)) = e.mtime.as_mut() {
            *ns = 0;
        }
    }
    t
}

fn hex_id(n: u64) -> String {
    let mut b = [0u8; 32];
    fill_random(n ^ (u64::from(std::process::id()) << 24), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn lamina_extracts_like_gnu_tar() {
    let test = "lamina_extracts_like_gnu_tar";
    let Some(_serial) = serial_if(require_root(test) && require_bin(test, "tar")) else {
        return;
    };
    let trees = count("LAMINA_RELIABILITY_TREES", 12, 200);
    let lamina = Lamina::start(&unique_name("differential"));
    let c = lamina.client();
    c.init(&lamina.dir().join("docker-root"));
    let work = lamina.dir().join("work");
    let seed0 = base_seed();
    let started = Instant::now();
    let (mut entries, mut bytes, mut mismatches, mut unstable) = (0usize, 0usize, Vec::new(), 0u64);
    for t in 0..trees {
        let seed = seed0.wrapping_add(t);
        let mut r = Rng::new(seed);
        let formats: &[(&str, &[&str])] = &[
            (
                "pax, sparse 1.0",
                &[
                    "--format=pax",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--sparse",
                    "--sparse-version=1.0",
                ],
            ),
            (
                "pax, sparse 0.1",
                &[
                    "--format=pax",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--sparse",
                    "--sparse-version=0.1",
                ],
            ),
            ("gnu, old sparse", &["--format=gnu", "--sparse"]),
            (
                "pax, no sparse",
                &["--format=pax", "--xattrs", "--xattrs-include=*"],
            ),
        ];
        let (fmt_name, fmt) = *r.pick(formats);
        let src = work.join(format!("src-{t}"));
        fs::create_dir_all(&src).unwrap();
        entries += make_tree(&src, &mut r, fmt_name.starts_with("pax"));
        let mut args = vec!["-C", src.to_str().unwrap(), "-c", "-f", "-", "--numeric-owner"];
        args.extend_from_slice(fmt);
        args.push(".");
        let stream = gnu_tar(&args, None);
        bytes += stream.len();

        // 1. lamina vs GNU tar, same stream
        let gnu_dir = work.join(format!("gnu-{t}"));
        gnu_extract(&stream, &gnu_dir);
        let id = hex_id(seed * 4);
        let layer = apply(&c, &id, &stream);
        let gnu_tree = read_tree(&gnu_dir, &user_xattrs, true);
        let lam_tree = read_tree(&layer, &user_xattrs, true);
        let d = compare_trees("gnu tar", &gnu_tree, "lamina", &lam_tree);
        if !d.is_empty() {
            mismatches.push(format!(
                "tree {t} (seed {seed}, {fmt_name}) apply:\n{}",
                d.join("\n")
            ));
        }

        // 2. lamina's Diff read back by GNU tar
        let d1 = diff(&c, &id);
        let back = work.join(format!("back-{t}"));
        gnu_extract(&d1, &back);
        let back_tree = read_tree(&back, &user_xattrs, true);
        let gnu_secs = seconds_only(read_tree(&gnu_dir, &user_xattrs, true));
        let d = compare_trees(
            "gnu tar of the source stream",
            &gnu_secs,
            "gnu tar of lamina's Diff",
            &back_tree,
        );
        if !d.is_empty() {
            mismatches.push(format!(
                "tree {t} (seed {seed}, {fmt_name}) Diff:\n{}",
                d.join("\n")
            ));
        }

        // 3. Diff -> ApplyDiff -> Diff
        let id2 = hex_id(seed * 4 + 1);
        let layer2 = apply(&c, &id2, &d1);
        let d2 = diff(&c, &id2);
        if d1 != d2 {
            unstable += 1;
            mismatches.push(format!(
                "tree {t} (seed {seed}, {fmt_name}): Diff -> ApplyDiff -> Diff not byte-identical ({} vs {} bytes)",
                d1.len(),
                d2.len()
            ));
        }
        let d = compare_trees(
            "layer",
            &seconds_only(lam_tree),
            "re-applied layer",
            &read_tree(&layer2, &user_xattrs, true),
        );
        if !d.is_empty() {
            mismatches.push(format!(
                "tree {t} (seed {seed}, {fmt_name}) re-apply:\n{}",
                d.join("\n")
            ));
        }
        for i in [&id, &id2] {
            c.call("Remove", json!({"ID": i})).ok("Remove");
        }
        let _ = fs::remove_dir_all(&src);
        let _ = fs::remove_dir_all(&gnu_dir);
        let _ = fs::remove_dir_all(&back);
    }
    eprintln!(
        "RELIABILITY differential: {trees} trees, {entries} entries, {} MB of tar, {:.0} s: {} mismatches, \
         {unstable} unstable Diff round trips",
        bytes / 1_000_000,
        started.elapsed().as_secs_f64(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}
