//! Transmission requests: the 28-byte header a client sends for each command.

use super::consts::*;
use super::fields::Fields;
use crate::error::{Error, Result};

/// The size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;

/// One request header (a WRITE's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Decode a header; the magic must be right. Lengths are checked by [`Request::payload_len`]
    /// and by the server against the export.
    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<Request> {
        let mut f = Fields::new(buf, "request");
        let magic = f.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(Error::Protocol(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: f.u16()?,
            command: f.u16()?,
            cookie: f.u64()?,
            offset: f.u64()?,
            len: f.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// The bytes that follow the header: a WRITE's data, which may not exceed
    /// [`MAX_PAYLOAD`]. A request whose payload is refused cannot be skipped safely, so the
    /// connection must end.
    pub fn payload_len(&self) -> Result<usize> {
        if self.command != CMD_WRITE {
            return Ok(0);
        }
        if self.len > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "write of {} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                self.len
            )));
        }
        Ok(self.len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_magic_and_payload() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b).unwrap(), r);
        assert_eq!(r.payload_len().unwrap(), 4096);
        let big = Request {
            len: MAX_PAYLOAD + 1,
            ..r
        };
        assert!(matches!(big.payload_len(), Err(Error::Protocol(_))));
        // A read's length has no payload behind it.
        let read = Request {
            command: CMD_READ,
            len: u32::MAX,
            ..r
        };
        assert_eq!(read.payload_len().unwrap(), 0);
        let mut bad = b;
        bad[3] = 0;
        assert!(matches!(Request::decode(&bad), Err(Error::Protocol(_))));
    }
}
