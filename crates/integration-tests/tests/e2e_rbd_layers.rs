//! End-to-end tests of lamina's RBD layer backend (`[store] backend = "rbd"`) under its clients: dockerd 20.10
//! with `-s lamina`, containerd, and a client of the snapshotter API, on a data root whose layers are RBD images
//! in a throw-away Ceph cluster (testkit's `CephCluster`: one monitor, one memstore OSD, on 127.0.0.1). Images
//! reach the host through rbd-fuse and a loop device (this kernel has no rbd driver). The tests of lamina killed
//! or stopped with layers attached and of the cluster's faults are in `e2e_rbd_layers_faults.rs`, a binary of
//! their own so that the two run side by side; the helpers both use are in `lamina_testkit::rbd_layers`.
//!
//! Needs root, dockerd, containerd, runc, busybox-static and the Ceph packages (ceph-mon, ceph-osd,
//! ceph-common, rbd-fuse). Without them the tests print SKIPPED (and fail under CI=true).

use std::fs;
use std::time::Duration;

use lamina_testkit::ceph::{ceph_test, require_ceph, CephCluster, ObjectStore};
use lamina_testkit::docker_fixtures::*;
use lamina_testkit::rbd_layers::*;
use lamina_testkit::*;

#[test]
fn rbd_layers_under_dockerd() {
    let test = "rbd_layers_under_dockerd";
    // Declared first, dropped last: dockerd and lamina stop (and unmount) before the cluster goes away.
    let Some((_serial, mut cluster)) = ceph_test(test, true, "layers") else {
        return;
    };
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

#[test]
fn rbd_layers_containerd_snapshotter() {
    let Some((_serial, mut cluster)) = ceph_test("rbd_layers_containerd_snapshotter", false, "layersnap")
    else {
        return;
    };
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
