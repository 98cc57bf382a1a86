//! Layer directories made ahead of time, in place: a create that takes a spare finds `layers/<n>` made and spends
//! no file-system call on its storage.
//!
//! A spare is the tree a new layer starts with (`diff/`, `work/` 0700, `merged/`), made under a layer number the
//! spare takes from the store's counter: in `spare/<k>/`, then renamed to `layers/<n>`, so that `layers/<n>`
//! appears whole or not at all. Until a create takes it, its path is in the backend's in-flight set, so that
//! garbage collection passes over it. A create takes a spare, number and directory, before its record
//! ([`crate::backend::MadeAhead`]); once the record is committed the directory is the layer's, and a create that
//! fails before its record removes it. The numbers of spares are never given to any other layer.
//!
//! So `layers/` holds, besides the recorded layers, up to [`KEEP`] spares. A power cut or a kill can leave them
//! there with no record naming them: they hold nothing but three empty directories, and the recovery at start
//! removes such trees ([`is_spare_tree`]; docs/on-disk-format.md). A store that closes removes its spares.
//!
//! One thread, started by the first take, makes spares until [`KEEP`] are ready, woken when fewer than [`LOW`]
//! are left: several spares in one burst rather than one after each take, so that the `mkdir`s (which a call
//! arriving on a busy CPU of a non-preemptive kernel waits for) delay one create in several, not the call after
//! every create. When no spare is ready the create takes a number and makes the directories itself.

use std::collections::{HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use crate::backend::MadeAhead;
use crate::{mkdir, remove_tree, InFlight, Result, StoreError};

/// The directory where spares are made before they are renamed into `layers/`, below the data root.
pub(crate) const SPARE_DIR: &str = "spare";

/// Spares kept ready: enough for a burst of creates between two refills.
const KEEP: usize = 8;
/// A take that leaves fewer spares than this wakes the refill.
const LOW: usize = 4;

/// The directories of a spare, as made: each empty.
const SPARE_ENTRIES: [&str; 3] = ["diff", "merged", "work"];

#[derive(Debug)]
struct Pool {
    /// `spare/`, where spares are made.
    dir: PathBuf,
    /// `layers/`.
    layers: PathBuf,
    /// The store's layer number counter.
    next: Arc<AtomicU64>,
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
    /// Set once `spare/` was emptied by the recovery at start ([`Spares::clear`]): before, and where that failed,
    /// no spare is made.
    usable: AtomicBool,
    /// Ready spares, oldest first, each holding its `layers/<n>` in the in-flight set.
    ready: Mutex<VecDeque<(u64, InFlight)>>,
    seq: AtomicU64,
}

impl Pool {
    fn ready(&self) -> MutexGuard<'_, VecDeque<(u64, InFlight)>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn layer_dir(&self, n: u64) -> PathBuf {
        self.layers.join(format!("{n:x}"))
    }

    /// Makes spares until [`KEEP`] are ready; stops at the first failure (a full disk: creates make their own).
    fn refill(&self) {
        while self.ready().len() < KEEP {
            let n = self.next.fetch_add(1, Ordering::SeqCst);
            match self.make(n) {
                Some(owned) => self.ready().push_back((n, owned)),
                None => return,
            }
        }
    }

    /// Makes the spare of layer number `n`: in `spare/<k>`, then renamed to `layers/<n>`, which must not exist.
    fn make(&self, n: u64) -> Option<InFlight> {
        let target = self.layer_dir(n);
        let owned = InFlight::new(&self.in_flight, target.clone());
        let path = self
            .dir
            .join(format!("{:x}", self.seq.fetch_add(1, Ordering::Relaxed)));
        let made = (|| {
            mkdir(&path, 0o700)?;
            mkdir(&path.join("diff"), 0o755)?;
            mkdir(&path.join("work"), 0o700)?;
            mkdir(&path.join("merged"), 0o755)?;
            lamina_sys::fs::rename_noreplace(&path, &target)
                .map_err(|e| StoreError::io(format!("move a spare to {}", target.display()), e))
        })();
        match made {
            Ok(()) => Some(owned),
            Err(e) => {
                debug!(error = %e, "could not make a spare layer directory");
                remove_tree(&path);
                None
            }
        }
    }
}

/// Whether `dir`, an entry of `layers/` on the filesystem whose device is `dev`, is a spare's tree: a directory
/// holding exactly `diff/`, `merged/` and `work/`, each an empty directory, all on that filesystem (no mount, no
/// subvolume). Such a tree holds no data.
pub(crate) fn is_spare_tree(dir: &Path, dev: u64) -> bool {
    let is_plain_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|md| md.is_dir() && md.dev() == dev);
    let is_empty = |p: &Path| std::fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_none());
    if !is_plain_dir(dir) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut names: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    names.sort();
    names.len() == SPARE_ENTRIES.len()
        && names.iter().zip(SPARE_ENTRIES).all(|(n, want)| n == want)
        && SPARE_ENTRIES.iter().all(|d| {
            let p = dir.join(d);
            is_plain_dir(&p) && is_empty(&p)
        })
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
    /// The spares of the data root `root`, numbered from the store's counter `next`; unused until
    /// [`Spares::clear`]; touches nothing on disk.
    pub(crate) fn new(root: &Path, next: Arc<AtomicU64>, in_flight: Arc<Mutex<HashSet<PathBuf>>>) -> Spares {
        Spares {
            pool: Arc::new(Pool {
                dir: root.join(SPARE_DIR),
                layers: root.join("layers"),
                next,
                in_flight,
                usable: AtomicBool::new(false),
                ready: Mutex::new(VecDeque::new()),
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

    /// A ready spare, with its number; `None` when there is none (the caller takes a number and makes the
    /// directories). Asks for a refill when fewer than [`LOW`] are left.
    pub(crate) fn take(&self) -> Option<MadeAhead> {
        if !self.pool.usable.load(Ordering::Acquire) {
            return None;
        }
        let (taken, left) = {
            let mut ready = self.pool.ready();
            let taken = ready.pop_front();
            (taken, ready.len())
        };
        if left < LOW {
            self.wake();
        }
        taken.map(|(n, owned)| MadeAhead::new(n, self.pool.layer_dir(n), owned))
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
    /// Stops the thread and removes the spares: nothing is left in `layers/` or `spare/` by a store that closed.
    fn drop(&mut self) {
        let worker = self.worker.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Worker { wake, thread }) = worker {
            drop(wake);
            let _ = thread.join();
        }
        let ready = std::mem::take(&mut *self.pool.ready());
        for (n, owned) in ready {
            remove_tree(&self.pool.layer_dir(n));
            drop(owned);
        }
    }
}
