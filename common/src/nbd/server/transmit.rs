//! The transmission phase with one client, requests served concurrently: the calling
//! thread reads requests (and WRITE payloads) and hands them to a pool of worker threads,
//! started as requests pile up, that run them against the shared image; each reply is
//! built whole and written under one lock, so that the chunks of different replies never
//! interleave.
//!
//! What is in flight is bounded: at most [`MAX_IN_FLIGHT`] requests, and at most
//! [`MAX_BYTES_IN_FLIGHT`] of payload and read buffers unless a request is alone (so that
//! any request the protocol allows can run). The reader waits for room before it reads a
//! payload, so a client cannot make the server allocate more by sending faster.
//!
//! FLUSH is run like any other request: the engine's flush covers every write that has
//! completed, and a write is replied to only after it completed, so every write the client
//! was told about before it sent the FLUSH is durable when the FLUSH is answered (a write
//! still running then has not been acknowledged, and NBD does not order it).
//!
//! A request the client has a reply to wait for is not cut short: on NBD_CMD_DISC, the end
//! of the stream or a broken request, the reader stops and the requests in flight finish
//! before the connection is dropped.

use std::collections::VecDeque;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::nbd::consts::*;
use crate::nbd::request::{Request, REQUEST_LEN};
use crate::{Error, Result};

use super::command::answer;
use super::export::Export;
use super::negotiate::Session;

/// Requests of one connection in flight at most (qemu-nbd's limit), and so its workers.
pub const MAX_IN_FLIGHT: usize = 16;

/// Payload and read-buffer bytes of one connection in flight at most, unless a request is
/// alone.
pub const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;

/// A worker's read buffer is kept for its next request up to this size.
const KEEP_BUFFER: usize = 4 << 20;

/// Serve requests from `r` until the client disconnects (NBD_CMD_DISC or end of stream
/// between requests), replies to `w`. A broken request (bad magic, a payload over the
/// limit, the stream ending mid-message) or a reply that cannot be sent ends the
/// connection with an error; the image is not touched by a broken request.
pub fn transmit<R: Read, W: Write + Send>(
    export: &Export,
    session: &Session,
    r: &mut BufReader<R>,
    w: &mut W,
) -> Result<()> {
    let conn = Conn {
        export,
        session,
        state: Mutex::new(State::default()),
        work: Condvar::new(),
        room: Condvar::new(),
        out: Mutex::new(w),
    };
    let read = std::thread::scope(|scope| {
        let read = read_requests(&conn, r, &mut || {
            std::thread::Builder::new()
                .stack_size(crate::open::IO_THREAD_STACK)
                .spawn_scoped(scope, || conn.work())
                .is_ok()
        });
        conn.lock().closed = true;
        conn.work.notify_all();
        read
    });
    let unsent = conn.lock().send_error.take();
    match unsent {
        Some(e) => Err(Error::io("sending to the client", e)),
        None => read,
    }
}

/// A request read and admitted: its header, a WRITE's payload, and the bytes it holds in
/// the budget.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: usize,
}

/// What the reader and the workers share, under one lock.
#[derive(Default)]
struct State {
    /// Requests read and waiting for a worker.
    queue: VecDeque<Job>,
    /// Workers started, and those waiting for a request.
    workers: usize,
    idle: usize,
    /// Requests admitted and not yet answered, and the bytes they hold.
    in_flight: usize,
    bytes: usize,
    /// No more requests come: idle workers end.
    closed: bool,
    /// Why a reply could not be sent: the connection is over.
    send_error: Option<io::Error>,
}

/// One connection in the transmission phase.
struct Conn<'a, W> {
    export: &'a Export,
    session: &'a Session,
    state: Mutex<State>,
    /// Signalled when a request is queued or the reader is done.
    work: Condvar,
    /// Signalled when a request leaves the budget.
    room: Condvar,
    out: Mutex<&'a mut W>,
}

impl<W: Write> Conn<'_, W> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until a request holding `cost` bytes fits in the budget, and take its place;
    /// `false` when the connection is over.
    fn admit(&self, cost: usize) -> bool {
        let mut s = self.lock();
        while s.send_error.is_none()
            && (s.in_flight >= MAX_IN_FLIGHT
                || (s.in_flight > 0 && s.bytes + cost > MAX_BYTES_IN_FLIGHT))
        {
            s = self.room.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.send_error.is_some() {
            return false;
        }
        s.in_flight += 1;
        s.bytes += cost;
        true
    }

    fn release(&self, cost: usize) {
        let mut s = self.lock();
        s.in_flight -= 1;
        s.bytes -= cost;
        self.room.notify_one();
    }

    /// Queue an admitted request; `true` when no worker is free for it.
    fn queue(&self, job: Job) -> bool {
        let mut s = self.lock();
        s.queue.push_back(job);
        self.work.notify_one();
        s.queue.len() > s.idle && s.workers < MAX_IN_FLIGHT
    }

    /// Run one request and send its reply, unless the connection is already over.
    fn serve(&self, job: Job, buf: &mut Vec<u8>) {
        if self.lock().send_error.is_none() {
            let reply = answer(self.export, self.session, &job.req, &job.payload, buf);
            drop(job.payload);
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = reply.send(buf, &mut **out).and_then(|()| out.flush()) {
                self.lock().send_error.get_or_insert(e);
            }
        }
        if buf.len() > KEEP_BUFFER {
            *buf = Vec::new();
        }
        self.release(job.cost);
    }

    /// Run the queued requests on this thread.
    fn run_queued(&self, buf: &mut Vec<u8>) {
        loop {
            let Some(job) = self.lock().queue.pop_front() else {
                return;
            };
            self.serve(job, buf);
        }
    }

    /// A worker: requests from the queue until the reader is done and the queue empty.
    fn work(&self) {
        let mut buf = Vec::new();
        loop {
            let job = {
                let mut s = self.lock();
                loop {
                    if let Some(job) = s.queue.pop_front() {
                        break job;
                    }
                    if s.closed {
                        return;
                    }
                    s.idle += 1;
                    s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
                    s.idle -= 1;
                }
            };
            self.serve(job, &mut buf);
        }
    }
}

/// The reader: requests until the end, each run by a worker (`spawn` starts one more,
/// `false` if it cannot), or on this thread when nothing else is in flight and the client
/// has sent nothing more, which spares a one-request-at-a-time client the hand-over.
fn read_requests<R: Read, W: Write>(
    conn: &Conn<'_, W>,
    r: &mut BufReader<R>,
    spawn: &mut dyn FnMut() -> bool,
) -> Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; REQUEST_LEN];
        if !read_request_head(r, &mut head)? {
            return Ok(());
        }
        let req = Request::decode(&head)?;
        let payload_len = req.payload_len()?;
        let cost = match req.command {
            CMD_READ => (req.len as usize).min(MAX_PAYLOAD as usize),
            _ => payload_len,
        };
        if !conn.admit(cost) {
            return Ok(());
        }
        let mut payload = vec![0u8; payload_len];
        if let Err(e) = r.read_exact(&mut payload) {
            conn.release(cost);
            return Err(Error::io("reading write payload", e));
        }
        if req.command == CMD_DISC {
            conn.release(cost);
            return Ok(());
        }
        let job = Job { req, payload, cost };
        let alone = conn.lock().in_flight == 1;
        if alone && r.buffer().is_empty() {
            conn.serve(job, &mut buf);
        } else if conn.queue(job) {
            if spawn() {
                conn.lock().workers += 1;
            } else {
                // No worker could start: what is queued is run here.
                conn.run_queued(&mut buf);
            }
        }
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
