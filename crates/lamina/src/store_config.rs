//! The `[store]` table of the configuration: the layer store's backend (`overlay`, or `rbd` with `[store.rbd]`;
//! docs/rbd.md, "Layer backend").

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::plain_word;

/// The `[store]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `overlay` (default) or `rbd`; recorded in the data root when it is made.
    pub backend: Option<String>,
    /// The RBD backend.
    pub rbd: Option<StoreRbdFile>,
}

/// The `[store.rbd]` table; see docs/rbd.md ("Layer backend").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRbdFile {
    /// Ceph configuration file (default `/etc/ceph/ceph.conf`).
    pub ceph_conf: Option<PathBuf>,
    /// Client id, `--id` (default `admin`).
    pub client: Option<String>,
    /// Pool of the layer images (default `rbd`).
    pub pool: Option<String>,
    /// Image name = prefix + layer number (default `lamina-layer-`); one prefix per data root.
    pub image_prefix: Option<String>,
    /// `ext4` (default) or `xfs`.
    pub fs: Option<String>,
    /// Size of base layer images (default `10G`; thin).
    pub size: Option<String>,
    /// `auto` (default), `krbd` or `fuse`.
    pub map: Option<String>,
    /// Deadline of each cluster call, in seconds (default 10).
    pub timeout_secs: Option<u64>,
    /// The `rbd` program (default `rbd`).
    pub rbd: Option<PathBuf>,
    /// The `rbd-fuse` program (default `rbd-fuse`).
    pub rbd_fuse: Option<PathBuf>,
    /// The `ceph` program (default `ceph`).
    pub ceph: Option<PathBuf>,
}

/// The rbd layer backend's settings, or `None` for the overlay backend.
pub(crate) fn store_settings(file: Option<StoreFile>) -> anyhow::Result<Option<lamina_store::RbdLayers>> {
    let file = file.unwrap_or_default();
    match file.backend.as_deref() {
        None | Some("overlay") => return Ok(None),
        Some("rbd") => {}
        Some(b) => bail!("[store] backend {b:?}: must be \"overlay\" or \"rbd\""),
    }
    let r = file.rbd.unwrap_or_default();
    let word = |what: &str, v: String| -> anyhow::Result<String> {
        if v.is_empty() || !plain_word(&v) {
            bail!("[store.rbd] {what} {v:?}: letters, digits, '_', '.' and '-' only");
        }
        Ok(v)
    };
    let ceph_conf = r.ceph_conf.unwrap_or_else(|| "/etc/ceph/ceph.conf".into());
    if !ceph_conf.is_absolute() {
        bail!("[store.rbd] ceph_conf must be an absolute path");
    }
    let size = r.size.unwrap_or_else(|| "10G".into());
    let fs = r.fs.unwrap_or_else(|| "ext4".into());
    let map = r.map.unwrap_or_else(|| "auto".into());
    Ok(Some(lamina_store::RbdLayers {
        cluster: lamina_rbd::Cluster {
            ceph_conf,
            client_id: word("client", r.client.unwrap_or_else(|| "admin".into()))?,
            pool: word("pool", r.pool.unwrap_or_else(|| "rbd".into()))?,
            map: lamina_rbd::MapMode::parse(&map).with_context(|| {
                format!("[store.rbd] map {map:?}: must be \"auto\", \"krbd\" or \"fuse\"")
            })?,
            rbd: r.rbd.unwrap_or_else(|| "rbd".into()),
            rbd_fuse: r.rbd_fuse.unwrap_or_else(|| "rbd-fuse".into()),
            ceph: r.ceph.unwrap_or_else(|| "ceph".into()),
        },
        image_prefix: word(
            "image_prefix",
            r.image_prefix.unwrap_or_else(|| "lamina-layer-".into()),
        )?,
        fs: lamina_rbd::FsType::parse(&fs)
            .with_context(|| format!("[store.rbd] fs {fs:?}: must be \"ext4\" or \"xfs\""))?,
        size: lamina_volume::options::parse_size_of("size", &size)
            .map_err(|e| anyhow::anyhow!("[store.rbd] {e}"))?,
        timeout: std::time::Duration::from_secs(match r.timeout_secs {
            None => 10,
            Some(t @ 1..=100) => t,
            Some(t) => bail!("[store.rbd] timeout_secs {t}: must be 1-100"),
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    #[test]
    fn store_backend_table() {
        assert_eq!(store_settings(None).unwrap(), None);
        let file: FileConfig = toml::from_str("[store]\nbackend = \"overlay\"\n").unwrap();
        assert_eq!(store_settings(file.store).unwrap(), None);
        let text = r#"
            [store]
            backend = "rbd"
            [store.rbd]
            ceph_conf = "/etc/ceph/test.conf"
            pool = "layers"
            size = "5G"
            map = "fuse"
        "#;
        let file: FileConfig = toml::from_str(text).unwrap();
        let r = store_settings(file.store).unwrap().unwrap();
        assert_eq!(r.cluster.pool, "layers");
        assert_eq!(r.cluster.map, lamina_rbd::MapMode::Fuse);
        assert_eq!(r.size, 5 << 30);
        assert_eq!(r.fs, lamina_rbd::FsType::Ext4);
        assert_eq!(r.image_prefix, "lamina-layer-");
        assert_eq!(r.timeout, std::time::Duration::from_secs(10));
        for (bad, want) in [
            ("[store]\nbackend = \"zfs\"\n", "must be \"overlay\" or \"rbd\""),
            (
                "[store]\nbackend = \"rbd\"\n[store.rbd]\nfs = \"btrfs\"\n",
                "must be \"ext4\" or \"xfs\"",
            ),
            (
                "[store]\nbackend = \"rbd\"\n[store.rbd]\nimage_prefix = \"\"\n",
                "letters, digits",
            ),
            (
                "[store]\nbackend = \"rbd\"\n[store.rbd]\nceph_conf = \"x\"\n",
                "absolute",
            ),
            (
                "[store]\nbackend = \"rbd\"\n[store.rbd]\ntimeout_secs = 0\n",
                "must be 1-100",
            ),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let e = store_settings(file.store).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{bad}: {e:#}");
        }
    }
}
