//! The one FUSE adapter of every mode (its `fuser::Filesystem` impl is in
//! [`super::filesystem`]): routes each request through the mount's
//! [`Table`] to an instance's [`crate::fs::ops::LodeFs`] (or answers for
//! the shared pseudo root), renumbers inodes and counts the operation in
//! the instance's metrics. All errno mapping and error logging is in
//! [`crate::fs::errno`].

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, Generation, INodeNo, ReplyXattr};
use lode_common::format::Ino;
use tracing::debug;

use super::errno::{ErrorLog, FsError};
use super::ops::XattrReply;
use super::table::{Route, Table};
use crate::instance::Instance;
use crate::metrics::{Fop, Metrics};

/// Inode numbers are fixed by the bootstrap and the instance's seq, so
/// generation 0 is the same answer in every process serving them.
pub(super) const GENERATION: Generation = Generation(0);

/// Kernel-side settings negotiated at INIT.
#[derive(Clone, Copy, Debug)]
pub struct KernelTuning {
    pub max_background: u16,
    /// How long the kernel may cache the shared pseudo root's answers.
    pub root_ttl: Duration,
    /// The INIT flags a predecessor chose, for a successor that resumes its
    /// connection: the kernel keeps them, so the successor chooses the same.
    pub predecessor_flags: Option<u64>,
}

pub struct Adapter {
    pub(super) table: Arc<Table>,
    /// Counts the pseudo root's operations (instances count their own).
    root_metrics: Metrics,
    errors: Arc<ErrorLog>,
    pub(super) tuning: KernelTuning,
}

/// An entry or attribute answer with its cache lifetimes.
pub(super) struct Entry {
    pub(super) attr: FileAttr,
    pub(super) entry_ttl: Duration,
    pub(super) attr_ttl: Duration,
}

impl Adapter {
    pub fn new(table: Arc<Table>, tuning: KernelTuning) -> Self {
        Self {
            table,
            root_metrics: Metrics::new(),
            errors: ErrorLog::new(),
            tuning,
        }
    }

    /// Routes `ino`, runs `f` on where it leads, counts the outcome in the
    /// instance's metrics (or the root's) and maps an error to its errno.
    pub(super) fn answer<T>(
        &self,
        op: Fop,
        ino: INodeNo,
        f: impl FnOnce(&Route) -> Result<T, FsError>,
    ) -> Result<T, Errno> {
        let result = match self.table.route(ino.0) {
            Ok(route) => {
                let result = f(&route);
                let metrics = match &route {
                    Route::Instance(i, _) => &i.metrics,
                    Route::Root => &self.root_metrics,
                };
                metrics.fop(op, result.is_ok());
                result
            }
            Err(e) => {
                self.root_metrics.fop(op, false);
                Err(e)
            }
        };
        result.map_err(|e| self.errors.report(op.name(), ino.0, &e))
    }

    /// `attr` of `instance` with the kernel's inode number.
    pub(super) fn global(
        &self,
        instance: &Instance,
        mut attr: FileAttr,
    ) -> Result<FileAttr, FsError> {
        attr.ino = INodeNo(self.table.global(instance, Ino(attr.ino.0))?);
        Ok(attr)
    }

    pub(super) fn instance_entry(
        &self,
        instance: &Instance,
        attr: FileAttr,
    ) -> Result<Entry, FsError> {
        Ok(Entry {
            attr: self.global(instance, attr)?,
            entry_ttl: instance.fs.ttls.entry,
            attr_ttl: instance.fs.ttls.attr,
        })
    }

    pub(super) fn root_attr(&self) -> FileAttr {
        let n = u32::try_from(self.table.all().len()).unwrap_or(u32::MAX - 2);
        FileAttr {
            ino: INodeNo(self.table.root()),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2 + n.min(u32::MAX - 2),
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    pub(super) fn lookup_in(
        &self,
        route: &Route,
        parent: INodeNo,
        name: &[u8],
    ) -> Result<Entry, FsError> {
        match route {
            Route::Root => {
                let instance = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| self.table.get(n))
                    .ok_or_else(|| FsError::NotFound {
                        dir: parent.0,
                        name: String::from_utf8_lossy(name).into_owned(),
                    })?;
                let attr = instance.fs.getattr(Ino::ROOT)?;
                let mut entry = self.instance_entry(&instance, attr)?;
                entry.entry_ttl = self.tuning.root_ttl;
                Ok(entry)
            }
            Route::Instance(i, local) => self.instance_entry(i, i.fs.lookup(*local, name)?),
        }
    }

    /// Lists directory `route` from `offset`; `add(ino, next_offset, kind,
    /// name, attr)` returns true when the reply is full.
    pub(super) fn list(
        &self,
        route: &Route,
        offset: u64,
        with_attrs: bool,
        mut add: impl FnMut(u64, u64, FileType, &[u8], Option<&Entry>) -> bool,
    ) -> Result<(), FsError> {
        match route {
            Route::Root => {
                // Offsets: 1 and 2 for "." and "..", then seq + 2, stable
                // while instances come and go between two calls.
                let root = self.table.root();
                let root_entry = with_attrs.then(|| Entry {
                    attr: self.root_attr(),
                    entry_ttl: self.tuning.root_ttl,
                    attr_ttl: self.tuning.root_ttl,
                });
                for (next, name) in [(1u64, &b"."[..]), (2, &b".."[..])] {
                    if next > offset
                        && add(root, next, FileType::Directory, name, root_entry.as_ref())
                    {
                        return Ok(());
                    }
                }
                for i in self.table.all() {
                    let next = u64::from(i.seq) + 2;
                    if next <= offset {
                        continue;
                    }
                    let Ok(entry) =
                        i.fs.getattr(Ino::ROOT)
                            .and_then(|attr| self.instance_entry(&i, attr))
                    else {
                        continue;
                    };
                    let attr = with_attrs.then_some(&entry);
                    if add(
                        entry.attr.ino.0,
                        next,
                        FileType::Directory,
                        i.id.as_bytes(),
                        attr,
                    ) {
                        break;
                    }
                }
                Ok(())
            }
            Route::Instance(i, local) => i.fs.readdir(*local, offset, with_attrs, |item, attr| {
                let global = self.table.global(i, item.ino).unwrap_or(0);
                let entry = attr.and_then(|a| self.instance_entry(i, *a).ok());
                add(
                    global,
                    item.next_offset,
                    item.kind,
                    item.name,
                    entry.as_ref(),
                )
            }),
        }
    }

    pub(super) fn refuse(&self, op: &'static str, ino: INodeNo) -> Errno {
        debug!(op, ino = ino.0, "modification refused");
        match self.answer(Fop::Write, ino, |_| Err::<(), _>(FsError::ReadOnly)) {
            Err(errno) => errno,
            Ok(()) => Errno::EROFS,
        }
    }
}

pub(super) fn xattr_reply(r: Result<XattrReply, Errno>, reply: ReplyXattr) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(e),
    }
}
