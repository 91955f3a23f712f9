//! The snapshotter's metadata, in one redb file: snapshots with their
//! parents and labels, and the Lode images recorded on committed snapshots.
//!
//! Every operation is one write transaction, so a kill -9 at any instant
//! leaves either the state before or the state after it. Directories on disk
//! are created before the transaction that records them and removed after
//! the one that forgets them; what a crash leaves behind is a directory
//! without a record, which `Cleanup` (and the start-up sweep) removes.

mod db;
mod record;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableTable, TableDefinition};

pub use db::{MetaDb, Refusal};
pub use record::{SnapshotKind, SnapshotRecord};

use crate::instances::LodeImage;

const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const IMAGES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("lode_images");
const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("counters");
const NEXT_SNAPSHOT_ID: &str = "next_snapshot_id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot {0} not found")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("metadata store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("metadata store: {0}")]
    Db(#[from] Box<redb::Error>),
    #[error("metadata store: corrupt record {key}: {message}")]
    Corrupt { key: String, message: String },
}

/// The snapshot records that decode, and the keys of those that do not.
#[derive(Debug, Default)]
pub struct Listing {
    pub records: BTreeMap<String, SnapshotRecord>,
    /// Whatever they describe is unknown: nothing may be removed on the
    /// grounds that no record names it while this is not empty.
    pub damaged: Vec<String>,
}

fn db_err(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(error.into()))
}

impl db::Refusal for StoreError {
    fn from_db(error: redb::Error) -> Self {
        db_err(error)
    }

    fn previous_io(&self) -> bool {
        matches!(self, StoreError::Db(e) if matches!(**e, redb::Error::PreviousIo))
    }
}

/// The metadata store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<MetaDb>,
}

/// Nanoseconds since the epoch, the stored form of times.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = MetaDb::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        let store = Self { db };
        // Create the tables so read transactions never meet a missing one.
        let txn = store.db.begin_write().map_err(db_err)?;
        txn.open_table(SNAPSHOTS).map_err(db_err)?;
        txn.open_table(IMAGES).map_err(db_err)?;
        txn.open_table(COUNTERS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(store)
    }

    /// The database, for modules that keep their own tables in the same file.
    pub fn database(&self) -> Arc<MetaDb> {
        self.db.clone()
    }

    pub fn get(&self, key: &str) -> Result<SnapshotRecord, StoreError> {
        self.db.read(|txn| {
            let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            load(&table, key)
        })
    }

    /// Every snapshot, by key, and the keys of records that do not decode
    /// (each logged): a damaged record hides only itself.
    pub fn all(&self) -> Result<Listing, StoreError> {
        self.db.read(|txn| {
            let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let mut listing = Listing::default();
            for entry in table.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let key = key.value().to_string();
                match SnapshotRecord::decode(&key, value.value()) {
                    Ok(record) => {
                        listing.records.insert(key, record);
                    }
                    Err(error) => {
                        tracing::warn!(snapshot = %key, %error, "snapshot record does not decode; skipped");
                        listing.damaged.push(key);
                    }
                }
            }
            Ok(listing)
        })
    }

    /// Allocates the id of a snapshot about to be created (its directory is
    /// made before the record; an id is never reused, even after a crash).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut counters = txn.open_table(COUNTERS).map_err(db_err)?;
            let id = counters
                .get(NEXT_SNAPSHOT_ID)
                .map_err(db_err)?
                .map_or(1, |v| v.value());
            counters.insert(NEXT_SNAPSHOT_ID, id + 1).map_err(db_err)?;
            id
        };
        txn.commit().map_err(db_err)?;
        Ok(id)
    }

    /// Records a new active or view snapshot (or a committed one, for lazily
    /// available layers). The parent, if any, must exist and be committed.
    pub fn create(&self, key: &str, record: &SnapshotRecord) -> Result<(), StoreError> {
        self.create_with_image(key, record, None)
    }

    /// Creates snapshot `key` and, in the same transaction, records the
    /// Lode image it names (idempotent: the same bootstrap is the same
    /// image), so that an image is recorded whenever a snapshot names it.
    pub fn create_with_image(
        &self,
        key: &str,
        record: &SnapshotRecord,
        image: Option<&LodeImage>,
    ) -> Result<(), StoreError> {
        let image = image
            .map(|image| {
                let bytes = serde_json::to_vec(image).map_err(|e| StoreError::Corrupt {
                    key: image.bootstrap_digest.clone(),
                    message: e.to_string(),
                })?;
                Ok::<_, StoreError>((image.bootstrap_digest.as_str(), bytes))
            })
            .transpose()?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            if table.get(key).map_err(db_err)?.is_some() {
                return Err(StoreError::AlreadyExists(key.to_string()));
            }
            check_parent(&table, &record.parent)?;
            table
                .insert(key, record.encode().as_slice())
                .map_err(db_err)?;
            if let Some((digest, bytes)) = &image {
                let mut images = txn.open_table(IMAGES).map_err(db_err)?;
                images.insert(*digest, bytes.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Turns active snapshot `key` into committed snapshot `name`.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: (i64, i64),
    ) -> Result<SnapshotRecord, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let committed = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let active = load(&table, key)?;
            if active.kind != SnapshotKind::Active {
                return Err(StoreError::FailedPrecondition(format!(
                    "snapshot {key} is a {} snapshot; only active snapshots can be committed",
                    active.kind.as_str()
                )));
            }
            if table.get(name).map_err(db_err)?.is_some() {
                return Err(StoreError::AlreadyExists(name.to_string()));
            }
            let now = now_ns();
            let committed = SnapshotRecord {
                kind: SnapshotKind::Committed,
                labels,
                created_ns: now,
                updated_ns: now,
                usage: Some(usage),
                ..active
            };
            table.remove(key).map_err(db_err)?;
            table
                .insert(name, committed.encode().as_slice())
                .map_err(db_err)?;
            committed
        };
        txn.commit().map_err(db_err)?;
        Ok(committed)
    }

    /// Forgets a snapshot that no other snapshot has as parent.
    pub fn remove(&self, key: &str) -> Result<SnapshotRecord, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let record = load(&table, key)?;
            for entry in table.iter().map_err(db_err)? {
                let (child_key, value) = entry.map_err(db_err)?;
                let child = SnapshotRecord::decode(child_key.value(), value.value())?;
                if child.parent == key {
                    return Err(StoreError::FailedPrecondition(format!(
                        "cannot remove snapshot {key}: snapshot {} is its child",
                        child_key.value()
                    )));
                }
            }
            table.remove(key).map_err(db_err)?;
            record
        };
        txn.commit().map_err(db_err)?;
        Ok(removed)
    }

    /// Replaces a snapshot's labels.
    pub fn set_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let updated = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let mut record = load(&table, key)?;
            record.labels = labels;
            record.updated_ns = now_ns();
            table
                .insert(key, record.encode().as_slice())
                .map_err(db_err)?;
            record
        };
        txn.commit().map_err(db_err)?;
        Ok(updated)
    }

    /// Forgets the record of Lode image `bootstrap_digest` unless a
    /// snapshot names it, or a damaged snapshot record might; returns
    /// whether no snapshot uses the image (then its instance can go too).
    /// One transaction: a snapshot created meanwhile is seen, or sees the
    /// record gone and records the image again.
    pub fn forget_image_unless_used(&self, bootstrap_digest: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let snapshots = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            for entry in snapshots.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let used = SnapshotRecord::decode(key.value(), value.value())
                    .map_or(true, |r| r.lode_image.as_deref() == Some(bootstrap_digest));
                if used {
                    return Ok(false);
                }
            }
            let mut images = txn.open_table(IMAGES).map_err(db_err)?;
            images.remove(bootstrap_digest).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(true)
    }

    /// Every recorded Lode image; an error if a record does not decode.
    pub fn images(&self) -> Result<Vec<LodeImage>, StoreError> {
        self.db.read(|txn| {
            let table = txn.open_table(IMAGES).map_err(db_err)?;
            let mut images = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                images.push(decode_image(key.value(), value.value())?);
            }
            Ok(images)
        })
    }

    pub fn image(&self, bootstrap_digest: &str) -> Result<Option<LodeImage>, StoreError> {
        self.db.read(|txn| {
            let table = txn.open_table(IMAGES).map_err(db_err)?;
            let value = table.get(bootstrap_digest).map_err(db_err)?;
            value
                .map(|bytes| decode_image(bootstrap_digest, bytes.value()))
                .transpose()
        })
    }
}

/// The Lode image recorded under `bootstrap_digest`.
fn decode_image(bootstrap_digest: &str, bytes: &[u8]) -> Result<LodeImage, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: bootstrap_digest.to_string(),
        message: e.to_string(),
    })
}

/// The record of snapshot `key`, or NotFound.
fn load(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<SnapshotRecord, StoreError> {
    match table.get(key).map_err(db_err)? {
        Some(bytes) => SnapshotRecord::decode(key, bytes.value()),
        None => Err(StoreError::NotFound(key.to_string())),
    }
}

fn check_parent(table: &redb::Table<'_, &str, &[u8]>, parent: &str) -> Result<(), StoreError> {
    if parent.is_empty() {
        return Ok(());
    }
    let record = load(table, parent).map_err(|e| match e {
        StoreError::NotFound(_) => StoreError::NotFound(format!("parent {parent}")),
        other => other,
    })?;
    if record.kind != SnapshotKind::Committed {
        return Err(StoreError::FailedPrecondition(format!(
            "parent {parent} is a {} snapshot, not a committed one",
            record.kind.as_str()
        )));
    }
    Ok(())
}
