//! End-to-end tests of lamina's RBD volumes against a throw-away Ceph cluster (testkit's `CephCluster`).

use std::time::Instant;

use lamina_testkit::ceph::{require_ceph, CephCluster, ObjectStore};
use lamina_testkit::*;

/// Start times of both object stores (run by hand: `--ignored`).
#[test]
#[ignore]
fn cluster_start_times() {
    let test = "cluster_start_times";
    if !require_ceph(test) {
        return;
    }
    for store in [ObjectStore::Memstore, ObjectStore::Bluestore] {
        let mut c = CephCluster::start_with("times", store);
        let t = Instant::now();
        c.stop();
        eprintln!("{store:?}: start {:?}, stop {:?}", c.start_time, t.elapsed());
    }
}
