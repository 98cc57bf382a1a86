//! Volume names.
//!
//! A name becomes a directory name (on the local disk or in the cluster) and a path component of the
//! mountpoint, so it must be exactly one path component: not empty, not `.` or `..`, no `/`, no NUL, at most
//! [`MAX_NAME_LEN`] bytes (the usual `NAME_MAX`). lamina also refuses control characters (they end up in
//! logs and tool output) and a leading `.`, which is reserved for lamina's own entries (`.lamina/`) next to
//! the volumes.

use crate::error::VolumeError;

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Quotes `s` for messages: escaped, and cut after 64 characters.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if i == 64 {
            out.push_str("\"...");
            return out;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Checks a volume name; the error says which rule it breaks.
pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let bad = |why: &str| {
        Err(VolumeError::InvalidArgument(format!(
            "invalid volume name {}: {why}",
            quote(name)
        )))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name == "." || name == ".." {
        return bad("not a directory name");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("{} bytes, at most {MAX_NAME_LEN}", name.len()));
    }
    if name.contains('/') {
        return bad("contains '/'");
    }
    if name.contains('\0') {
        return bad("contains NUL");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if name.starts_with('.') {
        return bad("a leading '.' is reserved");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names() {
        for n in [
            "v",
            "v1",
            "my-vol_2",
            "a.b",
            "Ünï",
            "with space",
            &"x".repeat(255),
            "-rf",
        ] {
            validate_name(n).unwrap_or_else(|e| panic!("{n:?}: {e}"));
        }
    }

    #[test]
    fn bad_names() {
        for (n, why) in [
            ("", "empty"),
            (".", "not a directory name"),
            ("..", "not a directory name"),
            ("a/b", "'/'"),
            ("/", "'/'"),
            ("../etc", "'/'"),
            ("a\0b", "NUL"),
            ("a\nb", "control"),
            (".hidden", "reserved"),
            (".lamina", "reserved"),
            (&"x".repeat(256), "256 bytes"),
            (&"é".repeat(128), "256 bytes"),
        ] {
            let e = validate_name(n).unwrap_err().to_string();
            assert!(
                e.starts_with("invalid argument: invalid volume name "),
                "{n:?}: {e}"
            );
            assert!(e.contains(why), "{n:?}: {e}");
            assert!(e.len() < 200, "{e}");
        }
    }
}
