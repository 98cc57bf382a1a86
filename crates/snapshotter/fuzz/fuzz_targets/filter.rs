//! containerd filter strings (`List`'s `filters`): parse arbitrary text, split into several strings at `\n`,
//! and match the result against a few snapshots. Any outcome is fine but a panic or a hang; a refusal must be
//! `InvalidArgument`.
#![no_main]

include!("shim.rs");

use crate::error::Code;
use crate::filter::Filter;
use crate::model::{Info, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let filters: Vec<&str> = text.split('\n').collect();
    match Filter::parse_all(&filters) {
        Ok(f) => {
            for i in [
                Info::sample("c1", "", Kind::Committed, &[]),
                Info::sample(
                    "default/4/extract sha256:ab",
                    "c1",
                    Kind::Active,
                    &[("containerd.io/snapshot.ref", "x"), ("l", "")],
                ),
                Info::sample("v", "c1", Kind::View, &[("a\"b", "c,d e")]),
            ] {
                let _ = f.matches(&i);
            }
            // an empty string matches everything
            if filters.iter().any(|s| s.trim().is_empty()) {
                assert!(f.matches(&Info::sample("anything", "", Kind::Active, &[])));
            }
        }
        Err(e) => assert_eq!(e.code, Code::InvalidArgument, "{e}"),
    }
});
