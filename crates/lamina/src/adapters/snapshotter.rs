//! containerd snapshotter over the layer store.
//!
//! Each snapshotter name containerd addresses is its own store namespace, `containerd:<name>`, apart from
//! the Docker graph driver's `docker:<home>`: containerd's garbage collector removes every snapshot it
//! lists and does not know, so it must never list another engine's layers. Kinds map one to one: active =
//! [`LayerKind::ReadWrite`], committed = [`LayerKind::ReadOnly`], view = [`LayerKind::View`]. Commit is a
//! rename in the metadata; no data moves. Mounts follow containerd's overlayfs snapshotter: a bind mount for
//! a parentless active snapshot and for a view of one layer, overlay otherwise.
//!
//! With a cluster tier, the remote-snapshotter contract: a `Prepare` labelled `containerd.io/snapshot.ref`
//! with a chain id the store can take from the tier makes that committed snapshot and answers `AlreadyExists`
//! (containerd then fetches and unpacks nothing for it); a `Commit` with that label publishes the layer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lamina_snapshotter::{Code, Info, Kind, LabelChange, Labels, Mount, SnapshotError, Snapshotter, Usage};
use lamina_store::{CreateOptions, LayerKind, LayerRecord, MountSpec, NewLayer, Store, StoreError};
use lamina_sys::fs::errno;
use tracing::warn;

/// The label containerd's unpacker puts on the Prepare and Commit of a layer: the layer's chain id.
const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// Store namespace of a snapshotter name.
pub fn namespace(snapshotter: &str) -> String {
    format!("containerd:{snapshotter}")
}

/// Maps a store error to the snapshotter's classes, once.
pub fn to_snapshot_error(e: StoreError) -> SnapshotError {
    let code = match &e {
        StoreError::InvalidArgument(_) => Code::InvalidArgument,
        StoreError::NotFound(_) => Code::NotFound,
        StoreError::AlreadyExists(_) => Code::AlreadyExists,
        StoreError::InUse(_) | StoreError::Precondition(_) => Code::FailedPrecondition,
        StoreError::LimitExceeded(_) => Code::ResourceExhausted,
        StoreError::QuotaUnsupported { .. } => Code::FailedPrecondition,
        StoreError::Locked(_) | StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::NoSpace(_) => Code::ResourceExhausted,
        StoreError::CorruptMetadata(_) | StoreError::Archive(_) | StoreError::Io { .. } => {
            match e.raw_os_error() {
                Some(errno::ENOSPC | errno::EDQUOT) => Code::ResourceExhausted,
                _ => Code::Internal,
            }
        }
    };
    SnapshotError::new(code, e.to_string())
}

/// The snapshotter backend.
#[derive(Debug)]
pub struct SnapshotterAdapter {
    store: Arc<Store>,
}

impl SnapshotterAdapter {
    /// A backend over `store`. The data root's path goes into mount options, so it must be UTF-8 without
    /// the separators `,` and `:`.
    pub fn new(store: Arc<Store>) -> anyhow::Result<Self> {
        let root = store.root();
        let s = root
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("data root {} is not UTF-8", root.display()))?;
        if s.contains([',', ':']) {
            anyhow::bail!("data root {s:?} contains ',' or ':', which overlay mount options cannot carry");
        }
        Ok(SnapshotterAdapter { store })
    }

    fn create(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        kind: LayerKind,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let ns = namespace(snapshotter);
        let parent = (!parent.is_empty()).then_some(parent);
        // The size label (containerd's `containerd.io/snapshot/max-size`, bytes) limits an active snapshot; a view
        // has no content of its own, so it is not limited. The label is kept like any other.
        let max_size = match labels.get(lamina_store::SIZE_LABEL) {
            Some(v) if kind == LayerKind::ReadWrite => {
                Some(lamina_store::parse_size(v).map_err(|e| match e {
                    StoreError::InvalidArgument(m) => {
                        SnapshotError::invalid(format!("label {}: {m}", lamina_store::SIZE_LABEL))
                    }
                    e => to_snapshot_error(e),
                })?)
            }
            _ => None,
        };
        let layer = NewLayer {
            ns: &ns,
            name: key,
            parent,
            kind,
            labels,
            options: CreateOptions {
                parent_kind: Some(LayerKind::ReadOnly),
                max_size,
            },
        };
        // One store call: the parent and its chain are resolved once, the mount is described from them.
        let spec = self.store.prepare(layer).map_err(|e| match e {
            StoreError::Precondition(m) => {
                // containerd's snapshotters call a parent that is not committed an invalid argument.
                SnapshotError::invalid(m)
            }
            e => to_snapshot_error(e),
        })?;
        Ok(vec![to_mount(&spec)])
    }

    fn info(&self, rec: LayerRecord, parent: Option<String>) -> Info {
        Info {
            name: rec.name,
            parent: parent.unwrap_or_default(),
            kind: kind_of(rec.kind),
            created: time(rec.created_ns),
            updated: time(rec.updated_ns),
            labels: rec.labels,
        }
    }
}

type Result<T> = std::result::Result<T, SnapshotError>;

fn kind_of(kind: LayerKind) -> Kind {
    match kind {
        LayerKind::ReadWrite => Kind::Active,
        LayerKind::ReadOnly => Kind::Committed,
        LayerKind::View => Kind::View,
    }
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The error of a Mounts: a committed snapshot has none.
fn mounts_error(e: StoreError) -> SnapshotError {
    match e {
        StoreError::Precondition(m) => SnapshotError::new(Code::FailedPrecondition, m),
        e => to_snapshot_error(e),
    }
}

/// containerd's form of a mount description (the data root was checked to be UTF-8 without `,` and `:`).
fn to_mount(spec: &MountSpec) -> Mount {
    Mount {
        kind: spec.kind().into(),
        source: spec.source().to_string_lossy().into_owned(),
        options: spec.options(),
    }
}

impl Snapshotter for SnapshotterAdapter {
    fn prepare(&self, snapshotter: &str, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        if let Some(target) = labels.get(SNAPSHOT_REF) {
            let parent = (!parent.is_empty()).then_some(parent);
            if self
                .store
                .adopt_shared(&namespace(snapshotter), target, parent, labels.clone())
                .map_err(to_snapshot_error)?
            {
                return Err(SnapshotError::new(
                    Code::AlreadyExists,
                    format!("target snapshot {target:?} already exists"),
                ));
            }
        }
        self.create(snapshotter, key, parent, LayerKind::ReadWrite, labels)
    }

    fn view(&self, snapshotter: &str, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(snapshotter, key, parent, LayerKind::View, labels)
    }

    fn mounts(&self, snapshotter: &str, key: &str) -> Result<Vec<Mount>> {
        self.mounts_inner(snapshotter, key)
    }

    fn mounts_now(&self, snapshotter: &str, key: &str) -> Option<Result<Vec<Mount>>> {
        self.store
            .mounts_cached(&namespace(snapshotter), key)
            .map_err(mounts_error)
            .map(|spec| spec.map(|s| vec![to_mount(&s)]))
            .transpose()
    }

    fn commit(&self, snapshotter: &str, name: &str, key: &str, labels: Labels) -> Result<()> {
        let ns = namespace(snapshotter);
        let chain = labels.get(SNAPSHOT_REF).cloned();
        self.store
            .commit(&ns, key, name, labels)
            .map_err(to_snapshot_error)?;
        if let Some(chain) = chain {
            // The layer is committed here whatever happens to its publication.
            if let Err(e) = self.store.publish_shared(&ns, name, &chain) {
                warn!(chain, error = %e, "could not publish the layer to the cluster tier");
            }
        }
        Ok(())
    }

    fn remove(&self, snapshotter: &str, key: &str) -> Result<()> {
        self.remove_inner(snapshotter, key)
    }

    fn stat(&self, snapshotter: &str, key: &str) -> Result<Info> {
        self.stat_inner(snapshotter, key)
    }

    fn update(&self, snapshotter: &str, name: &str, change: &LabelChange) -> Result<Info> {
        let ns = namespace(snapshotter);
        self.store
            .update_labels(&ns, name, |labels| change.apply(labels))
            .map_err(to_snapshot_error)?;
        self.stat_inner(snapshotter, name)
    }

    fn list(&self, snapshotter: &str) -> Result<Vec<Info>> {
        self.list_inner(snapshotter)
    }

    fn usage(&self, snapshotter: &str, key: &str) -> Result<Usage> {
        self.usage_inner(snapshotter, key)
    }

    fn cleanup(&self, _snapshotter: &str) -> Result<()> {
        // Removed layers leave view at once and are deleted in the background; nothing is deferred here.
        Ok(())
    }
}

impl SnapshotterAdapter {
    fn mounts_inner(&self, snapshotter: &str, key: &str) -> Result<Vec<Mount>> {
        let spec = self
            .store
            .mounts(&namespace(snapshotter), key)
            .map_err(mounts_error)?;
        Ok(vec![to_mount(&spec)])
    }

    fn remove_inner(&self, snapshotter: &str, key: &str) -> Result<()> {
        // An active snapshot of an unpack that was given up: its claim in the cluster tier goes with it.
        let abandoned = match self.store.record(&namespace(snapshotter), key) {
            Ok((rec, _)) if rec.kind == LayerKind::ReadWrite => rec.labels.get(SNAPSHOT_REF).cloned(),
            _ => None,
        };
        match self.store.remove(&namespace(snapshotter), key) {
            Ok(true) => {
                if let Some(chain) = abandoned {
                    self.store.release_shared_claim(&chain);
                }
                Ok(())
            }
            Ok(false) => Err(SnapshotError::not_found(format!("snapshot {key} does not exist"))),
            Err(StoreError::InUse(m)) => Err(SnapshotError::new(
                Code::FailedPrecondition,
                format!("cannot remove snapshot {key}: {m}"),
            )),
            Err(e) => Err(to_snapshot_error(e)),
        }
    }

    fn stat_inner(&self, snapshotter: &str, key: &str) -> Result<Info> {
        let (rec, parent) = self
            .store
            .record(&namespace(snapshotter), key)
            .map_err(to_snapshot_error)?;
        Ok(self.info(rec, parent))
    }

    fn list_inner(&self, snapshotter: &str) -> Result<Vec<Info>> {
        Ok(self
            .store
            .list_ns(&namespace(snapshotter))
            .map_err(to_snapshot_error)?
            .into_iter()
            .map(|(rec, parent)| self.info(rec, parent))
            .collect())
    }

    fn usage_inner(&self, snapshotter: &str, key: &str) -> Result<Usage> {
        let u = self
            .store
            .usage(&namespace(snapshotter), key)
            .map_err(to_snapshot_error)?;
        Ok(Usage {
            size: i64::try_from(u.bytes).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        })
    }
}
