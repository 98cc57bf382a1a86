//! Errors of the snapshots service, as containerd understands them.

/// The gRPC codes containerd maps to its error classes (`errdefs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Bad key, label, field path or filter.
    InvalidArgument,
    /// Unknown key or parent.
    NotFound,
    /// The key or name is taken.
    AlreadyExists,
    /// Wrong kind or state (commit of a view, remove of a parent, parent not committed).
    FailedPrecondition,
    /// Something this snapshotter does not do.
    Unimplemented,
    /// Out of space or over a limit.
    ResourceExhausted,
    /// Temporarily unable to serve.
    Unavailable,
    /// Anything else.
    Internal,
}

/// An error with its class; the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SnapshotError {
    /// Class of the error.
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl SnapshotError {
    /// An error of class `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        SnapshotError {
            code,
            message: message.into(),
        }
    }

    /// [`Code::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// [`Code::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
}

/// Result alias of this crate.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
