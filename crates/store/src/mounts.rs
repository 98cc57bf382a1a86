//! Mounts: reference-counted merged views of layers (`get`/`put`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lamina_sys::mount::OverlaySpec;
use lamina_sys::{fault, mount};
use tracing::{debug, warn};

use crate::{lock, now_ns, Counter, LayerKind, LayerState, Result, Slot, Store, StoreError};

impl Store {
    /// Mounts the merged view of a layer (reference counted) and returns its path, the same
    /// path every time. A layer without parent is its own merged view (no mount needed).
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
        if guard.mounts == 0 && rec.parent.is_some() {
            let (lowers, numbers) = match &guard.lowers {
                Some(l) => l.clone(),
                None => {
                    let chain = self.chain(&rec)?;
                    let l = Arc::new(
                        chain
                            .iter()
                            .map(|p| self.layer_dir(*p).join("diff"))
                            .collect::<Vec<_>>(),
                    );
                    let pair = (l, Arc::new(chain));
                    guard.lowers = Some(pair.clone());
                    pair
                }
            };
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
                .and_then(|()| mount::mount_overlay(&path, &spec))
                .map_err(|e| {
                    StoreError::io(format!("mount layer {name} ({} layers)", lowers.len() + 1), e)
                })?;
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
                .and_then(|()| mount::unmount(&merged, true))
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
                if let Err(e) = mount::unmount(&merged, false) {
                    warn!(layer = n, error = %e, "unmount failed, detaching");
                    mount::unmount(&merged, true).map_err(|e| StoreError::io("detach mount", e))?;
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
