//! Writing tars: the changes of an overlay upper dir, or the differences of two trees.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};

use lamina_sys::fs::{self as sfs, FileKind, FileStat};

use crate::tar_read::Kind;
use crate::tar_write::{TarWriter, WHeader};
use crate::util::{is_overlay_xattr, join, show, split_parent, to_container, IoContext};
use crate::walk::{walk, Found, Visitor};
use crate::{ArchiveError, ChangeKind, DiffOptions, IdMappings};

/// (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Writes entries, remembering hardlinked inodes.
struct Emitter<'a, W: Write> {
    tw: TarWriter<W>,
    maps: &'a IdMappings,
    /// (dev, ino) of inodes with several links -> path written first.
    links: HashMap<(u64, u64), Vec<u8>>,
}

fn werr(path: &[u8]) -> impl FnOnce() -> String + '_ {
    move || format!("writing tar entry {}", show(path))
}

impl<W: Write> Emitter<'_, W> {
    fn ids(&self, st: &FileStat, path: &[u8]) -> Result<(u32, u32), ArchiveError> {
        let ctx = |e: ArchiveError| match e {
            ArchiveError::Unsupported(m) => ArchiveError::Unsupported(format!("{m} (/{})", show(path))),
            o => o,
        };
        Ok((
            to_container(&self.maps.uids, st.uid, "uid").map_err(ctx)?,
            to_container(&self.maps.gids, st.gid, "gid").map_err(ctx)?,
        ))
    }

    fn xattrs_at(&self, dir: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<Xattrs, ArchiveError> {
        let keys = sfs::list_xattrs_at(dir, name).ctx(|| format!("listing xattrs of /{}", show(path)))?;
        let mut out = Vec::new();
        for k in keys {
            if is_overlay_xattr(&k) || k.contains(&b'=') {
                continue;
            }
            if let Some(v) =
                sfs::get_xattr_at(dir, name, &k).ctx(|| format!("reading xattrs of /{}", show(path)))?
            {
                out.push((k, v));
            }
        }
        out.sort();
        Ok(out)
    }

    fn xattrs_fd(&self, fd: BorrowedFd<'_>, path: &[u8]) -> Result<Xattrs, ArchiveError> {
        let keys = sfs::list_xattrs_fd(fd).ctx(|| format!("listing xattrs of /{}", show(path)))?;
        let mut out = Vec::new();
        for k in keys {
            if is_overlay_xattr(&k) || k.contains(&b'=') {
                continue;
            }
            if let Some(v) = sfs::get_xattr_fd(fd, &k).ctx(|| format!("reading xattrs of /{}", show(path)))? {
                out.push((k, v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Writes `name` (in `dir`, at relative `path`) as one entry. Directories are
    /// written without their children. Sockets are skipped.
    fn emit(&mut self, Found { dir, path, name, st }: Found<'_>) -> Result<(), ArchiveError> {
        let (uid, gid) = self.ids(st, path)?;
        let mut h = WHeader {
            path,
            kind: Kind::Regular,
            mode: st.perm,
            uid,
            gid,
            mtime: st.mtime_sec,
            size: 0,
            link: &[],
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        if st.kind != FileKind::Dir && st.nlink > 1 {
            if let Some(first) = self.links.get(&(st.dev, st.ino)) {
                let first = first.clone();
                h.kind = Kind::Hardlink;
                h.link = &first;
                return self.tw.header(&h).ctx(werr(path));
            }
            self.links.insert((st.dev, st.ino), path.to_vec());
        }
        match st.kind {
            FileKind::Regular => {
                let mut f = sfs::open_file(dir, name).ctx(|| format!("opening /{}", show(path)))?;
                let fst = sfs::stat_fd(f.as_fd()).ctx(|| format!("stat of /{}", show(path)))?;
                let xattrs = self.xattrs_fd(f.as_fd(), path)?;
                h.size = fst.size;
                h.mode = fst.perm;
                h.mtime = fst.mtime_sec;
                h.xattrs = &xattrs;
                self.tw.header(&h).ctx(werr(path))?;
                self.tw
                    .data(&mut f, fst.size)
                    .ctx(|| format!("copying /{}", show(path)))
            }
            FileKind::Dir => {
                let d = sfs::open_subdir(dir, name).ctx(|| format!("opening /{}", show(path)))?;
                let xattrs = self.xattrs_fd(d.as_fd(), path)?;
                h.kind = Kind::Dir;
                h.xattrs = &xattrs;
                self.tw.header(&h).ctx(werr(path))
            }
            FileKind::Symlink => {
                let target = sfs::readlink(dir, name).ctx(|| format!("reading symlink /{}", show(path)))?;
                let xattrs = self.xattrs_at(dir, name, path)?;
                h.kind = Kind::Symlink;
                h.mode = 0o777;
                h.link = &target;
                h.xattrs = &xattrs;
                self.tw.header(&h).ctx(werr(path))
            }
            FileKind::CharDev | FileKind::BlockDev | FileKind::Fifo => {
                let xattrs = self.xattrs_at(dir, name, path)?;
                h.kind = match st.kind {
                    FileKind::CharDev => Kind::Char,
                    FileKind::BlockDev => Kind::Block,
                    _ => Kind::Fifo,
                };
                h.dev_major = st.rdev_major;
                h.dev_minor = st.rdev_minor;
                h.xattrs = &xattrs;
                self.tw.header(&h).ctx(werr(path))
            }
            FileKind::Socket => {
                tracing::debug!(path = %show(path), "socket skipped in diff");
                Ok(())
            }
        }
    }

    /// An empty regular file standing for a whiteout.
    fn marker(&mut self, path: &[u8], mode: u32, uid: u32, gid: u32, mtime: i64) -> Result<(), ArchiveError> {
        let h = WHeader {
            path,
            kind: Kind::Regular,
            mode,
            uid,
            gid,
            mtime,
            size: 0,
            link: &[],
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        self.tw.header(&h).ctx(werr(path))
    }
}

fn whiteout_path(path: &[u8]) -> Vec<u8> {
    let (parent, name) = split_parent(path);
    let mut wname = b".wh.".to_vec();
    wname.extend_from_slice(name);
    join(parent, &wname)
}

struct LayerDiff<'a, W: Write> {
    em: Emitter<'a, W>,
}

impl<W: Write> Visitor for LayerDiff<'_, W> {
    fn entry(&mut self, Found { dir, path, name, st }: Found<'_>) -> Result<bool, ArchiveError> {
        if st.is_whiteout() {
            let (uid, gid) = self.em.ids(st, path)?;
            self.em
                .marker(&whiteout_path(path), 0o600, uid, gid, st.mtime_sec)?;
            return Ok(false);
        }
        self.em.emit(Found { dir, path, name, st })?;
        if st.kind == FileKind::Dir {
            let d = sfs::open_subdir(dir, name).ctx(|| format!("opening /{}", show(path)))?;
            if sfs::is_opaque(d.as_fd()).ctx(|| format!("reading xattrs of /{}", show(path)))? {
                let (uid, gid) = self.em.ids(st, path)?;
                self.em.marker(
                    &join(path, b".wh..wh..opq"),
                    st.perm & 0o777,
                    uid,
                    gid,
                    st.mtime_sec,
                )?;
            }
            return Ok(true);
        }
        Ok(false)
    }
}

pub(crate) fn write_layer_diff<W: Write>(
    upper: BorrowedFd<'_>,
    out: W,
    opts: &DiffOptions,
) -> Result<(), ArchiveError> {
    let mut v = LayerDiff {
        em: Emitter {
            tw: TarWriter::new(out),
            maps: &opts.id_mappings,
            links: HashMap::new(),
        },
    };
    walk(upper, &mut v)?;
    v.em.tw.finish().ctx(|| "finishing layer tar".into())
}

pub(crate) fn write_tree_diff<W: Write>(
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
    out: W,
    opts: &DiffOptions,
) -> Result<(), ArchiveError> {
    let changes = crate::changes::tree_changes(new, old)?;
    let mut em = Emitter {
        tw: TarWriter::new(out),
        maps: &opts.id_mappings,
        links: HashMap::new(),
    };
    for c in changes {
        let path = c.path.strip_prefix(b"/").unwrap_or(&c.path);
        if c.kind == ChangeKind::Delete {
            em.marker(&whiteout_path(path), 0, 0, 0, 0)?;
            continue;
        }
        let (parent, name) = split_parent(path);
        let dir = sfs::open_dir_beneath(new, parent).ctx(|| format!("opening /{}", show(parent)))?;
        match sfs::stat_at(dir.as_fd(), name).ctx(|| format!("stat of /{}", show(path)))? {
            Some(st) => em.emit(Found {
                dir: dir.as_fd(),
                path,
                name,
                st: &st,
            })?,
            None => tracing::debug!(path = %show(path), "changed entry vanished before it was written"),
        }
    }
    em.tw.finish().ctx(|| "finishing diff tar".into())
}
