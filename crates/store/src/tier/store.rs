//! The store's side of the tier: a local record whose content is a published layer, publication at commit,
//! the heartbeat, and the tier's part of garbage collection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{chain_hex, tier_io, Claimed, TierGarbageKind};
use crate::gc::{Garbage, GarbageKind, GcReport};
use crate::{lock, now_ns, LayerKind, Result, Store, StoreError};

/// How often a Prepare waiting for another host's unpack looks again.
const POLL: Duration = Duration::from_millis(200);

/// Microseconds taken by the named steps of one call, for a debug line.
struct Steps {
    last: Instant,
    done: Vec<(&'static str, u128)>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.done.push((step, (now - self.last).as_micros()));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, us)) in self.done.iter().enumerate() {
            write!(f, "{}{step}={us}us", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// The reference and the manifest read of a layer started at an adoption's first look (each when it could be
/// started), before its seal was seen.
type Early = (
    Option<super::Pending<Result<()>>>,
    Option<super::Pending<std::io::Result<Vec<u8>>>>,
);

/// One layer of the tier, as `lamina layers top --cluster` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierLayer {
    /// `sha256:<hex>`.
    pub chain: String,
    /// Bytes of its content (allocated, as the publishing host measured it).
    pub bytes: u64,
    /// Files, directories and links.
    pub inodes: u64,
    /// Hosts that reference it (holding it: linked from the tier, or their own copy).
    pub hosts: Vec<String>,
    /// How many of them are alive.
    pub live_hosts: usize,
    /// The host that published it.
    pub published_by: String,
    /// When (unix nanoseconds).
    pub published_ns: u64,
    /// Live hosts that use it now: an active layer (a container's, a view) or a mounted stack of theirs
    /// reaches it.
    #[serde(default)]
    pub users: Vec<String>,
    /// Active layers and mounted stacks reaching it, summed over the live hosts that use it.
    #[serde(default)]
    pub uses: u64,
    /// Its last use by any host (unix nanoseconds, the tier's clock; 0: never seen in use): the time of the
    /// tier's reading for a layer in use on a live host, else the last time a host recorded it in use.
    #[serde(default)]
    pub last_use_ns: u64,
}

/// The tier as `lamina layers top --cluster` and the status show it.
#[derive(Debug, Clone, Serialize)]
pub struct TierSummary {
    /// This host's id.
    pub host: String,
    /// Hosts with a live heartbeat.
    pub live_hosts: Vec<String>,
    /// Published layers.
    pub layers: usize,
    /// Layers this host holds.
    pub held: usize,
}

impl Store {
    fn tier(&self) -> Option<&super::Tier> {
        self.tier.as_ref()
    }

    /// Whether the store takes part in a cluster tier.
    pub fn has_tier(&self) -> bool {
        self.tier.is_some()
    }

    /// Makes the committed layer `name` (a chain id, `sha256:<hex>`) in `ns` on `parent` from the cluster tier,
    /// when the tier has it or another host is unpacking it now (then this waits for it, up to the configured
    /// wait). Gives `true` when the layer exists here afterwards (made now or before), `false` when the caller
    /// must unpack it itself; this host then holds the claim on it until [`Store::publish_shared`].
    pub fn adopt_shared(
        &self,
        ns: &str,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<bool> {
        let (Some(tier), Some(hex)) = (self.tier(), chain_hex(name)) else {
            return Ok(false);
        };
        let mut steps = Steps::new();
        if let Some((_, rec)) = self.lookup(ns, name)? {
            return Ok(rec.kind == LayerKind::ReadOnly);
        }
        steps.mark("lookup");
        let deadline = Instant::now() + tier.options().claim_wait;
        // While another host unpacks, only the layer's name is looked up each poll (one lookup on the metadata
        // server); the claim is tried again now and then, so that a dead host's claim is taken over.
        let claim_every = (tier.lease().config().lease / 3).max(Duration::from_secs(1));
        let mut waited = false;
        let mut next_claim = Instant::now();
        // At the first look, the reference is taken and the manifest read beside the seal's read: a published
        // layer's adoption needs all three, a layer not published yet costs one lookup more, and this host then
        // unpacks it or waits for it and needs the reference either way (at its publication, or at the
        // adoption); an unpack given up leaves it to this host's next collection.
        let mut early_manifest = tier.read_manifest(hex).ok();
        let mut early_hold = tier.start_hold(hex).ok();
        loop {
            let published = match tier.published(hex) {
                Err(StoreError::CorruptMetadata(e)) => {
                    warn!(chain = name, error = %e, "the tier's layer is damaged; unpacking here");
                    return Ok(false);
                }
                r => r?,
            };
            if let Some(seal) = published {
                steps.mark("seal");
                let t0 = Instant::now();
                let early = (early_hold.take(), early_manifest.take());
                let made = match self.link_shared(ns, name, parent, labels, hex, seal, early, &mut steps) {
                    Err(StoreError::CorruptMetadata(e)) => {
                        warn!(chain = name, error = %e, "the tier's layer is damaged; unpacking here");
                        return Ok(false);
                    }
                    r => r?,
                };
                debug!(
                    ns,
                    name,
                    us = t0.elapsed().as_micros() as u64,
                    waited,
                    "layer taken from the cluster tier"
                );
                return Ok(made);
            }
            early_manifest = None;
            early_hold = None;
            if Instant::now() >= next_claim {
                match tier.claim(hex)? {
                    // The layer may have been published between the look above and the claim (the
                    // publisher releases its claim after the rename): look once more before unpacking.
                    Claimed::Taken if matches!(tier.published(hex), Ok(Some(_))) => {
                        tier.release(hex);
                        continue;
                    }
                    Claimed::Taken => return Ok(false),
                    Claimed::HeldBy(host) => {
                        if !waited {
                            info!(
                                chain = name,
                                host, "another host is unpacking this layer; waiting for it"
                            );
                            waited = true;
                        }
                    }
                }
                next_claim = Instant::now() + claim_every;
            }
            if Instant::now() >= deadline {
                warn!(
                    chain = name,
                    "another host's unpack takes too long; unpacking here too"
                );
                return Ok(false);
            }
            std::thread::sleep(POLL);
        }
    }

    /// A local committed layer whose content is the tier's layer `hex` (sealed with `seal`; `early`: its
    /// reference and manifest read when they were started before the seal was seen), made in one metadata
    /// transaction once everything it names is in place. On one thread this host references the layer (so
    /// that no collection takes it meanwhile) and then mounts an image layer (the mount also shows that the
    /// layer is still there after the reference); on this one the layer's whole storage is made (its content a
    /// link to the tier: to this host's mount of an image layer, or to a directory layer's tree; its manifest a
    /// link to the tier's), and the manifest is checked against the seal. Then one durable transaction records
    /// the committed layer under `name`. A crash before it leaves storage that no record names and that holds
    /// only links, which the next start deletes; the storage is not flushed (a power cut that keeps the record
    /// and loses it is repaired from the tier, [`Store::relink_shared`]). An image that does not mount is
    /// unpacked here instead (`Ok(false)`).
    #[allow(clippy::too_many_arguments)]
    fn link_shared(
        &self,
        ns: &str,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        hex: &str,
        seal: super::Seal,
        (hold, manifest): Early,
        steps: &mut Steps,
    ) -> Result<bool> {
        let tier = self.tier().expect("tier");
        // Until the record is committed, no reconciliation of the mounts may take this layer's down.
        let _adopting = tier.adopting();
        let target = match seal.format {
            super::TierFormat::Directory => tier.content(hex),
            super::TierFormat::Erofs => tier.mount_point(hex),
        };
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (stored, remote) = std::thread::scope(|s| {
            let remote = s.spawn(|| {
                let t0 = Instant::now();
                match hold.map(super::Pending::wait) {
                    Some(Ok(Ok(()))) => {}
                    _ => tier.hold(hex)?,
                }
                let held = t0.elapsed();
                let mounted = tier.linked_content(hex, &seal).map(|_| ());
                Ok::<_, StoreError>((held, t0.elapsed() - held, mounted))
            });
            let manifest_link = tier.layer_dir(hex).join(crate::MANIFEST_FILE);
            let stored = self.backend.create_linked(n, &target, &manifest_link);
            steps.mark("store");
            // Checked before the record names it; the read began beside the seal's.
            let checked = tier.manifest(hex, &seal, manifest).map(|_| ());
            steps.mark("manifest");
            let remote = remote.join().unwrap_or_else(|_| {
                Err(StoreError::io(
                    "cluster tier",
                    std::io::Error::other("reference thread panicked"),
                ))
            });
            (stored, checked.and(remote))
        });
        let mut unmountable = None;
        let ready = remote.and_then(|(held, mount, mounted)| {
            steps.done.push(("hold", held.as_micros()));
            steps.done.push(("mount", mount.as_micros()));
            mounted.inspect_err(|e| unmountable = Some(e.to_string()))
        });
        steps.mark("join");
        let owned = match (stored, ready) {
            (Ok(owned), Ok(())) => owned,
            (stored, ready) => {
                if stored.is_ok() {
                    // No record names it.
                    self.backend.discard(n);
                }
                if let Some(why) = unmountable {
                    warn!(
                        chain = name,
                        error = why,
                        "the tier's layer image does not mount here; unpacking here"
                    );
                    return Ok(false);
                }
                return Err(ready.and(stored.map(|_| ())).expect_err("one failed"));
            }
        };
        let txn = match self.write() {
            Ok(txn) => txn,
            Err(e) => {
                self.backend.discard(n);
                return Err(e);
            }
        };
        let recorded = (|| {
            if txn.number(ns, name)?.is_some() {
                // Made by a concurrent call meanwhile.
                return Ok(false);
            }
            let (parent_n, depth) =
                crate::lifecycle::parent_of(&txn, ns, name, parent, None, Some(LayerKind::ReadOnly))?;
            let now = now_ns();
            let rec = crate::LayerRecord {
                ns: ns.to_string(),
                name: name.to_string(),
                parent: parent_n,
                depth,
                kind: LayerKind::ReadOnly,
                state: crate::LayerState::Empty,
                size: Some(seal.bytes),
                digest: None,
                created_ns: now,
                updated_ns: now,
                inodes: Some(seal.inodes),
                labels,
                manifest: Some(seal.manifest.clone()),
                max_size: None,
                shared: Some(seal.chain.clone()),
            };
            txn.put_name(ns, name, n)?;
            txn.put_layer(n, &rec)?;
            if let Some(pn) = parent_n {
                txn.add_child(pn, n)?;
            }
            txn.reserve_id(n)?;
            Ok(true)
        })();
        match recorded {
            Ok(true) => {
                // A commit that failed may still have reached the disk: its storage stays (the next start
                // deletes it if no record names it).
                txn.commit()?;
            }
            Ok(false) => {
                drop(txn);
                self.backend.discard(n);
            }
            Err(e) => {
                drop(txn);
                self.backend.discard(n);
                return Err(e);
            }
        }
        drop(owned);
        steps.mark("commit");
        debug!(name, steps = %steps, "adoption steps");
        Ok(true)
    }

    /// Gives up this host's claim on the layer with chain id `chain` (its unpack was abandoned), so that
    /// another host waiting for it unpacks it without waiting for the claim to expire.
    pub fn release_shared_claim(&self, chain: &str) {
        if let (Some(tier), Some(hex)) = (self.tier(), chain_hex(chain)) {
            tier.release(hex);
        }
    }

    /// Publishes the committed layer `name` of `ns` to the cluster tier as chain id `chain`, unless it is there
    /// already; drops this host's claim on it and references it. Gives whether this call published it.
    pub fn publish_shared(&self, ns: &str, name: &str, chain: &str) -> Result<bool> {
        let (Some(tier), Some(hex)) = (self.tier(), chain_hex(chain)) else {
            return Ok(false);
        };
        let (n, rec) = self.require(ns, name)?;
        if rec.kind != LayerKind::ReadOnly {
            return Err(StoreError::Precondition(format!(
                "{name} is not a committed layer"
            )));
        }
        let t0 = Instant::now();
        let result = match tier.has(hex) {
            Ok(true) => Ok(false),
            Ok(false) => tier.publish(hex, chain, &self.backend.paths(n).content),
            Err(e) => Err(e),
        };
        tier.release(hex);
        let published = result?;
        tier.hold(hex)?;
        self.update_record(n, |r| r.shared = Some(chain.to_string()))?;
        info!(
            chain,
            published,
            ms = t0.elapsed().as_millis() as u64,
            "layer shared with the cluster tier"
        );
        Ok(published)
    }

    /// After an apply (Docker's `ApplyDiff`): when the layer's chain id (its DiffID on its parents' chain) is
    /// published in the tier, the layer's content becomes the tier's and the local copy is dropped; this host
    /// references the tier layer. Gives whether it did. The tar was read and unpacked all the same (the chain id
    /// is known only once it is read): what this saves is the local copy, not the transfer.
    pub fn share_applied(&self, ns: &str, name: &str) -> Result<bool> {
        let Some(tier) = self.tier() else {
            return Ok(false);
        };
        let (n, rec) = self.require(ns, name)?;
        let Some(chain) = self.applied_chain(&rec)? else {
            return Ok(false);
        };
        let hex = chain_hex(&chain).map(str::to_string).unwrap_or_default();
        if rec.shared.is_some() || !tier.has(&hex)? {
            return Ok(false);
        }
        tier.hold(&hex)?;
        let seal = tier.seal(&hex)?;
        // The background manifest of the apply reads the local copy: it finishes first.
        self.wait_sealed();
        let _adopting = tier.adopting();
        let target = tier.linked_content(&hex, &seal)?;
        let slot = self.slot(n);
        let guard = lock(&slot);
        if guard.mounts > 0 || self.backend.is_mounted(n) || self.lookup(ns, name)?.map(|(m, _)| m) != Some(n)
        {
            return Ok(false);
        }
        let paths = self.backend.paths(n);
        tier.copy_manifest(&hex, &seal, &paths.manifest)?;
        self.update_record(n, |r| {
            r.shared = Some(chain.clone());
            r.manifest = Some(seal.manifest.clone());
        })?;
        // The link appears in place of the local copy in one step; the local copy goes after.
        let dir = crate::open_dir(&paths.dir)?;
        let content = paths
            .content
            .file_name()
            .map(|s| s.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        let tmp = b"diff.tier".to_vec();
        let _ = lamina_sys::fs::unlink(dir.as_fd(), &tmp);
        let swapped = lamina_sys::fs::symlink(target.as_os_str().as_encoded_bytes(), dir.as_fd(), &tmp)
            .and_then(|()| lamina_sys::fs::exchange(dir.as_fd(), &content, &tmp));
        swapped.map_err(|e| tier_io(format!("link {} to the tier", paths.content.display()), e))?;
        crate::remove_tree(&paths.dir.join("diff.tier"));
        drop(guard);
        info!(
            ns,
            name, chain, "applied layer stored in the cluster tier instead of a local copy"
        );
        Ok(true)
    }

    /// The chain id of an applied layer: its DiffID, on its parent's chain id (every layer below applied too).
    fn applied_chain(&self, rec: &crate::LayerRecord) -> Result<Option<String>> {
        let Some(own) = rec.digest.clone() else {
            return Ok(None);
        };
        let mut digests = vec![own];
        for p in self.chain(rec)? {
            match self.record_by_number(p)?.and_then(|r| r.digest) {
                Some(d) => digests.push(d),
                None => return Ok(None),
            }
        }
        let mut chain: Option<String> = None;
        for d in digests.iter().rev() {
            chain = Some(match chain {
                None => d.clone(),
                Some(c) => lamina_archive::manifest::digest_of(format!("{c} {d}").as_bytes()),
            });
        }
        Ok(chain)
    }

    /// The chain ids (hex) of the layers this store holds, published here or linked from the tier.
    fn held_shared(&self) -> Result<HashSet<String>> {
        Ok(self
            .list()?
            .into_iter()
            .filter_map(|(_, r)| r.shared.and_then(|c| chain_hex(&c).map(str::to_string)))
            .collect())
    }

    /// Brings this host's mounts of the tier's image layers in line with its records: each layer linked to a
    /// mount (`<data root>/tier/<hex>`) is mounted, every other mount there is taken down. Called when the store
    /// opens (mounts a restart or a kill left are kept; those a reboot took are made again), at every
    /// [`Store::share_tier_usage`] (so a mount goes within a heartbeat interval of the removal of the last
    /// local layer linked to it) and at each garbage collection. Gives the errors, which are also logged.
    pub fn sync_tier_mounts(&self) -> Vec<String> {
        let Some(tier) = self.tier() else {
            return Vec::new();
        };
        let _mounting = tier.mounting();
        match self.list() {
            Ok(records) => self.sync_tier_mounts_of(tier, &records),
            Err(e) => vec![format!("cluster tier: list layers: {e}")],
        }
    }

    /// [`Store::sync_tier_mounts`] on the records `records`, read with the tier's mounting lock held. Links
    /// again first the layers whose storage is missing ([`Store::relink_shared`]).
    fn sync_tier_mounts_of(&self, tier: &super::Tier, records: &[(u64, crate::LayerRecord)]) -> Vec<String> {
        let mut errors = self.relink_shared(tier, records);
        let needed = records
            .iter()
            .filter_map(|(n, r)| {
                let hex = chain_hex(r.shared.as_deref()?)?.to_string();
                let link = std::fs::read_link(self.backend.paths(*n).content).ok()?;
                (link == tier.mount_point(&hex)).then_some(hex)
            })
            .collect();
        let synced = tier.sync_mounts(&needed);
        for e in &synced {
            warn!(error = %e, "cluster tier: mounts of image layers");
        }
        errors.extend(synced);
        errors
    }

    /// Makes again the storage of each layer among `records` whose content is the tier's and whose storage is
    /// missing: an adoption does not flush the storage it makes before its record (the record is flushed), so a
    /// power cut can take the storage and keep the record. Its links are made again from the tier's seal
    /// (recovery leaves such a layer missing rather than empty); a layer the tier cannot give now is tried
    /// again at the next reconciliation. Gives the errors, which are also logged.
    fn relink_shared(&self, tier: &super::Tier, records: &[(u64, crate::LayerRecord)]) -> Vec<String> {
        let mut errors = Vec::new();
        for (n, rec) in records {
            let Some(hex) = rec.shared.as_deref().and_then(chain_hex) else {
                continue;
            };
            if self.backend.exists(*n) {
                continue;
            }
            // A removal holds the layer's lock from its record's removal to its storage's.
            let slot = self.slot(*n);
            let _guard = lock(&slot);
            if self.backend.exists(*n) || !matches!(self.record_by_number(*n), Ok(Some(_))) {
                continue;
            }
            let relinked = tier.published(hex).and_then(|seal| {
                let seal = seal.ok_or_else(|| {
                    tier_io(
                        format!("layer {hex} is no longer in the tier"),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    )
                })?;
                let target = match seal.format {
                    super::TierFormat::Directory => tier.content(hex),
                    super::TierFormat::Erofs => tier.mount_point(hex),
                };
                let manifest = tier.layer_dir(hex).join(crate::MANIFEST_FILE);
                self.backend.create_linked(*n, &target, &manifest).map(drop)
            });
            match relinked {
                Ok(()) => warn!(
                    layer = n,
                    chain = rec.shared.as_deref().unwrap_or_default(),
                    "layer directory missing; linked again to the cluster tier"
                ),
                Err(e) => {
                    warn!(layer = n, error = %e, "layer directory missing; cannot link it to the cluster tier now");
                    errors.push(format!("layer {n}: {e}"));
                }
            }
        }
        errors
    }

    /// Records in the tier which of its layers this host uses now: for each layer it holds from the tier,
    /// the number of its active layers (containerd's active snapshots and views) and mounted stacks (any
    /// layer mounted through [`Store::get`]) that reach it; and which it used since the previous call (a
    /// stack brought up and gone meanwhile, seen in the layers' usage counters). Meant to be called every
    /// heartbeat interval: the tier is written only when the layers in use changed or a layer was used since
    /// the previous call (at most one small file write per call, none while nothing happens). Gives whether
    /// it wrote. Brings the mounts of image layers in line first ([`Store::sync_tier_mounts`]).
    pub fn share_tier_usage(&self) -> Result<bool> {
        let Some(tier) = self.tier() else {
            return Ok(false);
        };
        let records = {
            let _mounting = tier.mounting();
            let records = self.list()?;
            self.sync_tier_mounts_of(tier, &records);
            records
        };
        let since = tier.usage_since(now_ns());
        let shared: HashMap<u64, String> = records
            .iter()
            .filter_map(|(n, r)| {
                let hex = chain_hex(r.shared.as_deref()?)?;
                Some((*n, hex.to_string()))
            })
            .collect();
        let uses = if shared.is_empty() {
            BTreeMap::new()
        } else {
            uses_below(&records, &shared, |n, rec| self.in_use(n, rec))?
        };
        let recent: std::collections::BTreeSet<String> = shared
            .iter()
            .filter(|(n, _)| self.slots.counts(**n).0.last_used_ns > since.max(1))
            .map(|(_, hex)| hex.clone())
            .collect();
        let held: HashSet<String> = shared.into_values().collect();
        tier.share_usage(uses, recent, &held)
    }

    /// Whether layer `n` counts as a use of the layers below it: an active layer or a mounted stack. Docker's
    /// writable layers exist while their container does, mounted or not: only their mounts count; containerd
    /// mounts its active snapshots itself, so their existence counts.
    pub(super) fn in_use(&self, n: u64, rec: &crate::LayerRecord) -> bool {
        let active =
            matches!(rec.kind, LayerKind::ReadWrite | LayerKind::View) && !rec.ns.starts_with("docker:");
        active || self.slots.mounts(n) > 0
    }

    /// The tier's figures.
    pub fn tier_summary(&self) -> Result<Option<TierSummary>> {
        let Some(tier) = self.tier() else {
            return Ok(None);
        };
        let mut live: Vec<String> = tier.live_hosts()?.into_iter().collect();
        live.sort();
        Ok(Some(TierSummary {
            host: tier.lease().host().as_str().to_string(),
            live_hosts: live,
            layers: tier.layers()?.len(),
            held: self.held_shared()?.len(),
        }))
    }

    /// Every layer of the tier with the hosts that hold it, read from the tier alone (`None` without a tier).
    pub fn tier_layers(&self) -> Result<Option<Vec<TierLayer>>> {
        let Some(tier) = self.tier() else {
            return Ok(None);
        };
        let mut holders: HashMap<String, Vec<lamina_lease::HostState>> = tier
            .lease()
            .all_references(super::KIND)
            .map_err(super::lease_err)?
            .into_iter()
            .collect();
        let live = tier.live_hosts()?;
        let usages = tier.usages()?;
        let now_ns = if usages.iter().any(|(_, u, _)| !u.uses.is_empty()) {
            let now = tier.lease().now().map_err(super::lease_err)?;
            u64::try_from(
                now.duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX)
        } else {
            0
        };
        let mut out = Vec::new();
        for hex in tier.layers()? {
            let seal = tier.seal(&hex).ok();
            let (mut users, mut uses, mut last_use_ns) = (Vec::new(), 0u64, 0u64);
            for (host, u, _) in &usages {
                let alive = live.contains(host);
                if let Some(n) = u.uses.get(&hex).filter(|_| alive) {
                    users.push(host.clone());
                    uses += u64::from(*n);
                    last_use_ns = last_use_ns.max(now_ns);
                }
                if let Some(t) = u.last_use_ns.get(&hex) {
                    last_use_ns = last_use_ns.max(*t);
                }
            }
            users.sort();
            let mut hosts: Vec<(String, bool)> = holders
                .remove(&hex)
                .unwrap_or_default()
                .into_iter()
                .map(|h| (h.host.as_str().to_string(), h.alive))
                .collect();
            hosts.sort();
            out.push(TierLayer {
                chain: format!("sha256:{hex}"),
                bytes: seal.as_ref().map(|s| s.bytes).unwrap_or(0),
                inodes: seal.as_ref().map(|s| s.inodes).unwrap_or(0),
                live_hosts: hosts.iter().filter(|(_, alive)| *alive).count(),
                hosts: hosts.into_iter().map(|(h, _)| h).collect(),
                published_by: seal.as_ref().map(|s| s.host.clone()).unwrap_or_default(),
                published_ns: seal.map(|s| s.published_ns).unwrap_or(0),
                users,
                uses,
                last_use_ns,
            });
        }
        out.sort_by_key(|l| std::cmp::Reverse((l.live_hosts, l.users.len(), l.bytes)));
        Ok(Some(out))
    }

    /// Garbage collection's tier part: brings this host's references in line with the layers it holds (not in
    /// a dry run), then lists (and removes) the tier layers no live host holds.
    pub(crate) fn tier_gc(&self, dry_run: bool, report: &mut GcReport) {
        let Some(tier) = self.tier() else {
            return;
        };
        let result = (|| -> Result<()> {
            let held = self.held_shared()?;
            if !dry_run {
                let own = tier.references()?;
                for hex in own.difference(&held) {
                    tier.unhold(hex)?;
                }
                for hex in held.difference(&own) {
                    tier.hold(hex)?;
                }
            }
            if !dry_run {
                report.errors.extend(
                    self.sync_tier_mounts()
                        .into_iter()
                        .map(|e| format!("cluster tier: {e}")),
                );
            }
            let (items, errors) = tier.collect(&held, dry_run)?;
            report.errors.extend(errors);
            for g in items {
                report.bytes += g.bytes;
                report.items.push(Garbage {
                    kind: match g.kind {
                        TierGarbageKind::Layer => GarbageKind::TierLayer,
                        _ => GarbageKind::TierLeftover,
                    },
                    path: g.path,
                    layer: None,
                    name: g.hex.map(|h| format!("sha256:{h}")),
                    bytes: g.bytes,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            warn!(error = %e, "garbage collection of the cluster tier failed");
            report.errors.push(format!("cluster tier: {e}"));
        }
    }
}

/// For each tier layer among `records` (`shared`: record number → chain id hex), the number of records that
/// `in_use` picks and that are that layer or have it below them. One pass over the records, leaves first:
/// each record adds the uses that reached it to its parent, so a chain is never walked per layer.
pub(super) fn uses_below(
    records: &[(u64, crate::LayerRecord)],
    shared: &HashMap<u64, String>,
    in_use: impl Fn(u64, &crate::LayerRecord) -> bool,
) -> Result<BTreeMap<String, u32>> {
    let index: HashMap<u64, usize> = records.iter().enumerate().map(|(i, (n, _))| (*n, i)).collect();
    let mut reached: Vec<u32> = records.iter().map(|(n, r)| u32::from(in_use(*n, r))).collect();
    // Children not yet added to each record.
    let mut pending = vec![0usize; records.len()];
    for (_, r) in records {
        if let Some(&p) = r.parent.and_then(|p| index.get(&p)) {
            pending[p] += 1;
        }
    }
    let mut ready: Vec<usize> = (0..records.len()).filter(|&i| pending[i] == 0).collect();
    let mut done = 0;
    let mut uses = BTreeMap::new();
    while let Some(i) = ready.pop() {
        done += 1;
        let (n, rec) = &records[i];
        let count = reached[i];
        if count > 0 {
            if let Some(hex) = shared.get(n) {
                uses.insert(hex.clone(), count);
            }
        }
        let Some(p) = rec.parent else { continue };
        let Some(&pi) = index.get(&p) else {
            if count > 0 {
                return Err(StoreError::CorruptMetadata(format!("missing parent layer {p}")));
            }
            continue;
        };
        reached[pi] = reached[pi].saturating_add(count);
        pending[pi] -= 1;
        if pending[pi] == 0 {
            ready.push(pi);
        }
    }
    if done < records.len() {
        if let Some(i) = (0..records.len()).find(|&i| pending[i] > 0 && reached[i] > 0) {
            return Err(StoreError::CorruptMetadata(format!(
                "parent chain of {} loops",
                records[i].1.name
            )));
        }
    }
    Ok(uses)
}
