//! The one launcher of `lamina serve`, for every test tier and the benchmark.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    lamina_bin, log_lines, print_log_if_panicking, signal, start_log, stop_child, stop_owned_child, tail,
    unmount_under, wait_timeout, PluginClient, TestDir, PLUGIN_DIR,
};

/// The value of `--socket` / `--snapshotter-socket` that serves nothing.
const NONE: &str = "none";

/// How long a start may take before [`Lamina::wait_ready`] gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The outcome of waiting for a started daemon.
#[derive(Debug)]
pub enum Ready {
    /// Every socket asked for answers; the time since the spawn.
    Up(Duration),
    /// The process exited first.
    Exited(ExitStatus),
    /// Neither within the timeout.
    TimedOut,
}

/// A `lamina serve` process: its arguments, its directories, and the process once spawned. The process is
/// stopped through its PID in `Drop` (SIGTERM, then SIGKILL), also when the test panics; then its mounts under
/// the data root are detached and its socket files removed.
pub struct Lamina {
    /// Name in messages; for a plugin socket in `/run/docker/plugins/`, the driver name.
    pub name: String,
    /// `--socket`: the Docker plugin socket, or `none`.
    pub socket: PathBuf,
    /// `--snapshotter-socket`: the containerd snapshotter socket, or `none`.
    pub snapshotter_socket: PathBuf,
    /// `--data-root`.
    pub data_root: PathBuf,
    /// stderr and stdout of every run, appended.
    pub log: PathBuf,
    /// `--log-level` (default: `LAMINA_E2E_LOG_LEVEL`, else `debug`).
    pub log_level: String,
    /// Extra arguments after the ones above (e.g. `--config FILE`).
    pub extra_args: Vec<String>,
    /// Extra environment (e.g. `LAMINA_FAULTS`).
    pub env: Vec<(String, String)>,
    /// The binary ([`lamina_bin`] by default).
    pub exe: PathBuf,
    /// Time from the last spawn until every socket answered.
    pub ready_after: Duration,
    child: Option<Child>,
    spawned: Instant,
    workdir: PathBuf,
    _dir: Option<TestDir>,
}

impl Lamina {
    /// Starts `lamina serve` with a fresh data root and a plugin socket `/run/docker/plugins/<name>.sock`, and
    /// waits until `/Plugin.Activate` answers.
    pub fn start(name: &str) -> Lamina {
        let mut l = Lamina::new(name);
        l.spawn();
        l.wait_ready();
        l
    }

    /// A daemon in a fresh test directory `<E2E_ROOT>/<name>` (removed on drop) serving the plugin socket
    /// `/run/docker/plugins/<name>.sock` and no snapshotter socket; not started.
    pub fn new(name: &str) -> Lamina {
        let dir = TestDir::new(name);
        let mut l = Lamina::in_dir(name, dir.path()).docker_plugin();
        l._dir = Some(dir);
        l
    }

    /// A daemon whose data root (`data/`) and log (`lamina.log`) live in `dir` (created, never removed here),
    /// serving no socket until [`Lamina::plugin_socket`], [`Lamina::docker_plugin`] or
    /// [`Lamina::snapshotter`] says which; not started.
    pub fn in_dir(name: &str, dir: &Path) -> Lamina {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Lamina {
            name: name.to_string(),
            socket: PathBuf::from(NONE),
            snapshotter_socket: PathBuf::from(NONE),
            data_root: dir.join("data"),
            log: dir.join("lamina.log"),
            log_level: std::env::var("LAMINA_E2E_LOG_LEVEL").unwrap_or_else(|_| "debug".into()),
            extra_args: Vec::new(),
            env: Vec::new(),
            exe: lamina_bin(),
            ready_after: Duration::ZERO,
            child: None,
            spawned: Instant::now(),
            workdir: dir.to_path_buf(),
            _dir: None,
        }
    }

    /// Serves the plugin socket at `path`.
    pub fn plugin_socket(mut self, path: &Path) -> Lamina {
        self.socket = path.to_path_buf();
        self
    }

    /// Serves the plugin socket where dockerd finds the driver `name`: `/run/docker/plugins/<name>.sock`.
    pub fn docker_plugin(mut self) -> Lamina {
        fs::create_dir_all(PLUGIN_DIR).unwrap();
        self.socket = Path::new(PLUGIN_DIR).join(format!("{}.sock", self.name));
        self
    }

    /// Serves the containerd snapshotter socket at `path`.
    pub fn snapshotter(mut self, path: &Path) -> Lamina {
        self.snapshotter_socket = path.to_path_buf();
        self
    }

    /// Writes `text` to `config.toml` in this instance's directory and starts it with `--config` that file
    /// (replacing [`Lamina::extra_args`]); returns the file's path.
    pub fn use_config(&mut self, text: &str) -> PathBuf {
        let cfg = self.workdir.join("config.toml");
        fs::write(&cfg, text).unwrap_or_else(|e| panic!("write {}: {e}", cfg.display()));
        self.extra_args = vec!["--config".into(), cfg.display().to_string()];
        cfg
    }

    /// The directory of this instance (the data root is `data/` inside it).
    pub fn dir(&self) -> &Path {
        &self.workdir
    }

    /// The command line used to start this instance, with `socket` as the plugin socket instead of ours if given.
    pub fn command(&self, socket: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve")
            .arg("--data-root")
            .arg(&self.data_root)
            .arg("--socket")
            .arg(socket.unwrap_or(&self.socket))
            .arg("--snapshotter-socket")
            .arg(&self.snapshotter_socket)
            .arg("--log-level")
            .arg(&self.log_level)
            .args(&self.extra_args)
            .env_remove("LAMINA_CONFIG")
            .env_remove("LAMINA_CONFIG_TOML")
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Starts the process (no readiness wait).
    pub fn spawn(&mut self) {
        assert!(
            self.child.is_none() || !self.running(),
            "lamina {} already running",
            self.name
        );
        for s in self.sockets() {
            if let Some(parent) = s.parent() {
                let _ = fs::create_dir_all(parent);
            }
        }
        let log = start_log(&self.log, "lamina");
        self.spawned = Instant::now();
        let child = self
            .command(None)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.exe.display()));
        self.child = Some(child);
    }

    /// The sockets asked for (`none` left out).
    fn sockets(&self) -> Vec<&Path> {
        [&self.socket, &self.snapshotter_socket]
            .into_iter()
            .filter(|s| s.as_os_str() != NONE)
            .map(PathBuf::as_path)
            .collect()
    }

    /// Waits until the plugin socket (if served) answers `POST /Plugin.Activate` with 200 and the snapshotter
    /// socket (if served) accepts a connection, the process exits, or `timeout` passes.
    pub fn poll_ready(&mut self, timeout: Duration) -> Ready {
        let client = (self.socket.as_os_str() != NONE).then(|| {
            let mut c = self.client();
            c.timeout = Duration::from_secs(5);
            c
        });
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Ready::Exited(st);
            }
            let plugin = client
                .as_ref()
                .is_none_or(|c| c.activate().is_ok_and(|r| r.status == 200));
            let snap = self.snapshotter_socket.as_os_str() == NONE
                || (plugin && UnixStream::connect(&self.snapshotter_socket).is_ok());
            if plugin && snap {
                self.ready_after = self.spawned.elapsed();
                return Ready::Up(self.ready_after);
            }
            if Instant::now() > deadline {
                return Ready::TimedOut;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// [`Lamina::poll_ready`] for 60 s; panics (with the log) if lamina exits or does not answer.
    pub fn wait_ready(&mut self) {
        match self.poll_ready(START_TIMEOUT) {
            Ready::Up(_) => {}
            Ready::Exited(st) => panic!(
                "lamina {} exited during start-up ({st}); log:\n{}",
                self.name,
                self.log_tail()
            ),
            Ready::TimedOut => panic!(
                "lamina {} did not answer on {:?} within {START_TIMEOUT:?}; log:\n{}",
                self.name,
                self.sockets(),
                self.log_tail()
            ),
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the process to end by itself (e.g. after a kill point fired); the exit status
    /// if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = wait_timeout(self.child.as_mut()?, timeout);
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; the exit status when it ended by itself.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        stop_child(&mut c, grace)
    }

    /// SIGTERM and wait (30 s); returns the exit status. Panics if lamina does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends `sig` (`TERM`, `INT`) and waits (30 s); returns the exit status. Panics if lamina does not exit.
    pub fn stop_with(&mut self, sig: &str) -> ExitStatus {
        let mut c = self.child.take().expect("lamina is not running");
        signal(c.id(), sig);
        match wait_timeout(&mut c, Duration::from_secs(30)) {
            Some(st) => st,
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "lamina {} did not exit within 30 s of SIG{sig}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
    }

    /// Starts again on the same data root and sockets (after `kill9` or `stop`) and waits until ready.
    pub fn start_again(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Kills (-9) and starts again, with the fault points `faults` armed (`LAMINA_FAULTS`), or none.
    pub fn kill9_and_start(&mut self, faults: Option<&str>) {
        self.kill9();
        self.env.retain(|(k, _)| k != "LAMINA_FAULTS");
        if let Some(f) = faults {
            self.env.push(("LAMINA_FAULTS".into(), f.into()));
        }
        self.start_again();
    }

    /// Clean stop (SIGTERM) and start again.
    pub fn restart(&mut self) {
        if self.running() {
            let st = self.stop();
            assert!(
                st.success(),
                "lamina exited with {st} on SIGTERM; log:\n{}",
                self.log_tail()
            );
        }
        self.start_again();
    }

    /// [`Lamina::use_config`] with a `[volumes]` section whose `mount_base` is `mnt/` in this instance's
    /// directory, followed by `volumes_toml` (more keys of `[volumes]`, then any subsections); returns that
    /// mount base.
    pub fn volumes_config(&mut self, volumes_toml: &str) -> PathBuf {
        let mount_base = self.workdir.join("mnt");
        self.use_config(&format!(
            "[volumes]\nmount_base = \"{}\"\n{volumes_toml}",
            mount_base.display()
        ));
        mount_base
    }

    /// A new instance named after `tag` with the volume settings `volumes_toml` (see
    /// [`Lamina::volumes_config`]), started and ready; with its volumes' mount base.
    pub fn start_with_volumes(tag: &str, volumes_toml: &str) -> (Lamina, PathBuf) {
        let mut lamina = Lamina::new(&super::unique_name(tag));
        let mount_base = lamina.volumes_config(volumes_toml);
        lamina.spawn();
        lamina.wait_ready();
        (lamina, mount_base)
    }

    /// A raw protocol client for this instance's plugin socket.
    pub fn client(&self) -> PluginClient {
        PluginClient::new(&self.socket)
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, log_lines())
    }
}

impl Drop for Lamina {
    fn drop(&mut self) {
        let what = format!("lamina {}", self.name);
        stop_owned_child(&mut self.child, Duration::from_secs(10), &what);
        print_log_if_panicking(&what, &self.log);
        unmount_under(&self.data_root);
        for s in self.sockets() {
            if fs::symlink_metadata(s).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = fs::remove_file(s);
            }
        }
    }
}
