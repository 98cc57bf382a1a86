//! End-to-end tests of lamina's packaging: the Docker managed (v2) plugin built by
//! `packaging/plugin/build.sh`, used as dockerd's storage driver (`--experimental -s NAME:TAG`) and as a
//! volume driver, and the Debian package built with `cargo deb`, installed and purged with apt-get.
//!
//! Each test starts its own dockerd 20.10 (own data root, exec root and containerd). Managed plugins need a
//! running daemon to be created, so a test creates and enables the plugin on a dockerd started with `vfs`,
//! then restarts that same dockerd with `-s <plugin>`, as Docker documents for v2 graph drivers.
//!
//! Needs root, dockerd, containerd, runc, busybox-static; the .deb test also needs `cargo-deb`, apt-get and
//! dpkg. Without them the tests print SKIPPED (and fail under CI=true). They run one at a time.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lamina_testkit::plugin::*;
use lamina_testkit::*;

/// Runs `docker <args>` with a deadline: a hang (the classic failure of `docker build` with `VOLUME` on
/// graphdriver plugins) fails the test instead of blocking it. Returns stdout.
fn ok_within(d: &Dockerd, args: &[&str], limit: Duration) -> String {
    let out_path = d.dir().join("cmd.out");
    let err_path = d.dir().join("cmd.err");
    let mut child = d
        .docker_cmd(args)
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run docker CLI");
    let st = wait_timeout(&mut child, limit);
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    match st {
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`docker {}` did not finish within {limit:?} (hang)\nstdout: {out}\nstderr: {err}\ndockerd log:\n{}",
                args.join(" "),
                d.log_tail()
            );
        }
        Some(st) if !st.success() => panic!(
            "`docker {}` failed ({st})\nstdout: {out}\nstderr: {err}\ndockerd log:\n{}",
            args.join(" "),
            d.log_tail()
        ),
        Some(_) => out.trim_end().to_string(),
    }
}

/// A plugin name unique to this test run, with its tag (dockerd stores it tag-qualified).
fn plugin_name(base: &str) -> String {
    format!("{}:latest", unique_name(base))
}

/// Builds the plugin directory and creates + enables the plugin on `d`.
fn create_plugin(d: &Dockerd, base: &str, env: &[&str]) -> (ManagedPlugin, Duration) {
    let dir = d.dir().join("plugin-build");
    let msg = build_plugin_dir(&dir);
    eprintln!("{}", msg.trim());
    let p = ManagedPlugin::create(d, &plugin_name(base), &dir);
    if !env.is_empty() {
        let mut args = vec!["plugin", "set", p.name.as_str()];
        args.extend_from_slice(env);
        d.ok(&args);
    }
    let t = Instant::now();
    d.ok(&["plugin", "enable", &p.name]);
    (p, t.elapsed())
}

#[test]
fn v2_plugin_as_graphdriver() {
    let _g = serial();
    if !require_docker("v2_plugin_as_graphdriver") {
        return;
    }
    let mut d = Dockerd::start("vfs");
    let (plugin, _) = create_plugin(&d, "gd", &["LAMINA_LOG_LEVEL=debug"]);
    let pl = d.ok(&["plugin", "ls", "--format", "{{.Name}} {{.Enabled}}"]);
    assert!(pl.contains(&format!("{} true", plugin.name)), "{pl}");

    // The same dockerd, now with the plugin as its storage driver.
    d.driver = plugin.name.clone();
    let t0 = Instant::now();
    d.restart();
    let status = d.driver_status();
    eprintln!("driver status: {status:?}");
    assert!(
        status
            .iter()
            .any(|(k, v)| k == "Data Root" && v == "/lamina/store"),
        "lamina's data root inside the plugin: {status:?}"
    );

    // import + run: the merged directory Get returns must be visible to dockerd on the host.
    busybox_image(&d, "bb:1");
    let out = d.ok(&["run", "--rm", "bb:1", "sh", "-c", "ls /bin/busybox && echo ran"]);
    assert_eq!(out, "/bin/busybox\nran");
    eprintln!(
        "FIGURE v2 graphdriver: dockerd restart with -s {} to first successful docker run (incl. import): {:?}",
        plugin.name,
        t0.elapsed()
    );
    // While a container runs, its merged layer is mounted on the host, below the propagated mount.
    let cid = d.ok(&["run", "-d", "bb:1", "sleep", "600"]);
    let merged: Vec<_> = mounts_under(&plugin.propagated())
        .into_iter()
        .filter(|m| m.ends_with("merged"))
        .collect();
    assert!(
        !merged.is_empty(),
        "no merged mount visible on the host below {}",
        plugin.propagated().display()
    );
    assert!(
        merged.iter().any(|m| m.join("bin/busybox").exists()),
        "merged dirs on the host are empty: {merged:?}"
    );
    d.ok(&["exec", &cid, "sh", "-c", "echo changed > /etc/motd"]);
    let diff = d.ok(&["diff", &cid]);
    assert!(diff.contains("A /etc/motd"), "{diff}");

    // A plugin in use as the storage driver cannot be disabled.
    let err = d.fails(&["plugin", "disable", &plugin.name]);
    assert!(err.contains("in use"), "disable while in use: {err}");

    // commit
    let img = d.ok(&["commit", &cid, "committed:1"]);
    assert!(img.starts_with("sha256:"), "{img}");
    d.ok(&["rm", "-f", &cid]);
    assert_eq!(
        d.ok(&["run", "--rm", "committed:1", "cat", "/etc/motd"]),
        "changed"
    );

    // build: several steps, COPY, and a VOLUME instruction followed by more steps.
    let ctx = d.dir().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("hello.txt"), "hello from the context\n").unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM bb:1\n\
         RUN mkdir -p /data && echo seeded > /data/seed\n\
         VOLUME /data\n\
         RUN echo after-volume > /after\n\
         COPY hello.txt /hello.txt\n\
         RUN rm /bin/vi && echo three > /three\n\
         ENV STEP=last\n\
         CMD [\"sh\", \"-c\", \"cat /data/seed /after /hello.txt /three; echo $STEP\"]\n",
    )
    .unwrap();
    let t = Instant::now();
    ok_within(
        &d,
        &["build", "-t", "built:1", ctx.to_str().unwrap()],
        Duration::from_secs(240),
    );
    eprintln!("docker build (7 steps, VOLUME) took {:?}", t.elapsed());
    let out = d.ok(&["run", "--rm", "built:1"]);
    assert_eq!(out, "seeded\nafter-volume\nhello from the context\nthree\nlast");
    assert!(
        !d.docker(&["run", "--rm", "built:1", "test", "-e", "/bin/vi"])
            .status
            .success(),
        "a file deleted in a build step is back"
    );

    // A dockerd restart keeps every image usable (the plugin is stopped and started again with it).
    d.restart();
    assert_eq!(
        d.ok(&["run", "--rm", "built:1"]),
        "seeded\nafter-volume\nhello from the context\nthree\nlast"
    );
    assert_eq!(
        d.ok(&["run", "--rm", "committed:1", "cat", "/etc/motd"]),
        "changed"
    );

    // dockerd restarts a plugin that dies; lamina reopens its store, no Init comes, images stay usable.
    let before = plugin.pids();
    assert_eq!(before.len(), 1, "plugin processes: {before:?}");
    signal(before[0], "KILL");
    let after = poll(Duration::from_secs(30), || {
        let now = plugin.pids();
        (!now.is_empty() && now != before).then_some(now)
    });
    assert!(after.is_some(), "dockerd did not restart the killed plugin");
    assert_eq!(
        d.ok(&["run", "--rm", "committed:1", "cat", "/etc/motd"]),
        "changed"
    );

    // rm / rmi leave no mounts and no layers.
    d.ok(&["container", "prune", "-f"]);
    d.remove_unused_local_volumes();
    d.ok(&["rmi", "built:1", "committed:1", "bb:1"]);
    let layers = d
        .driver_status()
        .into_iter()
        .find(|(k, _)| k == "Layers")
        .map(|(_, v)| v);
    assert_eq!(layers.as_deref(), Some("0"), "layers left after rmi");
    let left: Vec<_> = mounts_under(&plugin.propagated())
        .into_iter()
        .filter(|m| m != &plugin.propagated())
        .collect();
    assert!(left.is_empty(), "mounts left after rm/rmi: {left:?}");
    d.stop();
    assert!(
        plugin.pids().is_empty(),
        "plugin processes left after dockerd stopped"
    );
}

#[test]
fn v2_plugin_as_volume_driver() {
    let _g = serial();
    if !require_docker("v2_plugin_as_volume_driver") {
        return;
    }
    let d = Dockerd::start("vfs");
    busybox_image(&d, "bb:1");
    let (plugin, enable_time) = create_plugin(&d, "vol", &[]);
    let t = Instant::now();
    d.ok(&["volume", "create", "-d", &plugin.name, "v1"]);
    d.ok(&[
        "run",
        "--rm",
        "-v",
        "v1:/data",
        "bb:1",
        "sh",
        "-c",
        "echo persisted > /data/f",
    ]);
    eprintln!(
        "FIGURE v2 volume plugin: docker plugin enable {enable_time:?}, then volume create + first docker run {:?}",
        t.elapsed()
    );
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["volume", "inspect", "v1"])).unwrap();
    assert_eq!(v[0]["Driver"], plugin.name.as_str());
    // Paths are shown unscoped (inside the plugin); the data lives in the propagated mount.
    assert_eq!(
        v[0]["Status"]["Directory"], "/lamina/store/volumes/local/v1",
        "{v}"
    );
    let data = plugin.propagated().join("store/volumes/local/v1/f");
    assert_eq!(fs::read_to_string(&data).unwrap(), "persisted\n");

    // A running container sees the volume through the host-side mount.
    let cid = d.ok(&["run", "-d", "-v", "v1:/data", "bb:1", "sleep", "600"]);
    assert!(
        mounts_under(&plugin.propagated().join("volumes"))
            .iter()
            .any(|m| m.ends_with("v1")),
        "volume mount not visible on the host"
    );
    assert_eq!(d.ok(&["exec", &cid, "cat", "/data/f"]), "persisted");
    d.ok(&["rm", "-f", &cid]);
    assert!(
        mounts_under(&plugin.propagated().join("volumes")).is_empty(),
        "volume still mounted after its container went"
    );

    // disable / enable keeps the volume and its data.
    let err = d.fails(&["plugin", "disable", &plugin.name]);
    assert!(err.contains("in use"), "disable with a volume: {err}");
    d.ok(&["plugin", "disable", "-f", &plugin.name]);
    assert!(plugin.pids().is_empty(), "plugin still running after disable");
    d.ok(&["plugin", "enable", &plugin.name]);
    assert_eq!(
        d.ok(&["run", "--rm", "-v", "v1:/data", "bb:1", "cat", "/data/f"]),
        "persisted"
    );
    let ls = d.ok(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.contains(&format!("{} v1", plugin.name)), "{ls}");

    d.ok(&["volume", "rm", "v1"]);
    assert!(!data.exists(), "volume data left after docker volume rm");
    d.ok(&["plugin", "disable", &plugin.name]);
    d.ok(&["plugin", "rm", &plugin.name]);
    assert!(
        !plugin.dir().exists(),
        "docker plugin rm left {}",
        plugin.dir().display()
    );
}

#[test]
fn deb_install_serve_purge() {
    let _g = serial();
    if !require_docker("deb_install_serve_purge")
        || !require_bin("deb_install_serve_purge", "apt-get")
        || !require_bin("deb_install_serve_purge", "dpkg")
    {
        return;
    }
    if !require(
        "deb_install_serve_purge",
        "cargo-deb (cargo install cargo-deb --locked)",
        find_cargo_deb().is_some(),
    ) {
        return;
    }
    let work = TestDir::new(&unique_name("deb"));
    let deb = build_deb(work.path());
    let size = fs::metadata(&deb).unwrap().len();
    eprintln!(
        "FIGURE .deb (test build from the debug test binary, stripped): {} ({size} bytes)",
        deb.display()
    );
    let contents =
        String::from_utf8_lossy(&run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).into_owned();
    for f in [
        "./usr/bin/lamina",
        "./usr/bin/lamina-bench",
        "./etc/lamina/config.toml",
        "lamina.service",
        "./usr/share/doc/lamina/README.md",
        "./usr/share/doc/lamina/packaging.md",
        "./usr/share/doc/lamina/examples/daemon.json",
    ] {
        assert!(contents.contains(f), "{f} missing from the package:\n{contents}");
    }
    let var_lib_existed = Path::new("/var/lib/lamina").exists();

    let mut pkg = DebInstall::install(&deb);
    assert!(dpkg_version("lamina").is_some());
    let unit_path = [
        "/lib/systemd/system/lamina.service",
        "/usr/lib/systemd/system/lamina.service",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("lamina.service installed");
    let unit = fs::read_to_string(unit_path).unwrap();
    assert!(
        unit.contains("Before=docker.service containerd.service"),
        "{unit}"
    );
    let conffiles = fs::read_to_string("/var/lib/dpkg/info/lamina.conffiles").unwrap_or_default();
    assert!(
        conffiles.contains("/etc/lamina/config.toml"),
        "conffiles: {conffiles}"
    );
    let help = run_ok(Command::new("/usr/bin/lamina").args(["serve", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    for w in ["FILES:", "ENVIRONMENT:", "EXAMPLES:", "/etc/lamina/config.toml"] {
        assert!(help.contains(w), "lamina serve --help lacks {w}");
    }

    // Start the installed binary the way the unit does (ExecStart + the installed config); no systemd here.
    // Sockets, data root and mount base are moved into the test's own places (flags beat the file).
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[..2], ["/usr/bin/lamina", "serve"], "{exec}");
    let name = unique_name("deb");
    let mut lamina = Lamina::in_dir(&name, work.path())
        .docker_plugin()
        .snapshotter(&work.join("snapshotter.sock"));
    lamina.exe = argv[0].into();
    lamina.extra_args = argv[2..].iter().map(|a| a.to_string()).collect();
    lamina.extra_args.extend([
        "--volumes-mount-base".to_string(),
        work.join("volumes").display().to_string(),
    ]);
    lamina.spawn();
    lamina.wait_ready();
    let socket = lamina.socket.clone();

    {
        let d = Dockerd::start(&name);
        busybox_image(&d, "bb:1");
        assert_eq!(d.ok(&["run", "--rm", "bb:1", "echo", "from-deb"]), "from-deb");
        d.ok(&["volume", "create", "-d", &name, "dv"]);
        d.ok(&["run", "--rm", "-v", "dv:/d", "bb:1", "sh", "-c", "echo x > /d/x"]);
        assert!(work.join("data/volumes/local/dv/x").exists());

        // Removal is refused while the installed lamina runs.
        let o = apt_get(&["remove", "lamina"], &[]);
        assert!(
            !o.status.success(),
            "apt-get remove succeeded under a running lamina"
        );
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            msg.contains("still running outside systemd"),
            "prerm message: {msg}"
        );
        assert!(
            dpkg_version("lamina").is_some(),
            "package gone after a refused removal"
        );
        d.ok(&["rmi", "bb:1"]);
        d.ok(&["volume", "rm", "dv"]);
    }
    let st = lamina
        .terminate(Duration::from_secs(20))
        .expect("lamina exits on SIGTERM");
    assert!(st.success(), "installed lamina exit status {st}");
    assert!(!socket.exists(), "socket left behind");

    let o = pkg.purge(&[]);
    assert!(
        o.status.success(),
        "apt-get purge failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(dpkg_version("lamina").is_none());
    for p in [
        "/usr/bin/lamina",
        "/etc/lamina",
        unit_path,
        "/usr/share/doc/lamina",
        "/etc/systemd/system/multi-user.target.wants/lamina.service",
    ] {
        assert!(!Path::new(p).exists(), "{p} left after purge");
    }
    if !var_lib_existed {
        assert!(
            !Path::new("/var/lib/lamina").exists(),
            "/var/lib/lamina left after purge"
        );
    }
    assert!(
        mounts_under(work.path()).is_empty(),
        "mounts left: {:?}",
        mounts_under(work.path())
    );
}

#[test]
fn v2_plugin_moosefs_volumes() {
    let test = "v2_plugin_moosefs_volumes";
    let Some(_g) = serial_if(require_docker(test) && lamina_testkit::moosefs::require_moosefs(test)) else {
        return;
    };
    // Declared first, dropped last: dockerd (and with it the plugin and its mfsmount) stops before the cluster.
    let cluster = lamina_testkit::moosefs::MooseCluster::start("plugin");
    let d = Dockerd::start("vfs");
    busybox_image(&d, "bb:1");
    // The whole config in one settable env variable, as a user would `docker plugin set` it.
    let toml = format!(
        "LAMINA_CONFIG_TOML=[volumes]\n{}",
        cluster.volumes_toml(8, "mount_options = [\"mfsioretries=3\"]\n")
    );
    let (plugin, _) = create_plugin(&d, "mfs", &[toml.as_str()]);
    d.ok(&[
        "volume",
        "create",
        "-d",
        &plugin.name,
        "-o",
        "ReplicationGoal=2",
        "shared",
    ]);
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["volume", "inspect", "shared"])).unwrap();
    assert_eq!(v[0]["Status"]["ReplicationGoal"], "2", "{v}");
    assert_eq!(v[0]["Scope"], "global", "{v}");
    d.ok(&[
        "run",
        "--rm",
        "-v",
        "shared:/data",
        "bb:1",
        "sh",
        "-c",
        "echo on-the-cluster > /data/f",
    ]);

    // A bare mfsmount of the cluster on the host sees the file and the goal the plugin's tools set.
    let view = cluster.scratch("view");
    cluster.mount(&view, "/");
    let f = view.join("docker/volumes/shared/f");
    assert_eq!(fs::read_to_string(&f).unwrap(), "on-the-cluster\n");
    let goal = run_ok(Command::new(find_bin("mfsgetgoal").unwrap()).arg(f.parent().unwrap()));
    assert!(
        String::from_utf8_lossy(&goal.stdout).trim_end().ends_with(": 2"),
        "goal: {}",
        String::from_utf8_lossy(&goal.stdout)
    );

    // disable / enable: the plugin mounts the cluster again and the data is there.
    d.ok(&["plugin", "disable", "-f", &plugin.name]);
    d.ok(&["plugin", "enable", &plugin.name]);
    assert_eq!(
        d.ok(&["run", "--rm", "-v", "shared:/data", "bb:1", "cat", "/data/f"]),
        "on-the-cluster"
    );
    d.ok(&["volume", "rm", "shared"]);
    assert!(
        !f.exists(),
        "volume data left on the cluster after docker volume rm"
    );
    unmount_under(&view);

    // Disabling stops lamina and its mfsmount, and leaves no mount of the cluster on the host.
    d.ok(&["plugin", "disable", &plugin.name]);
    assert!(
        plugin.pids().is_empty(),
        "plugin processes left: {:?}",
        plugin.pids()
    );
    let left = mounts_under(&plugin.propagated());
    assert!(
        left.iter().all(|m| m == &plugin.propagated()),
        "mounts left below the propagated mount after disable: {left:?}"
    );
}

#[test]
fn v2_plugin_push_and_install() {
    let test = "v2_plugin_push_and_install";
    let Some(_g) = serial_if(require_docker(test) && require_bin(test, "docker-registry")) else {
        return;
    };
    let reg_dir = TestDir::new(&unique_name("registry"));
    let registry = Registry::start(reg_dir.path());
    let d = Dockerd::start("vfs");
    busybox_image(&d, "bb:1");
    let dir = d.dir().join("plugin-build");
    build_plugin_dir(&dir);
    let remote = format!("{}/{}", registry.addr, plugin_name("pushed"));
    d.ok(&["plugin", "create", &remote, dir.to_str().unwrap()]);
    d.ok(&["plugin", "push", &remote]);
    d.ok(&["plugin", "rm", &remote]);

    // `docker plugin install` pulls, shows the privileges, and enables.
    let alias = plugin_name("installed");
    let t = Instant::now();
    d.ok(&[
        "plugin",
        "install",
        "--grant-all-permissions",
        "--alias",
        &alias,
        &remote,
        "LAMINA_LOG_LEVEL=debug",
    ]);
    let installed = t.elapsed();
    let plugin = ManagedPlugin::adopt(&d, &alias);
    let t = Instant::now();
    d.ok(&["volume", "create", "-d", &alias, "iv"]);
    assert_eq!(
        d.ok(&[
            "run",
            "--rm",
            "-v",
            "iv:/data",
            "bb:1",
            "sh",
            "-c",
            "echo ok > /data/f && cat /data/f"
        ]),
        "ok"
    );
    eprintln!(
        "FIGURE docker plugin install (pull 1 plugin from a local registry + enable): {installed:?}; then first docker run with a volume: {:?}",
        t.elapsed()
    );
    let env = d.ok(&["plugin", "inspect", "--format", "{{json .Settings.Env}}", &alias]);
    assert!(env.contains("LAMINA_LOG_LEVEL=debug"), "{env}");
    let privileges = d.ok(&["plugin", "inspect", "--format", "{{json .Config.Linux}}", &alias]);
    assert!(
        privileges.contains("CAP_SYS_ADMIN") && privileges.contains("/dev/fuse"),
        "{privileges}"
    );
    d.ok(&["volume", "rm", "iv"]);
    d.ok(&["plugin", "disable", &alias]);
    d.ok(&["plugin", "rm", &alias]);
    assert!(!plugin.dir().exists());
}
