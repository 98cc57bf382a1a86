//! Content manifests of frozen layers (written at apply and commit) and their verification.

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lamina_archive::manifest;
use serde::Serialize;

use tracing::{debug, error, info, warn};

use crate::backend::LayerPaths;
use crate::tables::Writer;
use crate::{open_dir, LayerKind, LayerRecord, LayerState, Result, Store, StoreError};
use lamina_sys::fault;

/// Writes the manifest of layer `n` (its content in `paths`) and records its digest if the layer still wants one.
fn seal(db: &crate::db::Db, index: &Arc<crate::index::Index>, n: u64, paths: &LayerPaths) -> Result<()> {
    let digest = write_manifest_file(&paths.content, &paths.manifest)?;
    let txn = Writer::begin(db, index)?;
    let Some(mut rec) = txn.layer(n)? else {
        return Ok(());
    };
    if !wants_manifest(&rec) {
        return Ok(());
    }
    rec.manifest = Some(digest);
    txn.put_layer(n, &rec)?;
    fault::point("store.seal.commit").map_err(|e| StoreError::io("commit metadata", e))?;
    txn.commit()
}

/// File name of a layer's manifest, beside `diff/`.
pub const MANIFEST_FILE: &str = "manifest";

/// The verdict on one layer: the manifest check's outcome, or why the layer was not checked.
pub use lamina_archive::manifest::VerifyOutcome as VerifyStatus;

/// One verified layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyResult {
    /// Layer number.
    pub layer: u64,
    /// `namespace/name`.
    pub name: String,
    /// The verdict.
    #[serde(flatten)]
    pub status: VerifyStatus,
}

/// Writes the manifest of `diff` to `dest` (through a temporary file renamed into place) and returns its
/// digest. File and name are flushed on their own (`fsync` of the file, then of the directory), so the
/// caller may record the digest right after.
pub(crate) fn write_manifest_file(diff: &Path, dest: &Path) -> Result<String> {
    let tmp = dest.with_extension("tmp");
    let (file, digest) = write_manifest_data(diff, &tmp)?;
    fault::point("store.seal.fsync")
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::io(format!("sync {}", tmp.display()), e))?;
    drop(file);
    fault::point("store.seal.rename")
        .and_then(|()| std::fs::rename(&tmp, dest))
        .map_err(|e| StoreError::io(format!("rename {}", tmp.display()), e))?;
    // The rename must be on disk before the digest is recorded: otherwise a crash of the filesystem (power
    // loss, an emergency read-only switch) can keep the record and lose the file (found by reliability_disk).
    if let Some(parent) = dest.parent() {
        fault::point("store.seal.dirsync")
            .and_then(|()| std::fs::File::open(parent)?.sync_all())
            .map_err(|e| StoreError::io(format!("sync {}", parent.display()), e))?;
    }
    Ok(digest)
}

/// The manifest a commit made of a small layer (see [`commit_manifest`]).
pub(crate) struct CommitManifest {
    /// Its digest, for the record.
    pub(crate) digest: String,
    /// The manifest itself when it is kept in the database (at most [`INLINE_MANIFEST_BYTES`]); `None` when it was
    /// written to the layer's manifest file.
    pub(crate) inline: Option<Vec<u8>>,
}

/// Makes the manifest of `diff` for a commit that flushes the whole filesystem (`syncfs`) before it records
/// the digest. A manifest of at most [`INLINE_MANIFEST_BYTES`] is handed back, to be kept in the database in
/// the record's transaction: nothing is written, so the flush has no file data to wait for (on ext4 a small
/// file written before the flush made it take about 0.35 ms longer, docs/benchmarks.md). A larger one is
/// streamed to `dest` (through a temporary file renamed into place, once it outgrew the limit in memory)
/// without flushing either, which the `syncfs` makes durable as [`write_manifest_file`]'s two `fsync`s do; on
/// error nothing new is left at `dest`.
pub(crate) fn commit_manifest(diff: &Path, dest: &Path) -> Result<CommitManifest> {
    let tmp = dest.with_extension("tmp");
    let mut out = Spill {
        held: Vec::new(),
        file: None,
        tmp: &tmp,
    };
    let made = (|| {
        let dir = open_dir(diff)?;
        let summary = manifest::write_manifest(dir.as_fd(), &mut out)?;
        let Some(file) = out.file.take() else {
            fault::point("store.commit.manifest").map_err(|e| StoreError::io("keep the manifest", e))?;
            return Ok(CommitManifest {
                digest: summary.digest,
                inline: Some(std::mem::take(&mut out.held)),
            });
        };
        file.into_inner()
            .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e.into_error()))?;
        fault::point("store.commit.manifest")
            .and_then(|()| std::fs::rename(&tmp, dest))
            .map_err(|e| StoreError::io(format!("rename {}", tmp.display()), e))?;
        Ok(CommitManifest {
            digest: summary.digest,
            inline: None,
        })
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// A manifest's bytes, held in memory up to [`INLINE_MANIFEST_BYTES`], then streamed to the file `tmp`.
struct Spill<'a> {
    held: Vec<u8>,
    file: Option<BufWriter<std::fs::File>>,
    tmp: &'a Path,
}

impl Write for Spill<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.file.is_none() && self.held.len() + buf.len() > INLINE_MANIFEST_BYTES {
            let mut file = BufWriter::with_capacity(256 * 1024, std::fs::File::create(self.tmp)?);
            file.write_all(&std::mem::take(&mut self.held))?;
            self.file = Some(file);
        }
        match self.file.as_mut() {
            Some(file) => file.write(buf),
            None => {
                self.held.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

/// Writes the manifest of `diff` to the file `tmp`; gives the file (written, not flushed) and the digest.
fn write_manifest_data(diff: &Path, tmp: &Path) -> Result<(std::fs::File, String)> {
    let file =
        std::fs::File::create(tmp).map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    let dir = open_dir(diff)?;
    let summary = manifest::write_manifest(dir.as_fd(), &mut out)?;
    out.flush()
        .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
    let file = out
        .into_inner()
        .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e.into_error()))?;
    Ok((file, summary.digest))
}

/// The largest layer whose manifest a snapshot Commit writes itself, before its `syncfs` (bytes, inodes):
/// the manifest reads the content back, which for a small layer costs less than the two `fsync`s and the
/// record commit of a background seal. Larger layers are sealed in the background, as applied ones are.
pub(crate) const INLINE_SEAL_BYTES: u64 = 16 << 20;
/// See [`INLINE_SEAL_BYTES`].
pub(crate) const INLINE_SEAL_INODES: u64 = 4096;
/// The largest manifest a commit keeps in the database rather than in a file (bytes): a few pages more in the
/// record's transaction. An empty layer's manifest is well under 100 bytes, one entry takes about 100.
pub(crate) const INLINE_MANIFEST_BYTES: usize = 16 << 10;

/// Layers whose manifest is being written in the background.
#[derive(Debug, Default)]
pub(crate) struct Seals {
    pending: Mutex<HashSet<u64>>,
    done: Condvar,
}

/// How long a verification waits for a layer's manifest still being written.
const SEAL_WAIT: Duration = Duration::from_secs(300);

impl Seals {
    fn wait(&self, n: Option<u64>) {
        let deadline = Instant::now() + SEAL_WAIT;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        while n.map_or(!pending.is_empty(), |n| pending.contains(&n)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(layer = ?n, "manifest still being written; verifying without waiting longer");
                return;
            }
            pending = self
                .done
                .wait_timeout(pending, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Whether a record describes frozen content that should have a manifest: applied by lamina, or committed
/// by the snapshotter (which records inodes).
pub(crate) fn wants_manifest(rec: &LayerRecord) -> bool {
    rec.manifest.is_none()
        && (rec.state == LayerState::Applied || (rec.kind == LayerKind::ReadOnly && rec.inodes.is_some()))
}

impl Store {
    /// Writes layer `n`'s manifest in the background and records its digest, so that applies and commits do
    /// not wait for a second read of the content. Verification waits for pending manifests; a crash before
    /// the record is written leaves the layer without one, and the next start writes it again.
    pub(crate) fn seal_later(&self, n: u64) {
        if !self.backend.manifests() {
            return;
        }
        self.seals
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n);
        let db = self.db.clone();
        let index = self.index.clone();
        let paths = self.backend.paths(n);
        let seals = self.seals.clone();
        let spawned = std::thread::Builder::new()
            .name("manifest".into())
            .spawn(move || {
                let result = seal(&db, &index, n, &paths);
                // The database handle goes before the layer counts as done: a store dropped (and reopened)
                // after waiting for its seals must find the database closed.
                drop(db);
                if let Err(e) = result {
                    // A layer removed meanwhile is the common case; anything else shows as "no manifest".
                    debug!(layer = n, error = %e, "manifest not recorded");
                }
                seals.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
                seals.done.notify_all();
            });
        if let Err(e) = spawned {
            warn!(layer = n, error = %e, "could not start the manifest writer");
            self.seals
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n);
        }
    }

    /// Waits until no manifest is being written (tests, and `verify --all`).
    pub fn wait_sealed(&self) {
        self.seals.wait(None);
    }

    /// Numbers of the layers that have a manifest to check (frozen layers).
    pub fn verifiable_layers(&self) -> Result<Vec<u64>> {
        self.seals.wait(None);
        Ok(self
            .list()?
            .into_iter()
            .filter(|(_, r)| r.manifest.is_some())
            .map(|(n, _)| n)
            .collect())
    }

    /// Checks layer `n` against its manifest; `progress` receives content bytes as they are read.
    pub fn verify_layer(&self, n: u64, progress: &mut dyn FnMut(u64)) -> Result<VerifyResult> {
        self.seals.wait(Some(n));
        let rec = self
            .record_by_number(n)?
            .ok_or_else(|| StoreError::NotFound(format!("layer number {n:x}")))?;
        let name = format!("{}/{}", rec.ns, rec.name);
        let skipped = |reason: &str| VerifyResult {
            layer: n,
            name: name.clone(),
            status: VerifyStatus::Skipped {
                reason: reason.into(),
            },
        };
        let Some(want) = rec.manifest.clone() else {
            return Ok(match (rec.kind, rec.state) {
                (LayerKind::ReadWrite, _) => skipped("writable layer (not frozen)"),
                (LayerKind::View, _) => skipped("view (no content of its own)"),
                (_, LayerState::Empty) => skipped("no manifest recorded (content not applied by lamina)"),
                _ => skipped("no manifest recorded"),
            });
        };
        let paths = self.backend.paths(n);
        let path = paths.manifest.clone();
        // A small committed layer's manifest is in the database; any other's in its file.
        let kept = self.read()?.manifest(n)?;
        let what = if kept.is_some() {
            "the manifest kept in the metadata database"
        } else {
            "the manifest file"
        };
        let bytes = match kept.map(Ok).unwrap_or_else(|| std::fs::read(&path)) {
            Ok(b) => b,
            Err(e) => {
                return Ok(VerifyResult {
                    layer: n,
                    name,
                    status: VerifyStatus::Mismatch {
                        path: "/".into(),
                        detail: format!("manifest {} unreadable: {e}", path.display()),
                    },
                })
            }
        };
        let got = manifest::digest_of(&bytes);
        if got != want {
            return Ok(VerifyResult {
                layer: n,
                name,
                status: VerifyStatus::Mismatch {
                    path: "/".into(),
                    detail: format!("{what} changed (digest {got}, recorded {want})"),
                },
            });
        }
        let diff = open_dir(&paths.content)?;
        let outcome = manifest::verify_manifest(diff.as_fd(), &mut &bytes[..], progress)?;
        Ok(VerifyResult {
            layer: n,
            name,
            status: outcome,
        })
    }
}

/// What one check of `verify_on_mount` found (see [`crate::OpenOptions::verify_on_mount`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The layer matches its manifest.
    Clean,
    /// Nothing to check (not frozen, or no manifest).
    Skipped,
    /// The layer differs from its manifest: the mount is refused.
    Mismatch,
    /// The check itself failed.
    Error,
}

/// Called after every check of `verify_on_mount` with its outcome, the content bytes read and the time taken
/// (the daemon's metrics).
pub type CheckHook = Arc<dyn Fn(CheckOutcome, u64, Duration) + Send + Sync>;

/// `verify_on_mount`: before the first mount of a stack after a (re)start, each frozen layer in it is checked
/// against its content manifest; a mismatch refuses the mount. Checked layers are remembered until the store
/// is dropped, and so are layers frozen by this store (their content was just written by it), so only the
/// first mount of an old layer pays for a read of its content.
pub(crate) struct MountCheck {
    trusted: Mutex<HashSet<u64>>,
    hook: Option<CheckHook>,
}

impl std::fmt::Debug for MountCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountCheck").finish_non_exhaustive()
    }
}

impl MountCheck {
    pub(crate) fn new(hook: Option<CheckHook>) -> MountCheck {
        MountCheck {
            trusted: Mutex::new(HashSet::new()),
            hook,
        }
    }

    fn is_trusted(&self, n: u64) -> bool {
        self.trusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&n)
    }

    fn trust(&self, n: u64) {
        self.trusted.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
    }

    fn report(&self, outcome: CheckOutcome, bytes: u64, elapsed: Duration) {
        if let Some(hook) = &self.hook {
            hook(outcome, bytes, elapsed);
        }
    }
}

impl Store {
    /// Remembers layer `n` as good for `verify_on_mount` (its content was just written by this store).
    pub(crate) fn trust(&self, n: u64) {
        if let Some(check) = &self.mount_check {
            check.trust(n);
        }
    }

    /// Whether [`Store::check_before_mount`] of `layers` has nothing to read: the option is off, or every one
    /// of them was checked or written by this store.
    pub(crate) fn checked_already(&self, layers: impl IntoIterator<Item = u64>) -> bool {
        match &self.mount_check {
            None => true,
            Some(check) => layers.into_iter().all(|n| check.is_trusted(n)),
        }
    }

    /// `verify_on_mount` for the layers of a stack about to be mounted (nothing when the option is off). A
    /// mismatch gives [`StoreError::CorruptMetadata`] naming the layer and the first differing path.
    pub(crate) fn check_before_mount(&self, layers: impl IntoIterator<Item = u64>) -> Result<()> {
        let Some(check) = &self.mount_check else {
            return Ok(());
        };
        for n in layers {
            if check.is_trusted(n) {
                continue;
            }
            let t0 = Instant::now();
            let mut bytes = 0u64;
            let result = self.verify_layer(n, &mut |b| bytes += b);
            let elapsed = t0.elapsed();
            let r = match result {
                Ok(r) => r,
                Err(e) => {
                    check.report(CheckOutcome::Error, bytes, elapsed);
                    return Err(e);
                }
            };
            match r.status {
                VerifyStatus::Clean { entries, .. } => {
                    check.report(CheckOutcome::Clean, bytes, elapsed);
                    info!(layer = %format!("{n:x}"), name = %r.name, entries, bytes,
                        ms = elapsed.as_millis() as u64, "verified before its first mount");
                    check.trust(n);
                }
                VerifyStatus::Skipped { .. } => {
                    check.report(CheckOutcome::Skipped, bytes, elapsed);
                    check.trust(n);
                }
                VerifyStatus::Mismatch { path, detail } => {
                    check.report(CheckOutcome::Mismatch, bytes, elapsed);
                    error!(layer = %format!("{n:x}"), name = %r.name, path = %path, detail = %detail,
                        "layer content does not match its manifest; mount refused");
                    return Err(StoreError::CorruptMetadata(format!(
                        "verify_on_mount: layer {n:x} ({}) does not match its manifest at {path} ({detail}); \
                         mount refused (`lamina verify {n:x}` shows it)",
                        r.name
                    )));
                }
            }
        }
        Ok(())
    }
}
