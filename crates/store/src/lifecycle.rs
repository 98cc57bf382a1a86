//! Layer lifecycle: create, commit (freeze under a new name), relabel, remove.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use lamina_sys::fault;
use lamina_sys::mount::MAX_OVERLAY_LOWERS;
use tracing::{debug, warn};

use crate::tables::Writer;
use crate::verify::{commit_manifest, INLINE_SEAL_BYTES, INLINE_SEAL_INODES};
use crate::{
    lock, now_ns, Counter, LayerKind, LayerRecord, LayerState, NewLayer, Result, Store, StoreError,
    MAX_DEPTH, MIN_SIZE,
};

impl Store {
    /// Creates the empty layer `layer.name` in `layer.ns` on `layer.parent`. With
    /// [`parent_kind`](crate::CreateOptions::parent_kind) the parent's kind is checked in the creating transaction (a snapshotter builds only on committed layers;
    /// otherwise [`StoreError::Precondition`]); [`max_size`](crate::CreateOptions::max_size)
    /// is a size limit.
    pub fn create(&self, layer: NewLayer<'_>) -> Result<()> {
        let (ns, name) = (layer.ns, layer.name);
        let (n, rec) = self.create_layer(layer, None)?;
        if let Some(pn) = rec.parent {
            // The layer exists: a failure here only leaves its chain to be read at its first mount.
            if let Err(e) = self.inherit_lowers(n, pn) {
                warn!(ns, name, layer = n, error = %e, "could not take the parent's chain");
            }
        }
        Ok(())
    }

    /// Creates an empty layer; gives its number and record. `expected_parent` is the number of the parent
    /// when the caller resolved it already: the creating transaction then refuses a parent that was replaced
    /// meanwhile ([`StoreError::NotFound`]).
    pub(crate) fn create_layer(
        &self,
        layer: NewLayer<'_>,
        expected_parent: Option<u64>,
    ) -> Result<(u64, LayerRecord)> {
        let NewLayer {
            ns,
            name,
            parent,
            kind,
            labels,
            options: opts,
        } = layer;
        let parent_kind = opts.parent_kind;
        if let Some(size) = opts.max_size {
            if size < MIN_SIZE {
                return Err(StoreError::InvalidArgument(format!(
                    "size limit {size} is below the smallest, {MIN_SIZE} bytes"
                )));
            }
        }
        if parent == Some(name) {
            return Err(StoreError::InvalidArgument(format!(
                "layer {name} cannot be its own parent"
            )));
        }
        // Storage made ahead comes with its number, taken from the same counter.
        let ahead = match opts.max_size {
            None => self.backend.made_ahead(),
            Some(_) => None,
        };
        let n = match &ahead {
            Some(made) => made.n,
            None => self.next_id.fetch_add(1, Ordering::SeqCst),
        };
        // Nothing mounts it between its record and its storage.
        let slot = self.slot(n);
        let guard = lock(&slot);
        // The record first, the storage after it: a crash between the two leaves a record without storage,
        // which the next start makes (an empty layer has nothing to lose); never storage without a record,
        // which the store could not tell from data it does not know (docs/on-disk-format.md).
        let mut created_parent = None;
        let result = (|| {
            let txn = self.write()?;
            if txn.number(ns, name)?.is_some() {
                return Err(StoreError::AlreadyExists(format!("layer {name}")));
            }
            let (parent_n, depth) = parent_of(&txn, ns, name, parent, expected_parent, parent_kind)?;
            let now = now_ns();
            let rec = LayerRecord {
                ns: ns.to_string(),
                name: name.to_string(),
                parent: parent_n,
                depth,
                kind,
                state: LayerState::Empty,
                size: None,
                digest: None,
                created_ns: now,
                updated_ns: now,
                inodes: None,
                labels,
                manifest: None,
                max_size: opts.max_size,
                shared: None,
            };
            created_parent = parent_n;
            txn.put_name(ns, name, n)?;
            txn.put_layer(n, &rec)?;
            if let Some(pn) = parent_n {
                txn.add_child(pn, n)?;
            }
            txn.reserve_id(n)?;
            fault::point("store.create.commit").map_err(|e| StoreError::io("commit metadata", e))?;
            txn.commit()?;
            Ok(rec)
        })();
        let rec = match result {
            Ok(rec) => rec,
            Err(e) => {
                drop(guard);
                self.slots.forget(n);
                // Storage made ahead goes with the number.
                drop(ahead);
                return Err(e);
            }
        };
        let made = fault::point("store.create.mkdir")
            .map_err(|e| StoreError::io("create layer directories", e))
            .and_then(|()| match ahead {
                Some(made) => Ok(made.keep()),
                None => self.backend.create(n, rec.parent, opts.max_size),
            });
        if let Err(e) = made {
            self.backend.discard(n);
            let forget = self.write().and_then(|txn| {
                txn.remove_name(ns, name)?;
                txn.remove_layer(n, created_parent)?;
                txn.commit()
            });
            if let Err(e2) = forget {
                warn!(ns, name, layer = n, error = %e2, "could not drop the record of a failed create; the next start makes its directories");
            }
            drop(guard);
            self.slots.forget(n);
            return Err(e);
        }
        drop(guard);
        // After the work: only `kill`/`sleep` make sense here, an error action is ignored.
        let _ = fault::point("store.create.done");
        debug!(ns, name, layer = n, "created layer");
        Ok((n, rec))
    }

    /// Removes a layer: unmounts it if mounted (as overlay2 does), refuses if it has children.
    /// Removing an unknown layer succeeds (dockerd retries removals); the result tells whether it existed.
    pub fn remove(&self, ns: &str, name: &str) -> Result<bool> {
        let Some((n, _)) = self.lookup(ns, name)? else {
            return Ok(false);
        };
        let slot = self.slot(n);
        let mut guard = lock(&slot);
        // Re-check under the layer lock.
        let Some((n2, rec)) = self.lookup(ns, name)? else {
            return Ok(false);
        };
        if n2 != n {
            return Err(StoreError::InUse(format!(
                "layer {name} was replaced concurrently"
            )));
        }
        if self.read()?.has_children(n)? {
            return Err(StoreError::InUse(format!("layer {name} has child layers")));
        }
        if guard.mounts > 0 || self.backend.is_mounted(n) {
            fault::point("store.remove.unmount")
                .and_then(|()| self.backend.unmount(n, false))
                .map_err(|e| {
                    StoreError::InUse(format!("layer {name} is mounted and cannot be unmounted: {e}"))
                })?;
            guard.mounts = 0;
        }
        let txn = self.write()?;
        // A child may have been created since the check above.
        if txn.has_children(n)? {
            return Err(StoreError::InUse(format!("layer {name} has child layers")));
        }
        txn.remove_name(ns, name)?;
        txn.remove_layer(n, rec.parent)?;
        // The proof, should a crash leave the storage behind, that it is this store's to delete.
        txn.put_removed(n, now_ns())?;
        fault::point("store.remove.commit").map_err(|e| StoreError::io("commit metadata", e))?;
        txn.commit()?;
        // Out of view at once; the content may go in the background.
        self.backend.remove(n, rec.max_size);
        drop(guard);
        self.slots.forget(n);
        let _ = fault::point("store.remove.done");
        debug!(ns, name, layer = n, "removed layer");
        Ok(true)
    }

    /// Freezes the writable layer `key` under the new name `name` (same number, same directory, no copy):
    /// its kind becomes [`LayerKind::ReadOnly`], its labels are replaced by `labels`, its creation time is now, and its disk usage is
    /// recorded. `key` disappears. A view or an already frozen layer gives [`StoreError::Precondition`], an
    /// existing `name` [`StoreError::AlreadyExists`], a mounted layer [`StoreError::InUse`].
    pub fn commit(
        &self,
        ns: &str,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<LayerRecord> {
        let (n, _) = self.require(ns, key)?;
        let slot = self.slot(n);
        let guard = lock(&slot);
        let (n2, rec) = self.require(ns, key)?;
        if n2 != n {
            return Err(StoreError::NotFound(format!("layer {key}")));
        }
        if rec.kind != LayerKind::ReadWrite {
            return Err(StoreError::Precondition(format!(
                "{key} is not an active (writable) layer"
            )));
        }
        if guard.mounts > 0 {
            return Err(StoreError::InUse(format!("layer {key} is mounted")));
        }
        // A name already taken is refused before the backend seals anything.
        if self.read()?.number(ns, name)?.is_some() {
            return Err(StoreError::AlreadyExists(format!("layer {name}")));
        }
        // Usage first (it reads the tree); the layer cannot change kind meanwhile: we hold its lock. The
        // content must be on disk before the record says it is frozen. A small layer's manifest is made before
        // that flush and goes into the record's transaction with its digest, or, when it is too large for the
        // database, into its file before the flush, which makes it durable with the content
        // (docs/on-disk-format.md, "Commit").
        let mut manifest = None;
        let paths = self.backend.paths(n);
        let usage = if self.backend.manifests() {
            self.backend.freeze_with(n, &mut |usage| {
                if usage.bytes <= INLINE_SEAL_BYTES && usage.inodes <= INLINE_SEAL_INODES {
                    match commit_manifest(&paths.content, &paths.manifest) {
                        Ok(made) => manifest = Some(made),
                        // Left to the background writer, as for a large layer.
                        Err(e) => {
                            debug!(ns, key, layer = n, error = %e, "manifest not written with the commit")
                        }
                    }
                }
                Ok(())
            })?
        } else {
            self.backend.freeze(n)?
        };
        // From here an error leaves the layer writable, with a large manifest's file beside it that no record
        // names (only a recorded digest makes a manifest count); the next Commit writes it again. It is not removed:
        // a record commit that failed may still have reached the disk.
        let txn = self.write()?;
        if txn.number(ns, name)?.is_some() {
            return Err(StoreError::AlreadyExists(format!("layer {name}")));
        }
        txn.remove_name(ns, key)?;
        txn.put_name(ns, name, n)?;
        let digest = manifest.as_ref().map(|m| m.digest.clone());
        let rec = rec.committed(name, labels, usage.bytes, usage.inodes, digest);
        txn.put_layer(n, &rec)?;
        if let Some(bytes) = manifest.as_ref().and_then(|m| m.inline.as_deref()) {
            txn.put_manifest(n, bytes)?;
        }
        fault::point("store.commit.commit").map_err(|e| StoreError::io("commit metadata", e))?;
        txn.commit()?;
        drop(guard);
        let _ = fault::point("store.commit.done");
        // Frozen by this store: trusted by `verify_on_mount` until the store is dropped.
        self.trust(n);
        if manifest.is_none() {
            // As after an apply: the manifest is written in the background, Commit does not wait for it.
            self.seal_later(n);
        }
        self.counters.add(Counter::Commits, 1);
        debug!(ns, key, name, layer = n, "committed layer");
        Ok(rec)
    }

    /// Changes the labels of `name` with `f` in one transaction and moves its update time.
    pub fn update_labels(
        &self,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<LayerRecord> {
        let txn = self.write()?;
        let n = txn
            .number(ns, name)?
            .ok_or_else(|| StoreError::NotFound(format!("layer {name}")))?;
        let mut rec = txn.require_layer(n)?;
        f(&mut rec.labels);
        rec.updated_ns = now_ns();
        txn.put_layer(n, &rec)?;
        txn.commit()?;
        Ok(rec)
    }
}

/// The number of the parent `parent` of the new layer `name` in `ns` and the new layer's depth, read in the
/// creating transaction: the parent must exist (with the number `expected_parent` when the caller resolved it
/// already), be of `parent_kind` when given, and leave room in an overlay stack.
pub(crate) fn parent_of(
    txn: &Writer,
    ns: &str,
    name: &str,
    parent: Option<&str>,
    expected_parent: Option<u64>,
    parent_kind: Option<LayerKind>,
) -> Result<(Option<u64>, u32)> {
    let Some(p) = parent else {
        return Ok((None, 0));
    };
    let pn = txn
        .number(ns, p)?
        .filter(|pn| expected_parent.is_none_or(|e| e == *pn))
        .ok_or_else(|| StoreError::NotFound(format!("parent {p}")))?;
    let prec = txn.require_layer(pn)?;
    if let Some(want) = parent_kind {
        if prec.kind != want {
            return Err(StoreError::Precondition(format!(
                "parent {p} is {:?}, not {want:?}",
                prec.kind
            )));
        }
    }
    if prec.depth + 1 > MAX_DEPTH {
        return Err(StoreError::LimitExceeded(format!(
            "layer {name} would sit on {} layers; overlay stacks at most {MAX_OVERLAY_LOWERS}",
            prec.depth + 1
        )));
    }
    Ok((Some(pn), prec.depth + 1))
}
