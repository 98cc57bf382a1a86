//! Size-limited layers on real filesystems (issue 9 part 4): a loop-backed btrfs (subvolume + qgroup limit), a
//! loop-backed ext4 (a clear error, nothing left behind), a loop-backed xfs without and with project quota. The
//! `btrfs` program is used only to check what the store did (`btrfs qgroup show`, `btrfs subvolume list`).

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lamina_store::{CreateOptions, GarbageKind, GcOptions, LayerKind, NewLayer, Store, StoreError};

use lamina_testkit::{is_quota_error, remove_and_sync, require_root, write_mb};

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("run {cmd:?}: {e} (is the package installed? btrfs-progs, xfsprogs, e2fsprogs)")
    })
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop-backed filesystem mounted on a fresh directory; unmounted (the loop device goes with it: `-o loop`
/// sets autoclear) and deleted on drop.
struct LoopFs {
    /// Holds the image and the mount point; deleted after the unmount in `drop`.
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl LoopFs {
    /// `mkfs.<fs>` on a sparse image of `size_mb` and `mount -o loop[,opts]`; the mount's error on failure.
    fn new(fs_type: &str, size_mb: u64, opts: &str) -> Result<LoopFs, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lamina-quota-{fs_type}-"))
            .tempdir_in("/var/tmp")
            .unwrap();
        let img = dir.path().join(format!("quota-{fs_type}.img"));
        fs::File::create(&img).unwrap().set_len(size_mb << 20).unwrap();
        let mkfs = format!("mkfs.{fs_type}");
        // A non-login PATH may lack the sbin directories.
        let mkfs = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(&mkfs))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(&mkfs));
        let mut cmd = Command::new(&mkfs);
        match fs_type {
            "ext4" => cmd.args(["-q", "-F"]),
            _ => cmd.arg("-q"),
        };
        run_ok(cmd.arg(&img));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let o = if opts.is_empty() {
            "loop".to_string()
        } else {
            format!("loop,{opts}")
        };
        let out = run(Command::new("mount").arg("-o").arg(&o).arg(&img).arg(&mnt));
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            return Err(msg.lines().next().unwrap_or("").trim().to_string());
        }
        Ok(LoopFs { _dir: dir, mnt })
    }

    fn root(&self) -> PathBuf {
        self.mnt.join("root")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if let Ok(mounts) = lamina_sys::mount::mounts_under(&self.mnt) {
            for m in mounts.iter().filter(|m| **m != self.mnt) {
                let _ = lamina_sys::mount::unmount(m, true);
            }
        }
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn btrfs_bin() -> PathBuf {
    ["/usr/bin/btrfs", "/bin/btrfs", "/usr/sbin/btrfs", "/sbin/btrfs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("btrfs"))
}

/// Creates the read-write layer `(ns, name)` on `parent` limited to `size` bytes.
fn create_sized(
    store: &Store,
    ns: &str,
    name: &str,
    parent: Option<&str>,
    size: u64,
) -> Result<(), StoreError> {
    let opts = CreateOptions {
        max_size: Some(size),
        ..CreateOptions::default()
    };
    store.create(
        NewLayer::new(ns, name, LayerKind::ReadWrite)
            .with_parent(parent)
            .with_options(opts),
    )
}

fn subvolume_id(path: &Path) -> u64 {
    let f = fs::File::open(path).unwrap();
    lamina_sys::quota::btrfs_subvolume_id(f.as_fd()).unwrap()
}

/// `btrfs qgroup show -r` rows: (qgroup id, max referenced).
fn qgroups(mnt: &Path) -> Vec<(String, String)> {
    let out = run(Command::new(btrfs_bin())
        .args(["qgroup", "show", "-r", "--raw"])
        .arg(mnt));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("0/"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f.get(3).unwrap_or(&"").to_string())
        })
        .collect()
}

fn subvolumes(mnt: &Path) -> Vec<String> {
    run_ok(Command::new(btrfs_bin()).args(["subvolume", "list"]).arg(mnt))
        .lines()
        .map(|l| l.to_string())
        .collect()
}

/// Waits until the qgroup and the subvolume of id `id` are gone.
fn wait_gone(mnt: &Path, id: u64) {
    let qg = format!("0/{id}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let q = qgroups(mnt);
        let s = subvolumes(mnt);
        let sub_left = s.iter().any(|l| l.starts_with(&format!("ID {id} ")));
        if !q.iter().any(|(g, _)| *g == qg) && !sub_left {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "qgroup {qg} or its subvolume still there after 90 s: {q:?} {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A store on a fresh loop-backed `fs_type` of `mb` MiB for `test`, or `None` (skip the test) when not root. Bound
/// as `let Some((lfs, store)) = ...`, the store drops before its filesystem.
fn loop_store(test: &str, fs_type: &str, mb: u64) -> Option<(LoopFs, Store)> {
    if !require_root(test) {
        return None;
    }
    let lfs = LoopFs::new(fs_type, mb, "").unwrap_or_else(|e| panic!("mount a loop-backed {fs_type}: {e}"));
    let store = Store::open(&lfs.root()).unwrap();
    Some((lfs, store))
}

#[test]
fn btrfs_limit_is_enforced_and_removal_frees_subvolume_and_qgroup() {
    let Some((lfs, store)) = loop_store(
        "btrfs_limit_is_enforced_and_removal_frees_subvolume_and_qgroup",
        "btrfs",
        400,
    ) else {
        return;
    };
    let ns = "docker:q";
    store
        .create(NewLayer::new(ns, "base", LayerKind::ReadOnly))
        .unwrap();
    let e = create_sized(&store, ns, "tiny", Some("base"), 4096).unwrap_err();
    assert!(matches!(e, StoreError::InvalidArgument(_)), "{e}");
    create_sized(&store, ns, "c1", Some("base"), 10 << 20).unwrap();
    store
        .create(NewLayer::new(ns, "free", LayerKind::ReadWrite).with_parent(Some("base")))
        .unwrap();
    let info = store.info(ns, "c1").unwrap();
    assert_eq!(info.record.max_size, Some(10 << 20));
    let layer_dir = info.diff_dir.parent().unwrap().to_path_buf();
    let st = fs::metadata(&layer_dir).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&st),
        256,
        "layers/<n> is a subvolume root"
    );
    let id = subvolume_id(&layer_dir);
    let q = qgroups(&lfs.mnt);
    assert!(
        q.contains(&(format!("0/{id}"), (10u64 << 20).to_string())),
        "qgroup 0/{id} limited to 10 MiB: {q:?}"
    );

    // Through the overlay mount, as a container writes.
    let merged = store.get(ns, "c1", "").unwrap();
    let e = write_mb(&merged.join("big"), 20).expect_err("20 MiB into a 10 MiB layer");
    assert!(is_quota_error(&e), "EDQUOT/ENOSPC expected, got {e}");
    remove_and_sync(&merged.join("big"));
    write_mb(&merged.join("small"), 2).expect("2 MiB fits");
    store.put(ns, "c1").unwrap();
    // A layer without a size has no limit and no subvolume of its own.
    let free = store.get(ns, "free", "").unwrap();
    write_mb(&free.join("big"), 20).expect("no limit without a size");
    store.put(ns, "free").unwrap();
    let free_dir = store.info(ns, "free").unwrap().diff_dir;
    let st = fs::metadata(free_dir.parent().unwrap()).unwrap();
    assert_ne!(std::os::unix::fs::MetadataExt::ino(&st), 256);

    // Apply into a sized layer is refused (content arrives through the mount).
    let mut empty: &[u8] = &[0u8; 1024];
    let e = store
        .apply(ns, "c1", &mut empty, &Default::default())
        .unwrap_err();
    assert!(matches!(e, StoreError::Precondition(_)), "{e}");

    // Remove: the subvolume and its qgroup go.
    assert!(store.remove(ns, "c1").unwrap());
    wait_gone(&lfs.mnt, id);
    assert!(!layer_dir.exists());
    drop(store);
}

#[test]
fn btrfs_commit_keeps_the_limit_and_gc_removes_leftover_subvolumes() {
    let Some((lfs, store)) = loop_store(
        "btrfs_commit_keeps_the_limit_and_gc_removes_leftover_subvolumes",
        "btrfs",
        400,
    ) else {
        return;
    };
    let ns = "containerd:q";
    create_sized(&store, ns, "active", None, 8 << 20).unwrap();
    let diff = store.info(ns, "active").unwrap().diff_dir;
    write_mb(&diff.join("f"), 1).unwrap();
    let rec = store.commit(ns, "active", "frozen", BTreeMap::new()).unwrap();
    assert_eq!(
        rec.max_size,
        Some(8 << 20),
        "the limit stays on a committed layer"
    );
    let id = subvolume_id(diff.parent().unwrap());
    assert!(qgroups(&lfs.mnt).iter().any(|(g, _)| *g == format!("0/{id}")));
    // A child of the committed, limited layer mounts (lowers in another subvolume).
    create_sized(&store, ns, "child", Some("frozen"), 8 << 20).unwrap();
    let m = store.get(ns, "child", "").unwrap();
    assert!(m.join("f").exists());
    store.put(ns, "child").unwrap();
    let child_id = subvolume_id(store.info(ns, "child").unwrap().diff_dir.parent().unwrap());
    store.remove(ns, "child").unwrap();
    store.remove(ns, "frozen").unwrap();
    wait_gone(&lfs.mnt, id);
    wait_gone(&lfs.mnt, child_id);

    // Leftovers a crash could leave: a limited subvolume in layers/ without a record, and one in trash/.
    let layers = lfs.root().join("layers");
    let trash = lfs.root().join("trash");
    let mut ids = Vec::new();
    for (dir, name) in [(&layers, "ff0"), (&trash, "ff1-0-1")] {
        let d = fs::File::open(dir).unwrap();
        lamina_sys::quota::btrfs_create_subvolume(d.as_fd(), name.as_bytes()).unwrap();
        let sid = subvolume_id(&dir.join(name));
        let sub = fs::File::open(dir.join(name)).unwrap();
        lamina_sys::quota::btrfs_limit(sub.as_fd(), sid, 4 << 20).unwrap();
        fs::create_dir(dir.join(name).join("diff")).unwrap();
        write_mb(&dir.join(name).join("diff/x"), 1).unwrap();
        ids.push(sid);
    }
    // The one in layers/ has no record and no proof of removal: only an operator's collection takes it.
    let report = store
        .gc(&GcOptions {
            unknown: true,
            ..GcOptions::default()
        })
        .unwrap();
    let kinds: Vec<GarbageKind> = report.items.iter().map(|g| g.kind).collect();
    assert!(kinds.contains(&GarbageKind::UnknownDir), "{report:?}");
    assert!(kinds.contains(&GarbageKind::Trash), "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    for sid in ids {
        wait_gone(&lfs.mnt, sid);
    }
    // And at start-up: a leftover in trash/ is destroyed by the recovery.
    drop(store);
    let d = fs::File::open(&trash).unwrap();
    lamina_sys::quota::btrfs_create_subvolume(d.as_fd(), b"ff2-0-1").unwrap();
    let sid = subvolume_id(&trash.join("ff2-0-1"));
    let store = Store::open(&lfs.root()).unwrap();
    wait_gone(&lfs.mnt, sid);
    assert!(fs::read_dir(&trash).unwrap().next().is_none());
    drop(store);
}

#[test]
fn ext4_refuses_a_size_and_leaves_nothing() {
    let Some((lfs, store)) = loop_store("ext4_refuses_a_size_and_leaves_nothing", "ext4", 64) else {
        return;
    };
    let e = create_sized(&store, "docker:q", "c1", None, 10 << 20).unwrap_err();
    assert!(matches!(e, StoreError::QuotaUnsupported { .. }), "{e}");
    assert!(e.to_string().starts_with("quota not supported on ext4 ("), "{e}");
    assert!(!store.exists("docker:q", "c1").unwrap());
    assert!(fs::read_dir(lfs.root().join("layers")).unwrap().next().is_none());
    assert!(store.list().unwrap().is_empty());
    drop(store);
}

/// Why the kernel refused `prjquota` on xfs, when it is the kernel's lack of XFS quota support.
fn kernel_lacks_xfs_quota() -> Option<String> {
    let config = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r) 2>/dev/null",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if config.contains("# CONFIG_XFS_QUOTA is not set") {
        return Some("CONFIG_XFS_QUOTA is not set in this kernel's config".into());
    }
    let dmesg = Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    dmesg
        .lines()
        .rev()
        .take(50)
        .find(|l| l.contains("XFS") && l.contains("quota support not available"))
        .map(|l| format!("the kernel says: {}", l.trim()))
}

#[test]
fn xfs_project_quota() {
    if !require_root("xfs_project_quota") {
        return;
    }
    // Without prjquota: a clear error naming the mount option.
    {
        let lfs = LoopFs::new("xfs", 320, "").expect("mount a loop-backed xfs without quota");
        let store = Store::open(&lfs.root()).unwrap();
        let e = create_sized(&store, "docker:q", "c1", None, 10 << 20).unwrap_err();
        assert!(e.to_string().starts_with("quota not supported on xfs ("), "{e}");
        assert!(e.to_string().contains("prjquota"), "{e}");
        assert!(fs::read_dir(lfs.root().join("layers")).unwrap().next().is_none());
        drop(store);
        // The project-id ioctls work without quota: the half of the xfs path this kernel can run.
        let d = lfs.mnt.join("projdir");
        fs::create_dir(&d).unwrap();
        let f = fs::File::open(&d).unwrap();
        assert!(!lamina_sys::quota::xfs_project_quota_enforced(f.as_fd()).unwrap());
        lamina_sys::quota::set_project_id(f.as_fd(), 4242).unwrap();
        assert_eq!(lamina_sys::quota::project_id(f.as_fd()).unwrap(), 4242);
        fs::create_dir(d.join("child")).unwrap();
        let c = fs::File::open(d.join("child")).unwrap();
        assert_eq!(
            lamina_sys::quota::project_id(c.as_fd()).unwrap(),
            4242,
            "inherited"
        );
    }
    let lfs = match LoopFs::new("xfs", 320, "prjquota") {
        Ok(l) => l,
        Err(mount_error) => {
            // The one allowed skip, also under CI: the kernel has no XFS quota support.
            let why = kernel_lacks_xfs_quota().unwrap_or_else(|| {
                panic!(
                    "mounting xfs with prjquota failed ({mount_error}), and not for a missing kernel feature"
                )
            });
            eprintln!(
                "\n******** SKIPPED: xfs_project_quota: the kernel has no XFS quota support (CONFIG_XFS_QUOTA; \
                 mount -o prjquota failed: {mount_error}; {why}) ********\n"
            );
            return;
        }
    };
    let store = Store::open(&lfs.root()).unwrap();
    let ns = "docker:q";
    store
        .create(NewLayer::new(ns, "base", LayerKind::ReadOnly))
        .unwrap();
    create_sized(&store, ns, "c1", Some("base"), 10 << 20).unwrap();
    let info = store.info(ns, "c1").unwrap();
    let dir = fs::File::open(info.diff_dir.parent().unwrap()).unwrap();
    assert_eq!(
        lamina_sys::quota::project_id(dir.as_fd()).unwrap(),
        info.number as u32
    );
    let merged = store.get(ns, "c1", "").unwrap();
    let e = write_mb(&merged.join("big"), 20).expect_err("20 MiB into a 10 MiB layer");
    assert!(is_quota_error(&e), "EDQUOT/ENOSPC expected, got {e}");
    store.put(ns, "c1").unwrap();
    store
        .create(NewLayer::new(ns, "free", LayerKind::ReadWrite).with_parent(Some("base")))
        .unwrap();
    let free = store.get(ns, "free", "").unwrap();
    write_mb(&free.join("big"), 20).expect("no limit without a size");
    store.put(ns, "free").unwrap();
    store.remove(ns, "c1").unwrap();
    drop(store);
}
