//! Framing of supervisor messages over a `SOCK_SEQPACKET` socket, with
//! descriptors attached as `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use super::{Message, SupervisorError, MAX_FDS};

/// Start of every frame.
pub const MAGIC: [u8; 4] = *b"LDSV";
/// Magic plus the JSON length (u32, little endian).
pub const HEADER_LEN: usize = 8;
/// Largest JSON body accepted; well under the socket's default send buffer.
pub const MAX_BODY: usize = 128 * 1024;

/// Encodes `message` as one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, SupervisorError> {
    let body = serde_json::to_vec(message)
        .map_err(|e| SupervisorError::Malformed(format!("encode {}: {e}", message.name())))?;
    if body.len() > MAX_BODY {
        return Err(SupervisorError::Malformed(format!(
            "{} message of {} bytes exceeds {MAX_BODY}",
            message.name(),
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    // Cannot truncate: bounded by MAX_BODY above.
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes one whole frame.
pub fn decode(frame: &[u8]) -> Result<Message, SupervisorError> {
    let malformed = |what: String| SupervisorError::Malformed(what);
    let header = frame
        .get(..HEADER_LEN)
        .ok_or_else(|| malformed(format!("frame of {} bytes has no header", frame.len())))?;
    if header.get(..4) != Some(&MAGIC[..]) {
        return Err(malformed("bad magic".into()));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(header.get(4..8).unwrap_or(&[0; 4]));
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BODY {
        return Err(malformed(format!("body length {len} exceeds {MAX_BODY}")));
    }
    let body = frame.get(HEADER_LEN..).unwrap_or(&[]);
    if body.len() != len {
        return Err(malformed(format!(
            "header says {len} bytes, frame carries {}",
            body.len()
        )));
    }
    serde_json::from_slice(body).map_err(|e| malformed(format!("JSON: {e}")))
}

/// Sends `message` with `fds` attached, as one packet.
pub fn send(
    socket: BorrowedFd<'_>,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), SupervisorError> {
    if fds.len() > MAX_FDS {
        return Err(SupervisorError::Malformed(format!(
            "{} descriptors exceed {MAX_FDS}",
            fds.len()
        )));
    }
    let frame = encode(message)?;
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &[IoSlice::new(&frame)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(n) => {
                return Err(SupervisorError::Malformed(format!(
                    "sent {n} of {} bytes",
                    frame.len()
                )))
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(SupervisorError::Closed),
            Err(source) => {
                return Err(SupervisorError::Io {
                    what: "send",
                    source,
                })
            }
        }
    }
}

/// Receives one packet: the message and the descriptors that came with it
/// (close-on-exec). Descriptors of a malformed message are closed.
pub fn recv(socket: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), SupervisorError> {
    // One byte more than the largest frame, to tell a too-long packet apart.
    let mut buf = vec![0u8; HEADER_LEN + MAX_BODY + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                let cmsgs = msg.cmsgs().map_err(|source| SupervisorError::Io {
                    what: "receive",
                    source,
                })?;
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed this descriptor
                            // in our table for this message; nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) => return Err(SupervisorError::Closed),
            Err(source) => {
                return Err(SupervisorError::Io {
                    what: "receive",
                    source,
                })
            }
        }
    };
    if len == 0 && fds.is_empty() {
        return Err(SupervisorError::Closed);
    }
    if truncated || len > HEADER_LEN + MAX_BODY {
        return Err(SupervisorError::Malformed(
            "packet or its descriptors truncated".into(),
        ));
    }
    let message = decode(buf.get(..len).unwrap_or(&[]))?;
    Ok((message, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let m = Message::Takeover { id: "d1".into() };
        assert_eq!(decode(&encode(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let good = encode(&Message::Ack).unwrap();
        assert!(decode(&[]).is_err());
        assert!(decode(&good[..HEADER_LEN - 1]).is_err());
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(decode(&bad_magic).is_err());
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(b' ');
        assert!(decode(&long).is_err());
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
        let mut not_json = MAGIC.to_vec();
        not_json.extend_from_slice(&3u32.to_le_bytes());
        not_json.extend_from_slice(b"{x}");
        assert!(decode(&not_json).is_err());
        let mut unknown = MAGIC.to_vec();
        let body = br#"{"type":"reboot"}"#;
        unknown.extend_from_slice(&(body.len() as u32).to_le_bytes());
        unknown.extend_from_slice(body);
        assert!(decode(&unknown).is_err());
    }
}
