//! Change lists and the naive tree diff.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use common::*;
use lamina_archive::{
    apply_layer, layer_changes, tree_changes, write_tree_diff, ApplyOptions, Change, ChangeKind, DiffOptions,
};
use lamina_testkit::write_files;

fn show(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| {
            let k = match c.kind {
                ChangeKind::Modify => "C",
                ChangeKind::Add => "A",
                ChangeKind::Delete => "D",
            };
            format!("{k} {}", String::from_utf8_lossy(&c.path))
        })
        .collect()
}

fn set_mtime(p: &Path, sec: i64) {
    let parent = fs::File::open(p.parent().unwrap()).unwrap();
    let name = p.file_name().unwrap();
    use std::os::unix::ffi::OsStrExt;
    lamina_sys::fs::set_times_at(fd(&parent), name.as_bytes(), sec, 0).unwrap();
}

#[test]
fn overlay_changes_follow_docker() {
    let Some(t) = root_tempdir("overlay_changes_follow_docker") else {
        return;
    };
    let (lower2, lower1, upper) = (t.path().join("l2"), t.path().join("l1"), t.path().join("u"));
    for d in [&lower2, &lower1, &upper] {
        fs::create_dir(d).unwrap();
    }
    // Bottom lower: etc/{passwd,hosts}, var/cache/x, opt/a, home/
    write_files(
        &lower2,
        &[
            ("etc/passwd", "p"),
            ("etc/hosts", "h"),
            ("var/cache/x", "x"),
            ("opt/a", "a"),
        ],
    );
    // Top lower: deletes etc/hosts (whiteout), makes var/cache opaque and empty.
    whiteout(&lower1.join("etc"), "hosts");
    fs::create_dir_all(lower1.join("var/cache")).unwrap();
    let cache1 = fs::File::open(lower1.join("var/cache")).unwrap();
    lamina_sys::fs::set_opaque(fd(&cache1)).unwrap();

    // Upper: modifies etc/passwd, re-adds etc/hosts (hidden below: an Add), adds
    // var/cache/x (hidden by the opaque lower: an Add), deletes opt/a, adds new/f,
    // copies up opt with the same metadata (not recorded by itself).
    write_files(
        &upper,
        &[
            ("etc/passwd", "p2"),
            ("etc/hosts", "h2"),
            ("var/cache/x", "x2"),
            ("new/f", "f"),
        ],
    );
    whiteout(&upper.join("opt"), "a");
    fs::create_dir(upper.join("same")).unwrap();
    fs::create_dir(lower2.join("same")).unwrap();
    for d in ["etc", "var", "var/cache", "opt", "same"] {
        set_mtime(&lower2.join(d), 1000);
        set_mtime(&upper.join(d), 1000);
        if lower1.join(d).exists() {
            set_mtime(&lower1.join(d), 1000);
        }
    }
    let (u, l1, l2) = (open_dir(&upper), open_dir(&lower1), open_dir(&lower2));
    let got = show(&layer_changes(fd(&u), &[fd(&l1), fd(&l2)]).unwrap());
    assert_eq!(
        got,
        [
            "C /etc",
            "A /etc/hosts",
            "C /etc/passwd",
            "A /new",
            "A /new/f",
            "C /opt",
            "D /opt/a",
            "C /var",
            "C /var/cache",
            "A /var/cache/x",
        ]
    );
}

#[test]
fn overlay_changes_list_every_directory_holding_a_change() {
    let Some(t) = root_tempdir("overlay_changes_list_every_directory_holding_a_change") else {
        return;
    };
    let (lower, upper) = (t.path().join("l"), t.path().join("u"));
    // Below: d/{h1,h2}, a/b/c/f, a/b/g, a/z, k/l/m/n
    for f in ["d/h1", "d/h2", "a/b/c/f", "a/b/g", "a/z", "k/l/m/n"] {
        let p = lower.join(f);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, "1").unwrap();
    }
    // Upper, as copy-ups leave it: directories with the metadata of the ones below, then
    // d/h2 appended to, a/b/c/f rewritten, k/l/m/n deleted, a/b/new added.
    for d in ["d", "a", "a/b", "a/b/c", "k", "k/l", "k/l/m"] {
        fs::create_dir_all(upper.join(d)).unwrap();
    }
    fs::write(upper.join("d/h2"), "1y").unwrap();
    fs::write(upper.join("a/b/c/f"), "2").unwrap();
    fs::write(upper.join("a/b/new"), "n").unwrap();
    whiteout(&upper.join("k/l/m"), "n");
    for d in ["d", "a", "a/b", "a/b/c", "k", "k/l", "k/l/m"] {
        set_mtime(&lower.join(d), 1000);
        set_mtime(&upper.join(d), 1000);
    }
    let (u, l) = (open_dir(&upper), open_dir(&lower));
    let got = show(&layer_changes(fd(&u), &[fd(&l)]).unwrap());
    assert_eq!(
        got,
        [
            "C /a",
            "C /a/b",
            "C /a/b/c",
            "C /a/b/c/f",
            "A /a/b/new",
            "C /d",
            "C /d/h2",
            "C /k",
            "C /k/l",
            "C /k/l/m",
            "D /k/l/m/n",
        ]
    );
}

#[test]
fn tree_changes_and_diff() {
    let t = tempfile::tempdir().unwrap();
    let (old, new) = (t.path().join("old"), t.path().join("new"));
    fs::create_dir_all(old.join("a/b")).unwrap();
    fs::write(old.join("a/b/f"), "1").unwrap();
    fs::write(old.join("a/keep"), "k").unwrap();
    fs::create_dir_all(old.join("gone/deep")).unwrap();
    fs::write(old.join("gone/deep/x"), "x").unwrap();
    fs::write(old.join("top"), "t").unwrap();
    fs::create_dir_all(new.join("a/b")).unwrap();
    fs::write(new.join("a/b/f"), "22").unwrap();
    fs::write(new.join("a/keep"), "k").unwrap();
    fs::write(new.join("top"), "t").unwrap();
    fs::write(new.join("added"), "n").unwrap();
    symlink("/etc/passwd", new.join("link")).unwrap();
    for p in ["a/keep", "top"] {
        set_mtime(&old.join(p), 5000);
        set_mtime(&new.join(p), 5000);
    }
    let (o, n) = (open_dir(&old), open_dir(&new));
    let got = show(&tree_changes(fd(&n), Some(fd(&o))).unwrap());
    assert_eq!(
        got,
        ["C /a", "C /a/b", "C /a/b/f", "A /added", "D /gone", "A /link"]
    );

    let all = show(&tree_changes(fd(&n), None).unwrap());
    assert_eq!(all.len(), 7);
    assert!(all.iter().all(|c| c.starts_with("A ")));

    let mut out = Vec::new();
    write_tree_diff(fd(&n), Some(fd(&o)), &mut out, &DiffOptions::default()).unwrap();
    let names: Vec<String> = tar_listing(&out)
        .iter()
        .map(|e| String::from_utf8_lossy(&e.0).into_owned())
        .collect();
    assert_eq!(names, ["a/", "a/b/", "a/b/f", "added", ".wh.gone", "link"]);

    // Applying the diff onto a copy of old reproduces new (modulo dir mtimes).
    let copy = t.path().join("copy");
    fs::create_dir(&copy).unwrap();
    let mut base = Vec::new();
    write_tree_diff(fd(&o), None, &mut base, &DiffOptions::default()).unwrap();
    let c = open_dir(&copy);
    apply_layer(fd(&c), &base[..], &ApplyOptions::default()).unwrap();
    apply_layer(fd(&c), &out[..], &ApplyOptions::default()).unwrap();
    // The whiteout of `gone` is now a 0/0 device in a plain dir: remove it for the
    // comparison, as a merged view would not show it.
    fs::remove_file(copy.join("gone")).ok();
    let strip = |s: Snapshot| {
        s.into_iter()
            .map(|(k, v)| (k, v.replace(" uid=0 gid=0", "")))
            .collect::<Snapshot>()
    };
    assert_eq!(strip(snapshot(&copy, false)), strip(snapshot(&new, false)));
}

#[test]
fn deep_trees_work_everywhere() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = two_dirs(t.path(), "a", "b");
    let mut tar = Tar::new();
    let mut p = String::new();
    for _ in 0..1000 {
        p.push_str("d/");
    }
    p.push('f');
    tar.pax(&[(b"path", p.as_bytes())]).file(b"x", b"bottom");
    let ad = open_dir(&a);
    apply_layer(fd(&ad), &tar.end()[..], &ApplyOptions::default()).unwrap();
    let mut out = Vec::new();
    lamina_archive::write_layer_diff(fd(&ad), &mut out, &DiffOptions::default()).unwrap();
    assert_eq!(tar_listing(&out).len(), 1001);
    let bd = open_dir(&b);
    apply_layer(fd(&bd), &out[..], &ApplyOptions::default()).unwrap();
    assert_eq!(layer_changes(fd(&ad), &[]).unwrap().len(), 1001);
    assert!(tree_changes(fd(&ad), Some(fd(&bd))).unwrap().is_empty());
    assert_eq!(lamina_archive::dir_size(fd(&ad)).unwrap(), 6);
    lamina_sys::fs::remove_all(fd(&ad), b"d").unwrap();
}
