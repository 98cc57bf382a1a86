//! Property tests: random trees survive diff -> apply -> diff, and `layer_changes`
//! agrees with a plain recursive reference walk.

mod common;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use lamina_archive::{apply_layer, layer_changes, write_layer_diff, ApplyOptions, ChangeKind, DiffOptions};
use proptest::prelude::*;

const NAMES: &[&[u8]] = &[b"a", b"b", b"c", b"d.e", b"\xffx", b"sp ace", b"n\nl", b".wh"];

#[derive(Debug, Clone)]
enum Node {
    File {
        data: Vec<u8>,
        mode: u32,
        xattr: Option<Vec<u8>>,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: &'static str,
    },
    /// Hard link to the n-th regular file created so far (if any).
    Hardlink {
        nth: usize,
    },
    /// Whiteout (needs root).
    Whiteout,
    /// Opaque directory (needs root).
    Opaque,
}

#[derive(Debug, Clone)]
struct Item {
    path: Vec<&'static [u8]>,
    node: Node,
    mtime: i64,
}

fn node(special: bool) -> impl Strategy<Value = Node> {
    let file = (
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::sample::select(vec![0o644u32, 0o755, 0o600, 0o4755, 0o2750, 0o444]),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
    )
        .prop_map(|(data, mode, xattr)| Node::File { data, mode, xattr });
    let dir = prop::sample::select(vec![0o755u32, 0o700, 0o1777, 0o750]).prop_map(|mode| Node::Dir { mode });
    let link = prop::sample::select(vec!["a", "/etc/passwd", "../../x", "b/c", "n\nl"])
        .prop_map(|target| Node::Symlink { target });
    let hard = (0usize..4).prop_map(|nth| Node::Hardlink { nth });
    if special {
        prop_oneof![4 => file, 3 => dir, 1 => link, 1 => hard, 1 => Just(Node::Whiteout), 1 => Just(Node::Opaque)]
            .boxed()
    } else {
        prop_oneof![4 => file, 3 => dir, 1 => link, 1 => hard].boxed()
    }
}

fn items(special: bool) -> impl Strategy<Value = Vec<Item>> {
    prop::collection::vec(
        (
            prop::collection::vec(prop::sample::select(NAMES.to_vec()), 1..4),
            node(special),
            prop::sample::select(vec![1_000_000i64, 1_500_000_000, 2_000_000_000]),
        )
            .prop_map(|(path, node, mtime)| Item { path, node, mtime }),
        0..24,
    )
}

fn join(root: &Path, comps: &[&[u8]]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    p
}

fn set_mtime(p: &Path, sec: i64) {
    let parent = fs::File::open(p.parent().unwrap()).unwrap();
    lamina_sys::fs::set_times_at(fd(&parent), p.file_name().unwrap().as_bytes(), sec, 0).unwrap();
}

/// Creates the items that fit (parents must be directories, names unused).
fn materialize(root: &Path, items: &[Item]) {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut dirs: Vec<(PathBuf, i64)> = Vec::new();
    for it in items {
        let p = join(root, &it.path);
        if fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        let parent_ok = (1..it.path.len()).all(|i| {
            let q = join(root, &it.path[..i]);
            match fs::symlink_metadata(&q) {
                Ok(m) => m.is_dir(),
                Err(_) => {
                    fs::create_dir(&q).unwrap();
                    true
                }
            }
        });
        if !parent_ok {
            continue;
        }
        let parent = fs::File::open(p.parent().unwrap()).unwrap();
        let name = p.file_name().unwrap().as_bytes();
        match &it.node {
            Node::File { data, mode, xattr } => {
                fs::write(&p, data).unwrap();
                if let Some(v) = xattr {
                    lamina_sys::fs::set_xattr_at(fd(&parent), name, b"user.prop", v).unwrap();
                }
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                files.push(p.clone());
            }
            Node::Dir { mode } => {
                fs::create_dir(&p).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                dirs.push((p.clone(), it.mtime));
                continue;
            }
            Node::Symlink { target } => symlink(target, &p).unwrap(),
            Node::Hardlink { nth } => match files.get(*nth) {
                Some(f) => fs::hard_link(f, &p).unwrap(),
                None => continue,
            },
            Node::Whiteout => lamina_sys::fs::make_whiteout(fd(&parent), name).unwrap(),
            Node::Opaque => {
                fs::create_dir(&p).unwrap();
                let d = fs::File::open(&p).unwrap();
                lamina_sys::fs::set_opaque(fd(&d)).unwrap();
                dirs.push((p.clone(), it.mtime));
                continue;
            }
        }
        set_mtime(&p, it.mtime);
    }
    // Directory times last, deepest first, so that creating children does not move them.
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.as_os_str().len()));
    for (p, t) in dirs {
        set_mtime(&p, t);
    }
}

fn diff_of(dir: &Path) -> Vec<u8> {
    let d = open_dir(dir);
    let mut out = Vec::new();
    write_layer_diff(fd(&d), &mut out, &DiffOptions::default()).unwrap();
    out
}

/// Docker's change rules (overlay walk, every directory holding a change listed as on
/// vfs), written plainly with recursion and paths, for one lower without whiteouts, opaque
/// dirs or symlinks.
fn reference_changes(upper: &Path, lower: &Path) -> Vec<String> {
    fn walk(
        upper: &Path,
        lower: &Path,
        rel: &Path,
        out: &mut Vec<(Vec<u8>, char)>,
        changed: &mut HashSet<Vec<u8>>,
    ) {
        let mut names: Vec<_> = fs::read_dir(upper.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let r = rel.join(&n);
            let abs = [b"/".as_slice(), r.as_os_str().as_bytes()].concat();
            let md = fs::symlink_metadata(upper.join(&r)).unwrap();
            let opaque = md.is_dir() && {
                let d = fs::File::open(upper.join(&r)).unwrap();
                lamina_sys::fs::is_opaque(fd(&d)).unwrap()
            };
            let whiteout = md.file_type().is_char_device_zero();
            let mut record = true;
            let kind = if whiteout || opaque {
                'D'
            } else {
                match fs::symlink_metadata(lower.join(&r)) {
                    Ok(l) => {
                        if l.is_dir()
                            && md.is_dir()
                            && l.size() == md.size()
                            && l.mode() == md.mode()
                            && l.mtime() == md.mtime()
                            && (l.mtime_nsec() == md.mtime_nsec()
                                || l.mtime_nsec() == 0
                                || md.mtime_nsec() == 0)
                        {
                            record = false;
                        }
                        'C'
                    }
                    Err(_) => 'A',
                }
            };
            if record {
                if md.is_dir() {
                    changed.insert(abs.clone());
                }
                // every directory holding a change, the root excepted
                for dir in Path::new(OsStr::from_bytes(&abs)).ancestors().skip(1) {
                    let dir = dir.as_os_str().as_bytes().to_vec();
                    if dir != b"/" && changed.insert(dir.clone()) {
                        out.push((dir, 'C'));
                    }
                }
                out.push((abs, kind));
            }
            if md.is_dir() {
                walk(upper, lower, &r, out, changed);
            }
        }
    }
    let mut out = Vec::new();
    walk(upper, lower, Path::new(""), &mut out, &mut HashSet::new());
    out.sort_by(|a, b| {
        let ka: Vec<u8> = a.0.iter().map(|&c| if c == b'/' { 0 } else { c }).collect();
        let kb: Vec<u8> = b.0.iter().map(|&c| if c == b'/' { 0 } else { c }).collect();
        ka.cmp(&kb)
    });
    out.dedup_by(|a, b| a.0 == b.0);
    out.into_iter()
        .map(|(p, k)| format!("{k} {}", String::from_utf8_lossy(&p)))
        .collect()
}

trait CharZero {
    fn is_char_device_zero(&self) -> bool;
}

impl CharZero for fs::FileType {
    fn is_char_device_zero(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_char_device(self)
    }
}

/// `items` without whiteouts and opaque markers unless running as root (making those needs root).
fn makeable(items: Vec<Item>) -> Vec<Item> {
    let root = lamina_sys::fs::running_as_root();
    items
        .into_iter()
        .filter(|i| root || !matches!(i.node, Node::Whiteout | Node::Opaque))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn diff_apply_roundtrip(items in items(true)) {
        let items = makeable(items);
        let t = tempfile::tempdir().unwrap();
        let (a, b) = two_dirs(t.path(), "a", "b");
        materialize(&a, &items);
        let tar1 = diff_of(&a);
        let bd = open_dir(&b);
        let stats = apply_layer(fd(&bd), &tar1[..], &ApplyOptions::default()).unwrap();
        prop_assert_eq!(stats.tar_bytes, tar1.len() as u64);
        prop_assert_eq!(stats.size, lamina_archive::dir_size(fd(&open_dir(&b))).unwrap());
        prop_assert_eq!(snapshot(&a, true), snapshot(&b, true));
        let tar2 = diff_of(&b);
        prop_assert_eq!(tar_listing(&tar1), tar_listing(&tar2));
        prop_assert!(tar1 == tar2, "second diff differs");
    }

    #[test]
    fn layer_changes_match_reference(lower_items in items(false), upper_items in items(true)) {
        let lower_items: Vec<Item> =
            lower_items.into_iter().filter(|i| !matches!(i.node, Node::Symlink { .. })).collect();
        let upper_items = makeable(upper_items);
        let t = tempfile::tempdir().unwrap();
        let (l, u) = two_dirs(t.path(), "l", "u");
        materialize(&l, &lower_items);
        materialize(&u, &upper_items);
        let (ld, ud) = (open_dir(&l), open_dir(&u));
        let got: Vec<String> = layer_changes(fd(&ud), &[fd(&ld)])
            .unwrap()
            .iter()
            .map(|c| {
                let k = match c.kind { ChangeKind::Modify => 'C', ChangeKind::Add => 'A', ChangeKind::Delete => 'D' };
                format!("{k} {}", String::from_utf8_lossy(&c.path))
            })
            .collect();
        prop_assert_eq!(got, reference_changes(&u, &l));
    }
}
