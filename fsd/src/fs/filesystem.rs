//! `fuser::Filesystem` for the [`Adapter`]: each request is routed and
//! answered by the adapter's helpers; every modification is refused with
//! EROFS.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, info};

use super::adapter::{xattr_reply, Adapter, GENERATION};
use super::errno::FsError;
use super::ops::{StatFs, XattrReply};
use super::table::Route;
use crate::metrics::Fop;

/// The optional capabilities asked for at INIT; an older kernel without one
/// still works, just slower. Every listing carries its entries' attributes
/// (readdirplus, without READDIRPLUS_AUTO, with which the kernel asks for
/// them only in a directory's first batch): they are in memory here, and a
/// walker that opens what it listed then sends no lookup per file.
const CAPABILITIES: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_MAX_PAGES)
    .union(InitFlags::FUSE_DO_READDIRPLUS)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_PARALLEL_DIROPS);

/// Capabilities earlier versions asked for: a successor resuming such a
/// daemon's connection chooses them again (see [`KernelTuning`]).
///
/// [`KernelTuning`]: super::adapter::KernelTuning
const FORMER_CAPABILITIES: InitFlags = InitFlags::FUSE_READDIRPLUS_AUTO;

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = match self.tuning.predecessor_flags {
            None => CAPABILITIES,
            Some(chosen) => {
                (CAPABILITIES | FORMER_CAPABILITIES) & InitFlags::from_bits_truncate(chosen)
            }
        };
        for cap in wanted.iter() {
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
        let _g = self
            .table
            .inflight
            .enter(req.unique().0, "lookup", parent.0);
        let r = self.answer(Fop::Lookup, parent, |route| {
            self.lookup_in(route, parent, name.as_bytes())
        });
        match r {
            Ok(e) => reply.entry_with_ttls(&e.entry_ttl, &e.attr_ttl, &e.attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _g = self.table.inflight.enter(req.unique().0, "getattr", i.0);
        let r = self.answer(Fop::Getattr, i, |route| match route {
            Route::Root => Ok((self.root_attr(), self.tuning.root_ttl)),
            Route::Instance(inst, local) => {
                let attr = self.global(inst, inst.fs.getattr(*local)?)?;
                Ok((attr, inst.fs.ttls.attr))
            }
        });
        match r {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, i: INodeNo, reply: ReplyData) {
        let _g = self.table.inflight.enter(req.unique().0, "readlink", i.0);
        let r = self.answer(Fop::Readlink, i, |route| match route {
            Route::Root => Err(FsError::NotSymlink(i.0)),
            Route::Instance(inst, local) => inst.fs.readlink(*local).map(<[u8]>::to_vec),
        });
        match r {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    /// Files need no open here. ENOSYS tells the kernel, once per
    /// connection, to open files itself from then on: with their page cache
    /// kept across opens (its default in that case, right for immutable
    /// content) and without a release on close. A walk of small files then
    /// costs one request per file (its read) instead of four. The mount is
    /// read-only, so the kernel refuses opens for writing before they get
    /// here. Reads identify files by inode, never by handle, so handles from
    /// an earlier daemon that answered opens (before a takeover) still work.
    fn open(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _ = self.answer(Fop::Open, i, |_| Ok(()));
        reply.error(Errno::ENOSYS);
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
        let r = self.answer(Fop::Read, i, |route| match route {
            Route::Root => Err(FsError::IsDir(i.0)),
            Route::Instance(inst, local) => {
                let data = inst.fs.read(*local, offset, size);
                inst.metrics.read_latency.record(started.elapsed());
                data
            }
        });
        match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    /// Nothing is buffered for writing (read-only), so a close has nothing
    /// to flush: ENOSYS tells the kernel, once per connection, not to ask
    /// again (a request per close saved).
    fn flush(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
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
        // Only files opened through an earlier daemon (before a takeover)
        // are released: opens are left to the kernel (see `open`).
        let _ = self.answer(Fop::Release, i, |_| Ok(()));
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
        let _g = self.table.inflight.enter(req.unique().0, "opendir", i.0);
        let r = self.answer(Fop::Open, i, |route| match route {
            Route::Root => Ok((FileHandle(i.0), FopenFlags::empty())),
            Route::Instance(inst, local) => inst.fs.opendir(*local),
        });
        match r {
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
        let r = self.answer(Fop::Readdir, i, |route| {
            self.list(route, offset, false, |ino, next, kind, name, _| {
                reply.add(INodeNo(ino), next, kind, OsStr::from_bytes(name))
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        let _g = self
            .table
            .inflight
            .enter(req.unique().0, "readdirplus", i.0);
        let r = self.answer(Fop::Readdir, i, |route| {
            self.list(
                route,
                offset,
                true,
                |ino, next, _, name, entry| match entry {
                    Some(e) => reply.add(
                        INodeNo(ino),
                        next,
                        OsStr::from_bytes(name),
                        &e.entry_ttl,
                        &e.attr,
                        GENERATION,
                    ),
                    None => false,
                },
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _ = self.answer(Fop::Release, i, |_| Ok(()));
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

    fn statfs(&self, _req: &Request, i: INodeNo, reply: ReplyStatfs) {
        let r = self.answer(Fop::Statfs, i, |route| {
            Ok(match route {
                Route::Root => self
                    .table
                    .all()
                    .iter()
                    .map(|inst| inst.fs.statfs())
                    .fold(StatFs::empty(), StatFs::plus),
                Route::Instance(inst, _) => inst.fs.statfs(),
            })
        });
        match r {
            Ok(s) => reply.statfs(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, req: &Request, i: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _g = self.table.inflight.enter(req.unique().0, "getxattr", i.0);
        let r = self.answer(Fop::Getxattr, i, |route| match route {
            Route::Root => Err(FsError::NoXattr {
                ino: i.0,
                name: name.to_string_lossy().into_owned(),
            }),
            Route::Instance(inst, local) => inst.fs.getxattr(*local, name.as_bytes(), size),
        });
        xattr_reply(r, reply);
    }

    fn listxattr(&self, req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        let _g = self.table.inflight.enter(req.unique().0, "listxattr", i.0);
        let r = self.answer(Fop::Listxattr, i, |route| match route {
            Route::Root if size == 0 => Ok(XattrReply::Size(0)),
            Route::Root => Ok(XattrReply::Data(Vec::new())),
            Route::Instance(inst, local) => inst.fs.listxattr(*local, size),
        });
        xattr_reply(r, reply);
    }

    fn access(&self, _req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.answer(Fop::Access, i, |route| match route {
            Route::Root if mask.bits() & libc::W_OK != 0 => Err(FsError::ReadOnly),
            Route::Root => Ok(()),
            Route::Instance(inst, local) => inst.fs.access(*local, mask.bits()),
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        reply.error(self.refuse("setattr", i));
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
        reply.error(self.refuse("mknod", parent));
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
        reply.error(self.refuse("mkdir", parent));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("unlink", parent));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("rmdir", parent));
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("symlink", parent));
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
        reply.error(self.refuse("rename", parent));
    }

    fn link(
        &self,
        _req: &Request,
        i: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("link", i));
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
        reply.error(self.refuse("write", i));
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
        reply.error(self.refuse("setxattr", i));
    }

    fn removexattr(&self, _req: &Request, i: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("removexattr", i));
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
        reply.error(self.refuse("create", parent));
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
        reply.error(self.refuse("fallocate", i));
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
        reply.error(self.refuse("copy_file_range", ino_out));
    }
}
