//! Statistics, garbage collection, manifests and verification of the store (issue 9).

use std::collections::BTreeMap;
use std::fs;

use lamina_store::{GarbageKind, GcOptions, LayerKind, NewLayer, OpenMode, Store, VerifyStatus};

mod common;
use common::*;

#[test]
fn counters_follow_get_put_and_survive_a_restart() {
    let Some(r) = root_for("counters_follow_get_put_and_survive_a_restart") else {
        return;
    };
    let (a, b, c) = {
        let s = Store::open(&r.path()).unwrap();
        let a = layer(&s, "a", None, &[("f", b"1")]);
        let b = layer(&s, "b", Some("a"), &[("g", b"2")]);
        let c = layer(&s, "c", Some("b"), &[]);
        // c: get, get (hit), put, put, get, put: two bring-ups, three gets.
        for _ in 0..2 {
            s.get(NS, "c", "").unwrap();
        }
        s.put(NS, "c").unwrap();
        s.put(NS, "c").unwrap();
        s.get(NS, "c", "").unwrap();
        s.put(NS, "c").unwrap();
        // b alone: one get.
        s.get(NS, "b", "").unwrap();
        assert_eq!(s.overview_of(b).unwrap().mounts, 1);
        s.put(NS, "b").unwrap();
        let cs = s.layer_stats(c);
        assert_eq!((cs.gets, cs.uses), (3, 2));
        (a, b, c)
    };
    let s = Store::open(&r.path()).unwrap();
    let (sa, sb, sc) = (s.layer_stats(a), s.layer_stats(b), s.layer_stats(c));
    assert_eq!((sc.gets, sc.uses), (3, 2), "c");
    assert_eq!((sb.gets, sb.uses), (1, 3), "b: its own get plus two stacks of c");
    assert_eq!((sa.gets, sa.uses), (0, 3), "a: below c twice and b once");
    assert!(sc.last_used_ns > 0);
    let counters = s.counters();
    assert_eq!(counters["gets"], 4);
    assert_eq!(counters["puts"], 4);
    assert_eq!(counters["hits"], 1);
    assert_eq!(counters["mounts"], 3);
    assert_eq!(counters["applies"], 2);
    let ov = s.overview().unwrap();
    assert_eq!(ov.len(), 3);
    let ob = ov.iter().find(|o| o.number == b).unwrap();
    assert_eq!((ob.children, ob.mounts, ob.mounted), (1, 0, false));
    // Removing a layer drops its counters.
    s.remove(NS, "c").unwrap();
    s.flush_stats().unwrap();
    drop(s);
    let s = Store::open(&r.path()).unwrap();
    assert_eq!(s.layer_stats(c).gets, 0);
    // Names resolve with and without a namespace, and by number.
    assert_eq!(s.resolve("b", None).unwrap(), b);
    assert_eq!(s.resolve("test/b", None).unwrap(), b);
    assert_eq!(s.resolve("b", Some(NS)).unwrap(), b);
    assert_eq!(s.resolve(&format!("{a:x}"), None).unwrap(), a);
    assert!(s.resolve("nope", None).is_err());
}

#[test]
fn manifest_recorded_at_apply_and_verify_finds_a_flipped_byte() {
    let Some((r, s)) = root_store("manifest_recorded_at_apply_and_verify_finds_a_flipped_byte") else {
        return;
    };
    let a = layer(&s, "a", None, &[("etc/motd", b"hello"), ("bin/sh", b"#!")]);
    let b = layer(&s, "b", Some("a"), &[("x", b"xx")]);
    // Manifests are written in the background after an apply.
    s.wait_sealed();
    let info = s.info(NS, "a").unwrap();
    assert!(info.record.manifest.as_deref().unwrap().starts_with("sha256:"));
    assert!(r.path().join(format!("layers/{a:x}/manifest")).is_file());
    assert_eq!(s.verifiable_layers().unwrap(), vec![a, b]);
    for n in [a, b] {
        let v = s.verify_layer(n, &mut |_| {}).unwrap();
        assert!(matches!(v.status, VerifyStatus::Clean { .. }), "{v:?}");
    }
    // flip one byte
    let motd = info.diff_dir.join("etc/motd");
    fs::write(&motd, b"hellp").unwrap();
    let v = s.verify_layer(a, &mut |_| {}).unwrap();
    match v.status {
        VerifyStatus::Mismatch { path, detail } => {
            assert_eq!(path, "/etc/motd");
            assert!(detail.contains("content"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.verify_layer(b, &mut |_| {}).unwrap().status,
        VerifyStatus::Clean { .. }
    ));
    // a tampered manifest is caught by its recorded digest
    fs::write(&motd, b"hello").unwrap();
    let mf = r.path().join(format!("layers/{b:x}/manifest"));
    let mut text = fs::read(&mf).unwrap();
    text.push(b'\n');
    fs::write(&mf, text).unwrap();
    match s.verify_layer(b, &mut |_| {}).unwrap().status {
        VerifyStatus::Mismatch { detail, .. } => assert!(detail.contains("manifest file"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // an empty writable layer is skipped, not failed
    s.create(NewLayer::new(NS, "rw", LayerKind::ReadWrite).with_parent(Some("b")))
        .unwrap();
    let rw = s.info(NS, "rw").unwrap().number;
    assert!(matches!(
        s.verify_layer(rw, &mut |_| {}).unwrap().status,
        VerifyStatus::Skipped { .. }
    ));
    // a commit records a manifest too
    fs::write(s.info(NS, "rw").unwrap().diff_dir.join("new"), b"n").unwrap();
    s.commit(NS, "rw", "frozen", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.verify_layer(rw, &mut |_| {}).unwrap().status,
        VerifyStatus::Clean { entries: 2, .. }
    ));
}

#[test]
fn gc_finds_and_removes_exactly_the_planted_garbage() {
    let Some(r) = root_for("gc_finds_and_removes_exactly_the_planted_garbage") else {
        return;
    };
    let root = r.path();
    let (keep, pending) = {
        let s = Store::open(&root).unwrap();
        let keep = layer(&s, "keep", None, &[("f", b"1")]);
        layer(&s, "child", Some("keep"), &[("g", b"2")]);
        s.get(NS, "child", "").unwrap(); // a live mount of a known layer: never garbage
        let pending = layer(&s, "half", None, &[]);
        (keep, pending)
    };
    // Plant: an interrupted apply (pending row + staging dir + content), an orphan dir, a trash leftover,
    // a leaked mount.
    let staging = format!("{pending:x}-77");
    fs::create_dir_all(root.join("staging").join(&staging)).unwrap();
    fs::write(root.join("staging").join(&staging).join("part"), vec![7u8; 10000]).unwrap();
    {
        let db = redb::Database::create(root.join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<u64, &str>::new("pending"))
            .unwrap()
            .insert(pending, staging.as_str())
            .unwrap();
        txn.commit().unwrap();
    }
    fs::create_dir_all(root.join("layers/ff00/diff")).unwrap();
    fs::write(root.join("layers/ff00/diff/x"), b"orphan").unwrap();
    fs::create_dir_all(root.join("trash/old")).unwrap();
    fs::create_dir_all(root.join("layers/ff01/merged")).unwrap();
    lamina_sys::mount::bind_mount(&root.join("trash/old"), &root.join("layers/ff01/merged"), true).unwrap();

    let s = Store::open_with(&root, OpenMode::Admin).unwrap();
    // Directories the metadata does not know are the operator's call: the periodic collection leaves them.
    let periodic = s.gc(&GcOptions::default().dry_run()).unwrap();
    assert!(
        periodic.items.iter().all(|g| g.kind != GarbageKind::UnknownDir),
        "{periodic:#?}"
    );
    let asked = GcOptions {
        unknown: true,
        ..GcOptions::default()
    };
    let dry = s.gc(&asked.dry_run()).unwrap();
    let mut kinds: Vec<(GarbageKind, String)> = dry
        .items
        .iter()
        .map(|g| (g.kind, g.path.strip_prefix(&root).unwrap().display().to_string()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            (GarbageKind::StaleMount, "layers/ff01/merged".to_string()),
            (GarbageKind::InterruptedApply, format!("staging/{staging}")),
            (GarbageKind::Trash, "trash/old".to_string()),
            (GarbageKind::UnknownDir, "layers/ff00".to_string()),
            (GarbageKind::UnknownDir, "layers/ff01".to_string()),
        ],
        "{dry:#?}"
    );
    assert!(dry.bytes >= 10000, "{dry:?}");
    assert!(root.join("layers/ff00").exists(), "a dry run removes nothing");
    let done = s.gc(&asked).unwrap();
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    assert_eq!(done.items.len(), 5);
    assert!(!root.join("layers/ff00").exists());
    assert!(!root.join("layers/ff01").exists());
    assert!(!root.join("trash/old").exists());
    assert_eq!(fs::read_dir(root.join("staging")).unwrap().count(), 0);
    assert_eq!(
        s.overview_of(pending).unwrap().record.state,
        lamina_store::LayerState::Empty
    );
    // the live mount and the layers stayed
    assert!(lamina_sys::mount::is_mount_point(&s.info(NS, "child").unwrap().merged_dir).unwrap());
    assert!(s.info(NS, "keep").unwrap().diff_dir.join("f").exists());
    assert_eq!(s.overview_of(keep).unwrap().children, 1);
    // nothing left
    assert!(s.gc(&asked).unwrap().items.is_empty());
}

#[test]
fn gc_of_a_removed_namespace_keeps_what_is_in_use() {
    let Some((_r, s)) = root_store("gc_of_a_removed_namespace_keeps_what_is_in_use") else {
        return;
    };
    let old = "docker:/old/home";
    let mk = |name: &str, parent: Option<&str>| {
        s.create(NewLayer::new(old, name, LayerKind::ReadOnly).with_parent(parent))
            .unwrap()
    };
    mk("base", None);
    mk("mid", Some("base"));
    mk("top", Some("mid"));
    mk("other", Some("base"));
    layer(&s, "mine", None, &[]);
    s.get(old, "top", "").unwrap();
    let opts = GcOptions {
        dry_run: true,
        removed_namespaces: vec![old.into()],
        protected_namespaces: vec![format!("{NS}")],
        ..GcOptions::default()
    };
    let dry = s.gc(&opts).unwrap();
    let names: Vec<_> = dry.items.iter().filter_map(|g| g.name.clone()).collect();
    assert_eq!(names, vec![format!("{old}/other")]);
    let kept: Vec<_> = dry.kept.iter().map(|k| k.name.clone()).collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    s.put(old, "top").unwrap();
    let done = s
        .gc(&GcOptions {
            dry_run: false,
            ..opts.clone()
        })
        .unwrap();
    assert_eq!(done.items.len(), 4, "{done:#?}");
    assert_eq!(s.count(old).unwrap(), 0);
    assert_eq!(s.count(NS).unwrap(), 1);
    // the protected namespace cannot be declared removed
    let e = s
        .gc(&GcOptions {
            removed_namespaces: vec![NS.into()],
            ..opts
        })
        .unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
}
