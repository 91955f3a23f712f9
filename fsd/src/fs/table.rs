//! The instances one FUSE mount serves, and which instance and local inode
//! a kernel inode number names. A dedicated mount has one instance at its
//! root and numbers inodes as its bootstrap does; a shared mount lists its
//! instances under a pseudo root and numbers them by [`inode_map`].

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use lode_common::api::DaemonMode;
use lode_common::format::Ino;

use super::errno::FsError;
use super::inode_map::{self, resolve, to_global, GlobalIno, InstanceSeq, Target, PSEUDO_ROOT};
use crate::instance::Instance;
use crate::metrics::latency::InflightOps;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("an instance with id {0:?} is already mounted")]
    DuplicateId(String),
    #[error("an instance with sequence {0} is already mounted")]
    DuplicateSeq(u32),
    #[error("a dedicated daemon serves one instance; {0:?} is mounted")]
    Full(String),
    #[error(transparent)]
    Seq(#[from] inode_map::InodeMapError),
}

/// Where a kernel inode number leads.
pub enum Route {
    /// The shared mount's pseudo root.
    Root,
    Instance(Arc<Instance>, Ino),
}

/// The instances of one mount, by sequence number.
pub struct Table {
    mode: DaemonMode,
    instances: RwLock<BTreeMap<u32, Arc<Instance>>>,
    /// FUSE requests being answered, over every instance.
    pub inflight: InflightOps,
}

impl Table {
    pub fn new(mode: DaemonMode) -> Self {
        Self {
            mode,
            instances: RwLock::new(BTreeMap::new()),
            inflight: InflightOps::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<Instance>>> {
        self.instances.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that an instance with `id` and `seq` could be added.
    pub fn check_free(&self, id: &str, seq: u32) -> Result<(), TableError> {
        let map = self.read();
        match self.mode {
            DaemonMode::Dedicated => {
                if let Some(i) = map.values().next() {
                    return Err(TableError::Full(i.id.clone()));
                }
                // Dedicated inodes are the bootstrap's; seq only names the
                // instance, but stays within what a shared daemon accepts.
                if seq >= inode_map::SEQ_LIMIT {
                    return Err(inode_map::InodeMapError::Seq(seq).into());
                }
            }
            DaemonMode::Shared => {
                InstanceSeq::new(seq)?;
            }
        }
        if map.contains_key(&seq) {
            return Err(TableError::DuplicateSeq(seq));
        }
        if map.values().any(|i| i.id == id) {
            return Err(TableError::DuplicateId(id.to_owned()));
        }
        Ok(())
    }

    /// Adds `instance` after the checks of [`Table::check_free`].
    pub fn insert(&self, instance: Arc<Instance>) -> Result<(), TableError> {
        self.check_free(&instance.id, instance.seq)?;
        let mut map = self.instances.write().unwrap_or_else(|e| e.into_inner());
        // Checked again under the write lock: callers serialise changes, but
        // the table does not rely on it.
        if map.contains_key(&instance.seq) {
            return Err(TableError::DuplicateSeq(instance.seq));
        }
        map.insert(instance.seq, instance);
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Instance>> {
        let mut map = self.instances.write().unwrap_or_else(|e| e.into_inner());
        let seq = *map.iter().find(|(_, i)| i.id == id)?.0;
        map.remove(&seq)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Instance>> {
        self.read().values().find(|i| i.id == id).cloned()
    }

    /// Every instance, in sequence order.
    pub fn all(&self) -> Vec<Arc<Instance>> {
        self.read().values().cloned().collect()
    }

    pub fn route(&self, ino: u64) -> Result<Route, FsError> {
        match self.mode {
            DaemonMode::Dedicated => match self.read().values().next() {
                Some(i) => Ok(Route::Instance(Arc::clone(i), Ino(ino))),
                None => Err(FsError::Stale(ino)),
            },
            DaemonMode::Shared => match resolve(GlobalIno(ino)) {
                Some(Target::PseudoRoot) => Ok(Route::Root),
                Some(Target::Instance(seq, local)) => self
                    .read()
                    .get(&seq.get())
                    .map(|i| Route::Instance(Arc::clone(i), local))
                    .ok_or(FsError::Stale(ino)),
                None => Err(FsError::Stale(ino)),
            },
        }
    }

    /// The kernel's number for inode `local` of `instance`.
    pub fn global(&self, instance: &Instance, local: Ino) -> Result<u64, FsError> {
        match self.mode {
            DaemonMode::Dedicated => Ok(local.0),
            DaemonMode::Shared => {
                let seq = InstanceSeq::new(instance.seq).map_err(|_| FsError::Stale(local.0))?;
                Ok(to_global(seq, local)
                    .map_err(|_| FsError::Stale(local.0))?
                    .0)
            }
        }
    }

    /// The pseudo root's inode number.
    pub fn root(&self) -> u64 {
        PSEUDO_ROOT.0
    }
}
