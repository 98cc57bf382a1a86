//! End-to-end tests of lamina's RBD layer backend (`[store] backend = "rbd"`): dockerd 20.10 with `-s lamina`
//! on a data root whose layers are RBD images in a throw-away Ceph cluster (testkit's `CephCluster`: one
//! monitor, one memstore OSD, on 127.0.0.1). Images reach the host through rbd-fuse and a loop device (this
//! kernel has no rbd driver).
//!
//! Needs root, dockerd, containerd, runc, busybox-static and the Ceph packages (ceph-mon, ceph-osd,
//! ceph-common, rbd-fuse). Without them the tests print SKIPPED (and fail under CI=true).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use lamina_testkit::ceph::{require_ceph, CephCluster, ObjectStore};
use lamina_testkit::docker_fixtures::*;
use lamina_testkit::*;

const PREFIX: &str = "e2e-layer-";

/// A lamina whose layers are images `PREFIX<n>` in the cluster's pool (started).
fn lamina_on(tag: &str, cluster: &CephCluster) -> Lamina {
    let mut lamina = Lamina::new(&unique_name(tag));
    let text = format!(
        "[store]\nbackend = \"rbd\"\n[store.rbd]\nceph_conf = \"{}\"\npool = \"{}\"\nimage_prefix = \"{PREFIX}\"\n\
         map = \"fuse\"\nsize = \"1G\"\ntimeout_secs = 10\n",
        cluster.conf().display(),
        cluster.pool,
    );
    let cfg = lamina.dir().join("config.toml");
    fs::write(&cfg, text).unwrap();
    lamina.extra_args = vec!["--config".into(), cfg.display().to_string()];
    lamina.spawn();
    lamina.wait_ready();
    lamina
}

/// This data root's images in the pool.
fn layer_images(cluster: &CephCluster) -> Vec<String> {
    cluster
        .images(&cluster.pool)
        .into_iter()
        .filter(|i| i.starts_with(PREFIX))
        .collect()
}

/// Loop devices reading from below `root`.
fn loops_under(root: &Path) -> Vec<String> {
    let root = root.display().to_string();
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let b = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            b.trim_end().starts_with(&root).then_some(name)
        })
        .collect()
}

/// Nothing of the store is left on the host or in the pool: no image, no mount, no loop device, no rbd-fuse.
fn assert_nothing_left(lamina: &Lamina, cluster: &CephCluster) {
    let settled = poll(Duration::from_secs(20), || {
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

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("[rbd layers] {what}: {:?}", t.elapsed());
    r
}

#[test]
fn rbd_layers_under_dockerd() {
    let test = "rbd_layers_under_dockerd";
    if !require_docker(test) || !require_ceph(test) {
        return;
    }
    let _serial = serial();
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
    let run = [
        "run",
        "--name",
        "c1",
        "--network",
        "none",
        "bb:1",
        "sh",
        "-c",
        DIFF_STEPS,
    ];
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
    let effects = d.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "built:1",
        "sh",
        "-c",
        CHECK_EFFECTS,
    ]);
    assert_eq!(
        effects, EXPECTED_EFFECTS,
        "effects of the Dockerfile on the rbd backend"
    );
    let vols = d.ok(&["image", "inspect", "-f", "{{json .Config.Volumes}}", "built:1"]);
    assert_eq!(vols, r#"{"/data":{}}"#);

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
    d.ok(&["rm", "-f", "running"]);

    // rm and rmi: nothing left in the pool or on the host.
    let ids = d.ok(&["ps", "-aq"]);
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids.lines());
        d.ok(&args);
    }
    for _ in 0..5 {
        let imgs = d.ok(&["images", "-q"]);
        if imgs.is_empty() {
            break;
        }
        let mut imgs: Vec<&str> = imgs.lines().collect();
        imgs.sort();
        imgs.dedup();
        let mut args = vec!["rmi", "-f"];
        args.extend(imgs);
        let _ = d.docker(&args);
    }
    assert_eq!(d.ok(&["images", "-aq"]), "");
    assert_nothing_left(&lamina, &cluster);

    // The data root is an rbd one: opening it as an overlay store is refused, naming both.
    drop(d);
    lamina.stop();
    lamina.extra_args.clear();
    lamina.spawn();
    match lamina.poll_ready(Duration::from_secs(30)) {
        Ready::Exited(st) => assert!(!st.success()),
        other => panic!("lamina opened an rbd data root as overlay: {other:?}"),
    }
    let log = fs::read_to_string(&lamina.log).unwrap_or_default();
    assert!(
        log.contains("holds layers of the rbd:"),
        "refusal not logged:\n{}",
        lamina.log_tail()
    );
    cluster.stop();
}
