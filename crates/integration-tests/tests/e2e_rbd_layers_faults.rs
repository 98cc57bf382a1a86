//! End-to-end fault tests of lamina's RBD layer backend (`[store] backend = "rbd"`): lamina killed (-9) in the
//! middle of an operation, stopped (SIGTERM) with layers attached, a missing pool, the OSD stopped during an
//! ApplyDiff and with a layer mounted, the cluster gone, and a pool over its quota, each test on a throw-away Ceph
//! cluster of its own (testkit's `CephCluster`: one monitor, one memstore OSD, on 127.0.0.1; a mgr for the
//! quota). The tests under dockerd, containerd and a snapshotter client are in `e2e_rbd_layers.rs`; the helpers
//! both use are in `lamina_testkit::rbd_layers`.
//!
//! Needs root and the Ceph packages (ceph-mon, ceph-osd, ceph-mgr, ceph-common, rbd-fuse). Without them the tests
//! print SKIPPED (and fail under CI=true).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use lamina_testkit::ceph::{
    ceph_test, loops_under, require_ceph, require_ceph_mgr, CephCluster, ObjectStore,
};
use lamina_testkit::faults::assert_fault_points;
use lamina_testkit::rbd_layers::*;
use lamina_testkit::*;
use serde_json::json;

#[test]
fn rbd_layers_kill9_mid_operation() {
    let Some((_serial, mut cluster)) = ceph_test("rbd_layers_kill9_mid_operation", false, "layerkill") else {
        return;
    };
    assert_fault_points();
    let mut l = lamina_on("rbdkill", &cluster);
    let c = l.client();
    let base = TarBuilder::new()
        .dir("etc", 0o755)
        .file("etc/a", 0o644, b"a")
        .file("etc/b", 0o644, b"b")
        .finish();
    let top = TarBuilder::new()
        .dir("etc", 0o755)
        .file("etc/.wh.a", 0o644, b"")
        .file("etc/c", 0o644, b"c")
        .finish();
    c.call("Create", json!({"ID": "l1"})).ok("Create l1");
    c.apply_diff("l1", "", &mut &base[..]).unwrap().ok("ApplyDiff l1");
    c.call("Create", json!({"ID": "l2", "Parent": "l1"}))
        .ok("Create l2");

    // Applied but not sealed: the restart puts the layer back to empty; the apply is done again.
    l.kill9_and_start(Some("store.rbd.seal.snap=kill"));
    let mut tar = &top[..];
    let _ = l.client().apply_diff("l2", "l1", &mut tar);
    assert!(
        l.wait_exit(Duration::from_secs(60)).is_some(),
        "the seal's kill point did not fire"
    );
    l.kill9_and_start(None);
    let c = l.client();
    assert_eq!(
        changes(&c, "l2", "l1"),
        Vec::<String>::new(),
        "l2 is empty again after the restart"
    );
    c.apply_diff("l2", "l1", &mut &top[..])
        .unwrap()
        .ok("ApplyDiff l2 again");
    assert_eq!(changes(&c, "l2", "l1"), ["0 /etc", "1 /etc/c", "2 /etc/a"]);
    assert_eq!(layer_images(&cluster).len(), 2);

    // Mapped but not mounted: the restart takes the attachment down (rbd-fuse, loop device).
    l.kill9_and_start(Some("rbd.attach.mapped=kill"));
    call_and_die(&mut l, "Get", json!({"ID": "l2", "MountLabel": ""}));
    assert!(!cluster.client_pids().is_empty(), "rbd-fuse runs after the kill");
    l.kill9_and_start(None);
    let clean = poll(Duration::from_secs(15), || {
        (cluster.client_pids().is_empty() && loops_under(&l.data_root).is_empty()).then_some(())
    });
    assert!(
        clean.is_some(),
        "left after the restart: rbd-fuse {:?}, loops {:?}",
        cluster.client_pids(),
        loops_under(&l.data_root)
    );
    let c = l.client();
    let dir = c.call("Get", json!({"ID": "l2", "MountLabel": ""})).ok("Get l2")["Dir"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fs::read_to_string(Path::new(&dir).join("etc/c")).unwrap(), "c");
    assert!(!Path::new(&dir).join("etc/a").exists());

    // Mounted, counted by nobody (killed before the Get answered), and lamina killed again with it mounted:
    // the restart keeps it (a container may use it) and the last Put takes it down.
    l.kill9_and_start(None);
    let c = l.client();
    assert!(
        is_mounted(Path::new(&dir)),
        "the mount of a known layer survives the restart"
    );
    c.call("Put", json!({"ID": "l2"})).ok("Put l2");
    assert!(!is_mounted(Path::new(&dir)));

    // Recorded but no image yet: the restart makes it.
    l.kill9_and_start(Some("store.create.mkdir=kill"));
    call_and_die(&mut l, "Create", json!({"ID": "l3", "Parent": "l2"}));
    assert_eq!(layer_images(&cluster).len(), 2);
    l.kill9_and_start(None);
    assert_eq!(
        layer_images(&cluster).len(),
        3,
        "the restart made the recorded layer's image"
    );
    let c = l.client();
    assert_eq!(changes(&c, "l3", "l2"), Vec::<String>::new());

    // Cloned and recorded, killed before the answer: a Remove takes it.
    l.kill9_and_start(Some("store.create.done=kill"));
    call_and_die(&mut l, "Create", json!({"ID": "l4", "Parent": "l2"}));
    l.kill9_and_start(None);
    let c = l.client();
    for id in ["l4", "l3", "l2", "l1"] {
        c.call("Remove", json!({"ID": id})).ok(&format!("Remove {id}"));
    }
    assert_nothing_left(&l, &cluster);
    drop(l);
    cluster.stop();
}

#[test]
fn rbd_layers_errors_and_clone_figures() {
    let Some((_serial, mut cluster)) = ceph_test("rbd_layers_errors_and_clone_figures", false, "layererr")
    else {
        return;
    };

    // A pool that does not exist: the store does not open, and says why.
    let mut nopool = lamina_config("rbdnopool", &cluster, "nopool", 5);
    assert_start_refused(
        &mut nopool,
        "opened a data root on a missing pool",
        "backend unavailable: pool \"nopool\" does not exist",
    );
    drop(nopool);

    let mut l = lamina_config("rbdfig", &cluster, &cluster.pool, 5);
    l.spawn();
    l.wait_ready();
    let c = l.client();
    // Children of a small and of a big parent: a clone costs the same.
    let mut figures = Vec::new();
    for (id, mb) in [("small", 10u64), ("big", 200)] {
        let mut w = TarWriter::new(Vec::new());
        w.random_file("data", mb << 20, mb).unwrap();
        let tar = w.finish().unwrap();
        c.call("Create", json!({"ID": id})).ok("Create parent");
        let t = Instant::now();
        c.apply_diff(id, "", &mut &tar[..])
            .unwrap()
            .ok("ApplyDiff parent");
        let apply = t.elapsed();
        let child = format!("{id}-child");
        let t = Instant::now();
        c.call("CreateReadWrite", json!({"ID": child, "Parent": id}))
            .ok("Create child");
        let create = t.elapsed();
        let t = Instant::now();
        c.call("Get", json!({"ID": child, "MountLabel": ""}))
            .ok("Get child");
        let get = t.elapsed();
        c.call("Put", json!({"ID": child})).ok("Put child");
        eprintln!(
            "[rbd layers] parent {mb} MB: ApplyDiff {apply:?} ({:.0} MB/s), Create of a child {create:?}, first Get {get:?}",
            mb as f64 / apply.as_secs_f64()
        );
        figures.push(create);
    }
    assert!(
        figures.iter().all(|d| *d < Duration::from_secs(10)),
        "Create of a child took {figures:?}"
    );
    for id in ["small-child", "small", "big-child", "big"] {
        c.call("Remove", json!({"ID": id})).ok(&format!("Remove {id}"));
    }
    assert_nothing_left(&l, &cluster);

    osd_stopped_mid_operation(&mut l, &cluster);
    let c = l.client();

    // The cluster gone: a classed error within the deadline (5 s per call), nothing half-made.
    cluster.kill();
    let t = Instant::now();
    let e = c
        .call("Create", json!({"ID": "x"}))
        .expect_err("Create without a cluster", "backend unavailable");
    let took = t.elapsed();
    eprintln!("[rbd layers] Create with the cluster down: {took:?}: {e}");
    assert!(
        took < Duration::from_secs(20),
        "Create with the cluster down took {took:?}"
    );
    assert!(e.contains("unreachable") || e.contains("do not answer"), "{e}");
    assert!(mounts_under(&l.data_root).is_empty());
}

/// A tar stream that stops the cluster's OSD once `left` bytes of it were read.
struct PauseOsdAfter<'a> {
    inner: &'a [u8],
    left: usize,
    cluster: &'a CephCluster,
}

impl std::io::Read for PauseOsdAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            self.cluster.pause_osd();
            self.left = usize::MAX;
        }
        let k = buf.len().min(self.left).min(self.inner.len());
        buf[..k].copy_from_slice(&self.inner[..k]);
        self.inner = &self.inner[k..];
        if self.left != usize::MAX {
            self.left -= k;
        }
        Ok(k)
    }
}

/// The OSD stopped (SIGSTOP: it keeps its objects and its place in the map, every operation on it waits)
/// during an ApplyDiff and while a layer is mounted with unwritten data: both calls answer a classed error
/// within their deadline (lamina runs with `timeout_secs = 5`) and leave nothing attached; once the OSD goes
/// on and lamina restarts, every recorded layer is intact and the failed apply can be done again.
fn osd_stopped_mid_operation(l: &mut Lamina, cluster: &CephCluster) {
    let c = l.client();
    let mut w = TarWriter::new(Vec::new());
    w.random_file("etc/p", 1 << 20, 7).unwrap();
    let ptar = w.finish().unwrap();
    c.call("Create", json!({"ID": "p"})).ok("Create p");
    c.apply_diff("p", "", &mut &ptar[..]).unwrap().ok("ApplyDiff p");
    let want = fs::read(
        Path::new(
            c.call("Get", json!({"ID": "p", "MountLabel": ""})).ok("Get p")["Dir"]
                .as_str()
                .unwrap(),
        )
        .join("etc/p"),
    )
    .unwrap();
    c.call("Put", json!({"ID": "p"})).ok("Put p");
    c.call("CreateReadWrite", json!({"ID": "m", "Parent": "p"}))
        .ok("Create m");
    let v = c.call("Get", json!({"ID": "m", "MountLabel": ""})).ok("Get m");
    let mdir = Path::new(v["Dir"].as_str().unwrap()).to_path_buf();
    fs::write(mdir.join("unsynced"), vec![7u8; 8 << 20]).unwrap();
    c.call("Create", json!({"ID": "a", "Parent": "p"})).ok("Create a");
    let mut w = TarWriter::new(Vec::new());
    w.random_file("big", 48 << 20, 9).unwrap();
    let tar = w.finish().unwrap();

    let t = Instant::now();
    let mut body = PauseOsdAfter {
        inner: &tar,
        left: 8 << 20,
        cluster,
    };
    let mut slow = l.client();
    slow.timeout = Duration::from_secs(60);
    let r = slow
        .apply_diff("a", "p", &mut body)
        .unwrap_or_else(|e| panic!("ApplyDiff: {e} after {:?}; log:\n{}", t.elapsed(), l.log_tail()));
    let took = t.elapsed();
    let e = r.expect_err("ApplyDiff with the OSD stopped", "backend unavailable");
    eprintln!("[rbd layers] ApplyDiff with the OSD stopped after 8 MiB: {took:?}: {e}");
    assert!(e.contains("do not answer"), "{e}");
    assert!(took < Duration::from_secs(45), "ApplyDiff took {took:?}");

    let t = Instant::now();
    let r = slow.call("Put", json!({"ID": "m"}));
    let took = t.elapsed();
    eprintln!(
        "[rbd layers] Put of a mounted layer with the OSD stopped: {took:?}: HTTP {} {}",
        r.status,
        r.text()
    );
    assert!(
        r.err().is_some_and(|e| e.contains("do not answer")),
        "{}",
        r.text()
    );
    assert!(took < Duration::from_secs(45), "Put took {took:?}");
    assert_nothing_attached(l, cluster, Duration::from_secs(20), "with the OSD stopped");

    cluster.resume_osd();
    // The rbd-fuse processes lamina cut off while the OSD was stopped leave their watches on the images'
    // headers until the OSD times them out; the restarted lamina, which must take such an image's exclusive
    // lock to roll its apply back, would wait for them past its 5 s timeout.
    let deadline = Instant::now() + Duration::from_secs(90);
    for image in cluster.images(&cluster.pool) {
        while cluster.watchers(&cluster.pool, &image) > 0 {
            assert!(
                Instant::now() < deadline,
                "image {image} still watched 90 s after the OSD was resumed"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    l.kill9_and_start(None);
    let c = l.client();
    for id in ["p", "m", "a"] {
        let v = c
            .call("Get", json!({"ID": id, "MountLabel": ""}))
            .ok(&format!("Get {id}"));
        let dir = Path::new(v["Dir"].as_str().unwrap()).to_path_buf();
        assert_eq!(fs::read(dir.join("etc/p")).unwrap(), want, "{id} holds p's file");
        if id == "a" {
            assert!(!dir.join("big").exists(), "nothing of the failed apply is left");
        }
        c.call("Put", json!({"ID": id})).ok(&format!("Put {id}"));
    }
    let mut w = TarWriter::new(Vec::new());
    w.random_file("again", 1 << 20, 3).unwrap();
    let again = w.finish().unwrap();
    c.apply_diff("a", "p", &mut &again[..])
        .unwrap()
        .ok("ApplyDiff again once the OSD is back");
    assert_eq!(changes(&c, "a", "p"), vec!["1 /again".to_string()]);
    for id in ["a", "m", "p"] {
        c.call("Remove", json!({"ID": id})).ok(&format!("Remove {id}"));
    }
    assert_nothing_left(l, cluster);
}

/// A pool quota (`ceph osd pool set-quota`) passed during an ApplyDiff of a layer bigger than the quota: the
/// apply answers `no space: pool ... is over its quota` well within the caller's patience, the failed layer
/// leaves no image, snapshot, attachment or rbd-fuse behind, a mounted container layer with unwritten data
/// answers the same class at its Put, and everything works again once the quota is raised. The monitors
/// learn the pool's usage from a mgr: the cluster runs one here.
#[test]
fn rbd_layers_pool_quota() {
    let test = "rbd_layers_pool_quota";
    let Some(_serial) = serial_if(require_root(test) && require_ceph(test) && require_ceph_mgr(test)) else {
        return;
    };
    let mut cluster = CephCluster::start_with("layerquota", ObjectStore::Memstore);
    cluster.start_mgr();
    let pool = cluster.pool.clone();
    let mut l = lamina_config("rbdquota", &cluster, &pool, 5);
    l.spawn();
    l.wait_ready();
    let c = l.client();
    let mut w = TarWriter::new(Vec::new());
    w.random_file("etc/p", 1 << 20, 5).unwrap();
    let ptar = w.finish().unwrap();
    c.call("Create", json!({"ID": "p"})).ok("Create p");
    c.apply_diff("p", "", &mut &ptar[..]).unwrap().ok("ApplyDiff p");
    c.call("CreateReadWrite", json!({"ID": "m", "Parent": "p"}))
        .ok("Create m");
    let v = c.call("Get", json!({"ID": "m", "MountLabel": ""})).ok("Get m");
    let mdir = Path::new(v["Dir"].as_str().unwrap()).to_path_buf();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let others = sorted(layer_images(&cluster));
    c.call("Create", json!({"ID": "big", "Parent": "p"}))
        .ok("Create big");
    let big_image = layer_images(&cluster)
        .into_iter()
        .find(|i| !others.contains(i))
        .expect("the image of layer big");

    // 64 MiB for the pool, and a layer of 512 MiB (half its 1 GiB image, so that the image's filesystem never
    // fills first). The quota is passed halfway through the stream, at a point the test controls: Ceph flags a
    // pool over its quota only once a mgr has reported the usage, and writes that stay in the page cache
    // until then would otherwise race that report.
    cluster.ceph_ok(&["osd", "pool", "set-quota", &pool, "max_bytes", "67108864"]);
    assert!(
        !cluster.pool_flags(&pool).iter().any(|f| f == "full_quota"),
        "the pool is over its quota before the apply"
    );
    let t = Instant::now();
    let mut slow = l.client();
    slow.timeout = Duration::from_secs(180);
    let (mut body, w) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut flush: Option<std::process::Child> = None;
    let r = std::thread::scope(|scope| {
        let (cluster, pool, flush) = (&cluster, &pool, &mut flush);
        scope.spawn(move || {
            let mut tar = TarWriter::new(std::io::BufWriter::with_capacity(1 << 20, w));
            if tar.random_file("first", 96 << 20, 11).is_err() {
                return;
            }
            // The first 96 MiB to the cluster (the flush is not waited for: it may meet the full pool), and
            // the rest of the stream once the pool is flagged.
            *flush = Some(std::process::Command::new("sync").spawn().unwrap());
            let flagged = poll(Duration::from_secs(60), || {
                cluster
                    .pool_flags(pool)
                    .iter()
                    .any(|f| f == "full_quota")
                    .then_some(())
            });
            assert!(flagged.is_some(), "the pool was not flagged over its quota");
            if tar.random_file("big", 416 << 20, 12).is_ok() {
                let _ = tar.finish();
            }
        });
        let r = slow.apply_diff("big", "p", &mut body);
        // The rest of the stream has no reader once the answer is in: the writer stops at its next write.
        drop(body);
        r
    })
    .unwrap_or_else(|e| panic!("ApplyDiff: {e} after {:?}; log:\n{}", t.elapsed(), l.log_tail()));
    let took = t.elapsed();
    let e = r.expect_err_containing(
        "ApplyDiff of 512 MiB into a pool with a 64 MiB quota",
        "no space",
        &format!("pool \"{pool}\" is over its quota"),
    );
    eprintln!("[rbd layers] ApplyDiff of 512 MiB past a 64 MiB quota: {took:?}: {e}");
    assert!(took < Duration::from_secs(45), "ApplyDiff took {took:?}");
    assert!(
        cluster.pool_flags(&pool).iter().any(|f| f == "full_quota"),
        "the pool is not flagged over its quota"
    );

    // The container layer's writes stay in the page cache until its Put (written now, after the test's
    // flush of the first part of the stream).
    fs::write(mdir.join("unsynced"), vec![7u8; 8 << 20]).unwrap();
    // A call that must answer the class `no space: ... over its quota` within 45 s (where the store
    // unmounts or mounts, with that step named in the message).
    let over_quota = |what: &str, method: &str, body: serde_json::Value| {
        let t = Instant::now();
        let r = slow.call(method, body);
        let took = t.elapsed();
        eprintln!(
            "[rbd layers] {what} in a pool over its quota: {took:?}: HTTP {} {}",
            r.status,
            r.text()
        );
        assert!(
            r.err()
                .is_some_and(|e| e.starts_with("no space: ") && e.contains("over its quota")),
            "{what}: {}",
            r.text()
        );
        assert!(took < Duration::from_secs(45), "{what} took {took:?}");
    };
    // The container layer: its last Put writes into the full pool.
    over_quota("Put of a mounted layer", "Put", json!({"ID": "m"}));
    // rbd-fuse cannot open an image there (a watch is a write): the attachment is cut off, classed.
    over_quota("Get", "Get", json!({"ID": "m", "MountLabel": ""}));
    assert_nothing_attached(&l, &cluster, Duration::from_secs(30), "in a pool over its quota");
    // A child cannot be cloned either.
    c.call("Create", json!({"ID": "x", "Parent": "p"}))
        .expect_err_containing("Create in a pool over its quota", "no space", "over its quota");

    // The failed layer goes as dockerd removes it. Ceph refuses to remove a clone while its pool is over
    // its quota (the removal moves it to the pool's trash first): its image goes once there is room.
    c.call("Remove", json!({"ID": "big"})).ok("Remove big");

    // Room again.
    cluster.ceph_ok(&["osd", "pool", "set-quota", &pool, "max_bytes", "0"]);
    let t = Instant::now();
    let clear = poll(Duration::from_secs(60), || {
        (!cluster.pool_flags(&pool).iter().any(|f| f.starts_with("full"))).then_some(())
    });
    assert!(clear.is_some(), "the pool stayed full");
    // The test's flush of the stream's first part ends once the pool takes writes again.
    if let Some(mut f) = flush.take() {
        let _ = f.wait();
    }
    let gone = poll(Duration::from_secs(90), || {
        (sorted(layer_images(&cluster)) == others).then_some(())
    });
    assert!(
        gone.is_some(),
        "the failed layer's image {big_image} stays: {}",
        leftovers(&l, &cluster)
    );
    eprintln!(
        "[rbd layers] quota lifted: the failed layer's image removed after {:?}",
        t.elapsed()
    );
    let snaps = |img: &str| {
        let out = cluster.rbd_ok(&["snap", "ls", "--format", "json", &format!("{pool}/{img}")]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let mut seals: Vec<Vec<String>> = others.iter().map(|i| snaps(i)).collect();
    seals.sort();
    assert_eq!(
        seals,
        vec![vec![], vec!["sealed".to_string()]],
        "p sealed, m not: {others:?}"
    );
    let v = c
        .call("Get", json!({"ID": "m", "MountLabel": ""}))
        .ok("Get m with room");
    let mdir = Path::new(v["Dir"].as_str().unwrap()).to_path_buf();
    assert_eq!(
        fs::read(mdir.join("etc/p")).unwrap().len(),
        1 << 20,
        "m still holds its parent's file"
    );
    fs::write(mdir.join("after"), b"room again").unwrap();
    c.call("Put", json!({"ID": "m"})).ok("Put m with room");
    c.call("Create", json!({"ID": "big", "Parent": "p"}))
        .ok("Create big again");
    let mut body = streamed_random_tar(vec![("big".into(), 16 << 20, 12)]);
    c.apply_diff("big", "p", &mut body)
        .unwrap()
        .ok("ApplyDiff with room");
    assert_eq!(changes(&c, "big", "p"), vec!["1 /big".to_string()]);
    for id in ["big", "m", "p"] {
        c.call("Remove", json!({"ID": id})).ok(&format!("Remove {id}"));
    }
    assert_nothing_left(&l, &cluster);
    drop(l);
    cluster.stop();
}

/// lamina stopped (SIGTERM) with a chain of layers attached exits within seconds, leaves them mounted (as
/// at any stop: containers may use them), and the next start counts them again: each Put detaches its layer
/// and everything can be removed.
#[test]
fn rbd_layers_sigterm_with_layers_attached() {
    const LAYERS: usize = 12;
    let Some((_serial, mut cluster)) =
        ceph_test("rbd_layers_sigterm_with_layers_attached", false, "layerterm")
    else {
        return;
    };
    let mut l = lamina_on("rbdterm", &cluster);
    let c = l.client();
    let ids: Vec<String> = (0..LAYERS).map(|i| format!("l{i}")).collect();
    let mut parent = String::new();
    for (i, id) in ids.iter().enumerate() {
        c.call("Create", json!({"ID": id, "Parent": parent}))
            .ok(&format!("Create {id}"));
        let tar = TarBuilder::new()
            .file(&format!("f{i}"), 0o644, id.as_bytes())
            .finish();
        c.apply_diff(id, &parent, &mut &tar[..])
            .unwrap()
            .ok(&format!("ApplyDiff {id}"));
        parent = id.clone();
    }
    for id in &ids {
        c.call("Get", json!({"ID": id, "MountLabel": ""}))
            .ok(&format!("Get {id}"));
    }
    let attached = loops_under(&l.data_root).len();
    assert_eq!(attached, LAYERS, "one loop device per attached layer");

    assert_quick_stop(&mut l, &format!("with {LAYERS} layers attached"));
    assert_eq!(
        loops_under(&l.data_root).len(),
        LAYERS,
        "the attachments stay at a stop"
    );

    l.start_again();
    let c = l.client();
    for (i, id) in ids.iter().enumerate() {
        let v = c
            .call("Get", json!({"ID": id, "MountLabel": ""}))
            .ok(&format!("Get {id} after the restart"));
        let dir = Path::new(v["Dir"].as_str().unwrap()).to_path_buf();
        for j in 0..=i {
            assert!(dir.join(format!("f{j}")).exists(), "{id} holds f{j}");
        }
        // The Get of the new run and the one of the run before.
        c.call("Put", json!({"ID": id})).ok(&format!("Put {id}"));
        c.call("Put", json!({"ID": id})).ok(&format!("Put {id}"));
    }
    assert!(
        poll(Duration::from_secs(20), || loops_under(&l.data_root)
            .is_empty()
            .then_some(()))
        .is_some(),
        "attachments left after the Puts: {}",
        leftovers(&l, &cluster)
    );
    for id in ids.iter().rev() {
        c.call("Remove", json!({"ID": id})).ok(&format!("Remove {id}"));
    }
    assert_nothing_left(&l, &cluster);
    l.stop();
    cluster.stop();
}

/// The pattern of containerd's `128LayersMount` case, shorter: a chain of snapshots each prepared,
/// mounted by the client, written, unmounted and committed, then a view of the top mounted and unmounted.
/// lamina stopped (SIGTERM) exits within seconds; the next start serves the same chain; then the clean-up
/// of the suite's launcher (`lamina-testkit-serve`: detach what lamina left, remove the images), timed:
/// that clean-up, not lamina, is what outlasted the suite's patience after 129 images.
#[test]
fn rbd_layers_sigterm_after_snapshot_chain() {
    const LAYERS: usize = 16;
    let Some((_serial, mut cluster)) =
        ceph_test("rbd_layers_sigterm_after_snapshot_chain", false, "layerchain")
    else {
        return;
    };
    let (mut l, sock) = snapshotter_on("rbdchain", &cluster);
    let api = lamina_testkit::snapshots::SnapshotApi::connect(&sock);
    let mnt = l.dir().join("mnt");
    let mut parent = String::new();
    for i in 0..LAYERS {
        let key = format!("prepare-{i}");
        let m = api.prepare(&key, &parent).unwrap();
        mount_snapshot(&m, &mnt);
        fs::write(mnt.join(format!("f{i}")), key.as_bytes()).unwrap();
        umount(&mnt);
        parent = format!("committed-{i}");
        api.commit(&parent, &key).unwrap();
    }
    let m = api.view("view", &parent).unwrap();
    mount_snapshot(&m, &mnt);
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), LAYERS);
    umount(&mnt);
    drop(api);

    assert_quick_stop(&mut l, &format!("after a chain of {LAYERS} snapshots"));

    l.start_again();
    let api = lamina_testkit::snapshots::SnapshotApi::connect(&sock);
    let m = api.mounts("view").unwrap();
    mount_snapshot(&m, &mnt);
    assert_eq!(
        fs::read_dir(&mnt).unwrap().count(),
        LAYERS,
        "the view after the restart"
    );
    umount(&mnt);
    for i in 0..LAYERS {
        api.stat(&format!("committed-{i}")).unwrap();
    }
    drop(api);
    l.stop();

    let t = Instant::now();
    lamina_testkit::ceph::detach_rbd_layers(&l.data_root, Duration::from_secs(10)).unwrap();
    let detached = t.elapsed();
    let t = Instant::now();
    let n = cluster.remove_images(&cluster.pool, PREFIX).unwrap();
    let removed = t.elapsed();
    eprintln!(
        "[rbd layers] the launcher's clean-up: detach {detached:?}, {n} images removed in {removed:?} ({:?} each)",
        removed / n.max(1) as u32
    );
    assert_eq!(n, LAYERS + 1);
    assert_nothing_left(&l, &cluster);
    cluster.stop();
}
