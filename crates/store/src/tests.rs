//! Unit tests of the store's rules through a [`FakeMounter`]: reference counting, recovery at open and
//! garbage collection. Nothing here mounts, changes owners or needs root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lamina_sys::mount::{MountSpec, OverlaySpec};
use lamina_sys::mounter::{FakeMounter, MountCall, Mounter};

use crate::tables::Writer;
use crate::{
    GarbageKind, GcOptions, LayerKind, LayerState, NewLayer, OpenMode, OpenOptions, Store, StoreError,
};

const NS: &str = "test";

struct Fixture {
    dir: tempfile::TempDir,
    fake: Arc<FakeMounter>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            fake: Arc::new(FakeMounter::new()),
        }
    }

    /// A fixture and a store open on it holding [`two_layers`]; bound as `let (fx, s) = ...`, the store drops
    /// first.
    fn with_two_layers() -> (Fixture, Store) {
        let fx = Fixture::new();
        let s = fx.open();
        two_layers(&s);
        (fx, s)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn open_mode(&self, mode: OpenMode) -> Store {
        let mounter: Arc<dyn Mounter> = self.fake.clone();
        Store::open_with_options(
            &self.root(),
            OpenOptions {
                mode,
                mounter: Some(mounter),
                ..OpenOptions::default()
            },
        )
        .unwrap()
    }

    fn open(&self) -> Store {
        self.open_mode(OpenMode::Serve)
    }
}

fn create(s: &Store, name: &str, parent: Option<&str>, kind: LayerKind) {
    s.create(NewLayer::new(NS, name, kind).with_parent(parent))
        .unwrap();
}

/// `base` <- `child` (writable).
fn two_layers(s: &Store) {
    create(s, "base", None, LayerKind::ReadOnly);
    create(s, "child", Some("base"), LayerKind::ReadWrite);
}

fn merged(s: &Store, name: &str) -> PathBuf {
    s.info(NS, name).unwrap().merged_dir
}

#[test]
fn a_new_layer_is_mounted_on_its_parents_chain_nearest_first() {
    let fx = Fixture::new();
    let s = fx.open();
    create(&s, "a", None, LayerKind::ReadOnly);
    create(&s, "b", Some("a"), LayerKind::ReadOnly);
    // The chain of `b` is read once (its own first mount), then taken over by the layers created on it.
    let pb = s.get(NS, "b", "").unwrap();
    s.put(NS, "b").unwrap();
    create(&s, "c", Some("b"), LayerKind::ReadOnly);
    create(&s, "d", Some("c"), LayerKind::ReadWrite);
    let pd = s.get(NS, "d", "").unwrap();
    let diff = |n: &str| s.info(NS, n).unwrap().diff_dir;
    match fx.fake.spec_at(&pd) {
        Some(MountSpec::Overlay(o)) => assert_eq!(o.lowers, vec![diff("c"), diff("b"), diff("a")]),
        other => panic!("expected an overlay, got {other:?}"),
    }
    assert_ne!(pb, pd);
    // A layer on a parent whose chain was never read (reopened store) gets the same.
    drop(s);
    let s = fx.open();
    create(&s, "e", Some("d"), LayerKind::ReadWrite);
    let pe = s.get(NS, "e", "").unwrap();
    let diff = |n: &str| s.info(NS, n).unwrap().diff_dir;
    match fx.fake.spec_at(&pe) {
        Some(MountSpec::Overlay(o)) => {
            assert_eq!(o.lowers, vec![diff("d"), diff("c"), diff("b"), diff("a")])
        }
        other => panic!("expected an overlay, got {other:?}"),
    }
}

#[test]
fn get_get_put_put_mounts_once_and_unmounts_at_the_last_put() {
    let (fx, s) = Fixture::with_two_layers();
    let p1 = s.get(NS, "child", "").unwrap();
    let p2 = s.get(NS, "child", "").unwrap();
    assert_eq!(p1, p2);
    assert_eq!(p1, merged(&s, "child"));
    assert_eq!(fx.fake.mount_count(), 1);
    let info = s.info(NS, "child").unwrap();
    assert_eq!(info.mounts, 2);
    match fx.fake.spec_at(&p1) {
        Some(MountSpec::Overlay(o)) => {
            assert_eq!(o.lowers, vec![s.info(NS, "base").unwrap().diff_dir]);
            assert_eq!(o.upper.as_deref(), Some(info.diff_dir.as_path()));
            assert_eq!(o.work.as_deref(), Some(info.work_dir.as_path()));
            assert!(!o.read_only);
        }
        other => panic!("expected an overlay, got {other:?}"),
    }
    s.put(NS, "child").unwrap();
    assert!(fx.fake.is_mounted(&p1), "still referenced once");
    s.put(NS, "child").unwrap();
    assert!(!fx.fake.is_mounted(&p1));
    assert_eq!(fx.fake.unmount_count(), 1);
    assert_eq!(s.info(NS, "child").unwrap().mounts, 0);
    let counters = s.counters();
    assert_eq!(
        (
            counters["gets"],
            counters["puts"],
            counters["mounts"],
            counters["hits"]
        ),
        (2, 2, 1, 1)
    );
}

#[test]
fn a_parentless_layer_is_its_own_view_without_a_mount() {
    let fx = Fixture::new();
    let s = fx.open();
    create(&s, "base", None, LayerKind::ReadOnly);
    let p = s.get(NS, "base", "").unwrap();
    assert_eq!(p, s.info(NS, "base").unwrap().diff_dir);
    s.put(NS, "base").unwrap();
    assert!(fx.fake.calls().is_empty(), "{:?}", fx.fake.calls());
}

#[test]
fn put_without_get_is_harmless() {
    let (fx, s) = Fixture::with_two_layers();
    s.put(NS, "child").unwrap();
    s.put(NS, "child").unwrap();
    assert_eq!(fx.fake.unmount_count(), 0);
    // A later get still mounts, and one put releases it.
    s.get(NS, "child", "").unwrap();
    s.put(NS, "child").unwrap();
    assert_eq!((fx.fake.mount_count(), fx.fake.unmount_count()), (1, 1));
    assert!(matches!(s.put(NS, "nope"), Err(StoreError::NotFound(_))));
}

/// A Put answers before the teardown of its detached mount (for an overlay, the kernel's sync of the upper
/// filesystem), and what needs that teardown finished waits for it: a new mount of the layer, the deletion of
/// the removed layer, and the store's close.
#[test]
fn a_put_answers_before_its_teardown_and_what_needs_the_teardown_waits() {
    use std::time::Duration;
    let (fx, s) = Fixture::with_two_layers();
    let torn = || {
        fx.fake
            .calls()
            .iter()
            .filter(|c| matches!(c, MountCall::TornDown { .. }))
            .count()
    };
    let merged = s.get(NS, "child", "").unwrap();
    fx.fake.hold_teardowns(true);
    s.put(NS, "child").unwrap();
    assert!(!fx.fake.is_mounted(&merged), "out of the mount table at once");
    assert_eq!(torn(), 0, "the Put did not wait for the teardown");
    std::thread::scope(|sc| {
        let again = sc.spawn(|| s.get(NS, "child", "").unwrap());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fx.fake.mount_count(), 1, "a mount waits for the teardown");
        fx.fake.hold_teardowns(false);
        again.join().unwrap();
    });
    let calls = fx.fake.calls();
    assert!(
        matches!(
            &calls[calls.len() - 2..],
            [MountCall::TornDown { .. }, MountCall::Mount { .. }]
        ),
        "{calls:?}"
    );

    // A removed layer's tree leaves trash/ only after its teardown.
    fx.fake.hold_teardowns(true);
    s.put(NS, "child").unwrap();
    assert!(s.remove(NS, "child").unwrap());
    let trash = fx.root().join("trash");
    let in_trash = || std::fs::read_dir(&trash).unwrap().count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(in_trash(), 1, "deleted before its teardown");
    fx.fake.hold_teardowns(false);
    for _ in 0..1000 {
        if in_trash() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(in_trash(), 0, "deleted after its teardown");

    // The store's close waits for the teardowns still running.
    create(&s, "other", Some("base"), LayerKind::ReadWrite);
    s.get(NS, "other", "").unwrap();
    fx.fake.hold_teardowns(true);
    s.put(NS, "other").unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            fx.fake.hold_teardowns(false);
        });
        drop(s);
    });
    assert_eq!(torn(), 3);
}

#[test]
fn remove_while_mounted_unmounts_first() {
    let (fx, s) = Fixture::with_two_layers();
    let p = s.get(NS, "child", "").unwrap();
    s.get(NS, "child", "").unwrap();
    assert!(
        matches!(s.remove(NS, "base"), Err(StoreError::InUse(_))),
        "base has a child"
    );
    assert!(s.remove(NS, "child").unwrap());
    assert!(!fx.fake.is_mounted(&p));
    assert!(matches!(
        fx.fake.calls().last(),
        Some(MountCall::Unmount { detach: false, .. })
    ));
    assert!(!s.exists(NS, "child").unwrap());
    assert!(s.remove(NS, "base").unwrap());
    assert!(!s.remove(NS, "base").unwrap(), "a second remove finds nothing");
}

#[test]
fn a_failed_mount_takes_no_reference() {
    let (fx, s) = Fixture::with_two_layers();
    fx.fake.fail_mounts(true);
    assert!(s.get(NS, "child", "").is_err());
    assert_eq!(s.info(NS, "child").unwrap().mounts, 0);
    fx.fake.fail_mounts(false);
    s.get(NS, "child", "").unwrap();
    assert_eq!(s.info(NS, "child").unwrap().mounts, 1);
}

#[test]
fn open_counts_mounts_of_a_previous_run_and_detaches_stale_ones() {
    let fx = Fixture::new();
    let p = {
        let s = fx.open();
        two_layers(&s);
        s.get(NS, "child", "").unwrap();
        s.get(NS, "child", "").unwrap();
        merged(&s, "child")
    };
    // The process ended with the stack still mounted (a container runs on it); an unknown layer's mount and
    // a mount in staging/ are left over too, and a mount outside the store's directories is not its business.
    let root = fx.root();
    let stale = root.join("layers/ff/merged");
    let staged = root.join("staging/x");
    let volume = root.join("volumes/v/_data");
    for target in [&stale, &staged, &volume] {
        fx.fake.preset(
            target,
            MountSpec::Bind {
                source: "/elsewhere".into(),
                read_only: false,
            },
        );
    }
    let s = fx.open();
    assert!(fx.fake.is_mounted(&p), "a kept mount is not touched");
    assert!(!fx.fake.is_mounted(&stale) && !fx.fake.is_mounted(&staged));
    assert!(fx.fake.is_mounted(&volume));
    // Counted once, whatever the previous run's count was: one put unmounts it.
    assert_eq!(s.info(NS, "child").unwrap().mounts, 1);
    s.put(NS, "child").unwrap();
    assert!(!fx.fake.is_mounted(&p));
}

/// Records layer `info` as `Applying` with a pending row for the staging `token`, as an apply cut short leaves it.
fn mark_applying(s: &Store, info: &crate::LayerInfo, token: &str) {
    let txn = Writer::begin(&s.db, &s.index).unwrap();
    let mut rec = info.record.clone();
    rec.state = LayerState::Applying;
    txn.put_layer(info.number, &rec).unwrap();
    txn.put_pending(info.number, token).unwrap();
    txn.commit().unwrap();
}

#[test]
fn open_rolls_back_an_interrupted_apply() {
    let fx = Fixture::new();
    let (n, diff) = {
        let s = fx.open();
        create(&s, "l", None, LayerKind::ReadOnly);
        let info = s.info(NS, "l").unwrap();
        // As an apply leaves it when the process dies after the rename into diff/ and before the last commit.
        std::fs::write(info.diff_dir.join("half"), b"x").unwrap();
        std::fs::create_dir(fx.root().join("staging").join("1-0")).unwrap();
        mark_applying(&s, &info, "1-0");
        (info.number, info.diff_dir)
    };
    // An operator's command changes nothing.
    {
        let s = fx.open_mode(OpenMode::Admin);
        assert_eq!(s.record(NS, "l").unwrap().0.state, LayerState::Applying);
        assert_eq!(s.read().unwrap().pending().unwrap().len(), 1);
    }
    let s = fx.open();
    let (rec, _) = s.record(NS, "l").unwrap();
    assert_eq!(rec.state, LayerState::Empty);
    assert!(rec.digest.is_none() && rec.size.is_none());
    assert!(s.read().unwrap().pending().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(&diff).unwrap().count(),
        0,
        "diff/ is empty again"
    );
    assert_eq!(std::fs::read_dir(fx.root().join("staging")).unwrap().count(), 0);
    assert_eq!(s.info(NS, "l").unwrap().number, n);
}

#[test]
fn open_removes_unrecorded_dirs_and_recreates_missing_ones() {
    let fx = Fixture::new();
    let diff = {
        let s = fx.open();
        create(&s, "l", None, LayerKind::ReadOnly);
        s.info(NS, "l").unwrap().diff_dir
    };
    std::fs::create_dir_all(fx.root().join("layers/abc/diff")).unwrap();
    std::fs::remove_dir_all(diff.parent().unwrap()).unwrap();
    let _s = fx.open();
    assert!(!fx.root().join("layers/abc").exists());
    let quarantined: Vec<_> = std::fs::read_dir(fx.root().join("quarantine")).unwrap().collect();
    assert_eq!(quarantined.len(), 1, "moved aside, not deleted");
    assert!(diff.is_dir(), "recreated empty");
}

fn kinds(report: &crate::GcReport) -> Vec<GarbageKind> {
    report.items.iter().map(|g| g.kind).collect()
}

#[test]
fn gc_removes_orphans_and_leftovers_and_keeps_recorded_layers() {
    let (fx, s) = Fixture::with_two_layers();
    let root = fx.root();
    std::fs::create_dir_all(root.join("layers/abc/diff")).unwrap();
    std::fs::create_dir_all(root.join("staging/9-9")).unwrap();
    std::fs::create_dir_all(root.join("trash/old")).unwrap();
    let stale = root.join("layers/abc/merged");
    fx.fake.preset(
        &stale,
        MountSpec::Bind {
            source: "/x".into(),
            read_only: false,
        },
    );
    // The periodic collection leaves a directory no record explains; an operator's takes it.
    let periodic = s.gc(&GcOptions::default().dry_run()).unwrap();
    assert!(!kinds(&periodic).contains(&GarbageKind::UnknownDir));
    let asked = GcOptions {
        unknown: true,
        ..GcOptions::default()
    };
    let dry = s.gc(&asked.dry_run()).unwrap();
    let mut k = kinds(&dry);
    k.sort();
    assert_eq!(
        k,
        vec![
            GarbageKind::StaleMount,
            GarbageKind::Staging,
            GarbageKind::Trash,
            GarbageKind::UnknownDir
        ]
    );
    assert!(
        root.join("layers/abc").exists() && fx.fake.is_mounted(&stale),
        "a dry run removes nothing"
    );
    let report = s.gc(&asked).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!fx.fake.is_mounted(&stale));
    assert!(!root.join("layers/abc").exists());
    assert_eq!(std::fs::read_dir(root.join("staging")).unwrap().count(), 0);
    for name in ["base", "child"] {
        assert!(s.info(NS, name).unwrap().diff_dir.is_dir(), "{name} kept");
    }
    assert!(
        s.gc(&GcOptions::default()).unwrap().items.is_empty(),
        "nothing left"
    );
}

#[test]
fn gc_drops_the_proofs_of_finished_removals() {
    let (fx, s) = Fixture::with_two_layers();
    let child = s.lookup(NS, "child").unwrap().unwrap().0;
    assert!(s.remove(NS, "child").unwrap());
    let removed = || s.read().unwrap().removed().unwrap();
    assert!(
        removed().contains(&child),
        "the removal is proven until its storage is gone"
    );
    // The dry run keeps it; the collection drops it once the layer's directory has left `layers/`.
    s.gc(&GcOptions::default().dry_run()).unwrap();
    assert!(removed().contains(&child));
    let report = s.gc(&GcOptions::default()).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(removed().is_empty(), "{:?}", removed());
    assert!(s.info(NS, "base").is_ok());
    // The store opens as before, with the layer gone and nothing in quarantine.
    drop(s);
    let s = fx.open();
    assert!(s.lookup(NS, "child").unwrap().is_none());
    assert!(s.info(NS, "base").is_ok());
    assert!(
        !fx.root().join("quarantine").exists()
            || std::fs::read_dir(fx.root().join("quarantine")).unwrap().count() == 0
    );
}

#[test]
fn gc_of_a_removed_namespace_keeps_layers_in_use() {
    let (fx, s) = Fixture::with_two_layers();
    create(&s, "lonely", None, LayerKind::ReadOnly);
    create(&s, "used", None, LayerKind::ReadOnly);
    s.get(NS, "child", "").unwrap();
    // A mount this store does not count refers to `used` (a container of another process).
    let used = s.info(NS, "used").unwrap();
    fx.fake.preset(
        Path::new("/run/elsewhere/merged"),
        MountSpec::Overlay(OverlaySpec {
            lowers: vec![used.diff_dir.clone()],
            ..OverlaySpec::default()
        }),
    );
    let report = s
        .gc(&GcOptions {
            removed_namespaces: vec![NS.into()],
            ..GcOptions::default()
        })
        .unwrap();
    let kept: BTreeMap<String, String> = report
        .kept
        .iter()
        .map(|k| (k.name.clone(), k.reason.clone()))
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(kept[&format!("{NS}/child")].starts_with("mounted"), "{kept:?}");
    // Below a kept layer, and a lower directory of its mount.
    assert!(kept.contains_key(&format!("{NS}/base")), "{kept:?}");
    assert!(kept[&format!("{NS}/used")].contains("mount table"), "{kept:?}");
    assert_eq!(kinds(&report), vec![GarbageKind::RemovedNamespace]);
    assert!(!s.exists(NS, "lonely").unwrap());
    for name in ["base", "child", "used"] {
        assert!(s.exists(NS, name).unwrap(), "{name}");
    }
    assert!(matches!(
        s.gc(&GcOptions {
            removed_namespaces: vec![NS.into()],
            protected_namespaces: vec![NS.into()],
            ..GcOptions::default()
        }),
        Err(StoreError::InvalidArgument(_))
    ));
}

#[test]
fn containerd_mount_descriptions() {
    let fx = Fixture::new();
    let s = fx.open();
    create(&s, "base", None, LayerKind::ReadOnly);
    // As containerd's snapshotter asks: on a committed parent.
    fn snapshot<'a>(name: &'a str, parent: Option<&'a str>, kind: LayerKind) -> NewLayer<'a> {
        let opts = crate::CreateOptions {
            parent_kind: Some(LayerKind::ReadOnly),
            ..crate::CreateOptions::default()
        };
        NewLayer::new(NS, name, kind)
            .with_parent(parent)
            .with_options(opts)
    }
    let active = s
        .prepare(snapshot("a", Some("base"), LayerKind::ReadWrite))
        .unwrap();
    assert!(matches!(&active, MountSpec::Overlay(o) if o.upper.is_some() && o.lowers.len() == 1));
    let view = s.prepare(snapshot("v", Some("base"), LayerKind::View)).unwrap();
    assert!(
        matches!(&view, MountSpec::Bind { read_only: true, source } if *source == s.info(NS, "base").unwrap().diff_dir)
    );
    let lone = s.prepare(snapshot("lone", None, LayerKind::ReadWrite)).unwrap();
    assert!(matches!(lone, MountSpec::Bind { read_only: false, .. }));
    assert!(matches!(s.mounts(NS, "base"), Err(StoreError::Precondition(_))));
    assert!(matches!(
        s.prepare(snapshot("b", Some("a"), LayerKind::ReadWrite)),
        Err(StoreError::Precondition(_))
    ));
    assert!(matches!(
        s.prepare(snapshot("c", Some("missing"), LayerKind::ReadWrite)),
        Err(StoreError::NotFound(_))
    ));
    assert!(fx.fake.calls().is_empty(), "containerd mounts these itself");
    assert_eq!(s.counters()["snapshot_mounts"], 3);
    assert_eq!(s.layer_stats(s.info(NS, "base").unwrap().number).uses, 2);
}

#[test]
fn containerd_mounts_from_memory_answer_as_the_store_does() {
    let fx = Fixture::new();
    let s = fx.open();
    create(&s, "base", None, LayerKind::ReadOnly);
    let snapshot = NewLayer::new(NS, "a", LayerKind::ReadWrite)
        .with_parent(Some("base"))
        .with_options(crate::CreateOptions {
            parent_kind: Some(LayerKind::ReadOnly),
            ..crate::CreateOptions::default()
        });
    let prepared = s.prepare(snapshot).unwrap();
    let cached = s
        .mounts_cached(NS, "a")
        .unwrap()
        .expect("prepared here: its chain is in memory");
    assert_eq!(format!("{cached:?}"), format!("{prepared:?}"));
    assert_eq!(format!("{cached:?}"), format!("{:?}", s.mounts(NS, "a").unwrap()));
    assert_eq!(s.counters()["snapshot_mounts"], 3);
    assert_eq!(s.layer_stats(s.info(NS, "base").unwrap().number).uses, 3);
    assert!(matches!(
        s.mounts_cached(NS, "base"),
        Err(StoreError::Precondition(_))
    ));
    assert!(matches!(
        s.mounts_cached(NS, "missing"),
        Err(StoreError::NotFound(_))
    ));
    // A slot held by an operation in progress is not waited for.
    let n = s.info(NS, "a").unwrap().number;
    let slot = s.slot(n);
    let held = crate::lock(&slot);
    assert!(s.mounts_cached(NS, "a").unwrap().is_none());
    drop(held);
    let base = s.slot(s.info(NS, "base").unwrap().number);
    let held = crate::lock(&base);
    assert!(s.mounts_cached(NS, "a").unwrap().is_none());
    drop(held);
    assert_eq!(
        s.counters()["snapshot_mounts"],
        3,
        "nothing counted when not answered"
    );
    // A chain not read in this process yet: left to `mounts`.
    drop(s);
    let s = fx.open();
    assert!(s.mounts_cached(NS, "a").unwrap().is_none());
    s.mounts(NS, "a").unwrap();
    assert!(s.mounts_cached(NS, "a").unwrap().is_some());
}

/// Creates the active snapshot `active`, has `fill` write into its `diff/`, commits it as `committed`; gives
/// the committed layer's number and its `diff/`.
fn commit_filled(s: &Store, fill: impl FnOnce(&Path)) -> (u64, PathBuf) {
    create(s, "active", None, LayerKind::ReadWrite);
    let diff = s.info(NS, "active").unwrap().diff_dir;
    fill(&diff);
    s.commit(NS, "active", "committed", BTreeMap::new()).unwrap();
    (s.info(NS, "committed").unwrap().number, diff)
}

#[test]
fn a_small_commit_keeps_its_manifest_in_its_own_transaction() {
    let fx = Fixture::new();
    let s = fx.open();
    let (n, diff) = commit_filled(&s, |diff| {
        std::fs::write(diff.join("data"), b"snapshot data").unwrap()
    });
    // Recorded by the Commit itself, not by a background writer afterwards, with the manifest in the
    // database: no file beside the content.
    let rec = s.record_by_number(n).unwrap().unwrap();
    let digest = rec.manifest.expect("the commit records the manifest's digest");
    let kept = s
        .read()
        .unwrap()
        .manifest(n)
        .unwrap()
        .expect("the manifest is in the database");
    assert_eq!(lamina_archive::manifest::digest_of(&kept), digest);
    let dir = diff.parent().unwrap();
    assert!(!dir.join(crate::MANIFEST_FILE).exists());
    assert!(!dir.join("manifest.tmp").exists());
    let r = s.verify_layer(n, &mut |_| {}).unwrap();
    assert!(matches!(r.status, crate::VerifyStatus::Clean { .. }), "{r:?}");
    // The content changed behind the store's back: found against the kept manifest, also after a restart.
    std::fs::write(diff.join("data"), b"snapshot dat4").unwrap();
    drop(s);
    let s = fx.open();
    let r = s.verify_layer(n, &mut |_| {}).unwrap();
    assert!(matches!(r.status, crate::VerifyStatus::Mismatch { .. }), "{r:?}");
    // Removed with the layer.
    assert!(s.remove(NS, "committed").unwrap());
    assert!(s.read().unwrap().manifest(n).unwrap().is_none());
}

#[test]
fn a_commit_whose_manifest_is_too_large_for_the_database_writes_its_file() {
    let fx = Fixture::new();
    let s = fx.open();
    // About 100 bytes of manifest per file: well over the 16 KiB kept in the database.
    let (n, diff) = commit_filled(&s, |diff| {
        for i in 0..400 {
            std::fs::write(diff.join(format!("file-with-a-rather-long-name-{i:04}")), b"x").unwrap();
        }
    });
    let digest = s.record_by_number(n).unwrap().unwrap().manifest.unwrap();
    assert!(s.read().unwrap().manifest(n).unwrap().is_none());
    let file = std::fs::read(diff.parent().unwrap().join(crate::MANIFEST_FILE)).unwrap();
    assert!(file.len() > crate::verify::INLINE_MANIFEST_BYTES);
    assert_eq!(lamina_archive::manifest::digest_of(&file), digest);
    assert!(!diff.parent().unwrap().join("manifest.tmp").exists());
    let r = s.verify_layer(n, &mut |_| {}).unwrap();
    assert!(matches!(r.status, crate::VerifyStatus::Clean { .. }), "{r:?}");
}

#[test]
fn an_apply_left_applying_by_a_failed_rollback_is_reset_by_the_next_apply() {
    let fx = Fixture::new();
    let s = fx.open();
    create(&s, "l", None, LayerKind::ReadOnly);
    let info = s.info(NS, "l").unwrap();
    // As a failed apply leaves it when its rollback commit fails too (a full disk): Applying, with a pending
    // row whose staging is gone, and nothing in diff/ (or part of the content).
    std::fs::write(info.diff_dir.join("half"), b"x").unwrap();
    mark_applying(&s, &info, "1-0");
    // An empty tar (two zero blocks): the retry applies on the same running store.
    s.apply(
        NS,
        "l",
        &mut &[0u8; 1024][..],
        &lamina_archive::IdMappings::default(),
    )
    .unwrap();
    let (rec, _) = s.record(NS, "l").unwrap();
    assert_eq!(rec.state, LayerState::Applied);
    assert!(s.read().unwrap().pending().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(&info.diff_dir).unwrap().count(),
        0,
        "the half content is gone"
    );
}

#[test]
fn creates_take_spare_directories_made_ahead_in_place_and_spares_never_outlive_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let (layers, spare) = (fx.root().join("layers"), fx.root().join("spare"));
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let number = |s: &Store, name: &str| -> u64 {
        let dir = s.info(NS, name).unwrap().diff_dir;
        let hex = dir
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        u64::from_str_radix(&hex, 16).unwrap()
    };
    // The entries of `layers/` no record names: the spares (all made whole: they are renamed into place).
    let spares = |s: &Store| -> Vec<u64> {
        let recorded: std::collections::HashSet<u64> = s.list().unwrap().iter().map(|(n, _)| *n).collect();
        let mut v: Vec<u64> = names(&layers)
            .iter()
            .map(|h| u64::from_str_radix(h, 16).unwrap())
            .filter(|n| !recorded.contains(n))
            .collect();
        v.sort();
        v
    };
    // The refill runs at the lowest priority and may lag far behind on a loaded machine.
    let wait_for = |s: &Store, want: &dyn Fn(&[u64]) -> bool| {
        for _ in 0..2000 {
            if want(&spares(s)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("spares never became {:?}", spares(s));
    };
    {
        let s = fx.open();
        create(&s, "l0", None, LayerKind::ReadWrite);
        let first = number(&s, "l0");
        // The first create woke the refill: eight spares, numbered from the store's counter.
        wait_for(&s, &|v| v.len() == 8);
        assert_eq!(spares(&s), (first + 1..first + 9).collect::<Vec<_>>());
        for n in spares(&s) {
            let dir = layers.join(format!("{n:x}"));
            assert_eq!(names(&dir), ["diff", "merged", "work"]);
            for (leaf, mode) in [("", 0o700), ("diff", 0o755), ("work", 0o700), ("merged", 0o755)] {
                let m = std::fs::metadata(dir.join(leaf)).unwrap().permissions().mode() & 0o777;
                assert_eq!(m & !0o022, mode & !0o022, "{n:x}/{leaf}");
            }
        }
        // A create takes the oldest spare, number and directory: the directory the layer ends up with is it.
        let ready = spares(&s);
        let ino = |n: u64| {
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(layers.join(format!("{n:x}"))).unwrap())
        };
        let spare_ino = ino(ready[0]);
        create(&s, "taker", None, LayerKind::ReadWrite);
        assert_eq!(number(&s, "taker"), ready[0]);
        assert_eq!(ino(ready[0]), spare_ino, "the spare itself became the layer");
        assert!(!spares(&s).contains(&ready[0]));
        // A create that fails before its record removes the spare it took; the next create takes the next one.
        // (Seven spares are left: no refill runs until fewer than four are.)
        let ready = spares(&s);
        assert!(s
            .create(NewLayer::new(NS, "taker", LayerKind::ReadWrite))
            .is_err());
        assert!(
            !layers.join(format!("{:x}", ready[0])).exists(),
            "the failed create's spare is gone"
        );
        create(&s, "after-failure", None, LayerKind::ReadWrite);
        assert_eq!(number(&s, "after-failure"), ready[1]);
        // A size-limited create takes no spare (its directory carries the limit; on this filesystem it is
        // refused).
        let ready = spares(&s);
        let opts = crate::CreateOptions {
            max_size: Some(1 << 30),
            ..Default::default()
        };
        let _ = s.create(NewLayer::new(NS, "limited", LayerKind::ReadWrite).with_options(opts));
        assert_eq!(spares(&s), ready);
        assert!(
            names(&spare).is_empty(),
            "spares are made in spare/ and moved out whole"
        );
        assert!(names(&fx.root().join("staging")).is_empty());
    }
    let closed = fx.open_mode(OpenMode::Admin);
    assert!(spares(&closed).is_empty(), "a closed store leaves no spare");
    drop(closed);
    // What a crash left, in spare/ and as spares in layers/, is removed by the daemon's start, not by an
    // operator's command; a tree with anything more in it is not a spare and goes to quarantine.
    std::fs::create_dir_all(spare.join("7/diff")).unwrap();
    for d in ["diff", "work", "merged"] {
        std::fs::create_dir_all(layers.join("ff0").join(d)).unwrap();
        std::fs::create_dir_all(layers.join("ff1").join(d)).unwrap();
    }
    std::fs::write(layers.join("ff1/diff/data"), b"x").unwrap();
    drop(fx.open_mode(OpenMode::Admin));
    assert_eq!(names(&spare), ["7"]);
    assert!(layers.join("ff0").is_dir());
    let s = fx.open();
    assert!(names(&spare).is_empty());
    assert!(!layers.join("ff0").exists(), "a spare a crash left is removed");
    assert!(
        !layers.join("ff1").exists(),
        "an unknown tree with data is moved away"
    );
    assert_eq!(names(&fx.root().join("quarantine")).len(), 1);
    create(&s, "after", None, LayerKind::ReadWrite);
    assert!(s.info(NS, "after").unwrap().diff_dir.is_dir());
}

/// Layer numbers are reserved in blocks: `next_id` is written by the first create of each block only, and a
/// restart skips what is left of the block rather than giving out a number twice.
#[test]
fn layer_numbers_are_reserved_in_blocks_and_never_given_twice() {
    use crate::tables::ID_BLOCK;
    let fx = Fixture::new();
    let stored = |s: &Store| s.write().unwrap().next_id().unwrap();
    let number = |s: &Store, name: &str| s.lookup(NS, name).unwrap().unwrap().0;
    let first;
    {
        // Opened as an operator's command, which keeps no spares (they take numbers from the same counter): the
        // numbers are given in order.
        let s = fx.open_mode(OpenMode::Admin);
        create(&s, "a", None, LayerKind::ReadOnly);
        first = number(&s, "a");
        assert_eq!(stored(&s), first + ID_BLOCK);
        create(&s, "b", Some("a"), LayerKind::ReadOnly);
        assert_eq!(number(&s, "b"), first + 1);
        assert_eq!(
            stored(&s),
            first + ID_BLOCK,
            "the block's second number is taken without a write"
        );
        for i in 2..ID_BLOCK {
            create(&s, &format!("l{i}"), None, LayerKind::ReadOnly);
        }
        assert_eq!(stored(&s), first + ID_BLOCK);
        create(&s, "next-block", None, LayerKind::ReadOnly);
        assert_eq!(number(&s, "next-block"), first + ID_BLOCK);
        assert_eq!(stored(&s), first + 2 * ID_BLOCK);
        s.remove(NS, "next-block").unwrap();
    }
    let s = fx.open();
    create(&s, "after-restart", None, LayerKind::ReadOnly);
    assert_eq!(
        number(&s, "after-restart"),
        first + 2 * ID_BLOCK,
        "the numbers left in the block are skipped, the removed layer's is not given again"
    );
    assert_eq!(stored(&s), first + 3 * ID_BLOCK);
}
