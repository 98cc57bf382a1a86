//! Garbage collection: what nothing references.
//!
//! Kinds of garbage, and why each is safe to remove:
//! - **staging** / **trash** entries that no operation of this process is working on (leftovers of a crash);
//! - **interrupted applies**: a `pending` row whose apply is not running (lamina died mid-ApplyDiff); the layer
//!   goes back to empty, as the start-up recovery does;
//! - **orphan directories** in `layers/` whose removal this store committed (a row in `removed`: a remove cut
//!   short), never one a create in progress owns;
//! - only when asked ([`GcOptions::unknown`], which `lamina gc` sets and the periodic collection does not):
//!   **unknown directories** in `layers/` (no record, no proof of removal: an older or lost database) and the
//!   entries of `quarantine/` (see `custody`);
//! - **stale mounts** below `layers/`, `staging/` or `trash/` that are not the merged view of a known layer
//!   (mounts of known layers are kept: a running container may use them);
//! - layers of a **removed namespace**, only when the operator names it (`lamina gc --namespace NS`); a layer
//!   that is mounted, or that any mount in the mount table refers to, is kept with every layer below it.
//!
//! Everything is checked against the operations in flight (a set of paths the store is working on), so a
//! collection is safe while dockerd and containerd use the store.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lamina_sys::mount;
use redb::ReadableTable;
use serde::Serialize;
use tracing::{info, warn};

use crate::meta::{LAYERS, PENDING, REMOVED};
use crate::stats::Counter;
use crate::{error, lock, open_dir, remove_tree, LayerRecord, Result, Store, StoreError};

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
    /// A layer directory without a record.
    OrphanDir,
    /// A layer of a namespace the operator declared removed.
    RemovedNamespace,
    /// A directory in `layers/` that the metadata does not know and that this store never removed.
    UnknownDir,
    /// An entry of `quarantine/`.
    Quarantined,
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
    /// Also directories the metadata does not know (in `layers/` without proof of removal, and `quarantine/`):
    /// an operator's explicit request, never the periodic collection.
    pub unknown: bool,
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

/// Layer numbers of this store that a mount in the mount table refers to (`<layers_dir>/<hex>/...` in its root
/// or options). Only paths under this store's own `layers/` count: another store's overlays (another data
/// root in the same process or on the host) name the same numbers under a different directory.
fn referenced_by_mounts(layers_dir: &std::path::Path) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return out;
    };
    let needle = format!("{}/", layers_dir.display());
    for line in text.lines() {
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
        let layers_dir = self.root.join("layers");
        let watched = [
            layers_dir.clone(),
            self.root.join("staging"),
            self.root.join("trash"),
        ];
        let known_before = self.known_layers()?;
        for mp in mount::mounts_under(&self.root).map_err(|e| StoreError::io("read mount table", e))? {
            if !watched.iter().any(|w| mp.starts_with(w)) {
                continue;
            }
            if let Some(n) = crate::parse_merged(&layers_dir, &mp) {
                if known_before.contains(&n) || self.in_flight_contains(&self.layer_dir(n)) {
                    continue;
                }
            }
            report.items.push(Garbage {
                kind: GarbageKind::StaleMount,
                path: mp,
                layer: None,
                name: None,
                bytes: 0,
            });
        }
        // 2. Interrupted applies.
        let pending: Vec<(u64, String)> = {
            let txn = self.db.begin_read().map_err(error::db_err)?;
            let t = txn.open_table(PENDING).map_err(error::db_err)?;
            let mut v = Vec::new();
            for row in t.iter().map_err(error::db_err)? {
                let (k, v2) = row.map_err(error::db_err)?;
                v.push((k.value(), v2.value().to_string()));
            }
            v
        };
        let mut pending_staging = HashSet::new();
        for (n, staging) in pending {
            let path = self.root.join("staging").join(&staging);
            if self.in_flight_contains(&path) {
                continue;
            }
            pending_staging.insert(staging);
            let name = self.record_by_number(n)?.map(|r| format!("{}/{}", r.ns, r.name));
            report.items.push(Garbage {
                kind: GarbageKind::InterruptedApply,
                bytes: usage_of(&path) + usage_of(&self.layer_dir(n).join("diff")),
                path,
                layer: Some(n),
                name,
            });
        }
        // 3. Staging and trash leftovers: listed first, then compared with the operations in flight.
        for (dir, kind) in [("staging", GarbageKind::Staging), ("trash", GarbageKind::Trash)] {
            let entries = list_dir(&self.root.join(dir))?;
            let busy = self.in_flight_snapshot();
            for path in entries {
                let file_name = path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if busy.contains(&path) || pending_staging.contains(&file_name) || !path.exists() {
                    continue;
                }
                report.items.push(Garbage {
                    kind,
                    bytes: usage_of(&path),
                    path,
                    layer: None,
                    name: None,
                });
            }
        }
        // 4. Layer directories without a record: the in-flight set is read before the records, so a create
        // that finishes in between is seen in the records.
        let dirs = list_dir(&layers_dir)?;
        let busy = self.in_flight_snapshot();
        let known = self.known_layers()?;
        let removed = self.removed_layers()?;
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
            } else if opts.unknown {
                GarbageKind::UnknownDir
            } else {
                continue;
            };
            report.items.push(Garbage {
                kind,
                bytes: usage_of(&path),
                path,
                layer: n,
                name: None,
            });
        }
        if opts.unknown {
            let qdir = self.root.join(crate::custody::QUARANTINE_DIR);
            for path in if qdir.exists() {
                list_dir(&qdir)?
            } else {
                Vec::new()
            } {
                report.items.push(Garbage {
                    kind: GarbageKind::Quarantined,
                    bytes: usage_of(&path),
                    path,
                    layer: None,
                    name: None,
                });
            }
        }
        // 5. Removed namespaces.
        let mut doomed: Vec<(u64, LayerRecord)> = Vec::new();
        if !opts.removed_namespaces.is_empty() {
            let referenced = referenced_by_mounts(&layers_dir);
            let all = self.list()?;
            let by_number: BTreeMap<u64, &LayerRecord> = all.iter().map(|(n, r)| (*n, r)).collect();
            let mut keep: BTreeMap<u64, String> = BTreeMap::new();
            for (n, rec) in &all {
                if !opts.removed_namespaces.contains(&rec.ns) {
                    continue;
                }
                let mounts = self
                    .slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(n)
                    .map(|s| lock(s).mounts)
                    .unwrap_or(0);
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
                let bytes = match rec.size {
                    Some(b) => b,
                    None => usage_of(&self.layer_dir(*n).join("diff")),
                };
                report.items.push(Garbage {
                    kind: GarbageKind::RemovedNamespace,
                    path: self.layer_dir(*n),
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
                GarbageKind::StaleMount => {
                    mount::unmount(&g.path, true).map_err(|e| StoreError::io("detach stale mount", e))
                }
                GarbageKind::InterruptedApply => self.roll_back_apply(g.layer.unwrap_or(0), &g.path),
                GarbageKind::Staging
                | GarbageKind::Trash
                | GarbageKind::OrphanDir
                | GarbageKind::UnknownDir => self.remove_unowned(&g.path, g.layer),
                GarbageKind::Quarantined => self.remove_quarantined(&g.path),
                GarbageKind::RemovedNamespace => Ok(()),
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

    /// Removes a staging/trash leftover or an orphan layer directory, re-checking under the in-flight lock that
    /// no operation took it meanwhile (it is renamed into trash under the lock, then deleted).
    fn remove_unowned(&self, path: &Path, layer: Option<u64>) -> Result<()> {
        let trash = self.root.join("trash").join(format!(
            "gc-{}-{}",
            std::process::id(),
            self.staging_seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        // Never delete through a mount.
        if !mount::mounts_under(path)
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
                if self.record_by_number(n)?.is_some() && path == self.layer_dir(n) {
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

    /// Deletes an entry of `quarantine/` (never through a mount).
    fn remove_quarantined(&self, path: &Path) -> Result<()> {
        if !mount::mounts_under(path)
            .map_err(|e| StoreError::io("read mount table", e))?
            .is_empty()
        {
            return Err(StoreError::InUse(format!(
                "{} has a mount below it",
                path.display()
            )));
        }
        remove_tree(path);
        Ok(())
    }

    fn removed_layers(&self) -> Result<HashSet<u64>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(REMOVED).map_err(error::db_err)?;
        let mut s = HashSet::new();
        for row in t.iter().map_err(error::db_err)? {
            s.insert(row.map_err(error::db_err)?.0.value());
        }
        Ok(s)
    }

    /// Rolls an interrupted apply back (as the start-up recovery does), under the layer's lock.
    fn roll_back_apply(&self, n: u64, staging: &Path) -> Result<()> {
        let slot = self.slot(n);
        let _guard = lock(&slot);
        if self.in_flight_contains(staging) {
            return Ok(());
        }
        remove_tree(staging);
        self.reset_interrupted_apply(n)
    }

    fn known_layers(&self) -> Result<HashSet<u64>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut s = HashSet::new();
        for row in t.iter().map_err(error::db_err)? {
            s.insert(row.map_err(error::db_err)?.0.value());
        }
        Ok(s)
    }

    pub(crate) fn record_by_number(&self, n: u64) -> Result<Option<LayerRecord>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(LAYERS).map_err(error::db_err)?;
        t.get(n)
            .map_err(error::db_err)?
            .map(|v| LayerRecord::decode(v.value()))
            .transpose()
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
