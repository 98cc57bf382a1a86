//! Lost volume metadata never deletes a volume: with `volumes/meta.redb` deleted, replaced by an empty database,
//! or by another host's, and even with the `.lamina/<name>.json` records gone, the volume service opens, every
//! volume directory is still there with its data and is listed (a directory without a record is a volume whose
//! settings are unknown), and Mount works.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use lamina_volume::{BackendKind, OnRemove, VolumeConfig, VolumeManager};

fn config(state: &Path) -> VolumeConfig {
    VolumeConfig {
        state_dir: state.join("volumes"),
        default_backend: BackendKind::Local,
        mount_base: state.join("mnt"),
        on_remove: OnRemove::Delete,
        timeout: Duration::from_secs(10),
        moosefs: None,
        rbd: None,
        lease: None,
    }
}

/// Makes volume `v` with one file, through a manager that is then dropped.
fn volume_with_data(state: &Path) -> std::path::PathBuf {
    let m = VolumeManager::open(config(state)).unwrap();
    m.create("v", &BTreeMap::new()).unwrap();
    let dir = state.join("volumes/local/v");
    fs::write(dir.join("precious"), b"data").unwrap();
    m.shutdown();
    dir
}

#[test]
fn lost_volume_metadata_deletes_nothing() {
    let other = tempfile::tempdir().unwrap();
    {
        let m = VolumeManager::open(config(other.path())).unwrap();
        m.create("w", &BTreeMap::new()).unwrap();
        m.shutdown();
    }
    for how in ["missing", "empty", "foreign", "records gone too"] {
        let t = tempfile::tempdir().unwrap();
        let dir = volume_with_data(t.path());
        let db = t.path().join("volumes/meta.redb");
        match how {
            "missing" => fs::remove_file(&db).unwrap(),
            "empty" => {
                fs::remove_file(&db).unwrap();
                drop(redb::Database::create(&db).unwrap());
            }
            "foreign" => {
                fs::copy(other.path().join("volumes/meta.redb"), &db).unwrap();
            }
            _ => {
                fs::remove_file(&db).unwrap();
                fs::remove_file(t.path().join("volumes/local/.lamina/v.json")).unwrap();
            }
        }
        let m = VolumeManager::open(config(t.path())).unwrap();
        assert_eq!(fs::read(dir.join("precious")).unwrap(), b"data", "{how}");
        let names: Vec<String> = m.list().unwrap().into_iter().map(|v| v.name).collect();
        assert!(names.contains(&"v".to_string()), "{how}: listed {names:?}");
        m.shutdown();
    }
}
