//! The transmission phase with one client: requests read and answered one at a time
//! against the shared image, simple or structured replies as negotiated.

use std::io::{self, ErrorKind, Read, Write};

use common::driver::Allocation;
use common::nbd::consts::*;
use common::nbd::reply::{self, errno_of};
use common::nbd::request::{Request, REQUEST_LEN};
use common::{Error, Result};

use super::export::{extents, Export};
use super::negotiate::Session;

/// The flags each command accepts.
fn allowed_flags(command: u16) -> Option<u16> {
    Some(match command {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_DISC | CMD_FLUSH | CMD_CACHE => 0,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

/// A request refused with an NBD error number and a message (for structured replies).
struct Refusal(u32, String);

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal(errno_of(&e), e.to_string())
    }
}

/// Serve requests until the client disconnects (NBD_CMD_DISC or end of stream between
/// requests). A broken request (bad magic, a payload over the limit, the stream ending
/// mid-message) ends the connection with an error; the image is not touched by it.
pub fn transmit(
    export: &Export,
    session: &Session,
    r: &mut impl Read,
    w: &mut impl Write,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut head = [0u8; REQUEST_LEN];
        if !read_request_head(r, &mut head)? {
            return Ok(());
        }
        let req = Request::decode(&head)?;
        let payload = req.payload_len()?;
        buf.resize(payload, 0);
        r.read_exact(&mut buf[..payload])
            .map_err(|e| Error::io("reading write payload", e))?;
        if req.command == CMD_DISC {
            return Ok(());
        }
        let sent = match check(export, session, &req) {
            Err(Refusal(errno, msg)) => send_error(w, session, &req, errno, &msg),
            Ok(()) => match req.command {
                CMD_READ => read(export, session, &req, &mut buf, w),
                CMD_BLOCK_STATUS => block_status(export, session, &req, w),
                _ => match execute(export, &req, &buf[..payload]) {
                    Ok(()) => send_ok(w, &req),
                    Err(Refusal(errno, msg)) => send_error(w, session, &req, errno, &msg),
                },
            },
        };
        sent.and_then(|()| w.flush())
            .map_err(|e| Error::io("sending to the client", e))?;
    }
}

/// Read a request header; `false` when the client closed the connection before it.
fn read_request_head(r: &mut impl Read, head: &mut [u8; REQUEST_LEN]) -> Result<bool> {
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(Error::io(
                    "reading request",
                    io::Error::from(ErrorKind::UnexpectedEof),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading request", e)),
        }
    }
    Ok(true)
}

/// Refuse what cannot be done before doing anything: unknown commands and flags, ranges
/// past the end, writes to a read-only export, status without a context.
fn check(export: &Export, session: &Session, req: &Request) -> std::result::Result<(), Refusal> {
    let bad = |m: &str| Err(Refusal(EINVAL, m.to_string()));
    let Some(allowed) = allowed_flags(req.command) else {
        return bad(&format!("unknown command {}", req.command));
    };
    if req.flags & !allowed != 0 {
        return bad(&format!("unsupported flags {:#x}", req.flags));
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    let size = export.size();
    let ranged = req.command != CMD_FLUSH;
    if ranged && (req.offset > size || u64::from(req.len) > size - req.offset) {
        let errno = if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err(Refusal(errno, "operation past EOF".into()));
    }
    if req.command == CMD_FLUSH && (req.offset != 0 || req.len != 0) {
        return bad("flush with offset or length");
    }
    if writes && export.read_only() {
        return Err(Refusal(EPERM, "export is read-only".into()));
    }
    match req.command {
        CMD_READ if req.len > MAX_PAYLOAD => bad("read larger than 32 MiB"),
        CMD_BLOCK_STATUS if session.contexts.is_empty() => {
            bad("no meta context negotiated for block status")
        }
        CMD_BLOCK_STATUS if req.len == 0 => bad("block status of zero bytes"),
        _ => Ok(()),
    }
}

/// Do a command that answers with success or an error only.
fn execute(export: &Export, req: &Request, data: &[u8]) -> std::result::Result<(), Refusal> {
    let d = export.driver();
    let (offset, len) = (req.offset, u64::from(req.len));
    match req.command {
        CMD_WRITE => d.write_at(data, offset)?,
        CMD_FLUSH => d.flush()?,
        CMD_TRIM => d.discard(offset, len)?,
        CMD_WRITE_ZEROES => {
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            // A raw file zeroed without unmapping gets zeroes written, which is not fast.
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !may_unmap && d.format_name() == "raw" {
                return Err(Refusal(ENOTSUP, "fast zeroing not possible".into()));
            }
            d.write_zeroes(offset, len, may_unmap)?
        }
        // Advisory: the data is read on demand anyway.
        CMD_CACHE => {}
        c => return Err(Refusal(EINVAL, format!("unknown command {c}"))),
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writes && (fua || export.cache == super::export::WriteCache::Through) {
        d.flush()?;
    }
    Ok(())
}

/// NBD_CMD_READ: the data in one simple reply, or structured data and hole chunks.
fn read(
    export: &Export,
    session: &Session,
    req: &Request,
    buf: &mut Vec<u8>,
    w: &mut impl Write,
) -> io::Result<()> {
    let len = req.len as usize;
    buf.resize(len, 0);
    if let Err(e) = export.driver().read_at(&mut buf[..len], req.offset) {
        return send_error(w, session, req, errno_of(&e), &e.to_string());
    }
    if !session.structured {
        w.write_all(&reply::simple(req.cookie, 0))?;
        return w.write_all(&buf[..len]);
    }
    if len == 0 {
        return w.write_all(&reply::done_chunk(req.cookie));
    }
    // Without DF, runs that read as zeroes go as holes.
    let runs = if req.flags & CMD_FLAG_DF != 0 {
        Vec::new()
    } else {
        // Without a status, everything goes as data.
        export
            .runs(req.offset, len as u64, false)
            .unwrap_or_default()
    };
    let mut pieces: Vec<(usize, usize, bool)> = Vec::new();
    let mut at = 0usize;
    for r in &runs {
        let hole = matches!(r.allocation, Allocation::Zero | Allocation::Unallocated);
        let n = r.len as usize;
        match pieces.last_mut() {
            Some(p) if p.2 == hole => p.1 += n,
            _ => pieces.push((at, n, hole)),
        }
        at += n;
    }
    if at < len {
        pieces.push((at, len - at, false));
    }
    let last = pieces.len() - 1;
    for (i, &(start, n, hole)) in pieces.iter().enumerate() {
        let offset = req.offset + start as u64;
        if hole {
            w.write_all(&reply::hole_chunk(req.cookie, offset, n as u32, i == last))?;
        } else {
            w.write_all(&reply::data_chunk(req.cookie, offset, n as u32, i == last))?;
            w.write_all(&buf[start..start + n])?;
        }
    }
    Ok(())
}

/// NBD_CMD_BLOCK_STATUS: one chunk per selected context.
fn block_status(
    export: &Export,
    session: &Session,
    req: &Request,
    w: &mut impl Write,
) -> io::Result<()> {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let runs = match export.runs(req.offset, u64::from(req.len), one) {
        Ok(r) => r,
        Err(e) => return send_error(w, session, req, errno_of(&e), &e.to_string()),
    };
    let last = session.contexts.len() - 1;
    for (i, c) in session.contexts.iter().enumerate() {
        let ext = extents(*c, &runs, one);
        w.write_all(&reply::block_status_chunk(
            req.cookie,
            c.id(),
            &ext,
            i == last,
        ))?;
    }
    Ok(())
}

/// Success of a command without payload: a simple reply, structured replies or not (as
/// qemu-nbd answers).
fn send_ok(w: &mut impl Write, req: &Request) -> io::Result<()> {
    w.write_all(&reply::simple(req.cookie, 0))
}

fn send_error(
    w: &mut impl Write,
    session: &Session,
    req: &Request,
    errno: u32,
    msg: &str,
) -> io::Result<()> {
    if session.structured {
        w.write_all(&reply::error_chunk(req.cookie, errno, msg, None))
    } else {
        w.write_all(&reply::simple(req.cookie, errno))
    }
}
