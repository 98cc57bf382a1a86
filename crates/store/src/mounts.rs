//! Mounts: reference-counted merged views of layers (`get`/`put`), and mount descriptions for callers that
//! mount layers themselves (containerd: `prepare`, `mounts`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lamina_sys::fault;
use lamina_sys::mount::{MountSpec, OverlaySpec};
use tracing::{debug, warn};

use crate::{
    lock, now_ns, Counter, CreateOptions, LayerKind, LayerRecord, LayerState, Lowers, Result, Slot, Store,
    StoreError,
};

impl Store {
    /// Mounts the merged view of a layer (reference counted) and returns its path, the same
    /// path every time. A layer without parent is its own merged view (no mount needed). With
    /// `verify_on_mount`, the stack is checked before its first mount.
    pub fn get(&self, ns: &str, name: &str, mount_label: &str) -> Result<PathBuf> {
        let (n, _) = self.require(ns, name)?;
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        let (n2, rec) = self.require(ns, name)?;
        if n2 != n {
            return Err(StoreError::NotFound(format!("layer {name}")));
        }
        if rec.state == LayerState::Applying {
            return Err(StoreError::InUse(format!("layer {name} is being filled")));
        }
        let dir = self.layer_dir(n);
        let path = if rec.parent.is_none() {
            dir.join("diff")
        } else {
            dir.join("merged")
        };
        let mut brought_up = None;
        // A count of zero means not mounted: `open` counted the mounts a previous run left.
        if guard.mounts == 0 {
            let (lowers, numbers) = self.lowers_locked(&mut guard, &rec)?;
            self.check_before_mount(std::iter::once(n).chain(numbers.iter().copied()))?;
            if rec.parent.is_some() {
                brought_up = Some(numbers);
                let view = rec.kind == LayerKind::View;
                let spec = OverlaySpec {
                    lowers: lowers.to_vec(),
                    upper: (!view).then(|| dir.join("diff")),
                    work: (!view).then(|| dir.join("work")),
                    label: Some(mount_label.to_string()),
                    read_only: view,
                };
                fault::point("store.get.mount")
                    .and_then(|()| self.mounter.mount(&MountSpec::Overlay(spec), &path))
                    .map_err(|e| {
                        StoreError::io(format!("mount layer {name} ({} layers)", lowers.len() + 1), e)
                    })?;
            }
        }
        if brought_up.is_some() {
            let _ = fault::point("store.get.mounted");
        }
        let now = now_ns();
        let first = guard.mounts == 0;
        guard.mounts += 1;
        guard.stats.gets += 1;
        guard.stats.last_used_ns = now;
        if first {
            guard.stats.uses += 1;
        }
        guard.stats_dirty = true;
        debug!(ns, name, layer = n, mounts = guard.mounts, "get");
        drop(guard);
        self.counters.add(Counter::Gets, 1);
        self.counters
            .add(if first { Counter::Mounts } else { Counter::Hits }, 1);
        if let Some(lowers) = brought_up {
            // After the layer's own lock is released: locks are never nested.
            self.note_uses(&lowers, now);
        }
        Ok(path)
    }

    /// Creates the writable layer or view `name` on `parent` and describes its mount, for a caller that
    /// mounts it itself (containerd's Prepare and View): one lookup of the parent and of its chain. With
    /// `verify_on_mount` the parent's stack is checked before anything is created. Counted as one mount
    /// request of the new layer and one use of each layer below it.
    pub fn prepare(
        &self,
        ns: &str,
        name: &str,
        parent: Option<&str>,
        kind: LayerKind,
        labels: BTreeMap<String, String>,
        opts: &CreateOptions,
    ) -> Result<MountSpec> {
        let below = match parent {
            Some(p) if p != name => {
                let (pn, prec) = self
                    .lookup(ns, p)?
                    .ok_or_else(|| StoreError::NotFound(format!("parent {p}")))?;
                let (_, chain) = self.lowers_of(pn, &prec)?;
                let mut numbers = Vec::with_capacity(chain.len() + 1);
                numbers.push(pn);
                numbers.extend(chain.iter().copied());
                self.check_before_mount(numbers.iter().copied())?;
                Some((pn, numbers))
            }
            _ => None,
        };
        let parent = parent.map(|p| (p, below.as_ref().map(|b| b.0)));
        let (n, rec) = self.create_layer(ns, name, parent, kind, labels, opts)?;
        let numbers = below.map(|b| b.1).unwrap_or_default();
        let lowers: Vec<PathBuf> = numbers.iter().map(|p| self.layer_dir(*p).join("diff")).collect();
        self.slot(n).lock().unwrap_or_else(|p| p.into_inner()).lowers =
            Some((Arc::new(lowers.clone()), Arc::new(numbers.clone())));
        self.check_before_mount([n])?;
        self.note_external_use(n, &numbers);
        Ok(self.describe(n, &rec, &lowers))
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
        let (lowers, numbers) = self.lowers_of(n, &rec)?;
        self.check_before_mount(std::iter::once(n).chain(numbers.iter().copied()))?;
        self.note_external_use(n, &numbers);
        Ok(self.describe(n, &rec, &lowers))
    }

    /// The mount of a writable layer or view as containerd's overlayfs snapshotter gives it: a bind mount of
    /// a parentless active layer and of a view of at most one layer, an overlay otherwise.
    fn describe(&self, n: u64, rec: &LayerRecord, lowers: &[PathBuf]) -> MountSpec {
        let dir = self.layer_dir(n);
        match (rec.kind, lowers) {
            (LayerKind::View, []) => MountSpec::Bind {
                source: dir.join("diff"),
                read_only: true,
            },
            (LayerKind::View, [only]) => MountSpec::Bind {
                source: only.clone(),
                read_only: true,
            },
            (LayerKind::View, _) => MountSpec::Overlay(OverlaySpec {
                lowers: lowers.to_vec(),
                read_only: true,
                ..OverlaySpec::default()
            }),
            (_, []) => MountSpec::Bind {
                source: dir.join("diff"),
                read_only: false,
            },
            (_, _) => MountSpec::Overlay(OverlaySpec {
                lowers: lowers.to_vec(),
                upper: Some(dir.join("diff")),
                work: Some(dir.join("work")),
                ..OverlaySpec::default()
            }),
        }
    }

    /// The lower directories of layer `n`'s stack and their numbers, top-most first: walked in the database
    /// once per layer and process (a parent chain never changes), then taken from its slot.
    pub(crate) fn lowers_of(&self, n: u64, rec: &LayerRecord) -> Result<Lowers> {
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        self.lowers_locked(&mut guard, rec)
    }

    fn lowers_locked(&self, slot: &mut Slot, rec: &LayerRecord) -> Result<Lowers> {
        if let Some(l) = &slot.lowers {
            return Ok(l.clone());
        }
        if rec.parent.is_none() {
            return Ok(Lowers::default());
        }
        let chain = self.chain(rec)?;
        let dirs: Vec<PathBuf> = chain.iter().map(|p| self.layer_dir(*p).join("diff")).collect();
        let pair = (Arc::new(dirs), Arc::new(chain));
        slot.lowers = Some(pair.clone());
        Ok(pair)
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
        if rec.parent.is_some() {
            // Detached like overlay2 does: a straggler (a shell cd'ed into it) must not fail the Put.
            let merged = self.layer_dir(n).join("merged");
            fault::point("store.put.unmount")
                .and_then(|()| self.mounter.unmount(&merged, true))
                .map_err(|e| StoreError::io(format!("unmount layer {name}"), e))?;
        }
        debug!(ns, name, layer = n, "put");
        Ok(())
    }

    /// Unmounts every layer this store mounted (engine shutdown).
    pub fn unmount_all(&self) -> Result<()> {
        let slots: Vec<(u64, Arc<Mutex<Slot>>)> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (n, slot) in slots {
            let mut guard = lock(&slot);
            if guard.mounts > 0 {
                let merged = self.layer_dir(n).join("merged");
                if let Err(e) = self.mounter.unmount(&merged, false) {
                    warn!(layer = n, error = %e, "unmount failed, detaching");
                    self.mounter
                        .unmount(&merged, true)
                        .map_err(|e| StoreError::io("detach mount", e))?;
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
