//! An NBD export as [`Storage`]: every format works over it. Requests from many threads
//! are in flight at once on one connection ([`Pipeline`]); holes come from
//! `base:allocation`, as qemu-img sees them.

use std::io;

use super::client::Client;
use super::consts::*;
use super::pipeline::Pipeline;
use super::uri::NbdTarget;
use crate::error::Result;
use crate::iovec::{self, IoBufMut};
use crate::storage::{Storage, StorageRun};

/// An open NBD export.
pub struct NbdStorage {
    conn: Pipeline,
    size: u64,
    flags: u16,
    max: u32,
}

impl NbdStorage {
    /// Connect to `target` and negotiate.
    pub fn connect(target: &NbdTarget) -> Result<NbdStorage> {
        let client = Client::connect(target)?;
        Ok(NbdStorage {
            size: client.size,
            flags: client.flags,
            max: client.max_payload,
            conn: client.into_pipeline(),
        })
    }

    /// Whether the server exports read-only.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// Split `len` bytes at `offset` into requests of at most `max` bytes.
    fn pieces(&self, offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        (0..)
            .map(move |i| offset + i * max)
            .take_while(move |&at| at < end)
            .map(move |at| (at, max.min(end - at)))
    }

    fn past_end(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "request past the end of the NBD export",
        )
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        self.conn.disconnect();
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_vectored_at(&[buf.into()], offset)
    }

    /// Each request's data goes from the socket straight into `bufs`.
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
        // Past the end reads as zeroes.
        let len = iovec::total_len(bufs);
        let inside = self.size.saturating_sub(offset).min(len as u64) as usize;
        let mut front = iovec::Front::new(bufs);
        for (at, n) in self.pieces(offset, inside as u64, u64::from(self.max)) {
            self.conn.read(&front.take(n as usize), at)?;
        }
        iovec::zero(&front.take(len - inside));
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(self.past_end());
        }
        let mut done = 0usize;
        for (at, n) in self.pieces(offset, buf.len() as u64, u64::from(self.max)) {
            let data = &buf[done..done + n as usize];
            self.conn.command(CMD_WRITE, 0, at, n as u32, data)?;
            done += n as usize;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.conn.command(CMD_FLUSH, 0, 0, 0, &[])
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "Cannot resize an NBD export",
        ))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = len.min(self.size.saturating_sub(offset));
        if self.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            for (at, n) in self.pieces(offset, len, zeroes.len().max(1) as u64) {
                self.write_at(&zeroes[..n as usize], at)?;
            }
            return Ok(());
        }
        for (at, n) in self.pieces(offset, len, 1 << 30) {
            self.conn.command(CMD_WRITE_ZEROES, 0, at, n as u32, &[])?;
        }
        Ok(())
    }

    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let mut at = offset;
        while at < self.size {
            let len = (self.size - at).min(1 << 31) as u32;
            let extents = self.conn.block_status(at, len)?;
            let mut data_start = None;
            for e in extents.iter() {
                let end = at + u64::from(e.len);
                // Only the zero flag says a run reads as zeroes; a hole without it may
                // not (the NBD spec), so it counts as data.
                match (e.flags & STATE_ZERO != 0, data_start) {
                    (false, None) => data_start = Some(at),
                    (true, Some(s)) => return Ok(Some((s, at))),
                    _ => {}
                }
                at = end.min(self.size);
            }
            if let Some(s) = data_start {
                return Ok(Some((s, at)));
            }
        }
        Ok(None)
    }

    fn run_at(&self, offset: u64, end: u64) -> io::Result<(StorageRun, u64)> {
        let end = end.min(self.size);
        if offset >= end {
            return Ok((StorageRun::Hole, end));
        }
        let len = (end - offset).min(1 << 31) as u32;
        let kind = |flags: u32| match (flags & STATE_HOLE != 0, flags & STATE_ZERO != 0) {
            (false, false) => StorageRun::Data,
            (true, false) => StorageRun::UnsureHole,
            (false, true) => StorageRun::AllocatedZero,
            (true, true) => StorageRun::Hole,
        };
        let extents = self.conn.block_status(offset, len)?;
        let Some(first) = extents.first() else {
            return Ok((StorageRun::Data, end));
        };
        let run = kind(first.flags);
        let mut at = offset;
        for e in extents.iter().take_while(|e| kind(e.flags) == run) {
            at += u64::from(e.len);
        }
        Ok((run, at.clamp(offset + 1, end)))
    }

    fn allocated_size(&self) -> io::Result<u64> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "NBD exports do not report their allocation",
        ))
    }
}
