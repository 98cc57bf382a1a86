//! The one error type of the plugin protocol, and its wire form.

/// Error classes, each with a fixed prefix in the `Err` string so clients and tests can match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad id, name, option, JSON or query parameter.
    InvalidArgument,
    /// Unknown id, volume, parent, mount id.
    NotFound,
    /// Create of something that exists.
    AlreadyExists,
    /// Remove while mounted, remove of a parent with children.
    InUse,
    /// A tar stream that cannot or must not be applied.
    InvalidArchive,
    /// A legal but refused feature.
    Unsupported,
    /// A size, count or depth cap.
    LimitExceeded,
    /// ENOSPC / EDQUOT.
    NoSpace,
    /// EROFS.
    ReadOnly,
    /// Any other I/O error.
    Io,
    /// A distributed backend or its tools failed.
    BackendUnavailable,
    /// The metadata database cannot be trusted.
    CorruptMetadata,
}

impl ErrorKind {
    /// The class prefix used in `Err` strings.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InUse => "in use",
            ErrorKind::InvalidArchive => "invalid archive",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::LimitExceeded => "limit exceeded",
            ErrorKind::NoSpace => "no space",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Io => "I/O error",
            ErrorKind::BackendUnavailable => "backend unavailable",
            ErrorKind::CorruptMetadata => "corrupt metadata",
        }
    }
}

/// An error answered to the plugin client as HTTP 500 with `{"Err":"<class>: <detail>"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct PluginError {
    /// The class.
    pub kind: ErrorKind,
    /// Detail naming the offending id, entry or option.
    pub message: String,
}

impl PluginError {
    /// Builds an error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
}
