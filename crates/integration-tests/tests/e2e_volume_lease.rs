//! End-to-end test of the volume lease (issue 16, item 5): two lamina processes ("hosts", each with its own
//! data root, mount base and plugin socket) on one real MooseFS cluster (master + 2 chunkservers in a network
//! namespace, `lamina_testkit::moosefs`), driven through the VolumeDriver protocol.
//!
//! - Remove on host 1 of a volume mounted on host 2 is refused with an error naming host 2; after host 2's
//!   Unmount it succeeds.
//! - Host 2 SIGKILLed with a volume mounted: Remove on host 1 is refused until host 2's heartbeat is older
//!   than the lease (`lease_secs = 4`, `heartbeat_secs = 1` here), then succeeds.
//! - Host 2 SIGKILLed and started again with a volume mounted: its reference is re-established from its
//!   mount counts and its heartbeat resumes, so Remove on host 1 stays refused past the lease.
//!
//! Needs root and the MooseFS packages (installed with apt-get when missing; SKIPPED otherwise, a failure
//! under CI=true). Run: `cargo test -p lamina-integration-tests --test e2e_volume_lease -- --nocapture`.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lamina_testkit::moosefs::{require_moosefs, MooseCluster};
use lamina_testkit::*;
use serde_json::json;

const ID1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const LEASE_SECS: u64 = 4;
const CYCLES: usize = 40;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Host {
    lamina: Lamina,
    c: PluginClient,
    mount_base: PathBuf,
}

/// A lamina on the cluster with a short lease; `host_id` None: the id generated in its data root.
fn host(tag: &str, cluster: &MooseCluster, host_id: Option<&str>) -> Host {
    let id = host_id
        .map(|h| format!("host_id = \"{h}\"\n"))
        .unwrap_or_default();
    let (lamina, mount_base) = Lamina::start_with_volumes(
        tag,
        &format!(
            "{}[cluster]\n{id}lease_secs = {LEASE_SECS}\nheartbeat_secs = 1\n",
            cluster.volumes_toml(8, "")
        ),
    );
    let c = lamina.client();
    Host {
        lamina,
        c,
        mount_base,
    }
}

fn create(c: &PluginClient, name: &str) {
    c.volume_call("Create", json!({"Name": name, "Opts": {}}))
        .ok(&format!("Create {name}"));
}

fn mount(c: &PluginClient, name: &str) -> PathBuf {
    let r = c
        .volume_call("Mount", json!({"Name": name, "ID": ID1}))
        .ok(&format!("Mount {name}"));
    PathBuf::from(r["Mountpoint"].as_str().unwrap())
}

#[test]
fn remove_of_a_volume_mounted_on_another_host() {
    let test = "remove_of_a_volume_mounted_on_another_host";
    let Some(_serial) = serial_if(require_root(test) && require_moosefs(test)) else {
        return;
    };
    let cluster = MooseCluster::start("vol-lease");
    let h1 = host("lease1", &cluster, None);
    let mut h2 = host("lease2", &cluster, Some("lease-host-2"));
    let (c1, c2) = (h1.c.clone(), h2.c.clone());
    let id1 = fs::read_to_string(h1.lamina.data_root.join("host-id")).unwrap();
    let root = h1.lamina.data_root.join("volumes/moosefs/docker/volumes");
    assert!(
        root.join(".lamina/lease/hosts").join(id1.trim()).exists(),
        "host 1 beats under its generated id {id1:?}"
    );

    // Mounted on host 2: Remove on host 1 is refused, naming host 2.
    create(&c1, "shared");
    let mp = mount(&c2, "shared");
    fs::write(mp.join("data"), b"host 2 writes").unwrap();
    let t = Instant::now();
    let e = c1
        .volume_call("Remove", json!({"Name": "shared"}))
        .expect_err("Remove of a volume mounted on host 2", "in use");
    let refused_in = t.elapsed();
    assert!(
        e.contains("volume \"shared\" is mounted on host lease-host-2")
            && e.contains("unmount it there first"),
        "{e}"
    );
    assert!(root.join("shared").is_dir());
    assert_eq!(fs::read(mp.join("data")).unwrap(), b"host 2 writes");
    // Host 2's own Remove: refused by its own mount count, as before.
    let e = c2
        .volume_call("Remove", json!({"Name": "shared"}))
        .expect_err("Remove on the mounting host", "in use");
    assert!(e.contains("mounted on this host"), "{e}");

    // Mount/Unmount cycles on host 1 (each first Mount holds, each last Unmount releases a reference).
    let (mut mounts, mut unmounts) = (Vec::new(), Vec::new());
    for _ in 0..CYCLES {
        let t = Instant::now();
        mount(&c1, "shared");
        mounts.push(t.elapsed());
        let t = Instant::now();
        c1.volume_call("Unmount", json!({"Name": "shared", "ID": ID1}))
            .ok("Unmount on host 1");
        unmounts.push(t.elapsed());
    }
    mounts.sort();
    unmounts.sort();

    // Host 2 unmounts: Remove on host 1 succeeds.
    c2.volume_call("Unmount", json!({"Name": "shared", "ID": ID1}))
        .ok("Unmount");
    let t = Instant::now();
    c1.volume_call("Remove", json!({"Name": "shared"}))
        .ok("Remove after the Unmount");
    let removed_in = t.elapsed();
    assert!(!root.join("shared").exists());
    assert!(
        !root.join(".lamina/lease/refs/volume/shared").exists(),
        "no reference left"
    );

    // Host 2 killed with a volume mounted: Remove on host 1 is refused until host 2's lease ran out.
    create(&c1, "held");
    mount(&c2, "held");
    h2.lamina.kill9();
    let killed = Instant::now();
    let e = c1
        .volume_call("Remove", json!({"Name": "held"}))
        .expect_err("Remove right after host 2 was killed", "in use");
    assert!(e.contains("lease-host-2"), "{e}");
    let mut refusals = 1;
    let waited = poll(Duration::from_secs(LEASE_SECS + 20), || {
        let r = c1.volume_call("Remove", json!({"Name": "held"}));
        if r.status == 200 && r.err().is_none() {
            return Some(killed.elapsed());
        }
        let e = r.err().unwrap_or_default();
        assert!(e.starts_with("in use:") && e.contains("lease-host-2"), "{e}");
        refusals += 1;
        std::thread::sleep(Duration::from_millis(250));
        None
    })
    .expect("Remove never succeeded after host 2's lease ran out");
    assert!(!root.join("held").exists());
    // The heartbeat is at most 1 s older than the kill and MooseFS keeps mtimes in whole seconds.
    assert!(
        waited >= Duration::from_secs(LEASE_SECS - 2),
        "Remove succeeded {waited:?} after the kill, before the lease ({LEASE_SECS} s) could have run out"
    );
    unmount_under(&h2.mount_base);

    // Host 2 killed and started again with a volume mounted: its reference comes back, Remove stays refused.
    h2.lamina.start_again();
    let c2 = h2.lamina.client();
    create(&c1, "kept");
    mount(&c2, "kept");
    h2.lamina.kill9();
    h2.lamina.start_again();
    let c2 = h2.lamina.client();
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 2));
    let e = c1
        .volume_call("Remove", json!({"Name": "kept"}))
        .expect_err("Remove of a volume still mounted on a restarted host", "in use");
    assert!(e.contains("lease-host-2"), "{e}");
    assert!(
        !root.join(".lamina/lease/refs/volume/held").exists(),
        "the restart holds only volumes that still exist"
    );
    c2.volume_call("Unmount", json!({"Name": "kept", "ID": ID1}))
        .ok("Unmount after the restart");
    c1.volume_call("Remove", json!({"Name": "kept"}))
        .ok("Remove after the Unmount");

    println!(
        "volume lease: Remove refused in {} ms, Remove after Unmount {} ms, Remove allowed {} ms after \
         SIGKILL of the holder ({refusals} refusals; lease {LEASE_SECS} s, heartbeat 1 s); \
         Mount/Unmount on a 2-host cluster, {CYCLES} cycles: p50 {:.2}/{:.2} ms, max {:.2}/{:.2} ms",
        refused_in.as_millis(),
        removed_in.as_millis(),
        waited.as_millis(),
        ms(mounts[CYCLES / 2]),
        ms(unmounts[CYCLES / 2]),
        ms(mounts[CYCLES - 1]),
        ms(unmounts[CYCLES - 1]),
    );
    drop(h2);
    drop(h1);
    drop(cluster);
}
