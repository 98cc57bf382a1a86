//! The daemon's part of the cluster tier: this host's lease on the `[cluster] dir` and the store's tier
//! options (docs/cluster.md).

use std::time::Duration;

use anyhow::Context;
use lamina_lease::{Heartbeat, Lease, LeaseConfig};
use lamina_store::TierOptions;
use tracing::info;

use crate::config::Settings;

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
