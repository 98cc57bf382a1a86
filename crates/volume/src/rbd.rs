//! The RBD backend: a volume is an RBD image holding one filesystem (ext4 or xfs), mounted on one host at a
//! time.
//!
//! In the pool (the shared truth, seen by every host):
//!
//! ```text
//! <pool>/<image_prefix><name>          the image; its filesystem's root holds data/ (what containers see)
//!   image-meta lamina.volume           its VolumeRecord (JSON), written last at Create (marks it complete)
//!   advisory lock "lamina:<host>"      held by the host that has it mounted (and during Create)
//! ```
//!
//! On this host, below `<state_dir>/rbd/<name>/` while the volume is mounted here:
//!
//! ```text
//! fuse/            rbd-fuse's mountpoint: the image as the file fuse/<image> (map = "fuse")
//! fs/              the image's filesystem (from the loop device over fuse/<image>, or /dev/rbdN)
//! attached.json    the rbd-fuse PID and start time and the device, to find and stop them after a restart
//! ```
//!
//! and `fs/data` is bind-mounted at `<mount_base>/<name>` by the manager. Every `rbd` call runs with the
//! cluster timeouts (`client_mount_timeout`, `rados_mon_op_timeout`, `rados_osd_op_timeout`) set to the
//! configured deadline and a process deadline a little longer, so an unreachable cluster is a classed error
//! well within dockerd's timeouts.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lamina_rbd::Cluster;
pub use lamina_rbd::{FsType, MapMode};
use serde::Deserialize;
use tracing::warn;

use crate::backend::Created;
use crate::error::VolumeError;
use crate::meta::VolumeRecord;
use crate::name::quote;

/// The image-meta key holding a volume's record.
pub const RECORD_KEY: &str = "lamina.volume";
/// Prefix of lamina's advisory lock ids (`lamina:<host>`).
pub const LOCK_PREFIX: &str = "lamina:";

/// Settings of the RBD backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdConfig {
    /// The Ceph configuration file (`-c`).
    pub ceph_conf: PathBuf,
    /// The client id (`--id`, `admin` for `client.admin`).
    pub client_id: String,
    /// The pool holding the images.
    pub pool: String,
    /// Image name = prefix + volume name.
    pub image_prefix: String,
    /// Size of volumes created without `-o size=`, in bytes.
    pub default_size: u64,
    /// Filesystem of volumes created without `-o fs=`.
    pub default_fs: FsType,
    /// How images reach this host.
    pub map: MapMode,
    /// This host's name in lock ids (`lamina:<host>`): unique per host sharing the pool.
    pub host_id: String,
    /// The `rbd` program.
    pub rbd: PathBuf,
    /// The `rbd-fuse` program.
    pub rbd_fuse: PathBuf,
    /// The `ceph` program (asked for the pool's flags when an operation times out).
    pub ceph: PathBuf,
}

/// Whether `name` can be part of an image name (and of rbd-fuse's file name): letters, digits, `_`, `.`,
/// `-`, starting with a letter or digit.
pub fn check_image_name(name: &str) -> Result<(), VolumeError> {
    if lamina_rbd::is_image_name(name) {
        Ok(())
    } else {
        Err(VolumeError::InvalidArgument(format!(
            "volume name {} cannot name an RBD image: the rbd backend takes 1-128 letters, digits, '_', '.' and '-', starting with a letter or digit",
            quote(name)
        )))
    }
}

/// An advisory lock on an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageLock {
    /// The lock id (`lamina:<host>` for lamina's).
    pub id: String,
    /// The client entity that took it (`client.4155`).
    pub locker: String,
    /// Its address.
    #[serde(default)]
    pub address: String,
}

impl ImageLock {
    /// The host named in a lamina lock id.
    pub fn host(&self) -> Option<&str> {
        self.id.strip_prefix(LOCK_PREFIX)
    }
}

/// What `image-meta get` found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// No such image.
    Missing,
    /// The image exists without a record (a Create in progress, or interrupted).
    Unrecorded,
    /// A complete volume.
    Found(VolumeRecord),
}

/// The RBD backend of one lamina.
#[derive(Debug)]
pub struct Rbd {
    /// Settings.
    pub cfg: RbdConfig,
    timeout: Duration,
    dir: PathBuf,
    client: lamina_rbd::Rbd,
}

impl Rbd {
    /// Sets up; `state_dir` is lamina's volume directory (`<data root>/volumes`).
    pub fn new(cfg: RbdConfig, timeout: Duration, state_dir: &Path) -> Rbd {
        let dir = state_dir.join("rbd");
        let cluster = Cluster {
            ceph_conf: cfg.ceph_conf.clone(),
            client_id: cfg.client_id.clone(),
            pool: cfg.pool.clone(),
            map: cfg.map,
            rbd: cfg.rbd.clone(),
            rbd_fuse: cfg.rbd_fuse.clone(),
            ceph: cfg.ceph.clone(),
        };
        Rbd {
            client: lamina_rbd::Rbd::new(cluster, timeout, &dir.join("rbd-fuse.log")),
            cfg,
            timeout,
            dir,
        }
    }

    /// The image of `name`.
    pub fn image(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.image_prefix)
    }

    fn spec(&self, name: &str) -> String {
        format!("{}/{}", self.cfg.pool, self.image(name))
    }

    /// This host's lock id.
    pub fn lock_id(&self) -> String {
        format!("{LOCK_PREFIX}{}", self.cfg.host_id)
    }

    fn vdir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where the filesystem of `name` is mounted on this host.
    pub fn fs_dir(&self, name: &str) -> PathBuf {
        lamina_rbd::Rbd::fs_dir(&self.vdir(name))
    }

    /// The directory containers see: `data/` in the filesystem.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.fs_dir(name).join("data")
    }

    /// Runs `rbd ARGS` with the cluster timeouts and a process deadline.
    fn cli(&self, args: &[&str]) -> Result<lamina_rbd::CommandOutput, VolumeError> {
        Ok(self.client.cli(args)?)
    }

    /// `rbd ARGS`, classified on failure; returns stdout.
    fn cli_ok(&self, what: &str, args: &[&str]) -> Result<String, VolumeError> {
        Ok(self.client.cli_ok(what, args)?)
    }

    fn fail(&self, what: &str, out: &lamina_rbd::CommandOutput) -> VolumeError {
        self.client.fail(what, out).into()
    }

    /// Names of the volumes in the pool (images with the prefix, complete or not).
    pub fn names(&self) -> Result<Vec<String>, VolumeError> {
        let images = self.client.images()?;
        let mut v: Vec<String> = images
            .iter()
            .filter_map(|i| i.strip_prefix(&self.cfg.image_prefix))
            .filter(|n| crate::name::validate_name(n).is_ok())
            .map(str::to_string)
            .collect();
        v.sort();
        Ok(v)
    }

    /// The record of `name`.
    pub(crate) fn lookup(&self, name: &str) -> Result<Lookup, VolumeError> {
        let out = self.cli(&["image-meta", "get", &self.spec(name), RECORD_KEY])?;
        if out.success() {
            return VolumeRecord::decode(out.stdout.trim().as_bytes()).map(Lookup::Found);
        }
        let text = &out.stderr;
        if text.contains("error opening image") && text.contains("(2)") {
            Ok(Lookup::Missing)
        } else if text.contains("(2)") && !text.contains("error opening pool") {
            Ok(Lookup::Unrecorded)
        } else {
            Err(self.fail("reading the volume record", &out))
        }
    }

    /// The record of `name`, if it is a complete volume.
    pub fn record(&self, name: &str) -> Result<Option<VolumeRecord>, VolumeError> {
        Ok(match self.lookup(name)? {
            Lookup::Found(r) => Some(r),
            _ => None,
        })
    }

    /// The advisory lock on `name`'s image, if any.
    pub fn holder(&self, name: &str) -> Result<Option<ImageLock>, VolumeError> {
        let out = self.cli_ok(
            "reading the image lock",
            &["lock", "ls", "--format", "json", &self.spec(name)],
        )?;
        let locks: Vec<ImageLock> = serde_json::from_str(out.trim())
            .map_err(|e| VolumeError::BackendUnavailable(format!("rbd lock ls: unexpected output: {e}")))?;
        Ok(locks.into_iter().next())
    }

    fn held_elsewhere(&self, name: &str, l: &ImageLock) -> VolumeError {
        let who = match l.host() {
            Some(h) => format!("host {}", quote(h)),
            None => "a client other than lamina".to_string(),
        };
        VolumeError::InUse(format!(
            "volume {} is mounted on {who} (RBD lock {} on {} held by {} at {}); unmount it there first",
            quote(name),
            quote(&l.id),
            self.spec(name),
            l.locker,
            l.address
        ))
    }

    /// Takes this host's lock on `name`'s image (kept if already ours); refused with `in use` naming the
    /// holder when another host has it.
    pub fn acquire(&self, name: &str) -> Result<(), VolumeError> {
        match self.holder(name)? {
            Some(l) if l.id == self.lock_id() => return Ok(()),
            Some(l) => return Err(self.held_elsewhere(name, &l)),
            None => {}
        }
        let out = self.cli(&["lock", "add", &self.spec(name), &self.lock_id()])?;
        if out.success() {
            return Ok(());
        }
        if matches!(out.code, Some(16) | Some(17)) {
            // Another host took it in between.
            if let Some(l) = self.holder(name)? {
                if l.id != self.lock_id() {
                    return Err(self.held_elsewhere(name, &l));
                }
                return Ok(());
            }
        }
        Err(self.fail("locking the image", &out))
    }

    /// Releases this host's lock on `name`'s image, if held.
    pub fn release(&self, name: &str) -> Result<(), VolumeError> {
        match self.holder(name)? {
            Some(l) if l.id == self.lock_id() => {
                // The locker is the `rbd lock add` call that exited long ago: nothing to blocklist.
                self.cli_ok(
                    "unlocking the image",
                    &[
                        "--rbd_blocklist_on_break_lock=false",
                        "lock",
                        "rm",
                        &self.spec(name),
                        &l.id,
                        &l.locker,
                    ],
                )?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether `name` has anything attached on this host (a state file).
    pub fn attached(&self, name: &str) -> bool {
        lamina_rbd::Rbd::attached(&self.vdir(name))
    }

    /// Volumes with something attached on this host.
    pub fn attached_names(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join(lamina_rbd::STATE_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }

    /// Whether the attachment of `name` is complete and its rbd-fuse (if any) still runs.
    pub fn alive(&self, name: &str) -> bool {
        lamina_rbd::Rbd::alive(&self.vdir(name))
    }

    /// Maps `name`'s image on this host and mounts its filesystem at [`Rbd::fs_dir`]; the caller holds the
    /// lock. Anything left of an earlier attachment that is not alive is taken down first; on failure
    /// nothing stays attached.
    pub fn attach(&self, name: &str, fs_type: FsType) -> Result<PathBuf, VolumeError> {
        Ok(self
            .client
            .attach(&self.vdir(name), &self.image(name), fs_type, false)?)
    }

    /// Unmounts `name`'s filesystem, detaches its device, stops its rbd-fuse (by PID, checked against its
    /// start time) and removes the state; each step is skipped when already done.
    pub fn detach(&self, name: &str) -> Result<(), VolumeError> {
        Ok(self.client.detach(&self.vdir(name))?)
    }

    /// Creates the image, its filesystem (with `data/` at its root) and, last, its record. A Create that
    /// finds the image with the same record succeeds; an image without a record (a Create interrupted on
    /// this host, or unlocked) is removed and made again.
    pub(crate) fn create(
        &self,
        rec: VolumeRecord,
        size: u64,
        fs_type: FsType,
    ) -> Result<Created, VolumeError> {
        let name = rec.name.clone();
        let spec = self.spec(&name);
        for _ in 0..2 {
            let out = self.cli(&["create", "--size", &format!("{size}B"), &spec])?;
            if out.success() {
                return match self.make(&rec, fs_type) {
                    Ok(()) => Ok(Created::New(rec)),
                    Err(e) => {
                        self.undo_create(&name);
                        Err(e)
                    }
                };
            }
            if out.code != Some(17) {
                return Err(self.fail("creating the image", &out));
            }
            // The image exists: wait (briefly) for its record, written last by whoever creates it. Whoever
            // creates it takes its lock right after `rbd create`; an image without a record that is unlocked
            // after a second, or locked by this host (whose Creates of one name are serialised), is what an
            // interrupted Create left.
            let started = Instant::now();
            let deadline = started + self.timeout;
            loop {
                match self.lookup(&name)? {
                    Lookup::Found(existing) if existing.same_request(&rec) => {
                        return Ok(Created::Same(existing))
                    }
                    Lookup::Found(existing) => {
                        return Err(VolumeError::AlreadyExists(format!(
                            "volume {} exists with other settings ({})",
                            quote(&name),
                            crate::backend::describe(&existing)
                        )))
                    }
                    Lookup::Missing => break,
                    Lookup::Unrecorded => {}
                }
                let interrupted = match self.holder(&name)? {
                    Some(l) if l.id == self.lock_id() => true,
                    Some(l) if Instant::now() >= deadline => {
                        return Err(VolumeError::AlreadyExists(format!(
                            "image {spec} exists without lamina's record and is locked by {} ({}): a Create in progress there, or one interrupted (then remove the image with `rbd rm`)",
                            l.host().map(|h| format!("host {}", quote(h))).unwrap_or_else(|| "another client".into()),
                            l.id
                        )))
                    }
                    Some(_) => false,
                    None => started.elapsed() >= Duration::from_secs(1),
                };
                if interrupted {
                    warn!(volume = %name, image = %spec, "removing an image left by an interrupted Create");
                    self.undo_create(&name);
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Err(VolumeError::BackendUnavailable(format!(
            "volume {}: the image keeps appearing and vanishing: concurrent Creates keep failing",
            quote(&name)
        )))
    }

    fn make(&self, rec: &VolumeRecord, fs_type: FsType) -> Result<(), VolumeError> {
        let name = &rec.name;
        self.acquire(name)?;
        let made = self.format(name, fs_type);
        let detached = self.detach(name);
        made?;
        detached?;
        lamina_sys::fault::point("volume.rbd.create.record")
            .map_err(|e| VolumeError::io("writing the volume record", e))?;
        let json = String::from_utf8(rec.encode()).unwrap_or_default();
        self.cli_ok(
            "writing the volume record",
            &["image-meta", "set", &self.spec(name), RECORD_KEY, &json],
        )?;
        self.release(name)
    }

    fn format(&self, name: &str, fs_type: FsType) -> Result<(), VolumeError> {
        let fsdir = self.client.format(&self.vdir(name), &self.image(name), fs_type)?;
        let data = fsdir.join("data");
        fs::create_dir(&data).map_err(|e| VolumeError::io(format!("creating {}", data.display()), e))?;
        lamina_sys::mount::syncfs(&fsdir)
            .and_then(|()| lamina_sys::fault::point("volume.rbd.create.formatted"))
            .map_err(|e| VolumeError::io(format!("syncing {}", fsdir.display()), e))
    }

    /// Takes a half-made volume away: detached, unlocked, image removed (each best effort).
    fn undo_create(&self, name: &str) {
        let _ = self.detach(name);
        let _ = self.release(name);
        if let Err(e) = self.cli_ok("removing the image", &["rm", "--no-progress", &self.spec(name)]) {
            warn!(volume = %name, error = %e, "cannot remove a half-made image");
        }
    }

    /// Removes `name`'s image (`rbd rm`), or with `trash` moves it to the pool's trash (`rbd trash mv`:
    /// listed by `rbd trash ls`, restorable with `rbd trash restore`): refused while another host holds its lock
    /// or has it open; this host's own leftover lock is released first.
    pub fn remove(&self, name: &str, trash: bool) -> Result<(), VolumeError> {
        match self.holder(name)? {
            Some(l) if l.id == self.lock_id() => self.release(name)?,
            Some(l) => return Err(self.held_elsewhere(name, &l)),
            None => {}
        }
        let spec = self.spec(name);
        let out = if trash {
            self.cli(&["trash", "mv", &spec])?
        } else {
            self.cli(&["rm", "--no-progress", &spec])?
        };
        if out.success() {
            return Ok(());
        }
        if out.stderr.contains("(2)") && !out.stderr.contains("error opening pool") {
            return Err(VolumeError::NotFound(format!(
                "volume {} does not exist",
                quote(name)
            )));
        }
        Err(self.fail("removing the image", &out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_and_locks() {
        for ok in ["v1", "a.b-c_d", "9"] {
            check_image_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a b", "a@b", "é", &"x".repeat(129)] {
            assert!(check_image_name(bad).is_err(), "{bad:?}");
        }
        let l = ImageLock {
            id: "lamina:h2".into(),
            locker: "client.1".into(),
            address: String::new(),
        };
        assert_eq!(l.host(), Some("h2"));
    }
}
