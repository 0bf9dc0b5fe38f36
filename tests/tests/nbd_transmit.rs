//! The server's transmission phase in-process (`common::nbd::server::transmit`), over
//! in-memory streams and a disk that can hold its calls until enough of them run at once:
//! the requests of one connection run concurrently up to the request limit, the bytes in
//! flight stay under their limit (a larger request runs alone), the chunks of different
//! replies never interleave, everything read before NBD_CMD_DISC is answered and nothing
//! after it runs, and a broken request or a client that cannot be answered ends the
//! connection once the requests before it are done.

use std::io::BufReader;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::nbd::consts::*;
use common::nbd::reply::{chunk_len, decode_reply, ReplyHeader};
use common::nbd::server::{transmit, Context, Export, Limits, Session, WriteCache};
use common::{Allocation, BlockDriver, BlockStatus, IoBuf, IoBufMut, Result};
use integration_tests::mem_disk::MemDisk;
use integration_tests::nbd::{request, Gone};

const BLOCK: u64 = 4096;
const DISK: usize = 1 << 20;

/// How long a held call waits for the others before it gives up (the test then fails on
/// what it saw instead of hanging).
const GIVE_UP: Duration = Duration::from_secs(10);

/// Which calls a [`Gate`] holds.
#[derive(Clone, Copy, PartialEq)]
enum Held {
    Reads,
    Writes,
}

/// What the gate saw: the calls inside now (id, most calls inside at once during it), the
/// finished ones (length, that most), and whether a call gave up waiting for the others.
#[derive(Default)]
struct Seen {
    inside: Vec<(u64, usize)>,
    next: u64,
    open: bool,
    done: Vec<(usize, usize)>,
    gave_up: bool,
}

/// A [`MemDisk`] whose reads or writes are held until `target` of them are inside at once,
/// then 100 ms more (so that a call the server should not have let in yet shows up),
/// after which every call passes but stays 20 ms. Its 4 KiB blocks report as data and
/// zero alternately.
struct Gate {
    disk: MemDisk,
    held: Held,
    target: usize,
    seen: Mutex<Seen>,
    opened: Condvar,
}

impl Gate {
    fn new(held: Held, target: usize) -> Arc<Gate> {
        let disk = MemDisk::new(DISK, false);
        for k in (0..DISK as u64 / BLOCK).step_by(2) {
            disk.write_at(&[(k % 251 + 1) as u8; BLOCK as usize], k * BLOCK)
                .unwrap();
        }
        Arc::new(Gate {
            disk,
            held,
            target,
            seen: Mutex::new(Seen::default()),
            opened: Condvar::new(),
        })
    }

    fn pass(&self, kind: Held, len: usize, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if kind != self.held {
            return f();
        }
        let mut s = self.seen.lock().unwrap();
        let id = s.next;
        s.next += 1;
        s.inside.push((id, 0));
        let n = s.inside.len();
        for c in &mut s.inside {
            c.1 = c.1.max(n);
        }
        if !s.open && n >= self.target {
            drop(s);
            std::thread::sleep(Duration::from_millis(100));
            s = self.seen.lock().unwrap();
            s.open = true;
            self.opened.notify_all();
        }
        let start = Instant::now();
        while !s.open && start.elapsed() < GIVE_UP {
            s = self.opened.wait_timeout(s, GIVE_UP).unwrap().0;
        }
        s.gave_up |= !s.open;
        s.open = true;
        drop(s);
        std::thread::sleep(Duration::from_millis(20));
        let r = f();
        let mut s = self.seen.lock().unwrap();
        let at = s.inside.iter().position(|c| c.0 == id).unwrap();
        let (_, peak) = s.inside.remove(at);
        s.done.push((len, peak));
        r
    }

    /// The most calls inside at once, and the calls (length, most inside during it). The
    /// target was reached: no call gave up waiting for it.
    fn seen(&self) -> (usize, Vec<(usize, usize)>) {
        let s = self.seen.lock().unwrap();
        assert!(
            !s.gave_up,
            "{} calls never came while one was held",
            self.target
        );
        let max = s.done.iter().map(|d| d.1).max().unwrap_or(0);
        (max, s.done.clone())
    }
}

/// The gate as the export's driver.
struct GateDriver(Arc<Gate>);

impl BlockDriver for GateDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        DISK as u64
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let len = common::iovec::total_len(bufs);
        self.0.pass(Held::Reads, len, || {
            self.0.disk.read_vectored_at(bufs, offset)
        })
    }
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        let len = common::iovec::total_len(bufs);
        self.0.pass(Held::Writes, len, || {
            self.0.disk.write_vectored_at(bufs, offset)
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.0.disk.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.disk.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let k = offset / BLOCK;
        Ok(BlockStatus {
            len: ((k + 1) * BLOCK - offset).min(len),
            allocation: if k.is_multiple_of(2) {
                Allocation::Data
            } else {
                Allocation::Zero
            },
            depth: 0,
            host_offset: None,
            compressed: false,
        })
    }
    fn allocated_file_size(&self) -> Result<u64> {
        Ok(DISK as u64)
    }
}

fn export(gate: &Arc<Gate>, limits: Limits) -> Export {
    Export {
        image: Box::new(GateDriver(gate.clone())),
        name: String::new(),
        description: None,
        allocation_depth: false,
        cache: WriteCache::Back,
        multi_conn: false,
        limits,
    }
}

fn structured() -> Session {
    Session {
        structured: true,
        contexts: vec![Context::BaseAllocation],
    }
}

/// Serve `input` as one connection's transmission phase; its result and the replies.
fn serve(export: &Export, session: &Session, input: &[u8]) -> (common::Result<()>, Vec<u8>) {
    let mut out = Vec::new();
    let r = transmit(export, session, &mut BufReader::new(input), &mut out);
    (r, out)
}

/// One reply message: a simple reply (and a READ's data, when `read_len` says the cookie
/// is a READ of so many bytes) or a structured chunk with its payload.
#[derive(Debug)]
enum Message {
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        payload: Vec<u8>,
    },
}

/// The cookies of `replies`, sorted, each a simple reply without error (else a panic).
fn ok_cookies(replies: &[Message]) -> Vec<u64> {
    let mut cookies: Vec<u64> = replies
        .iter()
        .map(|m| match m {
            Message::Simple { cookie, error: 0 } => *cookie,
            m => panic!("{m:?}"),
        })
        .collect();
    cookies.sort();
    cookies
}

fn messages(mut out: &[u8], read_len: impl Fn(u64) -> Option<usize>) -> Vec<Message> {
    let mut v = Vec::new();
    while !out.is_empty() {
        let head: [u8; 16] = out[..16].try_into().unwrap();
        out = &out[16..];
        match decode_reply(&head).unwrap() {
            ReplyHeader::Simple { cookie, error } => {
                if let (0, Some(n)) = (error, read_len(cookie)) {
                    out = &out[n..];
                }
                v.push(Message::Simple { cookie, error });
            }
            ReplyHeader::Chunk {
                cookie,
                flags,
                kind,
            } => {
                let len = chunk_len(out[..4].try_into().unwrap()).unwrap() as usize;
                let payload = out[4..4 + len].to_vec();
                out = &out[4 + len..];
                v.push(Message::Chunk {
                    cookie,
                    flags,
                    kind,
                    payload,
                });
            }
        }
    }
    v
}

#[test]
fn requests_of_one_connection_run_concurrently_up_to_the_limit_and_replies_never_interleave() {
    let limits = Limits::default();
    let gate = Gate::new(Held::Reads, limits.requests);
    let e = export(&gate, limits);
    // 24 reads of 16 KiB, each over data, zero, data, zero blocks: four chunks a reply.
    let n = 24u64;
    let mut input = Vec::new();
    for i in 0..n {
        input.extend(request(CMD_READ, i, i * 4 * BLOCK, 4 * BLOCK as u32));
    }
    input.extend(request(CMD_DISC, 99, 0, 0));
    let (r, out) = serve(&e, &structured(), &input);
    r.unwrap();
    let (max, calls) = gate.seen();
    assert_eq!(calls.len(), n as usize);
    assert_eq!(max, limits.requests, "reads inside the disk at once");

    let mut answered = Vec::new();
    let mut open: Option<u64> = None;
    for m in messages(&out, |_| None) {
        let Message::Chunk {
            cookie,
            flags,
            kind,
            payload,
        } = m
        else {
            panic!("a simple reply under structured replies: {m:?}");
        };
        assert!(
            open.is_none_or(|c| c == cookie),
            "a chunk of {cookie} inside the reply to {open:?}"
        );
        let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
        let k = offset / BLOCK;
        assert_eq!(offset / (4 * BLOCK), cookie);
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                assert_eq!(k % 2, 0);
                assert_eq!(&payload[8..], &[(k % 251 + 1) as u8; BLOCK as usize][..]);
            }
            REPLY_TYPE_OFFSET_HOLE => assert_eq!(k % 2, 1),
            _ => panic!("chunk type {kind}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            answered.push(cookie);
            open = None;
        } else {
            open = Some(cookie);
        }
    }
    answered.sort();
    assert_eq!(answered, (0..n).collect::<Vec<_>>());
}

#[test]
fn bytes_in_flight_stay_under_the_limit_and_a_larger_request_runs_alone() {
    let limits = Limits {
        requests: 16,
        bytes: 64 << 10,
    };
    let gate = Gate::new(Held::Writes, 2);
    let e = export(&gate, limits);
    let mut input = Vec::new();
    let mut write = |cookie: u64, len: usize| {
        input.extend(request(CMD_WRITE, cookie, cookie * (64 << 10), len as u32));
        input.extend(vec![cookie as u8; len]);
    };
    for c in 0..4 {
        write(c, 32 << 10);
    }
    write(4, 128 << 10);
    write(5, 4 << 10);
    write(6, 4 << 10);
    let (r, out) = serve(&e, &Session::default(), &input);
    r.unwrap();
    let (max, calls) = gate.seen();
    assert_eq!(max, 2, "writes inside at once: {calls:?}");
    let big: Vec<_> = calls.iter().filter(|c| c.0 == 128 << 10).collect();
    assert_eq!(big, [&(128 << 10, 1)], "{calls:?}");
    let replies = messages(&out, |_| None);
    assert_eq!(replies.len(), 7);
    assert!(replies
        .iter()
        .all(|m| matches!(m, Message::Simple { error: 0, .. })));
    for c in 0..7u64 {
        let mut b = [0u8; 1];
        gate.disk.read_at(&mut b, c * (64 << 10)).unwrap();
        assert_eq!(b[0], c as u8);
    }
}

#[test]
fn everything_read_before_disc_is_answered_and_nothing_after_it_runs() {
    let gate = Gate::new(Held::Writes, 8);
    let e = export(&gate, Limits::default());
    let mut input = Vec::new();
    for c in 0..8u64 {
        input.extend(request(CMD_WRITE, c, c * BLOCK, 512));
        input.extend([0xc0 | c as u8; 512]);
    }
    input.extend(request(CMD_FLUSH, 8, 0, 0));
    input.extend(request(CMD_DISC, 9, 0, 0));
    input.extend(request(CMD_WRITE, 10, 11 * BLOCK, 512));
    input.extend([0xee; 512]);
    let (r, out) = serve(&e, &Session::default(), &input);
    r.unwrap();
    assert_eq!(gate.seen().0, 8);
    assert_eq!(
        ok_cookies(&messages(&out, |_| None)),
        (0..=8).collect::<Vec<_>>()
    );
    let mut b = [0u8; 512];
    for c in 0..8u64 {
        gate.disk.read_at(&mut b, c * BLOCK).unwrap();
        assert_eq!(b, [0xc0 | c as u8; 512]);
    }
    gate.disk.read_at(&mut b, 11 * BLOCK).unwrap();
    assert_eq!(b, [0; 512], "a write after NBD_CMD_DISC ran");
}

#[test]
fn a_broken_request_ends_the_connection_after_the_requests_before_it() {
    let gate = Gate::new(Held::Reads, 4);
    let e = export(&gate, Limits::default());
    let mut input = Vec::new();
    for c in 0..4u64 {
        input.extend(request(CMD_READ, c, c * 2 * BLOCK, 512));
    }
    input.extend([0x42; 28]);
    input.extend(request(CMD_READ, 5, 0, 512));
    let (r, out) = serve(&e, &Session::default(), &input);
    let err = r.unwrap_err().to_string();
    assert!(err.contains("bad request magic"), "{err}");
    assert_eq!(ok_cookies(&messages(&out, |_| Some(512))), [0, 1, 2, 3]);
    assert_eq!(gate.seen().0, 4);
}

#[test]
fn a_client_that_cannot_be_answered_ends_the_connection() {
    let gate = Gate::new(Held::Reads, 1);
    let e = export(&gate, Limits::default());
    let mut input = Vec::new();
    for c in 0..200u64 {
        input.extend(request(CMD_READ, c, 0, 4096));
    }
    let started = Instant::now();
    let r = transmit(
        &e,
        &structured(),
        &mut BufReader::new(&input[..]),
        &mut Gone,
    );
    let err = r.unwrap_err().to_string();
    assert!(err.contains("sending to the client"), "{err}");
    // Once a reply failed, the requests left are dropped unanswered, not run.
    let (_, calls) = gate.seen();
    assert!(calls.len() < 200, "{} reads ran", calls.len());
    assert!(started.elapsed() < Duration::from_secs(5));
}
