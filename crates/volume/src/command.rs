//! External tools run as argv lists (never through a shell), with placeholders and a deadline.
//!
//! A template such as `["mfssetgoal", "-r", "{goal}", "{path}"]` is checked once when the configuration is
//! loaded: not empty, a program name first, only known placeholders. Building it substitutes values inside
//! each argument (so `--goal={goal}` works); a value can never add or split arguments.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::VolumeError;

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &["{goal}", "{path}", "{size}"];

/// A checked argv template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTemplate {
    argv: Vec<String>,
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

impl CommandTemplate {
    /// Checks `argv`: non-empty, a non-empty program, no NUL, and only placeholders from `allowed`.
    pub fn new(what: &str, argv: Vec<String>, allowed: &[&str]) -> Result<Self, String> {
        let Some(prog) = argv.first() else {
            return Err(format!("{what}: empty command"));
        };
        if prog.is_empty() || prog.contains('{') {
            return Err(format!(
                "{what}: the first element must be a program, got {prog:?}"
            ));
        }
        for a in &argv {
            if a.contains('\0') {
                return Err(format!("{what}: argument {a:?} contains NUL"));
            }
            let mut rest = a.as_str();
            while let Some(i) = rest.find('{') {
                let tail = &rest[i..];
                let Some(p) = PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) else {
                    return Err(format!(
                        "{what}: unknown placeholder in {a:?} (known: {})",
                        allowed.join(" ")
                    ));
                };
                if !allowed.contains(p) {
                    return Err(format!(
                        "{what}: placeholder {p} is not available here (known: {})",
                        allowed.join(" ")
                    ));
                }
                rest = &tail[p.len()..];
            }
        }
        Ok(CommandTemplate { argv })
    }

    /// The argv with every placeholder replaced by its value (`values`: `("{goal}", "2")`, ...).
    pub fn build(&self, values: &[(&str, &str)]) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| {
                let mut s = a.clone();
                for (k, v) in values {
                    s = s.replace(k, v);
                }
                s
            })
            .collect()
    }

    /// The program (first element).
    pub fn program(&self) -> &str {
        &self.argv[0]
    }

    /// Builds and runs the command, waiting at most `timeout`; a command still running then is killed.
    pub fn run(&self, values: &[(&str, &str)], timeout: Duration) -> Result<CommandOutput, VolumeError> {
        run_argv(&self.build(values), timeout)
    }
}

/// Runs `argv` (no shell), capturing its output, killing it after `timeout`. A program that cannot be
/// started or does not finish in time is [`VolumeError::BackendUnavailable`].
pub fn run_argv(argv: &[String], timeout: Duration) -> Result<CommandOutput, VolumeError> {
    let shown = argv.join(" ");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| VolumeError::BackendUnavailable(format!("cannot run {}: {e}", argv[0])))?;
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

/// Parses `mfsgetgoal`/`lizardfs getgoal` output (`PATH: GOAL`) into the goal.
pub fn parse_getgoal(stdout: &str) -> Option<String> {
    let line = stdout.lines().find(|l| !l.trim().is_empty())?;
    let goal = line.rsplit_once(':').map(|(_, g)| g).unwrap_or(line).trim();
    (!goal.is_empty()).then(|| goal.to_string())
}

/// A path as a placeholder value (paths lamina builds are UTF-8: the root is configured as a string and
/// names are strings).
pub(crate) fn path_arg(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Waits for `child` (the command `shown`) to exit; kills and reaps it when `timeout` passes first.
pub(crate) fn wait_within(
    child: &mut Child,
    shown: &str,
    timeout: Duration,
) -> Result<ExitStatus, VolumeError> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VolumeError::BackendUnavailable(format!(
                    "`{shown}` did not finish within {} s",
                    timeout.as_secs_f32()
                )));
            }
            Err(e) => return Err(VolumeError::io(format!("waiting for `{shown}`"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn templates_are_checked() {
        let all = PLACEHOLDERS;
        assert!(CommandTemplate::new(
            "goal_command",
            argv(&["mfssetgoal", "-r", "{goal}", "{path}"]),
            all
        )
        .is_ok());
        assert!(CommandTemplate::new(
            "goal_command",
            argv(&["lizardfs", "setgoal", "-r", "{goal}", "{path}"]),
            all
        )
        .is_ok());
        for (bad, want) in [
            (argv(&[]), "empty command"),
            (argv(&[""]), "must be a program"),
            (argv(&["{path}"]), "must be a program"),
            (argv(&["x", "{goals}"]), "unknown placeholder"),
            (argv(&["x", "{"]), "unknown placeholder"),
            (argv(&["x", "a\0b"]), "NUL"),
        ] {
            let e = CommandTemplate::new("goal_command", bad.clone(), all).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        let e = CommandTemplate::new("getgoal_command", argv(&["x", "{goal}"]), &["{path}"]).unwrap_err();
        assert!(e.contains("not available here"), "{e}");
    }

    #[test]
    fn build_substitutes_inside_arguments_only() {
        let t = CommandTemplate::new(
            "g",
            argv(&["tool", "--goal={goal}", "{path}", "{path}/x"]),
            PLACEHOLDERS,
        )
        .unwrap();
        assert_eq!(
            t.build(&[("{goal}", "2"), ("{path}", "/m/v 1")]),
            argv(&["tool", "--goal=2", "/m/v 1", "/m/v 1/x"])
        );
        // A value with spaces or quotes stays one argument: no shell ever sees it.
        assert_eq!(
            t.build(&[("{goal}", "a b;c"), ("{path}", "p")])[1],
            "--goal=a b;c"
        );
    }

    #[test]
    fn run_captures_and_times_out() {
        let ok = run_argv(
            &argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(ok.code, Some(3));
        assert_eq!(ok.stdout, "out\n");
        assert_eq!(ok.summary(), "exited with 3: err");
        let t = Instant::now();
        let e = run_argv(&argv(&["sleep", "10"]), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("backend unavailable: `sleep 10` did not finish"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        let e = run_argv(&argv(&["/nonexistent/tool"]), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("backend unavailable: cannot run /nonexistent/tool"),
            "{e}"
        );
    }

    #[test]
    fn getgoal_output() {
        assert_eq!(
            parse_getgoal("/mnt/c/docker/volumes/v1: 2\n").as_deref(),
            Some("2")
        );
        assert_eq!(parse_getgoal("/x/y: ssd_fast\n").as_deref(), Some("ssd_fast"));
        assert_eq!(parse_getgoal("").as_deref(), None);
    }
}
