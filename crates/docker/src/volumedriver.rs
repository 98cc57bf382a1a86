//! The seam between the VolumeDriver protocol and whatever keeps volumes, and the protocol's JSON shapes.
//!
//! The router checks that `Name` is present (and `ID` for `Mount`/`Unmount`, with the same rules as layer
//! ids, see [`crate::validate_id`]); what makes a *valid* volume name is the implementation's business, so
//! names reach it as sent. All methods may be called concurrently, also for the same name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::PluginError;

/// `Capabilities.Scope`: whether a volume of this driver exists once per host or once per cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One volume per host (`"local"`).
    Local,
    /// The same volume on every host (`"global"`).
    Global,
}

impl Scope {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
        }
    }
}

/// One volume as `Get` and `List` describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The volume's name.
    pub name: String,
    /// Where it is mounted on this host, `None` when it is not.
    pub mountpoint: Option<PathBuf>,
    /// Creation time, RFC 3339 (dockerd parses it; `None` leaves it out).
    pub created_at: Option<String>,
    /// Shown by `docker volume inspect` under `Status` (`Get` only; `List` leaves it out).
    pub status: BTreeMap<String, String>,
}

/// What the VolumeDriver protocol needs from a volume store.
pub trait VolumeDriver: Send + Sync {
    /// `/VolumeDriver.Create` with the `-o` options (`Opts: null` arrives as an empty map).
    fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), PluginError>;
    /// `/VolumeDriver.Remove`.
    fn remove(&self, name: &str) -> Result<(), PluginError>;
    /// `/VolumeDriver.Mount`: counted per `id`; returns the host path dockerd bind-mounts.
    fn mount(&self, name: &str, id: &str) -> Result<PathBuf, PluginError>;
    /// `/VolumeDriver.Unmount`: releases one count of `id` (an unknown id is not an error).
    fn unmount(&self, name: &str, id: &str) -> Result<(), PluginError>;
    /// `/VolumeDriver.Path`: the mountpoint while mounted, `None` otherwise.
    fn path(&self, name: &str) -> Result<Option<PathBuf>, PluginError>;
    /// `/VolumeDriver.Get`: a missing volume is an error of kind [`crate::ErrorKind::NotFound`].
    fn get(&self, name: &str) -> Result<VolumeInfo, PluginError>;
    /// `/VolumeDriver.List`.
    fn list(&self) -> Result<Vec<VolumeInfo>, PluginError>;
    /// `/VolumeDriver.Capabilities`.
    fn scope(&self) -> Scope;
}

/// Body of every VolumeDriver call (`List` and `Capabilities` send `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VolumeRequest {
    /// Volume name.
    #[serde(rename = "Name", default)]
    pub name: Option<String>,
    /// `-o` options of `Create`.
    #[serde(rename = "Opts", default)]
    pub opts: Option<BTreeMap<String, String>>,
    /// Mount id of `Mount` and `Unmount`.
    #[serde(rename = "ID", default)]
    pub id: Option<String>,
}

/// `Mount` and `Path`.
#[derive(Debug, Clone, Serialize)]
pub struct MountpointResponse<'a> {
    /// Absolute host path, `""` when not mounted (`Path`).
    #[serde(rename = "Mountpoint")]
    pub mountpoint: &'a str,
}

/// One element of `Get` and `List`.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeWire<'a> {
    /// Name.
    #[serde(rename = "Name")]
    pub name: &'a str,
    /// Mountpoint, `""` when not mounted.
    #[serde(rename = "Mountpoint")]
    pub mountpoint: &'a str,
    /// RFC 3339 creation time.
    #[serde(rename = "CreatedAt", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<&'a str>,
    /// Free-form status.
    #[serde(rename = "Status", skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a BTreeMap<String, String>>,
}

/// `/VolumeDriver.Get`.
#[derive(Debug, Clone, Serialize)]
pub struct GetResponse<'a> {
    /// The volume.
    #[serde(rename = "Volume")]
    pub volume: VolumeWire<'a>,
}

/// `/VolumeDriver.List`.
#[derive(Debug, Clone, Serialize)]
pub struct ListResponse<'a> {
    /// The volumes.
    #[serde(rename = "Volumes")]
    pub volumes: Vec<VolumeWire<'a>>,
}

/// Inner object of `/VolumeDriver.Capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeCapabilities {
    /// `local` or `global`.
    #[serde(rename = "Scope")]
    pub scope: &'static str,
}

/// `/VolumeDriver.Capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeCapabilitiesResponse {
    /// The capabilities.
    #[serde(rename = "Capabilities")]
    pub capabilities: VolumeCapabilities,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_request, encode};

    #[test]
    fn requests() {
        let r: VolumeRequest = decode_request(br#"{"Name":"v1","Opts":{"size":"1G"}}"#).unwrap();
        assert_eq!(r.name.as_deref(), Some("v1"));
        assert_eq!(r.opts.unwrap()["size"], "1G");
        let r: VolumeRequest = decode_request(br#"{"Name":"v2","Opts":null}"#).unwrap();
        assert_eq!(r.opts, None);
        let r: VolumeRequest = decode_request(br#"{"Name":"v1","ID":"abc"}"#).unwrap();
        assert_eq!(r.id.as_deref(), Some("abc"));
        assert!(decode_request::<VolumeRequest>(br#"{"Name":"v","Opts":{"a":1}}"#).is_err());
    }

    #[test]
    fn responses() {
        let status = BTreeMap::from([("ReplicationGoal".to_string(), "2".to_string())]);
        let v = VolumeWire {
            name: "v1",
            mountpoint: "/m/v1",
            created_at: Some("2024-01-02T03:04:05Z"),
            status: Some(&status),
        };
        assert_eq!(
            encode(&GetResponse { volume: v }),
            br#"{"Volume":{"Name":"v1","Mountpoint":"/m/v1","CreatedAt":"2024-01-02T03:04:05Z","Status":{"ReplicationGoal":"2"}}}"#
        );
        let v = VolumeWire {
            name: "v1",
            mountpoint: "",
            created_at: None,
            status: None,
        };
        assert_eq!(
            encode(&ListResponse { volumes: vec![v] }),
            br#"{"Volumes":[{"Name":"v1","Mountpoint":""}]}"#
        );
        assert_eq!(
            encode(&VolumeCapabilitiesResponse {
                capabilities: VolumeCapabilities { scope: "global" }
            }),
            br#"{"Capabilities":{"Scope":"global"}}"#
        );
    }
}
