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

/// Runs the ignored test `name` of this binary in a child process on `root` with `LAMINA_FAULTS=faults`; gives
/// whether it exited successfully.
fn child(name: &str, root: &Path, faults: &str) -> bool {
    let exe = std::env::current_exe().unwrap();
    let status = Command::new(exe)
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, root)
        .env("LAMINA_FAULTS", faults)
        .status()
        .unwrap();
    status.success()
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
    let Some(root) = std::env::var_os(CHILD_ROOT) else {
        return;
    };
    let s = open(Path::new(&root));
    active(&s, b"content of the committed snapshot");
    // `store.commit.done=kill` ends the process inside this call.
    let _ = s.commit(NS, "active", "committed", labels());
    std::process::exit(3);
}

#[test]
fn a_commit_the_process_did_not_flush_is_made_again_at_start() {
    if !lamina_sys::fault::ENABLED {
        eprintln!("skipped: built without fault points");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    assert!(!child(
        "commits::tests::child_commits_and_dies",
        &root,
        "store.commit.done=kill"
    ));
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
    let Some(root) = std::env::var_os(CHILD_ROOT) else {
        return;
    };
    let s = open(Path::new(&root));
    let layer = active(&s, b"data");
    // `store.commit.commit=eio`: the transaction fails after the record file was written and flushed.
    assert!(s.commit(NS, "active", "committed", labels()).is_err());
    assert!(!layer.join(COMMIT_FILE).exists());
    assert!(s.lookup(NS, "active").unwrap().is_some());
    // Died before any checkpoint: the next start must not make the failed commit.
    std::process::exit(0);
}

#[test]
fn a_failed_commit_leaves_no_record_file() {
    if !lamina_sys::fault::ENABLED {
        eprintln!("skipped: built without fault points");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    assert!(child(
        "commits::tests::child_commit_fails",
        &root,
        "store.commit.commit=eio"
    ));
    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_some());
    assert!(s.lookup(NS, "committed").unwrap().is_none());
    // The Commit again succeeds.
    s.commit(NS, "active", "committed", labels()).unwrap();
}

/// A record as a Commit of `active` in `s` would write it.
fn record_of_commit(s: &Store, name: &str) -> (u64, LayerRecord) {
    let (n, rec) = s.lookup(NS, "active").unwrap().unwrap();
    let paths = s.backend.paths(n);
    let digest = crate::verify::write_manifest_unsynced(&paths.content, &paths.manifest).unwrap();
    (n, rec.committed(name, labels(), 4096, 2, Some(digest)))
}

#[test]
fn a_record_file_of_another_key_is_ignored_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let layer = {
        let s = open(&root);
        let layer = active(&s, b"data");
        let (n, committed) = record_of_commit(&s, "committed");
        write_record(&layer.join(COMMIT_FILE), n, "another-key", &committed).unwrap();
        layer
    };
    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_some());
    assert!(s.lookup(NS, "committed").unwrap().is_none());
    assert!(!layer.join(COMMIT_FILE).exists());
}

#[test]
fn a_record_file_whose_content_changed_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let layer = {
        let s = open(&root);
        let layer = active(&s, b"data");
        let (n, committed) = record_of_commit(&s, "committed");
        write_record(&layer.join(COMMIT_FILE), n, "active", &committed).unwrap();
        // As a power cut during the Commit's flush may leave it: the record on disk, the content not.
        std::fs::write(layer.join("diff/data"), b"dat").unwrap();
        layer
    };
    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_some());
    assert!(s.lookup(NS, "committed").unwrap().is_none());
    assert!(!layer.join(COMMIT_FILE).exists());
}

#[test]
fn a_matching_record_file_is_replayed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let (n, committed) = {
        let s = open(&root);
        let layer = active(&s, b"data");
        let (n, committed) = record_of_commit(&s, "committed");
        write_record(&layer.join(COMMIT_FILE), n, "active", &committed).unwrap();
        (n, committed)
    };
    let s = open(&root);
    assert!(s.lookup(NS, "active").unwrap().is_none());
    assert_eq!(s.lookup(NS, "committed").unwrap(), Some((n, committed)));
}
