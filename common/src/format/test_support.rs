//! Builders and proptest strategies for format tests: random image trees with
//! every entry kind and a chunk table that satisfies the writer's rules.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::rules::chunk_len_at;
use super::{
    write_bootstrap, BlobIndex, BlobInfo, ChunkHash, ChunkIndex, ChunkRecord, ImageTree, Meta,
    Node, NodeId, NodeKind, PrefetchSpan, MIN_CHUNK_SIZE,
};
use crate::Digest;

pub(super) const CS: u32 = MIN_CHUNK_SIZE;

/// Everything `write_bootstrap` takes.
#[derive(Clone, Debug)]
pub(super) struct Image {
    pub tree: ImageTree,
    pub chunk_size: u32,
    pub blobs: Vec<BlobInfo>,
    pub chunks: Vec<ChunkRecord>,
    pub prefetch: Vec<PrefetchSpan>,
}

impl Image {
    pub fn write(&self) -> Vec<u8> {
        write_bootstrap(
            &self.tree,
            self.chunk_size,
            &self.blobs,
            &self.chunks,
            &self.prefetch,
        )
        .expect("valid image must serialise")
    }
}

/// Accumulates chunks per blob and lays out the chunk table at the end, so
/// that tests can add files in any order and still get a valid table.
pub(super) struct ChunkPlanner {
    /// Per blob: (uncompressed len, stored len, zstd, gap before it).
    per_blob: Vec<Vec<(u32, u32, bool, u64)>>,
    /// Files whose chunk lists hold (blob, position) pairs until `finish`.
    files: Vec<(NodeId, Vec<(usize, usize)>)>,
    /// Existing chunks by length, to share identical chunks between files.
    by_len: HashMap<u32, (usize, usize)>,
    seed: u64,
    /// The chunk hash, one per image: both are read.
    hash: ChunkHash,
}

impl ChunkPlanner {
    pub fn new(blobs: usize, seed: u64) -> Self {
        Self {
            per_blob: vec![Vec::new(); blobs.max(1)],
            files: Vec::new(),
            by_len: HashMap::new(),
            seed: seed | 1,
            hash: if seed & 2 == 0 {
                ChunkHash::Blake3
            } else {
                ChunkHash::Sha256
            },
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift: deterministic choices without more proptest dimensions.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    /// Plans the chunks of file `id` of `size` bytes.
    pub fn add_file(&mut self, id: NodeId, size: u64) {
        let mut list = Vec::new();
        let mut index = 0;
        while let Some(len) = chunk_len_at(size, CS, index) {
            let len = len as u32;
            let r = self.next();
            let reuse = self
                .by_len
                .get(&len)
                .copied()
                .filter(|_| r.is_multiple_of(3));
            let at = reuse.unwrap_or_else(|| {
                let blob = (r >> 8) as usize % self.per_blob.len();
                let zstd = r & 16 != 0;
                let stored = if zstd {
                    1 + (r >> 20) as u32 % len
                } else {
                    len
                };
                let gap = (r >> 40) % 4;
                self.per_blob[blob].push((len, stored, zstd, gap));
                let at = (blob, self.per_blob[blob].len() - 1);
                self.by_len.insert(len, at);
                at
            });
            list.push(at);
            index += 1;
        }
        self.files.push((id, list));
    }

    /// Builds the chunk and blob tables and fills in the planned files' chunk lists.
    pub fn finish(self, tree: &mut ImageTree) -> (Vec<BlobInfo>, Vec<ChunkRecord>) {
        let mut blobs = Vec::new();
        let mut chunks = Vec::new();
        let mut first = Vec::new();
        for (b, planned) in self.per_blob.iter().enumerate() {
            first.push(chunks.len());
            let (mut stored_at, mut plain_at) = (0u64, 0u64);
            for (i, &(len, stored, zstd, gap)) in planned.iter().enumerate() {
                stored_at += gap;
                chunks.push(ChunkRecord {
                    digest: self.hash.digest(format!("chunk {b}/{i}").as_bytes()),
                    blob: BlobIndex(b as u32),
                    compressed_offset: stored_at,
                    compressed_size: stored,
                    uncompressed_offset: plain_at,
                    uncompressed_size: len,
                    compressed: zstd,
                });
                stored_at += u64::from(stored);
                plain_at += u64::from(len);
            }
            blobs.push(BlobInfo {
                digest: Digest::of(format!("blob {b}").as_bytes()),
                compressed_size: stored_at + (b as u64 % 2) * 7,
            });
        }
        for (id, list) in self.files {
            if let NodeKind::File { chunks: c, .. } = &mut tree.node_mut(id).kind {
                *c = list
                    .iter()
                    .map(|&(b, i)| ChunkIndex((first[b] + i) as u32))
                    .collect();
            }
        }
        (blobs, chunks)
    }
}

/// What one random step adds to the tree.
#[derive(Clone, Debug)]
pub(super) enum Op {
    Dir(usize, Vec<u8>, Meta),
    File(usize, Vec<u8>, Meta, u64),
    Symlink(usize, Vec<u8>, Meta, Vec<u8>),
    Device(usize, Vec<u8>, Meta, bool, u32, u32),
    Fifo(usize, Vec<u8>, Meta),
    Socket(usize, Vec<u8>, Meta),
    Hardlink(usize, Vec<u8>, usize),
    /// A file or a directory holding a file that no entry names.
    Orphan(bool),
}

pub(super) fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z]{1,6}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 1..12),
    ]
    .prop_map(|mut n| {
        for b in &mut n {
            if *b == b'/' || *b == 0 {
                *b = b'_';
            }
        }
        if n == b"." || n == b".." {
            n.push(b'x');
        }
        n
    })
}

pub(super) fn arb_meta() -> impl Strategy<Value = Meta> {
    (
        0u32..=0o7777,
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
        prop::collection::btree_map(
            prop::collection::vec(1u8..=255, 1..16),
            prop::collection::vec(any::<u8>(), 0..24),
            0..3,
        ),
    )
        .prop_map(|(perm, uid, gid, mtime_sec, mtime_nsec, xattrs)| Meta {
            perm,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            xattrs,
        })
}

fn arb_size() -> impl Strategy<Value = u64> {
    let cs = u64::from(CS);
    prop_oneof![Just(0u64), 1u64..2000, cs - 1..cs + 2, 1u64..3 * cs + 500,]
}

pub(super) fn arb_op() -> impl Strategy<Value = Op> {
    let at = || (any::<usize>(), arb_name(), arb_meta());
    prop_oneof![
        3 => at().prop_map(|(p, n, m)| Op::Dir(p, n, m)),
        4 => (at(), arb_size()).prop_map(|((p, n, m), s)| Op::File(p, n, m, s)),
        1 => (at(), prop::collection::vec(1u8..=255, 1..40))
            .prop_map(|((p, n, m), t)| Op::Symlink(p, n, m, t)),
        1 => (at(), any::<bool>(), any::<u32>(), any::<u32>())
            .prop_map(|((p, n, m), c, ma, mi)| Op::Device(p, n, m, c, ma, mi)),
        1 => at().prop_map(|(p, n, m)| Op::Fifo(p, n, m)),
        1 => at().prop_map(|(p, n, m)| Op::Socket(p, n, m)),
        2 => (any::<usize>(), arb_name(), any::<usize>())
            .prop_map(|(p, n, t)| Op::Hardlink(p, n, t)),
        1 => any::<bool>().prop_map(Op::Orphan),
    ]
}

/// A random valid image: tree, chunk table and prefetch list.
pub(super) fn arb_image() -> impl Strategy<Value = Image> {
    (
        arb_meta(),
        prop::collection::vec(arb_op(), 0..60),
        1usize..4,
        any::<u64>(),
        prop::collection::vec(any::<usize>(), 0..6),
    )
        .prop_map(|(root, ops, blobs, seed, prefetch)| build(root, &ops, blobs, seed, &prefetch))
}

/// Applies `ops` to a fresh tree (entries whose name is taken are skipped).
pub(super) fn build(root: Meta, ops: &[Op], blobs: usize, seed: u64, prefetch: &[usize]) -> Image {
    let mut tree = ImageTree::new(root);
    let mut planner = ChunkPlanner::new(blobs, seed);
    let mut dirs = vec![ImageTree::ROOT];
    let mut non_dirs = Vec::new();
    let mut files = Vec::new();
    for op in ops {
        let (parent, name, node) = match op.clone() {
            Op::Dir(p, n, meta) => (p, n, dir_node(meta)),
            Op::File(p, n, meta, size) => (p, n, file_node(meta, size)),
            Op::Symlink(p, n, meta, target) => (
                p,
                n,
                Node {
                    meta,
                    kind: NodeKind::Symlink { target },
                },
            ),
            Op::Device(p, n, meta, char, major, minor) => {
                let kind = if char {
                    NodeKind::CharDevice { major, minor }
                } else {
                    NodeKind::BlockDevice { major, minor }
                };
                (p, n, Node { meta, kind })
            }
            Op::Fifo(p, n, meta) => (
                p,
                n,
                Node {
                    meta,
                    kind: NodeKind::Fifo,
                },
            ),
            Op::Socket(p, n, meta) => (
                p,
                n,
                Node {
                    meta,
                    kind: NodeKind::Socket,
                },
            ),
            Op::Hardlink(p, n, target) => {
                if non_dirs.is_empty() {
                    continue;
                }
                let target = non_dirs[target % non_dirs.len()];
                let dir = dirs[p % dirs.len()];
                insert_entry(&mut tree, dir, n, target);
                continue;
            }
            Op::Orphan(is_dir) => {
                let file = tree.add(file_node(Meta::default(), 10));
                planner.add_file(file, 10);
                files.push(file);
                if is_dir {
                    let dir = tree.add(dir_node(Meta::default()));
                    insert_entry(&mut tree, dir, b"inside".to_vec(), file);
                }
                continue;
            }
        };
        let dir = dirs[parent % dirs.len()];
        if entries(&tree, dir).contains_key(&name) {
            continue;
        }
        let id = tree.add(node);
        insert_entry(&mut tree, dir, name, id);
        match &tree.node(id).kind {
            NodeKind::Dir { .. } => dirs.push(id),
            NodeKind::File { size, .. } => {
                planner.add_file(id, *size);
                files.push(id);
                non_dirs.push(id);
            }
            _ => non_dirs.push(id),
        }
    }
    let (blobs, chunks) = planner.finish(&mut tree);
    // Stretches of files with chunks, each picked and placed by its seed.
    let chunked: Vec<(NodeId, usize)> = files
        .iter()
        .filter_map(|&id| match &tree.node(id).kind {
            NodeKind::File { chunks, .. } if !chunks.is_empty() => Some((id, chunks.len())),
            _ => None,
        })
        .collect();
    let prefetch = if chunked.is_empty() {
        Vec::new()
    } else {
        prefetch
            .iter()
            .map(|&i| {
                let (node, n) = chunked[i % chunked.len()];
                let start = i / 7 % n;
                let len = 1 + i / 131 % (n - start);
                PrefetchSpan {
                    node,
                    chunks: start as u32..(start + len) as u32,
                }
            })
            .collect()
    };
    Image {
        tree,
        chunk_size: CS,
        blobs,
        chunks,
        prefetch,
    }
}

pub(super) fn dir_node(meta: Meta) -> Node {
    Node {
        meta,
        kind: NodeKind::Dir {
            entries: BTreeMap::new(),
        },
    }
}

/// A file node; its chunk list is filled in by [`ChunkPlanner::finish`].
pub(super) fn file_node(meta: Meta, size: u64) -> Node {
    Node {
        meta,
        kind: NodeKind::File {
            size,
            chunks: Vec::new(),
        },
    }
}

pub(super) fn entries(tree: &ImageTree, dir: NodeId) -> &BTreeMap<Vec<u8>, NodeId> {
    match &tree.node(dir).kind {
        NodeKind::Dir { entries } => entries,
        other => panic!("node {} is not a directory: {other:?}", dir.0),
    }
}

pub(super) fn insert_entry(tree: &mut ImageTree, dir: NodeId, name: Vec<u8>, child: NodeId) {
    if let NodeKind::Dir { entries } = &mut tree.node_mut(dir).kind {
        entries.entry(name).or_insert(child);
    }
}

/// A small image with one of everything, for corruption tests.
pub(super) fn small_image() -> Image {
    let meta = |perm| Meta {
        perm,
        uid: 1000,
        gid: 100,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        xattrs: BTreeMap::new(),
    };
    let mut xmeta = meta(0o4755);
    xmeta
        .xattrs
        .insert(b"security.capability".to_vec(), vec![1, 2, 3]);
    xmeta.xattrs.insert(b"user.a".to_vec(), b"x".to_vec());
    let ops = vec![
        Op::Dir(0, b"etc".to_vec(), meta(0o755)),
        Op::Dir(0, b"tmp".to_vec(), meta(0o1777)),
        Op::File(1, b"passwd".to_vec(), xmeta, u64::from(CS) + 100),
        Op::File(0, b"empty".to_vec(), meta(0o644), 0),
        Op::Symlink(0, b"link".to_vec(), meta(0o777), b"etc/passwd".to_vec()),
        Op::Device(1, b"null".to_vec(), meta(0o666), true, 1, 3),
        Op::Fifo(2, b"fifo".to_vec(), meta(0o600)),
        Op::Socket(2, b"sock".to_vec(), meta(0o600)),
        Op::Hardlink(2, b"passwd2".to_vec(), 0),
        Op::Dir(1, b"sub\xff".to_vec(), meta(0o700)),
        Op::File(3, b"f".to_vec(), meta(0o600), 3),
    ];
    build(meta(0o755), &ops, 2, 7, &[0, 1])
}
