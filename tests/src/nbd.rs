//! NBD test helpers: an `img serve` (or `qemu-nbd`) server run as a child for the length of
//! a test, the NBD URI qemu's tools take for it, and a minimal raw client for sending
//! hostile bytes.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::nbd::consts::*;
use common::nbd::handshake::{self, InfoRequest, OptionRequest};
use common::nbd::request::Request;

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(u16),
}

impl Addr {
    /// The URI qemu-img and qemu-io open the default export ("") at.
    pub fn uri(&self) -> String {
        match self {
            Addr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Addr::Tcp(port) => format!("nbd://127.0.0.1:{port}/"),
        }
    }

    /// The server's arguments for this address.
    fn args(&self) -> Vec<String> {
        match self {
            Addr::Unix(p) => vec!["-k".into(), p.display().to_string()],
            Addr::Tcp(port) => vec![
                "-b".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
        }
    }
}

/// `img serve ARGS` listening at `addr`.
pub fn serve_img(args: &[&str], addr: Addr, dir: &Path) -> Server {
    let mut full = vec!["serve"];
    full.extend_from_slice(args);
    Server::start(&crate::img_bin(), &full, addr, dir)
}

pub fn unix_at(dir: &Path, name: &str) -> Addr {
    Addr::Unix(dir.join(name))
}

/// qemu-io commands over `uri` (as raw); the output, failing on any error line.
pub fn qemu_io_uri(uri: &str, cmds: &[&str]) -> Result<String, String> {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = crate::qemu_io(&args);
    let text = format!("{}{}", out.stdout, out.stderr);
    if !out.success() || text.contains("failed") || text.contains("error") {
        return Err(out.report());
    }
    Ok(text)
}

/// A sparse image with data, zeroes, discards and (for qcow2) a backing file.
pub fn sample_image(dir: &Path, fmt: &str) -> PathBuf {
    let q = |args: &[&str]| crate::qemu_img_in(dir, args).ok();
    let path = dir.join(format!("disk.{fmt}"));
    let mut cmds: Vec<String> = vec![
        "write -P 0x11 0 64k".into(),
        "write -P 0x22 1M 192k".into(),
        "write -z 2M 128k".into(),
        "write -P 0x33 3M 64k".into(),
        "discard 3M 32k".into(),
        "write -P 0x44 7M 4k".into(),
    ];
    if fmt == "qcow2" {
        q(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
        crate::qemu_io_cmds(
            &dir.join("base.qcow2"),
            "qcow2",
            &[
                "write -P 0x55 4M 256k".into(),
                "write -P 0x66 6M 64k".into(),
            ],
        );
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "disk.qcow2",
        ]);
        cmds.push("write -z 6M 32k".into());
        cmds.push("write -P 0x77 4M 4k".into());
    } else {
        q(&["create", "-q", "-f", "raw", "disk.raw", "8M"]);
    }
    crate::qemu_io_cmds(&path, fmt, &cmds);
    path
}

/// A TCP port on 127.0.0.1 nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// A server child process; killed when dropped if still running.
pub struct Server {
    child: Child,
    pub addr: Addr,
    stderr: PathBuf,
}

impl Server {
    /// Start `program ARGS ADDR-ARGS` (`img serve ...` or `qemu-nbd ...`, `args` holding
    /// the subcommand if any, the options and the image) and wait until it listens,
    /// without connecting (a connection would count as its client).
    pub fn start(program: &Path, args: &[&str], addr: Addr, dir: &Path) -> Server {
        let stderr = dir.join(format!("server-{}.err", free_port()));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .args(addr.args())
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {program:?}: {e}"));
        let mut server = Server {
            child,
            addr,
            stderr,
        };
        let start = Instant::now();
        while !server.listening() {
            if let Some(st) = server.child.try_wait().unwrap() {
                panic!("server exited early ({st}): {}", server.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "server did not listen: {}",
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// Whether the socket is there to connect to.
    fn listening(&self) -> bool {
        match &self.addr {
            Addr::Unix(p) => unix_listening(p),
            Addr::Tcp(port) => tcp_listening(*port),
        }
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait up to `timeout` for the server to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send SIGTERM (a server ends its clients, flushes and exits).
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Whether a socket listens at `path`, from /proc/net/unix (the file appears at bind,
/// before listen, when a connection is still refused).
pub fn unix_listening(path: &Path) -> bool {
    const ACCEPTING: &str = "00010000";
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 7 && f[7] == path && f[3] == ACCEPTING
    })
}

/// Whether something listens on 127.0.0.1:`port` (or any address), from /proc/net/tcp.
fn tcp_listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A"
    })
}

/// A raw client on a unix socket, for bytes no well-behaved client sends.
pub struct RawClient {
    pub sock: UnixStream,
}

impl RawClient {
    pub fn connect(path: &Path) -> RawClient {
        let sock = UnixStream::connect(path).expect("connect to the server");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawClient { sock }
    }

    /// Read the greeting and send the client flags (fixed newstyle, no zeroes).
    pub fn greet(&mut self) -> Result<(), String> {
        let mut g = [0u8; 18];
        self.sock.read_exact(&mut g).map_err(|e| e.to_string())?;
        if &g[..16] != b"NBDMAGICIHAVEOPT" {
            return Err(format!("bad greeting {g:?}"));
        }
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
    }

    /// Greet and pick the default export with NBD_OPT_GO: its size and flags.
    pub fn go(&mut self) -> Result<(u64, u16), String> {
        self.greet()?;
        let data = InfoRequest {
            name: String::new(),
            requests: vec![],
        }
        .encode();
        self.send(
            &OptionRequest {
                option: OPT_GO,
                data,
            }
            .encode(),
        )?;
        let mut export = None;
        loop {
            let (reply, data) = self.option_reply()?;
            match reply {
                REP_INFO => {
                    if let Some(handshake::Info::Export { size, flags }) =
                        handshake::decode_info(&data).map_err(|e| e.to_string())?
                    {
                        export = Some((size, flags));
                    }
                }
                REP_ACK => return export.ok_or_else(|| "no NBD_INFO_EXPORT".to_string()),
                r => return Err(format!("NBD_OPT_GO answered with {r:#x}")),
            }
        }
    }

    /// One option reply: its type and data.
    pub fn option_reply(&mut self) -> Result<(u32, Vec<u8>), String> {
        let mut head = [0u8; 20];
        self.sock.read_exact(&mut head).map_err(|e| e.to_string())?;
        let h = handshake::decode_option_reply(&head).map_err(|e| e.to_string())?;
        let mut data = vec![0u8; h.len as usize];
        self.sock.read_exact(&mut data).map_err(|e| e.to_string())?;
        Ok((h.reply, data))
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.sock.write_all(bytes).map_err(|e| e.to_string())
    }

    /// Whether the server closed the connection (a read returns end of stream or a reset
    /// within the read timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// What a [`FakeServer`] does after its handshake.
#[derive(Clone, Copy, Debug)]
pub enum FakeBehaviour {
    /// Answer this many requests (reads with zeroes, others with success), then hang up.
    HangUpAfter(usize),
    /// Answer the first request with bytes that are no NBD reply.
    Garbage,
}

/// A minimal NBD server on a unix socket, run on a thread for one client: simple replies
/// only (it refuses structured replies), an export of `size` bytes, then `behaviour`.
pub struct FakeServer {
    pub path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(path: PathBuf, size: u64, behaviour: FakeBehaviour) -> FakeServer {
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let thread = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = fake_session(&mut s, size, behaviour);
        });
        FakeServer {
            path,
            thread: Some(thread),
        }
    }

    pub fn uri(&self) -> String {
        Addr::Unix(self.path.clone()).uri()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Unblock an accept that never got its client.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fake_session(s: &mut UnixStream, size: u64, behaviour: FakeBehaviour) -> std::io::Result<()> {
    use common::nbd::reply;
    use common::nbd::request::Request;
    s.write_all(&handshake::greeting())?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let Ok(opt) = handshake::read_option(s) else {
            return Ok(());
        };
        match opt.option {
            OPT_GO => {
                let info = handshake::info_export(size, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
                s.write_all(&handshake::option_reply(OPT_GO, REP_INFO, &info))?;
                s.write_all(&handshake::option_reply(OPT_GO, REP_ACK, &[]))?;
                break;
            }
            o => s.write_all(&handshake::option_reply(o, REP_ERR_UNSUP, &[]))?,
        }
    }
    let mut answered = 0;
    loop {
        let mut head = [0u8; 28];
        s.read_exact(&mut head)?;
        let Ok(req) = Request::decode(&head) else {
            return Ok(());
        };
        if let FakeBehaviour::Garbage = behaviour {
            return s.write_all(&[0x5a; 64]);
        }
        if let FakeBehaviour::HangUpAfter(n) = behaviour {
            if answered == n {
                return Ok(());
            }
        }
        let mut payload = vec![0u8; req.payload_len().unwrap_or(0)];
        s.read_exact(&mut payload)?;
        s.write_all(&reply::simple(req.cookie, 0))?;
        if req.command == CMD_READ {
            s.write_all(&vec![0u8; req.len as usize])?;
        }
        answered += 1;
    }
}

/// The bytes of a transmission request without flags.
pub fn request(command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    Request {
        flags: 0,
        command,
        cookie,
        offset,
        len,
    }
    .encode()
    .to_vec()
}

/// A client that reads no reply: every write fails.
pub struct Gone;

impl Write for Gone {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
