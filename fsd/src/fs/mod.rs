//! The filesystem the kernel sees: [`adapter`] is the one
//! `fuser::Filesystem`, [`table`] routes an inode to its instance (with
//! [`inode_map`] numbering a shared mount's instances), [`ops`] answers one
//! instance's operations as plain functions, and [`errno`] turns their
//! errors into errnos and log lines.

pub mod adapter;
pub mod errno;
mod filesystem;
pub mod inode_map;
pub mod ops;
pub mod table;
