//! Tar layers in and out of layer directories (API contract; implementation in progress).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;

/// Errors of the archive crate.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The stream cannot or must not be applied (bad header, escaping path, bad hardlink...).
    #[error("invalid archive: {0}")]
    InvalidArchive(String),
    /// A legal but refused feature.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A size, count or depth cap.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// An I/O error from the filesystem (ENOSPC, EROFS, EIO...), with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the entry.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// One contiguous range of an id mapping (as in /proc/PID/uid_map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First id inside the container.
    pub container_id: u32,
    /// First id on the host.
    pub host_id: u32,
    /// Number of ids in the range.
    pub size: u32,
}

/// UID and GID mappings; both empty means identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMappings {
    /// UID ranges.
    pub uids: Vec<IdMap>,
    /// GID ranges.
    pub gids: Vec<IdMap>,
}

/// Options for [`apply_layer`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Container ids in the tar are mapped to host ids with these.
    pub id_mappings: IdMappings,
}

/// Options for the diff writers.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Host ids on disk are mapped back to container ids with these.
    pub id_mappings: IdMappings,
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Size of the layer on disk as overlay2 reports it: regular file bytes, hardlinks once.
    pub size: u64,
    /// `sha256:<hex>` of the exact input bytes (the layer's DiffID).
    pub digest: String,
    /// Bytes read from the input.
    pub tar_bytes: u64,
    /// Tar entries processed.
    pub entries: u64,
}

/// Kind of a change, numbered as Docker's `archive.ChangeType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    /// Modified (0).
    Modify = 0,
    /// Added (1).
    Add = 1,
    /// Deleted (2).
    Delete = 2,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Change {
    /// Absolute path inside the layer, raw bytes (`/etc/motd`).
    pub path: Vec<u8>,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// Applies an uncompressed tar layer into `layer` (a directory fd).
pub fn apply_layer<R: Read>(
    layer: BorrowedFd<'_>,
    input: R,
    opts: &ApplyOptions,
) -> Result<ApplyStats, ArchiveError> {
    let _ = (layer, input, opts);
    Err(ArchiveError::Unsupported("apply_layer not implemented yet".into()))
}

/// Writes a tar of the layer's own changes (an overlay upper dir).
pub fn write_layer_diff<W: Write>(upper: BorrowedFd<'_>, out: W, opts: &DiffOptions) -> Result<(), ArchiveError> {
    let _ = (upper, out, opts);
    Err(ArchiveError::Unsupported("write_layer_diff not implemented yet".into()))
}

/// Lists the changes of an overlay upper dir against its lower dirs (top-most first).
pub fn layer_changes(upper: BorrowedFd<'_>, lowers: &[BorrowedFd<'_>]) -> Result<Vec<Change>, ArchiveError> {
    let _ = (upper, lowers);
    Err(ArchiveError::Unsupported("layer_changes not implemented yet".into()))
}

/// Lists the changes between two whole trees (merged views); `old = None` means empty.
pub fn tree_changes(new: BorrowedFd<'_>, old: Option<BorrowedFd<'_>>) -> Result<Vec<Change>, ArchiveError> {
    let _ = (new, old);
    Err(ArchiveError::Unsupported("tree_changes not implemented yet".into()))
}

/// Writes a tar of the differences between two whole trees, deletions as `.wh.` entries.
pub fn write_tree_diff<W: Write>(
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
    out: W,
    opts: &DiffOptions,
) -> Result<(), ArchiveError> {
    let _ = (new, old, out, opts);
    Err(ArchiveError::Unsupported("write_tree_diff not implemented yet".into()))
}

/// Size of a directory tree: regular file bytes, each hardlinked inode once.
pub fn dir_size(dir: BorrowedFd<'_>) -> Result<u64, ArchiveError> {
    let _ = dir;
    Err(ArchiveError::Unsupported("dir_size not implemented yet".into()))
}
