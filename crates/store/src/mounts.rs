//! Mounts: reference-counted merged views of layers (`get`/`put`), and mount descriptions for callers that
//! mount layers themselves (containerd: `prepare`, `mounts`).

use std::path::PathBuf;
use std::sync::Arc;

use lamina_sys::fault;
use lamina_sys::mount::MountSpec;
use tracing::{debug, warn};

use crate::{
    lock, now_ns, Counter, LayerKind, LayerRecord, LayerState, Lowers, NewLayer, Result, Slot, Store,
    StoreError,
};

impl Store {
    /// Mounts the merged view of a layer (reference counted) and returns its path, the same
    /// path every time. A layer without parent is its own merged view (no mount needed). With
    /// `verify_on_mount`, the stack is checked before its first mount.
    pub fn get(&self, ns: &str, name: &str, mount_label: &str) -> Result<PathBuf> {
        // The number finds the layer's lock; its record is read under it (and confirms the name).
        let n = self
            .index
            .number(ns, name)
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        // Numbers are never reused: under the lock, the record of `n` still naming the layer is the layer
        // (a removal deletes it, a commit renames it).
        let rec = self
            .record_by_number(n)?
            .filter(|r| r.ns == ns && r.name == name)
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
        if rec.state == LayerState::Applying {
            return Err(StoreError::InUse(format!("layer {name} is being filled")));
        }
        let (path, needs_mount) = self.backend.view(n, &rec);
        let mut brought_up = None;
        // A count of zero means not mounted: `open` counted the mounts a previous run left.
        if guard.mounts == 0 {
            let below = self.lowers_locked(&mut guard, &rec)?;
            self.check_before_mount(std::iter::once(n).chain(below.iter().copied()))?;
            if needs_mount {
                fault::point("store.get.mount")
                    .and_then(|()| self.backend.mount(n, &rec, &below, mount_label))
                    .map_err(|e| {
                        StoreError::wrap(format!("mount layer {name} ({} layers)", below.len() + 1), e)
                    })?;
                brought_up = Some(below);
            }
        }
        if brought_up.is_some() {
            let _ = fault::point("store.get.mounted");
        }
        let now = now_ns();
        let first = guard.mounts == 0;
        guard.mounts += 1;
        guard.note_get(now, first);
        debug!(ns, name, layer = n, mounts = guard.mounts, "get");
        drop(guard);
        self.counters.add(Counter::Gets, 1);
        self.counters
            .add(if first { Counter::Mounts } else { Counter::Hits }, 1);
        if let Some(lowers) = brought_up {
            // After the layer's own lock is released: locks are never nested.
            self.slots.note_uses(&lowers, now);
        }
        Ok(path)
    }

    /// Creates the writable layer or view `layer` and describes its mount, for a caller that
    /// mounts it itself (containerd's Prepare and View): one lookup of the parent and of its chain. With
    /// `verify_on_mount` the parent's stack is checked before anything is created. Counted as one mount
    /// request of the new layer and one use of each layer below it.
    pub fn prepare(&self, layer: NewLayer<'_>) -> Result<MountSpec> {
        let (ns, name) = (layer.ns, layer.name);
        let below = match layer.parent {
            Some(p) if p != name => {
                let (pn, prec) = self
                    .lookup(ns, p)?
                    .ok_or_else(|| StoreError::NotFound(format!("parent {p}")))?;
                let chain = self.lowers_of(pn, &prec)?;
                let mut numbers = Vec::with_capacity(chain.len() + 1);
                numbers.push(pn);
                numbers.extend(chain.iter().copied());
                self.check_before_mount(numbers.iter().copied())?;
                Some((pn, numbers))
            }
            _ => None,
        };
        let (n, rec) = self.create_layer(layer, below.as_ref().map(|b| b.0))?;
        let below = Arc::new(below.map(|b| b.1).unwrap_or_default());
        lock(&self.slot(n)).lowers = Some(below.clone());
        self.check_before_mount([n])?;
        self.note_external_use(n, &below);
        self.backend.describe(n, &rec, &below)
    }

    /// Describes the mount of the writable layer or view `name`, for a caller that mounts it itself
    /// (containerd's Mounts); a frozen layer has no mount ([`StoreError::Precondition`]). With
    /// `verify_on_mount` its stack is checked first. Counted like [`Store::prepare`].
    pub fn mounts(&self, ns: &str, name: &str) -> Result<MountSpec> {
        let (n, rec) = self.require(ns, name)?;
        if rec.kind == LayerKind::ReadOnly {
            return Err(StoreError::Precondition(format!(
                "{name} is committed; only active snapshots and views have mounts"
            )));
        }
        let below = self.lowers_of(n, &rec)?;
        self.check_before_mount(std::iter::once(n).chain(below.iter().copied()))?;
        self.note_external_use(n, &below);
        self.backend.describe(n, &rec, &below)
    }

    /// [`Store::mounts`] when it waits on nothing: the backend describes a mount without I/O, the layer's chain
    /// is in its slot (it was prepared or mounted by this process), no slot of its stack is locked by an
    /// operation in progress and no layer of its stack is left for `verify_on_mount` to read. `Ok(None)` otherwise, for the caller to call [`Store::mounts`] where it may
    /// block. The record is read as in [`Store::mounts`] (a read transaction of the metadata, answered from
    /// caches), so the answer is the same.
    pub fn mounts_cached(&self, ns: &str, name: &str) -> Result<Option<MountSpec>> {
        if !self.backend.describes_in_memory() {
            return Ok(None);
        }
        let (n, rec) = self.require(ns, name)?;
        if rec.kind == LayerKind::ReadOnly {
            return Err(StoreError::Precondition(format!(
                "{name} is committed; only active snapshots and views have mounts"
            )));
        }
        // The slot's lock may be held across I/O (an apply, a commit's flush): not waited for.
        let slot = self.slot(n);
        let cached = match slot.try_lock() {
            Ok(g) => g.lowers.clone(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().lowers.clone(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        let below = match cached {
            Some(l) => l,
            None if rec.parent.is_none() => Lowers::default(),
            None => return Ok(None),
        };
        if !self.checked_already(std::iter::once(n).chain(below.iter().copied()))
            || !self.try_note_external_use(n, &below)
        {
            return Ok(None);
        }
        self.backend.describe(n, &rec, &below).map(Some)
    }

    /// The layers below layer `n`, nearest first: walked in the database once per layer and process (a parent
    /// chain never changes), then taken from its slot.
    pub(crate) fn lowers_of(&self, n: u64, rec: &LayerRecord) -> Result<Lowers> {
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        self.lowers_locked(&mut guard, rec)
    }

    /// Gives the new layer `n` its chain from its parent `pn`'s (walked in the database once per parent and
    /// process), so that its first mount reads nothing: a container layer's chain is its image's.
    pub(crate) fn inherit_lowers(&self, n: u64, pn: u64) -> Result<()> {
        let parent = self.slot(pn);
        let cached = lock(&parent).lowers.clone();
        let above = match cached {
            Some(l) => l,
            None => match self.record_by_number(pn)? {
                Some(prec) => self.lowers_of(pn, &prec)?,
                None => return Ok(()),
            },
        };
        let mut chain = Vec::with_capacity(above.len() + 1);
        chain.push(pn);
        chain.extend(above.iter().copied());
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        if guard.lowers.is_none() {
            guard.lowers = Some(Arc::new(chain));
        }
        Ok(())
    }

    fn lowers_locked(&self, slot: &mut Slot, rec: &LayerRecord) -> Result<Lowers> {
        if let Some(l) = &slot.lowers {
            return Ok(l.clone());
        }
        if rec.parent.is_none() {
            return Ok(Lowers::default());
        }
        let chain = Arc::new(self.chain(rec)?);
        slot.lowers = Some(chain.clone());
        Ok(chain)
    }

    /// Releases one [`Store::get`]; unmounts when the count reaches zero. Extra puts are harmless.
    pub fn put(&self, ns: &str, name: &str) -> Result<()> {
        let (n, rec) = self.require(ns, name)?;
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        self.counters.add(Counter::Puts, 1);
        if guard.mounts > 1 {
            guard.mounts -= 1;
            return Ok(());
        }
        guard.mounts = 0;
        if self.backend.view(n, &rec).1 {
            // Detached like overlay2 does: a straggler (a shell cd'ed into it) must not fail the Put. The
            // backend may finish the teardown (the sync of the upper filesystem) after the answer.
            fault::point("store.put.unmount")
                .and_then(|()| self.backend.release(n))
                .map_err(|e| StoreError::wrap(format!("unmount layer {name}"), e))?;
        }
        debug!(ns, name, layer = n, "put");
        Ok(())
    }

    /// Unmounts every layer this store mounted (engine shutdown).
    pub fn unmount_all(&self) -> Result<()> {
        let slots = self.slots.all();
        for (n, slot) in slots {
            let mut guard = lock(&slot);
            if guard.mounts > 0 {
                if let Err(e) = self.backend.unmount(n, false) {
                    warn!(layer = n, error = %e, "unmount failed, detaching");
                    self.backend
                        .unmount(n, true)
                        .map_err(|e| StoreError::wrap("detach mount", e))?;
                }
                guard.mounts = 0;
            }
        }
        Ok(())
    }
}

/// A reference-counted mount held for the duration of a diff.
pub struct MountGuard<'a> {
    store: &'a Store,
    ns: String,
    name: String,
    /// Path of the merged view.
    pub path: PathBuf,
}

impl<'a> MountGuard<'a> {
    pub(crate) fn new(store: &'a Store, ns: &str, name: &str) -> Result<Self> {
        let path = store.get(ns, name, "")?;
        Ok(MountGuard {
            store,
            ns: ns.to_string(),
            name: name.to_string(),
            path,
        })
    }
}

impl Drop for MountGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.put(&self.ns, &self.name) {
            warn!(layer = %self.name, error = %e, "releasing diff mount");
        }
    }
}
