//! Fresh loop-backed filesystems for the benchmarks (never the root filesystem).
//!
//! A sparse file under the work directory, `losetup --direct-io=on` (no second copy of the data in the
//! backing file's page cache), `mkfs`, a mount on a private directory. Everything is undone in `Drop`, and a
//! global list lets the SIGINT/SIGTERM watcher undo it too before the process exits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::engines::{kill_pids_referencing, run_checked, unmount_under};
use super::FsKind;

/// What is set up, for teardown from the signal watcher: (mount point, loop device, backing file).
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
    /// One line: how it was made.
    pub describe: String,
}

impl FsKind {
    /// `ext4` / `xfs`.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
        }
    }
}

/// Bytes available on the filesystem holding `dir` (`df`).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let out = run_checked(Command::new("df").args(["-B1", "--output=avail"]).arg(dir))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("reading the free space of {} from df", dir.display()))
}

impl LoopFs {
    /// Makes and mounts a fresh `kind` filesystem of `size` bytes, backed by a sparse file in `work`.
    /// `tag` goes into the file and directory names (e.g. the process id).
    pub fn create(work: &Path, kind: FsKind, size: u64, tag: &str) -> Result<LoopFs> {
        fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let image = work.join(format!("{tag}-{}.img", kind.name()));
        let mnt = work.join(format!("{tag}-{}", kind.name()));
        let f = fs::File::create(&image).with_context(|| format!("creating {}", image.display()))?;
        f.set_len(size)
            .with_context(|| format!("sizing {}", image.display()))?;
        drop(f);
        register((mnt.clone(), None, image.clone()));
        let out = run_checked(
            Command::new("losetup")
                .args(["--direct-io=on", "--find", "--show"])
                .arg(&image),
        )?;
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !device.starts_with("/dev/") {
            bail!("losetup printed {device:?}, not a device");
        }
        set_device(&image, &device);
        let mut me = LoopFs {
            mnt: mnt.clone(),
            device: device.clone(),
            image: image.clone(),
            describe: String::new(),
        };
        let (mkfs, opts): (&str, &[&str]) = match kind {
            // Inode tables and journal written now, so no ext4lazyinit thread writes during the runs.
            FsKind::Ext4 => (
                "mkfs.ext4",
                &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
            ),
            // xfsprogs' defaults (reflink=1, crc=1).
            FsKind::Xfs => ("mkfs.xfs", &["-q", "-f"]),
        };
        run_checked(Command::new(mkfs).args(opts).arg(&device))?;
        fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
        run_checked(Command::new("mount").arg(&device).arg(&mnt))?;
        let opts = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap_or("")))
            .and_then(|l| l.split(' ').nth(5).map(str::to_owned))
            .unwrap_or_default();
        me.describe = format!(
            "{} ({mkfs} {}) on {device} (losetup --direct-io=on) backed by a {:.0} GiB sparse file in {}; mount options {opts}",
            kind.name(),
            opts_text(kind),
            size as f64 / (1u64 << 30) as f64,
            work.display()
        );
        Ok(me)
    }

    /// Unmounts, detaches the loop device and deletes the backing file.
    fn teardown(&mut self) {
        teardown_one(&(self.mnt.clone(), Some(self.device.clone()), self.image.clone()));
        unregister(&self.image);
    }
}

fn opts_text(kind: FsKind) -> &'static str {
    match kind {
        FsKind::Ext4 => "-E lazy_itable_init=0,lazy_journal_init=0",
        FsKind::Xfs => "defaults, reflink=1",
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.teardown();
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

fn unregister(image: &Path) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|l| l.2 != image);
}

fn teardown_one((mnt, device, image): &Live) {
    // Processes still using it (a daemon of a workload that was interrupted) first, then mounts.
    kill_pids_referencing(mnt);
    unmount_under(mnt);
    let _ = fs::remove_dir(mnt);
    if let Some(dev) = device {
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

/// Installs SIGINT/SIGTERM handling: a watcher thread tears down every live loop filesystem (killing the
/// processes that use them) and exits with 130 / 143.
pub fn install_signal_teardown() -> Result<()> {
    let int = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, int.clone()).context("installing SIGINT")?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()).context("installing SIGTERM")?;
    thread::spawn(move || loop {
        let code = if int.load(Ordering::Relaxed) {
            130
        } else if term.load(Ordering::Relaxed) {
            143
        } else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        eprintln!("\nlamina-bench: interrupted; tearing down the loop filesystems");
        // dockerds' exec roots of this run live outside the loop filesystems.
        let mine = format!("{}-", std::process::id());
        let run_dir = Path::new(super::engines::RUN_DIR);
        kill_pids_referencing(&run_dir.join(&mine));
        for e in fs::read_dir(run_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&mine) {
                unmount_under(&e.path());
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let live: Vec<Live> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for l in &live {
            teardown_one(l);
        }
        std::process::exit(code);
    });
    Ok(())
}
