//! Fault points for the reliability tests (issue 8, parts 4 and 5).
//!
//! A fault point is a call `fault::point("store.apply.rename")?` placed just before a step whose
//! interruption or failure matters: an fsync or `syncfs`, a rename, a database commit, a mount. With the
//! `faults` cargo feature off (every release and package build) [`point`] is an empty inline function and
//! the names are not even in the binary. With the feature on, `LAMINA_FAULTS` arms points, read once:
//!
//! ```text
//! LAMINA_FAULTS="store.apply.rename=kill"            SIGKILL the process at the point
//! LAMINA_FAULTS="store.apply.syncfs=eio@2"           fail the 2nd hit with EIO (only that hit)
//! LAMINA_FAULTS="store.create.*=enospc"              a trailing `*` matches every name with that prefix
//! LAMINA_FAULTS="store.commit.commit=sleep(500),x=abort"
//! ```
//!
//! Actions: `kill` (SIGKILL to itself: no destructor, no flush, like a power cut for the process),
//! `abort`, `eio`, `enospc`, `erofs` (the point returns that error), `sleep(ms)`. With `LAMINA_FAULTS_LOG`
//! set to a file, every hit appends a line `<name>` to it before acting, so a test can list the points an
//! operation passes through.

use std::io;

/// Whether fault points are compiled into this build.
pub const ENABLED: bool = cfg!(feature = "faults");

/// A fault point: `Ok(())` unless the environment armed `name` with an error action.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn point(_name: &'static str) -> io::Result<()> {
    Ok(())
}

/// A fault point: `Ok(())` unless the environment armed `name` with an error action.
#[cfg(feature = "faults")]
pub fn point(name: &'static str) -> io::Result<()> {
    armed::hit(name)
}

#[cfg(feature = "faults")]
mod armed {
    use std::collections::HashMap;
    use std::io::{self, Write};
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    #[derive(Clone, Copy, Debug)]
    enum Action {
        Kill,
        Abort,
        Errno(i32),
        Sleep(u64),
    }

    struct Rule {
        pattern: String,
        action: Action,
        /// Only this hit (1-based) of a matching name, or every hit.
        nth: Option<u64>,
    }

    struct Config {
        rules: Vec<Rule>,
        log: Option<Mutex<std::fs::File>>,
        hits: Mutex<HashMap<&'static str, u64>>,
    }

    fn parse_action(s: &str) -> Option<Action> {
        Some(match s {
            "kill" => Action::Kill,
            "abort" => Action::Abort,
            "eio" => Action::Errno(libc::EIO),
            "enospc" => Action::Errno(libc::ENOSPC),
            "erofs" => Action::Errno(libc::EROFS),
            _ => {
                let ms = s.strip_prefix("sleep(")?.strip_suffix(')')?;
                Action::Sleep(ms.parse().ok()?)
            }
        })
    }

    fn config() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| {
            let mut rules = Vec::new();
            for item in std::env::var("LAMINA_FAULTS").unwrap_or_default().split(',') {
                let item = item.trim();
                if item.is_empty() {
                    continue;
                }
                let Some((pattern, spec)) = item.split_once('=') else {
                    eprintln!("LAMINA_FAULTS: ignoring {item:?} (want name=action)");
                    continue;
                };
                let (act, nth) = match spec.split_once('@') {
                    Some((a, n)) => (a, n.parse().ok()),
                    None => (spec, None),
                };
                match parse_action(act) {
                    Some(action) => rules.push(Rule {
                        pattern: pattern.to_string(),
                        action,
                        nth,
                    }),
                    None => eprintln!("LAMINA_FAULTS: ignoring {item:?} (unknown action)"),
                }
            }
            let log = std::env::var_os("LAMINA_FAULTS_LOG").and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
                    .map(Mutex::new)
            });
            Config {
                rules,
                log,
                hits: Mutex::new(HashMap::new()),
            }
        })
    }

    fn matches(pattern: &str, name: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        }
    }

    pub(super) fn hit(name: &'static str) -> io::Result<()> {
        let cfg = config();
        if cfg.rules.is_empty() && cfg.log.is_none() {
            return Ok(());
        }
        let count = {
            let mut hits = cfg.hits.lock().unwrap_or_else(|p| p.into_inner());
            let c = hits.entry(name).or_insert(0);
            *c += 1;
            *c
        };
        if let Some(log) = &cfg.log {
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{name}");
        }
        let Some(rule) = cfg
            .rules
            .iter()
            .find(|r| matches(&r.pattern, name) && r.nth.is_none_or(|n| n == count))
        else {
            return Ok(());
        };
        match rule.action {
            Action::Kill => {
                eprintln!("fault point {name}: SIGKILL");
                // SAFETY: kill(2) on our own pid with a constant signal has no memory effects.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                std::process::abort()
            }
            Action::Abort => std::process::abort(),
            Action::Errno(e) => Err(io::Error::from_raw_os_error(e)),
            Action::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn patterns_and_actions() {
            assert!(matches("store.*", "store.apply.rename"));
            assert!(!matches("store.apply", "store.apply.rename"));
            assert!(matches!(parse_action("sleep(20)"), Some(Action::Sleep(20))));
            assert!(matches!(parse_action("eio"), Some(Action::Errno(e)) if e == libc::EIO));
            assert!(parse_action("explode").is_none());
        }
    }
}
