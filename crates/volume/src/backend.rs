//! Where volumes live: a directory of volume directories, on the local disk or on a MooseFS mount.
//!
//! Both backends share one layout below their root:
//!
//! ```text
//! <root>/<name>/               the volume's data (what containers see)
//! <root>/.lamina/<name>.json   its VolumeRecord, written last at Create (marks it complete)
//! <root>/.lamina/trash/        removed volumes (deleted at once with on_remove = "delete")
//! ```
//!
//! For MooseFS, `<root>` is `<lamina's mfsmount mountpoint>/<remote path>`, and the directory *is* the shared
//! truth: every host lists and creates there, and `mkdir` of `<root>/<name>` decides which of two concurrent
//! Creates wins. Every operation on the cluster first checks that the master accepts TCP connections, then
//! runs on a helper thread with a deadline: a FUSE call on a mount whose master is gone blocks for minutes
//! (measured: about 130 s), far beyond dockerd's timeouts.

use std::fs::{self, OpenOptions};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use lamina_sys::fault;
use lamina_sys::fs::errno;
use tracing::{info, warn};

use crate::command::{path_arg, CommandTemplate};
use crate::error::VolumeError;
use crate::meta::VolumeRecord;
use crate::name::{quote, validate_name};
use crate::options::Goal;

/// Directory next to the volumes holding lamina's records and trash.
pub const META_DIR: &str = ".lamina";

/// How a removed volume's data is disposed of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRemove {
    /// Deleted.
    Delete,
    /// Moved to `<root>/.lamina/trash/<name>.<unix-nanos>` and kept until an administrator deletes it.
    Trash,
}

/// Settings of the MooseFS (or LizardFS) backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MooseFsConfig {
    /// Master host.
    pub master_host: String,
    /// Master client port (MooseFS: 9421).
    pub master_port: u16,
    /// Cluster path mounted by lamina's mfsmount (`-S`).
    pub subfolder: String,
    /// Path of the volumes directory inside the mounted subfolder.
    pub remote_path: String,
    /// Extra `-o` options for mfsmount.
    pub mount_options: Vec<String>,
    /// The mount program.
    pub mfsmount: PathBuf,
    /// Where lamina mounts the cluster.
    pub mountpoint: PathBuf,
    /// Sets a goal: `{goal}`, `{path}`.
    pub goal_command: CommandTemplate,
    /// Reports the goal in effect: `{path}`; output `PATH: GOAL`.
    pub getgoal_command: Option<CommandTemplate>,
    /// Sets a quota: `{size}` (bytes), `{path}`.
    pub quota_command: Option<CommandTemplate>,
    /// Goal of volumes created without `ReplicationGoal`.
    pub default_goal: Option<Goal>,
}

/// True for the errors of a FUSE mount whose daemon is gone: `ENOTCONN`, or `ECONNABORTED` (what this
/// kernel, 6.18, answers after `mfsmount` was killed).
pub(crate) fn dead_fuse(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

/// Maps an I/O error on the cluster: a dead FUSE connection is "backend unavailable".
pub(crate) fn io_err(ctx: String, e: io::Error) -> VolumeError {
    if dead_fuse(&e) {
        VolumeError::BackendUnavailable(format!("{ctx}: the MooseFS mount is not connected"))
    } else {
        VolumeError::io(ctx, e)
    }
}

/// A directory of volumes.
#[derive(Debug, Clone)]
pub struct VolumeDir {
    /// The directory holding the volume directories.
    pub root: PathBuf,
}

/// What a Create found or made.
#[derive(Debug)]
pub(crate) enum Created {
    /// Made by this call.
    New(VolumeRecord),
    /// Already there with the same settings (another host, or a retry).
    Same(VolumeRecord),
}

/// Tools applied at Create on the cluster.
#[derive(Debug, Clone, Default)]
pub(crate) struct CreateTools {
    pub goal: Option<CommandTemplate>,
    pub quota: Option<CommandTemplate>,
    pub timeout: Duration,
}

impl VolumeDir {
    /// The data directory of `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join(META_DIR).join(format!("{name}.json"))
    }

    /// Creates the root and `.lamina/trash`.
    pub fn prepare(&self) -> Result<(), VolumeError> {
        let trash = self.root.join(META_DIR).join("trash");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&trash)
            .map_err(|e| io_err(format!("creating {}", trash.display()), e))
    }

    /// Deletes temporary records (`.lamina/.tmp-*`) older than `min_age`: what a Create killed between
    /// writing its record and renaming it into place left behind. The local directory belongs to one lamina
    /// (the data root is locked), so it sweeps them all at start; a shared cluster directory only sweeps old
    /// ones, another host may be writing one right now.
    pub fn sweep_temporaries(&self, min_age: Duration) {
        let meta = self.root.join(META_DIR);
        let Ok(rd) = fs::read_dir(&meta) else { return };
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
            if old {
                match fs::remove_file(e.path()) {
                    Ok(()) => info!(file = %e.path().display(), "removed an interrupted volume record"),
                    Err(err) => {
                        warn!(file = %e.path().display(), error = %err, "removing a temporary record")
                    }
                }
            }
        }
    }

    /// Whether `name` exists (as a directory).
    pub fn exists(&self, name: &str) -> Result<bool, VolumeError> {
        let p = self.dir(name);
        match fs::symlink_metadata(&p) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(format!("stat {}", p.display()), e)),
        }
    }

    /// The record of `name`, if written.
    pub fn record(&self, name: &str) -> Result<Option<VolumeRecord>, VolumeError> {
        let p = self.record_path(name);
        match fs::read(&p) {
            Ok(b) => VolumeRecord::decode(&b).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("reading {}", p.display()), e)),
        }
    }

    fn write_record(&self, rec: &VolumeRecord) -> Result<(), VolumeError> {
        let final_path = self.record_path(&rec.name);
        let tmp = self.root.join(META_DIR).join(format!(
            ".tmp-{}-{}-{}",
            rec.name,
            std::process::id(),
            crate::time::now_nanos()
        ));
        // Synced before the rename: after a power cut the record is either absent or complete.
        fault::point("volume.create.write")
            .and_then(|()| {
                let mut f = fs::File::create(&tmp)?;
                io::Write::write_all(&mut f, &rec.encode())?;
                f.sync_all()
            })
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err(format!("writing {}", tmp.display()), e)
            })?;
        // Renamed, then the directory synced: the record is on disk before Create answers.
        fault::point("volume.create.rename")
            .and_then(|()| fs::rename(&tmp, &final_path))
            .and_then(|()| fs::File::open(self.root.join(META_DIR))?.sync_all())
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err(
                    format!("renaming {} to {}", tmp.display(), final_path.display()),
                    e,
                )
            })
    }

    /// Names of the volume directories (entries that are not directories or not valid names are skipped).
    pub fn names(&self) -> Result<Vec<String>, VolumeError> {
        let mut out = Vec::new();
        let rd =
            fs::read_dir(&self.root).map_err(|e| io_err(format!("listing {}", self.root.display()), e))?;
        for e in rd {
            let e = e.map_err(|e| io_err(format!("listing {}", self.root.display()), e))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Creates `rec.name`; the first `mkdir` wins, a loser compares settings with the winner's record.
    pub(crate) fn create(&self, rec: VolumeRecord, tools: &CreateTools) -> Result<Created, VolumeError> {
        let name = rec.name.clone();
        let dir = self.dir(&name);
        for _ in 0..3 {
            let made = fault::point("volume.create.mkdir")
                .and_then(|()| fs::DirBuilder::new().mode(0o755).create(&dir));
            match made {
                Ok(()) => {
                    // The new name must be on disk before the record that makes it a volume (a power cut
                    // keeps a synced record but not an unsynced mkdir).
                    if let Err(e) = sync_dir(&self.root) {
                        let _ = fs::remove_dir_all(&dir);
                        return Err(io_err(format!("syncing {}", self.root.display()), e));
                    }
                    if let Err(e) = self.finish(&rec, tools) {
                        // Not left behind half-made.
                        let _ = fs::remove_dir_all(&dir);
                        let _ = fs::remove_file(self.record_path(&name));
                        return Err(e);
                    }
                    return Ok(Created::New(rec));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Wait (briefly) for the winner to finish; it writes the record last.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut vanished = false;
                    loop {
                        if let Some(existing) = self.record(&name)? {
                            if existing.same_request(&rec) {
                                return Ok(Created::Same(existing));
                            }
                            return Err(VolumeError::AlreadyExists(format!(
                                "volume {} exists with other settings ({})",
                                quote(&name),
                                describe(&existing)
                            )));
                        }
                        if !self.exists(&name)? {
                            vanished = true;
                            break;
                        }
                        if Instant::now() > deadline {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if vanished {
                        continue; // the winner failed and cleaned up: try again
                    }
                    // A directory made by someone else (another tool): adopt it as is, if nothing was asked.
                    if rec.opts.is_empty() {
                        let mut adopted = rec.clone();
                        adopted.goal = None;
                        return Ok(Created::Same(adopted));
                    }
                    return Err(VolumeError::AlreadyExists(format!(
                        "directory {} exists without lamina's record; it is listed as a volume but its settings are unknown",
                        dir.display()
                    )));
                }
                Err(e) => return Err(io_err(format!("creating {}", dir.display()), e)),
            }
        }
        Err(VolumeError::BackendUnavailable(format!(
            "volume {} keeps appearing and vanishing: concurrent Creates keep failing",
            quote(&name)
        )))
    }

    fn finish(&self, rec: &VolumeRecord, tools: &CreateTools) -> Result<(), VolumeError> {
        let path = path_arg(&self.dir(&rec.name));
        if let (Some(goal), Some(cmd)) = (&rec.goal, &tools.goal) {
            let out = cmd.run(&[("{goal}", goal), ("{path}", &path)], tools.timeout)?;
            if !out.success() {
                return Err(VolumeError::InvalidArgument(format!(
                    "the goal command refused ReplicationGoal {} for volume {}: `{}` {}",
                    quote(goal),
                    quote(&rec.name),
                    cmd.build(&[("{goal}", goal), ("{path}", &path)]).join(" "),
                    out.summary()
                )));
            }
        }
        if let (Some(size), Some(cmd)) = (rec.quota, &tools.quota) {
            let size = size.to_string();
            let out = cmd.run(&[("{size}", &size), ("{path}", &path)], tools.timeout)?;
            if !out.success() {
                return Err(VolumeError::InvalidArgument(format!(
                    "the quota command refused quota {size} for volume {}: {}",
                    quote(&rec.name),
                    out.summary()
                )));
            }
        }
        self.write_record(rec)
    }

    /// Takes `name` away: renamed into the trash (atomic: the name is free at once), record removed, and
    /// with [`OnRemove::Delete`] the data deleted.
    pub fn discard(&self, name: &str, on_remove: OnRemove) -> Result<(), VolumeError> {
        let dir = self.dir(name);
        let trash = self
            .root
            .join(META_DIR)
            .join("trash")
            .join(format!("{name}.{}", crate::time::now_nanos()));
        fs::rename(&dir, &trash).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                VolumeError::NotFound(format!("volume {} does not exist", quote(name)))
            } else {
                io_err(format!("moving {} to {}", dir.display(), trash.display()), e)
            }
        })?;
        match fs::remove_file(self.record_path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(volume = %name, error = %e, "cannot remove the volume's record"),
        }
        // Acknowledged removals stay removed after a power cut: the rename (and the record's removal) are made
        // durable before Remove answers.
        sync_dir(&self.root).map_err(|e| io_err(format!("syncing {}", self.root.display()), e))?;
        let meta = self.root.join(META_DIR);
        sync_dir(&meta).map_err(|e| io_err(format!("syncing {}", meta.display()), e))?;
        if on_remove == OnRemove::Delete {
            fs::remove_dir_all(&trash).map_err(|e| io_err(format!("deleting {}", trash.display()), e))?;
        }
        Ok(())
    }
}

/// fsync of a directory: the names created, renamed or removed in it reach the disk.
/// A filesystem that cannot sync a directory (some FUSE ones) answers EINVAL or ENOTSUP: nothing to wait for.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match fs::File::open(dir)?.sync_all() {
        Err(e) if matches!(e.raw_os_error(), Some(errno::EINVAL | errno::EOPNOTSUPP)) => Ok(()),
        other => other,
    }
}

/// `backend moosefs, ReplicationGoal 2, quota 1048576`.
pub(crate) fn describe(r: &VolumeRecord) -> String {
    let mut s = format!("backend {}", r.backend);
    if let Some(g) = &r.goal {
        s.push_str(&format!(", ReplicationGoal {g}"));
    }
    if let Some(q) = r.quota {
        s.push_str(&format!(", quota {q}"));
    }
    if let Some(z) = r.size {
        s.push_str(&format!(", size {z}"));
    }
    if let Some(f) = &r.fs {
        s.push_str(&format!(", fs {f}"));
    }
    s
}

/// Most helper threads that may hang on a dead mount at once before calls fail without trying.
const MAX_STUCK: usize = 16;

/// The MooseFS backend: lamina's own mfsmount, the master probe, deadlines.
#[derive(Debug)]
pub struct MooseFs {
    /// Settings.
    pub cfg: MooseFsConfig,
    /// The volumes directory on the mount.
    pub vols: VolumeDir,
    timeout: Duration,
    log: PathBuf,
    mount_lock: Mutex<()>,
    stuck: Arc<AtomicUsize>,
}

impl MooseFs {
    /// Sets up (does not mount yet). `log` receives mfsmount's output.
    pub fn new(cfg: MooseFsConfig, timeout: Duration, log: PathBuf) -> MooseFs {
        let rel = cfg.remote_path.trim_start_matches('/');
        let root = if rel.is_empty() {
            cfg.mountpoint.clone()
        } else {
            cfg.mountpoint.join(rel)
        };
        MooseFs {
            cfg,
            vols: VolumeDir { root },
            timeout,
            log,
            mount_lock: Mutex::new(()),
            stuck: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// `HOST:PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.cfg.master_host, self.cfg.master_port)
    }

    /// Fails fast unless the master accepts a TCP connection.
    pub fn probe(&self) -> Result<(), VolumeError> {
        let unreachable = |why: String| {
            VolumeError::BackendUnavailable(format!("MooseFS master {} is unreachable: {why}", self.master()))
        };
        let addrs: Vec<_> = (self.cfg.master_host.as_str(), self.cfg.master_port)
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?
            .collect();
        let mut last = String::from("no address");
        let wait = self.timeout.min(Duration::from_secs(3));
        for a in addrs {
            match TcpStream::connect_timeout(&a, wait) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(unreachable(last))
    }

    /// Runs `f` on a helper thread and gives up after the deadline (the thread is left to finish).
    pub fn with_deadline<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        if self.stuck.load(Ordering::SeqCst) >= MAX_STUCK {
            return Err(VolumeError::BackendUnavailable(format!(
                "{what}: {MAX_STUCK} earlier calls on the MooseFS mount are still blocked"
            )));
        }
        let (tx, rx) = mpsc::channel();
        let stuck = self.stuck.clone();
        stuck.fetch_add(1, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("lamina-mfs-call".into())
            .spawn(move || {
                let r = f();
                stuck.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(r);
            })
            .map_err(|e| VolumeError::io("spawning a helper thread", e))?;
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(_) => Err(VolumeError::BackendUnavailable(format!(
                "{what}: no answer from the MooseFS mount within {} s (master {})",
                self.timeout.as_secs_f32(),
                self.master()
            ))),
        }
    }

    /// Whether the FUSE mount behind `path` still has its `mfsmount`: `Some(false)` when reading it fails
    /// with `ENOTCONN`/`ECONNABORTED` (the process died, the mount is dead for good), `Some(true)` when it
    /// answers, `None` when no answer comes within `wait` (alive but blocked, e.g. on a master that is down).
    /// The check runs on a helper thread that counts as stuck until it returns (none is started once
    /// [`MAX_STUCK`] are).
    pub fn alive(&self, path: &Path, wait: Duration) -> Option<bool> {
        if self.stuck.load(Ordering::SeqCst) >= MAX_STUCK {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        let p = path.to_path_buf();
        let stuck = self.stuck.clone();
        stuck.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("lamina-mfs-alive".into())
            .spawn(move || {
                let dead = matches!(answers(&p), Err(e) if dead_fuse(&e));
                stuck.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(!dead);
            });
        if spawned.is_err() {
            self.stuck.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        rx.recv_timeout(wait).ok()
    }

    /// Probes the master, mounts the cluster if it is not mounted (or remounts a dead mount), then runs
    /// `f` with a deadline.
    pub fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(VolumeDir) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        self.probe()?;
        self.ensure_mounted()?;
        let vols = self.vols.clone();
        self.with_deadline(what, move || f(vols))
    }

    /// Mounts the cluster at the configured mountpoint unless mounted and alive.
    pub fn ensure_mounted(&self) -> Result<(), VolumeError> {
        let _g = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mp = self.cfg.mountpoint.clone();
        if lamina_sys::mount::is_mount_point(&mp).unwrap_or(false) {
            let vols = self.vols.clone();
            let alive =
                self.with_deadline("checking the MooseFS mount", move || match answers(&vols.root) {
                    Ok(()) => Ok(true),
                    Err(e) if dead_fuse(&e) => Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => vols.prepare().map(|()| true),
                    Err(e) => Err(io_err(format!("stat {}", vols.root.display()), e)),
                })?;
            if alive {
                return Ok(());
            }
            warn!(mountpoint = %mp.display(), "MooseFS mount is dead (mfsmount gone?): detaching and mounting again");
            let _ = lamina_sys::mount::unmount(&mp, true);
        }
        fs::create_dir_all(&mp).map_err(|e| VolumeError::io(format!("creating {}", mp.display()), e))?;
        let mut argv = vec![
            path_arg(&self.cfg.mfsmount),
            path_arg(&mp),
            "-H".into(),
            self.cfg.master_host.clone(),
            "-P".into(),
            self.cfg.master_port.to_string(),
            "-S".into(),
            self.cfg.subfolder.clone(),
        ];
        for o in &self.cfg.mount_options {
            argv.push("-o".into());
            argv.push(o.clone());
        }
        let started = Instant::now();
        run_to_log(&argv, &self.log, self.timeout)?;
        if !lamina_sys::mount::is_mount_point(&mp).unwrap_or(false) {
            return Err(VolumeError::BackendUnavailable(format!(
                "`{}` did not mount the cluster (see {})",
                argv.join(" "),
                self.log.display()
            )));
        }
        let vols = self.vols.clone();
        self.with_deadline("preparing the volumes directory", move || {
            vols.prepare()?;
            vols.sweep_temporaries(Duration::from_secs(3600));
            Ok(())
        })?;
        info!(master = %self.master(), mountpoint = %mp.display(), volumes = %self.vols.root.display(),
            ms = started.elapsed().as_millis() as u64, "MooseFS mounted");
        Ok(())
    }

    /// Detaches lamina's cluster mount (lazily: volumes bind-mounted for running containers keep working;
    /// mfsmount exits when the last of them is gone).
    pub fn shutdown(&self) {
        let mp = &self.cfg.mountpoint;
        if lamina_sys::mount::is_mount_point(mp).unwrap_or(false) {
            match lamina_sys::mount::unmount(mp, true) {
                Ok(()) => info!(mountpoint = %mp.display(), "MooseFS unmounted"),
                Err(e) => warn!(mountpoint = %mp.display(), error = %e, "cannot unmount MooseFS"),
            }
        }
    }
}

/// Asks the filesystem behind the directory `p` for something it cannot answer from the kernel's caches (an
/// open and one directory read): a stat of a FUSE mount whose daemon died still succeeds from the attribute
/// cache for a while (1 s with mfsmount's defaults), while this fails at once.
fn answers(p: &Path) -> io::Result<()> {
    let mut rd = fs::read_dir(p)?;
    if let Some(e) = rd.next() {
        e?;
    }
    Ok(())
}

/// Runs a program that daemonizes (mfsmount): its output goes to `log` (a pipe would stay open in the
/// daemon), and its exit status is awaited with a deadline.
fn run_to_log(argv: &[String], log: &Path, timeout: Duration) -> Result<(), VolumeError> {
    let shown = argv.join(" ");
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| VolumeError::io(format!("opening {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| VolumeError::io("dup", e))?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| VolumeError::BackendUnavailable(format!("cannot run {}: {e}", argv[0])))?;
    let st = lamina_rbd::wait_within(&mut child, &shown, timeout)?;
    if st.success() {
        return Ok(());
    }
    let tail = last_line(log);
    Err(VolumeError::BackendUnavailable(format!(
        "`{shown}` failed ({st}): {tail}"
    )))
}

fn last_line(p: &Path) -> String {
    let text = fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let l = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    l.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::options::BackendKind;

    fn rec(name: &str, goal: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            version: 1,
            name: name.into(),
            backend: BackendKind::Local,
            created: 5,
            goal: goal.map(str::to_string),
            quota: None,
            opts: goal
                .map(|g| BTreeMap::from([("ReplicationGoal".to_string(), g.to_string())]))
                .unwrap_or_default(),
            size: None,
            fs: None,
        }
    }

    fn tools(argv: &[&str]) -> CreateTools {
        CreateTools {
            goal: Some(
                CommandTemplate::new(
                    "g",
                    argv.iter().map(|s| s.to_string()).collect(),
                    crate::command::PLACEHOLDERS,
                )
                .unwrap(),
            ),
            quota: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// A prepared volume directory in a fresh temporary directory (which the caller keeps).
    fn volume_dir() -> (tempfile::TempDir, VolumeDir) {
        let t = tempfile::tempdir().unwrap();
        let v = VolumeDir {
            root: t.path().join("vols"),
        };
        v.prepare().unwrap();
        (t, v)
    }

    #[test]
    fn create_same_and_conflict() {
        let (_t, v) = volume_dir();
        let ok = tools(&["true", "{goal}", "{path}"]);
        assert!(matches!(
            v.create(rec("a", Some("2")), &ok).unwrap(),
            Created::New(_)
        ));
        assert!(matches!(
            v.create(rec("a", Some("2")), &ok).unwrap(),
            Created::Same(_)
        ));
        let e = v.create(rec("a", Some("3")), &ok).unwrap_err().to_string();
        assert!(
            e.starts_with("already exists: volume \"a\" exists with other settings"),
            "{e}"
        );
        assert_eq!(
            v.names().unwrap(),
            vec!["a".to_string()],
            "the .lamina dir is not a volume"
        );
        assert_eq!(v.record("a").unwrap().unwrap().goal.as_deref(), Some("2"));
    }

    #[test]
    fn refused_goal_leaves_nothing() {
        let (_t, v) = volume_dir();
        let bad = tools(&[
            "sh",
            "-c",
            "echo \"$0: wrong goal definition\" >&2; exit 1",
            "{goal}",
        ]);
        let e = v.create(rec("b", Some("fast")), &bad).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid argument: the goal command refused ReplicationGoal \"fast\""),
            "{e}"
        );
        assert!(e.contains("fast: wrong goal definition"), "{e}");
        assert!(!v.exists("b").unwrap());
        assert!(v.record("b").unwrap().is_none());
    }

    #[test]
    fn discard_delete_and_trash() {
        let (_t, v) = volume_dir();
        let none = CreateTools::default();
        v.create(rec("d", None), &none).unwrap();
        fs::write(v.dir("d").join("f"), b"x").unwrap();
        v.discard("d", OnRemove::Delete).unwrap();
        assert!(!v.exists("d").unwrap());
        assert_eq!(fs::read_dir(v.root.join(".lamina/trash")).unwrap().count(), 0);
        v.create(rec("k", None), &none).unwrap();
        v.discard("k", OnRemove::Trash).unwrap();
        assert!(!v.exists("k").unwrap());
        assert_eq!(fs::read_dir(v.root.join(".lamina/trash")).unwrap().count(), 1);
        let e = v.discard("k", OnRemove::Trash).unwrap_err().to_string();
        assert!(e.starts_with("not found: "), "{e}");
    }

    #[test]
    fn adopted_directories() {
        let (_t, v) = volume_dir();
        fs::create_dir(v.dir("foreign")).unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            v.create(rec("foreign", None), &CreateTools::default()).unwrap(),
            Created::Same(_)
        ));
        assert!(
            t0.elapsed() >= Duration::from_secs(5),
            "waited for a record first"
        );
    }
}
