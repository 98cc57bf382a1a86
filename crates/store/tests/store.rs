//! Store tests on a real filesystem. Mounting needs root: without it these tests say so loudly,
//! and under CI=true they fail instead.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;

use lamina_archive::IdMappings;
use lamina_store::{CreateOptions, LayerKind, LayerState, NewLayer, Store, StoreError};
use redb::ReadableTable;

mod common;
use common::*;

#[test]
fn create_remove_and_errors() {
    let r = Root::new();
    let s = Store::open(&r.path()).unwrap();
    create(&s, "a", None);
    assert!(s.exists(NS, "a").unwrap());
    assert!(!s.exists("other", "a").unwrap(), "namespaces are separate");
    assert!(matches!(
        s.create(NewLayer::new(NS, "a", LayerKind::ReadOnly)),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create(NewLayer::new(NS, "b", LayerKind::ReadOnly).with_parent(Some("nope"))),
        Err(StoreError::NotFound(_))
    ));
    assert!(!s.exists(NS, "b").unwrap(), "a failed create leaves nothing");
    assert!(matches!(
        s.create(NewLayer::new(NS, "c", LayerKind::ReadOnly).with_parent(Some("c"))),
        Err(StoreError::InvalidArgument(_))
    ));
    create(&s, "b", Some("a"));
    assert!(
        matches!(s.remove(NS, "a"), Err(StoreError::InUse(_))),
        "parent with a child"
    );
    s.remove(NS, "b").unwrap();
    s.remove(NS, "a").unwrap();
    s.remove(NS, "a").unwrap();
    assert_eq!(s.list().unwrap().len(), 0);
    // Only the layers dir structure remains once the store is closed (a running one keeps spare layer
    // directories ready in layers/); removals finish in the background.
    for _ in 0..100 {
        if fs::read_dir(r.path().join("trash")).unwrap().count() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(s);
    assert_eq!(fs::read_dir(r.path().join("layers")).unwrap().count(), 0);
}

#[test]
fn second_open_is_refused() {
    let r = Root::new();
    let _s = Store::open(&r.path()).unwrap();
    assert!(matches!(Store::open(&r.path()), Err(StoreError::Locked(_))));
}

#[test]
fn get_put_refcount_and_stable_path() {
    let Some((_r, s)) = root_store("get_put_refcount_and_stable_path") else {
        return;
    };
    create(&s, "base", None);
    apply_files(&s, "base", &[("etc/motd", b"hello\n")]);
    s.create(NewLayer::new(NS, "rw", LayerKind::ReadWrite).with_parent(Some("base")))
        .unwrap();
    let p1 = s.get(NS, "rw", "").unwrap();
    let p2 = s.get(NS, "rw", "").unwrap();
    assert_eq!(p1, p2);
    assert_eq!(fs::read(p1.join("etc/motd")).unwrap(), b"hello\n");
    fs::write(p1.join("new"), b"x").unwrap();
    s.put(NS, "rw").unwrap();
    assert!(
        lamina_sys::mount::is_mount_point(&p1).unwrap(),
        "still mounted after one put"
    );
    s.put(NS, "rw").unwrap();
    assert!(!lamina_sys::mount::is_mount_point(&p1).unwrap());
    s.put(NS, "rw").unwrap();
    assert_eq!(
        fs::read(s.info(NS, "rw").unwrap().diff_dir.join("new")).unwrap(),
        b"x"
    );
    // Remove of a mounted layer unmounts it.
    let p = s.get(NS, "rw", "").unwrap();
    s.remove(NS, "rw").unwrap();
    assert!(!lamina_sys::mount::is_mount_point(&p).unwrap());
}

#[test]
fn chains_of_128_and_more_mount() {
    let Some((_r, s)) = root_store("chains_of_128_and_more_mount") else {
        return;
    };
    let mut parent: Option<String> = None;
    for i in 0..=500 {
        let name = format!("l{i}");
        create(&s, &name, parent.as_deref());
        let file = format!("f{i}");
        apply_files(&s, &name, &[(file.as_str(), b"x")]);
        parent = Some(name);
    }
    for depth in [1usize, 10, 128, 501] {
        let name = format!("l{}", depth - 1);
        let p = s.get(NS, &name, "").unwrap();
        assert!(
            p.join("f0").exists() && p.join(format!("f{}", depth - 1)).exists(),
            "depth {depth}"
        );
        s.put(NS, &name).unwrap();
    }
}

#[test]
fn depth_above_kernel_limit_is_refused_at_create() {
    let r = Root::new();
    let s = Store::open(&r.path()).unwrap();
    let mut parent: Option<String> = None;
    for i in 0..=501 {
        let name = format!("l{i}");
        match s.create(NewLayer::new(NS, &name, LayerKind::ReadOnly).with_parent(parent.as_deref())) {
            Ok(()) => parent = Some(name),
            Err(StoreError::LimitExceeded(_)) => {
                assert_eq!(i, 501, "refused above the kernel's 500-lower limit");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no limit hit");
}

#[test]
fn failed_apply_leaves_layer_empty_and_retry_works() {
    let Some((r, s)) = root_store("failed_apply_leaves_layer_empty_and_retry_works") else {
        return;
    };
    create(&s, "a", None);
    let good = tar_of(&[("a", b"1"), ("b", b"2")]);
    let cut = &good[..512 + 100];
    assert!(s.apply(NS, "a", &mut &cut[..], &IdMappings::default()).is_err());
    let info = s.info(NS, "a").unwrap();
    assert_eq!(info.record.state, LayerState::Empty);
    assert_eq!(fs::read_dir(&info.diff_dir).unwrap().count(), 0);
    assert_eq!(fs::read_dir(r.path().join("staging")).unwrap().count(), 0);
    let stats = s.apply(NS, "a", &mut &good[..], &IdMappings::default()).unwrap();
    assert_eq!(stats.size, 2);
    assert!(stats.digest.starts_with("sha256:"));
    assert!(matches!(
        s.apply(NS, "a", &mut &good[..], &IdMappings::default()),
        Err(StoreError::AlreadyExists(_))
    ));
}

#[test]
fn restart_removes_orphans_and_keeps_live_mounts() {
    let Some(r) = root_for("restart_removes_orphans_and_keeps_live_mounts") else {
        return;
    };
    {
        let s = Store::open(&r.path()).unwrap();
        create(&s, "base", None);
        apply_files(&s, "base", &[("keep", b"k")]);
        create(&s, "child", Some("base"));
        // Leave a live mount, a staging dir and a layer dir without a record, as a crash would.
        s.get(NS, "child", "").unwrap();
    }
    fs::create_dir_all(r.path().join("staging/5-0/etc")).unwrap();
    fs::create_dir_all(r.path().join("layers/ffff/diff")).unwrap();
    fs::File::create(r.path().join("layers/ffff/diff/junk"))
        .unwrap()
        .write_all(b"j")
        .unwrap();
    let s = Store::open(&r.path()).unwrap();
    assert_eq!(fs::read_dir(r.path().join("staging")).unwrap().count(), 0);
    assert!(!r.path().join("layers/ffff").exists());
    // The mount of the previous run was kept and counted once.
    let info = s.info(NS, "child").unwrap();
    assert_eq!(info.mounts, 1);
    assert!(lamina_sys::mount::is_mount_point(&info.merged_dir).unwrap());
    assert_eq!(fs::read(info.merged_dir.join("keep")).unwrap(), b"k");
    s.put(NS, "child").unwrap();
    assert!(!lamina_sys::mount::is_mount_point(&info.merged_dir).unwrap());
}

#[test]
fn restart_rolls_back_an_apply_left_pending() {
    let Some(r) = root_for("restart_rolls_back_an_apply_left_pending") else {
        return;
    };
    let (number, staging) = {
        let s = Store::open(&r.path()).unwrap();
        create(&s, "a", None);
        apply_files(&s, "a", &[("half", b"h")]);
        (
            s.info(NS, "a").unwrap().number,
            format!("{:x}-9", s.info(NS, "a").unwrap().number),
        )
    };
    // What a kill -9 between "pending recorded" and "applied recorded" leaves: the pending row,
    // a staging dir, and (if the rename had happened) content in diff/.
    fs::create_dir_all(r.path().join("staging").join(&staging)).unwrap();
    {
        let db = redb::Database::create(r.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<u64, &str>::new("pending"))
                .unwrap();
            t.insert(number, staging.as_str()).unwrap();
        }
        txn.commit().unwrap();
    }
    let s = Store::open(&r.path()).unwrap();
    let info = s.info(NS, "a").unwrap();
    assert_eq!(info.record.state, LayerState::Empty);
    assert_eq!(info.record.digest, None);
    assert_eq!(
        fs::read_dir(&info.diff_dir).unwrap().count(),
        0,
        "half content is gone"
    );
    assert_eq!(fs::read_dir(r.path().join("staging")).unwrap().count(), 0);
    // The retried apply succeeds.
    apply_files(&s, "a", &[("full", b"f")]);
    assert_eq!(fs::read(info.diff_dir.join("full")).unwrap(), b"f");
}

#[test]
fn newer_format_is_refused() {
    let r = Root::new();
    drop(Store::open(&r.path()).unwrap());
    {
        let db = redb::Database::create(r.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            t.insert("format", 99).unwrap();
        }
        txn.commit().unwrap();
    }
    let e = Store::open(&r.path()).unwrap_err().to_string();
    assert!(e.contains("newer than supported"), "{e}");
}

/// A data root whose store holds `layers` (name, parent), closed again.
fn root_with(layers: &[(&str, Option<&str>)]) -> Root {
    let r = Root::new();
    let s = Store::open(&r.path()).unwrap();
    for (name, parent) in layers {
        create(&s, name, *parent);
    }
    r
}

#[test]
fn format_1_is_migrated_at_open() {
    let r = root_with(&[("a", None), ("b", Some("a"))]);
    // Rewrite the store as format 1 wrote it: `created` in seconds, no update time or inodes.
    {
        let db = redb::Database::create(r.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut layers = txn
                .open_table(redb::TableDefinition::<u64, &[u8]>::new("layers"))
                .unwrap();
            let rows: Vec<(u64, Vec<u8>)> = layers
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value().to_vec())
                })
                .collect();
            for (k, v) in rows {
                let mut j: serde_json::Value = serde_json::from_slice(&v).unwrap();
                let o = j.as_object_mut().unwrap();
                o.remove("created_ns");
                o.remove("updated_ns");
                o.remove("inodes");
                o.insert("created".into(), 1_700_000_000u64.into());
                layers
                    .insert(k, serde_json::to_vec(&j).unwrap().as_slice())
                    .unwrap();
            }
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("format", 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let s = Store::open(&r.path()).unwrap();
    for name in ["a", "b"] {
        let rec = s.info(NS, name).unwrap().record;
        assert_eq!(rec.created_ns, 1_700_000_000_000_000_000, "{name}");
        assert_eq!(rec.updated_ns, rec.created_ns);
    }
    assert_eq!(s.info(NS, "b").unwrap().lower_dirs.len(), 1);
    drop(s);
    // Opened again: already format 2, nothing changes.
    let s = Store::open(&r.path()).unwrap();
    assert_eq!(s.status().unwrap().format, lamina_store::FORMAT_VERSION);
    assert_eq!(
        s.info(NS, "a").unwrap().record.created_ns,
        1_700_000_000_000_000_000
    );
}

/// Rewrites the database of `r` as format 4 kept it: beside the records, a `names` table and a `children` table
/// (with `wrong` naming a layer by a name its record does not have, when given), and the format number 4.
fn write_format_4(r: &Root, wrong: Option<(&str, u64)>) {
    let db = redb::Database::create(r.path().join("meta.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let layers = txn
            .open_table(redb::TableDefinition::<u64, &[u8]>::new("layers"))
            .unwrap();
        let mut names = txn
            .open_table(redb::TableDefinition::<(&str, &str), u64>::new("names"))
            .unwrap();
        let mut children = txn
            .open_table(redb::TableDefinition::<(u64, u64), ()>::new("children"))
            .unwrap();
        for row in layers.iter().unwrap() {
            let (k, v) = row.unwrap();
            let rec: serde_json::Value = serde_json::from_slice(v.value()).unwrap();
            let (ns, name) = (rec["ns"].as_str().unwrap(), rec["name"].as_str().unwrap());
            names.insert((ns, name), k.value()).unwrap();
            if let Some(p) = rec["parent"].as_u64() {
                children.insert((p, k.value()), ()).unwrap();
            }
        }
        if let Some((name, n)) = wrong {
            names.insert((NS, name), n).unwrap();
        }
        let mut meta = txn
            .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap();
        meta.insert("format", 4).unwrap();
    }
    txn.commit().unwrap();
}

/// The tables of the database of `r`, by name.
fn table_names(r: &Root) -> Vec<String> {
    let db = redb::Database::create(r.path().join("meta.redb")).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let mut out: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| redb::TableHandle::name(&t).to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn format_4_names_and_children_become_the_in_memory_index() {
    let r = root_with(&[("a", None), ("b", Some("a")), ("c", Some("a"))]);
    write_format_4(&r, None);
    assert!(table_names(&r).contains(&"names".to_string()));
    let s = Store::open(&r.path()).unwrap();
    assert_eq!(s.status().unwrap().format, lamina_store::FORMAT_VERSION);
    let a = s.info(NS, "a").unwrap().number;
    assert_eq!(s.info(NS, "b").unwrap().lower_dirs.len(), 1);
    assert_eq!(s.count(NS).unwrap(), 3);
    // `a` has children: it cannot go before them.
    assert!(matches!(s.remove(NS, "a"), Err(StoreError::InUse(_))));
    let overview = s.overview_of(a).unwrap();
    assert_eq!(overview.children, 2);
    drop(s);
    let tables = table_names(&r);
    assert!(
        !tables.iter().any(|t| t == "names" || t == "children"),
        "{tables:?}"
    );
    // Names, removals and creates after a restart come from the records alone.
    let s = Store::open(&r.path()).unwrap();
    s.remove(NS, "b").unwrap();
    s.remove(NS, "c").unwrap();
    assert!(s.remove(NS, "a").unwrap());
    create(&s, "a", None);
    assert_eq!(s.count(NS).unwrap(), 1);
}

#[test]
fn format_4_names_that_disagree_with_the_records_are_refused_with_nothing_changed() {
    let r = root_with(&[("a", None)]);
    write_format_4(&r, Some(("ghost", 77)));
    let e = Store::open(&r.path()).unwrap_err();
    assert!(matches!(e, StoreError::CorruptMetadata(_)), "{e}");
    assert!(e.to_string().contains("ghost"), "{e}");
    assert!(table_names(&r).contains(&"names".to_string()));
}

#[test]
fn commit_freezes_under_a_new_name_without_copying() {
    let r = Root::new();
    let s = Store::open(&r.path()).unwrap();
    let frozen_parent = CreateOptions {
        parent_kind: Some(LayerKind::ReadOnly),
        ..CreateOptions::default()
    };
    s.create(NewLayer::new("c:x", "active", LayerKind::ReadWrite).with_options(frozen_parent))
        .unwrap();
    let before = s.info("c:x", "active").unwrap();
    fs::write(before.diff_dir.join("f"), b"content").unwrap();
    let labels: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
    let rec = s.commit("c:x", "active", "frozen", labels.clone()).unwrap();
    assert_eq!((rec.kind, rec.labels), (LayerKind::ReadOnly, labels));
    assert!(rec.inodes >= Some(2) && rec.size.is_some());
    let after = s.info("c:x", "frozen").unwrap();
    assert_eq!(after.number, before.number, "same layer, renamed");
    assert_eq!(fs::read(after.diff_dir.join("f")).unwrap(), b"content");
    assert!(matches!(s.info("c:x", "active"), Err(StoreError::NotFound(_))));
    // Frozen layers and views cannot be committed; parents must be frozen for checked creates.
    assert!(matches!(
        s.commit("c:x", "frozen", "again", BTreeMap::new()),
        Err(StoreError::Precondition(_))
    ));
    s.create(
        NewLayer::new("c:x", "view", LayerKind::View)
            .with_parent(Some("frozen"))
            .with_options(frozen_parent),
    )
    .unwrap();
    assert!(matches!(
        s.commit("c:x", "view", "v2", BTreeMap::new()),
        Err(StoreError::Precondition(_))
    ));
    s.create(NewLayer::new("c:x", "rw", LayerKind::ReadWrite))
        .unwrap();
    assert!(matches!(
        s.create(
            NewLayer::new("c:x", "on-rw", LayerKind::ReadWrite)
                .with_parent(Some("rw"))
                .with_options(frozen_parent)
        ),
        Err(StoreError::Precondition(_))
    ));
    assert!(matches!(
        s.commit("c:x", "rw", "frozen", BTreeMap::new()),
        Err(StoreError::AlreadyExists(_))
    ));
    // Listing of one namespace with parent names.
    let names: Vec<(String, Option<String>)> = s
        .list_ns("c:x")
        .unwrap()
        .into_iter()
        .map(|(r, p)| (r.name, p))
        .collect();
    assert_eq!(
        names,
        [
            ("frozen".to_string(), None),
            ("rw".to_string(), None),
            ("view".to_string(), Some("frozen".to_string()))
        ]
    );
    assert!(s.list_ns("c:").unwrap().is_empty());
    assert!(!s.remove("c:x", "nope").unwrap());
}

// ---- metadata loss and power cuts (docs/on-disk-format.md, "Custody") ----

/// A store with one applied layer; returns its directory name under `layers/`.
fn one_applied_layer(root: &std::path::Path, name: &str, data: &[u8]) -> String {
    let s = Store::open(root).unwrap();
    create(&s, name, None);
    apply_files(&s, name, &[("f", data)]);
    s.wait_sealed();
    format!("{:x}", s.info(NS, name).unwrap().number)
}

fn refused(root: &std::path::Path) -> String {
    match Store::open(root) {
        Err(StoreError::CorruptMetadata(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_missing_or_empty_database_beside_layers_is_refused_and_nothing_is_deleted() {
    for how in ["missing", "empty"] {
        let r = Root::new();
        let dir = one_applied_layer(&r.path(), "a", b"precious");
        let db = r.path().join("meta.redb");
        fs::rename(&db, r.path().join("meta.redb.saved")).unwrap();
        if how == "empty" {
            drop(redb::Database::create(&db).unwrap());
        }
        let msg = refused(&r.path());
        assert!(
            msg.contains("is new") && msg.contains("--quarantine-unknown"),
            "{how}: {msg}"
        );
        // A refused start changes nothing: the next one refuses the same way.
        assert_eq!(refused(&r.path()), msg, "{how}");
        assert_eq!(db.exists(), how == "empty");
        assert_eq!(
            fs::read(r.path().join("layers").join(&dir).join("diff/f")).unwrap(),
            b"precious",
            "{how}"
        );
        // Restoring the database brings everything back.
        fs::rename(r.path().join("meta.redb.saved"), &db).unwrap();
        let s = Store::open(&r.path()).unwrap();
        assert_eq!(
            fs::read(s.info(NS, "a").unwrap().diff_dir.join("f")).unwrap(),
            b"precious"
        );
    }
}

#[test]
fn a_foreign_database_is_refused() {
    let r1 = Root::new();
    let r2 = Root::new();
    one_applied_layer(&r1.path(), "mine", b"1");
    one_applied_layer(&r2.path(), "theirs", b"2");
    fs::copy(r2.path().join("meta.redb"), r1.path().join("meta.redb")).unwrap();
    let msg = refused(&r1.path());
    assert!(msg.contains("another data root"), "{msg}");
}

#[test]
fn an_older_database_keeps_known_layers_and_quarantines_the_rest_untouched() {
    let r = Root::new();
    let a = one_applied_layer(&r.path(), "a", b"old");
    fs::copy(r.path().join("meta.redb"), r.path().join("old.redb")).unwrap();
    let b = {
        let s = Store::open(&r.path()).unwrap();
        create(&s, "b", None);
        apply_files(&s, "b", &[("f", b"new")]);
        format!("{:x}", s.info(NS, "b").unwrap().number)
    };
    fs::rename(r.path().join("old.redb"), r.path().join("meta.redb")).unwrap();
    let s = Store::open(&r.path()).unwrap();
    assert_eq!(
        fs::read(r.path().join("layers").join(&a).join("diff/f")).unwrap(),
        b"old"
    );
    assert!(!s.exists(NS, "b").unwrap());
    assert!(!r.path().join("layers").join(&b).exists());
    let q: Vec<_> = fs::read_dir(r.path().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(fs::read(q[0].join("diff/f")).unwrap(), b"new");
    // The periodic collection leaves it; an operator's collection lists and removes it.
    let periodic = s.gc(&lamina_store::GcOptions::default()).unwrap();
    assert!(periodic.items.is_empty(), "{periodic:?}");
    let asked = lamina_store::GcOptions {
        unknown: true,
        ..lamina_store::GcOptions::default()
    };
    let done = s.gc(&asked).unwrap();
    assert_eq!(done.items.len(), 1, "{done:?}");
    assert_eq!(done.items[0].kind, lamina_store::GarbageKind::Quarantined);
    assert!(!q[0].exists());
}

#[test]
fn quarantine_unknown_starts_with_every_directory_moved_aside() {
    let r = Root::new();
    let dir = one_applied_layer(&r.path(), "a", b"keep me");
    fs::remove_file(r.path().join("meta.redb")).unwrap();
    let opts = lamina_store::OpenOptions {
        quarantine_unknown: true,
        ..lamina_store::OpenOptions::default()
    };
    let s = Store::open_with_options(&r.path(), opts).unwrap();
    assert_eq!(s.list().unwrap().len(), 0);
    assert!(!r.path().join("layers").join(&dir).exists());
    let q: Vec<_> = fs::read_dir(r.path().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(q.len(), 1);
    assert_eq!(fs::read(q[0].join("diff/f")).unwrap(), b"keep me");
    drop(s);
    // The new database is this data root's from now on.
    Store::open(&r.path()).unwrap();
}

#[test]
fn a_removed_layer_directory_left_by_a_crash_is_deleted_at_start() {
    let r = Root::new();
    let dir = one_applied_layer(&r.path(), "a", b"gone");
    let layer = r.path().join("layers").join(&dir);
    let copy = r.path().join("copy");
    fs::create_dir_all(copy.join("diff")).unwrap();
    fs::write(copy.join("diff/f"), b"gone").unwrap();
    {
        let s = Store::open(&r.path()).unwrap();
        assert!(s.remove(NS, "a").unwrap());
    }
    // What a crash between the commit of the removal and the rename into trash leaves.
    fs::rename(&copy, &layer).unwrap();
    let _s = Store::open(&r.path()).unwrap();
    assert!(!layer.exists());
    assert!(!r.path().join("quarantine").exists());
}

#[test]
fn a_record_whose_directories_never_reached_the_disk_starts_cleanly() {
    // What a power cut after a create (record durable, directories not) and during the apply that followed
    // leaves: the layer's pending row, no `layers/<n>` at all.
    let r = Root::new();
    let (number, dir, b_dir) = {
        let s = Store::open(&r.path()).unwrap();
        create(&s, "a", None);
        create(&s, "b", None);
        let n = s.info(NS, "a").unwrap().number;
        let layer_dir = |name: &str| s.info(NS, name).unwrap().diff_dir.parent().unwrap().to_path_buf();
        (n, layer_dir("a"), layer_dir("b"))
    };
    {
        let db = redb::Database::create(r.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<u64, &str>::new("pending"))
            .unwrap()
            .insert(number, format!("{number:x}-3").as_str())
            .unwrap();
        txn.commit().unwrap();
    }
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(b_dir.join("work")).unwrap();
    let s = Store::open(&r.path()).unwrap();
    assert_eq!(s.record(NS, "a").unwrap().0.state, LayerState::Empty);
    apply_files(&s, "a", &[("f", b"x")]);
    assert_eq!(fs::read(dir.join("diff/f")).unwrap(), b"x");
    assert!(s.exists(NS, "b").unwrap());
}

#[test]
fn the_data_root_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let r = Root::new();
    fs::create_dir_all(r.path()).unwrap();
    fs::set_permissions(r.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let _s = Store::open(&r.path()).unwrap();
    assert_eq!(
        fs::metadata(r.path()).unwrap().permissions().mode() & 0o777,
        0o700
    );
}
