//! Change lists, with Docker's rules.
//!
//! [`layer_changes`] follows moby's overlay `changes()`: walk the upper dir only; a
//! whiteout, and an opaque directory, is a Delete; an entry present below is a Modify,
//! except a directory whose size, mode and mtime equal the one below (not recorded by
//! itself); anything else is an Add. Every directory that holds a change is listed too,
//! as a Modify unless it was already recorded, the root excepted: what `docker diff`
//! shows on vfs (moby's `ChangesDirs`, which keeps the directories so that a diff tar
//! carries their permissions) and what overlay2 shows for a copied-up parent. moby's
//! overlay walker adds only the direct parent of an Add or Delete. Unlike moby (which `stat`s each
//! lower dir naively, following symlinks), the lookup below is the merged view of the
//! lower dirs: their whiteouts and opaque directories hide what is under them, and
//! symlinks are never followed.
//!
//! [`tree_changes`] follows moby's `ChangesDirs`: compare type+mode, uid, gid, rdev,
//! `security.capability`, and for non-directories size and mtime (seconds, nanoseconds
//! ignored when either side has none); same (dev, ino) is unchanged; a deleted
//! directory is reported alone; a directory with changes inside is a Modify.
//!
//! Output is sorted in walk order (parents first, siblings by name bytes).

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lamina_sys::fs::{self as sfs, FileKind, FileStat, OPAQUE_XATTR};

use crate::util::{cmp_paths, join, show, split_parent, IoContext};
use crate::walk::{walk, Found, Visitor};
use crate::{ArchiveError, Change, ChangeKind};

fn abs(path: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(path.len() + 1);
    p.push(b'/');
    p.extend_from_slice(path);
    p
}

fn sort(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort_by(|a, b| cmp_paths(&a.path, &b.path).then(a.kind.cmp(&b.kind)));
    changes.dedup_by(|a, b| a.path == b.path);
    changes
}

/// moby's `sameFsTime`: equal, or same seconds with either side lacking nanoseconds.
fn same_time(a: &FileStat, b: &FileStat) -> bool {
    a.mtime_sec == b.mtime_sec && (a.mtime_nsec == b.mtime_nsec || a.mtime_nsec == 0 || b.mtime_nsec == 0)
}

fn opaque_at(dir: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<bool, ArchiveError> {
    Ok(sfs::get_xattr_at(dir, name, OPAQUE_XATTR.as_bytes())
        .ctx(|| format!("reading xattrs of {}", show(path)))?
        .as_deref()
        == Some(b"y"))
}

/// One directory of the upper walk and the lower dirs (indices, top-most first) in which
/// the same directory is visible.
struct LowerLevel {
    path: Vec<u8>,
    active: Vec<usize>,
    /// Opened lazily, dropped when a child level is entered.
    fds: Option<Vec<OwnedFd>>,
}

struct LayerChanges<'a> {
    lowers: &'a [BorrowedFd<'a>],
    stack: Vec<LowerLevel>,
    changes: Vec<Change>,
    changed_dirs: HashSet<Vec<u8>>,
}

impl LayerChanges<'_> {
    /// Looks `name` up in the merged lower view of the current directory. Returns its
    /// stat and, for a directory, the lowers in which it is visible.
    fn lookup(&mut self, name: &[u8]) -> Result<Option<(FileStat, Vec<usize>)>, ArchiveError> {
        let level = self.stack.last_mut().expect("root level");
        if level.fds.is_none() {
            let mut fds = Vec::with_capacity(level.active.len());
            for &i in &level.active {
                fds.push(
                    sfs::open_dir_beneath(self.lowers[i], &level.path)
                        .ctx(|| format!("opening /{} in lower dir {i}", show(&level.path)))?,
                );
            }
            level.fds = Some(fds);
        }
        let fds = level.fds.as_ref().expect("opened above");
        let path = join(&level.path, name);
        let mut found: Option<FileStat> = None;
        let mut active = Vec::new();
        for (pos, &i) in level.active.iter().enumerate() {
            let fd = fds[pos].as_fd();
            let Some(st) =
                sfs::stat_at(fd, name).ctx(|| format!("stat of /{} in lower dir {i}", show(&path)))?
            else {
                continue;
            };
            if st.is_whiteout() {
                break;
            }
            match &found {
                None => {
                    found = Some(st);
                    if st.kind != FileKind::Dir {
                        break;
                    }
                }
                Some(_) if st.kind != FileKind::Dir => break,
                Some(_) => {}
            }
            active.push(i);
            if opaque_at(fd, name, &path)? {
                break;
            }
        }
        Ok(found.map(|st| (st, active)))
    }
}

impl Visitor for LayerChanges<'_> {
    fn entry(&mut self, Found { dir, path, name, st }: Found<'_>) -> Result<bool, ArchiveError> {
        let is_dir = st.kind == FileKind::Dir;
        let deleted = st.is_whiteout() || (is_dir && opaque_at(dir, name, path)?);
        let below = self.lookup(name)?;
        let child_active = below.as_ref().map(|(_, a)| a.clone()).unwrap_or_default();
        if is_dir {
            if let Some(l) = self.stack.last_mut() {
                l.fds = None;
            }
            self.stack.push(LowerLevel {
                path: path.to_vec(),
                active: child_active,
                fds: None,
            });
        }
        let kind = if deleted {
            ChangeKind::Delete
        } else {
            match below {
                Some((lst, _)) => {
                    if is_dir
                        && lst.kind == FileKind::Dir
                        && lst.size == st.size
                        && lst.st_mode == st.st_mode
                        && same_time(st, &lst)
                    {
                        return Ok(true); // unchanged directory: not recorded, children are
                    }
                    ChangeKind::Modify
                }
                None => ChangeKind::Add,
            }
        };
        if is_dir {
            self.changed_dirs.insert(path.to_vec());
        }
        // The directories holding this change, up to the first one already listed (whose
        // own parents were listed with it).
        let mut dir = split_parent(path).0;
        while !dir.is_empty() && self.changed_dirs.insert(dir.to_vec()) {
            self.changes.push(Change {
                path: abs(dir),
                kind: ChangeKind::Modify,
            });
            dir = split_parent(dir).0;
        }
        self.changes.push(Change {
            path: abs(path),
            kind,
        });
        Ok(is_dir)
    }

    fn leave(&mut self, _path: &[u8]) -> Result<(), ArchiveError> {
        self.stack.pop();
        Ok(())
    }
}

pub(crate) fn layer_changes(
    upper: BorrowedFd<'_>,
    lowers: &[BorrowedFd<'_>],
) -> Result<Vec<Change>, ArchiveError> {
    let mut v = LayerChanges {
        lowers,
        stack: vec![LowerLevel {
            path: Vec::new(),
            active: (0..lowers.len()).collect(),
            fds: None,
        }],
        changes: Vec::new(),
        changed_dirs: HashSet::new(),
    };
    walk(upper, &mut v)?;
    Ok(sort(v.changes))
}

/// One directory of the new tree being compared.
struct TreeLevel {
    path: Vec<u8>,
    /// Whether the old tree has this directory (as a directory) to compare against.
    has_old: bool,
    /// Whether this directory itself was recorded (Add or Modify).
    recorded: bool,
    /// Whether anything was recorded inside it.
    inner_changes: bool,
    fd: Option<OwnedFd>,
}

struct TreeChanges<'a> {
    old: Option<BorrowedFd<'a>>,
    stack: Vec<TreeLevel>,
    changes: Vec<Change>,
}

fn capability(dir: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<Option<Vec<u8>>, ArchiveError> {
    sfs::get_xattr_at(dir, name, b"security.capability").ctx(|| format!("reading xattrs of /{}", show(path)))
}

/// moby's `statDifferent`.
fn stat_different(old: &FileStat, new: &FileStat) -> bool {
    old.st_mode != new.st_mode
        || old.uid != new.uid
        || old.gid != new.gid
        || (old.rdev_major, old.rdev_minor) != (new.rdev_major, new.rdev_minor)
        || (old.kind != FileKind::Dir && (!same_time(old, new) || old.size != new.size))
}

impl<'a> TreeChanges<'a> {
    fn old_dir(&mut self) -> Result<Option<BorrowedFd<'_>>, ArchiveError> {
        let Some(old) = self.old else { return Ok(None) };
        let level = self.stack.last_mut().expect("root level");
        if !level.has_old {
            return Ok(None);
        }
        if level.fd.is_none() {
            level.fd = Some(
                sfs::open_dir_beneath(old, &level.path)
                    .ctx(|| format!("opening old /{}", show(&level.path)))?,
            );
        }
        Ok(level.fd.as_ref().map(|f| f.as_fd()))
    }

    /// Records the entries of the old directory that the new one lacks.
    fn deletions(&mut self, new_dir: BorrowedFd<'_>) -> Result<(), ArchiveError> {
        let path = self.stack.last().expect("level").path.clone();
        let Some(old) = self.old_dir()? else { return Ok(()) };
        let mut old_names = sfs::read_dir_names(old).ctx(|| format!("reading old /{}", show(&path)))?;
        let new_names: HashSet<Vec<u8>> = sfs::read_dir_names(new_dir)
            .ctx(|| format!("reading /{}", show(&path)))?
            .into_iter()
            .collect();
        old_names.retain(|n| !new_names.contains(n));
        if !old_names.is_empty() {
            self.stack.last_mut().expect("level").inner_changes = true;
        }
        for n in old_names {
            self.changes.push(Change {
                path: abs(&join(&path, &n)),
                kind: ChangeKind::Delete,
            });
        }
        Ok(())
    }
}

impl Visitor for TreeChanges<'_> {
    fn entry(&mut self, Found { dir, path, name, st }: Found<'_>) -> Result<bool, ArchiveError> {
        let old_st = match self.old_dir()? {
            Some(od) => sfs::stat_at(od, name)
                .ctx(|| format!("stat of old /{}", show(path)))?
                .map(|s| (s, capability(od, name, path))),
            None => None,
        };
        let (recorded, has_old) = match old_st {
            None => {
                self.changes.push(Change {
                    path: abs(path),
                    kind: ChangeKind::Add,
                });
                (true, false)
            }
            Some((ost, ocap)) => {
                if (ost.dev, ost.ino) == (st.dev, st.ino) {
                    return Ok(false); // the very same inode: unchanged, subtree pruned
                }
                let changed = stat_different(&ost, st) || ocap? != capability(dir, name, path)?;
                if changed {
                    self.changes.push(Change {
                        path: abs(path),
                        kind: ChangeKind::Modify,
                    });
                }
                (changed, ost.kind == FileKind::Dir)
            }
        };
        if recorded {
            self.stack.last_mut().expect("level").inner_changes = true;
        }
        if st.kind != FileKind::Dir {
            return Ok(false);
        }
        if let Some(l) = self.stack.last_mut() {
            l.fd = None;
        }
        self.stack.push(TreeLevel {
            path: path.to_vec(),
            has_old,
            recorded,
            inner_changes: false,
            fd: None,
        });
        let d = sfs::open_subdir(dir, name).ctx(|| format!("opening /{}", show(path)))?;
        self.deletions(d.as_fd())?;
        Ok(true)
    }

    fn leave(&mut self, path: &[u8]) -> Result<(), ArchiveError> {
        let level = self.stack.pop().expect("entered level");
        if level.inner_changes {
            if !level.recorded {
                self.changes.push(Change {
                    path: abs(path),
                    kind: ChangeKind::Modify,
                });
            }
            self.stack.last_mut().expect("parent level").inner_changes = true;
        }
        Ok(())
    }
}

pub(crate) fn tree_changes(
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
) -> Result<Vec<Change>, ArchiveError> {
    let mut v = TreeChanges {
        old,
        stack: vec![TreeLevel {
            path: Vec::new(),
            has_old: old.is_some(),
            recorded: true,
            inner_changes: false,
            fd: None,
        }],
        changes: Vec::new(),
    };
    let root = sfs::reopen_dir(new).ctx(|| "opening new tree".into())?;
    v.deletions(root.as_fd())?;
    walk(new, &mut v)?;
    Ok(sort(v.changes))
}
