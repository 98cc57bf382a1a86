//! Size limits of writable layers (issue 9 part 4) with the real engines:
//! - dockerd 20.10 on lamina whose data root is a loop-backed btrfs: `docker run --storage-opt size=10M` cannot
//!   write past 10 MiB (EDQUOT in the container), removing the container removes its subvolumes and qgroups, a
//!   container without a size has no limit, bad sizes are clear errors that leave nothing behind;
//! - the same dockerd setup on a loop-backed ext4: a size is a clear "quota not supported on ext4 (...)" error
//!   and nothing is left behind;
//! - the containerd snapshotter API over gRPC on a loop-backed btrfs with the `containerd.io/snapshot/max-size`
//!   label on Prepare, mounted the way containerd mounts (bind, overlay).
//!
//! The `btrfs` program only checks what lamina did (`btrfs qgroup show`, `btrfs subvolume list`). The xfs
//! project-quota path is tested in crates/store/tests/quota.rs (it skips only on kernels without XFS quota).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lamina_snapshotter::proto::containerd::types::Mount;
use lamina_snapshotter::tonic::Code;
use lamina_testkit::containerd::LaminaSnap;
use lamina_testkit::snapshots::{SnapshotApi, SN};
use lamina_testkit::*;

const SIZE_LABEL: &str = "containerd.io/snapshot/max-size";
const TEN_MIB: u64 = 10 << 20;

/// A loop-backed `fs_type` filesystem of `size_mb` MiB (image `image`) mounted on `target`.
fn loop_mount(fs_type: &str, image: &Path, size_mb: u64, target: &Path) -> LoopFs {
    let mkfs_args: &[&str] = if fs_type == "ext4" { &["-q", "-F"] } else { &["-q"] };
    LoopFs::create(image, target, fs_type, mkfs_args, size_mb << 20).unwrap_or_else(|e| panic!("{e}"))
}

fn require_quota_tools(test: &str) -> bool {
    require_root(test)
        && ["mkfs.btrfs", "btrfs", "mkfs.ext4", "mount"]
            .iter()
            .all(|b| require_bin(test, b))
}

fn btrfs(args: &[&str], path: &Path) -> String {
    let out = Command::new(find_bin("btrfs").unwrap())
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("quotas not enabled") {
        // No size was asked for yet: lamina turns quota groups on with the first one.
        return String::new();
    }
    assert!(out.status.success(), "btrfs {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Level-0 qgroups with a referenced limit: (subvolume id, max_rfer bytes).
fn limited_qgroups(mnt: &Path) -> Vec<(u64, u64)> {
    btrfs(&["qgroup", "show", "-r", "--raw"], mnt)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let id = f.first()?.strip_prefix("0/")?.parse().ok()?;
            let max = f.get(3)?.parse().ok()?;
            Some((id, max))
        })
        .collect()
}

fn all_qgroups(mnt: &Path) -> Vec<u64> {
    btrfs(&["qgroup", "show", "--raw"], mnt)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("0/")?.parse().ok())
        .collect()
}

fn subvolume_ids(mnt: &Path) -> Vec<u64> {
    btrfs(&["subvolume", "list"], mnt)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

/// Waits (90 s) until neither a subvolume nor a qgroup of any of `ids` is left.
fn wait_gone(mnt: &Path, ids: &[u64]) {
    let gone = poll(Duration::from_secs(90), || {
        let subs = subvolume_ids(mnt);
        let qgs = all_qgroups(mnt);
        ids.iter()
            .all(|id| !subs.contains(id) && !qgs.contains(id))
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "subvolumes/qgroups {ids:?} still there: subvolumes {:?}, qgroups {:?}",
        subvolume_ids(mnt),
        all_qgroups(mnt)
    );
}

/// The layer directories, without the spares lamina keeps ready.
fn layer_entries(data_root: &Path) -> Vec<PathBuf> {
    lamina_testkit::layer_dirs_without_spares(&data_root.join("layers"))
}

/// lamina on a loop-backed `fs_type` data root, and a dockerd using it. Drop order: dockerd, lamina (which
/// unmounts its data root), the loop mount, then the serialisation guard.
struct Setup {
    docker: Dockerd,
    _lamina: Lamina,
    /// lamina's data root (on the loop filesystem).
    data_root: PathBuf,
    /// The busybox image, loaded into dockerd.
    img: String,
    _fs: LoopFs,
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

fn setup(test: &str, fs_type: &str) -> Option<Setup> {
    let serial = serial_if(require_docker(test) && require_quota_tools(test))?;
    let mut lamina = Lamina::new(&unique_name(test));
    let image = lamina.dir().join(format!("quota-{fs_type}.img"));
    let fs = loop_mount(fs_type, &image, 1024, &lamina.data_root);
    lamina.spawn();
    lamina.wait_ready();
    let docker = Dockerd::start(&lamina.name);
    let img = busybox_image(&docker, "quota-bb");
    Some(Setup {
        docker,
        data_root: lamina.data_root.clone(),
        img,
        _lamina: lamina,
        _fs: fs,
        _serial: serial,
    })
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn docker_storage_opt_size_on_btrfs() {
    let Some(s) = setup("docker_storage_opt_size_on_btrfs", "btrfs") else {
        return;
    };
    let before = limited_qgroups(&s.data_root);

    // Writing past the size fails inside the container.
    let out = s.docker.ok(&[
        "run",
        "--name",
        "limited",
        "--storage-opt",
        "size=10M",
        &s.img,
        "sh",
        "-c",
        "dd if=/dev/zero of=/big bs=1M count=20 2>&1; echo rc=$?; rm -f /big; dd if=/dev/zero of=/small bs=1M count=2 2>&1 && echo small-ok",
    ]);
    eprintln!("limited container:\n{out}");
    assert!(
        out.contains("Disk quota exceeded") || out.contains("No space left"),
        "EDQUOT/ENOSPC expected in the container: {out}"
    );
    assert!(out.contains("rc=1"), "{out}");
    assert!(out.contains("small-ok"), "2 MiB fit in 10 MiB: {out}");
    // dockerd creates the container's layer and its -init layer with the same options: both are limited.
    let limited: Vec<(u64, u64)> = limited_qgroups(&s.data_root)
        .into_iter()
        .filter(|q| !before.contains(q) && q.1 == TEN_MIB)
        .collect();
    assert_eq!(
        limited.len(),
        2,
        "two 10 MiB qgroups (layer and -init): {limited:?}"
    );
    let ids: Vec<u64> = limited.iter().map(|q| q.0).collect();
    let subs = subvolume_ids(&s.data_root);
    assert!(ids.iter().all(|id| subs.contains(id)), "{ids:?} in {subs:?}");

    // A container without a size has no limit.
    let out = s.docker.ok(&[
        "run",
        "--rm",
        &s.img,
        "sh",
        "-c",
        "dd if=/dev/zero of=/big bs=1M count=20 2>&1 && echo unlimited-ok",
    ]);
    assert!(out.contains("unlimited-ok"), "{out}");

    // Removing the container frees the quota objects.
    s.docker.ok(&["rm", "limited"]);
    wait_gone(&s.data_root, &ids);

    // Bad sizes: clear errors, nothing created.
    let layers_before = layer_entries(&s.data_root);
    for bad in ["abc", "0", "-1", "10X"] {
        let out = s
            .docker
            .docker(&["create", "--storage-opt", &format!("size={bad}"), &s.img]);
        let text = output_text(&out);
        assert!(!out.status.success(), "size={bad} accepted: {text}");
        assert!(text.contains("invalid size"), "size={bad}: {text}");
        eprintln!("size={bad}: {}", text.trim());
    }
    let out = s
        .docker
        .docker(&["create", "--storage-opt", "colour=blue", &s.img]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("not supported"),
        "{}",
        output_text(&out)
    );
    assert_eq!(s.docker.ok(&["ps", "-aq"]), "", "no container may be left");
    assert_eq!(layer_entries(&s.data_root), layers_before, "no layer may be left");
    assert_eq!(limited_qgroups(&s.data_root), before, "no qgroup may be left");
}

#[test]
fn docker_storage_opt_size_on_ext4_is_a_clear_error() {
    let Some(s) = setup("docker_storage_opt_size_on_ext4_is_a_clear_error", "ext4") else {
        return;
    };
    let layers_before = layer_entries(&s.data_root);
    let out = s
        .docker
        .docker(&["run", "--rm", "--storage-opt", "size=10M", &s.img, "true"]);
    let text = output_text(&out);
    eprintln!("ext4: {}", text.trim());
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("quota not supported on ext4 ("), "{text}");
    assert_eq!(s.docker.ok(&["ps", "-aq"]), "", "no container may be left");
    assert_eq!(layer_entries(&s.data_root), layers_before, "no layer may be left");
    // Without a size, containers run as usual.
    assert_eq!(s.docker.ok(&["run", "--rm", &s.img, "echo", "fine"]), "fine");
}

// ------------------------------------------------------------------------------------------------------------
// containerd snapshotter API
// ------------------------------------------------------------------------------------------------------------

/// Mounts what Prepare returned on `target` with mount(8), as containerd would.
fn mount_snapshot(m: &[Mount], target: &Path) {
    assert_eq!(m.len(), 1, "{m:?}");
    fs::create_dir_all(target).unwrap();
    run_ok(
        Command::new("mount")
            .arg("-t")
            .arg(&m[0].r#type)
            .arg("-o")
            .arg(m[0].options.join(","))
            .arg(&m[0].source)
            .arg(target),
    );
}

/// A test directory, lamina as a snapshotter on a loop-backed `fs_type` data root of `size_mb` MiB in it,
/// and a client of its socket; `None` (skip `test`) without root or the quota tools.
fn snapshotter_on(
    test: &str,
    tag: &str,
    fs_type: &str,
    size_mb: u64,
) -> Option<(TestDir, LaminaSnap, LoopFs, SnapshotApi)> {
    if !require_quota_tools(test) {
        return None;
    }
    let dir = TestDir::new(&unique_name(tag));
    let mut lamina = LaminaSnap::new(&dir.join("l"));
    let fs = loop_mount(
        fs_type,
        &dir.join(format!("quota-{fs_type}.img")),
        size_mb,
        &lamina.data_root,
    );
    lamina.spawn();
    lamina.wait_ready();
    let api = SnapshotApi::connect(&lamina.socket);
    Some((dir, lamina, fs, api))
}

#[test]
fn snapshotter_max_size_label_on_btrfs() {
    let Some((dir, lamina, _fs, api)) =
        snapshotter_on("snapshotter_max_size_label_on_btrfs", "snap-quota", "btrfs", 1024)
    else {
        return;
    };
    let root = lamina.data_root.clone();
    let ten = TEN_MIB.to_string();

    // A parentless active snapshot: a bind mount of its own directory.
    let m = api.prepare_in(SN, "a", "", &[(SIZE_LABEL, &ten)]).unwrap();
    assert_eq!(m[0].r#type, "bind", "{m:?}");
    let q = limited_qgroups(&root);
    assert!(q.iter().any(|(_, max)| *max == TEN_MIB), "{q:?}");
    let target = dir.join("mnt-a");
    mount_snapshot(&m, &target);
    let e = write_mb(&target.join("big"), 20).expect_err("20 MiB into a 10 MiB snapshot");
    assert!(is_quota_error(&e), "{e}");
    remove_and_sync(&target.join("big"));
    write_mb(&target.join("base-file"), 1).unwrap();
    umount(&target);
    assert_eq!(
        api.stat("a").unwrap().labels.get(SIZE_LABEL),
        Some(&ten),
        "the label is kept"
    );
    // Commit keeps working; the limit stays with the committed layer.
    api.commit("a-c", "a").unwrap();

    // An active snapshot on a parent: overlay, as containerd mounts it.
    let m = api.prepare_in(SN, "b", "a-c", &[(SIZE_LABEL, &ten)]).unwrap();
    assert_eq!(m[0].r#type, "overlay", "{m:?}");
    let target = dir.join("mnt-b");
    mount_snapshot(&m, &target);
    assert!(target.join("base-file").exists());
    let e = write_mb(&target.join("big"), 20).expect_err("20 MiB into a 10 MiB snapshot");
    assert!(is_quota_error(&e), "{e}");
    umount(&target);
    let limited: Vec<u64> = limited_qgroups(&root)
        .into_iter()
        .filter(|q| q.1 == TEN_MIB)
        .map(|q| q.0)
        .collect();
    assert_eq!(limited.len(), 2, "{limited:?}");

    // Without the label: no limit.
    let m = api.prepare_in(SN, "c", "a-c", &[]).unwrap();
    let target = dir.join("mnt-c");
    mount_snapshot(&m, &target);
    write_mb(&target.join("big"), 20).expect("no limit without the label");
    umount(&target);

    // Bad values: InvalidArgument, nothing left.
    let before = layer_entries(&root);
    for bad in ["abc", "0", "-1", "10X"] {
        let e = api.prepare_in(SN, "bad", "", &[(SIZE_LABEL, bad)]).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().contains(SIZE_LABEL), "{}", e.message());
    }
    assert_eq!(layer_entries(&root), before);

    // Remove frees the subvolumes and qgroups.
    api.remove("b").unwrap();
    api.remove("c").unwrap();
    api.remove("a-c").unwrap();
    wait_gone(&root, &limited);
    let start = Instant::now();
    drop(api);
    drop(lamina);
    eprintln!("stopped in {:?}", start.elapsed());
}

#[test]
fn snapshotter_max_size_label_on_ext4_is_a_clear_error() {
    let Some((_dir, lamina, _fs, api)) = snapshotter_on(
        "snapshotter_max_size_label_on_ext4_is_a_clear_error",
        "snap-quota-ext4",
        "ext4",
        128,
    ) else {
        return;
    };
    let e = api
        .prepare_in(SN, "a", "", &[(SIZE_LABEL, &TEN_MIB.to_string())])
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().starts_with("quota not supported on ext4 ("),
        "{}",
        e.message()
    );
    assert!(layer_entries(&lamina.data_root).is_empty(), "nothing may be left");
    // Without the label it works as usual.
    api.prepare_in(SN, "b", "", &[]).unwrap();
    drop(api);
    drop(lamina);
}
