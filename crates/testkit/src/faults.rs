//! Shared by the fault tests (`reliability_kill.rs`, `reliability_disk.rs`): a `lamina serve` with every front
//! door (plugin socket, snapshotter socket, volumes) started with or without armed fault points
//! (`LAMINA_FAULTS`, see `lamina_sys::fault`), and small protocol helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::reliability::{RawTar, Rng};
use crate::snapshots::SnapshotApi;
use crate::*;
use serde_json::{json, Value};

/// The snapshotter name used in requests.
pub use crate::snapshots::SN;

/// One `lamina serve` with the plugin socket, the snapshotter socket and volumes, started with or without
/// armed fault points: a [`Lamina`] with its directories, sockets and clean-up.
pub struct Daemon {
    pub snap_socket: PathBuf,
    pub config: PathBuf,
    pub base: Lamina,
}

/// Panics unless the lamina binary under test has the fault points (a build without test targets, e.g.
/// `cargo build -p lamina`, replaced the test build).
pub fn assert_fault_points() {
    assert!(
        binary_has_fault_points(),
        "{} has no fault points: build it with `cargo build --workspace --all-targets`",
        lamina_bin().display()
    );
}

/// True if the lamina binary under test was built with the fault points (`lamina-sys` feature `faults`).
pub fn binary_has_fault_points() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::process::Command::new("grep")
            .args(["-q", "-a", "-F", "LAMINA_FAULTS_LOG"])
            .arg(lamina_bin())
            .status()
            .is_ok_and(|s| s.success())
    })
}

impl Daemon {
    /// A daemon for the fault tests; panics if the binary has no fault points (a build without test targets,
    /// e.g. `cargo build -p lamina`, replaced the test build).
    pub fn new(name: &str) -> Daemon {
        assert_fault_points();
        let mut base = Lamina::new(name);
        let config = base.use_config(&format!(
            "[volumes]\nmount_base = \"{}\"\n",
            base.dir().join("mnt").display()
        ));
        let snap_socket = base.dir().join("snap.sock");
        base.snapshotter_socket = snap_socket.clone();
        base.log_level = "info".into();
        Daemon {
            snap_socket,
            config,
            base,
        }
    }

    pub fn root(&self) -> &Path {
        &self.base.data_root
    }

    pub fn spawn(&mut self, faults: Option<&str>, hits: &Path) {
        self.base.env = vec![
            ("LAMINA_FAULTS".into(), faults.unwrap_or("").into()),
            ("LAMINA_FAULTS_LOG".into(), hits.display().to_string()),
        ];
        self.base.spawn();
    }

    /// Waits for both sockets; false if the process exited first.
    pub fn wait_ready(&mut self) -> bool {
        match self.base.poll_ready(Duration::from_secs(60)) {
            Ready::Up(_) => {}
            Ready::Exited(_) => return false,
            Ready::TimedOut => panic!("lamina did not start; log:\n{}", self.base.log_tail()),
        }
        self.base
            .client()
            .call("Init", json!({"Home": self.base.dir().join("docker-root")}))
            .ok("Init");
        true
    }

    pub fn start(&mut self, faults: Option<&str>, hits: &Path) -> bool {
        self.spawn(faults, hits);
        self.wait_ready()
    }

    pub fn pid(&self) -> u32 {
        self.base.pid().unwrap()
    }

    /// Waits up to `t` for the process to end (after a kill point fired).
    pub fn exited_within(&mut self, t: Duration) -> bool {
        self.base.wait_exit(t).is_some()
    }

    pub fn kill9(&mut self) {
        self.base.kill9();
    }

    pub fn stop(&mut self) {
        self.base.terminate(Duration::from_secs(30));
    }

    /// Reaps a process that ended by itself.
    pub fn gone(&mut self) {
        self.base.wait_exit(Duration::from_secs(3600));
    }

    pub fn client(&self) -> PluginClient {
        let mut c = self.base.client();
        c.timeout = Duration::from_secs(60);
        c
    }

    pub fn cli(&self, args: &[&str]) -> Value {
        lamina_cli_json(self.root(), args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The snapshots API over the snapshotter socket, errors as text.
pub struct Snap {
    pub api: SnapshotApi,
}

impl Snap {
    pub fn connect(socket: &Path) -> Snap {
        Snap {
            api: SnapshotApi::connect(socket),
        }
    }

    pub fn prepare(&self, key: &str, parent: &str) -> Result<(), String> {
        self.api
            .prepare(key, parent)
            .map(|_| ())
            .map_err(|s| s.to_string())
    }

    pub fn commit(&self, name: &str, key: &str) -> Result<(), String> {
        self.commit_labels(name, key, Default::default())
    }

    pub fn commit_labels(
        &self,
        name: &str,
        key: &str,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<(), String> {
        self.api
            .commit_with(name, key, labels, "")
            .map_err(|s| s.to_string())
    }

    pub fn remove(&self, key: &str) -> Result<(), String> {
        self.api.remove(key).map_err(|s| s.to_string())
    }
}

/// A small layer: a few files with random content, sometimes one of a few MiB (room for random-time kills
/// in the middle of the unpacking).
pub fn make_tar(rng: &mut Rng, big: bool) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut t = RawTar::new();
    let mut files = BTreeMap::new();
    t.dir(b"d", 0o755);
    for i in 0..rng.range(1, 6) {
        let len = if big && i == 0 {
            rng.range(2 << 20, 6 << 20) as usize
        } else {
            rng.range(0, 20_000) as usize
        };
        let data = rng.bytes(len);
        let name = format!("d/f{i}");
        t.file(name.as_bytes(), 0o644, &data);
        files.insert(name, data);
    }
    (t.finish(), files)
}

/// Regular files below `dir`, relative names → content.
pub fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    walk(dir)
        .into_iter()
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let data = fs::read(&p).unwrap();
            (rel, data)
        })
        .collect()
}

pub fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub fn layer_state(d: &Daemon, name: &str) -> Option<String> {
    d.cli(&["layers", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["record"]["name"] == name)
        .map(|l| l["record"]["state"].as_str().unwrap().to_string())
}

pub fn layer_dir(d: &Daemon, name: &str) -> PathBuf {
    let l = d.cli(&["layers", "ls"]);
    let n = l
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["record"]["name"] == name)
        .unwrap_or_else(|| panic!("no layer {name}"))["number"]
        .as_u64()
        .unwrap();
    d.root().join("layers").join(format!("{n:x}"))
}

pub fn ok(r: &HttpResponse, what: &str) -> Result<(), String> {
    if r.status == 200 && r.err().is_none_or(|e| e.is_empty()) {
        Ok(())
    } else {
        Err(format!("{what}: {} {}", r.status, r.text()))
    }
}

pub fn gcall(d: &Daemon, method: &str, body: Value) -> Result<(), String> {
    let mut b = serde_json::to_vec(&body).unwrap();
    b.push(b'\n');
    match d.client().post_raw(&format!("/GraphDriver.{method}"), &b) {
        Ok(r) => ok(&r, method),
        Err(e) => Err(format!("{method}: transport {e}")),
    }
}

/// `/GraphDriver.Create` of the layer `id` on `parent` (`""`: none), as dockerd sends it.
pub fn gcreate(d: &Daemon, id: &str, parent: &str) -> Result<(), String> {
    gcall(
        d,
        "Create",
        serde_json::json!({"ID": id, "Parent": parent, "MountLabel": ""}),
    )
}

pub fn vcall(d: &Daemon, method: &str, body: Value) -> Result<Value, String> {
    let mut b = serde_json::to_vec(&body).unwrap();
    b.push(b'\n');
    match d.client().post_raw(&format!("/VolumeDriver.{method}"), &b) {
        Ok(r) => ok(&r, method).map(|()| r.json()),
        Err(e) => Err(format!("{method}: transport {e}")),
    }
}

pub fn apply(d: &Daemon, id: &str, parent: &str, tar: &[u8]) -> Result<(), String> {
    match d.client().apply_diff(id, parent, &mut &tar[..]) {
        Ok(r) => ok(&r, "ApplyDiff"),
        Err(e) => Err(format!("ApplyDiff: transport {e}")),
    }
}
