//! Per-layer state in memory: the lock every operation on a layer takes, its mount reference count, its
//! cached parent chain and its usage counters. The modules that change a layer hold its [`Slot`] locked;
//! the others (statistics, garbage collection, listings) read and count through [`Slots`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use crate::meta::LayerStats;

/// The layers below one layer (its parent chain), nearest first.
pub(crate) type Lowers = Arc<Vec<u64>>;

/// One layer's state.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Mount references ([`crate::Store::get`] minus [`crate::Store::put`]).
    pub mounts: u32,
    /// The layers below this one. A parent chain never changes, so it is walked in the database once per
    /// layer and process, not at every mount.
    pub lowers: Option<Lowers>,
    /// Usage counters; `stats_dirty` until they are written to the database.
    pub stats: LayerStats,
    pub stats_dirty: bool,
}

impl Slot {
    /// Counts a mount request at `now`; `first` when it brings the layer's stack up.
    pub(crate) fn note_get(&mut self, now: u64, first: bool) {
        self.stats.gets += 1;
        self.stats.last_used_ns = now;
        if first {
            self.stats.uses += 1;
        }
        self.stats_dirty = true;
    }

    /// Counts a use of the layer at `now` (a stack containing it was brought up).
    pub(crate) fn note_use(&mut self, now: u64) {
        self.stats.uses += 1;
        self.stats.last_used_ns = now;
        self.stats_dirty = true;
    }
}

/// Locks a slot (a poisoned lock is taken over: its state is counters only).
pub(crate) fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every layer's slot, made at first use.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    map: Mutex<HashMap<u64, Arc<Mutex<Slot>>>>,
}

impl Slots {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Arc<Mutex<Slot>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot of layer `n`.
    pub(crate) fn get(&self, n: u64) -> Arc<Mutex<Slot>> {
        self.map().entry(n).or_default().clone()
    }

    /// Every slot there is.
    pub(crate) fn all(&self) -> Vec<(u64, Arc<Mutex<Slot>>)> {
        self.map().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Drops the slot of a removed layer.
    pub(crate) fn forget(&self, n: u64) {
        self.map().remove(&n);
    }

    /// Mount references of layer `n` (0 for a layer without a slot).
    pub(crate) fn mounts(&self, n: u64) -> u32 {
        self.counts(n).1
    }

    /// Usage counters and mount references of layer `n`.
    pub(crate) fn counts(&self, n: u64) -> (LayerStats, u32) {
        let slot = self.map().get(&n).cloned();
        match slot {
            Some(slot) => {
                let g = lock(&slot);
                (g.stats, g.mounts)
            }
            None => (LayerStats::default(), 0),
        }
    }

    /// Number of layers with mount references.
    ///
    /// A slot held by an operation in progress is not waited for (an apply holds its slot for as long as its
    /// stream lasts, and a hostile stream must not delay `Status`); it counts as not mounted.
    pub(crate) fn mounted(&self) -> u64 {
        self.all()
            .iter()
            .filter(|(_, s)| match s.try_lock() {
                Ok(g) => g.mounts > 0,
                Err(TryLockError::Poisoned(p)) => p.into_inner().mounts > 0,
                Err(TryLockError::WouldBlock) => false,
            })
            .count() as u64
    }

    /// Counts a mount request of layer `n` and a use of each of `below` at `now`, if none of their slots is
    /// locked (an operation may hold a slot across I/O); otherwise counts nothing and says false. Never waits,
    /// so it may take the slots all at once.
    pub(crate) fn try_note_external_use(&self, n: u64, below: &[u64], now: u64) -> bool {
        let slots: Vec<Arc<Mutex<Slot>>> = {
            let mut map = self.map();
            std::iter::once(&n)
                .chain(below)
                .map(|k| map.entry(*k).or_default().clone())
                .collect()
        };
        let mut guards = Vec::with_capacity(slots.len());
        for slot in &slots {
            match slot.try_lock() {
                Ok(g) => guards.push(g),
                Err(TryLockError::Poisoned(p)) => guards.push(p.into_inner()),
                Err(TryLockError::WouldBlock) => return false,
            }
        }
        let mut guards = guards.into_iter();
        if let Some(mut own) = guards.next() {
            own.note_get(now, true);
        }
        for mut g in guards {
            g.note_use(now);
        }
        true
    }

    /// Sets the usage counters of layer `n` (loaded from the database).
    pub(crate) fn load_stats(&self, n: u64, stats: LayerStats) {
        lock(&self.get(n)).stats = stats;
    }

    /// Counters changed since the last call, marked clean.
    pub(crate) fn take_dirty(&self) -> Vec<(u64, LayerStats)> {
        let mut out = Vec::new();
        for (n, slot) in self.all() {
            let mut g = lock(&slot);
            if g.stats_dirty {
                g.stats_dirty = false;
                out.push((n, g.stats));
            }
        }
        out
    }

    /// Marks the counters of `layers` changed again (their write failed).
    pub(crate) fn mark_dirty(&self, layers: impl IntoIterator<Item = u64>) {
        for n in layers {
            let slot = self.map().get(&n).cloned();
            if let Some(slot) = slot {
                lock(&slot).stats_dirty = true;
            }
        }
    }

    /// Counts a use at `now` of each of `layers` (the whole stack of a mount: the table is locked once for
    /// all of them, and no slot while it is).
    pub(crate) fn note_uses(&self, layers: &[u64], now: u64) {
        let slots: Vec<Arc<Mutex<Slot>>> = {
            let mut map = self.map();
            layers
                .iter()
                .map(|n| map.entry(*n).or_default().clone())
                .collect()
        };
        for slot in slots {
            lock(&slot).note_use(now);
        }
    }
}
