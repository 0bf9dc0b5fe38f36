//! An NBD client connection: the fixed newstyle handshake (structured replies and
//! `base:allocation` when the server has them, then NBD_OPT_GO), and requests sent one at a
//! time with their replies checked against what was asked.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use super::consts::*;
use super::handshake::{self, BlockSizes, Info, InfoRequest, MetaRequest, OptionRequest};
use super::reply::{self, Extent, ReplyHeader};
use super::request::Request;
use super::uri::{Endpoint, NbdTarget};
use crate::error::{Error, Result};

/// A connected socket of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A protocol violation by the server, as an I/O error of kind `InvalidData`.
fn broken(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// An engine error from the handshake as an I/O error.
fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        e => broken(e.to_string()),
    }
}

/// One connection in the transmission phase.
pub struct Client {
    r: BufReader<Stream>,
    w: BufWriter<Stream>,
    cookie: u64,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The id of `base:allocation`, when the server gave it.
    pub base_allocation: Option<u32>,
    structured: bool,
    /// The largest request payload, from the server's block sizes (and our limit).
    pub max_payload: u32,
}

impl Client {
    /// Connect to `target` and negotiate.
    pub fn connect(target: &NbdTarget) -> Result<Client> {
        let (stream, at) = match &target.endpoint {
            Endpoint::Unix(p) => (
                UnixStream::connect(p).map(Stream::Unix),
                p.display().to_string(),
            ),
            Endpoint::Tcp { host, port } => (
                TcpStream::connect((host.as_str(), *port))
                    .and_then(|s| s.set_nodelay(true).map(|()| Stream::Tcp(s))),
                format!("{host}:{port}"),
            ),
        };
        let failed = |e| Error::io(format!("Failed to connect to '{at}'"), e);
        let stream = stream.map_err(failed)?;
        let clone = stream.try_clone().map_err(failed)?;
        let mut c = Client {
            r: BufReader::new(stream),
            w: BufWriter::with_capacity(64 << 10, clone),
            cookie: 0,
            size: 0,
            flags: 0,
            base_allocation: None,
            structured: false,
            max_payload: MAX_PAYLOAD,
        };
        if let Err(e) = c.handshake(&target.export) {
            // Tell the server we are going (it may be gone already).
            let _ = c.option(OPT_ABORT, vec![]);
            return Err(e);
        }
        Ok(c)
    }

    fn handshake(&mut self, export: &str) -> Result<()> {
        let mut g = [0u8; 18];
        handshake::read_all(&mut self.r, &mut g, "server greeting")?;
        let flags = u16::from_be_bytes([g[16], g[17]]);
        if g[..8] != NBD_MAGIC.to_be_bytes()
            || g[8..16] != IHAVEOPT.to_be_bytes()
            || flags & FLAG_FIXED_NEWSTYLE == 0
        {
            return Err(Error::Protocol(
                "Server does not speak fixed newstyle NBD".into(),
            ));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.send(&cflags.to_be_bytes())?;

        self.option(OPT_STRUCTURED_REPLY, vec![])?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        self.structured = kind == REP_ACK;
        if self.structured {
            let data = MetaRequest {
                name: export.to_string(),
                queries: vec![CONTEXT_BASE_ALLOCATION.to_string()],
            }
            .encode();
            self.option(OPT_SET_META_CONTEXT, data)?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT => {
                        let (id, name) = handshake::decode_meta_context(&data)?;
                        if name == CONTEXT_BASE_ALLOCATION {
                            self.base_allocation = Some(id);
                        }
                    }
                    _ => break,
                }
            }
        }
        let data = InfoRequest {
            name: export.to_string(),
            requests: vec![INFO_BLOCK_SIZE],
        }
        .encode();
        self.option(OPT_GO, data)?;
        let mut export_info = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO => match handshake::decode_info(&data)? {
                    Some(Info::Export { size, flags }) => export_info = Some((size, flags)),
                    Some(Info::BlockSize(BlockSizes { max, .. })) => {
                        self.max_payload = max.clamp(512, MAX_PAYLOAD)
                    }
                    None => {}
                },
                REP_ACK => break,
                k if k & REP_FLAG_ERROR != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(Error::invalid(format!(
                        "Requested export not available\nserver reported: {msg}"
                    )));
                }
                k => {
                    return Err(Error::Protocol(format!(
                        "unexpected reply {k:#x} to NBD_OPT_GO"
                    )))
                }
            }
        }
        let (size, flags) = export_info
            .ok_or_else(|| Error::Protocol("server did not describe the export".into()))?;
        self.size = size;
        self.flags = flags;
        Ok(())
    }

    fn option(&mut self, option: u32, data: Vec<u8>) -> Result<()> {
        self.send(&OptionRequest { option, data }.encode())
    }

    /// One reply to `option`: its type and data (length checked before reading).
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut head = [0u8; 20];
        handshake::read_all(&mut self.r, &mut head, "option reply")?;
        let h = handshake::decode_option_reply(&head)?;
        if h.option != option {
            return Err(Error::Protocol(format!(
                "reply to option {} when {option} was sent",
                h.option
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        handshake::read_all(&mut self.r, &mut data, "option reply")?;
        Ok((h.reply, data))
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.w
            .write_all(bytes)
            .and_then(|()| self.w.flush())
            .map_err(|e| Error::io("sending to the NBD server", e))
    }

    /// Send a request (and a write's payload); its cookie.
    fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        self.cookie += 1;
        let req = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            len,
        };
        self.w.write_all(&req.encode())?;
        self.w.write_all(data)?;
        self.w.flush()?;
        Ok(self.cookie)
    }

    /// The reply header of request `cookie`, and for a chunk its payload length.
    fn reply_head(&mut self, cookie: u64) -> io::Result<(ReplyHeader, u32)> {
        let mut head = [0u8; 16];
        self.r.read_exact(&mut head)?;
        let h = reply::decode_reply(&head).map_err(to_io)?;
        let (got, len) = match h {
            ReplyHeader::Simple { cookie, .. } => (cookie, 0),
            ReplyHeader::Chunk { cookie, .. } => {
                let mut tail = [0u8; 4];
                self.r.read_exact(&mut tail)?;
                (cookie, reply::chunk_len(tail).map_err(to_io)?)
            }
        };
        if got != cookie {
            return Err(broken(format!(
                "reply for request {got}, expected {cookie}"
            )));
        }
        Ok((h, len))
    }

    /// A chunk's payload, `len` bytes (already checked against the limit).
    fn payload(&mut self, len: u32) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v)?;
        Ok(v)
    }

    /// An error chunk's payload as the error it reports.
    fn chunk_error(&mut self, len: u32) -> io::Error {
        match self.payload(len) {
            Ok(data) => match reply::decode_error(&data) {
                Ok((errno, _)) => io::Error::from_raw_os_error(errno as i32),
                Err(e) => to_io(e),
            },
            Err(e) => e,
        }
    }

    /// A command answered with success or an error.
    pub fn command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let cookie = self.request(command, flags, offset, len, data)?;
        let mut result = Ok(());
        loop {
            let (h, len) = self.reply_head(cookie)?;
            match h {
                ReplyHeader::Simple { error: 0, .. } => return result,
                ReplyHeader::Simple { error, .. } => {
                    return Err(io::Error::from_raw_os_error(error as i32))
                }
                ReplyHeader::Chunk { flags, kind, .. } => {
                    if kind & (1 << 15) != 0 {
                        result = Err(self.chunk_error(len));
                    } else {
                        self.payload(len)?;
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return result;
                    }
                }
            }
        }
    }

    /// Read `buf.len()` (at most `max_payload`) bytes at `offset`.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cookie = self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        let mut result = Ok(());
        loop {
            let (h, len) = self.reply_head(cookie)?;
            let (flags, kind) = match h {
                ReplyHeader::Simple { error: 0, .. } => return self.r.read_exact(buf),
                ReplyHeader::Simple { error, .. } => {
                    return Err(io::Error::from_raw_os_error(error as i32))
                }
                ReplyHeader::Chunk { flags, kind, .. } => (flags, kind),
            };
            let within = |at: u64, n: u64| -> io::Result<usize> {
                match at.checked_sub(offset) {
                    Some(rel) if rel + n <= buf.len() as u64 => Ok(rel as usize),
                    _ => Err(broken("read reply chunk outside the request")),
                }
            };
            match kind {
                REPLY_TYPE_OFFSET_DATA if len >= 8 => {
                    let mut at = [0u8; 8];
                    self.r.read_exact(&mut at)?;
                    let n = (len - 8) as usize;
                    let rel = within(u64::from_be_bytes(at), n as u64)?;
                    self.r.read_exact(&mut buf[rel..rel + n])?;
                }
                REPLY_TYPE_OFFSET_HOLE if len == 12 => {
                    let data = self.payload(len)?;
                    let at = u64::from_be_bytes(data[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(data[8..].try_into().unwrap()) as usize;
                    let rel = within(at, n as u64)?;
                    buf[rel..rel + n].fill(0);
                }
                REPLY_TYPE_NONE if len == 0 => {}
                k if k & (1 << 15) != 0 => result = Err(self.chunk_error(len)),
                k => return Err(broken(format!("unexpected read reply chunk type {k}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return result;
            }
        }
    }

    /// `base:allocation` descriptors from `offset` over at most `len` bytes.
    pub fn block_status(&mut self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let Some(id) = self.base_allocation else {
            return Ok(vec![Extent { len, flags: 0 }]);
        };
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut extents = Vec::new();
        let mut result = Ok(());
        loop {
            let (h, n) = self.reply_head(cookie)?;
            let (flags, kind) = match h {
                ReplyHeader::Simple { error, .. } if error != 0 => {
                    return Err(io::Error::from_raw_os_error(error as i32))
                }
                ReplyHeader::Simple { .. } => return Err(broken("block status without chunks")),
                ReplyHeader::Chunk { flags, kind, .. } => (flags, kind),
            };
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    let data = self.payload(n)?;
                    let (ctx, ext) = reply::decode_block_status(&data).map_err(to_io)?;
                    if ctx == id {
                        extents = ext;
                    }
                }
                k if k & (1 << 15) != 0 => result = Err(self.chunk_error(n)),
                _ => {
                    self.payload(n)?;
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                result?;
                if extents.is_empty() || extents.iter().any(|e| e.len == 0) {
                    return Err(broken("block status reply without usable extents"));
                }
                return Ok(extents);
            }
        }
    }

    /// Say goodbye (NBD_CMD_DISC); the server sends no reply.
    pub fn disconnect(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
