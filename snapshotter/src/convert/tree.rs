//! Merges layers into one [`ImageTree`] the way containerd's applier and
//! overlayfs would: later layers replace entries, whiteouts delete them,
//! opaque markers hide what lower layers put in a directory.
//!
//! Paths are walked component by component from the root without ever
//! following a symlink: an entry whose parent path runs into anything but a
//! directory is refused, as tar refuses to write through a symlink.

use std::collections::{BTreeMap, HashMap, HashSet};

use lode_common::format::{ImageTree, Meta, Node, NodeId, NodeKind};

use super::error::EntryProblem;
use super::path::join;

/// Permission bits of directories that no entry declares but that must exist
/// for an entry below them (what containerd's applier creates).
pub(crate) const IMPLICIT_DIR_PERM: u32 = 0o755;

/// Builds the merged tree layer by layer.
#[derive(Debug)]
pub struct TreeBuilder {
    tree: ImageTree,
    /// Directories the current layer declared, created or walked through. With
    /// overlayfs these exist in the layer's own directory, so an opaque marker
    /// keeps them (their content is filtered in turn).
    layer_dirs: HashSet<NodeId>,
    /// Non-directory entries (directory, name) the current layer put in place.
    /// Kept by name rather than node: a hard link from this layer to a lower
    /// file shares the lower file's node, yet only the new name survives an
    /// opaque marker.
    layer_leaves: HashMap<NodeId, HashSet<Vec<u8>>>,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeBuilder {
    /// A tree with an empty root directory (0755, root-owned, mtime 0).
    pub fn new() -> Self {
        Self {
            tree: ImageTree::new(implicit_dir_meta()),
            layer_dirs: HashSet::new(),
            layer_leaves: HashMap::new(),
        }
    }

    /// Starts applying the next layer: what the previous layer touched
    /// becomes "lower" content.
    pub fn begin_layer(&mut self) {
        self.layer_dirs.clear();
        self.layer_leaves.clear();
        self.layer_dirs.insert(ImageTree::ROOT);
    }

    pub fn tree(&self) -> &ImageTree {
        &self.tree
    }

    pub(crate) fn tree_mut(&mut self) -> &mut ImageTree {
        &mut self.tree
    }

    pub fn into_tree(self) -> ImageTree {
        self.tree
    }

    /// Puts `node` at `path` (components as from [`super::path::components`]).
    /// A directory over an existing directory only updates its metadata and
    /// keeps its children; anything else replaces what was there. The empty
    /// path is the root, which only a directory may redeclare.
    pub fn put(&mut self, path: &[&[u8]], node: Node) -> Result<NodeId, EntryProblem> {
        let Some((name, parents)) = path.split_last() else {
            if !matches!(node.kind, NodeKind::Dir { .. }) {
                return Err(EntryProblem::RootNotDir);
            }
            self.tree.node_mut(ImageTree::ROOT).meta = node.meta;
            return Ok(ImageTree::ROOT);
        };
        let parent = self.walk_creating(parents)?;
        let existing = self.entries(parent).get(*name).copied();
        if let Some(existing) = existing {
            let both_dirs = matches!(node.kind, NodeKind::Dir { .. })
                && matches!(self.tree.node(existing).kind, NodeKind::Dir { .. });
            if both_dirs {
                self.tree.node_mut(existing).meta = node.meta;
                self.layer_dirs.insert(existing);
                return Ok(existing);
            }
        }
        let is_dir = matches!(node.kind, NodeKind::Dir { .. });
        let id = self.tree.add(node);
        self.link(parent, name, id, is_dir);
        Ok(id)
    }

    /// Makes `path` another name of the node at `target`, which must already
    /// exist (in this layer before this entry, or in a lower layer) and must
    /// not be a directory.
    pub fn hardlink(&mut self, path: &[&[u8]], target: &[&[u8]]) -> Result<(), EntryProblem> {
        let problem = |reason| EntryProblem::HardlinkTarget {
            target: join(target),
            reason,
        };
        if target.is_empty() {
            return Err(problem("is the image root"));
        }
        let target_id = self
            .lookup(target)
            .ok_or_else(|| problem("does not exist"))?;
        if matches!(self.tree.node(target_id).kind, NodeKind::Dir { .. }) {
            return Err(problem("is a directory"));
        }
        let Some((name, parents)) = path.split_last() else {
            return Err(EntryProblem::RootNotDir);
        };
        let parent = self.walk_creating(parents)?;
        self.link(parent, name, target_id, false);
        Ok(())
    }

    /// Deletes `name` in directory `dir` from the merged tree (a `.wh.name`
    /// entry). Missing parents are created, as containerd does before
    /// handling the whiteout.
    pub fn whiteout(&mut self, dir: &[&[u8]], name: &[u8]) -> Result<(), EntryProblem> {
        let parent = self.walk_creating(dir)?;
        self.entries_mut(parent).remove(name);
        if let Some(names) = self.layer_leaves.get_mut(&parent) {
            names.remove(name);
        }
        Ok(())
    }

    /// Hides everything lower layers put below `dir` (a `.wh..wh..opq`
    /// entry), keeping what the current layer declares there, whether it came
    /// before or after the marker.
    pub fn opaque(&mut self, dir: &[&[u8]]) -> Result<(), EntryProblem> {
        let top = self.walk_creating(dir)?;
        let mut stack = vec![top];
        while let Some(current) = stack.pop() {
            let nodes = &self.tree.nodes;
            let NodeKind::Dir { entries } = &nodes[current.0].kind else {
                continue;
            };
            let kept_leaves = self.layer_leaves.get(&current);
            let mut hidden = Vec::new();
            for (name, child) in entries {
                if matches!(nodes[child.0].kind, NodeKind::Dir { .. }) {
                    if self.layer_dirs.contains(child) {
                        stack.push(*child);
                    } else {
                        hidden.push(name.clone());
                    }
                } else if !kept_leaves.is_some_and(|names| names.contains(name)) {
                    hidden.push(name.clone());
                }
            }
            let entries = self.entries_mut(current);
            for name in hidden {
                entries.remove(&name);
            }
        }
        Ok(())
    }

    /// The node at `path`, walking only through directories.
    pub fn lookup(&self, path: &[&[u8]]) -> Option<NodeId> {
        let mut current = ImageTree::ROOT;
        for part in path {
            let NodeKind::Dir { entries } = &self.tree.node(current).kind else {
                return None;
            };
            current = *entries.get(*part)?;
        }
        Some(current)
    }

    /// Walks `path` from the root, creating missing directories, and returns
    /// the last directory. Refuses to walk through anything else.
    fn walk_creating(&mut self, path: &[&[u8]]) -> Result<NodeId, EntryProblem> {
        let mut current = ImageTree::ROOT;
        for (depth, part) in path.iter().enumerate() {
            let next = match self.entries(current).get(*part).copied() {
                Some(child) => {
                    if !matches!(self.tree.node(child).kind, NodeKind::Dir { .. }) {
                        return Err(EntryProblem::ParentNotDir {
                            parent: join(&path[..=depth]),
                        });
                    }
                    child
                }
                None => {
                    let child = self.tree.add(Node {
                        meta: implicit_dir_meta(),
                        kind: NodeKind::Dir {
                            entries: BTreeMap::new(),
                        },
                    });
                    self.entries_mut(current).insert(part.to_vec(), child);
                    child
                }
            };
            self.layer_dirs.insert(next);
            current = next;
        }
        Ok(current)
    }

    fn link(&mut self, parent: NodeId, name: &[u8], child: NodeId, is_dir: bool) {
        self.entries_mut(parent).insert(name.to_vec(), child);
        if is_dir {
            self.layer_dirs.insert(child);
        } else {
            self.layer_leaves
                .entry(parent)
                .or_default()
                .insert(name.to_vec());
        }
    }

    /// Entries of `dir`. Only called with directories this builder walked to.
    fn entries(&self, dir: NodeId) -> &BTreeMap<Vec<u8>, NodeId> {
        match &self.tree.node(dir).kind {
            NodeKind::Dir { entries } => entries,
            _ => unreachable!("walked to a non-directory"),
        }
    }

    fn entries_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, NodeId> {
        match &mut self.tree.node_mut(dir).kind {
            NodeKind::Dir { entries } => entries,
            _ => unreachable!("walked to a non-directory"),
        }
    }
}

fn implicit_dir_meta() -> Meta {
    Meta {
        perm: IMPLICIT_DIR_PERM,
        ..Meta::default()
    }
}
