//! Configuration: embedded defaults, then `/etc/lamina/config.toml` (or `--config`), then flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Default data root.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/lamina";
/// Default plugin socket; dockerd's plugin name is the file name without `.sock`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/lamina.sock";
/// Default containerd snapshotter socket.
pub const DEFAULT_SNAPSHOTTER_SOCKET: &str = "/run/lamina/snapshotter.sock";
/// Read when present and no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/lamina/config.toml";

/// The config file's shape. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where layers and metadata live.
    pub data_root: Option<PathBuf>,
    /// The Docker plugin socket, or `none`.
    pub socket: Option<PathBuf>,
    /// The containerd snapshotter (gRPC) socket, or `none`.
    pub snapshotter_socket: Option<PathBuf>,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter.
    pub log_level: Option<String>,
}

/// The settings `serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Data root.
    pub data_root: PathBuf,
    /// Docker plugin socket (None: off).
    pub socket: Option<PathBuf>,
    /// containerd snapshotter socket (None: off).
    pub snapshotter_socket: Option<PathBuf>,
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

/// Flags that override the file.
#[derive(Debug, Default)]
pub struct Flags {
    /// `--data-root`.
    pub data_root: Option<PathBuf>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--snapshotter-socket`.
    pub snapshotter_socket: Option<PathBuf>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

/// `none` (or an empty value) turns a socket off.
fn socket_setting(value: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    match value {
        Some(p) if p.as_os_str().is_empty() || p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(default.into()),
    }
}

/// Merges flags over the file over the defaults, and checks the result.
pub fn resolve(file: FileConfig, flags: Flags) -> anyhow::Result<Settings> {
    let s = Settings {
        data_root: flags
            .data_root
            .or(file.data_root)
            .unwrap_or_else(|| DEFAULT_DATA_ROOT.into()),
        socket: socket_setting(flags.socket.or(file.socket), DEFAULT_SOCKET),
        snapshotter_socket: socket_setting(
            flags.snapshotter_socket.or(file.snapshotter_socket),
            DEFAULT_SNAPSHOTTER_SOCKET,
        ),
        log_level: flags
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "info".into()),
    };
    if !s.data_root.is_absolute() {
        bail!("data root {} must be an absolute path", s.data_root.display());
    }
    let sockets: Vec<&PathBuf> = s.socket.iter().chain(s.snapshotter_socket.iter()).collect();
    if sockets.is_empty() {
        bail!("both sockets are turned off: nothing to serve");
    }
    for sock in &sockets {
        if !sock.is_absolute() {
            bail!("socket {} must be an absolute path", sock.display());
        }
        if sock.starts_with(&s.data_root) {
            bail!("socket {} must not live inside the data root", sock.display());
        }
    }
    if sockets.len() == 2 && sockets[0] == sockets[1] {
        bail!("the plugin socket and the snapshotter socket must differ");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beat_defaults() {
        let file: FileConfig = toml::from_str("data_root = \"/srv/l\"\nlog_level = \"debug\"").unwrap();
        let flags = Flags {
            socket: Some("/run/x.sock".into()),
            ..Flags::default()
        };
        let s = resolve(file, flags).unwrap();
        assert_eq!(s.data_root, PathBuf::from("/srv/l"));
        assert_eq!(s.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(
            s.snapshotter_socket,
            Some(PathBuf::from(DEFAULT_SNAPSHOTTER_SOCKET))
        );
        assert_eq!(s.log_level, "debug");
        let d = resolve(FileConfig::default(), Flags::default()).unwrap();
        assert_eq!(d.data_root, PathBuf::from(DEFAULT_DATA_ROOT));
        assert_eq!(d.socket, Some(PathBuf::from(DEFAULT_SOCKET)));
    }

    #[test]
    fn sockets_can_be_turned_off_but_not_both() {
        let file: FileConfig = toml::from_str("socket = \"none\"").unwrap();
        let s = resolve(file, Flags::default()).unwrap();
        assert_eq!(s.socket, None);
        assert!(s.snapshotter_socket.is_some());
        let flags = Flags {
            socket: Some("none".into()),
            snapshotter_socket: Some("".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), flags).is_err());
        let same = Flags {
            socket: Some("/run/a.sock".into()),
            snapshotter_socket: Some("/run/a.sock".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), same).is_err());
        let inside = Flags {
            data_root: Some("/srv/l".into()),
            snapshotter_socket: Some("/srv/l/s.sock".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), inside).is_err());
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_refused() {
        assert!(toml::from_str::<FileConfig>("datroot = \"/x\"").is_err());
        let rel = Flags {
            data_root: Some("rel".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), rel).is_err());
    }
}
