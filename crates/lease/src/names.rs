//! Host ids, kinds and names: each becomes one file name in the lease directory.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::LeaseError;

/// Longest host id, kind or name, in bytes (file names on MooseFS and most filesystems: 255).
pub const MAX_NAME: usize = 200;

/// One host of the cluster: letters, digits, `_`, `.`, `-`, not starting with `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(String);

impl HostId {
    /// Checks `id`.
    pub fn new(id: impl Into<String>) -> Result<HostId, LeaseError> {
        let id = id.into();
        let bad = |reason| bad_name("host id", &id, reason);
        check_len("host id", &id)?;
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(bad("letters, digits, '_', '.' and '-' only"));
        }
        if id.starts_with('.') || id.starts_with('-') {
            return Err(bad("must not start with '.' or '-'"));
        }
        Ok(HostId(id))
    }

    /// The id kept in `path` (one line); made and written there when the file does not exist yet:
    /// `<host name>-<8 hex digits>`, so that two hosts cloned from one image with the same host name still
    /// differ, and a host keeps its id across restarts and host name changes.
    pub fn load_or_create(path: &Path) -> Result<HostId, LeaseError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                return HostId::new(text.trim()).map_err(|e| LeaseError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LeaseError::io(format!("reading {}", path.display()), e)),
        }
        let host: String = fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            .take(64)
            .collect();
        let host = host.trim_start_matches(['.', '-']);
        let host = if host.is_empty() { "host" } else { host };
        let id = HostId::new(format!("{host}-{}", random_hex()))?;
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut f = fs::File::create(&tmp)?;
            writeln!(f, "{}", id.0)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        };
        write().map_err(|e| LeaseError::io(format!("writing {}", path.display()), e))?;
        Ok(id)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// 8 hex digits from the kernel's random uuid (or the time and pid when /proc is not there).
fn random_hex() -> String {
    match fs::read_to_string("/proc/sys/kernel/random/uuid") {
        Ok(u) => u.chars().filter(char::is_ascii_hexdigit).take(8).collect(),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{:08x}", (t.subsec_nanos() ^ std::process::id()))
        }
    }
}

/// A kind of referenced or claimed thing (`layer`, `volume`, `unpack`…): lower-case letters, digits, `_`,
/// `-`.
pub(crate) fn check_kind(kind: &str) -> Result<(), LeaseError> {
    check_len("kind", kind)?;
    if !kind
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
    {
        return Err(bad_name(
            "kind",
            kind,
            "lower-case letters, digits, '_' and '-' only",
        ));
    }
    Ok(())
}

/// A thing's name (a chain id `sha256:…`, a volume name): one file name, not starting with `.` (names
/// starting with `.` are the lease directory's temporaries).
pub(crate) fn check_name(name: &str) -> Result<(), LeaseError> {
    let bad = |reason| bad_name("name", name, reason);
    check_len("name", name)?;
    if name.starts_with('.') {
        return Err(bad("must not start with '.'"));
    }
    if name.contains(['/', '\0']) {
        return Err(bad("must not contain '/' or NUL"));
    }
    Ok(())
}

fn bad_name(what: &'static str, value: &str, reason: &'static str) -> LeaseError {
    LeaseError::BadName {
        what,
        value: value.to_string(),
        reason,
    }
}

fn check_len(what: &'static str, value: &str) -> Result<(), LeaseError> {
    if value.is_empty() || value.len() > MAX_NAME {
        return Err(bad_name(what, value, "must be 1-200 bytes"));
    }
    Ok(())
}
