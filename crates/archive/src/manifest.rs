//! Content manifests of layer directories, for `lamina verify`.
//!
//! A layer's tar output is not byte-identical to the tar it was applied from (ordering, headers, times), so
//! the DiffID cannot be re-derived from the directory. Instead, when a layer is frozen, its tree is described
//! entry by entry in a manifest, and verification walks the tree again and compares.
//!
//! Text format, one line per entry in walk order (the root first as `.`, then parents before children,
//! siblings by name bytes), fields separated by one space:
//!
//! ```text
//! lamina-manifest 1
//! <path> <type> <mode> <uid> <gid> <size> <extra> <xattrs>
//! ```
//!
//! - `path`: relative path, bytes outside `!`..`~` and `%`, `,`, `=` written as `%XX`.
//! - `type`: `d` `f` `l` `c` `b` `p` `s`; `mode`: permission bits in octal; `size`: bytes (files and links,
//!   0 otherwise).
//! - `extra`: the sha256 (hex) of a file's content, the escaped target of a symlink, `major:minor` of a device,
//!   `-` otherwise.
//! - `xattrs`: `-` or `key=hexvalue` pairs joined by `,`, sorted by key. overlayfs' own bookkeeping attributes
//!   (`trusted.overlay.*` other than `opaque`) are left out: the kernel may add them while a layer is mounted.
//!
//! Times are not recorded: a mount may touch them without changing the layer.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::os::fd::BorrowedFd;

use lamina_sys::fs::{self as sfs, FileKind, FileStat};
use sha2::{Digest, Sha256};

use crate::util::{show, IoContext};
use crate::walk::{walk, Found, Visitor};
use crate::ArchiveError;

const HEADER: &str = "lamina-manifest 1";

/// What [`write_manifest`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestSummary {
    /// `sha256:<hex>` of the manifest bytes.
    pub digest: String,
    /// Entries described (the root included).
    pub entries: u64,
    /// Content bytes hashed.
    pub bytes: u64,
}

/// The verdict on a layer's content: what [`verify_manifest`] found (`Clean` or `Mismatch`), or `Skipped` when
/// a caller did not check (the layer store: a layer not frozen, or without a manifest). Serialized with a
/// `status` tag (`clean`, `mismatch`, `skipped`) beside the fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum VerifyOutcome {
    /// The tree matches the manifest.
    Clean {
        /// Entries compared.
        entries: u64,
        /// Content bytes hashed.
        bytes: u64,
    },
    /// The first difference, in walk order (or a manifest file that is not the one recorded).
    Mismatch {
        /// Path inside the layer (`/etc/motd`).
        path: String,
        /// What differs.
        detail: String,
    },
    /// Not checked.
    Skipped {
        /// Why.
        reason: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `sha256:<hex>` of `bytes` (the digest recorded for a manifest file).
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if (b'!'..=b'~').contains(&b) && !matches!(b, b'%' | b',' | b'=') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn display_path(path: &[u8]) -> String {
    if path == b"." {
        "/".into()
    } else {
        format!("/{}", show(path))
    }
}

/// Builds manifest lines of a tree, hashing file contents.
struct Describer<'p> {
    buf: Vec<u8>,
    hashed: HashMap<(u64, u64), String>,
    bytes: u64,
    progress: &'p mut dyn FnMut(u64),
}

impl Describer<'_> {
    fn hash_file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        st: &FileStat,
    ) -> Result<String, ArchiveError> {
        if st.nlink > 1 {
            if let Some(h) = self.hashed.get(&(st.dev, st.ino)) {
                return Ok(h.clone());
            }
        }
        let mut f = sfs::open_file(dir, name).ctx(|| format!("opening /{}", show(path)))?;
        let mut hasher = Sha256::new();
        if self.buf.is_empty() {
            self.buf = vec![0u8; 256 * 1024];
        }
        loop {
            let n = f.read(&mut self.buf).ctx(|| format!("reading /{}", show(path)))?;
            if n == 0 {
                break;
            }
            hasher.update(&self.buf[..n]);
            self.bytes += n as u64;
            (self.progress)(n as u64);
        }
        let h = hex(&hasher.finalize());
        if st.nlink > 1 {
            self.hashed.insert((st.dev, st.ino), h.clone());
        }
        Ok(h)
    }

    /// The line (without newline) of one entry; `name` is looked up in `dir`, or `dir` itself for the root.
    fn line(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &[u8],
        name: Option<&[u8]>,
        st: &FileStat,
    ) -> Result<String, ArchiveError> {
        let (ty, size, extra) = match st.kind {
            FileKind::Dir => ('d', 0, "-".to_string()),
            FileKind::Regular => {
                let name = name.unwrap_or(b".");
                ('f', st.size, self.hash_file(dir, name, path, st)?)
            }
            FileKind::Symlink => {
                let target = sfs::readlink(dir, name.unwrap_or(b"."))
                    .ctx(|| format!("reading link /{}", show(path)))?;
                ('l', target.len() as u64, escape(&target))
            }
            FileKind::CharDev => ('c', 0, format!("{}:{}", st.rdev_major, st.rdev_minor)),
            FileKind::BlockDev => ('b', 0, format!("{}:{}", st.rdev_major, st.rdev_minor)),
            FileKind::Fifo => ('p', 0, "-".to_string()),
            FileKind::Socket => ('s', 0, "-".to_string()),
        };
        let keys = match name {
            Some(n) => sfs::list_xattrs_at(dir, n),
            None => sfs::list_xattrs_fd(dir),
        }
        .ctx(|| format!("listing xattrs of /{}", show(path)))?;
        let mut pairs = Vec::new();
        for key in keys {
            if key.starts_with(b"trusted.overlay.") && key != b"trusted.overlay.opaque" {
                continue;
            }
            let value = match name {
                Some(n) => sfs::get_xattr_at(dir, n, &key),
                None => sfs::get_xattr_fd(dir, &key),
            }
            .ctx(|| format!("reading xattrs of /{}", show(path)))?;
            if let Some(v) = value {
                pairs.push(format!("{}={}", escape(&key), hex(&v)));
            }
        }
        pairs.sort();
        let xattrs = if pairs.is_empty() {
            "-".to_string()
        } else {
            pairs.join(",")
        };
        Ok(format!(
            "{} {ty} {:o} {} {} {size} {extra} {xattrs}",
            escape(path),
            st.perm,
            st.uid,
            st.gid
        ))
    }
}

struct Writer<'w, 'p> {
    d: Describer<'p>,
    out: &'w mut dyn Write,
    hasher: Sha256,
    entries: u64,
}

impl Writer<'_, '_> {
    fn emit(&mut self, line: &str) -> Result<(), ArchiveError> {
        let mut l = String::with_capacity(line.len() + 1);
        l.push_str(line);
        l.push('\n');
        self.hasher.update(l.as_bytes());
        self.out
            .write_all(l.as_bytes())
            .ctx(|| "writing the manifest".into())
    }
}

impl Visitor for Writer<'_, '_> {
    fn entry(&mut self, Found { dir, path, name, st }: Found<'_>) -> Result<bool, ArchiveError> {
        let line = self.d.line(dir, path, Some(name), st)?;
        self.entries += 1;
        self.emit(&line)?;
        Ok(true)
    }
}

/// Describes the tree below `dir` (a layer's `diff/`) into `out`; see the module docs for the format.
pub fn write_manifest(dir: BorrowedFd<'_>, out: &mut dyn Write) -> Result<ManifestSummary, ArchiveError> {
    let mut progress = |_: u64| {};
    let mut w = Writer {
        d: Describer {
            buf: Vec::new(),
            hashed: HashMap::new(),
            bytes: 0,
            progress: &mut progress,
        },
        out,
        hasher: Sha256::new(),
        entries: 1,
    };
    w.emit(HEADER)?;
    let st = sfs::stat_fd(dir).ctx(|| "stat of the layer root".into())?;
    let root = w.d.line(dir, b".", None, &st)?;
    w.emit(&root)?;
    walk(dir, &mut w)?;
    let digest = format!("sha256:{}", hex(&w.hasher.finalize()));
    Ok(ManifestSummary {
        digest,
        entries: w.entries,
        bytes: w.d.bytes,
    })
}

struct Checker<'r, 'p> {
    d: Describer<'p>,
    input: &'r mut dyn BufRead,
    line: String,
    entries: u64,
    mismatch: Option<(Vec<u8>, Option<String>, String)>,
}

const STOP: &str = "\u{0}manifest mismatch";

impl Checker<'_, '_> {
    fn next_expected(&mut self) -> Result<Option<String>, ArchiveError> {
        self.line.clear();
        let n = self
            .input
            .read_line(&mut self.line)
            .ctx(|| "reading the manifest".into())?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(self.line.trim_end_matches('\n').to_string()))
    }

    fn compare(&mut self, path: &[u8], actual: String) -> Result<(), ArchiveError> {
        self.entries += 1;
        let expected = self.next_expected()?;
        if expected.as_deref() == Some(actual.as_str()) {
            return Ok(());
        }
        self.mismatch = Some((path.to_vec(), expected, actual));
        Err(ArchiveError::Unsupported(STOP.into()))
    }
}

impl Visitor for Checker<'_, '_> {
    fn entry(&mut self, Found { dir, path, name, st }: Found<'_>) -> Result<bool, ArchiveError> {
        let line = self.d.line(dir, path, Some(name), st)?;
        self.compare(path, line)?;
        Ok(true)
    }
}

fn field_names(expected: &str, actual: &str) -> String {
    const NAMES: [&str; 8] = ["path", "type", "mode", "uid", "gid", "size", "content", "xattrs"];
    let e: Vec<&str> = expected.split(' ').collect();
    let a: Vec<&str> = actual.split(' ').collect();
    let differ: Vec<&str> = NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| e.get(*i) != a.get(*i))
        .map(|(_, n)| *n)
        .collect();
    differ.join(", ")
}

/// Walks the tree below `dir` and compares it with `manifest`; `progress` receives content bytes as they are
/// hashed. Stops at the first difference.
pub fn verify_manifest(
    dir: BorrowedFd<'_>,
    manifest: &mut dyn BufRead,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyOutcome, ArchiveError> {
    let mut c = Checker {
        d: Describer {
            buf: Vec::new(),
            hashed: HashMap::new(),
            bytes: 0,
            progress,
        },
        input: manifest,
        line: String::new(),
        entries: 0,
        mismatch: None,
    };
    if c.next_expected()?.as_deref() != Some(HEADER) {
        return Ok(VerifyOutcome::Mismatch {
            path: "/".into(),
            detail: "the manifest has no lamina-manifest 1 header".into(),
        });
    }
    let st = sfs::stat_fd(dir).ctx(|| "stat of the layer root".into())?;
    let root = c.d.line(dir, b".", None, &st)?;
    let walked = c.compare(b".", root).and_then(|()| walk(dir, &mut c));
    let walked = match walked {
        Err(ArchiveError::Unsupported(m)) if m == STOP => Ok(()),
        other => other,
    };
    walked?;
    if let Some((path, expected, actual)) = c.mismatch.take() {
        let detail = match expected {
            None => format!("unexpected entry {} (not in the manifest)", display_path(&path)),
            Some(exp) => {
                let exp_path = unescape(exp.split(' ').next().unwrap_or(""));
                if exp_path == path {
                    format!("{} differs: {}", display_path(&path), field_names(&exp, &actual))
                } else {
                    let gone = exp_path != b"." && sfs::stat_at(dir, &exp_path).ok().flatten().is_none();
                    if gone {
                        return Ok(VerifyOutcome::Mismatch {
                            path: display_path(&exp_path),
                            detail: format!("{} is missing", display_path(&exp_path)),
                        });
                    }
                    format!("unexpected entry {} (not in the manifest)", display_path(&path))
                }
            }
        };
        return Ok(VerifyOutcome::Mismatch {
            path: display_path(&path),
            detail,
        });
    }
    if let Some(extra) = c.next_expected()? {
        let p = unescape(extra.split(' ').next().unwrap_or(""));
        return Ok(VerifyOutcome::Mismatch {
            path: display_path(&p),
            detail: format!("{} is missing", display_path(&p)),
        });
    }
    Ok(VerifyOutcome::Clean {
        entries: c.entries,
        bytes: c.d.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsFd;

    fn manifest_of(dir: &std::path::Path) -> (Vec<u8>, ManifestSummary) {
        let f = fs::File::open(dir).unwrap();
        let mut out = Vec::new();
        let s = write_manifest(f.as_fd(), &mut out).unwrap();
        (out, s)
    }

    fn check(dir: &std::path::Path, m: &[u8]) -> VerifyOutcome {
        let f = fs::File::open(dir).unwrap();
        verify_manifest(f.as_fd(), &mut &m[..], &mut |_| {}).unwrap()
    }

    #[test]
    fn clean_then_each_kind_of_change() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        fs::create_dir_all(p.join("a/b")).unwrap();
        fs::write(p.join("a/b/f"), b"hello").unwrap();
        fs::write(p.join("odd name,=%"), b"x").unwrap();
        std::os::unix::fs::symlink("../t", p.join("a/l")).unwrap();
        fs::hard_link(p.join("a/b/f"), p.join("h")).unwrap();
        let (m, s) = manifest_of(p);
        assert!(s.digest.starts_with("sha256:"));
        assert_eq!(s.entries, 7);
        let text = String::from_utf8(m.clone()).unwrap();
        assert!(text.contains("odd%20name%2C%3D%25 f"), "{text}");
        assert_eq!(check(p, &m), VerifyOutcome::Clean { entries: 7, bytes: 6 });

        // a flipped byte
        fs::write(p.join("a/b/f"), b"hellp").unwrap();
        match check(p, &m) {
            VerifyOutcome::Mismatch { path, detail } => {
                assert_eq!(path, "/a/b/f");
                assert!(detail.contains("content"), "{detail}");
            }
            o => panic!("{o:?}"),
        }
        fs::write(p.join("a/b/f"), b"hello").unwrap();
        assert!(matches!(check(p, &m), VerifyOutcome::Clean { .. }));
        // a mode change
        fs::set_permissions(p.join("h"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        match check(p, &m) {
            VerifyOutcome::Mismatch { path, detail } => {
                assert_eq!(path, "/a/b/f", "hardlinks share the mode");
                assert!(detail.contains("mode"), "{detail}");
            }
            o => panic!("{o:?}"),
        }
        fs::set_permissions(p.join("h"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        // an extra file, then a missing one
        fs::write(p.join("a/new"), b"").unwrap();
        match check(p, &m) {
            VerifyOutcome::Mismatch { path, .. } => assert_eq!(path, "/a/new"),
            o => panic!("{o:?}"),
        }
        fs::remove_file(p.join("a/new")).unwrap();
        fs::remove_file(p.join("odd name,=%")).unwrap();
        match check(p, &m) {
            VerifyOutcome::Mismatch { path, detail } => {
                assert_eq!(path, "/odd name,=%");
                assert!(detail.contains("missing"), "{detail}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn escape_round_trip() {
        let raw = b"a b\n%,=\xff/c";
        assert_eq!(unescape(&escape(raw)), raw.to_vec());
    }
}
