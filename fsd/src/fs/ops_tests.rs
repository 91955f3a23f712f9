use super::*;
use crate::metrics::Metrics;
use crate::read::backend::DirBackend;
use crate::read::cache::ChunkCache;
use crate::read::fetch::FetchSettings;
use crate::testutil::{pattern, ImageBuilder, TestImage, MTIME};
use fuser::Errno;
use lode_common::format::NodeKind;

const CS: u32 = 64 * 1024;

struct Fixture {
    image: TestImage,
    fs: LodeFs,
    big: Vec<u8>,
}

fn fixture() -> Fixture {
    let big = pattern(3 * CS as usize + 17, 5);
    let mut b = ImageBuilder::new(CS, true);
    b.dir("etc");
    let hosts = b.file("etc/hosts", b"127.0.0.1 localhost\n");
    b.hardlink("etc/hosts.link", hosts);
    b.xattr(hosts, "user.origin", b"test");
    b.xattr(hosts, "security.capability", &[1, 2, 3]);
    b.file("big", &big);
    b.file("empty", b"");
    b.symlink("etc/localtime", "/usr/share/zoneinfo/UTC");
    b.special("dev-null", NodeKind::CharDevice { major: 1, minor: 3 });
    b.special("fifo", NodeKind::Fifo);
    b.dir("usr/share/doc");
    let image = b.build();
    let cache = Arc::new(ChunkCache::open(&image.cache_dir).unwrap());
    let settings = FetchSettings {
        merge_limit: 4 << 20,
        unread_ahead_percent: 50,
        readahead: 0,
        readahead_request: 4 << 20,
        deadline: Duration::from_secs(10),
        workers: 2,
        background_workers: 1,
        background_nice: crate::read::workers::usable_nice(10),
    };
    let fetcher = Fetcher::new(
        Arc::clone(&image.bootstrap),
        Arc::new(DirBackend::new(&image.blob_dir)),
        cache,
        Arc::new(Metrics::new()),
        settings,
        &crate::read::pools::Pools::default(),
    )
    .unwrap();
    let ttls = Ttls {
        entry: Duration::from_secs(60),
        attr: Duration::from_secs(60),
    };
    Fixture {
        image,
        fs: LodeFs::new(Arc::new(fetcher), ttls),
        big,
    }
}

impl Fixture {
    fn path(&self, path: &str) -> FileAttr {
        let mut ino = Ino::ROOT;
        let mut attr = self.fs.getattr(ino).unwrap();
        for name in path.split('/').filter(|n| !n.is_empty()) {
            attr = self.fs.lookup(ino, name.as_bytes()).unwrap();
            ino = Ino(attr.ino.0);
        }
        attr
    }

    fn ino(&self, path: &str) -> Ino {
        Ino(self.path(path).ino.0)
    }
}

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> Errno {
    r.unwrap_err().errno()
}

#[test]
fn lookup_and_getattr_report_the_bootstrap() {
    let f = fixture();
    let root = f.fs.getattr(Ino::ROOT).unwrap();
    assert_eq!(
        (root.ino, root.kind, root.perm),
        (INodeNo(1), FileType::Directory, 0o755)
    );
    let hosts = f.path("etc/hosts");
    assert_eq!(hosts.kind, FileType::RegularFile);
    assert_eq!(hosts.size, 20);
    assert_eq!(hosts.perm, 0o644);
    assert_eq!(hosts.mtime, UNIX_EPOCH + Duration::from_secs(MTIME as u64));
    assert_eq!(f.fs.getattr(Ino(hosts.ino.0)).unwrap(), hosts);
    let link = f.path("etc/localtime");
    assert_eq!((link.kind, link.size), (FileType::Symlink, 23));
    let dev = f.path("dev-null");
    assert_eq!((dev.kind, dev.rdev), (FileType::CharDevice, (1 << 8) | 3));
    assert_eq!(f.path("fifo").kind, FileType::NamedPipe);
    assert_eq!(f.path("etc").kind, FileType::Directory);
}

#[test]
fn hardlinks_share_inode_and_count_links() {
    let f = fixture();
    let a = f.path("etc/hosts");
    let b = f.path("etc/hosts.link");
    assert_eq!(a.ino, b.ino);
    assert_eq!((a.nlink, b.nlink), (2, 2));
    assert_eq!(f.path("big").nlink, 1);
}

#[test]
fn missing_names_and_bad_parents_have_errnos() {
    let f = fixture();
    assert_eq!(errno(f.fs.lookup(Ino::ROOT, b"nope")), Errno::ENOENT);
    assert_eq!(errno(f.fs.lookup(Ino::ROOT, &[b'x'; 300])), Errno::ENOENT);
    assert_eq!(errno(f.fs.lookup(f.ino("big"), b"x")), Errno::ENOTDIR);
    assert_eq!(errno(f.fs.getattr(Ino(1 << 40))), Errno::ESTALE);
}

fn list(f: &Fixture, dir: Ino, offset: u64) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    f.fs.readdir(dir, offset, false, |item, attr| {
        assert!(attr.is_none());
        out.push((
            String::from_utf8_lossy(item.name).into_owned(),
            item.ino.0,
            item.next_offset,
        ));
        false
    })
    .unwrap();
    out
}

#[test]
fn readdir_lists_dot_entries_then_names_in_order_and_resumes() {
    let f = fixture();
    let etc = f.ino("etc");
    let all = list(&f, etc, 0);
    let names: Vec<_> = all.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, [".", "..", "hosts", "hosts.link", "localtime"]);
    assert_eq!((all[0].1, all[1].1), (etc.0, 1));
    assert_eq!(all[2].1, all[3].1, "hardlinks list the same inode");
    // Continuing from any returned offset yields exactly the rest.
    for (i, entry) in all.iter().enumerate() {
        assert_eq!(list(&f, etc, entry.2), all[i + 1..]);
    }
    assert_eq!(list(&f, etc, u64::MAX), []);
    assert_eq!(
        errno(f.fs.readdir(f.ino("big"), 0, false, |_, _| false)),
        Errno::ENOTDIR
    );
}

#[test]
fn readdir_stops_when_the_buffer_is_full_and_plus_gives_attrs() {
    let f = fixture();
    let mut seen = 0;
    f.fs.readdir(Ino::ROOT, 0, false, |_, _| {
        seen += 1;
        seen == 3
    })
    .unwrap();
    assert_eq!(seen, 3);
    let mut attrs = Vec::new();
    f.fs.readdir(f.ino("etc"), 0, true, |item, attr| {
        let attr = attr.expect("readdirplus needs attributes");
        assert_eq!(attr.ino.0, item.ino.0);
        attrs.push(*attr);
        false
    })
    .unwrap();
    assert_eq!(attrs[2], f.path("etc/hosts"));
    assert_eq!(attrs[1], f.fs.getattr(Ino::ROOT).unwrap());
}

#[test]
fn directories_open_with_their_inode_as_handle_and_writes_are_refused() {
    let f = fixture();
    let big = f.ino("big");
    assert_eq!(
        f.fs.opendir(f.ino("etc")).unwrap().0,
        FileHandle(f.ino("etc").0)
    );
    assert_eq!(errno(f.fs.opendir(big)), Errno::ENOTDIR);
    assert_eq!(errno(f.fs.access(big, libc::W_OK)), Errno::EROFS);
    f.fs.access(big, libc::R_OK).unwrap();
}

#[test]
fn read_returns_file_bytes() {
    let f = fixture();
    let big = f.ino("big");
    assert_eq!(f.fs.read(big, 0, 4 * CS).unwrap(), f.big);
    assert_eq!(
        f.fs.read(big, u64::from(CS) - 3, 6).unwrap(),
        f.big[CS as usize - 3..][..6]
    );
    assert_eq!(
        &f.fs.read(f.ino("etc/hosts"), 0, 4096).unwrap()[..],
        &b"127.0.0.1 localhost\n"[..]
    );
    assert!(f.fs.read(f.ino("empty"), 0, 4096).unwrap().is_empty());
    assert_eq!(errno(f.fs.read(f.ino("etc"), 0, 10)), Errno::EISDIR);
}

#[test]
fn readlink_returns_the_target() {
    let f = fixture();
    assert_eq!(
        f.fs.readlink(f.ino("etc/localtime")).unwrap(),
        b"/usr/share/zoneinfo/UTC"
    );
    assert_eq!(errno(f.fs.readlink(f.ino("big"))), Errno::EINVAL);
}

#[test]
fn xattrs_follow_the_size_protocol() {
    let f = fixture();
    let hosts = f.ino("etc/hosts");
    assert_eq!(
        f.fs.getxattr(hosts, b"user.origin", 0).unwrap(),
        XattrReply::Size(4)
    );
    assert_eq!(
        f.fs.getxattr(hosts, b"user.origin", 4).unwrap(),
        XattrReply::Data(b"test".to_vec())
    );
    assert_eq!(
        errno(f.fs.getxattr(hosts, b"user.origin", 3)),
        Errno::ERANGE
    );
    assert_eq!(
        errno(f.fs.getxattr(hosts, b"user.none", 100)),
        Errno::NO_XATTR
    );
    let names = b"security.capability\0user.origin\0".to_vec();
    assert_eq!(
        f.fs.listxattr(hosts, 0).unwrap(),
        XattrReply::Size(names.len() as u32)
    );
    assert_eq!(
        f.fs.listxattr(hosts, 1000).unwrap(),
        XattrReply::Data(names)
    );
    assert_eq!(errno(f.fs.listxattr(hosts, 5)), Errno::ERANGE);
    assert_eq!(
        f.fs.listxattr(f.ino("big"), 0).unwrap(),
        XattrReply::Size(0)
    );
}

#[test]
fn statfs_counts_inodes_and_data() {
    let f = fixture();
    let s = f.fs.statfs();
    assert_eq!(s.files, f.image.bootstrap.inode_count());
    assert!(s.blocks * u64::from(s.bsize) >= f.big.len() as u64);
    assert_eq!(s.namelen, 255);
}

#[test]
fn device_numbers_use_the_kernel_encoding() {
    assert_eq!(encode_dev(8, 1), 0x801);
    assert_eq!(encode_dev(259, 0x12345), 0x12310345);
}
