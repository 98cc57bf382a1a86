//! Docker VolumeDriver protocol over the volume service: calls [`VolumeManager`], maps [`VolumeError`] to
//! the plugin error once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use lamina_docker::{ErrorKind, PluginError, Scope, VolumeDriver, VolumeInfo};
use lamina_sys::fs::errno;
use lamina_volume::{VolumeError, VolumeManager, VolumeView};

/// Serves `/VolumeDriver.*` from a [`VolumeManager`].
#[derive(Debug)]
pub struct VolumeDriverAdapter {
    volumes: Arc<VolumeManager>,
}

impl VolumeDriverAdapter {
    /// Wraps the service.
    pub fn new(volumes: Arc<VolumeManager>) -> Self {
        VolumeDriverAdapter { volumes }
    }
}

/// Maps a volume error to the wire error, once.
pub fn to_plugin_error(e: VolumeError) -> PluginError {
    let kind = match &e {
        VolumeError::InvalidArgument(_) => ErrorKind::InvalidArgument,
        VolumeError::NotFound(_) => ErrorKind::NotFound,
        VolumeError::AlreadyExists(_) => ErrorKind::AlreadyExists,
        VolumeError::InUse(_) => ErrorKind::InUse,
        VolumeError::Unsupported(_) => ErrorKind::Unsupported,
        VolumeError::NoSpace(_) => ErrorKind::NoSpace,
        VolumeError::BackendUnavailable(_) => ErrorKind::BackendUnavailable,
        VolumeError::CorruptMetadata(_) => ErrorKind::CorruptMetadata,
        VolumeError::Io { .. } => match e.raw_os_error() {
            Some(errno::ENOSPC | errno::EDQUOT) => ErrorKind::NoSpace,
            Some(errno::EROFS) => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        },
    };
    let full = e.to_string();
    let detail = match &e {
        VolumeError::Io { .. } => full,
        _ => full.split_once(": ").map(|(_, d)| d.to_string()).unwrap_or(full),
    };
    PluginError::new(kind, detail)
}

fn info(v: VolumeView) -> VolumeInfo {
    VolumeInfo {
        name: v.name,
        mountpoint: v.mountpoint,
        created_at: v.created_at,
        status: v.status,
    }
}

impl VolumeDriver for VolumeDriverAdapter {
    fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), PluginError> {
        self.volumes.create(name, opts).map_err(to_plugin_error)
    }

    fn remove(&self, name: &str) -> Result<(), PluginError> {
        self.volumes.remove(name).map_err(to_plugin_error)
    }

    fn mount(&self, name: &str, id: &str) -> Result<PathBuf, PluginError> {
        self.volumes.mount(name, id).map_err(to_plugin_error)
    }

    fn unmount(&self, name: &str, id: &str) -> Result<(), PluginError> {
        self.volumes.unmount(name, id).map_err(to_plugin_error)
    }

    fn path(&self, name: &str) -> Result<Option<PathBuf>, PluginError> {
        self.volumes.path(name).map_err(to_plugin_error)
    }

    fn get(&self, name: &str) -> Result<VolumeInfo, PluginError> {
        self.volumes.get(name).map(info).map_err(to_plugin_error)
    }

    fn list(&self) -> Result<Vec<VolumeInfo>, PluginError> {
        Ok(self
            .volumes
            .list()
            .map_err(to_plugin_error)?
            .into_iter()
            .map(info)
            .collect())
    }

    fn scope(&self) -> Scope {
        if self.volumes.is_global() {
            Scope::Global
        } else {
            Scope::Local
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_class_once() {
        let e = to_plugin_error(VolumeError::InUse("volume \"v\" is mounted".into()));
        assert_eq!(e.to_string(), "in use: volume \"v\" is mounted");
        let e = to_plugin_error(VolumeError::BackendUnavailable("master down".into()));
        assert_eq!(e.to_string(), "backend unavailable: master down");
        let e = to_plugin_error(VolumeError::io(
            "creating /x",
            std::io::Error::from_raw_os_error(errno::ENOSPC),
        ));
        assert_eq!(e.kind, ErrorKind::NoSpace);
    }
}
