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

pub struct MetaDb {
    path: PathBuf,
    /// `None` only while it is being opened again.
    db: RwLock<Option<Database>>,
}

impl MetaDb {
    pub fn open(path: &Path) -> Result<Arc<Self>, DatabaseError> {
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Database::create(path)?)),
        }))
    }

    pub fn begin_write(&self) -> Result<WriteTransaction, TransactionError> {
        self.with_reopen(Database::begin_write)
    }

    pub fn begin_read(&self) -> Result<ReadTransaction, TransactionError> {
        self.with_reopen(Database::begin_read)
    }

    /// Runs `begin`; if the database refuses it for an earlier I/O error,
    /// opens the database again (which recovers its file) and runs it once
    /// more.
    fn with_reopen<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> Result<T, TransactionError> {
        let result = self.begin(&begin);
        if !matches!(
            result,
            Err(TransactionError::Storage(StorageError::PreviousIo))
        ) {
            return result;
        }
        if let Err(error) = self.reopen() {
            tracing::warn!(path = %self.path.display(), %error, "cannot open the metadata store again after an I/O error");
            return result;
        }
        tracing::info!(path = %self.path.display(), "metadata store opened again after an I/O error");
        self.begin(&begin)
    }

    fn begin<T>(
        &self,
        begin: &impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> Result<T, TransactionError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => begin(db),
            None => Err(TransactionError::Storage(StorageError::PreviousIo)),
        }
    }

    fn reopen(&self) -> Result<(), DatabaseError> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // The old handle must be closed before the file is opened again.
        db.take();
        *db = Some(Database::create(&self.path)?);
        Ok(())
    }
}
