//! The volume lease: which hosts have a MooseFS volume mounted, so that a Remove on one host never deletes a
//! volume from under another host's containers.
//!
//! The lease directory is `<volumes root>/.lamina/lease/` on lamina's MooseFS mount: beside the volumes it
//! guards, in the same cluster, so every host that sees the volumes sees the leases, with nothing more to
//! configure. Its protocol is `lamina-lease`'s (docs/cluster.md, "Leases, references and claims"):
//! - a host that has a volume mounted holds a reference `volume/<name>` (taken at the first Mount, dropped at
//!   the last Unmount, re-established from the mount counts when the lease is opened at start);
//! - the references of a host count while its heartbeat (a thread, every `heartbeat_secs`) is younger than
//!   `lease_secs`; a host silent longer counts as gone and no longer blocks Remove;
//! - Remove claims `volume-remove/<name>`, then reads the live holders; Mount holds first, then looks for a
//!   live remove claim. Whichever comes second sees the other.

use std::time::Duration;

use lamina_lease::{Claim, HostId, Lease, LeaseError};
use tracing::warn;

use crate::error::VolumeError;
use crate::name::quote;

/// Kind of a volume reference in the lease directory.
pub const VOLUME_KIND: &str = "volume";
/// Kind of the claim a Remove holds while it checks the holders and deletes.
pub const REMOVE_KIND: &str = "volume-remove";
/// Directory of the lease below the volumes' `.lamina/`.
pub const LEASE_DIR: &str = "lease";

/// Settings of this host's volume lease (from `[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLeaseConfig {
    /// This host in the lease directory.
    pub host: HostId,
    /// A host silent this long no longer blocks Remove.
    pub lease: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
}

/// Maps a lease error once to the volume error.
pub(crate) fn lease_err(e: LeaseError) -> VolumeError {
    match e {
        LeaseError::Io { context, source } => {
            crate::backend::io_err(format!("volume lease: {context}"), source)
        }
        LeaseError::BadName { .. } => VolumeError::InvalidArgument(e.to_string()),
        LeaseError::Corrupt { .. } => VolumeError::CorruptMetadata(e.to_string()),
        LeaseError::HeldBy { .. } | LeaseError::Lost { .. } => VolumeError::InUse(e.to_string()),
    }
}

/// Before a Remove: claims the removal, then refuses while a live host other than this one holds `name`.
/// The returned claim is to be kept until the volume is gone.
pub(crate) fn check_remove(l: &Lease, name: &str) -> Result<Claim, VolumeError> {
    let claim = l.claim(REMOVE_KIND, name).map_err(|e| match e {
        LeaseError::HeldBy { host, .. } => {
            VolumeError::InUse(format!("volume {} is being removed by host {host}", quote(name)))
        }
        e => lease_err(e),
    })?;
    let holders = l.all_holders(VOLUME_KIND, name).map_err(lease_err)?;
    let live: Vec<String> = holders
        .iter()
        .filter(|h| h.alive && &h.host != l.host())
        .map(|h| {
            format!(
                "{} (last heartbeat {} s ago)",
                h.host,
                h.silent.unwrap_or_default().as_secs()
            )
        })
        .collect();
    if !live.is_empty() {
        return Err(VolumeError::InUse(format!(
            "volume {} is mounted on host {}; unmount it there first (a host silent for more than {} s no longer counts)",
            quote(name),
            live.join(", "),
            l.config().lease.as_secs()
        )));
    }
    for h in holders.iter().filter(|h| !h.alive) {
        warn!(volume = %name, host = %h.host, silent_secs = h.silent.map(|s| s.as_secs()),
            "ignoring the mount of a host silent for longer than the lease");
    }
    Ok(claim)
}

/// Before a Mount on this host: holds `name`, refused while another host is removing it.
pub(crate) fn hold_for_mount(l: &Lease, name: &str) -> Result<(), VolumeError> {
    l.hold(VOLUME_KIND, name).map_err(lease_err)?;
    match l.claim_state(REMOVE_KIND, name).map_err(lease_err)? {
        Some(c) if !c.expired && &c.host != l.host() => {
            let _ = l.release(VOLUME_KIND, name);
            Err(VolumeError::InUse(format!(
                "volume {} is being removed by host {}",
                quote(name),
                c.host
            )))
        }
        _ => Ok(()),
    }
}

/// Makes this host's references exactly `mounted`.
pub(crate) fn sync_references(l: &Lease, mounted: &[String]) -> Result<(), VolumeError> {
    for n in mounted {
        l.hold(VOLUME_KIND, n).map_err(lease_err)?;
    }
    for n in l.references(VOLUME_KIND).map_err(lease_err)? {
        if !mounted.contains(&n) {
            l.release(VOLUME_KIND, &n).map_err(lease_err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_lease::LeaseConfig;

    fn lease(dir: &std::path::Path, host: &str) -> Lease {
        Lease::open(LeaseConfig {
            dir: dir.to_path_buf(),
            host: HostId::new(host).unwrap(),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[test]
    fn remove_and_mount_see_each_other() {
        let t = tempfile::tempdir().unwrap();
        let (h1, h2) = (lease(t.path(), "node-1"), lease(t.path(), "node-2"));
        hold_for_mount(&h2, "v").unwrap();
        let e = check_remove(&h1, "v").unwrap_err().to_string();
        assert!(
            e.starts_with("in use: volume \"v\" is mounted on host node-2 (last heartbeat 0 s ago)")
                && e.contains("more than 30 s"),
            "{e}"
        );
        // This host's own (stale) reference does not block: its mount counts decide.
        hold_for_mount(&h1, "w").unwrap();
        drop(check_remove(&h1, "w").unwrap());

        let removing = check_remove(&h1, "x").unwrap();
        let e = hold_for_mount(&h2, "x").unwrap_err().to_string();
        assert_eq!(e, "in use: volume \"x\" is being removed by host node-1");
        assert!(
            h2.references(VOLUME_KIND).unwrap().iter().all(|n| n != "x"),
            "the refused hold is dropped"
        );
        let e = check_remove(&h2, "x").unwrap_err().to_string();
        assert_eq!(e, "in use: volume \"x\" is being removed by host node-1");
        drop(removing);
        hold_for_mount(&h2, "x").unwrap();

        sync_references(&h2, &["x".to_string(), "y".to_string()]).unwrap();
        assert_eq!(
            h2.references(VOLUME_KIND).unwrap(),
            ["x", "y"],
            "v dropped, y held"
        );
    }
}
