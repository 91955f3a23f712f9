//! The in-memory image tree that a converter builds and [`super::write_bootstrap`]
//! serialises. Hardlinks are several directory entries naming the same [`NodeId`].

use std::collections::BTreeMap;

use super::ChunkIndex;

/// Index of a node in [`ImageTree::nodes`]. Node 0 is the root directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// A stretch of a regular file for the bootstrap's prefetch list: chunks
/// `chunks` of file `node`, numbered within the file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrefetchSpan {
    pub node: NodeId,
    pub chunks: std::ops::Range<u32>,
}

/// Ownership, permissions and times of a node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`); the file
    /// type comes from [`NodeKind`].
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Extended attributes (name → value), e.g. `security.capability`.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// Entries are sorted by name (raw bytes; names may be non-UTF-8).
    Dir {
        entries: BTreeMap<Vec<u8>, NodeId>,
    },
    /// A regular file. `chunks[i]` indexes the chunk table given to the writer
    /// and covers bytes `i * chunk_size .. min((i + 1) * chunk_size, size)`.
    File {
        size: u64,
        chunks: Vec<ChunkIndex>,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub meta: Meta,
    pub kind: NodeKind,
}

/// A whole merged image filesystem. Nodes not reachable from the root (e.g.
/// removed by a whiteout) are allowed and are not written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageTree {
    pub nodes: Vec<Node>,
}

impl ImageTree {
    pub const ROOT: NodeId = NodeId(0);

    /// A tree holding only a root directory with the given metadata.
    pub fn new(root_meta: Meta) -> Self {
        Self {
            nodes: vec![Node {
                meta: root_meta,
                kind: NodeKind::Dir {
                    entries: BTreeMap::new(),
                },
            }],
        }
    }

    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        NodeId(self.nodes.len() - 1)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.0]
    }
}
