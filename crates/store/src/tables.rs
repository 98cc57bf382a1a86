//! Typed access to the metadata tables: the only module that opens redb tables or transactions.
//!
//! A [`Reader`] is one consistent snapshot of the records (a read transaction); a [`Writer`] is one write
//! transaction that becomes visible, all or nothing, at [`Writer::commit`]. Both speak in layer numbers, records
//! and names; errors come back as [`StoreError`]s (database failures through `error::db_err`). Names and child
//! links are looked up in the store's [`Index`], which a writer changes with its commit (`index.rs`); a reader
//! confirms a name with the record of its snapshot.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Key, ReadableTable, ReadableTableMetadata, TableDefinition, Value};

use crate::db::{Db, ReadTxn, WriteTxn};
use crate::error::db_err;
use crate::index::{Change, Index, WriteGate};
use crate::meta::{
    self, LayerStats, COUNTERS, LAYERS, LEGACY_CHILDREN, LEGACY_NAMES, MANIFESTS, META, PENDING, REMOVED,
    SETTINGS, STATS,
};
use crate::{LayerRecord, Result, StoreError};

/// Key of the on-disk format version in the `meta` table.
const FORMAT_KEY: &str = "format";
/// Key of the next layer number in the `meta` table.
const NEXT_ID_KEY: &str = "next_id";
/// Layer numbers reserved by one write of `next_id` ([`Writer::reserve_id`]).
pub(crate) const ID_BLOCK: u64 = 64;
/// `meta` key: the data root id (see `custody.rs`).
const ROOT_ID_KEY: &str = "root_id";

fn decode_stats(bytes: &[u8]) -> Result<LayerStats> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::CorruptMetadata(format!("layer stats: {e}")))
}

fn record_of(layers: &impl ReadableTable<u64, &'static [u8]>, n: u64) -> Result<Option<LayerRecord>> {
    layers
        .get(n)
        .map_err(db_err)?
        .map(|v| LayerRecord::decode(v.value()))
        .transpose()
}

fn require_record(layers: &impl ReadableTable<u64, &'static [u8]>, n: u64) -> Result<LayerRecord> {
    record_of(layers, n)?.ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {n}")))
}

/// The record of layer `n` if it is named `(ns, name)`: a number found in the index is confirmed by the record
/// it leads to in this transaction.
fn named(
    layers: &impl ReadableTable<u64, &'static [u8]>,
    n: u64,
    ns: &str,
    name: &str,
) -> Result<Option<LayerRecord>> {
    Ok(record_of(layers, n)?.filter(|r| r.ns == ns && r.name == name))
}

/// Layer numbers of the parent chain of `rec`, nearest first; at most `limit` of them, or the chain loops.
fn chain_in(
    layers: &impl ReadableTable<u64, &'static [u8]>,
    rec: &LayerRecord,
    limit: usize,
) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(rec.depth as usize);
    let mut next = rec.parent;
    while let Some(p) = next {
        if out.len() > limit {
            return Err(StoreError::CorruptMetadata(format!(
                "parent chain of {} loops",
                rec.name
            )));
        }
        out.push(p);
        next = record_of(layers, p)?
            .ok_or_else(|| StoreError::CorruptMetadata(format!("missing parent layer {p}")))?
            .parent;
    }
    Ok(out)
}

/// The keys of a table keyed by layer number.
fn keys_of<V: Value + 'static>(t: &impl ReadableTable<u64, V>) -> Result<HashSet<u64>> {
    let mut out = HashSet::new();
    for row in t.iter().map_err(db_err)? {
        out.insert(row.map_err(db_err)?.0.value());
    }
    Ok(out)
}

/// The lookups a [`Reader`] and a [`Writer`] both answer (a writer sees its own writes).
macro_rules! lookups {
    () => {
        /// The record of layer `n`.
        pub(crate) fn layer(&self, n: u64) -> Result<Option<LayerRecord>> {
            record_of(&self.txn.open_table(LAYERS).map_err(db_err)?, n)
        }

        /// The record of layer `n`, which must exist (a number taken from another record or a name).
        pub(crate) fn require_layer(&self, n: u64) -> Result<LayerRecord> {
            require_record(&self.txn.open_table(LAYERS).map_err(db_err)?, n)
        }

        /// Every layer, by number.
        pub(crate) fn layers(&self) -> Result<Vec<(u64, LayerRecord)>> {
            let t = self.txn.open_table(LAYERS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                out.push((k.value(), LayerRecord::decode(v.value())?));
            }
            Ok(out)
        }
    };
}

/// One consistent view of the records.
pub(crate) struct Reader {
    txn: ReadTxn,
    index: Arc<Index>,
}

impl Reader {
    /// Begins a read transaction.
    pub(crate) fn begin(db: &Db, index: &Arc<Index>) -> Result<Reader> {
        Ok(Reader {
            txn: db.begin_read().map_err(db_err)?,
            index: index.clone(),
        })
    }

    /// The layer `(ns, name)` names in this snapshot, with its record.
    pub(crate) fn lookup(&self, ns: &str, name: &str) -> Result<Option<(u64, LayerRecord)>> {
        let Some(n) = self.index.number(ns, name) else {
            return Ok(None);
        };
        let layers = self.txn.open_table(LAYERS).map_err(db_err)?;
        Ok(named(&layers, n, ns, name)?.map(|rec| (n, rec)))
    }

    /// The number `(ns, name)` names in this snapshot.
    pub(crate) fn number(&self, ns: &str, name: &str) -> Result<Option<u64>> {
        Ok(self.lookup(ns, name)?.map(|(n, _)| n))
    }

    /// Whether layer `n` has children (as the index has it now: a removal checks again in its transaction).
    pub(crate) fn has_children(&self, n: u64) -> Result<bool> {
        Ok(self.index.has_children_after(&[], n))
    }

    lookups!();

    /// Layer numbers of the parent chain of `rec`, nearest first.
    pub(crate) fn chain(&self, rec: &LayerRecord, limit: usize) -> Result<Vec<u64>> {
        chain_in(&self.txn.open_table(LAYERS).map_err(db_err)?, rec, limit)
    }

    /// Every layer number.
    pub(crate) fn layer_numbers(&self) -> Result<HashSet<u64>> {
        keys_of(&self.txn.open_table(LAYERS).map_err(db_err)?)
    }

    /// Number of layers (all namespaces).
    pub(crate) fn layer_count(&self) -> Result<u64> {
        self.txn.open_table(LAYERS).map_err(db_err)?.len().map_err(db_err)
    }

    /// `(number, record)` of every layer of `ns` in this snapshot, in name order.
    pub(crate) fn named_in(&self, ns: &str) -> Result<Vec<(u64, LayerRecord)>> {
        let layers = self.txn.open_table(LAYERS).map_err(db_err)?;
        let mut out = Vec::new();
        for (name, n) in self.index.names_in(ns) {
            if let Some(rec) = named(&layers, n, ns, &name)? {
                out.push((n, rec));
            }
        }
        Ok(out)
    }

    /// Every `(namespace, name, number)` of this snapshot.
    pub(crate) fn all_names(&self) -> Result<Vec<(String, String, u64)>> {
        let layers = self.txn.open_table(LAYERS).map_err(db_err)?;
        let mut out = Vec::new();
        for (ns, name, n) in self.index.all_names() {
            if named(&layers, n, &ns, &name)?.is_some() {
                out.push((ns, name, n));
            }
        }
        Ok(out)
    }

    /// Number of children per layer (of `only`, or of every layer that has some), as the index has it now.
    pub(crate) fn child_counts(&self, only: Option<u64>) -> HashMap<u64, u64> {
        self.index.child_counts(only)
    }

    /// Applies in progress: layer number and staging directory name.
    pub(crate) fn pending(&self) -> Result<Vec<(u64, String)>> {
        let t = self.txn.open_table(PENDING).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value(), v.value().to_string()));
        }
        Ok(out)
    }

    /// The manifest of layer `n` when the database holds it (a small committed layer, format 4).
    pub(crate) fn manifest(&self, n: u64) -> Result<Option<Vec<u8>>> {
        let t = match self.txn.open_table(MANIFESTS) {
            Ok(t) => t,
            // A database not migrated yet (a command that only reads): no manifest is kept here.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        Ok(t.get(n).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Layers whose removal was committed while their storage may still be there.
    pub(crate) fn removed(&self) -> Result<HashSet<u64>> {
        keys_of(&self.txn.open_table(REMOVED).map_err(db_err)?)
    }

    /// What a database says of itself before anything is written to it: whether it is new (no tables, or no
    /// format recorded) and the data root id it records.
    pub(crate) fn identity(&self) -> Result<(bool, Option<u64>)> {
        let meta = match self.txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((true, None)),
            Err(e) => return Err(db_err(e)),
        };
        let fresh = meta.get(FORMAT_KEY).map_err(db_err)?.is_none();
        let id = meta.get(ROOT_ID_KEY).map_err(db_err)?.map(|v| v.value());
        Ok((fresh, id))
    }

    /// A remembered setting.
    pub(crate) fn setting(&self, key: &str) -> Result<Option<String>> {
        let t = self.txn.open_table(SETTINGS).map_err(db_err)?;
        Ok(t.get(key).map_err(db_err)?.map(|v| v.value().to_string()))
    }

    /// The stored store-wide counter `name`.
    pub(crate) fn counter(&self, name: &str) -> Result<Option<u64>> {
        let t = self.txn.open_table(COUNTERS).map_err(db_err)?;
        Ok(t.get(name).map_err(db_err)?.map(|v| v.value()))
    }

    /// Stored usage counters of every layer that has some.
    pub(crate) fn all_stats(&self) -> Result<Vec<(u64, LayerStats)>> {
        let t = self.txn.open_table(STATS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value(), decode_stats(v.value())?));
        }
        Ok(out)
    }
}

/// One write transaction.
pub(crate) struct Writer {
    txn: WriteTxn,
    index: Arc<Index>,
    /// What the transaction changes in the index, in order.
    changes: Mutex<Vec<Change>>,
    /// Held until the transaction is committed or dropped; taken before the database's write lock.
    _gate: WriteGate,
}

impl Writer {
    /// Begins a write transaction; one that finds the index in doubt (after a failed commit) rebuilds it from the
    /// records first.
    pub(crate) fn begin(db: &Db, index: &Arc<Index>) -> Result<Writer> {
        let gate = index.lock_writes();
        let txn = db.begin_write().map_err(db_err)?;
        let w = Writer {
            txn,
            index: index.clone(),
            changes: Mutex::new(Vec::new()),
            _gate: gate,
        };
        if w.index.is_stale() {
            let records = w.layers()?;
            w.index.rebuild(records.iter().map(|(n, r)| (*n, r)))?;
        }
        Ok(w)
    }

    /// Makes it all visible: the records, then the names and links they drop from the index.
    pub(crate) fn commit(self) -> Result<()> {
        let Writer {
            txn,
            index,
            changes,
            _gate,
        } = self;
        let changes = changes.into_inner().unwrap_or_else(|p| p.into_inner());
        index.commit_with(&changes, || txn.commit().map_err(db_err))
    }

    fn changes(&self) -> MutexGuard<'_, Vec<Change>> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number `(ns, name)` names, this transaction's changes included.
    pub(crate) fn number(&self, ns: &str, name: &str) -> Result<Option<u64>> {
        Ok(self.index.number_after(&self.changes(), ns, name))
    }

    /// Whether layer `n` has children, this transaction's changes included.
    pub(crate) fn has_children(&self, n: u64) -> Result<bool> {
        Ok(self.index.has_children_after(&self.changes(), n))
    }

    /// Writes `key -> value` into `table`.
    fn insert<'k, 'v, K: Key + 'static, V: Value + 'static>(
        &self,
        table: TableDefinition<'_, K, V>,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<()> {
        let mut t = self.txn.open_table(table).map_err(db_err)?;
        t.insert(key, value).map_err(db_err)?;
        Ok(())
    }

    /// Drops `key` from `table`.
    fn remove<'k, K: Key + 'static, V: Value + 'static>(
        &self,
        table: TableDefinition<'_, K, V>,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> Result<()> {
        let mut t = self.txn.open_table(table).map_err(db_err)?;
        t.remove(key).map_err(db_err)?;
        Ok(())
    }

    lookups!();

    /// Writes the record of layer `n`.
    pub(crate) fn put_layer(&self, n: u64, rec: &LayerRecord) -> Result<()> {
        self.insert(LAYERS, n, rec.encode().as_slice())
    }

    /// Names layer `n` `(ns, name)` (its record must say so: the index is rebuilt from the records).
    pub(crate) fn put_name(&self, ns: &str, name: &str, n: u64) -> Result<()> {
        self.changes().push(Change::Name {
            ns: ns.to_string(),
            name: name.to_string(),
            to: Some(n),
        });
        Ok(())
    }

    /// Drops the name `(ns, name)`.
    pub(crate) fn remove_name(&self, ns: &str, name: &str) -> Result<()> {
        self.changes().push(Change::Name {
            ns: ns.to_string(),
            name: name.to_string(),
            to: None,
        });
        Ok(())
    }

    /// Records `child` as a child of `parent` (the child's record names its parent).
    pub(crate) fn add_child(&self, parent: u64, child: u64) -> Result<()> {
        self.changes().push(Change::Child {
            parent,
            child,
            linked: true,
        });
        Ok(())
    }

    /// Drops every row of layer `n` (record, pending apply, child link to `parent`, stats, manifest); its name is
    /// dropped with [`Writer::remove_name`].
    pub(crate) fn remove_layer(&self, n: u64, parent: Option<u64>) -> Result<()> {
        self.remove(LAYERS, n)?;
        self.remove_pending(n)?;
        if let Some(p) = parent {
            self.changes().push(Change::Child {
                parent: p,
                child: n,
                linked: false,
            });
        }
        self.remove(STATS, n)?;
        self.remove(MANIFESTS, n)
    }

    /// Keeps the manifest of layer `n` in the database (see [`MANIFESTS`]).
    pub(crate) fn put_manifest(&self, n: u64, manifest: &[u8]) -> Result<()> {
        self.insert(MANIFESTS, n, manifest)
    }

    /// Records that layer `n` was removed: the proof, should a crash leave its storage behind, that the store
    /// may delete it.
    pub(crate) fn put_removed(&self, n: u64, at_ns: u64) -> Result<()> {
        self.insert(REMOVED, n, at_ns)
    }

    /// Drops the removal proof of layer `n` (its storage is gone, durably).
    pub(crate) fn drop_removed(&self, n: u64) -> Result<()> {
        self.remove(REMOVED, n)
    }

    /// Records the data root id.
    pub(crate) fn set_root_id(&self, id: u64) -> Result<()> {
        self.insert(META, ROOT_ID_KEY, id)
    }

    /// Marks an apply of layer `n` into `staging/<staging>` as in progress.
    pub(crate) fn put_pending(&self, n: u64, staging: &str) -> Result<()> {
        self.insert(PENDING, n, staging)
    }

    /// Drops the in-progress mark of layer `n`.
    pub(crate) fn remove_pending(&self, n: u64) -> Result<()> {
        self.remove(PENDING, n)
    }

    /// Makes sure the stored next layer number is above `n`, the number of a layer being recorded. When it is not,
    /// it is raised by a block of [`ID_BLOCK`] numbers at once: the `meta` table is then written by one create in
    /// [`ID_BLOCK`] instead of by each (a page less to write and to flush). The numbers of a block that a restart
    /// leaves unused are skipped, never given out: a layer number is never reused.
    pub(crate) fn reserve_id(&self, n: u64) -> Result<()> {
        if self.next_id()? > n {
            return Ok(());
        }
        self.raise_next_id(n.saturating_add(ID_BLOCK))
    }

    /// Raises the stored next layer number to at least `next`.
    pub(crate) fn raise_next_id(&self, next: u64) -> Result<()> {
        let mut meta = self.txn.open_table(META).map_err(db_err)?;
        let stored = meta
            .get(NEXT_ID_KEY)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(1);
        meta.insert(NEXT_ID_KEY, stored.max(next)).map_err(db_err)?;
        Ok(())
    }

    /// The stored next layer number (1 when none is).
    pub(crate) fn next_id(&self) -> Result<u64> {
        let meta = self.txn.open_table(META).map_err(db_err)?;
        let next = meta.get(NEXT_ID_KEY).map_err(db_err)?.map(|v| v.value());
        Ok(next.unwrap_or(1))
    }

    /// The stored format version (none in a new database).
    pub(crate) fn format(&self) -> Result<Option<u64>> {
        let meta = self.txn.open_table(META).map_err(db_err)?;
        let format = meta.get(FORMAT_KEY).map_err(db_err)?.map(|v| v.value());
        Ok(format)
    }

    /// Records the format version.
    pub(crate) fn set_format(&self, v: u64) -> Result<()> {
        self.insert(META, FORMAT_KEY, v)
    }

    /// Format 1 -> 2: rewrites every layer record (timestamps in nanoseconds, plus an update time).
    pub(crate) fn migrate_v1_records(&self) -> Result<()> {
        let mut layers = self.txn.open_table(LAYERS).map_err(db_err)?;
        let mut rows = Vec::new();
        for row in layers.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            rows.push((k.value(), meta::migrate_v1_record(v.value())?));
        }
        for (k, v) in &rows {
            layers.insert(*k, v.as_slice()).map_err(db_err)?;
        }
        Ok(())
    }

    /// Format 4 -> 5: the `names` and `children` tables go, once they are found to say what the records say
    /// (the index is derived from the records from now on). Anything else is corrupt metadata, refused with
    /// nothing changed.
    pub(crate) fn migrate_v4_indexes(&self) -> Result<()> {
        let tables: HashSet<String> = self
            .txn
            .list_tables()
            .map_err(db_err)?
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        let records: HashMap<u64, LayerRecord> = self.layers()?.into_iter().collect();
        if tables.contains("names") {
            let names = self.txn.open_table(LEGACY_NAMES).map_err(db_err)?;
            let mut named = 0usize;
            for row in names.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let ((ns, name), n) = (k.value(), v.value());
                if !records.get(&n).is_some_and(|r| r.ns == ns && r.name == name) {
                    return Err(StoreError::CorruptMetadata(format!(
                        "format 4 table `names`: {ns}/{name} -> layer {n:x}, whose record says otherwise"
                    )));
                }
                named += 1;
            }
            if named != records.len() {
                return Err(StoreError::CorruptMetadata(format!(
                    "format 4 table `names` names {named} layers, there are {} records",
                    records.len()
                )));
            }
        }
        if tables.contains("children") {
            let children = self.txn.open_table(LEGACY_CHILDREN).map_err(db_err)?;
            for row in children.iter().map_err(db_err)? {
                let (parent, child) = row.map_err(db_err)?.0.value();
                if records.get(&child).is_none_or(|r| r.parent != Some(parent)) {
                    return Err(StoreError::CorruptMetadata(format!(
                        "format 4 table `children`: layer {child:x} under {parent:x}, whose record says otherwise"
                    )));
                }
            }
        }
        self.txn.delete_table(LEGACY_NAMES).map_err(db_err)?;
        self.txn.delete_table(LEGACY_CHILDREN).map_err(db_err)?;
        Ok(())
    }

    /// Makes every table exist, so that read transactions can open them.
    pub(crate) fn create_tables(&self) -> Result<()> {
        self.txn.open_table(LAYERS).map_err(db_err)?;
        self.txn.open_table(PENDING).map_err(db_err)?;
        self.txn.open_table(SETTINGS).map_err(db_err)?;
        self.txn.open_table(STATS).map_err(db_err)?;
        self.txn.open_table(COUNTERS).map_err(db_err)?;
        self.txn.open_table(REMOVED).map_err(db_err)?;
        self.txn.open_table(MANIFESTS).map_err(db_err)?;
        Ok(())
    }

    /// Remembers a setting.
    pub(crate) fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let mut t = self.txn.open_table(SETTINGS).map_err(db_err)?;
        t.insert(key, value).map_err(db_err)?;
        Ok(())
    }

    /// Writes the usage counters of layer `n` if the layer still exists (a removed layer's row must not
    /// come back).
    pub(crate) fn put_stats_if_present(&self, n: u64, stats: &LayerStats) -> Result<()> {
        if self
            .txn
            .open_table(LAYERS)
            .map_err(db_err)?
            .get(n)
            .map_err(db_err)?
            .is_none()
        {
            return Ok(());
        }
        let bytes = serde_json::to_vec(stats).expect("stats serialise");
        let mut t = self.txn.open_table(STATS).map_err(db_err)?;
        t.insert(n, bytes.as_slice()).map_err(db_err)?;
        Ok(())
    }

    /// Writes the store-wide counter `name`.
    pub(crate) fn set_counter(&self, name: &str, value: u64) -> Result<()> {
        let mut t = self.txn.open_table(COUNTERS).map_err(db_err)?;
        t.insert(name, value).map_err(db_err)?;
        Ok(())
    }
}
