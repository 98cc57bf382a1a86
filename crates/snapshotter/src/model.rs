//! What the service speaks about, independent of the wire: kinds, infos, mounts, label changes, and the
//! [`Snapshotter`] trait a backend implements.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::error::{Result, SnapshotError};

/// Snapshot labels.
pub type Labels = BTreeMap<String, String>;

/// Longest key or name accepted, in bytes. containerd's own keys are `<namespace>/<n>/<key>`, well below.
pub const MAX_KEY_BYTES: usize = 4096;
/// Longest label key plus value, in bytes (containerd's limit).
pub const MAX_LABEL_BYTES: usize = 4096;

/// Kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read-only view of a committed parent; never committed.
    View,
    /// Writable; becomes committed by `Commit`.
    Active,
    /// Frozen; a parent for others.
    Committed,
}

impl Kind {
    /// The name containerd's filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What `Stat` and `List` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key (active, view) or name (committed).
    pub name: String,
    /// Parent's name, empty for none.
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Creation time.
    pub created: SystemTime,
    /// Last change.
    pub updated: SystemTime,
    /// Labels.
    pub labels: Labels,
}

impl Info {
    /// A snapshot created and changed at the epoch, for the crate's tests and its fuzz targets.
    #[doc(hidden)]
    pub fn sample(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// Space used by one snapshot, parents excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes on disk.
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// A mount for another process to perform (containerd, a shim), fstab style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind` or `overlay`.
    pub kind: String,
    /// Source.
    pub source: String,
    /// Options such as `ro`, `rbind`, `lowerdir=...`.
    pub options: Vec<String>,
}

/// A label update as `Update` asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    /// Replace every label (no field mask, or the path `labels`).
    Replace(Labels),
    /// Set or remove single labels (paths `labels.<key>`): `None` removes.
    Set(BTreeMap<String, Option<String>>),
}

impl LabelChange {
    /// Builds the change from an `Update` request's labels and field paths. Paths other than `labels` and
    /// `labels.<key>` are refused, as containerd's snapshotters refuse them.
    pub fn from_request(labels: &Labels, paths: &[String]) -> Result<LabelChange> {
        if paths.is_empty() {
            return Ok(LabelChange::Replace(without_empty(labels)));
        }
        let mut set = BTreeMap::new();
        let mut replace = None;
        for path in paths {
            if let Some(key) = path.strip_prefix("labels.") {
                set.insert(
                    key.to_string(),
                    labels.get(key).filter(|v| !v.is_empty()).cloned(),
                );
            } else if path == "labels" {
                replace = Some(without_empty(labels));
            } else {
                return Err(SnapshotError::invalid(format!(
                    "cannot update field {path:?}: only labels are mutable"
                )));
            }
        }
        Ok(match replace {
            // `labels` with single keys as well: the whole set wins.
            Some(all) => LabelChange::Replace(all),
            None => LabelChange::Set(set),
        })
    }

    /// Applies the change to `labels`.
    pub fn apply(&self, labels: &mut Labels) {
        match self {
            LabelChange::Replace(all) => *labels = all.clone(),
            LabelChange::Set(set) => {
                for (k, v) in set {
                    match v {
                        Some(v) => {
                            labels.insert(k.clone(), v.clone());
                        }
                        None => {
                            labels.remove(k);
                        }
                    }
                }
            }
        }
    }
}

/// Labels with empty values dropped: containerd stores an empty value as no label.
pub fn without_empty(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Checks a key, name or parent: not empty, not over [`MAX_KEY_BYTES`]. Keys are otherwise opaque (they hold
/// `/`, spaces, anything) and never used as paths.
pub fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(SnapshotError::invalid(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(SnapshotError::invalid(format!(
            "{what} is {} bytes long; at most {MAX_KEY_BYTES} are accepted",
            key.len()
        )));
    }
    Ok(())
}

/// Checks labels: keys not empty, key plus value at most [`MAX_LABEL_BYTES`].
pub fn check_labels(labels: &Labels) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(SnapshotError::invalid("label key must not be empty"));
        }
        if k.len() + v.len() > MAX_LABEL_BYTES {
            let shown: String = k.chars().take(64).collect();
            return Err(SnapshotError::invalid(format!(
                "label {shown:?}: key and value are {} bytes, more than the {MAX_LABEL_BYTES} allowed",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

/// A snapshotter backend. `snapshotter` is the name the caller addressed (containerd's proxy plugin name);
/// a backend keeps each name's snapshots apart. Arguments arrive checked ([`check_key`], [`check_labels`],
/// empty label values dropped); `parent` is `""` for none.
pub trait Snapshotter: Send + Sync + 'static {
    /// Creates active snapshot `key` on committed `parent` and returns its mounts.
    fn prepare(&self, snapshotter: &str, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;
    /// Creates read-only view `key` of committed `parent` and returns its mounts.
    fn view(&self, snapshotter: &str, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;
    /// Mounts of an active snapshot or a view.
    fn mounts(&self, snapshotter: &str, key: &str) -> Result<Vec<Mount>>;
    /// [`Snapshotter::mounts`] if it can be answered at once, from memory; called on the server's I/O thread,
    /// so it must not wait on a disk or a lock held across I/O. `None` sends the call to
    /// [`Snapshotter::mounts`] on the blocking pool.
    fn mounts_now(&self, _snapshotter: &str, _key: &str) -> Option<Result<Vec<Mount>>> {
        None
    }
    /// Turns active `key` into committed `name` (labels replaced by `labels`).
    fn commit(&self, snapshotter: &str, name: &str, key: &str, labels: Labels) -> Result<()>;
    /// Removes a snapshot; refuses one with children.
    fn remove(&self, snapshotter: &str, key: &str) -> Result<()>;
    /// Information about one snapshot.
    fn stat(&self, snapshotter: &str, key: &str) -> Result<Info>;
    /// Changes labels of one snapshot and returns the new information.
    fn update(&self, snapshotter: &str, name: &str, change: &LabelChange) -> Result<Info>;
    /// Every snapshot of this snapshotter (filtering is done by the service).
    fn list(&self, snapshotter: &str) -> Result<Vec<Info>>;
    /// Space used by one snapshot alone.
    fn usage(&self, snapshotter: &str, key: &str) -> Result<Usage>;
    /// Reclaims space of removed snapshots (called by containerd after its GC).
    fn cleanup(&self, snapshotter: &str) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn update_without_paths_replaces_all_and_drops_empty_values() {
        let c = LabelChange::from_request(&labels(&[("a", "1"), ("b", "")]), &[]).unwrap();
        let mut l = labels(&[("old", "x")]);
        c.apply(&mut l);
        assert_eq!(l, labels(&[("a", "1")]));
    }

    #[test]
    fn update_single_keys_sets_and_removes() {
        let paths = vec!["labels.l1".to_string(), "labels.l2".to_string()];
        let c = LabelChange::from_request(&labels(&[("l1", "v1"), ("l3", "ignored")]), &paths).unwrap();
        let mut l = labels(&[("l2", "old"), ("l4", "kept")]);
        c.apply(&mut l);
        assert_eq!(l, labels(&[("l1", "v1"), ("l4", "kept")]));
    }

    #[test]
    fn update_of_other_fields_is_refused() {
        for p in ["parent", "name", "kind", "created_at", ""] {
            let e = LabelChange::from_request(&Labels::new(), &[p.to_string()]).unwrap_err();
            assert_eq!(e.code, crate::Code::InvalidArgument, "{p}");
        }
        let c =
            LabelChange::from_request(&labels(&[("a", "1")]), &["labels".into(), "labels.b".into()]).unwrap();
        assert_eq!(c, LabelChange::Replace(labels(&[("a", "1")])));
    }

    #[test]
    fn keys_and_labels_are_checked() {
        assert!(check_key("key", "").is_err());
        assert!(check_key("key", &"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        check_key("key", "default/4/extract-1 sha256:abc\0with nul and /slashes").unwrap();
        assert!(check_labels(&labels(&[("", "v")])).is_err());
        assert!(check_labels(&labels(&[("k", &"v".repeat(MAX_LABEL_BYTES))])).is_err());
        check_labels(&labels(&[("k", &"v".repeat(MAX_LABEL_BYTES - 1))])).unwrap();
    }
}
