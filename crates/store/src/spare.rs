//! Layer directories made ahead of time, in place: a create whose number has a spare finds `layers/<n>` made and
//! spends no file-system call on its storage.
//!
//! A spare is the tree a new layer starts with (`diff/`, `work/` 0700, `merged/`), made for one of the next
//! layer numbers the store will give out: in `spare/<k>/`, then renamed to `layers/<m>`, so that `layers/<m>`
//! appears whole or not at all. Until a create takes it, its path is in the backend's in-flight set, so that
//! garbage collection passes over it. The create of layer `m` takes it after the layer's record is committed,
//! exactly where the layer's directories would otherwise be made, and a create that failed before its record
//! gives its number's spare back ([`Spares::forget`]), which removes it.
//!
//! So `layers/` holds, besides the recorded layers, up to [`KEEP`] spares, all numbered at or above the next
//! number the store gives out. A power cut or a kill can leave them there with no record naming them: they hold
//! nothing but three empty directories, and the recovery at start removes such trees
//! ([`is_spare_tree`]; docs/on-disk-format.md). A store that closes removes its spares.
//!
//! One thread, started by the first take, makes spares until [`KEEP`] numbers ahead are covered, woken when fewer
//! than [`LOW`] are left: several spares in one burst rather than one after each take, so that the `mkdir`s
//! (which a call arriving on a busy CPU of a non-preemptive kernel waits for) delay one create in several, not the
//! call after every create. When no spare is ready for a number, or making it failed, the create makes the
//! directories itself.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use crate::{mkdir, remove_tree, InFlight, Result, StoreError};

/// The directory where spares are made before they are renamed into `layers/`, below the data root.
pub(crate) const SPARE_DIR: &str = "spare";

/// Numbers ahead kept covered by a spare: enough for a burst of creates between two refills.
const KEEP: u64 = 8;
/// A take that leaves fewer numbers ahead covered than this wakes the refill.
const LOW: u64 = 4;

/// The directories of a spare, as made: each empty.
const SPARE_ENTRIES: [&str; 3] = ["diff", "merged", "work"];

#[derive(Default)]
struct State {
    /// Ready spares by layer number, each holding its `layers/<m>` in the in-flight set.
    ready: BTreeMap<u64, InFlight>,
    /// The number whose spare is being made.
    making: Option<u64>,
    /// The number above the last spare made or begun.
    ahead: u64,
}

struct Pool {
    /// `spare/`, where spares are made.
    dir: PathBuf,
    /// `layers/`.
    layers: PathBuf,
    /// The next layer number the store gives out.
    next: Arc<AtomicU64>,
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
    /// Set once `spare/` was emptied by the recovery at start ([`Spares::clear`]): before, and where that failed,
    /// no spare is made.
    usable: AtomicBool,
    state: Mutex<State>,
    /// Signalled when a spare being made is done.
    made: Condvar,
    seq: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

impl Pool {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state once no spare of number `n` is being made.
    fn settled(&self, n: u64) -> MutexGuard<'_, State> {
        let mut state = self.state();
        while state.making == Some(n) {
            state = self.made.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state
    }

    fn layer_dir(&self, m: u64) -> PathBuf {
        self.layers.join(format!("{m:x}"))
    }

    /// Makes spares until [`KEEP`] numbers ahead are covered; stops at the first failure (a full disk: creates
    /// make their own).
    fn refill(&self) {
        loop {
            let m = {
                let mut state = self.state();
                // A number below `next` is given out: its create takes its spare, or makes its directories.
                let next = self.next.load(Ordering::SeqCst);
                let m = state.ahead.max(next);
                if m >= next.saturating_add(KEEP) {
                    return;
                }
                state.making = Some(m);
                state.ahead = m + 1;
                m
            };
            let made = self.make(m);
            let done = made.is_some();
            {
                let mut state = self.state();
                state.making = None;
                if let Some(owned) = made {
                    state.ready.insert(m, owned);
                }
            }
            self.made.notify_all();
            if !done {
                return;
            }
        }
    }

    /// Makes the spare of number `m`: in `spare/<k>`, then renamed to `layers/<m>`, which must not exist.
    fn make(&self, m: u64) -> Option<InFlight> {
        let target = self.layer_dir(m);
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
    /// The spares of the data root `root`, for the layer numbers `next` gives out; unused until
    /// [`Spares::clear`]; touches nothing on disk.
    pub(crate) fn new(root: &Path, next: Arc<AtomicU64>, in_flight: Arc<Mutex<HashSet<PathBuf>>>) -> Spares {
        Spares {
            pool: Arc::new(Pool {
                dir: root.join(SPARE_DIR),
                layers: root.join("layers"),
                next,
                in_flight,
                usable: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                made: Condvar::new(),
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

    /// The spare of layer `n`, made as `layers/<n>`, with its place in the in-flight set; `None` when there is
    /// none (the caller makes the directories). Waits for one being made. Asks for a refill when fewer than
    /// [`LOW`] numbers ahead are covered.
    pub(crate) fn take(&self, n: u64) -> Option<InFlight> {
        if !self.pool.usable.load(Ordering::Acquire) {
            return None;
        }
        let (taken, ahead) = {
            let mut state = self.pool.settled(n);
            let taken = state.ready.remove(&n);
            let next = self.pool.next.load(Ordering::SeqCst);
            (taken, state.ahead.saturating_sub(next))
        };
        if ahead < LOW {
            self.wake();
        }
        taken
    }

    /// Removes the spare of layer number `n`, if there is one: its number was given out to a layer that will not
    /// use it (a create that failed before its record, or a layer made otherwise).
    pub(crate) fn forget(&self, n: u64) {
        let taken = self.pool.settled(n).ready.remove(&n);
        if let Some(owned) = taken {
            // Removed while still in flight, so that no collection meets it half-deleted.
            remove_tree(&self.pool.layer_dir(n));
            drop(owned);
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
    /// Stops the thread and removes the spares: nothing is left in `layers/` or `spare/` by a store that closed.
    fn drop(&mut self) {
        let worker = self.worker.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Worker { wake, thread }) = worker {
            drop(wake);
            let _ = thread.join();
        }
        let ready = std::mem::take(&mut self.pool.state().ready);
        for (m, owned) in ready {
            remove_tree(&self.pool.layer_dir(m));
            drop(owned);
        }
    }
}
