//! Shared helpers for the integration tests: a raw tar fixture builder and tree snapshots (the root check is
//! `lamina-testkit`'s).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A fresh temporary directory for `test`, or `None` (skip the test) when not root.
pub fn root_tempdir(test: &str) -> Option<tempfile::TempDir> {
    lamina_testkit::require_root(test).then(|| tempfile::tempdir().unwrap())
}

/// Two fresh empty directories `a` and `b` in `dir`.
pub fn two_dirs(dir: &Path, a: &str, b: &str) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join(a), dir.join(b));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    (a, b)
}

/// An overlay whiteout for `name` in the directory `dir` (created if missing).
pub fn whiteout(dir: &Path, name: &str) {
    fs::create_dir_all(dir).unwrap();
    let d = File::open(dir).unwrap();
    lamina_sys::fs::make_whiteout(d.as_fd(), name.as_bytes()).unwrap();
}

pub fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

pub fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

pub fn open_dir(p: &Path) -> File {
    File::open(p).unwrap()
}

/// Builds tars block by block, so malformed inputs can be produced too.
#[derive(Default)]
pub struct Tar {
    pub buf: Vec<u8>,
}

pub struct H<'a> {
    pub name: &'a [u8],
    pub flag: u8,
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: &'a [u8],
    pub major: u32,
    pub minor: u32,
}

impl<'a> H<'a> {
    pub fn new(name: &'a [u8], flag: u8) -> Self {
        H {
            name,
            flag,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            link: b"",
            major: 0,
            minor: 0,
        }
    }
}

impl Tar {
    pub fn new() -> Self {
        Tar::default()
    }

    /// A raw ustar header (names must fit the 100-byte field).
    pub fn header(&mut self, h: &H<'_>) -> &mut Self {
        let mut hdr = tar::Header::new_ustar();
        let n = h.name.len().min(100);
        hdr.as_old_mut().name[..n].copy_from_slice(&h.name[..n]);
        let l = h.link.len().min(100);
        hdr.as_old_mut().linkname[..l].copy_from_slice(&h.link[..l]);
        hdr.set_mode(h.mode);
        hdr.set_uid(h.uid);
        hdr.set_gid(h.gid);
        hdr.set_mtime(h.mtime);
        hdr.set_size(h.size);
        hdr.as_old_mut().linkflag[0] = h.flag;
        hdr.set_device_major(h.major).unwrap();
        hdr.set_device_minor(h.minor).unwrap();
        hdr.set_cksum();
        self.buf.extend_from_slice(hdr.as_bytes());
        self
    }

    pub fn raw_block(&mut self, block: &[u8; 512]) -> &mut Self {
        self.buf.extend_from_slice(block);
        self
    }

    pub fn data(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        let rem = data.len() % 512;
        if rem != 0 {
            self.buf.extend(std::iter::repeat_n(0u8, 512 - rem));
        }
        self
    }

    pub fn file(&mut self, name: &[u8], data: &[u8]) -> &mut Self {
        let mut h = H::new(name, b'0');
        h.size = data.len() as u64;
        self.header(&h).data(data)
    }

    pub fn file_mode(&mut self, name: &[u8], data: &[u8], mode: u32) -> &mut Self {
        let mut h = H::new(name, b'0');
        h.size = data.len() as u64;
        h.mode = mode;
        self.header(&h).data(data)
    }

    pub fn dir(&mut self, name: &[u8]) -> &mut Self {
        let mut h = H::new(name, b'5');
        h.mode = 0o755;
        self.header(&h)
    }

    pub fn symlink(&mut self, name: &[u8], target: &[u8]) -> &mut Self {
        let mut h = H::new(name, b'2');
        h.link = target;
        h.mode = 0o777;
        self.header(&h)
    }

    pub fn hardlink(&mut self, name: &[u8], target: &[u8]) -> &mut Self {
        let mut h = H::new(name, b'1');
        h.link = target;
        self.header(&h)
    }

    /// A PAX extended header with the given records (applies to the next entry).
    pub fn pax(&mut self, records: &[(&[u8], &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            body.extend(lamina_testkit::reliability::pax_record(k, v));
        }
        let mut h = H::new(b"././@PaxHeader", b'x');
        h.size = body.len() as u64;
        self.header(&h).data(&body)
    }

    /// A GNU long name (`L`) or long link (`K`) entry.
    pub fn gnu_long(&mut self, flag: u8, value: &[u8]) -> &mut Self {
        let mut v = value.to_vec();
        v.push(0);
        let mut h = H::new(b"././@LongLink", flag);
        h.size = v.len() as u64;
        self.header(&h).data(&v)
    }

    /// The bytes so far, without an end marker.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    pub fn end(&mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
        std::mem::take(&mut self.buf)
    }
}

/// What a tree looks like, for comparisons: path -> description.
pub type Snapshot = BTreeMap<Vec<u8>, String>;

fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    // Read through sys helpers: the parent fd plus name, never following.
    let parent = File::open(p.parent().unwrap()).unwrap();
    let name = p.file_name().unwrap().as_bytes();
    let mut out = Vec::new();
    for k in lamina_sys::fs::list_xattrs_at(parent.as_fd(), name).unwrap() {
        if k.starts_with(b"trusted.overlay.") || k.starts_with(b"security.selinux") {
            continue;
        }
        let v = lamina_sys::fs::get_xattr_at(parent.as_fd(), name, &k)
            .unwrap()
            .unwrap_or_default();
        out.push((k, v));
    }
    out.sort();
    out
}

/// Describes every entry under `root`: type, mode, owner, mtime (seconds; directories
/// too unless `dir_mtimes` is false), content digest, link target, device numbers,
/// xattrs, and hardlink groups (by the first path in sorted order).
pub fn snapshot(root: &Path, dir_mtimes: bool) -> Snapshot {
    snapshot_skipping(root, dir_mtimes, None)
}

/// Like [`snapshot`], without looking inside `skip` (its own entry is still described).
pub fn snapshot_skipping(root: &Path, dir_mtimes: bool, skip: Option<&Path>) -> Snapshot {
    let mut out = Snapshot::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() && Some(p.as_path()) != skip {
                stack.push(p.clone());
            }
            all.push((p, md));
        }
    }
    all.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    for (p, md) in all {
        let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!(
                "symlink->{:?}",
                String::from_utf8_lossy(std::fs::read_link(&p).unwrap().as_os_str().as_bytes())
            )
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            format!(
                "file len={} sha={:?}",
                data.len(),
                Sha256::digest(&data).as_slice()
            )
        } else if ft.is_char_device() {
            format!("chr {}:{}", major(md.rdev()), minor(md.rdev()))
        } else if ft.is_block_device() {
            format!("blk {}:{}", major(md.rdev()), minor(md.rdev()))
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            "other".to_string()
        };
        let link = if !md.is_dir() && md.nlink() > 1 {
            let first = inodes.entry((md.dev(), md.ino())).or_insert_with(|| rel.clone());
            format!(" link-group={:?}", String::from_utf8_lossy(first))
        } else {
            String::new()
        };
        let mtime = if md.is_dir() && !dir_mtimes {
            "-".to_string()
        } else {
            md.mtime().to_string()
        };
        let mode = if ft.is_symlink() {
            0o777
        } else {
            md.mode() & 0o7777
        };
        let xattrs = xattrs_of(&p);
        out.insert(
            rel,
            format!(
                "{kind} mode={mode:o} uid={} gid={} mtime={mtime}{link} xattrs={xattrs:?}",
                md.uid(),
                md.gid()
            ),
        );
    }
    out
}

/// (name, type flag, mode, size, link) of one tar entry.
pub type Listed = (Vec<u8>, u8, u32, u64, Vec<u8>);

/// Lists the entries of a tar, via the `tar` crate's reader.
pub fn tar_listing(data: &[u8]) -> Vec<Listed> {
    let mut a = tar::Archive::new(data);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        out.push((
            e.path_bytes().into_owned(),
            h.entry_type().as_byte(),
            h.mode().unwrap(),
            e.size(),
            e.link_name_bytes().map(|c| c.into_owned()).unwrap_or_default(),
        ));
    }
    out
}

pub fn fd(f: &File) -> BorrowedFd<'_> {
    f.as_fd()
}

/// Hashes of every file under `root` (and symlink targets, modes): proof that nothing
/// outside the layer changed.
pub fn fingerprint(root: &Path) -> Snapshot {
    snapshot(root, true)
}
