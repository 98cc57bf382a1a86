//! The backend seam: where a layer's content lives and how it is mounted.
//!
//! The store keeps everything that does not depend on the storage above this seam: names and records in the
//! metadata database, parent checks, per-layer locks and mount reference counts, the `pending` rows of
//! applies, `verify_on_mount`, usage statistics and the garbage rules (what is in use, what a namespace
//! removal may take). A [`LayerBackend`] does the storage work on layer numbers: make and drop a layer's
//! storage, fill it from a tar, describe and bring up its merged view, diff it against its parent, and find
//! what a crash left behind.
//!
//! The first and only implementation is [`crate::overlay::OverlayBackend`]: a directory per layer, stacked
//! by overlayfs. A block-device backend (each layer an image cloned from its parent's snapshot, holding the
//! whole tree as a plain filesystem) fits the same calls: `create` clones the parent's snapshot, `apply`
//! writes into the mounted clone and seals it with a snapshot, `view` is the mounted image and `describe` a
//! [`MountSpec::Bind`] of it, `write_diff` and `changes` compare the layer's filesystem with its parent's.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use lamina_archive::{ApplyStats, Change, DiffOptions, DiskUsage, IdMappings};
use lamina_sys::mount::MountSpec;

use crate::{Garbage, InFlight, LayerRecord, Result};

/// The places of one layer that the store reports (`LayerInfo`, the Docker driver's metadata) and where its
/// content manifest is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerPaths {
    /// Where the layer's storage is.
    pub dir: PathBuf,
    /// The layer's own content.
    pub content: PathBuf,
    /// Scratch space of a writable mount, beside the content.
    pub work: PathBuf,
    /// Where the merged view of a layer with parents is mounted.
    pub merged: PathBuf,
    /// The layer's content manifest file.
    pub manifest: PathBuf,
}

/// Where an apply into one layer is staged; the token is recorded in the `pending` table until the apply is
/// done, so that recovery and garbage collection find what a crash left.
pub(crate) struct Staging {
    /// The layer the apply fills.
    pub layer: u64,
    /// Recorded in the metadata.
    pub token: String,
    /// The staged content.
    pub path: PathBuf,
    /// Keeps garbage collection away from the staging while the apply runs.
    pub _owned: InFlight,
}

/// What the store knows at start-up, for [`LayerBackend::recover`].
pub(crate) struct Recovery<'a> {
    /// The layers with a record.
    pub known: &'a HashSet<u64>,
    /// The layers whose removal was committed; their storage may remain.
    pub removed: &'a HashSet<u64>,
    /// The record of a known layer.
    pub record_of: &'a dyn Fn(u64) -> Result<Option<LayerRecord>>,
}

/// What garbage collection accounts for, for [`LayerBackend::leftovers`].
pub(crate) struct LeftoverScope<'a> {
    /// The staging tokens of the `pending` table.
    pub pending: &'a HashSet<String>,
    /// The layers with a record, read after the operations in flight, so that storage created meanwhile is not
    /// taken.
    pub known: &'a dyn Fn() -> Result<HashSet<u64>>,
    /// The layers whose removal was committed.
    pub removed: &'a HashSet<u64>,
    /// Whether storage no record explains and quarantined storage are garbage too.
    pub unknown: bool,
}

/// Storage made ahead of its create (the overlay backend's spare layer directory), under the layer number `n`.
/// Dropped without [`MadeAhead::keep`] (its create failed before the layer's record), it removes the storage.
pub(crate) struct MadeAhead {
    /// The layer number the storage was made for.
    pub n: u64,
    dir: PathBuf,
    owned: Option<InFlight>,
}

impl MadeAhead {
    /// The storage `dir` of layer `n`, with its place in the in-flight set.
    pub(crate) fn new(n: u64, dir: PathBuf, owned: InFlight) -> MadeAhead {
        MadeAhead {
            n,
            dir,
            owned: Some(owned),
        }
    }

    /// The storage becomes the layer's: gives its guard, as [`LayerBackend::create`] does.
    pub(crate) fn keep(mut self) -> InFlight {
        self.owned.take().expect("storage made ahead is kept once")
    }
}

impl Drop for MadeAhead {
    fn drop(&mut self) {
        if self.owned.is_some() {
            // Removed while still in flight, so that no collection meets it half-deleted.
            crate::remove_tree(&self.dir);
        }
    }
}

/// The storage operations of the store, on layer numbers. See the module documentation.
pub(crate) trait LayerBackend: Send + Sync + std::fmt::Debug {
    /// The places of layer `n`.
    fn paths(&self, n: u64) -> LayerPaths;

    /// Makes the empty storage of a new layer (with a size limit when asked), after its record was written (a
    /// crash in between leaves a record without storage, which [`LayerBackend::recover`] makes). It appears
    /// whole or not at all. The returned guard keeps garbage collection away from it while it is being made.
    /// Nothing is left behind on error.
    fn create(&self, n: u64, parent: Option<u64>, max_size: Option<u64>) -> Result<InFlight>;

    /// Drops the storage of a layer whose record was never written.
    fn discard(&self, n: u64);

    /// Empty storage without a size limit, made already under a layer number the backend took from the store's
    /// counter: a create uses its number and keeps it ([`MadeAhead::keep`]) instead of calling
    /// [`LayerBackend::create`]. None when the backend keeps none ready.
    fn made_ahead(&self) -> Option<MadeAhead> {
        None
    }

    /// Drops the storage of a removed layer (its record is gone); may finish in the background.
    fn remove(&self, n: u64, max_size: Option<u64>);

    /// Makes the content of a writable layer durable before it is recorded frozen; gives its disk usage.
    fn freeze(&self, n: u64) -> Result<DiskUsage>;

    /// [`LayerBackend::freeze`], with `before_flush` called once the usage is known and before the content
    /// is made durable: whatever it writes into the layer's storage is made durable by the same flush. A
    /// backend that keeps no manifests ([`LayerBackend::manifests`]) may freeze without calling it.
    fn freeze_with(
        &self,
        n: u64,
        _before_flush: &mut dyn FnMut(&DiskUsage) -> Result<()>,
    ) -> Result<DiskUsage> {
        self.freeze(n)
    }

    /// Disk usage of the layer's own content now.
    fn usage(&self, n: u64) -> Result<DiskUsage>;

    /// Reserves the staging of an apply into layer `n`.
    fn stage(&self, n: u64) -> Staging;

    /// Unpacks `input` into the staging and makes it the content of the staging's layer, durably.
    fn apply(&self, staging: &Staging, input: &mut dyn Read, mappings: &IdMappings) -> Result<ApplyStats>;

    /// Cleans up after a failed apply; true if content may have reached the layer (it must be reset).
    fn abandon(&self, staging: Staging) -> bool;

    /// Drops the staging of an apply a crash interrupted (not one still running: false then).
    fn drop_staging(&self, token: &str) -> bool;

    /// Puts the layer's content back to empty, as created on `parent` (its manifest goes too); makes the
    /// layer's storage first if a power cut took it (it was made after the record and never synced).
    fn reset(&self, n: u64, parent: Option<u64>) -> Result<()>;

    /// Streams the layer's own changes against its parent as a tar; `below` is its chain, nearest first.
    fn write_diff(&self, n: u64, below: &[u64], out: &mut dyn Write, opts: &DiffOptions) -> Result<()>;

    /// The layer's own changes against its parent; `below` is its chain, nearest first.
    fn changes(&self, n: u64, below: &[u64]) -> Result<Vec<Change>>;

    /// Bytes of the layer's own changes against its parent; `below` is its chain, nearest first.
    fn diff_size(&self, n: u64, below: &[u64]) -> Result<u64>;

    /// Where the merged view of layer `n` is, and whether it must be mounted to be there.
    fn view(&self, n: u64, rec: &LayerRecord) -> (PathBuf, bool);

    /// Brings up the merged view of layer `n` on the layers `below` (nearest first).
    fn mount(&self, n: u64, rec: &LayerRecord, below: &[u64], label: &str) -> io::Result<()>;

    /// Takes the merged view of layer `n` down; lazily with `detach`.
    fn unmount(&self, n: u64, detach: bool) -> io::Result<()>;

    /// Takes the merged view of layer `n` down after its last Put: detached at once, its teardown possibly
    /// finishing after this returns, in which case every later mount or description of `n` or of a layer above
    /// it, and the deletion of `n`, wait for that teardown first.
    fn release(&self, n: u64) -> io::Result<()> {
        self.unmount(n, true)
    }

    /// Whether the merged view of layer `n` is up (whoever brought it up).
    fn is_mounted(&self, n: u64) -> bool;

    /// The layers whose merged view is up.
    fn mounted(&self) -> Result<HashSet<u64>>;

    /// The merged view of a writable layer or view for a caller that mounts it itself (a block backend
    /// attaches the layer's filesystem here, until the layer is committed or removed).
    fn describe(&self, n: u64, rec: &LayerRecord, below: &[u64]) -> Result<MountSpec>;

    /// Whether [`Backend::describe`] only composes paths (no I/O, nothing to attach).
    fn describes_in_memory(&self) -> bool {
        false
    }

    /// Whether the store keeps content manifests of this backend's frozen layers (read from
    /// [`LayerPaths::content`] without a mount).
    fn manifests(&self) -> bool {
        true
    }

    /// Start-up, first step: removes the leftovers of operations a crash cut short.
    fn clear_leftovers(&self) -> Result<()>;

    /// How many layers' storage there is, known or not (the open refuses a new database beside some).
    fn stored(&self) -> Result<usize>;

    /// Moves the storage of every layer, untouched, where the store no longer sees it (`quarantine/`): the
    /// operator's answer to a lost or foreign database.
    fn quarantine_all(&self) -> Result<()>;

    /// Start-up, after interrupted applies were rolled back: takes down views no known layer owns, deletes the
    /// storage of removed layers (their removal was committed) and makes every deletion of theirs durable (the
    /// store drops their proofs next), moves storage that no record explains
    /// to quarantine (never deleted on the evidence of missing metadata) except storage that holds only links
    /// to the cluster tier (deleted), recreates missing storage of known layers except those whose content is
    /// the tier's (`shared`: the store links them again), and returns the known layers whose view is still up.
    /// See [`Recovery`].
    fn recover(&self, state: &Recovery<'_>) -> Result<Vec<u64>>;

    /// Whether any storage of layer `n` is there.
    fn exists(&self, n: u64) -> bool;

    /// Makes durable the removals of layers whose storage no longer [`exists`](LayerBackend::exists), so that
    /// the store may drop their proofs of removal.
    fn sync_removals(&self) -> Result<()>;

    /// Garbage collection: mounts that belong to no layer (`known`) and no operation in flight.
    fn stale_mounts(&self, known: &HashSet<u64>) -> Result<Vec<Garbage>>;

    /// Garbage collection: the staging of an interrupted apply of layer `n`, unless it is still running.
    fn interrupted_apply(&self, n: u64, token: &str) -> Option<Garbage>;

    /// Garbage collection: leftovers, storage of removed layers, and (when asked) storage no record explains
    /// and quarantined storage. See [`LeftoverScope`].
    fn leftovers(&self, scope: &LeftoverScope<'_>) -> Result<Vec<Garbage>>;

    /// Garbage collection: removes one stale mount or leftover that nothing took meanwhile.
    fn collect(&self, g: &Garbage, is_known: &dyn Fn(u64) -> Result<bool>) -> Result<()>;

    /// Layers that some mount in the system uses (not only this store's views).
    fn referenced(&self) -> HashSet<u64>;

    /// Bytes on disk of a path this backend reported.
    fn bytes_of(&self, path: &Path) -> u64;

    /// Makes the whole storage of layer `n`, before its record: its content directory a symbolic link to
    /// `content` (a published layer of the cluster tier, never changed), so that stacks take it as a lower
    /// directory, and its manifest a symbolic link to `manifest` (the tier layer's, which never changes either;
    /// the caller checked it against the seal). The storage appears whole or not at all; it is not flushed: a
    /// crash before the record that names it leaves storage holding only links, which
    /// [`LayerBackend::recover`] deletes (the tier holds the content), and a power cut after that record
    /// leaves a record whose storage is missing, which recovery does not recreate empty: the store links it
    /// again from the tier. The returned guard keeps garbage collection away from it until the record is
    /// committed. Nothing is left behind on error. For backends whose content is a directory.
    fn create_linked(&self, n: u64, _content: &Path, _manifest: &Path) -> Result<InFlight> {
        Err(crate::StoreError::Precondition(format!(
            "layer {n}: this backend cannot link a layer of the cluster tier"
        )))
    }
}
