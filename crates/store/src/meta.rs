//! Metadata records kept in redb.

use std::collections::BTreeMap;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// On-disk format version written by this build; see docs/on-disk-format.md.
pub const FORMAT_VERSION: u64 = 5;

/// `layer number -> LayerRecord` (JSON). The only table that says which layers exist, what they are named and
/// what they sit on: the name and child indexes are kept in memory (`index.rs`, format 5).
pub(crate) const LAYERS: TableDefinition<u64, &[u8]> = TableDefinition::new("layers");
/// Up to format 4, `(namespace, name) -> layer number`; dropped by the migration to format 5.
pub(crate) const LEGACY_NAMES: TableDefinition<(&str, &str), u64> = TableDefinition::new("names");
/// Up to format 4, `(parent, child)` pairs; dropped by the migration to format 5.
pub(crate) const LEGACY_CHILDREN: TableDefinition<(u64, u64), ()> = TableDefinition::new("children");
/// `layer number -> staging dir name` for applies in progress.
pub(crate) const PENDING: TableDefinition<u64, &str> = TableDefinition::new("pending");
/// Layers whose removal was committed: `layer number -> removal time (ns)`. A directory in `layers/` without a
/// record is deleted at start only when it has a row here (the proof that this store removed it); any other is
/// moved to `quarantine/`. Rows are dropped at start once their directories are gone and synced.
pub(crate) const REMOVED: TableDefinition<u64, u64> = TableDefinition::new("removed");
/// Store-wide values: `format`, `next_id`, `root_id` (matches the data root's `identity` file).
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Store-wide strings (e.g. settings remembered across restarts).
pub(crate) const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");
/// `layer number -> LayerStats` (JSON), flushed in batches (format 3).
pub(crate) const STATS: TableDefinition<u64, &[u8]> = TableDefinition::new("stats");
/// Store-wide operation counters (`gets`, `puts`, `hits`, ...), flushed with [`STATS`] (format 3).
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// `layer number -> manifest` of a small committed layer, kept here instead of in a `manifest` file beside its
/// content so that the commit's `syncfs` writes no file data (format 4).
pub(crate) const MANIFESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("manifests");

/// Whether a layer was created for writing by a container or as an image layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// An image layer (filled once by an apply, or by a builder through a mount).
    ReadOnly,
    /// A container's writable layer (a snapshotter's active snapshot).
    ReadWrite,
    /// A read-only view of its parent with no content of its own (a snapshotter's view).
    View,
}

/// Where a layer's content stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerState {
    /// Created, content only written through mounts (if at all).
    Empty,
    /// A tar is being applied.
    Applying,
    /// A tar was applied completely and synced.
    Applied,
}

/// The metadata of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Namespace of the front door that owns it (`docker:<home>`, `containerd:<ns>`).
    pub ns: String,
    /// The owner's name for it (Docker id, snapshot key).
    pub name: String,
    /// Parent layer number.
    pub parent: Option<u64>,
    /// Number of layers below it.
    pub depth: u32,
    /// Kind.
    pub kind: LayerKind,
    /// Content state.
    pub state: LayerState,
    /// Size in bytes after an apply.
    pub size: Option<u64>,
    /// `sha256:` digest of the applied tar.
    pub digest: Option<String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: u64,
    /// Last change of the record (labels, commit), nanoseconds since the epoch.
    pub updated_ns: u64,
    /// Inodes in the layer's own content, recorded when it is frozen by a commit.
    #[serde(default)]
    pub inodes: Option<u64>,
    /// Free-form labels (for the snapshotter).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `sha256:` of the layer's content manifest file (`layers/<n>/manifest`), recorded when the layer is
    /// frozen (apply, commit); see [`lamina_archive::manifest`]. Format 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Size limit in bytes of a layer created with one (`--storage-opt size=`, the snapshotter's
    /// `containerd.io/snapshot/max-size` label): its directory is a btrfs subvolume with a qgroup limit, or an
    /// xfs project with a quota (see `quota.rs`). Absent means no limit; an optional field, no format change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    /// The chain id under which the layer's content is in the cluster tier (`sha256:<hex>`): published from
    /// this store, or linked from the tier (its content is then the tier's directory). An optional field, no
    /// format change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<String>,
}

/// Usage counters of one layer, kept in memory and flushed to the `stats` table in batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Mount requests for this layer: `Get` calls, and the snapshotter's Prepare/View/Mounts calls (containerd
    /// mounts those itself).
    #[serde(default)]
    pub gets: u64,
    /// Times a mounted stack containing this layer was brought up (its first reference, or as a lower layer
    /// of one): the popularity of image layers.
    #[serde(default)]
    pub uses: u64,
    /// Last get or use, nanoseconds since the epoch (0: never).
    #[serde(default)]
    pub last_used_ns: u64,
}

/// Rewrites a format-1 record (JSON) as format 2: `created` (seconds) becomes `created_ns` and
/// `updated_ns`.
pub(crate) fn migrate_v1_record(bytes: &[u8]) -> Result<Vec<u8>, crate::StoreError> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| crate::StoreError::CorruptMetadata(format!("format-1 layer record: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| crate::StoreError::CorruptMetadata("format-1 layer record is not an object".into()))?;
    let secs = obj.remove("created").and_then(|c| c.as_u64()).unwrap_or(0);
    let ns = secs.saturating_mul(1_000_000_000);
    obj.insert("created_ns".into(), ns.into());
    obj.insert("updated_ns".into(), ns.into());
    serde_json::to_vec(&v).map_err(|e| crate::StoreError::CorruptMetadata(format!("layer record: {e}")))
}

impl LayerRecord {
    /// The record of a layer committed as `name` (read-only, with its labels, size and inodes): a committed
    /// snapshot is a new snapshot to containerd, created (and updated) now.
    pub(crate) fn committed(
        mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        bytes: u64,
        inodes: u64,
        manifest: Option<String>,
    ) -> Self {
        self.name = name.to_string();
        self.kind = LayerKind::ReadOnly;
        self.labels = labels;
        self.size = Some(bytes);
        self.inodes = Some(inodes);
        self.manifest = manifest;
        self.created_ns = crate::now_ns();
        self.updated_ns = self.created_ns;
        self
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("layer records serialise")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, crate::StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::StoreError::CorruptMetadata(format!("layer record: {e}")))
    }
}
