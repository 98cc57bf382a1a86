//! The benchmarks' scratch filesystems: `lamina-testkit`'s [`LoopFs`] (a sparse file under the work directory,
//! `losetup --direct-io=on`, `mkfs`, a mount on a private directory, undone in `Drop`) per `--fs` kind, and a
//! SIGINT/SIGTERM watcher that undoes them too before the process exits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use lamina_testkit::{teardown_loop_filesystems, LoopFs};

use super::engines::{kill_pids_referencing, run_checked, unmount_under};
use super::FsKind;

/// The scratch filesystem of one `--fs` kind: a [`LoopFs`] and how it was made.
#[derive(Debug)]
pub struct ScratchFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
    /// One line: how it was made.
    pub describe: String,
    _fs: LoopFs,
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

impl ScratchFs {
    /// Makes and mounts a fresh `kind` filesystem of `size` bytes, backed by a sparse file in `work`.
    /// `tag` goes into the file and directory names (e.g. the process id).
    pub fn create(work: &Path, kind: FsKind, size: u64, tag: &str) -> Result<ScratchFs> {
        let image = work.join(format!("{tag}-{}.img", kind.name()));
        let mnt = work.join(format!("{tag}-{}", kind.name()));
        let mkfs_args: &[&str] = match kind {
            // Inode tables and journal written now, so no ext4lazyinit thread writes during the runs.
            FsKind::Ext4 => &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
            // xfsprogs' defaults (reflink=1, crc=1).
            FsKind::Xfs => &["-q", "-f"],
        };
        let fs = LoopFs::create(&image, &mnt, kind.name(), mkfs_args, size).map_err(anyhow::Error::msg)?;
        let describe = format!(
            "{} (mkfs.{} {}) on {} (losetup --direct-io=on) backed by a {:.0} GiB sparse file in {}; mount options {}",
            kind.name(),
            kind.name(),
            opts_text(kind),
            fs.device,
            size as f64 / (1u64 << 30) as f64,
            work.display(),
            fs.mount_options()
        );
        Ok(ScratchFs {
            mnt: fs.mnt.clone(),
            describe,
            _fs: fs,
        })
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        // Processes still using it (a daemon of a workload that failed half-way) first; then `LoopFs` unmounts.
        kill_pids_referencing(&self.mnt);
    }
}

fn opts_text(kind: FsKind) -> &'static str {
    match kind {
        FsKind::Ext4 => "-E lazy_itable_init=0,lazy_journal_init=0",
        FsKind::Xfs => "defaults, reflink=1",
    }
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
        teardown_loop_filesystems();
        std::process::exit(code);
    });
    Ok(())
}
