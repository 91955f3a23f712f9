//! The metadata database file, shared by the snapshot store and the daemon
//! records. After an I/O error (a full disk) redb refuses every further
//! transaction until the database is closed and opened again; this handle
//! does that on the next transaction, so the snapshotter works again as
//! soon as there is space, without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase as _, StorageError,
    TransactionError, WriteTransaction,
};

/// An error of a module using the database that may be redb's refusal
/// after an earlier I/O error.
pub trait Refusal {
    fn from_db(error: redb::Error) -> Self;
    /// redb refused for an earlier I/O error: the database must be opened
    /// again.
    fn previous_io(&self) -> bool;
}

pub struct MetaDb {
    path: PathBuf,
    db: RwLock<Opened>,
}

/// The database handle and how many times it was opened: callers refused
/// by one handle at once open it again once, not each in turn (a second
/// reopen would close the handle the first caller's transaction uses).
struct Opened {
    /// `None` while it cannot be opened again.
    db: Option<Database>,
    generation: u64,
}

impl MetaDb {
    pub fn open(path: &Path) -> Result<Arc<Self>, DatabaseError> {
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            db: RwLock::new(Opened {
                db: Some(Database::create(path)?),
                generation: 0,
            }),
        }))
    }

    pub fn begin_write(&self) -> Result<WriteTransaction, TransactionError> {
        self.with_reopen(Database::begin_write)
    }

    /// Runs `read` in a read transaction. redb fails reads after a write's
    /// I/O error too, but only once they reach the file (pages it has not
    /// cached), so a read refused that way runs again, once, on the
    /// database opened again.
    pub fn read<T, E: Refusal>(
        &self,
        read: impl Fn(&ReadTransaction) -> Result<T, E>,
    ) -> Result<T, E> {
        let (generation, txn) = self.begin(&Database::begin_read);
        let first = txn
            .map_err(|e| E::from_db(e.into()))
            .and_then(|txn| read(&txn));
        match first {
            Err(error) if error.previous_io() => {
                if !self.reopen(generation) {
                    return Err(error);
                }
                let txn = self
                    .begin(&Database::begin_read)
                    .1
                    .map_err(|e| E::from_db(e.into()))?;
                read(&txn)
            }
            other => other,
        }
    }

    /// Runs `begin`; if the database refuses it for an earlier I/O error,
    /// opens the database again (which recovers its file) and runs it once
    /// more.
    fn with_reopen<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> Result<T, TransactionError> {
        let (generation, result) = self.begin(&begin);
        if !matches!(
            result,
            Err(TransactionError::Storage(StorageError::PreviousIo))
        ) {
            return result;
        }
        if !self.reopen(generation) {
            return result;
        }
        self.begin(&begin).1
    }

    /// Runs `begin` on the current handle; also says which one that was.
    fn begin<T>(
        &self,
        begin: &impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> (u64, Result<T, TransactionError>) {
        let opened = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let result = match opened.db.as_ref() {
            Some(db) => begin(db),
            None => Err(TransactionError::Storage(StorageError::PreviousIo)),
        };
        (opened.generation, result)
    }

    /// Opens the database again unless another caller already replaced
    /// handle `refused` since; whether a new handle is there (a failure
    /// is logged).
    fn reopen(&self, refused: u64) -> bool {
        let mut opened = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if opened.generation != refused {
            return true;
        }
        // The old handle must be closed before the file is opened again.
        opened.db.take();
        match Database::create(&self.path) {
            Ok(db) => {
                opened.db = Some(db);
                opened.generation += 1;
                tracing::info!(path = %self.path.display(), "metadata store opened again after an I/O error");
                true
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot open the metadata store again after an I/O error");
                false
            }
        }
    }
}
