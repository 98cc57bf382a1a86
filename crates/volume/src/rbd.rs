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

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::backend::Created;
use crate::command::{path_arg, run_argv, CommandOutput};
use crate::error::VolumeError;
use crate::meta::VolumeRecord;
use crate::name::quote;

/// The image-meta key holding a volume's record.
pub const RECORD_KEY: &str = "lamina.volume";
/// Prefix of lamina's advisory lock ids (`lamina:<host>`).
pub const LOCK_PREFIX: &str = "lamina:";

/// How images reach this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapMode {
    /// The kernel's rbd driver: `rbd device map` gives `/dev/rbdN`.
    Krbd,
    /// One `rbd-fuse` per image and a loop device over the file it exposes.
    Fuse,
    /// `krbd` when the kernel has rbd (`/sys/bus/rbd` exists), else `fuse`.
    Auto,
}

impl MapMode {
    /// Parses `krbd`, `fuse` or `auto`.
    pub fn parse(s: &str) -> Option<MapMode> {
        match s {
            "krbd" => Some(MapMode::Krbd),
            "fuse" => Some(MapMode::Fuse),
            "auto" => Some(MapMode::Auto),
            _ => None,
        }
    }

    /// Whether images are mapped with the kernel driver on this host.
    pub fn uses_krbd(self) -> bool {
        match self {
            MapMode::Krbd => true,
            MapMode::Fuse => false,
            MapMode::Auto => Path::new("/sys/bus/rbd").exists(),
        }
    }
}

/// A volume's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4.
    Ext4,
    /// xfs.
    Xfs,
}

impl FsType {
    /// Parses `ext4` or `xfs`.
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    /// `ext4` or `xfs`.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

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
    let ok = name.len() <= 128
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
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

/// How an image is attached on this host, persisted in `attached.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Attached {
    image: String,
    /// rbd-fuse's PID and its start time (field 22 of `/proc/PID/stat`), which tells it from a reused PID.
    fuse_pid: Option<u32>,
    fuse_start: Option<u64>,
    /// `/dev/loopN` or `/dev/rbdN`.
    device: Option<String>,
    krbd: bool,
}

/// The RBD backend of one lamina.
#[derive(Debug)]
pub struct Rbd {
    /// Settings.
    pub cfg: RbdConfig,
    timeout: Duration,
    dir: PathBuf,
    children: Mutex<HashMap<String, Child>>,
}

/// Classifies a failed `rbd` call.
pub fn classify(what: &str, pool: &str, out: &CommandOutput) -> VolumeError {
    let text = format!("{}\n{}", out.stderr, out.stdout);
    let summary = out.summary();
    let has = |s: &str| text.contains(s);
    if out.code == Some(110) || has("couldn't connect to the cluster") || has("(110)") || has("timed out") {
        VolumeError::BackendUnavailable(format!("the Ceph cluster is unreachable ({what}): {summary}"))
    } else if has("error opening pool") {
        VolumeError::BackendUnavailable(format!(
            "pool {} does not exist in the Ceph cluster ({what}): {summary}",
            quote(pool)
        ))
    } else if out.code == Some(122) || has("(122)") || has("quota exceeded") {
        VolumeError::NoSpace(format!(
            "pool {} is over its quota ({what}): {summary}",
            quote(pool)
        ))
    } else if out.code == Some(28) || has("(28)") {
        VolumeError::NoSpace(format!("the Ceph cluster is full ({what}): {summary}"))
    } else if out.code == Some(16) || has("(16)") || has("still has watchers") {
        VolumeError::InUse(format!("{what}: the image is busy (open on a host): {summary}"))
    } else {
        VolumeError::BackendUnavailable(format!("{what}: {summary}"))
    }
}

impl Rbd {
    /// Sets up; `state_dir` is lamina's volume directory (`<data root>/volumes`).
    pub fn new(cfg: RbdConfig, timeout: Duration, state_dir: &Path) -> Rbd {
        Rbd {
            cfg,
            timeout,
            dir: state_dir.join("rbd"),
            children: Mutex::new(HashMap::new()),
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
        self.vdir(name).join("fs")
    }

    /// The directory containers see: `data/` in the filesystem.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.fs_dir(name).join("data")
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.vdir(name).join("attached.json")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("rbd-fuse.log")
    }

    fn secs(&self) -> String {
        self.timeout.as_secs().max(1).to_string()
    }

    /// Cluster options of the `rbd` calls; rbd-fuse gets them without the OSD operation timeout (a slow OSD
    /// must not turn into I/O errors in a mounted filesystem).
    fn client_args(&self) -> Vec<String> {
        let t = self.secs();
        let mut v = self.fuse_args();
        v.extend(["--rados_osd_op_timeout".into(), t]);
        v
    }

    fn fuse_args(&self) -> Vec<String> {
        let t = self.secs();
        let mut v = self.identity_args();
        v.extend([
            "--client_mount_timeout".into(),
            t.clone(),
            "--rados_mon_op_timeout".into(),
            t,
        ]);
        v
    }

    /// The cluster's config file and the client id, which every Ceph tool is given.
    fn identity_args(&self) -> Vec<String> {
        vec![
            "-c".into(),
            path_arg(&self.cfg.ceph_conf),
            "--id".into(),
            self.cfg.client_id.clone(),
        ]
    }

    /// Runs `rbd ARGS` with the cluster timeouts and a process deadline.
    fn cli(&self, args: &[&str]) -> Result<CommandOutput, VolumeError> {
        let mut argv = vec![path_arg(&self.cfg.rbd)];
        argv.extend(self.client_args());
        argv.extend(args.iter().map(|s| s.to_string()));
        run_argv(&argv, self.timeout + Duration::from_secs(5))
    }

    /// `rbd ARGS`, classified on failure; returns stdout.
    fn cli_ok(&self, what: &str, args: &[&str]) -> Result<String, VolumeError> {
        let out = self.cli(args)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(self.fail(what, &out))
        }
    }

    /// Classifies a failed `rbd` call. An operation that timed out after the client had connected is what a
    /// full pool looks like (Ceph pauses writes to a pool over its quota, it does not fail them): the pool's
    /// flags tell that apart from OSDs that do not answer.
    fn fail(&self, what: &str, out: &CommandOutput) -> VolumeError {
        let e = classify(what, &self.cfg.pool, out);
        let connected = !out.stderr.contains("couldn't connect to the cluster")
            && !out.stderr.contains("monclient")
            && !out.stderr.contains("mon config");
        let timed_out = out.code == Some(110) || out.stderr.contains("(110)");
        if !(timed_out && connected) {
            return e;
        }
        match self.pool_flags() {
            Some(f) if f.iter().any(|x| x == "full_quota") => VolumeError::NoSpace(format!(
                "pool {} is over its quota ({what}: Ceph holds writes to it until it has room again)",
                quote(&self.cfg.pool)
            )),
            Some(f) if f.iter().any(|x| x == "full") => VolumeError::NoSpace(format!(
                "pool {} is full ({what}: Ceph holds writes to it until it has room again)",
                quote(&self.cfg.pool)
            )),
            _ => VolumeError::BackendUnavailable(format!(
                "the Ceph OSDs do not answer within {} s ({what}): {}",
                self.secs(),
                out.summary()
            )),
        }
    }

    /// The flags of the pool (`full`, `full_quota`, ...), from `ceph osd pool ls detail`.
    fn pool_flags(&self) -> Option<Vec<String>> {
        let mut argv = vec![path_arg(&self.cfg.ceph)];
        argv.extend(self.identity_args());
        argv.extend(["--connect-timeout".into(), self.secs()]);
        argv.extend(["osd", "pool", "ls", "detail", "--format", "json"].map(String::from));
        let out = run_argv(&argv, self.timeout + Duration::from_secs(5)).ok()?;
        if !out.success() {
            return None;
        }
        let pools: Vec<serde_json::Value> = serde_json::from_str(out.stdout.trim()).ok()?;
        let pool = pools
            .iter()
            .find(|p| p["pool_name"].as_str() == Some(self.cfg.pool.as_str()))?;
        Some(
            pool["flags_names"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect(),
        )
    }

    /// Names of the volumes in the pool (images with the prefix, complete or not).
    pub fn names(&self) -> Result<Vec<String>, VolumeError> {
        let out = self.cli_ok("listing the pool", &["ls", "--format", "json", &self.cfg.pool])?;
        let images: Vec<String> = serde_json::from_str(out.trim())
            .map_err(|e| VolumeError::BackendUnavailable(format!("rbd ls: unexpected output: {e}")))?;
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

    fn read_state(&self, name: &str) -> Option<Attached> {
        let b = fs::read(self.state_file(name)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn write_state(&self, name: &str, st: &Attached) -> Result<(), VolumeError> {
        let p = self.state_file(name);
        let tmp = p.with_extension("tmp");
        let bytes = serde_json::to_vec(st).unwrap_or_default();
        fs::write(&tmp, bytes)
            .and_then(|()| fs::File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &p))
            .map_err(|e| VolumeError::io(format!("writing {}", p.display()), e))
    }

    /// Whether `name` has anything attached on this host (a state file).
    pub fn attached(&self, name: &str) -> bool {
        self.state_file(name).exists()
    }

    /// Volumes with something attached on this host.
    pub fn attached_names(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join("attached.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }

    /// Whether the attachment of `name` is complete and its rbd-fuse (if any) still runs.
    pub fn alive(&self, name: &str) -> bool {
        let Some(st) = self.read_state(name) else {
            return false;
        };
        let fuse_ok =
            st.krbd || matches!((st.fuse_pid, st.fuse_start), (Some(p), Some(s)) if same_process(p, s));
        fuse_ok && lamina_sys::mount::is_mount_point(&self.fs_dir(name)).unwrap_or(false)
    }

    /// Maps `name`'s image on this host and mounts its filesystem at [`Rbd::fs_dir`]; the caller holds the
    /// lock. Anything left of an earlier attachment that is not alive is taken down first; on failure
    /// nothing stays attached.
    pub fn attach(&self, name: &str, fs_type: FsType) -> Result<PathBuf, VolumeError> {
        if self.alive(name) {
            return Ok(self.fs_dir(name));
        }
        if self.attached(name) {
            warn!(volume = %name, "taking down what an earlier attachment left");
            self.detach(name)?;
        }
        let t0 = Instant::now();
        let r = self.attach_new(name, fs_type);
        if let Err(e) = &r {
            warn!(volume = %name, error = %e, "attaching failed; taking it down");
            if let Err(e2) = self.detach(name) {
                warn!(volume = %name, error = %e2, "cannot take down a failed attachment");
            }
        } else {
            info!(volume = %name, image = %self.spec(name), ms = t0.elapsed().as_millis() as u64, "RBD image attached");
        }
        r
    }

    fn attach_new(&self, name: &str, fs_type: FsType) -> Result<PathBuf, VolumeError> {
        let dev = self.map_device(name)?;
        self.mount_fs(name, &dev, fs_type)?;
        Ok(self.fs_dir(name))
    }

    /// Mounts the filesystem on `dev` at [`Rbd::fs_dir`].
    fn mount_fs(&self, name: &str, dev: &str, fs_type: FsType) -> Result<(), VolumeError> {
        let mut argv: Vec<String> = vec!["mount".into(), "-t".into(), fs_type.as_str().into()];
        match fs_type {
            // Unwritten RBD extents read as zeros: the inode tables need no background zeroing.
            FsType::Ext4 => argv.extend(["-o".into(), "noinit_itable".into()]),
            // A copy of an image would carry the same UUID.
            FsType::Xfs => argv.extend(["-o".into(), "nouuid".into()]),
        }
        argv.push(dev.to_string());
        argv.push(path_arg(&self.fs_dir(name)));
        let out = run_argv(&argv, self.timeout)?;
        if !out.success() {
            return Err(VolumeError::BackendUnavailable(format!(
                "mounting {dev} ({}) of image {}: {}",
                fs_type.as_str(),
                self.spec(name),
                out.summary()
            )));
        }
        Ok(())
    }

    fn spawn_fuse(&self, image: &str, at: &Path) -> Result<Child, VolumeError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(|e| VolumeError::io(format!("opening {}", self.log().display()), e))?;
        let err = log.try_clone().map_err(|e| VolumeError::io("dup", e))?;
        let mut cmd = Command::new(&self.cfg.rbd_fuse);
        cmd.args(self.fuse_args())
            .args(["-p", &self.cfg.pool, "-r", image])
            .arg(at)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            // Its own process group: a signal to lamina's group does not stop the volumes in use.
            .process_group(0);
        cmd.spawn().map_err(|e| {
            VolumeError::BackendUnavailable(format!("cannot run {}: {e}", self.cfg.rbd_fuse.display()))
        })
    }

    /// Waits until rbd-fuse exposes the image file; fails (classified from its log) when it exits first.
    fn wait_for_file(&self, name: &str, file: &Path) -> Result<(), VolumeError> {
        let deadline = Instant::now() + self.timeout + Duration::from_secs(2);
        loop {
            if fs::metadata(file).is_ok_and(|m| m.is_file()) {
                return Ok(());
            }
            let exited = {
                let mut ch = self.children.lock().unwrap_or_else(|e| e.into_inner());
                match ch.get_mut(name).map(Child::try_wait) {
                    Some(Ok(Some(st))) => {
                        ch.remove(name);
                        Some(st)
                    }
                    _ => None,
                }
            };
            if let Some(st) = exited {
                let tail = last_lines(&self.log(), 3);
                let out = CommandOutput {
                    code: st.code(),
                    stdout: String::new(),
                    stderr: tail,
                };
                let e = classify("starting rbd-fuse", &self.cfg.pool, &out);
                return Err(match e {
                    VolumeError::BackendUnavailable(m) if out.stderr.contains("mon config") => {
                        VolumeError::BackendUnavailable(format!("the Ceph cluster is unreachable: {m}"))
                    }
                    e => e,
                });
            }
            if Instant::now() > deadline {
                return Err(VolumeError::BackendUnavailable(format!(
                    "rbd-fuse did not expose {} within {} s",
                    file.display(),
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts `name`'s filesystem, detaches its device, stops its rbd-fuse (by PID, checked against its
    /// start time) and removes the state; each step is skipped when already done.
    pub fn detach(&self, name: &str) -> Result<(), VolumeError> {
        let st = self.read_state(name).unwrap_or_default();
        let vdir = self.vdir(name);
        let fsdir = self.fs_dir(name);
        if lamina_sys::mount::is_mount_point(&fsdir).unwrap_or(false) {
            lamina_sys::mount::unmount(&fsdir, false)
                .map_err(|e| VolumeError::io(format!("unmounting {}", fsdir.display()), e))?;
        }
        if let Some(dev) = &st.device {
            if st.krbd {
                self.cli_ok("unmapping the image", &["device", "unmap", dev])?;
            } else if loop_backing(dev).is_some_and(|b| b.starts_with(vdir.join("fuse"))) {
                let out = run_argv(&["losetup".into(), "-d".into(), dev.clone()], self.timeout)?;
                if !out.success() {
                    return Err(VolumeError::BackendUnavailable(format!(
                        "detaching {dev}: losetup {}",
                        out.summary()
                    )));
                }
            }
        }
        let fuse = vdir.join("fuse");
        if lamina_sys::mount::is_mount_point(&fuse).unwrap_or(false) {
            if let Err(e) = lamina_sys::mount::unmount(&fuse, false) {
                warn!(mountpoint = %fuse.display(), error = %e, "unmounting rbd-fuse failed; detaching it");
                let _ = lamina_sys::mount::unmount(&fuse, true);
            }
        }
        self.stop_fuse(name, &st);
        let _ = fs::remove_file(self.state_file(name));
        for d in [&fsdir, &fuse, &vdir] {
            let _ = fs::remove_dir(d);
        }
        Ok(())
    }

    /// Waits for rbd-fuse to exit after its unmount (it closes the image first: about 1 s), then SIGTERM,
    /// then SIGKILL.
    fn stop_fuse(&self, name: &str, st: &Attached) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(mut c) = child {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            warn!(volume = %name, pid = c.id(), "rbd-fuse did not exit after its unmount: killing it");
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        let (Some(pid), Some(start)) = (st.fuse_pid, st.fuse_start) else {
            return;
        };
        // Not our child (started before a restart): its exit is seen in /proc.
        for (wait, sig) in [(5, None), (2, Some("-TERM")), (2, Some("-KILL"))] {
            if let Some(sig) = sig {
                if !same_process(pid, start) {
                    return;
                }
                warn!(volume = %name, pid, signal = sig, "stopping rbd-fuse");
                let _ = run_argv(
                    &["kill".into(), sig.into(), pid.to_string()],
                    Duration::from_secs(5),
                );
            }
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                if !same_process(pid, start) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
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
        let dev = self.map_device(name)?;
        let argv: Vec<String> = match fs_type {
            // Unwritten RBD extents read as zeros: nothing needs zeroing or discarding.
            FsType::Ext4 => vec![
                "mkfs.ext4".into(),
                "-q".into(),
                "-E".into(),
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1".into(),
                dev.clone(),
            ],
            FsType::Xfs => vec!["mkfs.xfs".into(), "-q".into(), "-K".into(), dev.clone()],
        };
        let out = run_argv(&argv, self.timeout * 3)?;
        if !out.success() {
            return Err(VolumeError::BackendUnavailable(format!(
                "{} on {dev}: {}",
                argv[0],
                out.summary()
            )));
        }
        self.mount_fs(name, &dev, fs_type)?;
        let fsdir = self.fs_dir(name);
        let data = fsdir.join("data");
        fs::create_dir(&data).map_err(|e| VolumeError::io(format!("creating {}", data.display()), e))?;
        lamina_sys::mount::syncfs(&fsdir)
            .and_then(|()| lamina_sys::fault::point("volume.rbd.create.formatted"))
            .map_err(|e| VolumeError::io(format!("syncing {}", fsdir.display()), e))
    }

    /// Maps the image on this host: `rbd device map`, or rbd-fuse and a loop device over its file (direct
    /// I/O: the page cache of the filesystem above is the only one). The state file is written as soon as
    /// there is something to find after a crash.
    fn map_device(&self, name: &str) -> Result<String, VolumeError> {
        let vdir = self.vdir(name);
        let fuse = vdir.join("fuse");
        fs::create_dir_all(&fuse).map_err(|e| VolumeError::io(format!("creating {}", fuse.display()), e))?;
        fs::create_dir_all(self.fs_dir(name))
            .map_err(|e| VolumeError::io(format!("creating {}", self.fs_dir(name).display()), e))?;
        let image = self.image(name);
        let mut st = Attached {
            image: image.clone(),
            ..Attached::default()
        };
        let dev = if self.cfg.map.uses_krbd() {
            st.krbd = true;
            self.write_state(name, &st)?;
            self.cli_ok("mapping the image", &["device", "map", &self.spec(name)])?
                .trim()
                .to_string()
        } else {
            // Written before the spawn too: after a crash right behind it the state names the directory whose
            // FUSE mount to take down (rbd-fuse exits by itself once it is unmounted).
            self.write_state(name, &st)?;
            let child = self.spawn_fuse(&image, &fuse)?;
            st.fuse_pid = Some(child.id());
            st.fuse_start = start_time(child.id());
            self.children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), child);
            self.write_state(name, &st)?;
            let file = fuse.join(&image);
            self.wait_for_file(name, &file)?;
            let out = run_argv(
                &[
                    "losetup".into(),
                    "--direct-io=on".into(),
                    "-f".into(),
                    "--show".into(),
                    path_arg(&file),
                ],
                self.timeout,
            )?;
            if !out.success() {
                return Err(VolumeError::BackendUnavailable(format!(
                    "attaching a loop device to {}: losetup {}",
                    file.display(),
                    out.summary()
                )));
            }
            out.stdout.trim().to_string()
        };
        st.device = Some(dev.clone());
        self.write_state(name, &st)?;
        Ok(dev)
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

/// Start time (clock ticks since boot, field 22 of `/proc/PID/stat`) of a live, non-zombie process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm field: state is field 3, start time field 22.
    if matches!(f.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// True while `pid` is the process that started at `start`.
fn same_process(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// The backing file of a loop device (`/dev/loopN`), from sysfs.
fn loop_backing(dev: &str) -> Option<PathBuf> {
    let n = dev.strip_prefix("/dev/")?;
    let s = fs::read_to_string(format!("/sys/block/{n}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end()))
}

fn last_lines(p: &Path, n: usize) -> String {
    let text = fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stderr: &str) -> CommandOutput {
        CommandOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn rbd_errors_are_classed() {
        for (what, pool, code, stderr, class) in [
            (
                "listing the pool",
                "rbd",
                110,
                "monclient(hunting): authenticate timed out after 3\nrbd: couldn't connect to the cluster!\nrbd: listing images failed: (110) Connection timed out",
                "backend unavailable: the Ceph cluster is unreachable",
            ),
            (
                "x",
                "nopool",
                2,
                "rbd: error opening pool 'nopool': (2) No such file or directory",
                "backend unavailable: pool \"nopool\" does not exist",
            ),
            (
                "creating the image",
                "rbd",
                122,
                "rbd: create error: (122) Disk quota exceeded",
                "no space: pool \"rbd\" is over its quota",
            ),
            (
                "removing the image",
                "rbd",
                16,
                "rbd: error: image still has watchers",
                "in use: ",
            ),
        ] {
            let e = classify(what, pool, &out(code, stderr)).to_string();
            assert!(e.starts_with(class), "{e}");
        }
    }

    #[test]
    fn image_names_and_modes() {
        for ok in ["v1", "a.b-c_d", "9"] {
            check_image_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a b", "a@b", "é", &"x".repeat(129)] {
            assert!(check_image_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(MapMode::parse("fuse"), Some(MapMode::Fuse));
        assert!(!MapMode::Fuse.uses_krbd());
        assert!(MapMode::Krbd.uses_krbd());
        assert_eq!(MapMode::Auto.uses_krbd(), Path::new("/sys/bus/rbd").exists());
        assert_eq!(FsType::parse("xfs"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("btrfs"), None);
        let l = ImageLock {
            id: "lamina:h2".into(),
            locker: "client.1".into(),
            address: String::new(),
        };
        assert_eq!(l.host(), Some("h2"));
    }

    #[test]
    fn process_identity() {
        let me = std::process::id();
        let s = start_time(me).unwrap();
        assert!(same_process(me, s));
        assert!(!same_process(me, s + 1));
    }
}
