//! Times as the lease directory reports them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `unix time N` for a time on the shared filesystem's clock (second resolution on MooseFS).
pub(crate) fn show(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => format!("unix time {}", d.as_secs()),
        Err(_) => "before 1970".into(),
    }
}

/// `later - earlier`, zero when `later` is not later (the same clock read at second resolution can go
/// "backwards" by a fraction of a second).
pub(crate) fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}
