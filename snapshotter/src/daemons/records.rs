//! The daemon manager's records, in its own tables of the snapshotter's
//! metadata store: which daemons exist and which instances they serve, with
//! the sequence number that orders re-mounting after a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::instances::LodeImage;
use crate::store::MetaDb;

const DAEMONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("daemons");
const INSTANCES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("instances");
const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("daemon_counters");
const NEXT_SEQ: &str = "next_instance_seq";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonRecord {
    pub id: String,
    /// "shared" or "dedicated".
    pub mode: String,
    pub apisock: PathBuf,
    pub supervisor: PathBuf,
    /// The FUSE mountpoint (the shared root, or the dedicated image root).
    pub mountpoint: PathBuf,
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Monotonically increasing across the store's life; instances are
    /// mounted again in this order.
    pub seq: u32,
    pub daemon_id: String,
    pub image: LodeImage,
    /// Where the image's root is visible.
    pub mountpoint: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("daemon records: {0}")]
    Db(#[source] Box<redb::Error>),
    #[error("daemon record {key}: cannot encode it: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("daemon records: instance sequence {0} overflows")]
    SequenceOverflow(u64),
}

fn err(e: impl Into<redb::Error>) -> RecordError {
    RecordError::Db(Box::new(e.into()))
}

impl crate::store::Refusal for RecordError {
    fn from_db(error: redb::Error) -> Self {
        err(error)
    }

    fn previous_io(&self) -> bool {
        matches!(self, RecordError::Db(e) if matches!(**e, redb::Error::PreviousIo))
    }
}

#[derive(Clone)]
pub struct Records {
    db: Arc<MetaDb>,
}

impl Records {
    pub fn new(db: Arc<MetaDb>) -> Result<Self, RecordError> {
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(DAEMONS).map_err(err)?;
        txn.open_table(INSTANCES).map_err(err)?;
        txn.open_table(COUNTERS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Self { db })
    }

    /// The daemon records that decode (the others are logged and skipped).
    pub fn daemons(&self) -> Result<Vec<DaemonRecord>, RecordError> {
        Ok(self.read_all(DAEMONS)?.0)
    }

    /// The instance records that decode, in sequence order (the others
    /// are logged and skipped).
    pub fn instances(&self) -> Result<Vec<InstanceRecord>, RecordError> {
        let mut all: Vec<InstanceRecord> = self.read_all(INSTANCES)?.0;
        all.sort_by_key(|i| i.seq);
        Ok(all)
    }

    /// Whether every daemon and instance record can be read and decodes:
    /// what no record names may be removed only then (a damaged record
    /// may name it).
    pub fn all_readable(&self) -> bool {
        let daemons = self.read_all::<DaemonRecord>(DAEMONS);
        let instances = self.read_all::<InstanceRecord>(INSTANCES);
        matches!((daemons, instances), (Ok((_, d)), Ok((_, i))) if d.is_empty() && i.is_empty())
    }

    pub fn put_daemon(&self, daemon: &DaemonRecord) -> Result<(), RecordError> {
        self.put(DAEMONS, &daemon.id, daemon)
    }

    pub fn remove_daemon(&self, id: &str) -> Result<(), RecordError> {
        self.remove(DAEMONS, id)
    }

    pub fn put_instance(&self, instance: &InstanceRecord) -> Result<(), RecordError> {
        self.put(INSTANCES, &instance.image.bootstrap_digest, instance)
    }

    pub fn remove_instance(&self, bootstrap_digest: &str) -> Result<(), RecordError> {
        self.remove(INSTANCES, bootstrap_digest)
    }

    /// The next instance sequence number (never reused). Starts at 1: seq 0
    /// is the shared daemon's pseudo root.
    pub fn next_seq(&self) -> Result<u32, RecordError> {
        let txn = self.db.begin_write().map_err(err)?;
        let seq = {
            let mut table = txn.open_table(COUNTERS).map_err(err)?;
            let seq = table.get(NEXT_SEQ).map_err(err)?.map_or(1, |v| v.value());
            table.insert(NEXT_SEQ, seq + 1).map_err(err)?;
            seq
        };
        txn.commit().map_err(err)?;
        u32::try_from(seq).map_err(|_| RecordError::SequenceOverflow(seq))
    }

    /// The records of `table` that decode as `T`, and the keys of those
    /// that do not (each logged).
    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
    ) -> Result<(Vec<T>, Vec<String>), RecordError> {
        let name = table.to_string();
        self.db.read(|txn| {
            let table = txn.open_table(table).map_err(err)?;
            let mut out = BTreeMap::new();
            let mut damaged = Vec::new();
            for entry in table.iter().map_err(err)? {
                let (key, value) = entry.map_err(err)?;
                match serde_json::from_slice::<T>(value.value()) {
                    Ok(record) => {
                        out.insert(key.value().to_string(), record);
                    }
                    Err(e) => {
                        tracing::warn!(table = %name, record = key.value(), error = %e, "record does not decode; skipped");
                        damaged.push(key.value().to_string());
                    }
                }
            }
            Ok((out.into_values().collect(), damaged))
        })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), RecordError> {
        let bytes = serde_json::to_vec(value).map_err(|source| RecordError::Encode {
            key: key.to_string(),
            source,
        })?;
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(table)
            .map_err(err)?
            .insert(key, bytes.as_slice())
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    fn remove(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        key: &str,
    ) -> Result<(), RecordError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(table)
            .map_err(err)?
            .remove(key)
            .map_err(err)?;
        txn.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::instances::test_image as image;

    #[test]
    fn sequence_numbers_increase_across_reopen_and_order_instances() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let records = Records::new(MetaDb::open(&path).unwrap()).unwrap();
        let a = records.next_seq().unwrap();
        let b = records.next_seq().unwrap();
        assert!(a >= 1 && b > a);
        for (seq, digest) in [(b, "sha256:aa"), (a, "sha256:zz")] {
            records
                .put_instance(&InstanceRecord {
                    seq,
                    daemon_id: "shared".into(),
                    image: image(digest),
                    mountpoint: "/m".into(),
                })
                .unwrap();
        }
        drop(records);
        let records = Records::new(MetaDb::open(&path).unwrap()).unwrap();
        let seqs: Vec<u32> = records.instances().unwrap().iter().map(|i| i.seq).collect();
        assert_eq!(seqs, vec![a, b]);
        assert!(records.next_seq().unwrap() > b);
    }

    #[test]
    fn a_damaged_record_is_skipped_and_makes_the_records_not_all_readable() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(&dir.path().join("db")).unwrap();
        let records = Records::new(Arc::clone(&db)).unwrap();
        let daemon = |id: &str| DaemonRecord {
            id: id.into(),
            mode: "shared".into(),
            apisock: "/a".into(),
            supervisor: "/s".into(),
            mountpoint: "/m".into(),
            pid: 1,
        };
        records.put_daemon(&daemon("good")).unwrap();
        records.put_daemon(&daemon("bad")).unwrap();
        assert!(records.all_readable());
        for table in [DAEMONS, INSTANCES] {
            let txn = db.begin_write().unwrap();
            txn.open_table(table)
                .unwrap()
                .insert("bad", &b"{\"json\": \"but not a record\"}"[..])
                .unwrap();
            txn.commit().unwrap();
            assert!(!records.all_readable(), "{table}");
        }
        let ids: Vec<String> = records
            .daemons()
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, ["good"]);
        assert!(records.instances().unwrap().is_empty());
    }
}
