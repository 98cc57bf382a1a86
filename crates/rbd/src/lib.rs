//! Ceph RBD plumbing shared by lamina's RBD volumes (`lamina-volume`) and its RBD layer backend
//! (`lamina-store`): the `rbd` command-line tool run with the cluster timeouts and a process deadline, its
//! failures classed ([`classify`]), and images brought to this host as block devices with a filesystem
//! mounted on them ([`Rbd::attach`], [`Rbd::detach`]).
//!
//! An image reaches this host through the kernel's rbd driver (`rbd device map`, [`MapMode::Krbd`]) or, where
//! the kernel has none, through one `rbd-fuse` process per image exposing it as a file, with a loop device over
//! that file ([`MapMode::Fuse`]). Each attachment lives in a directory of its own:
//!
//! ```text
//! <dir>/fuse/            rbd-fuse's mount point: the image as the file fuse/<image>
//! <dir>/fs/              the image's filesystem
//! <dir>/attached.json    the rbd-fuse PID and start time, the device, whether it is read-only
//! ```
//!
//! so that a restarted lamina finds and takes down what an earlier run left (a reused PID is never
//! signalled: the start time in `/proc/PID/stat` must match). The crate knows nothing of volumes or layers.
#![forbid(unsafe_code)]

mod attach;
mod cli;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use attach::STATE_FILE;
pub use cli::{classify, Cluster, Rbd};

/// What can go wrong talking to the cluster or attaching an image. Messages are lower-case.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// The cluster, the pool or a tool cannot be reached, or did not answer in time.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The pool is over its quota, or the cluster is full.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The image is locked, open elsewhere, or has clones.
    #[error("in use: {0}")]
    InUse(String),
    /// No such image or snapshot.
    #[error("not found: {0}")]
    NotFound(String),
    /// A local filesystem operation failed.
    #[error("I/O error: {context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl RbdError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RbdError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How images reach this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapMode {
    /// The kernel's rbd driver: `rbd device map` gives `/dev/rbdN`.
    Krbd,
    /// One `rbd-fuse` per image and a loop device over the file it exposes.
    Fuse,
    /// `krbd` when the kernel has rbd (`/sys/bus/rbd` exists), else `fuse`.
    Auto,
}

impl MapMode {
    /// Parses `krbd`, `fuse` or `auto`.
    pub fn parse(s: &str) -> Option<MapMode> {
        match s {
            "krbd" => Some(MapMode::Krbd),
            "fuse" => Some(MapMode::Fuse),
            "auto" => Some(MapMode::Auto),
            _ => None,
        }
    }

    /// Whether images are mapped with the kernel driver on this host.
    pub fn uses_krbd(self) -> bool {
        match self {
            MapMode::Krbd => true,
            MapMode::Fuse => false,
            MapMode::Auto => Path::new("/sys/bus/rbd").exists(),
        }
    }
}

/// The filesystem on an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4.
    Ext4,
    /// xfs.
    Xfs,
}

impl FsType {
    /// Parses `ext4` or `xfs`.
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    /// `ext4` or `xfs`.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// The output of a finished command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CommandOutput {
    /// Whether the command exited with 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A one-line summary for error messages: exit code and the last non-empty line of stderr (or stdout).
    pub fn summary(&self) -> String {
        let last = |s: &str| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        };
        let msg = last(&self.stderr)
            .or_else(|| last(&self.stdout))
            .unwrap_or_default();
        let code = self
            .code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "a signal".into());
        let msg: String = msg.chars().take(200).collect();
        format!("exited with {code}: {msg}")
    }
}

/// Runs `argv` (no shell), capturing its output, killing it after `timeout`. A program that cannot be
/// started or does not finish in time is [`RbdError::Unavailable`].
pub fn run_argv(argv: &[String], timeout: Duration) -> Result<CommandOutput, RbdError> {
    let shown = argv.join(" ");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RbdError::Unavailable(format!("cannot run {}: {e}", argv[0])))?;
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.take(1 << 20).read_to_end(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.take(1 << 20).read_to_end(&mut s);
        }
        s
    });
    let status = wait_within(&mut child, &shown, timeout)?;
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Ok(CommandOutput {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Waits for `child` (the command `shown`) to exit; kills and reaps it when `timeout` passes first.
pub fn wait_within(child: &mut Child, shown: &str, timeout: Duration) -> Result<ExitStatus, RbdError> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RbdError::Unavailable(format!(
                    "`{shown}` did not finish within {} s",
                    timeout.as_secs_f32()
                )));
            }
            Err(e) => return Err(RbdError::io(format!("waiting for `{shown}`"), e)),
        }
    }
}

/// A path as a command argument (paths lamina builds are UTF-8).
pub fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Whether `name` can be an image name (and rbd-fuse's file name): 1-128 letters, digits, `_`, `.`, `-`,
/// starting with a letter or digit.
pub fn is_image_name(name: &str) -> bool {
    name.len() <= 128
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_modes() {
        for ok in ["v1", "a.b-c_d", "9"] {
            assert!(is_image_name(ok));
        }
        for bad in ["", "-x", ".x", "a b", "a@b", "é", &"x".repeat(129)] {
            assert!(!is_image_name(bad), "{bad:?}");
        }
        assert_eq!(MapMode::parse("fuse"), Some(MapMode::Fuse));
        assert!(!MapMode::Fuse.uses_krbd());
        assert!(MapMode::Krbd.uses_krbd());
        assert_eq!(MapMode::Auto.uses_krbd(), Path::new("/sys/bus/rbd").exists());
        assert_eq!(FsType::parse("xfs"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("btrfs"), None);
    }
}
