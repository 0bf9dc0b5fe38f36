//! `img serve`: export an image over NBD, with qemu-nbd's options and behaviour: a unix
//! socket (`-k`) or TCP (`-b`/`-p`, default port 10809), one export (`-x`, default name
//! ""), at most `-e` clients at once (default 1), and without `-t` an exit once the last
//! client has gone. The image is opened (and locked) once through the engine's opener and
//! shared by every connection, each on its own threads (the protocol is
//! `common::nbd::server`).

mod conn;

use std::io::BufWriter;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use common::nbd::consts::DEFAULT_PORT;
use common::nbd::server::{negotiate, transmit, Export, Limits, Outcome, WriteCache};
use common::open::{Format, OpenOptions};

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_named;
use conn::{Conn, Listener};

/// `img serve [-f FMT] [-r] [-x NAME] [-D DESC] (-k SOCKET | [-b ADDR] [-p PORT]) [-t]
/// [-e N] [-U] [-A] [--cache=MODE] FILE`
#[derive(Args, Debug, Default)]
#[command(after_help = "TLS is not supported: the export is served in the clear.")]
pub struct ServeArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    pub format: Option<String>,
    /// Export read-only
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Export name (default is empty string)
    #[arg(short = 'x', long = "export-name", value_name = "NAME")]
    pub export_name: Option<String>,
    /// A human-readable description of the export
    #[arg(short = 'D', long = "description", value_name = "TEXT")]
    pub description: Option<String>,
    /// Path of the unix socket to listen on
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Interface to bind to (default 0.0.0.0)
    #[arg(short = 'b', long = "bind", value_name = "IFACE")]
    pub bind: Option<String>,
    /// Port to listen on (default 10809)
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<String>,
    /// Don't exit on the last connection
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,
    /// The export can be shared by NUM clients at once (0: any number; default 1)
    #[arg(short = 'e', long = "shared", value_name = "NUM")]
    pub shared: Option<String>,
    /// Open the image in shared mode (read-only exports only)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Expose the allocation depth (the qemu:allocation-depth meta context)
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Disable host cache (--cache=none)
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// Cache mode: none, writeback (default), writethrough, directsync or unsafe
    #[arg(long = "cache", value_name = "MODE")]
    pub cache: Option<String>,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

/// How long a client may take over its handshake (qemu-nbd's default).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How often the accept loop looks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

/// Run `img serve`.
pub fn run(a: &ServeArgs) -> CmdResult {
    let cache = match (a.nocache, a.cache.as_deref()) {
        (true, _) | (false, Some("none")) => CacheMode::direct(WriteCache::Back),
        (false, None | Some("writeback")) => CacheMode::buffered(WriteCache::Back),
        (false, Some("writethrough")) => CacheMode::buffered(WriteCache::Through),
        (false, Some("directsync")) => CacheMode::direct(WriteCache::Through),
        (false, Some("unsafe")) => CacheMode {
            no_flush: true,
            ..CacheMode::buffered(WriteCache::Back)
        },
        (false, Some(m)) => return Err(Failure::msg(format!("Invalid cache mode `{m}'"))),
    };
    let shared = match &a.shared {
        None => 1,
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| Failure::msg(format!("Invalid shared device number '{s}'")))?,
    };
    let port = match &a.port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| Failure::msg(format!("Invalid port number '{p}'")))?,
    };
    if a.force_share && !a.read_only {
        return Err(Failure::msg("--force-share requires --read-only"));
    }
    if a.args.len() != 1 {
        return Err(Failure::msg(
            "Invalid number of arguments\nTry `img serve --help' for more information.",
        ));
    }
    let name = &a.args[0];
    let open_err = |m: String| Failure::msg(format!("Failed to blk_new_open '{name}': {m}"));
    let format = a
        .format
        .as_deref()
        .map(Format::from_name)
        .transpose()
        .map_err(|e| open_err(engine_msg(&e)))?;
    let image = open_named(
        name,
        &OpenOptions {
            format,
            read_only: a.read_only,
            force_share: a.force_share,
            direct: cache.direct,
            no_flush: cache.no_flush,
            ..Default::default()
        },
    )
    .map_err(open_err)?;
    let export = Export {
        image: image.into_driver(),
        name: a.export_name.clone().unwrap_or_default(),
        description: a.description.clone(),
        allocation_depth: a.allocation_depth,
        cache: cache.write,
        multi_conn: shared != 1,
        limits: Limits::default(),
    };
    let listener = match &a.socket {
        Some(path) => bind_unix(path)
            .map(|l| Listener::Unix(l, path.clone()))
            .map_err(|e| {
                Failure::msg(format!(
                    "Failed to bind socket to {}: {}",
                    path.display(),
                    common::error::os_message(&e)
                ))
            })?,
        None => {
            let addr = a.bind.as_deref().unwrap_or("0.0.0.0");
            let host = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            TcpListener::bind(&host).map(Listener::Tcp).map_err(|e| {
                Failure::msg(format!(
                    "Failed to find an available port: {}",
                    common::error::os_message(&e)
                ))
            })?
        }
    };
    serve(&export, &listener, shared, a.persistent)?;
    drop(listener);
    export
        .driver()
        .flush()
        .map_err(|e| Failure::msg(engine_msg(&e)))?;
    Ok(0)
}

/// Listen on a unix socket at `path`, replacing a socket file left there (as QEMU does);
/// any other kind of file is kept and the bind fails.
fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

/// The page cache and flush behaviour of a `--cache` mode.
struct CacheMode {
    direct: bool,
    no_flush: bool,
    write: WriteCache,
}

impl CacheMode {
    fn buffered(write: WriteCache) -> Self {
        CacheMode {
            direct: false,
            no_flush: false,
            write,
        }
    }

    fn direct(write: WriteCache) -> Self {
        CacheMode {
            direct: true,
            ..CacheMode::buffered(write)
        }
    }
}

/// Set by SIGTERM, SIGINT or SIGHUP: stop serving, flush and exit, as qemu-nbd does.
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Release);
}

fn install_terminate_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_terminate as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// The clients being served, by id, so that termination can end their connections.
#[derive(Default)]
struct Clients {
    conns: Mutex<Vec<(u64, Conn)>>,
    active: AtomicUsize,
}

impl Clients {
    fn add(&self, id: u64, conn: Conn) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, conn));
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| *i != id);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    fn shutdown_all(&self) {
        for (_, c) in self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            c.shutdown();
        }
    }
}

/// Accept clients, each served on its own thread, until (without `persistent`) the last
/// one has gone, or a termination signal. At most `shared` at once (0: no limit); the
/// others wait to be accepted.
fn serve(export: &Export, listener: &Listener, shared: usize, persistent: bool) -> CmdResult {
    install_terminate_handlers();
    let clients = Clients::default();
    let mut served = 0u64;
    std::thread::scope(|scope| {
        let result = loop {
            if TERMINATE.load(Ordering::Acquire) {
                break Ok(0);
            }
            let now = clients.active.load(Ordering::Acquire);
            if !persistent && served > 0 && now == 0 {
                break Ok(0);
            }
            if shared != 0 && now >= shared {
                std::thread::sleep(POLL / 10);
                continue;
            }
            let conn = match listener.accept_within(POLL) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    break Err(Failure::msg(format!(
                        "Failed to accept a client: {}",
                        common::error::os_message(&e)
                    )))
                }
            };
            let id = served;
            served += 1;
            match conn.try_clone() {
                Ok(c) => clients.add(id, c),
                Err(_) => continue,
            }
            let clients = &clients;
            let started = std::thread::Builder::new()
                .stack_size(common::open::IO_THREAD_STACK)
                .spawn_scoped(scope, move || {
                    if let Err(e) = client(export, conn) {
                        // The client is dropped; the server and the other clients go on.
                        if !TERMINATE.load(Ordering::Acquire) {
                            eprintln!("img: Disconnect client, due to: {}", engine_msg(&e));
                        }
                    }
                    clients.remove(id);
                });
            if let Err(e) = started {
                eprintln!("img: Disconnect client, due to: cannot start its thread: {e}");
                clients.remove(id);
            }
        };
        // Ends the clients still connected; the scope then waits for their threads.
        clients.shutdown_all();
        result
    })
}

/// One client, from handshake to disconnect.
fn client(export: &Export, conn: Conn) -> common::Result<()> {
    let io = |e| common::Error::io("setting up the connection", e);
    let mut r = std::io::BufReader::new(conn.try_clone().map_err(io)?);
    let mut w = BufWriter::with_capacity(64 << 10, conn.try_clone().map_err(io)?);
    conn.set_read_timeout(Some(HANDSHAKE_LIMIT)).map_err(io)?;
    let session = match negotiate(export, &mut r, &mut w)? {
        Outcome::Transmission(s) => s,
        Outcome::Closed => return Ok(()),
    };
    conn.set_read_timeout(None).map_err(io)?;
    transmit(export, &session, &mut r, &mut w)
}
