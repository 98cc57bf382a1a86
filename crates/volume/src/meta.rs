//! Per-host bookkeeping in redb (`<data root>/volumes/meta.redb`): mount counts per (volume, mount ID),
//! and a cache of the volumes seen, used to answer `Get`/`List` while a cluster is unreachable.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{db_err, VolumeError};
use crate::options::BackendKind;

/// Format version of `meta.redb`; see docs/on-disk-format.md.
pub const FORMAT_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MOUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("mounts");
const KNOWN: TableDefinition<&str, &[u8]> = TableDefinition::new("known");

/// What lamina knows about a volume: written as `.lamina/<name>.json` next to the volumes (the shared
/// truth) and cached in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Record version (1).
    pub version: u32,
    /// Name.
    pub name: String,
    /// Backend holding it.
    pub backend: BackendKind,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Goal requested at Create (after the default goal was applied), if any.
    pub goal: Option<String>,
    /// Quota in bytes, if any.
    pub quota: Option<u64>,
    /// The `-o` options as given.
    #[serde(default)]
    pub opts: BTreeMap<String, String>,
    /// Image size in bytes (rbd backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Filesystem (rbd backend): `ext4` or `xfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<String>,
}

impl VolumeRecord {
    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses JSON bytes.
    pub fn decode(b: &[u8]) -> Result<Self, VolumeError> {
        serde_json::from_slice(b).map_err(|e| VolumeError::CorruptMetadata(format!("volume record: {e}")))
    }

    /// Whether a Create with `other`'s settings asks for the same volume.
    pub fn same_request(&self, other: &VolumeRecord) -> bool {
        self.backend == other.backend
            && self.goal == other.goal
            && self.quota == other.quota
            && self.size == other.size
            && self.fs == other.fs
    }
}

/// The database.
#[derive(Debug)]
pub struct Bookkeeping {
    db: Database,
}

impl Bookkeeping {
    /// Opens or creates the database; refuses a newer format.
    pub fn open(path: &Path) -> Result<Self, VolumeError> {
        let db = Database::create(path).map_err(|e| db_err(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let found = meta.get("format").map_err(db_err)?.map(|v| v.value());
            match found {
                Some(v) if v > FORMAT_VERSION => {
                    return Err(VolumeError::CorruptMetadata(format!(
                        "volume metadata format {v} is newer than supported {FORMAT_VERSION}"
                    )))
                }
                Some(_) => {}
                None => {
                    meta.insert("format", FORMAT_VERSION).map_err(db_err)?;
                }
            }
            txn.open_table(MOUNTS).map_err(db_err)?;
            txn.open_table(KNOWN).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Bookkeeping { db })
    }

    /// Adds one count for `(name, id)`; returns the volume's new total.
    pub fn add(&self, name: &str, id: &str) -> Result<u64, VolumeError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(MOUNTS).map_err(db_err)?;
            let n = t.get((name, id)).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
            t.insert((name, id), n + 1).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        self.total(name)
    }

    /// Releases one count of `(name, id)`. Returns `None` if the id held nothing (not an error: dockerd
    /// sends Unmount after a failed Mount), else the volume's new total.
    pub fn release(&self, name: &str, id: &str) -> Result<Option<u64>, VolumeError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let held = {
            let mut t = txn.open_table(MOUNTS).map_err(db_err)?;
            let n = t.get((name, id)).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
            match n {
                0 => false,
                1 => {
                    t.remove((name, id)).map_err(db_err)?;
                    true
                }
                n => {
                    t.insert((name, id), n - 1).map_err(db_err)?;
                    true
                }
            }
        };
        txn.commit().map_err(db_err)?;
        if !held {
            return Ok(None);
        }
        self.total(name).map(Some)
    }

    /// Drops every count of `name` (after a failed first mount).
    pub fn clear(&self, name: &str) -> Result<(), VolumeError> {
        let ids: Vec<String> = self.counts(name)?.into_keys().collect();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(MOUNTS).map_err(db_err)?;
            for id in &ids {
                t.remove((name, id.as_str())).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Counts per mount id of `name`.
    pub fn counts(&self, name: &str) -> Result<BTreeMap<String, u64>, VolumeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(MOUNTS).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for e in t.range((name, "")..).map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let (n, id) = k.value();
            if n != name {
                break;
            }
            out.insert(id.to_string(), v.value());
        }
        Ok(out)
    }

    /// Sum of the counts of `name`.
    pub fn total(&self, name: &str) -> Result<u64, VolumeError> {
        Ok(self.counts(name)?.values().sum())
    }

    /// Totals of every volume with a count.
    pub fn mounted(&self) -> Result<BTreeMap<String, u64>, VolumeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(MOUNTS).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            *out.entry(k.value().0.to_string()).or_insert(0) += v.value();
        }
        Ok(out)
    }

    /// Remembers a volume.
    pub fn remember(&self, rec: &VolumeRecord) -> Result<(), VolumeError> {
        if self.known(&rec.name)?.as_ref() == Some(rec) {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(KNOWN)
            .map_err(db_err)?
            .insert(rec.name.as_str(), rec.encode().as_slice())
            .map_err(db_err)?;
        lamina_sys::fault::point("volume.create.commit")
            .map_err(|e| crate::backend::io_err("commit volume metadata".into(), e))?;
        txn.commit().map_err(db_err)
    }

    /// Forgets a volume.
    pub fn forget(&self, name: &str) -> Result<(), VolumeError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(KNOWN)
            .map_err(db_err)?
            .remove(name)
            .map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    /// The cached record of `name`.
    pub fn known(&self, name: &str) -> Result<Option<VolumeRecord>, VolumeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(KNOWN).map_err(db_err)?;
        let v = t.get(name).map_err(db_err)?;
        v.map(|b| VolumeRecord::decode(b.value())).transpose()
    }

    /// Every cached record.
    pub fn all_known(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(KNOWN).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (_, v) = e.map_err(db_err)?;
            out.push(VolumeRecord::decode(v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VolumeRecord {
        VolumeRecord {
            version: 1,
            name: name.into(),
            backend: BackendKind::Moosefs,
            created: 1,
            goal: Some("2".into()),
            quota: None,
            opts: BTreeMap::new(),
            size: None,
            fs: None,
        }
    }

    #[test]
    fn counts_per_id_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.redb");
        {
            let b = Bookkeeping::open(&p).unwrap();
            assert_eq!(b.add("v", "a").unwrap(), 1);
            assert_eq!(
                b.add("v", "a").unwrap(),
                2,
                "the same id twice is a count, not a set"
            );
            assert_eq!(b.add("v", "b").unwrap(), 3);
            assert_eq!(
                b.add("va", "a").unwrap(),
                1,
                "a longer name with the same prefix is apart"
            );
            assert_eq!(b.release("v", "zzz").unwrap(), None, "unknown id");
            assert_eq!(b.release("nope", "a").unwrap(), None, "unknown volume");
            assert_eq!(b.release("v", "a").unwrap(), Some(2));
        }
        let b = Bookkeeping::open(&p).unwrap();
        assert_eq!(
            b.counts("v").unwrap(),
            BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
        );
        assert_eq!(
            b.mounted().unwrap(),
            BTreeMap::from([("v".into(), 2), ("va".into(), 1)])
        );
        assert_eq!(b.release("v", "a").unwrap(), Some(1));
        assert_eq!(b.release("v", "b").unwrap(), Some(0));
        assert_eq!(b.release("v", "b").unwrap(), None, "already released");
        assert_eq!(b.total("v").unwrap(), 0);
        b.add("va", "x").unwrap();
        b.clear("va").unwrap();
        assert!(b.mounted().unwrap().is_empty());
    }

    #[test]
    fn known_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bookkeeping::open(&dir.path().join("m.redb")).unwrap();
        b.remember(&rec("a")).unwrap();
        b.remember(&rec("b")).unwrap();
        assert_eq!(b.known("a").unwrap(), Some(rec("a")));
        b.forget("a").unwrap();
        assert_eq!(b.known("a").unwrap(), None);
        assert_eq!(b.all_known().unwrap(), vec![rec("b")]);
        let mut other = rec("b");
        assert!(other.same_request(&rec("b")));
        other.goal = Some("3".into());
        assert!(!other.same_request(&rec("b")));
    }

    #[test]
    fn newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.redb");
        {
            let db = Database::create(&p).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("format", FORMAT_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let e = Bookkeeping::open(&p).unwrap_err().to_string();
        assert!(e.contains("newer than supported"), "{e}");
    }
}
