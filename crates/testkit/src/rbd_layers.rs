//! Helpers of the RBD layer backend's test binaries (`e2e_rbd_layers`, `e2e_rbd_layers_faults` in
//! `crates/integration-tests`): a lamina whose layers are images `PREFIX<n>` in a [`CephCluster`]'s pool, the
//! checks that nothing of its store is left on the host or in the pool, a plugin call that a fault point kills
//! lamina in, and the bind mount a snapshotter client makes of a Prepare/View.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lamina_snapshotter::proto::containerd::types::Mount;
use serde_json::json;

use crate::ceph::{loops_under, rbd_store_toml, CephCluster};
use crate::{mounts_under, poll, unique_name, Lamina, PluginClient, Ready};

/// The name prefix of the layer images in the pool.
pub const PREFIX: &str = "e2e-layer-";

/// A lamina whose layers are images `PREFIX<n>` in `pool`, each Ceph call given `timeout_secs` (not started).
pub fn lamina_config(tag: &str, cluster: &CephCluster, pool: &str, timeout_secs: u64) -> Lamina {
    let mut lamina = Lamina::new(&unique_name(tag));
    lamina.use_config(&rbd_store_toml(
        &cluster.conf(),
        pool,
        PREFIX,
        "ext4",
        timeout_secs,
    ));
    lamina
}

/// A lamina whose layers are images `PREFIX<n>` in the cluster's pool (started).
pub fn lamina_on(tag: &str, cluster: &CephCluster) -> Lamina {
    let mut lamina = lamina_config(tag, cluster, &cluster.pool, 10);
    lamina.spawn();
    lamina.wait_ready();
    lamina
}

/// A lamina serving the snapshotter API on `snap.sock` in its directory, its layers images in the
/// cluster's pool (started); with that socket.
pub fn snapshotter_on(tag: &str, cluster: &CephCluster) -> (Lamina, PathBuf) {
    let l = lamina_config(tag, cluster, &cluster.pool, 10);
    let sock = l.dir().join("snap.sock");
    let mut l = l.snapshotter(&sock);
    l.spawn();
    l.wait_ready();
    (l, sock)
}

/// This data root's images in the pool.
pub fn layer_images(cluster: &CephCluster) -> Vec<String> {
    cluster
        .images(&cluster.pool)
        .into_iter()
        .filter(|i| i.starts_with(PREFIX))
        .collect()
}

/// Nothing of the store is left on the host or in the pool: no image, no mount, no loop device, no rbd-fuse.
/// Waits up to 90 s: an image whose rbd-fuse was cut off keeps that client's watch until the OSDs time it out
/// (30 s), and its removal (then its parent's), deferred until then, is retried in the background.
pub fn assert_nothing_left(lamina: &Lamina, cluster: &CephCluster) {
    let settled = poll(Duration::from_secs(90), || {
        (layer_images(cluster).is_empty()
            && cluster.client_pids().is_empty()
            && mounts_under(&lamina.data_root).is_empty()
            && loops_under(&lamina.data_root).is_empty())
        .then_some(())
    });
    assert!(settled.is_some(), "left behind: {}", leftovers(lamina, cluster));
}

/// The images, snapshots, attachments and rbd-fuse processes of this data root, for messages.
pub fn leftovers(l: &Lamina, cluster: &CephCluster) -> String {
    format!(
        "images {:?}, rbd-fuse/clients {:?}, mounts {:?}, loops {:?}; log:\n{}",
        layer_images(cluster),
        cluster.client_pids(),
        mounts_under(&l.data_root),
        loops_under(&l.data_root),
        l.log_tail()
    )
}

/// Panics unless, within `within`, no mount, loop device or rbd-fuse of `l`'s data root is left.
pub fn assert_nothing_attached(l: &Lamina, cluster: &CephCluster, within: Duration, when: &str) {
    let settled = poll(within, || {
        (mounts_under(&l.data_root).is_empty()
            && loops_under(&l.data_root).is_empty()
            && cluster.client_pids().is_empty())
        .then_some(())
    });
    assert!(
        settled.is_some(),
        "left attached {when}: {}",
        leftovers(l, cluster)
    );
}

/// Starts `l` and panics unless it exits with a failure, having logged `needle`; `what` is what it must not do.
pub fn assert_start_refused(l: &mut Lamina, what: &str, needle: &str) {
    l.spawn();
    match l.poll_ready(Duration::from_secs(30)) {
        Ready::Exited(st) => assert!(!st.success()),
        other => panic!("lamina {what}: {other:?}"),
    }
    let log = fs::read_to_string(&l.log).unwrap_or_default();
    assert!(log.contains(needle), "{needle:?} not logged:\n{}", l.log_tail());
}

/// Runs `f`, printing how long it took under `what`.
pub fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("[rbd layers] {what}: {:?}", t.elapsed());
    r
}

/// Stops `l` (SIGTERM) and panics unless it exits successfully within 5 s; prints how long it took, `what`
/// saying with what attached.
pub fn assert_quick_stop(l: &mut Lamina, what: &str) {
    let t = Instant::now();
    let st = l.stop();
    let took = t.elapsed();
    eprintln!("[rbd layers] SIGTERM {what}: exited after {took:?} ({st})");
    assert!(st.success(), "lamina exited with {st}; log:\n{}", l.log_tail());
    assert!(
        took < Duration::from_secs(5),
        "lamina took {took:?} to exit on SIGTERM"
    );
}

/// Sends a plugin call to a lamina armed to die in it, and waits for the death.
pub fn call_and_die(l: &mut Lamina, method: &str, body: serde_json::Value) {
    let mut b = serde_json::to_vec(&body).unwrap();
    b.push(b'\n');
    let _ = l.client().post_raw(&format!("/GraphDriver.{method}"), &b);
    assert!(
        l.wait_exit(Duration::from_secs(60)).is_some(),
        "the kill point in {method} did not fire; log:\n{}",
        l.log_tail()
    );
}

/// The GraphDriver `Changes` of layer `id` against `parent`, as sorted `"<kind> <path>"` lines.
pub fn changes(c: &PluginClient, id: &str, parent: &str) -> Vec<String> {
    let v = c
        .call("Changes", json!({"ID": id, "Parent": parent}))
        .ok("Changes");
    let mut out: Vec<String> = v["Changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["Kind"], c["Path"].as_str().unwrap()))
        .collect();
    out.sort();
    out
}

/// Mounts the one mount a Prepare/View of the rbd backend answers (a bind of the layer's filesystem) at
/// `target`, as containerd does.
pub fn mount_snapshot(mounts: &[Mount], target: &Path) {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    assert_eq!(m.r#type, "bind", "{m:?}");
    fs::create_dir_all(target).unwrap();
    let st = Command::new("mount")
        .args(["-t", "bind", &m.source])
        .arg(target)
        .args(["-o", &m.options.join(",")])
        .status()
        .unwrap();
    assert!(st.success(), "mount {m:?} failed");
}
