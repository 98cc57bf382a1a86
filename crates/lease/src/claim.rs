//! Exclusive claims with expiry.
//!
//! `claims/<kind>/<name>` holds `{"host","token"}`. It appears by `link(2)` of a complete temporary file
//! (one of two concurrent claimers gets `EEXIST`), is renewed by renaming a fresh file over it (its mtime
//! is the filesystem's clock at the renewal), and expires a lease after its mtime. Takers of an expired claim
//! first link a takeover lock named after that claim's token (`.takeover-<hash>`; one of them gets it, the
//! others see the claim as held by it), read the claim again under the lock, and only if it is still the
//! same expired claim rename their own over it. A takeover lock older than the lease (its taker died) is
//! passed by linking the lock named after that lock's token.
//!
//! An owner renews (and removes at release) only while less than `lease - heartbeat` has passed since its
//! last renewal began, by its own monotonic clock, and otherwise counts the claim as lost; so a taker (which
//! waits a full lease on the filesystem's clock) never races a renewal unless the two clocks' rates differ by
//! more than the heartbeat's share of the lease.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::LeaseError;
use crate::names::{check_kind, check_name, HostId};
use crate::Lease;

#[derive(Debug, Serialize, Deserialize)]
struct ClaimFile {
    host: String,
    token: String,
}

/// A claim as the directory shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    /// The claiming host.
    pub host: HostId,
    /// When it expires unless renewed, on the shared filesystem's clock.
    pub until: SystemTime,
    /// Already expired (it may be taken over).
    pub expired: bool,
}

#[derive(Debug)]
pub(crate) struct ClaimState {
    kind: String,
    name: String,
    path: PathBuf,
    token: String,
    /// Local start of the last successful renewal (or of the claim).
    renewed: Mutex<Instant>,
    lost: Mutex<Option<String>>,
    released: AtomicBool,
    /// Held while the claim's file is rewritten (a renewal) or removed (the release): a renewal that read
    /// the file before a release must not put it back after.
    file: Mutex<()>,
}

impl ClaimState {
    pub(crate) fn is_active(&self) -> bool {
        !self.released.load(Ordering::SeqCst) && self.lost.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn lose(&self, reason: String) -> LeaseError {
        warn!(kind = %self.kind, name = %self.name, %reason, "claim lost");
        *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
        self.lost_error(reason)
    }

    fn lost_error(&self, reason: String) -> LeaseError {
        LeaseError::Lost {
            kind: self.kind.clone(),
            name: self.name.clone(),
            reason,
        }
    }
}

/// This host's exclusive claim on a thing, renewed by the heartbeat while it lives; released when dropped.
#[derive(Debug)]
pub struct Claim {
    lease: Lease,
    state: Arc<ClaimState>,
}

/// Reads a claim file: its content and mtime; `None` when it does not exist.
fn read_claim(path: &Path) -> Result<Option<(ClaimFile, SystemTime)>, LeaseError> {
    let read = || -> std::io::Result<(Vec<u8>, SystemTime)> {
        let f = fs::File::open(path)?;
        let t = f.metadata()?.modified()?;
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut buf)?;
        Ok((buf, t))
    };
    match read() {
        Ok((buf, t)) => {
            let c: ClaimFile = serde_json::from_slice(&buf).map_err(|e| LeaseError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            Ok(Some((c, t)))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LeaseError::io(format!("reading {}", path.display()), e)),
    }
}

impl Lease {
    fn claim_path(&self, kind: &str, name: &str) -> Result<PathBuf, LeaseError> {
        check_kind(kind)?;
        check_name(name)?;
        Ok(self.dir("claims").join(kind).join(name))
    }

    fn info(
        &self,
        c: &ClaimFile,
        mtime: SystemTime,
        now: SystemTime,
        path: &Path,
    ) -> Result<ClaimInfo, LeaseError> {
        let host = HostId::new(c.host.clone()).map_err(|e| LeaseError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let until = mtime + self.config().lease;
        Ok(ClaimInfo {
            host,
            until,
            expired: now > until,
        })
    }

    /// The current claim on `kind`/`name`, if any.
    pub fn claim_state(&self, kind: &str, name: &str) -> Result<Option<ClaimInfo>, LeaseError> {
        let path = self.claim_path(kind, name)?;
        match read_claim(&path)? {
            None => Ok(None),
            Some((c, t)) => {
                let now = self.now()?;
                self.info(&c, t, now, &path).map(Some)
            }
        }
    }

    /// Claims `kind`/`name` for this host: `Err(HeldBy)` while another claim on it has not expired (this
    /// host's own earlier claim included); an expired claim is taken over.
    pub fn claim(&self, kind: &str, name: &str) -> Result<Claim, LeaseError> {
        let path = self.claim_path(kind, name)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&dir).map_err(|e| LeaseError::io(format!("creating {}", dir.display()), e))?;
        let token = format!(
            "{}-{}-{}-{}",
            self.host(),
            std::process::id(),
            self.inner.seq.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let content = serde_json::to_vec(&ClaimFile {
            host: self.host().to_string(),
            token: token.clone(),
        })
        .unwrap_or_default();
        let mut last = None;
        for _ in 0..8 {
            let started = Instant::now();
            let tmp = self.write_temp(&dir, &content)?;
            let linked = fs::hard_link(&tmp, &path);
            match linked {
                Ok(()) => {
                    let _ = fs::remove_file(&tmp);
                    return Ok(self.claimed(kind, name, path, token, started));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(LeaseError::io(format!("linking {}", path.display()), e));
                }
            }
            let taken = self.take_over(&dir, &path, &tmp, &content, started);
            let _ = fs::remove_file(&tmp);
            match taken? {
                TakeOver::Done(info) => {
                    warn!(kind, name, host = %info.host, "took over an expired claim");
                    return Ok(self.claimed(kind, name, path, token, started));
                }
                TakeOver::Held(info) => return Err(held_by(kind, name, info)),
                TakeOver::Changed(info) => last = info,
            }
        }
        match last {
            Some(info) => Err(held_by(kind, name, info)),
            None => Err(LeaseError::io(
                format!("claiming {}", path.display()),
                std::io::Error::new(ErrorKind::WouldBlock, "the claim kept changing"),
            )),
        }
    }

    fn claimed(&self, kind: &str, name: &str, path: PathBuf, token: String, started: Instant) -> Claim {
        let state = Arc::new(ClaimState {
            kind: kind.to_string(),
            name: name.to_string(),
            path,
            token,
            renewed: Mutex::new(started),
            lost: Mutex::new(None),
            released: AtomicBool::new(false),
            file: Mutex::new(()),
        });
        self.inner
            .claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&state));
        debug!(kind, name, "claimed");
        Claim {
            lease: self.clone(),
            state,
        }
    }

    /// After a claimer found `path` taken: replaces it with `tmp` (this host's claim, `content`) if it has
    /// expired. Of the takers of one expired claim, only the one that links the takeover lock of that claim's
    /// token first may replace it, and only after reading the same expired claim again under the lock.
    fn take_over(
        &self,
        dir: &Path,
        path: &Path,
        tmp: &Path,
        content: &[u8],
        started: Instant,
    ) -> Result<TakeOver, LeaseError> {
        let Some((current, mtime)) = read_claim(path)? else {
            return Ok(TakeOver::Changed(None));
        };
        let now = self.now()?;
        let info = self.info(&current, mtime, now, path)?;
        if !info.expired {
            return Ok(TakeOver::Held(info));
        }
        let locks = match self.takeover_lock(dir, path, &current.token, content, now)? {
            Ok(locks) => locks,
            Err(taker) => return Ok(TakeOver::Held(taker)),
        };
        let cfg = self.config();
        let result = match read_claim(path)? {
            Some((again, t)) if again.token == current.token && t == mtime => {
                if started.elapsed() + cfg.heartbeat >= cfg.lease {
                    // This host was too slow: its lock may count as expired for the next taker.
                    Ok(TakeOver::Changed(Some(info)))
                } else {
                    fs::rename(tmp, path)
                        .map(|()| TakeOver::Done(info))
                        .map_err(|e| LeaseError::io(format!("taking over {}", path.display()), e))
                }
            }
            Some((other, t)) => Ok(TakeOver::Changed(Some(self.info(&other, t, now, path)?))),
            None => Ok(TakeOver::Changed(None)),
        };
        for l in locks {
            let _ = fs::remove_file(l);
        }
        result
    }

    /// Links the takeover lock of the claim generation `gen` at `path`: `Ok(locks to remove afterwards)`,
    /// or `Err(the taker holding it)`. A lock older than the lease (its taker died) is passed by linking the
    /// lock of that lock's generation.
    fn takeover_lock(
        &self,
        dir: &Path,
        path: &Path,
        gen: &str,
        content: &[u8],
        now: SystemTime,
    ) -> Result<Result<Vec<PathBuf>, ClaimInfo>, LeaseError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut gen = gen.to_string();
        let mut chain = Vec::new();
        for _ in 0..8 {
            let lock = dir.join(format!(
                ".takeover-{:016x}",
                fnv1a(&[name.as_bytes(), b"\0", gen.as_bytes()])
            ));
            let tmp = self.write_temp(dir, content)?;
            let linked = fs::hard_link(&tmp, &lock);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    chain.push(lock);
                    return Ok(Ok(chain));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(LeaseError::io(format!("linking {}", lock.display()), e)),
            }
            let Some((holder, t)) = read_claim(&lock)? else {
                continue;
            };
            let info = self.info(&holder, t, now, &lock)?;
            if !info.expired {
                return Ok(Err(info));
            }
            chain.push(lock);
            gen = holder.token;
        }
        Err(LeaseError::io(
            format!("taking over {}", path.display()),
            std::io::Error::new(ErrorKind::WouldBlock, "too many stale takeover locks"),
        ))
    }

    /// Renews `c`: refused (and the claim marked lost) when it is no longer this host's or could have
    /// expired.
    pub(crate) fn renew_claim(&self, c: &ClaimState) -> Result<(), LeaseError> {
        let _file = c.file.lock().unwrap_or_else(|e| e.into_inner());
        if c.released.load(Ordering::SeqCst) {
            return Err(c.lost_error("released".into()));
        }
        if let Some(r) = c.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(c.lost_error(r));
        }
        let started = Instant::now();
        let cfg = self.config();
        let since = c.renewed.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
        if since + cfg.heartbeat >= cfg.lease {
            return Err(c.lose(format!(
                "not renewed for {} s (lease {} s)",
                since.as_secs(),
                cfg.lease.as_secs()
            )));
        }
        match read_claim(&c.path)? {
            Some((f, _)) if f.token == c.token => {}
            Some((f, _)) => return Err(c.lose(format!("taken over by host {}", f.host))),
            None => return Err(c.lose("its file was removed".into())),
        }
        let dir = c.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let content = serde_json::to_vec(&ClaimFile {
            host: self.host().to_string(),
            token: c.token.clone(),
        })
        .unwrap_or_default();
        let tmp = self.write_temp(&dir, &content)?;
        if let Err(e) = fs::rename(&tmp, &c.path) {
            let _ = fs::remove_file(&tmp);
            return Err(LeaseError::io(format!("renewing {}", c.path.display()), e));
        }
        *c.renewed.lock().unwrap_or_else(|e| e.into_inner()) = started;
        Ok(())
    }
}

/// What a takeover attempt found.
enum TakeOver {
    /// This host's claim replaced the expired one (whose holder is given).
    Done(ClaimInfo),
    /// The claim, or the takeover of it, is held (not expired).
    Held(ClaimInfo),
    /// The claim changed meanwhile (the current one, if any): look again.
    Changed(Option<ClaimInfo>),
}

/// FNV-1a, 64 bits: the same on every host and build (names of takeover locks).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn held_by(kind: &str, name: &str, info: ClaimInfo) -> LeaseError {
    LeaseError::HeldBy {
        kind: kind.to_string(),
        name: name.to_string(),
        host: info.host.to_string(),
        until: info.until,
    }
}

impl Claim {
    /// Kind of the claimed thing.
    pub fn kind(&self) -> &str {
        &self.state.kind
    }

    /// Name of the claimed thing.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Renews the claim now (the heartbeat also does, every interval). Call it right before publishing
    /// what the claim guards: `Err(Lost)` means another host may have taken over.
    pub fn renew(&self) -> Result<(), LeaseError> {
        self.lease.renew_claim(&self.state)
    }

    /// True while the claim is this host's by its own clock (neither lost, released, nor unrenewed for
    /// `lease - heartbeat`).
    pub fn is_held(&self) -> bool {
        let cfg = self.lease.config();
        self.state.is_active()
            && self
                .state
                .renewed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                + cfg.heartbeat
                < cfg.lease
    }

    /// Gives the claim up (removes its file if it is still this host's).
    pub fn release(self) -> Result<(), LeaseError> {
        self.release_inner()
    }

    pub(crate) fn release_inner(&self) -> Result<(), LeaseError> {
        let _file = self.state.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.state.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let cfg = self.lease.config();
        let since = self
            .state
            .renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if since + cfg.heartbeat >= cfg.lease {
            // It may have expired and been taken over: removing the file now could remove the new claim.
            debug!(kind = %self.state.kind, name = %self.state.name, "claim left to expire at release");
            return Ok(());
        }
        match read_claim(&self.state.path)? {
            Some((f, _)) if f.token == self.state.token => match fs::remove_file(&self.state.path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LeaseError::io(
                        format!("removing {}", self.state.path.display()),
                        e,
                    ))
                }
            },
            _ => debug!(kind = %self.state.kind, name = %self.state.name, "claim no longer ours at release"),
        }
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            warn!(kind = %self.state.kind, name = %self.state.name, error = %e, "releasing a claim");
        }
    }
}
