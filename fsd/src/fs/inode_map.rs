//! Inode numbers of a shared daemon: instance inodes are
//! `(seq << 40) | local_ino`, inode 1 is the pseudo root listing the
//! instances. The numbers depend only on what the mount requests said (the
//! instance's sequence number and the bootstrap's own inode numbers), so a
//! daemon that takes over a FUSE connection accepts every number its
//! predecessor handed to the kernel.

use lode_common::format::Ino;

/// Bits of an instance inode taken by the bootstrap's inode number.
pub const LOCAL_BITS: u32 = 40;
/// Sequence numbers are below this (64 − 40 − 1 bits: never the sign bit).
pub const SEQ_LIMIT: u32 = 1 << 23;

/// The shared mount's root directory.
pub const PSEUDO_ROOT: GlobalIno = GlobalIno(1);

/// An instance's sequence number, checked against [`SEQ_LIMIT`]. Sequence 0
/// is reserved: its range would contain the pseudo root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceSeq(u32);

/// An inode number as the kernel sees it on a shared mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalIno(pub u64);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InodeMapError {
    #[error("instance sequence {0} must be between 1 and {SEQ_LIMIT} (exclusive)")]
    Seq(u32),
    #[error("bootstrap inode {0} does not fit {LOCAL_BITS} bits")]
    Local(u64),
}

impl InstanceSeq {
    pub fn new(seq: u32) -> Result<Self, InodeMapError> {
        if seq == 0 || seq >= SEQ_LIMIT {
            return Err(InodeMapError::Seq(seq));
        }
        Ok(Self(seq))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// Where an inode number points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    PseudoRoot,
    Instance(InstanceSeq, Ino),
}

/// The kernel-visible number of inode `local` of instance `seq`.
pub fn to_global(seq: InstanceSeq, local: Ino) -> Result<GlobalIno, InodeMapError> {
    if local.0 == 0 || local.0 >> LOCAL_BITS != 0 {
        return Err(InodeMapError::Local(local.0));
    }
    Ok(GlobalIno((u64::from(seq.0) << LOCAL_BITS) | local.0))
}

/// Splits a kernel-visible number; `None` for numbers no instance can own.
pub fn resolve(ino: GlobalIno) -> Option<Target> {
    if ino == PSEUDO_ROOT {
        return Some(Target::PseudoRoot);
    }
    let seq = u32::try_from(ino.0 >> LOCAL_BITS).ok()?;
    let local = ino.0 & ((1 << LOCAL_BITS) - 1);
    let seq = InstanceSeq::new(seq).ok()?;
    (local != 0).then_some(Target::Instance(seq, Ino(local)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits_are_enforced() {
        assert_eq!(InstanceSeq::new(0), Err(InodeMapError::Seq(0)));
        assert_eq!(
            InstanceSeq::new(SEQ_LIMIT),
            Err(InodeMapError::Seq(SEQ_LIMIT))
        );
        let seq = InstanceSeq::new(SEQ_LIMIT - 1).unwrap();
        assert_eq!(
            to_global(seq, Ino(1 << LOCAL_BITS)),
            Err(InodeMapError::Local(1 << LOCAL_BITS))
        );
        assert_eq!(to_global(seq, Ino(0)), Err(InodeMapError::Local(0)));
        let top = to_global(seq, Ino((1 << LOCAL_BITS) - 1)).unwrap();
        assert!(top.0 < 1 << 63, "never the sign bit");
    }

    #[test]
    fn pseudo_root_and_foreign_numbers() {
        assert_eq!(resolve(PSEUDO_ROOT), Some(Target::PseudoRoot));
        // Sequence 0's range is not an instance's.
        assert_eq!(resolve(GlobalIno(2)), None);
        assert_eq!(resolve(GlobalIno(u64::MAX)), None);
        assert_eq!(resolve(GlobalIno(3 << LOCAL_BITS)), None);
        let one = InstanceSeq::new(1).unwrap();
        assert_eq!(to_global(one, Ino::ROOT).unwrap(), GlobalIno((1 << 40) | 1));
    }

    proptest! {
        #[test]
        fn round_trips(seq in 1u32..SEQ_LIMIT, local in 1u64..(1 << LOCAL_BITS)) {
            let s = InstanceSeq::new(seq).unwrap();
            let g = to_global(s, Ino(local)).unwrap();
            prop_assert_ne!(g, PSEUDO_ROOT);
            prop_assert_eq!(resolve(g), Some(Target::Instance(s, Ino(local))));
        }

        #[test]
        fn resolve_never_panics(ino in any::<u64>()) {
            if let Some(Target::Instance(s, l)) = resolve(GlobalIno(ino)) {
                prop_assert_eq!(to_global(s, l).unwrap(), GlobalIno(ino));
            }
        }
    }
}
