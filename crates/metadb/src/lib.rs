//! The metadata database handle, reopened after an I/O failure: the layer store's `meta.redb` and the volume
//! service's `volumes/meta.redb` both go through it.
//!
//! redb refuses every transaction after one of its writes failed (`PreviousIo`: "close and re-open the
//! database"). A full disk (ENOSPC in a commit) would then fail every later call of a running daemon, even once
//! space is back. [`Db`] reopens the file at the next transaction after such a failure (reopening runs redb's
//! recovery, which returns the last committed state), so service resumes without a restart.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{
    CommitError, Database, DatabaseError, ReadTransaction, ReadableDatabase, StorageError, TransactionError,
    WriteTransaction,
};
use tracing::{info, warn};

/// How long a reopen waits for transactions still open on the failed handle.
const DRAIN: Duration = Duration::from_secs(10);

/// Database I/O failures seen by this process (counted by [`note_io_failure`]). redb reports a failed
/// write once (`Io`), then `PreviousIo` from whatever touches the file next, including reads and commits
/// that [`Db`] does not see; the users' error mapping counts every such error here, and a [`Db`] that has not
/// reopened since the last failure does so at its next transaction. The count is per process, not per database:
/// a failure of one makes the others reopen once too, which costs an open of their file and nothing else.
static IO_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Called for every I/O error a database operation returned.
pub fn note_io_failure() {
    IO_FAILURES.fetch_add(1, Ordering::SeqCst);
}

/// One metadata database (see the crate documentation).
pub struct Db {
    path: PathBuf,
    current: RwLock<Option<Arc<Database>>>,
    /// [`IO_FAILURES`] when the handle was (re)opened.
    seen: AtomicU64,
}

/// A write transaction; keeps its database handle alive (a reopen waits for it).
pub struct WriteTxn {
    txn: WriteTransaction,
    _db: Arc<Database>,
}

/// A read transaction; keeps its database handle alive (a reopen waits for it).
pub struct ReadTxn {
    txn: ReadTransaction,
    _db: Arc<Database>,
}

impl Deref for WriteTxn {
    type Target = WriteTransaction;
    fn deref(&self) -> &WriteTransaction {
        &self.txn
    }
}

impl Deref for ReadTxn {
    type Target = ReadTransaction;
    fn deref(&self) -> &ReadTransaction {
        &self.txn
    }
}

impl WriteTxn {
    /// Commits (see [`WriteTransaction::commit`]).
    pub fn commit(self) -> Result<(), CommitError> {
        self.txn.commit()
    }
}

fn failed_io(e: &TransactionError) -> bool {
    matches!(e, TransactionError::Storage(StorageError::PreviousIo))
}

impl Db {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DatabaseError> {
        let db = Database::create(path)?;
        Ok(Db {
            path: path.to_path_buf(),
            current: RwLock::new(Some(Arc::new(db))),
            seen: AtomicU64::new(IO_FAILURES.load(Ordering::SeqCst)),
        })
    }

    fn handle(&self) -> Result<Arc<Database>, TransactionError> {
        let failures = IO_FAILURES.load(Ordering::SeqCst);
        if self.seen.load(Ordering::SeqCst) == failures {
            if let Some(db) = self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return Ok(db.clone());
            }
        }
        self.reopen(failures)
    }

    /// Drops the failed handle once no transaction uses it any more, and opens the file again.
    fn reopen(&self, failures: u64) -> Result<Arc<Database>, TransactionError> {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        if self.seen.load(Ordering::SeqCst) == failures {
            if let Some(db) = cur.as_ref() {
                // Another thread reopened meanwhile.
                return Ok(db.clone());
            }
        }
        // A file that cannot be written (read-only filesystem) cannot be reopened: keep the old handle, which
        // still serves what its cache holds; writes fail with the cause until the filesystem is writable.
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(&self.path) {
            return match cur.as_ref() {
                Some(db) => Ok(db.clone()),
                None => Err(TransactionError::Storage(StorageError::Io(e))),
            };
        }
        let deadline = Instant::now() + DRAIN;
        if let Some(old) = cur.take() {
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still) => {
                        *cur = Some(still);
                        return Err(TransactionError::Storage(StorageError::PreviousIo));
                    }
                }
            }
        }
        match Database::create(&self.path) {
            Ok(db) => {
                info!(path = %self.path.display(), "metadata database reopened after an I/O error");
                let db = Arc::new(db);
                *cur = Some(db.clone());
                self.seen.store(failures, Ordering::SeqCst);
                Ok(db)
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "reopening the metadata database failed; retried at the next call");
                Err(TransactionError::Storage(match e {
                    DatabaseError::Storage(s) => s,
                    other => StorageError::Io(std::io::Error::other(other.to_string())),
                }))
            }
        }
    }

    /// Why the file cannot be opened for writing (a read-only filesystem), if it cannot: a reopen would fail,
    /// so the failed handle is kept for whatever it still serves.
    fn unwritable(&self) -> Option<std::io::Error> {
        std::fs::OpenOptions::new().write(true).open(&self.path).err()
    }

    fn forget(&self, failed: &Arc<Database>) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            *cur = None;
        }
    }

    /// Begins a write transaction, reopening the database first if a previous write failed.
    pub fn begin_write(&self) -> Result<WriteTxn, TransactionError> {
        let (txn, db) = self.begin(Database::begin_write)?;
        Ok(WriteTxn { txn, _db: db })
    }

    /// Begins a read transaction, reopening the database first if a previous write failed.
    pub fn begin_read(&self) -> Result<ReadTxn, TransactionError> {
        let (txn, db) = self.begin(Database::begin_read)?;
        Ok(ReadTxn { txn, _db: db })
    }

    /// Runs `begin` on the current handle; after an I/O failure, on a reopened one (unless the file cannot be
    /// opened for writing). The transaction and the handle it was begun on.
    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> Result<(T, Arc<Database>), TransactionError> {
        let db = self.handle()?;
        match begin(&db) {
            Ok(txn) => Ok((txn, db)),
            Err(e) if failed_io(&e) => {
                if let Some(io) = self.unwritable() {
                    return Err(TransactionError::Storage(StorageError::Io(io)));
                }
                self.forget(&db);
                drop(db);
                let db = self.handle()?;
                let txn = begin(&db)?;
                Ok((txn, db))
            }
            Err(e) => Err(e),
        }
    }
}
