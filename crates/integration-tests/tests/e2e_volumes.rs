//! End-to-end tests of lamina's VolumeDriver: real dockerd 20.10 instances using `-d <lamina>` volumes,
//! on the `local` backend and on a real MooseFS cluster (master + 2 chunkservers in a network namespace,
//! see `common/moosefs.rs`) shared by two dockerd+lamina pairs ("hosts").
//!
//! Needs root, dockerd, containerd, runc, busybox-static, and for the MooseFS tests `ip`, `nsenter` and the
//! MooseFS packages (installed with apt-get when missing). Without them the tests print SKIPPED (and fail
//! under CI=true). They run one at a time (see `lamina_testkit::serial`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use lamina_testkit::moosefs::{require_moosefs, MooseCluster};
use lamina_testkit::*;
use serde_json::json;

const ID1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const ID2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// Writes `config.toml` in the lamina's directory and passes it with `--config`; returns the mount base.
fn inspect(d: &Dockerd, name: &str) -> serde_json::Value {
    let out = d.ok(&["volume", "inspect", name]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.retain(|n| n != ".lamina");
    v.sort();
    v
}

/// Every bad-input item of issue 5 point 5 that needs no cluster, on any backend: each a classed `Err`,
/// and nothing created.
fn bad_inputs(c: &PluginClient, backend_root: &Path) {
    let before = names_in(backend_root);
    let long = "x".repeat(256);
    for (name, want) in [
        ("", "empty"),
        (".", "not a directory name"),
        ("..", "not a directory name"),
        ("a/b", "'/'"),
        ("../escape", "'/'"),
        ("a\0b", "NUL"),
        (long.as_str(), "256 bytes"),
    ] {
        for m in ["Create", "Get", "Remove", "Path"] {
            let r = c.volume_call(m, json!({"Name": name}));
            let e = r.expect_err(&format!("{m} {name:?}"), "invalid argument");
            assert!(e.contains(want), "{m} {name:?}: {e}");
        }
        let r = c.volume_call("Mount", json!({"Name": name, "ID": ID1}));
        r.expect_err(&format!("Mount {name:?}"), "invalid argument");
    }
    for (opts, want) in [
        (json!({"ReplicationGoal": "0"}), "a numeric goal must be 1-9"),
        (json!({"ReplicationGoal": "10"}), "a numeric goal must be 1-9"),
        (json!({"ReplicationGoal": "two copies"}), "the character ' '"),
        (
            json!({"ReplicationGoal": "a.b"}),
            "neither a number 1-9 nor a goal name",
        ),
        (json!({"ReplicationGoal": ""}), "empty"),
        (json!({"size": "1G"}), "unknown option \"size\""),
        (json!({"ReplicationGoal": "2;reboot"}), "shell metacharacter ';'"),
        (json!({"ReplicationGoal": "$(id)"}), "shell metacharacter '$'"),
        (json!({"quota": "1G`id`"}), "shell metacharacter '`'"),
        (json!({"backend": "local|sh"}), "shell metacharacter '|'"),
        (json!({"x>y": "1"}), "shell metacharacter '>'"),
        (json!({"backend": "nfs"}), "must be \"local\" or \"moosefs\""),
        (json!({"quota": "lots"}), "not a size"),
    ] {
        let r = c.volume_call("Create", json!({"Name": "badopts", "Opts": opts}));
        let e = r.expect_err(&format!("Create with {opts}"), "invalid argument");
        assert!(e.contains(want), "{opts}: {e}");
    }
    assert_eq!(
        names_in(backend_root),
        before,
        "a refused Create left something behind"
    );
}

#[test]
fn local_backend_with_dockerd() {
    let test = "local_backend_with_dockerd";
    let Some(_serial) = serial_if(require_docker(test)) else {
        return;
    };
    let (mut lamina, mount_base) = Lamina::start_with_volumes("vol-local", "backend = \"local\"\n");
    let c = &lamina.client();
    let act = c.activate().unwrap().json();
    assert_eq!(act["Implements"], json!(["GraphDriver", "VolumeDriver"]), "{act}");
    let caps = c.volume_call("Capabilities", json!({})).ok("Capabilities");
    assert_eq!(caps, json!({"Capabilities": {"Scope": "local"}}));
    let root = lamina.data_root.join("volumes/local");
    bad_inputs(c, &root);
    let r = c.volume_call("Create", json!({"Name": "g", "Opts": {"ReplicationGoal": "2"}}));
    r.expect_err_containing("goal on local", "unsupported", "needs the moosefs backend");

    // dockerd uses lamina for both its layers and the volumes.
    let docker = Dockerd::start(&lamina.name);
    let img = busybox_image(&docker, "bb");
    let drv = lamina.name.clone();
    docker.ok(&["volume", "create", "-d", &drv, "v1"]);
    let v = inspect(&docker, "v1");
    assert_eq!(v["Driver"], drv.as_str());
    assert_eq!(v["Status"]["Backend"], "local", "{v}");
    assert!(
        v["CreatedAt"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z') || s.contains('+')),
        "{v}"
    );
    assert!(docker.ok(&["volume", "ls", "-q"]).lines().any(|l| l == "v1"));
    let e = docker.fails(&["volume", "create", "-d", &drv, "-o", "bogus=1", "v2"]);
    assert!(e.contains("invalid argument: unknown option \"bogus\""), "{e}");
    let e = docker.fails(&["volume", "create", "-d", &drv, "-o", "ReplicationGoal=1;id", "v2"]);
    assert!(e.contains("shell metacharacter ';'"), "{e}");
    assert!(!root.join("v2").exists());

    // A container writes, the data lands in the volume directory; nothing stays mounted afterwards.
    docker.ok(&[
        "run",
        "--rm",
        "-v",
        "v1:/data",
        &img,
        "sh",
        "-c",
        "echo hello > /data/f",
    ]);
    assert_eq!(fs::read_to_string(root.join("v1/f")).unwrap(), "hello\n");
    let mp = mount_base.join("v1");
    assert!(!is_mounted(&mp), "released after the container");

    // A running container holds a count; Remove through the socket is refused while it runs.
    docker.ok(&[
        "run", "-d", "--name", "c1", "-v", "v1:/data", &img, "sleep", "1000",
    ]);
    assert!(is_mounted(&mp));
    c.volume_call("Remove", json!({"Name": "v1"}))
        .expect_err_containing("Remove in use", "in use", "mounted on this host");
    let e = docker.fails(&["volume", "rm", "v1"]);
    assert!(e.contains("in use"), "{e}");

    // A lamina restart keeps the count and the mount.
    lamina.restart();
    let p = c.volume_call("Path", json!({"Name": "v1"})).ok("Path");
    assert_eq!(p["Mountpoint"], mp.display().to_string());
    let g = c.volume_call("Get", json!({"Name": "v1"})).ok("Get");
    assert_eq!(g["Volume"]["Status"]["Mounts"], "1", "{g}");
    assert_eq!(docker.ok(&["exec", "c1", "cat", "/data/f"]), "hello");
    // Counted per ID: a second Mount of the same ID needs two Unmounts.
    c.volume_call("Mount", json!({"Name": "v1", "ID": ID2}))
        .ok("Mount");
    c.volume_call("Mount", json!({"Name": "v1", "ID": ID2}))
        .ok("Mount");
    c.volume_call("Unmount", json!({"Name": "v1", "ID": ID2}))
        .ok("Unmount");
    c.volume_call("Unmount", json!({"Name": "v1", "ID": ID2}))
        .ok("Unmount");
    c.volume_call("Unmount", json!({"Name": "v1", "ID": ID2}))
        .ok("Unmount of a released id");
    assert!(is_mounted(&mp));
    docker.ok(&["rm", "-f", "c1"]);
    assert!(!is_mounted(&mp), "the last Unmount releases the mount");
    let p = c.volume_call("Path", json!({"Name": "v1"})).ok("Path");
    assert_eq!(p["Mountpoint"], "");

    // docker run -v with a volume that does not exist yet: dockerd creates it through the plugin.
    docker.ok(&[
        "run",
        "--rm",
        "--volume-driver",
        &drv,
        "-v",
        "newvol:/data",
        &img,
        "sh",
        "-c",
        "echo new > /data/n",
    ]);
    assert_eq!(fs::read_to_string(root.join("newvol/n")).unwrap(), "new\n");
    assert_eq!(inspect(&docker, "newvol")["Driver"], drv.as_str());

    docker.ok(&["volume", "rm", "v1", "newvol"]);
    assert_eq!(names_in(&root), Vec::<String>::new(), "Remove deletes the data");
    c.volume_call("Get", json!({"Name": "v1"})).expect_err_containing(
        "Get removed",
        "not found",
        "does not exist",
    );
}

/// One dockerd+lamina pair on the cluster.
struct Host {
    docker: Dockerd,
    lamina: Lamina,
    mount_base: PathBuf,
}

fn host(tag: &str, cluster: &MooseCluster) -> Host {
    let (lamina, mount_base) = Lamina::start_with_volumes(
        tag,
        &cluster.volumes_toml(8, "mount_options = [\"mfsioretries=3\"]\n"),
    );
    let docker = Dockerd::start("vfs");
    Host {
        docker,
        lamina,
        mount_base,
    }
}

fn mfs_tool(args: &[&str]) -> String {
    let out = run_ok(Command::new(find_bin(args[0]).unwrap()).args(&args[1..]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn moosefs_two_hosts() {
    let test = "moosefs_two_hosts";
    let Some(_serial) = serial_if(require_docker(test) && require_moosefs(test)) else {
        return;
    };
    // Declared first, dropped last: hosts stop (and unmount) before the cluster goes away.
    let mut cluster = MooseCluster::start("two-hosts");
    let mut h1 = host("vol-mfs1", &cluster);
    let h2 = host("vol-mfs2", &cluster);
    let (c1, c2) = (h1.lamina.client(), h2.lamina.client());
    let caps = c1.volume_call("Capabilities", json!({})).ok("Capabilities");
    assert_eq!(caps, json!({"Capabilities": {"Scope": "global"}}));
    let cluster_root = h1.lamina.data_root.join("volumes/moosefs/docker/volumes");
    let cluster_root2 = h2.lamina.data_root.join("volumes/moosefs/docker/volumes");
    bad_inputs(&c1, &cluster_root);

    let img1 = busybox_image(&h1.docker, "bb");
    let img2 = busybox_image(&h2.docker, "bb");
    let (d1, d2) = (h1.lamina.name.clone(), h2.lamina.name.clone());

    // Create with goal 2 on host 1: mfsgetgoal on the cluster directory says 2; Get reports it.
    h1.docker.ok(&[
        "volume",
        "create",
        "-d",
        &d1,
        "-o",
        "ReplicationGoal=2",
        "shared1",
    ]);
    let dir1 = cluster_root.join("shared1");
    let goal = mfs_tool(&["mfsgetgoal", dir1.to_str().unwrap()]);
    assert!(goal.trim_end().ends_with(": 2"), "mfsgetgoal: {goal}");
    let v = inspect(&h1.docker, "shared1");
    assert_eq!(v["Status"]["ReplicationGoal"], "2", "{v}");
    assert_eq!(v["Status"]["RemotePath"], "/docker/volumes/shared1", "{v}");
    // Goal 1 on another volume, checked the same way.
    h1.docker
        .ok(&["volume", "create", "-d", &d1, "-o", "ReplicationGoal=1", "single"]);
    let g1 = mfs_tool(&["mfsgetgoal", cluster_root.join("single").to_str().unwrap()]);
    assert!(g1.trim_end().ends_with(": 1"), "{g1}");

    // Both hosts list both volumes (host 2 never created anything).
    for (h, d) in [(&h1, &d1), (&h2, &d2)] {
        let ls = h
            .docker
            .ok(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
        assert!(ls.lines().any(|l| l == format!("{d} shared1")), "{ls}");
        assert!(ls.lines().any(|l| l == format!("{d} single")), "{ls}");
    }

    // Host 1 writes, host 2 reads.
    h1.docker.ok(&[
        "run",
        "--rm",
        "-v",
        "shared1:/data",
        &img1,
        "sh",
        "-c",
        "echo from-host-1 > /data/msg",
    ]);
    let got = h2
        .docker
        .ok(&["run", "--rm", "-v", "shared1:/data", &img2, "cat", "/data/msg"]);
    assert_eq!(got, "from-host-1");

    // A goal the goal command refuses: a clear error, nothing left in the cluster.
    let e = h1.docker.fails(&[
        "volume",
        "create",
        "-d",
        &d1,
        "-o",
        "ReplicationGoal=fast",
        "named",
    ]);
    assert!(
        e.contains("invalid argument: the goal command refused ReplicationGoal \"fast\""),
        "{e}"
    );
    assert!(!cluster_root2.join("named").exists());

    // Concurrent Create of one name on both hosts: one volume, no error for identical requests.
    let (a, b) = (c1.clone(), c2.clone());
    let t1 = thread::spawn(move || {
        a.volume_call(
            "Create",
            json!({"Name": "race", "Opts": {"ReplicationGoal": "2"}}),
        )
    });
    let t2 = thread::spawn(move || {
        b.volume_call(
            "Create",
            json!({"Name": "race", "Opts": {"ReplicationGoal": "2"}}),
        )
    });
    t1.join().unwrap().ok("Create race on host 1");
    t2.join().unwrap().ok("Create race on host 2");
    assert_eq!(names_in(&cluster_root).iter().filter(|n| *n == "race").count(), 1);
    c2.volume_call(
        "Create",
        json!({"Name": "race", "Opts": {"ReplicationGoal": "1"}}),
    )
    .expect_err_containing(
        "Create with other settings",
        "already exists",
        "ReplicationGoal 2",
    );

    // In use on host 1: docker volume rm fails, and so does the plugin's Remove.
    h1.docker.ok(&[
        "run",
        "-d",
        "--name",
        "c1",
        "-v",
        "shared1:/data",
        &img1,
        "sleep",
        "1000",
    ]);
    let mp1 = h1.mount_base.join("shared1");
    assert!(is_mounted(&mp1));
    let e = h1.docker.fails(&["volume", "rm", "shared1"]);
    assert!(e.contains("in use"), "{e}");
    c1.volume_call("Remove", json!({"Name": "shared1"}))
        .expect_err_containing("Remove in use", "in use", "mounted on this host");

    // A lamina restart in the middle keeps the mount counts (and the container's data path).
    h1.lamina.restart();
    let g = c1
        .volume_call("Get", json!({"Name": "shared1"}))
        .ok("Get after restart");
    assert_eq!(g["Volume"]["Status"]["Mounts"], "1", "{g}");
    assert_eq!(g["Volume"]["Mountpoint"], mp1.display().to_string());
    assert_eq!(h1.docker.ok(&["exec", "c1", "cat", "/data/msg"]), "from-host-1");
    c1.volume_call("Remove", json!({"Name": "shared1"}))
        .expect_err("Remove in use after restart", "in use");

    // The master killed: clear errors within the Docker timeouts, Get of known volumes still answers.
    cluster.kill_master();
    let took = c2.expect_volume_refusals(
        &[
            ("Create", json!({"Name": "while-down", "Opts": {}}), "unreachable"),
            ("Mount", json!({"Name": "single", "ID": ID1}), "unreachable"),
        ],
        "with the master down",
        "backend unavailable",
    );
    assert!(took < Duration::from_secs(25), "errors took {took:?}");
    let state = c2.volume_state("shared1");
    assert!(state.contains("unreachable"), "Get from the cache: {state}");
    let e = h2.docker.fails(&["volume", "create", "-d", &d2, "down2"]);
    assert!(e.contains("backend unavailable"), "{e}");
    // The running container on host 1 keeps its (already mounted) volume; a Mount of it is only counted.
    c1.volume_call("Mount", json!({"Name": "shared1", "ID": ID2}))
        .ok("Mount of a mounted volume");
    c1.volume_call("Unmount", json!({"Name": "shared1", "ID": ID2}))
        .ok("Unmount");

    // The master back: service resumes by itself.
    cluster.start_master(true);
    let back = poll(Duration::from_secs(90), || {
        let r = c2.volume_call("Create", json!({"Name": "after", "Opts": {}}));
        (r.status == 200).then_some(())
    });
    assert!(back.is_some(), "no recovery within 90 s after the master restart");
    assert!(cluster_root.join("after").is_dir(), "host 1 sees it too");
    h2.docker.ok(&[
        "run",
        "--rm",
        "-v",
        "single:/data",
        &img2,
        "sh",
        "-c",
        "echo ok > /data/x",
    ]);

    // After the container is gone, rm succeeds and the directory is gone from the cluster.
    h1.docker.ok(&["rm", "-f", "c1"]);
    assert!(!is_mounted(&mp1));
    h1.docker.ok(&["volume", "rm", "shared1"]);
    // Host 2's mfsmount may answer from its directory-entry cache (1 s by default) for a moment.
    let gone2 = poll(Duration::from_secs(10), || {
        (!cluster_root2.join("shared1").exists()).then_some(())
    });
    assert!(gone2.is_some(), "gone from the cluster (seen from host 2)");
    assert!(!cluster_root.join("shared1").exists());
    let ls = h2.docker.ok(&["volume", "ls", "-q"]);
    assert!(!ls.lines().any(|l| l == "shared1"), "{ls}");
    eprintln!("[{test}] MooseFS cluster start time: {:?}", cluster.start_time);
}
