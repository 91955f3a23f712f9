//! The image of the end-to-end tests: three layers that between them hold
//! every kind of entry and attribute an OCI layer can carry, the layer
//! operations (whiteouts, opaque directories, type changes, hard links
//! across layers), a 64 MiB file and 5,000 small files.

use lode_tests::{Layer, TarEntry};

pub const MIB: u64 = 1 << 20;
pub const BIG_FILE: &str = "big/random.bin";
pub const BIG_SIZE: u64 = 64 * MIB;
pub const BIG_SEED: u64 = 64;
pub const FOUR_K_FILE: &str = "etc/four-k";
pub const FOUR_K_SEED: u64 = 4;
pub const MANY_DIRS: usize = 50;
pub const MANY_PER_DIR: usize = 100;
/// Seeds of the small files start here (one per file).
const MANY_SEED: u64 = 10_000;
/// The first layer's root directory mtime.
const ROOT_MTIME: u64 = 1_600_000_000;
/// A valid `vfs_cap_data` (revision 2, effective, CAP_NET_BIND_SERVICE):
/// the kernel refuses malformed `security.capability` values.
pub const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

fn long_dir() -> String {
    format!("long/{}", "d".repeat(120))
}

pub fn long_file() -> String {
    format!("{}/{}", long_dir(), "f".repeat(200))
}

pub fn many_path(dir: usize, file: usize) -> String {
    format!("many/d{dir:02}/f{file:03}")
}

/// Sizes between 1 and ~6 KiB: incompressible content, so the small files
/// are a sizeable share of the image that a lazy mount must not fetch.
fn many_size(index: u64) -> u64 {
    1 + (index * 2_654_435_761) % 6_000
}

/// Layer 0 (gzip, GNU long names): every kind of entry and attribute.
pub fn base_layer() -> Layer {
    Layer::gzip(vec![
        TarEntry::dir(".").mtime(ROOT_MTIME),
        TarEntry::dir("etc").mtime(1_500_000_000),
        TarEntry::file("etc/hostname", "lode\n").mtime(1_500_000_001),
        TarEntry::file("etc/empty", ""),
        TarEntry::random_file(FOUR_K_FILE, 4096, FOUR_K_SEED),
        TarEntry::file("etc/replaced-by-later-layer", "old content\n"),
        TarEntry::dir("bin"),
        TarEntry::file("bin/su", "setuid\n").mode(0o4755),
        TarEntry::file("bin/wall", "setgid\n")
            .mode(0o2755)
            .owner(0, 5),
        TarEntry::file("bin/ping", "capable\n")
            .mode(0o755)
            .xattr("security.capability", CAPABILITY),
        TarEntry::dir("data").mtime(1_400_000_000),
        TarEntry::file("data/user-xattrs", "x")
            .xattr("user.plain", "value")
            .xattr("user.binary", b"\x00\xff\x01"),
        TarEntry::file("data/nanos", "ns").pax_record("mtime", "1700000001.123456789"),
        TarEntry::file("data/owned", "owned\n")
            .mode(0o640)
            .owner(1000, 1000)
            .mtime(1_234_567_890),
        TarEntry::file("data/big-ids", "ids\n").owner(3_000_000, 2_500_000),
        TarEntry::file("data/no-perms", "").mode(0o000),
        TarEntry::dir("data/private")
            .mode(0o700)
            .owner(65534, 65534),
        TarEntry::dir("tmp").mode(0o1777),
        TarEntry::dir("shared").mode(0o2775).owner(0, 50),
        TarEntry::file("shared/file", "in setgid dir\n").owner(33, 33),
        TarEntry::dir("links"),
        TarEntry::file("links/target", "link target\n")
            .mode(0o600)
            .owner(7, 8),
        // Link headers carry the target's metadata: tar implementations
        // differ on whether a link entry's own metadata is applied.
        TarEntry::hardlink("links/hard", "links/target")
            .mode(0o600)
            .owner(7, 8),
        TarEntry::symlink("links/relative", "target"),
        TarEntry::symlink("links/up", "../etc/hostname"),
        TarEntry::symlink("links/absolute", "/etc/hostname").owner(1, 2),
        TarEntry::symlink("links/dangling", "/no/such/file"),
        TarEntry::symlink("links/long-target", format!("/{}", "t".repeat(300))),
        TarEntry::dir("dev"),
        TarEntry::char_device("dev/null", 1, 3),
        TarEntry::block_device("dev/sda", 8, 0),
        TarEntry::char_device("dev/large-minor", 240, 300_000),
        TarEntry::fifo("dev/fifo").mode(0o600),
        TarEntry::dir("long"),
        TarEntry::dir(long_dir()),
        TarEntry::file(long_file(), "deep and long\n"),
        TarEntry::dir("names"),
        TarEntry::file(b"names/latin1-\xe9t\xe9", "latin-1\n"),
        TarEntry::file(b"names/bad-\xff\xfe", "not utf-8\n"),
        TarEntry::file("names/with space and\ttab", "spaces\n"),
        TarEntry::file("old", "whited out later\n"),
        TarEntry::dir("gone"),
        TarEntry::file("gone/file", "whole dir whited out later\n"),
        TarEntry::dir("opq"),
        TarEntry::file("opq/lower", "hidden by the opaque marker\n"),
        TarEntry::dir("opq/sub"),
        TarEntry::file("opq/sub/lower", "hidden too\n"),
        TarEntry::dir("replace"),
        TarEntry::file("replace/thing", "file, becomes a dir\n"),
        TarEntry::dir("dir2file"),
        TarEntry::file("dir2file/child", "dir becomes a file\n"),
        TarEntry::dir("chunks"),
        TarEntry::random_file("chunks/exactly-1m", MIB, 1),
        TarEntry::random_file("chunks/1m-plus-1", MIB + 1, 2),
        TarEntry::file("chunks/compressible", "lode ".repeat(300_000)),
        TarEntry::file("dup-a", "same content in two layers\n"),
        TarEntry::file("etc/hostname-copy", "lode\n"),
    ])
}

/// Layer 1 (zstd, PAX long names): whiteouts, opaque directory, type
/// changes, a cross-layer hard link and the 5,000 small files.
pub fn middle_layer() -> Layer {
    let mut e = vec![
        TarEntry::whiteout("old"),
        TarEntry::whiteout("gone"),
        TarEntry::dir("opq").mtime(1_650_000_000),
        TarEntry::opaque("opq"),
        TarEntry::file("opq/upper", "from the upper layer\n"),
        TarEntry::dir("replace").mtime(1_650_000_001),
        TarEntry::dir("replace/thing").mode(0o750),
        TarEntry::file("replace/thing/inner", "now inside a dir\n"),
        TarEntry::file("etc/replaced-by-later-layer", "new content\n")
            .mode(0o600)
            .owner(2, 3),
        TarEntry::hardlink("links/hard-across-layers", "links/target")
            .mode(0o600)
            .owner(7, 8),
        TarEntry::file("dup-b", "same content in two layers\n"),
        TarEntry::file(format!("{}/from-layer-1", long_dir()), "pax long name\n"),
        TarEntry::dir("many"),
    ];
    for d in 0..MANY_DIRS {
        e.push(TarEntry::dir(format!("many/d{d:02}")));
        for f in 0..MANY_PER_DIR {
            let index = (d * MANY_PER_DIR + f) as u64;
            e.push(TarEntry::random_file(
                many_path(d, f),
                many_size(index),
                MANY_SEED + index,
            ));
        }
    }
    Layer::zstd(e).pax()
}

/// Layer 2 (gzip): the 64 MiB file, a directory replaced by a file, a hard
/// link to a name made by a hard link in a lower layer.
pub fn top_layer() -> Layer {
    Layer::gzip(vec![
        TarEntry::dir("big"),
        TarEntry::random_file(BIG_FILE, BIG_SIZE, BIG_SEED),
        TarEntry::file("dir2file", "was a directory\n").mtime(1_700_000_002),
        TarEntry::hardlink("links/third-name", "links/hard-across-layers")
            .mode(0o600)
            .owner(7, 8),
        TarEntry::whiteout("etc/hostname-copy"),
    ])
}
