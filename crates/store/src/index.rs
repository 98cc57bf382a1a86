//! The layer records by name and by parent, indexed in memory (on-disk format 5).
//!
//! A layer's record holds its namespace, its name and its parent, so the database needs no table that maps a
//! name to a number or a parent to its children: both are derived from the records when the store opens, and
//! every write transaction keeps them exact. Each table a write transaction touches costs the pages of its tree
//! on the flush of the commit (a leaf, and a branch once the table outgrows one page). Up to format 4 a create
//! or a removal wrote three tables (name, record, child link): a header and 11 pages in the `snapshotter` bench,
//! where the record alone takes 5 or 6 (docs/on-disk-format.md, "The name and child indexes").
//!
//! Exactness:
//! - Write transactions are serialized by the index's gate, held from [`Index::lock_writes`] (before the
//!   database's own write lock) until the transaction is committed or dropped. A writer reads the index and
//!   its own changes, so its checks (a name taken, a parent with children) are as exact as a table's were.
//! - A writer's changes reach the index in two steps around its commit: the names and links it adds before the
//!   commit, those it drops after it (both under the index's lock, undone if the commit fails). A reader
//!   therefore always finds a layer by any name its snapshot of the records gives it, and confirms what it
//!   finds with the record (a name found here whose record is missing or names something else is not found).
//! - A commit that fails may still have reached the disk: the index is then rebuilt from the records by the
//!   next writer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{LayerRecord, Result, StoreError};

/// What a write transaction changes in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `(ns, name)` names layer `to`, or nothing.
    Name {
        ns: String,
        name: String,
        to: Option<u64>,
    },
    /// `child` is a child of `parent`, or not.
    Child { parent: u64, child: u64, linked: bool },
}

#[derive(Debug, Default)]
struct State {
    /// Namespace -> name -> layer number.
    names: BTreeMap<String, BTreeMap<String, u64>>,
    /// `(parent, child)`.
    children: BTreeSet<(u64, u64)>,
}

impl State {
    fn number(&self, ns: &str, name: &str) -> Option<u64> {
        self.names.get(ns).and_then(|m| m.get(name)).copied()
    }

    fn set_name(&mut self, ns: &str, name: &str, to: Option<u64>) -> Option<u64> {
        match to {
            Some(n) => self
                .names
                .entry(ns.to_string())
                .or_default()
                .insert(name.to_string(), n),
            None => {
                let inner = self.names.get_mut(ns)?;
                let was = inner.remove(name);
                if inner.is_empty() {
                    self.names.remove(ns);
                }
                was
            }
        }
    }

    fn children_of(&self, n: u64) -> impl Iterator<Item = u64> + '_ {
        self.children.range((n, 0)..=(n, u64::MAX)).map(|(_, c)| *c)
    }
}

/// The in-memory indexes of one store's records; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Index {
    state: RwLock<State>,
    /// Whether a write transaction holds the gate.
    writing: Mutex<bool>,
    gate_free: Condvar,
    /// Set when a commit failed: the next writer rebuilds the index from the records.
    stale: AtomicBool,
}

/// The right to write, held by one write transaction at a time; given back when dropped.
#[derive(Debug)]
pub(crate) struct WriteGate {
    index: Arc<Index>,
}

impl Drop for WriteGate {
    fn drop(&mut self) {
        *self.index.writing.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.index.gate_free.notify_one();
    }
}

/// Where a name ends up: `(ns, name)` and the number it names, or none.
type NameEffect = ((String, String), Option<u64>);
/// Where a link ends up: `(parent, child)` and whether it exists.
type LinkEffect = ((u64, u64), bool);

/// The net effect of a transaction's changes, key by key, in the order first changed.
fn net(changes: &[Change]) -> (Vec<NameEffect>, Vec<LinkEffect>) {
    let mut names: Vec<NameEffect> = Vec::new();
    let mut links: Vec<LinkEffect> = Vec::new();
    for c in changes {
        match c {
            Change::Name { ns, name, to } => {
                let key = (ns.clone(), name.clone());
                match names.iter_mut().find(|(k, _)| *k == key) {
                    Some(slot) => slot.1 = *to,
                    None => names.push((key, *to)),
                }
            }
            Change::Child {
                parent,
                child,
                linked,
            } => match links.iter_mut().find(|(k, _)| *k == (*parent, *child)) {
                Some(slot) => slot.1 = *linked,
                None => links.push(((*parent, *child), *linked)),
            },
        }
    }
    (names, links)
}

/// The additions of a transaction made visible before its commit; taken back when dropped unless the commit
/// went through.
struct Published<'a> {
    index: &'a Index,
    /// Each name published, with the number it named before.
    names: Vec<NameEffect>,
    links: Vec<(u64, u64)>,
    committed: bool,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut state = self.index.write_state();
        for ((ns, name), before) in self.names.drain(..) {
            state.set_name(&ns, &name, before);
        }
        for link in self.links.drain(..) {
            state.children.remove(&link);
        }
    }
}

impl Index {
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the indexes by those of `records`. Two records with one name are corrupt metadata.
    pub(crate) fn rebuild<'r>(
        &self,
        records: impl IntoIterator<Item = (u64, &'r LayerRecord)>,
    ) -> Result<()> {
        let mut state = State::default();
        for (n, rec) in records {
            if let Some(other) = state.set_name(&rec.ns, &rec.name, Some(n)) {
                return Err(StoreError::CorruptMetadata(format!(
                    "layers {other:x} and {n:x} are both named {:?} in namespace {:?}",
                    rec.name, rec.ns
                )));
            }
            if let Some(p) = rec.parent {
                state.children.insert((p, n));
            }
        }
        *self.write_state() = state;
        self.stale.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Waits for the gate of the write transactions (see the module documentation).
    pub(crate) fn lock_writes(self: &Arc<Self>) -> WriteGate {
        let mut writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        while *writing {
            writing = self.gate_free.wait(writing).unwrap_or_else(|p| p.into_inner());
        }
        *writing = true;
        WriteGate { index: self.clone() }
    }

    /// Whether a failed commit left the index in doubt (checked by writers, under the gate).
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    /// The number `(ns, name)` names.
    pub(crate) fn number(&self, ns: &str, name: &str) -> Option<u64> {
        self.read_state().number(ns, name)
    }

    /// The number `(ns, name)` names once `changes` (a writer's, in order) are made.
    pub(crate) fn number_after(&self, changes: &[Change], ns: &str, name: &str) -> Option<u64> {
        let own = changes.iter().rev().find_map(|c| match c {
            Change::Name {
                ns: cn,
                name: cname,
                to,
            } if cn == ns && cname == name => Some(*to),
            _ => None,
        });
        match own {
            Some(to) => to,
            None => self.number(ns, name),
        }
    }

    /// Whether layer `n` has children once `changes` are made.
    pub(crate) fn has_children_after(&self, changes: &[Change], n: u64) -> bool {
        let own = changes
            .iter()
            .any(|c| matches!(c, Change::Child { parent, .. } if *parent == n));
        if !own {
            return self.read_state().children_of(n).next().is_some();
        }
        let mut kids: BTreeSet<u64> = self.read_state().children_of(n).collect();
        for c in changes {
            if let Change::Child {
                parent,
                child,
                linked,
            } = c
            {
                if *parent == n {
                    if *linked {
                        kids.insert(*child);
                    } else {
                        kids.remove(child);
                    }
                }
            }
        }
        !kids.is_empty()
    }

    /// `(name, number)` of every layer of `ns`, in name order.
    pub(crate) fn names_in(&self, ns: &str) -> Vec<(String, u64)> {
        self.read_state()
            .names
            .get(ns)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// Every `(namespace, name, number)`, in that order.
    pub(crate) fn all_names(&self) -> Vec<(String, String, u64)> {
        let state = self.read_state();
        let mut out = Vec::new();
        for (ns, names) in &state.names {
            out.extend(names.iter().map(|(name, n)| (ns.clone(), name.clone(), *n)));
        }
        out
    }

    /// Number of children per layer (of `only`, or of every layer that has some).
    pub(crate) fn child_counts(&self, only: Option<u64>) -> HashMap<u64, u64> {
        let state = self.read_state();
        let mut out: HashMap<u64, u64> = HashMap::new();
        let links: Box<dyn Iterator<Item = &(u64, u64)>> = match only {
            Some(n) => Box::new(state.children.range((n, 0)..=(n, u64::MAX))),
            None => Box::new(state.children.iter()),
        };
        for (p, _) in links {
            *out.entry(*p).or_default() += 1;
        }
        out
    }

    /// Commits a writer's transaction with `commit`, making `changes` visible around it (see the module
    /// documentation). A failed commit leaves the index as it was and marks it for a rebuild.
    pub(crate) fn commit_with(&self, changes: &[Change], commit: impl FnOnce() -> Result<()>) -> Result<()> {
        if changes.is_empty() {
            return commit().inspect_err(|_| self.stale.store(true, Ordering::SeqCst));
        }
        let (names, links) = net(changes);
        let mut published = Published {
            index: self,
            names: Vec::new(),
            links: Vec::new(),
            committed: false,
        };
        {
            let mut state = self.write_state();
            for ((ns, name), to) in &names {
                if to.is_some() {
                    let before = state.set_name(ns, name, *to);
                    published.names.push(((ns.clone(), name.clone()), before));
                }
            }
            for (link, linked) in &links {
                if *linked && state.children.insert(*link) {
                    published.links.push(*link);
                }
            }
        }
        if let Err(e) = commit() {
            self.stale.store(true, Ordering::SeqCst);
            return Err(e);
        }
        published.committed = true;
        let mut state = self.write_state();
        for ((ns, name), to) in &names {
            if to.is_none() {
                state.set_name(ns, name, None);
            }
        }
        for (link, linked) in &links {
            if !*linked {
                state.children.remove(link);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerKind, LayerState};

    fn rec(ns: &str, name: &str, parent: Option<u64>) -> LayerRecord {
        LayerRecord {
            ns: ns.into(),
            name: name.into(),
            parent,
            depth: u32::from(parent.is_some()),
            kind: LayerKind::ReadOnly,
            state: LayerState::Empty,
            size: None,
            digest: None,
            created_ns: 0,
            updated_ns: 0,
            inodes: None,
            labels: BTreeMap::new(),
            manifest: None,
            max_size: None,
            shared: None,
        }
    }

    fn name(ns: &str, name: &str, to: Option<u64>) -> Change {
        Change::Name {
            ns: ns.into(),
            name: name.into(),
            to,
        }
    }

    fn link(parent: u64, child: u64, linked: bool) -> Change {
        Change::Child {
            parent,
            child,
            linked,
        }
    }

    #[test]
    fn rebuilt_from_records_and_refusing_a_name_given_twice() {
        let ix = Index::default();
        let (a, b) = (rec("x", "a", None), rec("x", "b", Some(1)));
        ix.rebuild([(1, &a), (2, &b)]).unwrap();
        assert_eq!(ix.number("x", "b"), Some(2));
        assert_eq!(ix.number("y", "b"), None);
        assert_eq!(ix.names_in("x"), vec![("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(ix.child_counts(None), HashMap::from([(1, 1)]));
        assert!(ix.has_children_after(&[], 1) && !ix.has_children_after(&[], 2));
        let twice = rec("x", "a", None);
        let e = ix.rebuild([(1, &a), (3, &twice)]).unwrap_err();
        assert!(matches!(e, StoreError::CorruptMetadata(_)), "{e}");
        // The refused rebuild changed nothing.
        assert_eq!(ix.number("x", "b"), Some(2));
    }

    #[test]
    fn a_writer_sees_its_own_changes_and_others_see_them_once_committed() {
        let ix = Index::default();
        ix.rebuild([(1, &rec("x", "key", None))]).unwrap();
        // A commit renames `key` to `done`; a create adds `c` under 1.
        let changes = vec![
            name("x", "key", None),
            name("x", "done", Some(1)),
            link(1, 5, true),
        ];
        assert_eq!(ix.number_after(&changes, "x", "done"), Some(1));
        assert_eq!(ix.number_after(&changes, "x", "key"), None);
        assert!(ix.has_children_after(&changes, 1));
        assert_eq!(ix.number("x", "done"), None);
        ix.commit_with(&changes, || {
            // During the commit both names lead to the layer (its record decides which one it has).
            assert_eq!(ix.number("x", "key"), Some(1));
            assert_eq!(ix.number("x", "done"), Some(1));
            Ok(())
        })
        .unwrap();
        assert_eq!(ix.number("x", "key"), None);
        assert_eq!(ix.number("x", "done"), Some(1));
        assert!(ix.has_children_after(&[], 1));
        assert!(!ix.is_stale());
        // A removal drops the name and the link after its commit.
        ix.commit_with(&[name("x", "done", None), link(1, 5, false)], || Ok(()))
            .unwrap();
        assert_eq!(ix.names_in("x"), vec![]);
        assert!(!ix.has_children_after(&[], 1));
    }

    #[test]
    fn a_failed_commit_takes_its_additions_back_and_asks_for_a_rebuild() {
        let ix = Index::default();
        ix.rebuild([(1, &rec("x", "a", None))]).unwrap();
        let e = ix
            .commit_with(
                &[name("x", "a", None), name("x", "b", Some(2)), link(1, 2, true)],
                || {
                    Err(StoreError::io(
                        "commit metadata",
                        std::io::Error::other("disk gone"),
                    ))
                },
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        assert_eq!(ix.number("x", "a"), Some(1));
        assert_eq!(ix.number("x", "b"), None);
        assert!(!ix.has_children_after(&[], 1));
        assert!(ix.is_stale());
        ix.rebuild([(1, &rec("x", "a", None))]).unwrap();
        assert!(!ix.is_stale());
    }

    #[test]
    fn one_writer_at_a_time() {
        let ix = Arc::new(Index::default());
        let gate = ix.lock_writes();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = {
            let ix = ix.clone();
            std::thread::spawn(move || {
                let _g = ix.lock_writes();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(std::time::Duration::from_millis(50)).is_err());
        drop(gate);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        other.join().unwrap();
    }
}
