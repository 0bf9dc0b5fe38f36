//! Transmission replies: simple replies and structured reply chunks (data, hole, block
//! status, error), and the NBD error number for an engine error.

use super::consts::*;
use super::fields::Fields;
use crate::error::{Error, Result};

/// A simple reply: error (0 for success) and the request's cookie. A READ's data follows.
pub fn simple(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The header of a structured reply chunk whose payload is `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The done flag, set on the last chunk of a reply.
fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// NBD_REPLY_TYPE_OFFSET_DATA's header and offset; `data_len` bytes of data follow.
pub fn data_chunk(cookie: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        data_len + 8,
    ));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// NBD_REPLY_TYPE_OFFSET_HOLE: `len` bytes at `offset` read as zeroes.
pub fn hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        REPLY_TYPE_OFFSET_HOLE,
        12,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..].copy_from_slice(&len.to_be_bytes());
    b
}

/// NBD_REPLY_TYPE_NONE with the done flag: the end of a reply with nothing left to say.
pub fn done_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
}

/// NBD_REPLY_TYPE_ERROR (or ERROR_OFFSET with `offset`), always the last chunk.
pub fn error_chunk(cookie: u64, error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let message = truncate(message, MAX_STRING as usize);
    let len = 6 + message.len() + if offset.is_some() { 8 } else { 0 };
    let kind = if offset.is_some() {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    let mut v = chunk_header(cookie, REPLY_FLAG_DONE, kind, len as u32).to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(message.len() as u16).to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One block status descriptor: a run's length and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// NBD_REPLY_TYPE_BLOCK_STATUS for context `id`.
pub fn block_status_chunk(cookie: u64, id: u32, extents: &[Extent], done: bool) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = chunk_header(cookie, done_flag(done), REPLY_TYPE_BLOCK_STATUS, len as u32).to_vec();
    v.extend_from_slice(&id.to_be_bytes());
    for e in extents {
        v.extend_from_slice(&e.len.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
    }
    v
}

/// A reply header as a client reads it: the first 16 bytes tell simple from structured;
/// a structured chunk has four more (its length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { cookie: u64, error: u32 },
    Chunk { cookie: u64, flags: u16, kind: u16 },
}

/// Decode the first 16 bytes of a reply.
pub fn decode_reply(head: &[u8; 16]) -> Result<ReplyHeader> {
    let mut f = Fields::new(head, "reply");
    match f.u32()? {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: f.u32()?,
            cookie: f.u64()?,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
            flags: f.u16()?,
            kind: f.u16()?,
            cookie: f.u64()?,
        }),
        m => Err(Error::Protocol(format!("bad reply magic {m:#x}"))),
    }
}

/// Check a structured chunk's payload length (the last four header bytes) against
/// [`MAX_CHUNK_LEN`] before the client reads it.
pub fn chunk_len(tail: [u8; 4]) -> Result<u32> {
    let len = u32::from_be_bytes(tail);
    if len > MAX_CHUNK_LEN {
        return Err(Error::Protocol(format!(
            "reply chunk of {len} bytes is too long"
        )));
    }
    Ok(len)
}

/// Decode a block status chunk's payload: the context id and its descriptors.
pub fn decode_block_status(data: &[u8]) -> Result<(u32, Vec<Extent>)> {
    let mut f = Fields::new(data, "block status reply");
    let id = f.u32()?;
    if f.remaining() == 0 || !f.remaining().is_multiple_of(8) {
        return Err(Error::Protocol(format!(
            "block status reply of {} bytes",
            data.len()
        )));
    }
    let n = f.remaining() / 8;
    let extents = (0..n)
        .map(|_| {
            Ok(Extent {
                len: f.u32()?,
                flags: f.u32()?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((id, extents))
}

/// Decode an error chunk's payload: the error number and message.
pub fn decode_error(data: &[u8]) -> Result<(u32, String)> {
    let mut f = Fields::new(data, "error reply");
    let error = f.u32()?;
    let len = f.u16()?;
    let msg = f.bytes(len as usize)?;
    Ok((error, String::from_utf8_lossy(msg).into_owned()))
}

/// The NBD error number a client is told for an engine error.
pub fn errno_of(e: &Error) -> u32 {
    match e {
        Error::ReadOnly => EPERM,
        Error::InvalidArgument(_) => EINVAL,
        Error::NoSpace(_) => ENOSPC,
        Error::Unsupported(_) => ENOTSUP,
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ENOSPC,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EINVAL) => EINVAL,
            Some(libc::EOPNOTSUPP) => ENOTSUP,
            _ => EIO,
        },
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_and_chunk_headers_decode_back() {
        assert_eq!(
            decode_reply(&simple(9, EIO)).unwrap(),
            ReplyHeader::Simple {
                cookie: 9,
                error: EIO
            }
        );
        let d = data_chunk(3, 512, 100, true);
        assert_eq!(
            decode_reply(d[..16].try_into().unwrap()).unwrap(),
            ReplyHeader::Chunk {
                cookie: 3,
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_DATA
            }
        );
        assert_eq!(chunk_len(d[16..20].try_into().unwrap()).unwrap(), 108);
        assert_eq!(&d[20..], &512u64.to_be_bytes());
        let h = hole_chunk(3, 4096, 65536, false);
        assert_eq!(chunk_len(h[16..20].try_into().unwrap()).unwrap(), 12);
        assert_eq!(&h[28..], &65536u32.to_be_bytes());
        assert_eq!(&done_chunk(1)[4..8], &[0, 1, 0, 0]);
        let mut bad = simple(1, 0);
        bad[0] = 0;
        assert!(decode_reply(&bad).is_err());
        assert!(chunk_len((MAX_CHUNK_LEN + 1).to_be_bytes()).is_err());
    }

    #[test]
    fn block_status_and_error_chunks() {
        let ext = [
            Extent {
                len: 4096,
                flags: 0,
            },
            Extent {
                len: 8192,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let c = block_status_chunk(5, 1, &ext, true);
        assert_eq!(decode_block_status(&c[20..]).unwrap(), (1, ext.to_vec()));
        assert!(decode_block_status(&c[20..c.len() - 1]).is_err());
        assert!(decode_block_status(&c[20..24]).is_err());

        let e = error_chunk(5, EPERM, "no", Some(77));
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR_OFFSET.to_be_bytes());
        assert_eq!(decode_error(&e[20..]).unwrap(), (EPERM, "no".into()));
        let long = "é".repeat(3000);
        let e = error_chunk(5, EIO, &long, None);
        let (_, msg) = decode_error(&e[20..]).unwrap();
        assert!(msg.len() <= MAX_STRING as usize && msg.chars().all(|c| c == 'é'));
        assert!(decode_error(&[0, 0, 0, 5, 0, 9, b'x']).is_err());
    }

    #[test]
    fn engine_errors_map_to_nbd_errors() {
        assert_eq!(errno_of(&Error::ReadOnly), EPERM);
        assert_eq!(errno_of(&Error::invalid("x")), EINVAL);
        let nospc = Error::io("w", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(errno_of(&nospc), ENOSPC);
        assert_eq!(errno_of(&Error::corrupt("x")), EIO);
    }
}
