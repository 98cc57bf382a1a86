//! The teardowns of detached overlay mounts, off the call path.
//!
//! When the last reference to an overlay mount goes, the kernel syncs the overlay's upper filesystem (all of it,
//! not only the layer) before the superblock is freed, in the thread that dropped that reference. A Put that
//! detaches the mount itself therefore waits for that sync: about half of lamina's time in a `docker run` +
//! `docker rm -f` (docs/benchmarks.md). A Put here detaches the mount while holding a descriptor of its root
//! ([`Mounter::detach_held`](lamina_sys::mounter::Mounter::detach_held)), answers, and one thread of this
//! module closes the descriptor: the same sync, run beside the next calls instead of inside the Put.
//!
//! What a Put guaranteed before still holds once its teardown has run, and every path that could see the
//! difference waits for it first: a mount or a mount description of the layer or of a layer above it (a new
//! overlay on a directory that a detached one still holds is refused or warned about by overlayfs), and the
//! deletion of a removed layer. The store waits for all of them when it closes. Nothing is skipped: a power cut
//! before the teardown ran loses what the same cut just before the Put would have lost (writes that their
//! program never synced), as with overlay2, whose unmount runs the same sync.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use lamina_sys::mounter::Held;
use tracing::warn;

/// The layers whose detached mount is still being torn down.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    layers: Mutex<HashMap<u64, usize>>,
    /// Entries in `layers`, read without the lock: zero on almost every call.
    count: AtomicUsize,
    done: Condvar,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        self.layers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, n: u64) {
        let mut layers = self.lock();
        *layers.entry(n).or_default() += 1;
        self.count.store(layers.len(), Ordering::Release);
    }

    fn finish(&self, n: u64) {
        let mut layers = self.lock();
        if let Some(k) = layers.get_mut(&n) {
            *k -= 1;
            if *k == 0 {
                layers.remove(&n);
            }
        }
        self.count.store(layers.len(), Ordering::Release);
        drop(layers);
        self.done.notify_all();
    }

    /// Returns once no layer of `layers` has a teardown running.
    pub(crate) fn wait(&self, layers: impl Iterator<Item = u64> + Clone) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pending = self.lock();
        while layers.clone().any(|n| pending.contains_key(&n)) {
            pending = self.done.wait(pending).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The layer and its detached mount, sent to the thread.
type Job = (u64, Held);

/// One thread, started by the first detached mount, that runs the teardowns one after the other (at normal
/// priority: a mount may be waiting for one).
pub(crate) struct Teardowns {
    pending: Arc<Pending>,
    worker: Mutex<Option<(mpsc::Sender<Job>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Teardowns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teardowns")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Teardowns {
    pub(crate) fn new() -> Teardowns {
        Teardowns {
            pending: Arc::new(Pending::default()),
            worker: Mutex::new(None),
        }
    }

    /// The layers being torn down, for those who wait for them.
    pub(crate) fn pending(&self) -> &Arc<Pending> {
        &self.pending
    }

    /// Runs the teardown of layer `n`'s detached mount (the drop of `held`) on the thread; in the caller's
    /// thread if the thread cannot be started.
    pub(crate) fn defer(&self, n: u64, held: Held) {
        self.pending.add(n);
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let pending = self.pending.clone();
            let spawned = std::thread::Builder::new()
                .name("teardown".into())
                .spawn(move || {
                    for (n, held) in rx {
                        drop(held);
                        pending.finish(n);
                    }
                });
            match spawned {
                Ok(thread) => *worker = Some((tx, thread)),
                Err(e) => {
                    warn!(error = %e, "could not start the teardown thread; Puts wait for their unmount")
                }
            }
        }
        let sent = match worker.as_ref() {
            Some((tx, _)) => tx.send((n, held)).map_err(|mpsc::SendError(job)| job),
            None => Err((n, held)),
        };
        drop(worker);
        if let Err((n, held)) = sent {
            drop(held);
            self.pending.finish(n);
        }
    }
}

impl Drop for Teardowns {
    /// Waits for every teardown: a closed store leaves no detached mount behind.
    fn drop(&mut self) {
        let worker = self.worker.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, thread)) = worker {
            drop(tx);
            let _ = thread.join();
        }
    }
}
