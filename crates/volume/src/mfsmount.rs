//! lamina's own MooseFS (or LizardFS) mount: `mfsmount` run with its options and a deadline, the master probe,
//! deadlines around FUSE calls, and the detection of a mount whose `mfsmount` is gone. The volume backend
//! ([`crate::backend::MooseFs`]) mounts the cluster of its volumes with it, the daemon the cluster tier's
//! (`[cluster.moosefs]`, docs/cluster.md).
//!
//! A FUSE call on a MooseFS mount whose master is gone blocks for minutes (measured: about 130 s), so every
//! call on the mount that may wait on the master runs on a helper thread with a deadline, after a TCP probe of
//! the master.

use std::fs::{self, OpenOptions};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::command::path_arg;
use crate::error::VolumeError;

/// Most helper threads that may hang on a dead mount at once before calls fail without trying.
const MAX_STUCK: usize = 16;

/// What `mfsmount` mounts where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfsMountConfig {
    /// Master host.
    pub master_host: String,
    /// Master client port (MooseFS: 9421).
    pub master_port: u16,
    /// Cluster path mounted (`mfsmount -S`).
    pub subfolder: String,
    /// Extra `-o` options for mfsmount.
    pub mount_options: Vec<String>,
    /// The mount program.
    pub mfsmount: PathBuf,
    /// Where the cluster is mounted.
    pub mountpoint: PathBuf,
}

/// What [`MfsMount::ensure_mounted`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The cluster was mounted now: there was no mount, or a dead one (detached first).
    Mounted,
    /// A live mount was there and is kept; the directory asked about answered.
    Alive,
    /// A live mount was there and is kept, but the directory asked about does not exist on it.
    AliveWithoutDir,
}

/// True for the errors of a FUSE mount whose daemon is gone: `ENOTCONN`, or `ECONNABORTED` (what this
/// kernel, 6.18, answers after `mfsmount` was killed).
pub(crate) fn dead_fuse(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

/// Maps an I/O error on the cluster: a dead FUSE connection is "backend unavailable".
pub(crate) fn io_err(ctx: String, e: io::Error) -> VolumeError {
    if dead_fuse(&e) {
        VolumeError::BackendUnavailable(format!("{ctx}: the MooseFS mount is not connected"))
    } else {
        VolumeError::io(ctx, e)
    }
}

/// One `mfsmount` of lamina's: mounts it, checks it, bounds the calls on it.
#[derive(Debug)]
pub struct MfsMount {
    cfg: MfsMountConfig,
    timeout: Duration,
    log: PathBuf,
    mount_lock: Mutex<()>,
    stuck: Arc<AtomicUsize>,
}

impl MfsMount {
    /// Sets up (does not mount yet). `timeout` bounds mfsmount's run and each call on the mount; `log`
    /// receives mfsmount's output.
    pub fn new(cfg: MfsMountConfig, timeout: Duration, log: PathBuf) -> MfsMount {
        MfsMount {
            cfg,
            timeout,
            log,
            mount_lock: Mutex::new(()),
            stuck: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The settings.
    pub fn config(&self) -> &MfsMountConfig {
        &self.cfg
    }

    /// Where the cluster is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.cfg.mountpoint
    }

    /// `HOST:PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.cfg.master_host, self.cfg.master_port)
    }

    /// Fails fast (within 3 s at most) unless the master accepts a TCP connection.
    pub fn probe(&self) -> Result<(), VolumeError> {
        let unreachable = |why: String| {
            VolumeError::BackendUnavailable(format!("MooseFS master {} is unreachable: {why}", self.master()))
        };
        let addrs: Vec<_> = (self.cfg.master_host.as_str(), self.cfg.master_port)
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?
            .collect();
        let mut last = String::from("no address");
        let wait = self.timeout.min(Duration::from_secs(3));
        for a in addrs {
            match TcpStream::connect_timeout(&a, wait) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(unreachable(last))
    }

    /// Runs `f` on a helper thread and gives up after the deadline (the thread is left to finish).
    pub fn with_deadline<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        if self.stuck.load(Ordering::SeqCst) >= MAX_STUCK {
            return Err(VolumeError::BackendUnavailable(format!(
                "{what}: {MAX_STUCK} earlier calls on the MooseFS mount are still blocked"
            )));
        }
        let (tx, rx) = mpsc::channel();
        let stuck = self.stuck.clone();
        stuck.fetch_add(1, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("lamina-mfs-call".into())
            .spawn(move || {
                let r = f();
                stuck.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(r);
            })
            .map_err(|e| VolumeError::io("spawning a helper thread", e))?;
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(_) => Err(VolumeError::BackendUnavailable(format!(
                "{what}: no answer from the MooseFS mount within {} s (master {})",
                self.timeout.as_secs_f32(),
                self.master()
            ))),
        }
    }

    /// Whether the FUSE mount behind `path` still has its `mfsmount`: `Some(false)` when reading it fails
    /// with `ENOTCONN`/`ECONNABORTED` (the process died, the mount is dead for good), `Some(true)` when it
    /// answers, `None` when no answer comes within `wait` (alive but blocked, e.g. on a master that is down).
    /// The check runs on a helper thread that counts as stuck until it returns (none is started once
    /// [`MAX_STUCK`] are).
    pub fn alive(&self, path: &Path, wait: Duration) -> Option<bool> {
        if self.stuck.load(Ordering::SeqCst) >= MAX_STUCK {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        let p = path.to_path_buf();
        let stuck = self.stuck.clone();
        stuck.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("lamina-mfs-alive".into())
            .spawn(move || {
                let dead = matches!(answers(&p), Err(e) if dead_fuse(&e));
                stuck.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(!dead);
            });
        if spawned.is_err() {
            self.stuck.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        rx.recv_timeout(wait).ok()
    }

    /// Whether something is mounted at the mountpoint.
    pub fn is_mounted(&self) -> bool {
        lamina_sys::mount::is_mount_point(&self.cfg.mountpoint).unwrap_or(false)
    }

    /// Mounts the cluster at the mountpoint unless a live mount is there: a mount whose `mfsmount` is gone is
    /// detached and made again; a live one is kept (adopted after a restart of lamina). `dir` (the mountpoint
    /// or a directory below it) is what answers for the live mount, read with the deadline.
    pub fn ensure_mounted(&self, dir: &Path) -> Result<Ensured, VolumeError> {
        let _g = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mp = self.cfg.mountpoint.clone();
        if self.is_mounted() {
            let d = dir.to_path_buf();
            let found = self.with_deadline("checking the MooseFS mount", move || match answers(&d) {
                Ok(()) => Ok(Some(Ensured::Alive)),
                Err(e) if dead_fuse(&e) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(Ensured::AliveWithoutDir)),
                Err(e) => Err(io_err(format!("reading {}", d.display()), e)),
            })?;
            if let Some(found) = found {
                return Ok(found);
            }
            warn!(mountpoint = %mp.display(), "MooseFS mount is dead (mfsmount gone?): detaching and mounting again");
            let _ = lamina_sys::mount::unmount(&mp, true);
        }
        fs::create_dir_all(&mp).map_err(|e| VolumeError::io(format!("creating {}", mp.display()), e))?;
        let mut argv = vec![
            path_arg(&self.cfg.mfsmount),
            path_arg(&mp),
            "-H".into(),
            self.cfg.master_host.clone(),
            "-P".into(),
            self.cfg.master_port.to_string(),
            "-S".into(),
            self.cfg.subfolder.clone(),
        ];
        for o in &self.cfg.mount_options {
            argv.push("-o".into());
            argv.push(o.clone());
        }
        let started = Instant::now();
        run_to_log(&argv, &self.log, self.timeout)?;
        if !self.is_mounted() {
            return Err(VolumeError::BackendUnavailable(format!(
                "`{}` did not mount the cluster (see {})",
                argv.join(" "),
                self.log.display()
            )));
        }
        info!(master = %self.master(), mountpoint = %mp.display(), ms = started.elapsed().as_millis() as u64,
            "MooseFS mounted");
        Ok(Ensured::Mounted)
    }

    /// Detaches the mount lazily (what still uses it, such as bind mounts of running containers, keeps working;
    /// mfsmount exits when the last of them is gone).
    pub fn unmount_lazily(&self) {
        let mp = &self.cfg.mountpoint;
        if self.is_mounted() {
            match lamina_sys::mount::unmount(mp, true) {
                Ok(()) => info!(mountpoint = %mp.display(), "MooseFS unmounted"),
                Err(e) => warn!(mountpoint = %mp.display(), error = %e, "cannot unmount MooseFS"),
            }
        }
    }
}

/// Asks the filesystem behind the directory `p` for something it cannot answer from the kernel's caches (an
/// open and one directory read): a stat of a FUSE mount whose daemon died still succeeds from the attribute
/// cache for a while (1 s with mfsmount's defaults), while this fails at once.
fn answers(p: &Path) -> io::Result<()> {
    let mut rd = fs::read_dir(p)?;
    if let Some(e) = rd.next() {
        e?;
    }
    Ok(())
}

/// Runs a program that daemonizes (mfsmount): its output goes to `log` (a pipe would stay open in the
/// daemon), and its exit status is awaited with a deadline.
fn run_to_log(argv: &[String], log: &Path, timeout: Duration) -> Result<(), VolumeError> {
    let shown = argv.join(" ");
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| VolumeError::io(format!("opening {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| VolumeError::io("dup", e))?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| VolumeError::BackendUnavailable(format!("cannot run {}: {e}", argv[0])))?;
    let st = lamina_rbd::wait_within(&mut child, &shown, timeout)?;
    if st.success() {
        return Ok(());
    }
    let tail = last_line(log);
    Err(VolumeError::BackendUnavailable(format!(
        "`{shown}` failed ({st}): {tail}"
    )))
}

fn last_line(p: &Path) -> String {
    let text = fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let l = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    l.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(dir: &Path, mfsmount: &str) -> MfsMount {
        MfsMount::new(
            MfsMountConfig {
                master_host: "127.0.0.1".into(),
                master_port: 1,
                subfolder: "/".into(),
                mount_options: vec!["mfscachemode=DIRECT".into()],
                mfsmount: mfsmount.into(),
                mountpoint: dir.join("mnt"),
            },
            Duration::from_secs(5),
            dir.join("mfsmount.log"),
        )
    }

    #[test]
    fn an_unreachable_master_fails_the_probe_at_once() {
        let t = tempfile::tempdir().unwrap();
        let m = mount(t.path(), "mfsmount");
        let t0 = Instant::now();
        let e = m.probe().unwrap_err().to_string();
        assert!(
            e.starts_with("backend unavailable: MooseFS master 127.0.0.1:1 is unreachable"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_mount_program_that_fails_names_its_command_and_its_last_line() {
        let t = tempfile::tempdir().unwrap();
        let prog = t.path().join("fake-mfsmount");
        fs::write(
            &prog,
            "#!/bin/sh\necho \"$@\"\necho 'cannot connect to master' >&2\nexit 1\n",
        )
        .unwrap();
        fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let m = mount(t.path(), prog.to_str().unwrap());
        let e = m.ensure_mounted(&t.path().join("mnt")).unwrap_err().to_string();
        assert!(e.contains("-H 127.0.0.1 -P 1 -S / -o mfscachemode=DIRECT"), "{e}");
        assert!(e.ends_with("cannot connect to master"), "{e}");
        assert!(t.path().join("mnt").is_dir(), "the mountpoint is made");
        assert!(!m.is_mounted());
    }
}
