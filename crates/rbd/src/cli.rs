//! The `rbd` tool: every call with the cluster timeouts and a process deadline, failures classed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

use crate::{path_arg, run_argv, CommandOutput, MapMode, RbdError};

/// Where the cluster is and how this host reaches its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The Ceph configuration file (`-c`).
    pub ceph_conf: PathBuf,
    /// The client id (`--id`, `admin` for `client.admin`).
    pub client_id: String,
    /// The pool holding the images.
    pub pool: String,
    /// How images reach this host.
    pub map: MapMode,
    /// The `rbd` program.
    pub rbd: PathBuf,
    /// The `rbd-fuse` program.
    pub rbd_fuse: PathBuf,
    /// The `ceph` program (asked for the pool's flags when an operation times out).
    pub ceph: PathBuf,
}

/// One lamina's handle on a pool: the `rbd` calls and the attachments of its images on this host.
#[derive(Debug)]
pub struct Rbd {
    /// Settings.
    pub cluster: Cluster,
    pub(crate) timeout: Duration,
    /// rbd-fuse's output goes here.
    pub(crate) log: PathBuf,
    /// rbd-fuse processes this process started, by attachment directory.
    pub(crate) children: Mutex<HashMap<PathBuf, Child>>,
}

/// Classifies a failed `rbd` call.
pub fn classify(what: &str, pool: &str, out: &CommandOutput) -> RbdError {
    let text = format!("{}\n{}", out.stderr, out.stdout);
    let summary = out.summary();
    let has = |s: &str| text.contains(s);
    if out.code == Some(110) || has("couldn't connect to the cluster") || has("(110)") || has("timed out") {
        RbdError::Unavailable(format!("the Ceph cluster is unreachable ({what}): {summary}"))
    } else if has("error opening pool") {
        RbdError::Unavailable(format!(
            "pool \"{pool}\" does not exist in the Ceph cluster ({what}): {summary}"
        ))
    } else if out.code == Some(122) || has("(122)") || has("quota exceeded") {
        RbdError::NoSpace(format!("pool \"{pool}\" is over its quota ({what}): {summary}"))
    } else if out.code == Some(28) || has("(28)") {
        RbdError::NoSpace(format!("the Ceph cluster is full ({what}): {summary}"))
    } else if out.code == Some(16) || has("(16)") || has("still has watchers") {
        RbdError::InUse(format!("{what}: the image is busy (open on a host): {summary}"))
    } else {
        RbdError::Unavailable(format!("{what}: {summary}"))
    }
}

impl Rbd {
    /// A handle on `cluster`; each call gets `timeout` (and a process deadline 5 s longer); rbd-fuse logs to
    /// `log`.
    pub fn new(cluster: Cluster, timeout: Duration, log: &Path) -> Rbd {
        Rbd {
            cluster,
            timeout,
            log: log.to_path_buf(),
            children: Mutex::new(HashMap::new()),
        }
    }

    /// The deadline of each cluster operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `pool/image`.
    pub fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.cluster.pool)
    }

    pub(crate) fn secs(&self) -> String {
        self.timeout.as_secs().max(1).to_string()
    }

    /// Cluster options of the `rbd` calls; rbd-fuse gets them without the OSD operation timeout (a slow OSD
    /// must not turn into I/O errors in a mounted filesystem).
    fn client_args(&self) -> Vec<String> {
        let t = self.secs();
        let mut v = self.fuse_args();
        v.extend(["--rados_osd_op_timeout".into(), t]);
        v
    }

    /// `-c <ceph.conf> --id <client>`: which cluster and as whom, for every Ceph tool.
    fn identity_args(&self) -> Vec<String> {
        vec![
            "-c".into(),
            path_arg(&self.cluster.ceph_conf),
            "--id".into(),
            self.cluster.client_id.clone(),
        ]
    }

    pub(crate) fn fuse_args(&self) -> Vec<String> {
        let t = self.secs();
        let mut v = self.identity_args();
        v.extend([
            "--client_mount_timeout".into(),
            t.clone(),
            "--rados_mon_op_timeout".into(),
            t,
        ]);
        v
    }

    /// Runs `rbd ARGS` with the cluster timeouts and a process deadline.
    pub fn cli(&self, args: &[&str]) -> Result<CommandOutput, RbdError> {
        let mut argv = vec![path_arg(&self.cluster.rbd)];
        argv.extend(self.client_args());
        argv.extend(args.iter().map(|s| s.to_string()));
        run_argv(&argv, self.timeout + Duration::from_secs(5))
    }

    /// `rbd ARGS`, classified on failure; returns stdout.
    pub fn cli_ok(&self, what: &str, args: &[&str]) -> Result<String, RbdError> {
        let out = self.cli(args)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(self.fail(what, &out))
        }
    }

    /// Classifies a failed `rbd` call. An operation that timed out after the client had connected is what a
    /// full pool looks like (Ceph pauses writes to a pool over its quota, it does not fail them): the pool's
    /// flags tell that apart from OSDs that do not answer.
    pub fn fail(&self, what: &str, out: &CommandOutput) -> RbdError {
        let e = classify(what, &self.cluster.pool, out);
        let connected = !out.stderr.contains("couldn't connect to the cluster")
            && !out.stderr.contains("monclient")
            && !out.stderr.contains("mon config");
        let timed_out = out.code == Some(110) || out.stderr.contains("(110)");
        if !(timed_out && connected) {
            return e;
        }
        let pool = &self.cluster.pool;
        match self.pool_flags() {
            Some(f) if f.iter().any(|x| x == "full_quota") => RbdError::NoSpace(format!(
                "pool \"{pool}\" is over its quota ({what}: Ceph holds writes to it until it has room again)"
            )),
            Some(f) if f.iter().any(|x| x == "full") => RbdError::NoSpace(format!(
                "pool \"{pool}\" is full ({what}: Ceph holds writes to it until it has room again)"
            )),
            _ => RbdError::Unavailable(format!(
                "the Ceph OSDs do not answer within {} s ({what}): {}",
                self.secs(),
                out.summary()
            )),
        }
    }

    /// The flags of the pool (`full`, `full_quota`, ...), from `ceph osd pool ls detail`.
    fn pool_flags(&self) -> Option<Vec<String>> {
        let mut argv = vec![path_arg(&self.cluster.ceph)];
        argv.extend(self.identity_args());
        argv.extend(["--connect-timeout".into(), self.secs()]);
        argv.extend(["osd", "pool", "ls", "detail", "--format", "json"].map(String::from));
        let out = run_argv(&argv, self.timeout + Duration::from_secs(5)).ok()?;
        if !out.success() {
            return None;
        }
        let pools: Vec<serde_json::Value> = serde_json::from_str(out.stdout.trim()).ok()?;
        let pool = pools
            .iter()
            .find(|p| p["pool_name"].as_str() == Some(self.cluster.pool.as_str()))?;
        Some(
            pool["flags_names"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect(),
        )
    }

    /// Whether the cluster takes writes to `image` now: `no space` when the pool is flagged full or over its
    /// quota (Ceph holds writes to it), `backend unavailable` when the monitors or the OSDs do not answer
    /// (a read of the image's header, within the deadline).
    pub fn probe(&self, image: &str) -> Result<(), RbdError> {
        self.check_room()?;
        self.snapshots(image).map(drop)
    }

    /// `no space` when the monitors flag the pool full or over its quota (writes to it wait, and the
    /// removal of a clone is refused, until it has room again); otherwise (or when the monitors do not
    /// answer within the deadline) `Ok`.
    pub fn check_room(&self) -> Result<(), RbdError> {
        let pool = &self.cluster.pool;
        match self.pool_flags() {
            Some(f) if f.iter().any(|x| x == "full_quota") => Err(RbdError::NoSpace(format!(
                "pool \"{pool}\" is over its quota (Ceph holds writes to it until it has room again)"
            ))),
            Some(f) if f.iter().any(|x| x == "full") => Err(RbdError::NoSpace(format!(
                "pool \"{pool}\" is full (Ceph holds writes to it until it has room again)"
            ))),
            _ => Ok(()),
        }
    }

    /// The images of the pool.
    pub fn images(&self) -> Result<Vec<String>, RbdError> {
        let pool = self.cluster.pool.clone();
        let out = self.cli_ok("listing the pool", &["ls", "--format", "json", &pool])?;
        serde_json::from_str(out.trim())
            .map_err(|e| RbdError::Unavailable(format!("rbd ls: unexpected output: {e}")))
    }

    /// The snapshot names of `image` (`None`: no such image).
    pub fn snapshots(&self, image: &str) -> Result<Option<Vec<String>>, RbdError> {
        let out = self.cli(&["snap", "ls", "--format", "json", &self.spec(image)])?;
        if !out.success() {
            if is_missing(&out) {
                return Ok(None);
            }
            return Err(self.fail("listing snapshots", &out));
        }
        let snaps: Vec<serde_json::Value> = serde_json::from_str(out.stdout.trim())
            .map_err(|e| RbdError::Unavailable(format!("rbd snap ls: unexpected output: {e}")))?;
        Ok(Some(
            snaps
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect(),
        ))
    }

    /// Removes `image` with its snapshots; a missing image is fine. Ceph refuses it (`in use`) while the
    /// image is open somewhere or one of its snapshots has clones.
    pub fn remove_image(&self, image: &str) -> Result<(), RbdError> {
        let spec = self.spec(image);
        for snap in self.snapshots(image)?.unwrap_or_default() {
            let s = format!("{spec}@{snap}");
            // Unprotected first (a snapshot that was not protected answers EINVAL); refused while it has clones.
            let out = self.cli(&["snap", "unprotect", &s])?;
            if !out.success() && out.code != Some(22) && !out.stderr.contains("(22)") && !is_missing(&out) {
                if out.code == Some(16) || out.stderr.contains("(16)") {
                    return Err(RbdError::InUse(format!(
                        "removing {spec}: snapshot {snap} has clones: {}",
                        out.summary()
                    )));
                }
                return Err(self.fail("unprotecting a snapshot", &out));
            }
            let out = self.cli(&["snap", "rm", "--no-progress", &s])?;
            if !out.success() && !is_missing(&out) {
                return Err(self.fail("removing a snapshot", &out));
            }
        }
        let out = self.cli(&["rm", "--no-progress", &spec])?;
        if out.success() || is_missing(&out) {
            return Ok(());
        }
        if out.stderr.contains("has snapshots") || out.stderr.contains("children") {
            return Err(RbdError::InUse(format!(
                "removing {spec}: its snapshot has clones: {}",
                out.summary()
            )));
        }
        Err(self.fail("removing the image", &out))
    }
}

/// Whether a failed call says the image (or snapshot) does not exist. A removal refused for lack of room
/// ends with ENOENT too (`rbd rm` moves the image to the pool's trash first; in a pool over its quota that
/// is refused, EDQUOT, and the call then fails to find the trash entry): that is not a missing image.
pub(crate) fn is_missing(out: &CommandOutput) -> bool {
    out.stderr.contains("(2)")
        && !out.stderr.contains("error opening pool")
        && !out.stderr.contains("(122)")
        && !out.stderr.contains("(28)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stderr: &str) -> CommandOutput {
        CommandOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn a_removal_refused_for_the_quota_is_not_a_missing_image() {
        let refused = out(
            2,
            "librbd::trash::MoveRequest: handle_trash_add: failed to add image to trash: (122) Disk quota exceeded\n\
             librbd::api::Trash: move: error setting trash image state: (2) No such file or directory\n\
             rbd: delete error: (2) No such file or directory",
        );
        assert!(!is_missing(&refused));
        let e = classify("removing the image", "rbd", &refused).to_string();
        assert!(e.starts_with("no space: pool \"rbd\" is over its quota"), "{e}");
        assert!(is_missing(&out(
            2,
            "rbd: error opening image x: (2) No such file or directory"
        )));
    }

    #[test]
    fn rbd_errors_are_classed() {
        for (what, pool, code, stderr, want) in [
            (
                "listing the pool",
                "rbd",
                110,
                "monclient(hunting): authenticate timed out after 3\nrbd: couldn't connect to the cluster!\nrbd: listing images failed: (110) Connection timed out",
                "backend unavailable: the Ceph cluster is unreachable",
            ),
            (
                "x",
                "nopool",
                2,
                "rbd: error opening pool 'nopool': (2) No such file or directory",
                "backend unavailable: pool \"nopool\" does not exist",
            ),
            (
                "creating the image",
                "rbd",
                122,
                "rbd: create error: (122) Disk quota exceeded",
                "no space: pool \"rbd\" is over its quota",
            ),
            (
                "removing the image",
                "rbd",
                16,
                "rbd: error: image still has watchers",
                "in use: ",
            ),
        ] {
            let e = classify(what, pool, &out(code, stderr)).to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }
}
