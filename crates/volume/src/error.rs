//! The error type of the volume crate; the binary maps it once to the plugin's `{"Err"}`.

/// What can go wrong with a volume operation. Messages are lower-case and name the volume or option.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Bad name, option or option value.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such volume.
    #[error("not found: {0}")]
    NotFound(String),
    /// A Create that conflicts with an existing volume.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Remove of a volume mounted on this host.
    #[error("in use: {0}")]
    InUse(String),
    /// A legal request this configuration cannot serve (e.g. a goal on the local backend).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The cluster has no room: a pool over its quota, or full.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The distributed filesystem (master, mount, tools) cannot be reached or timed out.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// The metadata database or a volume's metadata file cannot be trusted.
    #[error("corrupt metadata: {0}")]
    CorruptMetadata(String),
    /// A filesystem operation failed.
    #[error("I/O error: {context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl VolumeError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VolumeError::Io {
            context: context.into(),
            source,
        }
    }

    /// The OS error number of an I/O error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            VolumeError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl From<lamina_rbd::RbdError> for VolumeError {
    fn from(e: lamina_rbd::RbdError) -> Self {
        use lamina_rbd::RbdError as R;
        match e {
            R::Unavailable(m) => VolumeError::BackendUnavailable(m),
            R::NoSpace(m) => VolumeError::NoSpace(m),
            R::InUse(m) => VolumeError::InUse(m),
            R::NotFound(m) => VolumeError::NotFound(m),
            R::Io { context, source } => VolumeError::Io { context, source },
        }
    }
}
