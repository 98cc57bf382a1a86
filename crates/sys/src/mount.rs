//! Overlay and bind mounts, unmounting and the mount table.
//!
//! Overlay mounts use the new mount API (`fsopen` + one `fsconfig("lowerdir+")` per layer,
//! Linux 6.8+), which has no limit on the length of the option string. On kernels without
//! `lowerdir+` the legacy `mount(2)` call is used; its options must fit in one page, so lower
//! directories are then passed as `/proc/self/fd/N` of directory handles opened for the call,
//! which keeps each entry about 18 bytes long whatever the data root's path is.
//!
//! The kernel walks every path it is given, component by component, once per mount (a 128-layer mount took
//! 1.39 ms with paths nine directories deep against 1.11 ms with short ones on the development machine). So
//! the new-API mount passes its directories relative to their nearest common directory, from a thread whose
//! working directory is its own (`unshare(CLONE_FS)`, once per thread) and is moved there for the call and
//! back. `/proc/self/mountinfo` then shows those relative names.
//!
//! Lowers are not handed over as descriptors (`FSCONFIG_SET_FD`, Linux 6.13+): the kernel then builds each
//! layer's absolute name (`d_path`) into a page-sized buffer, and in a daemon that cost more than the walk of the
//! short relative name: 21–36 µs more per mount at 128 layers (docs/benchmarks.md).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, CWD};
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};

/// The most lower layers one overlay mount takes (the kernel's `OVL_MAX_STACK`).
pub const MAX_OVERLAY_LOWERS: usize = 500;

/// What to mount as an overlay.
#[derive(Debug, Clone, Default)]
pub struct OverlaySpec {
    /// Lower directories, top-most first.
    pub lowers: Vec<PathBuf>,
    /// Upper directory (read-write mounts); `None` for a read-only stack.
    pub upper: Option<PathBuf>,
    /// Work directory, required with `upper`, on the same filesystem.
    pub work: Option<PathBuf>,
    /// SELinux context (`context=` option), when not empty.
    pub label: Option<String>,
    /// Mount read-only.
    pub read_only: bool,
}

/// A mount, described: what [`mount`] mounts, or what a caller that mounts it itself (containerd) is told.
#[derive(Debug, Clone)]
pub enum MountSpec {
    /// A bind mount of a directory (recursive when rendered as options).
    Bind {
        /// The directory.
        source: PathBuf,
        /// Mount read-only.
        read_only: bool,
    },
    /// An overlay stack.
    Overlay(OverlaySpec),
}

impl MountSpec {
    /// The filesystem type as `mount(8)` names it: `bind` or `overlay`.
    pub fn kind(&self) -> &'static str {
        match self {
            MountSpec::Bind { .. } => "bind",
            MountSpec::Overlay(_) => "overlay",
        }
    }

    /// The mount source: the bound directory, or `overlay`.
    pub fn source(&self) -> PathBuf {
        match self {
            MountSpec::Bind { source, .. } => source.clone(),
            MountSpec::Overlay(_) => PathBuf::from("overlay"),
        }
    }

    /// The `mount(8)` options, for a caller that mounts this itself. A bind is `ro|rw,rbind`. An overlay lists
    /// `index=off` (when it has an upper directory and the kernel knows the option), `workdir`, `upperdir`,
    /// `lowerdir` (top-most first) and `context` when labelled; an overlay without an upper directory is
    /// read-only by construction. Paths are rendered lossily: callers that hand these out use UTF-8 roots.
    pub fn options(&self) -> Vec<String> {
        match self {
            MountSpec::Bind { read_only, .. } => {
                vec![if *read_only { "ro" } else { "rw" }.into(), "rbind".into()]
            }
            MountSpec::Overlay(o) => {
                let mut out = Vec::with_capacity(5);
                if o.upper.is_some() && overlay_has_index_option() {
                    out.push("index=off".to_string());
                }
                if let Some(work) = &o.work {
                    out.push(format!("workdir={}", work.to_string_lossy()));
                }
                if let Some(upper) = &o.upper {
                    out.push(format!("upperdir={}", upper.to_string_lossy()));
                }
                // One allocation for the whole list: a deep stack names over a hundred directories.
                let len = o.lowers.iter().map(|p| p.as_os_str().len() + 1).sum::<usize>();
                let mut lowerdir = String::with_capacity("lowerdir=".len() + len);
                lowerdir.push_str("lowerdir=");
                for (i, p) in o.lowers.iter().enumerate() {
                    if i > 0 {
                        lowerdir.push(':');
                    }
                    lowerdir.push_str(&p.to_string_lossy());
                }
                out.push(lowerdir);
                if let Some(label) = o.label.as_deref().filter(|l| !l.is_empty()) {
                    out.push(format!("context=\"{label}\""));
                }
                out
            }
        }
    }
}

/// Mounts `spec` on `target`.
pub fn mount(spec: &MountSpec, target: &Path) -> io::Result<()> {
    match spec {
        MountSpec::Bind { source, read_only } => bind_mount(source, target, *read_only),
        MountSpec::Overlay(o) => mount_overlay(target, o),
    }
}

fn errno_ctx(e: rustix::io::Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Mounts an overlay described by `spec` on `target`.
pub fn mount_overlay(target: &Path, spec: &OverlaySpec) -> io::Result<()> {
    if spec.lowers.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "overlay needs at least one lower directory",
        ));
    }
    if spec.lowers.len() > MAX_OVERLAY_LOWERS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} lower directories, the kernel takes at most {MAX_OVERLAY_LOWERS}",
                spec.lowers.len()
            ),
        ));
    }
    match mount_overlay_new_api(target, spec) {
        Ok(()) => Ok(()),
        Err(NewApiError::Unsupported) => mount_overlay_legacy(target, spec),
        Err(NewApiError::Failed(e)) => Err(e),
    }
}

enum NewApiError {
    /// The kernel lacks the new mount API or `lowerdir+`.
    Unsupported,
    Failed(io::Error),
}

/// The deepest directory containing every one of `paths` (absolute paths only), if it is deeper than `/`.
fn common_dir<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    let mut common: Option<&[u8]> = None;
    for p in paths {
        let bytes = p.as_os_str().as_bytes();
        if !bytes.starts_with(b"/") {
            return None;
        }
        // The path's directory: up to its last separator.
        let dir = &bytes[..bytes.iter().rposition(|b| *b == b'/')?];
        common = Some(match common {
            None => dir,
            Some(c) => {
                let same = c.iter().zip(dir).take_while(|(a, b)| a == b).count();
                if same == c.len() && (dir.len() == same || dir[same] == b'/') {
                    c
                } else if same == dir.len() && c[same] == b'/' {
                    dir
                } else {
                    // Back to the last separator both share.
                    &c[..c[..same].iter().rposition(|b| *b == b'/')?]
                }
            }
        });
    }
    common
        .filter(|c| c.len() > 1)
        .map(|c| PathBuf::from(std::ffi::OsStr::from_bytes(c)))
}

thread_local! {
    /// The working directory this thread had when it was given its own (`unshare(CLONE_FS)`); `None` until
    /// then.
    static OWN_CWD: std::cell::RefCell<Option<OwnedFd>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the calling thread's working directory at `dir`, then moves it back. The first call on a
/// thread gives it a working directory of its own, so that no other thread sees the move. `None` when that
/// cannot be done (then nothing was changed).
fn in_dir<T>(dir: &Path, f: impl FnOnce() -> T) -> Option<T> {
    let target = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    OWN_CWD.with(|own| {
        let mut own = own.borrow_mut();
        if own.is_none() {
            let here = rustix::fs::open(
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()?;
            // SAFETY: CLONE_FS only gives this thread its own working directory, root and umask; no file
            // descriptor table or memory is unshared.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }.ok()?;
            *own = Some(here);
        }
        let back = own.as_ref()?;
        rustix::process::fchdir(&target).ok()?;
        // Back also if `f` panics.
        let _back = Back(back);
        Some(f())
    })
}

/// Moves the thread's working directory back to the directory it holds when dropped.
struct Back<'a>(&'a OwnedFd);

impl Drop for Back<'_> {
    fn drop(&mut self) {
        if rustix::process::fchdir(self.0).is_err() {
            let _ = rustix::process::chdir("/");
        }
    }
}

/// The new-API mount of `spec`, the directories given as paths relative to their common directory where there
/// is one.
fn mount_overlay_new_api(target: &Path, spec: &OverlaySpec) -> Result<(), NewApiError> {
    let dirs = spec.lowers.iter().chain(&spec.upper).chain(&spec.work);
    if let Some(base) = common_dir(dirs.map(PathBuf::as_path)) {
        let relative = OverlaySpec {
            lowers: spec.lowers.iter().map(|p| relative_to(p, &base)).collect(),
            upper: spec.upper.as_deref().map(|p| relative_to(p, &base)),
            work: spec.work.as_deref().map(|p| relative_to(p, &base)),
            label: spec.label.clone(),
            read_only: spec.read_only,
        };
        if let Some(r) = in_dir(&base, || configure_overlay(&relative, spec, target)) {
            return finish_overlay(r?, spec.read_only, target);
        }
    }
    finish_overlay(configure_overlay(spec, spec, target)?, spec.read_only, target)
}

/// `path` relative to `base` (one of its ancestors); `.` for `base` itself. Compared as bytes (`base` as
/// [`common_dir`] gives it is a leading run of whole components of `path`), with `Path::strip_prefix` only for
/// what is not spelt that way: that one walks both paths component by component, which cost more than the
/// kernel's own walk of the short name for every layer of a deep stack.
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let (p, b) = (path.as_os_str().as_bytes(), base.as_os_str().as_bytes());
    if let Some(rest) = p.strip_prefix(b) {
        if rest.is_empty() || rest[0] == b'/' || b.ends_with(b"/") {
            let r = &rest[rest.iter().take_while(|c| **c == b'/').count()..];
            let r = if r.is_empty() { &b"."[..] } else { r };
            return PathBuf::from(std::ffi::OsStr::from_bytes(r));
        }
    }
    match path.strip_prefix(base) {
        Ok(r) if r.as_os_str().is_empty() => PathBuf::from("."),
        Ok(r) => r.to_path_buf(),
        Err(_) => path.to_path_buf(),
    }
}

/// Opens an overlay filesystem context and sets its layers and options from `spec` (paths as given); errors
/// name the paths of `named` and the mount's `target`. Gives the created context.
fn configure_overlay(spec: &OverlaySpec, named: &OverlaySpec, target: &Path) -> Result<OwnedFd, NewApiError> {
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOSYS) => return Err(NewApiError::Unsupported),
        Err(e) => return Err(NewApiError::Failed(errno_ctx(e, "fsopen overlay"))),
    };
    let fail = |e: rustix::io::Errno, what: String| NewApiError::Failed(errno_ctx(e, &what));
    for (i, (lower, name)) in spec.lowers.iter().zip(&named.lowers).enumerate() {
        match fsconfig_set_string(&fs, "lowerdir+", lower.as_path()) {
            Ok(()) => {}
            Err(rustix::io::Errno::INVAL) if i == 0 => return Err(NewApiError::Unsupported),
            Err(e) => return Err(fail(e, format!("overlay lowerdir+ {}", name.display()))),
        }
    }
    if let (Some(upper), Some(name)) = (&spec.upper, &named.upper) {
        fsconfig_set_string(&fs, "upperdir", upper.as_path())
            .map_err(|e| fail(e, format!("overlay upperdir {}", name.display())))?;
    }
    if let (Some(work), Some(name)) = (&spec.work, &named.work) {
        fsconfig_set_string(&fs, "workdir", work.as_path())
            .map_err(|e| fail(e, format!("overlay workdir {}", name.display())))?;
    }
    // Index and redirects off: layers are shared between many mounts (as overlay2 does).
    let _ = fsconfig_set_string(&fs, "index", "off");
    let _ = fsconfig_set_string(&fs, "redirect_dir", "off");
    if let Some(label) = spec.label.as_deref().filter(|l| !l.is_empty()) {
        fsconfig_set_string(&fs, "context", label).map_err(|e| fail(e, "overlay context".into()))?;
    }
    if spec.read_only {
        fsconfig_set_flag(&fs, "ro").map_err(|e| fail(e, "overlay ro".into()))?;
    }
    fsconfig_create(&fs).map_err(|e| fail(e, format!("create overlay for {}", target.display())))?;
    Ok(fs)
}

/// Mounts the created overlay context `fs` on `target` (read-only when asked).
fn finish_overlay(fs: OwnedFd, read_only: bool, target: &Path) -> Result<(), NewApiError> {
    let fail = |e: rustix::io::Errno, what: String| NewApiError::Failed(errno_ctx(e, &what));
    let attrs = if read_only {
        MountAttrFlags::MOUNT_ATTR_RDONLY
    } else {
        MountAttrFlags::empty()
    };
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| fail(e, format!("fsmount overlay for {}", target.display())))?;
    move_mount(
        mnt.as_fd(),
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| fail(e, format!("move_mount overlay to {}", target.display())))?;
    Ok(())
}

fn mount_overlay_legacy(target: &Path, spec: &OverlaySpec) -> io::Result<()> {
    // Directory handles kept open for the duration of the call; the kernel resolves
    // `/proc/self/fd/N` to the directory itself.
    let mut handles: Vec<OwnedFd> = Vec::with_capacity(spec.lowers.len());
    for lower in &spec.lowers {
        let fd = rustix::fs::open(
            lower.as_path(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_ctx(e, &format!("open lower {}", lower.display())))?;
        handles.push(fd);
    }
    let lowers: Vec<String> = handles
        .iter()
        .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .collect();
    let mut data = format!("lowerdir={}", lowers.join(":"));
    for (key, dir) in [("upperdir", &spec.upper), ("workdir", &spec.work)] {
        if let Some(dir) = dir {
            let s = dir.to_str().filter(|s| !s.contains([',', ':'])).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{key} {} cannot be passed", dir.display()),
                )
            })?;
            data.push_str(&format!(",{key}={s}"));
        }
    }
    data.push_str(",index=off,redirect_dir=off");
    if let Some(label) = spec.label.as_deref().filter(|l| !l.is_empty()) {
        data.push_str(&format!(",context=\"{label}\""));
    }
    if data.len() >= 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "overlay options of {} bytes exceed one page; this kernel lacks lowerdir+",
                data.len()
            ),
        ));
    }
    let data = CString::new(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let flags = if spec.read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    rustix::mount::mount("overlay", target, "overlay", flags, data.as_c_str())
        .map_err(|e| errno_ctx(e, &format!("mount overlay on {}", target.display())))
}

/// Bind-mounts `source` on `target`, read-only when asked.
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    rustix::mount::mount_bind(source, target)
        .map_err(|e| errno_ctx(e, &format!("bind {} on {}", source.display(), target.display())))?;
    if read_only {
        let flags = MountFlags::BIND | MountFlags::RDONLY;
        if let Err(e) = rustix::mount::mount_remount(target, flags, "") {
            let _ = unmount(target, true);
            return Err(errno_ctx(e, &format!("remount {} read-only", target.display())));
        }
    }
    Ok(())
}

/// Mounts the EROFS image file `image` read-only on `target`, backed by the file itself (no loop device:
/// Linux 6.12 and later with `CONFIG_EROFS_FS_BACKED_BY_FILE`). An older kernel answers `ENOTBLK`.
pub fn mount_erofs_file(image: &Path, target: &Path) -> io::Result<()> {
    rustix::mount::mount(image, target, "erofs", MountFlags::RDONLY, c"").map_err(|e| {
        errno_ctx(
            e,
            &format!("mount EROFS image {} on {}", image.display(), target.display()),
        )
    })
}

/// Unmounts `target`; with `detach` the mount is lazily detached (`MNT_DETACH`).
/// A target that is not a mount point is not an error.
pub fn unmount(target: &Path, detach: bool) -> io::Result<()> {
    let flags = if detach {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    match rustix::mount::unmount(target, flags | UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(errno_ctx(e, &format!("unmount {}", target.display()))),
    }
}

/// Detaches the mount at `target` (`MNT_DETACH`) while an `O_PATH` descriptor of its root keeps a reference
/// to it: the mount leaves the mount table now, and its teardown (for an overlay, the `syncfs` of its upper
/// filesystem) runs when the returned descriptor is closed, in the thread that closes it, instead of in this
/// call. None when `target` is not a mount point (nothing to detach) or cannot be opened (then it is detached
/// as [`unmount`] does).
pub fn detach_held(target: &Path) -> io::Result<Option<OwnedFd>> {
    let held = match rustix::fs::open(
        target,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(_) => return unmount(target, true).map(|()| None),
    };
    match rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(Some(held)),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(errno_ctx(e, &format!("unmount {}", target.display()))),
    }
}

/// Mount points at or below `dir`, from `/proc/self/mountinfo`, deepest first.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(mount_points_in(
        &std::fs::read_to_string("/proc/self/mountinfo")?,
        dir,
    ))
}

/// Mount points at or below `dir` in `table` (the format of `/proc/self/mountinfo`), deepest first.
pub fn mount_points_in(table: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in table.lines() {
        if let Some(mp) = line.split(' ').nth(4) {
            let mp = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(mp)));
            if mp.starts_with(dir) {
                out.push(mp);
            }
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    out.dedup();
    out
}

/// Whether `path` is a mount point (present in the mount table).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mounts_under(path)?.iter().any(|p| p == path))
}

/// Whether `path` is the root of a mount, from one `statx` (no mount table read): `Some(false)` for a missing
/// path, `None` where the kernel does not report mount roots (before Linux 5.8).
pub fn is_mount_root(path: &Path) -> io::Result<Option<bool>> {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags};
    match statx(
        CWD,
        path,
        AtFlags::NO_AUTOMOUNT | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::empty(),
    ) {
        Ok(st) => Ok(st
            .stx_attributes_mask
            .contains(StatxAttributes::MOUNT_ROOT)
            .then(|| st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(Some(false)),
        Err(rustix::io::Errno::NOSYS) => Ok(None),
        Err(e) => Err(errno_ctx(e, &format!("statx {}", path.display()))),
    }
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Mount points of the filesystem on device `dev` (an `st_dev`, as `major:minor` in `/proc/self/mountinfo`),
/// in this mount namespace.
pub fn mounts_of_device(dev: u64) -> io::Result<Vec<PathBuf>> {
    let want = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let id = f.nth(2)?;
            let mp = f.nth(1)?;
            (id == want).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(mp))))
        })
        .collect())
}

/// Processes of other mount namespaces in which the filesystem on device `dev` is mounted: one
/// `(pid, command name)` per such namespace. A namespace made while the filesystem was mounted here (a
/// container being set up, `unshare -m`) holds a copy of that mount until it lets it go, and with it the
/// device stays open after the mount here is gone.
pub fn namespaces_mounting(dev: u64) -> io::Result<Vec<(u32, String)>> {
    let want = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    let own = std::fs::read_link("/proc/self/ns/mnt")?;
    let mut seen = std::collections::HashSet::from([own]);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let dir = entry.path();
        // Processes that exit during the walk, and kernel threads, have no namespace link to read.
        let Ok(ns) = std::fs::read_link(dir.join("ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(table) = std::fs::read_to_string(dir.join("mountinfo")) else {
            continue;
        };
        if table.lines().any(|l| l.split(' ').nth(2) == Some(want.as_str())) {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            found.push((pid, comm.trim_end().to_owned()));
        }
    }
    Ok(found)
}

/// The device number (`st_rdev`) of the device node at `path`.
pub fn rdev_of(path: &Path) -> io::Result<u64> {
    rustix::fs::stat(path)
        .map(|st| st.st_rdev)
        .map_err(|e| errno_ctx(e, &format!("stat {}", path.display())))
}

/// The device (`st_dev`) of the filesystem holding `path`.
pub fn device_of(path: &Path) -> io::Result<u64> {
    rustix::fs::stat(path)
        .map(|st| st.st_dev)
        .map_err(|e| errno_ctx(e, &format!("stat {}", path.display())))
}

// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)`.
const FIFREEZE: u64 = 0xC004_5877;
const FITHAW: u64 = 0xC004_5878;

/// A filesystem frozen with `FIFREEZE` (its dirty data and journal written, new writes blocked): thawed by
/// [`Frozen::thaw`], or when dropped.
#[derive(Debug)]
pub struct Frozen {
    fd: OwnedFd,
    path: PathBuf,
    frozen: bool,
}

/// Freezes the filesystem mounted at `path` (`FIFREEZE`): on return every write made before the call is on
/// its device and flushed, and writers block until the thaw.
pub fn freeze(path: &Path) -> io::Result<Frozen> {
    let fd = open_mount_dir(path)?;
    fs_ioctl(&fd, FIFREEZE)
        .map_err(|e| io::Error::new(e.kind(), format!("freezing {}: {e}", path.display())))?;
    Ok(Frozen {
        fd,
        path: path.to_path_buf(),
        frozen: true,
    })
}

/// Thaws the filesystem mounted at `path` (`FITHAW`), frozen by whoever; one that is not frozen is fine.
pub fn thaw(path: &Path) -> io::Result<()> {
    let fd = open_mount_dir(path)?;
    match fs_ioctl(&fd, FITHAW) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.map_err(|e| io::Error::new(e.kind(), format!("thawing {}: {e}", path.display()))),
    }
}

impl Frozen {
    /// Thaws the filesystem (`FITHAW`).
    pub fn thaw(mut self) -> io::Result<()> {
        self.frozen = false;
        fs_ioctl(&self.fd, FITHAW)
            .map_err(|e| io::Error::new(e.kind(), format!("thawing {}: {e}", self.path.display())))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.frozen {
            let _ = fs_ioctl(&self.fd, FITHAW);
        }
    }
}

/// `ioctl(fd, request, &0)` for the freeze requests, which take an (unused) `int`.
fn fs_ioctl(fd: &OwnedFd, request: u64) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: `fd` is a live descriptor; FIFREEZE and FITHAW encode an `int` argument, and `arg` is one that
    // lives for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut arg as *mut libc::c_int) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A read-only handle on the directory `path`, for the calls on the filesystem holding it.
fn open_mount_dir(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_ctx(e, &format!("open {}", path.display())))
}

/// Flushes the filesystem holding `path` (`syncfs(2)`): one call per layer instead of one fsync per file.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let fd = open_mount_dir(path)?;
    rustix::fs::syncfs(&fd).map_err(|e| errno_ctx(e, &format!("syncfs {}", path.display())))
}

/// The filesystem type name of `path` (`ext4`, `xfs`, ...), from the mount table entry that holds it.
pub fn filesystem_type(path: &Path) -> io::Result<String> {
    let file = File::open("/proc/self/mountinfo")?;
    let mut best: Option<(usize, String)> = None;
    for line in BufReader::new(file).lines() {
        let line = line?;
        let mut halves = line.splitn(2, " - ");
        let (left, right) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let mp = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(mp)));
        if path.starts_with(&mp) {
            let fstype = right.split(' ').next().unwrap_or("unknown").to_string();
            let len = mp.as_os_str().len();
            if best.as_ref().is_none_or(|(l, _)| len >= *l) {
                best = Some((len, fstype));
            }
        }
    }
    Ok(best.map(|(_, t)| t).unwrap_or_else(|| "unknown".into()))
}

/// Whether the running kernel's overlay has the `index` option (its module parameter is visible); looked up once.
pub fn overlay_has_index_option() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| Path::new("/sys/module/overlay/parameters/index").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory for a test that mounts, when it may (root); otherwise the test says it is skipped
    /// (and fails under CI).
    fn mount_scratch(test: &str, what: &str) -> Option<tempfile::TempDir> {
        if crate::fs::running_as_root() {
            return Some(tempfile::tempdir().unwrap());
        }
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "this test needs root under CI"
        );
        eprintln!("SKIPPED {test}: needs root (mounts {what})");
        None
    }

    #[test]
    fn copies_of_a_mount_in_other_namespaces_are_found() {
        let Some(t) = mount_scratch("copies_of_a_mount_in_other_namespaces_are_found", "a tmpfs") else {
            return;
        };
        let mp = t.path().join("m");
        std::fs::create_dir(&mp).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "lamina-ns-test"])
            .arg(&mp)
            .status()
            .unwrap();
        assert!(ok.success());
        let dev = device_of(&mp).unwrap();
        assert_eq!(mounts_of_device(dev).unwrap(), vec![mp.clone()]);
        assert!(namespaces_mounting(dev).unwrap().is_empty());
        let mut copy = std::process::Command::new("unshare")
            .args(["-m", "sleep", "60"])
            .spawn()
            .unwrap();
        let pid = copy.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = namespaces_mounting(dev).unwrap();
            if found.iter().any(|(p, c)| *p == pid && c == "sleep") || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        unmount(&mp, false).unwrap();
        let after = namespaces_mounting(dev).unwrap();
        copy.kill().unwrap();
        copy.wait().unwrap();
        assert!(found.iter().any(|(p, _)| *p == pid), "{found:?}");
        assert!(
            after.iter().any(|(p, _)| *p == pid),
            "the copy outlives the mount here: {after:?}"
        );
        assert!(mounts_of_device(dev).unwrap().is_empty());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo("/a\\040b"), b"/a b");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
        assert_eq!(unescape_mountinfo("/x\\"), b"/x\\");
    }

    #[test]
    fn options_of_descriptions() {
        let bind = MountSpec::Bind {
            source: "/d/layers/1/diff".into(),
            read_only: true,
        };
        assert_eq!(
            (bind.kind(), bind.options()),
            ("bind", vec!["ro".into(), "rbind".into()])
        );
        let view = MountSpec::Overlay(OverlaySpec {
            lowers: vec!["/d/layers/2/diff".into(), "/d/layers/1/diff".into()],
            read_only: true,
            ..OverlaySpec::default()
        });
        assert_eq!(
            view.options(),
            vec!["lowerdir=/d/layers/2/diff:/d/layers/1/diff".to_string()]
        );
        assert_eq!(view.source(), PathBuf::from("overlay"));
        let active = MountSpec::Overlay(OverlaySpec {
            lowers: vec!["/d/layers/1/diff".into()],
            upper: Some("/d/layers/3/diff".into()),
            work: Some("/d/layers/3/work".into()),
            ..OverlaySpec::default()
        });
        let opts = active.options();
        assert_eq!(
            opts.first().map(|o| o == "index=off"),
            Some(overlay_has_index_option())
        );
        assert_eq!(
            opts.iter()
                .filter(|o| !o.starts_with("index"))
                .cloned()
                .collect::<Vec<_>>(),
            vec![
                "workdir=/d/layers/3/work".to_string(),
                "upperdir=/d/layers/3/diff".to_string(),
                "lowerdir=/d/layers/1/diff".to_string()
            ]
        );
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(!filesystem_type(Path::new("/")).unwrap().is_empty());
    }

    #[test]
    fn common_directory_of_layers() {
        let p = |s: &str| PathBuf::from(s);
        let dirs = [
            p("/d/layers/2/diff"),
            p("/d/layers/1/diff"),
            p("/d/layers/3/work"),
        ];
        assert_eq!(
            common_dir(dirs.iter().map(PathBuf::as_path)),
            Some(p("/d/layers"))
        );
        assert_eq!(relative_to(&dirs[0], Path::new("/d/layers")), p("2/diff"));
        assert_eq!(
            relative_to(Path::new("/d/layers"), Path::new("/d/layers")),
            p(".")
        );
        // The components `Path::strip_prefix` gives, however the paths are spelt.
        for (path, base) in [
            ("/d/layers/2/diff", "/d/layers"),
            ("/d/layers//2/diff", "/d/layers"),
            ("/d/layers/", "/d/layers"),
            ("/d/layers/2/diff", "/d/layers/"),
            ("/d/layers2/diff", "/d/layers"),
            ("/d/x/diff", "/d/layers"),
            ("/d/./layers/2", "/d/layers"),
            ("/x", "/"),
        ] {
            let want = match Path::new(path).strip_prefix(base) {
                Ok(r) if r.as_os_str().is_empty() => p("."),
                Ok(r) => r.to_path_buf(),
                Err(_) => p(path),
            };
            assert_eq!(
                relative_to(Path::new(path), Path::new(base))
                    .components()
                    .collect::<Vec<_>>(),
                want.components().collect::<Vec<_>>(),
                "{path} against {base}"
            );
        }
        // Nothing shorter than absolute paths to gain, or not absolute: none.
        assert_eq!(common_dir([Path::new("/a/x"), Path::new("/b/y")]), None);
        assert_eq!(common_dir([Path::new("a/x"), Path::new("a/y")]), None);
        assert_eq!(common_dir([Path::new("/ab/x"), Path::new("/a/y")]), None);
        assert_eq!(
            common_dir([Path::new("/d/ab/x"), Path::new("/d/a/y")]),
            Some(p("/d"))
        );
        assert_eq!(
            common_dir([Path::new("/d/a/x"), Path::new("/d/a/b/y")]),
            Some(p("/d/a"))
        );
        assert_eq!(
            common_dir([Path::new("/d/a/b/y"), Path::new("/d/a/x")]),
            Some(p("/d/a"))
        );
    }

    #[test]
    fn working_directory_moves_on_this_thread_only() {
        let before = std::env::current_dir().unwrap();
        let seen = std::thread::spawn(|| {
            let inside = in_dir(Path::new("/proc"), || std::env::current_dir().unwrap());
            (inside, std::env::current_dir().unwrap())
        })
        .join()
        .unwrap();
        if let (Some(inside), after) = seen {
            assert_eq!(inside, Path::new("/proc"));
            assert_eq!(after, before);
        }
        assert_eq!(std::env::current_dir().unwrap(), before);
    }

    #[test]
    fn mount_roots_from_statx() {
        if let Some(root) = is_mount_root(Path::new("/")).unwrap() {
            assert!(root);
            let dir = std::env::temp_dir().join(format!("lamina-sys-mount-root-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let plain = is_mount_root(&dir);
            std::fs::remove_dir(&dir).unwrap();
            assert_eq!(plain.unwrap(), Some(false));
        }
        assert_eq!(
            is_mount_root(Path::new("/nonexistent/lamina")).unwrap(),
            Some(false)
        );
    }
}
