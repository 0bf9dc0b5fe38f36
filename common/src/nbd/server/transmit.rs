//! The transmission phase with one client, requests served concurrently by a small pool
//! of threads that take turns at reading: the thread whose turn it is reads the next
//! request (and a WRITE's payload), hands the turn on, runs the request against the shared
//! image and writes its reply, built whole, under one lock, so that the chunks of
//! different replies never interleave. A thread is started when one takes a request and no
//! other is waiting for the turn, up to the request limit; the caller's thread is the
//! first. A request is run by the thread that read it, so a client sending one request at
//! a time pays no hand-over between threads.
//!
//! What is in flight is bounded by the export's [`Limits`]: so many requests, and so many
//! bytes of payload and read buffers unless a request is alone (so that any request the
//! protocol allows can run). The reader waits for room before it reads a payload, so a
//! client cannot make the server allocate more by sending faster.
//!
//! FLUSH is run like any other request: the engine's flush covers every write that has
//! completed, and a write is replied to only after it completed, so every write the client
//! was told about before it sent the FLUSH is durable when the FLUSH is answered (a write
//! still running then has not been acknowledged, and NBD does not order it).
//!
//! A request the client has a reply to wait for is not cut short: on NBD_CMD_DISC, the end
//! of the stream or a broken request, reading stops and the requests in flight finish
//! before the connection is dropped.

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::sync::mpsc::{self, Sender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{Scope, ScopedJoinHandle};

use crate::nbd::consts::*;
use crate::nbd::request::{Request, REQUEST_LEN};
use crate::{Error, Result};

use super::command::answer;
use super::export::{Export, Limits};
use super::negotiate::Session;

/// A thread's read buffer is kept for its next request up to this size.
const KEEP_BUFFER: usize = 4 << 20;

/// Serve requests from `r` until the client disconnects (NBD_CMD_DISC or end of stream
/// between requests), replies to `w`. A broken request (bad magic, a payload over the
/// limit, the stream ending mid-message) or a reply that cannot be sent ends the
/// connection with an error; the image is not touched by a broken request.
pub fn transmit<R: Read + Send, W: Write + Send>(
    export: &Export,
    session: &Session,
    r: &mut BufReader<R>,
    w: &mut W,
) -> Result<()> {
    let conn = Conn {
        export,
        session,
        input: Mutex::new(Input {
            r,
            over: false,
            result: Ok(()),
        }),
        state: Mutex::new(State {
            threads: 1,
            ..State::default()
        }),
        room: Condvar::new(),
        out: Mutex::new(w),
    };
    std::thread::scope(|scope| {
        let (started, threads) = mpsc::channel();
        conn.run(scope, started);
        // Every thread is joined, none detached: the channel ends when the last thread
        // has left `run`, and each thread's handle was sent before its starter left. A
        // panic is raised again once all are joined.
        let mut panicked = None;
        for thread in threads {
            if let Err(panic) = thread.join() {
                panicked.get_or_insert(panic);
            }
        }
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
    });
    let unsent = conn.lock().send_error.take();
    let input = conn.input.into_inner().unwrap_or_else(|p| p.into_inner());
    match unsent {
        Some(e) => Err(Error::io("sending to the client", e)),
        None => input.result,
    }
}

/// A request read and admitted: its header, a WRITE's payload, and the bytes it holds in
/// the budget.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: usize,
}

/// The request stream, held by the thread whose turn it is to read.
struct Input<'a, R> {
    r: &'a mut BufReader<R>,
    /// No more requests are read: threads taking the turn end.
    over: bool,
    /// Why reading ended, when it was not the client's choice.
    result: Result<()>,
}

/// What the threads share besides the stream and the reply lock.
#[derive(Default)]
struct State {
    /// Threads started, and those waiting for the reading turn.
    threads: usize,
    waiting: usize,
    /// Requests admitted and not yet answered, and the bytes they hold.
    in_flight: usize,
    bytes: usize,
    /// Why a reply could not be sent: the connection is over.
    send_error: Option<io::Error>,
}

/// One connection in the transmission phase.
struct Conn<'a, R, W> {
    export: &'a Export,
    session: &'a Session,
    input: Mutex<Input<'a, R>>,
    state: Mutex<State>,
    /// Signalled when a request leaves the budget.
    room: Condvar,
    out: Mutex<&'a mut W>,
}

impl<'a, R: Read + Send, W: Write + Send> Conn<'a, R, W> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One thread: take the reading turn, read a request, pass the turn on (starting a
    /// thread to take it when none waits, its handle sent to `started`), run the request;
    /// until reading is over.
    fn run<'s>(&'s self, scope: &'s Scope<'s, '_>, started: Sender<ScopedJoinHandle<'s, ()>>) {
        let mut buf = Vec::new();
        loop {
            self.lock().waiting += 1;
            let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
            self.lock().waiting -= 1;
            if input.over {
                return;
            }
            let job = match self.next(input.r) {
                Ok(Some(job)) => job,
                end => {
                    input.over = true;
                    input.result = end.map(|_| ());
                    return;
                }
            };
            let start_one = {
                let mut s = self.lock();
                let more = s.waiting == 0 && s.threads < self.export.limits.requests;
                s.threads += usize::from(more);
                more
            };
            drop(input);
            if start_one {
                let theirs = started.clone();
                match std::thread::Builder::new()
                    .stack_size(crate::open::IO_THREAD_STACK)
                    .spawn_scoped(scope, move || self.run(scope, theirs))
                {
                    Ok(thread) => {
                        // The receiver is read until every sender is gone: this cannot fail.
                        let _ = started.send(thread);
                    }
                    // This thread reads again after its request.
                    Err(_) => self.lock().threads -= 1,
                }
            }
            self.serve(job, &mut buf);
        }
    }

    /// The next request, admitted; `None` when the client is done (end of stream,
    /// NBD_CMD_DISC) or no reply can reach it any more.
    fn next(&self, r: &mut BufReader<R>) -> Result<Option<Job>> {
        let mut head = [0u8; REQUEST_LEN];
        if !read_request_head(r, &mut head)? {
            return Ok(None);
        }
        let req = Request::decode(&head)?;
        let payload_len = req.payload_len()?;
        let cost = match req.command {
            CMD_READ => (req.len as usize).min(MAX_PAYLOAD as usize),
            _ => payload_len,
        };
        if !self.admit(cost) {
            return Ok(None);
        }
        let mut payload = vec![0u8; payload_len];
        if let Err(e) = r.read_exact(&mut payload) {
            self.release(cost);
            return Err(Error::io("reading write payload", e));
        }
        if req.command == CMD_DISC {
            self.release(cost);
            return Ok(None);
        }
        Ok(Some(Job { req, payload, cost }))
    }

    /// Wait until a request holding `cost` bytes fits in the budget, and take its place;
    /// `false` when the connection is over.
    fn admit(&self, cost: usize) -> bool {
        let Limits { requests, bytes } = self.export.limits;
        let mut s = self.lock();
        while s.send_error.is_none()
            && (s.in_flight >= requests || (s.in_flight > 0 && s.bytes + cost > bytes))
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
