//! Helpers shared by the store's tests on a real filesystem.

#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;

use lamina_archive::IdMappings;
use lamina_store::{LayerKind, NewLayer, Store};

pub use lamina_testkit::require_root;

pub const NS: &str = "test";

/// A fresh store root under /var/tmp (a disk filesystem: overlay upper dirs need xattrs and d_type); whatever
/// is still mounted below it is unmounted on drop.
pub struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    pub fn new() -> Root {
        Root {
            dir: tempfile::Builder::new()
                .prefix("lamina-store-test")
                .tempdir_in("/var/tmp")
                .unwrap(),
        }
    }
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(mounts) = lamina_sys::mount::mounts_under(self.dir.path()) {
            for m in mounts {
                let _ = lamina_sys::mount::unmount(&m, true);
            }
        }
    }
}

/// A fresh [`Root`] for `test`, or `None` (skip the test) when not root.
pub fn root_for(test: &str) -> Option<Root> {
    require_root(test).then(Root::new)
}

/// A store open on a fresh [`Root`] for `test`, or `None` (skip the test) when not root. Bound as
/// `let Some((r, s)) = ...`, the store drops before its root.
pub fn root_store(test: &str) -> Option<(Root, Store)> {
    let r = root_for(test)?;
    let s = Store::open(&r.path()).unwrap();
    Some((r, s))
}

/// A tar of regular files (mode 0644, a fixed mtime).
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Creates the read-only layer `name` on `parent`.
pub fn create(s: &Store, name: &str, parent: Option<&str>) {
    s.create(NewLayer::new(NS, name, LayerKind::ReadOnly).with_parent(parent))
        .unwrap();
}

/// Applies a tar of `files` to the layer `name`.
pub fn apply_files(s: &Store, name: &str, files: &[(&str, &[u8])]) {
    s.apply(NS, name, &mut &tar_of(files)[..], &IdMappings::default())
        .unwrap();
}

/// Creates the read-only layer `name` on `parent` holding `files` (none: left empty); its number.
pub fn layer(s: &Store, name: &str, parent: Option<&str>, files: &[(&str, &[u8])]) -> u64 {
    create(s, name, parent);
    if !files.is_empty() {
        apply_files(s, name, files);
    }
    s.info(NS, name).unwrap().number
}
