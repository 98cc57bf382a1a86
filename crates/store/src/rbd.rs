//! The RBD backend: each layer is an RBD image in a Ceph pool holding the layer's whole tree as one
//! filesystem (ext4 or xfs), the model of Docker's old Ceph graph driver.
//!
//! In the pool (`<prefix>` is `[store.rbd] image_prefix`, one per data root):
//!
//! ```text
//! <pool>/<prefix><hex n>            layer n: a fresh filesystem (no parent), or a clone of its parent's seal
//! <pool>/<prefix><hex n>@sealed     the seal: a protected snapshot, taken once the layer's content is final
//!                                   (end of an apply, a commit, or the first child of a writable layer)
//! ```
//!
//! On this host, below `<data root>/rbd/`:
//!
//! ```text
//! <hex n>/fuse/  <hex n>/fs/  <hex n>/attached.json     layer n's image attached (lamina-rbd): its filesystem
//!                                                       at fs/, read-only once sealed
//! rbd-fuse.log                                          what the rbd-fuse processes print
//! ```
//!
//! A child layer is `rbd clone` of its parent's seal: one call whatever the parent's size, and the child holds
//! the parent's whole tree, so a deletion in a layer is a deletion in its filesystem (the apply turns
//! whiteouts into deletions) and a layer's own changes are the difference between its tree and its parent's
//! (both attached, compared by lamina-archive). An image is attached while someone uses it (the store's
//! `get`, a diff, a mount description for containerd) and detached at the last release (or, while a client
//! still has its filesystem mounted, by a reaper once that mount goes). A seal for a child or an apply is
//! taken with the image detached; a commit seals the image where it is attached (synced, frozen, flushed
//! through rbd-fuse, snapshot, thawed). rbd-fuse cannot expose snapshots: a sealed layer's head is what is
//! read, attached read-only once detached.
//!
//! lamina's writes through an attachment, and the attachment itself, run under a watchdog (`Rbd::watched`):
//! when they wait on a cluster that does not take writes (OSDs gone, a pool full or over its quota), the
//! attachment's rbd-fuse is killed so that they fail with the cluster's error class instead of waiting for
//! ever. In a pool without room a failed apply is not rolled back (that needs a new clone) and a removed
//! clone stays until there is room (Ceph refuses to move it to the pool's trash): both are done later.
//!
//! Crash safety follows the store's record-first rule: the record of a layer is written before its image
//! exists, so at start an image without a record is a half-made one (removed), a record without an image
//! is made again, an attachment no known layer holds is taken down, and rbd-fuse processes are found through
//! their state files (PID checked against its start time). A commit's seal is announced by a marker
//! (`sealing/<hex n>`) before it is taken: at start, the seal of a layer still recorded writable is dropped.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lamina_archive::{ApplyOptions, ApplyStats, Change, DiffOptions, DiskUsage, IdMappings, Whiteouts};
use lamina_rbd::{Cluster, FsType, Rbd, RbdError};
use lamina_sys::fault;
use lamina_sys::mount::{self, MountSpec};
use tracing::{info, warn};

use crate::backend::{LayerBackend, LayerPaths, LeftoverScope, Recovery, Staging};
use crate::{
    mkdir, open_dir, Garbage, GarbageKind, InFlight, LayerKind, LayerRecord, Result, StoreError,
    MANIFEST_FILE,
};

/// The snapshot that seals a layer; its children are clones of it.
pub const SEAL: &str = "sealed";

/// Settings of the RBD backend (`[store.rbd]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdLayers {
    /// The cluster, the pool and how images reach this host.
    pub cluster: Cluster,
    /// Image name = prefix + the layer number in hex; one prefix per data root.
    pub image_prefix: String,
    /// Filesystem of base layers (children inherit their parent's).
    pub fs: FsType,
    /// Size of base layer images, in bytes (thin: a fresh filesystem costs the pool a few MiB).
    pub size: u64,
    /// Deadline of each cluster call.
    pub timeout: Duration,
}

impl RbdLayers {
    /// What the data root records of this backend: a data root is opened only with the same pool and prefix.
    pub(crate) fn identity(&self) -> String {
        format!("rbd:{}/{}", self.cluster.pool, self.image_prefix)
    }
}

impl From<RbdError> for StoreError {
    fn from(e: RbdError) -> Self {
        match e {
            RbdError::Unavailable(m) => StoreError::Unavailable(m),
            RbdError::NoSpace(m) => StoreError::NoSpace(m),
            RbdError::InUse(m) => StoreError::InUse(m),
            RbdError::NotFound(m) => StoreError::NotFound(m),
            RbdError::Io { context, source } => StoreError::Io { context, source },
        }
    }
}

/// Layers as RBD images; see the module documentation.
#[derive(Debug)]
pub(crate) struct RbdBackend {
    dir: PathBuf,
    cfg: RbdLayers,
    rbd: Arc<Rbd>,
    /// Users of each attached layer (the store's mount counts one, each diff or usage read one, a mount
    /// description for containerd one until the layer is committed or removed).
    holds: Mutex<HashMap<u64, Arc<Mutex<Hold>>>>,
    /// Layers known to be sealed.
    sealed: Mutex<HashSet<u64>>,
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
    seq: AtomicU64,
}

#[derive(Debug, Default)]
struct Hold {
    count: usize,
    /// Held for a caller that mounts the filesystem itself (containerd): released at commit or removal.
    external: bool,
    /// Released by lamina but still mounted elsewhere (a client's bind mount of `fs/`): kept attached until
    /// that mount goes (a reaper thread watches it).
    lingering: bool,
    /// Removed while lingering: the image goes once the reaper has detached it.
    removed: bool,
}

impl RbdBackend {
    /// The backend of the data root `root`; makes `<root>/rbd/`.
    pub(crate) fn open(root: &Path, cfg: RbdLayers) -> Result<RbdBackend> {
        let dir = root.join("rbd");
        mkdir(&dir, 0o700)?;
        mkdir(&dir.join("manifests"), 0o700)?;
        let rbd = Arc::new(Rbd::new(
            cfg.cluster.clone(),
            cfg.timeout,
            &dir.join("rbd-fuse.log"),
        ));
        Ok(RbdBackend {
            dir,
            cfg,
            rbd,
            holds: Mutex::new(HashMap::new()),
            sealed: Mutex::new(HashSet::new()),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            seq: AtomicU64::new(0),
        })
    }

    fn image(&self, n: u64) -> String {
        format!("{}{n:x}", self.cfg.image_prefix)
    }

    /// The layer number of an image of this data root.
    fn number_of(&self, image: &str) -> Option<u64> {
        let hex = image.strip_prefix(&self.cfg.image_prefix)?;
        let n = u64::from_str_radix(hex, 16).ok()?;
        (format!("{n:x}") == hex).then_some(n)
    }

    fn adir(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:x}"))
    }

    fn fs_dir(&self, n: u64) -> PathBuf {
        Rbd::fs_dir(&self.adir(n))
    }

    fn hold_of(&self, n: u64) -> Arc<Mutex<Hold>> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(n)
            .or_default()
            .clone()
    }

    /// The filesystem of `n` a child of it sees: (whether sealed; the parent's filesystem type).
    fn is_sealed(&self, n: u64) -> Result<bool> {
        if self.sealed.lock().unwrap_or_else(|p| p.into_inner()).contains(&n) {
            return Ok(true);
        }
        let snaps = self.rbd.snapshots(&self.image(n))?.ok_or_else(|| {
            StoreError::NotFound(format!("image {} of layer {n:x}", self.rbd.spec(&self.image(n))))
        })?;
        let sealed = snaps.iter().any(|s| s == SEAL);
        if sealed {
            self.sealed.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
        }
        Ok(sealed)
    }

    /// Attaches `n` (read-only once sealed, or for a view) unless it is attached, and counts one user.
    fn hold(&self, n: u64, view: bool, external: bool) -> Result<PathBuf> {
        let h = self.hold_of(n);
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        if external && h.external {
            return Ok(self.fs_dir(n));
        }
        if h.count == 0 || !Rbd::alive(&self.adir(n)) {
            let ro = view || self.is_sealed(n)?;
            self.rbd.attach(&self.adir(n), &self.image(n), self.cfg.fs, ro)?;
        }
        h.count += 1;
        h.external |= external;
        Ok(self.fs_dir(n))
    }

    /// Counts one user less; detaches at the last. `external` drops containerd's hold.
    fn release(&self, n: u64, external: bool) -> Result<()> {
        let h = self.hold_of(n);
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        if external {
            if !h.external {
                return Ok(());
            }
            h.external = false;
        }
        h.count = h.count.saturating_sub(1);
        if h.count == 0 {
            self.detach_or_linger(n, &mut h)?;
        }
        Ok(())
    }

    /// Detaches `n` (its hold locked, nobody counted), unless its filesystem is still mounted elsewhere: then
    /// it stays attached and a reaper detaches it once those mounts are gone.
    fn detach_or_linger(&self, n: u64, h: &mut Hold) -> Result<()> {
        if !Rbd::mounted_elsewhere(&self.adir(n)) {
            return Ok(self.rbd.detach(&self.adir(n))?);
        }
        if !h.lingering {
            h.lingering = true;
            info!(
                layer = n,
                "layer released but still mounted elsewhere; detached once that mount goes"
            );
            let reaper = Reaper {
                n,
                dir: self.adir(n),
                image: self.image(n),
                marker: self.sealing_marker(n),
                rbd: self.rbd.clone(),
                hold: self.hold_of(n),
                in_flight: self.in_flight.clone(),
            };
            std::thread::spawn(move || reaper.run());
        }
        Ok(())
    }

    /// Detaches `n` whoever holds it (removal, reset).
    fn force_detach(&self, n: u64) -> Result<()> {
        let h = self.hold_of(n);
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        h.count = 0;
        h.external = false;
        h.lingering = false;
        self.rbd.detach(&self.adir(n))?;
        Ok(())
    }

    /// Seals `n`: detached (refused while someone uses it), then the protected snapshot its children clone.
    fn seal(&self, n: u64) -> Result<()> {
        if self.is_sealed(n)? {
            return Ok(());
        }
        // Under the layer's hold lock: nobody attaches it between the detach and the snapshot, and the next
        // attach finds it sealed (read-only).
        let h = self.hold_of(n);
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        if self.sealed.lock().unwrap_or_else(|p| p.into_inner()).contains(&n) {
            return Ok(());
        }
        if h.count > 0 && !h.external {
            return Err(StoreError::InUse(format!(
                "layer {n:x} is mounted: it cannot be sealed for a child"
            )));
        }
        h.count = 0;
        h.external = false;
        h.lingering = false;
        self.rbd.detach(&self.adir(n))?;
        self.snapshot(n)
    }

    /// Takes the seal of `n` and protects it.
    fn snapshot(&self, n: u64) -> Result<()> {
        let snap = format!("{}@{SEAL}", self.rbd.spec(&self.image(n)));
        fault::point("store.rbd.seal.snap").map_err(|e| StoreError::io("snapshot", e))?;
        let out = self.rbd.cli(&["snap", "create", "--no-progress", &snap])?;
        if !out.success() && !out.stderr.contains("(17)") {
            return Err(self.rbd.fail("sealing the layer", &out).into());
        }
        // Protected, so that clones work without clone v2 (`require-min-compat-client mimic`) on the cluster.
        let out = self.rbd.cli(&["snap", "protect", &snap])?;
        if !out.success() && !out.stderr.contains("already protected") && out.code != Some(16) {
            return Err(self.rbd.fail("protecting the seal", &out).into());
        }
        self.sealed.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
        Ok(())
    }

    /// Drops the seal of `n` (unprotect, remove), if it has one; refused (in use) while clones of it exist.
    fn unseal(&self, n: u64) -> Result<()> {
        self.sealed.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
        let snaps = self.rbd.snapshots(&self.image(n))?.unwrap_or_default();
        if !snaps.iter().any(|s| s == SEAL) {
            return Ok(());
        }
        let snap = format!("{}@{SEAL}", self.rbd.spec(&self.image(n)));
        let out = self.rbd.cli(&["snap", "unprotect", &snap])?;
        if !out.success() && !out.stderr.contains("not protected") {
            return Err(self.rbd.fail("unprotecting a stale seal", &out).into());
        }
        self.rbd
            .cli_ok("removing a stale seal", &["snap", "rm", "--no-progress", &snap])?;
        Ok(())
    }

    /// Where a commit's seal is announced before it is taken: a seal the store has not recorded as a commit
    /// yet (a crash between the two) is dropped at the next start.
    fn sealing_marker(&self, n: u64) -> PathBuf {
        self.dir.join("sealing").join(format!("{n:x}"))
    }

    /// Seals `n` for a commit, attached or not: a seal left by a commit that was not recorded is dropped
    /// first (it may predate writes). Attached, the filesystem is synced, frozen and flushed through to the
    /// image, the seal taken, and the filesystem thawed: it stays attached read-write for whoever still has
    /// it mounted, and its children clone the seal, so they never see later writes.
    fn seal_for_commit(&self, n: u64) -> Result<()> {
        let marker = self.sealing_marker(n);
        mkdir(marker.parent().expect("in sealing/"), 0o700)?;
        std::fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::File::open(marker.parent().expect("in sealing/"))?.sync_all())
            .map_err(|e| StoreError::io(format!("writing {}", marker.display()), e))?;
        let h = self.hold_of(n);
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        self.unseal(n)?;
        let dir = self.adir(n);
        if !Rbd::alive(&dir) {
            h.count = 0;
            h.external = false;
            h.lingering = false;
            self.rbd.detach(&dir)?;
            return self.snapshot(n);
        }
        let fs = self.fs_dir(n);
        // Sync, freeze and flush wait for the cluster without a deadline: watched like an apply.
        let (frozen, cut_off) = self.rbd.watched(&dir, &self.image(n), None, || {
            mount::syncfs(&fs).map_err(|e| StoreError::io("sync committed layer", e))?;
            let frozen = mount::freeze(&fs).map_err(|e| StoreError::io("freeze committed layer", e))?;
            self.rbd.flush(&dir)?;
            Ok::<_, StoreError>(frozen)
        });
        if let Some(e) = cut_off {
            drop(frozen);
            return Err(e.into());
        }
        let frozen = frozen?;
        self.snapshot(n)?;
        frozen
            .thaw()
            .map_err(|e| StoreError::io("thaw committed layer", e))
    }

    /// Makes the image of `n`: a clone of the parent's seal, or a fresh filesystem. Nothing stays on error.
    fn make_image(&self, n: u64, parent: Option<u64>) -> Result<()> {
        let spec = self.rbd.spec(&self.image(n));
        let made = match parent {
            Some(p) => {
                self.seal(p)?;
                let from = format!("{}@{SEAL}", self.rbd.spec(&self.image(p)));
                self.rbd
                    .cli_ok(
                        "cloning the parent",
                        &["clone", "--image-feature", "layering", &from, &spec],
                    )
                    .map(drop)
                    .map_err(StoreError::from)
            }
            None => {
                let size = format!("{}B", self.cfg.size);
                self.rbd.cli_ok(
                    "creating the image",
                    &["create", "--image-feature", "layering", "--size", &size, &spec],
                )?;
                self.format(n)
            }
        };
        if let Err(e) = made {
            // With the cluster out of reach the removal would only wait for the same deadline again: the
            // image (if the cluster made it) has no record once the store drops the layer's, and the next
            // start removes it.
            let removal = match &e {
                StoreError::Unavailable(_) => self.rbd.detach(&self.adir(n)),
                _ => self
                    .rbd
                    .detach(&self.adir(n))
                    .and_then(|()| self.rbd.remove_image(&self.image(n))),
            };
            if let Err(e2) = removal {
                warn!(layer = n, error = %e2, "cannot remove a half-made image; the next start does");
            }
            return Err(e);
        }
        Ok(())
    }

    /// A fresh filesystem on `n`'s image, its root as empty as a new overlay layer's.
    fn format(&self, n: u64) -> Result<()> {
        let fs = self.rbd.format(&self.adir(n), &self.image(n), self.cfg.fs)?;
        let _ = std::fs::remove_dir(fs.join("lost+found"));
        mount::syncfs(&fs).map_err(|e| StoreError::io("sync new filesystem", e))?;
        self.rbd.detach(&self.adir(n))?;
        Ok(())
    }

    fn with_trees<T>(
        &self,
        n: u64,
        below: &[u64],
        f: impl FnOnce(&Path, Option<&Path>) -> Result<T>,
    ) -> Result<T> {
        let new = self.hold(n, false, false)?;
        let parent = below.first().copied();
        let old = match parent.map(|p| self.hold(p, false, false)).transpose() {
            Ok(o) => o,
            Err(e) => {
                let _ = self.release(n, false);
                return Err(e);
            }
        };
        let r = f(&new, old.as_deref());
        if let Some(p) = parent {
            if let Err(e) = self.release(p, false) {
                warn!(layer = p, error = %e, "releasing a parent after a diff");
            }
        }
        self.release(n, false)?;
        r
    }

    /// Removes the image of `n`; one whose seal still has clones (Ceph refuses) stays until they are gone:
    /// the store keeps the proof of removal and the next start (or `gc`) tries again.
    fn remove_image(&self, n: u64) -> Result<()> {
        self.force_detach(n)?;
        self.rbd.remove_image(&self.image(n))?;
        self.sealed.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
        self.holds.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
        let _ = std::fs::remove_file(self.sealing_marker(n));
        Ok(())
    }

    /// The images of this data root, by layer number.
    fn stored_images(&self) -> Result<HashMap<u64, String>> {
        Ok(self
            .rbd
            .images()?
            .into_iter()
            .filter_map(|i| self.number_of(&i).map(|n| (n, i)))
            .collect())
    }

    /// Attachment directories below `rbd/`, by layer number.
    fn attachments(&self) -> Vec<u64> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n = u64::from_str_radix(&name, 16).ok()?;
                (format!("{n:x}") == name).then_some(n)
            })
            .collect()
    }

    fn image_garbage(&self, n: u64, kind: GarbageKind) -> Garbage {
        let path = PathBuf::from(format!("rbd:{}", self.rbd.spec(&self.image(n))));
        Garbage::unnamed(kind, path, Some(n), 0)
    }
}

impl LayerBackend for RbdBackend {
    fn paths(&self, n: u64) -> LayerPaths {
        let dir = self.adir(n);
        LayerPaths {
            content: dir.join("fs"),
            work: dir.join("fs"),
            merged: dir.join("fs"),
            manifest: self.dir.join("manifests").join(format!("{n:x}.{MANIFEST_FILE}")),
            dir,
        }
    }

    fn manifests(&self) -> bool {
        false
    }

    fn create(&self, n: u64, parent: Option<u64>, _max_size: Option<u64>) -> Result<InFlight> {
        let owned = InFlight::new(&self.in_flight, self.adir(n));
        self.make_image(n, parent)?;
        Ok(owned)
    }

    fn discard(&self, n: u64) {
        // A failed create removed what it made (or left it to the next start when the cluster was out of
        // reach); only what is attached here remains to undo.
        if let Err(e) = self.force_detach(n) {
            warn!(layer = n, error = %e, "cannot detach a discarded layer");
        }
    }

    fn remove(&self, n: u64, _max_size: Option<u64>) {
        {
            let h = self.hold_of(n);
            let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
            if Rbd::mounted_elsewhere(&self.adir(n)) {
                // A client still has the filesystem mounted: the image goes once that mount is gone.
                h.count = 0;
                h.external = false;
                h.removed = true;
                if let Err(e) = self.detach_or_linger(n, &mut h) {
                    warn!(layer = n, error = %e, "image of a removed layer kept; removed at the next start or gc");
                }
                return;
            }
        }
        match self.remove_image(n) {
            Ok(()) => {}
            Err(StoreError::InUse(m) | StoreError::NoSpace(m)) => {
                // Clones of its seal that are being removed too (Ceph answers busy for a moment after a
                // clone's removal), kept by another client, or a clone in a pool over its quota (Ceph moves
                // a removed image to the pool's trash first, and refuses that while the pool has no room):
                // tried again in the background, then at the next start or gc (the store keeps the proof of
                // removal until the image is gone).
                info!(layer = n, reason = %m, "removal of the image deferred");
                let rbd = self.rbd.clone();
                let image = self.image(n);
                let owned = InFlight::new(&self.in_flight, self.adir(n));
                std::thread::spawn(move || {
                    // A client that died keeps its watch on the image until the OSDs time it out (30 s), and a
                    // parent waits for its clones: a minute of tries covers both. A pool without room is
                    // waited for up to ten minutes (its quota raised, or space freed).
                    let t0 = std::time::Instant::now();
                    let mut last = None;
                    loop {
                        std::thread::sleep(Duration::from_secs(2));
                        let patience = match last {
                            Some(RbdError::NoSpace(_)) => Duration::from_secs(600),
                            _ => Duration::from_secs(60),
                        };
                        match rbd.remove_image(&image) {
                            Ok(()) => break,
                            Err(e @ (RbdError::InUse(_) | RbdError::NoSpace(_)))
                                if t0.elapsed() < patience =>
                            {
                                last = Some(e);
                            }
                            Err(e) => {
                                warn!(layer = n, error = %e, "image of a removed layer kept; removed at the next start or gc");
                                break;
                            }
                        }
                    }
                    drop(owned);
                });
            }
            Err(e) => {
                warn!(layer = n, error = %e, "image of a removed layer kept; removed at the next start or gc")
            }
        }
    }

    fn freeze(&self, n: u64) -> Result<DiskUsage> {
        let usage = {
            let fs = self.hold(n, false, false)?;
            let r = open_dir(&fs).and_then(|d| Ok(lamina_archive::disk_usage(d.as_fd())?));
            let sealed = self.seal_for_commit(n);
            self.release(n, false)?;
            let u = r?;
            sealed?;
            u
        };
        // containerd's hold ends with the commit; a mount it left in place keeps the image attached.
        self.release(n, true)?;
        Ok(usage)
    }

    fn usage(&self, n: u64) -> Result<DiskUsage> {
        self.with_trees(n, &[], |fs, _| {
            let d = open_dir(fs)?;
            Ok(lamina_archive::disk_usage(d.as_fd())?)
        })
    }

    fn stage(&self, n: u64) -> Staging {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        Staging {
            layer: n,
            _owned: InFlight::new(&self.in_flight, self.adir(n)),
            token: format!("{n:x}-{seq}"),
            path: self.fs_dir(n),
        }
    }

    fn apply(&self, staging: &Staging, input: &mut dyn Read, mappings: &IdMappings) -> Result<ApplyStats> {
        let n = staging.layer;
        fault::point("store.apply.stage").map_err(|e| StoreError::io("attach the layer", e))?;
        let fs = self.hold(n, false, false)?;
        // The writes wait for the cluster without a deadline (page cache, loop device, rbd-fuse): a watchdog
        // cuts the attachment off when the stream stops moving and the cluster does not take writes.
        let read = AtomicU64::new(0);
        let mut counted = Counted {
            inner: input,
            read: &read,
        };
        let (applied, cut_off) = self.rbd.watched(&self.adir(n), &self.image(n), Some(&read), || {
            let dirfd = open_dir(&fs)?;
            let opts = ApplyOptions {
                id_mappings: mappings.clone(),
                whiteouts: Whiteouts::Delete,
            };
            let stats = lamina_archive::apply_layer(dirfd.as_fd(), &mut counted, &opts)?;
            fault::point("store.apply.syncfs")
                .and_then(|()| mount::syncfs(&fs))
                .map_err(|e| StoreError::io("sync applied layer", e))?;
            Ok::<_, StoreError>(stats)
        });
        if let Some(e) = cut_off {
            if let Err(e2) = self.force_detach(n) {
                warn!(layer = n, error = %e2, "taking down an attachment cut off from the cluster");
            }
            return Err(e.into());
        }
        let released = self.release(n, false);
        let stats = applied?;
        released?;
        self.seal(n)?;
        Ok(stats)
    }

    fn abandon(&self, staging: Staging) -> bool {
        let n = staging.layer;
        if let Err(e) = self.force_detach(n) {
            warn!(layer = n, error = %e, "cannot detach a layer after a failed apply");
        }
        true
    }

    fn drop_staging(&self, _token: &str) -> bool {
        true
    }

    fn reset(&self, n: u64, parent: Option<u64>) -> Result<()> {
        // In a pool that is full or over its quota neither the removal of a clone nor a new image can be
        // made: the layer stays as it is (not visible, its record `Applying`) for the next start, gc or
        // Remove, without waiting for the cluster here.
        self.rbd.check_room()?;
        // An apply cut off from a cluster that stopped answering leaves the watch of its killed rbd-fuse on
        // the image until the OSD expires it (`osd_client_watch_timeout`, 30 s): Ceph refuses the removal
        // as busy until then.
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        loop {
            match self.remove_image(n) {
                Err(StoreError::InUse(m)) if std::time::Instant::now() < deadline => {
                    info!(layer = n, reason = %m, "image still watched; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                r => break r?,
            }
        }
        self.make_image(n, parent)
    }

    fn write_diff(&self, n: u64, below: &[u64], out: &mut dyn Write, opts: &DiffOptions) -> Result<()> {
        self.with_trees(n, below, |new, old| {
            let new_fd = open_dir(new)?;
            let old_fd = old.map(open_dir).transpose()?;
            lamina_archive::write_tree_diff(new_fd.as_fd(), old_fd.as_ref().map(|f| f.as_fd()), out, opts)?;
            Ok(())
        })
    }

    fn changes(&self, n: u64, below: &[u64]) -> Result<Vec<Change>> {
        self.with_trees(n, below, |new, old| {
            let new_fd = open_dir(new)?;
            let old_fd = old.map(open_dir).transpose()?;
            Ok(lamina_archive::tree_changes(
                new_fd.as_fd(),
                old_fd.as_ref().map(|f| f.as_fd()),
            )?)
        })
    }

    fn diff_size(&self, n: u64, below: &[u64]) -> Result<u64> {
        self.with_trees(n, below, |new, old| {
            let new_fd = open_dir(new)?;
            let old_fd = old.map(open_dir).transpose()?;
            let changes = lamina_archive::tree_changes(new_fd.as_fd(), old_fd.as_ref().map(|f| f.as_fd()))?;
            Ok(crate::content::changed_bytes(new, &changes))
        })
    }

    fn view(&self, n: u64, _rec: &LayerRecord) -> (PathBuf, bool) {
        (self.fs_dir(n), true)
    }

    fn mount(&self, n: u64, rec: &LayerRecord, _below: &[u64], _label: &str) -> io::Result<()> {
        fault::point("store.rbd.attach")?;
        self.hold(n, rec.kind == LayerKind::View, false)
            .map(drop)
            .map_err(StoreError::into_io)
    }

    fn unmount(&self, n: u64, _detach: bool) -> io::Result<()> {
        self.release(n, false).map_err(StoreError::into_io)
    }

    fn is_mounted(&self, n: u64) -> bool {
        Rbd::attached(&self.adir(n))
    }

    fn mounted(&self) -> Result<HashSet<u64>> {
        Ok(self
            .attachments()
            .into_iter()
            .filter(|n| Rbd::alive(&self.adir(*n)))
            .collect())
    }

    fn describe(&self, n: u64, rec: &LayerRecord, _below: &[u64]) -> Result<MountSpec> {
        let view = rec.kind == LayerKind::View;
        let source = self.hold(n, view, true)?;
        Ok(MountSpec::Bind {
            source,
            read_only: view,
        })
    }

    fn clear_leftovers(&self) -> Result<()> {
        Ok(())
    }

    fn stored(&self) -> Result<usize> {
        Ok(self.stored_images()?.len())
    }

    fn quarantine_all(&self) -> Result<()> {
        for (n, image) in self.stored_images()? {
            let to = format!("{}quarantine-{n:x}-{}", self.cfg.image_prefix, crate::now_ns());
            self.rbd.cli_ok(
                "moving an image out of the store's sight",
                &["rename", &self.rbd.spec(&image), &self.rbd.spec(&to)],
            )?;
            warn!(from = %image, to = %to, "image unknown to the metadata renamed");
        }
        Ok(())
    }

    fn exists(&self, n: u64) -> bool {
        !matches!(self.rbd.snapshots(&self.image(n)), Ok(None))
    }

    fn sync_removals(&self) -> Result<()> {
        // The cluster acknowledges an image's removal once it is durable.
        Ok(())
    }

    fn recover(&self, state: &Recovery<'_>) -> Result<Vec<u64>> {
        let (known, removed, record_of) = (state.known, state.removed, state.record_of);
        // Attachments first: nothing is removed while attached.
        let mut kept = Vec::new();
        for n in self.attachments() {
            let dir = self.adir(n);
            if known.contains(&n) && Rbd::alive(&dir) {
                info!(layer = n, "keeping the attachment of a previous run");
                // A commit a crash cut short may have left it frozen.
                if let Err(e) = mount::thaw(&self.fs_dir(n)) {
                    warn!(layer = n, error = %e, "cannot thaw a kept attachment");
                }
                let h = self.hold_of(n);
                h.lock().unwrap_or_else(|p| p.into_inner()).count = 1;
                kept.push(n);
            } else {
                warn!(layer = n, dir = %dir.display(), "taking down an attachment nothing holds");
                self.rbd.detach(&dir)?;
            }
        }
        // Seals of commits a crash cut short before their record: the layer is still writable.
        let markers = std::fs::read_dir(self.dir.join("sealing"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for marker in markers {
            let n = marker
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| u64::from_str_radix(f, 16).ok());
            if let Some(n) = n {
                if record_of(n)?.is_some_and(|r| r.kind == LayerKind::ReadWrite) {
                    warn!(layer = n, "dropping the seal of a commit that was not recorded");
                    if let Err(e) = self.unseal(n) {
                        warn!(layer = n, error = %e, "cannot drop a stale seal; kept for now");
                        continue;
                    }
                }
            }
            let _ = std::fs::remove_file(&marker);
        }
        let images = self.stored_images()?;
        // Children before parents: a parent's seal is refused while clones of it remain.
        let mut gone: Vec<u64> = images.keys().copied().filter(|n| !known.contains(n)).collect();
        gone.sort_unstable_by(|a, b| b.cmp(a));
        for n in gone {
            if removed.contains(&n) {
                info!(layer = n, "removing the image of a removed layer");
            } else {
                warn!(layer = n, image = %images[&n], "removing an image no record explains (a create a crash cut short)");
            }
            if let Err(e) = self.remove_image(n) {
                warn!(layer = n, error = %e, "image kept for now");
            }
        }
        let mut missing: Vec<u64> = known
            .iter()
            .copied()
            .filter(|n| !images.contains_key(n))
            .collect();
        // Parents before children.
        missing.sort_unstable();
        for n in missing {
            let parent = record_of(n)?.and_then(|r| r.parent);
            warn!(layer = n, "layer image missing; making it again empty");
            self.make_image(n, parent)?;
        }
        Ok(kept)
    }

    fn stale_mounts(&self, known: &HashSet<u64>) -> Result<Vec<Garbage>> {
        let busy = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(self
            .attachments()
            .into_iter()
            .filter(|n| !known.contains(n) && !busy.contains(&self.adir(*n)))
            .map(|n| Garbage::unnamed(GarbageKind::StaleMount, self.adir(n), Some(n), 0))
            .collect())
    }

    fn interrupted_apply(&self, n: u64, _token: &str) -> Option<Garbage> {
        if self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&self.adir(n))
        {
            return None;
        }
        Some(self.image_garbage(n, GarbageKind::InterruptedApply))
    }

    fn leftovers(&self, scope: &LeftoverScope<'_>) -> Result<Vec<Garbage>> {
        let (known, removed, unknown) = (scope.known, scope.removed, scope.unknown);
        let images = self.stored_images()?;
        let busy = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let known = known()?;
        let mut out = Vec::new();
        for n in images.keys() {
            if known.contains(n) || busy.contains(&self.adir(*n)) {
                continue;
            }
            if removed.contains(n) {
                out.push(self.image_garbage(*n, GarbageKind::OrphanDir));
            } else if unknown {
                out.push(self.image_garbage(*n, GarbageKind::UnknownDir));
            }
        }
        Ok(out)
    }

    fn collect(&self, g: &Garbage, is_known: &dyn Fn(u64) -> Result<bool>) -> Result<()> {
        let Some(n) = g.layer else { return Ok(()) };
        if is_known(n)?
            || self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&self.adir(n))
        {
            return Ok(());
        }
        match g.kind {
            GarbageKind::StaleMount => Ok(self.rbd.detach(&self.adir(n))?),
            GarbageKind::OrphanDir | GarbageKind::UnknownDir => self.remove_image(n),
            _ => Ok(()),
        }
    }

    fn referenced(&self) -> HashSet<u64> {
        self.mounted().unwrap_or_default()
    }

    fn bytes_of(&self, _path: &Path) -> u64 {
        0
    }
}

/// Watches a layer released by lamina whose filesystem is still mounted elsewhere: detaches it once those
/// mounts are gone (and removes its image if the layer was removed meanwhile), unless lamina uses it again.
struct Reaper {
    n: u64,
    dir: PathBuf,
    image: String,
    marker: PathBuf,
    rbd: Arc<Rbd>,
    hold: Arc<Mutex<Hold>>,
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Reaper {
    fn run(self) {
        let n = self.n;
        let mut owned = None;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
            if h.count > 0 || !h.lingering || !Rbd::attached(&self.dir) {
                h.lingering = false;
                return;
            }
            if h.removed && owned.is_none() {
                owned = Some(InFlight::new(&self.in_flight, self.dir.clone()));
            }
            if Rbd::mounted_elsewhere(&self.dir) {
                continue;
            }
            h.lingering = false;
            if let Err(e) = self.rbd.detach(&self.dir) {
                warn!(layer = n, error = %e, "cannot detach a released layer; the next start does");
                return;
            }
            info!(layer = n, "released layer detached: its last mount is gone");
            let removed = h.removed;
            drop(h);
            if removed {
                for _ in 0..10 {
                    match self.rbd.remove_image(&self.image) {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&self.marker);
                            break;
                        }
                        Err(RbdError::InUse(_)) => std::thread::sleep(Duration::from_secs(2)),
                        Err(e) => {
                            warn!(layer = n, error = %e, "image of a removed layer kept; removed at the next start or gc");
                            break;
                        }
                    }
                }
            }
            return;
        }
    }
}

/// A reader that counts the bytes read through it (the progress a watchdog looks at).
struct Counted<'a, R: ?Sized> {
    inner: &'a mut R,
    read: &'a AtomicU64,
}

impl<R: Read + ?Sized> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.read.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}
