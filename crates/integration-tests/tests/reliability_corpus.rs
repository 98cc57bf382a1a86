//! Reliability tier, part 1 (issue 8): a confinement corpus of hostile tar streams applied as root through the
//! real ApplyDiff path (`lamina serve` over its plugin socket, as dockerd calls it).
//!
//! Every archive combines 1 to 6 "gadgets" drawn from the tar section of the bad-inputs catalogue (traversal,
//! absolute names, absolute and relative symlink chains, hardlinks out of the layer and to links, whiteout
//! abuse, device nodes, PAX/GNU long names and size tricks, duplicate and type-changing entries, deep nesting,
//! odd xattrs, ids and times, sparse maps), each aimed at two victim trees outside the layer and outside the
//! data root; about half of the archives are then mutated (header fields rewritten with a valid checksum,
//! random bytes, cuts, duplicated or inserted blocks).
//!
//! The oracle, after every archive: both victim trees unchanged (content, mode, owner, xattrs, mtime, ctime,
//! link count, inode), no name carrying the run's marker anywhere outside the data root, the daemon alive and
//! answering; every answer 200 or 500 with a classed `{"Err"}`; a refused layer empty (checked on a sample);
//! the parent and a neighbour layer unchanged (checked every 100 archives and at the end).
//!
//! Sizes: 500 archives by default (CI), `LAMINA_RELIABILITY=full` 5,000, or `LAMINA_RELIABILITY_ARCHIVES=N`;
//! `LAMINA_RELIABILITY_SEED` changes the corpus. Archives that break the oracle are saved under
//! `/var/tmp/lamina-reliability-failures/` for reproduction.
//!
//! Run: `cargo test -p lamina --test reliability_corpus -- --nocapture`
//! (full: `LAMINA_RELIABILITY=full cargo test -p lamina --test reliability_corpus -- --nocapture`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use lamina_testkit::reliability::*;
use lamina_testkit::*;

/// Where the names and targets of one archive point.
struct Aim {
    /// Absolute paths of the victim trees (without trailing `/`).
    victims: Vec<String>,
    /// Marker in every new name the corpus creates.
    marker: String,
}

impl Aim {
    fn victim(&self, r: &mut Rng) -> String {
        r.pick(&self.victims).clone()
    }

    /// A victim path without its leading `/`.
    fn victim_rel(&self, r: &mut Rng) -> String {
        self.victim(r).trim_start_matches('/').to_string()
    }

    /// A file inside a victim tree.
    fn victim_file(&self, r: &mut Rng) -> String {
        let f = *r.pick(&[
            "file",
            "etc/passwd",
            "etc/shadow",
            "setuid",
            "xattr-file",
            "hardlink",
            "sub/deeper/data",
            "fifo",
            "abs-link",
            "rel-link",
        ]);
        format!("{}/{f}", self.victim(r))
    }

    fn name(&self, r: &mut Rng) -> String {
        format!("{}-{}", self.marker, r.below(1000))
    }

    fn ups(&self, r: &mut Rng) -> String {
        "../".repeat(r.range(1, 24) as usize)
    }
}

const DATA: &[&[u8]] = &[
    b"",
    b"x",
    b"overwritten by the corpus\n",
    &[0u8; 700],
    &[0xffu8; 5000],
];

fn data(r: &mut Rng) -> Vec<u8> {
    if r.chance(1, 8) {
        let n = r.below(20_000) as usize;
        r.bytes(n)
    } else {
        r.pick(DATA).to_vec()
    }
}

/// Appends one gadget to `t`; returns its label.
fn gadget(t: &mut RawTar, r: &mut Rng, a: &Aim) -> &'static str {
    let v = a.victim(r);
    let vrel = a.victim_rel(r);
    let vfile = a.victim_file(r);
    let m = a.name(r);
    let lnk = format!("l{}", r.below(4));
    match r.below(34) {
        0 => {
            let name = match r.below(5) {
                0 => format!("../{m}"),
                1 => format!("a/../../{m}"),
                2 => format!("./../{m}"),
                3 => format!("{}tmp/{m}", a.ups(r)),
                _ => format!("{}{vrel}/file", a.ups(r)),
            };
            t.file(name.as_bytes(), 0o644, &data(r));
            "traversal file"
        }
        1 => {
            t.dir(format!("{}{m}", a.ups(r)).as_bytes(), 0o777);
            "traversal dir"
        }
        2 => {
            let name = match r.below(5) {
                0 => format!("/etc/{m}"),
                1 => format!("//etc/{m}"),
                2 => format!("/./etc/{m}"),
                3 => format!("/../{m}"),
                _ => vfile.clone(),
            };
            t.file(name.as_bytes(), 0o4755, &data(r));
            "absolute name"
        }
        3 => {
            // symlink to a victim directory, then something through it
            t.symlink(lnk.as_bytes(), v.as_bytes());
            through(t, r, &lnk, &m);
            "absolute symlink to victim, then through it"
        }
        4 => {
            t.symlink(lnk.as_bytes(), b"/etc");
            t.file(format!("{lnk}/{m}").as_bytes(), 0o644, b"x");
            "symlink to /etc, then a file through it"
        }
        5 => {
            let up = a.ups(r);
            t.symlink(b"up", up.trim_end_matches('/').as_bytes());
            let name = if r.chance(1, 2) {
                format!("up/{vrel}/file")
            } else {
                format!("up/tmp/{m}")
            };
            t.file(name.as_bytes(), 0o644, &data(r));
            "climbing relative symlink, then a file through it"
        }
        6 => {
            // chain a -> b -> c -> victim (relative and absolute links mixed)
            t.symlink(b"c", v.as_bytes());
            t.symlink(b"b", b"c");
            t.symlink(b"a", b"./b/");
            through(t, r, "a", &m);
            "symlink chain to victim, then through it"
        }
        7 => {
            let target = match r.below(5) {
                0 => vfile.clone(),
                1 => format!("{}{}", a.ups(r), vfile.trim_start_matches('/')),
                2 => "/etc/shadow".to_string(),
                3 => format!("{}etc/shadow", a.ups(r)),
                _ => format!("{lnk}/file"),
            };
            if r.chance(1, 2) {
                t.symlink(lnk.as_bytes(), v.as_bytes());
            }
            t.hardlink(m.as_bytes(), target.as_bytes());
            "hardlink out of the layer"
        }
        8 => {
            // hardlink to a symlink that points outside, then write through both names
            t.symlink(b"s", vfile.as_bytes());
            t.hardlink(b"h", b"s");
            if r.chance(1, 2) {
                t.file(b"h", 0o644, b"through the hardlinked symlink");
            } else {
                t.hardlink(b"h2", b"h");
            }
            "hardlink to a symlink pointing outside"
        }
        9 => {
            let target: &[u8] = match r.below(5) {
                0 => b"not-yet",
                1 => b"adir",
                2 => b"self",
                3 => b"",
                _ => b"./",
            };
            t.dir(b"adir", 0o755);
            t.hardlink(b"self", target);
            t.file(b"not-yet", 0o644, b"late");
            "bad hardlink"
        }
        10 => {
            let name = match r.below(7) {
                0 => ".wh..".to_string(),
                1 => ".wh...".to_string(),
                2 => "etc/.wh...".to_string(),
                3 => format!("{lnk}/.wh.file"),
                4 => format!("{lnk}/.wh..wh..opq"),
                5 => format!("{}{vrel}/.wh.file", a.ups(r)),
                _ => format!(".wh.{}", vrel.split('/').next().unwrap_or("x")),
            };
            if name.starts_with(&lnk) {
                t.symlink(lnk.as_bytes(), v.as_bytes());
            }
            t.file(name.as_bytes(), 0o644, b"");
            "whiteout abuse"
        }
        11 => {
            t.file(b".wh..wh..opq", 0o644, b"");
            t.file(b".wh..wh.plnk", 0o644, b"");
            t.file(format!("{m}/.wh..wh..opq").as_bytes(), 0o644, b"");
            "opaque markers at the root and in a new dir"
        }
        12 => {
            // devices and FIFOs, possibly with data, possibly through a symlink to a victim
            let flag = *r.pick(b"346");
            let name = if r.chance(1, 3) {
                t.symlink(lnk.as_bytes(), v.as_bytes());
                format!("{lnk}/dev-{m}")
            } else {
                format!("dev-{m}")
            };
            let mut hd = Hdr::new(name.as_bytes(), flag);
            hd.major = *r.pick(&[1, 8, 0, 4095]);
            hd.minor = *r.pick(&[3, 0, 5, 1_048_575]);
            hd.mode = 0o666;
            let d = if r.chance(1, 2) { data(r) } else { Vec::new() };
            t.entry(hd, &d);
            "device node or FIFO"
        }
        13 => {
            // a device entry named like a victim symlink, replacing a link that points at a victim file
            t.symlink(b"s", vfile.as_bytes());
            let mut hd = Hdr::new(b"s", b'3');
            hd.major = 1;
            hd.minor = 3;
            t.entry(hd, b"");
            t.file(b"s", 0o644, b"after device");
            "device replacing a symlink to a victim"
        }
        14 => {
            t.dir(b"m7", 0o7777);
            t.file(b"m7/f", 0o7777, b"#!/bin/sh\n");
            t.dir(b"m0", 0o000);
            t.file(b"m0/f", 0o000, b"locked");
            "special mode bits"
        }
        15 => {
            let mut hd = Hdr::new(format!("big-{m}").as_bytes(), b'0');
            match r.below(4) {
                0 => hd.size = 0o77777777777,
                1 => hd.size = 1 << 62,
                2 => {
                    t.pax(&[(b"size", b"18446744073709551616")]);
                    hd.size = 10;
                }
                _ => {
                    t.pax(&[(b"size", b"-1")]);
                    hd.size = 10;
                }
            }
            t.raw(&hd, b"0123456789");
            "lying size"
        }
        16 => {
            // long names: PAX path, GNU L, GNU K, PAX linkpath to a victim
            let long = format!("{}/{m}", "p".repeat(120) + "/" + &"q".repeat(200));
            match r.below(4) {
                0 => {
                    t.pax(&[(b"path", long.as_bytes())]);
                    t.file(b"short-pax", 0o644, b"pax");
                }
                1 => {
                    t.gnu_long(b'L', long.as_bytes());
                    t.file(b"short-gnu", 0o644, b"gnu");
                }
                2 => {
                    let target = format!("{}{}", a.ups(r), "x/".repeat(60));
                    t.gnu_long(b'K', target.as_bytes());
                    let mut hd = Hdr::new(b"klink", b'2');
                    hd.link = b"short".to_vec();
                    t.entry(hd, b"");
                }
                _ => {
                    t.pax(&[(b"path", format!("{}{vrel}/file", a.ups(r)).as_bytes())]);
                    t.file(b"innocent", 0o644, b"pax path traversal");
                }
            }
            "long names (PAX, GNU L/K)"
        }
        17 => {
            let comp = "c".repeat(if r.chance(1, 2) { 255 } else { 256 });
            let path = (0..r.range(1, 20))
                .map(|_| comp.as_str())
                .collect::<Vec<_>>()
                .join("/");
            t.pax(&[(b"path", format!("{path}/{m}").as_bytes())]);
            t.file(b"placeholder", 0o644, b"long");
            "255/256-byte components, long paths"
        }
        18 => {
            // directory with children, then a symlink to a victim under the same name, then a file through it
            t.dir(b"x", 0o755);
            t.file(b"x/child", 0o644, b"child");
            t.symlink(b"x", v.as_bytes());
            t.file(b"x/file", 0o644, b"through a replaced directory");
            "directory replaced by a symlink to a victim"
        }
        19 => {
            t.file(b"dup", 0o644, b"first");
            t.hardlink(b"dup-link", b"dup");
            t.file(b"dup", 0o644, b"second");
            t.dir(b"dup", 0o755);
            t.file(b"dup/in", 0o644, b"in");
            t.file(b"dup", 0o600, b"third");
            t.dir(b"dup/", 0o700);
            "duplicate and type-changing entries"
        }
        20 => {
            let depth = if r.chance(1, 10) { 1000 } else { r.range(10, 300) } as usize;
            let deep = "d/".repeat(depth);
            t.pax(&[(b"path", format!("{deep}{m}").as_bytes())]);
            t.file(b"deep-file", 0o644, b"bottom");
            if r.chance(1, 2) {
                t.pax(&[(b"path", format!("{deep}esc").as_bytes())]);
                t.symlink(b"deep-link", v.as_bytes());
                t.pax(&[(b"path", format!("{deep}esc/file").as_bytes())]);
                t.file(b"deep-through", 0o644, b"through a deep link");
            }
            "deep nesting"
        }
        21 => {
            let recs: Vec<(Vec<u8>, Vec<u8>)> = match r.below(7) {
                0 => vec![(b"SCHILY.xattr.trusted.overlay.opaque".to_vec(), b"y".to_vec())],
                1 => vec![(
                    b"SCHILY.xattr.trusted.overlay.redirect".to_vec(),
                    v.clone().into_bytes(),
                )],
                2 => vec![(b"SCHILY.xattr.trusted.overlay.metacopy".to_vec(), Vec::new())],
                3 => vec![(b"SCHILY.xattr.".to_vec(), b"empty name".to_vec())],
                4 => vec![(
                    format!("SCHILY.xattr.user.{}", "n".repeat(256)).into_bytes(),
                    b"v".to_vec(),
                )],
                5 => vec![(b"SCHILY.xattr.user.big".to_vec(), vec![b'v'; 70 * 1024])],
                _ => vec![(b"SCHILY.xattr.security.capability".to_vec(), r.bytes(20))],
            };
            let refs: Vec<(&[u8], &[u8])> = recs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            t.pax(&refs);
            if r.chance(1, 3) {
                t.symlink(lnk.as_bytes(), v.as_bytes());
                t.pax(&refs);
                t.dir(lnk.as_bytes(), 0o755);
            } else {
                t.dir(format!("xa-{m}").as_bytes(), 0o755);
            }
            "odd and overlay xattrs"
        }
        22 => {
            let mut hd = Hdr::new(format!("ids-{m}").as_bytes(), b'0');
            let (u, g) = *r.pick(&[
                (4_294_967_295i64, 0i64),
                (2_147_483_648, 2_147_483_648),
                (-1, -1),
                (-5_000_000_000, 0),
                (0, 4_294_967_296),
            ]);
            hd.uid = u;
            hd.gid = g;
            t.entry(hd, b"ids");
            "out-of-range ids"
        }
        23 => {
            let mut hd = Hdr::new(format!("time-{m}").as_bytes(), b'0');
            match r.below(4) {
                0 => hd.mtime = -2_208_988_800,
                1 => hd.mtime = 32_503_680_000,
                2 => {
                    t.pax(&[(b"mtime", b"1e400")]);
                }
                _ => {
                    t.pax(&[(b"mtime", b"NaN")]);
                }
            }
            t.entry(hd, b"t");
            "odd times"
        }
        24 => {
            // GNU sparse 1.0 through PAX, with honest or lying maps
            let real: u64 = *r.pick(&[4096, 1 << 20, 16 << 20, u64::MAX]);
            let (off, len) = *r.pick(&[
                (0u64, 10u64),
                (4096, 10),
                (1 << 30, 10),
                (0, 2000),
                (u64::MAX - 5, 10),
            ]);
            let map = format!("1\n{off}\n{len}\n");
            let mut d = map.into_bytes();
            d.resize(512, 0);
            d.extend(std::iter::repeat_n(b's', len.min(4096) as usize));
            t.pax(&[
                (b"GNU.sparse.major", b"1"),
                (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", format!("sparse-{m}").as_bytes()),
                (b"GNU.sparse.realsize", real.to_string().as_bytes()),
            ]);
            t.entry(Hdr::new(b"GNUSparseFile.0/sparse", b'0'), &d);
            "sparse maps"
        }
        25 => {
            for name in [
                &b"\xffname"[..],
                b"new\nline",
                b"back\\slash",
                b"co:lo,n",
                b"caf\xc3\xa9",
                b"cafe\xcc\x81",
            ] {
                t.file(name, 0o644, b"odd");
            }
            "odd names"
        }
        26 => {
            let flag = *r.pick(b"gDMVNS7AZ\0");
            let mut hd = Hdr::new(format!("type-{m}").as_bytes(), flag);
            hd.link = vfile.clone().into_bytes();
            let d = if flag == b'g' {
                pax_record(b"path", vfile.as_bytes())
            } else {
                data(r)
            };
            t.entry(hd, &d);
            t.file(b"after-type", 0o644, b"after");
            "other entry types (global PAX, GNU D/M/V/N/S, contiguous, unknown)"
        }
        27 => {
            t.raw_block(&r.bytes(512));
            "a random block"
        }
        28 => {
            // hardlink chain whose head is replaced by a symlink to a victim, then linked again
            t.file(b"hc", 0o644, b"head");
            t.hardlink(b"hc1", b"hc");
            t.hardlink(b"hc2", b"hc1");
            t.symlink(b"hc", vfile.as_bytes());
            t.hardlink(b"hc3", b"hc");
            t.file(b"hc3", 0o644, b"replaces the link, not the victim");
            "hardlink chain onto a symlink to a victim"
        }
        29 => {
            // a symlink named like the victim's own absolute path, inside the layer
            t.symlink(vrel.as_bytes(), b"/");
            t.file(
                format!("{vrel}/file").as_bytes(),
                0o644,
                b"victim path inside layer",
            );
            "victim path re-created inside the layer"
        }
        30 => {
            // dangling symlink as a parent: the file must not be created at the link's target
            t.symlink(b"dangle", format!("{v}/{m}").as_bytes());
            t.file(b"dangle/f", 0o644, b"through a dangling link");
            "dangling symlink as a parent"
        }
        31 => {
            // a whiteout named like a symlink pointing outside: only the link may go
            t.symlink(b"wl", vfile.as_bytes());
            t.file(b".wh.wl", 0o644, b"");
            t.symlink(b"wd", v.as_bytes());
            t.file(b"wd/.wh..wh..opq", 0o644, b"");
            "whiteouts of links pointing outside"
        }
        32 => {
            // GNU L longname that climbs out, with a hardlink type
            t.gnu_long(b'L', format!("{}{vrel}/hl-{m}", a.ups(r)).as_bytes());
            t.gnu_long(b'K', b"/etc/passwd");
            let hd = Hdr::new(b"gnu-hl", b'1');
            t.entry(hd, b"");
            "GNU long name climbing out, hardlink to /etc/passwd"
        }
        _ => {
            // a plain, harmless file so that accepted archives carry real content
            t.file(format!("ok-{m}").as_bytes(), 0o644, &data(r));
            "plain file"
        }
    }
}

/// Something written through `lnk` (a symlink to a victim directory).
fn through(t: &mut RawTar, r: &mut Rng, lnk: &str, m: &str) {
    match r.below(8) {
        0 => t.file(format!("{lnk}/file").as_bytes(), 0o644, b"overwritten"),
        1 => t.file(format!("{lnk}/{m}").as_bytes(), 0o644, b"new"),
        2 => t.dir(format!("{lnk}/sub").as_bytes(), 0o777),
        3 => t.file(format!("{lnk}/.wh.file").as_bytes(), 0o644, b""),
        4 => t.file(format!("{lnk}/.wh..wh..opq").as_bytes(), 0o644, b""),
        5 => {
            t.file(b"inner", 0o644, b"inner");
            t.hardlink(format!("{lnk}/hl-{m}").as_bytes(), b"inner")
        }
        6 => t.symlink(format!("{lnk}/etc/passwd").as_bytes(), b"/dev/null"),
        _ => {
            let mut hd = Hdr::new(format!("{lnk}/setuid").as_bytes(), b'0');
            hd.mode = 0o777;
            hd.uid = 1234;
            t.entry(hd, b"chmod/chown through a link")
        }
    };
}

/// Mutates a finished stream; returns the labels of what was done.
fn mutate(mut buf: Vec<u8>, headers: &[usize], r: &mut Rng) -> (Vec<u8>, Vec<&'static str>) {
    let mut done = Vec::new();
    for _ in 0..r.range(1, 3) {
        let h = if headers.is_empty() { 0 } else { *r.pick(headers) };
        match r.below(8) {
            0 if h + 512 <= buf.len() => {
                // one header field rewritten, checksum fixed
                let (off, len) = *r.pick(&[
                    (0usize, 100usize),
                    (100, 8),
                    (108, 8),
                    (116, 8),
                    (124, 12),
                    (136, 12),
                    (156, 1),
                    (157, 100),
                    (329, 8),
                    (337, 8),
                    (345, 155),
                ]);
                for b in &mut buf[h + off..h + off + len] {
                    if r.chance(1, 3) {
                        *b = *r.pick(b"/.\0\x80\xff7a-");
                    }
                }
                fix_checksum(&mut buf[h..h + 512]);
                done.push("field rewritten");
            }
            1 => {
                let n = buf.len();
                if n > 0 {
                    let i = r.below(n as u64) as usize;
                    buf[i] = r.next_u64() as u8;
                }
                done.push("byte flipped");
            }
            2 => {
                let cut = r.below(buf.len() as u64 + 1) as usize;
                buf.truncate(cut);
                done.push("cut");
            }
            3 if h + 512 <= buf.len() => {
                let block = buf[h..h + 512].to_vec();
                let at = *r.pick(headers);
                if at <= buf.len() {
                    buf.splice(at..at, block);
                }
                done.push("header duplicated");
            }
            4 => {
                let at = (r.below(buf.len() as u64 / 512 + 1) * 512) as usize;
                let at = at.min(buf.len());
                let block = r.bytes(512);
                buf.splice(at..at, block);
                done.push("random block inserted");
            }
            5 if h + 512 <= buf.len() => {
                buf[h + 156] = r.next_u64() as u8;
                fix_checksum(&mut buf[h..h + 512]);
                done.push("type changed");
            }
            6 => {
                while buf.len() >= 512 && buf[buf.len() - 512..].iter().all(|&b| b == 0) {
                    buf.truncate(buf.len() - 512);
                }
                done.push("end blocks removed");
            }
            _ if h + 512 <= buf.len() => {
                // size field set to something else, checksum fixed
                let v = *r.pick(&[0u64, 1, 511, 512, 513, 1 << 20, 0o77777777777]);
                let s = format!("{v:011o}\0");
                buf[h + 124..h + 136].copy_from_slice(s.as_bytes());
                fix_checksum(&mut buf[h..h + 512]);
                done.push("size changed");
            }
            _ => {}
        }
    }
    (buf, done)
}

/// One archive of the corpus, with its description.
fn archive(seed: u64, aim: &Aim) -> (Vec<u8>, String) {
    let mut r = Rng::new(seed);
    let mut t = RawTar::new();
    let mut labels = Vec::new();
    for _ in 0..r.range(1, 6) {
        labels.push(gadget(&mut t, &mut r, aim));
    }
    let finished = t.finish();
    if r.chance(1, 2) {
        let (buf, m) = mutate(finished, &t.headers, &mut r);
        (buf, format!("{} | mutated: {}", labels.join(" + "), m.join(", ")))
    } else {
        (finished, labels.join(" + "))
    }
}

fn hex_id(seed: u64, n: u64) -> String {
    let mut b = [0u8; 32];
    fill_random(
        seed.wrapping_mul(31).wrapping_add(n) ^ (u64::from(std::process::id()) << 24),
        &mut b,
    );
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const FAILURES: &str = "/var/tmp/lamina-reliability-failures";

fn save_failure(seed: u64, tar: &[u8], why: &str) -> PathBuf {
    let _ = fs::create_dir_all(FAILURES);
    let p = Path::new(FAILURES).join(format!("corpus-{seed}.tar"));
    let _ = fs::write(&p, tar);
    let _ = fs::write(p.with_extension("txt"), why);
    p
}

fn base_tar() -> Vec<u8> {
    let mut t = RawTar::new();
    t.dir(b"etc", 0o755)
        .file(b"etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .dir(b"usr", 0o755)
        .dir(b"usr/bin", 0o755)
        .file(b"usr/bin/env", 0o755, b"#!/bin/sh\n")
        .dir(b"usr/lib", 0o755)
        .symlink(b"lib", b"usr/lib")
        .dir(b"var", 0o755)
        .symlink(b"var/run", b"/run")
        .dir(b"a", 0o755)
        .file(b"a/f", 0o600, b"lower a/f\n")
        .hardlink(b"a/f-link", b"a/f");
    t.finish()
}

/// The on-disk content directory of a layer: the `diff` beside the mount point `Get` answers.
fn diff_dir(c: &PluginClient, id: &str) -> PathBuf {
    let v = c.call("Get", json!({"ID": id})).ok(&format!("Get {id}"));
    let dir = PathBuf::from(v["Dir"].as_str().unwrap());
    c.call("Put", json!({"ID": id})).ok(&format!("Put {id}"));
    let diff = dir.parent().unwrap().join("diff");
    assert!(diff.is_dir(), "no diff dir beside {}", dir.display());
    diff
}

fn no_xattr_filter(_: &[u8]) -> bool {
    true
}

#[test]
fn confinement_corpus() {
    let test = "confinement_corpus";
    let Some(_serial) = serial_if(require_root(test)) else {
        return;
    };
    let n_archives = count("LAMINA_RELIABILITY_ARCHIVES", 500, 5000);
    let seed0 = base_seed();
    let mut lamina = Lamina::new(&unique_name("corpus"));
    lamina.spawn();
    lamina.wait_ready();
    let c = lamina.client();
    let home = lamina.dir().join("docker-root");
    c.init(&home);

    // victims: one beside the data root, one in /tmp
    let v1 = lamina.dir().join("victim");
    let v2 = PathBuf::from(format!("/tmp/lamina-rel-victim-{}", std::process::id()));
    let _ = fs::remove_dir_all(&v2);
    DeepSentinel::make_tree(&v1);
    DeepSentinel::make_tree(&v2);
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _v2_guard = RemoveOnDrop(v2.clone());
    let sentinel = DeepSentinel::capture(&[&v1, &v2, Path::new("/etc/passwd"), Path::new("/etc/shadow")]);
    let marker = format!("lrel{}x", std::process::id());
    let aim = Aim {
        victims: vec![v1.display().to_string(), v2.display().to_string()],
        marker: marker.clone(),
    };
    let search: Vec<PathBuf> = ["/", "/etc", "/tmp", "/var/tmp", "/run", E2E_ROOT]
        .iter()
        .map(PathBuf::from)
        .chain([
            lamina.dir().to_path_buf(),
            v1.clone(),
            v2.clone(),
            v1.join("etc"),
            v2.join("etc"),
        ])
        .collect();

    // parent and neighbour layers
    let base = hex_id(seed0, u64::MAX);
    let neighbour = hex_id(seed0, u64::MAX - 1);
    c.call("Create", json!({"ID": base})).ok("Create base");
    let mut bt: &[u8] = &base_tar();
    c.apply_diff(&base, "", &mut bt).unwrap().ok("ApplyDiff base");
    c.call("Create", json!({"ID": neighbour, "Parent": base}))
        .ok("Create neighbour");
    let mut nt: &[u8] = &base_tar();
    c.apply_diff(&neighbour, &base, &mut nt)
        .unwrap()
        .ok("ApplyDiff neighbour");
    let base_diff = diff_dir(&c, &base);
    let neigh_diff = diff_dir(&c, &neighbour);
    let base_tree = read_tree(&base_diff, &no_xattr_filter, true);
    let neigh_tree = read_tree(&neigh_diff, &no_xattr_filter, true);

    let started = Instant::now();
    let (mut accepted, mut refused, mut crashes, mut outside, mut shape, mut half) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut transport = 0u64;
    let mut classes: std::collections::BTreeMap<String, u64> = Default::default();
    let mut failures: Vec<String> = Vec::new();
    for i in 0..n_archives {
        let seed = seed0.wrapping_add(i);
        let (tar, what) = archive(seed, &aim);
        let id = hex_id(seed0, i);
        c.call("Create", json!({"ID": id, "Parent": base}))
            .ok(&format!("Create for archive {i}"));
        let mut body: &[u8] = &tar;
        let resp = c.apply_diff(&id, &base, &mut body);
        let mut bad = Vec::new();
        match &resp {
            Ok(r) if r.status == 200 && r.err().is_none() => accepted += 1,
            Ok(r) => {
                let err = r.err().unwrap_or_default();
                if r.status != 500 || !classed(&err) {
                    shape += 1;
                    bad.push(format!(
                        "unclassed refusal: HTTP {} {}",
                        r.status,
                        truncate(&r.text(), 300)
                    ));
                }
                let class = err.split(':').next().unwrap_or("").to_string();
                let seen = classes.entry(class.clone()).or_default();
                *seen += 1;
                if *seen <= 2 || (class != "invalid archive" && *seen <= 5) {
                    eprintln!("example {class}: archive {i} ({what}): {}", truncate(&err, 300));
                }
                refused += 1;
                if i % 5 == 0 && lamina.running() {
                    // U3 on a sample: the refused layer is empty (or gone)
                    let g = c.call("Get", json!({"ID": id}));
                    if g.status == 200 {
                        let dir = PathBuf::from(g.json()["Dir"].as_str().unwrap_or_default());
                        let diff = dir.parent().map(|d| d.join("diff")).unwrap_or_default();
                        let left = walk(&diff);
                        c.call("Put", json!({"ID": id})).ok("Put");
                        if !left.is_empty() {
                            half += 1;
                            bad.push(format!(
                                "refused but the layer holds {:?}",
                                &left[..left.len().min(5)]
                            ));
                        }
                    }
                }
            }
            Err(e) => {
                transport += 1;
                bad.push(format!("transport error {e}"));
            }
        }
        // the daemon must still be there
        let alive = lamina.running() && c.activate().is_ok_and(|r| r.status == 200);
        if !alive {
            crashes += 1;
            bad.push(format!("daemon died; log:\n{}", lamina.log_tail()));
            lamina.kill9();
            lamina.start_again();
        }
        // U1: victims and marker names
        let diffs = sentinel.diffs();
        let found: Vec<PathBuf> = search.iter().flat_map(|d| names_containing(d, &marker)).collect();
        if !diffs.is_empty() || !found.is_empty() {
            outside += 1;
            bad.push(format!("OUTSIDE WRITE: {diffs:#?} {found:?}"));
            for f in &found {
                let _ = fs::remove_file(f).or_else(|_| fs::remove_dir_all(f));
            }
        }
        if i % 100 == 99 || i + 1 == n_archives {
            for (what_layer, dir, want) in [
                ("parent", &base_diff, &base_tree),
                ("neighbour", &neigh_diff, &neigh_tree),
            ] {
                let now = read_tree(dir, &no_xattr_filter, true);
                let d = compare_trees("before", want, "now", &now);
                if !d.is_empty() {
                    outside += 1;
                    bad.push(format!("{what_layer} layer changed: {d:#?}"));
                }
            }
        }
        let rm = c.call("Remove", json!({"ID": id}));
        if rm.status != 200 {
            bad.push(format!("Remove: HTTP {} {}", rm.status, rm.text()));
        }
        if !bad.is_empty() {
            let why = format!("seed {seed} ({what}):\n{}", bad.join("\n"));
            let saved = save_failure(seed, &tar, &why);
            eprintln!("archive {i}: {why}\nsaved as {}", saved.display());
            failures.push(why);
            if failures.len() > 20 {
                break;
            }
        }
        if i % 500 == 499 {
            eprintln!(
                "... {} archives, {accepted} accepted, {refused} refused, {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let panics = panics_in_log(&lamina.log);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "RELIABILITY corpus: {n_archives} archives in {secs:.0} s ({:.1}/s): {accepted} accepted, {refused} refused \
         ({classes:?}), outside writes {outside}, daemon crashes {crashes}, panics in log {}, unclassed answers {shape}, \
         half-applied refusals {half}, transport errors {transport}",
        n_archives as f64 / secs,
        panics.len()
    );
    assert!(
        failures.is_empty() && panics.is_empty(),
        "{} failing archives (saved in {FAILURES}):\n{}\npanics: {panics:?}",
        failures.len(),
        failures.join("\n---\n")
    );
}
