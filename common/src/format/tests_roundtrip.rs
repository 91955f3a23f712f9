//! Write → read round trips, writer validation, and the open-time budget.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::layout;
use super::test_support::{
    arb_image, dir_node, entries, file_node, insert_entry, small_image, ChunkPlanner, Image, CS,
};
use super::{
    write_bootstrap, BlobIndex, BlobInfo, Bootstrap, ChunkHash, ChunkIndex, ChunkRecord,
    FormatError, ImageTree, Ino, InodeKind, Meta, Node, NodeId, NodeKind, PrefetchRange,
    PrefetchSpan,
};

/// Expected nlink of every reachable node.
fn expected_links(tree: &ImageTree) -> HashMap<NodeId, u32> {
    let mut links = HashMap::new();
    let mut queue = VecDeque::from([ImageTree::ROOT]);
    links.insert(ImageTree::ROOT, 2);
    while let Some(dir) = queue.pop_front() {
        for &child in entries(tree, dir).values() {
            if let NodeKind::Dir { .. } = tree.node(child).kind {
                *links.get_mut(&dir).unwrap() += 1;
                links.insert(child, 2);
                queue.push_back(child);
            } else {
                *links.entry(child).or_insert(0) += 1;
            }
        }
    }
    links
}

/// Breadth-first numbering computed independently of the writer.
fn expected_numbering(tree: &ImageTree) -> HashMap<NodeId, Ino> {
    let mut ino = HashMap::from([(ImageTree::ROOT, Ino::ROOT)]);
    let mut queue = VecDeque::from([ImageTree::ROOT]);
    while let Some(dir) = queue.pop_front() {
        for &child in entries(tree, dir).values() {
            if !ino.contains_key(&child) {
                ino.insert(child, Ino(ino.len() as u64 + 1));
                if matches!(tree.node(child).kind, NodeKind::Dir { .. }) {
                    queue.push_back(child);
                }
            }
        }
    }
    ino
}

fn check_node(b: &Bootstrap, image: &Image, id: NodeId, ino: Ino, links: &HashMap<NodeId, u32>) {
    let node = image.tree.node(id);
    let got = b.inode(ino).unwrap();
    let (kind, type_bits, size, rdev) = match &node.kind {
        NodeKind::Dir { .. } => (InodeKind::Dir, layout::S_IFDIR, 0, (0, 0)),
        NodeKind::File { size, .. } => (InodeKind::File, layout::S_IFREG, *size, (0, 0)),
        NodeKind::Symlink { target } => (
            InodeKind::Symlink,
            layout::S_IFLNK,
            target.len() as u64,
            (0, 0),
        ),
        NodeKind::CharDevice { major, minor } => {
            (InodeKind::CharDevice, layout::S_IFCHR, 0, (*major, *minor))
        }
        NodeKind::BlockDevice { major, minor } => {
            (InodeKind::BlockDevice, layout::S_IFBLK, 0, (*major, *minor))
        }
        NodeKind::Fifo => (InodeKind::Fifo, layout::S_IFIFO, 0, (0, 0)),
        NodeKind::Socket => (InodeKind::Socket, layout::S_IFSOCK, 0, (0, 0)),
    };
    assert_eq!(got.ino, ino);
    assert_eq!(got.kind, kind, "node {}", id.0);
    assert_eq!(got.mode, type_bits | node.meta.perm);
    assert_eq!((got.uid, got.gid), (node.meta.uid, node.meta.gid));
    assert_eq!(
        (got.mtime_sec, got.mtime_nsec),
        (node.meta.mtime_sec, node.meta.mtime_nsec)
    );
    assert_eq!(got.size, size);
    assert_eq!((got.rdev_major, got.rdev_minor), rdev);
    assert_eq!(got.nlink, links[&id], "nlink of node {}", id.0);

    let names = b.xattr_names(ino).unwrap();
    let want: Vec<&[u8]> = node.meta.xattrs.keys().map(Vec::as_slice).collect();
    assert_eq!(names, want);
    for (name, value) in &node.meta.xattrs {
        assert_eq!(b.xattr(ino, name).unwrap(), Some(value.as_slice()));
    }
    assert_eq!(b.xattr(ino, b"user.\xffabsent").unwrap(), None);

    match &node.kind {
        NodeKind::File { chunks, .. } => {
            assert_eq!(b.file_chunk_count(ino).unwrap() as usize, chunks.len());
            for (i, c) in chunks.iter().enumerate() {
                assert_eq!(b.file_chunk(ino, i as u32).unwrap(), *c);
                assert_eq!(b.chunk(*c).unwrap(), image.chunks[c.0 as usize]);
            }
            assert!(matches!(
                b.file_chunk(ino, chunks.len() as u32),
                Err(FormatError::OutOfRange(_))
            ));
            assert!(matches!(b.dir_len(ino), Err(FormatError::WrongKind { .. })));
        }
        NodeKind::Symlink { target } => {
            assert_eq!(b.symlink_target(ino).unwrap(), target.as_slice());
        }
        NodeKind::Dir { .. } => {
            assert!(matches!(
                b.symlink_target(ino),
                Err(FormatError::WrongKind { .. })
            ));
            assert!(matches!(
                b.file_chunk_count(ino),
                Err(FormatError::WrongKind { .. })
            ));
        }
        _ => assert!(matches!(
            b.lookup(ino, b"x"),
            Err(FormatError::WrongKind { .. })
        )),
    }
}

/// Walks the tree by path and compares every entry with the bootstrap,
/// recording which inode each node got.
fn check_dir(
    b: &Bootstrap,
    image: &Image,
    dir: NodeId,
    dir_ino: Ino,
    links: &HashMap<NodeId, u32>,
    seen: &mut HashMap<NodeId, Ino>,
) {
    check_node(b, image, dir, dir_ino, links);
    let ents = entries(&image.tree, dir);
    assert_eq!(b.dir_len(dir_ino).unwrap() as usize, ents.len());
    for (i, (name, &child)) in ents.iter().enumerate() {
        let entry = b.dir_entry(dir_ino, i as u32).unwrap().unwrap();
        assert_eq!(entry.name, name.as_slice());
        let found = b
            .lookup(dir_ino, name)
            .unwrap()
            .expect("entry found by lookup");
        assert_eq!(found.ino, entry.ino);
        // Hardlinks: every entry naming a node yields the same inode.
        let first = *seen.entry(child).or_insert(entry.ino);
        assert_eq!(first, entry.ino, "node {} got two inodes", child.0);
        if matches!(image.tree.node(child).kind, NodeKind::Dir { .. }) {
            assert_eq!(b.parent(entry.ino).unwrap(), dir_ino);
            check_dir(b, image, child, entry.ino, links, seen);
        } else {
            check_node(b, image, child, entry.ino, links);
        }
    }
    assert_eq!(b.dir_entry(dir_ino, ents.len() as u32).unwrap(), None);
    let mut absent = ents.keys().next_back().cloned().unwrap_or_default();
    absent.push(0xff);
    assert_eq!(b.lookup(dir_ino, &absent).unwrap(), None);
}

fn check_image(image: &Image) {
    let bytes = image.write();
    assert_eq!(bytes, image.write(), "writing is deterministic");
    let b = Bootstrap::from_bytes(bytes).unwrap();
    b.verify_all().unwrap();
    assert_eq!(b.chunk_size(), image.chunk_size);

    let links = expected_links(&image.tree);
    let numbering = expected_numbering(&image.tree);
    assert_eq!(b.inode_count(), numbering.len() as u64);
    let mut seen = HashMap::from([(ImageTree::ROOT, Ino::ROOT)]);
    assert_eq!(b.parent(Ino::ROOT).unwrap(), Ino::ROOT);
    check_dir(&b, image, ImageTree::ROOT, Ino::ROOT, &links, &mut seen);
    assert_eq!(seen, numbering, "inodes are numbered breadth-first");
    let distinct: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "distinct nodes get distinct inodes"
    );

    assert_eq!(b.chunk_count() as usize, image.chunks.len());
    assert_eq!(b.blob_count() as usize, image.blobs.len());
    for (i, info) in image.blobs.iter().enumerate() {
        let blob = b.blob(BlobIndex(i as u32)).unwrap();
        assert_eq!(
            (blob.digest, blob.compressed_size),
            (info.digest, info.compressed_size)
        );
        let mine: Vec<_> = (0..image.chunks.len())
            .filter(|&c| image.chunks[c].blob.0 as usize == i)
            .collect();
        assert_eq!(blob.chunk_count as usize, mine.len());
        if let Some(&first) = mine.first() {
            assert_eq!(blob.first_chunk, ChunkIndex(first as u32));
        }
        let sum: u64 = mine
            .iter()
            .map(|&c| u64::from(image.chunks[c].uncompressed_size))
            .sum();
        assert_eq!(blob.uncompressed_size, sum);
    }
    assert!(matches!(
        b.blob(BlobIndex(image.blobs.len() as u32)),
        Err(FormatError::OutOfRange(_))
    ));
    assert!(matches!(
        b.chunk(ChunkIndex(image.chunks.len() as u32)),
        Err(FormatError::OutOfRange(_))
    ));

    let mut want_prefetch = Vec::new();
    for span in &image.prefetch {
        if let Some(&ino) = numbering.get(&span.node) {
            let want = PrefetchRange {
                ino,
                chunks: span.chunks.clone(),
            };
            if !want_prefetch.contains(&want) {
                want_prefetch.push(want);
            }
        }
    }
    assert_eq!(b.prefetch_list().unwrap(), want_prefetch);
    assert!(matches!(
        b.inode(Ino(b.inode_count() + 1)),
        Err(FormatError::NoSuchInode(_))
    ));
    assert!(matches!(b.inode(Ino(0)), Err(FormatError::NoSuchInode(0))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_trees_round_trip(image in arb_image()) {
        check_image(&image);
    }
}

#[test]
fn small_image_round_trips_through_a_file() {
    let image = small_image();
    check_image(&image);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap");
    std::fs::write(&path, image.write()).unwrap();
    let b = Bootstrap::open(&path).unwrap();
    b.verify_all().unwrap();
    let etc = b.lookup(Ino::ROOT, b"etc").unwrap().unwrap();
    let passwd = b.lookup(etc.ino, b"passwd").unwrap().unwrap();
    let tmp = b.lookup(Ino::ROOT, b"tmp").unwrap().unwrap();
    let passwd2 = b.lookup(tmp.ino, b"passwd2").unwrap().unwrap();
    assert_eq!(passwd.ino, passwd2.ino);
    assert_eq!(passwd.nlink, 2);
    assert_eq!(passwd.mode, layout::S_IFREG | 0o4755);
    assert_eq!(tmp.mode, layout::S_IFDIR | 0o1777);
    assert_eq!(b.checksum(), layout::compute_checksum(&image.write()));

    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        Bootstrap::open(&empty),
        Err(FormatError::Truncated(_))
    ));
    assert!(matches!(
        Bootstrap::open(&dir.path().join("missing")),
        Err(FormatError::Io { .. })
    ));
}

/// `image` with `f` applied, expected to be refused by the writer.
fn refused(f: impl FnOnce(&mut Image)) -> FormatError {
    let mut image = small_image();
    f(&mut image);
    write_bootstrap(
        &image.tree,
        image.chunk_size,
        &image.blobs,
        &image.chunks,
        &image.prefetch,
    )
    .expect_err("writer must refuse")
}

fn node_named(image: &Image, dir: NodeId, name: &[u8]) -> NodeId {
    entries(&image.tree, dir)[name]
}

/// Applies `f` to the chunk list and size of /etc/passwd of the small image.
fn edit_passwd(i: &mut Image, f: impl FnOnce(&mut Vec<ChunkIndex>, &mut u64)) {
    let etc = node_named(i, ImageTree::ROOT, b"etc");
    let passwd = node_named(i, etc, b"passwd");
    if let NodeKind::File { size, chunks } = &mut i.tree.node_mut(passwd).kind {
        f(chunks, size);
    }
}

#[test]
fn writer_refuses_inconsistent_input() {
    assert!(matches!(
        refused(|i| i.chunk_size = 65535),
        FormatError::InvalidChunkSize(65535)
    ));
    let invalid = |f: &dyn Fn(&mut Image), what: &str| match refused(f) {
        FormatError::Invalid(msg) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected Invalid, got {other:?}"),
    };
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'n'; 256]] {
        invalid(
            &|i| {
                let f = i.tree.add(file_node(Meta::default(), 0));
                insert_entry(&mut i.tree, ImageTree::ROOT, bad.to_vec(), f);
            },
            "bad name",
        );
    }
    invalid(
        &|i| {
            let etc = node_named(i, ImageTree::ROOT, b"etc");
            insert_entry(&mut i.tree, ImageTree::ROOT, b"etc2".to_vec(), etc);
        },
        "directory reachable twice",
    );
    invalid(
        &|i| {
            insert_entry(
                &mut i.tree,
                ImageTree::ROOT,
                b"me".to_vec(),
                ImageTree::ROOT,
            )
        },
        "root reachable from itself",
    );
    invalid(
        &|i| {
            insert_entry(
                &mut i.tree,
                ImageTree::ROOT,
                b"ghost".to_vec(),
                NodeId(9999),
            )
        },
        "entry naming no node",
    );
    invalid(
        &|i| i.tree.node_mut(ImageTree::ROOT).meta.perm = 0o10000,
        "perm",
    );
    invalid(
        &|i| i.tree.node_mut(ImageTree::ROOT).meta.mtime_nsec = 1_000_000_000,
        "nsec",
    );
    invalid(
        &|i| {
            i.tree
                .node_mut(ImageTree::ROOT)
                .meta
                .xattrs
                .insert(Vec::new(), Vec::new());
        },
        "empty xattr name",
    );
    invalid(
        &|i| {
            let link = node_named(i, ImageTree::ROOT, b"link");
            i.tree.node_mut(link).kind = NodeKind::Symlink { target: Vec::new() };
        },
        "empty symlink",
    );
    invalid(
        &|i| edit_passwd(i, |_, size| *size += 1),
        "size not matching the chunks",
    );
    invalid(&|i| edit_passwd(i, |c, _| c.truncate(1)), "too few chunks");
    invalid(
        &|i| edit_passwd(i, |c, _| c[0] = ChunkIndex(9999)),
        "chunk out of range",
    );
    invalid(
        &|i| edit_passwd(i, |c, _| c.swap(0, 1)),
        "chunks in the wrong order",
    );
    invalid(&|i| i.chunks[0].blob = BlobIndex(99), "blob out of range");
    invalid(
        &|i| {
            let last = i.chunks.len() - 1;
            i.chunks.swap(0, last);
        },
        "chunk table not grouped/sorted",
    );
    invalid(
        &|i| i.chunks[0].uncompressed_offset += 1,
        "uncompressed offsets",
    );
    invalid(
        &|i| {
            let b = i.chunks[0].blob.0 as usize;
            i.blobs[b].compressed_size = 0;
        },
        "chunk outside its blob",
    );
    invalid(
        &|i| {
            i.chunks[0].compressed = false;
            i.chunks[0].compressed_size = i.chunks[0].uncompressed_size + 1;
        },
        "raw chunk with a different stored size",
    );
    let span = |node, chunks| PrefetchSpan { node, chunks };
    invalid(
        &|i| i.prefetch.push(span(ImageTree::ROOT, 0..1)),
        "prefetching a directory",
    );
    invalid(
        &|i| i.prefetch.push(span(NodeId(9999), 0..1)),
        "prefetching no node",
    );
    invalid(
        &|i| i.prefetch.push(span(i.prefetch[0].node, 0..0)),
        "prefetching no chunk",
    );
    invalid(
        &|i| i.prefetch.push(span(i.prefetch[0].node, 1..99)),
        "prefetching chunks past the file's end",
    );
}

#[test]
fn writer_refuses_chunks_out_of_blob_order() {
    let chunk = |blob| ChunkRecord {
        digest: ChunkHash::WRITTEN.digest(&[blob as u8]),
        blob: BlobIndex(blob),
        compressed_offset: 0,
        compressed_size: 10,
        uncompressed_offset: 0,
        uncompressed_size: 10,
        compressed: false,
    };
    let blob = |n: u8| BlobInfo {
        digest: crate::Digest::of(&[n]),
        compressed_size: 10,
    };
    let tree = ImageTree::new(Meta::default());
    let blobs = [blob(0), blob(1)];
    let ok = write_bootstrap(&tree, CS, &blobs, &[chunk(0), chunk(1)], &[]).unwrap();
    Bootstrap::from_bytes(ok).unwrap().verify_all().unwrap();
    let err = write_bootstrap(&tree, CS, &blobs, &[chunk(1), chunk(0)], &[]).unwrap_err();
    assert!(
        matches!(&err, FormatError::Invalid(m) if m.contains("grouped")),
        "{err:?}"
    );
    let mut overlapping = chunk(0);
    overlapping.compressed_offset = 5;
    overlapping.uncompressed_offset = 10;
    let blobs = [BlobInfo {
        compressed_size: 20,
        ..blob(0)
    }];
    let err = write_bootstrap(&tree, CS, &blobs, &[chunk(0), overlapping], &[]).unwrap_err();
    assert!(
        matches!(&err, FormatError::Invalid(m) if m.contains("overlaps")),
        "{err:?}"
    );
}

#[test]
fn writer_drops_unreachable_nodes_and_repeated_prefetch() {
    let mut image = small_image();
    let before = Bootstrap::from_bytes(image.write()).unwrap().inode_count();
    let orphan = image.tree.add(dir_node(Meta::default()));
    let listed = image.prefetch[0].clone();
    let inner = image.tree.add(image.tree.node(listed.node).clone());
    insert_entry(&mut image.tree, orphan, b"x".to_vec(), inner);
    let unreachable = PrefetchSpan {
        node: inner,
        ..listed.clone()
    };
    image.prefetch = vec![unreachable, listed.clone(), listed];
    let b = Bootstrap::from_bytes(image.write()).unwrap();
    assert_eq!(b.inode_count(), before);
    assert_eq!(b.prefetch_list().unwrap().len(), 1);
    b.verify_all().unwrap();
}

/// A tree of `dirs` directories of `per_dir` single-chunk files each.
fn wide_image(dirs: usize, per_dir: usize) -> Image {
    let mut tree = ImageTree::new(Meta::default());
    let mut planner = ChunkPlanner::new(4, 1);
    for d in 0..dirs {
        let dir = tree.add(dir_node(Meta::default()));
        insert_entry(
            &mut tree,
            ImageTree::ROOT,
            format!("d{d:04}").into_bytes(),
            dir,
        );
        for f in 0..per_dir {
            let size = 1 + (d * per_dir + f) as u64 % 5000;
            let meta = Meta {
                perm: 0o644,
                ..Meta::default()
            };
            let file = tree.add(Node {
                meta,
                kind: NodeKind::File {
                    size,
                    chunks: Vec::new(),
                },
            });
            planner.add_file(file, size);
            insert_entry(
                &mut tree,
                dir,
                format!("file-{f:05}.txt").into_bytes(),
                file,
            );
        }
    }
    let (blobs, chunks) = planner.finish(&mut tree);
    Image {
        tree,
        chunk_size: CS,
        blobs,
        chunks,
        prefetch: Vec::new(),
    }
}

/// Opening a 100k-file bootstrap and resolving a path must stay well within
/// what a mount may take. The limit is asserted only in optimised builds:
/// a debug build runs crc32 and the page walk unoptimised, many times slower,
/// which says nothing about the shipped binary.
#[test]
fn open_and_first_lookup_of_100k_files_is_fast() {
    let image = wide_image(100, 1000);
    let bytes = image.write();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap");
    std::fs::write(&path, &bytes).unwrap();

    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let b = Bootstrap::open(&path).unwrap();
        let d = b.lookup(Ino::ROOT, b"d0057").unwrap().unwrap();
        let f = b.lookup(d.ino, b"file-00731.txt").unwrap().unwrap();
        times.push(start.elapsed());
        assert_eq!(f.kind, InodeKind::File);
        assert_eq!(b.inode_count(), 1 + 100 + 100_000);
    }
    let worst = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "100k files: bootstrap {} bytes, open + 2 lookups took {times:?}",
        bytes.len()
    );
    if !cfg!(debug_assertions) {
        assert!(worst < Duration::from_millis(50), "took {worst:?}");
    }
}

#[test]
fn deterministic_numbering_ignores_node_order() {
    // The same filesystem built with nodes added in a different order gives
    // byte-identical bootstraps.
    let build = |reverse: bool| {
        let mut tree = ImageTree::new(Meta::default());
        let names: Vec<&[u8]> = vec![b"b", b"a", b"c"];
        let mut order: Vec<_> = names.iter().collect();
        if reverse {
            order.reverse();
        }
        let mut ids = BTreeMap::new();
        for n in order {
            ids.insert(n.to_vec(), tree.add(dir_node(Meta::default())));
        }
        for (n, id) in ids {
            insert_entry(&mut tree, ImageTree::ROOT, n, id);
        }
        write_bootstrap(&tree, CS, &[], &[], &[]).unwrap()
    };
    assert_eq!(build(false), build(true));
}

#[test]
fn the_header_names_the_one_chunk_hash_of_a_bootstrap() {
    let data = b"the bytes of a chunk";
    let len = data.len() as u32;
    let chunk = |hash: ChunkHash, at: u64| ChunkRecord {
        digest: hash.digest(data),
        blob: BlobIndex(0),
        compressed_offset: at,
        compressed_size: len,
        uncompressed_offset: at,
        uncompressed_size: len,
        compressed: false,
    };
    let blobs = |count: u64| {
        [BlobInfo {
            digest: crate::Digest::of(b"blob"),
            compressed_size: count * u64::from(len),
        }]
    };
    let tree = ImageTree::new(Meta::default());
    for hash in [ChunkHash::Sha256, ChunkHash::Blake3] {
        let bytes = write_bootstrap(&tree, CS, &blobs(1), &[chunk(hash, 0)], &[]).unwrap();
        let flags = u32::from_le_bytes(bytes[layout::FLAGS_OFFSET..][..4].try_into().unwrap());
        assert_eq!(
            flags & layout::FLAG_BLAKE3_CHUNKS != 0,
            hash == ChunkHash::Blake3,
            "{hash:?}: flags {flags:#x}"
        );
        let b = Bootstrap::from_bytes(bytes).unwrap();
        assert_eq!(b.chunk(ChunkIndex(0)).unwrap().digest, hash.digest(data));
    }
    let mixed = [
        chunk(ChunkHash::Blake3, 0),
        chunk(ChunkHash::Sha256, len.into()),
    ];
    let err = write_bootstrap(&tree, CS, &blobs(2), &mixed, &[]).unwrap_err();
    assert!(
        matches!(&err, FormatError::Invalid(m) if m.contains("one chunk hash")),
        "{err:?}"
    );
}
