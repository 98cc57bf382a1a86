//! Content manifests of frozen layers (written at apply and commit) and their verification.

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;

use lamina_archive::manifest::{self, VerifyOutcome};
use serde::Serialize;

use crate::{open_dir, LayerKind, LayerState, Result, Store, StoreError};

/// File name of a layer's manifest, beside `diff/`.
pub const MANIFEST_FILE: &str = "manifest";

/// The verdict on one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum VerifyStatus {
    /// Content matches its manifest.
    Clean {
        /// Entries compared.
        entries: u64,
        /// Content bytes read.
        bytes: u64,
    },
    /// Content (or the manifest itself) changed.
    Mismatch {
        /// First differing path inside the layer.
        path: String,
        /// What differs.
        detail: String,
    },
    /// Not checked: the layer is not frozen or has no manifest (with the reason).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One verified layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyResult {
    /// Layer number.
    pub layer: u64,
    /// `namespace/name`.
    pub name: String,
    /// The verdict.
    #[serde(flatten)]
    pub status: VerifyStatus,
}

impl Store {
    /// Writes the manifest of `diff` to `dest` (through a temporary file renamed into place; durability
    /// comes from the `syncfs` that follows in the caller) and returns its digest.
    pub(crate) fn write_manifest(&self, diff: &Path, dest: &Path) -> Result<String> {
        let tmp = dest.with_extension("tmp");
        let file = std::fs::File::create(&tmp)
            .map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let dir = open_dir(diff)?;
        let summary = manifest::write_manifest(dir.as_fd(), &mut out)?;
        out.flush()
            .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
        drop(out);
        std::fs::rename(&tmp, dest).map_err(|e| StoreError::io(format!("rename {}", tmp.display()), e))?;
        Ok(summary.digest)
    }

    /// Numbers of the layers that have a manifest to check (frozen layers).
    pub fn verifiable_layers(&self) -> Result<Vec<u64>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|(_, r)| r.manifest.is_some())
            .map(|(n, _)| n)
            .collect())
    }

    /// Checks layer `n` against its manifest; `progress` receives content bytes as they are read.
    pub fn verify_layer(&self, n: u64, progress: &mut dyn FnMut(u64)) -> Result<VerifyResult> {
        let rec = self
            .record_by_number(n)?
            .ok_or_else(|| StoreError::NotFound(format!("layer number {n:x}")))?;
        let name = format!("{}/{}", rec.ns, rec.name);
        let skipped = |reason: &str| VerifyResult {
            layer: n,
            name: name.clone(),
            status: VerifyStatus::Skipped {
                reason: reason.into(),
            },
        };
        let Some(want) = rec.manifest.clone() else {
            return Ok(match (rec.kind, rec.state) {
                (LayerKind::ReadWrite, _) => skipped("writable layer (not frozen)"),
                (LayerKind::View, _) => skipped("view (no content of its own)"),
                (_, LayerState::Empty) => skipped("no manifest recorded (content not applied by lamina)"),
                _ => skipped("no manifest recorded"),
            });
        };
        let dir = self.layer_dir(n);
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                return Ok(VerifyResult {
                    layer: n,
                    name,
                    status: VerifyStatus::Mismatch {
                        path: "/".into(),
                        detail: format!("manifest {} unreadable: {e}", path.display()),
                    },
                })
            }
        };
        let got = manifest::digest_of(&bytes);
        if got != want {
            return Ok(VerifyResult {
                layer: n,
                name,
                status: VerifyStatus::Mismatch {
                    path: "/".into(),
                    detail: format!("the manifest file changed (digest {got}, recorded {want})"),
                },
            });
        }
        let diff = open_dir(&dir.join("diff"))?;
        let outcome = manifest::verify_manifest(diff.as_fd(), &mut &bytes[..], progress)?;
        Ok(VerifyResult {
            layer: n,
            name,
            status: match outcome {
                VerifyOutcome::Clean { entries, bytes } => VerifyStatus::Clean { entries, bytes },
                VerifyOutcome::Mismatch { path, detail } => VerifyStatus::Mismatch { path, detail },
            },
        })
    }
}
