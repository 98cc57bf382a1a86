//! [`VolumeManager`]: Create/Remove/Mount/Unmount/Path/Get/List over the configured backends, with the
//! per-host mount bookkeeping.
//!
//! A volume is exposed on this host at `<mount_base>/<name>` by a bind mount of its directory while at least
//! one mount ID holds it. Counts are per (volume, ID), persisted before the bind mount is made, so a restart
//! of lamina loses none; at start the table and the mounts are reconciled (a counted volume whose bind
//! mount is missing is mounted again; a bind mount nobody counts is detached).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::backend::{
    describe, io_err, CreateTools, Created, MooseFs, MooseFsConfig, OnRemove, VolumeDir, META_DIR,
};
use crate::command::{parse_getgoal, path_arg};
use crate::error::VolumeError;
use crate::lease::{
    check_remove, hold_for_mount, lease_err, sync_references, VolumeLeaseConfig, LEASE_DIR, VOLUME_KIND,
};
use crate::meta::{Bookkeeping, VolumeRecord};
use crate::name::{quote, validate_name};
use crate::options::{parse_options_for, BackendKind};
use crate::rbd::{check_image_name, FsType, Lookup, Rbd, RbdConfig};
use crate::time::{now_secs, rfc3339};

/// How long a Mount waits for a mounted MooseFS volume to answer before counting it as alive.
const DEAD_MOUNT_WAIT: Duration = Duration::from_millis(500);

/// Default `mount_base`.
pub const DEFAULT_MOUNT_BASE: &str = "/mnt/docker-volumes";

/// Settings of the volume service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// lamina's own directory for volumes (`<data root>/volumes`): the database, local volumes, logs.
    pub state_dir: PathBuf,
    /// Backend of volumes created without `-o backend=`.
    pub default_backend: BackendKind,
    /// Volumes are mounted at `<mount_base>/<name>`.
    pub mount_base: PathBuf,
    /// What Remove does with the data.
    pub on_remove: OnRemove,
    /// Deadline of every cluster operation and tool run.
    pub timeout: Duration,
    /// The MooseFS backend, when configured.
    pub moosefs: Option<MooseFsConfig>,
    /// The RBD backend, when configured.
    pub rbd: Option<RbdConfig>,
    /// The lease of MooseFS volumes across hosts (None: Remove checks this host's mounts only).
    pub lease: Option<VolumeLeaseConfig>,
}

/// One volume as Get and List report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeView {
    /// Name.
    pub name: String,
    /// Mountpoint while mounted on this host.
    pub mountpoint: Option<PathBuf>,
    /// RFC 3339 creation time (unknown for directories lamina did not create).
    pub created_at: Option<String>,
    /// Status rows (Get only).
    pub status: BTreeMap<String, String>,
}

/// Where a volume was found.
struct Located {
    kind: BackendKind,
    dir: PathBuf,
    /// The record, where finding the volume read it (rbd).
    rec: Option<VolumeRecord>,
}

/// The volume service of one lamina.
#[derive(Debug)]
pub struct VolumeManager {
    cfg: VolumeConfig,
    db: Bookkeeping,
    local: VolumeDir,
    mfs: Option<MooseFs>,
    rbd: Option<Rbd>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The volume lease once opened, with its heartbeat thread.
    lease: Mutex<Option<(lamina_lease::Lease, lamina_lease::Heartbeat)>>,
}

impl VolumeManager {
    /// Opens the bookkeeping, prepares the local backend, mounts the cluster when configured (a cluster
    /// that is down is only logged: every later call retries), and reconciles mounts with the counts.
    pub fn open(cfg: VolumeConfig) -> Result<Self, VolumeError> {
        fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| VolumeError::io(format!("creating {}", cfg.state_dir.display()), e))?;
        fs::create_dir_all(&cfg.mount_base)
            .map_err(|e| VolumeError::io(format!("creating {}", cfg.mount_base.display()), e))?;
        let db = Bookkeeping::open(&cfg.state_dir.join("meta.redb"))?;
        let local = VolumeDir {
            root: cfg.state_dir.join("local"),
        };
        local.prepare()?;
        local.sweep_temporaries(Duration::ZERO);
        let mfs = cfg
            .moosefs
            .clone()
            .map(|m| MooseFs::new(m, cfg.timeout, cfg.state_dir.join("mfsmount.log")));
        if let Some(m) = &mfs {
            if let Err(e) = m.probe().and_then(|()| m.ensure_mounted()) {
                warn!(error = %e, "MooseFS backend not available yet; every call retries");
            }
        }
        let rbd = cfg.rbd.clone().map(|r| Rbd::new(r, cfg.timeout, &cfg.state_dir));
        let mgr = VolumeManager {
            cfg,
            db,
            local,
            mfs,
            rbd,
            locks: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
        };
        mgr.reconcile();
        mgr.maintain_lease();
        Ok(mgr)
    }

    /// `global` when the default backend is a shared one.
    pub fn is_global(&self) -> bool {
        matches!(self.cfg.default_backend, BackendKind::Moosefs | BackendKind::Rbd)
    }

    /// The mountpoint of `name` on this host.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.cfg.mount_base.join(name)
    }

    fn lock(&self, name: &str) -> Arc<Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    fn mfs(&self) -> Result<&MooseFs, VolumeError> {
        self.mfs.as_ref().ok_or_else(|| {
            VolumeError::Unsupported("the moosefs backend is not configured ([volumes.moosefs])".into())
        })
    }

    fn rbd(&self) -> Result<&Rbd, VolumeError> {
        self.rbd.as_ref().ok_or_else(|| {
            VolumeError::Unsupported("the rbd backend is not configured ([volumes.rbd])".into())
        })
    }

    fn not_found(name: &str) -> VolumeError {
        VolumeError::NotFound(format!("volume {} does not exist", quote(name)))
    }

    /// Finds the backend holding `name`.
    fn locate(&self, name: &str) -> Result<Located, VolumeError> {
        if self.local.exists(name)? {
            return Ok(Located {
                kind: BackendKind::Local,
                dir: self.local.dir(name),
                rec: None,
            });
        }
        if let Some(m) = &self.mfs {
            let n = name.to_string();
            if m.run("looking up the volume", move |v| v.exists(&n))? {
                return Ok(Located {
                    kind: BackendKind::Moosefs,
                    dir: m.vols.dir(name),
                    rec: None,
                });
            }
        }
        if let Some(r) = &self.rbd {
            if check_image_name(name).is_ok() {
                if let Some(rec) = r.record(name)? {
                    return Ok(Located {
                        kind: BackendKind::Rbd,
                        dir: r.data_dir(name),
                        rec: Some(rec),
                    });
                }
            }
        }
        Err(Self::not_found(name))
    }

    /// This host's volume lease: opened at the first call with the cluster reachable, its references then
    /// made equal to the mounted cluster volumes, and its heartbeat started. `None` when not configured.
    fn volume_lease(&self) -> Result<Option<lamina_lease::Lease>, VolumeError> {
        let (Some(lc), Some(m)) = (&self.cfg.lease, &self.mfs) else {
            return Ok(None);
        };
        let mut slot = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((l, _)) = &*slot {
            return Ok(Some(l.clone()));
        }
        let cfg = lamina_lease::LeaseConfig {
            dir: m.vols.root.join(META_DIR).join(LEASE_DIR),
            host: lc.host.clone(),
            lease: lc.lease,
            heartbeat: lc.heartbeat,
        };
        let mounted: Vec<String> = self
            .db
            .mounted()?
            .into_keys()
            .filter(|n| !self.local.exists(n).unwrap_or(false))
            .collect();
        let l = m.run("opening the volume lease", move |v| {
            let l = lamina_lease::Lease::open(cfg).map_err(lease_err)?;
            // A counted volume removed while this host was away (silent longer than the lease) is not held.
            let mut held = Vec::new();
            for n in mounted {
                if v.exists(&n)? {
                    held.push(n);
                }
            }
            sync_references(&l, &held)?;
            Ok(l)
        })?;
        info!(host = %l.host(), dir = %l.config().dir.display(), lease_secs = lc.lease.as_secs(),
            "volume lease opened");
        let hb = l.start_heartbeat();
        *slot = Some((l.clone(), hb));
        Ok(Some(l))
    }

    /// Opens the volume lease if it is configured and not open yet (at start, and again every heartbeat
    /// interval while the cluster is unreachable, so that this host's mounts count again as soon as it is
    /// back). A failure is only logged.
    pub fn maintain_lease(&self) {
        if let Err(e) = self.volume_lease() {
            warn!(error = %e, "volume lease not available yet; retried");
        }
    }

    /// The heartbeat interval of the volume lease, when configured.
    pub fn lease_interval(&self) -> Option<Duration> {
        self.cfg
            .lease
            .as_ref()
            .filter(|_| self.mfs.is_some())
            .map(|l| l.heartbeat)
    }

    /// Drops this host's reference to a cluster volume after its last Unmount; a failure is only logged (the
    /// next start of lamina makes the references equal to the mount counts again).
    fn drop_reference(&self, name: &str) {
        let (Some(m), Some(_)) = (&self.mfs, &self.cfg.lease) else {
            return;
        };
        if self.local.exists(name).unwrap_or(false)
            || self
                .db
                .known(name)
                .ok()
                .flatten()
                .is_some_and(|k| k.backend == BackendKind::Rbd)
        {
            return;
        }
        let n = name.to_string();
        let done = self.volume_lease().and_then(|l| match l {
            Some(l) => m.run("dropping the volume lease reference", move |_| {
                l.release(VOLUME_KIND, &n).map_err(lease_err)
            }),
            None => Ok(()),
        });
        if let Err(e) = done {
            warn!(volume = %name, error = %e,
                "cannot drop this host's reference in the volume lease; it still blocks Remove on other hosts until lamina restarts or this host is silent for the lease");
        }
    }

    /// `/VolumeDriver.Create`.
    pub fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), VolumeError> {
        validate_name(name)?;
        let o = parse_options_for(opts, self.cfg.default_backend)?;
        let kind = o.backend.unwrap_or(self.cfg.default_backend);
        let mut rec = VolumeRecord {
            version: 1,
            name: name.to_string(),
            backend: kind,
            created: now_secs(),
            goal: None,
            quota: o.quota,
            opts: opts.clone(),
            size: None,
            fs: None,
        };
        let l = self.lock(name);
        let _g = l.lock().unwrap_or_else(|e| e.into_inner());
        let created = match kind {
            BackendKind::Local => {
                if o.goal.is_some() {
                    return Err(VolumeError::Unsupported(
                        "ReplicationGoal needs the moosefs backend (this volume would be local)".into(),
                    ));
                }
                if o.quota.is_some() {
                    return Err(VolumeError::Unsupported("quota needs the moosefs backend".into()));
                }
                if let Some(m) = &self.mfs {
                    let n = name.to_string();
                    if let Ok(true) = m.run("looking up the volume", move |v| v.exists(&n)) {
                        return Err(VolumeError::AlreadyExists(format!(
                            "volume {} exists on backend moosefs",
                            quote(name)
                        )));
                    }
                }
                if let Some(r) = &self.rbd {
                    if check_image_name(name).is_ok() {
                        if let Ok(Some(_)) = r.record(name) {
                            return Err(VolumeError::AlreadyExists(format!(
                                "volume {} exists on backend rbd",
                                quote(name)
                            )));
                        }
                    }
                }
                self.local.create(rec, &CreateTools::default())?
            }
            BackendKind::Rbd => {
                let r = self.rbd()?;
                if o.goal.is_some() {
                    return Err(VolumeError::Unsupported(
                        "ReplicationGoal needs the moosefs backend (this volume would be rbd: the pool's size sets the copies)".into(),
                    ));
                }
                if o.quota.is_some() {
                    return Err(VolumeError::Unsupported(
                        "quota needs the moosefs backend; an rbd volume takes -o size=".into(),
                    ));
                }
                check_image_name(name)?;
                if self.local.exists(name)? {
                    return Err(VolumeError::AlreadyExists(format!(
                        "volume {} exists on backend local",
                        quote(name)
                    )));
                }
                let size = o.size.unwrap_or(r.cfg.default_size);
                let fs_type =
                    o.fs.as_deref()
                        .and_then(FsType::parse)
                        .unwrap_or(r.cfg.default_fs);
                rec.size = Some(size);
                rec.fs = Some(fs_type.as_str().to_string());
                r.create(rec, size, fs_type)?
            }
            BackendKind::Moosefs => {
                let m = self.mfs()?;
                if o.quota.is_some() && m.cfg.quota_command.is_none() {
                    return Err(VolumeError::Unsupported(
                        "quota needs a quota_command in [volumes.moosefs]".into(),
                    ));
                }
                if self.local.exists(name)? {
                    return Err(VolumeError::AlreadyExists(format!(
                        "volume {} exists on backend local",
                        quote(name)
                    )));
                }
                rec.goal = o
                    .goal
                    .or_else(|| m.cfg.default_goal.clone())
                    .map(|g| g.to_string());
                let tools = CreateTools {
                    goal: Some(m.cfg.goal_command.clone()),
                    quota: m.cfg.quota_command.clone(),
                    timeout: self.cfg.timeout,
                };
                m.run("creating the volume", move |v| v.create(rec, &tools))?
            }
        };
        let rec = match created {
            Created::New(r) => {
                info!(volume = %name, settings = %describe(&r), "volume created");
                r
            }
            Created::Same(r) => {
                info!(volume = %name, "volume already exists with the same settings");
                r
            }
        };
        self.db.remember(&rec)
    }

    /// `/VolumeDriver.Remove`: refused while mounted on this host.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        validate_name(name)?;
        let l = self.lock(name);
        let _g = l.lock().unwrap_or_else(|e| e.into_inner());
        let counts = self.db.counts(name)?;
        if !counts.is_empty() {
            return Err(VolumeError::InUse(format!(
                "volume {} is mounted on this host at {} ({} mount ID(s)); stop the containers using it first",
                quote(name),
                self.mountpoint(name).display(),
                counts.len()
            )));
        }
        let loc = self.locate(name)?;
        let on_remove = self.cfg.on_remove;
        match loc.kind {
            BackendKind::Local => self.local.discard(name, on_remove)?,
            BackendKind::Moosefs => {
                let n = name.to_string();
                let lease = self.volume_lease()?;
                self.mfs()?.run("removing the volume", move |v| {
                    let claim = lease.as_ref().map(|l| check_remove(l, &n)).transpose()?;
                    v.discard(&n, on_remove)?;
                    if let Some(l) = &lease {
                        let _ = l.prune_dead(VOLUME_KIND, &n);
                        let _ = l.release(VOLUME_KIND, &n);
                    }
                    drop(claim);
                    Ok(())
                })?
            }
            BackendKind::Rbd => {
                let r = self.rbd()?;
                if r.attached(name) {
                    r.detach(name)?;
                }
                r.remove(name, on_remove == OnRemove::Trash)?
            }
        }
        let _ = fs::remove_dir(self.mountpoint(name));
        self.db.forget(name)?;
        info!(volume = %name, backend = %loc.kind, "volume removed");
        Ok(())
    }

    /// `/VolumeDriver.Mount`.
    pub fn mount(&self, name: &str, id: &str) -> Result<PathBuf, VolumeError> {
        validate_name(name)?;
        let l = self.lock(name);
        let _g = l.lock().unwrap_or_else(|e| e.into_inner());
        let mp = self.mountpoint(name);
        let mounted = is_mount_point(&mp);
        if mounted && self.db.total(name)? > 0 && !self.dead_mount(name, &mp) {
            // Already exposed here: no cluster access needed (works while the master is down).
            let total = self.db.add(name, id)?;
            debug!(volume = %name, id = %id, total, "mount counted");
            return Ok(mp);
        }
        let loc = self.locate(name)?;
        let total = self.db.add(name, id)?;
        if let Err(e) = self.bind(name, &loc, &mp, mounted) {
            let _ = self.db.release(name, id);
            if loc.kind == BackendKind::Moosefs && self.db.total(name).unwrap_or(1) == 0 {
                self.drop_reference(name);
            }
            return Err(e);
        }
        info!(volume = %name, id = %id, total, mountpoint = %mp.display(), "volume mounted");
        Ok(mp)
    }

    /// True when `mp` is a bind mount of a MooseFS volume whose `mfsmount` is gone (`ENOTCONN`,
    /// `ECONNABORTED`): it must be made again, or every container given this mountpoint would get "Transport
    /// endpoint is not connected".
    /// A mount that does not answer quickly (master down) counts as alive: nothing better can be made now.
    fn dead_mount(&self, name: &str, mp: &Path) -> bool {
        if let Some(r) = &self.rbd {
            if r.attached(name) {
                if r.alive(name) {
                    return false;
                }
                warn!(volume = %name, mountpoint = %mp.display(),
                    "volume mount is dead (its rbd-fuse or filesystem is gone): mounting it again");
                return true;
            }
        }
        let Some(m) = &self.mfs else { return false };
        if self.local.exists(name).unwrap_or(false) {
            return false;
        }
        if m.alive(mp, DEAD_MOUNT_WAIT) == Some(false) {
            warn!(volume = %name, mountpoint = %mp.display(),
                "volume mount is dead (its mfsmount is gone): mounting it again");
            return true;
        }
        false
    }

    fn bind(&self, name: &str, loc: &Located, mp: &Path, stale: bool) -> Result<(), VolumeError> {
        if stale {
            let _ = lamina_sys::mount::unmount(mp, true);
        }
        fs::create_dir_all(mp).map_err(|e| VolumeError::io(format!("creating {}", mp.display()), e))?;
        match loc.kind {
            BackendKind::Local => lamina_sys::mount::bind_mount(&loc.dir, mp, false)
                .map_err(|e| VolumeError::io(format!("mounting {}", loc.dir.display()), e)),
            BackendKind::Moosefs => {
                let (src, dst) = (loc.dir.clone(), mp.to_path_buf());
                // This host's reference in the volume lease comes first: a Remove on another host that lists
                // the holders after it refuses; one that claimed the removal before it makes this fail.
                let lease = self.volume_lease()?;
                let n = name.to_string();
                self.mfs()?.run("mounting the volume", move |_| {
                    if let Some(l) = &lease {
                        hold_for_mount(l, &n)?;
                    }
                    lamina_sys::mount::bind_mount(&src, &dst, false)
                        .map_err(|e| io_err(format!("mounting {}", src.display()), e))
                })
            }
            BackendKind::Rbd => self.bind_rbd(name, loc, mp),
        }
    }

    /// Locks the image for this host, attaches it, and binds its `data/` at `mp`; on failure nothing stays
    /// attached or locked.
    fn bind_rbd(&self, name: &str, loc: &Located, mp: &Path) -> Result<(), VolumeError> {
        let r = self.rbd()?;
        let fs_type = loc
            .rec
            .as_ref()
            .and_then(|r| r.fs.as_deref())
            .and_then(FsType::parse)
            .unwrap_or(r.cfg.default_fs);
        r.acquire(name)?;
        let done = r.attach(name, fs_type).and_then(|_| {
            lamina_sys::fault::point("volume.rbd.mount.attached")
                .and_then(|()| lamina_sys::mount::bind_mount(&loc.dir, mp, false))
                .map_err(|e| VolumeError::io(format!("mounting {}", loc.dir.display()), e))
        });
        if let Err(e) = done {
            if let Err(e2) = r.detach(name).and_then(|()| r.release(name)) {
                warn!(volume = %name, error = %e2, "cannot take down a failed mount");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Takes down the image of `name` on this host (after its bind mount is gone) and releases the lock.
    fn detach_rbd(&self, name: &str) -> Result<(), VolumeError> {
        let Some(r) = &self.rbd else { return Ok(()) };
        if !r.attached(name) {
            return Ok(());
        }
        r.detach(name)?;
        if let Err(e) = r.release(name) {
            warn!(volume = %name, error = %e, "cannot release the RBD lock; this host's next Mount, Unmount or Remove of it retries");
        }
        Ok(())
    }

    /// `/VolumeDriver.Unmount`: an ID that holds nothing is not an error.
    pub fn unmount(&self, name: &str, id: &str) -> Result<(), VolumeError> {
        validate_name(name)?;
        let l = self.lock(name);
        let _g = l.lock().unwrap_or_else(|e| e.into_inner());
        match self.db.release(name, id)? {
            None => {
                debug!(volume = %name, id = %id, "unmount of an id that holds nothing");
                Ok(())
            }
            Some(0) => {
                let mp = self.mountpoint(name);
                release_mount(&mp)?;
                self.detach_rbd(name)?;
                self.drop_reference(name);
                info!(volume = %name, id = %id, "volume unmounted");
                Ok(())
            }
            Some(total) => {
                debug!(volume = %name, id = %id, total, "unmount counted");
                Ok(())
            }
        }
    }

    /// `/VolumeDriver.Path`.
    pub fn path(&self, name: &str) -> Result<Option<PathBuf>, VolumeError> {
        validate_name(name)?;
        let mp = self.mountpoint(name);
        Ok((self.db.total(name)? > 0 && is_mount_point(&mp)).then_some(mp))
    }

    /// `/VolumeDriver.Get`: from the backend; from the cache (with a `State` row) while the cluster is
    /// unreachable, so that dockerd keeps its volumes across its own restarts.
    pub fn get(&self, name: &str) -> Result<VolumeView, VolumeError> {
        validate_name(name)?;
        let counts = self.db.counts(name)?;
        let mut status = BTreeMap::new();
        let total: u64 = counts.values().sum();
        status.insert("Mounts".to_string(), total.to_string());
        let mountpoint = (total > 0).then(|| self.mountpoint(name));
        let rec = if self.local.exists(name)? {
            let rec = self.local.record(name)?;
            status.insert("Backend".into(), "local".into());
            status.insert("Directory".into(), path_arg(&self.local.dir(name)));
            rec
        } else if self.rbd.is_some()
            && (self.mfs.is_none()
                || self
                    .db
                    .known(name)?
                    .is_some_and(|k| k.backend == BackendKind::Rbd))
        {
            return self.get_rbd(name, status, mountpoint);
        } else if let Some(m) = &self.mfs {
            let n = name.to_string();
            let getgoal = m.cfg.getgoal_command.clone();
            let timeout = self.cfg.timeout;
            let found = m.run("reading the volume", move |v| {
                if !v.exists(&n)? {
                    return Ok(None);
                }
                let rec = v.record(&n)?;
                let goal = match getgoal {
                    Some(cmd) => {
                        let out = cmd.run(&[("{path}", &path_arg(&v.dir(&n)))], timeout)?;
                        if out.success() {
                            parse_getgoal(&out.stdout).unwrap_or_else(|| "unknown".into())
                        } else {
                            format!("unknown ({})", out.summary())
                        }
                    }
                    None => "unknown".into(),
                };
                Ok(Some((rec, goal)))
            });
            match found {
                Ok(None) if self.rbd.is_some() => return self.get_rbd(name, status, mountpoint),
                Ok(None) => return Err(Self::not_found(name)),
                Ok(Some((rec, goal))) => {
                    status.insert("Backend".into(), "moosefs".into());
                    status.insert("ReplicationGoal".into(), goal);
                    status.insert("Directory".into(), path_arg(&m.vols.dir(name)));
                    status.insert(
                        "RemotePath".into(),
                        format!("{}/{name}", m.cfg.remote_path.trim_end_matches('/')),
                    );
                    rec
                }
                Err(e @ VolumeError::BackendUnavailable(_)) => match self.db.known(name)? {
                    Some(cached) if cached.backend == BackendKind::Moosefs => {
                        warn!(volume = %name, error = %e, "answering Get from the cache");
                        status.insert("Backend".into(), "moosefs".into());
                        status.insert("State".into(), e.to_string());
                        if let Some(g) = &cached.goal {
                            status.insert(
                                "ReplicationGoal".into(),
                                format!("{g} (requested; cluster unreachable)"),
                            );
                        }
                        return Ok(VolumeView {
                            name: name.to_string(),
                            mountpoint,
                            created_at: Some(rfc3339(cached.created)),
                            status,
                        });
                    }
                    _ => return Err(e),
                },
                Err(e) => return Err(e),
            }
        } else {
            return Err(Self::not_found(name));
        };
        if let Some(r) = &rec {
            if let Some(q) = r.quota {
                status.insert("Quota".into(), q.to_string());
            }
            self.db.remember(r)?;
        }
        Ok(VolumeView {
            name: name.to_string(),
            mountpoint,
            created_at: rec.as_ref().map(|r| rfc3339(r.created)),
            status,
        })
    }

    /// Get of a volume of the rbd backend: its record and lock from the pool; from the cache (with a `State`
    /// row) while the cluster is unreachable.
    fn get_rbd(
        &self,
        name: &str,
        mut status: BTreeMap<String, String>,
        mountpoint: Option<PathBuf>,
    ) -> Result<VolumeView, VolumeError> {
        let r = self.rbd()?;
        if check_image_name(name).is_err() {
            return Err(Self::not_found(name));
        }
        status.insert("Backend".into(), "rbd".into());
        status.insert("Image".into(), format!("{}/{}", r.cfg.pool, r.image(name)));
        match r.lookup(name) {
            Ok(Lookup::Found(rec)) => {
                if let Some(z) = rec.size {
                    status.insert("Size".into(), z.to_string());
                }
                if let Some(f) = &rec.fs {
                    status.insert("Filesystem".into(), f.clone());
                }
                match r.holder(name) {
                    Ok(Some(l)) => {
                        status.insert(
                            "MountedOn".into(),
                            l.host()
                                .map(str::to_string)
                                .unwrap_or_else(|| format!("{} ({})", l.locker, l.id)),
                        );
                    }
                    Ok(None) => {}
                    Err(e) => {
                        status.insert("MountedOn".into(), format!("unknown ({e})"));
                    }
                }
                self.db.remember(&rec)?;
                Ok(VolumeView {
                    name: name.to_string(),
                    mountpoint,
                    created_at: Some(rfc3339(rec.created)),
                    status,
                })
            }
            Ok(_) => Err(Self::not_found(name)),
            Err(e @ VolumeError::BackendUnavailable(_)) => match self.db.known(name)? {
                Some(cached) if cached.backend == BackendKind::Rbd => {
                    warn!(volume = %name, error = %e, "answering Get from the cache");
                    status.insert("State".into(), e.to_string());
                    Ok(VolumeView {
                        name: name.to_string(),
                        mountpoint,
                        created_at: Some(rfc3339(cached.created)),
                        status,
                    })
                }
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// `/VolumeDriver.List`: the local directory and the cluster directory (the cached cluster volumes
    /// while it is unreachable).
    pub fn list(&self) -> Result<Vec<VolumeView>, VolumeError> {
        let mounted = self.db.mounted()?;
        let mut out: BTreeMap<String, VolumeView> = BTreeMap::new();
        let view = |name: &str, created: Option<u64>| VolumeView {
            name: name.to_string(),
            mountpoint: mounted.contains_key(name).then(|| self.mountpoint(name)),
            created_at: created.map(rfc3339),
            status: BTreeMap::new(),
        };
        for n in self.local.names()? {
            let rec = self.local.record(&n).ok().flatten();
            out.insert(n.clone(), view(&n, rec.map(|r| r.created)));
        }
        if let Some(m) = &self.mfs {
            let listed = m.run("listing volumes", |v| {
                let mut found = Vec::new();
                for n in v.names()? {
                    let rec = v.record(&n).ok().flatten();
                    found.push((n, rec));
                }
                Ok(found)
            });
            match listed {
                Ok(found) => {
                    let names: std::collections::BTreeSet<&str> =
                        found.iter().map(|(n, _)| n.as_str()).collect();
                    for k in self.db.all_known()? {
                        if k.backend == BackendKind::Moosefs && !names.contains(k.name.as_str()) {
                            self.db.forget(&k.name)?;
                        }
                    }
                    for (n, rec) in &found {
                        if let Some(r) = rec {
                            self.db.remember(r)?;
                        }
                        out.entry(n.clone())
                            .or_insert_with(|| view(n, rec.as_ref().map(|r| r.created)));
                    }
                }
                Err(e @ VolumeError::BackendUnavailable(_)) => {
                    warn!(error = %e, "listing cached MooseFS volumes");
                    for k in self.db.all_known()? {
                        if k.backend == BackendKind::Moosefs {
                            out.entry(k.name.clone())
                                .or_insert_with(|| view(&k.name, Some(k.created)));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(r) = &self.rbd {
            match r.names() {
                Ok(names) => {
                    let set: std::collections::BTreeSet<&str> = names.iter().map(String::as_str).collect();
                    for k in self.db.all_known()? {
                        if k.backend == BackendKind::Rbd && !set.contains(k.name.as_str()) {
                            self.db.forget(&k.name)?;
                        }
                    }
                    for n in &names {
                        let created = match self.db.known(n)? {
                            Some(k) if k.backend == BackendKind::Rbd => Some(k.created),
                            _ => match r.lookup(n)? {
                                Lookup::Found(rec) => {
                                    self.db.remember(&rec)?;
                                    Some(rec.created)
                                }
                                // Not a volume (yet): a Create in progress or interrupted.
                                _ => continue,
                            },
                        };
                        out.entry(n.clone()).or_insert_with(|| view(n, created));
                    }
                }
                Err(e @ VolumeError::BackendUnavailable(_)) => {
                    warn!(error = %e, "listing cached RBD volumes");
                    for k in self.db.all_known()? {
                        if k.backend == BackendKind::Rbd {
                            out.entry(k.name.clone())
                                .or_insert_with(|| view(&k.name, Some(k.created)));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out.into_values().collect())
    }

    /// Re-creates missing bind mounts of counted volumes; detaches bind mounts nobody counts.
    fn reconcile(&self) {
        let mounted = match self.db.mounted() {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot read mount counts");
                return;
            }
        };
        for (name, total) in &mounted {
            let mp = self.mountpoint(name);
            let mounted = is_mount_point(&mp);
            if mounted && !self.dead_mount(name, &mp) {
                info!(volume = %name, total, "volume still mounted from before the restart");
                continue;
            }
            match self
                .locate(name)
                .and_then(|loc| self.bind(name, &loc, &mp, mounted))
            {
                Ok(()) => info!(volume = %name, total, "volume mounted again after the restart"),
                Err(e) => {
                    warn!(volume = %name, total, error = %e, "cannot mount a counted volume again; Mount will retry")
                }
            }
        }
        if let Some(r) = &self.rbd {
            for name in r.attached_names() {
                if mounted.contains_key(&name) {
                    continue;
                }
                warn!(volume = %name, "taking down an RBD image attached without a mount count");
                let _ = release_mount(&self.mountpoint(&name));
                if let Err(e) = self.detach_rbd(&name) {
                    warn!(volume = %name, error = %e, "cannot take down an uncounted RBD image");
                }
            }
        }
        let Ok(rd) = fs::read_dir(&self.cfg.mount_base) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if mounted.contains_key(&name) {
                continue;
            }
            let mp = e.path();
            if is_mount_point(&mp) {
                warn!(mountpoint = %mp.display(), "detaching a volume mount that no mount ID holds");
                let _ = lamina_sys::mount::unmount(&mp, true);
            }
            if validate_name(&name).is_ok() {
                let _ = fs::remove_dir(&mp);
            }
        }
    }

    /// Mount counts per ID of `name` (for status and tests).
    pub fn counts(&self, name: &str) -> Result<BTreeMap<String, u64>, VolumeError> {
        self.db.counts(name)
    }

    /// Unmounts lamina's cluster mount (volume bind mounts stay for running containers).
    pub fn shutdown(&self) {
        // The heartbeat stops first (it must not write below a detached mountpoint); the last one stays, so
        // this host's mounts keep blocking Remove elsewhere for one lease.
        drop(self.lease.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(m) = &self.mfs {
            m.shutdown();
        }
    }
}

fn is_mount_point(p: &Path) -> bool {
    lamina_sys::mount::is_mount_point(p).unwrap_or(false)
}

/// Unmounts a volume's mountpoint (detaching it if busy) and removes the empty directory.
fn release_mount(mp: &Path) -> Result<(), VolumeError> {
    if let Err(e) = lamina_sys::mount::unmount(mp, false) {
        debug!(mountpoint = %mp.display(), error = %e, "unmount failed, detaching");
        lamina_sys::mount::unmount(mp, true)
            .map_err(|e| VolumeError::io(format!("unmounting {}", mp.display()), e))?;
    }
    let _ = fs::remove_dir(mp);
    Ok(())
}
