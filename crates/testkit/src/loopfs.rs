//! Fresh loop-backed filesystems, never the root filesystem: a sparse backing file, `losetup --direct-io=on` (no
//! second copy of the data in the backing file's page cache), `mkfs`, a mount. Undone in `Drop` (unmount, detach,
//! delete the file); a process-wide list lets a signal handler ([`teardown_all`]) undo every live one too.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use super::{kill_pids_referencing, stdout_of, unmount_under};

/// What is set up, for [`teardown_all`]: (mount point, loop device, backing file).
type Live = (PathBuf, Option<String>, PathBuf);

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

/// One mounted loop-backed filesystem.
#[derive(Debug)]
pub struct LoopFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
    /// The loop device (`/dev/loopN`).
    pub device: String,
    /// The sparse backing file.
    pub image: PathBuf,
    /// `ext4`, `xfs`, ...
    pub fs_type: String,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    stdout_of(&format!("{cmd:?}"), &out)
}

impl LoopFs {
    /// Makes a sparse `size`-byte `image`, attaches it to a loop device, runs `mkfs.<fs_type> <mkfs_args>` on
    /// the device and mounts it on `mnt` (created). On an error what was set up is undone.
    pub fn create(
        image: &Path,
        mnt: &Path,
        fs_type: &str,
        mkfs_args: &[&str],
        size: u64,
    ) -> Result<LoopFs, String> {
        if let Some(dir) = image.parent() {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        fs::File::create(image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("making {}: {e}", image.display()))?;
        let me = Self::attach(image, mnt, fs_type, "--direct-io=on")?;
        run(Command::new(format!("mkfs.{fs_type}"))
            .args(mkfs_args)
            .arg(&me.device))?;
        fs::create_dir_all(mnt).map_err(|e| format!("creating {}: {e}", mnt.display()))?;
        run(Command::new("mount").arg(&me.device).arg(mnt))?;
        Ok(me)
    }

    /// Attaches `image` to a free loop device (`losetup <flag>`), to be mounted on `mnt` as `fs_type`; what
    /// is set up is registered to be undone, and undone when the returned value is dropped.
    fn attach(image: &Path, mnt: &Path, fs_type: &str, flag: &str) -> Result<LoopFs, String> {
        register((mnt.to_path_buf(), None, image.to_path_buf()));
        let mut me = LoopFs {
            mnt: mnt.to_path_buf(),
            device: String::new(),
            image: image.to_path_buf(),
            fs_type: fs_type.to_string(),
        };
        let device = run(Command::new("losetup")
            .args([flag, "--find", "--show"])
            .arg(image))?
        .trim()
        .to_string();
        if !device.starts_with("/dev/") {
            return Err(format!("losetup printed {device:?}, not a device"));
        }
        set_device(image, &device);
        me.device = device;
        Ok(me)
    }

    /// Attaches an existing filesystem image read-only to a loop device and mounts it read-only on `mnt`
    /// (created) as `fs_type` (e.g. an EROFS image). Undone like [`LoopFs::create`]'s, the image deleted too.
    pub fn attach_read_only(image: &Path, mnt: &Path, fs_type: &str) -> Result<LoopFs, String> {
        let me = Self::attach(image, mnt, fs_type, "--read-only")?;
        fs::create_dir_all(mnt).map_err(|e| format!("creating {}: {e}", mnt.display()))?;
        run(Command::new("mount")
            .args(["-t", fs_type, "-o", "ro"])
            .arg(&me.device)
            .arg(mnt))?;
        Ok(me)
    }

    /// What a power cut leaves: the filesystem is shut down at once without flushing its journal or log
    /// (`xfs_io -x -c shutdown`, the `FS_IOC_SHUTDOWN` ioctl with "no log flush", which ext4 and xfs both
    /// implement): every later write fails, and only what was already on disk survives the next mount.
    pub fn cut_power(&self) -> Result<(), String> {
        run(Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&self.mnt))
        .map(|_| ())
    }

    /// Unmounts everything at and below the mount point (the processes using it must be stopped first), waits
    /// until the kernel has let go of the filesystem, and mounts the device again: the journal or log is
    /// replayed, as at a boot after a power cut.
    pub fn remount(&self) -> Result<(), String> {
        unmount_under(&self.mnt);
        let dev = self.device.trim_start_matches("/dev/");
        let sysfs = PathBuf::from(format!("/sys/fs/{}/{dev}", self.fs_type));
        for _ in 0..200 {
            if !sysfs.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if sysfs.exists() {
            return Err(format!("{} is still in use after its unmount", self.device));
        }
        fs::create_dir_all(&self.mnt).map_err(|e| format!("creating {}: {e}", self.mnt.display()))?;
        run(Command::new("mount").arg(&self.device).arg(&self.mnt)).map(|_| ())
    }

    /// The mount options the kernel reports for it (`/proc/self/mountinfo`).
    pub fn mount_options(&self) -> String {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.split(' ').nth(4) == self.mnt.to_str())
            .and_then(|l| l.split(' ').nth(5).map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let live = (self.mnt.clone(), Some(self.device.clone()), self.image.clone());
        teardown_one(&live);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| l.2 != self.image);
    }
}

fn register(l: Live) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(l);
}

fn set_device(image: &Path, device: &str) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = live.iter_mut().find(|l| l.2 == image) {
        l.1 = Some(device.to_string());
    }
}

/// Unmounts, detaches the loop device (retrying while it is busy) and deletes the backing file.
fn teardown_one((mnt, device, image): &Live) {
    unmount_under(mnt);
    let _ = fs::remove_dir(mnt);
    if let Some(dev) = device.as_ref().filter(|d| !d.is_empty()) {
        for _ in 0..10 {
            let st = Command::new("losetup").arg("-d").arg(dev).status();
            if st.is_ok_and(|s| s.success()) {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    let _ = fs::remove_file(image);
}

/// Tears down every live loop filesystem of this process, first stopping (SIGKILL, by PID) the processes that
/// use them: for a signal handler that is about to exit.
pub fn teardown_all() {
    let live: Vec<Live> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for l in &live {
        kill_pids_referencing(&l.0);
        teardown_one(l);
    }
}
