//! Garbage collection: what nothing references.
//!
//! Kinds of garbage, and why each is safe to remove:
//! - **staging** / **trash** entries that no operation of this process is working on (leftovers of a crash);
//! - **interrupted applies**: a `pending` row whose apply is not running (lamina died mid-ApplyDiff); the layer
//!   goes back to empty, as the start-up recovery does;
//! - **orphan directories** in `layers/` whose removal this store committed (a row in `removed`: a remove cut
//!   short), never one a create in progress owns;
//! - only when an operator asks ([`GcOptions::unknown`], which `lamina gc` sets and the periodic collection
//!   does not): **unknown directories** in `layers/` (no record and no proof of removal: an older or lost
//!   database) and the entries of `quarantine/`;
//! - **stale mounts** below `layers/`, `staging/` or `trash/` that are not the merged view of a known layer
//!   (mounts of known layers are kept: a running container may use them);
//! - layers of a **removed namespace**, only when the operator names it (`lamina gc --namespace NS`); a layer
//!   that is mounted, or that any mount in the mount table refers to, is kept with every layer below it.
//!
//! Everything is checked against the operations in flight (a set of paths the store is working on), so a
//! collection is safe while dockerd and containerd use the store.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::backend::LeftoverScope;
use crate::stats::Counter;
use crate::{lock, LayerRecord, Result, Store, StoreError};

/// What a piece of garbage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GarbageKind {
    /// A mount below the data root that belongs to no layer.
    StaleMount,
    /// An apply that a crash interrupted (its layer is rolled back to empty).
    InterruptedApply,
    /// A leftover in `staging/`.
    Staging,
    /// A leftover in `trash/`.
    Trash,
    /// The directory of a layer whose removal was committed.
    OrphanDir,
    /// A layer of a namespace the operator declared removed.
    RemovedNamespace,
    /// A directory in `layers/` that no record explains and that this store never removed.
    UnknownDir,
    /// A spare layer directory a stopped daemon left in `layers/`: exactly three empty directories that no record
    /// names (the spares of a running daemon are in flight, and skipped).
    Spare,
    /// An entry of `quarantine/`.
    Quarantined,
    /// A layer of the cluster tier that no live host holds (removed by the tier's own collection).
    TierLayer,
    /// A publication cut short or trash in the cluster tier.
    TierLeftover,
}

/// One piece of garbage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Garbage {
    /// Kind.
    pub kind: GarbageKind,
    /// The path concerned.
    pub path: PathBuf,
    /// The layer number, when it concerns a layer.
    pub layer: Option<u64>,
    /// `namespace/name` of that layer, when it has a record.
    pub name: Option<String>,
    /// Bytes it takes on disk (allocated blocks; 0 for mounts).
    pub bytes: u64,
}

impl Garbage {
    /// Garbage of `kind` at `path` that no layer record names.
    pub(crate) fn unnamed(kind: GarbageKind, path: PathBuf, layer: Option<u64>, bytes: u64) -> Self {
        Garbage {
            kind,
            path,
            layer,
            name: None,
            bytes,
        }
    }
}

/// A layer of a removed namespace that was kept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// `namespace/name`.
    pub name: String,
    /// Layer number.
    pub layer: u64,
    /// Why.
    pub reason: String,
}

/// What [`Store::gc`] found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Whether nothing was removed on purpose.
    pub dry_run: bool,
    /// The garbage found (and, unless a dry run, removed).
    pub items: Vec<Garbage>,
    /// Layers of removed namespaces that had to stay.
    pub kept: Vec<Kept>,
    /// Items that could not be removed, with the error.
    pub errors: Vec<String>,
    /// Total bytes of `items`.
    pub bytes: u64,
    /// Time taken, milliseconds.
    pub elapsed_ms: u64,
}

/// Options of [`Store::gc`].
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Only list.
    pub dry_run: bool,
    /// Namespaces declared removed: all their layers are garbage unless in use.
    pub removed_namespaces: Vec<String>,
    /// Namespaces that must never be removed (the graph driver's current one).
    pub protected_namespaces: Vec<String>,
    /// Also what the metadata does not know (unknown `layers/` entries, `quarantine/`): an operator's explicit
    /// request, never the periodic collection.
    pub unknown: bool,
}

impl GcOptions {
    /// The same collection as a dry run: it only lists.
    pub fn dry_run(&self) -> GcOptions {
        GcOptions {
            dry_run: true,
            ..self.clone()
        }
    }
}

impl Store {
    /// Finds garbage (see the module docs) and, unless `opts.dry_run`, removes it.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let started = Instant::now();
        for ns in &opts.removed_namespaces {
            if opts.protected_namespaces.contains(ns) {
                return Err(StoreError::InvalidArgument(format!(
                    "namespace {ns:?} is in use by a front door of this store; it cannot be declared removed"
                )));
            }
        }
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        // 1. Mounts. Listed deepest first.
        let known_before = self.known_layers()?;
        report.items.extend(self.backend.stale_mounts(&known_before)?);
        // 2. Interrupted applies.
        let pending = self.read()?.pending()?;
        let mut pending_staging = HashSet::new();
        for (n, staging) in pending {
            let Some(mut g) = self.backend.interrupted_apply(n, &staging) else {
                continue;
            };
            pending_staging.insert(staging);
            g.name = self.record_by_number(n)?.map(|r| format!("{}/{}", r.ns, r.name));
            report.items.push(g);
        }
        // 3. Leftovers and 4. storage without a record.
        report.items.extend(self.backend.leftovers(&LeftoverScope {
            pending: &pending_staging,
            known: &|| self.known_layers(),
            removed: &self.read()?.removed()?,
            unknown: opts.unknown,
        })?);
        // 5. Removed namespaces.
        let mut doomed: Vec<(u64, LayerRecord)> = Vec::new();
        if !opts.removed_namespaces.is_empty() {
            let referenced = self.backend.referenced();
            let all = self.list()?;
            let by_number: BTreeMap<u64, &LayerRecord> = all.iter().map(|(n, r)| (*n, r)).collect();
            let mut keep: BTreeMap<u64, String> = BTreeMap::new();
            for (n, rec) in &all {
                if !opts.removed_namespaces.contains(&rec.ns) {
                    continue;
                }
                let mounts = self.slots.mounts(*n);
                let reason = if mounts > 0 {
                    Some(format!("mounted ({mounts} references)"))
                } else if referenced.contains(n) {
                    Some("a mount in the mount table uses it".to_string())
                } else {
                    None
                };
                if let Some(reason) = reason {
                    // It and everything below it stay.
                    let mut cur = Some(*n);
                    let mut why = reason;
                    while let Some(c) = cur {
                        keep.entry(c).or_insert_with(|| why.clone());
                        why = format!("below kept layer {n:x}");
                        cur = by_number.get(&c).and_then(|r| r.parent);
                    }
                }
            }
            // A child in another namespace keeps its parents too.
            for (n, rec) in &all {
                if opts.removed_namespaces.contains(&rec.ns) {
                    continue;
                }
                let mut cur = rec.parent;
                while let Some(c) = cur {
                    if by_number
                        .get(&c)
                        .is_some_and(|r| opts.removed_namespaces.contains(&r.ns))
                    {
                        keep.entry(c)
                            .or_insert_with(|| format!("parent of layer {n:x} of another namespace"));
                    }
                    cur = by_number.get(&c).and_then(|r| r.parent);
                }
            }
            for (n, rec) in &all {
                if !opts.removed_namespaces.contains(&rec.ns) {
                    continue;
                }
                if let Some(reason) = keep.get(n) {
                    report.kept.push(Kept {
                        name: format!("{}/{}", rec.ns, rec.name),
                        layer: *n,
                        reason: reason.clone(),
                    });
                    continue;
                }
                let paths = self.backend.paths(*n);
                let bytes = match rec.size {
                    Some(b) => b,
                    None => self.backend.bytes_of(&paths.content),
                };
                report.items.push(Garbage {
                    kind: GarbageKind::RemovedNamespace,
                    path: paths.dir,
                    layer: Some(*n),
                    name: Some(format!("{}/{}", rec.ns, rec.name)),
                    bytes,
                });
                doomed.push((*n, rec.clone()));
            }
        }
        report.bytes = report.items.iter().map(|g| g.bytes).sum();
        if !opts.dry_run {
            self.collect(&mut report, &mut doomed);
        }
        // 6. The cluster tier (it removes its own garbage).
        self.tier_gc(opts.dry_run, &mut report);
        // 7. Proofs of removal whose storage is gone.
        if !opts.dry_run {
            if let Err(e) = self.drop_finished_removals() {
                warn!(error = %e, "garbage collection could not drop the proofs of finished removals");
                report.errors.push(format!("proofs of removal: {e}"));
            }
        }
        if !opts.dry_run {
            self.add_to(Counter::GcRuns, 1);
            let removed = report.items.len().saturating_sub(report.errors.len()) as u64;
            self.add_to(Counter::GcRemoved, removed);
            self.add_to(Counter::GcBytes, report.bytes);
        }
        report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(
            items = report.items.len(),
            bytes = report.bytes,
            dry_run = opts.dry_run,
            ms = report.elapsed_ms,
            "garbage collection"
        );
        Ok(report)
    }

    fn collect(&self, report: &mut GcReport, doomed: &mut [(u64, LayerRecord)]) {
        let items = report.items.clone();
        for g in &items {
            let r = match g.kind {
                GarbageKind::InterruptedApply => self.roll_back_apply(g.layer.unwrap_or(0), &g.path),
                _ => self
                    .backend
                    .collect(g, &|n| Ok(self.record_by_number(n)?.is_some())),
            };
            if let Err(e) = r {
                warn!(path = %g.path.display(), error = %e, "garbage collection could not remove");
                report.errors.push(format!("{}: {e}", g.path.display()));
            }
        }
        // Children before parents.
        doomed.sort_by_key(|(_, r)| std::cmp::Reverse(r.depth));
        for (n, rec) in doomed.iter() {
            if let Err(e) = self.remove(&rec.ns, &rec.name) {
                warn!(layer = n, error = %e, "garbage collection could not remove a layer");
                report.errors.push(format!("{}/{}: {e}", rec.ns, rec.name));
            }
        }
    }

    /// Rolls an interrupted apply back (as the start-up recovery does), under the layer's lock.
    fn roll_back_apply(&self, n: u64, staging: &Path) -> Result<()> {
        let slot = self.slot(n);
        let _guard = lock(&slot);
        let token = staging
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !self.backend.drop_staging(&token) {
            return Ok(());
        }
        self.reset_interrupted_apply(n)
    }

    /// Drops the proof of removal of each removed layer whose storage is gone, once the backend made that
    /// durable; gives how many. The proof is what lets recovery delete storage that a power cut brought
    /// back; a running store would otherwise keep one per removal until its next start (`lamina serve` calls
    /// this periodically, and every garbage collection does). Layer numbers are never reused, so a layer whose
    /// storage is gone now stays gone.
    pub fn drop_finished_removals(&self) -> Result<usize> {
        let done: Vec<u64> = self
            .read()?
            .removed()?
            .into_iter()
            .filter(|n| !self.backend.exists(*n))
            .collect();
        if done.is_empty() {
            return Ok(0);
        }
        self.backend.sync_removals()?;
        let txn = self.write()?;
        for &n in &done {
            txn.drop_removed(n)?;
        }
        txn.commit()?;
        debug!(proofs = done.len(), "proofs of finished removals dropped");
        Ok(done.len())
    }

    fn known_layers(&self) -> Result<HashSet<u64>> {
        self.read()?.layer_numbers()
    }
}
