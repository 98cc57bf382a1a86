//! The containerd snapshots service for lamina: a gRPC front door (containerd's proxy snapshotter plugin,
//! `containerd.services.snapshots.v1.Snapshots`) over any [`Snapshotter`].
//!
//! This crate knows the protocol and nothing of the store: wire types generated from `proto/`, the
//! request checks containerd's own snapshotters make (keys, labels, field masks), containerd's filter
//! language for `List` ([`filter`]), the mapping of [`SnapshotError`] to gRPC status codes, and a server
//! on a unix socket ([`serve`]). The trait is synchronous; the service runs each call on tokio's blocking
//! pool, so a slow mount or commit never stalls other requests. The `lamina` binary joins it to the
//! layer store through a thin adapter.
#![forbid(unsafe_code)]

pub mod client;
mod error;
pub mod filter;
mod model;
mod service;
mod status;

pub use error::{Code, Result, SnapshotError};
pub use model::{
    check_key, check_labels, Info, Kind, LabelChange, Labels, Mount, Snapshotter, Usage, MAX_KEY_BYTES,
    MAX_LABEL_BYTES,
};
/// Re-exported for callers building requests (timestamps, field masks).
pub use prost_types;
pub use service::{serve, Observer, SnapshotsService, LIST_BATCH, OBSERVED_CALLS};
/// Re-exported so that clients use the same version.
pub use tonic;

/// Code generated from `proto/` (containerd's wire interface).
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod proto {
    /// `containerd.*` packages.
    pub mod containerd {
        /// `containerd.types`.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services.*`.
        pub mod services {
            /// `containerd.services.snapshots`.
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}
