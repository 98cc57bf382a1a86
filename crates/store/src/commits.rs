//! Commit record files: a snapshotter Commit recorded with the layer's own flush.
//!
//! On a backend that offers them ([`LayerBackend::commit_record`](crate::backend::LayerBackend::commit_record)),
//! a Commit of a small layer writes, beside its manifest and before the one `syncfs` that freezes the layer, a
//! file `layers/<n>/commit` holding the record the commit makes (through `commit.tmp`, renamed, neither flushed
//! on its own). That flush makes the file durable with the content and the manifest, so the database
//! transaction that moves the name needs no flush of its own: it is committed unflushed, and made durable by the
//! next durable transaction of the store, at the latest by [`Store::checkpoint`] (`lamina serve` runs one every
//! second while commits are pending, and one when the store is dropped).
//!
//! A crash before that (a kill, a power cut) leaves the layer active under its old key with the file in its
//! directory; the next start commits it again from the file ([`Store::replay_commits`]), in one durable
//! transaction, after checking the layer's content against the manifest whose digest the file names: a file
//! alone proves that its own bytes reached the disk, not that the content written before it did (a power cut
//! during the `syncfs` can keep the one without the other), and a commit is replayed only onto the very content
//! it froze. See docs/on-disk-format.md, "Commit".

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Mutex;

use lamina_archive::manifest::{self, VerifyOutcome};
use lamina_sys::{fault, mount};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{open_dir, LayerKind, LayerRecord, Result, Store, StoreError};

/// File name of a layer's commit record, beside `diff/` and `manifest`.
pub(crate) const COMMIT_FILE: &str = "commit";

/// The `format` of a commit record file.
const FORMAT: &str = "lamina-commit-1";

/// What a commit record file holds: the commit of layer `layer` from `(ns, key)`, and the record it writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CommitFile {
    format: String,
    layer: u64,
    /// The namespace and the active snapshot's key the commit moves the layer away from.
    ns: String,
    key: String,
    /// The record the commit writes: the new name, kind `ReadOnly`, labels, size, inodes and the manifest's
    /// digest.
    record: LayerRecord,
}

/// Writes the commit record of layer `n` (committed from `key` as `record`) to `path` through a temporary file
/// renamed into place, neither flushed: the caller flushes the filesystem before it relies on it. On error
/// nothing new is left at `path`.
pub(crate) fn write_record(path: &Path, n: u64, key: &str, record: &LayerRecord) -> Result<()> {
    let file = CommitFile {
        format: FORMAT.into(),
        layer: n,
        ns: record.ns.clone(),
        key: key.into(),
        record: record.clone(),
    };
    let bytes = serde_json::to_vec(&file).expect("commit records serialise");
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        drop(f);
        fault::point("store.commit.record")?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::io(format!("write {}", path.display()), e));
    }
    Ok(())
}

/// Deletes the commit record at `path` after a Commit that failed, and makes the deletion durable (the
/// directory is flushed): a failed Commit must not be made at the next start.
pub(crate) fn discard(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "could not delete the record of a failed commit");
            return;
        }
    }
    if let Some(dir) = path.parent() {
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            warn!(dir = %dir.display(), error = %e, "could not flush the deletion of a failed commit's record");
        }
    }
}

/// Deletes a commit record that is done with (its commit is durable in the database, or it proves nothing),
/// and its temporary file; not flushed: a record left by a crash is ignored at start.
fn forget(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("tmp"));
}

/// The layers whose Commit was recorded with an unflushed transaction since the last durable one.
#[derive(Debug, Default)]
pub(crate) struct Unflushed {
    layers: Mutex<Vec<u64>>,
}

impl Unflushed {
    /// Remembers that the commit of layer `n` awaits a durable transaction.
    pub(crate) fn push(&self, n: u64) {
        self.layers.lock().unwrap_or_else(|p| p.into_inner()).push(n);
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.layers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn put_back(&self, layers: Vec<u64>) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(layers);
    }
}

/// A commit record that checked out: the layer it commits and what to write.
struct Replay {
    n: u64,
    key: String,
    record: LayerRecord,
}

impl Store {
    /// Makes every commit recorded unflushed since the last durable transaction durable, with one durable
    /// transaction, then deletes their record files. Cheap when none is pending. A commit the database lost
    /// meanwhile (it was reopened after an I/O error, which returns its last durable state) is made again from
    /// its record file in that transaction.
    pub fn checkpoint(&self) -> Result<()> {
        let pending = self.unflushed.take();
        if pending.is_empty() {
            return Ok(());
        }
        let result = (|| {
            fault::point("store.checkpoint").map_err(|e| StoreError::io("checkpoint metadata", e))?;
            let txn = self.write()?;
            for &n in &pending {
                let Some(path) = self.backend.commit_record(n) else {
                    continue;
                };
                let Some(rec) = txn.layer(n)? else {
                    continue;
                };
                if rec.kind != LayerKind::ReadWrite {
                    continue;
                }
                // Still active: the database lost the commit; the file proves it (it was flushed before the
                // Commit answered, and nothing wrote to the layer since: containerd knows it as committed).
                if let Some(r) = read_matching(&path, n, &rec) {
                    if txn.number(&r.record.ns, &r.record.name)?.is_none() {
                        warn!(layer = n, key = %r.key, name = %r.record.name, "making a commit the metadata database lost again");
                        apply(&txn, &r)?;
                    }
                }
            }
            txn.commit()
        })();
        match result {
            Ok(()) => {
                for n in pending {
                    if let Some(path) = self.backend.commit_record(n) {
                        forget(&path);
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.unflushed.put_back(pending);
                Err(e)
            }
        }
    }

    /// Start-up: commits that a crash took from the database (they were recorded unflushed) are made again from
    /// their record files, in one durable transaction. Only active layers are looked at (one `stat` each); a
    /// record file beside a committed layer is left, and ignored. A file that does not name the layer's key, or
    /// whose manifest or content does not match, is deleted and the layer stays active.
    pub(crate) fn replay_commits(&self) -> Result<()> {
        let mut replays = Vec::new();
        for (n, rec) in self.read()?.layers()? {
            if rec.kind != LayerKind::ReadWrite {
                continue;
            }
            let Some(path) = self.backend.commit_record(n) else {
                continue;
            };
            let _ = std::fs::remove_file(path.with_extension("tmp"));
            if std::fs::symlink_metadata(&path).is_err() {
                continue;
            }
            let Some(r) = read_matching(&path, n, &rec) else {
                forget(&path);
                continue;
            };
            match self.content_matches(n, &r.record) {
                Ok(()) => replays.push((path, r)),
                Err(why) => {
                    warn!(layer = n, key = %r.key, name = %r.record.name, why = %why,
                        "a commit record whose content is not the committed one; the snapshot stays active");
                    forget(&path);
                }
            }
        }
        let Some((first, _)) = replays.first() else {
            return Ok(());
        };
        // The content may not have been flushed (a kill before the Commit's `syncfs`): it is, before the
        // transaction that freezes it (one flush: every layer is on the data root's filesystem).
        let layer_dir = first.parent().unwrap_or(first);
        mount::syncfs(layer_dir).map_err(|e| StoreError::io("sync committed layers", e))?;
        let txn = self.write()?;
        let mut done = Vec::new();
        for (path, r) in replays {
            if txn.number(&r.record.ns, &r.record.name)?.is_some() {
                warn!(layer = r.n, key = %r.key, name = %r.record.name, "a commit record whose name is taken; the snapshot stays active");
                forget(&path);
                continue;
            }
            apply(&txn, &r)?;
            info!(layer = r.n, key = %r.key, name = %r.record.name, "commit interrupted by a crash made again from its record");
            done.push((r.n, path));
        }
        txn.commit()?;
        for (n, path) in done {
            forget(&path);
            // Just checked against its manifest.
            self.trust(n);
        }
        Ok(())
    }

    /// Whether the content of layer `n` is the one `record` froze: its manifest file has the recorded digest
    /// and the content matches it. The reason when not.
    fn content_matches(&self, n: u64, record: &LayerRecord) -> std::result::Result<(), String> {
        let Some(want) = &record.manifest else {
            return Err("no manifest digest".into());
        };
        let paths = self.backend.paths(n);
        let bytes = std::fs::read(&paths.manifest).map_err(|e| format!("manifest unreadable: {e}"))?;
        let got = manifest::digest_of(&bytes);
        if &got != want {
            return Err(format!("manifest digest {got}, recorded {want}"));
        }
        let dir = open_dir(&paths.content).map_err(|e| e.to_string())?;
        match manifest::verify_manifest(dir.as_fd(), &mut &bytes[..], &mut |_| {}) {
            Ok(VerifyOutcome::Clean { .. }) => Ok(()),
            Ok(VerifyOutcome::Mismatch { path, detail }) => Err(format!("{path}: {detail}")),
            Ok(VerifyOutcome::Skipped { reason }) => Err(reason),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The commit record at `path` if it is a well-formed one for layer `n` whose current record `rec` is the
/// active snapshot it names.
fn read_matching(path: &Path, n: u64, rec: &LayerRecord) -> Option<Replay> {
    let bytes = std::fs::read(path).ok()?;
    let file: CommitFile = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring an unreadable commit record");
            return None;
        }
    };
    let fits = file.format == FORMAT
        && file.layer == n
        && file.ns == rec.ns
        && file.key == rec.name
        && file.record.ns == rec.ns
        && file.record.kind == LayerKind::ReadOnly
        && file.record.parent == rec.parent;
    if !fits {
        warn!(path = %path.display(), layer = n, key = %rec.name, "ignoring a commit record of another snapshot");
        return None;
    }
    Some(Replay {
        n,
        key: file.key,
        record: file.record,
    })
}

/// Writes the commit `r` into `txn`: the same changes as the Commit that recorded it.
fn apply(txn: &crate::tables::Writer, r: &Replay) -> Result<()> {
    txn.remove_name(&r.record.ns, &r.key)?;
    txn.put_name(&r.record.ns, &r.record.name, r.n)?;
    txn.put_layer(r.n, &r.record)
}

#[cfg(test)]
mod tests;
