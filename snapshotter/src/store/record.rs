//! One snapshot's stored record.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::StoreError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    View,
    Active,
    Committed,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Names the snapshot's directory; never reused.
    pub id: u64,
    pub kind: SnapshotKind,
    /// Key of the parent snapshot, or empty.
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_ns: u64,
    pub updated_ns: u64,
    /// (bytes, inodes) of a committed snapshot's own directory.
    #[serde(default)]
    pub usage: Option<(i64, i64)>,
    /// For a committed Lode layer: its content is served by a daemon, not
    /// by the snapshot directory.
    #[serde(default)]
    pub lazy: bool,
    /// For the committed snapshot of a Lode bootstrap layer: the image it
    /// completes (by bootstrap digest).
    #[serde(default)]
    pub lode_image: Option<String>,
}

impl SnapshotRecord {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of plain fields always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            message: e.to_string(),
        })
    }
}
