//! Typed access to the metadata tables: the only module that opens redb tables or transactions.
//!
//! A [`Reader`] is one consistent snapshot (a read transaction); a [`Writer`] is one write transaction that
//! becomes visible, all or nothing, at [`Writer::commit`]. Both speak in layer numbers, records and names;
//! errors come back as [`StoreError`]s (database failures through `error::db_err`).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use redb::{Key, ReadableTable, ReadableTableMetadata, TableDefinition, Value};

use crate::db::{Db, ReadTxn, WriteTxn};
use crate::error::db_err;
use crate::meta::{
    self, LayerStats, CHILDREN, COUNTERS, LAYERS, MANIFESTS, META, NAMES, PENDING, REMOVED, SETTINGS, STATS,
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

fn number_of(
    names: &impl ReadableTable<(&'static str, &'static str), u64>,
    ns: &str,
    name: &str,
) -> Result<Option<u64>> {
    Ok(names.get((ns, name)).map_err(db_err)?.map(|v| v.value()))
}

fn lookup_in(
    names: &impl ReadableTable<(&'static str, &'static str), u64>,
    layers: &impl ReadableTable<u64, &'static [u8]>,
    ns: &str,
    name: &str,
) -> Result<Option<(u64, LayerRecord)>> {
    let Some(n) = number_of(names, ns, name)? else {
        return Ok(None);
    };
    let rec = record_of(layers, n)?
        .ok_or_else(|| StoreError::CorruptMetadata(format!("name {name:?} points at missing layer {n}")))?;
    Ok(Some((n, rec)))
}

fn has_children_in(children: &impl ReadableTable<(u64, u64), ()>, n: u64) -> Result<bool> {
    let mut range = children.range((n, 0)..=(n, u64::MAX)).map_err(db_err)?;
    Ok(range.next().is_some())
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
        /// The number `(ns, name)` names.
        pub(crate) fn number(&self, ns: &str, name: &str) -> Result<Option<u64>> {
            number_of(&self.txn.open_table(NAMES).map_err(db_err)?, ns, name)
        }

        /// The record of layer `n`.
        pub(crate) fn layer(&self, n: u64) -> Result<Option<LayerRecord>> {
            record_of(&self.txn.open_table(LAYERS).map_err(db_err)?, n)
        }

        /// The record of layer `n`, which must exist (a number taken from another record or a name).
        pub(crate) fn require_layer(&self, n: u64) -> Result<LayerRecord> {
            require_record(&self.txn.open_table(LAYERS).map_err(db_err)?, n)
        }

        /// Whether layer `n` has children.
        pub(crate) fn has_children(&self, n: u64) -> Result<bool> {
            has_children_in(&self.txn.open_table(CHILDREN).map_err(db_err)?, n)
        }
    };
}

/// One consistent view of the metadata.
pub(crate) struct Reader {
    txn: ReadTxn,
}

impl Reader {
    /// Begins a read transaction.
    pub(crate) fn begin(db: &Db) -> Result<Reader> {
        Ok(Reader {
            txn: db.begin_read().map_err(db_err)?,
        })
    }

    /// The layer `(ns, name)` names, with its record.
    pub(crate) fn lookup(&self, ns: &str, name: &str) -> Result<Option<(u64, LayerRecord)>> {
        let names = self.txn.open_table(NAMES).map_err(db_err)?;
        let layers = self.txn.open_table(LAYERS).map_err(db_err)?;
        lookup_in(&names, &layers, ns, name)
    }

    lookups!();

    /// Layer numbers of the parent chain of `rec`, nearest first.
    pub(crate) fn chain(&self, rec: &LayerRecord, limit: usize) -> Result<Vec<u64>> {
        chain_in(&self.txn.open_table(LAYERS).map_err(db_err)?, rec, limit)
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

    /// Every layer number.
    pub(crate) fn layer_numbers(&self) -> Result<HashSet<u64>> {
        keys_of(&self.txn.open_table(LAYERS).map_err(db_err)?)
    }

    /// Number of layers (all namespaces).
    pub(crate) fn layer_count(&self) -> Result<u64> {
        self.txn.open_table(LAYERS).map_err(db_err)?.len().map_err(db_err)
    }

    /// `(name, number)` of every layer of `ns`, in name order.
    pub(crate) fn names_in(&self, ns: &str) -> Result<Vec<(String, u64)>> {
        let names = self.txn.open_table(NAMES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in names.range((ns, "")..).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (row_ns, name) = k.value();
            if row_ns != ns {
                break;
            }
            out.push((name.to_string(), v.value()));
        }
        Ok(out)
    }

    /// Every `(namespace, name, number)`.
    pub(crate) fn all_names(&self) -> Result<Vec<(String, String, u64)>> {
        let names = self.txn.open_table(NAMES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in names.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (ns, name) = k.value();
            out.push((ns.to_string(), name.to_string(), v.value()));
        }
        Ok(out)
    }

    /// Number of children per layer (of `only`, or of every layer).
    pub(crate) fn child_counts(&self, only: Option<u64>) -> Result<HashMap<u64, u64>> {
        let ct = self.txn.open_table(CHILDREN).map_err(db_err)?;
        let range = match only {
            Some(n) => ct.range((n, 0)..=(n, u64::MAX)),
            None => ct.range::<(u64, u64)>(..),
        }
        .map_err(db_err)?;
        let mut out: HashMap<u64, u64> = HashMap::new();
        for row in range {
            let (k, _) = row.map_err(db_err)?;
            *out.entry(k.value().0).or_default() += 1;
        }
        Ok(out)
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
}

impl Writer {
    /// Begins a write transaction.
    pub(crate) fn begin(db: &Db) -> Result<Writer> {
        Ok(Writer {
            txn: db.begin_write().map_err(db_err)?,
        })
    }

    /// Makes it all visible.
    pub(crate) fn commit(self) -> Result<()> {
        self.txn.commit().map_err(db_err)
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

    /// Names layer `n` `(ns, name)`.
    pub(crate) fn put_name(&self, ns: &str, name: &str, n: u64) -> Result<()> {
        self.insert(NAMES, (ns, name), n)
    }

    /// Drops the name `(ns, name)`.
    pub(crate) fn remove_name(&self, ns: &str, name: &str) -> Result<()> {
        self.remove(NAMES, (ns, name))
    }

    /// Records `child` as a child of `parent`.
    pub(crate) fn add_child(&self, parent: u64, child: u64) -> Result<()> {
        self.insert(CHILDREN, (parent, child), ())
    }

    /// Drops every row of layer `n` (record, pending apply, child link to `parent`, stats, manifest); its name is
    /// dropped with [`Writer::remove_name`].
    pub(crate) fn remove_layer(&self, n: u64, parent: Option<u64>) -> Result<()> {
        self.remove(LAYERS, n)?;
        self.remove_pending(n)?;
        if let Some(p) = parent {
            self.remove(CHILDREN, (p, n))?;
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

    /// Makes every table exist, so that read transactions can open them.
    pub(crate) fn create_tables(&self) -> Result<()> {
        self.txn.open_table(NAMES).map_err(db_err)?;
        self.txn.open_table(LAYERS).map_err(db_err)?;
        self.txn.open_table(CHILDREN).map_err(db_err)?;
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
