//! Chunking, compression choice, dedup and the chunk table's layout.

use lode_common::format::{BlobIndex, NodeKind, PrefetchSpan};
use lode_common::Digest;
use lode_tests::{pseudo_random_bytes, TarEntry};

use super::test_support::{convert, convert_layers, layer, Converted, CS};

fn chunk_count(c: &Converted, path: &str) -> usize {
    match &c.node(path).kind {
        NodeKind::File { chunks, .. } => chunks.len(),
        other => panic!("{path} is not a file: {other:?}"),
    }
}

fn chunks_of(c: &Converted, path: &str) -> Vec<u32> {
    match &c.node(path).kind {
        NodeKind::File { chunks, .. } => chunks.iter().map(|i| i.0).collect(),
        other => panic!("{path} is not a file: {other:?}"),
    }
}

#[test]
fn identical_files_in_two_layers_are_stored_once() {
    let data = pseudo_random_bytes(1, 0, 3 * CS as usize + 17);
    let c = convert(vec![
        vec![TarEntry::file("a", data.clone())],
        vec![
            TarEntry::file("b", data.clone()),
            TarEntry::file("c", data.clone()),
        ],
    ])
    .unwrap();
    assert_eq!(chunks_of(&c, "a"), chunks_of(&c, "b"));
    assert_eq!(chunks_of(&c, "a"), chunks_of(&c, "c"));
    assert_eq!(c.conv.store.records().len(), 4);
    assert!(c.blobs[1].is_none(), "layer 2 stores nothing new");
    assert_eq!(c.conv.store.blobs().len(), 1);
    assert_eq!(c.stats[1].chunks.chunks, 8);
    assert_eq!(c.stats[1].chunks.new_chunks, 0);
    assert_eq!(c.content("c"), data);
}

#[test]
fn a_later_layer_points_at_chunks_of_an_earlier_blob() {
    let shared = pseudo_random_bytes(2, 0, CS as usize);
    let mut mixed = shared.clone();
    mixed.extend(pseudo_random_bytes(3, 0, 100));
    let c = convert(vec![
        vec![TarEntry::file("shared", shared)],
        vec![TarEntry::file("mixed", mixed.clone())],
    ])
    .unwrap();
    let records = c.conv.store.records();
    let mixed_chunks = chunks_of(&c, "mixed");
    assert_eq!(records[mixed_chunks[0] as usize].blob, BlobIndex(0));
    assert_eq!(records[mixed_chunks[1] as usize].blob, BlobIndex(1));
    assert_eq!(c.content("mixed"), mixed);
}

#[test]
fn repeated_chunks_inside_one_file_are_stored_once() {
    let block = pseudo_random_bytes(4, 0, CS as usize);
    let data = [block.clone(), block.clone(), block].concat();
    let c = convert(vec![vec![TarEntry::file("f", data.clone())]]).unwrap();
    let chunks = chunks_of(&c, "f");
    assert_eq!(chunks, vec![chunks[0]; 3]);
    assert_eq!(c.conv.store.records().len(), 1);
    assert_eq!(c.content("f"), data);
}

#[test]
fn incompressible_chunks_are_stored_raw_and_compressible_ones_as_zstd() {
    let c = convert(vec![vec![
        TarEntry::file("random", pseudo_random_bytes(5, 0, 1000)),
        TarEntry::file("zeros", vec![0u8; 1000]),
    ]])
    .unwrap();
    let records = c.conv.store.records();
    let random = records[chunks_of(&c, "random")[0] as usize];
    assert!(!random.compressed);
    assert_eq!(random.compressed_size, random.uncompressed_size);
    let zeros = records[chunks_of(&c, "zeros")[0] as usize];
    assert!(zeros.compressed);
    assert!(zeros.compressed_size < 100, "{zeros:?}");
    assert_eq!(c.content("random"), pseudo_random_bytes(5, 0, 1000));
    assert_eq!(c.content("zeros"), vec![0u8; 1000]);
}

#[test]
fn chunk_boundaries_follow_the_chunk_size() {
    let cs = CS as usize;
    let sizes = [0, 1, cs - 1, cs, cs + 1, 3 * cs];
    let entries = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            TarEntry::file(
                format!("f{size}"),
                pseudo_random_bytes(10 + i as u64, 0, size),
            )
        })
        .collect();
    let c = convert(vec![entries]).unwrap();
    let records = c.conv.store.records();
    for (i, &size) in sizes.iter().enumerate() {
        let path = format!("f{size}");
        assert_eq!(chunk_count(&c, &path), size.div_ceil(cs), "{path}");
        let lens: Vec<usize> = chunks_of(&c, &path)
            .iter()
            .map(|&i| records[i as usize].uncompressed_size as usize)
            .collect();
        let mut expected = vec![cs; size / cs];
        if size % cs != 0 {
            expected.push(size % cs);
        }
        assert_eq!(lens, expected, "{path}");
        assert_eq!(
            c.content(&path),
            pseudo_random_bytes(10 + i as u64, 0, size)
        );
    }
}

#[test]
fn chunk_table_is_grouped_by_blob_with_running_offsets() {
    let c = convert(vec![
        vec![
            TarEntry::file("a", pseudo_random_bytes(20, 0, 2 * CS as usize + 5)),
            TarEntry::file("z", vec![1u8; 3 * CS as usize]),
        ],
        vec![],
        vec![TarEntry::file(
            "b",
            pseudo_random_bytes(21, 0, CS as usize + 9),
        )],
    ])
    .unwrap();
    assert!(c.blobs[1].is_none(), "an empty layer gets no blob");
    let store = &c.conv.store;
    assert_eq!(store.blobs().len(), 2);
    for (b, blob) in store.blobs().iter().enumerate() {
        let records: Vec<_> = store
            .records()
            .iter()
            .filter(|r| r.blob == BlobIndex(b as u32))
            .collect();
        let (mut compressed, mut uncompressed) = (0u64, 0u64);
        for r in &records {
            assert_eq!(r.compressed_offset, compressed, "{r:?}");
            assert_eq!(r.uncompressed_offset, uncompressed, "{r:?}");
            compressed += u64::from(r.compressed_size);
            uncompressed += u64::from(r.uncompressed_size);
        }
        assert_eq!(compressed, blob.compressed_size);
        let file = c.blobs.iter().flatten().nth(b).unwrap();
        let bytes = std::fs::read(&file.path).unwrap();
        assert_eq!(bytes.len() as u64, blob.compressed_size);
        assert_eq!(Digest::of(&bytes), blob.digest);
        assert_eq!(file.digest, blob.digest);
    }
    let blob_order: Vec<u32> = store.records().iter().map(|r| r.blob.0).collect();
    assert!(
        blob_order.windows(2).all(|w| w[0] <= w[1]),
        "{blob_order:?}"
    );
    assert_eq!(store.records().last().unwrap().blob, BlobIndex(1));
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let layers = || {
        vec![layer(
            (0..40)
                .map(|i| {
                    TarEntry::file(
                        format!("f{i}"),
                        pseudo_random_bytes(i % 7, 0, 30_000 + i as usize * 1000),
                    )
                })
                .collect(),
        )]
    };
    let one = convert_layers(layers(), CS, 1).unwrap();
    let four = convert_layers(layers(), CS, 4).unwrap();
    assert_eq!(one.conv.store.records(), four.conv.store.records());
    assert_eq!(one.conv.store.blobs(), four.conv.store.blobs());
    assert_eq!(
        one.conv.bootstrap(&[]).unwrap(),
        four.conv.bootstrap(&[]).unwrap()
    );
}

#[test]
fn large_chunk_sizes_work() {
    let cs = 1 << 20;
    let data = pseudo_random_bytes(30, 0, cs + 1);
    let c = convert_layers(
        vec![layer(vec![TarEntry::file("f", data.clone())])],
        cs as u32,
        2,
    )
    .unwrap();
    assert_eq!(chunk_count(&c, "f"), 2);
    assert_eq!(c.content("f"), data);
}

#[test]
fn prefetched_files_move_to_the_front_of_their_blobs_in_list_order() {
    let file = |seed: u64, chunks: usize| pseudo_random_bytes(seed, 0, chunks * CS as usize - 9);
    let (a, b, c, d, e) = (file(1, 2), file(2, 3), file(3, 2), file(4, 2), file(5, 1));
    let mut shares_a = a[..CS as usize].to_vec();
    shares_a.extend(file(6, 1));
    let mut conv = convert(vec![
        vec![
            TarEntry::file("a", a.clone()),
            TarEntry::file("b", b.clone()),
            TarEntry::file("c", c.clone()),
        ],
        vec![
            TarEntry::file("d", d.clone()),
            TarEntry::file("e", e.clone()),
            TarEntry::file("f", shares_a.clone()),
        ],
    ])
    .unwrap();
    let list: Vec<_> = ["c", "e", "a", "f"]
        .iter()
        .map(|p| PrefetchSpan {
            node: conv.id(p).unwrap(),
            chunks: 0..chunk_count(&conv, p) as u32,
        })
        .collect();
    let before: Vec<Digest> = conv.conv.store.blobs().iter().map(|b| b.digest).collect();
    let mut blobs: Vec<_> = conv.blobs.iter().flatten().cloned().collect();
    let converter = &mut conv.conv;
    converter
        .store
        .front_load(converter.tree.tree_mut(), &list, &mut blobs)
        .unwrap();
    conv.blobs = blobs.into_iter().map(Some).collect();

    // Offsets in the blobs follow the list: c, then a, then b in blob 0;
    // e, then f's own chunk, then d in blob 1.
    let records = conv.conv.store.records().to_vec();
    let offsets = |path: &str| -> Vec<(u32, u64)> {
        chunks_of(&conv, path)
            .iter()
            .map(|&i| {
                (
                    records[i as usize].blob.0,
                    records[i as usize].compressed_offset,
                )
            })
            .collect()
    };
    let order = |blob: u32| -> Vec<&str> {
        let mut files: Vec<(u64, &str)> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .flat_map(|p| {
                offsets(p)
                    .into_iter()
                    .filter(move |(b, _)| *b == blob)
                    .map(move |(_, o)| (o, *p))
            })
            .collect();
        files.sort();
        files.dedup_by_key(|(o, _)| *o);
        let mut names: Vec<&str> = files.into_iter().map(|(_, p)| p).collect();
        names.dedup();
        names
    };
    assert_eq!(order(0), ["c", "a", "b"]);
    assert_eq!(order(1), ["e", "f", "d"]);
    assert_eq!(offsets("c")[0].1, 0);
    assert_eq!(offsets("e")[0].1, 0);
    let after: Vec<Digest> = conv.conv.store.blobs().iter().map(|b| b.digest).collect();
    assert!(before[0] != after[0] && before[1] != after[1]);
    // Each blob's front ends where its first unlisted chunk (b's, d's) starts.
    let fronts: Vec<u64> = conv
        .blobs
        .iter()
        .flatten()
        .map(|b| b.prefetch_front)
        .collect();
    assert_eq!(fronts, [offsets("b")[0].1, offsets("d")[0].1]);
    for (path, data) in [
        ("a", &a),
        ("b", &b),
        ("c", &c),
        ("d", &d),
        ("e", &e),
        ("f", &shares_a),
    ] {
        assert_eq!(&conv.content(path), data, "{path}");
    }
    let bytes = conv.conv.bootstrap(&list).unwrap();
    lode_common::format::Bootstrap::from_bytes(bytes)
        .unwrap()
        .verify_all()
        .unwrap();
}
