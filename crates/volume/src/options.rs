//! `docker volume create -o KEY=VALUE` options.
//!
//! Known keys (case-insensitive): `ReplicationGoal` (a number 1–9 or a goal name of `[A-Za-z0-9_-]`),
//! `quota` (a size: `1048576`, `512K`, `10M`, `1G`, `2T`, binary multiples, optional `i`/`iB`/`B`) and
//! `backend` (`local`, `moosefs` or `rbd`); for volumes of the rbd backend, `size` (a size, as `quota`) and `fs`
//! (`ext4` or `xfs`) instead of `ReplicationGoal` and `quota`. Any other key is refused, and so is any key or value holding a shell
//! metacharacter or whitespace, even though lamina never runs a shell: such a value is a mistake or an
//! attack, never a goal or a size.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::VolumeError;
use crate::name::quote;

/// Longest goal name.
pub const MAX_GOAL_NAME: usize = 64;
/// Numeric goals MooseFS and LizardFS accept.
pub const GOAL_RANGE: std::ops::RangeInclusive<u32> = 1..=9;

/// Characters refused anywhere in an option.
const SHELL_META: &[char] = &[
    ';', '&', '|', '$', '`', '<', '>', '(', ')', '{', '}', '[', ']', '*', '?', '!', '~', '#', '\'', '"',
    '\\', '^',
];

/// A backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A directory per volume on the local disk.
    Local,
    /// A directory per volume on a MooseFS (or LizardFS) cluster.
    Moosefs,
    /// An RBD image with a filesystem per volume, in a Ceph pool.
    Rbd,
}

impl BackendKind {
    /// The name used in options, config and status.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Moosefs => "moosefs",
            BackendKind::Rbd => "rbd",
        }
    }

    /// Parses `local`, `moosefs` (LizardFS is served by `moosefs`) or `rbd`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(BackendKind::Local),
            "moosefs" => Some(BackendKind::Moosefs),
            "rbd" => Some(BackendKind::Rbd),
            _ => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A replication goal: a copy count or a named (custom) goal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Goal {
    /// 1–9 copies.
    Copies(u32),
    /// A goal name defined on the cluster (LizardFS custom goals).
    Named(String),
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::Copies(n) => write!(f, "{n}"),
            Goal::Named(s) => f.write_str(s),
        }
    }
}

impl Goal {
    /// Parses a goal: all digits means a copy count and must be in [`GOAL_RANGE`]; anything else must be
    /// a plain name of letters, digits, `_` and `-`.
    pub fn parse(s: &str) -> Result<Goal, VolumeError> {
        let bad = |why: String| {
            Err(VolumeError::InvalidArgument(format!(
                "ReplicationGoal {}: {why}",
                quote(s)
            )))
        };
        if s.is_empty() {
            return bad("empty".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u32>() {
                Ok(n) if GOAL_RANGE.contains(&n) => Ok(Goal::Copies(n)),
                _ => bad(format!(
                    "a numeric goal must be {}-{}",
                    GOAL_RANGE.start(),
                    GOAL_RANGE.end()
                )),
            };
        }
        if s.len() > MAX_GOAL_NAME {
            return bad(format!("a goal name has at most {MAX_GOAL_NAME} characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || s.starts_with('-')
        {
            return bad("neither a number 1-9 nor a goal name of letters, digits, '_' and '-'".into());
        }
        Ok(Goal::Named(s.to_string()))
    }
}

/// Parsed `-o` options of one Create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// `backend=`.
    pub backend: Option<BackendKind>,
    /// `ReplicationGoal=`.
    pub goal: Option<Goal>,
    /// `quota=`, in bytes.
    pub quota: Option<u64>,
    /// `size=`, in bytes (rbd).
    pub size: Option<u64>,
    /// `fs=` (rbd): `ext4` or `xfs`.
    pub fs: Option<String>,
}

/// Parses a size with an optional binary suffix (`K`, `M`, `G`, `T`, `P`, each optionally followed by `i`,
/// `iB` or `B`; a bare `B` means bytes).
pub fn parse_size(s: &str) -> Result<u64, VolumeError> {
    parse_size_of("quota", s)
}

/// [`parse_size`] for the option `what` (named in errors).
pub fn parse_size_of(what: &str, s: &str) -> Result<u64, VolumeError> {
    let bad = || {
        VolumeError::InvalidArgument(format!(
            "{what} {}: not a size like 1048576, 512K, 10M or 1G",
            quote(s)
        ))
    };
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = s[..digits].parse().map_err(|_| bad())?;
    let suffix = s[digits..].to_ascii_uppercase();
    let shift = match suffix.as_str() {
        "" | "B" => 0,
        "K" | "KI" | "KIB" | "KB" => 10,
        "M" | "MI" | "MIB" | "MB" => 20,
        "G" | "GI" | "GIB" | "GB" => 30,
        "T" | "TI" | "TIB" | "TB" => 40,
        "P" | "PI" | "PIB" | "PB" => 50,
        _ => return Err(bad()),
    };
    let v = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if v == 0 {
        return Err(VolumeError::InvalidArgument(format!(
            "{what} {}: must be more than 0",
            quote(s)
        )));
    }
    Ok(v)
}

fn check_chars(what: &str, s: &str) -> Result<(), VolumeError> {
    if let Some(c) = s
        .chars()
        .find(|c| SHELL_META.contains(c) || c.is_whitespace() || c.is_control())
    {
        return Err(VolumeError::InvalidArgument(format!(
            "{what} {} contains {}, which is not allowed in volume options",
            quote(s),
            if c.is_whitespace() || c.is_control() {
                format!("the character {:?}", c)
            } else {
                format!("the shell metacharacter '{c}'")
            }
        )));
    }
    Ok(())
}

/// Parses `Opts`; refuses unknown keys, repeated keys (in different case), bad values and shell metacharacters.
/// `size` and `fs` are known only with `backend=rbd`; see [`parse_options_for`].
pub fn parse_options(opts: &BTreeMap<String, String>) -> Result<CreateOptions, VolumeError> {
    parse_options_for(opts, BackendKind::Local)
}

/// [`parse_options`] where a volume without `backend=` goes to `default`: `size` and `fs` are known when the
/// volume's backend is rbd.
pub fn parse_options_for(
    opts: &BTreeMap<String, String>,
    default: BackendKind,
) -> Result<CreateOptions, VolumeError> {
    let rbd = opts
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("backend"))
        .map_or(default == BackendKind::Rbd, |(_, v)| v == "rbd");
    let mut out = CreateOptions::default();
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in opts {
        check_chars("option", k)?;
        check_chars(&format!("value of option {}", quote(k)), v)?;
        let key = k.to_ascii_lowercase();
        if !seen.insert(key.clone()) {
            return Err(VolumeError::InvalidArgument(format!(
                "option {} given twice",
                quote(k)
            )));
        }
        match key.as_str() {
            "replicationgoal" => out.goal = Some(Goal::parse(v)?),
            "quota" => out.quota = Some(parse_size(v)?),
            "size" if rbd => out.size = Some(parse_size_of("size", v)?),
            "fs" if rbd => {
                if !matches!(v.as_str(), "ext4" | "xfs") {
                    return Err(VolumeError::InvalidArgument(format!(
                        "fs {}: must be \"ext4\" or \"xfs\"",
                        quote(v)
                    )));
                }
                out.fs = Some(v.clone())
            }
            "backend" => {
                out.backend = Some(BackendKind::parse(v).ok_or_else(|| {
                    VolumeError::InvalidArgument(format!(
                        "backend {}: must be \"local\" or \"moosefs\" or \"rbd\"",
                        quote(v)
                    ))
                })?)
            }
            _ => {
                return Err(VolumeError::InvalidArgument(format!(
                    "unknown option {} (known: {})",
                    quote(k),
                    if rbd {
                        "size, fs, backend"
                    } else {
                        "ReplicationGoal, quota, backend"
                    }
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn goals() {
        assert_eq!(Goal::parse("1").unwrap(), Goal::Copies(1));
        assert_eq!(Goal::parse("9").unwrap(), Goal::Copies(9));
        assert_eq!(Goal::parse("007").unwrap(), Goal::Copies(7));
        assert_eq!(
            Goal::parse("ssd_2-copies").unwrap(),
            Goal::Named("ssd_2-copies".into())
        );
        for bad in [
            "",
            "0",
            "10",
            "99999999999999999999",
            "-1",
            "a b",
            "a;b",
            "a.b",
            "é",
            "-x",
            &"g".repeat(65),
        ] {
            let e = Goal::parse(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("invalid argument: ReplicationGoal "),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        for bad in ["", "M", "1.5G", "10X", "-1", "0", "99999999999P"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options() {
        let o = parse_options(&opts(&[
            ("ReplicationGoal", "2"),
            ("quota", "10M"),
            ("backend", "moosefs"),
        ]))
        .unwrap();
        assert_eq!(
            o,
            CreateOptions {
                backend: Some(BackendKind::Moosefs),
                goal: Some(Goal::Copies(2)),
                quota: Some(10 << 20),
                ..CreateOptions::default()
            }
        );
        assert_eq!(parse_options(&BTreeMap::new()).unwrap(), CreateOptions::default());
        assert_eq!(
            parse_options(&opts(&[("replicationgoal", "fast")])).unwrap().goal,
            Some(Goal::Named("fast".into()))
        );
    }

    #[test]
    fn rbd_options() {
        let o = parse_options(&opts(&[("backend", "rbd"), ("size", "1G"), ("fs", "xfs")])).unwrap();
        assert_eq!(o.backend, Some(BackendKind::Rbd));
        assert_eq!(o.size, Some(1 << 30));
        assert_eq!(o.fs.as_deref(), Some("xfs"));
        let o = parse_options_for(&opts(&[("Size", "10M")]), BackendKind::Rbd).unwrap();
        assert_eq!(o.size, Some(10 << 20), "rbd is the default backend");
        for (pairs, default, want) in [
            (
                vec![("size", "1G")],
                BackendKind::Moosefs,
                "unknown option \"size\" (known: ReplicationGoal",
            ),
            (
                vec![("backend", "local"), ("fs", "xfs")],
                BackendKind::Rbd,
                "unknown option \"fs\"",
            ),
            (
                vec![("fs", "btrfs")],
                BackendKind::Rbd,
                "fs \"btrfs\": must be \"ext4\" or \"xfs\"",
            ),
            (
                vec![("size", "0")],
                BackendKind::Rbd,
                "size \"0\": must be more than 0",
            ),
            (
                vec![("size", "big")],
                BackendKind::Rbd,
                "size \"big\": not a size",
            ),
            (
                vec![("bogus", "1")],
                BackendKind::Rbd,
                "(known: size, fs, backend)",
            ),
        ] {
            let e = parse_options_for(&opts(&pairs), default).unwrap_err().to_string();
            assert!(e.starts_with("invalid argument: "), "{pairs:?}: {e}");
            assert!(e.contains(want), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn refused_options() {
        for (pairs, want) in [
            (vec![("size", "1G")], "unknown option \"size\""),
            (vec![("o", "")], "unknown option"),
            (
                vec![("ReplicationGoal", "2; rm -rf /")],
                "shell metacharacter ';'",
            ),
            (vec![("ReplicationGoal", "$(reboot)")], "shell metacharacter '$'"),
            (vec![("quota", "1G`id`")], "shell metacharacter '`'"),
            (vec![("backend", "local|x")], "shell metacharacter '|'"),
            (vec![("ReplicationGoal", "a b")], "the character ' '"),
            (vec![("ReplicationGoal", "a\nb")], "the character '\\n'"),
            (vec![("x&y", "1")], "shell metacharacter '&'"),
            (
                vec![("ReplicationGoal", "2"), ("replicationgoal", "3")],
                "given twice",
            ),
            (vec![("backend", "nfs")], "must be \"local\" or \"moosefs\""),
            (vec![("ReplicationGoal", "0")], "a numeric goal must be 1-9"),
            (vec![("ReplicationGoal", "10")], "a numeric goal must be 1-9"),
            (vec![("ReplicationGoal", "a.b")], "neither a number"),
            (vec![("quota", "lots")], "not a size"),
        ] {
            let e = parse_options(&opts(&pairs)).unwrap_err().to_string();
            assert!(e.starts_with("invalid argument: "), "{pairs:?}: {e}");
            assert!(e.contains(want), "{pairs:?}: {e}");
        }
    }
}
