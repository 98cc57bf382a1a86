//! The lamina layer store: a synchronous core shared by every front door.
//!
//! Layers are first-class objects named `(namespace, name)`: the Docker GraphDriver uses
//! `docker:<home>` with Docker's ids, a containerd snapshotter uses its own namespace with
//! snapshot keys. Names are never used as paths: every layer gets a small number, and its
//! directory is `layers/<hex number>/` under the data root (see docs/on-disk-format.md).
//!
//! - Create is O(1): one metadata transaction and four `mkdir`s, whatever the depth or size.
//! - Content arrives by [`Store::apply`]: the tar is unpacked into `staging/`, flushed with one
//!   `syncfs`, renamed over the layer's empty `diff/`, then recorded. A crash at any point leaves
//!   the layer empty (as created) after [`Store::open`] recovers, never half-filled.
//! - Mounts are reference counted per layer ([`Store::get`] / [`Store::put`]); overlay stacks use
//!   the new mount API (no page-size limit, so 128+ layers mount), see `lamina_sys::mount`.
//! - Locking is per layer; the metadata database (redb) serialises only its short write
//!   transactions, so applies and diffs of different layers run in parallel.
#![forbid(unsafe_code)]

mod custody;
mod db;
mod error;
mod gc;
mod meta;
mod quota;
mod stats;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use lamina_archive::{ApplyOptions, ApplyStats, Change, DiffOptions, IdMappings};
use lamina_sys::fault;
use lamina_sys::lock::LockFile;
use lamina_sys::mount::{self, OverlaySpec, MAX_OVERLAY_LOWERS};
use redb::{ReadableTable, ReadableTableMetadata};
use tracing::{debug, error, info, warn};

pub use error::{Result, StoreError};
pub use gc::{Garbage, GarbageKind, GcOptions, GcReport, Kept};
pub use meta::{LayerKind, LayerRecord, LayerState, LayerStats, FORMAT_VERSION};
use meta::{CHILDREN, COUNTERS, LAYERS, META, NAMES, PENDING, REMOVED, SETTINGS, STATS};
pub use quota::{parse_size, MIN_SIZE, SIZE_LABEL};
pub use stats::{Counter, LayerOverview};
pub use verify::{VerifyResult, VerifyStatus, MANIFEST_FILE};

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

/// Options of [`Store::create_with`].
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

/// Lower directories of a mount, top-most first, and their layer numbers.
type Lowers = (Arc<Vec<PathBuf>>, Arc<Vec<u64>>);

#[derive(Debug, Default)]
struct Slot {
    mounts: u32,
    /// Lower directories of the layer's mount, top-most first, and their layer numbers. A parent chain
    /// never changes, so it is walked in the database once per layer and process, not at every mount.
    lowers: Option<Lowers>,
    /// Usage counters; `stats_dirty` until [`Store::flush_stats`] wrote them.
    stats: LayerStats,
    stats_dirty: bool,
}

/// How [`Store::open_with`] opens a data root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The daemon: recover from a crash (roll back interrupted applies, remove leftovers, detach stale
    /// mounts, count the mounts of a previous run).
    Serve,
    /// An operator's command while no daemon runs: nothing is changed behind the operator's back (`lamina
    /// gc` shows and removes the leftovers a crash left); metadata is still migrated to the current format.
    Admin,
}

/// The layer store. Cheap to share behind an `Arc`; every method takes `&self`.
/// How [`Store::open_opts`] opens a data root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Serve or admin; see [`OpenMode`].
    pub mode: OpenMode,
    /// Go on when the database is new or belongs to another data root while `layers/` holds directories: those
    /// directories are moved, untouched, to `quarantine/` (without it the open fails and changes nothing).
    pub quarantine_unknown: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            mode: OpenMode::Serve,
            quarantine_unknown: false,
        }
    }
}

pub struct Store {
    root: PathBuf,
    db: Arc<db::Db>,
    seals: Arc<verify::Seals>,
    slots: Mutex<HashMap<u64, Arc<Mutex<Slot>>>>,
    next_id: AtomicU64,
    staging_seq: AtomicU64,
    counters: stats::Counters,
    /// Paths that operations in flight own (layer dirs being created, staging dirs being filled, trash being
    /// deleted): garbage collection leaves them alone.
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
    /// Set once the open passed its custody check: only then may dropping the store write to the database.
    ready: std::sync::atomic::AtomicBool,
    _lock: LockFile,
}

impl Drop for Store {
    fn drop(&mut self) {
        if !self.ready.load(Ordering::SeqCst) {
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

impl Store {
    /// Opens (creating if needed) the store at `root`, takes its lock, and recovers from a crash:
    /// staging leftovers are removed, interrupted applies are rolled back, directories without a
    /// record are deleted, mounts of unknown layers are detached and mounts of known ones are
    /// counted once (a running container may still use them).
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_with(root, OpenMode::Serve)
    }

    /// Opens the store at `root` in `mode`; see [`OpenMode`].
    pub fn open_with(root: &Path, mode: OpenMode) -> Result<Store> {
        Store::open_opts(
            root,
            &OpenOptions {
                mode,
                ..OpenOptions::default()
            },
        )
    }

    /// Opens the store at `root` with [`OpenOptions`].
    pub fn open_opts(root: &Path, opts: &OpenOptions) -> Result<Store> {
        let mode = opts.mode;
        if !root.is_absolute() {
            return Err(StoreError::InvalidArgument(format!(
                "data root {} is not absolute",
                root.display()
            )));
        }
        std::fs::create_dir_all(root).map_err(|e| StoreError::io(format!("create {}", root.display()), e))?;
        // Layer directories hold images' setuid binaries and containers' data: no other user may reach them.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::io(format!("chmod {}", root.display()), e))?;
        let lock = LockFile::acquire(&root.join("lock")).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => StoreError::Locked(e.to_string()),
            _ => StoreError::io(format!("lock {}", root.display()), e),
        })?;
        for d in ["layers", "staging", "trash"] {
            mkdir(&root.join(d), 0o700)?;
        }
        let db_path = root.join("meta.redb");
        let db_existed = db_path.exists();
        let db = db::Db::open(&db_path).map_err(|e| {
            StoreError::CorruptMetadata(format!("{}: {e}; move it away to start empty", db_path.display()))
        })?;
        let store = Store {
            root: root.to_path_buf(),
            db: Arc::new(db),
            seals: Arc::new(verify::Seals::default()),
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            staging_seq: AtomicU64::new(0),
            counters: stats::Counters::default(),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            ready: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        };
        let (fresh, db_id) = store.peek_meta()?;
        let id = match store.check_custody(&db_path, fresh || !db_existed, db_id, opts.quarantine_unknown) {
            Ok(id) => id,
            Err(e) => {
                // Refused: nothing changed, not even a database file where there was none.
                if !db_existed {
                    let _ = std::fs::remove_file(&db_path);
                }
                return Err(e);
            }
        };
        store.ready.store(true, Ordering::SeqCst);
        store.init_meta()?;
        store.record_identity(db_id, id)?;
        store.load_stats()?;
        if mode == OpenMode::Serve {
            store.recover()?;
            // Frozen layers without a manifest: written before format 3, or a crash came before the
            // background writer recorded it.
            for (n, rec) in store.list()? {
                if verify::wants_manifest(&rec) {
                    store.seal_later(n);
                }
            }
        }
        Ok(store)
    }

    fn init_meta(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(error::db_err)?;
            let format = meta.get("format").map_err(error::db_err)?.map(|v| v.value());
            match format {
                None => {
                    meta.insert("format", FORMAT_VERSION).map_err(error::db_err)?;
                }
                Some(v) if v > FORMAT_VERSION => {
                    return Err(StoreError::CorruptMetadata(format!(
                        "metadata format {v} is newer than supported {FORMAT_VERSION}; use a newer lamina"
                    )))
                }
                Some(v) if v < FORMAT_VERSION => {
                    if v == 1 {
                        // Format 1 -> 2: timestamps in nanoseconds, plus an update time.
                        let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
                        let mut rows = Vec::new();
                        for row in layers.iter().map_err(error::db_err)? {
                            let (k, v) = row.map_err(error::db_err)?;
                            rows.push((k.value(), meta::migrate_v1_record(v.value())?));
                        }
                        for (k, v) in &rows {
                            layers.insert(*k, v.as_slice()).map_err(error::db_err)?;
                        }
                    }
                    // Format 2 -> 3: the `stats` and `counters` tables (created below, empty) and the
                    // optional `manifest` field of a record (absent in old records). Every step runs in the
                    // transaction of the version bump, so a crash leaves either format, never a mix.
                    meta.insert("format", FORMAT_VERSION).map_err(error::db_err)?;
                    info!("migrated metadata from format {v} to {FORMAT_VERSION}");
                }
                Some(_) => {}
            }
            let next = meta
                .get("next_id")
                .map_err(error::db_err)?
                .map(|v| v.value())
                .unwrap_or(1);
            self.next_id.store(next.max(1), Ordering::SeqCst);
            // Make every table exist so read transactions can open them.
            txn.open_table(NAMES).map_err(error::db_err)?;
            txn.open_table(LAYERS).map_err(error::db_err)?;
            txn.open_table(CHILDREN).map_err(error::db_err)?;
            txn.open_table(PENDING).map_err(error::db_err)?;
            txn.open_table(SETTINGS).map_err(error::db_err)?;
            txn.open_table(STATS).map_err(error::db_err)?;
            txn.open_table(COUNTERS).map_err(error::db_err)?;
            txn.open_table(REMOVED).map_err(error::db_err)?;
        }
        txn.commit().map_err(error::db_err)
    }

    /// What the database says of itself before anything is written to it: whether it is new (no format
    /// recorded, or no tables at all) and the data root id it records.
    fn peek_meta(&self) -> Result<(bool, Option<u64>)> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((true, None)),
            Err(e) => return Err(error::db_err(e)),
        };
        let fresh = meta.get("format").map_err(error::db_err)?.is_none();
        let id = meta.get("root_id").map_err(error::db_err)?.map(|v| v.value());
        Ok((fresh, id))
    }

    /// Checks, before anything is written, that the database belongs to this data root (see [`custody`]): a new
    /// database beside layer directories, or one with another data root's id, is refused unless
    /// `quarantine_unknown`, which moves every layer directory to `quarantine/` instead. Returns the id to record.
    fn check_custody(
        &self,
        db_path: &Path,
        fresh: bool,
        db_id: Option<u64>,
        quarantine_unknown: bool,
    ) -> Result<u64> {
        let file_id = custody::read_identity(&self.root)?;
        let layers_dir = self.root.join("layers");
        let dirs = custody::entries(&layers_dir)?;
        let foreign = match (db_id, file_id) {
            (Some(d), Some(f)) if d != f => Some((d, f)),
            _ => None,
        };
        if !dirs.is_empty() && (fresh || foreign.is_some()) {
            if !quarantine_unknown {
                let what = match foreign {
                    Some((d, f)) => format!(
                        "the metadata database {} belongs to another data root (id {d:016x}; this one is {f:016x})",
                        db_path.display()
                    ),
                    None => format!(
                        "the metadata database {} is new (it was missing or empty)",
                        db_path.display()
                    ),
                };
                return Err(custody::refusal(&self.root, db_path, &what, dirs.len()));
            }
            // None of them is this database's, whatever their numbers.
            for name in &dirs {
                custody::quarantine(&self.root, &layers_dir.join(name))?;
            }
        }
        // A database without an id (new, or written before ids existed) takes the data root's, or a new one.
        Ok(match (db_id, file_id) {
            (Some(d), _) => d,
            (None, Some(f)) if !fresh => f,
            (None, _) => custody::new_id(),
        })
    }

    /// Records the data root id in the database and in the `identity` file, where either lacks it.
    fn record_identity(&self, db_id: Option<u64>, id: u64) -> Result<()> {
        if db_id != Some(id) {
            let txn = self.db.begin_write().map_err(error::db_err)?;
            txn.open_table(META)
                .map_err(error::db_err)?
                .insert("root_id", id)
                .map_err(error::db_err)?;
            txn.commit().map_err(error::db_err)?;
        }
        if custody::read_identity(&self.root)? != Some(id) {
            custody::write_identity(&self.root, id)?;
        }
        Ok(())
    }

    fn recover(&self) -> Result<()> {
        // 1. Staging and trash leftovers.
        for d in ["staging", "trash"] {
            let dir = self.root.join(d);
            for entry in
                std::fs::read_dir(&dir).map_err(|e| StoreError::io(format!("read {}", dir.display()), e))?
            {
                let entry = entry.map_err(|e| StoreError::io(format!("read {}", dir.display()), e))?;
                info!(path = %entry.path().display(), "removing leftover");
                remove_tree(&entry.path());
            }
        }
        // 2. Interrupted applies: the layer goes back to empty, as created.
        let pending: Vec<u64> = {
            let txn = self.db.begin_read().map_err(error::db_err)?;
            let t = txn.open_table(PENDING).map_err(error::db_err)?;
            let mut v = Vec::new();
            for row in t.iter().map_err(error::db_err)? {
                v.push(row.map_err(error::db_err)?.0.value());
            }
            v
        };
        for n in pending {
            warn!(layer = n, "rolling back an apply interrupted by a crash");
            self.reset_interrupted_apply(n)?;
        }
        // 3. Directories without a record.
        let known: std::collections::HashSet<u64> = {
            let txn = self.db.begin_read().map_err(error::db_err)?;
            let t = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut s = std::collections::HashSet::new();
            for row in t.iter().map_err(error::db_err)? {
                s.insert(row.map_err(error::db_err)?.0.value());
            }
            s
        };
        let removed: std::collections::HashSet<u64> = {
            let txn = self.db.begin_read().map_err(error::db_err)?;
            let t = txn.open_table(REMOVED).map_err(error::db_err)?;
            let mut s = std::collections::HashSet::new();
            for row in t.iter().map_err(error::db_err)? {
                s.insert(row.map_err(error::db_err)?.0.value());
            }
            s
        };
        // Mounts first: nothing may be deleted through a live mount.
        let layers_dir = self.root.join("layers");
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for mp in mount::mounts_under(&self.root).map_err(|e| StoreError::io("read mount table", e))? {
            // Only the store's own directories are its business: the data root may be the mount point of its own
            // filesystem (a btrfs or xfs for size limits), and `volumes/` holds the volume service's mounts (a
            // MooseFS cluster mount that must survive a restart of lamina).
            let own = ["layers", "staging", "trash"]
                .iter()
                .any(|d| mp.starts_with(self.root.join(d)));
            if !own {
                continue;
            }
            match parse_merged(&layers_dir, &mp) {
                Some(n) if known.contains(&n) => {
                    info!(layer = n, "keeping mount of a previous run");
                    slots
                        .entry(n)
                        .or_default()
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .mounts = 1;
                }
                _ => {
                    warn!(mount = %mp.display(), "detaching stale mount");
                    mount::unmount(&mp, true).map_err(|e| StoreError::io("unmount stale mount", e))?;
                }
            }
        }
        drop(slots);
        // One read of `layers/`, no per-layer stat: start-up stays well under a second with 10,000 layers on a
        // cold cache (a stat of every `layers/<n>/diff` took 1.2 s there).
        let mut present = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&layers_dir).map_err(|e| StoreError::io("read layers dir", e))? {
            let entry = entry.map_err(|e| StoreError::io("read layers dir", e))?;
            let name = entry.file_name();
            let n = name.to_str().and_then(|s| u64::from_str_radix(s, 16).ok());
            match n {
                Some(n) if known.contains(&n) && name.to_str() == Some(format!("{n:x}").as_str()) => {
                    present.insert(n);
                }
                Some(n) if removed.contains(&n) && name.to_str() == Some(format!("{n:x}").as_str()) => {
                    // Its removal was committed before a crash came: it is this store's to delete.
                    info!(dir = %entry.path().display(), "removing the directory of a removed layer");
                    remove_tree(&entry.path());
                }
                _ => {
                    // Unknown to this database (an older copy of it, or not lamina's): kept, out of the way.
                    custody::quarantine(&self.root, &entry.path())?;
                }
            }
        }
        if !removed.is_empty() {
            // The deletions must be on disk before their proof goes.
            mount::syncfs(&layers_dir).map_err(|e| StoreError::io("sync layers", e))?;
            let txn = self.db.begin_write().map_err(error::db_err)?;
            {
                let mut t = txn.open_table(REMOVED).map_err(error::db_err)?;
                for n in &removed {
                    if !self.layer_dir(*n).exists() {
                        t.remove(*n).map_err(error::db_err)?;
                    }
                }
            }
            txn.commit().map_err(error::db_err)?;
        }
        for n in known.iter().filter(|n| !present.contains(n)) {
            let rec = self.record_by_number(*n)?;
            if rec.as_ref().is_some_and(|r| r.state != LayerState::Empty) {
                error!(
                    layer = n,
                    "the directory of a layer with content is missing; recreating it empty"
                );
            } else {
                // A create's directories not yet on disk when the power went (they are made after its record).
                info!(layer = n, "layer directory missing; recreating it empty");
            }
            self.make_layer_dirs(*n, rec.and_then(|r| r.max_size))?;
        }
        info!(root = %self.root.display(), layers = known.len(), "store opened");
        Ok(())
    }

    /// The data root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layer_dir(&self, n: u64) -> PathBuf {
        self.root.join("layers").join(format!("{n:x}"))
    }

    fn trash_path(&self, n: u64) -> PathBuf {
        let seq = self.staging_seq.fetch_add(1, Ordering::SeqCst);
        self.root
            .join("trash")
            .join(format!("{n:x}-{seq}-{}", std::process::id()))
    }

    /// Makes `layers/<n>/{diff,work,merged}`; with `max_size`, `layers/<n>` itself carries the size limit.
    ///
    /// Without a limit the three directories are made in `staging/` and renamed into `layers/` in one step, so
    /// that a power cut leaves either the whole layer directory or none (a staging leftover, removed at start).
    fn make_layer_dirs(&self, n: u64, max_size: Option<u64>) -> Result<()> {
        let dir = self.layer_dir(n);
        match max_size {
            Some(size) => quota::create_limited_dir(&self.root.join("layers"), &format!("{n:x}"), n, size)?,
            None => {
                let seq = self.staging_seq.fetch_add(1, Ordering::SeqCst);
                let staged = self.root.join("staging").join(format!("new-{n:x}-{seq}"));
                let _owned = InFlight::new(&self.in_flight, staged.clone());
                let made = (|| {
                    mkdir(&staged, 0o700)?;
                    mkdir(&staged.join("diff"), 0o755)?;
                    mkdir(&staged.join("work"), 0o700)?;
                    mkdir(&staged.join("merged"), 0o755)?;
                    std::fs::rename(&staged, &dir).map_err(|e| {
                        StoreError::io(format!("move new layer directory to {}", dir.display()), e)
                    })
                })();
                if made.is_err() {
                    remove_tree(&staged);
                }
                return made;
            }
        }
        mkdir(&dir.join("diff"), 0o755)?;
        mkdir(&dir.join("work"), 0o700)?;
        mkdir(&dir.join("merged"), 0o755)?;
        Ok(())
    }

    fn slot(&self, n: u64) -> Arc<Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(n).or_default().clone()
    }

    fn lookup(&self, ns: &str, name: &str) -> Result<Option<(u64, LayerRecord)>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let Some(n) = names.get((ns, name)).map_err(error::db_err)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let rec = layers.get(n).map_err(error::db_err)?.ok_or_else(|| {
            StoreError::CorruptMetadata(format!("name {name:?} points at missing layer {n}"))
        })?;
        Ok(Some((n, LayerRecord::decode(rec.value())?)))
    }

    /// Puts a layer whose apply was interrupted back to empty, as created (its `diff/` replaced by an
    /// empty directory, no manifest, state `Empty`), and drops its `pending` row. Used by the start-up
    /// recovery and by `gc`.
    pub(crate) fn reset_interrupted_apply(&self, n: u64) -> Result<()> {
        if let Some(rec) = self.record_by_number(n)? {
            // After a power cut the layer's own directory may be gone too (made after its record, never synced).
            if !self.layer_dir(n).exists() {
                self.make_layer_dirs(n, rec.max_size)?;
            }
            let diff = self.layer_dir(n).join("diff");
            if diff.exists() {
                let trash = self.trash_path(n);
                std::fs::rename(&diff, &trash)
                    .map_err(|e| StoreError::io(format!("move {}", diff.display()), e))?;
                remove_tree(&trash);
            }
            let _ = std::fs::remove_file(self.layer_dir(n).join(MANIFEST_FILE));
            mkdir(&diff, 0o755)?;
            for d in ["work", "merged"] {
                mkdir(
                    &self.layer_dir(n).join(d),
                    if d == "work" { 0o700 } else { 0o755 },
                )?;
            }
            self.update_record(n, |r| {
                r.state = LayerState::Empty;
                r.size = None;
                r.digest = None;
                r.manifest = None;
            })?;
        }
        let txn = self.db.begin_write().map_err(error::db_err)?;
        txn.open_table(PENDING)
            .map_err(error::db_err)?
            .remove(n)
            .map_err(error::db_err)?;
        txn.commit().map_err(error::db_err)
    }

    fn update_record(&self, n: u64, f: impl FnOnce(&mut LayerRecord)) -> Result<LayerRecord> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        let rec = {
            let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut rec = {
                let v = layers.get(n).map_err(error::db_err)?;
                let v = v.ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {n}")))?;
                LayerRecord::decode(v.value())?
            };
            f(&mut rec);
            layers.insert(n, rec.encode().as_slice()).map_err(error::db_err)?;
            rec
        };
        txn.commit().map_err(error::db_err)?;
        Ok(rec)
    }

    fn require(&self, ns: &str, name: &str) -> Result<(u64, LayerRecord)> {
        self.lookup(ns, name)?
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))
    }

    /// Layer numbers of the parent chain of `rec`, nearest first.
    fn chain(&self, rec: &LayerRecord) -> Result<Vec<u64>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut out = Vec::with_capacity(rec.depth as usize);
        let mut next = rec.parent;
        while let Some(p) = next {
            if out.len() > MAX_OVERLAY_LOWERS {
                return Err(StoreError::CorruptMetadata(format!(
                    "parent chain of {} loops",
                    rec.name
                )));
            }
            out.push(p);
            let v = layers
                .get(p)
                .map_err(error::db_err)?
                .ok_or_else(|| StoreError::CorruptMetadata(format!("missing parent layer {p}")))?;
            next = LayerRecord::decode(v.value())?.parent;
        }
        Ok(out)
    }

    fn has_children(&self, n: u64) -> Result<bool> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let children = txn.open_table(CHILDREN).map_err(error::db_err)?;
        let mut range = children.range((n, 0)..=(n, u64::MAX)).map_err(error::db_err)?;
        Ok(range.next().is_some())
    }

    /// Creates an empty layer `name` in `ns` on top of `parent` (same namespace).
    pub fn create(
        &self,
        ns: &str,
        name: &str,
        parent: Option<&str>,
        kind: LayerKind,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.create_checked(ns, name, parent, kind, labels, None)
    }

    /// Like [`Store::create`], but the parent must be of kind `parent_kind` (a snapshotter builds only on
    /// committed layers); otherwise [`StoreError::Precondition`]. Checked in the creating transaction.
    pub fn create_checked(
        &self,
        ns: &str,
        name: &str,
        parent: Option<&str>,
        kind: LayerKind,
        labels: BTreeMap<String, String>,
        parent_kind: Option<LayerKind>,
    ) -> Result<()> {
        let opts = CreateOptions {
            parent_kind,
            ..CreateOptions::default()
        };
        self.create_with(ns, name, parent, kind, labels, &opts)
    }

    /// Creates an empty layer with [`CreateOptions`] (parent kind check, size limit).
    pub fn create_with(
        &self,
        ns: &str,
        name: &str,
        parent: Option<&str>,
        kind: LayerKind,
        labels: BTreeMap<String, String>,
        opts: &CreateOptions,
    ) -> Result<()> {
        let parent_kind = opts.parent_kind;
        if let Some(size) = opts.max_size {
            if size < MIN_SIZE {
                return Err(StoreError::InvalidArgument(format!(
                    "size limit {size} is below the smallest, {MIN_SIZE} bytes"
                )));
            }
        }
        if parent == Some(name) {
            return Err(StoreError::InvalidArgument(format!(
                "layer {name} cannot be its own parent"
            )));
        }
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let _owned = InFlight::new(&self.in_flight, self.layer_dir(n));
        // Nobody may mount it between its record and its directories.
        let slot = self.slot(n);
        let _guard = lock(&slot);
        // The record first, the directories after it: a crash between the two leaves a record without
        // directories, which the next start makes (an empty layer has nothing to lose); never a directory without
        // a record, which the store could not tell from data it does not know.
        let mut created_parent = None;
        let result = (|| {
            let txn = self.db.begin_write().map_err(error::db_err)?;
            {
                let mut names = txn.open_table(NAMES).map_err(error::db_err)?;
                if names.get((ns, name)).map_err(error::db_err)?.is_some() {
                    return Err(StoreError::AlreadyExists(format!("layer {name}")));
                }
                let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
                let (parent_n, depth) = match parent {
                    None => (None, 0),
                    Some(p) => {
                        let pn = names
                            .get((ns, p))
                            .map_err(error::db_err)?
                            .map(|v| v.value())
                            .ok_or_else(|| StoreError::NotFound(format!("parent {p}")))?;
                        let prec = {
                            let v = layers.get(pn).map_err(error::db_err)?;
                            let v =
                                v.ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {pn}")))?;
                            LayerRecord::decode(v.value())?
                        };
                        if let Some(want) = parent_kind {
                            if prec.kind != want {
                                return Err(StoreError::Precondition(format!(
                                    "parent {p} is {:?}, not {want:?}",
                                    prec.kind
                                )));
                            }
                        }
                        if prec.depth + 1 > MAX_DEPTH {
                            return Err(StoreError::LimitExceeded(format!(
                                "layer {name} would sit on {} layers; overlay stacks at most {MAX_OVERLAY_LOWERS}",
                                prec.depth + 1
                            )));
                        }
                        (Some(pn), prec.depth + 1)
                    }
                };
                created_parent = parent_n;
                let now = now_ns();
                let rec = LayerRecord {
                    ns: ns.to_string(),
                    name: name.to_string(),
                    parent: parent_n,
                    depth,
                    kind,
                    state: LayerState::Empty,
                    size: None,
                    digest: None,
                    created_ns: now,
                    updated_ns: now,
                    inodes: None,
                    labels,
                    manifest: None,
                    max_size: opts.max_size,
                };
                names.insert((ns, name), n).map_err(error::db_err)?;
                layers.insert(n, rec.encode().as_slice()).map_err(error::db_err)?;
                if let Some(pn) = parent_n {
                    txn.open_table(CHILDREN)
                        .map_err(error::db_err)?
                        .insert((pn, n), ())
                        .map_err(error::db_err)?;
                }
                let mut meta = txn.open_table(META).map_err(error::db_err)?;
                let stored = meta
                    .get("next_id")
                    .map_err(error::db_err)?
                    .map(|v| v.value())
                    .unwrap_or(1);
                meta.insert("next_id", stored.max(n + 1)).map_err(error::db_err)?;
            }
            fault::point("store.create.commit").map_err(|e| StoreError::io("commit metadata", e))?;
            txn.commit().map_err(error::db_err)
        })();
        if let Err(e) = result {
            drop(_guard);
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
            return Err(e);
        }
        let made = fault::point("store.create.mkdir")
            .map_err(|e| StoreError::io("create layer directories", e))
            .and_then(|()| self.make_layer_dirs(n, opts.max_size));
        if let Err(e) = made {
            // Nothing half-made stays behind (a subvolume with its qgroup included), the record goes again.
            remove_tree(&self.layer_dir(n));
            if let Err(e2) = self.forget_created(ns, name, n, created_parent) {
                warn!(ns, name, layer = n, error = %e2, "could not drop the record of a failed create; the next start makes its directories");
            }
            drop(_guard);
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
            return Err(e);
        }
        // After the work: only `kill`/`sleep` make sense here, an error action is ignored.
        let _ = fault::point("store.create.done");
        debug!(ns, name, layer = n, "created layer");
        Ok(())
    }

    /// Drops the record of a create whose directories could not be made.
    fn forget_created(&self, ns: &str, name: &str, n: u64, parent: Option<u64>) -> Result<()> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        txn.open_table(NAMES)
            .map_err(error::db_err)?
            .remove((ns, name))
            .map_err(error::db_err)?;
        txn.open_table(LAYERS)
            .map_err(error::db_err)?
            .remove(n)
            .map_err(error::db_err)?;
        if let Some(p) = parent {
            txn.open_table(CHILDREN)
                .map_err(error::db_err)?
                .remove((p, n))
                .map_err(error::db_err)?;
        }
        txn.commit().map_err(error::db_err)
    }

    /// Whether `name` exists in `ns`.
    pub fn exists(&self, ns: &str, name: &str) -> Result<bool> {
        Ok(self.lookup(ns, name)?.is_some())
    }

    /// Everything known about a layer.
    pub fn info(&self, ns: &str, name: &str) -> Result<LayerInfo> {
        let (n, record) = self.require(ns, name)?;
        let chain = self.chain(&record)?;
        let dir = self.layer_dir(n);
        let mounts = self.slot(n).lock().unwrap_or_else(|p| p.into_inner()).mounts;
        Ok(LayerInfo {
            number: n,
            lower_dirs: chain.iter().map(|p| self.layer_dir(*p).join("diff")).collect(),
            diff_dir: dir.join("diff"),
            work_dir: dir.join("work"),
            merged_dir: dir.join("merged"),
            record,
            mounts,
        })
    }

    /// Removes a layer: unmounts it if mounted (as overlay2 does), refuses if it has children.
    /// Removing an unknown layer succeeds (dockerd retries removals); the result tells whether it existed.
    pub fn remove(&self, ns: &str, name: &str) -> Result<bool> {
        let Some((n, _)) = self.lookup(ns, name)? else {
            return Ok(false);
        };
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        // Re-check under the layer lock.
        let Some((n2, rec)) = self.lookup(ns, name)? else {
            return Ok(false);
        };
        if n2 != n {
            return Err(StoreError::InUse(format!(
                "layer {name} was replaced concurrently"
            )));
        }
        if self.has_children(n)? {
            return Err(StoreError::InUse(format!("layer {name} has child layers")));
        }
        let dir = self.layer_dir(n);
        if guard.mounts > 0 || mount::is_mount_point(&dir.join("merged")).unwrap_or(false) {
            fault::point("store.remove.unmount")
                .and_then(|()| mount::unmount(&dir.join("merged"), false))
                .map_err(|e| {
                    StoreError::InUse(format!("layer {name} is mounted and cannot be unmounted: {e}"))
                })?;
            guard.mounts = 0;
        }
        let txn = self.db.begin_write().map_err(error::db_err)?;
        {
            // A child may have been created since the check above.
            let children = txn.open_table(CHILDREN).map_err(error::db_err)?;
            if children
                .range((n, 0)..=(n, u64::MAX))
                .map_err(error::db_err)?
                .next()
                .is_some()
            {
                return Err(StoreError::InUse(format!("layer {name} has child layers")));
            }
        }
        {
            txn.open_table(NAMES)
                .map_err(error::db_err)?
                .remove((ns, name))
                .map_err(error::db_err)?;
            txn.open_table(LAYERS)
                .map_err(error::db_err)?
                .remove(n)
                .map_err(error::db_err)?;
            txn.open_table(PENDING)
                .map_err(error::db_err)?
                .remove(n)
                .map_err(error::db_err)?;
            if let Some(p) = rec.parent {
                txn.open_table(CHILDREN)
                    .map_err(error::db_err)?
                    .remove((p, n))
                    .map_err(error::db_err)?;
            }
            txn.open_table(STATS)
                .map_err(error::db_err)?
                .remove(n)
                .map_err(error::db_err)?;
            // The proof, should a crash leave the directory behind, that it is ours to delete.
            txn.open_table(REMOVED)
                .map_err(error::db_err)?
                .insert(n, now_ns())
                .map_err(error::db_err)?;
        }
        fault::point("store.remove.commit").map_err(|e| StoreError::io("commit metadata", e))?;
        txn.commit().map_err(error::db_err)?;
        // Out of view at once; the content goes in the background.
        let trash = self.trash_path(n);
        let owned = InFlight::new(&self.in_flight, trash.clone());
        let limited = rec.max_size.is_some().then(|| self.root.clone());
        match fault::point("store.remove.rename").and_then(|()| std::fs::rename(&dir, &trash)) {
            Ok(()) => {
                std::thread::spawn(move || {
                    // A size-limited layer's subvolume and qgroup go with the tree (see `remove_tree`).
                    remove_tree(&trash);
                    if let Some(root) = limited {
                        quota::release_project(&root, n);
                    }
                    drop(owned);
                });
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "could not move removed layer to trash; removing in place")
            }
        }
        if dir.exists() {
            remove_tree(&dir);
            if rec.max_size.is_some() {
                quota::release_project(&self.root, n);
            }
        }
        drop(guard);
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
        let _ = fault::point("store.remove.done");
        debug!(ns, name, layer = n, "removed layer");
        Ok(true)
    }

    /// Mounts the merged view of a layer (reference counted) and returns its path, the same
    /// path every time. A layer without parent is its own merged view (no mount needed).
    pub fn get(&self, ns: &str, name: &str, mount_label: &str) -> Result<PathBuf> {
        let (n, _) = self.require(ns, name)?;
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        let (n2, rec) = self.require(ns, name)?;
        if n2 != n {
            return Err(StoreError::NotFound(format!("layer {name}")));
        }
        if rec.state == LayerState::Applying {
            return Err(StoreError::InUse(format!("layer {name} is being filled")));
        }
        let dir = self.layer_dir(n);
        let path = if rec.parent.is_none() {
            dir.join("diff")
        } else {
            dir.join("merged")
        };
        let mut brought_up = None;
        // A count of zero means not mounted: `open` counted the mounts a previous run left.
        if guard.mounts == 0 && rec.parent.is_some() {
            let (lowers, numbers) = match &guard.lowers {
                Some(l) => l.clone(),
                None => {
                    let chain = self.chain(&rec)?;
                    let l = Arc::new(
                        chain
                            .iter()
                            .map(|p| self.layer_dir(*p).join("diff"))
                            .collect::<Vec<_>>(),
                    );
                    let pair = (l, Arc::new(chain));
                    guard.lowers = Some(pair.clone());
                    pair
                }
            };
            brought_up = Some(numbers);
            let view = rec.kind == LayerKind::View;
            let spec = OverlaySpec {
                lowers: lowers.to_vec(),
                upper: (!view).then(|| dir.join("diff")),
                work: (!view).then(|| dir.join("work")),
                label: Some(mount_label.to_string()),
                read_only: view,
            };
            fault::point("store.get.mount")
                .and_then(|()| mount::mount_overlay(&path, &spec))
                .map_err(|e| {
                    StoreError::io(format!("mount layer {name} ({} layers)", lowers.len() + 1), e)
                })?;
        }
        if brought_up.is_some() {
            let _ = fault::point("store.get.mounted");
        }
        let now = now_ns();
        let first = guard.mounts == 0;
        guard.mounts += 1;
        guard.stats.gets += 1;
        guard.stats.last_used_ns = now;
        if first {
            guard.stats.uses += 1;
        }
        guard.stats_dirty = true;
        debug!(ns, name, layer = n, mounts = guard.mounts, "get");
        drop(guard);
        self.counters.add(Counter::Gets, 1);
        self.counters
            .add(if first { Counter::Mounts } else { Counter::Hits }, 1);
        if let Some(lowers) = brought_up {
            // After the layer's own lock is released: locks are never nested.
            self.note_uses(&lowers, now);
        }
        Ok(path)
    }

    /// Releases one [`Store::get`]; unmounts when the count reaches zero. Extra puts are harmless.
    pub fn put(&self, ns: &str, name: &str) -> Result<()> {
        let (n, rec) = self.require(ns, name)?;
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        self.counters.add(Counter::Puts, 1);
        if guard.mounts > 1 {
            guard.mounts -= 1;
            return Ok(());
        }
        guard.mounts = 0;
        if rec.parent.is_some() {
            // Detached like overlay2 does: a straggler (a shell cd'ed into it) must not fail the Put.
            let merged = self.layer_dir(n).join("merged");
            fault::point("store.put.unmount")
                .and_then(|()| mount::unmount(&merged, true))
                .map_err(|e| StoreError::io(format!("unmount layer {name}"), e))?;
        }
        debug!(ns, name, layer = n, "put");
        Ok(())
    }

    /// Unpacks an uncompressed tar into an empty layer. The layer becomes visible with its content
    /// only once the whole stream was applied and synced; on error it stays empty.
    pub fn apply(
        &self,
        ns: &str,
        name: &str,
        input: &mut dyn Read,
        mappings: &IdMappings,
    ) -> Result<ApplyStats> {
        let (n, _) = self.require(ns, name)?;
        let slot = self.slot(n);
        let guard = lock(&slot);
        let (n2, rec) = self.require(ns, name)?;
        if n2 != n {
            return Err(StoreError::NotFound(format!("layer {name}")));
        }
        if guard.mounts > 0 {
            return Err(StoreError::InUse(format!("layer {name} is mounted")));
        }
        if rec.state != LayerState::Empty {
            return Err(StoreError::AlreadyExists(format!(
                "layer {name} already has content"
            )));
        }
        if rec.max_size.is_some() {
            // The staged tree cannot be renamed into another btrfs subvolume or xfs project.
            return Err(StoreError::Precondition(format!(
                "layer {name} has a size limit; its content is written through its mount, not applied"
            )));
        }
        let seq = self.staging_seq.fetch_add(1, Ordering::SeqCst);
        let staging_name = format!("{n:x}-{seq}");
        let staging = self.root.join("staging").join(&staging_name);
        let _owned = InFlight::new(&self.in_flight, staging.clone());
        {
            let txn = self.db.begin_write().map_err(error::db_err)?;
            txn.open_table(PENDING)
                .map_err(error::db_err)?
                .insert(n, staging_name.as_str())
                .map_err(error::db_err)?;
            let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut r = rec.clone();
            r.state = LayerState::Applying;
            layers.insert(n, r.encode().as_slice()).map_err(error::db_err)?;
            drop(layers);
            fault::point("store.apply.begin.commit").map_err(|e| StoreError::io("commit metadata", e))?;
            txn.commit().map_err(error::db_err)?;
        }
        let finish = |stats: &ApplyStats| -> Result<()> {
            let txn = self.db.begin_write().map_err(error::db_err)?;
            txn.open_table(PENDING)
                .map_err(error::db_err)?
                .remove(n)
                .map_err(error::db_err)?;
            let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut r = rec.clone();
            r.state = LayerState::Applied;
            r.size = Some(stats.size);
            r.digest = Some(stats.digest.clone());
            r.manifest = None;
            layers.insert(n, r.encode().as_slice()).map_err(error::db_err)?;
            drop(layers);
            fault::point("store.apply.finish.commit").map_err(|e| StoreError::io("commit metadata", e))?;
            txn.commit().map_err(error::db_err)
        };
        let result = self
            .apply_staged(n, &staging, input, mappings)
            .and_then(|stats| finish(&stats).map(|()| stats));
        match result {
            Ok(stats) => {
                drop(guard);
                let _ = fault::point("store.apply.done");
                // The content manifest is written in the background: ApplyDiff does not wait for a second
                // read of the layer (it took ApplyDiff from 1.35 s to 2.2 s for 215 MB / 44k files).
                self.seal_later(n);
                self.counters.add(Counter::Applies, 1);
                self.counters.add(Counter::ApplyBytes, stats.tar_bytes);
                debug!(ns, name, layer = n, size = stats.size, digest = %stats.digest, "applied");
                Ok(stats)
            }
            Err(e) => {
                remove_tree(&staging);
                // A failure after the rename (the second sync, the final commit) leaves the content in diff/:
                // the layer goes back to empty as created (diff/ replaced, record Empty, pending row dropped),
                // so nothing half applied is visible and a retry applies again. If that fails too (read-only
                // or failing disk), the record stays Applying and the next start does it.
                let diff = self.layer_dir(n).join("diff");
                let filled = std::fs::read_dir(&diff).is_ok_and(|mut d| d.next().is_some());
                let reset = if filled {
                    self.reset_interrupted_apply(n)
                } else {
                    let _ = std::fs::remove_file(self.layer_dir(n).join(MANIFEST_FILE));
                    (|| {
                        let txn = self.db.begin_write().map_err(error::db_err)?;
                        txn.open_table(PENDING)
                            .map_err(error::db_err)?
                            .remove(n)
                            .map_err(error::db_err)?;
                        txn.open_table(LAYERS)
                            .map_err(error::db_err)?
                            .insert(n, rec.encode().as_slice())
                            .map_err(error::db_err)?;
                        fault::point("store.apply.rollback.commit")
                            .map_err(|e| StoreError::io("commit metadata", e))?;
                        txn.commit().map_err(error::db_err)
                    })()
                };
                if let Err(e2) = reset {
                    warn!(ns, name, layer = n, error = %e2, "could not reset the failed apply; the next start will");
                }
                Err(e)
            }
        }
    }

    fn apply_staged(
        &self,
        n: u64,
        staging: &Path,
        input: &mut dyn Read,
        mappings: &IdMappings,
    ) -> Result<ApplyStats> {
        fault::point("store.apply.stage").map_err(|e| StoreError::io("create staging directory", e))?;
        mkdir(staging, 0o755)?;
        let dirfd = open_dir(staging)?;
        let opts = ApplyOptions {
            id_mappings: mappings.clone(),
        };
        let stats = lamina_archive::apply_layer(dirfd.as_fd(), input, &opts)?;
        // The root of the layer keeps the mode of an empty diff dir unless the tar set it.
        fault::point("store.apply.syncfs")
            .and_then(|()| mount::syncfs(staging))
            .map_err(|e| StoreError::io("sync staged layer", e))?;
        let diff = self.layer_dir(n).join("diff");
        fault::point("store.apply.rename")
            .and_then(|()| std::fs::rename(staging, &diff))
            .map_err(|e| StoreError::io(format!("move staged layer into {}", diff.display()), e))?;
        fault::point("store.apply.syncfs2")
            .and_then(|()| mount::syncfs(&diff))
            .map_err(|e| StoreError::io("sync layer", e))?;
        Ok(stats)
    }

    fn is_direct_parent(&self, rec: &LayerRecord, ns: &str, parent: &str) -> Result<bool> {
        match (rec.parent, parent.is_empty()) {
            (None, true) => Ok(true),
            (None, false) | (Some(_), true) => Ok(false),
            (Some(p), false) => Ok(self.lookup(ns, parent)?.map(|(pn, _)| pn) == Some(p)),
        }
    }

    /// Prepares a tar of `name` relative to `parent` (`""` = the whole tree). Errors about the
    /// request come back here; the returned plan then streams with [`DiffPlan::write_to`].
    pub fn diff(&self, ns: &str, name: &str, parent: &str, mappings: &IdMappings) -> Result<DiffPlan<'_>> {
        let (_, rec) = self.require(ns, name)?;
        self.counters.add(Counter::Diffs, 1);
        let opts = DiffOptions {
            id_mappings: mappings.clone(),
        };
        if self.is_direct_parent(&rec, ns, parent)? {
            let info = self.info(ns, name)?;
            return Ok(DiffPlan {
                kind: PlanKind::Native(info.diff_dir),
                opts,
            });
        }
        let (new, old) = self.tree_views(ns, name, parent)?;
        Ok(DiffPlan {
            kind: PlanKind::Trees { new, old },
            opts,
        })
    }

    /// Changes of `name` relative to `parent`.
    pub fn changes(&self, ns: &str, name: &str, parent: &str) -> Result<Vec<Change>> {
        let info = self.info(ns, name)?;
        if self.is_direct_parent(&info.record, ns, parent)? {
            let upper = open_dir(&info.diff_dir)?;
            let lowers: Vec<File> = info
                .lower_dirs
                .iter()
                .map(|p| open_dir(p))
                .collect::<Result<_>>()?;
            let lower_fds: Vec<_> = lowers.iter().map(|f| f.as_fd()).collect();
            return Ok(lamina_archive::layer_changes(upper.as_fd(), &lower_fds)?);
        }
        let (new, old) = self.tree_views(ns, name, parent)?;
        tree_changes(&new, old.as_ref())
    }

    /// Mounted merged views of `name` and of `parent` (`""` = none), for naive comparisons
    /// against a layer that is not the direct parent.
    fn tree_views(
        &self,
        ns: &str,
        name: &str,
        parent: &str,
    ) -> Result<(MountGuard<'_>, Option<MountGuard<'_>>)> {
        let old = if parent.is_empty() {
            None
        } else {
            Some(MountGuard::new(self, ns, parent)?)
        };
        Ok((MountGuard::new(self, ns, name)?, old))
    }

    /// Size of `name`'s changes relative to `parent`, in bytes.
    pub fn diff_size(&self, ns: &str, name: &str, parent: &str) -> Result<u64> {
        let info = self.info(ns, name)?;
        if self.is_direct_parent(&info.record, ns, parent)? {
            let dir = open_dir(&info.diff_dir)?;
            return Ok(lamina_archive::dir_size(dir.as_fd())?);
        }
        let (new, old) = self.tree_views(ns, name, parent)?;
        let changes = tree_changes(&new, old.as_ref())?;
        let mut total = 0u64;
        for c in changes
            .iter()
            .filter(|c| c.kind != lamina_archive::ChangeKind::Delete)
        {
            let rel = Path::new(std::ffi::OsStr::from_bytes(
                c.path.strip_prefix(b"/").unwrap_or(&c.path),
            ));
            if let Ok(md) = std::fs::symlink_metadata(new.path.join(rel)) {
                if md.is_file() {
                    total += md.len();
                }
            }
        }
        Ok(total)
    }

    /// Unmounts every layer this store mounted (engine shutdown).
    pub fn unmount_all(&self) -> Result<()> {
        let slots: Vec<(u64, Arc<Mutex<Slot>>)> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (n, slot) in slots {
            let mut guard = lock(&slot);
            if guard.mounts > 0 {
                let merged = self.layer_dir(n).join("merged");
                if let Err(e) = mount::unmount(&merged, false) {
                    warn!(layer = n, error = %e, "unmount failed, detaching");
                    mount::unmount(&merged, true).map_err(|e| StoreError::io("detach mount", e))?;
                }
                guard.mounts = 0;
            }
        }
        Ok(())
    }

    /// Store-wide figures.
    pub fn status(&self) -> Result<StoreStatus> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let layers = txn
            .open_table(LAYERS)
            .map_err(error::db_err)?
            .len()
            .map_err(error::db_err)?;
        let mounted = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| lock(s).mounts > 0)
            .count() as u64;
        Ok(StoreStatus {
            root: self.root.clone(),
            backing_fs: mount::filesystem_type(&self.root).unwrap_or_else(|_| "unknown".into()),
            layers,
            mounted,
            format: FORMAT_VERSION,
        })
    }

    /// Number of layers in one namespace.
    pub fn count(&self, ns: &str) -> Result<u64> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let mut count = 0;
        for row in names.range((ns, "")..).map_err(error::db_err)? {
            let row = row.map_err(error::db_err)?;
            if row.0.value().0 != ns {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// All layers of all namespaces, by number.
    pub fn list(&self) -> Result<Vec<(u64, LayerRecord)>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(error::db_err)? {
            let (k, v) = row.map_err(error::db_err)?;
            out.push((k.value(), LayerRecord::decode(v.value())?));
        }
        Ok(out)
    }

    /// Freezes the writable layer `key` under the new name `name` (same number, same directory, no copy):
    /// its kind becomes [`LayerKind::ReadOnly`], its labels are replaced by `labels`, its creation time is now, and its disk usage is
    /// recorded. `key` disappears. A view or an already frozen layer gives [`StoreError::Precondition`], an
    /// existing `name` [`StoreError::AlreadyExists`], a mounted layer [`StoreError::InUse`].
    pub fn commit(
        &self,
        ns: &str,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<LayerRecord> {
        let (n, _) = self.require(ns, key)?;
        let slot = self.slot(n);
        let guard = lock(&slot);
        let (n2, rec) = self.require(ns, key)?;
        if n2 != n {
            return Err(StoreError::NotFound(format!("layer {key}")));
        }
        if rec.kind != LayerKind::ReadWrite {
            return Err(StoreError::Precondition(format!(
                "{key} is not an active (writable) layer"
            )));
        }
        if guard.mounts > 0 {
            return Err(StoreError::InUse(format!("layer {key} is mounted")));
        }
        // Usage first (it reads the tree); the layer cannot change kind meanwhile: we hold its lock.
        let usage = {
            let dir = open_dir(&self.layer_dir(n).join("diff"))?;
            lamina_archive::disk_usage(dir.as_fd())?
        };
        // The content must be on disk before the record says it is frozen.
        fault::point("store.commit.syncfs")
            .and_then(|()| mount::syncfs(&self.layer_dir(n)))
            .map_err(|e| StoreError::io("sync committed layer", e))?;
        let txn = self.db.begin_write().map_err(error::db_err)?;
        let rec = {
            let mut names = txn.open_table(NAMES).map_err(error::db_err)?;
            if names.get((ns, name)).map_err(error::db_err)?.is_some() {
                return Err(StoreError::AlreadyExists(format!("layer {name}")));
            }
            names.remove((ns, key)).map_err(error::db_err)?;
            names.insert((ns, name), n).map_err(error::db_err)?;
            let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut r = rec;
            r.name = name.to_string();
            r.kind = LayerKind::ReadOnly;
            r.labels = labels;
            r.size = Some(usage.bytes);
            r.inodes = Some(usage.inodes);
            r.manifest = None;
            // A committed snapshot is a new snapshot to containerd: created (and updated) now.
            r.created_ns = now_ns();
            r.updated_ns = r.created_ns;
            layers.insert(n, r.encode().as_slice()).map_err(error::db_err)?;
            r
        };
        fault::point("store.commit.commit").map_err(|e| StoreError::io("commit metadata", e))?;
        txn.commit().map_err(error::db_err)?;
        drop(guard);
        let _ = fault::point("store.commit.done");
        // As after an apply: the manifest is written in the background, Commit does not wait for it.
        self.seal_later(n);
        self.counters.add(Counter::Commits, 1);
        debug!(ns, key, name, layer = n, "committed layer");
        Ok(rec)
    }

    /// Changes the labels of `name` with `f` in one transaction and moves its update time.
    pub fn update_labels(
        &self,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<LayerRecord> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        let rec = {
            let names = txn.open_table(NAMES).map_err(error::db_err)?;
            let n = names
                .get((ns, name))
                .map_err(error::db_err)?
                .map(|v| v.value())
                .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
            let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut rec = {
                let v = layers.get(n).map_err(error::db_err)?;
                let v = v.ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {n}")))?;
                LayerRecord::decode(v.value())?
            };
            f(&mut rec.labels);
            rec.updated_ns = now_ns();
            layers.insert(n, rec.encode().as_slice()).map_err(error::db_err)?;
            rec
        };
        txn.commit().map_err(error::db_err)?;
        Ok(rec)
    }

    /// The record of `name` and its parent's name (same namespace).
    pub fn record(&self, ns: &str, name: &str) -> Result<(LayerRecord, Option<String>)> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let n = names
            .get((ns, name))
            .map_err(error::db_err)?
            .map(|v| v.value())
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let rec = read_record(&layers, n)?;
        let parent = match rec.parent {
            Some(p) => Some(read_record(&layers, p)?.name),
            None => None,
        };
        Ok((rec, parent))
    }

    /// Every layer of one namespace with its parent's name, in name order, from one consistent snapshot
    /// of the metadata.
    pub fn list_ns(&self, ns: &str) -> Result<Vec<(LayerRecord, Option<String>)>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut recs = Vec::new();
        let mut by_number = HashMap::new();
        for row in names.range((ns, "")..).map_err(error::db_err)? {
            let (k, v) = row.map_err(error::db_err)?;
            if k.value().0 != ns {
                break;
            }
            let n = v.value();
            let rec = read_record(&layers, n)?;
            by_number.insert(n, rec.name.clone());
            recs.push(rec);
        }
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            let parent = match rec.parent {
                Some(p) => Some(match by_number.get(&p) {
                    Some(name) => name.clone(),
                    None => read_record(&layers, p)?.name,
                }),
                None => None,
            };
            out.push((rec, parent));
        }
        Ok(out)
    }

    /// Disk usage of the layer's own content (parents excluded): recorded at commit for frozen layers,
    /// measured now for the others.
    pub fn usage(&self, ns: &str, name: &str) -> Result<lamina_archive::DiskUsage> {
        let (n, rec) = self.require(ns, name)?;
        if let (LayerKind::ReadOnly, Some(bytes), Some(inodes)) = (rec.kind, rec.size, rec.inodes) {
            return Ok(lamina_archive::DiskUsage { bytes, inodes });
        }
        let dir = open_dir(&self.layer_dir(n).join("diff"))?;
        Ok(lamina_archive::disk_usage(dir.as_fd())?)
    }

    /// Reads a remembered setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(SETTINGS).map_err(error::db_err)?;
        Ok(t.get(key).map_err(error::db_err)?.map(|v| v.value().to_string()))
    }

    /// Remembers a setting across restarts.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        txn.open_table(SETTINGS)
            .map_err(error::db_err)?
            .insert(key, value)
            .map_err(error::db_err)?;
        txn.commit().map_err(error::db_err)
    }
}

fn tree_changes(new: &MountGuard<'_>, old: Option<&MountGuard<'_>>) -> Result<Vec<Change>> {
    let new_fd = open_dir(&new.path)?;
    let old_fd = old.map(|o| open_dir(&o.path)).transpose()?;
    Ok(lamina_archive::tree_changes(
        new_fd.as_fd(),
        old_fd.as_ref().map(|f| f.as_fd()),
    )?)
}

fn read_record(layers: &impl ReadableTable<u64, &'static [u8]>, n: u64) -> Result<LayerRecord> {
    let v = layers
        .get(n)
        .map_err(error::db_err)?
        .ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {n}")))?;
    LayerRecord::decode(v.value())
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_merged(layers_dir: &Path, mp: &Path) -> Option<u64> {
    let rel = mp.strip_prefix(layers_dir).ok()?;
    let mut comps = rel.components();
    let n = comps.next()?.as_os_str().to_str()?;
    let last = comps.next()?.as_os_str();
    if comps.next().is_some() || last != "merged" {
        return None;
    }
    u64::from_str_radix(n, 16).ok()
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

/// A reference-counted mount held for the duration of a diff.
pub struct MountGuard<'a> {
    store: &'a Store,
    ns: String,
    name: String,
    /// Path of the merged view.
    pub path: PathBuf,
}

impl<'a> MountGuard<'a> {
    fn new(store: &'a Store, ns: &str, name: &str) -> Result<Self> {
        let path = store.get(ns, name, "")?;
        Ok(MountGuard {
            store,
            ns: ns.to_string(),
            name: name.to_string(),
            path,
        })
    }
}

impl Drop for MountGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.put(&self.ns, &self.name) {
            warn!(layer = %self.name, error = %e, "releasing diff mount");
        }
    }
}

enum PlanKind<'a> {
    Native(PathBuf),
    Trees {
        new: MountGuard<'a>,
        old: Option<MountGuard<'a>>,
    },
}

/// A tar ready to be streamed; see [`Store::diff`].
pub struct DiffPlan<'a> {
    kind: PlanKind<'a>,
    opts: DiffOptions,
}

impl DiffPlan<'_> {
    /// Streams the tar into `out`.
    pub fn write_to(self, out: &mut dyn Write) -> Result<()> {
        match &self.kind {
            PlanKind::Native(dir) => {
                let fd = open_dir(dir)?;
                lamina_archive::write_layer_diff(fd.as_fd(), out, &self.opts)?;
            }
            PlanKind::Trees { new, old } => {
                let new_fd = open_dir(&new.path)?;
                let old_fd = old.as_ref().map(|o| open_dir(&o.path)).transpose()?;
                lamina_archive::write_tree_diff(
                    new_fd.as_fd(),
                    old_fd.as_ref().map(|f| f.as_fd()),
                    out,
                    &self.opts,
                )?;
            }
        }
        Ok(())
    }
}
