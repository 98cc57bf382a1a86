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

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lamina_sys::fault;
use lamina_sys::fs::errno;
use tracing::{info, warn};

use crate::command::{path_arg, CommandTemplate};
use crate::error::VolumeError;
use crate::meta::VolumeRecord;
pub(crate) use crate::mfsmount::io_err;
use crate::mfsmount::{Ensured, MfsMount, MfsMountConfig};
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
    /// What lamina's mfsmount mounts where.
    pub mount: MfsMountConfig,
    /// Path of the volumes directory inside the mounted subfolder.
    pub remote_path: String,
    /// Sets a goal: `{goal}`, `{path}`.
    pub goal_command: CommandTemplate,
    /// Reports the goal in effect: `{path}`; output `PATH: GOAL`.
    pub getgoal_command: Option<CommandTemplate>,
    /// Sets a quota: `{size}` (bytes), `{path}`.
    pub quota_command: Option<CommandTemplate>,
    /// Goal of volumes created without `ReplicationGoal`.
    pub default_goal: Option<Goal>,
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

/// The MooseFS backend: lamina's own mfsmount of the cluster and the volumes directory on it.
#[derive(Debug)]
pub struct MooseFs {
    /// Settings.
    pub cfg: MooseFsConfig,
    /// The volumes directory on the mount.
    pub vols: VolumeDir,
    mount: MfsMount,
}

impl MooseFs {
    /// Sets up (does not mount yet). `log` receives mfsmount's output.
    pub fn new(cfg: MooseFsConfig, timeout: Duration, log: PathBuf) -> MooseFs {
        let rel = cfg.remote_path.trim_start_matches('/');
        let root = if rel.is_empty() {
            cfg.mount.mountpoint.clone()
        } else {
            cfg.mount.mountpoint.join(rel)
        };
        MooseFs {
            mount: MfsMount::new(cfg.mount.clone(), timeout, log),
            cfg,
            vols: VolumeDir { root },
        }
    }

    /// `HOST:PORT`.
    pub fn master(&self) -> String {
        self.mount.master()
    }

    /// Fails fast unless the master accepts a TCP connection.
    pub fn probe(&self) -> Result<(), VolumeError> {
        self.mount.probe()
    }

    /// Runs `f` on a helper thread and gives up after the deadline (the thread is left to finish).
    pub fn with_deadline<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        self.mount.with_deadline(what, f)
    }

    /// Whether the FUSE mount behind `path` still has its `mfsmount` ([`MfsMount::alive`]).
    pub fn alive(&self, path: &Path, wait: Duration) -> Option<bool> {
        self.mount.alive(path, wait)
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

    /// Mounts the cluster at the configured mountpoint unless mounted and alive, and makes the volumes
    /// directory when it is missing.
    pub fn ensure_mounted(&self) -> Result<(), VolumeError> {
        let vols = self.vols.clone();
        match self.mount.ensure_mounted(&self.vols.root)? {
            Ensured::Alive => Ok(()),
            Ensured::AliveWithoutDir => {
                self.with_deadline("preparing the volumes directory", move || vols.prepare())
            }
            Ensured::Mounted => {
                self.with_deadline("preparing the volumes directory", move || {
                    vols.prepare()?;
                    vols.sweep_temporaries(Duration::from_secs(3600));
                    Ok(())
                })?;
                info!(volumes = %self.vols.root.display(), "MooseFS volumes directory ready");
                Ok(())
            }
        }
    }

    /// Detaches lamina's cluster mount (lazily: volumes bind-mounted for running containers keep working;
    /// mfsmount exits when the last of them is gone).
    pub fn shutdown(&self) {
        self.mount.unmount_lazily();
    }
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
