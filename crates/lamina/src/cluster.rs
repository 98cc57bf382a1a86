//! The daemon's part of the cluster tier: lamina's own mount of the tier's MooseFS (`[cluster.moosefs]`), this
//! host's lease on the tier directory and the store's tier options (docs/cluster.md).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lamina_lease::{Heartbeat, Lease, LeaseConfig};
use lamina_store::TierOptions;
use lamina_volume::{Ensured, MfsMount};
use tracing::{info, warn};

use crate::config::{Settings, TIER_MOUNT_PARENT};

/// The store's directory of this host's mounts of the tier's image layers (`<data_root>/tier/<hex>`).
const IMAGE_MOUNTS: &str = "tier";

/// With `[cluster.moosefs]`, mounts the tier's MooseFS at `<data_root>/cluster/moosefs` (the `cluster`
/// directory mode 0700) and makes the tier's directory on it; to be called before the store opens the tier.
/// A live mount an earlier run left is adopted (it stays across a stop of lamina, see [`crate::serve`]); a dead
/// one (its mfsmount gone) is detached and made again. A master that does not accept a connection fails the
/// start within seconds, like a tier directory that is not there.
pub fn mount_tier(settings: &Settings) -> anyhow::Result<()> {
    let (Some(m), Some(tier)) = (&settings.cluster.moosefs, &settings.cluster.dir) else {
        return Ok(());
    };
    let parent = settings.data_root.join(TIER_MOUNT_PARENT);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .and_then(|()| std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("creating {}", parent.display()))?;
    let mount = MfsMount::new(m.mount.clone(), m.timeout, parent.join("mfsmount.log"));
    let failed = || {
        format!(
            "[cluster.moosefs]: mounting the tier's MooseFS (master {}) at {}",
            mount.master(),
            mount.mountpoint().display()
        )
    };
    mount.probe().with_context(failed)?;
    let ensured = mount.ensure_mounted(tier).with_context(failed)?;
    if ensured == Ensured::Mounted {
        detach_image_mounts(&settings.data_root);
    }
    if ensured != Ensured::Alive {
        let dir = tier.clone();
        mount
            .with_deadline("creating the tier directory", move || {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| lamina_volume::VolumeError::io(format!("creating {}", dir.display()), e))
            })
            .with_context(failed)?;
    }
    info!(mountpoint = %mount.mountpoint().display(), tier = %tier.display(), master = %mount.master(),
        adopted = ensured != Ensured::Mounted, "cluster tier on lamina's MooseFS mount");
    Ok(())
}

/// Detaches this host's mounts of the tier's image layers an earlier run left: each reads its image through
/// the MooseFS mount it was made on, which was just made anew (its mfsmount was gone, so every read would
/// fail; or the mount was taken away, and the old mfsmount would stay alive for them). The store's
/// reconciliation when it opens mounts the layers its records need again, through the new mount.
fn detach_image_mounts(data_root: &Path) {
    let dir = data_root.join(IMAGE_MOUNTS);
    let mounts = match lamina_sys::mount::mounts_under(&dir) {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "cannot read the mount table");
            return;
        }
    };
    for mp in mounts.iter().filter(|mp| *mp != &dir) {
        match lamina_sys::mount::unmount(mp, true) {
            Ok(()) => {
                info!(mountpoint = %mp.display(), "image layer mount of the previous MooseFS mount detached")
            }
            Err(e) => warn!(mountpoint = %mp.display(), error = %e, "cannot detach an image layer mount"),
        }
    }
}

/// How long a Prepare waits for another host's unpack of the same layer, in leases: long enough for a large
/// layer on a busy host, short enough that a host stuck without dying does not stall pulls for long.
const CLAIM_WAIT_LEASES: u32 = 4;

/// The store's tier options and the running heartbeat, when `[cluster] dir` is set. The lease directory and
/// the tier are the same directory.
pub fn tier_options(settings: &Settings) -> anyhow::Result<Option<(TierOptions, Heartbeat)>> {
    let c = &settings.cluster;
    let Some(dir) = c.dir.clone() else {
        return Ok(None);
    };
    let host = c.host_id(&settings.data_root)?;
    let lease = Lease::open(LeaseConfig {
        dir: dir.clone(),
        host: host.clone(),
        lease: c.lease,
        heartbeat: c.heartbeat,
    })
    .with_context(|| format!("joining the cluster at {}", dir.display()))?;
    let heartbeat = lease.start_heartbeat();
    info!(dir = %dir.display(), host = %host, lease_s = c.lease.as_secs(), "cluster tier");
    let claim_wait = c
        .lease
        .saturating_mul(CLAIM_WAIT_LEASES)
        .max(Duration::from_secs(10));
    Ok(Some((
        TierOptions {
            dir,
            lease,
            claim_wait,
            format: c.layer_format,
            usage_retention: c.usage_retention,
        },
        heartbeat,
    )))
}
