//! Leases on a directory of a POSIX distributed filesystem that every host of a lamina cluster mounts:
//! host heartbeats, per-host references to named things, and exclusive claims with expiry.
//!
//! Nothing here talks to other hosts: every host reads and writes the one shared directory, and the
//! protocol rests on five operations that the filesystem's metadata server performs atomically (on MooseFS,
//! the master, which serialises every namespace change):
//! - create-exclusive (`O_CREAT|O_EXCL`) of a temporary file with a unique name;
//! - `link(2)` of a complete temporary file to a claim's name, failing with `EEXIST` when it exists: the
//!   claim appears whole or not at all, and one of two concurrent claimers wins;
//! - `rename(2)` within one directory, replacing the target: heartbeats, renewals and takeovers replace
//!   their file whole (a takeover only under its takeover lock, itself taken by `link(2)`);
//! - `unlink(2)` and `rmdir(2)` of an empty directory (fails with `ENOTEMPTY` otherwise);
//! - `mkdir(2)`.
//!
//! Time: a file's modification time is set by the filesystem when it is created. A heartbeat or a renewal
//! creates a fresh file and renames it into place, so its mtime is the filesystem's clock at that moment,
//! and "now" is read by creating a probe file. On MooseFS the master stamps new inodes with its own clock
//! (in seconds), so the ages compared here never mix two hosts' clocks and host clock skew does not matter.
//! On a filesystem whose clients stamp times themselves (CephFS), host clocks must agree to well within the
//! lease. The lease must exceed the heartbeat interval plus the filesystem's attribute and entry cache
//! timeouts (mfsmount: about 1 s each by default); [`LeaseConfig::check`] requires at least twice the
//! heartbeat interval.
//!
//! Layout below the directory:
//!
//! ```text
//! hosts/<host>                 heartbeat: replaced every heartbeat interval; its mtime is the last beat
//! clock/.now-…                 probes of the filesystem's clock (created, read, removed)
//! refs/<kind>/<name>/<host>    <host> references <name>; counts only while <host> is alive
//! claims/<kind>/<name>         exclusive claim: {"host","token"}; expires a lease after its mtime
//! claims/<kind>/.takeover-<h>  lock of the takeover of an expired claim (h: hash of name and token)
//! */.tmp-<host>-…              temporaries of one operation
//! ```
#![forbid(unsafe_code)]

pub(crate) mod claim;
pub mod error;
mod heartbeat;
mod names;
mod time;

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, warn};

pub use claim::{Claim, ClaimInfo};
pub use error::LeaseError;
pub use heartbeat::{Heartbeat, STOP_WAIT};
pub use names::{HostId, MAX_NAME};

use claim::ClaimState;

/// Default lease: a host silent this long counts as gone; an unrenewed claim this old expires.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Settings of one host's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The shared directory (created when missing).
    pub dir: PathBuf,
    /// This host.
    pub host: HostId,
    /// How long a host may stay silent, and a claim unrenewed, before it counts as gone.
    pub lease: Duration,
    /// How often the heartbeat thread beats (and renews this host's claims).
    pub heartbeat: Duration,
}

impl LeaseConfig {
    /// The rules on the timings: heartbeat at least 1 s, lease at least twice the heartbeat interval.
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat < Duration::from_secs(1) {
            return Err("heartbeat interval must be at least 1 s".into());
        }
        if self.lease < 2 * self.heartbeat {
            return Err(format!(
                "lease ({} s) must be at least twice the heartbeat interval ({} s)",
                self.lease.as_secs(),
                self.heartbeat.as_secs()
            ));
        }
        Ok(())
    }
}

/// A host as its heartbeat shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// The host.
    pub host: HostId,
    /// Time since its last heartbeat, on the shared filesystem's clock (`None`: it never beat).
    pub silent: Option<Duration>,
    /// Beat within the lease.
    pub alive: bool,
}

/// One host's handle on the lease directory; cheap to clone, shared with the heartbeat thread.
#[derive(Debug, Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: LeaseConfig,
    seq: AtomicU64,
    /// Local start time of the last heartbeat that reached the directory.
    last_beat: Mutex<Option<Instant>>,
    /// Claims the heartbeat renews.
    claims: Mutex<Vec<Weak<ClaimState>>>,
}

fn io_at(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> LeaseError {
    let context = format!("{what} {}", path.display());
    move |e| LeaseError::io(context, e)
}

impl Lease {
    /// Prepares the directory, removes this host's temporaries left by a crash, and beats once.
    pub fn open(cfg: LeaseConfig) -> Result<Lease, LeaseError> {
        for sub in ["hosts", "clock", "refs", "claims"] {
            let d = cfg.dir.join(sub);
            fs::create_dir_all(&d).map_err(io_at("creating", &d))?;
        }
        let lease = Lease {
            inner: Arc::new(Inner {
                cfg,
                seq: AtomicU64::new(0),
                last_beat: Mutex::new(None),
                claims: Mutex::new(Vec::new()),
            }),
        };
        lease.sweep_own_temporaries();
        lease.beat()?;
        Ok(lease)
    }

    /// This host.
    pub fn host(&self) -> &HostId {
        &self.inner.cfg.host
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.inner.cfg
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.inner.cfg.dir.join(sub)
    }

    /// A unique temporary name of this host in `dir`.
    fn temp_name(&self, dir: &Path, prefix: &str) -> PathBuf {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        dir.join(format!(".{prefix}-{}-{}-{n}", self.host(), std::process::id()))
    }

    /// Creates a new file with `content` under a unique temporary name in `dir` (create-exclusive).
    fn write_temp(&self, dir: &Path, content: &[u8]) -> Result<PathBuf, LeaseError> {
        let tmp = self.temp_name(dir, "tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_at("creating", &tmp))?;
        if let Err(e) = f.write_all(content) {
            let _ = fs::remove_file(&tmp);
            return Err(LeaseError::io(format!("writing {}", tmp.display()), e));
        }
        Ok(tmp)
    }

    fn sweep_own_temporaries(&self) {
        let mine = format!("-{}-", self.host());
        let mut dirs = vec![self.dir("hosts"), self.dir("clock")];
        if let Ok(rd) = fs::read_dir(self.dir("claims")) {
            dirs.extend(rd.flatten().map(|e| e.path()));
        }
        for d in dirs {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if (n.starts_with(".tmp-") || n.starts_with(".now-")) && n.contains(&mine) {
                    debug!(path = %e.path().display(), "removing a temporary left by a crash");
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// The shared filesystem's clock now: the mtime of a file created for the purpose.
    pub fn now(&self) -> Result<SystemTime, LeaseError> {
        let probe = self.temp_name(&self.dir("clock"), "now");
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(io_at("creating", &probe))?;
        let t = f
            .metadata()
            .and_then(|m| m.modified())
            .map_err(io_at("reading the time of", &probe));
        drop(f);
        let _ = fs::remove_file(&probe);
        t
    }

    /// Refreshes this host's heartbeat and renews the claims it holds.
    pub fn beat(&self) -> Result<(), LeaseError> {
        let started = Instant::now();
        let hosts = self.dir("hosts");
        let content = serde_json::json!({
            "host": self.host().as_str(),
            "pid": std::process::id(),
            "hostname": fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        })
        .to_string();
        let tmp = self.write_temp(&hosts, content.as_bytes())?;
        let target = hosts.join(self.host().as_str());
        if let Err(e) = fs::rename(&tmp, &target) {
            let _ = fs::remove_file(&tmp);
            return Err(LeaseError::io(
                format!("renaming {} into place", target.display()),
                e,
            ));
        }
        *self.inner.last_beat.lock().unwrap_or_else(|e| e.into_inner()) = Some(started);
        let live: Vec<Arc<ClaimState>> = {
            let mut claims = self.inner.claims.lock().unwrap_or_else(|e| e.into_inner());
            claims.retain(|w| w.strong_count() > 0);
            claims.iter().filter_map(Weak::upgrade).collect()
        };
        for c in live {
            if c.is_active() {
                if let Err(e) = self.renew_claim(&c) {
                    warn!(error = %e, "renewing a claim");
                }
            }
        }
        Ok(())
    }

    /// True while this host's last successful heartbeat is younger than the lease (by this host's own
    /// monotonic clock): other hosts still count it as alive.
    pub fn is_fresh(&self) -> bool {
        self.inner
            .last_beat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < self.inner.cfg.lease)
    }

    /// Starts a thread that beats every heartbeat interval until the returned handle is stopped or dropped.
    pub fn start_heartbeat(&self) -> Heartbeat {
        Heartbeat::start(self.clone())
    }

    fn state_at(&self, host: HostId, now: SystemTime) -> Result<HostState, LeaseError> {
        let path = self.dir("hosts").join(host.as_str());
        let silent = match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => Some(time::since(now, t)),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(LeaseError::io(format!("reading {}", path.display()), e)),
        };
        Ok(HostState {
            alive: silent.is_some_and(|s| s <= self.inner.cfg.lease),
            host,
            silent,
        })
    }

    /// One host's state.
    pub fn host_state(&self, host: &HostId) -> Result<HostState, LeaseError> {
        let now = self.now()?;
        self.state_at(host.clone(), now)
    }

    /// Every host that ever beat in this directory, alive or not.
    pub fn hosts(&self) -> Result<Vec<HostState>, LeaseError> {
        let now = self.now()?;
        let mut out = Vec::new();
        for n in list(&self.dir("hosts"))? {
            if let Ok(h) = HostId::new(n) {
                out.push(self.state_at(h, now)?);
            }
        }
        Ok(out)
    }

    fn ref_dir(&self, kind: &str, name: &str) -> Result<PathBuf, LeaseError> {
        names::check_kind(kind)?;
        names::check_name(name)?;
        Ok(self.dir("refs").join(kind).join(name))
    }

    /// Records that this host references `kind`/`name` (idempotent).
    pub fn hold(&self, kind: &str, name: &str) -> Result<(), LeaseError> {
        let dir = self.ref_dir(kind, name)?;
        let file = dir.join(self.host().as_str());
        let mut last = None;
        // The file is created first: the directory is usually there (another host holds the name), and then
        // the hold is one create on the metadata server. Without the directory, it is made and the create
        // tried again; a concurrent release on another host may remove the (then empty) directory between
        // the mkdir and the create, so again.
        for _ in 0..8 {
            match OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&file)
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => last = Some(e),
                Err(e) => return Err(LeaseError::io(format!("creating {}", file.display()), e)),
            }
            fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
        }
        Err(LeaseError::io(
            format!("creating {}", file.display()),
            last.unwrap_or_else(|| ErrorKind::NotFound.into()),
        ))
    }

    /// Drops this host's reference to `kind`/`name` (idempotent).
    pub fn release(&self, kind: &str, name: &str) -> Result<(), LeaseError> {
        let dir = self.ref_dir(kind, name)?;
        let file = dir.join(self.host().as_str());
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(LeaseError::io(format!("removing {}", file.display()), e)),
        }
        // Fails while another host still holds it: the directory stays.
        let _ = fs::remove_dir(&dir);
        Ok(())
    }

    /// Every host with a reference to `kind`/`name`, alive or not.
    pub fn all_holders(&self, kind: &str, name: &str) -> Result<Vec<HostState>, LeaseError> {
        let dir = self.ref_dir(kind, name)?;
        let hosts = list(&dir)?;
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now()?;
        let mut out = Vec::new();
        for n in hosts {
            if let Ok(h) = HostId::new(n) {
                out.push(self.state_at(h, now)?);
            }
        }
        Ok(out)
    }

    /// The live hosts referencing `kind`/`name`.
    pub fn holders(&self, kind: &str, name: &str) -> Result<Vec<HostId>, LeaseError> {
        Ok(self
            .all_holders(kind, name)?
            .into_iter()
            .filter(|s| s.alive)
            .map(|s| s.host)
            .collect())
    }

    /// Every referenced name of `kind` with its holders, alive or not (one pass for garbage collection and
    /// statistics).
    pub fn all_references(&self, kind: &str) -> Result<Vec<(String, Vec<HostState>)>, LeaseError> {
        names::check_kind(kind)?;
        let kdir = self.dir("refs").join(kind);
        let names = list(&kdir)?;
        let now = self.now()?;
        let mut states: std::collections::BTreeMap<String, HostState> = Default::default();
        let mut out = Vec::new();
        for name in names {
            let mut holders = Vec::new();
            for h in list(&kdir.join(&name))? {
                let Ok(id) = HostId::new(h.clone()) else { continue };
                let s = match states.get(&h) {
                    Some(s) => s.clone(),
                    None => {
                        let s = self.state_at(id, now)?;
                        states.insert(h, s.clone());
                        s
                    }
                };
                holders.push(s);
            }
            if !holders.is_empty() {
                out.push((name, holders));
            }
        }
        Ok(out)
    }

    /// The names of `kind` this host references.
    pub fn references(&self, kind: &str) -> Result<Vec<String>, LeaseError> {
        names::check_kind(kind)?;
        let kdir = self.dir("refs").join(kind);
        let mut out = Vec::new();
        for name in list(&kdir)? {
            let file = kdir.join(&name).join(self.host().as_str());
            match fs::symlink_metadata(&file) {
                Ok(_) => out.push(name),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(LeaseError::io(format!("reading {}", file.display()), e)),
            }
        }
        Ok(out)
    }

    /// Removes the references to `kind`/`name` of hosts that are not alive; returns those hosts.
    pub fn prune_dead(&self, kind: &str, name: &str) -> Result<Vec<HostId>, LeaseError> {
        let dir = self.ref_dir(kind, name)?;
        let mut gone = Vec::new();
        for s in self.all_holders(kind, name)? {
            if s.alive {
                continue;
            }
            let file = dir.join(s.host.as_str());
            match fs::remove_file(&file) {
                Ok(()) => gone.push(s.host),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(LeaseError::io(format!("removing {}", file.display()), e)),
            }
        }
        let _ = fs::remove_dir(&dir);
        Ok(gone)
    }
}

/// The entry names of `dir` that are not temporaries (`.…`); a missing directory is empty.
fn list(dir: &Path) -> Result<Vec<String>, LeaseError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LeaseError::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io_at("listing", dir))?;
        if let Ok(n) = e.file_name().into_string() {
            if !n.starts_with('.') {
                out.push(n);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests;
