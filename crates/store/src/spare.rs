//! Layer directories made ahead of time, so that creating a layer costs one `rename` after its record instead of
//! four `mkdir`s and a `rename`.
//!
//! A spare is `spare/<k>/` holding the empty `diff/`, `work/` (0700) and `merged/` a new layer starts with: the
//! same tree the overlay backend otherwise makes in `staging/` and renames to `layers/<n>`. A create takes a ready
//! spare and renames it to `layers/<n>` after the layer's record is committed, exactly where the staged
//! directory would be renamed, so the write order of docs/on-disk-format.md is unchanged: a power cut leaves the
//! spare in `spare/` (and the record without directories, made again at start) or the whole `layers/<n>`.
//! One thread, started by the first take, makes spares until [`KEEP`] are ready, woken when fewer than [`LOW`]
//! are left: several spares in one burst rather than one after each take, so that the `mkdir`s (which a call
//! arriving on a busy CPU of a non-preemptive kernel waits for) delay one create in several, not the call after
//! every create. A spare is handed out only once all its directories are made. `spare/` holds nothing but these
//! empty trees, made by the store itself, so it is emptied at every start (like `staging/`) and at close; when
//! no spare is ready, or the rename fails, the caller makes the directories itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use crate::{mkdir, remove_tree, Result, StoreError};

/// The directory of the spares, below the data root.
pub(crate) const SPARE_DIR: &str = "spare";

/// Spares kept ready: enough for a burst of creates between two refills.
const KEEP: usize = 8;
/// A take that leaves fewer spares than this wakes the refill.
const LOW: usize = 4;

#[derive(Debug)]
struct Pool {
    dir: PathBuf,
    /// Set once `spare/` was emptied by the recovery at start ([`Spares::clear`]): before, and where that failed,
    /// no spare is made.
    usable: AtomicBool,
    ready: Mutex<Vec<PathBuf>>,
    seq: AtomicU64,
}

impl Pool {
    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes spares until [`KEEP`] are ready; stops at the first failure (a full disk: creates make their own).
    fn refill(&self) {
        while self.ready().len() < KEEP {
            let k = self.seq.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("{k:x}"));
            let made = (|| {
                mkdir(&path, 0o700)?;
                mkdir(&path.join("diff"), 0o755)?;
                mkdir(&path.join("work"), 0o700)?;
                mkdir(&path.join("merged"), 0o755)
            })();
            match made {
                Ok(()) => self.ready().push(path),
                Err(e) => {
                    debug!(error = %e, "could not make a spare layer directory");
                    remove_tree(&path);
                    return;
                }
            }
        }
    }
}

/// Makes `dir` if it is missing and removes everything in it.
fn empty(dir: &Path) -> Result<()> {
    mkdir(dir, 0o700)?;
    for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(format!("read {}", dir.display()), e))? {
        let entry = entry.map_err(|e| StoreError::io(format!("read {}", dir.display()), e))?;
        remove_tree(&entry.path());
    }
    Ok(())
}

#[derive(Debug)]
struct Worker {
    wake: mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

/// The spare layer directories of one data root.
#[derive(Debug)]
pub(crate) struct Spares {
    pool: Arc<Pool>,
    worker: Mutex<Option<Worker>>,
}

impl Spares {
    /// The spares of the data root `root`, unused until [`Spares::clear`]; touches nothing on disk.
    pub(crate) fn new(root: &Path) -> Spares {
        Spares {
            pool: Arc::new(Pool {
                dir: root.join(SPARE_DIR),
                usable: AtomicBool::new(false),
                ready: Mutex::new(Vec::new()),
                seq: AtomicU64::new(0),
            }),
            worker: Mutex::new(None),
        }
    }

    /// Makes `spare/` if it is missing and empties it (what a previous run left there is the store's own empty
    /// trees), then puts the spares to use. Called by the recovery at start, which a daemon runs and an operator's
    /// command does not; where it fails (a read-only filesystem) every create makes its own directories.
    pub(crate) fn clear(&self) {
        match empty(&self.pool.dir) {
            Ok(()) => self.pool.usable.store(true, Ordering::Release),
            Err(e) => debug!(dir = %self.pool.dir.display(), error = %e, "no spare layer directories"),
        }
    }

    /// Renames a ready spare to `target` (which must not exist); false when none is ready or the rename failed
    /// (the caller then makes the directories itself). Asks for a refill when fewer than [`LOW`] are left.
    pub(crate) fn take(&self, target: &Path) -> bool {
        if !self.pool.usable.load(Ordering::Acquire) {
            return false;
        }
        let (spare, left) = {
            let mut ready = self.pool.ready();
            let spare = ready.pop();
            (spare, ready.len())
        };
        if left < LOW {
            self.wake();
        }
        let Some(spare) = spare else {
            return false;
        };
        match std::fs::rename(&spare, target) {
            Ok(()) => true,
            Err(e) => {
                debug!(from = %spare.display(), to = %target.display(), error = %e, "could not use a spare layer directory");
                remove_tree(&spare);
                false
            }
        }
    }

    /// Wakes the refilling thread, starting it the first time.
    fn wake(&self) {
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let (wake, woken) = mpsc::sync_channel::<()>(1);
            let pool = self.pool.clone();
            let spawned = std::thread::Builder::new()
                .name("spare-dirs".into())
                .spawn(move || {
                    if let Err(e) = lamina_sys::thread::lower_priority() {
                        debug!(error = %e, "could not lower the priority of the spare-dirs thread");
                    }
                    for () in woken {
                        pool.refill();
                    }
                });
            match spawned {
                Ok(thread) => *worker = Some(Worker { wake, thread }),
                Err(e) => {
                    warn!(error = %e, "could not start the spare-dirs thread; layers make their own directories");
                    return;
                }
            }
        }
        if let Some(w) = worker.as_ref() {
            // A wake-up already queued covers this one.
            let _ = w.wake.try_send(());
        }
    }
}

impl Drop for Spares {
    /// Stops the thread and removes the spares: nothing is left in `spare/` by a store that closed.
    fn drop(&mut self) {
        let worker = self.worker.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Worker { wake, thread }) = worker {
            drop(wake);
            let _ = thread.join();
        }
        for spare in self.pool.ready().drain(..) {
            remove_tree(&spare);
        }
    }
}
