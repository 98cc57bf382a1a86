//! Harness of the reliability tier (`tests/reliability_*.rs`, issue 8): sizes, a deterministic random
//! generator, a raw tar writer that can say anything a header can say, a deep sentinel (content, mode, owner,
//! xattrs, times, link counts) and a tree walker that compares two extracted trees.
//!
//! Sizes: the bounded (CI) size runs under `cargo test`; `LAMINA_RELIABILITY=full` selects the full size.
//! Individual counts can be overridden with the variables named by each test.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hasher};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

// ------------------------------------------------------------------------------------------------------------
// Sizes
// ------------------------------------------------------------------------------------------------------------

/// True when `LAMINA_RELIABILITY=full`.
pub fn full() -> bool {
    std::env::var("LAMINA_RELIABILITY").is_ok_and(|v| v == "full")
}

/// `var` if set to a number, else `full_n` under `LAMINA_RELIABILITY=full`, else `ci_n`.
pub fn count(var: &str, ci_n: u64, full_n: u64) -> u64 {
    if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        return n;
    }
    if full() {
        full_n
    } else {
        ci_n
    }
}

/// Like [`count`], in seconds.
pub fn seconds(var: &str, ci_s: u64, full_s: u64) -> Duration {
    Duration::from_secs(count(var, ci_s, full_s))
}

/// Base seed: `LAMINA_RELIABILITY_SEED`, else a fixed one (runs are reproducible by default).
pub fn base_seed() -> u64 {
    std::env::var("LAMINA_RELIABILITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1a_313a)
}

// ------------------------------------------------------------------------------------------------------------
// Random numbers
// ------------------------------------------------------------------------------------------------------------

/// One step of splitmix64: advances `state` and returns the next 64 random bits.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: small, deterministic, good enough for test generation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

// ------------------------------------------------------------------------------------------------------------
// Raw tar writing
// ------------------------------------------------------------------------------------------------------------

/// Fields of one raw header. Names and link names longer than the fields are cut (use PAX or GNU records for
/// long ones); numbers are written in octal when they fit, else in base-256.
#[derive(Debug, Clone)]
pub struct Hdr {
    pub name: Vec<u8>,
    pub flag: u8,
    pub mode: u64,
    pub uid: i64,
    pub gid: i64,
    pub size: u64,
    pub mtime: i64,
    pub link: Vec<u8>,
    pub major: u64,
    pub minor: u64,
}

impl Hdr {
    pub fn new(name: &[u8], flag: u8) -> Hdr {
        Hdr {
            name: name.to_vec(),
            flag,
            mode: if flag == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 1_700_000_000,
            link: Vec::new(),
            major: 0,
            minor: 0,
        }
    }
}

fn put_num(h: &mut [u8; 512], off: usize, len: usize, v: i64) {
    let octal = format!("{:0width$o}", v, width = len - 1);
    if v >= 0 && octal.len() < len {
        h[off..off + len - 1].copy_from_slice(octal.as_bytes());
        h[off + len - 1] = 0;
    } else {
        // base-256, two's complement, first byte 0x80 (positive) or 0xff (negative)
        let bytes = v.to_be_bytes();
        for (i, b) in h[off..off + len].iter_mut().enumerate() {
            let from_end = len - 1 - i;
            *b = if from_end < 8 {
                bytes[7 - from_end]
            } else if v < 0 {
                0xff
            } else {
                0
            };
        }
        h[off] = if v < 0 { 0xff } else { 0x80 };
    }
}

/// Recomputes the checksum of a header block.
pub fn fix_checksum(h: &mut [u8]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h[..512].iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// One ustar header block (name split into prefix/name when it fits, else cut).
pub fn header_block(hd: &Hdr) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = &hd.name;
    let (prefix, short): (&[u8], &[u8]) = if name.len() <= 100 {
        (b"", name)
    } else if let Some(split) = (0..name.len())
        .rev()
        .find(|&i| name[i] == b'/' && i <= 155 && name.len() - i - 1 <= 100 && i > 0)
    {
        (&name[..split], &name[split + 1..])
    } else {
        (b"", &name[..100])
    };
    h[..short.len()].copy_from_slice(short);
    h[345..345 + prefix.len()].copy_from_slice(prefix);
    put_num(&mut h, 100, 8, hd.mode as i64);
    put_num(&mut h, 108, 8, hd.uid);
    put_num(&mut h, 116, 8, hd.gid);
    put_num(&mut h, 124, 12, hd.size as i64);
    put_num(&mut h, 136, 12, hd.mtime);
    h[156] = hd.flag;
    let l = hd.link.len().min(100);
    h[157..157 + l].copy_from_slice(&hd.link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_num(&mut h, 329, 8, hd.major as i64);
    put_num(&mut h, 337, 8, hd.minor as i64);
    fix_checksum(&mut h);
    h
}

/// A PAX record `LEN key=value\n`.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len += 1;
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// A tar stream built entry by entry; `blocks` records where each header starts (for mutations).
#[derive(Debug, Clone, Default)]
pub struct RawTar {
    pub buf: Vec<u8>,
    pub headers: Vec<usize>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    /// Header, `data` and padding. The header's size is taken from `hd` (it may lie about `data`).
    pub fn raw(&mut self, hd: &Hdr, data: &[u8]) -> &mut Self {
        self.headers.push(self.buf.len());
        self.buf.extend_from_slice(&header_block(hd));
        self.data(data);
        self
    }

    /// One raw 512-byte block (the first 512 bytes of `block`), counted as a header.
    pub fn raw_block(&mut self, block: &[u8]) -> &mut Self {
        self.headers.push(self.buf.len());
        self.buf.extend_from_slice(&block[..512]);
        self
    }

    pub fn data(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// An entry whose header says what `data` is.
    pub fn entry(&mut self, mut hd: Hdr, data: &[u8]) -> &mut Self {
        hd.size = data.len() as u64;
        self.raw(&hd, data)
    }

    /// A PAX extended header (`x`) for the next entry.
    pub fn pax(&mut self, records: &[(&[u8], &[u8])]) -> &mut Self {
        let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        self.entry(Hdr::new(b"././@PaxHeader", b'x'), &data)
    }

    /// A GNU long name (`L`) or long link (`K`) record for the next entry.
    pub fn gnu_long(&mut self, flag: u8, value: &[u8]) -> &mut Self {
        let mut data = value.to_vec();
        data.push(0);
        self.entry(Hdr::new(b"././@LongLink", flag), &data)
    }

    pub fn file(&mut self, name: &[u8], mode: u64, data: &[u8]) -> &mut Self {
        let mut hd = Hdr::new(name, b'0');
        hd.mode = mode;
        self.entry(hd, data)
    }

    pub fn dir(&mut self, name: &[u8], mode: u64) -> &mut Self {
        let mut hd = Hdr::new(name, b'5');
        hd.mode = mode;
        self.entry(hd, b"")
    }

    pub fn symlink(&mut self, name: &[u8], target: &[u8]) -> &mut Self {
        if target.len() > 100 {
            self.pax(&[(b"linkpath", target)]);
        }
        let mut hd = Hdr::new(name, b'2');
        hd.mode = 0o777;
        hd.link = target.to_vec();
        self.entry(hd, b"")
    }

    pub fn hardlink(&mut self, name: &[u8], target: &[u8]) -> &mut Self {
        if target.len() > 100 {
            self.pax(&[(b"linkpath", target)]);
        }
        let mut hd = Hdr::new(name, b'1');
        hd.link = target.to_vec();
        self.entry(hd, b"")
    }

    /// The stream with its end-of-archive blocks.
    pub fn finish(&self) -> Vec<u8> {
        let mut v = self.buf.clone();
        v.extend(std::iter::repeat_n(0u8, 1024));
        v
    }
}

// ------------------------------------------------------------------------------------------------------------
// Deep sentinel
// ------------------------------------------------------------------------------------------------------------

/// Everything recorded about one path, ctime included: any chmod, chown, xattr change, link or write
/// through any name moves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeepState {
    /// What the plain [`crate::Sentinel`] records.
    pub entry: crate::EntryState,
    pub ino: u64,
    pub rdev: u64,
    pub ctime: (i64, i64),
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The type of an entry: `file`, `dir`, `symlink`, `char`, `block`, `fifo` or `socket`.
pub(crate) fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

/// A 64-bit hash of a file's content (read through a handle that never follows the final symlink: callers
/// only pass regular files).
pub fn content_hash(p: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    if let Ok(mut f) = File::open(p) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => h.write(&buf[..n]),
            }
        }
    }
    h.finish()
}

/// xattrs of `p` (not following it), names and values, optionally only those accepted by `keep`.
pub fn xattrs_of(p: &Path, keep: &dyn Fn(&[u8]) -> bool) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return out;
    };
    let Ok(dir) = File::open(parent) else {
        return out;
    };
    let name = name.as_bytes();
    for k in lamina_sys::fs::list_xattrs_at(dir.as_fd(), name).unwrap_or_default() {
        if !keep(&k) {
            continue;
        }
        let v = lamina_sys::fs::get_xattr_at(dir.as_fd(), name, &k)
            .ok()
            .flatten()
            .unwrap_or_default();
        out.insert(k, v);
    }
    out
}

pub fn deep_state(p: &Path) -> Option<DeepState> {
    let m = fs::symlink_metadata(p).ok()?;
    Some(DeepState {
        entry: crate::entry_state_of(p, &m),
        ino: m.ino(),
        rdev: m.rdev(),
        ctime: (m.ctime(), m.ctime_nsec()),
        xattrs: xattrs_of(p, &|_| true),
    })
}

/// A sentinel outside the layer and the data root, recorded deeply.
pub struct DeepSentinel {
    roots: Vec<PathBuf>,
    recorded: BTreeMap<PathBuf, Option<DeepState>>,
}

impl DeepSentinel {
    /// A victim tree: files (one setuid, one with a user xattr, one big), directories, an `etc/` with
    /// `passwd` and `shadow`, absolute and relative symlinks, a hardlink, a FIFO, a directory nested 20 deep.
    pub fn make_tree(dir: &Path) {
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        fs::write(dir.join("file"), b"sentinel file\n").unwrap();
        fs::write(dir.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(dir.join("etc/shadow"), b"root:*:19000::::::\n").unwrap();
        fs::write(dir.join("sub/deeper/data"), vec![7u8; 100_000]).unwrap();
        fs::write(dir.join("setuid"), b"#!/bin/sh\n").unwrap();
        let mut p = fs::metadata(dir.join("setuid")).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o4755);
        fs::set_permissions(dir.join("setuid"), p).unwrap();
        fs::write(dir.join("xattr-file"), b"x").unwrap();
        let d = File::open(dir).unwrap();
        let _ = lamina_sys::fs::set_xattr_at(d.as_fd(), b"xattr-file", b"user.sentinel", b"v");
        let _ = std::os::unix::fs::symlink("/etc/passwd", dir.join("abs-link"));
        let _ = std::os::unix::fs::symlink("sub/deeper", dir.join("rel-link"));
        let _ = fs::hard_link(dir.join("file"), dir.join("hardlink"));
        let _ = lamina_sys::fs::mkfifo(d.as_fd(), b"fifo", 0o600);
        let mut deep = dir.join("deep");
        for _ in 0..20 {
            deep = deep.join("d");
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("bottom"), b"bottom").unwrap();
    }

    pub fn capture(roots: &[&Path]) -> DeepSentinel {
        DeepSentinel {
            roots: roots.iter().map(|p| p.to_path_buf()).collect(),
            recorded: super::record_trees(roots, deep_state),
        }
    }

    /// Every difference since `capture` (changed, removed or new entries).
    pub fn diffs(&self) -> Vec<String> {
        super::tree_diffs(&self.recorded, &self.roots, deep_state)
    }
}

// ------------------------------------------------------------------------------------------------------------
// Tree comparison
// ------------------------------------------------------------------------------------------------------------

/// What the differential test compares of one entry (no inode numbers, no ctime: those differ between two
/// extractions; link structure is compared separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u64,
    pub mtime: Option<(i64, i64)>,
    pub content: u64,
    pub link: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A tree: relative path → entry, plus its hardlink groups (sets of relative paths sharing an inode).
#[derive(Debug, Default)]
pub struct Tree {
    pub entries: BTreeMap<Vec<u8>, TreeEntry>,
    pub link_groups: BTreeSet<BTreeSet<Vec<u8>>>,
}

/// Reads a tree below `root` (root excluded). `keep_xattr` selects the xattrs compared; `dir_mtimes`
/// whether directory times are compared.
pub fn read_tree(root: &Path, keep_xattr: &dyn Fn(&[u8]) -> bool, dir_mtimes: bool) -> Tree {
    let mut t = Tree::default();
    let mut inodes: BTreeMap<(u64, u64), BTreeSet<Vec<u8>>> = BTreeMap::new();
    for p in super::walk(root) {
        let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = m.file_type();
        if !ft.is_dir() && m.nlink() > 1 {
            inodes.entry((m.dev(), m.ino())).or_default().insert(rel.clone());
        }
        t.entries.insert(
            rel,
            TreeEntry {
                kind: kind_of(&ft),
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_dir() { 0 } else { m.size() },
                rdev: m.rdev(),
                mtime: (!ft.is_dir() || dir_mtimes).then(|| (m.mtime(), m.mtime_nsec())),
                content: if ft.is_file() { content_hash(&p) } else { 0 },
                link: fs::read_link(&p).ok().map(|l| l.as_os_str().as_bytes().to_vec()),
                xattrs: xattrs_of(&p, keep_xattr),
            },
        );
    }
    t.link_groups = inodes.into_values().filter(|g| g.len() > 1).collect();
    t
}

/// Differences between two trees, readable.
pub fn compare_trees(a_name: &str, a: &Tree, b_name: &str, b: &Tree) -> Vec<String> {
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let mut out = Vec::new();
    for (p, ea) in &a.entries {
        match b.entries.get(p) {
            None => out.push(format!("{}: only in {a_name} ({})", show(p), ea.kind)),
            Some(eb) if eb != ea => out.push(format!("{}: {a_name} {ea:?} != {b_name} {eb:?}", show(p))),
            _ => {}
        }
    }
    for (p, eb) in &b.entries {
        if !a.entries.contains_key(p) {
            out.push(format!("{}: only in {b_name} ({})", show(p), eb.kind));
        }
    }
    if a.link_groups != b.link_groups {
        out.push(format!(
            "hardlink groups differ: {a_name} {:?} != {b_name} {:?}",
            a.link_groups
                .iter()
                .map(|g| g.iter().map(|p| show(p)).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            b.link_groups
                .iter()
                .map(|g| g.iter().map(|p| show(p)).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        ));
    }
    out
}

// ------------------------------------------------------------------------------------------------------------
// Process figures
// ------------------------------------------------------------------------------------------------------------

/// Resident set size of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Open descriptors of `pid`.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lines of a log that report a panic.
pub fn panics_in_log(log: &Path) -> Vec<String> {
    fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_string)
        .collect()
}

/// The `q`-quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The error classes of the bad-inputs catalogue.
pub const ERROR_CLASSES: &[&str] = &[
    "invalid argument",
    "not found",
    "already exists",
    "in use",
    "invalid archive",
    "unsupported",
    "limit exceeded",
    "no space",
    "read-only",
    "I/O error",
    "backend unavailable",
    "corrupt metadata",
];

/// Whether an `Err` text starts with a catalogue class.
pub fn classed(err: &str) -> bool {
    ERROR_CLASSES.iter().any(|c| err.starts_with(&format!("{c}:")))
}
