//! Errors of the layer store.

use lamina_archive::ArchiveError;

/// Everything the store can fail with. Protocol adapters map these once, at their edge.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A bad name, parent or option.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Unknown layer or parent.
    #[error("not found: {0}")]
    NotFound(String),
    /// The layer exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The layer is mounted or has children.
    #[error("in use: {0}")]
    InUse(String),
    /// The layer is not in the state or kind the operation needs (commit of a view, a parent that is
    /// not committed).
    #[error("failed precondition: {0}")]
    Precondition(String),
    /// A depth or size cap.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// Applying or writing a tar failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The metadata database failed or holds something we cannot trust.
    #[error("corrupt metadata: {0}")]
    CorruptMetadata(String),
    /// A size limit was asked for on a filesystem (or mount) that cannot enforce one.
    #[error("quota not supported on {fs} ({reason})")]
    QuotaUnsupported {
        /// The filesystem holding the data root (`ext4`, `xfs`, `tmpfs`, ...).
        fs: String,
        /// Why, and what would work.
        reason: String,
    },
    /// The storage backend (a Ceph cluster) cannot be reached, or did not answer in time.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The storage backend has no room (a pool over its quota, or full).
    #[error("no space: {0}")]
    NoSpace(String),
    /// Another process holds the data root.
    #[error("data root is locked: {0}")]
    Locked(String),
}

impl StoreError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a backend's I/O error with `context`, keeping the class of a backend condition it carries:
    /// a backend reports through `io::Error` ([`StoreError::into_io`]), and a pool over its quota must
    /// still answer `no space`, a cluster that does not answer `backend unavailable`.
    pub fn wrap(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        match source.get_ref().and_then(|e| e.downcast_ref::<StoreError>()) {
            Some(StoreError::NoSpace(m)) => StoreError::NoSpace(format!("{context}: {m}")),
            Some(StoreError::Unavailable(m)) => StoreError::Unavailable(format!("{context}: {m}")),
            _ => StoreError::io(context, source),
        }
    }

    /// This error as the `io::Error` of a backend call: an I/O error gives its cause, any other class
    /// travels inside (see [`StoreError::wrap`]).
    pub(crate) fn into_io(self) -> std::io::Error {
        match self {
            StoreError::Io { source, .. } => source,
            e => std::io::Error::other(e),
        }
    }

    /// The errno behind this error, if it came from the filesystem.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StoreError::Io { source, .. } => source.raw_os_error(),
            StoreError::Archive(ArchiveError::Io { source, .. }) => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        // A full, read-only or failing disk under the database is an I/O error with its errno (ENOSPC,
        // EROFS, EIO), not corrupt metadata: the front doors class it by the errno. The handle is reopened at
        // the next transaction (see db.rs).
        redb::Error::Io(source) => {
            crate::db::note_io_failure();
            StoreError::io("metadata database", source)
        }
        redb::Error::PreviousIo => {
            crate::db::note_io_failure();
            StoreError::io(
                "metadata database",
                std::io::Error::other("an earlier write failed; the database is reopened at the next call"),
            )
        }
        e => StoreError::CorruptMetadata(format!("metadata database: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_the_backend_classes() {
        let e = StoreError::wrap(
            "unmount layer m",
            StoreError::NoSpace("pool \"rbd\" is over its quota".into()).into_io(),
        );
        assert!(matches!(e, StoreError::NoSpace(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "no space: unmount layer m: pool \"rbd\" is over its quota"
        );
        let e = StoreError::wrap(
            "mount layer m (2 layers)",
            StoreError::Unavailable("no OSD".into()).into_io(),
        );
        assert_eq!(
            e.to_string(),
            "backend unavailable: mount layer m (2 layers): no OSD"
        );
        // Any other class, and a plain I/O error (its errno kept), stay I/O errors.
        let e = StoreError::wrap("unmount layer m", StoreError::InUse("busy".into()).into_io());
        assert_eq!(e.to_string(), "unmount layer m: in use: busy");
        let e = StoreError::wrap("mount layer m", std::io::Error::from_raw_os_error(28));
        assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
        assert_eq!(e.raw_os_error(), Some(28));
    }
}
