//! Applying a tar layer into a layer directory.
//!
//! Every entry path is cleaned lexically (a leading `/` is dropped, `..` that would
//! climb above the root refuses the whole stream), its parent is opened with
//! `openat2(RESOLVE_IN_ROOT)` so symlinks created earlier in the stream resolve inside
//! the layer, and the final component is created with `*at` calls that never follow it.
//! OCI whiteouts become overlay ones. On error nothing is rolled back: the caller
//! discards the staging directory.
//!
//! AUFS keeps private names at the root of a branch (`.wh..wh.aufs`, `.wh..wh.orph/`,
//! `.wh..wh.plnk/`), and tars exported from AUFS layers may carry them. Like Docker, every
//! entry whose first component starts with `.wh..wh.` is left out of the layer, except the
//! opaque marker of the root itself. Regular files under `.wh..wh.plnk/` are the shared
//! inodes of hard links across branches: they are kept aside (in a directory of that name
//! in the layer root, removed at the end) so that a hardlink entry pointing into
//! `.wh..wh.plnk/` becomes a link to the file of the same base name. Docker writes a
//! separate copy of that file for each such link; content and metadata are the same.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lamina_sys::fs::{self as sfs, errno as libc_errno, FileKind};

use crate::tar_read::{Entry, Kind, TarReader};
use crate::util::{invalid, io_err, is_overlay_xattr, show, to_host, IoContext};
use crate::{ApplyOptions, ApplyStats, ArchiveError, Whiteouts};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// AUFS's directory of pseudo-links (hard-linked files), at the root of a branch.
const AUFS_LINK_DIR: &[u8] = b".wh..wh.plnk";
/// Longest name of one path component (NAME_MAX).
const NAME_MAX: usize = 255;
/// Longest parent path handed to one `openat2` call.
const PATH_MAX: usize = 4095;
/// Largest xattr value Linux accepts.
const XATTR_SIZE_MAX: usize = 65536;
/// Range mtimes are clamped to (years 1901 to 2446, what ext4 stores).
const MTIME_MIN: i64 = -(1 << 31);
const MTIME_MAX: i64 = 16_985_624_703;

/// Splits a tar name into components confined to the root. `Ok(empty)` is the root.
pub(crate) fn clean_path(raw: &[u8]) -> Result<Vec<&[u8]>, ArchiveError> {
    if raw.contains(&0) {
        return Err(invalid(format!("NUL byte in name {}", show(raw))));
    }
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(invalid(format!("path escapes layer root: {}", show(raw))));
                }
            }
            c if c.len() > NAME_MAX => {
                return Err(invalid(format!("name too long: {}", show(raw))));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn joined(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

struct Applier<'a> {
    root: BorrowedFd<'a>,
    opts: &'a ApplyOptions,
    /// The last parent directory resolved: its joined path and fd.
    cached: Option<(Vec<u8>, OwnedFd)>,
    /// Directories whose mtime is set once everything else is written.
    dirs: Vec<(Vec<u8>, i64, u32)>,
    buf: Vec<u8>,
    /// Where the regular files of `.wh..wh.plnk/` are kept until the end, once one was seen.
    aufs_links: Option<OwnedFd>,
    /// With [`Whiteouts::Delete`]: the paths this stream wrote, which an opaque marker keeps.
    written: std::collections::HashSet<Vec<u8>>,
    /// Sum of the sizes of the regular files created (hard links add nothing).
    size: u64,
    /// Whether `size` is the layer's size: the root was empty at the start and nothing was removed since.
    size_exact: bool,
    /// Finishes small regular files on a second thread.
    finisher: Finisher,
}

fn clamp_mtime(sec: i64) -> i64 {
    sec.clamp(MTIME_MIN, MTIME_MAX)
}

impl<'a> Applier<'a> {
    fn host_ids(&self, e: &Entry) -> Result<(u32, u32), ArchiveError> {
        let what = || show(&e.path);
        let uid = to_host(&self.opts.id_mappings.uids, e.uid, "uid").map_err(|err| annotate(err, &what()))?;
        let gid = to_host(&self.opts.id_mappings.gids, e.gid, "gid").map_err(|err| annotate(err, &what()))?;
        Ok((uid, gid))
    }

    fn root_ids(&self) -> Result<(u32, u32), ArchiveError> {
        Ok((
            to_host(&self.opts.id_mappings.uids, 0, "uid")?,
            to_host(&self.opts.id_mappings.gids, 0, "gid")?,
        ))
    }

    /// Opens the parent directory `comps` (creating missing directories like Docker,
    /// mode 0755 owned by the mapped root), resolved inside the layer root.
    fn parent(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<(Vec<u8>, OwnedFd), ArchiveError> {
        let key = joined(comps);
        if let Some((k, _)) = &self.cached {
            if *k == key {
                return Ok(self.cached.take().expect("checked"));
            }
        }
        if key.len() > PATH_MAX {
            return Err(invalid(format!("name too long: {}", show(entry))));
        }
        match sfs::open_dir_in_root(self.root, &key) {
            Ok(fd) => return Ok((key, fd)),
            Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => {}
            Err(e) => return Err(resolve_error(e, entry)),
        }
        // Create what is missing, one component at a time.
        let mut cur: Option<OwnedFd> = None;
        for i in 0..comps.len() {
            let prefix = joined(&comps[..=i]);
            match sfs::open_dir_in_root(self.root, &prefix) {
                Ok(fd) => cur = Some(fd),
                Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => {
                    let base = cur.as_ref().map_or(self.root, |f| f.as_fd());
                    match sfs::mkdir(base, comps[i], 0o755) {
                        Ok(()) => {
                            let (uid, gid) = self.root_ids()?;
                            sfs::chown_at(base, comps[i], uid, gid)
                                .ctx(|| format!("chown of directory /{}", show(&prefix)))?;
                        }
                        Err(e) if e.raw_os_error() == Some(libc_errno::EEXIST) => {
                            return Err(invalid(format!(
                                "parent of {} goes through a dangling symlink",
                                show(entry)
                            )));
                        }
                        Err(e) => return Err(io_err(format!("creating directory /{}", show(&prefix)), e)),
                    }
                    cur =
                        Some(sfs::open_dir_in_root(self.root, &prefix).map_err(|e| resolve_error(e, entry))?);
                }
                Err(e) => return Err(resolve_error(e, entry)),
            }
        }
        match cur {
            Some(fd) => Ok((key, fd)),
            None => Err(invalid(format!("cannot resolve parent of {}", show(entry)))),
        }
    }

    /// Makes room for a new `name` in `dir`: anything there is removed, except a
    /// directory when `keep_dir` (the new entry is a directory too). Returns whether a
    /// directory was kept.
    fn make_room(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        keep_dir: bool,
        path: &[u8],
    ) -> Result<bool, ArchiveError> {
        match sfs::stat_at(dir, name).ctx(|| format!("stat of /{}", show(path)))? {
            None => Ok(false),
            Some(st) if st.kind == FileKind::Dir && keep_dir => Ok(true),
            Some(_) => {
                // Anything cached may have resolved through what is being removed.
                self.cached = None;
                self.size_exact = false;
                sfs::remove_all(dir, name).ctx(|| format!("replacing /{}", show(path)))?;
                Ok(false)
            }
        }
    }

    fn apply_xattrs_fd(&self, fd: BorrowedFd<'_>, e: &Entry) -> Result<(), ArchiveError> {
        for (k, v) in &e.xattrs {
            if !self.xattr_wanted(k, v, e)? {
                continue;
            }
            xattr_result(sfs::set_xattr_fd(fd, k, v), k, e)?;
        }
        Ok(())
    }

    fn apply_xattrs_at(&self, dir: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<(), ArchiveError> {
        for (k, v) in &e.xattrs {
            if !self.xattr_wanted(k, v, e)? {
                continue;
            }
            xattr_result(sfs::set_xattr_at(dir, name, k, v), k, e)?;
        }
        Ok(())
    }

    fn xattr_wanted(&self, k: &[u8], v: &[u8], e: &Entry) -> Result<bool, ArchiveError> {
        if k.is_empty() || k.len() > NAME_MAX || k.contains(&0) {
            return Err(invalid(format!(
                "bad xattr name {:?} on {}",
                show(k),
                show(&e.path)
            )));
        }
        if v.len() > XATTR_SIZE_MAX {
            return Err(invalid(format!(
                "xattr {} on {} is too large",
                show(k),
                show(&e.path)
            )));
        }
        if is_overlay_xattr(k) {
            tracing::warn!(entry = %show(&e.path), xattr = %show(k), "dropping overlay xattr from layer tar");
            return Ok(false);
        }
        Ok(true)
    }

    fn entry<R: Read>(&mut self, tar: &mut TarReader<R>, e: &Entry) -> Result<(), ArchiveError> {
        let comps = clean_path(&e.path)?;
        let Some((&name, parent_comps)) = comps.split_last() else {
            if e.kind == Kind::Dir {
                return Ok(()); // the root itself: left as it is, like Docker
            }
            return Err(invalid(format!(
                "entry {} would replace the layer root",
                show(&e.path)
            )));
        };
        let path = joined(&comps);

        if parent_comps.contains(&OPAQUE_MARKER) {
            return Err(invalid(format!(
                "opaque marker used as a directory: {}",
                show(&e.path)
            )));
        }
        if name == OPAQUE_MARKER && e.kind != Kind::Regular {
            return Err(invalid(format!(
                "opaque marker {} is not a regular file",
                show(&e.path)
            )));
        }
        if comps[0].starts_with(WHITEOUT_META_PREFIX) && comps[..] != [OPAQUE_MARKER] {
            if comps[0] == AUFS_LINK_DIR && comps.len() > 1 && e.kind == Kind::Regular {
                return self.keep_aufs_link(tar, e, name, &path);
            }
            tracing::debug!(entry = %show(&e.path), "skipping aufs private entry");
            return Ok(());
        }

        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            if name == OPAQUE_MARKER {
                let (key, parent) = self.parent(parent_comps, &e.path)?;
                let dir = sfs::reopen_dir(parent.as_fd()).ctx(|| format!("opening /{}", show(&key)))?;
                if self.opts.whiteouts == Whiteouts::Delete {
                    self.cached = None;
                    for child in
                        sfs::read_dir_names(dir.as_fd()).ctx(|| format!("listing /{}", show(&key)))?
                    {
                        let child_path = crate::util::join(&key, &child);
                        if !self.written.contains(&child_path) {
                            self.size_exact = false;
                            sfs::remove_all(dir.as_fd(), &child)
                                .ctx(|| format!("emptying opaque /{}", show(&child_path)))?;
                        }
                    }
                    return Ok(());
                }
                sfs::set_opaque(dir.as_fd()).ctx(|| format!("marking /{} opaque", show(&key)))?;
                self.cached = Some((key, parent));
                return Ok(());
            }
            if name.starts_with(WHITEOUT_META_PREFIX) {
                tracing::warn!(entry = %show(&e.path), "skipping aufs metadata entry");
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(invalid(format!("bad whiteout name: {}", show(&e.path))));
            }
            let (uid, gid) = self.host_ids(e)?;
            let (key, parent) = self.parent(parent_comps, &e.path)?;
            let target_path = crate::util::join(&key, target);
            self.make_room(parent.as_fd(), target, false, &target_path)?;
            if self.opts.whiteouts == Whiteouts::Delete {
                return Ok(());
            }
            sfs::make_whiteout(parent.as_fd(), target)
                .map_err(|err| device_error(err, &target_path, "creating whiteout"))?;
            sfs::chown_at(parent.as_fd(), target, uid, gid)
                .ctx(|| format!("chown of /{}", show(&target_path)))?;
            // Not done by Docker, but it makes a re-diff of the layer reproduce the tar.
            sfs::set_times_at(
                parent.as_fd(),
                target,
                clamp_mtime(e.mtime_sec),
                e.mtime_nsec.min(999_999_999),
            )
            .ctx(|| format!("setting times of /{}", show(&target_path)))?;
            self.cached = Some((key, parent));
            return Ok(());
        }

        match e.kind {
            Kind::Other(b'V') | Kind::Other(b'N') => {
                tracing::warn!(entry = %show(&e.path), "skipping tar entry of an obsolete type");
                return Ok(());
            }
            Kind::Other(t) => {
                return Err(ArchiveError::Unsupported(format!(
                    "tar entry type {:?} for {}",
                    char::from(t),
                    show(&e.path)
                )))
            }
            _ => {}
        }

        if self.opts.whiteouts == Whiteouts::Delete {
            self.written.insert(path.clone());
        }
        let (uid, gid) = self.host_ids(e)?;
        let mode = e.mode & 0o7777;
        let mtime = clamp_mtime(e.mtime_sec);
        let nsec = e.mtime_nsec.min(999_999_999);

        // A hardlink's target is checked before anything is removed.
        let link_target = if e.kind == Kind::Hardlink {
            Some(self.link_target(e, &comps)?)
        } else {
            None
        };

        let (key, parent) = self.parent(parent_comps, &e.path)?;
        let p = parent.as_fd();
        let at = |what: &str| format!("{what} /{}", show(&path));
        match e.kind {
            Kind::Regular => self.regular(tar, p, name, e, &path)?,
            Kind::Dir => {
                match sfs::mkdir(p, name, 0o700) {
                    Err(err) if err.raw_os_error() == Some(libc_errno::EEXIST) => {
                        if !self.make_room(p, name, true, &path)? {
                            sfs::mkdir(p, name, 0o700).ctx(|| at("creating directory"))?;
                        }
                    }
                    r => r.ctx(|| at("creating directory"))?,
                }
                let d = sfs::open_subdir(p, name).ctx(|| at("opening directory"))?;
                sfs::chown_fd(d.as_fd(), uid, gid).ctx(|| at("chown of"))?;
                self.apply_xattrs_fd(d.as_fd(), e)?;
                sfs::chmod_fd(d.as_fd(), mode).ctx(|| at("chmod of"))?;
                self.dirs.push((path.clone(), mtime, nsec));
            }
            Kind::Symlink => {
                if e.link.is_empty() {
                    return Err(invalid(format!("empty symlink target for {}", show(&e.path))));
                }
                self.make_room(p, name, false, &path)?;
                sfs::symlink(&e.link, p, name).ctx(|| at("creating symlink"))?;
                sfs::chown_at(p, name, uid, gid).ctx(|| at("chown of"))?;
                self.apply_xattrs_at(p, name, e)?;
                sfs::set_times_at(p, name, mtime, nsec).ctx(|| at("setting times of"))?;
            }
            Kind::Hardlink => {
                let (tdir, tname, tpath) = link_target.expect("resolved above");
                self.make_room(p, name, false, &path)?;
                if let Err(err) = sfs::hardlink(tdir.as_fd(), &tname, p, name) {
                    return Err(match err.raw_os_error() {
                        Some(libc_errno::EMLINK) => ArchiveError::LimitExceeded(format!(
                            "too many hard links to /{} (at {})",
                            show(&tpath),
                            show(&e.path)
                        )),
                        Some(libc_errno::ENOENT) => invalid(format!(
                            "bad hardlink: {} -> {}: target removed by this entry",
                            show(&e.path),
                            show(&e.link)
                        )),
                        _ => io_err(at("creating hardlink"), err),
                    });
                }
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.make_room(p, name, false, &path)?;
                let made = if e.kind == Kind::Fifo {
                    sfs::mkfifo(p, name, 0o600)
                } else {
                    sfs::mknod_device(p, name, e.kind == Kind::Block, 0o600, e.dev_major, e.dev_minor)
                };
                made.map_err(|err| device_error(err, &path, "creating"))?;
                sfs::chown_at(p, name, uid, gid).ctx(|| at("chown of"))?;
                self.apply_xattrs_at(p, name, e)?;
                sfs::chmod_at(p, name, mode).ctx(|| at("chmod of"))?;
                sfs::set_times_at(p, name, mtime, nsec).ctx(|| at("setting times of"))?;
            }
            Kind::Other(_) => unreachable!("handled above"),
        }
        self.cached = Some((key, parent));
        Ok(())
    }

    /// Writes the regular file `name` in `dir` from entry `e` (data, owner, xattrs, mode, times).
    fn regular<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        dir: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
        path: &[u8],
    ) -> Result<(), ArchiveError> {
        let (uid, gid) = self.host_ids(e)?;
        let at = |what: &str| format!("{what} /{}", show(path));
        // Most entries are new: try the create first and make room only on EEXIST
        // (one syscall per file instead of a stat plus a create).
        let mut f = match sfs::create_file(dir, name, 0o600) {
            Err(err) if err.raw_os_error() == Some(libc_errno::EEXIST) => {
                self.make_room(dir, name, false, path)?;
                sfs::create_file(dir, name, 0o600).ctx(|| at("creating"))?
            }
            r => r.ctx(|| at("creating"))?,
        };
        let len = tar.remaining();
        if e.sparse.is_none() && e.xattrs.is_empty() && len <= HANDOFF_MAX {
            // The name exists now, so later entries (links to it, a replacement) see it; its data and
            // metadata may follow on the finishing thread.
            let mut data = vec![0u8; len as usize];
            tar.read_data_exact(&mut data)?;
            self.size += len;
            return self.finisher.submit(Finish {
                file: f,
                data,
                uid,
                gid,
                mode: e.mode & 0o7777,
                mtime: clamp_mtime(e.mtime_sec),
                nsec: e.mtime_nsec.min(999_999_999),
                path: path.to_vec(),
            });
        }
        self.size += self.write_data(tar, &mut f, e, path)?;
        sfs::chown_fd(f.as_fd(), uid, gid).ctx(|| at("chown of"))?;
        self.apply_xattrs_fd(f.as_fd(), e)?;
        sfs::chmod_fd(f.as_fd(), e.mode & 0o7777).ctx(|| at("chmod of"))?;
        sfs::set_times_fd(f.as_fd(), clamp_mtime(e.mtime_sec), e.mtime_nsec.min(999_999_999))
            .ctx(|| at("setting times of"))
    }

    /// Keeps the regular file `e` of `.wh..wh.plnk/` aside under its base name `name`, as
    /// the target of later hardlinks into that directory.
    fn keep_aufs_link<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        e: &Entry,
        name: &[u8],
        path: &[u8],
    ) -> Result<(), ArchiveError> {
        if self.aufs_links.is_none() {
            // Entries naming it are skipped above: the name is reserved for this use, and
            // whatever holds it goes.
            if sfs::stat_at(self.root, AUFS_LINK_DIR)
                .ctx(|| format!("stat of /{}", show(AUFS_LINK_DIR)))?
                .is_some()
            {
                self.cached = None;
                self.size_exact = false;
                sfs::remove_all(self.root, AUFS_LINK_DIR)
                    .ctx(|| format!("removing /{}", show(AUFS_LINK_DIR)))?;
            }
            sfs::mkdir(self.root, AUFS_LINK_DIR, 0o700)
                .ctx(|| format!("creating /{}", show(AUFS_LINK_DIR)))?;
            self.aufs_links = Some(
                sfs::open_subdir(self.root, AUFS_LINK_DIR)
                    .ctx(|| format!("opening /{}", show(AUFS_LINK_DIR)))?,
            );
        }
        let dir = self.aufs_links.take().expect("made above");
        let r = self.regular(tar, dir.as_fd(), name, e, path);
        self.aufs_links = Some(dir);
        r
    }

    /// Removes the files kept for hardlinks into `.wh..wh.plnk/`.
    fn drop_aufs_links(&mut self) -> Result<(), ArchiveError> {
        if self.aufs_links.take().is_some() {
            self.size_exact = false;
            sfs::remove_all(self.root, AUFS_LINK_DIR).ctx(|| format!("removing /{}", show(AUFS_LINK_DIR)))?;
        }
        Ok(())
    }

    /// Resolves a hardlink target inside the layer: (its directory, name, path).
    fn link_target(
        &mut self,
        e: &Entry,
        comps: &[&[u8]],
    ) -> Result<(OwnedFd, Vec<u8>, Vec<u8>), ArchiveError> {
        let bad = |why: &str| {
            invalid(format!(
                "bad hardlink: {} -> {}: {why}",
                show(&e.path),
                show(&e.link)
            ))
        };
        let tcomps = clean_path(&e.link).map_err(|_| bad("target escapes layer root"))?;
        let Some((&tname, tparent)) = tcomps.split_last() else {
            return Err(bad("empty target"));
        };
        if tcomps == comps {
            return Err(bad("links to itself"));
        }
        if tcomps[0] == AUFS_LINK_DIR && tcomps.len() > 1 {
            let kept = match &self.aufs_links {
                Some(dir) => sfs::stat_at(dir.as_fd(), tname)
                    .ctx(|| format!("stat of hardlink target {}", show(&e.link)))?
                    .filter(|st| st.kind == FileKind::Regular)
                    .map(|_| dir),
                None => None,
            };
            let Some(dir) = kept else {
                return Err(bad("no such file in the aufs link directory"));
            };
            let dir = sfs::reopen_dir(dir.as_fd()).ctx(|| format!("opening /{}", show(AUFS_LINK_DIR)))?;
            return Ok((dir, tname.to_vec(), joined(&tcomps)));
        }
        let tkey = joined(tparent);
        if tkey.len() > PATH_MAX {
            return Err(bad("target name too long"));
        }
        let tdir = match sfs::open_dir_in_root(self.root, &tkey) {
            Ok(fd) => fd,
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc_errno::ENOENT) | Some(libc_errno::ENOTDIR)
                ) =>
            {
                return Err(bad("target not found"))
            }
            Err(err) => return Err(resolve_error(err, &e.link)),
        };
        match sfs::stat_at(tdir.as_fd(), tname)
            .ctx(|| format!("stat of hardlink target {}", show(&e.link)))?
        {
            None => Err(bad("target not found")),
            Some(st) if st.kind == FileKind::Dir => Err(bad("target is a directory")),
            Some(_) => Ok((tdir, tname.to_vec(), joined(&tcomps))),
        }
    }

    fn write_data<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        f: &mut File,
        e: &Entry,
        path: &[u8],
    ) -> Result<u64, ArchiveError> {
        let werr = |err: std::io::Error| write_error(err, path);
        match &e.sparse {
            None => {
                // Writeback of a large file starts early, every WRITEBACK_STEP bytes and for its tail, so that
                // the disk works while the stream is read and the layer's one syncfs has less left to write.
                // Small files are left to that syncfs: starting theirs one by one costs more CPU on this
                // thread than the disk time it saves.
                let (mut written, mut kicked) = (0u64, 0u64);
                loop {
                    let n = tar.read_data(&mut self.buf)?;
                    if n == 0 {
                        if kicked > 0 && written > kicked {
                            start_writeback(f, kicked, written - kicked);
                        }
                        return Ok(written);
                    }
                    f.write_all(&self.buf[..n]).map_err(werr)?;
                    written += n as u64;
                    if written - kicked >= WRITEBACK_STEP {
                        start_writeback(f, kicked, written - kicked);
                        kicked = written;
                    }
                }
            }
            Some(sp) => {
                for &(off, len) in &sp.map {
                    f.seek(SeekFrom::Start(off)).map_err(werr)?;
                    let mut left = len;
                    while left > 0 {
                        let k = left.min(self.buf.len() as u64) as usize;
                        tar.read_data_exact(&mut self.buf[..k])?;
                        f.write_all(&self.buf[..k]).map_err(werr)?;
                        left -= k as u64;
                    }
                }
                if tar.remaining() != 0 {
                    return Err(invalid(format!(
                        "sparse data of {} longer than its map",
                        show(&e.path)
                    )));
                }
                f.set_len(sp.real_size).map_err(werr)?;
                Ok(sp.real_size)
            }
        }
    }

    fn finish_dirs(&mut self) -> Result<(), ArchiveError> {
        for (path, sec, nsec) in std::mem::take(&mut self.dirs) {
            let (parent, name) = crate::util::split_parent(&path);
            let dir = match sfs::open_dir_in_root(self.root, parent) {
                Ok(d) => d,
                Err(_) => continue, // removed or replaced later in the stream
            };
            match sfs::stat_at(dir.as_fd(), name) {
                Ok(Some(st)) if st.kind == FileKind::Dir => {
                    sfs::set_times_at(dir.as_fd(), name, sec, nsec)
                        .ctx(|| format!("setting times of /{}", show(&path)))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Bytes of one file written between two starts of its writeback.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Asks the kernel to start writing `len` bytes of `f` from `offset`; a refusal only loses the head start.
fn start_writeback(f: &File, offset: u64, len: u64) {
    if let Err(err) = sfs::start_writeback(f.as_fd(), offset, len) {
        tracing::debug!(error = %err, "could not start writeback early");
    }
}

fn annotate(err: ArchiveError, entry: &str) -> ArchiveError {
    match err {
        ArchiveError::InvalidArchive(m) => ArchiveError::InvalidArchive(format!("{m} (entry {entry})")),
        other => other,
    }
}

fn resolve_error(err: std::io::Error, entry: &[u8]) -> ArchiveError {
    match err.raw_os_error() {
        Some(libc_errno::ENOTDIR) => invalid(format!("parent of {} is not a directory", show(entry))),
        Some(libc_errno::ELOOP) => invalid(format!("too many symlinks resolving {}", show(entry))),
        Some(libc_errno::ENAMETOOLONG) => invalid(format!("name too long: {}", show(entry))),
        _ => io_err(format!("resolving parent of {}", show(entry)), err),
    }
}

fn write_error(err: std::io::Error, path: &[u8]) -> ArchiveError {
    if err.raw_os_error() == Some(libc_errno::EFBIG) {
        return ArchiveError::LimitExceeded(format!("file too large: /{}", show(path)));
    }
    io_err(format!("writing /{}", show(path)), err)
}

fn device_error(err: std::io::Error, path: &[u8], what: &str) -> ArchiveError {
    if err.raw_os_error() == Some(libc_errno::EPERM) {
        return ArchiveError::Unsupported(format!("{what} device node /{} needs CAP_MKNOD", show(path)));
    }
    io_err(format!("{what} /{}", show(path)), err)
}

fn xattr_result(r: std::io::Result<()>, key: &[u8], e: &Entry) -> Result<(), ArchiveError> {
    match r {
        Ok(()) => Ok(()),
        // Like Docker: filesystems or namespaces without support are tolerated.
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc_errno::EOPNOTSUPP) | Some(libc_errno::EPERM)
            ) =>
        {
            tracing::warn!(entry = %show(&e.path), xattr = %show(key), error = %err, "xattr not applied");
            Ok(())
        }
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc_errno::EINVAL) | Some(libc_errno::ERANGE) | Some(libc_errno::E2BIG)
            ) =>
        {
            Err(invalid(format!(
                "xattr {} on {} refused by the kernel: {err}",
                show(key),
                show(&e.path)
            )))
        }
        Err(err) => Err(io_err(
            format!("setting xattr {} on {}", show(key), show(&e.path)),
            err,
        )),
    }
}

/// Largest regular file whose data is handed to the finishing thread (read into memory first).
const HANDOFF_MAX: u64 = 128 * 1024;
/// Files finished on the applying thread before the finishing thread is started (small layers need none).
const INLINE_FIRST: u64 = 32;
/// Files handed over and not finished yet, at most: bounds the memory (`HANDOFF_MAX` each) and open descriptors.
const HANDOFF_QUEUE: usize = 64;

/// The rest of a small regular file once it is created: its data, owner, mode and times, in the order the
/// applying thread uses for the files it writes itself (chown before chmod, which keeps set-id bits).
struct Finish {
    file: File,
    data: Vec<u8>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    nsec: u32,
    path: Vec<u8>,
}

impl Finish {
    fn run(self) -> Result<(), ArchiveError> {
        let Finish {
            mut file,
            data,
            uid,
            gid,
            mode,
            mtime,
            nsec,
            path,
        } = self;
        let at = |what: &str| format!("{what} /{}", show(&path));
        file.write_all(&data).map_err(|err| write_error(err, &path))?;
        let fd = file.as_fd();
        sfs::chown_fd(fd, uid, gid).ctx(|| at("chown of"))?;
        sfs::chmod_fd(fd, mode).ctx(|| at("chmod of"))?;
        sfs::set_times_fd(fd, mtime, nsec).ctx(|| at("setting times of"))
    }
}

/// Finishes small regular files on one thread beside the applying one: the applying thread parses the stream
/// and makes every name (so the namespace is built in stream order, and every later entry sees what earlier
/// ones made), the finishing thread writes the files' data and metadata through their open descriptors. GNU
/// tar does both on one thread; the split uses a second core for the per-file system calls. The apply is
/// complete only once [`Finisher::finish`] returned; its first error is the apply's error. Dropped unfinished
/// (the apply failed), it waits for the thread, so nothing writes into the layer after the apply returned.
#[derive(Default)]
struct Finisher {
    seen: u64,
    thread: Option<FinishThread>,
}

/// The queue to the finishing thread, and the thread (its result: the first error).
type FinishThread = (
    std::sync::mpsc::SyncSender<Finish>,
    std::thread::JoinHandle<Result<(), ArchiveError>>,
);

impl Finisher {
    fn submit(&mut self, job: Finish) -> Result<(), ArchiveError> {
        self.seen += 1;
        if self.thread.is_none() {
            if self.seen <= INLINE_FIRST {
                return job.run();
            }
            let (tx, rx) = std::sync::mpsc::sync_channel::<Finish>(HANDOFF_QUEUE);
            let spawned = std::thread::Builder::new()
                .name("lamina-finish".into())
                .spawn(move || rx.into_iter().try_for_each(Finish::run));
            match spawned {
                Ok(handle) => self.thread = Some((tx, handle)),
                // No thread: everything is finished here, as for a small layer.
                Err(_) => {
                    self.seen = 0;
                    return job.run();
                }
            }
        }
        let Some((tx, _)) = &self.thread else {
            return job.run();
        };
        if tx.send(job).is_ok() {
            return Ok(());
        }
        // The thread stopped at an error: that error is the apply's.
        self.finish()?;
        Err(io_err(
            "finishing files",
            std::io::Error::other("the finishing thread stopped"),
        ))
    }

    /// Waits until every file handed over is finished; the first error of the finishing thread.
    fn finish(&mut self) -> Result<(), ArchiveError> {
        let Some((tx, handle)) = self.thread.take() else {
            return Ok(());
        };
        drop(tx);
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.thread.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

pub(crate) fn apply_layer<R: Read>(
    layer: BorrowedFd<'_>,
    input: R,
    opts: &ApplyOptions,
) -> Result<ApplyStats, ArchiveError> {
    let mut tar = TarReader::new(input);
    let mut ap = Applier {
        root: layer,
        opts,
        cached: None,
        dirs: Vec::new(),
        buf: vec![0u8; 128 * 1024],
        aufs_links: None,
        written: std::collections::HashSet::new(),
        size: 0,
        // Checked once: a fresh staging directory (the usual case) needs no walk at the end.
        size_exact: sfs::read_dir_names(layer)
            .map_err(|e| io_err("listing the layer root", e))?
            .is_empty(),
        finisher: Finisher::default(),
    };
    let mut entries = 0u64;
    while let Some(e) = tar.next_entry()? {
        entries += 1;
        ap.entry(&mut tar, &e)?;
    }
    ap.finisher.finish()?;
    ap.drop_aufs_links()?;
    ap.finish_dirs()?;
    let (digest, tar_bytes) = tar.finish()?;
    // Applied as deletions into a full tree (a clone of the parent's), the layer's size is what the stream
    // wrote: the tree also holds the parents' files.
    let size = if ap.size_exact || opts.whiteouts == Whiteouts::Delete {
        ap.size
    } else {
        crate::walk::dir_size(layer)?
    };
    Ok(ApplyStats {
        size,
        digest,
        tar_bytes,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        let ok = |p: &[u8]| {
            clean_path(p)
                .unwrap()
                .iter()
                .map(|c| c.to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(ok(b"/etc/motd"), vec![b"etc".to_vec(), b"motd".to_vec()]);
        assert_eq!(ok(b"//./etc/./motd/"), vec![b"etc".to_vec(), b"motd".to_vec()]);
        assert_eq!(ok(b"a/b/../c"), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(ok(b"./").is_empty());
        for bad in [&b"../escape"[..], b"a/../../escape", b"/../x", b"./../x", b"a\0b"] {
            assert!(clean_path(bad).is_err(), "{}", show(bad));
        }
        let long = [b'x'; 256];
        assert!(clean_path(&long)
            .unwrap_err()
            .to_string()
            .contains("name too long"));
        assert!(clean_path(&long[..255]).is_ok());
    }

    #[test]
    fn mtime_clamp() {
        assert_eq!(clamp_mtime(i64::MAX), MTIME_MAX);
        assert_eq!(clamp_mtime(i64::MIN), MTIME_MIN);
        assert_eq!(clamp_mtime(5), 5);
    }
}
