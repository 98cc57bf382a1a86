//! Docker managed (v2) plugins and the Debian package, for `e2e_packaging.rs`.
//!
//! - [`build_plugin_dir`]: runs `packaging/plugin/build.sh` with the test's lamina binary.
//! - [`ManagedPlugin`]: a plugin created and enabled on one test dockerd; on drop its processes (the
//!   descendants of the containerd shim named after the plugin id) are stopped by PID, its mounts undone and
//!   its socket directory under `/run/docker/plugins/<id>/` removed.
//! - [`DebInstall`]: the `lamina` Debian package installed with apt-get; purged again on drop, also when the
//!   test panics.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `packaging/plugin/build.sh OUT` with `LAMINA_BIN` set to the test's lamina; returns its stdout.
pub fn build_plugin_dir(out: &Path) -> String {
    let script = workspace_root().join("packaging/plugin/build.sh");
    let o = run_ok(
        Command::new("bash")
            .arg(&script)
            .arg(out)
            .env("LAMINA_BIN", lamina_bin()),
    );
    assert!(out.join("config.json").is_file() && out.join("rootfs/usr/bin/lamina").is_file());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The processes of the managed plugin `id`: the descendants of the containerd shim whose command line names
/// that id (lamina, and the mfsmount it starts), not the shim itself.
pub fn plugin_pids(id: &str) -> Vec<u32> {
    let pids = all_pids();
    let mut found: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("containerd-shim") && c.contains(id)
                })
                .unwrap_or(false)
        })
        .collect();
    let shims = found.len();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &p in &pids {
            if ppid(p) == Some(parent) && !found.contains(&p) && pid_alive(p) {
                found.push(p);
            }
        }
        i += 1;
    }
    found.split_off(shims)
}

/// A managed plugin created from a directory on one dockerd.
pub struct ManagedPlugin {
    /// `NAME:TAG`, as given to `docker plugin create` (and to `-s`).
    pub name: String,
    /// The plugin's id (its directory under `<data-root>/plugins/` and `/run/docker/plugins/`).
    pub id: String,
    /// dockerd's data root.
    data_root: PathBuf,
}

impl ManagedPlugin {
    /// `docker plugin create NAME DIR` (disabled).
    pub fn create(d: &Dockerd, name: &str, dir: &Path) -> ManagedPlugin {
        d.ok(&["plugin", "create", name, dir.to_str().unwrap()]);
        ManagedPlugin::adopt(d, name)
    }

    /// A plugin that already exists on `d` (installed with `docker plugin install`).
    pub fn adopt(d: &Dockerd, name: &str) -> ManagedPlugin {
        let id = d.ok(&["plugin", "inspect", "--format", "{{.Id}}", name]);
        assert_eq!(id.len(), 64, "plugin id {id:?}");
        ManagedPlugin {
            name: name.to_string(),
            id,
            data_root: d.data_root(),
        }
    }

    /// `<data-root>/plugins/<id>/`.
    pub fn dir(&self) -> PathBuf {
        self.data_root.join("plugins").join(&self.id)
    }

    /// The host side of the propagated mount.
    pub fn propagated(&self) -> PathBuf {
        self.dir().join("propagated-mount")
    }

    /// The plugin's processes (by PID, found through its containerd shim).
    pub fn pids(&self) -> Vec<u32> {
        plugin_pids(&self.id)
    }
}

impl Drop for ManagedPlugin {
    fn drop(&mut self) {
        // Normally dockerd has stopped the plugin at its own shutdown; this catches what a crash left.
        let pids = self.pids();
        if !pids.is_empty() {
            eprintln!("killing leftover processes of plugin {}: {pids:?}", self.name);
            for &p in &pids {
                signal(p, "KILL");
            }
            poll(Duration::from_secs(10), || self.pids().is_empty().then_some(()));
        }
        unmount_under(&self.dir());
        let run = Path::new(PLUGIN_DIR).join(&self.id);
        unmount_under(&run);
        let _ = fs::remove_dir_all(&run);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Debian package
// ------------------------------------------------------------------------------------------------------------

/// `cargo-deb`, from PATH or `~/.cargo/bin`.
pub fn find_cargo_deb() -> Option<PathBuf> {
    find_bin("cargo-deb").or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/cargo-deb");
        p.is_file().then_some(p)
    })
}

/// Installed version of a Debian package, if any.
pub fn dpkg_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}|${Version}", pkg])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = s.split_once('|')?;
    status.starts_with("ii").then(|| version.to_string())
}

/// Runs apt-get non-interactively (waiting for the dpkg lock); returns the output, whatever the status.
pub fn apt_get(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("apt-get");
    cmd.args(["-y", "-o", "DPkg::Lock::Timeout=300"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run apt-get")
}

/// Builds `lamina_*.deb` with `cargo deb --no-build --fast` from the test's lamina binary (placed where cargo-deb
/// expects a release build, in a private target directory); returns the package path.
pub fn build_deb(work: &Path) -> PathBuf {
    let cargo_deb = find_cargo_deb().expect("cargo-deb");
    let target = work.join("target");
    fs::create_dir_all(target.join("release")).unwrap();
    fs::copy(lamina_bin(), target.join("release/lamina")).unwrap();
    fs::copy(lamina_bench_bin(), target.join("release/lamina-bench")).unwrap();
    let out_dir = work.join("deb");
    let o = Command::new(cargo_deb)
        .arg("deb")
        // `--fast`: a lighter xz level, the same files in the package. On the dbgsym package of a debug binary the
        // default level takes about 2 minutes of CPU, `--fast` 20 s.
        .args(["-p", "lamina", "--no-build", "--fast", "-o"])
        .arg(&out_dir)
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo-deb");
    assert!(
        o.status.success(),
        "cargo deb failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let debs: Vec<PathBuf> = fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "one .deb expected in {}: {debs:?}",
        out_dir.display()
    );
    debs[0].clone()
}

/// The `lamina` package installed by this test; purged on drop.
pub struct DebInstall {
    purged: bool,
}

impl DebInstall {
    /// `apt-get install ./lamina_*.deb`. Panics if lamina is already installed (a package that is not
    /// ours must not be purged by a test).
    pub fn install(deb: &Path) -> DebInstall {
        if let Some(v) = dpkg_version("lamina") {
            panic!("the lamina package {v} is already installed on this machine; the .deb test would remove it: purge it first");
        }
        let abs = fs::canonicalize(deb).unwrap();
        let o = apt_get(
            &["install", "--no-install-recommends", abs.to_str().unwrap()],
            &[],
        );
        let inst = DebInstall { purged: false };
        assert!(
            o.status.success(),
            "apt-get install {} failed:\n{}\n{}",
            abs.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        inst
    }

    /// `apt-get purge lamina`; returns its output.
    pub fn purge(&mut self, env: &[(&str, &str)]) -> Output {
        let o = apt_get(&["purge", "lamina"], env);
        if o.status.success() {
            self.purged = true;
        }
        o
    }
}

impl Drop for DebInstall {
    fn drop(&mut self) {
        if self.purged || dpkg_version("lamina").is_none() {
            return;
        }
        eprintln!("purging the lamina package left by the test");
        let start = Instant::now();
        let o = apt_get(&["purge", "lamina"], &[("LAMINA_REMOVE_FORCE", "1")]);
        if !o.status.success() {
            eprintln!(
                "warning: apt-get purge lamina failed after {:?}:\n{}\n{}",
                start.elapsed(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// A private registry, for `docker plugin push` / `docker plugin install`
// ------------------------------------------------------------------------------------------------------------

/// Debian's `docker-registry` (the distribution registry) serving plain HTTP on 127.0.0.1 (which dockerd
/// treats as an insecure registry by default), with its storage in a test directory; stopped by PID on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Registry {
    /// Starts the registry below `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let addr = format!("127.0.0.1:{port}");
        fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new(find_bin("docker-registry").expect("docker-registry"))
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawn docker-registry");
        let mut r = Registry { addr, child, log };
        let up = poll(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&r.addr).ok().map(|_| ())
        });
        if up.is_none() || r.child.try_wait().ok().flatten().is_some() {
            panic!("docker-registry did not start:\n{}", tail(&r.log, 30));
        }
        r
    }

    /// The registry's log, with one access-log line per request (`"GET /v2/... HTTP/1.1" 200 ...`).
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        if thread::panicking() {
            eprintln!("----- registry log -----\n{}", tail(&self.log, 30));
        }
    }
}
