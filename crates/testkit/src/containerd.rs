//! Harness for the containerd tier: a private containerd, lamina as its proxy snapshotter, and OCI image
//! archives built by the test itself.
//!
//! - [`Containerd`]: a containerd 1.6 with its own root, state, GRPC and ttrpc sockets and `config.toml`
//!   (version 2, CRI and unused plugins off, lamina declared under `[proxy_plugins]`). Stopped by PID in `Drop`,
//!   together with the shims and container inits it started, found through the `shim.pid`/`init.pid` files of
//!   its own state directory. [`Containerd::ctr`] runs `/usr/bin/ctr --address <sock> -n <namespace>`.
//! - [`LaminaSnap`]: `lamina serve --socket none --snapshotter-socket S` on a data root of the test, which can
//!   be stopped (SIGTERM or SIGKILL) and started again on the same data root while containerd keeps running.
//! - [`OciImage`]: an OCI image layout (`oci-layout`, `index.json` with a `org.opencontainers.image.ref.name`
//!   annotation, manifest, config with `rootfs.diff_ids`, blobs named by sha256) packed as a tar for
//!   `ctr images import`. Layers are uncompressed tars; digests come from `sha256sum`.
//!
//! The snapshotter under test is `lamina` unless `LAMINA_E2E_SNAPSHOTTER` names another one (e.g. containerd's
//! built-in `overlayfs`, which validates the tests' own expectations without lamina).

use super::*;

/// Debian's ctr (matches the packaged containerd).
pub const CTR: &str = "/usr/bin/ctr";

/// Name of the proxy plugin in containerd's config (what `--snapshotter` selects).
pub const PROXY_NAME: &str = "lamina";

/// The snapshotter the tests drive: `LAMINA_E2E_SNAPSHOTTER` or `lamina`.
pub fn snapshotter_under_test() -> String {
    std::env::var("LAMINA_E2E_SNAPSHOTTER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| PROXY_NAME.to_string())
}

/// Everything a containerd test needs: root, containerd, ctr, runc, the runc shim, tar, sha256sum and a static
/// busybox.
pub fn require_containerd(test: &str) -> bool {
    require_root(test)
        && [
            "containerd",
            "ctr",
            "runc",
            "containerd-shim-runc-v2",
            "tar",
            "sha256sum",
            "umount",
            "mount",
        ]
        .iter()
        .all(|b| require_bin(test, b))
        && (Path::new(BUSYBOX).exists() || skip(test, "busybox-static (/bin/busybox)"))
}

/// `ctr --timeout` for every command (`LAMINA_E2E_CTR_TIMEOUT`, default 300s): a hung call fails the test
/// instead of hanging it.
fn ctr_timeout() -> String {
    std::env::var("LAMINA_E2E_CTR_TIMEOUT").unwrap_or_else(|_| "300s".into())
}

const SANE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ------------------------------------------------------------------------------------------------------------
// containerd
// ------------------------------------------------------------------------------------------------------------

/// A private containerd for one test.
pub struct Containerd {
    /// Everything of this containerd lives below this directory.
    pub dir: PathBuf,
    /// `root` of the config (content store, metadata, built-in snapshotters).
    pub root: PathBuf,
    /// `state` of the config (sockets of shims, bundles, rootfs mounts).
    pub state: PathBuf,
    /// GRPC socket (what `ctr --address` takes).
    pub address: PathBuf,
    /// containerd namespace used by [`Containerd::ctr`].
    pub namespace: String,
    /// `ctr --timeout` of [`Containerd::ctr`] and the `ctr_ok` family (`LAMINA_E2E_CTR_TIMEOUT`, else `300s`).
    pub ctr_timeout: String,
    /// stdout+stderr of every run, appended.
    pub log: PathBuf,
    /// The generated `config.toml`.
    pub config: PathBuf,
    child: Option<Child>,
    /// A directory of its own for the sockets, outside `dir`, removed with this containerd.
    own_sockets: Option<PathBuf>,
}

impl Containerd {
    /// Writes the config and starts containerd below `dir`; `proxy` is the address of the lamina snapshotter
    /// socket (declared as proxy plugin [`PROXY_NAME`]), if any. Waits until `ctr version` answers.
    pub fn start(dir: &Path, proxy: Option<&Path>) -> Containerd {
        let mut c = Containerd::new(dir, proxy);
        c.spawn();
        c.wait_ready();
        c
    }

    /// Prepares directories and the config (debug log) without starting containerd.
    pub fn new(dir: &Path, proxy: Option<&Path>) -> Containerd {
        // A unix socket address holds at most 107 bytes: below a deep `dir` the sockets go to a short
        // directory of their own.
        if dir.join("c.sock.ttrpc").as_os_str().len() < 100 {
            return Containerd::configure(dir, dir, proxy, "debug");
        }
        let sockets = std::env::temp_dir().join(unique_name("ctr"));
        let mut c = Containerd::configure(dir, &sockets, proxy, "debug");
        c.own_sockets = Some(sockets);
        c
    }

    /// Prepares directories and the config without starting containerd: everything below `dir` but the GRPC
    /// and ttrpc sockets, which go to `sockets` (a unix socket address must fit in 108 bytes).
    pub fn configure(dir: &Path, sockets: &Path, proxy: Option<&Path>, log_level: &str) -> Containerd {
        let root = dir.join("root");
        let state = dir.join("state");
        for d in [
            &root,
            &state,
            &dir.join("tmp"),
            &dir.join("fifo"),
            &dir.join("runc"),
            &sockets.to_path_buf(),
        ] {
            fs::create_dir_all(d).unwrap();
        }
        let address = sockets.join("c.sock");
        let config = dir.join("config.toml");
        let mut toml = String::new();
        let q = |p: &Path| format!("{:?}", p.to_str().expect("utf-8 path"));
        writeln!(toml, "version = 2").unwrap();
        writeln!(toml, "root = {}", q(&root)).unwrap();
        writeln!(toml, "state = {}", q(&state)).unwrap();
        // Nothing the tests need, and some of it touches the host (/opt/containerd, CNI, tracing exporters).
        writeln!(
            toml,
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\", \
             \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.btrfs\", \
             \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.tracing.processor.v1.otlp\", \"io.containerd.internal.v1.tracing\"]"
        )
        .unwrap();
        writeln!(toml, "[grpc]\n  address = {}", q(&address)).unwrap();
        writeln!(toml, "[ttrpc]\n  address = {}", q(&sockets.join("c.sock.ttrpc"))).unwrap();
        writeln!(toml, "[debug]\n  level = \"{log_level}\"").unwrap();
        writeln!(toml, "[metrics]\n  address = \"\"").unwrap();
        // No immediate GC pass after each deletion or every 100 mutations: snapshots made with ctr's view have
        // no GC root until the test labels them. containerd still schedules a deferred pass after deletions
        // (pause_threshold); tests that need one now call [`Containerd::gc_now`] or delete with `--sync`.
        writeln!(
            toml,
            "[plugins.\"io.containerd.gc.v1.scheduler\"]\n  deletion_threshold = 0\n  mutation_threshold = 100000000"
        )
        .unwrap();
        if let Some(sock) = proxy {
            writeln!(
                toml,
                "[proxy_plugins]\n  [proxy_plugins.{PROXY_NAME}]\n    type = \"snapshot\"\n    address = {}",
                q(sock)
            )
            .unwrap();
        }
        fs::write(&config, toml).unwrap();
        let n = unique_name("ns");
        Containerd {
            dir: dir.to_path_buf(),
            root,
            state,
            address,
            namespace: format!("e2e-{}", n.trim_start_matches("lamina-test-ns-")),
            ctr_timeout: ctr_timeout(),
            log: dir.join("containerd.log"),
            config,
            child: None,
            own_sockets: None,
        }
    }

    /// Declares one more proxy snapshotter plugin, `name`, served on the unix socket `socket`, in the config
    /// (before [`Containerd::spawn`]).
    pub fn add_proxy_snapshotter(&self, name: &str, socket: &Path) {
        let path = socket.to_str().expect("utf-8 path");
        let mut toml = fs::read_to_string(&self.config).unwrap();
        writeln!(
            toml,
            "[proxy_plugins.{name:?}]\n  type = \"snapshot\"\n  address = {path:?}"
        )
        .unwrap();
        fs::write(&self.config, toml).unwrap();
    }

    /// Starts the process (no readiness wait).
    pub fn spawn(&mut self) {
        let log = start_log(&self.log, "containerd");
        let child = Command::new(find_bin("containerd").expect("containerd"))
            .arg("--config")
            .arg(&self.config)
            .env("PATH", SANE_PATH)
            .env("TMPDIR", self.dir.join("tmp"))
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn containerd: {e}"));
        self.child = Some(child);
    }

    /// Waits until `ctr version` answers; panics (with the log) if containerd exits or 30 s pass.
    pub fn wait_ready(&mut self) {
        let log = self.log.clone();
        wait_up("containerd", &log, Duration::from_secs(30), || {
            if let Some(st) = exited(&mut self.child) {
                return Err(st);
            }
            Ok(self.address.exists() && self.ctr(&["version"]).status.success())
        });
    }

    /// `ctr --address <sock> -n <namespace> --timeout T <args>` (not yet run).
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.ctr_cmd_timeout(&self.ctr_timeout, args)
    }

    /// Like [`Containerd::ctr_cmd`] with another `--timeout` (e.g. `20s`).
    pub fn ctr_cmd_timeout(&self, timeout: &str, args: &[&str]) -> Command {
        self.ctr_cmd_in(&self.namespace, timeout, args)
    }

    /// `ctr` in another containerd namespace `ns`, with `--timeout timeout`.
    pub fn ctr_cmd_in(&self, ns: &str, timeout: &str, args: &[&str]) -> Command {
        let unset = [
            "CONTAINERD_SNAPSHOTTER",
            "CONTAINERD_ADDRESS",
            "CONTAINERD_NAMESPACE",
        ];
        let mut cmd = tool_command(CTR, &unset);
        cmd.arg("--address")
            .arg(&self.address)
            .args(["-n", ns, "--timeout", timeout])
            .args(args)
            .env("PATH", SANE_PATH);
        cmd
    }

    /// Runs ctr with `args`, whatever the outcome.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// Runs ctr with `args`, panics unless it succeeds; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.ctr_ok_in(&self.namespace, args)
    }

    /// Runs ctr with `args` in namespace `ns`, panics unless it succeeds; returns stdout.
    pub fn ctr_ok_in(&self, ns: &str, args: &[&str]) -> String {
        self.try_ctr_in(ns, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs ctr with `args` in namespace `ns`; its stdout, or an error with its output unless it succeeds.
    pub fn try_ctr_in(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .ctr_cmd_in(ns, &self.ctr_timeout, args)
            .output()
            .map_err(|e| format!("run ctr: {e}"))?;
        stdout_of(&format!("ctr {}", args.join(" ")), &out)
    }

    /// `ctr run <flags> --snapshotter <snapshotter> IMAGE ID /bin/sh -c SCRIPT` in namespace `ns`, with this
    /// containerd's fifo and runc directories; its stdout, or an error with its output unless it succeeds.
    pub fn try_run_in(
        &self,
        ns: &str,
        flags: &[&str],
        snapshotter: &str,
        image: &str,
        id: &str,
        script: &str,
    ) -> Result<String, String> {
        let fifo = self.fifo_dir();
        let runc_root = self.runc_root();
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[
            "--snapshotter",
            snapshotter,
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--runc-root",
            runc_root.to_str().unwrap(),
            image,
            id,
            "/bin/sh",
            "-c",
            script,
        ]);
        self.try_ctr_in(ns, &args)
    }

    /// Runs ctr with `args`, panics if it succeeds; returns stderr (the error message).
    pub fn ctr_err(&self, args: &[&str]) -> String {
        stderr_of_failure(&format!("ctr {}", args.join(" ")), &self.ctr(args))
    }

    /// `ctr snapshots --snapshotter <snapshotter> <args>`, must succeed; returns stdout.
    pub fn snapshots_ok(&self, snapshotter: &str, args: &[&str]) -> String {
        let mut v = vec!["snapshots", "--snapshotter", snapshotter];
        v.extend_from_slice(args);
        self.ctr_ok(&v)
    }

    /// `ctr snapshots --snapshotter <snapshotter> <args>`, must fail; returns stderr.
    pub fn snapshots_err(&self, snapshotter: &str, args: &[&str]) -> String {
        let mut v = vec!["snapshots", "--snapshotter", snapshotter];
        v.extend_from_slice(args);
        self.ctr_err(&v)
    }

    /// Runs containerd's garbage collector now and waits for it (creates a lease and deletes it with
    /// `--sync`); the snapshotters' unreferenced snapshots are removed before this returns.
    pub fn gc_now(&self) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = format!("gc-trigger-{}", N.fetch_add(1, Ordering::SeqCst));
        self.ctr_ok(&["leases", "create", "--id", &id]);
        self.ctr_ok(&["leases", "delete", "--sync", &id]);
    }

    /// `ctr task exec` of a shell script in running container `id`; returns stdout.
    pub fn exec(&self, id: &str, script: &str) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let exec_id = format!("e{}", N.fetch_add(1, Ordering::SeqCst));
        let fifo = self.fifo_dir();
        self.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            &exec_id,
            "--fifo-dir",
            fifo.to_str().unwrap(),
            id,
            "/bin/sh",
            "-c",
            script,
        ])
    }

    /// SIGKILLs the task of container `id`, deletes the task and the container (and so its snapshot).
    pub fn remove_container(&self, id: &str) {
        self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        let stopped = poll(Duration::from_secs(20), || {
            let out = self.ctr_ok(&["task", "ls"]);
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED"))
                .then_some(())
        });
        assert!(stopped.is_some(), "task {id} did not stop");
        self.ctr_ok(&["task", "delete", id]);
        self.ctr_ok(&["containers", "delete", id]);
    }

    /// Directory in which `ctr run` puts its FIFOs (kept inside the test directory).
    pub fn fifo_dir(&self) -> PathBuf {
        self.dir.join("fifo")
    }

    /// runc's state root for `ctr run --runc-root` (the default, /run/containerd/runc/<namespace>, would leave
    /// an empty directory per test on the host).
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// Data directory of one of containerd's built-in snapshotters (`overlayfs`, `native`).
    pub fn builtin_snapshotter_root(&self, name: &str) -> PathBuf {
        self.root.join(format!("io.containerd.snapshotter.v1.{name}"))
    }

    /// PIDs from every `shim.pid` and `init.pid` below the state directory (not crossing mounts), still alive.
    pub fn task_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let mut stack = vec![self.state.clone()];
        let mounts = mounts_under(&self.state);
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                let name = e.file_name();
                if ft.is_dir() {
                    if !mounts.contains(&e.path()) {
                        stack.push(e.path());
                    }
                } else if name == "shim.pid" || name == "init.pid" {
                    if let Some(pid) = fs::read_to_string(e.path())
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                    {
                        pids.push(pid);
                    }
                }
            }
        }
        pids.retain(|&p| p != std::process::id() && pid_alive(p));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// PID of the running containerd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Status of a plugin in `ctr plugins ls` (`ok`, `skip`, `error`), by plugin id.
    pub fn plugin_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["plugins", "ls"]);
        out.lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 4 && cols[1] == id).then(|| cols[cols.len() - 1].to_string())
        })
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, log_lines())
    }

    /// Stops the container processes and shims (SIGKILL, by PID), then containerd (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        let tasks = self.task_pids();
        for &p in &tasks {
            signal(p, "KILL");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while tasks.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        stop_owned_child(&mut self.child, Duration::from_secs(15), "containerd");
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        print_log_if_panicking("containerd", &self.log);
        unmount_under(&self.dir);
        if let Some(d) = &self.own_sockets {
            let _ = fs::remove_dir_all(d);
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// lamina as snapshotter
// ------------------------------------------------------------------------------------------------------------

/// `lamina serve --data-root D --socket none --snapshotter-socket S` for one test: a [`Lamina`] whose `socket`
/// here is the snapshotter socket.
pub struct LaminaSnap {
    /// `--snapshotter-socket`.
    pub socket: PathBuf,
    lamina: Lamina,
}

impl LaminaSnap {
    /// Starts lamina below `dir` (data root `dir/data`, socket `dir/snap.sock`) and waits until the socket
    /// accepts connections.
    pub fn start(dir: &Path) -> LaminaSnap {
        let mut l = LaminaSnap::new(dir);
        l.spawn();
        l.wait_ready();
        l
    }

    /// Prepares the paths without starting the process.
    pub fn new(dir: &Path) -> LaminaSnap {
        let socket = dir.join("snap.sock");
        LaminaSnap {
            lamina: Lamina::in_dir("snapshotter", dir).snapshotter(&socket),
            socket,
        }
    }

    /// `layers/` of the data root, where the store keeps one directory per layer.
    pub fn layers_dir(&self) -> PathBuf {
        self.lamina.data_root.join("layers")
    }
}

impl std::ops::Deref for LaminaSnap {
    type Target = Lamina;
    fn deref(&self) -> &Lamina {
        &self.lamina
    }
}

impl std::ops::DerefMut for LaminaSnap {
    fn deref_mut(&mut self) -> &mut Lamina {
        &mut self.lamina
    }
}

// ------------------------------------------------------------------------------------------------------------
// The whiteout image (a three-layer OCI archive with a deleted file, an opaque directory and a deleted
// file in a kept directory), shared by the containerd tests of every store backend
// ------------------------------------------------------------------------------------------------------------

pub const WHITEOUT_IMAGE: &str = "lamina.test/e2e/whiteouts:1";

/// Three layers: busybox plus files (layer 1); a deleted file (`.wh.gone.txt`), an opaque directory
/// (`opq/.wh..wh..opq`) and new files (layer 2); an overwritten file and a file deleted inside a directory
/// (layer 3).
pub fn whiteout_image(work: &Path) -> ImageArchive {
    let mut img = OciImage::new(&work.join("oci-whiteouts"), WHITEOUT_IMAGE);

    let l1 = work.join("l1");
    busybox_rootfs(&l1);
    fs::create_dir_all(l1.join("etc/lamina")).unwrap();
    fs::create_dir_all(l1.join("opq")).unwrap();
    fs::create_dir_all(l1.join("keepdir")).unwrap();
    fs::write(l1.join("etc/lamina/layer1"), "layer one\n").unwrap();
    fs::write(l1.join("etc/lamina/over"), "over from layer 1\n").unwrap();
    fs::write(l1.join("gone.txt"), "deleted by layer 2\n").unwrap();
    fs::write(l1.join("opq/lower-only"), "hidden by the opaque dir\n").unwrap();
    fs::write(l1.join("opq/shared"), "shared from layer 1\n").unwrap();
    fs::write(l1.join("keepdir/a"), "a from layer 1\n").unwrap();
    img.add_layer_dir(&l1);
    fs::remove_dir_all(&l1).unwrap();

    let mut l2 = TarBuilder::new();
    l2.dir("etc/", 0o755)
        .dir("etc/lamina/", 0o755)
        .file("etc/lamina/layer2", 0o644, b"layer two\n")
        .file(".wh.gone.txt", 0o644, b"")
        .dir("opq/", 0o755)
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/shared", 0o644, b"shared from layer 2\n")
        .file("opq/upper-only", 0o644, b"upper\n")
        .dir("keepdir/", 0o755)
        .file("keepdir/b", 0o644, b"b from layer 2\n");
    img.add_layer_tar(&l2.finish());

    let mut l3 = TarBuilder::new();
    l3.dir("etc/", 0o755)
        .dir("etc/lamina/", 0o755)
        .file("etc/lamina/layer3", 0o644, b"layer three\n")
        .file("etc/lamina/over", 0o644, b"over from layer 3\n")
        .dir("keepdir/", 0o755)
        .file("keepdir/.wh.a", 0o644, b"");
    img.add_layer_tar(&l3.finish());

    img.write_archive(&work.join("whiteouts.tar"))
}

/// Prints one line per property of the whiteout image that the tests check.
pub const WHITEOUT_SCRIPT: &str = r#"cat /etc/lamina/layer1 /etc/lamina/layer2 /etc/lamina/layer3 /etc/lamina/over
if [ -e /gone.txt ]; then echo gone.txt=present; else echo gone.txt=absent; fi
echo "opq: $(ls -A /opq | tr '\n' ' ')"
cat /opq/shared
echo "keepdir: $(ls -A /keepdir | tr '\n' ' ')""#;

/// What [`WHITEOUT_SCRIPT`] prints in a container of [`whiteout_image`].
pub const WHITEOUT_EXPECTED: &str = "layer one\nlayer two\nlayer three\nover from layer 3\ngone.txt=absent\n\
opq: shared upper-only \nshared from layer 2\nkeepdir: b \n";

// ------------------------------------------------------------------------------------------------------------
// sha256 and tar files
// ------------------------------------------------------------------------------------------------------------

/// Lower-case hex sha256 of a file, from `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg("-b").arg(path));
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(hex.len(), 64, "sha256sum output for {}", path.display());
    hex
}

/// Lower-case hex sha256 of bytes, from `sha256sum` reading stdin.
pub fn sha256_bytes(data: &[u8]) -> String {
    let (out, written) = output_with_stdin(&mut Command::new("sha256sum"), data);
    written.unwrap();
    assert!(out.status.success(), "sha256sum failed");
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(hex.len(), 64);
    hex
}

/// A ustar stream written straight to a file (for layers too big to build in memory).
pub struct TarFile {
    out: io::BufWriter<fs::File>,
}

impl TarFile {
    pub fn create(path: &Path) -> TarFile {
        let f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TarFile {
            out: io::BufWriter::with_capacity(1 << 20, f),
        }
    }

    pub fn entry(&mut self, name: &str, typeflag: u8, mode: u32, data: &[u8], link: &str) {
        self.out
            .write_all(&tar_header(
                name.as_bytes(),
                typeflag,
                mode,
                data.len() as u64,
                link.as_bytes(),
            ))
            .unwrap();
        self.out.write_all(data).unwrap();
        let pad = (512 - data.len() % 512) % 512;
        self.out.write_all(&vec![0u8; pad]).unwrap();
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, b'0', mode, data, "");
    }

    pub fn dir(&mut self, name: &str, mode: u32) {
        self.entry(name, b'5', mode, b"", "");
    }

    /// Writes the end-of-archive blocks and flushes.
    pub fn finish(mut self) {
        self.out.write_all(&[0u8; 1024]).unwrap();
        self.out.flush().unwrap();
    }
}

/// Tars a directory with GNU tar (numeric owner root, sorted names, fixed mtime) into `out`.
pub fn tar_dir(dir: &Path, out: &Path) {
    run_ok(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--sort=name",
                "--mtime=@1700000000",
                "--format=gnu",
            ])
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg("."),
    );
}

// ------------------------------------------------------------------------------------------------------------
// OCI image archives
// ------------------------------------------------------------------------------------------------------------

/// A blob of the layout: `sha256:<hex>` and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// An OCI image being assembled in a layout directory.
pub struct OciImage {
    /// The layout directory (`oci-layout`, `index.json`, `blobs/sha256/`).
    pub dir: PathBuf,
    /// Full reference, put in the `org.opencontainers.image.ref.name` annotation (ctr uses a full reference
    /// as the image name).
    pub name: String,
    /// Default command of the config.
    pub cmd: Vec<String>,
    layers: Vec<Blob>,
}

/// What [`OciImage::write_archive`] produced.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    /// The tar to give to `ctr images import`.
    pub tar: PathBuf,
    /// Image name (the ref.name annotation).
    pub name: String,
    pub manifest: Blob,
    pub config: Blob,
    /// `sha256:` digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<String>,
    /// Chain IDs, bottom first: the names of the committed snapshots containerd creates.
    pub chain_ids: Vec<String>,
    /// Total bytes of the layers.
    pub layer_bytes: u64,
}

/// OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl OciImage {
    /// Starts an empty layout in `dir` for the image called `name`.
    pub fn new(dir: &Path, name: &str) -> OciImage {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        OciImage {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cmd: vec!["/bin/sh".into()],
            layers: Vec::new(),
        }
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(hex)
    }

    /// Moves a file into the blob store under its digest.
    pub fn put_blob_file(&self, path: &Path) -> Blob {
        let hex = sha256_file(path);
        let size = fs::metadata(path).unwrap().len();
        fs::rename(path, self.blob_path(&hex)).unwrap();
        Blob {
            digest: format!("sha256:{hex}"),
            size,
        }
    }

    /// Stores bytes as a blob.
    pub fn put_blob(&self, data: &[u8]) -> Blob {
        let hex = sha256_bytes(data);
        fs::write(self.blob_path(&hex), data).unwrap();
        Blob {
            digest: format!("sha256:{hex}"),
            size: data.len() as u64,
        }
    }

    /// Adds an uncompressed layer from tar bytes.
    pub fn add_layer_tar(&mut self, tar: &[u8]) -> Blob {
        let b = self.put_blob(tar);
        self.layers.push(b.clone());
        b
    }

    /// Adds an uncompressed layer from a tar file (moved into the layout).
    pub fn add_layer_tar_file(&mut self, path: &Path) -> Blob {
        let b = self.put_blob_file(path);
        self.layers.push(b.clone());
        b
    }

    /// Adds a layer made of a directory tree (tarred with GNU tar; whiteouts are plain `.wh.*` files there).
    pub fn add_layer_dir(&mut self, tree: &Path) -> Blob {
        let tmp = self.dir.join(format!("layer-{}.tar", self.layers.len()));
        tar_dir(tree, &tmp);
        self.add_layer_tar_file(&tmp)
    }

    /// Number of layers so far.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Writes config, manifest, index and `oci-layout`, then tars the layout into `out`.
    pub fn write_archive(&self, out: &Path) -> ImageArchive {
        assert!(!self.layers.is_empty(), "an image needs a layer");
        let arch = oci_arch();
        // Layers are uncompressed, so each diff ID is the layer blob's digest.
        let diff_ids: Vec<String> = self.layers.iter().map(|b| b.digest.clone()).collect();
        let mut chain_ids: Vec<String> = Vec::new();
        for d in &diff_ids {
            let next = match chain_ids.last() {
                None => d.clone(),
                Some(prev) => format!("sha256:{}", sha256_bytes(format!("{prev} {d}").as_bytes())),
            };
            chain_ids.push(next);
        }
        let history: Vec<serde_json::Value> = (0..self.layers.len())
            .map(|i| {
                serde_json::json!({
                    "created": "2023-11-14T22:13:20Z",
                    "created_by": format!("lamina e2e layer {i}"),
                })
            })
            .collect();
        let config = serde_json::json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": self.cmd,
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        let config = self.put_blob(&serde_json::to_vec(&config).unwrap());
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|b| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": b.digest,
                    "size": b.size,
                })
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.digest,
                "size": config.size,
            },
            "layers": layers,
        });
        let manifest = self.put_blob(&serde_json::to_vec(&manifest).unwrap());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.digest,
                "size": manifest.size,
                "platform": { "architecture": arch, "os": "linux" },
                "annotations": { "org.opencontainers.image.ref.name": self.name },
            }],
        });
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        fs::write(self.dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "--owner=0", "--group=0", "--format=gnu"])
                .arg("-C")
                .arg(&self.dir)
                .arg("-cf")
                .arg(out)
                .args(["oci-layout", "index.json", "blobs"]),
        );
        ImageArchive {
            tar: out.to_path_buf(),
            name: self.name.clone(),
            manifest,
            config,
            diff_ids,
            chain_ids,
            layer_bytes: self.layers.iter().map(|b| b.size).sum(),
        }
    }
}

/// Writes a busybox rootfs into `dir` (see [`busybox_rootfs`]) and returns it as a layer tar (bytes).
pub fn busybox_layer(work: &Path) -> Vec<u8> {
    let rootfs = work.join("bb-rootfs");
    let tar = work.join("bb-layer.tar");
    if !tar.exists() {
        busybox_rootfs(&rootfs);
        tar_dir(&rootfs, &tar);
        let _ = fs::remove_dir_all(&rootfs);
    }
    fs::read(&tar).unwrap()
}
