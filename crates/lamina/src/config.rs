//! Configuration: embedded defaults, then `/etc/lamina/config.toml` (or `--config`), then flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Default data root.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/lamina";
/// Default plugin socket; dockerd's plugin name is the file name without `.sock`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/lamina.sock";
/// Read when present and no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/lamina/config.toml";

/// The config file's shape. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where layers and metadata live.
    pub data_root: Option<PathBuf>,
    /// The Docker plugin socket.
    pub socket: Option<PathBuf>,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter.
    pub log_level: Option<String>,
}

/// The settings `serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Data root.
    pub data_root: PathBuf,
    /// Docker plugin socket.
    pub socket: PathBuf,
    /// Log filter.
    pub log_level: String,
}

impl FileConfig {
    /// Reads `path`; a missing default file is not an error, a missing explicit one is.
    pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(FileConfig::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }
}

/// Merges flags over the file over the defaults, and checks the result.
pub fn resolve(
    file: FileConfig,
    data_root: Option<PathBuf>,
    socket: Option<PathBuf>,
    log_level: Option<String>,
) -> anyhow::Result<Settings> {
    let s = Settings {
        data_root: data_root
            .or(file.data_root)
            .unwrap_or_else(|| DEFAULT_DATA_ROOT.into()),
        socket: socket.or(file.socket).unwrap_or_else(|| DEFAULT_SOCKET.into()),
        log_level: log_level.or(file.log_level).unwrap_or_else(|| "info".into()),
    };
    if !s.data_root.is_absolute() {
        bail!("data root {} must be an absolute path", s.data_root.display());
    }
    if !s.socket.is_absolute() {
        bail!("socket {} must be an absolute path", s.socket.display());
    }
    if s.socket.starts_with(&s.data_root) {
        bail!("the socket must not live inside the data root");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beat_defaults() {
        let file: FileConfig = toml::from_str("data_root = \"/srv/l\"\nlog_level = \"debug\"").unwrap();
        let s = resolve(file, None, Some("/run/x.sock".into()), None).unwrap();
        assert_eq!(s.data_root, PathBuf::from("/srv/l"));
        assert_eq!(s.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(s.log_level, "debug");
        let d = resolve(FileConfig::default(), None, None, None).unwrap();
        assert_eq!(d.data_root, PathBuf::from(DEFAULT_DATA_ROOT));
        assert_eq!(d.socket, PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_refused() {
        assert!(toml::from_str::<FileConfig>("datroot = \"/x\"").is_err());
        assert!(resolve(FileConfig::default(), Some("rel".into()), None, None).is_err());
    }
}
