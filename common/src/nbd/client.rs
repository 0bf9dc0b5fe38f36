//! An NBD client connection: the fixed newstyle handshake (structured replies and
//! `base:allocation` when the server has them, then NBD_OPT_GO), after which the
//! connection becomes a [`Pipeline`] for the transmission phase.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use super::consts::*;
use super::handshake::{self, BlockSizes, Info, InfoRequest, MetaRequest, OptionRequest};
use super::pipeline::Pipeline;
use super::uri::{Endpoint, NbdTarget};
use crate::error::{Error, Result};

/// A connected socket of either kind.
pub(super) enum Stream {
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

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
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
pub(super) fn broken(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// An engine error from the handshake as an I/O error.
pub(super) fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        e => broken(e.to_string()),
    }
}

/// One connection during the handshake.
pub struct Client {
    r: BufReader<Stream>,
    w: BufWriter<Stream>,
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

    /// The transmission phase: requests in flight from many threads at once.
    pub fn into_pipeline(self) -> Pipeline {
        Pipeline::new(self.r, self.w, self.base_allocation)
    }
}
