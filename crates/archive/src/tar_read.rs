//! Streaming tar reader.
//!
//! The block loop is ours; header fields are decoded with the `tar` crate's
//! [`tar::Header`] types. Reasons for not iterating with `tar::Archive::entries()`:
//! its PAX parser splits records on `\n`, which breaks binary xattr values (a
//! `security.capability` blob may contain byte 0x0a) and long names containing a
//! newline; it buffers extension entries (`x`, `L`, `K`) of any declared size; and it
//! has no PAX sparse support. Here PAX records are parsed by their length prefix,
//! extension entries are capped at 1 MiB, and GNU sparse maps (old `S` entries and PAX
//! 0.0/0.1/1.0) are handed to the caller so that holes can be written as holes.
//!
//! Every byte read is hashed, so the digest covers the whole input once [`TarReader::finish`]
//! has drained it. Hashing runs on a helper thread ([`BgHasher`]): SHA-256 costs about 1 s of CPU per GB
//! here, as much as writing the files, and the two overlap on a second core.

use std::io::{self, Read};
use std::sync::mpsc;
use std::thread;

use sha2::{Digest, Sha256};
use tar::{GnuExtSparseHeader, Header};

use crate::util::{invalid, io_err};
use crate::ArchiveError;

const BLOCK: usize = 512;
/// Cap on one extension entry (PAX `x`/`g`, GNU `L`/`K`) and on a sparse map.
pub(crate) const MAX_EXTENSION: u64 = 1 << 20;
/// Cap on the number of chunks in a sparse map.
const MAX_SPARSE_CHUNKS: usize = 1 << 16;

/// Type of an entry: read (after extension headers were folded in) or to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
    /// Anything else, with its type flag.
    Other(u8),
}

/// One entry's metadata; its data follows in the stream.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// For sparse files: the real size and the (offset, length) chunks, in order.
    pub sparse: Option<Sparse>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sparse {
    pub real_size: u64,
    pub map: Vec<(u64, u64)>,
}

#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse_major: Option<Vec<u8>>,
    sparse_minor: Option<Vec<u8>>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    sparse_map: Option<Vec<u8>>,
    sparse_pairs: Vec<u64>,
}

/// Bytes handed to the hashing thread at a time.
const HASH_CHUNK: usize = 256 * 1024;
/// Chunks queued for the hashing thread at most (bounds the memory to 4 MiB).
const HASH_QUEUE: usize = 16;
/// Inputs shorter than this are hashed inline (no thread for small layers).
const HASH_INLINE: u64 = 1024 * 1024;

/// SHA-256 of a stream, computed on a helper thread once the stream is larger than [`HASH_INLINE`].
struct BgHasher {
    state: HashState,
    pending: Vec<u8>,
    seen: u64,
}

enum HashState {
    /// Hashed on the reading thread (small inputs, or no thread could be started).
    Inline(Sha256, bool),
    /// Chunks go to a hashing thread, which returns the state when the sender is dropped.
    Thread(mpsc::SyncSender<Vec<u8>>, thread::JoinHandle<Sha256>),
}

impl BgHasher {
    fn new() -> Self {
        BgHasher {
            state: HashState::Inline(Sha256::new(), false),
            pending: Vec::new(),
            seen: 0,
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.seen += data.len() as u64;
        match &mut self.state {
            HashState::Inline(h, no_thread) => {
                h.update(data);
                if *no_thread || self.seen < HASH_INLINE {
                    return;
                }
                // Large input: the state so far moves to a thread that hashes the rest.
                let mut moved = h.clone();
                let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE);
                let spawned = thread::Builder::new().name("lamina-hash".into()).spawn(move || {
                    for chunk in rx {
                        moved.update(&chunk);
                    }
                    moved
                });
                match spawned {
                    Ok(handle) => self.state = HashState::Thread(tx, handle),
                    Err(_) => *no_thread = true,
                }
            }
            HashState::Thread(..) => {
                self.pending.extend_from_slice(data);
                if self.pending.len() >= HASH_CHUNK {
                    self.flush();
                }
            }
        }
    }

    fn flush(&mut self) {
        if let HashState::Thread(tx, _) = &self.state {
            if !self.pending.is_empty() {
                let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(HASH_CHUNK + 64 * 1024));
                // The receiver lives until the sender is dropped in `finalize`.
                let _ = tx.send(chunk);
            }
        }
    }

    fn finalize(mut self) -> [u8; 32] {
        self.flush();
        match self.state {
            HashState::Inline(h, _) => h.finalize().into(),
            HashState::Thread(tx, handle) => {
                drop(tx);
                match handle.join() {
                    Ok(h) => h.finalize().into(),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }
    }
}

/// Hashes and counts everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: BgHasher,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    /// Reads as much of `buf` as the stream has; returns the count (short only at EOF).
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => {
                    self.hasher.update(&buf[n..n + k]);
                    self.bytes += k as u64;
                    n += k;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("reading layer stream", e)),
            }
        }
        Ok(n)
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ArchiveError> {
        if self.fill(buf)? != buf.len() {
            return Err(unexpected_end());
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> Result<(), ArchiveError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

pub(crate) fn unexpected_end() -> ArchiveError {
    invalid("unexpected end of archive")
}

fn bad_header(detail: impl std::fmt::Display) -> ArchiveError {
    invalid(format!("invalid tar header: {detail}"))
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// A tar stream being read entry by entry.
pub(crate) struct TarReader<R> {
    input: Hashing<R>,
    /// Data bytes of the current entry not read yet.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: u64,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        TarReader {
            input: Hashing {
                inner,
                hasher: BgHasher::new(),
                bytes: 0,
            },
            remaining: 0,
            pad: 0,
            ended: false,
        }
    }

    /// Reads data of the current entry; `Ok(0)` once it is all read. A stream that ends
    /// early is an error.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let k = self.remaining.min(buf.len() as u64) as usize;
        let n = self.input.fill(&mut buf[..k])?;
        if n == 0 {
            return Err(unexpected_end());
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Reads exactly `buf.len()` data bytes of the current entry.
    pub(crate) fn read_data_exact(&mut self, buf: &mut [u8]) -> Result<(), ArchiveError> {
        if buf.len() as u64 > self.remaining {
            return Err(invalid("entry data shorter than its sparse map"));
        }
        self.input.exact(buf)?;
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    /// Data bytes of the current entry not read yet.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining
    }

    fn finish_entry(&mut self) -> Result<(), ArchiveError> {
        let n = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.input.skip(n)
    }

    /// Reads one 512-byte block; `Ok(false)` on a clean end of input before it.
    fn block(&mut self, buf: &mut [u8; BLOCK]) -> Result<bool, ArchiveError> {
        match self.input.fill(buf)? {
            0 => Ok(false),
            BLOCK => Ok(true),
            _ => Err(unexpected_end()),
        }
    }

    fn extension_data(&mut self, hdr: &Header, what: &str) -> Result<Vec<u8>, ArchiveError> {
        let size = unsigned(field(hdr, 124..136), "size")?;
        if size > MAX_EXTENSION {
            return Err(ArchiveError::LimitExceeded(format!("{what} of {size} bytes")));
        }
        let mut data = vec![0u8; size as usize];
        self.input.exact(&mut data)?;
        self.input.skip(padding(size))?;
        Ok(data)
    }

    /// Skips what is left of the previous entry and returns the next one, or `None` at
    /// the end of the archive (an all-zero block, or the input ending on a block
    /// boundary between entries).
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>, ArchiveError> {
        if self.ended {
            return Ok(None);
        }
        self.finish_entry()?;
        let mut pax: Option<Pax> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut buf = [0u8; BLOCK];
        loop {
            let first = self.input.bytes == 0;
            if !self.block(&mut buf)? {
                self.ended = true;
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(unexpected_end());
                }
                return Ok(None);
            }
            if first {
                check_compressed(&buf)?;
            }
            if buf.iter().all(|&b| b == 0) {
                self.ended = true;
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(invalid("extension header without an entry"));
                }
                return Ok(None);
            }
            let hdr = Header::from_byte_slice(&buf);
            verify_checksum(hdr)?;
            match hdr.as_old().linkflag[0] {
                b'x' => {
                    let data = self.extension_data(hdr, "pax header")?;
                    parse_pax(&data, pax.get_or_insert_with(Pax::default))?;
                }
                b'g' => {
                    self.extension_data(hdr, "pax global header")?;
                }
                b'L' => {
                    let data = self.extension_data(hdr, "long name")?;
                    long_name = Some(cstr(&data).to_vec());
                }
                b'K' => {
                    let data = self.extension_data(hdr, "long link name")?;
                    long_link = Some(cstr(&data).to_vec());
                }
                _ => {
                    let hdr = hdr.clone();
                    return self
                        .build(&hdr, pax.unwrap_or_default(), long_name, long_link)
                        .map(Some);
                }
            }
        }
    }

    fn build(
        &mut self,
        hdr: &Header,
        pax: Pax,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Entry, ArchiveError> {
        let flag = hdr.as_old().linkflag[0];
        let mut path = pax
            .path
            .or(long_name)
            .unwrap_or_else(|| hdr.path_bytes().into_owned());
        let link = pax
            .linkpath
            .or(long_link)
            .unwrap_or_else(|| hdr.link_name_bytes().map(|c| c.into_owned()).unwrap_or_default());
        let kind = match flag {
            0 if path.ends_with(b"/") => Kind::Dir,
            0 | b'0' | b'7' | b'S' => Kind::Regular,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        };
        let mode = (unsigned(field(hdr, 100..108), "mode")? & 0o7777) as u32;
        // Negative ids become out-of-range values, refused when applied.
        let id = |r: std::ops::Range<usize>, what: &str| -> Result<u64, ArchiveError> {
            Ok(u64::try_from(numeric(field(hdr, r), what)?).unwrap_or(u64::MAX))
        };
        let uid = match pax.uid {
            Some(u) => u,
            None => id(108..116, "uid")?,
        };
        let gid = match pax.gid {
            Some(g) => g,
            None => id(116..124, "gid")?,
        };
        let (mtime_sec, mtime_nsec) = match pax.mtime {
            Some(t) => t,
            None => (numeric(field(hdr, 136..148), "mtime")?, 0),
        };
        let (dev_major, dev_minor) = if matches!(kind, Kind::Char | Kind::Block) && has_ustar_magic(hdr) {
            let dev = |r: std::ops::Range<usize>, what: &str| -> Result<u32, ArchiveError> {
                u32::try_from(unsigned(field(hdr, r), what)?)
                    .map_err(|_| bad_header(format!("{what} too large")))
            };
            (dev(329..337, "device major")?, dev(337..345, "device minor")?)
        } else {
            (0, 0)
        };
        let mut size = match pax.size {
            Some(s) => s,
            None => unsigned(field(hdr, 124..136), "size")?,
        };

        let mut sparse = None;
        if flag == b'S' {
            sparse = Some(self.gnu_sparse(hdr, size)?);
        }
        let pax_sparse_version = (pax.sparse_major.as_deref(), pax.sparse_minor.as_deref());
        let pax_sparse = pax.sparse_map.is_some()
            || !pax.sparse_pairs.is_empty()
            || pax.sparse_major.is_some()
            || pax.sparse_minor.is_some();
        if pax_sparse && kind == Kind::Regular && flag != b'S' {
            let real_size = pax
                .sparse_realsize
                .ok_or_else(|| invalid("sparse file without real size"))?;
            let map = match pax_sparse_version {
                (Some(b"1"), Some(b"0")) => {
                    // The map is at the start of the data, padded to a block.
                    self.remaining = size;
                    let (map, used) = self.sparse_map_from_data()?;
                    size -= used;
                    map
                }
                (Some(b"0"), Some(b"0")) | (None, None) if pax.sparse_map.is_none() => {
                    pairs_to_map(&pax.sparse_pairs)?
                }
                (Some(b"0"), Some(b"1")) | (None, None) => {
                    let text = pax.sparse_map.as_deref().unwrap_or_default();
                    let mut nums = Vec::new();
                    if !text.is_empty() {
                        for part in text.split(|&b| b == b',') {
                            nums.push(parse_u64(part).ok_or_else(|| invalid("bad sparse map"))?);
                        }
                    }
                    pairs_to_map(&nums)?
                }
                _ => {
                    return Err(ArchiveError::Unsupported(
                        "unknown GNU sparse format version".into(),
                    ))
                }
            };
            if let Some(name) = pax.sparse_name {
                path = name;
            }
            sparse = Some(check_sparse(real_size, map, size)?);
        }
        if path.contains(&0) || link.contains(&0) {
            return Err(invalid("NUL byte in a name"));
        }

        self.remaining = size;
        // A PAX 1.0 map is a whole number of blocks, so the padding is unchanged.
        self.pad = padding(size);
        Ok(Entry {
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            dev_major,
            dev_minor,
            sparse,
            xattrs: pax.xattrs,
        })
    }

    /// Old GNU sparse: chunks in the header and in extension blocks after it.
    fn gnu_sparse(&mut self, hdr: &Header, size: u64) -> Result<Sparse, ArchiveError> {
        let gnu = hdr
            .as_gnu()
            .ok_or_else(|| bad_header("sparse entry without a GNU header"))?;
        let real_size = unsigned(&gnu.realsize, "sparse real size")?;
        let mut map = Vec::new();
        let push = |s: &tar::GnuSparseHeader, map: &mut Vec<(u64, u64)>| -> Result<(), ArchiveError> {
            if s.is_empty() {
                return Ok(());
            }
            if map.len() >= MAX_SPARSE_CHUNKS {
                return Err(ArchiveError::LimitExceeded("sparse map too large".into()));
            }
            map.push((s.offset().map_err(bad_header)?, s.length().map_err(bad_header)?));
            Ok(())
        };
        for s in &gnu.sparse {
            push(s, &mut map)?;
        }
        let mut extended = gnu.is_extended();
        while extended {
            let mut ext = GnuExtSparseHeader::new();
            self.input.exact(ext.as_mut_bytes())?;
            for s in &ext.sparse {
                push(s, &mut map)?;
            }
            extended = ext.is_extended();
        }
        check_sparse(real_size, map, size)
    }

    /// PAX 1.0 sparse map: decimal numbers, one per line (count, then offset/length
    /// pairs), padded to a block boundary. Returns the map and the bytes it used.
    fn sparse_map_from_data(&mut self) -> Result<(Vec<(u64, u64)>, u64), ArchiveError> {
        let mut used = 0u64;
        let mut nums: Vec<u64> = Vec::new();
        let mut want: Option<usize> = None;
        let mut cur: Vec<u8> = Vec::new();
        let mut block = [0u8; BLOCK];
        loop {
            if used >= MAX_EXTENSION {
                return Err(ArchiveError::LimitExceeded("sparse map too large".into()));
            }
            self.read_data_exact(&mut block)?;
            used += BLOCK as u64;
            for &b in &block {
                if want.is_some_and(|w| nums.len() > 2 * w) {
                    break;
                }
                if b == b'\n' {
                    let n = parse_u64(&cur).ok_or_else(|| invalid("bad sparse map"))?;
                    cur.clear();
                    if want.is_none() {
                        let count = usize::try_from(n).unwrap_or(usize::MAX);
                        if count > MAX_SPARSE_CHUNKS {
                            return Err(ArchiveError::LimitExceeded("sparse map too large".into()));
                        }
                        want = Some(count);
                    }
                    nums.push(n);
                } else if cur.len() < 20 {
                    cur.push(b);
                } else {
                    return Err(invalid("bad sparse map"));
                }
            }
            if let Some(w) = want {
                if nums.len() > 2 * w {
                    return Ok((pairs_to_map(&nums[1..])?, used));
                }
            }
        }
    }

    /// Drains the input after the end of the archive; returns (`sha256:<hex>`, bytes).
    pub(crate) fn finish(mut self) -> Result<(String, u64), ArchiveError> {
        if !self.ended {
            self.finish_entry()?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        while self.input.fill(&mut buf)? == buf.len() {}
        let digest = std::mem::replace(&mut self.input.hasher, BgHasher::new()).finalize();
        let mut hex = String::with_capacity(7 + 64);
        hex.push_str("sha256:");
        for b in digest.iter() {
            hex.push_str(&format!("{b:02x}"));
        }
        Ok((hex, self.input.bytes))
    }
}

fn check_compressed(buf: &[u8]) -> Result<(), ArchiveError> {
    let magics: [&[u8]; 4] = [b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00"];
    if magics.iter().any(|m| buf.starts_with(m)) {
        return Err(ArchiveError::Unsupported("compressed layer".into()));
    }
    Ok(())
}

fn verify_checksum(hdr: &Header) -> Result<(), ArchiveError> {
    let bytes = hdr.as_bytes();
    let stored = unsigned(field(hdr, 148..156), "checksum").map_err(|_| bad_header("bad checksum field"))?;
    let mut unsigned: u32 = 8 * u32::from(b' ');
    let mut signed: i64 = 8 * i64::from(b' ');
    for (i, &b) in bytes.iter().enumerate() {
        if (148..156).contains(&i) {
            continue;
        }
        unsigned += u32::from(b);
        signed += i64::from(b as i8);
    }
    if stored != u64::from(unsigned) && i64::try_from(stored).ok() != Some(signed) {
        return Err(bad_header("checksum mismatch"));
    }
    Ok(())
}

/// A numeric header field, as Go reads it: octal text (spaces and NULs around it, empty
/// means 0) or GNU base-256 (high bit set; negative values come back as `i64` below 0,
/// magnitudes beyond `i64` saturate).
fn numeric(field: &[u8], what: &str) -> Result<i64, ArchiveError> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            let negative = first & 0x40 != 0;
            let mut v: i128 = i128::from(first & 0x7f) - if negative { 0x80 } else { 0 };
            for &b in &field[1..] {
                v = v.saturating_mul(256).saturating_add(i128::from(b));
            }
            return Ok(v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64);
        }
    }
    let start = field
        .iter()
        .position(|&b| b != b' ' && b != 0)
        .unwrap_or(field.len());
    let end = field
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(start, |i| i + 1);
    let text = &field[start..end.max(start)];
    if text.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for &b in text {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad_header(format!("{what} field is not a number")));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(i64::from(b - b'0')))
            .ok_or_else(|| bad_header(format!("{what} field overflows")))?;
    }
    Ok(v)
}

/// A numeric field that must not be negative.
fn unsigned(field: &[u8], what: &str) -> Result<u64, ArchiveError> {
    let v = numeric(field, what)?;
    u64::try_from(v).map_err(|_| bad_header(format!("negative {what}")))
}

/// Raw field bytes by offset in the 512-byte header.
fn field(hdr: &Header, range: std::ops::Range<usize>) -> &[u8] {
    &hdr.as_bytes()[range]
}

fn has_ustar_magic(hdr: &Header) -> bool {
    let magic = field(hdr, 257..263);
    magic == b"ustar\0" || magic == b"ustar "
}

fn cstr(data: &[u8]) -> &[u8] {
    match data.iter().position(|&b| b == 0) {
        Some(i) => &data[..i],
        None => data,
    }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// PAX time: `[-]digits[.digits]`; seconds saturate, the fraction keeps 9 digits.
fn parse_pax_time(s: &[u8]) -> Option<(i64, u32)> {
    let (neg, rest) = match s.strip_prefix(b"-") {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut sec: i64 = 0;
    for &d in int {
        sec = sec.saturating_mul(10).saturating_add(i64::from(d - b'0'));
    }
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    if neg {
        if nsec > 0 {
            Some((sec.saturating_neg().saturating_sub(1), 1_000_000_000 - nsec))
        } else {
            Some((sec.saturating_neg(), 0))
        }
    } else {
        Some((sec, nsec))
    }
}

/// Parses PAX records (`<len> <key>=<value>\n`) by their length prefix.
fn parse_pax(mut data: &[u8], pax: &mut Pax) -> Result<(), ArchiveError> {
    let bad = || invalid("malformed pax header");
    while !data.is_empty() {
        let sp = data.iter().take(20).position(|&b| b == b' ').ok_or_else(bad)?;
        let len = parse_u64(&data[..sp]).ok_or_else(bad)?;
        let len = usize::try_from(len).map_err(|_| bad())?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let kv = &data[sp + 1..len - 1];
        data = &data[len..];
        let eq = kv.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (key, value) = (&kv[..eq], &kv[eq + 1..]);
        if key.is_empty() {
            return Err(bad());
        }
        let num = |what: &str| parse_u64(value).ok_or_else(|| invalid(format!("bad pax {what}")));
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.linkpath = Some(value.to_vec()),
            b"size" => pax.size = Some(num("size")?),
            b"uid" => pax.uid = Some(num("uid")?),
            b"gid" => pax.gid = Some(num("gid")?),
            b"mtime" => pax.mtime = Some(parse_pax_time(value).ok_or_else(|| invalid("bad pax mtime"))?),
            b"GNU.sparse.major" => pax.sparse_major = Some(value.to_vec()),
            b"GNU.sparse.minor" => pax.sparse_minor = Some(value.to_vec()),
            b"GNU.sparse.name" => pax.sparse_name = Some(value.to_vec()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                pax.sparse_realsize = Some(num("sparse size")?);
            }
            b"GNU.sparse.map" => pax.sparse_map = Some(value.to_vec()),
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                if pax.sparse_pairs.len() >= 2 * MAX_SPARSE_CHUNKS {
                    return Err(ArchiveError::LimitExceeded("sparse map too large".into()));
                }
                pax.sparse_pairs.push(num("sparse map")?);
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    pax.xattrs.retain(|(k, _)| k != name);
                    pax.xattrs.push((name.to_vec(), value.to_vec()));
                }
            }
        }
    }
    Ok(())
}

fn pairs_to_map(nums: &[u64]) -> Result<Vec<(u64, u64)>, ArchiveError> {
    if !nums.len().is_multiple_of(2) {
        return Err(invalid("bad sparse map"));
    }
    Ok(nums.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Chunks must be in order, not overlap, stay within the real size, and add up to the
/// stored data size.
fn check_sparse(real_size: u64, map: Vec<(u64, u64)>, stored: u64) -> Result<Sparse, ArchiveError> {
    // File sizes and offsets are i64 in the kernel: a larger real size cannot exist.
    if i64::try_from(real_size).is_err() {
        return Err(invalid("sparse file size out of range"));
    }
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in &map {
        let stop = off.checked_add(len).ok_or_else(|| invalid("bad sparse map"))?;
        if off < end || stop > real_size {
            return Err(invalid("bad sparse map"));
        }
        end = stop;
        total = total.checked_add(len).ok_or_else(|| invalid("bad sparse map"))?;
    }
    if total != stored {
        return Err(invalid("sparse map does not match the entry size"));
    }
    Ok(Sparse { real_size, map })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_hash_equals_sha256_of_the_stream() {
        // Sizes around the inline limit and the chunk size, fed in odd pieces.
        for len in [
            0usize,
            1,
            1024 * 1024 - 1,
            1024 * 1024,
            1024 * 1024 + 1,
            5 * 1024 * 1024 + 12345,
        ] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
                .collect();
            let mut h = BgHasher::new();
            for piece in data.chunks(77_777) {
                h.update(piece);
            }
            let want: [u8; 32] = Sha256::digest(&data).into();
            assert_eq!(h.finalize(), want, "length {len}");
        }
    }

    #[test]
    fn sparse_sizes_beyond_i64_are_invalid() {
        let e = check_sparse(u64::MAX, vec![(0, 10)], 10).unwrap_err();
        assert!(matches!(e, ArchiveError::InvalidArchive(_)), "{e}");
        assert!(check_sparse(i64::MAX as u64, vec![(0, 10)], 10).is_ok());
    }

    #[test]
    fn pax_records_by_length() {
        let mut pax = Pax::default();
        let rec = lamina_testkit::reliability::pax_record;
        let mut data = rec(b"path", b"a\nb");
        data.extend(rec(b"SCHILY.xattr.security.capability", b"\x01\n\x00\x0a"));
        data.extend(rec(b"mtime", b"-1.5"));
        parse_pax(&data, &mut pax).unwrap();
        assert_eq!(pax.path.as_deref(), Some(&b"a\nb"[..]));
        assert_eq!(pax.xattrs[0].1, b"\x01\n\x00\x0a");
        assert_eq!(pax.mtime, Some((-2, 500_000_000)));
        assert!(parse_pax(b"5 a=b\n", &mut Pax::default()).is_err());
        assert!(parse_pax(&rec(b"mtime", b"1e400"), &mut Pax::default()).is_err());
        assert!(parse_pax(&rec(b"mtime", b"NaN"), &mut Pax::default()).is_err());
        assert!(parse_pax(&rec(b"size", b"18446744073709551616"), &mut Pax::default()).is_err());
    }

    #[test]
    fn pax_time_saturates() {
        assert_eq!(parse_pax_time(b"99999999999999999999999"), Some((i64::MAX, 0)));
        assert_eq!(parse_pax_time(b"12.000000001999"), Some((12, 1)));
        assert_eq!(parse_pax_time(b""), None);
    }

    #[test]
    fn sparse_checks() {
        assert!(check_sparse(10, vec![(0, 2), (5, 5)], 7).is_ok());
        assert!(check_sparse(10, vec![(5, 5), (0, 2)], 7).is_err());
        assert!(check_sparse(10, vec![(5, 6)], 6).is_err());
        assert!(check_sparse(10, vec![(0, 2)], 3).is_err());
        assert!(check_sparse(u64::MAX, vec![(u64::MAX, 2)], 2).is_err());
    }

    #[test]
    fn compressed_and_garbage() {
        let mut gz = vec![0x1f, 0x8b];
        gz.resize(2000, 0);
        let err = TarReader::new(&gz[..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("compressed"), "{err}");
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let err = TarReader::new(&junk[..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("invalid tar header"), "{err}");
        assert!(TarReader::new(&[][..]).next_entry().unwrap().is_none());
        let err = TarReader::new(&[1u8; 100][..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("unexpected end"), "{err}");
    }
}
