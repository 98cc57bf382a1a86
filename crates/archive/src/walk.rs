//! Iterative, sorted, depth-first walk of a directory tree through directory fds.
//!
//! Holds two descriptors whatever the depth (the root and the current directory): it
//! goes down with `O_NOFOLLOW` opens and back up through `..`, checking that each
//! parent is the inode it left. Siblings are visited in name-byte order, parents before
//! their children, which is the order of Go's `filepath.Walk`.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lamina_sys::fs::{self as sfs, FileKind, FileStat};

use crate::util::{join, show, IoContext};
use crate::ArchiveError;

/// One entry met by a walk.
#[derive(Clone, Copy)]
pub(crate) struct Found<'a> {
    /// The directory holding the entry.
    pub dir: BorrowedFd<'a>,
    /// The entry's path relative to the walk root.
    pub path: &'a [u8],
    /// The entry's name in `dir`.
    pub name: &'a [u8],
    /// The entry's `lstat`.
    pub st: &'a FileStat,
}

/// Receives the entries of a walk.
pub(crate) trait Visitor {
    /// Called for each entry below the root. Returning `true` for a directory walks into it.
    fn entry(&mut self, e: Found<'_>) -> Result<bool, ArchiveError>;

    /// Called when the children of a directory entered through [`Visitor::entry`] are done.
    fn leave(&mut self, _path: &[u8]) -> Result<(), ArchiveError> {
        Ok(())
    }
}

struct Level {
    names: Vec<Vec<u8>>,
    next: usize,
    dev: u64,
    ino: u64,
    /// Length of the walk's path buffer for this directory.
    path_len: usize,
}

fn sorted_names(dir: BorrowedFd<'_>, path: &[u8]) -> Result<Vec<Vec<u8>>, ArchiveError> {
    let mut names = sfs::read_dir_names(dir).ctx(|| format!("reading directory /{}", show(path)))?;
    names.sort_unstable();
    Ok(names)
}

/// Walks the tree below `root` (not reporting `root` itself).
pub(crate) fn walk(root: BorrowedFd<'_>, v: &mut impl Visitor) -> Result<(), ArchiveError> {
    let mut cur: OwnedFd = sfs::reopen_dir(root).ctx(|| "opening walk root".into())?;
    let rst = sfs::stat_fd(cur.as_fd()).ctx(|| "stat of walk root".into())?;
    let mut path: Vec<u8> = Vec::new();
    let mut stack = vec![Level {
        names: sorted_names(cur.as_fd(), b"")?,
        next: 0,
        dev: rst.dev,
        ino: rst.ino,
        path_len: 0,
    }];
    loop {
        let top = stack.last_mut().expect("stack holds the root");
        if top.next < top.names.len() {
            let name = std::mem::take(&mut top.names[top.next]);
            top.next += 1;
            let entry_path = join(&path, &name);
            let Some(st) =
                sfs::stat_at(cur.as_fd(), &name).ctx(|| format!("stat of /{}", show(&entry_path)))?
            else {
                continue; // vanished since the directory was read
            };
            let descend = v.entry(Found {
                dir: cur.as_fd(),
                path: &entry_path,
                name: &name,
                st: &st,
            })?;
            if descend && st.kind == FileKind::Dir {
                let sub = sfs::open_subdir(cur.as_fd(), &name)
                    .ctx(|| format!("opening directory /{}", show(&entry_path)))?;
                let names = sorted_names(sub.as_fd(), &entry_path)?;
                path = entry_path;
                stack.push(Level {
                    names,
                    next: 0,
                    dev: st.dev,
                    ino: st.ino,
                    path_len: path.len(),
                });
                cur = sub;
            }
        } else {
            if stack.len() == 1 {
                return Ok(());
            }
            v.leave(&path)?;
            stack.pop();
            let parent = stack.last().expect("root level remains");
            let up = if stack.len() == 1 {
                sfs::reopen_dir(root)
            } else {
                sfs::open_parent(cur.as_fd())
            }
            .ctx(|| format!("returning to the parent of /{}", show(&path)))?;
            let st = sfs::stat_fd(up.as_fd()).ctx(|| "stat of parent".into())?;
            if (st.dev, st.ino) != (parent.dev, parent.ino) {
                return Err(crate::util::io_err(
                    format!("walking /{}", show(&path)),
                    std::io::Error::other("directory tree changed during the walk"),
                ));
            }
            path.truncate(parent.path_len);
            cur = up;
        }
    }
}

/// Sums regular file sizes, each (dev, ino) once.
struct SizeVisitor {
    total: u64,
    seen: HashSet<(u64, u64)>,
}

impl Visitor for SizeVisitor {
    fn entry(&mut self, Found { st, .. }: Found<'_>) -> Result<bool, ArchiveError> {
        if st.kind == FileKind::Regular && (st.nlink <= 1 || self.seen.insert((st.dev, st.ino))) {
            self.total = self.total.saturating_add(st.size);
        }
        Ok(true)
    }
}

pub(crate) fn dir_size(root: BorrowedFd<'_>) -> Result<u64, ArchiveError> {
    let mut v = SizeVisitor {
        total: 0,
        seen: HashSet::new(),
    };
    walk(root, &mut v)?;
    Ok(v.total)
}

struct UsageVisitor {
    usage: crate::DiskUsage,
    seen: HashSet<(u64, u64)>,
}

impl Visitor for UsageVisitor {
    fn entry(&mut self, Found { st, .. }: Found<'_>) -> Result<bool, ArchiveError> {
        if st.nlink <= 1 || st.kind == FileKind::Dir || self.seen.insert((st.dev, st.ino)) {
            self.usage.inodes += 1;
            self.usage.bytes = self.usage.bytes.saturating_add(st.blocks.saturating_mul(512));
        }
        Ok(true)
    }
}

pub(crate) fn disk_usage(root: BorrowedFd<'_>) -> Result<crate::DiskUsage, ArchiveError> {
    let st = sfs::stat_fd(root).map_err(|e| crate::util::io_err("stat the layer root", e))?;
    let mut v = UsageVisitor {
        usage: crate::DiskUsage {
            bytes: st.blocks.saturating_mul(512),
            inodes: 1,
        },
        seen: HashSet::new(),
    };
    walk(root, &mut v)?;
    Ok(v.usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct Collect(Vec<String>);
    impl Visitor for Collect {
        fn entry(&mut self, e: Found<'_>) -> Result<bool, ArchiveError> {
            self.0.push(String::from_utf8_lossy(e.path).into_owned());
            Ok(true)
        }
        fn leave(&mut self, p: &[u8]) -> Result<(), ArchiveError> {
            self.0.push(format!("<{}", String::from_utf8_lossy(p)));
            Ok(())
        }
    }

    #[test]
    fn walk_order_and_size() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("a/b")).unwrap();
        fs::write(t.path().join("a/b/f"), b"12345").unwrap();
        fs::hard_link(t.path().join("a/b/f"), t.path().join("a.f")).unwrap();
        fs::write(t.path().join("z"), b"1").unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("a/l")).unwrap();
        let root = fs::File::open(t.path()).unwrap();
        let mut c = Collect(vec![]);
        walk(root.as_fd(), &mut c).unwrap();
        assert_eq!(c.0, ["a", "a/b", "a/b/f", "<a/b", "a/l", "<a", "a.f", "z"]);
        assert_eq!(dir_size(root.as_fd()).unwrap(), 6);
    }

    #[test]
    fn deep_tree() {
        let t = tempfile::tempdir().unwrap();
        let mut p = t.path().to_path_buf();
        for _ in 0..1200 {
            p.push("d");
        }
        // create_dir_all on a path longer than PATH_MAX fails, so go step by step.
        let mut cur = fs::File::open(t.path()).unwrap();
        for _ in 0..1200 {
            sfs::mkdir(cur.as_fd(), b"d", 0o755).unwrap();
            cur = fs::File::from(sfs::open_subdir(cur.as_fd(), b"d").unwrap());
        }
        drop(cur);
        let root = fs::File::open(t.path()).unwrap();
        let mut c = Collect(vec![]);
        walk(root.as_fd(), &mut c).unwrap();
        assert_eq!(c.0.len(), 2400);
    }
}
