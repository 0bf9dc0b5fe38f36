//! Many requests in flight on one NBD connection, as QEMU's client keeps them. A thread
//! registers its request, sends it under the send lock and waits; whichever waiter finds
//! nobody reading takes the reading turn and keeps it until its own request is answered:
//! each reply message goes to the request it answers (chunks of structured replies to
//! different requests may interleave), and only that request's thread is woken when it is
//! done. Leaving, the reader hands the turn to one thread still waiting. A broken
//! connection fails every request in flight and every later one; an error the server
//! reports fails only its request.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, Thread};

use super::client::{broken, to_io, Stream};
use super::consts::*;
use super::reply::{self, Extent, ReplyHeader};
use super::request::Request;
use crate::iovec::{self, IoBufMut, Segment};

/// The connection's two directions and the requests waiting for replies.
pub struct Pipeline {
    tx: Mutex<Sender>,
    rx: Mutex<BufReader<Stream>>,
    state: Mutex<State>,
    base_allocation: Option<u32>,
}

struct Sender {
    w: BufWriter<Stream>,
    cookie: u64,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Slot>,
    /// A waiter is reading a reply message.
    reading: bool,
    /// Why the connection broke; from then on every request fails.
    lost: Option<(io::ErrorKind, String)>,
}

/// Where a request's reply goes.
enum Want {
    /// A read of the bytes at `offset` that land in `bufs` (the waiting caller's
    /// buffers, untouched by it until the request is done).
    Read {
        bufs: Vec<IoBufMut<'static>>,
        offset: u64,
    },
    /// `base:allocation` descriptors from context `id`.
    Status {
        id: u32,
    },
    Command,
}

struct Slot {
    want: Want,
    /// The error the server reported (the request still runs to its last chunk).
    error: Option<io::Error>,
    extents: Vec<Extent>,
    done: bool,
    /// The thread waiting for it: unparked when it is done or is handed the reading turn.
    owner: Thread,
}

// SAFETY: the buffers of a `Want::Read` are written only by the thread holding the
// reading turn, while their owner waits for the request to be done.
unsafe impl Send for Slot {}

/// One reply message: the request it answers, and whether it ends that request.
struct Answer {
    cookie: u64,
    last: bool,
    error: Option<io::Error>,
    extents: Option<Vec<Extent>>,
}

fn lost_error(kind: io::ErrorKind, msg: &str) -> io::Error {
    match kind {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::NotConnected => io::Error::new(
            io::ErrorKind::NotConnected,
            "Connection to the NBD server was lost",
        ),
        _ => io::Error::new(kind, msg.to_string()),
    }
}

impl Pipeline {
    /// The transmission phase on a negotiated connection.
    pub(super) fn new(
        r: BufReader<Stream>,
        w: BufWriter<Stream>,
        base_allocation: Option<u32>,
    ) -> Pipeline {
        Pipeline {
            tx: Mutex::new(Sender { w, cookie: 0 }),
            rx: Mutex::new(r),
            state: Mutex::new(State::default()),
            base_allocation,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fill `bufs` (at most the export's largest payload in all) from `offset`; the
    /// data goes from the socket straight into them.
    pub fn read(&self, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
        let len = iovec::total_len(bufs);
        // SAFETY: the same memory, its lifetime erased for the slot: `call` returns only
        // once the request is done, and nothing writes into a done request's buffers.
        let bufs = bufs
            .iter()
            .map(|b| unsafe { IoBufMut::new(b.as_mut_ptr(), b.len()) })
            .collect();
        let want = Want::Read { bufs, offset };
        self.call(CMD_READ, 0, offset, len as u32, &[], want)
            .map(drop)
    }

    /// A command answered with success or an error (a write sends `data`).
    pub fn command(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        self.call(command, flags, offset, len, data, Want::Command)
            .map(drop)
    }

    /// `base:allocation` descriptors from `offset` over at most `len` bytes (all data
    /// when the server has no such context).
    pub fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let Some(id) = self.base_allocation else {
            return Ok(vec![Extent { len, flags: 0 }]);
        };
        self.call(CMD_BLOCK_STATUS, 0, offset, len, &[], Want::Status { id })
    }

    /// Say goodbye (NBD_CMD_DISC, which has no reply), unless the connection is gone.
    pub fn disconnect(&self) {
        if self.state().lost.is_none() {
            let _ = self.send(CMD_DISC, 0, 0, 0, &[], None);
        }
    }

    fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        want: Want,
    ) -> io::Result<Vec<Extent>> {
        let cookie = self.send(command, flags, offset, len, data, Some(want))?;
        self.wait(cookie)
    }

    /// Register (with `want`) and send a request; its cookie.
    fn send(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        want: Option<Want>,
    ) -> io::Result<u64> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.cookie += 1;
        let cookie = tx.cookie;
        {
            let mut st = self.state();
            if let Some((kind, msg)) = &st.lost {
                return Err(lost_error(*kind, msg));
            }
            if let Some(want) = want {
                let slot = Slot {
                    want,
                    error: None,
                    extents: Vec::new(),
                    done: false,
                    owner: thread::current(),
                };
                st.slots.insert(cookie, slot);
            }
        }
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        let sent =
            tx.w.write_all(&req.encode())
                .and_then(|()| tx.w.write_all(data))
                .and_then(|()| tx.w.flush());
        drop(tx);
        if let Err(e) = sent {
            let mut st = self.state();
            self.lose(&mut st, &e);
            st.slots.remove(&cookie);
            return Err(lost_error(e.kind(), &e.to_string()));
        }
        Ok(cookie)
    }

    /// Wait for request `cookie` to be answered, reading replies while nobody else does.
    fn wait(&self, cookie: u64) -> io::Result<Vec<Extent>> {
        let mut st = self.state();
        loop {
            if st.slots.get(&cookie).is_none_or(|s| s.done) {
                let slot = st
                    .slots
                    .remove(&cookie)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "request lost"))?;
                return match slot.error {
                    Some(e) => Err(e),
                    None => Ok(slot.extents),
                };
            }
            if st.reading {
                // Woken when done or handed the turn (or spuriously: the loop looks again).
                drop(st);
                thread::park();
                st = self.state();
                continue;
            }
            st.reading = true;
            drop(st);
            st = self.read_until_done(cookie);
        }
    }

    /// Holding the reading turn, read reply messages until request `cookie` is done (or
    /// the connection is lost), then hand the turn to a thread still waiting.
    fn read_until_done(&self, cookie: u64) -> MutexGuard<'_, State> {
        loop {
            let answer = self.read_answer();
            let mut st = self.state();
            match answer {
                Ok(a) => Self::apply(&mut st, a),
                Err(e) => self.lose(&mut st, &e),
            }
            if st.slots.get(&cookie).is_none_or(|s| s.done) {
                st.reading = false;
                if let Some(next) = st.slots.values().find(|s| !s.done) {
                    next.owner.unpark();
                }
                return st;
            }
        }
    }

    /// Record reply message `a` in its request's slot; wake the request's thread once it
    /// is done (the reader itself is awake).
    fn apply(st: &mut State, a: Answer) {
        if let Some(slot) = st.slots.get_mut(&a.cookie) {
            if a.error.is_some() {
                slot.error = a.error;
            }
            if let Some(ext) = a.extents {
                slot.extents = ext;
            }
            slot.done |= a.last;
            if slot.done && slot.owner.id() != thread::current().id() {
                slot.owner.unpark();
            }
        }
    }

    /// The connection broke with `e`: every request in flight fails.
    fn lose(&self, st: &mut State, e: &io::Error) {
        if st.lost.is_none() {
            st.lost = Some((e.kind(), e.to_string()));
        }
        let (kind, msg) = st.lost.clone().expect("set above");
        for slot in st.slots.values_mut().filter(|s| !s.done) {
            slot.error = Some(lost_error(kind, &msg));
            slot.done = true;
            slot.owner.unpark();
        }
    }

    /// How request `cookie` wants its reply, copied out of its slot.
    fn want_of(&self, cookie: u64) -> io::Result<WantCopy> {
        let st = self.state();
        match st.slots.get(&cookie) {
            Some(s) if !s.done => Ok(match &s.want {
                Want::Read { bufs, offset } => WantCopy::Read {
                    // SAFETY: the slot's buffers, under the same contract.
                    bufs: bufs
                        .iter()
                        .map(|b| unsafe { IoBufMut::new(b.as_mut_ptr(), b.len()) })
                        .collect(),
                    offset: *offset,
                },
                Want::Status { id } => WantCopy::Status { id: *id },
                Want::Command => WantCopy::Command,
            }),
            _ => Err(broken(format!("reply for unknown request {cookie}"))),
        }
    }

    /// Read one reply message (a simple reply or one chunk) off the socket, data going
    /// straight into the buffer of the read it answers. An `Err` breaks the connection.
    fn read_answer(&self) -> io::Result<Answer> {
        let mut guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let r = &mut *guard;
        let mut head = [0u8; 16];
        r.read_exact(&mut head)?;
        let h = reply::decode_reply(&head).map_err(to_io)?;
        let (cookie, chunk) = match h {
            ReplyHeader::Simple { cookie, .. } => (cookie, None),
            ReplyHeader::Chunk {
                cookie,
                flags,
                kind,
            } => {
                let mut tail = [0u8; 4];
                r.read_exact(&mut tail)?;
                (
                    cookie,
                    Some((flags, kind, reply::chunk_len(tail).map_err(to_io)?)),
                )
            }
        };
        let want = self.want_of(cookie)?;
        let mut a = Answer {
            cookie,
            last: true,
            error: None,
            extents: None,
        };
        let Some((flags, kind, len)) = chunk else {
            let ReplyHeader::Simple { error, .. } = h else {
                unreachable!("a chunk has its length")
            };
            match (error, want) {
                (0, WantCopy::Read { bufs, .. }) => {
                    for b in &bufs {
                        read_raw(r, *b)?;
                    }
                }
                (0, WantCopy::Status { .. }) => return Err(broken("block status without chunks")),
                (0, WantCopy::Command) => {}
                (e, _) => a.error = Some(io::Error::from_raw_os_error(e as i32)),
            }
            return Ok(a);
        };
        a.last = flags & REPLY_FLAG_DONE != 0;
        if kind & (1 << 15) != 0 {
            let data = payload(r, len)?;
            let (errno, _) = reply::decode_error(&data).map_err(to_io)?;
            a.error = Some(io::Error::from_raw_os_error(errno as i32));
            return Ok(a);
        }
        let status = matches!(want, WantCopy::Status { .. });
        match want {
            WantCopy::Read { bufs, offset } => read_chunk(r, kind, len, &bufs, offset)?,
            WantCopy::Status { id } if kind == REPLY_TYPE_BLOCK_STATUS => {
                let data = payload(r, len)?;
                let (ctx, ext) = reply::decode_block_status(&data).map_err(to_io)?;
                if ctx == id {
                    a.extents = Some(ext);
                }
            }
            WantCopy::Status { .. } | WantCopy::Command => drop(payload(r, len)?),
        }
        if a.last && status {
            self.check_extents(cookie, a.extents.as_deref())?;
        }
        Ok(a)
    }

    /// A block status request ends with usable extents (from this chunk or an earlier one).
    fn check_extents(&self, cookie: u64, now: Option<&[Extent]>) -> io::Result<()> {
        let st = self.state();
        let earlier = st.slots.get(&cookie).map(|s| &s.extents[..]);
        let ext = now.or(earlier).unwrap_or(&[]);
        let failed = st.slots.get(&cookie).is_some_and(|s| s.error.is_some());
        if !failed && (ext.is_empty() || ext.iter().any(|e| e.len == 0)) {
            return Err(broken("block status reply without usable extents"));
        }
        Ok(())
    }
}

/// [`Want`] copied out of its slot for the reader.
enum WantCopy {
    Read {
        bufs: Vec<IoBufMut<'static>>,
        offset: u64,
    },
    Status {
        id: u32,
    },
    Command,
}

/// A chunk's payload, `len` bytes (already checked against the limit).
fn payload(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// A read reply chunk of type `kind` and `len` payload bytes into `bufs`, the buffers of
/// the read at `offset`: data and holes must lie inside them.
fn read_chunk(
    r: &mut BufReader<Stream>,
    kind: u16,
    len: u32,
    bufs: &[IoBufMut<'_>],
    offset: u64,
) -> io::Result<()> {
    let total = iovec::total_len(bufs) as u64;
    let within = |at: u64, n: u64| -> io::Result<Vec<IoBufMut<'_>>> {
        match at.checked_sub(offset) {
            Some(rel) if rel + n <= total => {
                let mut f = iovec::Front::new(bufs);
                f.take(rel as usize);
                Ok(f.take(n as usize))
            }
            _ => Err(broken("read reply chunk outside the request")),
        }
    };
    match kind {
        REPLY_TYPE_OFFSET_DATA if len >= 8 => {
            let mut at = [0u8; 8];
            r.read_exact(&mut at)?;
            for b in within(u64::from_be_bytes(at), u64::from(len - 8))? {
                read_raw(r, b)?;
            }
            Ok(())
        }
        REPLY_TYPE_OFFSET_HOLE if len == 12 => {
            let data = payload(r, len)?;
            let at = u64::from_be_bytes(data[..8].try_into().expect("12 bytes"));
            let n = u32::from_be_bytes(data[8..].try_into().expect("12 bytes"));
            iovec::zero(&within(at, u64::from(n))?);
            Ok(())
        }
        REPLY_TYPE_NONE if len == 0 => Ok(()),
        k => Err(broken(format!("unexpected read reply chunk type {k}"))),
    }
}

/// Fill `dst` from the socket: what the reader holds buffered, then straight from the
/// socket into the buffer (no copy through this process's memory), in one receive that
/// waits for all of it unless a signal cuts it short.
fn read_raw(r: &mut BufReader<Stream>, dst: IoBufMut<'_>) -> io::Result<()> {
    let held = r.buffer();
    let mut done = held.len().min(dst.len());
    dst.sub(0, done).copy_from(&held[..done]);
    r.consume(done);
    let fd = r.get_ref().as_raw_fd();
    while done < dst.len() {
        let rest = dst.sub(done, dst.len() - done);
        // SAFETY: `rest` is writable memory of that length (IoBufMut's contract); the
        // kernel writes into it and no reference to it is formed.
        let n = unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_WAITALL) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::request::REQUEST_LEN;
    use std::os::unix::net::UnixStream;

    /// The byte at `at` of the fake export.
    fn byte(at: u64) -> u8 {
        (at % 251) as u8
    }

    /// Six threads read at once; the server answers only when all six requests are in,
    /// in reverse order, each read split in two chunks that interleave with the others'
    /// (first halves newest first, then second halves oldest first), and one read failing
    /// with an error chunk: every thread gets its own bytes or its own error.
    #[test]
    fn interleaved_replies_reach_their_requests() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let p = Pipeline::new(
            BufReader::new(Stream::Unix(ours.try_clone().unwrap())),
            BufWriter::new(Stream::Unix(ours)),
            None,
        );
        let n = 6;
        let server = std::thread::spawn(move || {
            let mut s = theirs;
            let mut reqs = Vec::new();
            for _ in 0..n {
                let mut b = [0u8; REQUEST_LEN];
                s.read_exact(&mut b).unwrap();
                reqs.push(Request::decode(&b).unwrap());
            }
            let half = |r: &Request, second: bool| {
                let h = u64::from(r.len / 2);
                let (at, len) = if second {
                    (r.offset + h, u64::from(r.len) - h)
                } else {
                    (r.offset, h)
                };
                let mut m = reply::data_chunk(r.cookie, at, len as u32, second).to_vec();
                m.extend((at..at + len).map(byte));
                m
            };
            for r in reqs.iter().rev() {
                s.write_all(&half(r, false)).unwrap();
            }
            for r in &reqs {
                let last = if r.offset == 3 << 20 {
                    reply::error_chunk(r.cookie, EIO, "bad sector", None)
                } else {
                    half(r, true)
                };
                s.write_all(&last).unwrap();
            }
        });
        std::thread::scope(|sc| {
            for t in 0..n as u64 {
                let p = &p;
                sc.spawn(move || {
                    let offset = t << 20;
                    let mut buf = vec![0u8; 4096 + t as usize * 1000];
                    let r = p.read(&[(&mut buf[..]).into()], offset);
                    if t == 3 {
                        assert_eq!(r.unwrap_err().raw_os_error(), Some(EIO as i32));
                    } else {
                        r.unwrap();
                        let want: Vec<u8> = (offset..offset + buf.len() as u64).map(byte).collect();
                        assert_eq!(buf, want, "thread {t}");
                    }
                });
            }
        });
        server.join().unwrap();
        // The server is gone: the next request fails as a lost connection, at once.
        let mut buf = [0u8; 512];
        let e = p.read(&[(&mut buf[..]).into()], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected, "{e}");
        let e = p.command(CMD_FLUSH, 0, 0, 0, &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected, "{e}");
    }

    /// Sixteen threads read 64 times each from overlapping places; the server answers
    /// whatever has arrived once nothing more comes for a moment, in a shuffled order, each
    /// read in two chunks (all first halves, then all second halves, shuffled again). Every
    /// read gets its own bytes and no thread is left waiting (a lost wake-up hangs it).
    #[test]
    fn many_threads_with_shuffled_replies_all_finish() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let p = std::sync::Arc::new(Pipeline::new(
            BufReader::new(Stream::Unix(ours.try_clone().unwrap())),
            BufWriter::new(Stream::Unix(ours)),
            None,
        ));
        let (threads, per) = (16u64, 64u64);
        let server = thread::spawn(move || {
            let mut s = theirs;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move |n: usize| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % n as u64) as usize
            };
            let mut shuffle = |v: &mut Vec<Request>| {
                for i in (1..v.len()).rev() {
                    v.swap(i, next(i + 1));
                }
            };
            let mut pending = Vec::new();
            let mut answered = 0;
            while answered < threads * per {
                let mut pfd = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready = unsafe { libc::poll(&mut pfd, 1, 1) };
                if ready == 1 {
                    let mut b = [0u8; REQUEST_LEN];
                    s.read_exact(&mut b).unwrap();
                    pending.push(Request::decode(&b).unwrap());
                    continue;
                }
                let mut halves = Vec::new();
                for second in [false, true] {
                    shuffle(&mut pending);
                    for r in &pending {
                        let h = u64::from(r.len / 2);
                        let (at, len) = if second {
                            (r.offset + h, u64::from(r.len) - h)
                        } else {
                            (r.offset, h)
                        };
                        halves.extend(reply::data_chunk(r.cookie, at, len as u32, second));
                        halves.extend((at..at + len).map(byte));
                    }
                }
                s.write_all(&halves).unwrap();
                answered += pending.len() as u64;
                pending.clear();
            }
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for t in 0..threads {
            let (p, done_tx) = (p.clone(), done_tx.clone());
            thread::spawn(move || {
                for i in 0..per {
                    let offset = ((t * 7 + i * 13) % 32) << 12;
                    let mut buf = vec![0u8; 4096 + (i % 3) as usize * 512];
                    p.read(&[(&mut buf[..]).into()], offset).unwrap();
                    let want: Vec<u8> = (offset..offset + buf.len() as u64).map(byte).collect();
                    assert_eq!(buf, want, "thread {t} read {i}");
                }
                done_tx.send(t).unwrap();
            });
        }
        for _ in 0..threads {
            done_rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a reader thread hung or failed");
        }
        server.join().unwrap();
    }

    /// A reply naming a request nobody sent breaks the connection: every waiting
    /// request fails instead of hanging.
    #[test]
    fn a_reply_to_an_unknown_request_fails_everything_in_flight() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let p = Pipeline::new(
            BufReader::new(Stream::Unix(ours.try_clone().unwrap())),
            BufWriter::new(Stream::Unix(ours)),
            None,
        );
        let server = std::thread::spawn(move || {
            let mut s = theirs;
            for _ in 0..3 {
                let mut b = [0u8; REQUEST_LEN];
                s.read_exact(&mut b).unwrap();
            }
            s.write_all(&reply::simple(999, 0)).unwrap();
            // Keep the socket open: only the bad reply may end the requests.
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        std::thread::scope(|sc| {
            for _ in 0..3 {
                let p = &p;
                sc.spawn(move || {
                    let e = p.command(CMD_FLUSH, 0, 0, 0, &[]).unwrap_err();
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                });
            }
        });
        server.join().unwrap();
    }
}
