//! Which metadata belongs to which data root, and what becomes of layer directories the metadata does not know.
//!
//! The metadata database is the part that can be lost (deleted, replaced by an empty or older copy, or a copy
//! from another data root); the layer directories are the data. So the store never deletes a directory on the
//! evidence of missing metadata:
//! - the data root carries an `identity` file with a random id that the database records too (`meta.root_id`);
//! - a database that is new (missing or empty) while `layers/` holds directories, or whose id is not the data
//!   root's, makes the open fail with what was found and how to proceed, and changes nothing;
//! - with [`crate::OpenOptions::quarantine_unknown`] the open goes on and those directories are moved, untouched,
//!   to `quarantine/` (by the backend, which knows what its storage is);
//! - a known database that lacks a directory's record (an older copy) gets that directory quarantined too;
//! - only directories whose removal this store committed (a row in `removed`) are deleted at start, and those
//!   holding nothing of their own (a layer adopted from the cluster tier whose record a crash cut short: its
//!   content a link to the tier).

use std::io::{Read, Write};
use std::path::Path;

use crate::{now_ns, Result, StoreError};

/// The identity file in the data root.
pub(crate) const IDENTITY_FILE: &str = "identity";
/// Where the overlay backend moves layer directories unknown to the metadata.
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// A fresh random id (never 0).
pub(crate) fn new_id() -> u64 {
    let mut buf = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    let id = match random {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => now_ns() ^ (u64::from(std::process::id()) << 32),
    };
    id.max(1)
}

/// The id in `<root>/identity`, if the file exists.
pub(crate) fn read_identity(root: &Path) -> Result<Option<u64>> {
    let path = root.join(IDENTITY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
    };
    let id = text
        .split_whitespace()
        .last()
        .and_then(|w| u64::from_str_radix(w, 16).ok())
        .ok_or_else(|| {
            StoreError::CorruptMetadata(format!(
                "{} does not hold a data root id; remove it and lamina writes the database's id again",
                path.display()
            ))
        })?;
    Ok(Some(id))
}

/// Writes `<root>/identity` durably: a synced temporary file renamed over it, then the data root synced.
pub(crate) fn write_identity(root: &Path, id: u64) -> Result<()> {
    let path = root.join(IDENTITY_FILE);
    let tmp = root.join(format!(".{IDENTITY_FILE}.tmp"));
    let io = |what: &str, e| StoreError::io(format!("{what} {}", path.display()), e);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("write", e))?;
        writeln!(f, "lamina data root {id:016x}").map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("rename into", e))?;
    sync_dir(root)
}

/// fsync of a directory: makes the names created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(format!("sync directory {}", dir.display()), e))
}

/// The refusal when the database is new or foreign but the backend holds layers.
pub(crate) fn refusal(root: &Path, db_path: &Path, what: &str, dirs: usize) -> StoreError {
    StoreError::CorruptMetadata(format!(
        "{what}, but {}/layers holds {dirs} layer director{} that this database does not describe; nothing was \
         changed. Restore the database that belongs to this data root (stop lamina, put it back as {}), or start \
         once with --quarantine-unknown to move those directories untouched to {}/{QUARANTINE_DIR}/ and go on with \
         this database (`lamina gc` lists and removes them later)",
        root.display(),
        if dirs == 1 { "y" } else { "ies" },
        db_path.display(),
        root.display(),
    ))
}
