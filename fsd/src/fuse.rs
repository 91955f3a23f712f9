//! `fuser::Filesystem` over [`LodeFs`]: converts requests and replies, counts
//! operations, and refuses every modification with EROFS. All logic lives in
//! [`crate::ops`]; all errno mapping and error logging in [`crate::errno`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use lode_common::format::Ino;
use tracing::{debug, info};

use crate::errno::{ErrorLog, FsError};
use crate::metrics::{Fop, Metrics};
use crate::ops::{LodeFs, XattrReply};

/// Inode numbers are stable for the life of a bootstrap, so generation 0 is
/// the same answer in every process serving it.
const GENERATION: Generation = Generation(0);

/// Kernel-side settings negotiated at INIT.
#[derive(Clone, Copy, Debug)]
pub struct KernelTuning {
    pub max_background: u16,
}

pub struct FuseFs {
    fs: Arc<LodeFs>,
    metrics: Arc<Metrics>,
    errors: Arc<ErrorLog>,
    tuning: KernelTuning,
}

impl FuseFs {
    pub fn new(fs: Arc<LodeFs>, metrics: Arc<Metrics>, tuning: KernelTuning) -> Self {
        Self {
            fs,
            metrics,
            errors: ErrorLog::new(),
            tuning,
        }
    }

    fn fail(&self, op: Fop, ino: u64, err: &FsError) -> Errno {
        self.metrics.fop(op, false);
        self.errors.report(op.name(), ino, err)
    }

    fn ok(&self, op: Fop) {
        self.metrics.fop(op, true);
    }

    fn refuse(&self, op: &'static str, ino: u64) -> Errno {
        self.fail(Fop::Write, ino, &FsError::ReadOnly);
        debug!(op, ino, "modification refused");
        Errno::EROFS
    }
}

fn ino(i: INodeNo) -> Ino {
    Ino(i.0)
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each is optional: an older kernel without one still works, just slower.
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            if config.add_capabilities(cap).is_err() {
                debug!(?cap, "kernel lacks FUSE capability");
            }
        }
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(nearest) = config.set_max_background(self.tuning.max_background) {
            let _ = config.set_max_background(nearest);
        }
        info!(abi = %config.kernel_abi(), "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "lookup", parent.0);
        match self.fs.lookup(ino(parent), name.as_bytes()) {
            Ok(attr) => {
                self.ok(Fop::Lookup);
                reply.entry_with_ttls(&self.fs.ttls.entry, &self.fs.ttls.attr, &attr, GENERATION);
            }
            Err(e) => reply.error(self.fail(Fop::Lookup, parent.0, &e)),
        }
    }

    fn getattr(&self, req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "getattr", i.0);
        match self.fs.getattr(ino(i)) {
            Ok(attr) => {
                self.ok(Fop::Getattr);
                reply.attr(&self.fs.ttls.attr, &attr);
            }
            Err(e) => reply.error(self.fail(Fop::Getattr, i.0, &e)),
        }
    }

    fn readlink(&self, req: &Request, i: INodeNo, reply: ReplyData) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "readlink", i.0);
        match self.fs.readlink(ino(i)) {
            Ok(target) => {
                self.ok(Fop::Readlink);
                reply.data(target);
            }
            Err(e) => reply.error(self.fail(Fop::Readlink, i.0, &e)),
        }
    }

    fn open(&self, req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _inflight = self.metrics.inflight_ops.enter(req.unique().0, "open", i.0);
        match self.fs.open(ino(i), flags.0) {
            Ok((fh, open_flags)) => {
                self.ok(Fop::Open);
                reply.opened(fh, open_flags);
            }
            Err(e) => reply.error(self.fail(Fop::Open, i.0, &e)),
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
        let _inflight = self.metrics.inflight_ops.enter(req.unique().0, "read", i.0);
        let started = std::time::Instant::now();
        let result = self.fs.read(ino(i), offset, size);
        self.metrics.read_latency.record(started.elapsed());
        match result {
            Ok(data) => {
                self.ok(Fop::Read);
                reply.data(&data);
            }
            Err(e) => reply.error(self.fail(Fop::Read, i.0, &e)),
        }
    }

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
        self.fs.release(ino(i));
        self.ok(Fop::Release);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "opendir", i.0);
        match self.fs.opendir(ino(i)) {
            Ok((fh, flags)) => {
                self.ok(Fop::Open);
                reply.opened(fh, flags);
            }
            Err(e) => reply.error(self.fail(Fop::Open, i.0, &e)),
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
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "readdir", i.0);
        let result = self.fs.readdir(ino(i), offset, false, |item, _| {
            reply.add(
                INodeNo(item.ino.0),
                item.next_offset,
                item.kind,
                OsStr::from_bytes(item.name),
            )
        });
        match result {
            Ok(()) => {
                self.ok(Fop::Readdir);
                reply.ok();
            }
            Err(e) => reply.error(self.fail(Fop::Readdir, i.0, &e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "readdirplus", i.0);
        let ttl = self.fs.ttls.entry;
        let result = self
            .fs
            .readdir(ino(i), offset, true, |item, attr| match attr {
                Some(attr) => reply.add(
                    INodeNo(item.ino.0),
                    item.next_offset,
                    OsStr::from_bytes(item.name),
                    &ttl,
                    attr,
                    GENERATION,
                ),
                None => true,
            });
        match result {
            Ok(()) => {
                self.ok(Fop::Readdir);
                reply.ok();
            }
            Err(e) => reply.error(self.fail(Fop::Readdir, i.0, &e)),
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
        self.ok(Fop::Release);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        self.ok(Fop::Statfs);
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize);
    }

    fn getxattr(&self, req: &Request, i: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "getxattr", i.0);
        match self.fs.getxattr(ino(i), name.as_bytes(), size) {
            Ok(XattrReply::Size(n)) => {
                self.ok(Fop::Getxattr);
                reply.size(n);
            }
            Ok(XattrReply::Data(data)) => {
                self.ok(Fop::Getxattr);
                reply.data(&data);
            }
            Err(e) => reply.error(self.fail(Fop::Getxattr, i.0, &e)),
        }
    }

    fn listxattr(&self, req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        let _inflight = self
            .metrics
            .inflight_ops
            .enter(req.unique().0, "listxattr", i.0);
        match self.fs.listxattr(ino(i), size) {
            Ok(XattrReply::Size(n)) => {
                self.ok(Fop::Listxattr);
                reply.size(n);
            }
            Ok(XattrReply::Data(data)) => {
                self.ok(Fop::Listxattr);
                reply.data(&data);
            }
            Err(e) => reply.error(self.fail(Fop::Listxattr, i.0, &e)),
        }
    }

    fn access(&self, _req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.fs.access(ino(i), mask.bits()) {
            Ok(()) => {
                self.ok(Fop::Access);
                reply.ok();
            }
            Err(e) => reply.error(self.fail(Fop::Access, i.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        i: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(self.refuse("setattr", i.0));
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("mknod", parent.0));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("mkdir", parent.0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("unlink", parent.0));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("rmdir", parent.0));
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("symlink", parent.0));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse("rename", parent.0));
    }

    fn link(
        &self,
        _req: &Request,
        i: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("link", i.0));
    }

    fn write(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse("write", i.0));
    }

    fn setxattr(
        &self,
        _req: &Request,
        i: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse("setxattr", i.0));
    }

    fn removexattr(&self, _req: &Request, i: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("removexattr", i.0));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.refuse("create", parent.0));
    }

    fn fallocate(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse("fallocate", i.0));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse("copy_file_range", ino_out.0));
    }
}
