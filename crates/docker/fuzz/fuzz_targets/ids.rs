//! Plugin id validation (`validate_id`, used for every layer id and parent): an accepted id is 1..=max
//! bytes of `[A-Za-z0-9_.-]` starting with a letter or digit, so it can never be `.`, `..`, contain `/`,
//! NUL or whitespace, or be read as an option. Checks that the refusal is `invalid argument` and says so.
#![no_main]

use lamina_docker::{validate_id, ErrorKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(id) = std::str::from_utf8(data) else { return };
    match validate_id(id) {
        Ok(()) => {
            let b = id.as_bytes();
            assert!(!b.is_empty() && b[0].is_ascii_alphanumeric(), "{id:?}");
            assert!(
                b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c)),
                "{id:?}"
            );
            assert!(id != "." && id != ".." && !id.contains('/'), "{id:?}");
        }
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
        }
    }
});
