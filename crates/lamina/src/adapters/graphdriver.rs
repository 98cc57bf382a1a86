//! Docker GraphDriver protocol over the layer store.
//!
//! Docker's layers live in the store namespace `docker:<home>`, where `<home>` is the directory
//! dockerd sends in `Init`. The namespace and the id maps are remembered in the store, because
//! dockerd never repeats `Init` after a plugin restart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use lamina_archive::{ArchiveError, IdMap, IdMappings};
use lamina_docker::{
    CreateRequest, DiffStream, ErrorKind, FileChange, GraphDriver, IdMapEntry, InitRequest, PluginError,
};
use lamina_store::{CreateOptions, DiffPlan, LayerKind, NewLayer, Store, StoreError};
use lamina_sys::fs::errno;
use tracing::info;

use crate::metrics;

const SETTING_HOME: &str = "graphdriver.home";
const SETTING_MAPS: &str = "graphdriver.idmaps";

#[derive(Debug, Clone, Default)]
struct DriverState {
    /// Shared, so that the calls that need only the namespace copy no string.
    ns: Arc<str>,
    mappings: IdMappings,
}

/// Serves the GraphDriver protocol from a [`Store`].
#[derive(Debug)]
pub struct GraphDriverAdapter {
    store: Arc<Store>,
    state: RwLock<DriverState>,
}

/// Maps a store error to the wire error, once.
pub fn to_plugin_error(e: StoreError) -> PluginError {
    let kind = match &e {
        StoreError::InvalidArgument(_) => ErrorKind::InvalidArgument,
        StoreError::NotFound(_) => ErrorKind::NotFound,
        StoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
        StoreError::InUse(_) | StoreError::Precondition(_) => ErrorKind::InUse,
        StoreError::LimitExceeded(_) => ErrorKind::LimitExceeded,
        StoreError::QuotaUnsupported { .. } => ErrorKind::Unsupported,
        StoreError::CorruptMetadata(_) => ErrorKind::CorruptMetadata,
        StoreError::Unavailable(_) => ErrorKind::BackendUnavailable,
        StoreError::NoSpace(_) => ErrorKind::NoSpace,
        StoreError::Archive(ArchiveError::InvalidArchive(_)) => ErrorKind::InvalidArchive,
        StoreError::Archive(ArchiveError::Unsupported(_)) => ErrorKind::Unsupported,
        StoreError::Archive(ArchiveError::LimitExceeded(_)) => ErrorKind::LimitExceeded,
        StoreError::Archive(ArchiveError::Io { .. }) | StoreError::Io { .. } | StoreError::Locked(_) => {
            match e.raw_os_error() {
                Some(errno::ENOSPC | errno::EDQUOT) => ErrorKind::NoSpace,
                Some(errno::EROFS) => ErrorKind::ReadOnly,
                Some(errno::EMLINK | errno::EFBIG) => ErrorKind::LimitExceeded,
                _ => ErrorKind::Io,
            }
        }
    };
    // The class prefix is added by PluginError's Display; keep only the detail here.
    let full = e.to_string();
    let prefix = format!("{}: ", kind.as_str());
    let detail = full.strip_prefix(&prefix).map(str::to_string).unwrap_or(full);
    PluginError::new(kind, detail)
}

fn to_maps(entries: &[IdMapEntry]) -> Vec<IdMap> {
    entries
        .iter()
        .map(|e| IdMap {
            container_id: e.container_id,
            host_id: e.host_id,
            size: e.size,
        })
        .collect()
}

fn encode_maps(m: &IdMappings) -> String {
    let f = |v: &[IdMap]| {
        v.iter()
            .map(|e| format!("{}:{}:{}", e.container_id, e.host_id, e.size))
            .collect::<Vec<_>>()
    };
    format!("{}|{}", f(&m.uids).join(","), f(&m.gids).join(","))
}

fn decode_maps(s: &str) -> IdMappings {
    let parse = |part: &str| -> Vec<IdMap> {
        part.split(',')
            .filter(|x| !x.is_empty())
            .filter_map(|x| {
                let mut it = x.split(':').map(|n| n.parse::<u32>());
                Some(IdMap {
                    container_id: it.next()?.ok()?,
                    host_id: it.next()?.ok()?,
                    size: it.next()?.ok()?,
                })
            })
            .collect()
    };
    let (u, g) = s.split_once('|').unwrap_or((s, ""));
    IdMappings {
        uids: parse(u),
        gids: parse(g),
    }
}

impl GraphDriverAdapter {
    /// Builds the adapter, restoring the namespace and id maps of the last `Init`.
    pub fn new(store: Arc<Store>) -> Result<Self, StoreError> {
        let home = store.setting(SETTING_HOME)?.unwrap_or_default();
        let mappings = store
            .setting(SETTING_MAPS)?
            .map(|s| decode_maps(&s))
            .unwrap_or_default();
        Ok(GraphDriverAdapter {
            store,
            state: RwLock::new(DriverState {
                ns: format!("docker:{home}").into(),
                mappings,
            }),
        })
    }

    fn state(&self) -> DriverState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn ns(&self) -> Arc<str> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).ns.clone()
    }
}

/// A Diff, counting the bytes it writes.
struct Stream<'a>(DiffPlan<'a>);

/// Counts what a Diff writes.
struct Counting<'a>(&'a mut dyn Write, u64);

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1 += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)?;
        self.1 += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl DiffStream for Stream<'_> {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), PluginError> {
        let Stream(plan) = *self;
        if !metrics::enabled() {
            return plan.write_to(out).map_err(to_plugin_error);
        }
        let mut counting = Counting(out, 0);
        let r = plan.write_to(&mut counting).map_err(to_plugin_error);
        metrics::diffed(counting.1);
        r
    }
}

impl GraphDriver for GraphDriverAdapter {
    fn init(&self, req: InitRequest) -> Result<(), PluginError> {
        self.init_inner(req)
    }

    fn create(&self, req: CreateRequest, read_write: bool) -> Result<(), PluginError> {
        self.create_inner(req, read_write)
    }

    fn remove(&self, id: &str) -> Result<(), PluginError> {
        self.store
            .remove(&self.ns(), id)
            .map(|_| ())
            .map_err(to_plugin_error)
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        self.store
            .get(&self.ns(), id, mount_label)
            .map_err(to_plugin_error)
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        self.store.put(&self.ns(), id).map_err(to_plugin_error)
    }

    fn exists(&self, id: &str) -> bool {
        self.store.exists(&self.ns(), id).unwrap_or(false)
    }

    fn status(&self) -> Vec<[String; 2]> {
        self.status_inner()
    }

    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError> {
        self.get_metadata_inner(id)
    }

    fn cleanup(&self) -> Result<(), PluginError> {
        self.store.unmount_all().map_err(to_plugin_error)
    }

    fn diff(&self, id: &str, parent: &str) -> Result<Box<dyn DiffStream + '_>, PluginError> {
        let st = self.state();
        match self.store.diff(&st.ns, id, parent, &st.mappings) {
            Ok(plan) => Ok(Box::new(Stream(plan))),
            Err(e) => Err(to_plugin_error(e)),
        }
    }

    fn changes(&self, id: &str, parent: &str) -> Result<Vec<FileChange>, PluginError> {
        self.changes_inner(id, parent)
    }

    fn apply_diff(&self, id: &str, parent: &str, body: &mut dyn Read) -> Result<u64, PluginError> {
        let started = Instant::now();
        let (size, tar_bytes) = self.apply_diff_inner(id, parent, body)?;
        metrics::applied(tar_bytes, started.elapsed());
        Ok(size)
    }

    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, PluginError> {
        self.store
            .diff_size(&self.ns(), id, parent)
            .map_err(to_plugin_error)
    }
}

impl GraphDriverAdapter {
    fn init_inner(&self, req: InitRequest) -> Result<(), PluginError> {
        if let Some(opt) = req.options.first() {
            return Err(PluginError::new(
                ErrorKind::Unsupported,
                format!("storage option {opt:?}: lamina takes no --storage-opt settings"),
            ));
        }
        let mappings = IdMappings {
            uids: to_maps(&req.uid_maps),
            gids: to_maps(&req.gid_maps),
        };
        if mappings.uids.is_empty() != mappings.gids.is_empty() {
            return Err(PluginError::invalid("UIDMaps and GIDMaps must be given together"));
        }
        self.store
            .set_setting(SETTING_HOME, &req.home)
            .map_err(to_plugin_error)?;
        self.store
            .set_setting(SETTING_MAPS, &encode_maps(&mappings))
            .map_err(to_plugin_error)?;
        let ns = format!("docker:{}", req.home).into();
        info!(home = %req.home, remapped = !mappings.uids.is_empty(), "graphdriver initialised");
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = DriverState { ns, mappings };
        Ok(())
    }

    fn create_inner(&self, req: CreateRequest, read_write: bool) -> Result<(), PluginError> {
        let mut opts = CreateOptions::default();
        for (key, value) in &req.storage_opt {
            // `docker run --storage-opt size=10M`: a size limit on the container's writable layer (dockerd passes
            // the same options for its `-init` layer). Key case does not matter, as with overlay2.
            if key.eq_ignore_ascii_case("size") {
                opts.max_size = Some(lamina_store::parse_size(value).map_err(to_plugin_error)?);
            } else {
                return Err(PluginError::new(
                    ErrorKind::Unsupported,
                    format!("storage option {key:?} is not supported by lamina (only size)"),
                ));
            }
        }
        let kind = if read_write {
            LayerKind::ReadWrite
        } else {
            LayerKind::ReadOnly
        };
        let ns = self.ns();
        let layer = NewLayer::new(&ns, &req.id, kind)
            .with_parent(req.parent.as_deref())
            .with_options(opts);
        self.store.create(layer).map_err(to_plugin_error)
    }

    fn status_inner(&self) -> Vec<[String; 2]> {
        let mut rows = Vec::new();
        if let Ok(st) = self.store.status() {
            rows.push(["Backing Filesystem".into(), st.backing_fs]);
            rows.push(["Data Root".into(), st.root.display().to_string()]);
            rows.push([
                "Layers".into(),
                self.store.count(&self.ns()).unwrap_or(0).to_string(),
            ]);
            rows.push(["Mounted Layers".into(), st.mounted.to_string()]);
            rows.push(["On-disk Format".into(), st.format.to_string()]);
        }
        rows
    }

    fn get_metadata_inner(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError> {
        let info = self.store.info(&self.ns(), id).map_err(to_plugin_error)?;
        let mut m = BTreeMap::new();
        m.insert("UpperDir".to_string(), info.diff_dir.display().to_string());
        m.insert("WorkDir".to_string(), info.work_dir.display().to_string());
        if info.lower_dirs.is_empty() {
            m.insert("MergedDir".to_string(), info.diff_dir.display().to_string());
        } else {
            m.insert("MergedDir".to_string(), info.merged_dir.display().to_string());
            let lowers: Vec<String> = info.lower_dirs.iter().map(|p| p.display().to_string()).collect();
            m.insert("LowerDir".to_string(), lowers.join(":"));
        }
        if let Some(d) = info.record.digest {
            m.insert("Digest".to_string(), d);
        }
        Ok(m)
    }

    fn changes_inner(&self, id: &str, parent: &str) -> Result<Vec<FileChange>, PluginError> {
        let changes = self
            .store
            .changes(&self.ns(), id, parent)
            .map_err(to_plugin_error)?;
        Ok(changes
            .into_iter()
            .map(|c| FileChange {
                path: String::from_utf8_lossy(&c.path).into_owned(),
                kind: c.kind as u8,
            })
            .collect())
    }

    /// ApplyDiff; gives the layer's size and the tar bytes read. The store refuses a layer created on
    /// another parent than `parent`.
    fn apply_diff_inner(
        &self,
        id: &str,
        parent: &str,
        body: &mut dyn Read,
    ) -> Result<(u64, u64), PluginError> {
        let st = self.state();
        let stats = self
            .store
            .apply_diff(&st.ns, id, parent, body, &st.mappings)
            .map_err(to_plugin_error)?;
        // On a host of a cluster, a layer already in the shared tier keeps no second, local copy.
        if let Err(e) = self.store.share_applied(&st.ns, id) {
            tracing::warn!(id, error = %e, "could not store the applied layer in the cluster tier");
        }
        Ok((stats.size, stats.tar_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip() {
        let m = IdMappings {
            uids: vec![IdMap {
                container_id: 0,
                host_id: 100000,
                size: 65536,
            }],
            gids: vec![IdMap {
                container_id: 0,
                host_id: 200000,
                size: 1000,
            }],
        };
        assert_eq!(decode_maps(&encode_maps(&m)), m);
        assert_eq!(
            decode_maps(&encode_maps(&IdMappings::default())),
            IdMappings::default()
        );
    }

    #[test]
    fn errors_keep_one_class_prefix() {
        let e = to_plugin_error(StoreError::NotFound("layer abc".into()));
        assert_eq!(e.to_string(), "not found: layer abc");
        let e = to_plugin_error(StoreError::Archive(ArchiveError::InvalidArchive("x".into())));
        assert_eq!(e.to_string(), "invalid archive: x");
        let e = to_plugin_error(StoreError::io("write", std::io::Error::from_raw_os_error(28)));
        assert_eq!(e.kind, ErrorKind::NoSpace);
        let e = to_plugin_error(StoreError::QuotaUnsupported {
            fs: "ext4".into(),
            reason: "why".into(),
        });
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.to_string().contains("quota not supported on ext4 (why)"), "{e}");
    }
}
