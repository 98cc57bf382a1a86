//! The error type of the lease crate.

use std::path::PathBuf;
use std::time::SystemTime;

/// What can go wrong with a heartbeat, a reference or a claim. Messages are lower-case and name the thing.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A host id, kind or name that cannot be a file name in the lease directory.
    #[error("invalid {what} {value:?}: {reason}")]
    BadName {
        /// `host id`, `kind` or `name`.
        what: &'static str,
        /// The refused value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The claim is held by a host whose claim has not expired.
    #[error("{kind} {name:?} is claimed by host {host} until {} (shared filesystem clock)", crate::time::show(*until))]
    HeldBy {
        /// Kind of the claimed thing.
        kind: String,
        /// Name of the claimed thing.
        name: String,
        /// The holder.
        host: String,
        /// When the claim expires unless renewed, on the shared filesystem's clock.
        until: SystemTime,
    },
    /// This host's claim expired or was taken over: the work it guarded must not be published.
    #[error("claim on {kind} {name:?} lost: {reason}")]
    Lost {
        /// Kind of the claimed thing.
        kind: String,
        /// Name of the claimed thing.
        name: String,
        /// Why.
        reason: String,
    },
    /// A file of the lease directory that does not parse.
    #[error("corrupt lease file {}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
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

impl LeaseError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LeaseError::Io {
            context: context.into(),
            source,
        }
    }
}
