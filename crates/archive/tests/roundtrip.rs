//! Apply, diff and re-apply of hand-built layers.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;
use lamina_archive::{apply_layer, dir_size, write_layer_diff, ApplyOptions, DiffOptions, IdMap, IdMappings};
use lamina_testkit::require_root;

fn apply(
    dir: &std::path::Path,
    tar: &[u8],
) -> Result<lamina_archive::ApplyStats, lamina_archive::ArchiveError> {
    let d = open_dir(dir);
    apply_layer(fd(&d), tar, &ApplyOptions::default())
}

fn diff(dir: &std::path::Path) -> Vec<u8> {
    let d = open_dir(dir);
    let mut out = Vec::new();
    write_layer_diff(fd(&d), &mut out, &DiffOptions::default()).unwrap();
    out
}

fn sample_layer() -> Vec<u8> {
    let mut t = Tar::new();
    t.dir(b"etc/").file_mode(b"etc/passwd", b"root:x:0:0\n", 0o644);
    t.file_mode(b"usr/bin/ping", b"\x7fELF", 0o4755);
    t.symlink(b"lib", b"usr/lib");
    t.hardlink(b"usr/bin/ping2", b"usr/bin/ping");
    t.pax(&[
        (b"SCHILY.xattr.user.note", b"a\nb\x00c"),
        (b"SCHILY.xattr.trusted.overlay.opaque", b"y"),
    ]);
    t.file(b"etc/with-xattr", b"x");
    let mut dev = H::new(b"dev/null", b'3');
    dev.major = 1;
    dev.minor = 3;
    dev.mode = 0o666;
    t.header(&dev);
    t.header(&H::new(b"run/fifo", b'6'));
    t.file(b"old/.wh.gone", b"");
    t.dir(b"opq/")
        .file(b"opq/.wh..wh..opq", b"")
        .file(b"opq/kept", b"k");
    t.end()
}

#[test]
fn apply_sample_then_roundtrip() {
    let Some(t) = root_tempdir("apply_sample_then_roundtrip") else {
        return;
    };
    let (a, b) = two_dirs(t.path(), "a", "b");
    let tar = sample_layer();
    let stats = apply(&a, &tar).unwrap();
    assert_eq!(stats.tar_bytes, tar.len() as u64);
    assert!(stats.digest.starts_with("sha256:"));
    assert_eq!(stats.size, 11 + 4 + 1 + 1);

    assert_eq!(fs::read(a.join("etc/passwd")).unwrap(), b"root:x:0:0\n");
    let ping = fs::metadata(a.join("usr/bin/ping")).unwrap();
    assert_eq!(ping.mode() & 0o7777, 0o4755);
    assert_eq!(ping.nlink(), 2);
    assert_eq!(fs::read_link(a.join("lib")).unwrap().to_str(), Some("usr/lib"));
    let wh = fs::symlink_metadata(a.join("old/gone")).unwrap();
    assert_eq!(wh.rdev(), 0);
    let dirf = fs::File::open(a.join("opq")).unwrap();
    assert!(lamina_sys::fs::is_opaque(fd(&dirf)).unwrap());
    let f = fs::File::open(a.join("etc/with-xattr")).unwrap();
    assert_eq!(
        lamina_sys::fs::get_xattr_fd(fd(&f), b"user.note")
            .unwrap()
            .unwrap(),
        b"a\nb\x00c"
    );
    assert!(lamina_sys::fs::get_xattr_fd(fd(&f), b"trusted.overlay.opaque")
        .unwrap()
        .is_none());

    let out = diff(&a);
    let names: Vec<String> = tar_listing(&out)
        .iter()
        .map(|e| String::from_utf8_lossy(&e.0).into_owned())
        .collect();
    assert!(names.contains(&"old/.wh.gone".to_string()), "{names:?}");
    assert!(names.contains(&"opq/.wh..wh..opq".to_string()), "{names:?}");
    let opq = names.iter().position(|n| n == "opq/").unwrap();
    assert_eq!(names[opq + 1], "opq/.wh..wh..opq");

    let stats_b = apply(&b, &out).unwrap();
    assert_eq!(stats_b.size, stats.size);
    assert_eq!(snapshot(&a, true), snapshot(&b, true));
    assert_eq!(diff(&b), out, "a second diff is byte-identical");
}

#[test]
fn last_entry_wins() {
    let t = tempfile::tempdir().unwrap();
    let mut tar = Tar::new();
    tar.file(b"f", b"one").hardlink(b"h", b"f").file(b"f", b"two");
    tar.dir(b"x/")
        .file(b"x/child", b"c")
        .file(b"x", b"now a file")
        .dir(b"x/");
    let stats = apply(t.path(), &tar.end()).unwrap();
    // "one" (still linked as h) and "two"; the replaced "now a file" is gone.
    assert_eq!(stats.size, 6);
    assert_eq!(stats.size, dir_size(fd(&open_dir(t.path()))).unwrap());
    assert_eq!(fs::read(t.path().join("f")).unwrap(), b"two");
    assert_eq!(fs::read(t.path().join("h")).unwrap(), b"one");
    assert!(fs::metadata(t.path().join("x")).unwrap().is_dir());
    assert_eq!(fs::read_dir(t.path().join("x")).unwrap().count(), 0);
}

/// Past its first files, a layer's small regular files are finished (data, owner, mode, times) on a second
/// thread while the stream is read on: the result is the same as if one thread did everything, also where
/// later entries link to, replace or remove a file whose data may not be written yet.
#[test]
fn many_small_files_are_finished_beside_the_stream() {
    let Some(t) = root_tempdir("many_small_files_are_finished_beside_the_stream") else {
        return;
    };
    let (a, b) = two_dirs(t.path(), "a", "b");
    let mut tar = Tar::new();
    tar.dir(b"d/");
    let body = |i: usize| -> Vec<u8> { (0..(i * 37) % 5000).map(|k| (k * 7 + i) as u8).collect() };
    for i in 0..300 {
        let name = format!("d/f{i}");
        let mut h = H::new(name.as_bytes(), b'0');
        let data = body(i);
        h.size = data.len() as u64;
        h.mode = [0o644, 0o4755, 0o2711, 0o600][i % 4];
        h.uid = (i % 3) as u64 * 1000;
        h.gid = (i % 5) as u64 * 100;
        h.mtime = 1_500_000_000 + i as u64;
        tar.header(&h).data(&data);
    }
    // A file larger than what is handed over, written on the stream's thread, between handed-over ones.
    let big: Vec<u8> = (0..300_000u32).map(|k| (k % 251) as u8).collect();
    tar.file(b"d/big", &big);
    // Links to, replacements and removals of files that may still be queued.
    tar.file(b"late", b"one")
        .hardlink(b"late-link", b"late")
        .file(b"late", b"two");
    tar.hardlink(b"d/f7-link", b"d/f7");
    tar.file(b"d/f11", b"replaced");
    tar.file(b"d/.wh.f13", b"");
    tar.dir(b"d/f17/").file(b"d/f17/inside", b"now a directory");
    let tar = tar.end();

    let stats = apply(&a, &tar).unwrap();
    assert_eq!(stats.size, dir_size(fd(&open_dir(&a))).unwrap());
    for i in 0..300 {
        let p = a.join(format!("d/f{i}"));
        match i {
            11 => assert_eq!(fs::read(&p).unwrap(), b"replaced"),
            13 => assert_eq!(fs::symlink_metadata(&p).unwrap().rdev(), 0, "a whiteout"),
            17 => assert_eq!(fs::read(p.join("inside")).unwrap(), b"now a directory"),
            _ => {
                let m = fs::metadata(&p).unwrap();
                assert_eq!(fs::read(&p).unwrap(), body(i), "content of f{i}");
                assert_eq!(
                    m.mode() & 0o7777,
                    [0o644, 0o4755, 0o2711, 0o600][i % 4],
                    "mode of f{i}"
                );
                assert_eq!(
                    (m.uid(), m.gid()),
                    ((i % 3) as u32 * 1000, (i % 5) as u32 * 100),
                    "owner of f{i}"
                );
                assert_eq!(m.mtime(), 1_500_000_000 + i as i64, "mtime of f{i}");
            }
        }
    }
    assert_eq!(fs::read(a.join("d/big")).unwrap(), big);
    assert_eq!(fs::read(a.join("late")).unwrap(), b"two");
    assert_eq!(fs::read(a.join("late-link")).unwrap(), b"one");
    assert_eq!(
        fs::metadata(a.join("d/f7-link")).unwrap().ino(),
        fs::metadata(a.join("d/f7")).unwrap().ino()
    );

    // The diff of the result applies to the same tree again.
    let out = diff(&a);
    apply(&b, &out).unwrap();
    assert_eq!(snapshot(&a, true), snapshot(&b, true));
}

#[test]
fn long_names_roundtrip() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = two_dirs(t.path(), "a", "b");
    let long_path = format!("{}/{}", "d".repeat(150), "f".repeat(150));
    let gnu_path = format!("{}/{}", "g".repeat(120), "h".repeat(120));
    let long_target = "t".repeat(200);
    let mut tar = Tar::new();
    tar.pax(&[(b"path", long_path.as_bytes())])
        .file(b"placeholder", b"pax");
    tar.gnu_long(b'L', gnu_path.as_bytes())
        .file(b"placeholder2", b"gnu");
    tar.gnu_long(b'K', long_target.as_bytes())
        .symlink(b"k", b"ignored");
    tar.pax(&[(b"linkpath", long_target.as_bytes())])
        .symlink(b"p", b"ignored");
    tar.pax(&[(b"path", b"new\nline")]).file(b"x", b"nl");
    apply(&a, &tar.end()).unwrap();
    assert_eq!(fs::read(a.join(&long_path)).unwrap(), b"pax");
    assert_eq!(fs::read(a.join(&gnu_path)).unwrap(), b"gnu");
    assert_eq!(fs::read_link(a.join("k")).unwrap().to_str().unwrap(), long_target);
    assert_eq!(fs::read_link(a.join("p")).unwrap().to_str().unwrap(), long_target);
    assert_eq!(fs::read(a.join("new\nline")).unwrap(), b"nl");
    let out = diff(&a);
    apply(&b, &out).unwrap();
    assert_eq!(snapshot(&a, true), snapshot(&b, true));
}

#[test]
fn id_mappings_both_ways() {
    let Some(t) = root_tempdir("id_mappings_both_ways") else {
        return;
    };
    let maps = IdMappings {
        uids: vec![IdMap {
            container_id: 0,
            host_id: 100_000,
            size: 65536,
        }],
        gids: vec![IdMap {
            container_id: 0,
            host_id: 200_000,
            size: 65536,
        }],
    };
    let mut h = H::new(b"f", b'0');
    h.uid = 5;
    h.gid = 6;
    let mut tar = Tar::new();
    tar.header(&h);
    let d = open_dir(t.path());
    apply_layer(
        fd(&d),
        &tar.end()[..],
        &ApplyOptions {
            id_mappings: maps.clone(),
            ..ApplyOptions::default()
        },
    )
    .unwrap();
    let md = fs::metadata(t.path().join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (100_005, 200_006));
    let mut out = Vec::new();
    write_layer_diff(
        fd(&d),
        &mut out,
        &DiffOptions {
            id_mappings: maps.clone(),
        },
    )
    .unwrap();
    let mut a = tar::Archive::new(&out[..]);
    let e = a.entries().unwrap().next().unwrap().unwrap();
    assert_eq!((e.header().uid().unwrap(), e.header().gid().unwrap()), (5, 6));

    // Outside the map: refused.
    let mut h = H::new(b"g", b'0');
    h.uid = 70_000;
    let mut tar = Tar::new();
    tar.header(&h);
    let err = apply_layer(
        fd(&d),
        &tar.end()[..],
        &ApplyOptions {
            id_mappings: maps,
            ..ApplyOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("outside the id mapping"), "{err}");
}

#[test]
fn sparse_files_have_holes() {
    let t = tempfile::tempdir().unwrap();
    let real: u64 = 1 << 30;
    // PAX 1.0: map in the data.
    let mut map = b"2\n0\n4096\n".to_vec();
    map.extend_from_slice(format!("{}\n4096\n", real - 4096).as_bytes());
    map.resize(512, 0);
    let mut data = map.clone();
    data.extend(std::iter::repeat_n(b'a', 4096));
    data.extend(std::iter::repeat_n(b'z', 4096));
    let mut tar = Tar::new();
    tar.pax(&[
        (b"GNU.sparse.major", b"1"),
        (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"sparse"),
        (b"GNU.sparse.realsize", real.to_string().as_bytes()),
    ]);
    tar.file(b"GNUSparseFile.0/sparse", &data);
    // Old GNU 'S': header map.
    let mut hdr = tar::Header::new_gnu();
    {
        let g = hdr.as_gnu_mut().unwrap();
        g.name[..3].copy_from_slice(b"old");
        g.sparse[0].set_offset(0);
        g.sparse[0].set_length(512);
        g.sparse[1].set_offset(1 << 20);
        g.sparse[1].set_length(512);
        g.set_real_size((1 << 20) + 4096);
    }
    hdr.set_mode(0o644);
    hdr.set_size(1024);
    hdr.set_mtime(1);
    hdr.set_entry_type(tar::EntryType::GNUSparse);
    hdr.set_cksum();
    tar.buf.extend_from_slice(hdr.as_bytes());
    let mut sdata = vec![b'1'; 512];
    sdata.extend(vec![b'2'; 512]);
    tar.data(&sdata);
    apply(t.path(), &tar.end()).unwrap();

    let md = fs::metadata(t.path().join("sparse")).unwrap();
    assert_eq!(md.len(), real);
    assert!(md.blocks() * 512 < 1 << 20, "holes kept: {} blocks", md.blocks());
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(t.path().join("sparse")).unwrap();
    let mut buf = [0u8; 4];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"aaaa");
    f.seek(SeekFrom::Start(real - 4)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"zzzz");
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0; 4]);

    let old = fs::read(t.path().join("old")).unwrap();
    assert_eq!(old.len(), (1 << 20) + 4096);
    assert!(old[..512].iter().all(|&b| b == b'1'));
    assert!(old[512..1 << 20].iter().all(|&b| b == 0));
    assert!(old[1 << 20..(1 << 20) + 512].iter().all(|&b| b == b'2'));
    let d = open_dir(t.path());
    assert_eq!(dir_size(fd(&d)).unwrap(), real + (1 << 20) + 4096);
}

#[test]
fn empty_inputs() {
    let t = tempfile::tempdir().unwrap();
    let s = apply(t.path(), b"").unwrap();
    assert_eq!((s.size, s.entries, s.tar_bytes), (0, 0, 0));
    assert_eq!(
        s.digest,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let s = apply(t.path(), &[0u8; 1024]).unwrap();
    assert_eq!((s.size, s.entries, s.tar_bytes), (0, 0, 1024));
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
    // Trailing bytes after the end marker are read and hashed too.
    let mut tar = Tar::new();
    tar.file(b"a", b"1");
    let mut data = tar.end();
    data.extend_from_slice(&[0u8; 10_000]);
    let s = apply(t.path(), &data).unwrap();
    assert_eq!(s.tar_bytes, data.len() as u64);
}

#[test]
fn gnu_tar_extracts_our_diff_identically() {
    if !require_root("gnu_tar_extracts_our_diff_identically") {
        return;
    }
    if std::process::Command::new("tar")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("!!!! SKIPPED (no GNU tar): gnu_tar_extracts_our_diff_identically");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, b) = two_dirs(t.path(), "a", "b");
    let long_path = format!("{}/{}", "d".repeat(150), "f".repeat(150));
    let mut tar = Tar::new();
    tar.dir(b"etc/").file_mode(b"etc/passwd", b"root\n", 0o640);
    tar.pax(&[(b"path", long_path.as_bytes())]).file(b"x", b"long");
    tar.pax(&[(b"linkpath", "t".repeat(200).as_bytes())])
        .symlink(b"s", b"x");
    tar.hardlink(b"etc/hard", b"etc/passwd");
    tar.pax(&[(b"SCHILY.xattr.user.k", b"v1")]).file(b"xa", b"x");
    let mut dev = H::new(b"null", b'3');
    (dev.major, dev.minor) = (1, 3);
    tar.header(&dev);
    tar.pax(&[(b"mtime", b"-86400")]).file(b"old", b"");
    apply(&a, &tar.end()).unwrap();
    let out = diff(&a);
    let mut child = std::process::Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            "-",
            "-C",
        ])
        .arg(&b)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&out).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(snapshot(&a, true), snapshot(&b, true));
}

#[test]
fn whiteouts_as_deletions_in_a_full_tree() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    fs::create_dir_all(root.join("old/sub")).unwrap();
    fs::write(root.join("old/gone"), "g").unwrap();
    fs::write(root.join("old/sub/deep"), "d").unwrap();
    fs::write(root.join("old/stays"), "s").unwrap();
    fs::create_dir_all(root.join("opq/x")).unwrap();
    fs::write(root.join("opq/before"), "b").unwrap();
    let mut tar = Tar::new();
    tar.file(b"old/.wh.gone", b"").file(b"old/.wh.sub", b"");
    // Written before the marker in the same stream: kept; what was there before: gone.
    tar.dir(b"opq/")
        .file(b"opq/new", b"n")
        .file(b"opq/.wh..wh..opq", b"");
    let d = open_dir(root);
    let opts = ApplyOptions {
        whiteouts: lamina_archive::Whiteouts::Delete,
        ..ApplyOptions::default()
    };
    apply_layer(fd(&d), &tar.end()[..], &opts).unwrap();
    let names = |p: &str| {
        let mut v: Vec<String> = fs::read_dir(root.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("old"), ["stays"]);
    assert_eq!(names("opq"), ["new"]);
    assert_eq!(fs::read_to_string(root.join("opq/new")).unwrap(), "n");
}
