//! The fixed newstyle handshake: the server's greeting, the client's flags, option
//! requests and replies, and the payloads of the options this implementation knows.

use std::io::Read;

use super::consts::*;
use super::fields::Fields;
use crate::error::{Error, Result};

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, its handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// What the client's flags ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// Omit the 124 zero bytes after an NBD_OPT_EXPORT_NAME reply.
    pub no_zeroes: bool,
}

/// Check the client's flags: fixed newstyle is required and unknown bits are refused, as
/// the protocol asks of a server.
pub fn client_flags(flags: u32) -> Result<ClientFlags> {
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::Protocol(format!("unknown client flags {flags:#x}")));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol(
            "client does not speak fixed newstyle".into(),
        ));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// One option request from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    pub option: u32,
    pub data: Vec<u8>,
}

impl OptionRequest {
    /// The request's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&self.option.to_be_bytes());
        v.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.data);
        v
    }
}

/// Read one option request: the header, then (once its length is within
/// [`MAX_OPTION_LEN`]) the payload.
pub fn read_option(r: &mut impl Read) -> Result<OptionRequest> {
    let mut head = [0u8; 16];
    read_all(r, &mut head, "option request")?;
    let mut f = Fields::new(&head, "option request");
    let magic = f.u64()?;
    let option = f.u32()?;
    let len = f.u32()?;
    if magic != IHAVEOPT {
        return Err(Error::Protocol(format!("bad option magic {magic:#x}")));
    }
    if len > MAX_OPTION_LEN {
        return Err(Error::Protocol(format!(
            "option {option} of {len} bytes is too long"
        )));
    }
    let mut data = vec![0u8; len as usize];
    read_all(r, &mut data, "option request")?;
    Ok(OptionRequest { option, data })
}

/// `read_exact`, an early end of the stream reported as the peer going away mid-message.
pub fn read_all(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf)
        .map_err(|e| Error::io(format!("reading {what}"), e))
}

/// An option reply: magic, the option answered, the reply type and its data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The header of an option reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

/// Decode an option reply header; its length must be within [`MAX_OPTION_LEN`].
pub fn decode_option_reply(head: &[u8; 20]) -> Result<OptionReplyHeader> {
    let mut f = Fields::new(head, "option reply");
    let magic = f.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(Error::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let h = OptionReplyHeader {
        option: f.u32()?,
        reply: f.u32()?,
        len: f.u32()?,
    };
    if h.len > MAX_OPTION_LEN {
        return Err(Error::Protocol(format!(
            "option reply of {} bytes is too long",
            h.len
        )));
    }
    Ok(h)
}

/// The payload of NBD_OPT_INFO and NBD_OPT_GO: an export name and the information asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<InfoRequest> {
        let mut f = Fields::new(data, "info request");
        let name = f.sized_string()?;
        let count = f.u16()?;
        // Checked against the bytes that are there before anything is allocated.
        if f.remaining() != count as usize * 2 {
            return Err(Error::Protocol(format!(
                "info request claims {count} items in {} bytes",
                f.remaining()
            )));
        }
        let requests = (0..count).map(|_| f.u16()).collect::<Result<_>>()?;
        f.finish()?;
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = sized(self.name.as_bytes());
        v.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an export name
/// and the context queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaRequest {
    pub fn decode(data: &[u8]) -> Result<MetaRequest> {
        let mut f = Fields::new(data, "meta context request");
        let name = f.sized_string()?;
        let count = f.u32()?;
        // Each query takes at least its four length bytes.
        if count as usize > f.remaining() / 4 {
            return Err(Error::Protocol(format!(
                "meta context request claims {count} queries in {} bytes",
                f.remaining()
            )));
        }
        let queries = (0..count)
            .map(|_| f.sized_string())
            .collect::<Result<_>>()?;
        f.finish()?;
        Ok(MetaRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = sized(self.name.as_bytes());
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&sized(q.as_bytes()));
        }
        v
    }
}

/// `bytes` preceded by their 32-bit length.
fn sized(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// NBD_INFO_EXPORT: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION: `kind` and the text.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend_from_slice(text.as_bytes());
    v
}

/// Block size constraints: the minimum, preferred and maximum request sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// NBD_INFO_BLOCK_SIZE.
pub fn info_block_size(b: BlockSizes) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [b.min, b.preferred, b.max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// The export an NBD_REP_INFO reply describes, decoded by a client. `None` for
/// information types it does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize(BlockSizes),
}

/// Decode the data of an NBD_REP_INFO reply.
pub fn decode_info(data: &[u8]) -> Result<Option<Info>> {
    let mut f = Fields::new(data, "info reply");
    let info = match f.u16()? {
        INFO_EXPORT => Info::Export {
            size: f.u64()?,
            flags: f.u16()?,
        },
        INFO_BLOCK_SIZE => Info::BlockSize(BlockSizes {
            min: f.u32()?,
            preferred: f.u32()?,
            max: f.u32()?,
        }),
        _ => return Ok(None),
    };
    f.finish()?;
    Ok(Some(info))
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the client
/// set NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.resize(v.len() + 124, 0);
    }
    v
}

/// NBD_REP_SERVER's data: an export name and its description.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut v = sized(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// NBD_REP_META_CONTEXT's data: the context id and name.
pub fn meta_context_entry(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// Decode NBD_REP_META_CONTEXT's data.
pub fn decode_meta_context(data: &[u8]) -> Result<(u32, String)> {
    let mut f = Fields::new(data, "meta context reply");
    let id = f.u32()?;
    let name = f.string(f.remaining() as u32)?;
    Ok((id, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_and_client_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        assert_eq!(client_flags(3).unwrap(), ClientFlags { no_zeroes: true });
        assert_eq!(client_flags(1).unwrap(), ClientFlags { no_zeroes: false });
        assert!(client_flags(0).is_err());
        assert!(client_flags(5).is_err());
    }

    #[test]
    fn option_requests_round_trip_and_oversized_ones_are_refused_before_reading() {
        let req = OptionRequest {
            option: OPT_GO,
            data: InfoRequest {
                name: "exp".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
            }
            .encode(),
        };
        let wire = req.encode();
        assert_eq!(read_option(&mut &wire[..]).unwrap(), req);
        let info = InfoRequest::decode(&req.data).unwrap();
        assert_eq!(info.name, "exp");
        assert_eq!(info.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);

        // 4 GiB claimed, nothing behind it: refused from the header alone.
        let mut huge = wire[..12].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_option(&mut &huge[..]),
            Err(Error::Protocol(_))
        ));
        let mut bad_magic = wire.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(
            read_option(&mut &bad_magic[..]),
            Err(Error::Protocol(_))
        ));
        // The stream ends inside the payload.
        assert!(matches!(
            read_option(&mut &wire[..wire.len() - 1]),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn info_and_meta_requests_refuse_lying_counts() {
        let mut d = InfoRequest {
            name: String::new(),
            requests: vec![1],
        }
        .encode();
        d[5] = 200; // 200 items in 2 bytes
        assert!(InfoRequest::decode(&d).is_err());
        let mut d = InfoRequest {
            name: "a".into(),
            requests: vec![],
        }
        .encode();
        d[3] = 9; // name longer than the message
        assert!(InfoRequest::decode(&d).is_err());

        let m = MetaRequest {
            name: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaRequest::decode(&m.encode()).unwrap(), m);
        let mut d = m.encode();
        d[7] = 0xff; // 255 queries claimed
        assert!(MetaRequest::decode(&d).is_err());
        let mut d = m.encode();
        d.push(0); // trailing garbage
        assert!(MetaRequest::decode(&d).is_err());
    }

    #[test]
    fn replies_encode_as_the_protocol_lays_them_out() {
        let r = option_reply(OPT_GO, REP_INFO, &info_export(1 << 20, 0x43));
        let head: [u8; 20] = r[..20].try_into().unwrap();
        let h = decode_option_reply(&head).unwrap();
        assert_eq!((h.option, h.reply, h.len), (OPT_GO, REP_INFO, 12));
        assert_eq!(
            decode_info(&r[20..]).unwrap(),
            Some(Info::Export {
                size: 1 << 20,
                flags: 0x43
            })
        );
        let b = BlockSizes {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        };
        assert_eq!(
            decode_info(&info_block_size(b)).unwrap(),
            Some(Info::BlockSize(b))
        );
        assert_eq!(decode_info(&info_text(INFO_NAME, "x")).unwrap(), None);
        assert!(decode_info(&info_export(1, 1)[..9]).is_err());
        assert_eq!(export_name_reply(5, 1, false).len(), 134);
        assert_eq!(export_name_reply(5, 1, true).len(), 10);
        assert_eq!(
            decode_meta_context(&meta_context_entry(7, "base:allocation")).unwrap(),
            (7, "base:allocation".to_string())
        );
        assert_eq!(server_entry("ab", "d"), [0, 0, 0, 2, b'a', b'b', b'd']);
        let mut bad = head;
        bad[16..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(decode_option_reply(&bad).is_err());
    }
}
