//! Docker plugin protocol for lamina (work in progress).
#![forbid(unsafe_code)]

pub mod error;
pub mod graphdriver;

pub use error::{ErrorKind, PluginError};
pub use graphdriver::{CreateRequest, DiffStream, FileChange, GraphDriver, IdMapEntry, InitRequest};
