//! The seam between the GraphDriver protocol and whatever stores layers.
//!
//! The router validates ids (see [`crate::validate_id`]) before calling any method, so
//! implementations receive non-empty ids made of `[A-Za-z0-9_.-]` that do not start with `.` or `-`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use crate::error::PluginError;

/// One range of a UID/GID map as dockerd sends it in `Init` (`{"container_id":0,"host_id":100000,"size":65536}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMapEntry {
    /// First id inside the container.
    pub container_id: u32,
    /// First id on the host.
    pub host_id: u32,
    /// Number of ids.
    pub size: u32,
}

/// Arguments of `/GraphDriver.Init`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitRequest {
    /// The directory dockerd assigns to the driver (`<docker-root>/<name>`).
    pub home: String,
    /// `--storage-opt` strings (`k=v`).
    pub options: Vec<String>,
    /// UID map (empty without userns-remap).
    pub uid_maps: Vec<IdMapEntry>,
    /// GID map.
    pub gid_maps: Vec<IdMapEntry>,
}

/// Arguments of `/GraphDriver.Create` and `/GraphDriver.CreateReadWrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    /// The new layer's id.
    pub id: String,
    /// Its parent, if any.
    pub parent: Option<String>,
    /// SELinux mount label, empty when unused.
    pub mount_label: String,
    /// `--storage-opt` of `docker run`, unvalidated by dockerd.
    pub storage_opt: BTreeMap<String, String>,
}

/// One entry of `/GraphDriver.Changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Absolute path (`/etc/motd`).
    pub path: String,
    /// 0 modified, 1 added, 2 deleted.
    pub kind: u8,
}

/// A tar stream that is ready to be written: errors found before streaming were already returned.
pub trait DiffStream: Send {
    /// Writes the whole tar to `out`. An error here makes the server abort the connection
    /// instead of ending the body cleanly.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), PluginError>;
}

/// What the GraphDriver protocol needs from a layer store. All methods may be called concurrently.
pub trait GraphDriver: Send + Sync {
    /// `/GraphDriver.Init`.
    fn init(&self, req: InitRequest) -> Result<(), PluginError>;
    /// `/GraphDriver.Create` (`read_write = false`) and `/GraphDriver.CreateReadWrite` (`true`).
    fn create(&self, req: CreateRequest, read_write: bool) -> Result<(), PluginError>;
    /// `/GraphDriver.Remove`.
    fn remove(&self, id: &str) -> Result<(), PluginError>;
    /// `/GraphDriver.Get`: the merged view's path, the same every time for an id.
    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError>;
    /// `/GraphDriver.Put`.
    fn put(&self, id: &str) -> Result<(), PluginError>;
    /// `/GraphDriver.Exists`.
    fn exists(&self, id: &str) -> bool;
    /// `/GraphDriver.Status`: rows shown by `docker info`.
    fn status(&self) -> Vec<[String; 2]>;
    /// `/GraphDriver.GetMetadata`.
    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError>;
    /// `/GraphDriver.Cleanup`.
    fn cleanup(&self) -> Result<(), PluginError>;
    /// `/GraphDriver.Diff`: `parent` may be empty (whole tree).
    fn diff(&self, id: &str, parent: &str) -> Result<Box<dyn DiffStream + '_>, PluginError>;
    /// `/GraphDriver.Changes`.
    fn changes(&self, id: &str, parent: &str) -> Result<Vec<FileChange>, PluginError>;
    /// `/GraphDriver.ApplyDiff`: reads `body` to its end, returns the layer size.
    fn apply_diff(&self, id: &str, parent: &str, body: &mut dyn Read) -> Result<u64, PluginError>;
    /// `/GraphDriver.DiffSize`.
    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, PluginError>;
    /// `ReproducesExactDiffs` for `/GraphDriver.Capabilities`.
    fn reproduces_exact_diffs(&self) -> bool {
        false
    }
}
