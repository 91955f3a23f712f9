//! Real images for unit tests: a tree of files written with the format writer,
//! data blobs in a directory (for the `dir://` backend), and backend
//! wrappers that count or hold back range requests.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lode_common::format::{
    write_bootstrap, BlobIndex, BlobInfo, BlobRecord, Bootstrap, ChunkDigest, ChunkHash,
    ChunkIndex, ChunkRecord, ImageTree, Meta, Node, NodeId, NodeKind, PrefetchSpan,
};
use lode_common::Digest;

use crate::read::backend::{BackendError, BlobBackend, DirBackend, Sink};

pub const MTIME: i64 = 1_700_000_000;

pub struct ImageBuilder {
    tree: ImageTree,
    chunk_size: u32,
    compress: bool,
    /// Finished blobs, then the one being filled.
    done: Vec<Vec<u8>>,
    blob: Vec<u8>,
    uncompressed_len: u64,
    chunks: Vec<ChunkRecord>,
    by_digest: HashMap<ChunkDigest, ChunkIndex>,
    prefetch: Vec<PrefetchSpan>,
    hash: ChunkHash,
}

pub struct TestImage {
    pub _tmp: tempfile::TempDir,
    pub blob_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub bootstrap_path: PathBuf,
    pub bootstrap: Arc<Bootstrap>,
    /// Digest of the first blob.
    pub blob_digest: Digest,
    pub blob_digests: Vec<Digest>,
}

fn meta(perm: u32) -> Meta {
    Meta {
        perm,
        uid: 0,
        gid: 0,
        mtime_sec: MTIME,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    }
}

impl ImageBuilder {
    pub fn new(chunk_size: u32, compress: bool) -> Self {
        Self {
            tree: ImageTree::new(meta(0o755)),
            chunk_size,
            compress,
            done: Vec::new(),
            blob: Vec::new(),
            uncompressed_len: 0,
            chunks: Vec::new(),
            by_digest: HashMap::new(),
            prefetch: Vec::new(),
            hash: ChunkHash::WRITTEN,
        }
    }

    /// Digests the chunks added from now on with `hash` (images converted
    /// before BLAKE3 have sha256 chunk digests).
    pub fn chunk_hash(mut self, hash: ChunkHash) -> Self {
        self.hash = hash;
        self
    }

    /// The directory at `path` ("" is the root), created with its parents.
    pub fn dir(&mut self, path: &str) -> NodeId {
        let mut node = ImageTree::ROOT;
        for name in path.split('/').filter(|n| !n.is_empty()) {
            let existing = match &self.tree.node(node).kind {
                NodeKind::Dir { entries } => entries.get(name.as_bytes()).copied(),
                _ => panic!("{path}: not a directory"),
            };
            node = match existing {
                Some(id) => id,
                None => {
                    let id = self.tree.add(Node {
                        meta: meta(0o755),
                        kind: NodeKind::Dir {
                            entries: BTreeMap::new(),
                        },
                    });
                    self.link_into(node, name, id);
                    id
                }
            };
        }
        node
    }

    fn link_into(&mut self, dir: NodeId, name: &str, id: NodeId) {
        match &mut self.tree.node_mut(dir).kind {
            NodeKind::Dir { entries } => {
                entries.insert(name.as_bytes().to_vec(), id);
            }
            _ => panic!("not a directory"),
        }
    }

    fn add_at(&mut self, path: &str, node: Node) -> NodeId {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let dir = self.dir(parent);
        let id = self.tree.add(node);
        self.link_into(dir, name, id);
        id
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> NodeId {
        let mut chunks = Vec::new();
        for piece in data.chunks(self.chunk_size as usize) {
            chunks.push(self.chunk(piece));
        }
        self.add_at(
            path,
            Node {
                meta: meta(0o644),
                kind: NodeKind::File {
                    size: data.len() as u64,
                    chunks,
                },
            },
        )
    }

    fn chunk(&mut self, data: &[u8]) -> ChunkIndex {
        let digest = self.hash.digest(data);
        if let Some(&index) = self.by_digest.get(&digest) {
            return index;
        }
        let stored = if self.compress {
            zstd::bulk::compress(data, 1).unwrap()
        } else {
            data.to_vec()
        };
        let index = ChunkIndex(self.chunks.len() as u32);
        self.chunks.push(ChunkRecord {
            digest,
            blob: BlobIndex(self.done.len() as u32),
            compressed_offset: self.blob.len() as u64,
            compressed_size: stored.len() as u32,
            uncompressed_offset: self.uncompressed_len,
            uncompressed_size: data.len() as u32,
            compressed: self.compress,
        });
        self.blob.extend_from_slice(&stored);
        self.uncompressed_len += data.len() as u64;
        self.by_digest.insert(digest, index);
        index
    }

    /// New chunks go to a new blob from now on (chunks already stored are
    /// still shared from their blob).
    pub fn next_blob(&mut self) {
        self.done.push(std::mem::take(&mut self.blob));
        self.uncompressed_len = 0;
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> NodeId {
        self.add_at(
            path,
            Node {
                meta: meta(0o777),
                kind: NodeKind::Symlink {
                    target: target.as_bytes().to_vec(),
                },
            },
        )
    }

    /// A node of any kind without content (device, fifo, socket).
    pub fn special(&mut self, path: &str, kind: NodeKind) -> NodeId {
        self.add_at(
            path,
            Node {
                meta: meta(0o600),
                kind,
            },
        )
    }

    /// Another name for node `id`.
    pub fn hardlink(&mut self, path: &str, id: NodeId) {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let dir = self.dir(parent);
        self.link_into(dir, name, id);
    }

    pub fn xattr(&mut self, id: NodeId, name: &str, value: &[u8]) {
        self.tree
            .node_mut(id)
            .meta
            .xattrs
            .insert(name.as_bytes().to_vec(), value.to_vec());
    }

    /// Appends file `id`, whole, to the image's prefetch list.
    pub fn prefetch(&mut self, id: NodeId) {
        let count = match &self.tree.node(id).kind {
            NodeKind::File { chunks, .. } => chunks.len() as u32,
            other => panic!("prefetch of a non-file {other:?}"),
        };
        self.prefetch_chunks(id, 0..count);
    }

    /// Appends chunks `chunks` of file `id` to the image's prefetch list.
    pub fn prefetch_chunks(&mut self, id: NodeId, chunks: std::ops::Range<u32>) {
        self.prefetch.push(PrefetchSpan { node: id, chunks });
    }

    pub fn build(self) -> TestImage {
        let tmp = tempfile::tempdir().unwrap();
        let blob_dir = tmp.path().join("blobs");
        let cache_dir = tmp.path().join("cache");
        std::fs::create_dir_all(&blob_dir).unwrap();
        let mut all = self.done;
        all.push(self.blob);
        let mut blobs = Vec::new();
        for blob in &all {
            let digest = Digest::of(blob);
            std::fs::write(blob_dir.join(digest.hex()), blob).unwrap();
            blobs.push(BlobInfo {
                digest,
                compressed_size: blob.len() as u64,
            });
        }
        let bytes = write_bootstrap(
            &self.tree,
            self.chunk_size,
            &blobs,
            &self.chunks,
            &self.prefetch,
        )
        .unwrap();
        let bootstrap_path = tmp.path().join("bootstrap");
        std::fs::write(&bootstrap_path, &bytes).unwrap();
        let bootstrap = Arc::new(Bootstrap::open(&bootstrap_path).unwrap());
        TestImage {
            _tmp: tmp,
            blob_dir,
            cache_dir,
            bootstrap_path,
            bootstrap,
            blob_digest: blobs[0].digest,
            blob_digests: blobs.iter().map(|b| b.digest).collect(),
        }
    }
}

impl TestImage {
    pub fn blob_path(&self) -> PathBuf {
        self.blob_dir.join(self.blob_digest.hex())
    }
}

/// Deterministic, incompressible-ish bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Polls `cond` until it holds or 10 s pass.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The dir backend, recording every range request.
pub struct CountingBackend {
    inner: DirBackend,
    pub calls: Mutex<Vec<(u64, u64)>>,
}

impl CountingBackend {
    pub fn new(image: &TestImage) -> Self {
        Self {
            inner: DirBackend::new(&image.blob_dir),
            calls: Mutex::new(Vec::new()),
        }
    }

    pub fn calls(&self) -> Vec<(u64, u64)> {
        self.calls.lock().unwrap().clone()
    }
}

impl BlobBackend for CountingBackend {
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push((offset, len));
        self.inner.read_range(blob, offset, len, sink)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The counting backend behind a gate that holds requests (every one, or
/// those starting in a range) until opened.
pub struct GatedBackend {
    pub inner: CountingBackend,
    /// Requests starting here are held.
    held: std::ops::Range<u64>,
    /// Offsets of the requests made, held ones included.
    started: Mutex<Vec<u64>>,
    /// Per request: its offset and its thread's niceness as it started and
    /// once the first stored bytes were handed over.
    nices: Mutex<Vec<(u64, i32, i32)>>,
    open: Mutex<bool>,
    changed: Condvar,
}

impl GatedBackend {
    pub fn new(image: &TestImage) -> Self {
        Self::holding(image, 0..u64::MAX)
    }

    /// Holds only the requests that start in `held`.
    pub fn holding(image: &TestImage, held: std::ops::Range<u64>) -> Self {
        Self {
            inner: CountingBackend::new(image),
            held,
            started: Mutex::new(Vec::new()),
            nices: Mutex::new(Vec::new()),
            open: Mutex::new(false),
            changed: Condvar::new(),
        }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }

    /// Offsets of the requests made so far, held ones included.
    pub fn started(&self) -> Vec<u64> {
        self.started.lock().unwrap().clone()
    }

    /// Requests that handed over bytes: offset, the niceness of the
    /// request's thread as it started and after the first bytes.
    pub fn nices(&self) -> Vec<(u64, i32, i32)> {
        self.nices.lock().unwrap().clone()
    }
}

impl BlobBackend for GatedBackend {
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError> {
        self.started.lock().unwrap().push(offset);
        let at_start = crate::read::workers::thread_nice();
        if self.held.contains(&offset) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.changed.wait(open).unwrap();
            }
        }
        let mut first = true;
        self.inner.read_range(blob, offset, len, &mut |bytes| {
            sink(bytes);
            if first {
                first = false;
                let after = crate::read::workers::thread_nice();
                self.nices.lock().unwrap().push((offset, at_start, after));
            }
        })
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
