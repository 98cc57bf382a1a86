//! End-to-end tests of lamina's RBD layer backend (`[store] backend = "rbd"`): dockerd 20.10 with `-s lamina`
//! on a data root whose layers are RBD images in a throw-away Ceph cluster (testkit's `CephCluster`: one
//! monitor, one memstore OSD, on 127.0.0.1). Images reach the host through rbd-fuse and a loop device (this
//! kernel has no rbd driver).
//!
//! Needs root, dockerd, containerd, runc, busybox-static and the Ceph packages (ceph-mon, ceph-osd,
//! ceph-common, rbd-fuse). Without them the tests print SKIPPED (and fail under CI=true).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lamina_testkit::ceph::{
    loops_under, rbd_store_toml, require_ceph, require_ceph_mgr, CephCluster, ObjectStore,
};
use lamina_testkit::docker_fixtures::*;
use lamina_testkit::faults::assert_fault_points;
use lamina_testkit::*;
use serde_json::json;

const PREFIX: &str = "e2e-layer-";

/// A lamina whose layers are images `PREFIX<n>` in `pool` (not started).
fn lamina_config(tag: &str, cluster: &CephCluster, pool: &str, timeout_secs: u64) -> Lamina {
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
fn lamina_on(tag: &str, cluster: &CephCluster) -> Lamina {
    let mut lamina = lamina_config(tag, cluster, &cluster.pool, 10);
    lamina.spawn();
    lamina.wait_ready();
    lamina
}

/// A lamina serving the snapshotter API on `snap.sock` in its directory, its layers images in the
/// cluster's pool (started); with that socket.
fn snapshotter_on(tag: &str, cluster: &CephCluster) -> (Lamina, PathBuf) {
    let l = lamina_config(tag, cluster, &cluster.pool, 10);
    let sock = l.dir().join("snap.sock");
    let mut l = l.snapshotter(&sock);
    l.spawn();
    l.wait_ready();
    (l, sock)
}

/// This data root's images in the pool.
fn layer_images(cluster: &CephCluster) -> Vec<String> {
    cluster
        .images(&cluster.pool)
        .into_iter()
        .filter(|i| i.starts_with(PREFIX))
        .collect()
}

/// Nothing of the store is left on the host or in the pool: no image, no mount, no loop device, no rbd-fuse.
/// Waits up to 90 s: an image whose rbd-fuse was cut off keeps that client's watch until the OSDs time it out
/// (30 s), and its removal (then its parent's), deferred until then, is retried in the background.
fn assert_nothing_left(lamina: &Lamina, cluster: &CephCluster) {
    let settled = poll(Duration::from_secs(90), || {
        (layer_images(cluster).is_empty()
            && cluster.client_pids().is_empty()
            && mounts_under(&lamina.data_root).is_empty()
            && loops_under(&lamina.data_root).is_empty())
        .then_some(())
    });
    assert!(
        settled.is_some(),
        "left behind: images {:?}, rbd-fuse/clients {:?}, mounts {:?}, loops {:?}; log:\n{}",
        layer_images(cluster),
        cluster.client_pids(),
        mounts_under(&lamina.data_root),
        loops_under(&lamina.data_root),
        lamina.log_tail()
    );
}

/// Starts `l` and panics unless it exits with a failure, having logged `needle`; `what` is what it must not do.
fn assert_start_refused(l: &mut Lamina, what: &str, needle: &str) {
    l.spawn();
    match l.poll_ready(Duration::from_secs(30)) {
        Ready::Exited(st) => assert!(!st.success()),
        other => panic!("lamina {what}: {other:?}"),
    }
    let log = fs::read_to_string(&l.log).unwrap_or_default();
    assert!(log.contains(needle), "{needle:?} not logged:\n{}", l.log_tail());
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("[rbd layers] {what}: {:?}", t.elapsed());
    r
}

#[test]
fn rbd_layers_under_dockerd() {
    let test = "rbd_layers_under_dockerd";
    let Some(_serial) = serial_if(require_docker(test) && require_ceph(test)) else {
        return;
    };
    // Declared first, dropped last: dockerd and lamina stop (and unmount) before the cluster goes away.
    let mut cluster = CephCluster::start_with("layers", ObjectStore::Memstore);
    let mut lamina = lamina_on("rbdlayers", &cluster);
    let d = Dockerd::start(&lamina.name);

    timed("docker import (busybox)", || busybox_image(&d, "bb:1"));
    assert_eq!(
        layer_images(&cluster).len(),
        1,
        "one image for the imported layer"
    );
    let out = timed("docker run --rm echo", || {
        d.ok(&["run", "--rm", "--network", "none", "bb:1", "echo", "hello"])
    });
    assert_eq!(out, "hello");

    // docker diff of a container against its image (init layer as parent).
    let run = DIFF_RUN;
    d.ok(&run);
    let got = timed("docker diff", || sorted_lines(&d.ok(&["diff", "c1"])));
    assert_eq!(got, EXPECTED_DIFF, "docker diff on the rbd backend");
    let size = d.ok(&["ps", "-a", "-s", "--filter", "name=c1", "--format", "{{.Size}}"]);
    assert!(size.contains("B (virtual "), "docker ps -s: {size:?}");

    // docker commit: the container's changes become an image layer cloned from the image's.
    timed("docker commit", || d.ok(&["commit", "c1", "committed:1"]));
    let out = d.ok(&[
        "run", "--rm", "--network", "none", "committed:1", "sh", "-c",
        "cat /new /a/b/c; test -e /etc/group && echo group || echo no-group; test -e /bin/vi && echo vi || echo no-vi",
    ]);
    assert_eq!(out, "x\nz\nno-group\nno-vi");

    // classic docker build: changed and deleted files, an opaque directory, hardlinks, VOLUME.
    timed("docker build (classic, 7 steps)", || build(&d, "built:1"));
    let effects = d.ok(&CHECK_RUN);
    assert_eq!(
        effects, EXPECTED_EFFECTS,
        "effects of the Dockerfile on the rbd backend"
    );
    let vols = d.ok(&["image", "inspect", "-f", "{{json .Config.Volumes}}", "built:1"]);
    assert_eq!(vols, r#"{"/data":{}}"#);

    // save | load into a vfs dockerd: the same DiffIDs and tree; and back, with dockerd's own tars (opaque
    // directories and whiteouts as its archive code writes them) applied as deletions.
    let vfs = Dockerd::start("vfs");
    busybox_image(&vfs, "bb:1");
    let tarball = d.dir().join("built.tar");
    timed("docker save", || {
        d.ok(&["save", "-o", tarball.to_str().unwrap(), "built:1"])
    });
    vfs.ok(&["load", "-i", tarball.to_str().unwrap()]);
    assert_same_image("loaded into vfs", &d, &vfs, "built:1");
    build(&vfs, "vbuilt:1");
    let vtar = vfs.dir().join("vbuilt.tar");
    vfs.ok(&["save", "-o", vtar.to_str().unwrap(), "vbuilt:1"]);
    timed("docker load", || d.ok(&["load", "-i", vtar.to_str().unwrap()]));
    assert_same_image("loaded from vfs", &d, &vfs, "vbuilt:1");
    drop(vfs);

    // lamina killed (-9) with a container running: the container keeps its tree, lamina takes it back.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "running",
        "--network",
        "none",
        "built:1",
        "sleep",
        "1000",
    ]);
    d.ok(&["exec", "running", "sh", "-c", "echo before > /state"]);
    lamina.kill9();
    timed("lamina start after kill -9", || lamina.start_again());
    assert_eq!(
        d.ok(&["exec", "running", "cat", "/state", "/keep/over"]),
        "before\nnew-content"
    );
    d.ok(&["exec", "running", "sh", "-c", "echo after > /state2"]);
    let got = sorted_lines(&d.ok(&["diff", "running"]));
    assert!(
        got.contains("A /state\n") || got.contains("A /state2"),
        "docker diff after the restart: {got}"
    );
    // And stopped cleanly (SIGTERM): the same.
    timed("lamina restart (SIGTERM)", || lamina.restart());
    assert_eq!(d.ok(&["exec", "running", "cat", "/state2"]), "after");
    d.ok(&["rm", "-f", "running"]);

    // rm and rmi: nothing left in the pool or on the host.
    remove_everything(&d);
    assert_nothing_left(&lamina, &cluster);

    // The data root is an rbd one: opening it as an overlay store is refused, naming both.
    drop(d);
    lamina.stop();
    lamina.extra_args.clear();
    assert_start_refused(
        &mut lamina,
        "opened an rbd data root as overlay",
        "holds layers of the rbd:",
    );
    cluster.stop();
}

/// Kills lamina and starts it again, with `faults` armed (or none).
fn restart(l: &mut Lamina, faults: Option<&str>) {
    l.kill9();
    l.env.retain(|(k, _)| k != "LAMINA_FAULTS");
    if let Some(f) = faults {
        l.env.push(("LAMINA_FAULTS".into(), f.into()));
    }
    l.start_again();
}

/// Sends a plugin call to a lamina armed to die in it, and waits for the death.
fn call_and_die(l: &mut Lamina, method: &str, body: serde_json::Value) {
    let mut b = serde_json::to_vec(&body).unwrap();
    b.push(b'\n');
    let _ = l.client().post_raw(&format!("/GraphDriver.{method}"), &b);
    assert!(
        l.wait_exit(Duration::from_secs(60)).is_some(),
        "the kill point in {method} did not fire; log:\n{}",
        l.log_tail()
    );
}

fn changes(c: &PluginClient, id: &str, parent: &str) -> Vec<String> {
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

#[test]
fn rbd_layers_kill9_mid_operation() {
    let test = "rbd_layers_kill9_mid_operation";
    let Some(_serial) = serial_if(require_root(test) && require_ceph(test)) else {
        return;
    };
    assert_fault_points();
    let mut cluster = CephCluster::start_with("layerkill", ObjectStore::Memstore);
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
    restart(&mut l, Some("store.rbd.seal.snap=kill"));
    let mut tar = &top[..];
    let _ = l.client().apply_diff("l2", "l1", &mut tar);
    assert!(
        l.wait_exit(Duration::from_secs(60)).is_some(),
        "the seal's kill point did not fire"
    );
    restart(&mut l, None);
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
    restart(&mut l, Some("rbd.attach.mapped=kill"));
    call_and_die(&mut l, "Get", json!({"ID": "l2", "MountLabel": ""}));
    assert!(!cluster.client_pids().is_empty(), "rbd-fuse runs after the kill");
    restart(&mut l, None);
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
    restart(&mut l, None);
    let c = l.client();
    assert!(
        is_mounted(Path::new(&dir)),
        "the mount of a known layer survives the restart"
    );
    c.call("Put", json!({"ID": "l2"})).ok("Put l2");
    assert!(!is_mounted(Path::new(&dir)));

    // Recorded but no image yet: the restart makes it.
    restart(&mut l, Some("store.create.mkdir=kill"));
    call_and_die(&mut l, "Create", json!({"ID": "l3", "Parent": "l2"}));
    assert_eq!(layer_images(&cluster).len(), 2);
    restart(&mut l, None);
    assert_eq!(
        layer_images(&cluster).len(),
        3,
        "the restart made the recorded layer's image"
    );
    let c = l.client();
    assert_eq!(changes(&c, "l3", "l2"), Vec::<String>::new());

    // Cloned and recorded, killed before the answer: a Remove takes it.
    restart(&mut l, Some("store.create.done=kill"));
    call_and_die(&mut l, "Create", json!({"ID": "l4", "Parent": "l2"}));
    restart(&mut l, None);
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
    let test = "rbd_layers_errors_and_clone_figures";
    let Some(_serial) = serial_if(require_root(test) && require_ceph(test)) else {
        return;
    };
    let mut cluster = CephCluster::start_with("layererr", ObjectStore::Memstore);

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
    restart(l, None);
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

/// The images, snapshots, attachments and rbd-fuse processes of this data root, for messages.
fn leftovers(l: &Lamina, cluster: &CephCluster) -> String {
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
fn assert_nothing_attached(l: &Lamina, cluster: &CephCluster, within: Duration, when: &str) {
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

    // 64 MiB for the pool; the layer is 1 GiB.
    cluster.ceph_ok(&["osd", "pool", "set-quota", &pool, "max_bytes", "67108864"]);
    assert!(
        !cluster.pool_flags(&pool).iter().any(|f| f == "full_quota"),
        "the pool is over its quota before the apply"
    );
    // The container layer's writes stay in the page cache until its Put.
    fs::write(mdir.join("unsynced"), vec![7u8; 8 << 20]).unwrap();
    let t = Instant::now();
    let mut slow = l.client();
    slow.timeout = Duration::from_secs(180);
    let mut body = streamed_random_tar(vec![("big".into(), 1 << 30, 11)]);
    let r = slow
        .apply_diff("big", "p", &mut body)
        .unwrap_or_else(|e| panic!("ApplyDiff: {e} after {:?}; log:\n{}", t.elapsed(), l.log_tail()));
    let took = t.elapsed();
    drop(body);
    let e = r.expect_err_containing(
        "ApplyDiff of 1 GiB into a pool with a 64 MiB quota",
        "no space",
        &format!("pool \"{pool}\" is over its quota"),
    );
    eprintln!("[rbd layers] ApplyDiff of 1 GiB past a 64 MiB quota: {took:?}: {e}");
    assert!(took < Duration::from_secs(45), "ApplyDiff took {took:?}");
    assert!(
        cluster.pool_flags(&pool).iter().any(|f| f == "full_quota"),
        "the pool is not flagged over its quota"
    );

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

/// Mounts the one mount a Prepare/View of the rbd backend answers (a bind of the layer's filesystem) at
/// `target`, as containerd does.
fn mount_snapshot(mounts: &[lamina_snapshotter::proto::containerd::types::Mount], target: &Path) {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    assert_eq!(m.r#type, "bind", "{m:?}");
    fs::create_dir_all(target).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "bind", &m.source])
        .arg(target)
        .args(["-o", &m.options.join(",")])
        .status()
        .unwrap();
    assert!(st.success(), "mount {m:?} failed");
}

#[test]
fn rbd_layers_containerd_snapshotter() {
    let test = "rbd_layers_containerd_snapshotter";
    let Some(_serial) = serial_if(require_root(test) && require_ceph(test)) else {
        return;
    };
    let mut cluster = CephCluster::start_with("layersnap", ObjectStore::Memstore);
    let (l, sock) = snapshotter_on("rbdsnap", &cluster);
    let api = lamina_testkit::snapshots::SnapshotApi::connect(&sock);
    let mnt = l.dir().join("mnt");

    // An active snapshot on nothing: an empty filesystem, written through containerd's bind mount.
    let m = timed("Prepare (base: image + mkfs)", || api.prepare("a", "").unwrap());
    mount_snapshot(&m, &mnt);
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0, "a new layer is empty");
    fs::create_dir(mnt.join("etc")).unwrap();
    fs::write(mnt.join("etc/a"), "a").unwrap();
    fs::write(mnt.join("etc/b"), "b").unwrap();
    umount(&mnt);
    timed("Commit (base)", || api.commit("base", "a").unwrap());

    // A child: a clone of the seal, holding the whole tree.
    let m = timed("Prepare (child: clone)", || api.prepare("b", "base").unwrap());
    mount_snapshot(&m, &mnt);
    assert_eq!(fs::read_to_string(mnt.join("etc/a")).unwrap(), "a");
    fs::remove_file(mnt.join("etc/a")).unwrap();
    fs::write(mnt.join("etc/c"), "c").unwrap();
    umount(&mnt);
    assert_eq!(api.mounts("b").unwrap(), m, "Mounts answers what Prepare did");
    api.commit("top", "b").unwrap();

    // A view: read-only.
    let m = api.view("v", "top").unwrap();
    mount_snapshot(&m, &mnt);
    assert!(!mnt.join("etc/a").exists());
    assert_eq!(fs::read_to_string(mnt.join("etc/c")).unwrap(), "c");
    assert!(fs::write(mnt.join("x"), "x").is_err(), "a view is read-only");
    umount(&mnt);

    // Committed while the client still has it mounted (containerd's suite does this): sealed in place
    // (synced, frozen, flushed, snapshot), the image stays attached for that mount, and a child clones the
    // seal, so it never sees what is written after the commit.
    let m = api.prepare("c", "top").unwrap();
    mount_snapshot(&m, &mnt);
    fs::write(mnt.join("etc/d"), "d").unwrap();
    timed("Commit (still mounted)", || api.commit("kept", "c").unwrap());
    fs::write(mnt.join("etc/late"), "late").unwrap();
    let mnt2 = l.dir().join("mnt2");
    let m = api.prepare("e", "kept").unwrap();
    mount_snapshot(&m, &mnt2);
    assert_eq!(fs::read_to_string(mnt2.join("etc/d")).unwrap(), "d");
    assert!(
        !mnt2.join("etc/late").exists(),
        "a child never sees writes made after its parent's commit"
    );
    // Removed while still mounted: the image goes once that mount does.
    api.remove("e").unwrap();
    let before = mounts_under(&l.data_root).len();
    umount(&mnt2);
    umount(&mnt);
    let detached = poll(Duration::from_secs(20), || {
        (mounts_under(&l.data_root).len() + 4 == before).then_some(())
    });
    assert!(
        detached.is_some(),
        "the released layers are detached once the client's mounts are gone: {:?}",
        mounts_under(&l.data_root)
    );

    // Removal rules are the store's: a parent with children stays.
    assert!(api.remove("top").is_err(), "top has the view as child");
    for key in ["kept", "v", "top", "base"] {
        api.remove(key).unwrap_or_else(|e| panic!("Remove {key}: {e}"));
    }
    assert_nothing_left(&l, &cluster);
    drop(api);
    drop(l);
    cluster.stop();
}

#[test]
fn rbd_layers_under_containerd() {
    use lamina_testkit::containerd::{
        require_containerd, whiteout_image, Containerd, PROXY_NAME, WHITEOUT_EXPECTED, WHITEOUT_IMAGE,
        WHITEOUT_SCRIPT,
    };
    let test = "rbd_layers_under_containerd";
    let Some(_serial) = serial_if(require_containerd(test) && require_ceph(test)) else {
        return;
    };
    let mut cluster = CephCluster::start_with("layerctrd", ObjectStore::Memstore);
    let (l, sock) = snapshotter_on("rbdctrd", &cluster);
    let dir = TestDir::new(&unique_name(test));
    let ctrd = Containerd::start(&dir.join("containerd"), Some(&sock));
    let work = dir.join("work");
    fs::create_dir_all(&work).unwrap();
    let image = whiteout_image(&work);
    timed("ctr images import (3 layers)", || {
        ctrd.ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            PROXY_NAME,
            image.tar.to_str().unwrap(),
        ])
    });
    assert_eq!(layer_images(&cluster).len(), 3, "one image per layer");
    let run = |id: &str, script: &str| {
        ctrd.try_run_in(&ctrd.namespace, &["--rm"], PROXY_NAME, WHITEOUT_IMAGE, id, script)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let out = timed("ctr run --rm", || run("c1", WHITEOUT_SCRIPT));
    assert_eq!(
        out, WHITEOUT_EXPECTED,
        "whiteouts and the opaque directory applied as deletions"
    );
    let out = run(
        "c2",
        "echo changed > /etc/lamina/layer1 && rm /etc/lamina/layer2 && touch /gone.txt && cat /etc/lamina/layer1",
    );
    assert_eq!(out, "changed\n");
    assert_eq!(
        run("c3", WHITEOUT_SCRIPT),
        WHITEOUT_EXPECTED,
        "a container's writes stay in its own layer"
    );

    ctrd.ctr_ok(&["images", "rm", "--sync", WHITEOUT_IMAGE]);
    let gone = poll(Duration::from_secs(60), || {
        ctrd.gc_now();
        layer_images(&cluster).is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "images left after `ctr images rm` + GC: {:?}",
        layer_images(&cluster)
    );
    assert_nothing_left(&l, &cluster);
    drop(ctrd);
    drop(l);
    cluster.stop();
}

/// lamina stopped (SIGTERM) with a chain of layers attached exits within seconds, leaves them mounted (as
/// at any stop: containers may use them), and the next start counts them again: each Put detaches its layer
/// and everything can be removed.
#[test]
fn rbd_layers_sigterm_with_layers_attached() {
    let test = "rbd_layers_sigterm_with_layers_attached";
    let Some(_serial) = serial_if(require_root(test) && require_ceph(test)) else {
        return;
    };
    const LAYERS: usize = 12;
    let mut cluster = CephCluster::start_with("layerterm", ObjectStore::Memstore);
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

    let t = Instant::now();
    let st = l.stop();
    let took = t.elapsed();
    eprintln!("[rbd layers] SIGTERM with {LAYERS} layers attached: exited after {took:?} ({st})");
    assert!(st.success(), "lamina exited with {st}; log:\n{}", l.log_tail());
    assert!(
        took < Duration::from_secs(5),
        "lamina took {took:?} to exit on SIGTERM"
    );
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
    let test = "rbd_layers_sigterm_after_snapshot_chain";
    let Some(_serial) = serial_if(require_root(test) && require_ceph(test)) else {
        return;
    };
    const LAYERS: usize = 16;
    let mut cluster = CephCluster::start_with("layerchain", ObjectStore::Memstore);
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

    let t = Instant::now();
    let st = l.stop();
    let took = t.elapsed();
    eprintln!("[rbd layers] SIGTERM after a chain of {LAYERS} snapshots: exited after {took:?} ({st})");
    assert!(st.success(), "lamina exited with {st}; log:\n{}", l.log_tail());
    assert!(
        took < Duration::from_secs(5),
        "lamina took {took:?} to exit on SIGTERM"
    );

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
