//! Keys, labels and `Update` field paths: `check_key`, `check_labels`, `LabelChange::from_request` and
//! `apply`. Checks the documented rules: a key is accepted exactly when it is 1..=MAX_KEY_BYTES bytes; labels
//! exactly when every key is non-empty and key + value fit MAX_LABEL_BYTES; an accepted change never leaves an
//! empty value, and paths other than `labels` / `labels.<key>` are refused.
#![no_main]

include!("shim.rs");

use crate::model::{check_key, check_labels, LabelChange, Labels, MAX_KEY_BYTES, MAX_LABEL_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1}');
    let key = parts.next().unwrap_or_default().to_string();
    let ok = check_key("key", &key).is_ok();
    assert_eq!(
        ok,
        !key.is_empty() && key.len() <= MAX_KEY_BYTES,
        "check_key({key:?})"
    );

    // the rest: label pairs separated by \u{2}, then field paths after \u{3}
    let rest: Vec<&str> = parts.collect();
    let joined = rest.join("\u{1}");
    let (labels_part, paths_part) = joined.split_once('\u{3}').unwrap_or((&joined, ""));
    let mut labels = Labels::new();
    for pair in labels_part.split('\u{2}') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        labels.insert(k.to_string(), v.to_string());
    }
    let valid = labels
        .iter()
        .all(|(k, v)| !k.is_empty() && k.len() + v.len() <= MAX_LABEL_BYTES);
    assert_eq!(check_labels(&labels).is_ok(), valid);

    let paths: Vec<String> = if paths_part.is_empty() {
        Vec::new()
    } else {
        paths_part.split('\u{2}').map(str::to_string).collect()
    };
    match LabelChange::from_request(&labels, &paths) {
        Ok(change) => {
            assert!(paths.iter().all(|p| p == "labels" || p.starts_with("labels.")));
            let mut current: Labels = [("old".to_string(), "v".to_string())].into_iter().collect();
            change.apply(&mut current);
            assert!(
                current.values().all(|v| !v.is_empty()),
                "empty value kept: {current:?}"
            );
        }
        Err(_) => assert!(paths.iter().any(|p| p != "labels" && !p.starts_with("labels."))),
    }
});
