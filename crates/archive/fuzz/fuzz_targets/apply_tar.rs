//! Feeds arbitrary bytes to `apply_layer` into a fresh directory, removed afterwards.
//! Any result is fine; a panic, a hang, or anything created next to the layer is a bug.
#![no_main]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // tmpfs when available: faster, and it supports trusted.* xattrs for root.
    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    let outer = tempfile::tempdir_in(base).expect("tempdir");
    let layer = outer.path().join("layer");
    std::fs::create_dir(&layer).expect("layer dir");
    let dir = File::open(&layer).expect("open layer");
    let _ = lamina_archive::apply_layer(dir.as_fd(), data, &lamina_archive::ApplyOptions::default());
    drop(dir);
    let names: Vec<_> = std::fs::read_dir(outer.path())
        .expect("read outer")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["layer"], "something was created next to the layer");
    // TempDir's drop removes the tree (the fuzzer runs as root, so modes do not matter).
});
