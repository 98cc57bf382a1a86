//! Volume names and `-o` options: `validate_name`, `parse_options`, `Goal::parse`, `parse_size`. Checks the
//! documented rules: an accepted name is one path component (not empty, not `.`/`..`, no `/`, NUL or
//! control character, no leading `.`, at most 255 bytes); an accepted option set holds no shell
//! metacharacter or whitespace, a numeric goal is 1..=9, and a goal name is `[A-Za-z0-9_-]`.
#![no_main]

use std::collections::BTreeMap;

use lamina_volume::options::parse_size;
use lamina_volume::{parse_options, validate_name, Goal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1}');
    let name = parts.next().unwrap_or_default();
    if validate_name(name).is_ok() {
        assert!(!name.is_empty() && name.len() <= 255, "{name:?}");
        assert!(name != "." && name != ".." && !name.starts_with('.'), "{name:?}");
        assert!(
            !name.contains('/') && !name.chars().any(char::is_control),
            "{name:?}"
        );
    }
    let _ = parse_size(name);
    if let Ok(g) = Goal::parse(name) {
        match g {
            Goal::Copies(n) => assert!((1..=9).contains(&n), "{name:?} -> {n}"),
            Goal::Named(s) => {
                assert!(
                    s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                    "{s:?}"
                );
                assert!(!s.starts_with('-'), "{s:?}");
            }
        }
    }
    let mut opts = BTreeMap::new();
    for pair in parts {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        opts.insert(k.to_string(), v.to_string());
    }
    if parse_options(&opts).is_ok() {
        for (k, v) in &opts {
            for s in [k, v] {
                assert!(
                    !s.chars()
                        .any(|c| c.is_whitespace() || ";&|$`<>(){}[]*?!~#'\"\\^".contains(c)),
                    "accepted option {k:?}={v:?}"
                );
            }
        }
    }
});
