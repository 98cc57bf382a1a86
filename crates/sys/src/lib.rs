//! Raw system interfaces for lamina.
//!
//! This is the only crate of the workspace allowed to contain `unsafe` code or to
//! issue syscalls directly. Everything here returns [`std::io::Result`]: callers
//! attach their own context (which layer, which path) when they map errors.
//!
//! Modules:
//! - [`fs`]: directory-fd based file operations confined with `openat2(RESOLVE_IN_ROOT)`,
//!   whiteouts, xattrs that never follow symlinks.
//! - [`mount`]: overlay and bind mounts (new mount API with a legacy fallback),
//!   unmounting, reading the mount table.
//! - [`mounter`]: the [`mounter::Mounter`] seam over mounts and the mount table, with the real
//!   [`mounter::LinuxMounter`] and a recording [`mounter::FakeMounter`] for tests without root.
//! - [`lock`]: advisory lock files.
//! - [`quota`]: size limits (btrfs subvolumes with a qgroup limit, xfs project quota).
//! - [`fault`]: fault points for the reliability tests (compiled to nothing without the `faults` feature).
//! - [`thread`]: scheduling priority of background threads.
#![allow(unsafe_code)]

pub mod fault;
pub mod fs;
pub mod lock;
pub mod mount;
pub mod mounter;
pub mod quota;
pub mod thread;
