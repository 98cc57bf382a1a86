//! Lookups and listings: names, records, parent chains, figures, settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lamina_sys::mount;
use lamina_sys::mount::MAX_OVERLAY_LOWERS;

use crate::{
    tables::{Reader, Writer},
    LayerInfo, LayerKind, LayerRecord, Result, Slot, Store, StoreError, StoreStatus, FORMAT_VERSION,
};

impl Store {
    /// Whether `name` exists in `ns`.
    pub fn exists(&self, ns: &str, name: &str) -> Result<bool> {
        Ok(self.lookup(ns, name)?.is_some())
    }

    /// Everything known about a layer.
    pub fn info(&self, ns: &str, name: &str) -> Result<LayerInfo> {
        let (n, record) = self.require(ns, name)?;
        let chain = self.chain(&record)?;
        let paths = self.backend.paths(n);
        let mounts = self.slots.mounts(n);
        Ok(LayerInfo {
            number: n,
            lower_dirs: chain.iter().map(|p| self.backend.paths(*p).content).collect(),
            diff_dir: paths.content,
            work_dir: paths.work,
            merged_dir: paths.merged,
            record,
            mounts,
        })
    }

    /// Store-wide figures.
    pub fn status(&self) -> Result<StoreStatus> {
        let layers = self.read()?.layer_count()?;
        let mounted = self.slots.mounted();
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
        Ok(self.read()?.named_in(ns)?.len() as u64)
    }

    /// All layers of all namespaces, by number.
    pub fn list(&self) -> Result<Vec<(u64, LayerRecord)>> {
        self.read()?.layers()
    }

    /// The record of `name` and its parent's name (same namespace).
    pub fn record(&self, ns: &str, name: &str) -> Result<(LayerRecord, Option<String>)> {
        let txn = self.read()?;
        let n = txn
            .number(ns, name)?
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
        let rec = txn.require_layer(n)?;
        let parent = match rec.parent {
            Some(p) => Some(txn.require_layer(p)?.name),
            None => None,
        };
        Ok((rec, parent))
    }

    /// Every layer of one namespace with its parent's name, in name order, from one consistent snapshot
    /// of the metadata.
    pub fn list_ns(&self, ns: &str) -> Result<Vec<(LayerRecord, Option<String>)>> {
        let txn = self.read()?;
        let mut recs = Vec::new();
        let mut by_number = HashMap::new();
        for (n, rec) in txn.named_in(ns)? {
            by_number.insert(n, rec.name.clone());
            recs.push(rec);
        }
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            let parent = match rec.parent {
                Some(p) => Some(match by_number.get(&p) {
                    Some(name) => name.clone(),
                    None => txn.require_layer(p)?.name,
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
        self.backend.usage(n)
    }

    /// Reads a remembered setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.read()?.setting(key)
    }

    /// Remembers a setting across restarts.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let txn = self.write()?;
        txn.set_setting(key, value)?;
        txn.commit()
    }

    /// A consistent view of the metadata.
    pub(crate) fn read(&self) -> Result<Reader> {
        Reader::begin(&self.db, &self.index)
    }

    /// A write transaction on the metadata.
    pub(crate) fn write(&self) -> Result<Writer> {
        Writer::begin(&self.db, &self.index)
    }

    pub(crate) fn lookup(&self, ns: &str, name: &str) -> Result<Option<(u64, LayerRecord)>> {
        self.read()?.lookup(ns, name)
    }

    pub(crate) fn require(&self, ns: &str, name: &str) -> Result<(u64, LayerRecord)> {
        self.lookup(ns, name)?
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))
    }

    /// The record of layer `n`, if it exists.
    pub(crate) fn record_by_number(&self, n: u64) -> Result<Option<LayerRecord>> {
        self.read()?.layer(n)
    }

    /// Layer numbers of the parent chain of `rec`, nearest first.
    pub(crate) fn chain(&self, rec: &LayerRecord) -> Result<Vec<u64>> {
        self.read()?.chain(rec, MAX_OVERLAY_LOWERS)
    }

    /// Changes the record of layer `n` with `f` in one transaction.
    pub(crate) fn update_record(&self, n: u64, f: impl FnOnce(&mut LayerRecord)) -> Result<LayerRecord> {
        let txn = self.write()?;
        let mut rec = txn.require_layer(n)?;
        f(&mut rec);
        txn.put_layer(n, &rec)?;
        txn.commit()?;
        Ok(rec)
    }

    pub(crate) fn slot(&self, n: u64) -> Arc<Mutex<Slot>> {
        self.slots.get(n)
    }

    /// The data root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
