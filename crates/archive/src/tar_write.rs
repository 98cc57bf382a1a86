//! Tar writer: ustar headers (built with [`tar::Header`]) plus a PAX header when a name,
//! link target, xattr or negative mtime does not fit ustar. Readable by Go's
//! `archive/tar` (what dockerd uses), GNU tar and our own reader.

use std::io::{self, BufWriter, Read, Write};

use tar::{EntryType, Header};

use crate::tar_read::Kind;

const BLOCK: usize = 512;

/// One header to write.
#[derive(Debug, Clone)]
pub(crate) struct WHeader<'a> {
    /// Relative path without a trailing slash.
    pub path: &'a [u8],
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub link: &'a [u8],
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

pub(crate) struct TarWriter<W: Write> {
    out: BufWriter<W>,
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n" where <len> counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len += 1;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Splits a path into ustar (prefix, name) if it fits.
fn split_ustar(p: &[u8]) -> Option<(&[u8], &[u8])> {
    if p.len() <= 100 {
        return Some((&[], p));
    }
    if p.len() > 256 {
        return None;
    }
    (0..p.len()).filter(|&i| p[i] == b'/').find_map(|i| {
        let (prefix, name) = (&p[..i], &p[i + 1..]);
        (prefix.len() <= 155 && !name.is_empty() && name.len() <= 100).then_some((prefix, name))
    })
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        TarWriter {
            out: BufWriter::with_capacity(64 * 1024, out),
        }
    }

    pub(crate) fn header(&mut self, h: &WHeader<'_>) -> io::Result<()> {
        let mut path = h.path.to_vec();
        if h.kind == Kind::Dir {
            path.push(b'/');
        }
        let mut pax = Vec::new();
        let mut hdr = Header::new_ustar();
        match split_ustar(&path) {
            Some((prefix, name)) => {
                let u = hdr.as_ustar_mut().expect("ustar header");
                u.name[..name.len()].copy_from_slice(name);
                u.prefix[..prefix.len()].copy_from_slice(prefix);
            }
            None => {
                pax_record(&mut pax, b"path", &path);
                let cut = path.len().min(100);
                hdr.as_old_mut().name[..cut].copy_from_slice(&path[..cut]);
            }
        }
        if h.link.len() <= 100 {
            hdr.as_old_mut().linkname[..h.link.len()].copy_from_slice(h.link);
        } else {
            pax_record(&mut pax, b"linkpath", h.link);
        }
        for (k, v) in h.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if h.mtime < 0 {
            pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
            hdr.set_mtime(0);
        } else {
            hdr.set_mtime(h.mtime as u64);
        }
        if h.uid > 0o7777777 {
            pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
        }
        if h.gid > 0o7777777 {
            pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
        }
        if h.size > 0o77777777777 {
            pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
        }
        hdr.set_mode(h.mode & 0o7777);
        hdr.set_uid(u64::from(h.uid));
        hdr.set_gid(u64::from(h.gid));
        hdr.set_size(if matches!(h.kind, Kind::Regular) {
            h.size
        } else {
            0
        });
        hdr.set_entry_type(match h.kind {
            Kind::Regular => EntryType::Regular,
            Kind::Hardlink => EntryType::Link,
            Kind::Symlink => EntryType::Symlink,
            Kind::Char => EntryType::Char,
            Kind::Block => EntryType::Block,
            Kind::Dir => EntryType::Directory,
            Kind::Fifo => EntryType::Fifo,
            Kind::Other(flag) => EntryType::new(flag),
        });
        if matches!(h.kind, Kind::Char | Kind::Block) {
            hdr.set_device_major(h.dev_major)?;
            hdr.set_device_minor(h.dev_minor)?;
        }
        hdr.set_cksum();

        if !pax.is_empty() {
            let mut ph = Header::new_ustar();
            let name = b"././@PaxHeader";
            ph.as_old_mut().name[..name.len()].copy_from_slice(name);
            ph.set_mode(0o644);
            ph.set_size(pax.len() as u64);
            ph.set_mtime(0);
            ph.set_entry_type(EntryType::XHeader);
            ph.set_cksum();
            self.out.write_all(ph.as_bytes())?;
            self.out.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        self.out.write_all(hdr.as_bytes())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Copies exactly `size` bytes of `data` (then the padding). A source that ends
    /// early is an error: the tar would otherwise be corrupt.
    pub(crate) fn data(&mut self, data: &mut impl Read, size: u64) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            let n = match data.read(&mut buf[..k]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while being read",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        self.pad(size)
    }

    /// Writes the end-of-archive marker and flushes.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ustar_split() {
        assert_eq!(split_ustar(b"abc"), Some((&b""[..], &b"abc"[..])));
        let long = [vec![b'a'; 150], b"/".to_vec(), vec![b'b'; 90]].concat();
        let (p, n) = split_ustar(&long).unwrap();
        assert_eq!((p.len(), n.len()), (150, 90));
        assert!(split_ustar(&[b'a'; 200]).is_none());
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", &[b'x'; 95]);
        let s = String::from_utf8(v.clone()).unwrap();
        let len: usize = s.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(len, v.len());
    }
}
