//! Tar layers in and out of layer directories.
//!
//! - [`apply_layer`]: streams an uncompressed tar into a layer directory, confined to it
//!   (`openat2(RESOLVE_IN_ROOT)` for parents, no-follow `*at` calls for the final
//!   component), converting OCI whiteouts to overlay ones.
//! - [`write_layer_diff`]: tars an overlay upper dir, converting overlay whiteouts back.
//! - [`layer_changes`], [`tree_changes`], [`write_tree_diff`]: Docker's change lists and
//!   the naive two-tree diff.
//! - [`dir_size`]: overlay2's layer size.
//! - [`manifest`]: content manifests of layer trees (written when a layer is frozen, checked by `lamina verify`).
//!
//! Everything works on directory fds with iterative walks: deep trees and long paths
//! never recurse on the stack. Module map: `tar_read`/`tar_write` (the tar format),
//! `apply`, `diff`, `changes`, `walk`.
#![forbid(unsafe_code)]

mod apply;
mod changes;
mod diff;
pub mod manifest;
mod tar_read;
mod tar_write;
mod util;
mod walk;

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

/// What [`apply_layer`] makes of the tar's whiteouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Whiteouts {
    /// Overlay whiteouts: a `0:0` character device per deleted path and the `trusted.overlay.opaque` xattr on
    /// an opaque directory (the layer directory is an overlay upper dir).
    #[default]
    Overlay,
    /// Deletions in a full tree: the deleted path is removed, an opaque directory loses every entry the
    /// stream did not write before its marker (the layer directory holds the whole filesystem, as a clone of
    /// its parent's image does).
    Delete,
}

/// Options for [`apply_layer`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Container ids in the tar are mapped to host ids with these.
    pub id_mappings: IdMappings,
    /// Overlay whiteouts or deletions.
    pub whiteouts: Whiteouts,
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
    /// Size of the layer on disk as overlay2 reports it: regular file bytes, hardlinks once. With
    /// [`Whiteouts::Delete`] (applied into a tree that holds its parents' files): the bytes of the regular
    /// files the stream wrote.
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
    apply::apply_layer(layer, input, opts)
}

/// Writes a tar of the layer's own changes (an overlay upper dir).
pub fn write_layer_diff<W: Write>(
    upper: BorrowedFd<'_>,
    out: W,
    opts: &DiffOptions,
) -> Result<(), ArchiveError> {
    diff::write_layer_diff(upper, out, opts)
}

/// Lists the changes of an overlay upper dir against its lower dirs (top-most first).
pub fn layer_changes(upper: BorrowedFd<'_>, lowers: &[BorrowedFd<'_>]) -> Result<Vec<Change>, ArchiveError> {
    changes::layer_changes(upper, lowers)
}

/// Lists the changes between two whole trees (merged views); `old = None` means empty.
pub fn tree_changes(new: BorrowedFd<'_>, old: Option<BorrowedFd<'_>>) -> Result<Vec<Change>, ArchiveError> {
    changes::tree_changes(new, old)
}

/// Writes a tar of the differences between two whole trees, deletions as `.wh.` entries.
pub fn write_tree_diff<W: Write>(
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
    out: W,
    opts: &DiffOptions,
) -> Result<(), ArchiveError> {
    diff::write_tree_diff(new, old, out, opts)
}

/// Size of a directory tree: regular file bytes, each hardlinked inode once.
pub fn dir_size(dir: BorrowedFd<'_>) -> Result<u64, ArchiveError> {
    walk::dir_size(dir)
}

/// Space a directory tree takes on disk, as `du` counts it: allocated blocks and inodes (the directory itself
/// included, each hardlinked inode once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Allocated bytes (512-byte blocks).
    pub bytes: u64,
    /// Inodes.
    pub inodes: u64,
}

/// Disk usage of a directory tree; see [`DiskUsage`].
pub fn disk_usage(dir: BorrowedFd<'_>) -> Result<DiskUsage, ArchiveError> {
    walk::disk_usage(dir)
}
