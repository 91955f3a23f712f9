//! The supervisor protocol: a daemon hands its state and its /dev/fuse
//! descriptors to a long-lived supervisor process, so that a successor can
//! take the FUSE connections over after a crash or for an upgrade, without
//! the mountpoints ever disappearing.
//!
//! Transport: a `SOCK_SEQPACKET` unix socket (one message per packet, so a
//! message and the descriptors attached to it arrive together). Each packet is
//! a [`wire`] frame: an 8-byte header (magic, JSON length) followed by a JSON
//! [`Message`]; descriptors travel as `SCM_RIGHTS` with the packet.
//!
//! Conversation, always request then reply on one connection:
//! - daemon → `State` (+ fds) → supervisor replies `Ack`: the supervisor now
//!   holds the state and its own copies of the descriptors, replacing any
//!   earlier state of that daemon id.
//! - new daemon → `Takeover { id }` → `Handover` (+ fds) or `Error`. The
//!   supervisor keeps its copies until the successor sends its own state.
//! - daemon → `Forget { id }` → `Ack`: a clean shutdown; nothing to take over.

mod client;
mod server;
pub mod wire;

use serde::{Deserialize, Serialize};

pub use client::SupervisorClient;
pub use server::SupervisorServer;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("supervisor socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("supervisor {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("malformed supervisor message: {0}")]
    Malformed(String),
    #[error("supervisor connection closed")]
    Closed,
    #[error("supervisor refused: {0}")]
    Refused(String),
    #[error("unexpected supervisor message: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// What a successor needs to serve a daemon's FUSE connection(s) as the
/// daemon did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonState {
    /// Names the daemon to the supervisor; a successor asks for it.
    pub id: String,
    /// The process that sent the state; a successor taking over from a live
    /// predecessor waits for it to exit before the final resend.
    pub pid: u32,
    /// How the daemon serves its instances (e.g. "dedicated", "shared").
    pub mode: String,
    /// One entry per descriptor sent with the state, in the same order.
    pub fuse: Vec<FuseConnParams>,
    /// In the order they were created (by `seq`).
    pub instances: Vec<InstanceState>,
}

/// What the kernel offered and what the daemon chose at FUSE INIT. The
/// kernel never sends INIT again on a live connection, so a successor must
/// answer as if it had made exactly these choices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseConnParams {
    /// Protocol version the kernel spoke in its INIT request.
    pub major: u32,
    pub minor: u32,
    /// INIT request: the kernel's readahead limit and capability flags
    /// (the 64-bit union of `flags` and `flags2`).
    pub kernel_max_readahead: u32,
    pub kernel_flags: u64,
    /// `unique` of the kernel's INIT request.
    pub init_unique: u64,
    /// INIT reply: what the daemon chose.
    pub reply_minor: u32,
    pub flags: u64,
    pub max_readahead: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    /// Index into [`DaemonState::instances`] of the instance this connection
    /// serves, if any.
    pub instance: Option<usize>,
}

/// One image instance the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceState {
    pub id: String,
    /// Creation order; instances are rebuilt in this order.
    pub seq: u64,
    pub mountpoint: String,
    pub bootstrap: String,
    /// As given on the command line (`registry://…` or `dir://…`).
    pub blob_source: String,
    pub image_ref: Option<String>,
    /// The daemon's configuration as TOML/JSON text, opaque here.
    pub config: String,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    State { state: DaemonState },
    Takeover { id: String },
    Forget { id: String },
    Ack,
    Handover { state: DaemonState },
    Error { message: String },
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::State { .. } => "state",
            Message::Takeover { .. } => "takeover",
            Message::Forget { .. } => "forget",
            Message::Ack => "ack",
            Message::Handover { .. } => "handover",
            Message::Error { .. } => "error",
        }
    }
}

/// Notification asking the kernel to queue again the requests a daemon read
/// but never answered (Linux 6.9+).
pub const FUSE_NOTIFY_RESEND: i32 = 7;

/// The `FUSE_NOTIFY_RESEND` notification as written to /dev/fuse: a bare
/// 16-byte out header (length, error = the notification code, unique 0).
pub fn resend_notification() -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&16u32.to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    b
}
