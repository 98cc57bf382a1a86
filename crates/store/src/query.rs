//! Lookups and listings: names, records, parent chains, figures, settings.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lamina_sys::mount;
use lamina_sys::mount::MAX_OVERLAY_LOWERS;
use redb::{ReadableTable, ReadableTableMetadata};

use crate::{
    error, lock, meta::CHILDREN, meta::LAYERS, meta::NAMES, meta::SETTINGS, open_dir, LayerInfo, LayerKind,
    LayerRecord, Result, Slot, Store, StoreError, StoreStatus, FORMAT_VERSION,
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
        let dir = self.layer_dir(n);
        let mounts = self.slot(n).lock().unwrap_or_else(|p| p.into_inner()).mounts;
        Ok(LayerInfo {
            number: n,
            lower_dirs: chain.iter().map(|p| self.layer_dir(*p).join("diff")).collect(),
            diff_dir: dir.join("diff"),
            work_dir: dir.join("work"),
            merged_dir: dir.join("merged"),
            record,
            mounts,
        })
    }

    /// Store-wide figures.
    pub fn status(&self) -> Result<StoreStatus> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let layers = txn
            .open_table(LAYERS)
            .map_err(error::db_err)?
            .len()
            .map_err(error::db_err)?;
        let mounted = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| lock(s).mounts > 0)
            .count() as u64;
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
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let mut count = 0;
        for row in names.range((ns, "")..).map_err(error::db_err)? {
            let row = row.map_err(error::db_err)?;
            if row.0.value().0 != ns {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// All layers of all namespaces, by number.
    pub fn list(&self) -> Result<Vec<(u64, LayerRecord)>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(error::db_err)? {
            let (k, v) = row.map_err(error::db_err)?;
            out.push((k.value(), LayerRecord::decode(v.value())?));
        }
        Ok(out)
    }

    /// The record of `name` and its parent's name (same namespace).
    pub fn record(&self, ns: &str, name: &str) -> Result<(LayerRecord, Option<String>)> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let n = names
            .get((ns, name))
            .map_err(error::db_err)?
            .map(|v| v.value())
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let rec = read_record(&layers, n)?;
        let parent = match rec.parent {
            Some(p) => Some(read_record(&layers, p)?.name),
            None => None,
        };
        Ok((rec, parent))
    }

    /// Every layer of one namespace with its parent's name, in name order, from one consistent snapshot
    /// of the metadata.
    pub fn list_ns(&self, ns: &str) -> Result<Vec<(LayerRecord, Option<String>)>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut recs = Vec::new();
        let mut by_number = HashMap::new();
        for row in names.range((ns, "")..).map_err(error::db_err)? {
            let (k, v) = row.map_err(error::db_err)?;
            if k.value().0 != ns {
                break;
            }
            let n = v.value();
            let rec = read_record(&layers, n)?;
            by_number.insert(n, rec.name.clone());
            recs.push(rec);
        }
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            let parent = match rec.parent {
                Some(p) => Some(match by_number.get(&p) {
                    Some(name) => name.clone(),
                    None => read_record(&layers, p)?.name,
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
        let dir = open_dir(&self.layer_dir(n).join("diff"))?;
        Ok(lamina_archive::disk_usage(dir.as_fd())?)
    }

    /// Reads a remembered setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let t = txn.open_table(SETTINGS).map_err(error::db_err)?;
        Ok(t.get(key).map_err(error::db_err)?.map(|v| v.value().to_string()))
    }

    /// Remembers a setting across restarts.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        txn.open_table(SETTINGS)
            .map_err(error::db_err)?
            .insert(key, value)
            .map_err(error::db_err)?;
        txn.commit().map_err(error::db_err)
    }

    pub(crate) fn lookup(&self, ns: &str, name: &str) -> Result<Option<(u64, LayerRecord)>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let names = txn.open_table(NAMES).map_err(error::db_err)?;
        let Some(n) = names.get((ns, name)).map_err(error::db_err)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let rec = layers.get(n).map_err(error::db_err)?.ok_or_else(|| {
            StoreError::CorruptMetadata(format!("name {name:?} points at missing layer {n}"))
        })?;
        Ok(Some((n, LayerRecord::decode(rec.value())?)))
    }

    pub(crate) fn require(&self, ns: &str, name: &str) -> Result<(u64, LayerRecord)> {
        self.lookup(ns, name)?
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))
    }

    /// Layer numbers of the parent chain of `rec`, nearest first.
    pub(crate) fn chain(&self, rec: &LayerRecord) -> Result<Vec<u64>> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let layers = txn.open_table(LAYERS).map_err(error::db_err)?;
        let mut out = Vec::with_capacity(rec.depth as usize);
        let mut next = rec.parent;
        while let Some(p) = next {
            if out.len() > MAX_OVERLAY_LOWERS {
                return Err(StoreError::CorruptMetadata(format!(
                    "parent chain of {} loops",
                    rec.name
                )));
            }
            out.push(p);
            let v = layers
                .get(p)
                .map_err(error::db_err)?
                .ok_or_else(|| StoreError::CorruptMetadata(format!("missing parent layer {p}")))?;
            next = LayerRecord::decode(v.value())?.parent;
        }
        Ok(out)
    }

    pub(crate) fn has_children(&self, n: u64) -> Result<bool> {
        let txn = self.db.begin_read().map_err(error::db_err)?;
        let children = txn.open_table(CHILDREN).map_err(error::db_err)?;
        let mut range = children.range((n, 0)..=(n, u64::MAX)).map_err(error::db_err)?;
        Ok(range.next().is_some())
    }

    pub(crate) fn update_record(&self, n: u64, f: impl FnOnce(&mut LayerRecord)) -> Result<LayerRecord> {
        let txn = self.db.begin_write().map_err(error::db_err)?;
        let rec = {
            let mut layers = txn.open_table(LAYERS).map_err(error::db_err)?;
            let mut rec = {
                let v = layers.get(n).map_err(error::db_err)?;
                let v = v.ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {n}")))?;
                LayerRecord::decode(v.value())?
            };
            f(&mut rec);
            layers.insert(n, rec.encode().as_slice()).map_err(error::db_err)?;
            rec
        };
        txn.commit().map_err(error::db_err)?;
        Ok(rec)
    }

    pub(crate) fn slot(&self, n: u64) -> Arc<Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(n).or_default().clone()
    }

    pub(crate) fn layer_dir(&self, n: u64) -> PathBuf {
        self.root.join("layers").join(format!("{n:x}"))
    }

    /// The data root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

pub(crate) fn read_record(layers: &impl ReadableTable<u64, &'static [u8]>, n: u64) -> Result<LayerRecord> {
    let v = layers
        .get(n)
        .map_err(error::db_err)?
        .ok_or_else(|| StoreError::CorruptMetadata(format!("missing layer {n}")))?;
    LayerRecord::decode(v.value())
}
