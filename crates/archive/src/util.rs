//! Small helpers shared by the modules: error construction, display of raw names,
//! id mapping, path ordering.

use std::cmp::Ordering;
use std::io;

use crate::{ArchiveError, IdMap};

/// Longest detail text put into an error message.
const MAX_DETAIL: usize = 300;

/// Renders raw name bytes for messages: lossy UTF-8, control characters escaped,
/// truncated to about 300 bytes.
pub(crate) fn show(name: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(name);
    let mut out = String::new();
    for c in lossy.chars() {
        if out.len() >= MAX_DETAIL {
            out.push_str("...");
            break;
        }
        if c.is_control() || c == '\\' || c == '"' {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// `InvalidArchive` with a message.
pub(crate) fn invalid(msg: impl Into<String>) -> ArchiveError {
    ArchiveError::InvalidArchive(msg.into())
}

/// An `Io` error with context.
pub(crate) fn io_err(context: impl Into<String>, source: io::Error) -> ArchiveError {
    ArchiveError::Io {
        context: context.into(),
        source,
    }
}

/// Adds context to io results.
pub(crate) trait IoContext<T> {
    /// Maps the error to [`ArchiveError::Io`] with the context built by `f`.
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T, ArchiveError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T, ArchiveError> {
        self.map_err(|e| io_err(f(), e))
    }
}

/// Maps a container id to a host id. Ids that do not fit a `u32`, the reserved
/// `4294967295`, and ids outside a non-empty mapping are refused.
pub(crate) fn to_host(maps: &[IdMap], id: u64, what: &str) -> Result<u32, ArchiveError> {
    if id >= u64::from(u32::MAX) {
        return Err(invalid(format!("{what} {id} out of range")));
    }
    if maps.is_empty() {
        return Ok(id as u32);
    }
    for m in maps {
        let start = u64::from(m.container_id);
        if id >= start && id - start < u64::from(m.size) {
            let host = u64::from(m.host_id) + (id - start);
            if host >= u64::from(u32::MAX) {
                return Err(invalid(format!("{what} {id} maps out of range")));
            }
            return Ok(host as u32);
        }
    }
    Err(invalid(format!("{what} {id} is outside the id mapping")))
}

/// Maps a host id back to a container id; ids outside a non-empty mapping are refused.
pub(crate) fn to_container(maps: &[IdMap], id: u32, what: &str) -> Result<u32, ArchiveError> {
    if maps.is_empty() {
        return Ok(id);
    }
    for m in maps {
        if id >= m.host_id && id - m.host_id < m.size {
            return Ok(m.container_id + (id - m.host_id));
        }
    }
    Err(ArchiveError::Unsupported(format!(
        "host {what} {id} has no container mapping"
    )))
}

/// Orders relative or absolute paths component by component (parents before children,
/// siblings by name bytes), which is the order of a sorted directory walk.
pub(crate) fn cmp_paths(a: &[u8], b: &[u8]) -> Ordering {
    let ka = a.iter().map(|&c| if c == b'/' { 0 } else { c });
    let kb = b.iter().map(|&c| if c == b'/' { 0 } else { c });
    ka.cmp(kb)
}

/// Joins a relative directory path and a name.
pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Splits a relative path into (parent, name).
pub(crate) fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Whether an xattr belongs to overlayfs itself and must never travel in a tar.
pub(crate) fn is_overlay_xattr(key: &[u8]) -> bool {
    key.starts_with(b"trusted.overlay.") || key.starts_with(b"user.overlay.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_escapes_and_truncates() {
        assert_eq!(show(b"a\nb\xff"), "a\\nb\u{fffd}");
        assert!(show(&[b'x'; 1000]).len() < 310);
    }

    #[test]
    fn id_mapping() {
        let maps = [IdMap {
            container_id: 0,
            host_id: 100_000,
            size: 65536,
        }];
        assert_eq!(to_host(&maps, 0, "uid").unwrap(), 100_000);
        assert_eq!(to_host(&maps, 65535, "uid").unwrap(), 165_535);
        assert!(to_host(&maps, 65536, "uid").is_err());
        assert!(to_host(&[], 4_294_967_295, "uid").is_err());
        assert!(to_host(&[], 1 << 40, "uid").is_err());
        assert_eq!(to_host(&[], 2_147_483_648, "uid").unwrap(), 2_147_483_648);
        assert_eq!(to_container(&maps, 100_005, "uid").unwrap(), 5);
        assert!(to_container(&maps, 5, "uid").is_err());
    }

    #[test]
    fn path_order_is_walk_order() {
        let mut v: Vec<&[u8]> = vec![b"a.b", b"a/b", b"a", b"a/b/c", b"b"];
        v.sort_by(|a, b| cmp_paths(a, b));
        assert_eq!(v, vec![&b"a"[..], b"a/b", b"a/b/c", b"a.b", b"b"]);
    }
}
