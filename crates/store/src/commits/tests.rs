//! Commits recorded unflushed, and their replay at start. A crash of the process is a child process (this test
//! binary again, running one ignored test) that the fault point `store.commit.done=kill` stops right after the
//! unflushed transaction: nothing of the process is flushed or closed, as after a SIGKILL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lamina_sys::mounter::{FakeMounter, Mounter};

use super::{write_record, COMMIT_FILE};
use crate::tables::Reader;
use crate::{LayerKind, LayerRecord, NewLayer, OpenOptions, Store};

const NS: &str = "test";
/// Set in a child process: the data root it works on.
const CHILD_ROOT: &str = "LAMINA_TEST_COMMIT_ROOT";

fn open(root: &Path) -> Store {
    let mounter: Arc<dyn Mounter> = Arc::new(FakeMounter::new());
    Store::open_with_options(
        root,
        OpenOptions {
            mounter: Some(mounter),
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// An active snapshot `active` holding one file; gives its layer directory.
fn active(s: &Store, data: &[u8]) -> PathBuf {
    s.create(NewLayer::new(NS, "active", LayerKind::ReadWrite))
        .unwrap();
    let diff = s.info(NS, "active").unwrap().diff_dir;
    std::fs::write(diff.join("data"), data).unwrap();
    diff.parent().unwrap().to_path_buf()
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("l".to_string(), "v".to_string())])
}

/// Runs the ignored test `name` of this binary in a child process on a new data root with
/// `LAMINA_FAULTS=faults`; gives the directory holding the data root, the data root, and whether the child
/// exited successfully. None (the test is skipped) in a build without fault points.
fn child(name: &str, faults: &str) -> Option<(tempfile::TempDir, PathBuf, bool)> {
    if !lamina_sys::fault::ENABLED {
        eprintln!("skipped: built without fault points");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let exe = std::env::current_exe().unwrap();
    let status = Command::new(exe)
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, &root)
        .env("LAMINA_FAULTS", faults)
        .status()
        .unwrap();
    Some((dir, root, status.success()))
}

/// In a child process run by [`child`]: the store on its data root with the active snapshot `active` holding
/// `data`, and its layer directory.
fn child_store(data: &[u8]) -> Option<(Store, PathBuf)> {
    let root = std::env::var_os(CHILD_ROOT)?;
    let s = open(Path::new(&root));
    let layer = active(&s, data);
    Some((s, layer))
}

/// What the database file itself says `(ns, name)` names (the store closed).
fn stored_number(root: &Path, name: &str) -> Option<u64> {
    let db = crate::db::Db::open(&root.join("meta.redb")).unwrap();
    let reader = Reader::begin(&db).unwrap();
    reader.number(NS, name).unwrap()
}

#[test]
fn a_commit_keeps_its_record_file_until_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("root"));
    let layer = active(&s, b"data");
    let rec = s.commit(NS, "active", "committed", labels()).unwrap();
    assert!(layer.join(COMMIT_FILE).exists());
    assert!(!layer.join("commit.tmp").exists());
    assert_eq!(rec.kind, LayerKind::ReadOnly);
    assert!(s.lookup(NS, "active").unwrap().is_none());
    s.checkpoint().unwrap();
    assert!(!layer.join(COMMIT_FILE).exists());
    // Nothing pending: a no-op.
    s.checkpoint().unwrap();
    let got = s.info(NS, "committed").unwrap().record;
    assert_eq!(got, rec);
}

#[test]
fn a_commit_is_durable_once_the_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let layer = {
        let s = open(&root);
        let layer = active(&s, b"data");
        s.commit(NS, "active", "committed", labels()).unwrap();
        layer
    };
    assert!(!layer.join(COMMIT_FILE).exists());
    assert!(stored_number(&root, "committed").is_some());
    assert!(stored_number(&root, "active").is_none());
}

/// Child of [`a_commit_the_process_did_not_flush_is_made_again_at_start`].
#[test]
#[ignore = "run by a_commit_the_process_did_not_flush_is_made_again_at_start in a child process"]
fn child_commits_and_dies() {
    let Some((s, _)) = child_store(b"content of the committed snapshot") else {
        return;
    };
    // `store.commit.done=kill` ends the process inside this call.
    let _ = s.commit(NS, "active", "committed", labels());
    std::process::exit(3);
}

#[test]
fn a_commit_the_process_did_not_flush_is_made_again_at_start() {
    let Some((_dir, root, ok)) = child("commits::tests::child_commits_and_dies", "store.commit.done=kill")
    else {
        return;
    };
    assert!(!ok, "the child was not killed");
    // The database lost the unflushed commit with the process; the record file has it.
    assert!(stored_number(&root, "committed").is_none());
    let n = stored_number(&root, "active").expect("the active snapshot is in the database");
    let file = root.join("layers").join(format!("{n:x}")).join(COMMIT_FILE);
    assert!(file.exists());

    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_none());
    let info = s.info(NS, "committed").unwrap();
    assert_eq!(info.number, n);
    let rec = &info.record;
    assert_eq!(rec.kind, LayerKind::ReadOnly);
    assert_eq!(rec.labels, labels());
    assert!(rec.inodes.is_some() && rec.size.is_some());
    let r = s.verify_layer(n, &mut |_| {}).unwrap();
    assert!(matches!(r.status, crate::VerifyStatus::Clean { .. }), "{r:?}");
    assert!(!file.exists());
    drop(s);
    // Made durably at start.
    assert_eq!(stored_number(&root, "committed"), Some(n));
}

/// Child of [`a_failed_commit_leaves_no_record_file`].
#[test]
#[ignore = "run by a_failed_commit_leaves_no_record_file in a child process"]
fn child_commit_fails() {
    let Some((s, layer)) = child_store(b"data") else {
        return;
    };
    // `store.commit.commit=eio`: the transaction fails after the record file was written and flushed.
    assert!(s.commit(NS, "active", "committed", labels()).is_err());
    assert!(!layer.join(COMMIT_FILE).exists());
    assert!(s.lookup(NS, "active").unwrap().is_some());
    // Died before any checkpoint: the next start must not make the failed commit.
    std::process::exit(0);
}

#[test]
fn a_failed_commit_leaves_no_record_file() {
    let Some((_dir, root, ok)) = child("commits::tests::child_commit_fails", "store.commit.commit=eio")
    else {
        return;
    };
    assert!(ok, "the child failed");
    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_some());
    assert!(s.lookup(NS, "committed").unwrap().is_none());
    // The Commit again succeeds.
    s.commit(NS, "active", "committed", labels()).unwrap();
}

/// A store on `root` closed after a crash left it thus: the active snapshot `active` and, in its layer
/// directory, the record of its Commit as `committed` naming `key`, then `tamper` applied to the layer directory.
/// Gives the layer number, the record the file holds and the layer directory.
fn left_by_a_crash(root: &Path, key: &str, tamper: impl FnOnce(&Path)) -> (u64, LayerRecord, PathBuf) {
    let s = open(root);
    let layer = active(&s, b"data");
    let (n, rec) = s.lookup(NS, "active").unwrap().unwrap();
    let paths = s.backend.paths(n);
    let digest = crate::verify::write_manifest_unsynced(&paths.content, &paths.manifest).unwrap();
    let committed = rec.committed("committed", labels(), 4096, 2, Some(digest));
    write_record(&layer.join(COMMIT_FILE), n, key, &committed).unwrap();
    tamper(&layer);
    (n, committed, layer)
}

#[test]
fn a_record_file_that_does_not_match_is_deleted_and_the_snapshot_stays_active() {
    let no_change: fn(&Path) = |_| {};
    // As a power cut during the Commit's flush may leave it: the record on disk, the content not.
    let content_changed: fn(&Path) = |layer| std::fs::write(layer.join("diff/data"), b"dat").unwrap();
    for (key, tamper) in [("another-key", no_change), ("active", content_changed)] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let (_, _, layer) = left_by_a_crash(&root, key, tamper);
        let s = open(&root);
        assert!(s.lookup(NS, "active").unwrap().is_some(), "{key}");
        assert!(s.lookup(NS, "committed").unwrap().is_none(), "{key}");
        assert!(!layer.join(COMMIT_FILE).exists(), "{key}");
    }
}

#[test]
fn a_matching_record_file_is_replayed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let (n, committed, layer) = left_by_a_crash(&root, "active", |_| {});
    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_none());
    assert_eq!(s.lookup(NS, "committed").unwrap(), Some((n, committed)));
    assert!(!layer.join(COMMIT_FILE).exists());
}
