//! Opening a data root: the lock, the metadata format (created or migrated), and the recovery after a crash.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lamina_sys::lock::LockFile;
use lamina_sys::mounter::{LinuxMounter, Mounter};
use tracing::{info, warn};

use crate::backend::{LayerBackend, Recovery};
use crate::overlay::OverlayBackend;
use crate::rbd::{RbdBackend, RbdLayers};
use crate::verify::CheckHook;
use crate::{custody, db, lock, stats, verify, Result, Store, StoreError, FORMAT_VERSION};

/// The setting naming the backend of the data root: `overlay`, or `rbd:<pool>/<image prefix>`.
const BACKEND_SETTING: &str = "backend";

/// How [`Store::open_with`] opens a data root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// The daemon: recover from a crash (roll back interrupted applies, remove leftovers, detach stale
    /// mounts, count the mounts of a previous run).
    #[default]
    Serve,
    /// An operator's command while no daemon runs: nothing is changed behind the operator's back (`lamina
    /// gc` shows and removes the leftovers a crash left); metadata is still migrated to the current format.
    Admin,
}

/// Options of [`Store::open_with_options`].
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Serve or Admin.
    pub mode: OpenMode,
    /// `verify_on_mount`: check every frozen layer of a stack against its content manifest before the first
    /// mount (or mount description) of that stack since the store was opened, and refuse a mismatch with
    /// [`StoreError::CorruptMetadata`]. Layers frozen by this store are trusted.
    pub verify_on_mount: bool,
    /// Told the outcome of every such check.
    pub on_check: Option<CheckHook>,
    /// Mounts through this instead of the kernel ([`LinuxMounter`]): tests use a
    /// [`lamina_sys::mounter::FakeMounter`].
    pub mounter: Option<Arc<dyn Mounter>>,
    /// Go on when the metadata database is new (missing or empty) or belongs to another data root while layers
    /// are stored: their storage is moved, untouched, to `quarantine/`. Without it such an open fails and
    /// changes nothing (see `custody.rs`).
    pub quarantine_unknown: bool,
    /// Layers as RBD images in a Ceph pool (`[store] backend = "rbd"`) instead of overlay directories. The data
    /// root records its backend when it is made, and is opened only with the same one.
    pub rbd: Option<RbdLayers>,
    /// Take part in a cluster tier (docs/cluster.md).
    pub tier: Option<crate::TierOptions>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("mode", &self.mode)
            .field("verify_on_mount", &self.verify_on_mount)
            .field("quarantine_unknown", &self.quarantine_unknown)
            .field("rbd", &self.rbd)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store at `root`, takes its lock, checks that the database belongs to
    /// this data root, and recovers from a crash: staging leftovers are removed, interrupted applies are
    /// rolled back, directories of removed layers are deleted and directories no record explains are moved to
    /// `quarantine/`, mounts of unknown layers are detached and mounts of known ones are counted once (a
    /// running container may still use them).
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_with(root, OpenMode::Serve)
    }

    /// Opens the store at `root` in `mode`; see [`OpenMode`].
    pub fn open_with(root: &Path, mode: OpenMode) -> Result<Store> {
        Store::open_with_options(
            root,
            OpenOptions {
                mode,
                ..OpenOptions::default()
            },
        )
    }

    /// Opens the store at `root` with [`OpenOptions`].
    pub fn open_with_options(root: &Path, opts: OpenOptions) -> Result<Store> {
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
        let mounter = opts.mounter.clone().unwrap_or_else(|| Arc::new(LinuxMounter));
        if opts.rbd.is_some() && opts.tier.is_some() {
            return Err(StoreError::InvalidArgument(
                "a cluster tier holds directory layers: it cannot be used with the rbd backend".into(),
            ));
        }
        let next_id = Arc::new(AtomicU64::new(1));
        let backend: Box<dyn LayerBackend> = match &opts.rbd {
            None => Box::new(OverlayBackend::open(root, mounter, next_id.clone())?),
            Some(cfg) => Box::new(RbdBackend::open(root, cfg.clone())?),
        };
        let tier = opts
            .tier
            .clone()
            .map(|t| crate::tier::Tier::open(t, root))
            .transpose()?;
        let db_path = root.join("meta.redb");
        let db_existed = db_path.exists();
        let db = db::Db::open(&db_path).map_err(|e| {
            StoreError::CorruptMetadata(format!("{}: {e}; move it away to start empty", db_path.display()))
        })?;
        let store = Store {
            root: root.to_path_buf(),
            db: Arc::new(db),
            index: Arc::default(),
            seals: Arc::new(verify::Seals::default()),
            slots: crate::slots::Slots::default(),
            next_id,
            counters: stats::Counters::default(),
            backend,
            mount_check: opts
                .verify_on_mount
                .then(|| verify::MountCheck::new(opts.on_check.clone())),
            tier,
            ready: AtomicBool::new(false),
            _lock: lock,
        };
        let (fresh, db_id) = store.read()?.identity()?;
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
        let chosen = opts
            .rbd
            .as_ref()
            .map(RbdLayers::identity)
            .unwrap_or_else(|| "overlay".into());
        store.check_backend(&chosen, fresh || !db_existed)?;
        store.ready.store(true, Ordering::SeqCst);
        store.init_meta()?;
        if store.setting(BACKEND_SETTING)?.is_none() {
            store.set_setting(BACKEND_SETTING, &chosen)?;
        }
        store.record_identity(db_id, id)?;
        store.load_stats()?;
        if mode == OpenMode::Serve {
            store.recover()?;
            // The mounts of the tier's image layers this store links to (kept across a restart, or gone with a
            // reboot).
            store.sync_tier_mounts();
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

    /// Creates the metadata tables, or migrates them to the current format in one transaction (a crash
    /// leaves either format, never a mix), and loads the next layer number.
    pub(crate) fn init_meta(&self) -> Result<()> {
        let txn = self.write()?;
        match txn.format()? {
            None => txn.set_format(FORMAT_VERSION)?,
            Some(v) if v > FORMAT_VERSION => {
                return Err(StoreError::CorruptMetadata(format!(
                    "metadata format {v} is newer than supported {FORMAT_VERSION}; use a newer lamina"
                )))
            }
            Some(v) if v < FORMAT_VERSION => {
                if v == 1 {
                    txn.migrate_v1_records()?;
                }
                // Format 4 -> 5: the name and child tables give way to the in-memory index.
                txn.migrate_v4_indexes()?;
                // Format 2 -> 3: the `stats` and `counters` tables (created below, empty) and the optional
                // `manifest` field of a record (absent in old records). Format 3 -> 4: the `manifests` table
                // (created below, empty; the older layers' manifests stay in their files).
                txn.set_format(FORMAT_VERSION)?;
                info!("migrated metadata from format {v} to {FORMAT_VERSION}");
            }
            Some(_) => {}
        }
        self.next_id.store(txn.next_id()?.max(1), Ordering::SeqCst);
        txn.create_tables()?;
        txn.commit()?;
        let records = self.read()?.layers()?;
        self.index.rebuild(records.iter().map(|(n, r)| (*n, r)))
    }

    /// Checks, before anything is written, that the database belongs to this data root (see `custody.rs`): a
    /// new database beside stored layers, or one with another data root's id, is refused unless
    /// `quarantine_unknown`, which has the backend move every layer's storage to quarantine instead. Gives the
    /// id to record.
    fn check_custody(
        &self,
        db_path: &Path,
        fresh: bool,
        db_id: Option<u64>,
        quarantine_unknown: bool,
    ) -> Result<u64> {
        let file_id = custody::read_identity(&self.root)?;
        let foreign = match (db_id, file_id) {
            (Some(d), Some(f)) if d != f => Some((d, f)),
            _ => None,
        };
        // The storage is counted only when the database is in doubt: a normal start reads `layers/` once.
        let stored = if fresh || foreign.is_some() {
            self.backend.stored()?
        } else {
            0
        };
        if stored > 0 {
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
                return Err(custody::refusal(&self.root, db_path, &what, stored));
            }
            // None of them is this database's, whatever their numbers.
            self.backend.quarantine_all()?;
        }
        // A database without an id (new, or written before ids existed) takes the data root's, or a new one.
        Ok(match (db_id, file_id) {
            (Some(d), _) => d,
            (None, Some(f)) if !fresh => f,
            (None, _) => custody::new_id(),
        })
    }

    /// Refuses to open a data root made with another backend (or another pool or image prefix): its layers
    /// would look missing. A database from before backends were recorded is an overlay one.
    fn check_backend(&self, chosen: &str, fresh: bool) -> Result<()> {
        if fresh {
            return Ok(());
        }
        let recorded = match self.read()?.setting(BACKEND_SETTING) {
            Ok(v) => v.unwrap_or_else(|| "overlay".into()),
            Err(_) => "overlay".into(),
        };
        if recorded != chosen {
            return Err(StoreError::Precondition(format!(
                "data root {} holds layers of the {recorded} backend, configured: {chosen}; configure [store] as \
                 when the data root was made, or use another data root",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Records the data root id in the database and in the `identity` file, where either lacks it.
    fn record_identity(&self, db_id: Option<u64>, id: u64) -> Result<()> {
        if db_id != Some(id) {
            let txn = self.write()?;
            txn.set_root_id(id)?;
            txn.commit()?;
        }
        if custody::read_identity(&self.root)? != Some(id) {
            custody::write_identity(&self.root, id)?;
        }
        Ok(())
    }

    pub(crate) fn recover(&self) -> Result<()> {
        // 1. Staging and trash leftovers.
        self.backend.clear_leftovers()?;
        // 2. Interrupted applies: the layer goes back to empty, as created.
        let pending = self.read()?.pending()?;
        for (n, _) in pending {
            warn!(layer = n, "rolling back an apply interrupted by a crash");
            self.reset_interrupted_apply(n)?;
        }
        // 3. Mounts and directories without a record; mounts of known layers are counted once (a running
        // container may still use them).
        let known = self.read()?.layer_numbers()?;
        let removed = self.read()?.removed()?;
        let record_of = |n: u64| self.record_by_number(n);
        let mounted = self.backend.recover(&Recovery {
            known: &known,
            removed: &removed,
            record_of: &record_of,
        })?;
        // Proofs of removal whose storage is gone (durably: the backend synced its deletions) are done with.
        let done: Vec<u64> = removed
            .iter()
            .copied()
            .filter(|n| !self.backend.exists(*n))
            .collect();
        if !done.is_empty() {
            let txn = self.write()?;
            for n in done {
                txn.drop_removed(n)?;
            }
            txn.commit()?;
        }
        for n in mounted {
            lock(&self.slot(n)).mounts = 1;
        }
        info!(root = %self.root.display(), layers = known.len(), "store opened");
        Ok(())
    }
}
