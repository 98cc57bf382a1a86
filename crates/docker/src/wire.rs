//! JSON shapes of the GraphDriver protocol, as dockerd sends and reads them.
//!
//! Requests: every field optional (dockerd uses `omitempty`), `null` means absent, unknown
//! fields are ignored, wrong types are refused. Responses use dockerd's PascalCase names.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::PluginError;
use crate::graphdriver::IdMapEntry;

/// Body of every GraphDriver call except `Init` and `ApplyDiff`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GraphDriverRequest {
    /// Layer id.
    #[serde(rename = "ID", default)]
    pub id: Option<String>,
    /// Parent layer id (`Create`, `CreateReadWrite`, `Diff`, `Changes`, `DiffSize`).
    #[serde(rename = "Parent", default)]
    pub parent: Option<String>,
    /// SELinux mount label (`Get`, `Create*`).
    #[serde(rename = "MountLabel", default)]
    pub mount_label: Option<String>,
    /// `docker run --storage-opt` (`Create*`).
    #[serde(rename = "StorageOpt", default)]
    pub storage_opt: Option<BTreeMap<String, String>>,
}

/// Body of `/GraphDriver.Init`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct InitWireRequest {
    /// Driver home directory.
    #[serde(rename = "Home", default)]
    pub home: Option<String>,
    /// Daemon `--storage-opt` strings.
    #[serde(rename = "Opts", default)]
    pub opts: Option<Vec<String>>,
    /// UID map.
    #[serde(rename = "UIDMaps", default)]
    pub uid_maps: Option<Vec<IdMapEntry>>,
    /// GID map.
    #[serde(rename = "GIDMaps", default)]
    pub gid_maps: Option<Vec<IdMapEntry>>,
}

/// `{}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmptyResponse {}

/// `{"Err":"..."}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrResponse<'a> {
    /// `<class>: <detail>`.
    #[serde(rename = "Err")]
    pub err: &'a str,
}

/// `/Plugin.Activate`.
#[derive(Debug, Clone, Serialize)]
pub struct ActivateResponse {
    /// Implemented subsystems.
    #[serde(rename = "Implements")]
    pub implements: Vec<&'static str>,
}

/// `/GraphDriver.Get`.
#[derive(Debug, Clone, Serialize)]
pub struct DirResponse<'a> {
    /// Merged view path.
    #[serde(rename = "Dir")]
    pub dir: &'a str,
}

/// `/GraphDriver.Exists`.
#[derive(Debug, Clone, Serialize)]
pub struct ExistsResponse {
    /// Whether the layer exists.
    #[serde(rename = "Exists")]
    pub exists: bool,
}

/// `/GraphDriver.Status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusResponse {
    /// `[[key, value], ...]`.
    #[serde(rename = "Status")]
    pub status: Vec<[String; 2]>,
}

/// `/GraphDriver.GetMetadata`.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataResponse {
    /// Shown as `GraphDriver.Data` by `docker inspect`.
    #[serde(rename = "Metadata")]
    pub metadata: BTreeMap<String, String>,
}

/// One entry of `/GraphDriver.Changes`.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeWire<'a> {
    /// Absolute path.
    #[serde(rename = "Path")]
    pub path: &'a str,
    /// 0 modified, 1 added, 2 deleted.
    #[serde(rename = "Kind")]
    pub kind: u8,
}

/// `/GraphDriver.Changes`.
#[derive(Debug, Clone, Serialize)]
pub struct ChangesResponse<'a> {
    /// The changes.
    #[serde(rename = "Changes")]
    pub changes: Vec<ChangeWire<'a>>,
}

/// `/GraphDriver.ApplyDiff` and `/GraphDriver.DiffSize`.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResponse {
    /// Bytes.
    #[serde(rename = "Size")]
    pub size: u64,
}

/// Inner object of `/GraphDriver.Capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    /// Whether `Diff` reproduces the applied tar byte for byte.
    #[serde(rename = "ReproducesExactDiffs")]
    pub reproduces_exact_diffs: bool,
}

/// `/GraphDriver.Capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct CapabilitiesResponse {
    /// The capabilities (dockerd reads them only inside this object).
    #[serde(rename = "Capabilities")]
    pub capabilities: Capabilities,
}

/// Decodes a request body: empty (or whitespace only), `null` and `{}` all mean "no fields".
/// Anything else that is not exactly one JSON value of the right shape is
/// `invalid argument: malformed request body: ...` (serde_json's recursion limit stays on).
pub fn decode_request<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, PluginError> {
    if body.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| PluginError::invalid(format!("malformed request body: {e}")))
}

/// Encodes a response body.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail; fall back to an error object if it ever does.
    serde_json::to_vec(value).unwrap_or_else(|_| br#"{"Err":"I/O error: cannot encode response"}"#.to_vec())
}

/// Encodes `{"Err":"<error>"}`.
pub fn encode_error(err: &PluginError) -> Vec<u8> {
    encode(&ErrResponse {
        err: &err.to_string(),
    })
}
