//! End-to-end tests: a real dockerd 20.10 (`--experimental -s <plugin>`) using lamina as its storage driver.
//!
//! Every test starts its own lamina and its own dockerd (plus a second dockerd on the built-in `vfs` driver
//! where that one serves as the oracle). Tests need root, dockerd, containerd, runc and busybox-static; without
//! them they print `SKIPPED` (and fail under `CI=true`). They run one at a time (see `lamina_testkit::serial`).
//!
//! `LAMINA_E2E_DRIVER=vfs` runs the same tests against dockerd's built-in vfs driver instead of lamina, which
//! validates the tests' own expectations (lamina-specific checks are then left out).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::MutexGuard;
use std::thread;
use std::time::{Duration, Instant};

use lamina_testkit::docker_fixtures::*;
use lamina_testkit::*;

/// One lamina (unless the driver under test is vfs) and one dockerd using it. Fields drop in order: dockerd
/// stops before lamina, and the serialisation guard is released last.
struct Setup {
    docker: Dockerd,
    lamina: Option<Lamina>,
    _serial: Option<MutexGuard<'static, ()>>,
}

fn setup(test: &str) -> Option<Setup> {
    let serial = serial_if(require_docker(test))?;
    let started = Instant::now();
    let (docker, lamina) = if std::env::var("LAMINA_E2E_DRIVER").as_deref() == Ok("vfs") {
        (Dockerd::start("vfs"), None)
    } else {
        let lamina = Lamina::start(&unique_name(test));
        (Dockerd::start(&lamina.name), Some(lamina))
    };
    eprintln!("[{test}] lamina + dockerd ready in {:?}", started.elapsed());
    Some(Setup {
        docker,
        lamina,
        _serial: serial,
    })
}

impl Setup {
    fn lamina(&mut self) -> Option<&mut Lamina> {
        self.lamina.as_mut()
    }

    /// The `Layers` row of lamina's `docker info` status.
    fn status_layers(&self) -> Option<u64> {
        self.status_row("layers")
    }

    /// A numeric row of lamina's `docker info` status.
    fn status_row(&self, name: &str) -> Option<u64> {
        self.docker
            .driver_status()
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(k, v)| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("status row {k:?} has value {v:?}"))
            })
    }
}

/// A vfs dockerd with the busybox image, for oracles.
fn vfs_with_busybox(tag: &str) -> Dockerd {
    let vfs = Dockerd::start("vfs");
    busybox_image(&vfs, tag);
    vfs
}

#[test]
fn discovery_and_status() {
    let Some(mut s) = setup("discovery") else { return };
    let name = s.docker.driver.clone();
    assert_eq!(s.docker.ok(&["info", "--format", "{{.Driver}}"]), name);
    if s.lamina().is_some() {
        let rows = s.docker.driver_status();
        eprintln!("docker info status rows: {rows:?}");
        assert!(!rows.is_empty(), "lamina reported no Status rows");
        assert_eq!(
            s.status_layers(),
            Some(0),
            "fresh store must report Layers 0; rows: {rows:?}"
        );
        let info = s.docker.ok(&["info"]);
        assert!(
            info.contains(&format!("Storage Driver: {name}")),
            "docker info:\n{info}"
        );
    }
}

#[test]
fn import_and_run_hello() {
    let Some(s) = setup("hello") else { return };
    busybox_image(&s.docker, "bb:1");
    let out = s
        .docker
        .ok(&["run", "--rm", "--network", "none", "bb:1", "echo", "hello"]);
    assert_eq!(out, "hello");
    // the same image again, and a container writing into its layer
    let out = s.docker.ok(&[
        "run",
        "--rm",
        "bb:1",
        "sh",
        "-c",
        "echo data > /tmp/x && cat /tmp/x && ls /bin/busybox",
    ]);
    assert_eq!(out, "data\n/bin/busybox");
}

#[test]
fn build_classic_dockerfile_effects() {
    let Some(s) = setup("build") else { return };
    busybox_image(&s.docker, "bb:1");
    build(&s.docker, "built:1");
    let check = CHECK_RUN;
    let effects = s.docker.ok(&check);
    assert_eq!(
        effects, EXPECTED_EFFECTS,
        "effects of the Dockerfile as seen in a container"
    );
    let vols = s
        .docker
        .ok(&["image", "inspect", "-f", "{{json .Config.Volumes}}", "built:1"]);
    assert_eq!(vols, r#"{"/data":{}}"#);

    // the whole visible tree equals the one built by dockerd's own vfs driver
    let tree = list_tree(&s.docker, "built:1");
    let vfs = vfs_with_busybox("bb:1");
    build(&vfs, "built:1");
    assert_eq!(
        vfs.ok(&check),
        EXPECTED_EFFECTS,
        "oracle (vfs) disagrees with the expected effects"
    );
    assert_same_tree(
        "built:1",
        &s.docker.driver,
        &tree,
        "vfs",
        &list_tree(&vfs, "built:1"),
    );
}

#[test]
fn docker_diff_exact() {
    let Some(s) = setup("diff") else { return };
    busybox_image(&s.docker, "bb:1");
    let run = DIFF_RUN;
    s.docker.ok(&run);
    let got = sorted_lines(&s.docker.ok(&["diff", "c1"]));
    let vfs = vfs_with_busybox("bb:1");
    vfs.ok(&run);
    let oracle = sorted_lines(&vfs.ok(&["diff", "c1"]));
    assert_eq!(
        oracle, EXPECTED_DIFF,
        "oracle (vfs) disagrees with the written expectation"
    );
    assert_eq!(got, EXPECTED_DIFF, "docker diff on {}", s.docker.driver);
    // DiffSize (docker ps -s) answers
    let size = s
        .docker
        .ok(&["ps", "-a", "-s", "--filter", "name=c1", "--format", "{{.Size}}"]);
    assert!(size.contains("B (virtual "), "docker ps -s: {size:?}");
    // a container that changed nothing has an empty diff
    s.docker
        .ok(&["run", "--name", "c2", "--network", "none", "bb:1", "true"]);
    assert_eq!(s.docker.ok(&["diff", "c2"]), "");
}

#[test]
fn commit_then_run() {
    let Some(s) = setup("commit") else { return };
    let d = &s.docker;
    busybox_image(d, "bb:1");
    d.ok(&[
        "run",
        "--name",
        "c1",
        "bb:1",
        "sh",
        "-c",
        "echo committed > /c.txt && rm /etc/group && mkdir -p /x/y && echo 1 > /x/y/z && rm -rf /root && mkdir /root && echo r > /root/new",
    ]);
    d.ok(&["commit", "c1", "committed:1"]);
    let check = "cat /c.txt; test -e /etc/group || echo no-group; cat /x/y/z; ls -A /root";
    assert_eq!(
        d.ok(&["run", "--rm", "committed:1", "sh", "-c", check]),
        "committed\nno-group\n1\nnew"
    );
    // a second generation on top of the committed image, from a running container
    d.run_detached(
        "c2",
        "committed:1",
        "echo two >> /c.txt && rm /x/y/z && sleep 1000",
    );
    thread::sleep(Duration::from_millis(500));
    d.ok(&["commit", "c2", "committed:2"]);
    d.ok(&["rm", "-f", "c2"]);
    assert_eq!(
        d.ok(&[
            "run",
            "--rm",
            "committed:2",
            "sh",
            "-c",
            "cat /c.txt; ls -A /x/y | wc -l"
        ]),
        "committed\ntwo\n0"
    );
    let layers = d.ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", "committed:2"]);
    assert_eq!(layers, "3");
}

#[test]
fn save_load_roundtrip_with_vfs() {
    let Some(s) = setup("saveload") else { return };
    let d = &s.docker;
    busybox_image(d, "bb:1");
    build(d, "built:1");
    let vfs = vfs_with_busybox("bb:1");

    // lamina -> vfs
    let tarball = d.dir().join("built.tar");
    d.ok(&["save", "-o", tarball.to_str().unwrap(), "built:1"]);
    vfs.ok(&["load", "-i", tarball.to_str().unwrap()]);
    assert_same_image("loaded into vfs", d, &vfs, "built:1");

    // vfs -> lamina (tars written by dockerd's own archive code, with whiteouts and opaque dirs)
    build(&vfs, "vbuilt:1");
    let vtar = vfs.dir().join("vbuilt.tar");
    vfs.ok(&["save", "-o", vtar.to_str().unwrap(), "vbuilt:1"]);
    d.ok(&["load", "-i", vtar.to_str().unwrap()]);
    assert_same_image("loaded from vfs", d, &vfs, "vbuilt:1");
    assert_eq!(
        d.ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "vbuilt:1",
            "sh",
            "-c",
            CHECK_EFFECTS
        ]),
        EXPECTED_EFFECTS
    );
}

/// Mount points that name `root`.
fn mounts_naming(root: &Path) -> Vec<String> {
    let needle = root.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn rm_and_rmi_leave_nothing() {
    let Some(mut s) = setup("rmrmi") else { return };
    let data_root: Option<PathBuf> = s.lamina().map(|l| l.data_root.clone());
    let before = data_root.as_deref().map(tree_snapshot);
    let layer_dirs_before = data_root.as_deref().map(layer_dir_count);
    let d = &s.docker;
    busybox_image(d, "bb:1");
    build(d, "built:1");
    d.ok(&["run", "--name", "stopped", "built:1", "sh", "-c", "echo x > /x"]);
    d.ok(&["create", "--name", "created", "bb:1", "true"]);
    d.ok(&["run", "-d", "--name", "running", "bb:1", "sleep", "1000"]);
    d.ok(&["commit", "stopped", "committed:1"]);
    d.ok(&["run", "--rm", "committed:1", "cat", "/x"]);
    if s.lamina.is_some() {
        let n = s.status_layers().expect("Layers row");
        assert!(
            n >= 10,
            "lamina reports only {n} layers while images and containers exist"
        );
    }

    let d = &s.docker;
    remove_everything(d);
    d.remove_unused_local_volumes();

    if let (Some(root), Some(before)) = (data_root, before) {
        assert_eq!(s.status_layers(), Some(0), "Layers row after removing everything");
        assert_eq!(
            s.status_row("mounted layers"),
            Some(0),
            "Mounted Layers row after removing everything"
        );
        assert_store_empty(&root, &before, layer_dirs_before.unwrap_or(0));
    }
}

/// Number of layer directories (`<data root>/layers/*`, docs/on-disk-format.md), without the spares.
fn layer_dir_count(root: &Path) -> usize {
    lamina_testkit::layer_dirs_without_spares(&root.join("layers")).len()
}

/// What is new in the data root `root` since `before`, but for the store's spare layer directories
/// (docs/on-disk-format.md), which a running daemon keeps ready: at most eight trees of empty directories in
/// `layers/`, and the one being made in `spare/`.
fn leaked_beyond_spares(root: &Path, before: &std::collections::BTreeSet<(PathBuf, bool)>) -> Vec<PathBuf> {
    let spare = root.join("spare");
    let layers = root.join("layers");
    let not_spares: std::collections::BTreeSet<PathBuf> = lamina_testkit::layer_dirs_without_spares(&layers)
        .into_iter()
        .collect();
    let spare_layers: Vec<PathBuf> = fs::read_dir(&layers)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !not_spares.contains(p))
        .collect();
    let now = tree_snapshot(root);
    let in_making = fs::read_dir(&spare).map(|rd| rd.count()).unwrap_or(0);
    let files_in_spare = now.iter().any(|(p, is_dir)| !is_dir && p.starts_with(&spare));
    leaked_paths(before, &now)
        .into_iter()
        .filter(|p| !p.starts_with(&spare) || in_making > 1 || files_in_spare)
        .filter(|p| !spare_layers.iter().any(|s| p.starts_with(s)))
        .collect()
}

/// After everything was removed: no mounts name the data root, the layer directory count is back to its
/// start value and nothing new is left in the data root but the spare layer directories (removed layers may
/// take a moment to leave trash/).
fn assert_store_empty(root: &Path, before: &std::collections::BTreeSet<(PathBuf, bool)>, layer_dirs: usize) {
    let mounts = mounts_naming(root);
    assert!(
        mounts.is_empty(),
        "mounts left under the data root:\n{}",
        mounts.join("\n")
    );
    let settled = poll(Duration::from_secs(15), || {
        (layer_dir_count(root) == layer_dirs && leaked_beyond_spares(root, before).is_empty()).then_some(())
    });
    if settled.is_none() {
        let leaked = leaked_beyond_spares(root, before);
        panic!(
            "data root not back to its start state: {} layer dirs (was {layer_dirs}); left: {:#?}",
            layer_dir_count(root),
            &leaked[..leaked.len().min(50)]
        );
    }
}

#[test]
fn dockerd_restart_then_start_attach() {
    let Some(mut s) = setup("dockerdrestart") else {
        return;
    };
    busybox_image(&s.docker, "bb:1");
    let script = "cat /state 2>/dev/null || echo none; echo run >> /state";
    assert_eq!(
        s.docker.ok(&["run", "--name", "c1", "bb:1", "sh", "-c", script]),
        "none"
    );
    s.docker
        .ok(&["run", "-d", "--name", "r1", "bb:1", "sleep", "1000"]);
    s.docker.restart();
    assert_eq!(s.docker.ok(&["start", "-a", "c1"]), "run");
    assert_eq!(s.docker.ok(&["start", "-a", "c1"]), "run\nrun");
    // the container that was running when dockerd stopped
    s.docker.ok(&["start", "r1"]);
    assert_eq!(s.docker.ok(&["exec", "r1", "echo", "alive"]), "alive");
    s.docker.ok(&["rm", "-f", "r1", "c1"]);
    assert_eq!(s.docker.ok(&["run", "--rm", "bb:1", "echo", "after"]), "after");
}

/// lamina goes away (SIGKILL or SIGTERM) and comes back while dockerd keeps running; dockerd never calls
/// Init again, so lamina must recover its state from disk by itself.
fn lamina_restart_under_dockerd(test: &str, kill9: bool) {
    let Some(mut s) = setup(test) else { return };
    if s.lamina.is_none() {
        eprintln!("{test}: driver is vfs, nothing to restart");
        return;
    }
    let root = s.lamina.as_ref().unwrap().data_root.clone();
    let before = tree_snapshot(&root);
    let layer_dirs_before = layer_dir_count(&root);
    busybox_image(&s.docker, "bb:1");
    let script = "cat /f 2>/dev/null; echo x >> /f";
    assert_eq!(
        s.docker.ok(&["run", "--name", "c1", "bb:1", "sh", "-c", script]),
        ""
    );
    s.docker
        .run_detached("r1", "bb:1", "echo before > /r && sleep 1000");
    let layers_before = s.status_layers();

    let lamina = s.lamina.as_mut().unwrap();
    if kill9 {
        lamina.kill9();
        lamina.start_again();
    } else {
        lamina.restart();
    }

    let d = &s.docker;
    assert_eq!(s.status_layers(), layers_before, "Layers row after the restart");
    assert_eq!(
        d.ok(&["run", "--rm", "bb:1", "echo", "new container"]),
        "new container"
    );
    assert_eq!(d.ok(&["start", "-a", "c1"]), "x");
    assert_eq!(sorted_lines(&d.ok(&["diff", "c1"])), "A /f");
    // the running container kept its mount, and its Put/Remove after the restart work
    assert_eq!(d.ok(&["exec", "r1", "cat", "/r"]), "before");
    assert_eq!(sorted_lines(&d.ok(&["diff", "r1"])), "A /r");
    d.ok(&["commit", "r1", "fromrunning:1"]);
    assert_eq!(d.ok(&["run", "--rm", "fromrunning:1", "cat", "/r"]), "before");
    d.ok(&["stop", "-t", "1", "r1"]);
    d.ok(&["rm", "r1", "c1"]);
    d.ok(&["rmi", "fromrunning:1", "bb:1"]);
    assert_eq!(s.status_layers(), Some(0), "Layers row after removing everything");
    assert_eq!(
        s.status_row("mounted layers"),
        Some(0),
        "Mounted Layers row after removing everything"
    );
    assert_store_empty(&root, &before, layer_dirs_before);
}

#[test]
fn lamina_kill9_restart_under_running_dockerd() {
    lamina_restart_under_dockerd("kill9", true);
}

#[test]
fn lamina_sigterm_restart_under_running_dockerd() {
    lamina_restart_under_dockerd("sigterm", false);
}

/// SHA-256 of every file of `dir/big`, as `sha256sum big/* | sha256sum` prints it.
fn big_digest_host(root: &Path) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && sha256sum big/* | sha256sum")
            .arg("sh")
            .arg(root),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// kill -9 of lamina in the middle of a `docker import` of a ~200 MB layer: afterwards the import either
/// failed (and a retry works) or produced a complete image; a half-written layer is never visible.
#[test]
fn crash_kill9_during_docker_import() {
    let Some(mut s) = setup("crashimport") else { return };
    if s.lamina.is_none() {
        eprintln!("crash test: driver is vfs, nothing to crash");
        return;
    }
    // rootfs: busybox + 200 files of 1 MiB of random content
    let root = s.docker.dir().join("bigroot");
    busybox_rootfs(&root);
    fs::create_dir_all(root.join("big")).unwrap();
    for i in 0..200 {
        fs::write(root.join(RandomTar::name(i)), RandomTar::content(i, 1 << 20)).unwrap();
    }
    let expected = big_digest_host(&root);
    let tarball = s.docker.dir().join("big.tar");
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    );
    fs::remove_dir_all(&root).unwrap();

    let data_root = s.lamina.as_ref().unwrap().data_root.clone();
    let base = bytes_under(&data_root);
    let import = s
        .docker
        .docker_cmd(&["import", tarball.to_str().unwrap(), "big:1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until lamina has written a good part of the layer, then kill it
    let written = poll(Duration::from_secs(60), || {
        (bytes_under(&data_root) > base + (40 << 20)).then_some(())
    });
    let lamina = s.lamina.as_mut().unwrap();
    assert!(
        written.is_some(),
        "lamina never wrote 40 MB of the import; log:\n{}",
        lamina.log_tail()
    );
    lamina.kill9();
    let killed_at = Instant::now();
    thread::sleep(Duration::from_millis(300));
    lamina.start_again();
    eprintln!("lamina restarted {:?} after kill -9", killed_at.elapsed());
    let out = import.wait_with_output().unwrap();
    let first =
        String::from_utf8_lossy(&out.stdout).trim().to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("docker import during the crash: {} {first}", out.status);

    let digest_in = |img: &str| {
        s.docker.ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            img,
            "sh",
            "-c",
            "cd / && sha256sum big/* | sha256sum",
        ])
    };
    if out.status.success() {
        // dockerd retried the call and the import succeeded: the image must be complete
        assert_eq!(
            digest_in("big:1"),
            expected,
            "image imported across the crash has different content"
        );
    }
    // a retried import always works and gives the complete content
    s.docker.ok(&["import", tarball.to_str().unwrap(), "big:2"]);
    assert_eq!(
        digest_in("big:2"),
        expected,
        "re-imported image has different content"
    );
    let layers = s.status_layers().unwrap();
    let images = s.docker.ok(&["images", "-q"]).lines().count() as u64;
    assert_eq!(
        layers, images,
        "lamina's Layers row vs dockerd's images (one layer each)"
    );

    eprintln!(
        "after the crash test: data root holds {} bytes",
        bytes_under(&data_root)
    );
}

/// `docker diff` lists every directory that holds a change (the root excepted), as dockerd's vfs driver does:
/// an image with nested directories, imported on lamina and on vfs, and a container changing files deep in
/// them.
#[test]
fn docker_diff_lists_parent_directories_like_vfs() {
    const STEPS: &str = "echo y >> /d/h2 && echo z >> /n1/n2/n3/f && touch /n1/m/new && rm /k/l/gone \
         && chmod 700 /p/q && mkdir -p /n1/n2/fresh/deeper && echo w > /n1/n2/fresh/deeper/w";
    const EXPECTED: &str = "C /d
C /d/h2
C /k
C /k/l
D /k/l/gone
C /n1
C /n1/m
A /n1/m/new
C /n1/n2
A /n1/n2/fresh
A /n1/n2/fresh/deeper
A /n1/n2/fresh/deeper/w
C /n1/n2/n3
C /n1/n2/n3/f
C /p
C /p/q";
    let Some(s) = setup("diffparents") else { return };
    let rootfs = s.docker.dir().join("nested-rootfs");
    busybox_rootfs(&rootfs);
    for (file, text) in [
        ("d/h1", "1\n"),
        ("d/h2", "2\n"),
        ("n1/n2/n3/f", "f\n"),
        ("n1/m/keep", "k\n"),
        ("k/l/gone", "g\n"),
        ("k/l/stay", "s\n"),
        ("p/q/r", "r\n"),
    ] {
        let path = rootfs.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
    }
    let tarball = s.docker.dir().join("nested.tar");
    tar_dir(&rootfs, &tarball);
    let tarball = tarball.to_str().unwrap();
    let run = |d: &Dockerd| {
        d.ok(&["import", tarball, "nested:1"]);
        d.ok(&[
            "run",
            "--name",
            "c1",
            "--network",
            "none",
            "nested:1",
            "sh",
            "-c",
            STEPS,
        ]);
        d.ok(&["diff", "c1"])
    };
    let got = run(&s.docker);
    let vfs = Dockerd::start("vfs");
    let oracle = sorted_lines(&run(&vfs));
    assert_eq!(
        oracle, EXPECTED,
        "oracle (vfs) disagrees with the written expectation"
    );
    assert_eq!(sorted_lines(&got), EXPECTED, "docker diff on {}", s.docker.driver);
    if s.lamina.is_some() {
        // lamina answers in walk order: each directory before what it holds, siblings by name
        assert_eq!(got, EXPECTED, "order of docker diff on {}", s.docker.driver);
    }
}
