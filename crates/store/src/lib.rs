//! The lamina layer store: a synchronous core shared by every front door.
//!
//! Layers are first-class objects named `(namespace, name)`: the Docker GraphDriver uses
//! `docker:<home>` with Docker's ids, a containerd snapshotter uses its own namespace with
//! snapshot keys. Names are never used as paths: every layer gets a small number, and its
//! directory is `layers/<hex number>/` under the data root (see docs/on-disk-format.md).
//!
//! - Create is O(1): one metadata transaction, then four `mkdir`s and one rename, whatever the depth or size.
//! - Content arrives by [`Store::apply`]: the tar is unpacked into `staging/`, flushed with one
//!   `syncfs`, renamed over the layer's empty `diff/`, then recorded. A crash at any point leaves
//!   the layer empty (as created) after [`Store::open`] recovers, never half-filled.
//! - Mounts are reference counted per layer ([`Store::get`] / [`Store::put`]); overlay stacks use
//!   the new mount API (no page-size limit, so 128+ layers mount), see `lamina_sys::mount`. Callers that
//!   mount layers themselves get a [`MountSpec`] ([`Store::prepare`], [`Store::mounts`]).
//! - The rules (parent checks, reference counts, `verify_on_mount`, statistics, what garbage collection may
//!   take) live here, above two seams: the storage of layers (`backend.rs`, overlay directories today) and
//!   mounting (`lamina_sys::mounter::Mounter`, faked in the unit tests). See docs/architecture.md.
//! - Locking is per layer; the metadata database (redb) serialises only its short write
//!   transactions, so applies and diffs of different layers run in parallel.
#![forbid(unsafe_code)]

mod backend;
mod content;
mod custody;
mod db;
mod error;
mod gc;
mod index;
mod lifecycle;
mod meta;
mod mounts;
mod open;
mod overlay;
mod query;
mod quota;
mod rbd;
mod slots;
mod spare;
mod stats;
mod tables;
mod teardown;
mod tier;
mod verify;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lamina_sys::lock::LockFile;
use lamina_sys::mount::MAX_OVERLAY_LOWERS;
use tracing::warn;

pub use content::DiffPlan;
pub use error::{Result, StoreError};
pub use gc::{Garbage, GarbageKind, GcOptions, GcReport, Kept};
pub use lamina_sys::mount::MountSpec;
pub use meta::{LayerKind, LayerRecord, LayerState, LayerStats, FORMAT_VERSION};
pub use mounts::MountGuard;
pub use open::{OpenMode, OpenOptions};
pub use quota::{parse_size, MIN_SIZE, SIZE_LABEL};
pub use rbd::{RbdLayers, SEAL};
pub use stats::{Counter, LayerOverview};
pub use tier::{TierFormat, TierLayer, TierOptions, TierSummary, DEFAULT_USAGE_RETENTION};
pub use verify::{CheckHook, CheckOutcome, VerifyResult, VerifyStatus, MANIFEST_FILE};

use slots::{lock, Lowers, Slot};

/// Most layers below one layer: its mount stacks them all as overlay lower directories.
pub const MAX_DEPTH: u32 = MAX_OVERLAY_LOWERS as u32;

/// A layer as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Internal number (directory name in hex).
    pub number: u64,
    /// The stored record.
    pub record: LayerRecord,
    /// `layers/<n>/diff`: the layer's own content (overlay upper dir).
    pub diff_dir: PathBuf,
    /// `layers/<n>/work`: overlay work dir.
    pub work_dir: PathBuf,
    /// `layers/<n>/merged`: mount point of the merged view.
    pub merged_dir: PathBuf,
    /// Diff dirs of the parent chain, top-most first.
    pub lower_dirs: Vec<PathBuf>,
    /// Current mount reference count.
    pub mounts: u32,
}

/// Store-wide figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// The data root.
    pub root: PathBuf,
    /// Filesystem type holding it.
    pub backing_fs: String,
    /// Number of layers (all namespaces).
    pub layers: u64,
    /// Number of layers currently mounted.
    pub mounted: u64,
    /// On-disk format version.
    pub format: u64,
}

/// A layer to make ([`Store::create`], [`Store::prepare`]): its name in a namespace, the parent it sits on in
/// the same namespace, its kind, labels and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLayer<'a> {
    /// The namespace of the layer and of its parent.
    pub ns: &'a str,
    /// The layer's name in `ns`.
    pub name: &'a str,
    /// The parent's name in `ns`; none for a base layer.
    pub parent: Option<&'a str>,
    /// What the layer is.
    pub kind: LayerKind,
    /// Kept in the layer's record.
    pub labels: BTreeMap<String, String>,
    /// The parent's required kind and the size limit.
    pub options: CreateOptions,
}

impl<'a> NewLayer<'a> {
    /// A base layer `name` in `ns` of `kind`, without labels, with the default options.
    pub fn new(ns: &'a str, name: &'a str, kind: LayerKind) -> Self {
        NewLayer {
            ns,
            name,
            parent: None,
            kind,
            labels: BTreeMap::new(),
            options: CreateOptions::default(),
        }
    }

    /// On `parent` (none: a base layer).
    pub fn with_parent(mut self, parent: Option<&'a str>) -> Self {
        self.parent = parent;
        self
    }

    /// With `labels`.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    /// With `options`.
    pub fn with_options(mut self, options: CreateOptions) -> Self {
        self.options = options;
        self
    }
}

/// Options of a [`NewLayer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// The parent must be of this kind (a snapshotter builds only on committed layers); otherwise
    /// [`StoreError::Precondition`], checked in the creating transaction.
    pub parent_kind: Option<LayerKind>,
    /// Size limit of the layer's own content in bytes (see [`parse_size`]): the layer directory becomes a btrfs
    /// subvolume with a qgroup limit, or an xfs project with a quota; [`StoreError::QuotaUnsupported`] on other
    /// filesystems.
    pub max_size: Option<u64>,
}

/// The layer store. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Store {
    root: PathBuf,
    db: Arc<db::Db>,
    /// The records by name and by parent (`index.rs`).
    index: Arc<index::Index>,
    seals: Arc<verify::Seals>,
    slots: slots::Slots,
    /// The next layer number to give out (shared with the backend, which takes numbers from it for the storage it
    /// makes ahead).
    next_id: Arc<AtomicU64>,
    counters: stats::Counters,
    /// Where layer content lives and how it is mounted.
    backend: Box<dyn backend::LayerBackend>,
    /// `verify_on_mount`, when on.
    mount_check: Option<verify::MountCheck>,
    /// The cluster tier, when the store takes part in one.
    tier: Option<tier::Tier>,
    /// Set once the open passed its custody check: only then may dropping the store write to the database.
    ready: std::sync::atomic::AtomicBool,
    _lock: LockFile,
}

impl Drop for Store {
    fn drop(&mut self) {
        if !self.ready.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Manifest writers hold the database; they finish before the lock is released.
        self.wait_sealed();
        if let Err(e) = self.flush_stats() {
            warn!(error = %e, "could not save usage statistics");
        }
    }
}

/// Registers a path as owned by an operation in flight until dropped.
#[derive(Debug)]
struct InFlight {
    set: Arc<Mutex<HashSet<PathBuf>>>,
    path: PathBuf,
}

impl InFlight {
    fn new(set: &Arc<Mutex<HashSet<PathBuf>>>, path: PathBuf) -> InFlight {
        set.lock().unwrap_or_else(|p| p.into_inner()).insert(path.clone());
        InFlight {
            set: set.clone(),
            path,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.path);
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::io(format!("mkdir {}", path.display()), e)),
    }
}

fn open_dir(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))
}

fn remove_tree(path: &Path) {
    let r = match std::fs::symlink_metadata(path) {
        // A size-limited layer directory on btrfs: the subvolume is destroyed and its qgroup deleted.
        Ok(md) if md.is_dir() && quota::remove_subvolume_if_any(path) => Ok(()),
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(e) = r {
        warn!(path = %path.display(), error = %e, "could not remove");
    }
}

#[cfg(test)]
mod tests;
