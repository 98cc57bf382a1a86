//! The tier between two stores on one shared directory (a plain temporary directory here): publication,
//! adoption, the publish race, waiting on another host's claim, and garbage collection across hosts, with
//! directory layers (nothing mounts or needs root); and the same with image layers (EROFS images, mounted:
//! root and `mkfs.erofs` needed, skipped loudly without them).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lamina_lease::{HostId, Lease, LeaseConfig};
use lamina_sys::mounter::{FakeMounter, Mounter};

use crate::{GarbageKind, GcOptions, LayerKind, NewLayer, OpenOptions, Store, TierFormat, TierOptions};

const NS: &str = "containerd:lamina";

/// `Store::adopt_shared` of the chain `name` with no parent and no labels: whether the layer is here now.
fn adopt(s: &Store, name: &str) -> bool {
    s.adopt_shared(NS, name, None, BTreeMap::new()).unwrap()
}

fn chain(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn lease(tier: &Path, host: &str) -> Lease {
    Lease::open(LeaseConfig {
        dir: tier.to_path_buf(),
        host: HostId::new(host).unwrap(),
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_secs(1),
    })
    .unwrap()
}

fn open(root: &Path, tier: &Path, lease: &Lease) -> Store {
    open_as(root, tier, lease, TierFormat::Directory)
}

fn open_as(root: &Path, tier: &Path, lease: &Lease, format: TierFormat) -> Store {
    let mounter: Arc<dyn Mounter> = Arc::new(FakeMounter::new());
    Store::open_with_options(
        root,
        OpenOptions {
            mounter: Some(mounter),
            tier: Some(TierOptions {
                dir: tier.to_path_buf(),
                lease: lease.clone(),
                claim_wait: Duration::from_secs(1),
                format,
                usage_retention: crate::DEFAULT_USAGE_RETENTION,
            }),
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// Two hosts, `a` and `b`, on one tier directory.
struct Hosts {
    _dir: tempfile::TempDir,
    tier: std::path::PathBuf,
    la: Lease,
    lb: Lease,
    a: Store,
    b: Store,
}

/// A temporary directory with a tier directory and two hosts' stores publishing in `format`.
fn two_hosts(format: TierFormat) -> (tempfile::TempDir, std::path::PathBuf, Lease, Lease, Store, Store) {
    let dir = tempfile::tempdir().unwrap();
    let tier = dir.path().join("tier");
    std::fs::create_dir_all(&tier).unwrap();
    let (la, lb) = (lease(&tier, "a"), lease(&tier, "b"));
    let a = open_as(&dir.path().join("a"), &tier, &la, format);
    let b = open_as(&dir.path().join("b"), &tier, &lb, format);
    (dir, tier, la, lb, a, b)
}

impl Hosts {
    fn new() -> Hosts {
        let (dir, tier, la, lb, a, b) = two_hosts(TierFormat::Directory);
        Hosts {
            _dir: dir,
            tier,
            la,
            lb,
            a,
            b,
        }
    }
}

/// A committed layer `name` holding `file` with `text`, unpacked here as containerd would (write, commit).
fn unpack(s: &Store, name: &str, file: &str, text: &str) {
    let key = format!("extract {name}");
    s.create(NewLayer::new(NS, &key, LayerKind::ReadWrite)).unwrap();
    std::fs::write(s.info(NS, &key).unwrap().diff_dir.join(file), text).unwrap();
    s.commit(NS, &key, name, BTreeMap::new()).unwrap();
}

/// Host `s` finds chain `chain` missing from the tier, claims it, unpacks it as `name` (one file) and publishes it.
fn unpack_and_publish(s: &Store, chain: &str, name: &str, file: &str, text: &str) {
    assert!(
        !adopt(s, chain),
        "{chain} is not in the tier: this host unpacks it"
    );
    unpack(s, name, file, text);
    assert!(s.publish_shared(NS, name, chain).unwrap());
}

/// The garbage of kind `kind` that a collection on `s` finds (and removes unless `dry_run`).
fn tier_garbage(s: &Store, dry_run: bool, kind: GarbageKind) -> Vec<crate::Garbage> {
    s.gc(&GcOptions {
        dry_run,
        ..GcOptions::default()
    })
    .unwrap()
    .items
    .into_iter()
    .filter(|g| g.kind == kind)
    .collect()
}

fn tier_gc(s: &Store, dry_run: bool) -> Vec<String> {
    tier_garbage(s, dry_run, GarbageKind::TierLayer)
        .into_iter()
        .filter_map(|g| g.name)
        .collect()
}

#[test]
fn a_published_layer_is_adopted_by_another_host_and_collected_when_no_host_holds_it() {
    let h = Hosts::new();
    let (tier, la, lb, a, b) = (&h.tier, &h.la, &h.lb, &h.a, &h.b);
    let c1 = chain(1);

    // Host A unpacks and publishes.
    unpack_and_publish(a, &c1, "a/1/layer", "hello", "hi\n");
    let hex = c1.trim_start_matches("sha256:");
    let published = tier.join("layers").join(hex);
    assert_eq!(
        std::fs::read_to_string(published.join("diff/hello")).unwrap(),
        "hi\n"
    );
    assert!(published.join("seal.json").exists() && published.join("manifest").exists());
    assert!(std::fs::read_dir(tier.join("staging")).unwrap().next().is_none());
    assert!(
        tier.join("refs/layer").join(hex).join("a").exists(),
        "the publisher references it"
    );

    // Host B adopts it: a committed layer named by the chain id whose content is the tier's.
    let labels = BTreeMap::from([("containerd.io/snapshot.ref".to_string(), c1.clone())]);
    assert!(b.adopt_shared(NS, &c1, None, labels.clone()).unwrap());
    let (rec, _) = b.record(NS, &c1).unwrap();
    assert_eq!(rec.kind, LayerKind::ReadOnly);
    assert_eq!(rec.shared.as_deref(), Some(c1.as_str()));
    assert_eq!(rec.labels, labels);
    assert!(rec.manifest.is_some() && rec.size.is_some());
    let diff = b.info(NS, &c1).unwrap().diff_dir;
    assert!(std::fs::symlink_metadata(&diff).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(diff.join("hello")).unwrap(), "hi\n");
    assert!(adopt(b, &c1), "asked again: it exists");
    let top = a.tier_layers().unwrap().unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!((top[0].chain.as_str(), top[0].live_hosts), (c1.as_str(), 2));
    assert_eq!(top[0].hosts, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(top[0].published_by, "a");

    // Host B's own unpack of the same layer loses the publication cleanly.
    unpack(b, "b/2/layer", "hello", "hi\n");
    assert!(!b.publish_shared(NS, "b/2/layer", &c1).unwrap());
    assert!(std::fs::read_dir(tier.join("staging")).unwrap().next().is_none());

    // Collection: nothing while a live host holds the layer, even after the publisher dropped it.
    std::thread::sleep(Duration::from_millis(2100));
    la.beat().unwrap();
    lb.beat().unwrap();
    assert!(tier_gc(a, true).is_empty());
    assert!(a.remove(NS, "a/1/layer").unwrap());
    assert!(tier_gc(a, false).is_empty(), "host B still holds it");
    assert!(
        !tier.join("refs/layer").join(hex).join("a").exists(),
        "A's reference went with its layer"
    );
    assert!(published.exists());
    assert_eq!(std::fs::read_to_string(diff.join("hello")).unwrap(), "hi\n");
    assert!(b.remove(NS, &c1).unwrap());
    assert!(b.remove(NS, "b/2/layer").unwrap());
    assert_eq!(tier_gc(b, true), vec![c1.clone()], "the dry run lists it");
    assert!(published.exists(), "a dry run removes nothing");
    assert_eq!(tier_gc(b, false), vec![c1.clone()]);
    assert!(!published.exists());
}

#[test]
fn a_prepare_waits_for_another_hosts_claim_then_unpacks_itself() {
    let h = Hosts::new();
    let (a, b) = (&h.a, &h.b);
    let c2 = chain(2);
    assert!(!adopt(a, &c2), "A claims");
    let t0 = Instant::now();
    assert!(!adopt(b, &c2), "B gives up waiting");
    assert!(t0.elapsed() >= Duration::from_secs(1), "B waited for A's claim");
    // A publishes while B waits: B adopts it.
    let c3 = chain(3);
    assert!(!adopt(a, &c3));
    std::thread::scope(|s| {
        let waiting = s.spawn(|| adopt(b, &c3));
        std::thread::sleep(Duration::from_millis(300));
        unpack(a, "a/3", "x", "3");
        a.publish_shared(NS, "a/3", &c3).unwrap();
        assert!(
            waiting.join().unwrap(),
            "B adopted the layer A published while it waited"
        );
    });
    let diff = b.info(NS, &c3).unwrap().diff_dir;
    assert_eq!(std::fs::read_to_string(diff.join("x")).unwrap(), "3");
}

/// Docker's `ApplyDiff` of the layer tar `bytes` as layer `name` on host `s`, then the swap for the tier's
/// copy: whether it swapped.
fn apply_docker(s: &Store, name: &str, bytes: &[u8]) -> bool {
    s.create(NewLayer::new("docker:/x", name, LayerKind::ReadOnly))
        .unwrap();
    s.apply("docker:/x", name, &mut &bytes[..], &Default::default())
        .unwrap();
    s.share_applied("docker:/x", name).unwrap()
}

/// A layer tar of one file, `motd` = "hi\n", and its DiffID (as the only layer, also its chain id).
fn motd_tar() -> (Vec<u8>, String) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    builder.append_data(&mut h, "motd", &b"hi\n"[..]).unwrap();
    let bytes = builder.into_inner().unwrap();
    let diff_id = lamina_archive::manifest::digest_of(&bytes);
    (bytes, diff_id)
}

#[test]
fn an_applied_layer_already_in_the_tier_keeps_no_local_copy() {
    let h = Hosts::new();
    let (a, b) = (&h.a, &h.b);
    let (bytes, diff_id) = motd_tar();
    // Not in the tier yet: the applied layer stays local.
    assert!(!apply_docker(b, "first", &bytes));
    // Host A publishes the same content under that chain id; host B's next apply of it links the tier.
    unpack(a, "a/1", "motd", "hi\n");
    assert!(a.publish_shared(NS, "a/1", &diff_id).unwrap());
    assert!(apply_docker(b, "second", &bytes));
    let info = b.info("docker:/x", "second").unwrap();
    assert!(std::fs::symlink_metadata(&info.diff_dir)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(info.diff_dir.join("motd")).unwrap(),
        "hi\n"
    );
    assert!(
        !info.diff_dir.with_file_name("diff.tier").exists(),
        "the local copy is gone"
    );
    assert_eq!(
        b.record("docker:/x", "second").unwrap().0.shared.as_deref(),
        Some(diff_id.as_str())
    );
    assert!(!b.share_applied("docker:/x", "second").unwrap(), "once");
}

#[test]
fn an_abandoned_unpack_releases_its_claim_at_once() {
    let h = Hosts::new();
    let (a, b) = (&h.a, &h.b);
    let c4 = chain(4);
    assert!(!adopt(a, &c4), "A claims");
    a.release_shared_claim(&c4);
    let t0 = Instant::now();
    assert!(!adopt(b, &c4), "B claims");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "B did not wait: {:?}",
        t0.elapsed()
    );
}

#[test]
fn the_tier_shows_which_hosts_use_a_layer_and_when_it_was_last_used() {
    let h = Hosts::new();
    let (tier, a, b) = (&h.tier, &h.a, &h.b);
    let c1 = chain(7);
    unpack_and_publish(a, &c1, "a/7/layer", "f", "x\n");
    assert!(adopt(b, &c1));
    let row = |s: &Store| {
        s.tier_layers()
            .unwrap()
            .unwrap()
            .into_iter()
            .find(|l| l.chain == c1)
            .unwrap()
    };
    // Nothing runs on it yet: held by both, used by none; nothing to write.
    assert!(
        b.share_tier_usage().unwrap(),
        "the first call writes the (empty) usage"
    );
    assert!(!b.share_tier_usage().unwrap(), "unchanged: no write");
    let r = row(a);
    assert_eq!((r.live_hosts, r.users.len(), r.last_use_ns), (2, 0, 0), "{r:?}");

    // A container on host B: its active layer reaches the tier layer.
    b.create(NewLayer::new(NS, "ctr-1", LayerKind::ReadWrite).with_parent(Some(&c1)))
        .unwrap();
    assert!(b.share_tier_usage().unwrap());
    assert!(!b.share_tier_usage().unwrap(), "written once per change");
    assert!(tier.join("usage/b").exists());
    let r = row(a);
    assert_eq!(r.users, vec!["b".to_string()], "{r:?}");
    assert_eq!(r.uses, 1);
    assert!(r.last_use_ns > 0);
    let mtime = std::fs::metadata(tier.join("usage/b"))
        .unwrap()
        .modified()
        .unwrap();

    // The container goes: used by none, held by both, its last use kept.
    b.remove(NS, "ctr-1").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(b.share_tier_usage().unwrap());
    let r = row(a);
    assert_eq!((r.live_hosts, r.users.len(), r.uses), (2, 0, 0), "{r:?}");
    let ns = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(r.last_use_ns >= ns(mtime), "{r:?}");
}

#[test]
fn usage_files_of_hosts_gone_longer_than_the_retention_are_collected() {
    let h = Hosts::new();
    let (tier, a, b) = (&h.tier, &h.a, &h.b);
    assert!(a.share_tier_usage().unwrap() && b.share_tier_usage().unwrap());
    let usage = tier.join("usage");
    // c and d are gone (no heartbeat): c for longer than the retention, d not yet.
    for host in ["c", "d"] {
        std::fs::write(usage.join(host), br#"{"uses":{},"last_use_ns":{}}"#).unwrap();
    }
    let ago = |days: u64| std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let age = |host: &str, days: u64| {
        std::fs::File::options()
            .write(true)
            .open(usage.join(host))
            .unwrap()
            .set_modified(ago(days))
            .unwrap();
    };
    age("c", 8);
    age("d", 6);
    // Live hosts keep their files, however old.
    age("a", 30);
    age("b", 30);
    let leftovers = |dry_run: bool| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = tier_garbage(a, dry_run, GarbageKind::TierLeftover)
            .into_iter()
            .map(|g| g.path)
            .collect();
        v.sort();
        v
    };
    assert_eq!(leftovers(true), vec![usage.join("c")], "the dry run lists it");
    assert!(usage.join("c").exists(), "a dry run removes nothing");
    assert_eq!(leftovers(false), vec![usage.join("c")]);
    for (host, kept) in [("a", true), ("b", true), ("c", false), ("d", true)] {
        assert_eq!(usage.join(host).exists(), kept, "usage/{host}");
    }
}

#[test]
fn a_tier_layer_whose_manifest_does_not_match_its_seal_is_not_adopted() {
    let h = Hosts::new();
    let (tier, a, b) = (&h.tier, &h.a, &h.b);
    let c1 = chain(9);
    unpack_and_publish(a, &c1, "a/9/layer", "f", "x\n");
    let manifest = tier
        .join("layers")
        .join(c1.trim_start_matches("sha256:"))
        .join("manifest");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("extra line\n");
    std::fs::write(&manifest, text).unwrap();
    assert!(!adopt(b, &c1), "a damaged tier layer is unpacked here instead");
    assert!(b.record(NS, &c1).is_err(), "no layer made from it");
}

#[test]
fn a_mount_point_left_without_its_mount_is_removed_by_the_reconciliation() {
    let h = Hosts::new();
    let root = h.tier.parent().unwrap().join("a");
    // As a crash between the mount point's mkdir and the mount leaves it: no record links to it.
    let left = root.join("tier").join("ab".repeat(32));
    std::fs::create_dir(&left).unwrap();
    assert_eq!(h.a.sync_tier_mounts(), Vec::<String>::new());
    assert!(!left.exists(), "{} is still there", left.display());
    assert!(
        root.join("tier/.build").is_dir(),
        "the image build directory stays"
    );
}

/// Whether image layers can be made and mounted here (root, `mkfs.erofs`); says why not when they cannot.
fn images_possible(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    let mkfs = super::mkfs_erofs().is_some();
    if !(root && mkfs) {
        // CI runs as root with erofs-utils installed (scripts/test-all.sh): a skip there is a broken setup.
        assert!(
            !(root && std::env::var("CI").is_ok_and(|v| v == "true")),
            "{test} needs mkfs.erofs (erofs-utils), and CI=true forbids skipping"
        );
        eprintln!("\n******** SKIPPED: {test} needs root ({root}) and mkfs.erofs ({mkfs}) ********\n");
    }
    root && mkfs
}

/// Two hosts publishing image layers, whose mounts are taken down when the test ends, passed or not.
struct ImageHosts {
    dir: tempfile::TempDir,
    tier: std::path::PathBuf,
    la: Lease,
    lb: Lease,
    a: Option<Store>,
    b: Option<Store>,
}

impl ImageHosts {
    fn new() -> ImageHosts {
        let (dir, tier, la, lb, a, b) = two_hosts(TierFormat::Erofs);
        ImageHosts {
            dir,
            tier,
            la,
            lb,
            a: Some(a),
            b: Some(b),
        }
    }

    fn mounts(&self) -> Vec<std::path::PathBuf> {
        lamina_sys::mount::mounts_under(self.dir.path()).unwrap()
    }
}

impl Drop for ImageHosts {
    fn drop(&mut self) {
        self.a.take();
        self.b.take();
        for m in self.mounts() {
            let _ = lamina_sys::mount::unmount(&m, true);
        }
    }
}

/// A layer tar with a file, a deleted path (whiteout) and an opaque directory, applied into a writable layer
/// of `s` and committed as `name`, as containerd's unpack does.
fn unpack_with_whiteouts(s: &Store, name: &str) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(1234);
        h.set_cksum();
        builder.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", b"", tar::EntryType::Directory);
    add("etc/motd", b"hello\n", tar::EntryType::Regular);
    add(".wh.gone", b"", tar::EntryType::Regular);
    add("opaque/", b"", tar::EntryType::Directory);
    add("opaque/.wh..wh..opq", b"", tar::EntryType::Regular);
    add("opaque/kept", b"k", tar::EntryType::Regular);
    let bytes = builder.into_inner().unwrap();
    let key = format!("extract {name}");
    s.create(NewLayer::new(NS, &key, LayerKind::ReadWrite)).unwrap();
    let diff = crate::open_dir(&s.info(NS, &key).unwrap().diff_dir).unwrap();
    lamina_archive::apply_layer(std::os::fd::AsFd::as_fd(&diff), &bytes[..], &Default::default()).unwrap();
    s.commit(NS, &key, name, BTreeMap::new()).unwrap();
}

#[test]
fn an_image_layer_is_published_mounted_where_adopted_kept_across_restarts_and_taken_down_with_its_layer() {
    if !images_possible("an_image_layer_is_published_mounted_where_adopted…") {
        return;
    }
    let mut h = ImageHosts::new();
    let c1 = chain(11);
    let hex = c1.trim_start_matches("sha256:").to_string();
    {
        let a = h.a.as_ref().unwrap();
        assert!(!adopt(a, &c1));
        unpack_with_whiteouts(a, "a/11");
        assert!(a.publish_shared(NS, "a/11", &c1).unwrap());
    }
    // One image file, its manifest and its seal; no directory tree.
    let published = h.tier.join("layers").join(&hex);
    let mut names: Vec<String> = std::fs::read_dir(&published)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["layer.erofs", "manifest", "seal-erofs.json"]);
    assert!(
        h.mounts().is_empty(),
        "the publisher keeps its local copy and mounts nothing"
    );

    // Host B adopts it: its content is its mount of the image.
    let b_root = h.dir.path().join("b");
    let mount = b_root.join("tier").join(&hex);
    {
        let b = h.b.as_ref().unwrap();
        assert!(adopt(b, &c1));
        let diff = b.info(NS, &c1).unwrap().diff_dir;
        assert_eq!(std::fs::read_link(&diff).unwrap(), mount);
        assert_eq!(h.mounts(), vec![mount.clone()]);
        assert_eq!(std::fs::read_to_string(diff.join("etc/motd")).unwrap(), "hello\n");
        // The overlay whiteout and the opaque directory come out of the image as an overlay lower needs them.
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let wh = std::fs::symlink_metadata(diff.join("gone")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "{wh:?}");
        let opaque = crate::open_dir(&diff.join("opaque")).unwrap();
        assert!(lamina_sys::fs::is_opaque(std::os::fd::AsFd::as_fd(&opaque)).unwrap());
        assert_eq!(std::fs::metadata(diff.join("etc/motd")).unwrap().uid(), 1234);
        // The image's content matches the manifest the publisher wrote.
        for n in b.verifiable_layers().unwrap() {
            let r = b.verify_layer(n, &mut |_| {}).unwrap();
            assert!(matches!(r.status, crate::VerifyStatus::Clean { .. }), "{r:?}");
        }
    }

    // A restart (or a kill) keeps the mount: the store finds it and mounts nothing twice.
    h.b.take();
    h.b = Some(open_as(&b_root, &h.tier, &h.lb, TierFormat::Erofs));
    assert_eq!(h.mounts(), vec![mount.clone()]);
    // A reboot takes it: the next start mounts it again.
    h.b.take();
    lamina_sys::mount::unmount(&mount, false).unwrap();
    h.b = Some(open_as(&b_root, &h.tier, &h.lb, TierFormat::Erofs));
    assert_eq!(h.mounts(), vec![mount.clone()]);
    let b = h.b.as_ref().unwrap();
    let diff = b.info(NS, &c1).unwrap().diff_dir;
    assert_eq!(std::fs::read_to_string(diff.join("etc/motd")).unwrap(), "hello\n");

    // The layer goes: its mount goes with the next reconciliation (a heartbeat's, or a collection's).
    assert!(b.remove(NS, &c1).unwrap());
    b.share_tier_usage().unwrap();
    assert!(h.mounts().is_empty());
    assert!(!mount.exists(), "no mount point is left to stand for the layer");

    // Collected from the tier once no live host holds it.
    std::thread::sleep(Duration::from_millis(2100));
    h.la.beat().unwrap();
    h.lb.beat().unwrap();
    assert!(tier_gc(b, false).is_empty(), "host A holds it");
    let a = h.a.as_ref().unwrap();
    assert!(a.remove(NS, "a/11").unwrap());
    assert_eq!(tier_gc(a, false), vec![c1.clone()]);
    assert!(!published.exists());
}

#[test]
fn hosts_adopt_layers_of_either_format_and_docker_applied_layers_link_the_image() {
    if !images_possible("hosts_adopt_layers_of_either_format…") {
        return;
    }
    let h = ImageHosts::new();
    let (a, b) = (h.a.as_ref().unwrap(), h.b.as_ref().unwrap());
    // A directory layer published by a host of the other format is linked as a directory.
    let dir_host = open(&h.dir.path().join("c"), &h.tier, &lease(&h.tier, "c"));
    let c1 = chain(12);
    unpack_and_publish(&dir_host, &c1, "c/12", "f", "dir\n");
    assert!(adopt(b, &c1));
    let diff = b.info(NS, &c1).unwrap().diff_dir;
    assert_eq!(
        std::fs::read_link(&diff).unwrap(),
        h.tier
            .join("layers")
            .join(c1.trim_start_matches("sha256:"))
            .join("diff")
    );
    assert!(h.mounts().is_empty());

    // Docker's applied layer whose chain id is an image layer: the local copy becomes a link to the mount.
    let (bytes, diff_id) = motd_tar();
    unpack(a, "a/1", "motd", "hi\n");
    assert!(a.publish_shared(NS, "a/1", &diff_id).unwrap());
    assert!(apply_docker(b, "applied", &bytes));
    let info = b.info("docker:/x", "applied").unwrap();
    let mount = h
        .dir
        .path()
        .join("b/tier")
        .join(diff_id.trim_start_matches("sha256:"));
    assert_eq!(std::fs::read_link(&info.diff_dir).unwrap(), mount);
    assert_eq!(
        std::fs::read_to_string(info.diff_dir.join("motd")).unwrap(),
        "hi\n"
    );
    assert_eq!(h.mounts(), vec![mount]);
    // A reconciliation keeps what a record links to.
    assert!(b.sync_tier_mounts().is_empty());
    assert_eq!(h.mounts().len(), 1);
}

/// A store of `images` chains of `depth` tier layers each (linked from the tier in their records, without
/// content), with `containers` active layers spread over the chains' layers.
fn deep_store(s: &Store, images: usize, depth: usize, containers: usize) {
    let mut tops = Vec::new();
    for i in 0..images {
        let mut parent: Option<String> = None;
        for d in 0..depth {
            let name = format!("img{i}/{d}");
            let key = format!("extract {name}");
            s.create(NewLayer::new(NS, &key, LayerKind::ReadWrite).with_parent(parent.as_deref()))
                .unwrap();
            s.commit(NS, &key, &name, BTreeMap::new()).unwrap();
            parent = Some(name.clone());
            tops.push(name);
        }
    }
    for (n, rec) in s.list().unwrap() {
        if rec.kind == LayerKind::ReadOnly {
            let hex = format!("{:064x}", n);
            s.update_record(n, |r| r.shared = Some(format!("sha256:{hex}")))
                .unwrap();
        }
    }
    for c in 0..containers {
        // Most containers on the top of an image, some on layers below it.
        let on = &tops[(c * 7919) % tops.len()];
        let on = if c % 3 == 0 {
            on.clone()
        } else {
            tops[(c % images + 1) * depth - 1].clone()
        };
        s.create(NewLayer::new(NS, &format!("ctr-{c}"), LayerKind::ReadWrite).with_parent(Some(&on)))
            .unwrap();
    }
}

/// The tier layers in use on `s` the way a walk of every used layer's chain counts them: the reference
/// [`super::store::uses_below`] must match.
fn uses_by_walking(s: &Store) -> BTreeMap<String, u32> {
    let records = s.list().unwrap();
    let shared: std::collections::HashMap<u64, &str> = records
        .iter()
        .filter_map(|(n, r)| Some((*n, super::chain_hex(r.shared.as_deref()?)?)))
        .collect();
    let mut uses = BTreeMap::new();
    for (n, rec) in &records {
        if !s.in_use(*n, rec) {
            continue;
        }
        for m in std::iter::once(*n).chain(s.chain(rec).unwrap()) {
            if let Some(hex) = shared.get(&m) {
                *uses.entry(hex.to_string()).or_default() += 1;
            }
        }
    }
    uses
}

#[test]
fn sharing_the_usage_of_a_deep_store_takes_one_pass() {
    let h = Hosts::new();
    let b = &h.b;
    deep_store(b, 4, 50, 200);
    let t0 = Instant::now();
    let walked = uses_by_walking(b);
    let walk = t0.elapsed();
    let t0 = Instant::now();
    let records = b.list().unwrap();
    let shared = records
        .iter()
        .filter_map(|(n, r)| Some((*n, super::chain_hex(r.shared.as_deref()?)?.to_string())))
        .collect();
    let once = super::store::uses_below(&records, &shared, |n, r| b.in_use(n, r)).unwrap();
    let pass = t0.elapsed();
    assert_eq!(once, walked);
    assert_eq!(once.len(), 200, "every tier layer is below a container");
    let containers_depth: u64 = records
        .iter()
        .filter(|(_, r)| r.kind == LayerKind::ReadWrite)
        .map(|(_, r)| u64::from(r.depth))
        .sum();
    assert_eq!(
        once.values().map(|&u| u64::from(u)).sum::<u64>(),
        containers_depth
    );
    let t0 = Instant::now();
    assert!(b.share_tier_usage().unwrap());
    let share = t0.elapsed();
    let t0 = Instant::now();
    assert!(!b.share_tier_usage().unwrap());
    let again = t0.elapsed();
    eprintln!(
        "200 tier layers in chains of 50, 200 containers ({containers_depth} layers below them): \
         chain walks {walk:?}, one pass {pass:?}; share_tier_usage {share:?}, unchanged {again:?}"
    );
}

#[test]
fn an_adoption_cut_short_before_its_record_leaves_nothing_at_the_next_start() {
    let h = Hosts::new();
    let c1 = chain(21);
    unpack_and_publish(&h.a, &c1, "a/21", "f", "x\n");
    let hex = c1.trim_start_matches("sha256:");
    // Host B made an adopted layer's whole storage (its content and its manifest links to the tier's) and
    // died before the transaction that records it.
    let b_root = h._dir.path().join("b");
    let n = 1_000;
    let published = h.tier.join("layers").join(hex);
    let dir = {
        let owned =
            h.b.backend
                .create_linked(n, &published.join("diff"), &published.join("manifest"))
                .unwrap();
        drop(owned);
        h.b.backend.paths(n).dir
    };
    assert!(std::fs::symlink_metadata(dir.join("diff"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(dir.join("manifest")).unwrap(),
        std::fs::read(published.join("manifest")).unwrap()
    );
    let Hosts {
        _dir, tier, lb, b, ..
    } = h;
    drop(b);
    let b = open(&b_root, &tier, &lb);
    assert!(!dir.exists(), "removed at start: it held only a link to the tier");
    assert!(!b_root.join("quarantine").exists(), "nothing of its own to keep");
    assert!(b.lookup(NS, &c1).unwrap().is_none());
    assert!(adopt(&b, &c1), "the next Prepare adopts the layer");
    let diff = b.info(NS, &c1).unwrap().diff_dir;
    assert_eq!(std::fs::read_to_string(diff.join("f")).unwrap(), "x\n");
}

#[test]
fn an_adopted_layer_whose_directory_a_power_cut_took_is_linked_again_at_the_next_start() {
    let h = Hosts::new();
    let c1 = chain(22);
    unpack_and_publish(&h.a, &c1, "a/22", "f", "y\n");
    assert!(adopt(&h.b, &c1));
    let b_root = h._dir.path().join("b");
    let info = h.b.info(NS, &c1).unwrap();
    let dir = info.diff_dir.parent().unwrap().to_path_buf();
    let Hosts {
        _dir, tier, lb, b, ..
    } = h;
    drop(b);
    // The record reached the disk, the layer's directory (made before it, not flushed) did not.
    std::fs::remove_dir_all(&dir).unwrap();
    let b = open(&b_root, &tier, &lb);
    let diff = b.info(NS, &c1).unwrap().diff_dir;
    assert!(std::fs::symlink_metadata(&diff).unwrap().file_type().is_symlink());
    assert_eq!(
        std::fs::read_to_string(diff.join("f")).unwrap(),
        "y\n",
        "never empty"
    );
    for n in b.verifiable_layers().unwrap() {
        let r = b.verify_layer(n, &mut |_| {}).unwrap();
        assert!(matches!(r.status, crate::VerifyStatus::Clean { .. }), "{r:?}");
    }
}
