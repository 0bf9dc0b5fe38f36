//! One transmission request: checked, run against the shared image, and answered with a
//! whole reply (simple, or structured chunks as negotiated) built before it is sent.

use std::io::{self, Write};

use crate::driver::Allocation;
use crate::nbd::consts::*;
use crate::nbd::reply::{self, errno_of};
use crate::nbd::request::Request;
use crate::Error;

use super::export::{extents, Export, WriteCache};
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

/// A reply ready to go: its messages in order, a READ's data between them as ranges of
/// the buffer it was read into.
pub struct Reply {
    parts: Vec<Part>,
}

enum Part {
    Message(Vec<u8>),
    Data { start: usize, len: usize },
}

impl Reply {
    fn message(bytes: Vec<u8>) -> Reply {
        Reply {
            parts: vec![Part::Message(bytes)],
        }
    }

    /// Write the whole reply to `w`; `data` is the buffer a READ was read into.
    pub fn send(&self, data: &[u8], w: &mut impl Write) -> io::Result<()> {
        for p in &self.parts {
            match *p {
                Part::Message(ref m) => w.write_all(m)?,
                Part::Data { start, len } => w.write_all(&data[start..start + len])?,
            }
        }
        Ok(())
    }
}

/// Run `req` (with `payload`, a WRITE's data) and build its reply; a READ reads into
/// `buf`, which keeps its size for the next request.
pub fn answer(
    export: &Export,
    session: &Session,
    req: &Request,
    payload: &[u8],
    buf: &mut Vec<u8>,
) -> Reply {
    let result = check(export, session, req).and_then(|()| match req.command {
        CMD_READ => read(export, session, req, buf),
        CMD_BLOCK_STATUS => block_status(export, session, req),
        _ => execute(export, req, payload).map(|()| Reply::message(ok(req))),
    });
    result.unwrap_or_else(|Refusal(errno, msg)| Reply::message(error(session, req, errno, &msg)))
}

/// Refuse what cannot be done before doing anything: unknown commands and flags, ranges
/// past the end, writes to a read-only export, status without a context.
fn check(export: &Export, session: &Session, req: &Request) -> Result<(), Refusal> {
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
fn execute(export: &Export, req: &Request, data: &[u8]) -> Result<(), Refusal> {
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
    if writes && (fua || export.cache == WriteCache::Through) {
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
) -> Result<Reply, Refusal> {
    let len = req.len as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    export.driver().read_at(&mut buf[..len], req.offset)?;
    if !session.structured {
        return Ok(Reply {
            parts: vec![
                Part::Message(reply::simple(req.cookie, 0).to_vec()),
                Part::Data { start: 0, len },
            ],
        });
    }
    if len == 0 {
        return Ok(Reply::message(reply::done_chunk(req.cookie).to_vec()));
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
    let mut parts = Vec::with_capacity(2 * pieces.len());
    for (i, &(start, n, hole)) in pieces.iter().enumerate() {
        let offset = req.offset + start as u64;
        let done = i == last;
        if hole {
            let h = reply::hole_chunk(req.cookie, offset, n as u32, done);
            parts.push(Part::Message(h.to_vec()));
        } else {
            let h = reply::data_chunk(req.cookie, offset, n as u32, done);
            parts.push(Part::Message(h.to_vec()));
            parts.push(Part::Data { start, len: n });
        }
    }
    Ok(Reply { parts })
}

/// NBD_CMD_BLOCK_STATUS: one chunk per selected context.
fn block_status(export: &Export, session: &Session, req: &Request) -> Result<Reply, Refusal> {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let runs = export.runs(req.offset, u64::from(req.len), one)?;
    let last = session.contexts.len() - 1;
    let parts = session
        .contexts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ext = extents(*c, &runs, one);
            Part::Message(reply::block_status_chunk(
                req.cookie,
                c.id(),
                &ext,
                i == last,
            ))
        })
        .collect();
    Ok(Reply { parts })
}

/// Success of a command without payload: a simple reply, structured replies or not (as
/// qemu-nbd answers).
fn ok(req: &Request) -> Vec<u8> {
    reply::simple(req.cookie, 0).to_vec()
}

fn error(session: &Session, req: &Request, errno: u32, msg: &str) -> Vec<u8> {
    if session.structured {
        reply::error_chunk(req.cookie, errno, msg, None)
    } else {
        reply::simple(req.cookie, errno).to_vec()
    }
}
