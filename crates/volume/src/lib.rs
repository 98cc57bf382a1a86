//! Docker volumes for lamina: a directory per volume on the local disk or on a MooseFS (LizardFS-compatible)
//! cluster, or an RBD image with a filesystem per volume in a Ceph pool, exposed on the host by bind mounts
//! counted per mount ID.
//!
//! Layers of this crate, bottom up:
//! - [`name`] and [`options`]: what a volume name and the `-o` options may be (pure parsers).
//! - [`command`]: external tools (goal, quota) as argv templates run without a shell, with deadlines.
//! - [`meta`]: the per-host bookkeeping in redb (mount counts, cache of known volumes).
//! - [`mfsmount`]: lamina's own mfsmount, the master probe, the deadlines around FUSE calls and the detection
//!   of a dead mount (also used by the daemon for the cluster tier's mount).
//! - [`backend`]: the shared directory layout and the concurrent-Create protocol, on the local disk or on
//!   lamina's MooseFS mount.
//! - [`rbd`]: the RBD backend: images, advisory locks, rbd-fuse + loop (or krbd) attachments.
//! - [`lease`]: which hosts have a MooseFS volume mounted (so that Remove elsewhere is refused).
//! - [`manager`]: [`VolumeManager`], the operations of the VolumeDriver protocol.
//!
//! The crate knows nothing of HTTP or Docker's wire format; the binary's adapter maps [`VolumeError`] to the
//! plugin's `{"Err"}` once.
#![forbid(unsafe_code)]

pub mod backend;
pub mod command;
pub mod error;
pub mod lease;
pub mod manager;
pub mod meta;
pub mod mfsmount;
pub mod name;
pub mod options;
pub mod rbd;
pub mod time;

pub use backend::{MooseFsConfig, OnRemove};
pub use command::CommandTemplate;
pub use error::VolumeError;
pub use lease::VolumeLeaseConfig;
pub use manager::{VolumeConfig, VolumeManager, VolumeView, DEFAULT_MOUNT_BASE};
pub use mfsmount::{Ensured, MfsMount, MfsMountConfig};
pub use name::validate_name;
pub use options::{parse_options, parse_options_for, BackendKind, CreateOptions, Goal};
pub use rbd::{FsType, MapMode, RbdConfig};
