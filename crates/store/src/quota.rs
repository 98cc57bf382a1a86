//! Size limits of layers (`docker run --storage-opt size=`, the snapshotter label `containerd.io/snapshot/max-size`).
//!
//! A layer created with a size limit gets its own quota object around its whole directory `layers/<n>/`
//! (`diff/`, `work/` and `merged/` inside it: overlay needs its upper and work directories in one filesystem,
//! and a btrfs rename between subvolumes fails with `EXDEV`):
//! - **btrfs**: `layers/<n>` is a subvolume, and its level-0 qgroup `0/<subvolume id>` gets a referenced-bytes
//!   limit (`max_rfer`). Quota groups are turned on for the filesystem the first time they are needed. Removal
//!   destroys the subvolume, commits a transaction so that the cleaner drops it, and deletes the qgroup (recent
//!   kernels delete it themselves once the subvolume is dropped).
//! - **xfs** mounted with `prjquota`: `layers/<n>` gets project id `<n>` with the inherit flag, and project
//!   `<n>` a block hard (and soft) limit; removal deletes the tree and sets the project's limit back to none.
//! - anything else: [`StoreError::QuotaUnsupported`], naming the filesystem, before anything is created.
//!
//! Writes past the limit fail with `EDQUOT` (btrfs, xfs) inside the container.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use lamina_sys::quota::{self as q, FsKind};
use tracing::{debug, warn};

use crate::{open_dir, Result, StoreError};

/// Smallest size limit accepted: the layer's own directories and overlay's work files need some room.
pub const MIN_SIZE: u64 = 1 << 20;

/// The snapshotter label that asks for a size limit on Prepare, in bytes (containerd's name for it).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

/// How long a removal waits for btrfs to drop a destroyed subvolume before it gives up deleting its qgroup.
const QGROUP_WAIT: Duration = Duration::from_secs(60);

/// Parses a size as `docker run --storage-opt size=` takes it: a number with an optional binary unit
/// (`10M`, `1.5g`, `512MiB`, `1024kb`, `1048576`; k/m/g/t/p are powers of 1024). Zero, negative, malformed
/// and sizes below [`MIN_SIZE`] are [`StoreError::InvalidArgument`].
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |why: &str| StoreError::InvalidArgument(format!("invalid size {text:?}: {why}"));
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad(if s.starts_with('-') {
            "must be positive"
        } else {
            "expected a number with an optional unit (k, m, g, t, p), e.g. 10M"
        }));
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad("unknown unit (use k, m, g, t or p)")),
    };
    if (unit.len() > 1 && !matches!(unit.get(1..), Some("b" | "ib"))) || unit == "i" {
        return Err(bad("unknown unit (use k, m, g, t or p)"));
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.contains('.') {
        return Err(bad("malformed number"));
    }
    let whole: u64 = int.parse().map_err(|_| bad("number too large"))?;
    let mut bytes = whole
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("number too large"))?;
    if !frac.is_empty() {
        let f: f64 = format!("0.{frac}").parse().map_err(|_| bad("malformed number"))?;
        bytes = bytes.saturating_add((f * (1u64 << shift) as f64) as u64);
    }
    if bytes == 0 {
        return Err(bad("must be greater than zero"));
    }
    if bytes < MIN_SIZE {
        return Err(bad("the smallest size limit is 1M"));
    }
    Ok(bytes)
}

fn unsupported(fs: &str, reason: &str) -> StoreError {
    StoreError::QuotaUnsupported {
        fs: fs.to_string(),
        reason: reason.to_string(),
    }
}

const WHERE: &str =
    "lamina limits layer sizes on btrfs (subvolume + qgroup) and on xfs mounted with prjquota";

/// Creates the directory `name` in `parent` (the `layers/` directory) with a size limit of `max_size` bytes
/// for layer number `n`; see the module docs. Nothing is left behind on error.
pub(crate) fn create_limited_dir(parent: &Path, name: &str, n: u64, max_size: u64) -> Result<()> {
    let pfd = open_dir(parent)?;
    let kind =
        q::fs_kind(pfd.as_fd()).map_err(|e| StoreError::io(format!("statfs {}", parent.display()), e))?;
    match kind {
        FsKind::Btrfs => {
            q::btrfs_create_subvolume(pfd.as_fd(), name.as_bytes()).map_err(|e| {
                StoreError::io(format!("create btrfs subvolume {}/{name}", parent.display()), e)
            })?;
            let limited = (|| {
                let sub = open_dir(&parent.join(name))?;
                let id = q::btrfs_subvolume_id(sub.as_fd())
                    .map_err(|e| StoreError::io("look up the id of a new btrfs subvolume", e))?;
                match q::btrfs_limit(sub.as_fd(), id, max_size) {
                    Err(e) if e.raw_os_error() == Some(libc_enotconn()) => {
                        // Quota groups are off on this filesystem: turn them on (this also gives every existing
                        // subvolume, the new one included, its level-0 qgroup).
                        q::btrfs_enable_quota(sub.as_fd())
                            .map_err(|e| StoreError::io("enable btrfs quota groups", e))?;
                        q::btrfs_limit(sub.as_fd(), id, max_size)
                    }
                    r => r,
                }
                .map_err(|e| StoreError::io(format!("set the btrfs qgroup limit of 0/{id}"), e))?;
                debug!(
                    layer = n,
                    subvolume = id,
                    max_size,
                    "btrfs subvolume with a qgroup limit"
                );
                Ok(())
            })();
            if let Err(e) = limited {
                destroy_subvolume(parent, name);
                return Err(e);
            }
            Ok(())
        }
        FsKind::Xfs => {
            let enforced = q::xfs_project_quota_enforced(pfd.as_fd())
                .map_err(|e| StoreError::io("query xfs project quota", e))?;
            if !enforced {
                return Err(unsupported(
                    "xfs",
                    "project quota is not on: mount the filesystem with -o prjquota (or pquota)",
                ));
            }
            let id = u32::try_from(n).ok().filter(|id| *id != 0).ok_or_else(|| {
                StoreError::LimitExceeded(format!("layer number {n} does not fit a project id"))
            })?;
            let path = parent.join(name);
            crate::mkdir(&path, 0o700)?;
            let limited = (|| {
                let dir = open_dir(&path)?;
                q::set_project_id(dir.as_fd(), id).map_err(|e| {
                    StoreError::io(format!("set xfs project id {id} on {}", path.display()), e)
                })?;
                q::xfs_set_project_limit(dir.as_fd(), id, max_size)
                    .map_err(|e| StoreError::io(format!("set the xfs project quota of project {id}"), e))?;
                Ok(())
            })();
            if let Err(e) = limited {
                let _ = std::fs::remove_dir(&path);
                return Err(e);
            }
            debug!(layer = n, project = id, max_size, "xfs project quota");
            Ok(())
        }
        other => Err(unsupported(&other.name(), WHERE)),
    }
}

fn libc_enotconn() -> i32 {
    lamina_sys::fs::errno::ENOTCONN
}

/// After the tree of a size-limited layer `n` is gone: frees what is not freed with the tree (the xfs
/// project's limit). btrfs needs nothing here: [`remove_subvolume_if_any`] runs as part of the tree removal.
pub(crate) fn release_project(root: &Path, n: u64) {
    let Ok(fd) = open_dir(root) else { return };
    if q::fs_kind(fd.as_fd()).ok() != Some(FsKind::Xfs) {
        return;
    }
    if let Ok(id) = u32::try_from(n) {
        if let Err(e) = q::xfs_set_project_limit(fd.as_fd(), id, 0) {
            warn!(project = id, error = %e, "could not clear the xfs project quota of a removed layer");
        }
    }
}

/// If `path` is the root of a btrfs subvolume, destroys it (content included), waits for the filesystem to drop
/// it and deletes its qgroup; returns whether it was one. Used by every removal of a layer directory, so that
/// removed layers, trash and staging leftovers and orphan directories never leave a subvolume or qgroup.
pub(crate) fn remove_subvolume_if_any(path: &Path) -> bool {
    let Ok(dir) = open_dir(path) else { return false };
    if !q::btrfs_is_subvolume(dir.as_fd()).unwrap_or(false) {
        return false;
    }
    drop(dir);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    destroy_subvolume(parent, &name.to_string_lossy())
}

/// Destroys subvolume `parent/name` and deletes its qgroup; false if the subvolume could not be destroyed.
fn destroy_subvolume(parent: &Path, name: &str) -> bool {
    let path = parent.join(name);
    let id = match open_dir(&path) {
        Ok(d) => q::btrfs_subvolume_id(d.as_fd()).ok(),
        Err(_) => None,
    };
    let Ok(pfd) = open_dir(parent) else { return false };
    if let Err(e) = q::btrfs_destroy_subvolume(pfd.as_fd(), name.as_bytes()) {
        warn!(path = %path.display(), error = %e, "could not destroy btrfs subvolume");
        return false;
    }
    let Some(id) = id else { return true };
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        // The qgroup can go once the cleaner dropped the subvolume, which a transaction commit starts.
        let _ = q::btrfs_sync(pfd.as_fd());
        match q::btrfs_remove_qgroup(pfd.as_fd(), id) {
            Ok(()) => {
                debug!(subvolume = id, "deleted qgroup");
                return true;
            }
            Err(e) if e.raw_os_error() == Some(lamina_sys::fs::errno::ENOENT) => return true,
            Err(e) if e.raw_os_error() == Some(libc_enotconn()) => return true,
            Err(e)
                if e.raw_os_error() == Some(lamina_sys::fs::errno::EBUSY)
                    && started.elapsed() < QGROUP_WAIT =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                warn!(subvolume = id, error = %e, "could not delete the qgroup of a destroyed subvolume");
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let m = 1u64 << 20;
        assert_eq!(parse_size("10M").unwrap(), 10 * m);
        assert_eq!(parse_size("10m").unwrap(), 10 * m);
        assert_eq!(parse_size("10MB").unwrap(), 10 * m);
        assert_eq!(parse_size("10MiB").unwrap(), 10 * m);
        assert_eq!(parse_size("10 MiB").unwrap(), 10 * m);
        assert_eq!(parse_size("1.5G").unwrap(), 1536 * m);
        assert_eq!(parse_size("2048k").unwrap(), 2 * m);
        assert_eq!(parse_size("1048576").unwrap(), m);
        assert_eq!(parse_size("1048576b").unwrap(), m);
        assert_eq!(parse_size("1T").unwrap(), m << 20);
        for bad in [
            "",
            "abc",
            "0",
            "0M",
            "-1",
            "-10M",
            "10X",
            "10MX",
            "10 M B",
            "1..5G",
            ".5G",
            "4096",
            "10i",
            "99999999999999999999",
            "20000000P",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(matches!(e, StoreError::InvalidArgument(_)), "{bad}: {e}");
            assert!(e.to_string().contains("invalid size"), "{bad}: {e}");
        }
        assert!(parse_size("0")
            .unwrap_err()
            .to_string()
            .contains("greater than zero"));
        assert!(parse_size("-1").unwrap_err().to_string().contains("positive"));
    }
}
