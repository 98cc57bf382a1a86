//! `verify_on_mount`: before the first mount of a stack after a (re)start, each frozen layer in it is checked
//! against its content manifest; a mismatch refuses the mount. Checked layers are remembered until the
//! process ends, and so are layers frozen by this process (their content was just written by it), so only
//! the first mount of an old layer pays for a read of its content.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use lamina_store::{LayerInfo, Store, StoreError, VerifyStatus};
use tracing::{error, info};

use crate::metrics::{self, VerifyOutcome};

/// Layers known good in this run.
#[derive(Debug, Default)]
pub struct MountCheck {
    trusted: Mutex<HashSet<u64>>,
}

/// Layer number of a `layers/<hex>/diff` directory.
fn number_of(diff_dir: &Path) -> Option<u64> {
    let hex = diff_dir.parent()?.file_name()?.to_str()?;
    u64::from_str_radix(hex, 16).ok()
}

impl MountCheck {
    /// An empty set: every frozen layer is checked before its first mount.
    pub fn new() -> Self {
        MountCheck::default()
    }

    fn is_trusted(&self, n: u64) -> bool {
        self.trusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&n)
    }

    /// Remembers layer `n` as good (checked, or frozen by this process).
    pub fn trust(&self, n: u64) {
        self.trusted.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
    }

    /// Checks the layer `info` describes and every layer below it. A mismatch gives
    /// [`StoreError::CorruptMetadata`] naming the layer and the first differing path.
    pub fn check_stack(&self, store: &Store, info: &LayerInfo) -> Result<(), StoreError> {
        let mut layers = vec![info.number];
        layers.extend(info.lower_dirs.iter().filter_map(|d| number_of(d)));
        for n in layers {
            if self.is_trusted(n) {
                continue;
            }
            let t0 = Instant::now();
            let mut bytes = 0u64;
            let result = store.verify_layer(n, &mut |b| bytes += b);
            let elapsed = t0.elapsed();
            match result {
                Ok(r) => match r.status {
                    VerifyStatus::Clean { entries, .. } => {
                        metrics::verified(VerifyOutcome::Clean, bytes, elapsed);
                        info!(layer = %format!("{n:x}"), name = %r.name, entries, bytes,
                            ms = elapsed.as_millis() as u64, "verified before its first mount");
                        self.trust(n);
                    }
                    VerifyStatus::Skipped { .. } => {
                        metrics::verified(VerifyOutcome::Skipped, bytes, elapsed);
                        self.trust(n);
                    }
                    VerifyStatus::Mismatch { path, detail } => {
                        metrics::verified(VerifyOutcome::Mismatch, bytes, elapsed);
                        error!(layer = %format!("{n:x}"), name = %r.name, path = %path, detail = %detail,
                            "layer content does not match its manifest; mount refused");
                        return Err(StoreError::CorruptMetadata(format!(
                            "verify_on_mount: layer {n:x} ({}) does not match its manifest at {path} ({detail}); \
                             mount refused (`lamina verify {n:x}` shows it)",
                            r.name
                        )));
                    }
                },
                Err(e) => {
                    metrics::verified(VerifyOutcome::Error, bytes, elapsed);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_from_diff_dirs() {
        assert_eq!(number_of(Path::new("/var/lib/lamina/layers/1f/diff")), Some(0x1f));
        assert_eq!(number_of(Path::new("/x/layers/zz/diff")), None);
    }
}
