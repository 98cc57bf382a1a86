//! The overlay backend: each layer is a directory `layers/<hex n>/` with its own content in `diff/`, a `work/`
//! directory and a `merged/` mount point; a stack is an overlayfs mount of a layer's `diff/` over the
//! `diff/` of every layer below it. Applies are unpacked in `staging/` and renamed into place; removed layers
//! go through `trash/` (see docs/on-disk-format.md).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lamina_archive::{ApplyOptions, ApplyStats, Change, DiffOptions, DiskUsage, IdMappings};
use lamina_sys::fault;
use lamina_sys::mount::{self, MountSpec, OverlaySpec};
use lamina_sys::mounter::Mounter;
use tracing::{debug, info, warn};

use crate::backend::{LayerBackend, LayerPaths, LeftoverScope, MadeAhead, Recovery, Staging};
use crate::custody::{self, QUARANTINE_DIR};
use crate::spare::{is_spare_tree, Spares};
use crate::teardown::{Pending, Teardowns};
use crate::{
    mkdir, now_ns, open_dir, quota, remove_tree, Garbage, GarbageKind, InFlight, LayerKind, LayerRecord,
    Result, StoreError, MANIFEST_FILE,
};

/// Layer directories stacked by overlayfs.
#[derive(Debug)]
pub(crate) struct OverlayBackend {
    root: PathBuf,
    mounter: Arc<dyn Mounter>,
    /// Paths that operations in flight own (layer dirs being created, staging dirs being filled, trash being
    /// deleted): garbage collection leaves them alone.
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
    seq: AtomicU64,
    /// Deletes removed layers in the background.
    reaper: Reaper,
    /// Layer directories made ahead of the creates that take them.
    spares: Spares,
    /// The teardowns of merged views detached by a Put.
    teardowns: Teardowns,
}

/// A removed layer's directory, moved into `trash/`, waiting to be deleted.
struct Doomed {
    trash: PathBuf,
    /// The data root and layer number of a size-limited layer, whose quota project is released after it.
    project: Option<(PathBuf, u64)>,
    /// Keeps garbage collection away until the tree is gone.
    _owned: InFlight,
    /// The layer's number and the teardowns to wait for: a merged view detached by its last Put may still hold
    /// the tree.
    layer: u64,
    teardowns: Arc<Pending>,
}

impl Doomed {
    fn delete(self) {
        self.teardowns.wait(std::iter::once(self.layer));
        // A size-limited layer's subvolume and qgroup go with the tree (see `remove_tree`).
        remove_tree(&self.trash);
        if let Some((root, n)) = &self.project {
            quota::release_project(root, *n);
        }
    }
}

/// Removed layers deleted together: the trash thread waits for this many, or for [`TRASH_WAIT`] after the first.
const TRASH_BATCH: usize = 8;
/// The longest a removed layer waits in `trash/` for others to be deleted with it.
const TRASH_WAIT: Duration = Duration::from_millis(250);

/// One thread, started at the first removal, that deletes removed layers at the lowest CPU priority: a removal
/// answers once its directory is out of view, and the deletion neither costs a thread of its own nor takes the
/// CPU from the calls that follow. It deletes in batches ([`TRASH_BATCH`], [`TRASH_WAIT`]): on a machine with
/// few CPUs and a kernel that does not preempt a system call, a call that arrives while the thread is inside an
/// `rmdir` waits for it, and one burst after several removals delays one call where a deletion after each
/// removal delayed the next call every time (docs/benchmarks.md). Deletes in the caller's thread if the thread
/// cannot be started.
#[derive(Debug, Default)]
struct Reaper {
    queue: OnceLock<Option<mpsc::Sender<Doomed>>>,
}

impl Reaper {
    fn delete(&self, doomed: Doomed) {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Doomed>();
            let spawned = std::thread::Builder::new()
                .name("trash".into())
                .spawn(move || {
                    if let Err(e) = lamina_sys::thread::lower_priority() {
                        debug!(error = %e, "could not lower the priority of the trash thread");
                    }
                    while let Ok(first) = rx.recv() {
                        let deadline = Instant::now() + TRASH_WAIT;
                        let mut batch = vec![first];
                        while batch.len() < TRASH_BATCH {
                            // Disconnected (the store closed) ends the wait too: what is queued goes now.
                            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                                Ok(doomed) => batch.push(doomed),
                                Err(_) => break,
                            }
                        }
                        for doomed in batch {
                            doomed.delete();
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    warn!(error = %e, "could not start the trash thread; removed layers are deleted in place");
                    None
                }
            }
        });
        match queue {
            Some(tx) => {
                if let Err(mpsc::SendError(doomed)) = tx.send(doomed) {
                    doomed.delete();
                }
            }
            None => doomed.delete(),
        }
    }
}

impl OverlayBackend {
    /// The backend of the data root `root`; makes its `layers/`, `staging/` and `trash/`.
    /// `next` is the store's layer number counter, from which spares take their numbers.
    pub(crate) fn open(
        root: &Path,
        mounter: Arc<dyn Mounter>,
        next: Arc<AtomicU64>,
    ) -> Result<OverlayBackend> {
        for d in ["layers", "staging", "trash"] {
            mkdir(&root.join(d), 0o700)?;
        }
        let in_flight = Arc::new(Mutex::new(HashSet::new()));
        Ok(OverlayBackend {
            root: root.to_path_buf(),
            mounter,
            in_flight: in_flight.clone(),
            seq: AtomicU64::new(0),
            reaper: Reaper::default(),
            spares: Spares::new(root, next, in_flight),
            teardowns: Teardowns::new(),
        })
    }

    fn layer_dir(&self, n: u64) -> PathBuf {
        self.layer_path(n, "")
    }

    fn diff_dir(&self, n: u64) -> PathBuf {
        self.layer_path(n, "diff")
    }

    /// `layers/<n>/<leaf>` (`layers/<n>` for an empty `leaf`), made in one allocation: a mount names every
    /// layer of its stack.
    fn layer_path(&self, n: u64, leaf: &str) -> PathBuf {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let root = self.root.as_os_str().as_bytes();
        let mut b = Vec::with_capacity(root.len() + 32);
        b.extend_from_slice(root);
        if !root.is_empty() && !root.ends_with(b"/") {
            b.push(b'/');
        }
        let _ = write!(b, "layers/{n:x}");
        if !leaf.is_empty() {
            b.push(b'/');
            b.extend_from_slice(leaf.as_bytes());
        }
        PathBuf::from(std::ffi::OsString::from_vec(b))
    }

    fn trash_path(&self, n: u64) -> PathBuf {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.root
            .join("trash")
            .join(format!("{n:x}-{seq}-{}", std::process::id()))
    }

    /// Makes `layers/<n>/{diff,work,merged}`; with `max_size`, `layers/<n>` itself carries the size limit.
    ///
    /// Without a limit the three directories are made in `staging/` and renamed into `layers/` in one step, so
    /// that a power cut leaves the whole layer directory or none (a staging leftover, removed at start). A
    /// limited one (a btrfs subvolume or an xfs project directory) is made in place, and completed at start if
    /// a cut left part of it.
    fn make_layer_dirs(&self, n: u64, max_size: Option<u64>) -> Result<()> {
        let dir = self.layer_dir(n);
        match max_size {
            Some(size) if !dir.exists() => {
                quota::create_limited_dir(&self.root.join("layers"), &format!("{n:x}"), n, size)?
            }
            Some(_) => {}
            None => {
                let seq = self.seq.fetch_add(1, Ordering::SeqCst);
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

    fn in_flight_contains(&self, p: &Path) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(p)
    }

    fn in_flight_snapshot(&self) -> HashSet<PathBuf> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Refuses a path with a mount below it: nothing is ever deleted or moved through a mount.
    fn refuse_mounted(&self, path: &Path) -> Result<()> {
        if self
            .mounter
            .mounts_under(path)
            .map_err(|e| StoreError::io("read mount table", e))?
            .is_empty()
        {
            Ok(())
        } else {
            Err(StoreError::InUse(format!(
                "{} has a mount below it",
                path.display()
            )))
        }
    }

    /// Moves `path` (an entry of `layers/`) to `quarantine/<name>-<unix ns>` unchanged, and makes both names
    /// durable.
    fn quarantine(&self, path: &Path) -> Result<()> {
        self.refuse_mounted(path)?;
        let qdir = self.root.join(QUARANTINE_DIR);
        mkdir(&qdir, 0o700)?;
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = qdir.join(format!("{name}-{}", now_ns()));
        std::fs::rename(path, &target)
            .map_err(|e| StoreError::io(format!("move {} to {}", path.display(), target.display()), e))?;
        custody::sync_dir(&qdir)?;
        if let Some(parent) = path.parent() {
            custody::sync_dir(parent)?;
        }
        warn!(from = %path.display(), to = %target.display(), "directory unknown to the metadata moved to quarantine");
        Ok(())
    }

    /// Removes a staging/trash leftover or an orphan layer directory, re-checking under the in-flight lock that
    /// no operation took it meanwhile (it is renamed into trash under the lock, then deleted).
    fn remove_unowned(
        &self,
        path: &Path,
        layer: Option<u64>,
        is_known: &dyn Fn(u64) -> Result<bool>,
    ) -> Result<()> {
        let trash = self.root.join("trash").join(format!(
            "gc-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        // Never delete through a mount.
        if !self
            .mounter
            .mounts_under(path)
            .map_err(|e| StoreError::io("read mount table", e))?
            .is_empty()
        {
            return Err(StoreError::InUse(format!(
                "{} has a mount below it",
                path.display()
            )));
        }
        {
            let busy = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if busy.contains(path) {
                return Ok(());
            }
            if let Some(n) = layer {
                if is_known(n)? && path == self.layer_dir(n) {
                    return Ok(());
                }
            }
            if path.starts_with(self.root.join("trash")) {
                drop(busy);
                remove_tree(path);
                return Ok(());
            }
            match std::fs::rename(path, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(StoreError::io(format!("move {} to trash", path.display()), e)),
            }
        }
        remove_tree(&trash);
        Ok(())
    }
}

impl LayerBackend for OverlayBackend {
    fn paths(&self, n: u64) -> LayerPaths {
        let dir = self.layer_dir(n);
        LayerPaths {
            content: dir.join("diff"),
            work: dir.join("work"),
            merged: dir.join("merged"),
            manifest: dir.join(MANIFEST_FILE),
            dir,
        }
    }

    fn made_ahead(&self) -> Option<MadeAhead> {
        self.spares.take()
    }

    fn create(&self, n: u64, _parent: Option<u64>, max_size: Option<u64>) -> Result<InFlight> {
        let owned = InFlight::new(&self.in_flight, self.layer_dir(n));
        if let Err(e) = self.make_layer_dirs(n, max_size) {
            // Nothing half-made stays behind (a subvolume with its qgroup included).
            remove_tree(&self.layer_dir(n));
            return Err(e);
        }
        Ok(owned)
    }

    fn discard(&self, n: u64) {
        remove_tree(&self.layer_dir(n));
    }

    fn create_linked(&self, n: u64, content: &Path, manifest: &Path) -> Result<InFlight> {
        let dir = self.layer_dir(n);
        let owned = InFlight::new(&self.in_flight, dir.clone());
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let staged = self.root.join("staging").join(format!("new-{n:x}-{seq}"));
        let staging = InFlight::new(&self.in_flight, staged.clone());
        let mut renamed = false;
        let link = |target: &Path, name: &str| {
            let path = staged.join(name);
            std::os::unix::fs::symlink(target, &path)
                .map_err(|e| StoreError::io(format!("link {} to {}", path.display(), target.display()), e))
        };
        let made = (|| {
            mkdir(&staged, 0o700)?;
            link(content, "diff")?;
            link(manifest, MANIFEST_FILE)?;
            mkdir(&staged.join("work"), 0o700)?;
            mkdir(&staged.join("merged"), 0o755)?;
            std::fs::rename(&staged, &dir)
                .map_err(|e| StoreError::io(format!("move new layer directory to {}", dir.display()), e))?;
            renamed = true;
            // Not flushed: every step above is a namespace operation without file data (directories and
            // symbolic links, which ext4 and xfs journal with their targets, in order), so a power cut leaves
            // either the whole directory or none, and a record whose storage is missing is linked again from
            // the tier at the next start (docs/on-disk-format.md, "Adoption from the cluster tier").
            fault::point("store.adopt.rename").map_err(|e| StoreError::io("adopt layer", e))
        })();
        drop(staging);
        if let Err(e) = made {
            remove_tree(if renamed { &dir } else { &staged });
            return Err(e);
        }
        Ok(owned)
    }

    fn remove(&self, n: u64, max_size: Option<u64>) {
        // Out of view at once; the content goes in the background.
        let dir = self.layer_dir(n);
        let trash = self.trash_path(n);
        let owned = InFlight::new(&self.in_flight, trash.clone());
        let limited = max_size.is_some().then(|| self.root.clone());
        match fault::point("store.remove.rename").and_then(|()| std::fs::rename(&dir, &trash)) {
            Ok(()) => {
                self.reaper.delete(Doomed {
                    trash,
                    project: limited.map(|root| (root, n)),
                    _owned: owned,
                    layer: n,
                    teardowns: self.teardowns.pending().clone(),
                });
                return;
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "could not move removed layer to trash; removing in place")
            }
        }
        if dir.exists() {
            self.teardowns.pending().wait(std::iter::once(n));
            remove_tree(&dir);
            if max_size.is_some() {
                quota::release_project(&self.root, n);
            }
        }
    }

    fn freeze(&self, n: u64) -> Result<DiskUsage> {
        self.freeze_with(n, &mut |_| Ok(()))
    }

    fn freeze_with(
        &self,
        n: u64,
        before_flush: &mut dyn FnMut(&DiskUsage) -> Result<()>,
    ) -> Result<DiskUsage> {
        let usage = self.usage(n)?;
        before_flush(&usage)?;
        // The content, and what `before_flush` wrote beside it, must be on disk before the record says it is
        // frozen: one `syncfs` of the filesystem holding the layer.
        fault::point("store.commit.syncfs")
            .and_then(|()| mount::syncfs(&self.layer_dir(n)))
            .map_err(|e| StoreError::io("sync committed layer", e))?;
        Ok(usage)
    }

    fn usage(&self, n: u64) -> Result<DiskUsage> {
        let dir = open_dir(&self.diff_dir(n))?;
        Ok(lamina_archive::disk_usage(dir.as_fd())?)
    }

    fn stage(&self, n: u64) -> Staging {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let token = format!("{n:x}-{seq}");
        let path = self.root.join("staging").join(&token);
        Staging {
            layer: n,
            _owned: InFlight::new(&self.in_flight, path.clone()),
            token,
            path,
        }
    }

    fn apply(&self, staging: &Staging, input: &mut dyn Read, mappings: &IdMappings) -> Result<ApplyStats> {
        let n = staging.layer;
        let staging = staging.path.as_path();
        fault::point("store.apply.stage").map_err(|e| StoreError::io("create staging directory", e))?;
        mkdir(staging, 0o755)?;
        let dirfd = open_dir(staging)?;
        let opts = ApplyOptions {
            id_mappings: mappings.clone(),
            ..ApplyOptions::default()
        };
        let stats = lamina_archive::apply_layer(dirfd.as_fd(), input, &opts)?;
        // The root of the layer keeps the mode of an empty diff dir unless the tar set it.
        fault::point("store.apply.syncfs")
            .and_then(|()| mount::syncfs(staging))
            .map_err(|e| StoreError::io("sync staged layer", e))?;
        let diff = self.diff_dir(n);
        let renamed = fault::point("store.apply.rename")
            .and_then(|()| std::fs::rename(staging, &diff))
            .map_err(|e| StoreError::io(format!("move staged layer into {}", diff.display()), e));
        renamed?;
        fault::point("store.apply.syncfs2")
            .and_then(|()| mount::syncfs(&diff))
            .map_err(|e| StoreError::io("sync layer", e))?;
        Ok(stats)
    }

    fn abandon(&self, staging: Staging) -> bool {
        let n = staging.layer;
        remove_tree(&staging.path);
        // A failure after the rename (the second sync, the final commit) leaves the content in diff/.
        let filled = std::fs::read_dir(self.diff_dir(n)).is_ok_and(|mut d| d.next().is_some());
        if !filled {
            let _ = std::fs::remove_file(self.layer_dir(n).join(MANIFEST_FILE));
        }
        filled
    }

    fn drop_staging(&self, token: &str) -> bool {
        let path = self.root.join("staging").join(token);
        if self.in_flight_contains(&path) {
            return false;
        }
        remove_tree(&path);
        true
    }

    fn reset(&self, n: u64, _parent: Option<u64>) -> Result<()> {
        if !self.layer_dir(n).exists() {
            // A power cut took the whole directory (made after the record, never synced).
            self.make_layer_dirs(n, None)?;
        }
        let diff = self.diff_dir(n);
        if diff.exists() {
            let trash = self.trash_path(n);
            std::fs::rename(&diff, &trash)
                .map_err(|e| StoreError::io(format!("move {}", diff.display()), e))?;
            remove_tree(&trash);
        }
        let _ = std::fs::remove_file(self.layer_dir(n).join(MANIFEST_FILE));
        mkdir(&diff, 0o755)?;
        mkdir(&self.layer_dir(n).join("work"), 0o700)?;
        mkdir(&self.layer_dir(n).join("merged"), 0o755)
    }

    fn write_diff(&self, n: u64, _below: &[u64], out: &mut dyn Write, opts: &DiffOptions) -> Result<()> {
        let fd = open_dir(&self.diff_dir(n))?;
        lamina_archive::write_layer_diff(fd.as_fd(), out, opts)?;
        Ok(())
    }

    fn changes(&self, n: u64, below: &[u64]) -> Result<Vec<Change>> {
        let upper = open_dir(&self.diff_dir(n))?;
        let lowers: Vec<File> = below
            .iter()
            .map(|p| open_dir(&self.diff_dir(*p)))
            .collect::<Result<_>>()?;
        let lower_fds: Vec<_> = lowers.iter().map(|f| f.as_fd()).collect();
        Ok(lamina_archive::layer_changes(upper.as_fd(), &lower_fds)?)
    }

    fn diff_size(&self, n: u64, _below: &[u64]) -> Result<u64> {
        let dir = open_dir(&self.diff_dir(n))?;
        Ok(lamina_archive::dir_size(dir.as_fd())?)
    }

    fn view(&self, n: u64, rec: &LayerRecord) -> (PathBuf, bool) {
        // A layer without parent is its own merged view.
        match rec.parent {
            None => (self.diff_dir(n), false),
            Some(_) => (self.layer_dir(n).join("merged"), true),
        }
    }

    fn mount(&self, n: u64, rec: &LayerRecord, below: &[u64], label: &str) -> io::Result<()> {
        // overlayfs refuses (or warns about) a directory that a detached overlay still holds.
        self.teardowns
            .pending()
            .wait(std::iter::once(n).chain(below.iter().copied()));
        let dir = self.layer_dir(n);
        let view = rec.kind == LayerKind::View;
        let spec = OverlaySpec {
            lowers: below.iter().map(|p| self.diff_dir(*p)).collect(),
            upper: (!view).then(|| dir.join("diff")),
            work: (!view).then(|| dir.join("work")),
            label: Some(label.to_string()),
            read_only: view,
        };
        self.mounter.mount(&MountSpec::Overlay(spec), &dir.join("merged"))
    }

    fn unmount(&self, n: u64, detach: bool) -> io::Result<()> {
        self.mounter.unmount(&self.layer_dir(n).join("merged"), detach)
    }

    /// Detached holding the mount, whose teardown (overlayfs's sync of the upper filesystem) runs on the
    /// teardown thread (`teardown.rs`).
    fn release(&self, n: u64) -> io::Result<()> {
        if let Some(held) = self.mounter.detach_held(&self.layer_dir(n).join("merged"))? {
            self.teardowns.defer(n, held);
        }
        Ok(())
    }

    fn is_mounted(&self, n: u64) -> bool {
        self.mounter
            .is_mount_point(&self.layer_dir(n).join("merged"))
            .unwrap_or(false)
    }

    fn mounted(&self) -> Result<HashSet<u64>> {
        let layers_dir = self.root.join("layers");
        Ok(self
            .mounter
            .mounts_under(&layers_dir)
            .map_err(|e| StoreError::io("read mount table", e))?
            .iter()
            .filter_map(|mp| parse_merged(&layers_dir, mp))
            .collect())
    }

    /// As containerd's overlayfs snapshotter gives it: a bind mount of a parentless active layer and of a
    /// view of at most one layer, an overlay otherwise.
    fn describe(&self, n: u64, rec: &LayerRecord, below: &[u64]) -> Result<MountSpec> {
        // The caller mounts what this describes.
        self.teardowns
            .pending()
            .wait(std::iter::once(n).chain(below.iter().copied()));
        let lowers: Vec<PathBuf> = below.iter().map(|p| self.diff_dir(*p)).collect();
        Ok(match (rec.kind, lowers.as_slice()) {
            (LayerKind::View, []) => MountSpec::Bind {
                source: self.diff_dir(n),
                read_only: true,
            },
            (LayerKind::View, [only]) => MountSpec::Bind {
                source: only.clone(),
                read_only: true,
            },
            (LayerKind::View, _) => MountSpec::Overlay(OverlaySpec {
                lowers,
                read_only: true,
                ..OverlaySpec::default()
            }),
            (_, []) => MountSpec::Bind {
                source: self.diff_dir(n),
                read_only: false,
            },
            (_, _) => MountSpec::Overlay(OverlaySpec {
                lowers,
                upper: Some(self.diff_dir(n)),
                work: Some(self.layer_dir(n).join("work")),
                ..OverlaySpec::default()
            }),
        })
    }

    fn describes_in_memory(&self) -> bool {
        true
    }

    fn clear_leftovers(&self) -> Result<()> {
        self.spares.clear();
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
        Ok(())
    }

    fn stored(&self) -> Result<usize> {
        // Spares a crash left hold nothing: not counted as storage.
        let layers = self.root.join("layers");
        let dev = dev_of(&layers)?;
        Ok(list_dir(&layers)?
            .iter()
            .filter(|p| !is_spare_tree(p, dev))
            .count())
    }

    fn quarantine_all(&self) -> Result<()> {
        for path in list_dir(&self.root.join("layers"))? {
            self.quarantine(&path)?;
        }
        Ok(())
    }

    fn exists(&self, n: u64) -> bool {
        std::fs::symlink_metadata(self.layer_dir(n)).is_ok()
    }

    fn sync_removals(&self) -> Result<()> {
        // A removed layer's directory left `layers/` by a rename (into `trash/`) or by its deletion in place.
        let layers = self.root.join("layers");
        std::fs::File::open(&layers)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(format!("sync {}", layers.display()), e))
    }

    fn recover(&self, state: &Recovery<'_>) -> Result<Vec<u64>> {
        let (known, removed, record_of) = (state.known, state.removed, state.record_of);
        // Mounts first: nothing may be deleted through a live mount.
        let layers_dir = self.root.join("layers");
        let mut kept = Vec::new();
        for mp in self
            .mounter
            .mounts_under(&self.root)
            .map_err(|e| StoreError::io("read mount table", e))?
        {
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
                    kept.push(n);
                }
                _ => {
                    warn!(mount = %mp.display(), "detaching stale mount");
                    self.mounter
                        .unmount(&mp, true)
                        .map_err(|e| StoreError::io("unmount stale mount", e))?;
                }
            }
        }
        // One read of `layers/`, no per-layer stat: start-up stays well under a second with 10,000 layers on a
        // cold cache (a stat of every `layers/<n>/diff` took 1.2 s there).
        let mut present = HashSet::new();
        let mut deleted = false;
        let dev = dev_of(&layers_dir)?;
        for entry in std::fs::read_dir(&layers_dir).map_err(|e| StoreError::io("read layers dir", e))? {
            let entry = entry.map_err(|e| StoreError::io("read layers dir", e))?;
            let name = entry.file_name();
            let n = name
                .to_str()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .filter(|n| name.to_str() == Some(format!("{n:x}").as_str()));
            match n {
                Some(n) if known.contains(&n) => {
                    present.insert(n);
                }
                Some(n) if removed.contains(&n) => {
                    // Its removal was committed before the crash: this store's to delete.
                    info!(dir = %entry.path().display(), "removing the directory of a removed layer");
                    remove_tree(&entry.path());
                    deleted = true;
                }
                _ if is_spare_tree(&entry.path(), dev) => {
                    // A spare made ahead for a number no create took before the stop (spare.rs): three empty
                    // directories, nothing to keep.
                    info!(dir = %entry.path().display(), "removing a spare layer directory of a previous run");
                    remove_tree(&entry.path());
                    deleted = true;
                }
                _ if is_link_only(&entry.path()) => {
                    // An adoption from the cluster tier cut short before its record: its content is a link to
                    // the tier and its manifest a copy of the tier's, nothing of its own.
                    info!(dir = %entry.path().display(), "removing a layer directory linked to the cluster tier that no record names");
                    remove_tree(&entry.path());
                    deleted = true;
                }
                _ => {
                    // No record explains it (an older database, or not lamina's): kept, out of the way.
                    self.quarantine(&entry.path())?;
                }
            }
        }
        if deleted || !removed.is_empty() {
            // The store drops the proofs of removal next: the deletions (these, and the renames into trash/ of
            // the removals before the last start, which nothing synced) must be on disk first.
            mount::syncfs(&layers_dir).map_err(|e| StoreError::io("sync layers", e))?;
        }
        for n in known.iter().filter(|n| !present.contains(n)) {
            let rec = record_of(*n)?;
            if rec.as_ref().is_some_and(|r| r.shared.is_some()) {
                // Its content is the cluster tier's: the store links it again from there, never empty.
                continue;
            }
            // A create's directories that had not reached the disk when the power went (they are made after
            // the record); an empty layer loses nothing.
            warn!(layer = n, "layer directory missing; recreating it empty");
            self.make_layer_dirs(*n, rec.and_then(|r| r.max_size))?;
        }
        Ok(kept)
    }

    fn stale_mounts(&self, known: &HashSet<u64>) -> Result<Vec<Garbage>> {
        let layers_dir = self.root.join("layers");
        let watched = [
            layers_dir.clone(),
            self.root.join("staging"),
            self.root.join("trash"),
        ];
        let mut out = Vec::new();
        for mp in self
            .mounter
            .mounts_under(&self.root)
            .map_err(|e| StoreError::io("read mount table", e))?
        {
            if !watched.iter().any(|w| mp.starts_with(w)) {
                continue;
            }
            if let Some(n) = parse_merged(&layers_dir, &mp) {
                if known.contains(&n) || self.in_flight_contains(&self.layer_dir(n)) {
                    continue;
                }
            }
            out.push(Garbage::unnamed(GarbageKind::StaleMount, mp, None, 0));
        }
        Ok(out)
    }

    fn interrupted_apply(&self, n: u64, token: &str) -> Option<Garbage> {
        let path = self.root.join("staging").join(token);
        if self.in_flight_contains(&path) {
            return None;
        }
        let bytes = usage_of(&path) + usage_of(&self.diff_dir(n));
        Some(Garbage::unnamed(
            GarbageKind::InterruptedApply,
            path,
            Some(n),
            bytes,
        ))
    }

    fn leftovers(&self, scope: &LeftoverScope<'_>) -> Result<Vec<Garbage>> {
        let (pending, known, removed, unknown) = (scope.pending, scope.known, scope.removed, scope.unknown);
        let mut out = Vec::new();
        // Staging and trash leftovers: listed first, then compared with the operations in flight.
        for (dir, kind) in [("staging", GarbageKind::Staging), ("trash", GarbageKind::Trash)] {
            let entries = list_dir(&self.root.join(dir))?;
            let busy = self.in_flight_snapshot();
            for path in entries {
                let file_name = path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if busy.contains(&path) || pending.contains(&file_name) || !path.exists() {
                    continue;
                }
                let bytes = usage_of(&path);
                out.push(Garbage::unnamed(kind, path, None, bytes));
            }
        }
        // Layer directories without a record: the in-flight set is read before the records, so a create that
        // finishes in between is seen in the records.
        let layers = self.root.join("layers");
        let dev = dev_of(&layers)?;
        let dirs = list_dir(&layers)?;
        let busy = self.in_flight_snapshot();
        let known = known()?;
        for path in dirs {
            let n = path
                .file_name()
                .and_then(|s| s.to_str())
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            if busy.contains(&path) || n.is_some_and(|n| known.contains(&n)) {
                continue;
            }
            let kind = if n.is_some_and(|n| removed.contains(&n)) {
                GarbageKind::OrphanDir
            } else if is_spare_tree(&path, dev) {
                GarbageKind::Spare
            } else if unknown {
                GarbageKind::UnknownDir
            } else {
                continue;
            };
            let bytes = usage_of(&path);
            out.push(Garbage::unnamed(kind, path, n, bytes));
        }
        let quarantine = self.root.join(QUARANTINE_DIR);
        if unknown && quarantine.exists() {
            for path in list_dir(&quarantine)? {
                let bytes = usage_of(&path);
                out.push(Garbage::unnamed(GarbageKind::Quarantined, path, None, bytes));
            }
        }
        Ok(out)
    }

    fn collect(&self, g: &Garbage, is_known: &dyn Fn(u64) -> Result<bool>) -> Result<()> {
        match g.kind {
            GarbageKind::StaleMount => self
                .mounter
                .unmount(&g.path, true)
                .map_err(|e| StoreError::io("detach stale mount", e)),
            GarbageKind::Staging
            | GarbageKind::Trash
            | GarbageKind::OrphanDir
            | GarbageKind::UnknownDir
            | GarbageKind::Spare => self.remove_unowned(&g.path, g.layer, is_known),
            GarbageKind::Quarantined => {
                self.refuse_mounted(&g.path)?;
                remove_tree(&g.path);
                Ok(())
            }
            GarbageKind::InterruptedApply
            | GarbageKind::RemovedNamespace
            | GarbageKind::TierLayer
            | GarbageKind::TierLeftover => Ok(()),
        }
    }

    fn referenced(&self) -> HashSet<u64> {
        let table = self.mounter.mount_table().unwrap_or_default();
        referenced_by_mounts(&table, &self.root.join("layers"))
    }

    fn bytes_of(&self, path: &Path) -> u64 {
        usage_of(path)
    }
}

/// Whether the layer directory `dir` holds nothing of its own: its `diff` a symbolic link (only a layer linked
/// to the cluster tier has one), beside it at most empty `work/` and `merged/` and a `manifest` (a link to the
/// tier's, or a file).
/// The device of the filesystem holding `dir`.
fn dev_of(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|md| md.dev())
        .map_err(|e| StoreError::io(format!("stat {}", dir.display()), e))
}

fn is_link_only(dir: &Path) -> bool {
    let linked = std::fs::symlink_metadata(dir.join("diff")).is_ok_and(|m| m.file_type().is_symlink());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    linked
        && rd.into_iter().all(|e| {
            let Ok(e) = e else { return false };
            match e.file_name().to_str() {
                Some("diff") | Some(MANIFEST_FILE) => true,
                Some("work") | Some("merged") => {
                    std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none())
                }
                _ => false,
            }
        })
}

/// The layer number of a mount point `<layers_dir>/<hex>/merged`.
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

fn usage_of(path: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !md.is_dir() {
        return std::os::unix::fs::MetadataExt::blocks(&md) * 512;
    }
    match open_dir(path) {
        Ok(f) => lamina_archive::disk_usage(f.as_fd())
            .map(|u| u.bytes)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Layer numbers of this store that a mount in `table` (mountinfo format) refers to (`<layers_dir>/<hex>/...`
/// in its root or options). Only paths under this store's own `layers/` count: another store's overlays
/// (another data root in the same process or on the host) name the same numbers under a different directory.
fn referenced_by_mounts(table: &str, layers_dir: &Path) -> HashSet<u64> {
    let mut out = HashSet::new();
    let needle = format!("{}/", layers_dir.display());
    for line in table.lines() {
        let mut at = 0;
        while let Some(i) = line[at..].find(&needle) {
            let start = at + i;
            at = start + needle.len();
            // The path must start there, not be the tail of a longer one (`/x/data/layers/` for `/data/layers/`).
            let boundary = line[..start]
                .chars()
                .next_back()
                .is_none_or(|c| matches!(c, ' ' | '=' | ':' | ','));
            if !boundary {
                continue;
            }
            let rest = &line[at..];
            let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            if !hex.is_empty() && rest[hex.len()..].starts_with('/') {
                if let Ok(n) = u64::from_str_radix(&hex, 16) {
                    out.insert(n);
                }
            }
        }
    }
    out
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(format!("read {}", dir.display()), e))? {
        out.push(
            entry
                .map_err(|e| StoreError::io(format!("read {}", dir.display()), e))?
                .path(),
        );
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_are_the_joined_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let with_slash = PathBuf::from(format!("{}/", tmp.path().display()));
        for root in [tmp.path().to_path_buf(), with_slash] {
            let b = OverlayBackend::open(
                &root,
                Arc::new(lamina_sys::mounter::FakeMounter::new()),
                Arc::default(),
            )
            .unwrap();
            for n in [1u64, 0x2a, u64::MAX] {
                let dir = root.join("layers").join(format!("{n:x}"));
                assert_eq!(b.layer_dir(n).as_os_str(), dir.as_os_str());
                assert_eq!(b.diff_dir(n).as_os_str(), dir.join("diff").as_os_str());
            }
        }
    }
}
