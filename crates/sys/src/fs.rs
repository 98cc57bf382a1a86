//! Directory-fd based file operations.
//!
//! Every function takes a directory fd plus a single name (or a path that is resolved
//! with `openat2` confinement flags), never an absolute host path. Final components are
//! never followed when they are symlinks, and device nodes and fifos are never opened.
//! Whiteouts are overlay's: a `0/0` character device, and `trusted.overlay.opaque=y` on
//! a directory.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

/// errno values callers match on (`io::Error::raw_os_error`).
pub mod errno {
    pub use libc::{
        E2BIG, EBUSY, EDQUOT, EEXIST, EFBIG, EINVAL, ELOOP, EMLINK, ENAMETOOLONG, ENOENT, ENOSPC, ENOTCONN,
        ENOTDIR, EOPNOTSUPP, EPERM, ERANGE, EROFS,
    };
}

/// The xattr that marks an overlay directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Longest path `openat2` accepts in one call (PATH_MAX minus the NUL).
const MAX_PATH_CHUNK: usize = 4000;

/// Type of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Regular file.
    Regular,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

/// The fields of `stat(2)` the archive code needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// File type.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 07777`).
    pub perm: u32,
    /// Full `st_mode` (type and permission bits).
    pub st_mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Device of the filesystem holding the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Device major number (devices only).
    pub rdev_major: u32,
    /// Device minor number (devices only).
    pub rdev_minor: u32,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
}

impl FileStat {
    fn from_rustix(st: &rfs::Stat) -> Self {
        let st_mode = st.st_mode;
        let kind = match rfs::FileType::from_raw_mode(st_mode) {
            rfs::FileType::RegularFile => FileKind::Regular,
            rfs::FileType::Directory => FileKind::Dir,
            rfs::FileType::Symlink => FileKind::Symlink,
            rfs::FileType::CharacterDevice => FileKind::CharDev,
            rfs::FileType::BlockDevice => FileKind::BlockDev,
            rfs::FileType::Fifo => FileKind::Fifo,
            _ => FileKind::Socket,
        };
        FileStat {
            kind,
            perm: st_mode & 0o7777,
            st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
            nlink: st.st_nlink,
            dev: st.st_dev,
            ino: st.st_ino,
            rdev_major: rfs::major(st.st_rdev),
            rdev_minor: rfs::minor(st.st_rdev),
            mtime_sec: st.st_mtime,
            mtime_nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        }
    }

    /// Whether this is an overlay whiteout (a `0/0` character device).
    pub fn is_whiteout(&self) -> bool {
        self.kind == FileKind::CharDev && self.rdev_major == 0 && self.rdev_minor == 0
    }
}

fn name_arg(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn path_or_dot(path: &[u8]) -> &[u8] {
    if path.is_empty() {
        b"."
    } else {
        path
    }
}

fn openat2_retry(
    dir: BorrowedFd<'_>,
    path: &[u8],
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    // The kernel answers EAGAIN when a concurrent rename could have raced a `..`
    // lookup; retrying a few times is the documented remedy.
    let mut tries = 0;
    loop {
        match rfs::openat2(
            dir,
            name_arg(path),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        ) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Opens directory `path` (relative, `/`-separated, may be empty for `root` itself) with
/// `O_PATH`, resolved as if `root` were `/`: absolute symlinks and `..` never leave `root`.
/// Symlinks on the way are followed inside the root, magic links are refused.
pub fn open_dir_in_root(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    openat2_retry(
        root,
        path_or_dot(path),
        OFlags::PATH | OFlags::DIRECTORY,
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens directory `path` below `root` for reading, refusing any symlink or `..` that
/// would leave it. Paths longer than `PATH_MAX` are opened in several steps.
pub fn open_dir_beneath(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY;
    let mut rest = path;
    let mut cur: Option<OwnedFd> = None;
    loop {
        let chunk_len = if rest.len() <= MAX_PATH_CHUNK {
            rest.len()
        } else {
            match rest[..MAX_PATH_CHUNK].iter().rposition(|&b| b == b'/') {
                Some(0) | None => return Err(Errno::NAMETOOLONG.into()),
                Some(p) => p,
            }
        };
        let (chunk, tail) = rest.split_at(chunk_len);
        let base = cur.as_ref().map_or(root, |fd| fd.as_fd());
        let fd = openat2_retry(base, path_or_dot(chunk), flags, resolve)?;
        cur = Some(fd);
        rest = tail.strip_prefix(b"/").unwrap_or(tail);
        if rest.is_empty() {
            return Ok(cur.expect("opened at least once"));
        }
    }
}

/// Reopens a directory fd (for example an `O_PATH` one) for reading.
pub fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the subdirectory `name` of `dir` for reading, without following a symlink.
pub fn open_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        name_arg(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the parent (`..`) of directory `dir` for reading.
pub fn open_parent(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        "..",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Creates a new regular file `name` in `dir` (fails if anything exists there).
pub fn create_file(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<File> {
    let fd = rfs::openat(
        dir,
        name_arg(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o777),
    )?;
    Ok(File::from(fd))
}

/// Starts writeback of `len` bytes of `fd` from `offset` (`sync_file_range(SYNC_FILE_RANGE_WRITE)`) and
/// returns without waiting for it. Durability is not changed: nothing here flushes metadata or the device's
/// cache; a later `syncfs` still does. It lets the disk work while the caller writes more, so that the final
/// sync has less left to write.
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a plain syscall on a borrowed, open descriptor; no memory is passed.
    let r = unsafe { libc::sync_file_range(fd.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens the regular file `name` in `dir` for reading. Refuses symlinks, and anything
/// that is not a regular file once opened (`O_NONBLOCK` keeps a fifo from blocking).
pub fn open_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let fd = rfs::openat(
        dir,
        name_arg(name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rfs::fstat(&fd)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    // Regular files ignore O_NONBLOCK, but clear it anyway for the reader's sake.
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
    Ok(File::from(fd))
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    Ok(rfs::mkdirat(
        dir,
        name_arg(name),
        Mode::from_raw_mode(mode & 0o7777),
    )?)
}

/// Creates a character or block device node (never opened).
pub fn mknod_device(
    dir: BorrowedFd<'_>,
    name: &[u8],
    block: bool,
    mode: u32,
    major: u32,
    minor: u32,
) -> io::Result<()> {
    let ft = if block {
        rfs::FileType::BlockDevice
    } else {
        rfs::FileType::CharacterDevice
    };
    Ok(rfs::mknodat(
        dir,
        name_arg(name),
        ft,
        Mode::from_raw_mode(mode & 0o777),
        rfs::makedev(major, minor),
    )?)
}

/// Creates a fifo (never opened).
pub fn mkfifo(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    Ok(rfs::mkfifoat(
        dir,
        name_arg(name),
        Mode::from_raw_mode(mode & 0o777),
    )?)
}

/// Creates an overlay whiteout (`0/0` character device, mode 0) named `name`.
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    mknod_device(dir, name, false, 0, 0, 0)
}

/// Creates symlink `name` in `dir` pointing at `target` (stored verbatim).
pub fn symlink(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    Ok(rfs::symlinkat(name_arg(target), dir, name_arg(name))?)
}

/// Swaps the entries `a` and `b` of `dir` in one step (`renameat2(RENAME_EXCHANGE)`): each name shows the one
/// entry or the other, never neither.
pub fn exchange(dir: BorrowedFd<'_>, a: &[u8], b: &[u8]) -> io::Result<()> {
    Ok(rfs::renameat_with(
        dir,
        name_arg(a),
        dir,
        name_arg(b),
        rfs::RenameFlags::EXCHANGE,
    )?)
}

/// Renames `from` to `to`, failing with `EEXIST` where `to` exists (`renameat2(RENAME_NOREPLACE)`): never
/// replaces an entry, not even an empty directory.
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    Ok(rfs::renameat_with(
        rfs::CWD,
        from,
        rfs::CWD,
        to,
        rfs::RenameFlags::NOREPLACE,
    )?)
}

/// Hard-links `old_dir/old_name` as `new_dir/new_name`; a symlink is linked itself.
pub fn hardlink(
    old_dir: BorrowedFd<'_>,
    old_name: &[u8],
    new_dir: BorrowedFd<'_>,
    new_name: &[u8],
) -> io::Result<()> {
    Ok(rfs::linkat(
        old_dir,
        name_arg(old_name),
        new_dir,
        name_arg(new_name),
        AtFlags::empty(),
    )?)
}

/// Reads the target of symlink `name`.
pub fn readlink(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    Ok(rfs::readlinkat(dir, name_arg(name), Vec::new())?.into_bytes())
}

/// `lstat` of `name` in `dir`; `Ok(None)` when it does not exist.
pub fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<FileStat>> {
    match rfs::statat(dir, name_arg(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileStat::from_rustix(&st))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `fstat`.
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<FileStat> {
    Ok(FileStat::from_rustix(&rfs::fstat(fd)?))
}

/// Removes the non-directory `name` from `dir`.
pub fn unlink(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    Ok(rfs::unlinkat(dir, name_arg(name), AtFlags::empty())?)
}

/// Removes the empty directory `name` from `dir`.
pub fn rmdir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    Ok(rfs::unlinkat(dir, name_arg(name), AtFlags::REMOVEDIR)?)
}

/// Removes `name` from `dir` whatever it is; a directory is removed with its whole tree.
///
/// Iterative and holding at most two descriptors whatever the depth: it goes down with
/// `O_NOFOLLOW` opens and back up through `..`, checking each step's inode. Each
/// directory is listed once.
pub fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    struct Level {
        /// Name of this directory in its parent.
        name: Vec<u8>,
        /// Children not handled yet.
        pending: Vec<Vec<u8>>,
        /// (dev, ino) of the parent, checked when going back up.
        parent_id: (u64, u64),
    }
    let Some(st) = stat_at(dir, name)? else {
        return Ok(());
    };
    if st.kind != FileKind::Dir {
        return unlink(dir, name);
    }
    let top = stat_fd(dir)?;
    let mut cur = open_subdir(dir, name)?;
    let mut stack = vec![Level {
        name: name.to_vec(),
        pending: read_dir_names(cur.as_fd())?,
        parent_id: (top.dev, top.ino),
    }];
    loop {
        let level = stack.last_mut().expect("stack is never empty here");
        if let Some(child) = level.pending.pop() {
            match stat_at(cur.as_fd(), &child)? {
                None => {}
                Some(cst) if cst.kind == FileKind::Dir => {
                    let here = stat_fd(cur.as_fd())?;
                    let sub = open_subdir(cur.as_fd(), &child)?;
                    let pending = read_dir_names(sub.as_fd())?;
                    stack.push(Level {
                        name: child,
                        pending,
                        parent_id: (here.dev, here.ino),
                    });
                    cur = sub;
                }
                Some(_) => match unlink(cur.as_fd(), &child) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
                    _ => {}
                },
            }
            continue;
        }
        let done = stack.pop().expect("checked above");
        if stack.is_empty() {
            drop(cur);
            return rmdir(dir, &done.name);
        }
        let parent = open_parent(cur.as_fd())?;
        let pst = stat_fd(parent.as_fd())?;
        if (pst.dev, pst.ino) != done.parent_id {
            return Err(io::Error::other(
                "directory tree changed while it was being removed",
            ));
        }
        rmdir(parent.as_fd(), &done.name)?;
        cur = parent;
    }
}

/// Names in directory `dir` (readable fd), without `.` and `..`, in directory order.
pub fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut d = rfs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// `lchown` of `name` in `dir`.
pub fn chown_at(dir: BorrowedFd<'_>, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    Ok(rfs::chownat(
        dir,
        name_arg(name),
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// `fchown`.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    Ok(rfs::fchown(
        fd,
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
    )?)
}

/// `fchmod` (all of 07777).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rfs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))?)
}

/// chmod of `name` in `dir` without following a symlink (`fchmodat2`, kernel 6.6+;
/// on older kernels falls back to `fchmodat` after checking it is not a symlink).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::from(Errno::INVAL))?;
    // SAFETY: `dir` is a live borrowed descriptor, `cname` is a NUL-terminated string
    // that outlives the call, and fchmodat2 takes (int, const char *, mode_t, int).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            cname.as_ptr(),
            (mode & 0o7777) as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    match stat_at(dir, name)? {
        Some(st) if st.kind != FileKind::Symlink => Ok(rfs::chmodat(
            dir,
            name_arg(name),
            Mode::from_raw_mode(mode & 0o7777),
            AtFlags::empty(),
        )?),
        Some(_) => Err(Errno::OPNOTSUPP.into()),
        None => Err(Errno::NOENT.into()),
    }
}

fn timestamps(sec: i64, nsec: u32) -> Timestamps {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec.min(999_999_999)) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Sets atime and mtime of `name` in `dir` (not following a symlink).
pub fn set_times_at(dir: BorrowedFd<'_>, name: &[u8], sec: i64, nsec: u32) -> io::Result<()> {
    Ok(rfs::utimensat(
        dir,
        name_arg(name),
        &timestamps(sec, nsec),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets atime and mtime of an open file or directory.
pub fn set_times_fd(fd: BorrowedFd<'_>, sec: i64, nsec: u32) -> io::Result<()> {
    Ok(rfs::futimens(fd, &timestamps(sec, nsec))?)
}

/// Path of `name` through the magic link of its parent directory, so that the `l*xattr`
/// calls act on `name` itself (never following it) without opening it.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

/// Sets xattr `key` on an open file or directory.
pub fn set_xattr_fd(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    Ok(rfs::fsetxattr(
        fd,
        name_arg(key),
        value,
        rfs::XattrFlags::empty(),
    )?)
}

/// Sets xattr `key` on `name` in `dir` without following or opening it.
pub fn set_xattr_at(dir: BorrowedFd<'_>, name: &[u8], key: &[u8], value: &[u8]) -> io::Result<()> {
    let p = proc_path(dir, name);
    Ok(rfs::lsetxattr(
        name_arg(&p),
        name_arg(key),
        value,
        rfs::XattrFlags::empty(),
    )?)
}

/// Calls `f` with a buffer grown until the value fits; `None` when `f` fails with one of the `absent` errors.
fn read_growing(
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Errno>,
    absent: &[Errno],
) -> io::Result<Option<Vec<u8>>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::RANGE) if size < (1 << 24) => size *= 4,
            Err(e) if absent.contains(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

fn list_with(f: impl FnMut(&mut [u8]) -> Result<usize, Errno>) -> io::Result<Vec<Vec<u8>>> {
    let buf = read_growing(f, &[Errno::NOTSUP])?.unwrap_or_default();
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

fn get_with(f: impl FnMut(&mut [u8]) -> Result<usize, Errno>) -> io::Result<Option<Vec<u8>>> {
    read_growing(f, &[Errno::NODATA, Errno::NOTSUP])
}

/// Names of the xattrs of an open file or directory (empty when unsupported).
pub fn list_xattrs_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    list_with(|buf| rfs::flistxattr(fd, buf))
}

/// Value of xattr `key` of an open file or directory; `None` when absent.
pub fn get_xattr_fd(fd: BorrowedFd<'_>, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
    get_with(|buf| rfs::fgetxattr(fd, name_arg(key), buf))
}

/// Names of the xattrs of `name` in `dir`, not following it.
pub fn list_xattrs_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    let p = proc_path(dir, name);
    list_with(|buf| rfs::llistxattr(name_arg(&p), buf))
}

/// Value of xattr `key` of `name` in `dir`, not following it; `None` when absent.
pub fn get_xattr_at(dir: BorrowedFd<'_>, name: &[u8], key: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let p = proc_path(dir, name);
    get_with(|buf| rfs::lgetxattr(name_arg(&p), name_arg(key), buf))
}

/// Marks the open directory `dir` as an opaque overlay directory.
pub fn set_opaque(dir: BorrowedFd<'_>) -> io::Result<()> {
    set_xattr_fd(dir, OPAQUE_XATTR.as_bytes(), b"y")
}

/// Whether the open directory `dir` carries `trusted.overlay.opaque=y`.
pub fn is_opaque(dir: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(get_xattr_fd(dir, OPAQUE_XATTR.as_bytes())?.as_deref() == Some(b"y"))
}

/// Whether the effective uid is 0 (tests use it to decide whether root-only cases run).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().unwrap();
        let fd = rfs::open(t.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        (t, fd)
    }

    #[test]
    fn in_root_resolution_stays_inside() {
        let (t, root) = tmp();
        mkdir(root.as_fd(), b"etc", 0o755).unwrap();
        symlink(b"/etc", root.as_fd(), b"lnk").unwrap();
        symlink(b"../../../../..", root.as_fd(), b"up").unwrap();
        let fd = open_dir_in_root(root.as_fd(), b"lnk").unwrap();
        let st = stat_fd(fd.as_fd()).unwrap();
        let etc = stat_at(root.as_fd(), b"etc").unwrap().unwrap();
        assert_eq!((st.dev, st.ino), (etc.dev, etc.ino));
        let fd = open_dir_in_root(root.as_fd(), b"up").unwrap();
        let st = stat_fd(fd.as_fd()).unwrap();
        let r = stat_fd(root.as_fd()).unwrap();
        assert_eq!((st.dev, st.ino), (r.dev, r.ino));
        assert!(open_dir_beneath(root.as_fd(), b"lnk").is_err());
        drop(t);
    }

    #[test]
    fn beneath_handles_paths_longer_than_path_max() {
        let (_t, root) = tmp();
        let comp = vec![b'x'; 200];
        let mut cur = reopen_dir(root.as_fd()).unwrap();
        let mut path = Vec::new();
        for _ in 0..30 {
            mkdir(cur.as_fd(), &comp, 0o755).unwrap();
            cur = open_subdir(cur.as_fd(), &comp).unwrap();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&comp);
        }
        assert!(path.len() > 4096);
        let fd = open_dir_beneath(root.as_fd(), &path).unwrap();
        let a = stat_fd(fd.as_fd()).unwrap();
        let b = stat_fd(cur.as_fd()).unwrap();
        assert_eq!(a.ino, b.ino);
        drop(cur);
        remove_all(root.as_fd(), &comp).unwrap();
        assert!(read_dir_names(root.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn remove_all_deep_tree() {
        let (_t, root) = tmp();
        let mut cur = reopen_dir(root.as_fd()).unwrap();
        for i in 0..1500 {
            mkdir(cur.as_fd(), b"d", 0o755).unwrap();
            create_file(cur.as_fd(), format!("f{i}").as_bytes(), 0o644).unwrap();
            symlink(b"/etc", cur.as_fd(), b"s").unwrap();
            cur = open_subdir(cur.as_fd(), b"d").unwrap();
        }
        drop(cur);
        remove_all(root.as_fd(), b"d").unwrap();
        assert!(stat_at(root.as_fd(), b"d").unwrap().is_none());
    }

    #[test]
    fn remove_all_wide_tree_and_odd_modes() {
        let (_t, root) = tmp();
        mkdir(root.as_fd(), b"w", 0o755).unwrap();
        let w = open_subdir(root.as_fd(), b"w").unwrap();
        for i in 0..2000 {
            let n = format!("d{i}");
            mkdir(w.as_fd(), n.as_bytes(), 0o755).unwrap();
            let d = open_subdir(w.as_fd(), n.as_bytes()).unwrap();
            create_file(d.as_fd(), b"f", 0o644).unwrap();
            make_whiteout(d.as_fd(), b"wh").ok();
            mkfifo(d.as_fd(), b"p", 0o600).unwrap();
            chmod_fd(d.as_fd(), 0o500).unwrap();
        }
        drop(w);
        if running_as_root() {
            remove_all(root.as_fd(), b"w").unwrap();
            assert!(stat_at(root.as_fd(), b"w").unwrap().is_none());
        }
        remove_all(root.as_fd(), b"absent").unwrap();
        create_file(root.as_fd(), b"plain", 0o644).unwrap();
        remove_all(root.as_fd(), b"plain").unwrap();
        assert!(stat_at(root.as_fd(), b"plain").unwrap().is_none());
    }

    #[test]
    fn xattrs_and_times() {
        let (_t, root) = tmp();
        let f = create_file(root.as_fd(), b"f", 0o644).unwrap();
        if set_xattr_fd(f.as_fd(), b"user.k", b"v\n\0x").is_ok() {
            assert_eq!(get_xattr_fd(f.as_fd(), b"user.k").unwrap().unwrap(), b"v\n\0x");
            assert_eq!(
                get_xattr_at(root.as_fd(), b"f", b"user.k").unwrap().unwrap(),
                b"v\n\0x"
            );
            assert!(list_xattrs_at(root.as_fd(), b"f")
                .unwrap()
                .contains(&b"user.k".to_vec()));
        }
        set_times_at(root.as_fd(), b"f", 1234, 5).unwrap();
        let st = stat_at(root.as_fd(), b"f").unwrap().unwrap();
        assert_eq!((st.mtime_sec, st.mtime_nsec), (1234, 5));
        chmod_at(root.as_fd(), b"f", 0o4755).unwrap();
        assert_eq!(stat_at(root.as_fd(), b"f").unwrap().unwrap().perm, 0o4755);
        symlink(b"f", root.as_fd(), b"s").unwrap();
        assert!(chmod_at(root.as_fd(), b"s", 0o700).is_err());
        assert_eq!(stat_at(root.as_fd(), b"f").unwrap().unwrap().perm, 0o4755);
    }
}
