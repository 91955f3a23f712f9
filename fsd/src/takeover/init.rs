//! The bytes of FUSE INIT: parsing the kernel's request and a daemon's reply
//! into [`FuseConnParams`], and rebuilding the request from them.
//!
//! Layouts (little endian, from the kernel's `fuse.h`):
//! - `fuse_in_header` (40): len u32, opcode u32, unique u64, nodeid u64,
//!   uid u32, gid u32, pid u32, total_extlen u16, padding u16.
//! - `fuse_init_in` (64): major, minor, max_readahead, flags, flags2 (u32),
//!   then 11 unused u32.
//! - `fuse_out_header` (16): len u32, error i32, unique u64.
//! - `fuse_init_out` (64): major u32, minor u32, max_readahead u32, flags u32,
//!   max_background u16, congestion_threshold u16, max_write u32,
//!   time_gran u32, max_pages u16, map_alignment u16, flags2 u32, ...

use lode_common::supervisor::FuseConnParams;

use super::TakeoverError;

pub const IN_HEADER_LEN: usize = 40;
pub const INIT_IN_LEN: usize = 64;
pub const OUT_HEADER_LEN: usize = 16;
pub const FUSE_INIT: u32 = 26;
/// `flags` bit announcing that `flags2` carries the upper 32 flag bits.
pub const FUSE_INIT_EXT: u64 = 1 << 30;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn bad(what: &str) -> TakeoverError {
    TakeoverError::Protocol(what.to_string())
}

/// Reads the kernel's INIT request into the request half of the params.
pub fn parse_request(b: &[u8]) -> Result<FuseConnParams, TakeoverError> {
    let len = u32_at(b, 0).ok_or_else(|| bad("INIT request shorter than its header"))?;
    if len as usize != b.len() {
        return Err(bad("INIT request length does not match its header"));
    }
    if u32_at(b, 4) != Some(FUSE_INIT) {
        return Err(bad("first request of the connection is not INIT"));
    }
    let arg = IN_HEADER_LEN;
    let field = |at| u32_at(b, arg + at).ok_or_else(|| bad("INIT request truncated"));
    let major = field(0)?;
    let minor = field(4)?;
    let max_readahead = field(8)?;
    let mut flags = u64::from(field(12)?);
    if flags & FUSE_INIT_EXT != 0 {
        flags |= u64::from(field(16)?) << 32;
    }
    Ok(FuseConnParams {
        major,
        minor,
        kernel_max_readahead: max_readahead,
        kernel_flags: flags,
        init_unique: u64_at(b, 8).unwrap_or(0),
        ..FuseConnParams::default()
    })
}

/// Adds the daemon's choices from its INIT reply to `params`.
pub fn parse_reply(b: &[u8], params: &mut FuseConnParams) -> Result<(), TakeoverError> {
    let len = u32_at(b, 0).ok_or_else(|| bad("INIT reply shorter than its header"))?;
    if len as usize != b.len() {
        return Err(bad("INIT reply length does not match its header"));
    }
    let error = u32_at(b, 4).unwrap_or(0) as i32;
    if error != 0 {
        return Err(TakeoverError::Protocol(format!(
            "the filesystem refused INIT with errno {}",
            -error
        )));
    }
    let o = OUT_HEADER_LEN;
    let field = |at| u32_at(b, o + at).ok_or_else(|| bad("INIT reply truncated"));
    params.reply_minor = field(4)?;
    params.max_readahead = field(8)?;
    let mut flags = u64::from(field(12)?);
    params.max_background = u16_at(b, o + 16).ok_or_else(|| bad("INIT reply truncated"))?;
    params.congestion_threshold = u16_at(b, o + 18).ok_or_else(|| bad("INIT reply truncated"))?;
    params.max_write = field(20)?;
    // Older replies end here; the rest stays 0.
    params.time_gran = u32_at(b, o + 24).unwrap_or(0);
    params.max_pages = u16_at(b, o + 28).unwrap_or(0);
    if flags & FUSE_INIT_EXT != 0 {
        flags |= u64::from(u32_at(b, o + 32).unwrap_or(0)) << 32;
    }
    params.flags = flags;
    Ok(())
}

/// Rebuilds the kernel's INIT request from the request half of `params`.
pub fn build_request(params: &FuseConnParams) -> Vec<u8> {
    let mut b = Vec::with_capacity(IN_HEADER_LEN + INIT_IN_LEN);
    let len = (IN_HEADER_LEN + INIT_IN_LEN) as u32;
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&FUSE_INIT.to_le_bytes());
    b.extend_from_slice(&params.init_unique.to_le_bytes());
    b.extend_from_slice(&[0; 8 + 4 + 4 + 4 + 2 + 2]); // nodeid, uid, gid, pid, extlen, pad
    for v in [
        params.major,
        params.minor,
        params.kernel_max_readahead,
        (params.kernel_flags as u32) | (FUSE_INIT_EXT as u32),
        (params.kernel_flags >> 32) as u32,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.resize(IN_HEADER_LEN + INIT_IN_LEN, 0);
    b
}

pub use lode_common::supervisor::resend_notification;

/// Whether a reply to a replayed INIT makes the choices the kernel saw.
pub fn same_choices(a: &FuseConnParams, b: &FuseConnParams) -> bool {
    (
        a.flags,
        a.max_readahead,
        a.max_background,
        a.congestion_threshold,
        a.max_write,
        a.time_gran,
        a.max_pages,
    ) == (
        b.flags,
        b.max_readahead,
        b.max_background,
        b.congestion_threshold,
        b.max_write,
        b.time_gran,
        b.max_pages,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> FuseConnParams {
        FuseConnParams {
            major: 7,
            minor: 45,
            kernel_max_readahead: 131072,
            kernel_flags: 0x7_0000_0000 | 0x3fff_ffff,
            init_unique: 2,
            ..FuseConnParams::default()
        }
    }

    #[test]
    fn rebuilt_request_parses_back_to_the_same_params() {
        let p = params();
        let bytes = build_request(&p);
        assert_eq!(bytes.len(), IN_HEADER_LEN + INIT_IN_LEN);
        let got = parse_request(&bytes).unwrap();
        assert_eq!(got.kernel_flags, p.kernel_flags | FUSE_INIT_EXT);
        assert_eq!(
            (
                got.major,
                got.minor,
                got.kernel_max_readahead,
                got.init_unique
            ),
            (7, 45, 131072, 2)
        );
    }

    #[test]
    fn malformed_requests_and_replies_are_errors() {
        let good = build_request(&params());
        assert!(parse_request(&good[..good.len() - 1]).is_err());
        assert!(parse_request(&[]).is_err());
        let mut not_init = good.clone();
        not_init[4] = 1;
        assert!(parse_request(&not_init).is_err());
        let mut short = good[..IN_HEADER_LEN + 8].to_vec();
        short[..4].copy_from_slice(&((IN_HEADER_LEN + 8) as u32).to_le_bytes());
        assert!(parse_request(&short).is_err());

        let mut p = params();
        assert!(parse_reply(&[], &mut p).is_err());
        let mut refused = vec![0u8; OUT_HEADER_LEN];
        refused[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
        refused[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert!(parse_reply(&refused, &mut p).is_err());
    }

    #[test]
    fn reply_fields_are_read_at_their_offsets() {
        let mut b = vec![0u8; OUT_HEADER_LEN + 64];
        let len = b.len() as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
        let o = OUT_HEADER_LEN;
        b[o + 4..o + 8].copy_from_slice(&45u32.to_le_bytes());
        b[o + 8..o + 12].copy_from_slice(&4096u32.to_le_bytes());
        b[o + 12..o + 16].copy_from_slice(&((FUSE_INIT_EXT as u32) | 1).to_le_bytes());
        b[o + 16..o + 18].copy_from_slice(&64u16.to_le_bytes());
        b[o + 20..o + 24].copy_from_slice(&(1u32 << 20).to_le_bytes());
        b[o + 28..o + 30].copy_from_slice(&256u16.to_le_bytes());
        b[o + 32..o + 36].copy_from_slice(&2u32.to_le_bytes());
        let mut p = params();
        parse_reply(&b, &mut p).unwrap();
        assert_eq!(p.flags, (2 << 32) | FUSE_INIT_EXT | 1);
        assert_eq!(
            (
                p.reply_minor,
                p.max_readahead,
                p.max_background,
                p.max_write,
                p.max_pages
            ),
            (45, 4096, 64, 1 << 20, 256)
        );
        assert!(same_choices(&p, &p.clone()));
        let mut other = p.clone();
        other.flags ^= 1;
        assert!(!same_choices(&p, &other));
    }

    #[test]
    fn resend_is_a_bare_header_with_code_7() {
        assert_eq!(
            resend_notification(),
            [16, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
