//! Layer merging: entry kinds, metadata, whiteouts, opaque directories,
//! hard links, duplicates, long and non-UTF-8 names.

use lode_common::format::{ImageTree, NodeKind};
use lode_tests::TarEntry;

use super::test_support::{convert, convert_layers, layer, Converted, CS};

fn is_dir(c: &Converted, path: &str) -> bool {
    matches!(c.node(path).kind, NodeKind::Dir { .. })
}

#[test]
fn every_entry_kind_is_kept_with_its_metadata() {
    let c = convert(vec![vec![
        TarEntry::dir("etc").mode(0o750).owner(10, 20).mtime(1234),
        TarEntry::file("etc/passwd", "root:x:0:0\n").mode(0o644),
        TarEntry::file("bin/su", "su binary").mode(0o4755),
        TarEntry::dir("tmp").mode(0o1777),
        TarEntry::file("empty", ""),
        TarEntry::symlink("etc/link", "../bin/su"),
        TarEntry::hardlink("bin/su-hard", "bin/su"),
        TarEntry::char_device("dev/null", 1, 3),
        TarEntry::block_device("dev/sda", 8, 0),
        TarEntry::fifo("run/pipe").mode(0o600),
        TarEntry::file("sgid", "x").mode(0o2711).owner(1000, 1001),
    ]])
    .unwrap();

    let etc = c.node("etc");
    assert!(is_dir(&c, "etc"));
    assert_eq!(
        (
            etc.meta.perm,
            etc.meta.uid,
            etc.meta.gid,
            etc.meta.mtime_sec
        ),
        (0o750, 10, 20, 1234)
    );
    assert_eq!(c.content("etc/passwd"), b"root:x:0:0\n");
    assert_eq!(c.node("bin/su").meta.perm, 0o4755);
    assert_eq!(c.node("tmp").meta.perm, 0o1777);
    assert_eq!(c.node("sgid").meta.perm, 0o2711);
    assert_eq!(
        (c.node("sgid").meta.uid, c.node("sgid").meta.gid),
        (1000, 1001)
    );
    assert_eq!(
        c.node("empty").kind,
        NodeKind::File {
            size: 0,
            chunks: vec![]
        }
    );
    assert_eq!(
        c.node("etc/link").kind,
        NodeKind::Symlink {
            target: b"../bin/su".to_vec()
        }
    );
    assert_eq!(c.id("bin/su-hard"), c.id("bin/su"));
    assert_eq!(
        c.node("dev/null").kind,
        NodeKind::CharDevice { major: 1, minor: 3 }
    );
    assert_eq!(
        c.node("dev/sda").kind,
        NodeKind::BlockDevice { major: 8, minor: 0 }
    );
    assert_eq!(c.node("run/pipe").kind, NodeKind::Fifo);
    assert_eq!(c.node("run/pipe").meta.perm, 0o600);
    let s = c.stats[0];
    assert_eq!(
        (s.files, s.dirs, s.symlinks, s.hardlinks, s.devices, s.fifos),
        (4, 2, 1, 1, 2, 1)
    );
}

#[test]
fn missing_parents_are_created_with_mode_0755() {
    let c = convert(vec![vec![TarEntry::file("a/b/c/file", "x")]]).unwrap();
    for dir in ["a", "a/b", "a/b/c"] {
        assert!(is_dir(&c, dir));
        assert_eq!(c.node(dir).meta.perm, 0o755, "{dir}");
    }
    assert_eq!(c.content("a/b/c/file"), b"x");
}

#[test]
fn root_entry_updates_root_metadata() {
    let c = convert(vec![vec![
        TarEntry::dir("./").mode(0o700).owner(5, 6),
        TarEntry::file("./f", "x"),
    ]])
    .unwrap();
    let root = c.tree().node(ImageTree::ROOT);
    assert_eq!(
        (root.meta.perm, root.meta.uid, root.meta.gid),
        (0o700, 5, 6)
    );
    assert_eq!(c.names("/"), ["f"]);
}

#[test]
fn redeclared_directory_keeps_children_and_takes_new_metadata() {
    let c = convert(vec![
        vec![
            TarEntry::dir("d").mode(0o755),
            TarEntry::file("d/lower", "1"),
        ],
        vec![
            TarEntry::dir("d")
                .mode(0o700)
                .owner(7, 7)
                .xattr("user.k", "v"),
            TarEntry::file("d/upper", "2"),
        ],
    ])
    .unwrap();
    assert_eq!(c.names("d"), ["lower", "upper"]);
    let d = &c.node("d").meta;
    assert_eq!((d.perm, d.uid), (0o700, 7));
    assert_eq!(
        d.xattrs.get(&b"user.k"[..]).map(Vec::as_slice),
        Some(&b"v"[..])
    );
}

#[test]
fn whiteouts_remove_lower_files_and_directory_trees() {
    let c = convert(vec![
        vec![
            TarEntry::file("keep", "k"),
            TarEntry::file("gone", "g"),
            TarEntry::file("d/sub/deep", "x"),
            TarEntry::file("d/other", "o"),
        ],
        vec![
            TarEntry::whiteout("gone"),
            TarEntry::whiteout("d/sub"),
            TarEntry::whiteout("never-existed"),
        ],
    ])
    .unwrap();
    assert_eq!(c.names("/"), ["d", "keep"]);
    assert_eq!(c.names("d"), ["other"]);
    assert_eq!(c.stats[1].whiteouts, 3);
}

#[test]
fn whiteout_and_entry_in_one_layer_last_wins() {
    let c = convert(vec![
        vec![TarEntry::file("a", "lower"), TarEntry::file("b", "lower")],
        vec![
            TarEntry::whiteout("a"),
            TarEntry::file("a", "upper"),
            TarEntry::file("b", "upper"),
            TarEntry::whiteout("b"),
        ],
    ])
    .unwrap();
    assert_eq!(c.content("a"), b"upper");
    assert!(!c.exists("b"));
}

#[test]
fn whiteout_in_a_missing_directory_creates_it() {
    let c = convert(vec![vec![TarEntry::whiteout("x/y/z")]]).unwrap();
    assert!(is_dir(&c, "x/y"));
    assert!(c.names("x/y").is_empty());
}

/// Layer 1 has d/{a, sub/{b}}; layer 2 makes d opaque and adds c and sub/x,
/// with the marker first or last: either way only layer 2's entries remain.
#[test]
fn opaque_marker_hides_lower_content_wherever_it_comes() {
    let lower = vec![
        TarEntry::dir("d").mode(0o711),
        TarEntry::file("d/a", "a"),
        TarEntry::file("d/sub/b", "b"),
        TarEntry::file("outside", "o"),
    ];
    let upper = vec![
        TarEntry::dir("d").mode(0o750),
        TarEntry::file("d/c", "c"),
        TarEntry::file("d/sub/x", "x"),
    ];
    for marker_first in [true, false] {
        let mut entries = upper.clone();
        let at = if marker_first { 1 } else { entries.len() };
        entries.insert(at, TarEntry::opaque("d"));
        let c = convert(vec![lower.clone(), entries]).unwrap();
        assert_eq!(c.names("d"), ["c", "sub"], "marker_first={marker_first}");
        assert_eq!(c.names("d/sub"), ["x"], "marker_first={marker_first}");
        assert_eq!(c.node("d").meta.perm, 0o750);
        assert_eq!(c.names("/"), ["d", "outside"]);
        assert_eq!(c.stats[1].opaque_dirs, 1);
    }
}

#[test]
fn opaque_marker_keeps_dirs_this_layer_only_walked_through() {
    let c = convert(vec![
        vec![
            TarEntry::file("d/sub/old", "1"),
            TarEntry::file("d/old", "1"),
        ],
        vec![TarEntry::file("d/sub/new", "2"), TarEntry::opaque("d")],
    ])
    .unwrap();
    assert_eq!(c.names("d"), ["sub"]);
    assert_eq!(c.names("d/sub"), ["new"]);
}

#[test]
fn opaque_marker_without_lower_directory_creates_an_empty_one() {
    let c = convert(vec![vec![TarEntry::opaque("fresh")]]).unwrap();
    assert!(c.names("fresh").is_empty());
}

#[test]
fn opaque_root_hides_all_lower_content() {
    let c = convert(vec![
        vec![TarEntry::file("a", "1"), TarEntry::file("d/b", "1")],
        vec![TarEntry::file("new", "2"), TarEntry::opaque("")],
    ])
    .unwrap();
    assert_eq!(c.names("/"), ["new"]);
}

#[test]
fn hardlinks_within_and_across_layers_share_the_node() {
    let c = convert(vec![
        vec![
            TarEntry::file("bin/tool", "tool"),
            TarEntry::hardlink("bin/alias", "bin/tool"),
            TarEntry::symlink("sym", "bin/tool"),
        ],
        vec![
            TarEntry::hardlink("usr/bin/tool", "/bin/tool"),
            TarEntry::hardlink("sym-hard", "./sym"),
        ],
    ])
    .unwrap();
    let tool = c.id("bin/tool");
    assert!(tool.is_some());
    assert_eq!(c.id("bin/alias"), tool);
    assert_eq!(c.id("usr/bin/tool"), tool);
    assert_eq!(c.id("sym-hard"), c.id("sym"));
    assert_eq!(c.content("usr/bin/tool"), b"tool");
}

#[test]
fn hardlink_survives_whiteout_of_its_other_name() {
    let c = convert(vec![
        vec![TarEntry::file("a", "data"), TarEntry::hardlink("b", "a")],
        vec![TarEntry::whiteout("a")],
    ])
    .unwrap();
    assert!(!c.exists("a"));
    assert_eq!(c.content("b"), b"data");
}

#[test]
fn opaque_marker_hides_the_lower_name_of_a_node_linked_in_this_layer() {
    let c = convert(vec![
        vec![TarEntry::file("d/f", "data")],
        vec![TarEntry::hardlink("d/link", "d/f"), TarEntry::opaque("d")],
    ])
    .unwrap();
    assert_eq!(c.names("d"), ["link"]);
    assert_eq!(c.content("d/link"), b"data");
}

#[test]
fn duplicates_last_wins_including_type_changes() {
    let c = convert(vec![
        vec![
            TarEntry::file("f", "first"),
            TarEntry::file("f", "second"),
            TarEntry::file("to-dir", "x"),
            TarEntry::dir("to-dir"),
            TarEntry::file("to-dir/child", "c"),
            TarEntry::file("dir-to-file/child", "c"),
            TarEntry::symlink("sym-to-file", "f"),
        ],
        vec![
            TarEntry::file("dir-to-file", "now a file"),
            TarEntry::file("sym-to-file", "now a file"),
            TarEntry::symlink("f", "elsewhere"),
        ],
    ])
    .unwrap();
    assert_eq!(c.names("to-dir"), ["child"]);
    assert_eq!(c.content("dir-to-file"), b"now a file");
    assert_eq!(c.content("sym-to-file"), b"now a file");
    assert_eq!(
        c.node("f").kind,
        NodeKind::Symlink {
            target: b"elsewhere".to_vec()
        }
    );
}

#[test]
fn aufs_metadata_entries_are_skipped() {
    let c = convert(vec![vec![
        TarEntry::file(".wh..wh.plnk/123.456", "x"),
        TarEntry::file(".wh..wh.aufs", ""),
        TarEntry::file("real", "r"),
    ]])
    .unwrap();
    assert_eq!(c.names("/"), [".wh..wh.plnk", "real"]);
    assert_eq!(c.stats[0].skipped, 1);
}

fn long_and_odd_names(pax: bool) {
    let deep = format!("{}/{}", "d".repeat(120), "f".repeat(200));
    let target = format!("/{}", "t".repeat(300));
    let odd = b"bad-\xff\xfe-\x01name".to_vec();
    let mut layer1 = layer(vec![
        TarEntry::file(&deep, "deep"),
        TarEntry::symlink("long-link", &target),
        TarEntry::hardlink("hard-to-long", &deep),
        TarEntry::file(&odd, "odd"),
        TarEntry::hardlink(b"hard-\xff".as_slice(), &odd),
    ]);
    if pax {
        layer1 = layer1.pax();
    }
    let c = convert_layers(vec![layer1], CS, 2).unwrap();
    assert_eq!(c.content(&deep), b"deep");
    assert_eq!(c.id("hard-to-long"), c.id(&deep));
    assert_eq!(
        c.node("long-link").kind,
        NodeKind::Symlink {
            target: target.into_bytes()
        }
    );
    let NodeKind::Dir { entries } = &c.tree().node(ImageTree::ROOT).kind else {
        panic!("root is not a directory");
    };
    let odd_id = entries.get(&odd).copied();
    assert!(odd_id.is_some());
    assert_eq!(entries.get(&b"hard-\xff"[..]).copied(), odd_id);
}

#[test]
fn long_and_non_utf8_names_gnu() {
    long_and_odd_names(false);
}

#[test]
fn long_and_non_utf8_names_pax() {
    long_and_odd_names(true);
}

#[test]
fn xattrs_and_nanosecond_mtimes_come_from_pax_records() {
    let c = convert(vec![vec![
        TarEntry::file("cap", "x")
            .xattr("security.capability", [1u8, 0, 0, 2])
            .xattr("user.bin", b"\0\xff"),
        TarEntry::file("t", "x").pax_record("mtime", "1700000000.123456789"),
        TarEntry::dir("d").pax_record("mtime", "-1.5"),
    ]])
    .unwrap();
    let xattrs = &c.node("cap").meta.xattrs;
    assert_eq!(xattrs.len(), 2);
    assert_eq!(xattrs[&b"security.capability"[..]], [1, 0, 0, 2]);
    assert_eq!(xattrs[&b"user.bin"[..]], b"\0\xff");
    let t = &c.node("t").meta;
    assert_eq!((t.mtime_sec, t.mtime_nsec), (1_700_000_000, 123_456_789));
    let d = &c.node("d").meta;
    assert_eq!((d.mtime_sec, d.mtime_nsec), (-2, 500_000_000));
}

#[test]
fn converted_tree_writes_a_bootstrap_that_verifies() {
    let c = convert(vec![
        vec![
            TarEntry::file("a/one", "1"),
            TarEntry::hardlink("a/two", "a/one"),
            TarEntry::dir("a/sub"),
        ],
        vec![TarEntry::whiteout("a/sub"), TarEntry::file("b", "2")],
    ])
    .unwrap();
    let bytes = c.conv.bootstrap(&[]).unwrap();
    let boot = lode_common::format::Bootstrap::from_bytes(bytes).unwrap();
    boot.verify_all().unwrap();
    let root = lode_common::format::Ino::ROOT;
    let a = boot.lookup(root, b"a").unwrap().expect("a");
    let one = boot.lookup(a.ino, b"one").unwrap().expect("one");
    assert_eq!(one.nlink, 2);
    assert!(boot.lookup(a.ino, b"sub").unwrap().is_none());
}
