//! Shared mode's filesystem: one FUSE mount whose root (inode 1) lists the
//! instances by id, each instance's inodes renumbered by
//! [`crate::inode_map`]. Instances come and go at run time; a removed
//! instance's inodes answer ENOENT.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};
use lode_common::format::Ino;

use crate::errno::{ErrorLog, FsError};
use crate::inode_map::{resolve, to_global, GlobalIno, InstanceSeq, Target, PSEUDO_ROOT};
use crate::latency::InflightOps;
use crate::metrics::{Fop, Metrics};
use crate::ops::{LodeFs, XattrReply};

/// One instance as the shared filesystem serves it.
pub struct SharedInstance {
    pub id: String,
    pub seq: InstanceSeq,
    pub fs: Arc<LodeFs>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("an instance with id {0:?} is already mounted")]
    DuplicateId(String),
    #[error("an instance with sequence {0} is already mounted")]
    DuplicateSeq(u32),
}

/// The instances of a shared mount, by sequence number.
#[derive(Default)]
pub struct SharedTable {
    instances: RwLock<BTreeMap<InstanceSeq, Arc<SharedInstance>>>,
    /// FUSE requests in flight, over every instance.
    pub inflight: InflightOps,
}

enum Route {
    Root,
    Instance(Arc<SharedInstance>, Ino),
}

fn gone(ino: u64) -> FsError {
    FsError::NotFound {
        dir: ino,
        name: String::new(),
    }
}

impl SharedTable {
    pub fn insert(&self, instance: Arc<SharedInstance>) -> Result<(), TableError> {
        let mut map = self.instances.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&instance.seq) {
            return Err(TableError::DuplicateSeq(instance.seq.get()));
        }
        if map.values().any(|i| i.id == instance.id) {
            return Err(TableError::DuplicateId(instance.id.clone()));
        }
        map.insert(instance.seq, instance);
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Option<Arc<SharedInstance>> {
        let mut map = self.instances.write().unwrap_or_else(|e| e.into_inner());
        let seq = *map.iter().find(|(_, i)| i.id == id)?.0;
        map.remove(&seq)
    }

    pub fn get(&self, id: &str) -> Option<Arc<SharedInstance>> {
        let map = self.instances.read().unwrap_or_else(|e| e.into_inner());
        map.values().find(|i| i.id == id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<SharedInstance>> {
        let map = self.instances.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }

    fn route(&self, ino: u64) -> Result<Route, FsError> {
        match resolve(GlobalIno(ino)) {
            Some(Target::PseudoRoot) => Ok(Route::Root),
            Some(Target::Instance(seq, local)) => {
                let map = self.instances.read().unwrap_or_else(|e| e.into_inner());
                map.get(&seq)
                    .map(|i| Route::Instance(Arc::clone(i), local))
                    .ok_or_else(|| gone(ino))
            }
            None => Err(gone(ino)),
        }
    }

    fn root_attr(&self) -> FileAttr {
        let n = self
            .instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        FileAttr {
            ino: INodeNo(PSEUDO_ROOT.0),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2 + u32::try_from(n).unwrap_or(u32::MAX - 2),
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn global(seq: InstanceSeq, mut attr: FileAttr) -> Result<FileAttr, FsError> {
        let local = attr.ino.0;
        attr.ino = INodeNo(to_global(seq, Ino(local)).map_err(|_| gone(local))?.0);
        Ok(attr)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<FileAttr, FsError> {
        match self.route(parent)? {
            Route::Root => {
                let instance = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| self.get(n))
                    .ok_or_else(|| FsError::NotFound {
                        dir: parent,
                        name: String::from_utf8_lossy(name).into_owned(),
                    })?;
                Self::global(instance.seq, instance.fs.getattr(Ino::ROOT)?)
            }
            Route::Instance(i, local) => Self::global(i.seq, i.fs.lookup(local, name)?),
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<FileAttr, FsError> {
        match self.route(ino)? {
            Route::Root => Ok(self.root_attr()),
            Route::Instance(i, local) => Self::global(i.seq, i.fs.getattr(local)?),
        }
    }

    /// Lists a directory from `offset`; `add(ino, next_offset, kind, name)`
    /// returns true when the reply is full.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &[u8]) -> bool,
    ) -> Result<(), FsError> {
        match self.route(ino)? {
            Route::Root => {
                // Offsets: 1 and 2 for "." and "..", then seq + 2, stable
                // while instances come and go between two calls.
                let dots = [(1u64, &b"."[..]), (2, &b".."[..])];
                for (next, name) in dots {
                    if next > offset && add(PSEUDO_ROOT.0, next, FileType::Directory, name) {
                        return Ok(());
                    }
                }
                for i in self.all() {
                    let next = u64::from(i.seq.get()) + 2;
                    let Ok(root) = to_global(i.seq, Ino::ROOT) else {
                        continue;
                    };
                    if next > offset && add(root.0, next, FileType::Directory, i.id.as_bytes()) {
                        break;
                    }
                }
                Ok(())
            }
            Route::Instance(i, local) => i.fs.readdir(local, offset, false, |item, _| {
                let global = to_global(i.seq, item.ino).map_or(0, |g| g.0);
                add(global, item.next_offset, item.kind, item.name)
            }),
        }
    }

    fn instance(&self, ino: u64) -> Result<(Arc<SharedInstance>, Ino), FsError> {
        match self.route(ino)? {
            Route::Root => Err(FsError::IsDir(ino)),
            Route::Instance(i, local) => Ok((i, local)),
        }
    }
}

/// `fuser::Filesystem` over a [`SharedTable`].
pub struct SharedFuse {
    table: Arc<SharedTable>,
    /// Counts the pseudo root's operations (instances count their own).
    metrics: Arc<Metrics>,
    errors: Arc<ErrorLog>,
    ttl: Duration,
}

impl SharedFuse {
    pub fn new(table: Arc<SharedTable>, ttl: Duration) -> Self {
        Self {
            table,
            metrics: Arc::new(Metrics::new()),
            errors: ErrorLog::new(),
            ttl,
        }
    }

    fn metrics_of(&self, ino: u64) -> Arc<Metrics> {
        match self.table.route(ino) {
            Ok(Route::Instance(i, _)) => Arc::clone(&i.metrics),
            _ => Arc::clone(&self.metrics),
        }
    }

    fn done<T>(&self, op: Fop, ino: u64, result: Result<T, FsError>) -> Result<T, Errno> {
        let metrics = self.metrics_of(ino);
        match result {
            Ok(v) => {
                metrics.fop(op, true);
                Ok(v)
            }
            Err(e) => {
                metrics.fop(op, false);
                Err(self.errors.report(op.name(), ino, &e))
            }
        }
    }
}

const GENERATION: Generation = Generation(0);

impl Filesystem for SharedFuse {
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _g = self
            .table
            .inflight
            .enter(req.unique().0, "lookup", parent.0);
        let r = self.table.lookup(parent.0, name.as_bytes());
        match self.done(Fop::Lookup, parent.0, r) {
            Ok(attr) => reply.entry_with_ttls(&self.ttl, &self.ttl, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _g = self.table.inflight.enter(req.unique().0, "getattr", i.0);
        match self.done(Fop::Getattr, i.0, self.table.getattr(i.0)) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, i: INodeNo, reply: ReplyData) {
        let _g = self.table.inflight.enter(req.unique().0, "readlink", i.0);
        let r = self
            .table
            .instance(i.0)
            .and_then(|(inst, local)| inst.fs.readlink(local).map(<[u8]>::to_vec));
        match self.done(Fop::Readlink, i.0, r) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _g = self.table.inflight.enter(req.unique().0, "open", i.0);
        let r = self
            .table
            .instance(i.0)
            .and_then(|(inst, local)| inst.fs.open(local, flags.0));
        match self.done(Fop::Open, i.0, r) {
            Ok((fh, f)) => reply.opened(fh, f),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _g = self.table.inflight.enter(req.unique().0, "read", i.0);
        let started = std::time::Instant::now();
        let r = self.table.instance(i.0).map(|(inst, local)| {
            let r = inst.fs.read(local, offset, size);
            inst.metrics.read_latency.record(started.elapsed());
            r
        });
        match self.done(Fop::Read, i.0, r.and_then(|r| r)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    /// Nothing is buffered for writing (read-only), so a close has nothing
    /// to flush; answering spares the kernel an ENOSYS round per close.
    fn flush(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok((inst, local)) = self.table.instance(i.0) {
            inst.fs.release(local);
            inst.metrics.fop(Fop::Release, true);
        }
        reply.ok();
    }

    fn opendir(&self, req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _g = self.table.inflight.enter(req.unique().0, "opendir", i.0);
        let r = match self.table.route(i.0) {
            Ok(Route::Root) => Ok((FileHandle(0), fuser::FopenFlags::empty())),
            Ok(Route::Instance(inst, local)) => inst.fs.opendir(local),
            Err(e) => Err(e),
        };
        match self.done(Fop::Open, i.0, r) {
            Ok((fh, f)) => reply.opened(fh, f),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _g = self.table.inflight.enter(req.unique().0, "readdir", i.0);
        let r = self.table.readdir(i.0, offset, |ino, next, kind, name| {
            reply.add(INodeNo(ino), next, kind, OsStr::from_bytes(name))
        });
        match self.done(Fop::Readdir, i.0, r) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, req: &Request, i: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _g = self.table.inflight.enter(req.unique().0, "getxattr", i.0);
        let r = match self.table.route(i.0) {
            Ok(Route::Root) => Err(FsError::NoXattr {
                ino: i.0,
                name: name.to_string_lossy().into_owned(),
            }),
            Ok(Route::Instance(inst, local)) => inst.fs.getxattr(local, name.as_bytes(), size),
            Err(e) => Err(e),
        };
        xattr_reply(self.done(Fop::Getxattr, i.0, r), reply);
    }

    fn listxattr(&self, req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        let _g = self.table.inflight.enter(req.unique().0, "listxattr", i.0);
        let r = match self.table.route(i.0) {
            Ok(Route::Root) => Ok(if size == 0 {
                XattrReply::Size(0)
            } else {
                XattrReply::Data(Vec::new())
            }),
            Ok(Route::Instance(inst, local)) => inst.fs.listxattr(local, size),
            Err(e) => Err(e),
        };
        xattr_reply(self.done(Fop::Listxattr, i.0, r), reply);
    }

    fn access(&self, _req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = match self.table.route(i.0) {
            Ok(Route::Root) => Ok(()),
            Ok(Route::Instance(inst, local)) => inst.fs.access(local, mask.bits()),
            Err(e) => Err(e),
        };
        match self.done(Fop::Access, i.0, r) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn xattr_reply(r: Result<XattrReply, Errno>, reply: ReplyXattr) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(e),
    }
}

#[cfg(test)]
#[path = "shared_tests.rs"]
mod tests;
