//! bad-inputs.md section (a), A1-A31, at the archive level.
//!
//! Every case applies into `<tmp>/x/y/z/layer` next to a sentinel tree (`<tmp>/x/y/z/victim`
//! with files and symlinks, plus what is above): the sentinel is fingerprinted before and
//! after each apply to prove that nothing outside the layer was created or changed.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use lamina_archive::{apply_layer, ApplyOptions, ApplyStats, ArchiveError, DiffOptions};
use lamina_testkit::{require_root, write_files};

struct Env {
    _t: tempfile::TempDir,
    top: PathBuf,
    layer: PathBuf,
}

fn env() -> Env {
    let t = tempfile::tempdir().unwrap();
    let top = t.path().to_path_buf();
    let base = top.join("x/y/z");
    fs::create_dir_all(top.join("tmp")).unwrap();
    write_files(
        &base.join("victim"),
        &[
            ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
            ("etc/shadow", "root:*:1::::::\n"),
            ("usr/bin/env", "#!env"),
        ],
    );
    symlink("usr/lib", base.join("victim/lib")).unwrap();
    symlink("/run", base.join("victim/run")).unwrap();
    fs::write(top.join("x/secret"), "s").unwrap();
    let layer = base.join("layer");
    fs::create_dir(&layer).unwrap();
    Env { _t: t, top, layer }
}

/// Names that must never appear on the host.
const HOST_PROBES: &[&str] = &[
    "/etc/lamina-bad-input-probe",
    "/tmp/lamina-bad-input-probe",
    "/lamina-escape",
];

impl Env {
    fn outside(&self) -> Snapshot {
        snapshot_skipping(&self.top, true, Some(&self.layer))
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"x/y/z/layer"))
            .collect()
    }

    fn apply_with(&self, input: impl Read, opts: &ApplyOptions) -> Result<ApplyStats, ArchiveError> {
        let before = self.outside();
        let shadow_links = fs::metadata("/etc/shadow").map(|m| m.nlink()).ok();
        let d = open_dir(&self.layer);
        let r = apply_layer(fd(&d), input, opts);
        assert_eq!(before, self.outside(), "something outside the layer changed");
        assert_eq!(shadow_links, fs::metadata("/etc/shadow").map(|m| m.nlink()).ok());
        for p in HOST_PROBES {
            assert!(fs::symlink_metadata(p).is_err(), "{p} appeared on the host");
        }
        r
    }

    fn apply(&self, tar: &[u8]) -> Result<ApplyStats, ArchiveError> {
        self.apply_with(tar, &ApplyOptions::default())
    }

    fn err(&self, tar: &[u8]) -> String {
        self.apply(tar).unwrap_err().to_string()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.layer.join(rel)
    }
}

fn one_file(name: &[u8]) -> Vec<u8> {
    let mut t = Tar::new();
    t.file(name, b"data");
    t.end()
}

#[test]
fn a01_parent_escapes_are_refused() {
    for name in [
        &b"../escape"[..],
        b"a/../../escape",
        b"./../x",
        b"../../../../../../lamina-escape",
    ] {
        let e = env();
        let err = e.err(&one_file(name));
        assert!(err.contains("invalid archive: path escapes layer root"), "{err}");
    }
}

#[test]
fn a02_absolute_names_land_inside() {
    for name in [&b"/etc/motd"[..], b"//etc/motd", b"/./etc/motd"] {
        let e = env();
        e.apply(&one_file(name)).unwrap();
        assert_eq!(fs::read(e.p("etc/motd")).unwrap(), b"data");
    }
    let e = env();
    assert!(e.err(&one_file(b"/../x")).contains("path escapes layer root"));
}

#[test]
fn a03_symlink_to_absolute_dir_resolves_in_layer() {
    let e = env();
    let mut t = Tar::new();
    t.dir(b"etc/")
        .symlink(b"lnk", b"/etc")
        .file(b"lnk/lamina-bad-input-probe", b"in layer");
    e.apply(&t.end()).unwrap();
    assert_eq!(fs::read(e.p("etc/lamina-bad-input-probe")).unwrap(), b"in layer");
    assert_eq!(fs::read_link(e.p("lnk")).unwrap(), Path::new("/etc"));

    // Without etc/ in the layer the symlink dangles: refused, nothing created.
    let e = env();
    let mut t = Tar::new();
    t.symlink(b"lnk", b"/etc")
        .file(b"lnk/lamina-bad-input-probe", b"x");
    assert!(e.err(&t.end()).contains("invalid archive"));
}

#[test]
fn a04_symlink_climbing_up_resolves_in_layer() {
    let e = env();
    let mut t = Tar::new();
    t.dir(b"tmp/")
        .symlink(b"up", b"../../../../..")
        .file(b"up/tmp/lamina-bad-input-probe", b"in layer");
    e.apply(&t.end()).unwrap();
    assert_eq!(fs::read(e.p("tmp/lamina-bad-input-probe")).unwrap(), b"in layer");
    let e = env();
    let mut t = Tar::new();
    t.symlink(b"up", b"../../../../..")
        .file(b"up/secret", b"x")
        .file(b"up/x/secret", b"y");
    e.apply(&t.end()).unwrap();
    assert_eq!(fs::read(e.p("secret")).unwrap(), b"x");
    assert_eq!(fs::read(e.p("x/secret")).unwrap(), b"y");
}

#[test]
fn a05_hardlink_targets_stay_in_layer() {
    let e = env();
    let mut t = Tar::new();
    t.hardlink(b"h", b"/etc/shadow");
    assert!(e.err(&t.end()).contains("bad hardlink"));
    let e = env();
    let mut t = Tar::new();
    t.hardlink(b"h2", b"../../../etc/shadow");
    assert!(e.err(&t.end()).contains("bad hardlink"));
    let e = env();
    let mut t = Tar::new();
    t.file(b"etc/shadow", b"layer shadow")
        .hardlink(b"h", b"/etc/shadow");
    e.apply(&t.end()).unwrap();
    assert_eq!(
        fs::metadata(e.p("h")).unwrap().ino(),
        fs::metadata(e.p("etc/shadow")).unwrap().ino()
    );
}

#[test]
fn a06_hardlink_to_symlink_links_the_symlink() {
    let e = env();
    let mut t = Tar::new();
    t.symlink(b"s", b"usr/bin/env").hardlink(b"h", b"s");
    e.apply(&t.end()).unwrap();
    let h = fs::symlink_metadata(e.p("h")).unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(h.ino(), fs::symlink_metadata(e.p("s")).unwrap().ino());
    assert_eq!(fs::read_link(e.p("h")).unwrap(), Path::new("usr/bin/env"));
}

#[test]
fn a07_bad_hardlinks() {
    let cases: Vec<Vec<u8>> = vec![
        Tar::new().hardlink(b"h", b"later").file(b"later", b"x").end(),
        Tar::new().dir(b"d/").hardlink(b"h", b"d").end(),
        Tar::new().file(b"h", b"x").hardlink(b"h", b"h").end(),
        Tar::new().hardlink(b"h", b"").end(),
        Tar::new().hardlink(b"h", b"/").end(),
    ];
    for tar in cases {
        let e = env();
        let err = e.err(&tar);
        assert!(err.contains("invalid archive: bad hardlink"), "{err}");
        assert!(fs::symlink_metadata(e.p("h"))
            .map(|m| m.is_file())
            .unwrap_or(true));
    }
}

#[test]
fn a08_whiteouts() {
    if !require_root("a08_whiteouts") {
        return;
    }
    let e = env();
    let mut t = Tar::new();
    t.file(b"dir/.wh..wh..opq", b"")
        .file(b"dir/mine", b"m")
        .file(b"etc/.wh.passwd", b"")
        .file(b".wh.missing", b"");
    e.apply(&t.end()).unwrap();
    let d = fs::File::open(e.p("dir")).unwrap();
    assert!(lamina_sys::fs::is_opaque(fd(&d)).unwrap());
    assert_eq!(fs::read(e.p("dir/mine")).unwrap(), b"m");
    for w in ["etc/passwd", "missing"] {
        let md = fs::symlink_metadata(e.p(w)).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&md.file_type()));
        assert_eq!(md.rdev(), 0);
    }
    assert!(fs::symlink_metadata(e.p("etc/.wh.passwd")).is_err());
    assert!(fs::symlink_metadata(e.p(".wh..wh..opq")).is_err());
}

#[test]
fn a09_escaping_or_empty_whiteouts() {
    for name in [&b".wh.."[..], b".wh...", b"etc/.wh...", b"a/.wh..", b"a/.wh."] {
        let e = env();
        fs::write(e.p("keep"), "k").unwrap();
        let mut t = Tar::new();
        t.file(name, b"");
        let err = e.err(&t.end());
        assert!(err.contains("invalid archive"), "{err}");
        assert!(e.p("keep").exists());
    }
}

#[test]
fn a10_whiteout_and_file_in_both_orders() {
    if !require_root("a10_whiteout_and_file_in_both_orders") {
        return;
    }
    let e = env();
    e.apply(&Tar::new().file(b".wh.a", b"").file(b"a", b"file").end())
        .unwrap();
    assert_eq!(fs::read(e.p("a")).unwrap(), b"file");
    let e = env();
    e.apply(&Tar::new().file(b"a", b"file").file(b".wh.a", b"").end())
        .unwrap();
    assert_eq!(fs::symlink_metadata(e.p("a")).unwrap().rdev(), 0);
    assert!(!fs::symlink_metadata(e.p("a")).unwrap().is_file());
    // A directory tree replaced by a whiteout.
    let e = env();
    e.apply(&Tar::new().file(b"d/x/y", b"1").file(b".wh.d", b"").end())
        .unwrap();
    assert!(!fs::symlink_metadata(e.p("d")).unwrap().is_dir());
}

#[test]
fn a11_a12_devices_and_fifos_are_inert() {
    if !require_root("a11_a12_devices_and_fifos_are_inert") {
        return;
    }
    let e = env();
    let mut t = Tar::new();
    let mut c = H::new(b"null", b'3');
    (c.major, c.minor, c.mode) = (1, 3, 0o666);
    t.header(&c);
    let mut b = H::new(b"sda", b'4');
    (b.major, b.minor, b.mode) = (8, 0, 0o660);
    t.header(&b);
    let mut f = H::new(b"fifo", b'6');
    f.size = 10; // data after a fifo header is skipped, never written into it
    t.header(&f).data(b"0123456789");
    let mut c2 = H::new(b"zero", b'3');
    (c2.major, c2.minor, c2.size) = (1, 5, 600);
    t.header(&c2).data(&[b'z'; 600]);
    t.file(b"after", b"still parsed");
    e.apply(&t.end()).unwrap();
    let md = fs::symlink_metadata(e.p("null")).unwrap();
    assert_eq!(
        (major(md.rdev()), minor(md.rdev()), md.mode() & 0o7777),
        (1, 3, 0o666)
    );
    let md = fs::symlink_metadata(e.p("sda")).unwrap();
    assert_eq!((major(md.rdev()), minor(md.rdev())), (8, 0));
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()));
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(e.p("fifo")).unwrap().file_type()
    ));
    assert_eq!(fs::read(e.p("after")).unwrap(), b"still parsed");
}

#[test]
fn a13_special_mode_bits_are_kept() {
    if !require_root("a13_special_mode_bits_are_kept") {
        return;
    }
    let e = env();
    let mut t = Tar::new();
    t.file_mode(b"suid", b"x", 0o4755)
        .file_mode(b"sgid", b"x", 0o2755)
        .file_mode(b"all", b"x", 0o7777);
    let mut d = H::new(b"tmp/", b'5');
    d.mode = 0o1777;
    t.header(&d);
    let mut d = H::new(b"d7777/", b'5');
    d.mode = 0o7777;
    t.header(&d);
    e.apply(&t.end()).unwrap();
    for (p, m) in [
        ("suid", 0o4755),
        ("sgid", 0o2755),
        ("all", 0o7777),
        ("tmp", 0o1777),
        ("d7777", 0o7777),
    ] {
        assert_eq!(fs::metadata(e.p(p)).unwrap().mode() & 0o7777, m, "{p}");
    }
}

#[test]
fn a14_lying_sizes() {
    let e = env();
    let mut t = Tar::new();
    let mut h = H::new(b"big", b'0');
    h.size = 0o77777777777;
    t.header(&h);
    t.buf.extend_from_slice(b"0123456789");
    let err = e.err(&t.buf);
    assert!(err.contains("unexpected end of archive"), "{err}");
    assert!(fs::metadata(e.p("big")).map(|m| m.len() <= 10).unwrap_or(true));

    let e = env();
    let mut t = Tar::new();
    t.header(&H::new(b"b256", b'0'));
    // Base-256 size of 2^62.
    let hdr_start = t.buf.len() - 512;
    let field = &mut t.buf[hdr_start + 124..hdr_start + 136];
    field.fill(0);
    field[0] = 0x80;
    field[4] = 0x40;
    let mut block = [0u8; 512];
    block.copy_from_slice(&t.buf[hdr_start..]);
    let hdr = tar::Header::from_byte_slice(&block);
    let mut hdr = hdr.clone();
    hdr.set_cksum();
    t.buf.truncate(hdr_start);
    t.buf.extend_from_slice(hdr.as_bytes());
    t.buf.extend_from_slice(&[1u8; 100]);
    assert!(e.err(&t.buf).contains("unexpected end of archive"));

    let e = env();
    let mut t = Tar::new();
    t.pax(&[(b"size", b"18446744073709551616")]).file(b"p", b"x");
    assert!(e.err(&t.end()).contains("invalid archive"));
}

#[test]
fn a15_truncated_streams() {
    let mut t = Tar::new();
    t.file(b"a", &[b'a'; 2000]).file(b"b", b"b");
    let full = t.end();
    for cut in [100, 700, 1500] {
        let e = env();
        let err = e.err(&full[..cut]);
        assert!(
            err.contains("invalid archive: unexpected end of archive"),
            "cut {cut}: {err}"
        );
    }
    // A clean cut at an entry boundary with no end marker is accepted, like GNU tar
    // and Go's reader.
    let e = env();
    let s = e.apply(&full[..512 * 5]).unwrap();
    assert_eq!(s.entries, 1);
    assert_eq!(fs::read(e.p("a")).unwrap().len(), 2000);

    // The client going away mid-body: the reader errors, the apply stops with it.
    struct Broken(Vec<u8>, usize);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.1 >= self.0.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "peer gone",
                ));
            }
            let n = buf.len().min(self.0.len() - self.1).min(300);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }
    let e = env();
    let err = e
        .apply_with(Broken(full[..1500].to_vec(), 0), &ApplyOptions::default())
        .unwrap_err();
    assert!(matches!(err, ArchiveError::Io { .. }), "{err}");
}

#[test]
fn a16_garbage_and_compressed() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let e = env();
    assert!(e.err(&random).contains("invalid archive: invalid tar header"));
    let mut bad = one_file(b"f");
    bad[0] ^= 1;
    assert!(env().err(&bad).contains("invalid archive: invalid tar header"));
    let mut gz = vec![0x1f, 0x8b, 8, 0];
    gz.extend_from_slice(&random[..2000]);
    assert!(env().err(&gz).contains("unsupported: compressed layer"));
    let mut zst = vec![0x28, 0xb5, 0x2f, 0xfd];
    zst.extend_from_slice(&random[..2000]);
    assert!(env().err(&zst).contains("unsupported: compressed layer"));
}

#[test]
fn a17_empty_bodies() {
    for body in [&[][..], &[0u8; 1024][..]] {
        let e = env();
        let s = e.apply(body).unwrap();
        assert_eq!((s.size, s.entries), (0, 0));
        assert_eq!(fs::read_dir(&e.layer).unwrap().count(), 0);
    }
}

// A18 (long names), A21/A22 (last entry wins) and A26 (sparse, 1 GiB) are in
// tests/roundtrip.rs; A20 (1,000 levels) in tests/changes.rs.

#[test]
fn a19_name_lengths() {
    let e = env();
    let mut t = Tar::new();
    t.pax(&[(b"path", &[b'n'; 256])]).file(b"x", b"");
    assert!(e.err(&t.end()).contains("invalid archive: name too long"));
    let comp = "c".repeat(255);
    let path = vec![comp.as_str(); 20].join("/");
    let e = env();
    let mut t = Tar::new();
    t.pax(&[(b"path", path.as_bytes())]).file(b"x", b"");
    assert!(e.err(&t.end()).contains("invalid archive: name too long"));
    let ld = open_dir(&e.layer);
    lamina_sys::fs::remove_all(fd(&ld), comp.as_bytes()).unwrap();
}

#[test]
fn a20_three_thousand_levels_refused_cleanly() {
    let e = env();
    let path = "d/".repeat(3000) + "f";
    let mut t = Tar::new();
    t.pax(&[(b"path", path.as_bytes())]).file(b"x", b"");
    assert!(e.err(&t.end()).contains("name too long"));
    let ld = open_dir(&e.layer);
    lamina_sys::fs::remove_all(fd(&ld), b"d").unwrap();
}

#[test]
fn a23_capabilities() {
    if !require_root("a23_capabilities") {
        return;
    }
    // VFS_CAP_REVISION_2 with cap_net_raw (bit 13) permitted and effective.
    let mut cap = vec![0x01, 0x00, 0x00, 0x02];
    cap.extend_from_slice(&[0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let e = env();
    let mut t = Tar::new();
    t.pax(&[(b"SCHILY.xattr.security.capability", &cap)])
        .file_mode(b"ping", b"elf", 0o755);
    e.apply(&t.end()).unwrap();
    let f = fs::File::open(e.p("ping")).unwrap();
    assert_eq!(
        lamina_sys::fs::get_xattr_fd(fd(&f), b"security.capability")
            .unwrap()
            .unwrap(),
        cap
    );
    // A blob with a newline byte in it (cap_dac_override | cap_fowner) survives too.
    let mut cap2 = cap.clone();
    cap2[4] = 0x0a;
    let e2 = env();
    let mut t = Tar::new();
    t.pax(&[(b"SCHILY.xattr.security.capability", &cap2)])
        .file(b"nl", b"elf");
    e2.apply(&t.end()).unwrap();
    let f = fs::File::open(e2.p("nl")).unwrap();
    assert_eq!(
        lamina_sys::fs::get_xattr_fd(fd(&f), b"security.capability")
            .unwrap()
            .unwrap(),
        cap2
    );
    // Malformed: refused, every time the same way.
    for _ in 0..2 {
        let e = env();
        let mut t = Tar::new();
        t.pax(&[(b"SCHILY.xattr.security.capability", b"junk")])
            .file(b"bad", b"elf");
        let err = e.err(&t.end());
        assert!(
            err.contains("invalid archive: xattr security.capability"),
            "{err}"
        );
    }
}

#[test]
fn a24_overlay_xattrs_are_dropped() {
    if !require_root("a24_overlay_xattrs_are_dropped") {
        return;
    }
    let e = env();
    let mut t = Tar::new();
    t.pax(&[
        (b"SCHILY.xattr.trusted.overlay.opaque", b"y"),
        (b"SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        (b"SCHILY.xattr.trusted.overlay.metacopy", b""),
        (b"SCHILY.xattr.trusted.overlay.origin", b"x"),
        (b"SCHILY.xattr.user.overlay.opaque", b"y"),
        (b"SCHILY.xattr.user.kept", b"k"),
    ]);
    t.dir(b"d/");
    e.apply(&t.end()).unwrap();
    let d = fs::File::open(e.p("d")).unwrap();
    let keys = lamina_sys::fs::list_xattrs_fd(fd(&d)).unwrap();
    assert!(
        keys.iter()
            .all(|k| !k.starts_with(b"trusted.overlay.") && !k.starts_with(b"user.overlay.")),
        "{keys:?}"
    );
    assert!(keys.contains(&b"user.kept".to_vec()));
}

#[test]
fn a25_odd_xattrs() {
    let big = vec![b'v'; 70 * 1024];
    let name256 = [b"user.".to_vec(), vec![b'n'; 251]].concat();
    let cases: [(&[u8], &[u8]); 3] = [
        (b"SCHILY.xattr.", b"v"),
        (&[b"SCHILY.xattr.".to_vec(), name256].concat(), b"v"),
        (b"SCHILY.xattr.user.big", &big),
    ];
    for (k, v) in cases {
        let e = env();
        let mut t = Tar::new();
        t.pax(&[(k, v)]).file(b"f", b"x");
        let err = e.err(&t.end());
        assert!(err.contains("invalid archive"), "{err}");
    }
    // An SELinux label is applied when the system supports it, ignored otherwise.
    let e = env();
    let mut t = Tar::new();
    t.pax(&[(b"SCHILY.xattr.security.selinux", b"system_u:object_r:bin_t:s0")])
        .file(b"f", b"x");
    e.apply(&t.end()).unwrap();
}

#[test]
fn a27_odd_names_are_byte_exact() {
    let names: [&[u8]; 7] = [
        b"ff\xff",
        b"new\nline",
        b"back\\slash",
        b"co:lon,comma",
        "caf\u{e9}".as_bytes(),
        "cafe\u{301}".as_bytes(),
        b"tab\there",
    ];
    let e = env();
    let mut t = Tar::new();
    for n in names {
        t.file(n, n);
    }
    e.apply(&t.end()).unwrap();
    use std::os::unix::ffi::OsStrExt;
    for n in names {
        assert_eq!(fs::read(e.layer.join(std::ffi::OsStr::from_bytes(n))).unwrap(), n);
    }
    let d = open_dir(&e.layer);
    let mut out = Vec::new();
    lamina_archive::write_layer_diff(fd(&d), &mut out, &DiffOptions::default()).unwrap();
    let mut listed: Vec<Vec<u8>> = tar_listing(&out).into_iter().map(|e| e.0).collect();
    let mut want: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
    listed.sort();
    want.sort();
    assert_eq!(listed, want);
    let changes = lamina_archive::layer_changes(fd(&d), &[]).unwrap();
    assert_eq!(changes.len(), names.len());
}

#[test]
fn a28_ids_out_of_range() {
    for uid in [4_294_967_295u64, 1 << 33] {
        let e = env();
        let mut h = H::new(b"f", b'0');
        h.uid = uid;
        let err = e.err(&Tar::new().header(&h).end());
        assert!(err.contains("invalid archive: uid"), "{err}");
    }
    // Negative base-256 gid.
    let e = env();
    let mut t = Tar::new();
    t.header(&H::new(b"f", b'0'));
    let start = t.buf.len() - 512;
    t.buf[start + 116..start + 124].fill(0xff);
    let mut block = [0u8; 512];
    block.copy_from_slice(&t.buf[start..]);
    let mut hdr = tar::Header::from_byte_slice(&block).clone();
    hdr.set_cksum();
    t.buf.truncate(start);
    t.buf.extend_from_slice(hdr.as_bytes());
    let err = e.err(&t.end());
    assert!(err.contains("invalid archive: gid"), "{err}");
    if require_root("a28_ids_out_of_range (2^31)") {
        let e = env();
        let mut h = H::new(b"f", b'0');
        h.uid = 2_147_483_648;
        e.apply(&Tar::new().header(&h).end()).unwrap();
        assert_eq!(fs::metadata(e.p("f")).unwrap().uid(), 2_147_483_648);
    }
}

#[test]
fn a29_mtimes_are_clamped_or_refused() {
    let e = env();
    let mut t = Tar::new();
    t.pax(&[(b"mtime", b"-2208988800")]).file(b"y1900", b"");
    t.pax(&[(b"mtime", b"32503680000.5")]).file(b"y3000", b"");
    t.pax(&[(b"mtime", b"99999999999999999999999999")])
        .file(b"huge", b"");
    e.apply(&t.end()).unwrap();
    let m = |p: &str| fs::symlink_metadata(e.p(p)).unwrap().mtime();
    assert!(m("y1900") < 0);
    assert!(m("y3000") > 10_000_000_000);
    assert!(m("huge") > 10_000_000_000);
    for bad in [&b"1e400"[..], b"NaN", b"", b"12abc"] {
        let e = env();
        let mut t = Tar::new();
        t.pax(&[(b"mtime", bad)]).file(b"f", b"");
        assert!(e.err(&t.end()).contains("invalid archive: bad pax mtime"));
    }
}

/// Generates a tar of `n` entries lazily: the input is never held in memory.
struct Generated {
    n: u64,
    i: u64,
    pending: Vec<u8>,
    pos: usize,
    make: fn(u64) -> Vec<u8>,
}

impl Generated {
    /// `n` entries, the `i`th made by `make(i)`.
    fn new(n: u64, make: fn(u64) -> Vec<u8>) -> Generated {
        Generated {
            n,
            i: 0,
            pending: vec![],
            pos: 0,
            make,
        }
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.pending.len() {
            if self.i > self.n {
                return Ok(0);
            }
            self.pending = if self.i == self.n {
                vec![0; 1024]
            } else {
                (self.make)(self.i)
            };
            self.pos = 0;
            self.i += 1;
        }
        let k = buf.len().min(self.pending.len() - self.pos);
        buf[..k].copy_from_slice(&self.pending[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

fn many_links(i: u64) -> Vec<u8> {
    if i == 0 {
        Tar::new().file(b"target", b"x").take()
    } else {
        Tar::new().hardlink(format!("l{i}").as_bytes(), b"target").take()
    }
}

fn many_files(i: u64) -> Vec<u8> {
    Tar::new()
        .file(format!("d{}/f{i}", i / 10_000).as_bytes(), b"")
        .take()
}

#[test]
fn a30_too_many_hardlinks() {
    let e = env();
    let r = e.apply_with(Generated::new(70_000, many_links), &ApplyOptions::default());
    match r {
        Err(ArchiveError::LimitExceeded(m)) => assert!(m.contains("too many hard links"), "{m}"),
        // Filesystems without a per-inode link limit (tmpfs, xfs) take them all.
        Ok(s) => assert_eq!(s.entries, 70_000),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a31_many_files_streamed() {
    let e = env();
    let s = e
        .apply_with(Generated::new(20_000, many_files), &ApplyOptions::default())
        .unwrap();
    assert_eq!(s.entries, 20_000);
}

#[test]
#[ignore = "1,000,000 files take about two minutes (debug build, max RSS 4.6 MB); run with --ignored"]
fn a31_million_files_streamed() {
    let e = env();
    let s = e
        .apply_with(Generated::new(1_000_000, many_files), &ApplyOptions::default())
        .unwrap();
    assert_eq!(s.entries, 1_000_000);
}

#[test]
fn a32_aufs_private_names_are_left_out() {
    if !require_root("a32_aufs_private_names_are_left_out") {
        return;
    }
    let e = env();
    let mut t = Tar::new();
    t.file(b".wh..wh.aufs", b"")
        .dir(b".wh..wh.orph/")
        .file(b".wh..wh.orph/gone", b"o")
        .dir(b"./.wh..wh.plnk/")
        .file_mode(b".wh..wh.plnk/1234.56", b"shared", 0o640)
        .dir(b"bin/")
        .hardlink(b"bin/a", b".wh..wh.plnk/1234.56")
        .hardlink(b"bin/b", b"/.wh..wh.plnk/1234.56")
        .file(b"etc/f", b"f")
        .file(b".wh..wh.plnk/later", b"l");
    e.apply(&t.end()).unwrap();
    let mut root: Vec<String> = fs::read_dir(&e.layer)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(root, ["bin", "etc"], "aufs names left in the layer root");
    let (a, b) = (
        fs::symlink_metadata(e.p("bin/a")).unwrap(),
        fs::symlink_metadata(e.p("bin/b")).unwrap(),
    );
    assert_eq!(fs::read(e.p("bin/a")).unwrap(), b"shared");
    assert_eq!(a.mode() & 0o7777, 0o640, "the pseudo-link's own metadata");
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "both links share the kept inode"
    );
    assert_eq!(fs::read(e.p("etc/f")).unwrap(), b"f");
    // a re-diff of the layer carries none of them
    let d = open_dir(&e.layer);
    let mut out = Vec::new();
    lamina_archive::write_layer_diff(fd(&d), &mut out, &DiffOptions::default()).unwrap();
    let names: Vec<String> = tar_listing(&out)
        .iter()
        .map(|l| String::from_utf8_lossy(&l.0).into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".wh.")), "{names:?}");

    // a hardlink into .wh..wh.plnk without its file is refused
    let e = env();
    let mut t = Tar::new();
    t.file(b".wh..wh.plnk/1", b"x").hardlink(b"a", b".wh..wh.plnk/2");
    let err = e.err(&t.end());
    assert!(
        err.contains("invalid archive: bad hardlink: a -> .wh..wh.plnk/2"),
        "{err}"
    );

    // the opaque marker of the root is not an aufs private name
    let e = env();
    e.apply(&Tar::new().file(b".wh..wh..opq", b"").file(b"x", b"1").end())
        .unwrap();
    let d = open_dir(&e.layer);
    assert!(lamina_sys::fs::is_opaque(fd(&d)).unwrap());
}

#[test]
fn a33_opaque_marker_that_is_not_a_file() {
    let cases: [(Vec<u8>, &str); 4] = [
        (
            Tar::new().dir(b"d/").dir(b"d/.wh..wh..opq/").end(),
            "invalid archive: opaque marker d/.wh..wh..opq/ is not a regular file",
        ),
        (
            Tar::new().file(b"d/.wh..wh..opq/x", b"1").end(),
            "invalid archive: opaque marker used as a directory: d/.wh..wh..opq/x",
        ),
        (
            Tar::new().symlink(b"d/.wh..wh..opq", b"/etc").end(),
            "not a regular file",
        ),
        (Tar::new().dir(b".wh..wh..opq").end(), "not a regular file"),
    ];
    for (tar, want) in cases {
        let e = env();
        let err = e.err(&tar);
        assert!(err.contains(want), "{err}");
        assert!(!e.p("d/.wh..wh..opq").exists());
    }
}

/// A filesystem that fills up while small files are finished on the second thread: the apply fails with the
/// disk's error, naming a file, and returns only once nothing writes into the layer any more.
#[test]
fn a34_full_filesystem_fails_the_apply() {
    if !require_root("a34_full_filesystem_fails_the_apply") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting a tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    // The first files fit; the disk fills up past them, where files are finished on the second thread.
    let data = vec![7u8; 8192];
    let mut tar = Tar::new();
    for i in 0..200 {
        tar.file(format!("f{i}").as_bytes(), &data);
    }
    let r = apply_layer(fd(&open_dir(&mnt)), &tar.end()[..], &ApplyOptions::default());
    match r {
        Err(ArchiveError::Io { context, source }) => {
            assert_eq!(source.raw_os_error(), Some(28), "{context}: {source}");
            assert!(context.contains("/f"), "{context}");
        }
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    // Nothing is still being written once the apply returned: the usage stays where it is.
    let used = || lamina_archive::dir_size(fd(&open_dir(&mnt))).unwrap();
    let before = used();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(used(), before);
}
