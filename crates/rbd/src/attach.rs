//! Images attached on this host: mapped (krbd, or rbd-fuse + a loop device) with their filesystem mounted,
//! each in a directory of its own (see the crate documentation).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{classify, path_arg, run_argv, CommandOutput, FsType, Rbd, RbdError};

/// The state file of an attachment, in its directory.
pub const STATE_FILE: &str = "attached.json";

/// How an image is attached on this host, persisted in [`STATE_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Attached {
    image: String,
    /// rbd-fuse's PID and its start time (field 22 of `/proc/PID/stat`), which tells it from a reused PID.
    fuse_pid: Option<u32>,
    fuse_start: Option<u64>,
    /// `/dev/loopN` or `/dev/rbdN`.
    device: Option<String>,
    krbd: bool,
    #[serde(default)]
    read_only: bool,
}

impl Rbd {
    /// Where the filesystem of the attachment in `dir` is mounted.
    pub fn fs_dir(dir: &Path) -> PathBuf {
        dir.join("fs")
    }

    fn state_file(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    fn read_state(dir: &Path) -> Option<Attached> {
        let b = fs::read(Self::state_file(dir)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn write_state(dir: &Path, st: &Attached) -> Result<(), RbdError> {
        let p = Self::state_file(dir);
        let tmp = p.with_extension("tmp");
        let bytes = serde_json::to_vec(st).unwrap_or_default();
        fs::write(&tmp, bytes)
            .and_then(|()| fs::File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &p))
            .map_err(|e| RbdError::io(format!("writing {}", p.display()), e))
    }

    /// Whether anything is attached in `dir` (a state file).
    pub fn attached(dir: &Path) -> bool {
        Self::state_file(dir).exists()
    }

    /// The image attached in `dir`, and whether read-only.
    pub fn attached_image(dir: &Path) -> Option<(String, bool)> {
        Self::read_state(dir).map(|s| (s.image, s.read_only))
    }

    /// Whether the attachment in `dir` is complete and its rbd-fuse (if any) still runs.
    pub fn alive(dir: &Path) -> bool {
        let Some(st) = Self::read_state(dir) else {
            return false;
        };
        let fuse_ok =
            st.krbd || matches!((st.fuse_pid, st.fuse_start), (Some(p), Some(s)) if same_process(p, s));
        fuse_ok && lamina_sys::mount::is_mount_point(&Self::fs_dir(dir)).unwrap_or(false)
    }

    /// Whether the filesystem attached in `dir` is also mounted somewhere else in this mount namespace (a
    /// client's bind mount of `dir/fs`): detaching it would leave the device open under that mount.
    pub fn mounted_elsewhere(dir: &Path) -> bool {
        let fsdir = Self::fs_dir(dir);
        if !lamina_sys::mount::is_mount_point(&fsdir).unwrap_or(false) {
            return false;
        }
        let Ok(dev) = lamina_sys::mount::device_of(&fsdir) else {
            return false;
        };
        lamina_sys::mount::mounts_of_device(dev)
            .map(|m| m.iter().any(|p| p != &fsdir))
            .unwrap_or(false)
    }

    /// Writes everything the device of the attachment in `dir` holds through to the image: the device's
    /// flush (the loop device passes it on to its backing file) and, with rbd-fuse, an fsync of the image
    /// file, which rbd-fuse answers with a flush of librbd's cache.
    pub fn flush(&self, dir: &Path) -> Result<(), RbdError> {
        let st = Self::read_state(dir)
            .ok_or_else(|| RbdError::NotFound(format!("no attachment in {}", dir.display())))?;
        let mut files: Vec<PathBuf> = st.device.iter().map(PathBuf::from).collect();
        if !st.krbd {
            files.push(dir.join("fuse").join(&st.image));
        }
        for f in files {
            fs::File::open(&f)
                .and_then(|f| f.sync_all())
                .map_err(|e| RbdError::io(format!("flushing {}", f.display()), e))?;
        }
        Ok(())
    }

    /// Cuts the attachment in `dir` off from the cluster: rbd-fuse is killed (PID checked against its start
    /// time), so that every request waiting on it fails (the filesystem above gets I/O errors) and what
    /// waits for the cluster without a deadline returns. [`Rbd::detach`] then takes the rest down. Under
    /// krbd nothing is done (the kernel client has no such switch short of a forced unmap).
    pub fn abort(&self, dir: &Path) {
        let Some(st) = Self::read_state(dir) else {
            return;
        };
        if st.krbd {
            return;
        }
        if let Some(c) = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(dir)
        {
            warn!(dir = %dir.display(), pid = c.id(), "killing rbd-fuse: the cluster does not answer");
            let _ = c.kill();
            return;
        }
        if let (Some(pid), Some(start)) = (st.fuse_pid, st.fuse_start) {
            if same_process(pid, start) {
                warn!(dir = %dir.display(), pid, "killing rbd-fuse: the cluster does not answer");
                let _ = run_argv(
                    &["kill".into(), "-KILL".into(), pid.to_string()],
                    Duration::from_secs(5),
                );
            }
        }
    }

    /// Runs `f`, which writes through the attachment in `dir` of `image` and may wait for the cluster without
    /// a deadline (the page cache, rbd-fuse and the OSDs in between), under a watchdog: once `progress`
    /// (`None`: none to watch) has not moved for the deadline, the cluster is probed ([`Rbd::probe`]); if it
    /// does not take writes, the attachment is cut off ([`Rbd::abort`]) so that `f` fails, and that class
    /// of error is returned beside `f`'s result.
    pub fn watched<T>(
        &self,
        dir: &Path,
        image: &str,
        progress: Option<&AtomicU64>,
        f: impl FnOnce() -> T,
    ) -> (T, Option<RbdError>) {
        let done = AtomicBool::new(false);
        let cause = Mutex::new(None);
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let seen = |p: Option<&AtomicU64>| p.map(|p| p.load(Ordering::Relaxed));
                let mut last = seen(progress);
                let mut since = Instant::now();
                while !done.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                    let now = seen(progress);
                    if now != last {
                        (last, since) = (now, Instant::now());
                        continue;
                    }
                    if since.elapsed() < self.timeout {
                        continue;
                    }
                    let probe = self.probe(image);
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    match probe {
                        Ok(()) => since = Instant::now(),
                        Err(e) => {
                            warn!(image = %self.spec(image), error = %e, "writes wait for the cluster; cutting the attachment off");
                            self.abort(dir);
                            *cause.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            return;
                        }
                    }
                }
            });
            let r = f();
            done.store(true, Ordering::Release);
            r
        });
        (r, cause.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// Maps `image` on this host and mounts its filesystem at `dir/fs` (read-only with `read_only`: the
    /// device too, and the filesystem without journal replay). Anything left of an earlier attachment in `dir`
    /// that is not alive is taken down first; on failure nothing stays attached.
    pub fn attach(
        &self,
        dir: &Path,
        image: &str,
        fs_type: FsType,
        read_only: bool,
    ) -> Result<PathBuf, RbdError> {
        if Self::alive(dir) {
            return Ok(Self::fs_dir(dir));
        }
        if Self::attached(dir) {
            warn!(dir = %dir.display(), "taking down what an earlier attachment left");
            self.detach(dir)?;
        }
        let t0 = Instant::now();
        // rbd-fuse opens the image (registering a watch, a write) at the first look at its file: in a pool
        // that is full or over its quota that waits without a deadline, so the attachment is watched.
        let (r, cut_off) = self.watched(dir, image, None, || {
            self.map_device(dir, image, read_only).and_then(|dev| {
                lamina_sys::fault::point("rbd.attach.mapped")
                    .map_err(|e| RbdError::io("after mapping the image", e))?;
                self.mount_fs(dir, image, &dev, fs_type, read_only)
            })
        });
        let r = match cut_off {
            Some(e) => Err(e),
            None => r,
        };
        if let Err(e) = &r {
            warn!(dir = %dir.display(), error = %e, "attaching failed; taking it down");
            if let Err(e2) = self.detach(dir) {
                warn!(dir = %dir.display(), error = %e2, "cannot take down a failed attachment");
            }
        } else {
            info!(image = %self.spec(image), read_only, ms = t0.elapsed().as_millis() as u64, "RBD image attached");
        }
        r.map(|()| Self::fs_dir(dir))
    }

    /// Maps `image` read-write, makes a fresh filesystem on it and mounts it at `dir/fs`; on failure nothing
    /// stays attached.
    pub fn format(&self, dir: &Path, image: &str, fs_type: FsType) -> Result<PathBuf, RbdError> {
        if Self::attached(dir) {
            self.detach(dir)?;
        }
        let (r, cut_off) = self.watched(dir, image, None, || {
            let dev = self.map_device(dir, image, false)?;
            self.mkfs(&dev, fs_type)?;
            self.mount_fs(dir, image, &dev, fs_type, false)
        });
        let r = match cut_off {
            Some(e) => Err(e),
            None => r,
        };
        if let Err(e) = r {
            if let Err(e2) = self.detach(dir) {
                warn!(dir = %dir.display(), error = %e2, "cannot take down a failed attachment");
            }
            return Err(e);
        }
        Ok(Self::fs_dir(dir))
    }

    fn mkfs(&self, dev: &str, fs_type: FsType) -> Result<(), RbdError> {
        let argv: Vec<String> = match fs_type {
            // Unwritten RBD extents read as zeros: nothing needs zeroing or discarding.
            FsType::Ext4 => vec![
                "mkfs.ext4".into(),
                "-q".into(),
                "-E".into(),
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1".into(),
                dev.to_string(),
            ],
            FsType::Xfs => vec!["mkfs.xfs".into(), "-q".into(), "-K".into(), dev.to_string()],
        };
        let out = run_argv(&argv, self.timeout * 3)?;
        if !out.success() {
            return Err(RbdError::Unavailable(format!(
                "{} on {dev}: {}",
                argv[0],
                out.summary()
            )));
        }
        Ok(())
    }

    /// Maps the image on this host: `rbd device map`, or rbd-fuse and a loop device over its file (direct
    /// I/O: the page cache of the filesystem above is the only one). The state file is written as soon as
    /// there is something to find after a crash.
    fn map_device(&self, dir: &Path, image: &str, read_only: bool) -> Result<String, RbdError> {
        let fuse = dir.join("fuse");
        fs::create_dir_all(&fuse).map_err(|e| RbdError::io(format!("creating {}", fuse.display()), e))?;
        let fsdir = Self::fs_dir(dir);
        fs::create_dir_all(&fsdir).map_err(|e| RbdError::io(format!("creating {}", fsdir.display()), e))?;
        let mut st = Attached {
            image: image.to_string(),
            read_only,
            ..Attached::default()
        };
        let dev = if self.cluster.map.uses_krbd() {
            st.krbd = true;
            Self::write_state(dir, &st)?;
            let spec = self.spec(image);
            let mut args = vec!["device", "map"];
            if read_only {
                args.push("--read-only");
            }
            args.push(&spec);
            self.cli_ok("mapping the image", &args)?.trim().to_string()
        } else {
            // Written before the spawn too: after a crash right behind it the state names the directory whose
            // FUSE mount to take down (rbd-fuse exits by itself once it is unmounted).
            Self::write_state(dir, &st)?;
            let child = self.spawn_fuse(image, &fuse)?;
            st.fuse_pid = Some(child.id());
            st.fuse_start = start_time(child.id());
            self.children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(dir.to_path_buf(), child);
            Self::write_state(dir, &st)?;
            let file = fuse.join(image);
            self.wait_for_file(dir, &file)?;
            let mut argv: Vec<String> = vec!["losetup".into(), "--direct-io=on".into()];
            if read_only {
                argv.push("-r".into());
            }
            argv.extend(["-f".into(), "--show".into(), path_arg(&file)]);
            let out = run_argv(&argv, self.timeout)?;
            if !out.success() {
                return Err(RbdError::Unavailable(format!(
                    "attaching a loop device to {}: losetup {}",
                    file.display(),
                    out.summary()
                )));
            }
            out.stdout.trim().to_string()
        };
        st.device = Some(dev.clone());
        Self::write_state(dir, &st)?;
        Ok(dev)
    }

    /// Mounts the filesystem on `dev` at `dir/fs`.
    fn mount_fs(
        &self,
        dir: &Path,
        image: &str,
        dev: &str,
        fs_type: FsType,
        read_only: bool,
    ) -> Result<(), RbdError> {
        let mut opts: Vec<&str> = Vec::new();
        match fs_type {
            // Unwritten RBD extents read as zeros: the inode tables need no background zeroing.
            FsType::Ext4 if read_only => opts.extend(["ro", "noload"]),
            FsType::Ext4 => opts.push("noinit_itable"),
            // A clone of an image carries its parent's UUID.
            FsType::Xfs if read_only => opts.extend(["ro", "norecovery", "nouuid"]),
            FsType::Xfs => opts.push("nouuid"),
        }
        let argv: Vec<String> = vec![
            "mount".into(),
            "-t".into(),
            fs_type.as_str().into(),
            "-o".into(),
            opts.join(","),
            dev.to_string(),
            path_arg(&Self::fs_dir(dir)),
        ];
        let out = run_argv(&argv, self.timeout)?;
        if !out.success() {
            return Err(RbdError::Unavailable(format!(
                "mounting {dev} ({}) of image {}: {}",
                fs_type.as_str(),
                self.spec(image),
                out.summary()
            )));
        }
        Ok(())
    }

    fn spawn_fuse(&self, image: &str, at: &Path) -> Result<Child, RbdError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| RbdError::io(format!("opening {}", self.log.display()), e))?;
        let err = log.try_clone().map_err(|e| RbdError::io("dup", e))?;
        let mut cmd = Command::new(&self.cluster.rbd_fuse);
        cmd.args(self.fuse_args())
            .args(["-p", &self.cluster.pool, "-r", image])
            .arg(at)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            // Its own process group: a signal to lamina's group does not stop the images in use.
            .process_group(0);
        cmd.spawn().map_err(|e| {
            RbdError::Unavailable(format!("cannot run {}: {e}", self.cluster.rbd_fuse.display()))
        })
    }

    /// Waits until rbd-fuse exposes the image file; fails (classified from its log) when it exits first.
    fn wait_for_file(&self, dir: &Path, file: &Path) -> Result<(), RbdError> {
        let deadline = Instant::now() + self.timeout + Duration::from_secs(2);
        loop {
            if fs::metadata(file).is_ok_and(|m| m.is_file()) {
                return Ok(());
            }
            let exited = {
                let mut ch = self.children.lock().unwrap_or_else(|e| e.into_inner());
                match ch.get_mut(dir).map(Child::try_wait) {
                    Some(Ok(Some(st))) => {
                        ch.remove(dir);
                        Some(st)
                    }
                    _ => None,
                }
            };
            if let Some(st) = exited {
                let out = CommandOutput {
                    code: st.code(),
                    stdout: String::new(),
                    stderr: last_lines(&self.log, 3),
                };
                let e = classify("starting rbd-fuse", &self.cluster.pool, &out);
                return Err(match e {
                    RbdError::Unavailable(m) if out.stderr.contains("mon config") => {
                        RbdError::Unavailable(format!("the Ceph cluster is unreachable: {m}"))
                    }
                    e => e,
                });
            }
            if Instant::now() > deadline {
                return Err(RbdError::Unavailable(format!(
                    "rbd-fuse did not expose {} within {} s",
                    file.display(),
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts the filesystem in `dir`, detaches its device, stops its rbd-fuse (by PID, checked against its
    /// start time) and removes the state and the directory; each step is skipped when already done.
    pub fn detach(&self, dir: &Path) -> Result<(), RbdError> {
        let st = Self::read_state(dir).unwrap_or_default();
        let fsdir = Self::fs_dir(dir);
        let mut cut_off = None;
        if lamina_sys::mount::is_mount_point(&fsdir).unwrap_or(false) {
            // The unmount writes back what the filesystem holds: with the cluster gone it would wait for ever.
            let (r, cause) = if st.read_only {
                (lamina_sys::mount::unmount(&fsdir, false), None)
            } else {
                self.watched(dir, &st.image, None, || lamina_sys::mount::unmount(&fsdir, false))
            };
            r.map_err(|e| RbdError::io(format!("unmounting {}", fsdir.display()), e))?;
            cut_off = cause;
        }
        let fuse = dir.join("fuse");
        if let Some(dev) = &st.device {
            if st.krbd {
                self.cli_ok("unmapping the image", &["device", "unmap", dev])?;
            } else if loop_backing(dev).is_some_and(|b| b.starts_with(&fuse)) {
                let release = || self.release_loop(dev, &fuse, &st.image);
                if st.read_only {
                    release()?;
                } else {
                    // The device's last close writes back what it still holds: with the cluster gone that
                    // waits for ever, as the unmount would.
                    let (r, cause) = self.watched(dir, &st.image, None, release);
                    r?;
                    cut_off = cut_off.or(cause);
                }
            }
        }
        if lamina_sys::mount::is_mount_point(&fuse).unwrap_or(false) {
            if let Err(e) = lamina_sys::mount::unmount(&fuse, false) {
                warn!(mountpoint = %fuse.display(), error = %e, "unmounting rbd-fuse failed; detaching it");
                let _ = lamina_sys::mount::unmount(&fuse, true);
            }
        }
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(dir);
        if st.read_only {
            // Nothing was written through it: no write-back to wait for before a snapshot or a removal.
            let dir = dir.to_path_buf();
            let st = st.clone();
            std::thread::spawn(move || stop_fuse(&dir, child, &st));
        } else {
            stop_fuse(dir, child, &st);
        }
        let _ = fs::remove_file(Self::state_file(dir));
        for d in [&fsdir, &fuse, &dir.to_path_buf()] {
            let _ = fs::remove_dir(d);
        }
        match cut_off {
            // Detached, but what the filesystem still held did not reach the image.
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Rbd {
    /// Detaches loop device `dev` (backed by a file under `fuse`) and waits for it to go. `losetup -d` only
    /// marks a device that is still open to go at its last close: while its filesystem is still mounted
    /// somewhere (a bind mount here, or a copy of the mount in another mount namespace) rbd-fuse must keep
    /// serving it, and the attachment stays recorded for a later detach. A device open but mounted nowhere is
    /// finishing its last close (writing back what it holds): that is waited for.
    fn release_loop(&self, dev: &str, fuse: &Path, image: &str) -> Result<(), RbdError> {
        let rdev = lamina_sys::mount::rdev_of(Path::new(dev)).ok();
        let out = run_argv(&["losetup".into(), "-d".into(), dev.into()], self.timeout)?;
        if !out.success() {
            return Err(RbdError::Unavailable(format!(
                "detaching {dev}: losetup {}",
                out.summary()
            )));
        }
        let busy = || loop_backing(dev).is_some_and(|b| b.starts_with(fuse));
        let t0 = Instant::now();
        // A copy of the mount in a namespace being set up (a container's, until it pivots) goes by itself.
        let grace = Duration::from_secs(2);
        let limit = self.timeout * 3 + grace;
        let mut slow = false;
        // The mount tables of every namespace are read at most this often (a walk of /proc each time).
        let every = Duration::from_millis(250);
        let mut looked: Option<Instant> = None;
        while busy() {
            let waited = t0.elapsed();
            if waited >= grace && looked.is_none_or(|at| at.elapsed() >= every) {
                looked = Some(Instant::now());
                if let Some(held) = rdev.and_then(holders_of_device) {
                    return Err(RbdError::InUse(format!(
                        "{dev} of image {image} is still open: its filesystem is mounted elsewhere ({held})"
                    )));
                }
                if !slow {
                    slow = true;
                    info!(
                        device = dev,
                        image, "the loop device is still closing (writing back to the image)"
                    );
                }
                if waited >= limit {
                    return Err(RbdError::InUse(format!(
                        "{dev} of image {image} is still open {} s after its detach, though no mount of it is seen",
                        waited.as_secs()
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Where the filesystem on device `rdev` is still mounted: paths in this mount namespace, else the processes
/// of other namespaces that hold a copy of its mount.
fn holders_of_device(rdev: u64) -> Option<String> {
    let here = lamina_sys::mount::mounts_of_device(rdev).unwrap_or_default();
    if !here.is_empty() {
        let paths: Vec<String> = here.iter().map(|p| p.display().to_string()).collect();
        return Some(format!("at {}", paths.join(", ")));
    }
    let there = lamina_sys::mount::namespaces_mounting(rdev).unwrap_or_default();
    if there.is_empty() {
        return None;
    }
    let who: Vec<String> = there
        .iter()
        .map(|(pid, comm)| format!("pid {pid} {comm}"))
        .collect();
    Some(format!("in the mount namespace of {}", who.join(", ")))
}

/// Waits for rbd-fuse to exit after its unmount (it closes the image first: about 1 s), then SIGTERM, then
/// SIGKILL.
fn stop_fuse(dir: &Path, child: Option<Child>, st: &Attached) {
    if let Some(mut c) = child {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(dir = %dir.display(), pid = c.id(), "rbd-fuse did not exit after its unmount: killing it");
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
            warn!(dir = %dir.display(), pid, signal = sig, "stopping rbd-fuse");
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

    #[test]
    fn process_identity() {
        let me = std::process::id();
        let s = start_time(me).unwrap();
        assert!(same_process(me, s));
        assert!(!same_process(me, s + 1));
    }
}
