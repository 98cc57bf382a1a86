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

/// Deepest nesting of arrays and objects accepted anywhere in a request body (serde_json's own
/// recursion limit, also applied to fields that are skipped).
pub const MAX_JSON_DEPTH: usize = 128;

/// Decodes a request body: empty (or whitespace only), `null` and `{}` all mean "no fields".
/// Anything else that is not exactly one JSON object of the right shape is
/// `invalid argument: malformed request body: ...`: invalid UTF-8 anywhere, a byte-order mark,
/// trailing data, an array or scalar at the top level, nesting deeper than [`MAX_JSON_DEPTH`].
pub fn decode_request<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, PluginError> {
    let malformed =
        |msg: &dyn std::fmt::Display| PluginError::invalid(format!("malformed request body: {msg}"));
    let text = std::str::from_utf8(body).map_err(|e| malformed(&e))?;
    let trimmed = text.trim_start_matches([' ', '\t', '\r', '\n']);
    if trimmed.is_empty() {
        return Ok(T::default());
    }
    if !trimmed.starts_with(['{', 'n']) {
        return Err(malformed(&"expected a JSON object"));
    }
    check_depth(trimmed.as_bytes(), MAX_JSON_DEPTH).map_err(|()| malformed(&"nesting too deep"))?;
    serde_json::from_str::<Option<T>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| malformed(&e))
}

/// Fails if arrays/objects nest deeper than `max`, without recursion (strings are skipped).
fn check_depth(json: &[u8], max: usize) -> Result<(), ()> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> Result<GraphDriverRequest, PluginError> {
        decode_request(body.as_bytes())
    }

    #[test]
    fn no_fields() {
        for b in ["", " \n", "null", "null\n", "{}", "{}\n", " {} "] {
            assert_eq!(req(b).unwrap(), GraphDriverRequest::default(), "{b:?}");
        }
    }

    #[test]
    fn fields() {
        let r =
            req(r#"{"ID":"a","Parent":null,"MountLabel":"l","StorageOpt":{"size":"1G"},"New":[1]}"#).unwrap();
        assert_eq!(r.id.as_deref(), Some("a"));
        assert_eq!(r.parent, None);
        assert_eq!(r.mount_label.as_deref(), Some("l"));
        assert_eq!(r.storage_opt.unwrap()["size"], "1G");
        let i: InitWireRequest = decode_request(
            br#"{"Home":"/h","Opts":["a=b"],"UIDMaps":[{"container_id":0,"host_id":1,"size":2}]}"#,
        )
        .unwrap();
        assert_eq!(
            i.uid_maps.unwrap()[0],
            IdMapEntry {
                container_id: 0,
                host_id: 1,
                size: 2
            }
        );
    }

    #[test]
    fn refused() {
        let deep_ok = format!("{{\"X\":{}{}}}", "[".repeat(127), "]".repeat(127));
        assert!(req(&deep_ok).is_ok());
        let deep = format!("{{\"X\":{}{}}}", "[".repeat(128), "]".repeat(128));
        let brackets_in_string = format!("{{\"X\":\"{}\\\"\"}}", "[".repeat(1000));
        assert!(req(&brackets_in_string).is_ok());
        for b in [
            "[]",
            "\"a\"",
            "5",
            "true",
            "nul",
            "{",
            "{}{}",
            "{} x",
            "\u{feff}{}",
            r#"{"ID":5}"#,
            r#"{"ID":"a","ID":"b"}"#,
            &deep,
        ] {
            let e = req(b).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("invalid argument: malformed request body: "),
                "{b:?}: {e}"
            );
        }
        let e = decode_request::<GraphDriverRequest>(b"{\"X\":\"\xff\"}").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid argument: malformed request body: "),
            "{e}"
        );
    }

    #[test]
    fn responses() {
        assert_eq!(encode(&EmptyResponse {}), b"{}");
        assert_eq!(encode(&ExistsResponse { exists: true }), br#"{"Exists":true}"#);
        assert_eq!(
            encode(&CapabilitiesResponse {
                capabilities: Capabilities {
                    reproduces_exact_diffs: false
                }
            }),
            br#"{"Capabilities":{"ReproducesExactDiffs":false}}"#
        );
        assert_eq!(
            encode_error(&PluginError::invalid("missing ID")),
            br#"{"Err":"invalid argument: missing ID"}"#
        );
    }
}
