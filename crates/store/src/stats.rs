//! Usage statistics: per-layer counters and store-wide operation counters.
//!
//! `Get` and `Put` are hot paths, so counters live in memory (per layer in its slot, under the lock `Get`
//! takes anyway; store-wide in atomics) and reach the database in batches: [`Store::flush_stats`] writes the
//! changed ones in one transaction. `lamina serve` flushes every few seconds and at shutdown, and dropping a
//! [`Store`] flushes. A crash (kill -9, power loss) loses the counts since the last flush, never more.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::meta::LayerStats;
use crate::{lock, now_ns, LayerRecord, Result, Store, StoreError};

/// A store-wide operation counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// `Get` calls.
    Gets,
    /// `Put` calls.
    Puts,
    /// `Get` calls served by a layer that was already referenced (no new mount).
    Hits,
    /// `Get` calls that brought a layer up (its first reference: a new overlay mount when it has parents).
    Mounts,
    /// Mount requests of the snapshotter (Prepare, View, Mounts): containerd mounts those itself.
    SnapshotMounts,
    /// Tars applied.
    Applies,
    /// Bytes of applied tars.
    ApplyBytes,
    /// Diffs started.
    Diffs,
    /// Snapshotter commits.
    Commits,
    /// Garbage collections that removed something (not dry runs).
    GcRuns,
    /// Garbage items removed.
    GcRemoved,
    /// Bytes freed by garbage collection.
    GcBytes,
}

impl Counter {
    /// Every counter, in display order.
    pub const ALL: [Counter; 12] = [
        Counter::Gets,
        Counter::Puts,
        Counter::Hits,
        Counter::Mounts,
        Counter::SnapshotMounts,
        Counter::Applies,
        Counter::ApplyBytes,
        Counter::Diffs,
        Counter::Commits,
        Counter::GcRuns,
        Counter::GcRemoved,
        Counter::GcBytes,
    ];

    /// The counter's key in the database and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Gets => "gets",
            Counter::Puts => "puts",
            Counter::Hits => "hits",
            Counter::Mounts => "mounts",
            Counter::SnapshotMounts => "snapshot_mounts",
            Counter::Applies => "applies",
            Counter::ApplyBytes => "apply_bytes",
            Counter::Diffs => "diffs",
            Counter::Commits => "commits",
            Counter::GcRuns => "gc_runs",
            Counter::GcRemoved => "gc_removed",
            Counter::GcBytes => "gc_bytes",
        }
    }
}

/// Store-wide counters (totals since the store was created).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    values: [AtomicU64; 12],
    dirty: AtomicBool,
}

impl Counters {
    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.values[c as usize].fetch_add(n, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }
}

/// One layer with everything `lamina layers` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerOverview {
    /// Internal number.
    pub number: u64,
    /// The record.
    pub record: LayerRecord,
    /// The parent's name, if any.
    pub parent_name: Option<String>,
    /// Usage counters.
    pub stats: LayerStats,
    /// Current reference count (mounts now).
    pub mounts: u32,
    /// Whether `layers/<n>/merged` is a mount point now.
    pub mounted: bool,
    /// Number of child layers.
    pub children: u64,
    /// `layers/<n>`.
    pub dir: PathBuf,
}

impl Store {
    /// Loads the persisted counters into memory (at open).
    pub(crate) fn load_stats(&self) -> Result<()> {
        let txn = self.read()?;
        for c in Counter::ALL {
            if let Some(v) = txn.counter(c.name())? {
                self.counters.values[c as usize].store(v, Ordering::Relaxed);
            }
        }
        for (n, s) in txn.all_stats()? {
            self.slots.load_stats(n, s);
        }
        Ok(())
    }

    /// Writes changed counters to the database in one transaction. Cheap when nothing changed.
    pub fn flush_stats(&self) -> Result<()> {
        let changed = self.slots.take_dirty();
        let counters_dirty = self.counters.dirty.swap(false, Ordering::Relaxed);
        if changed.is_empty() && !counters_dirty {
            return Ok(());
        }
        let result = (|| {
            let txn = self.write()?;
            for (n, s) in &changed {
                txn.put_stats_if_present(*n, s)?;
            }
            for c in Counter::ALL {
                txn.set_counter(c.name(), self.counters.get(c))?;
            }
            txn.commit()
        })();
        if result.is_err() {
            // Try again at the next flush.
            self.counters.dirty.store(true, Ordering::Relaxed);
            self.slots.mark_dirty(changed.iter().map(|(n, _)| *n));
        }
        result
    }

    /// Store-wide counters by name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        Counter::ALL
            .iter()
            .map(|c| (c.name(), self.counters.get(*c)))
            .collect()
    }

    /// Adds to a store-wide counter.
    pub fn add_to(&self, c: Counter, n: u64) {
        self.counters.add(c, n);
    }

    /// Counts a mount request that the store does not perform itself (the snapshotter's Prepare, View and
    /// Mounts: containerd mounts what they return): one get of layer `n` and one use of it and of each layer
    /// `below` it.
    pub(crate) fn note_external_use(&self, n: u64, below: &[u64]) {
        let now = now_ns();
        lock(&self.slot(n)).note_get(now, true);
        self.slots.note_uses(below, now);
        self.counters.add(Counter::SnapshotMounts, 1);
    }

    /// [`Store::note_external_use`] if no slot it counts in is locked; false, counting nothing, otherwise.
    pub(crate) fn try_note_external_use(&self, n: u64, below: &[u64]) -> bool {
        if !self.slots.try_note_external_use(n, below, now_ns()) {
            return false;
        }
        self.counters.add(Counter::SnapshotMounts, 1);
        true
    }

    /// The counters of layer `n` (zero for an unknown layer).
    pub fn layer_stats(&self, n: u64) -> LayerStats {
        self.slots.counts(n).0
    }

    /// Every layer with its counters, by number.
    pub fn overview(&self) -> Result<Vec<LayerOverview>> {
        self.overview_filtered(None)
    }

    /// One layer, by number.
    pub fn overview_of(&self, n: u64) -> Result<LayerOverview> {
        self.overview_filtered(Some(n))?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("layer number {n:x}")))
    }

    fn overview_filtered(&self, only: Option<u64>) -> Result<Vec<LayerOverview>> {
        let mounted = self.backend.mounted()?;
        let txn = self.read()?;
        let mut recs: BTreeMap<u64, LayerRecord> = BTreeMap::new();
        match only {
            Some(n) => {
                if let Some(r) = txn.layer(n)? {
                    recs.insert(n, r);
                }
            }
            None => recs.extend(txn.layers()?),
        }
        let children = txn.child_counts(only);
        let mut out = Vec::with_capacity(recs.len());
        for (n, record) in &recs {
            let parent_name = match record.parent {
                Some(p) => match recs.get(&p) {
                    Some(r) => Some(r.name.clone()),
                    None => txn.layer(p)?.map(|r| r.name),
                },
                None => None,
            };
            let (stats, mounts) = self.slots.counts(*n);
            out.push(LayerOverview {
                number: *n,
                mounted: mounted.contains(n),
                record: record.clone(),
                parent_name,
                stats,
                mounts,
                children: children.get(n).copied().unwrap_or(0),
                dir: self.backend.paths(*n).dir,
            });
        }
        Ok(out)
    }

    /// Resolves a layer given on a command line: a layer number in hex (at most 16 digits), `NAME` with
    /// `ns`, `NAMESPACE/NAME` (the longest namespace that matches), or a `NAME` unique across namespaces.
    pub fn resolve(&self, spec: &str, ns: Option<&str>) -> Result<u64> {
        let txn = self.read()?;
        if let Some(ns) = ns {
            return txn
                .number(ns, spec)?
                .ok_or_else(|| StoreError::NotFound(format!("layer {spec:?} in namespace {ns:?}")));
        }
        let hex = spec.strip_prefix("0x").unwrap_or(spec);
        if !hex.is_empty() && hex.len() <= 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(n) = u64::from_str_radix(hex, 16) {
                if txn.layer(n)?.is_some() {
                    return Ok(n);
                }
            }
        }
        let mut by_ns: Option<(usize, u64)> = None;
        let mut by_name = Vec::new();
        for (row_ns, row_name, n) in txn.all_names()? {
            if row_name == spec {
                by_name.push(n);
            }
            if spec.len() > row_ns.len()
                && spec.starts_with(row_ns.as_str())
                && spec.as_bytes()[row_ns.len()] == b'/'
                && spec[row_ns.len() + 1..] == row_name
                && by_ns.is_none_or(|(len, _)| row_ns.len() > len)
            {
                by_ns = Some((row_ns.len(), n));
            }
        }
        if let Some((_, n)) = by_ns {
            return Ok(n);
        }
        match by_name.len() {
            1 => Ok(by_name[0]),
            0 => Err(StoreError::NotFound(format!("layer {spec:?}"))),
            k => Err(StoreError::InvalidArgument(format!(
                "layer name {spec:?} exists in {k} namespaces; give NAMESPACE/NAME or --namespace"
            ))),
        }
    }
}
