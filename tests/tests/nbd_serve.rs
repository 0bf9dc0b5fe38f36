//! `img serve` against qemu's NBD clients (`qemu-io`, `qemu-img`) and `qemu-nbd`: the
//! export reads, writes, maps and converts as the file does, over a unix socket and TCP;
//! read-only exports refuse writes; hostile clients are dropped without harm to the image
//! or other clients; the server exits after its last client unless `-t`.

use integration_tests::nbd::{free_port, Addr, RawClient, Server};
use integration_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::nbd::consts::*;
use common::nbd::handshake::OptionRequest;
use common::nbd::request::Request;

/// `img serve ARGS` listening at `addr`.
fn serve(args: &[&str], addr: Addr, dir: &Path) -> Server {
    let mut full = vec!["serve"];
    full.extend_from_slice(args);
    Server::start(&img_bin(), &full, addr, dir)
}

fn unix(dir: &Path, name: &str) -> Addr {
    Addr::Unix(dir.join(name))
}

/// qemu-io commands over `uri` (as raw); the output, failing on any error line.
fn qemu_io_uri(uri: &str, cmds: &[&str]) -> Result<String, String> {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = qemu_io(&args);
    let text = format!("{}{}", out.stdout, out.stderr);
    if !out.success() || text.contains("failed") || text.contains("error") {
        return Err(out.report());
    }
    Ok(text)
}

/// A sparse image with data, zeroes, discards and (for qcow2) a backing file.
fn make_image(dir: &Path, fmt: &str) -> PathBuf {
    let q = |args: &[&str]| qemu_img_in(dir, args).ok();
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
        qemu_io_cmds(
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
    qemu_io_cmds(&path, fmt, &cmds);
    path
}

/// `{start, length, data, zero}` runs of a `map --output=json`, neighbours merged: what
/// base:allocation can tell (depth, presence and offsets are the file's own business).
fn data_zero_runs(json: &str) -> Result<Vec<(u64, u64, bool, bool)>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?;
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().ok_or("not an array")? {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match runs.last_mut() {
            Some(l) if l.2 == data && l.3 == zero && l.0 + l.1 == start => l.1 += len,
            _ => runs.push((start, len, data, zero)),
        }
    }
    Ok(runs)
}

#[test]
fn qemu_io_and_convert_read_and_write_over_unix_and_tcp() {
    let mut f = Failures::new();
    for (fmt, tcp) in [
        ("raw", false),
        ("qcow2", false),
        ("raw", true),
        ("qcow2", true),
    ] {
        let name = format!("{fmt} over {}", if tcp { "tcp" } else { "unix" });
        f.record(
            &name,
            (|| {
                let d = tempdir();
                let image = make_image(d.path(), fmt);
                let before = qemu_read_all(&image, Some(fmt), d.path());
                let addr = if tcp {
                    Addr::Tcp(free_port())
                } else {
                    unix(d.path(), "sock")
                };
                let srv = serve(&["-t", "-f", fmt, s(&image)], addr, d.path());
                let uri = srv.addr.uri();
                qemu_io_uri(
                    &uri,
                    &[
                        "read -P 0x11 0 64k",
                        "read -P 0x22 1M 192k",
                        "read -P 0 2M 128k",
                    ],
                )?;
                qemu_io_uri(
                    &uri,
                    &["write -P 0x99 5M 100k", "write -P 0x98 12345 777", "flush"],
                )?;
                qemu_io_uri(&uri, &["read -P 0x99 5M 100k", "read -P 0x98 12345 777"])?;
                let out = d.path().join("copy.qcow2");
                qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &uri, s(&out)]).check()?;
                drop(srv);
                let mut expect = before;
                expect[5 << 20..(5 << 20) + 100 * 1024].fill(0x99);
                expect[12345..12345 + 777].fill(0x98);
                let now = qemu_read_all(&image, Some(fmt), d.path());
                if let Some(m) = first_mismatch(&expect, &now) {
                    return Err(format!("image after the writes: {m}"));
                }
                let copy = qemu_read_all(&out, Some("qcow2"), d.path());
                if let Some(m) = first_mismatch(&expect, &copy) {
                    return Err(format!("converted from the export: {m}"));
                }
                if fmt == "qcow2" {
                    qemu_check(&image)?;
                }
                Ok(())
            })(),
        );
    }
    f.finish();
}

#[test]
fn map_over_the_export_matches_img_map_and_qemu_nbd() {
    let mut f = Failures::new();
    for fmt in ["raw", "qcow2"] {
        f.record(
            fmt,
            (|| {
                let d = tempdir();
                let image = make_image(d.path(), fmt);
                let ours = serve(
                    &["-t", "-r", "-f", fmt, s(&image)],
                    unix(d.path(), "a"),
                    d.path(),
                );
                let over_ours =
                    qemu_img(&["map", "--output=json", "-f", "raw", &ours.addr.uri()]).check()?;
                let file_map = img(&["map", "--output=json", "-f", fmt, s(&image)]).check()?;
                let (a, b) = (
                    data_zero_runs(&over_ours.stdout)?,
                    data_zero_runs(&file_map.stdout)?,
                );
                if a != b {
                    return Err(format!(
                        "map over the export {a:?}\nimg map of the file {b:?}"
                    ));
                }
                // The reference server on the same file: identical map over NBD.
                let theirs = Server::start(
                    Path::new("qemu-nbd"),
                    &["-t", "-r", "-f", fmt, s(&image)],
                    unix(d.path(), "b"),
                    d.path(),
                );
                let over_theirs =
                    qemu_img(&["map", "--output=json", "-f", "raw", &theirs.addr.uri()]).check()?;
                ensure(over_ours.stdout == over_theirs.stdout, || {
                    text_diff(
                        "qemu-nbd",
                        &over_theirs.stdout,
                        "img serve",
                        &over_ours.stdout,
                    )
                    .unwrap_or_default()
                })?;
                // And the contents: compare and convert from the export.
                qemu_img(&[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    fmt,
                    &ours.addr.uri(),
                    s(&image),
                ])
                .check()?;
                let out = d.path().join("out.raw");
                qemu_img(&[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &ours.addr.uri(),
                    s(&out),
                ])
                .check()?;
                qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&out), s(&image)]).check()?;
                Ok(())
            })(),
        );
    }
    f.finish();
}

/// `qemu-nbd -L` of a qemu-nbd export, less what only extended headers (which `img serve`
/// does not offer) bring: the block-status-payload flag and 64-bit transactions.
fn without_extended_headers(list: &str) -> String {
    let mut out = String::new();
    for line in list.lines() {
        if line.trim_start().starts_with("transaction size:") {
            out.push_str("  transaction size: 32-bit\n");
            continue;
        }
        match line.trim_start().strip_prefix("flags: 0x") {
            Some(rest) => {
                let hex = rest.split_whitespace().next().unwrap();
                let flags = u16::from_str_radix(hex, 16).unwrap() & !(1 << 12);
                let words = rest[hex.len()..].replace(" block-status-payload", "");
                out.push_str(&format!("  flags: {flags:#x}{words}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn export_list_matches_qemu_nbd() {
    // `qemu-nbd -L` prints what the handshake says: name, description, size, flags,
    // block sizes and the meta contexts.
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    let mut f = Failures::new();
    for (i, opts) in [
        vec!["-t"],
        vec!["-t", "-r", "-x", "exp", "-D", "a disk"],
        vec!["-t", "-A", "-e", "2"],
        vec!["-t", "-r", "-e", "0", "--allocation-depth"],
    ]
    .into_iter()
    .enumerate()
    {
        f.record(
            &opts.join(" "),
            (|| {
                let mut args = opts.clone();
                args.push(s(&image));
                let (sa, sb) = (
                    d.path().join(format!("a{i}")),
                    d.path().join(format!("b{i}")),
                );
                let ours = serve(&args, Addr::Unix(sa.clone()), d.path());
                let a = Tool::at("qemu-nbd")
                    .run(None, &["-L", "-k", s(&sa)])
                    .check()?;
                drop(ours);
                let theirs = Server::start(
                    Path::new("qemu-nbd"),
                    &args,
                    Addr::Unix(sb.clone()),
                    d.path(),
                );
                let b = Tool::at("qemu-nbd")
                    .run(None, &["-L", "-k", s(&sb)])
                    .check()?;
                drop(theirs);
                let b_out = without_extended_headers(&b.stdout);
                ensure(a.stdout == b_out, || {
                    text_diff("qemu-nbd", &b_out, "img serve", &a.stdout).unwrap_or_default()
                })
            })(),
        );
    }
    f.finish();
}

#[test]
fn read_only_export_refuses_writes() {
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    let before = std::fs::read(&image).unwrap();
    let srv = serve(&["-t", "-r", s(&image)], unix(d.path(), "s"), d.path());
    let out = qemu_io(&["-f", "raw", "-c", "write -P 1 0 4k", &srv.addr.uri()]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!text.contains("wrote"), "write went through: {text}");
    // A client that ignores the read-only flag gets EPERM.
    let mut c = RawClient::connect(&d.path().join("s"));
    let (_, flags) = c.go().unwrap();
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    let req = Request {
        flags: 0,
        command: CMD_WRITE,
        cookie: 7,
        offset: 0,
        len: 512,
    };
    c.send(&req.encode()).unwrap();
    c.send(&[1u8; 512]).unwrap();
    let mut reply = [0u8; 16];
    std::io::Read::read_exact(&mut c.sock, &mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), EPERM);
    drop(c);
    drop(srv);
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
}

#[test]
fn hostile_clients_are_dropped_and_others_still_served() {
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    let sock = d.path().join("s");
    let mut srv = serve(
        &["-e", "0", "-f", "qcow2", s(&image)],
        Addr::Unix(sock.clone()),
        d.path(),
    );
    // Held open for the whole test, so that the server (without -t) stays up until the end.
    let mut holder = RawClient::connect(&sock);
    holder.go().unwrap();

    let go = |c: &mut RawClient| c.go().map(|_| ());
    type Case = (
        &'static str,
        Box<dyn Fn(&mut RawClient) -> Result<(), String>>,
        bool,
    );
    let cases: Vec<Case> = vec![
        (
            "garbage instead of flags",
            Box::new(|c| {
                let mut g = [0u8; 18];
                std::io::Read::read_exact(&mut c.sock, &mut g).unwrap();
                c.send(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            }),
            true,
        ),
        (
            "flags then hang up mid-option",
            Box::new(|c| {
                c.greet()?;
                c.send(&IHAVEOPT.to_be_bytes()[..5])?;
                c.sock
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())
            }),
            true,
        ),
        (
            "option of 4 GiB claimed",
            Box::new(|c| {
                c.greet()?;
                let mut o = OptionRequest {
                    option: OPT_GO,
                    data: vec![],
                }
                .encode();
                o[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
                c.send(&o)
            }),
            true,
        ),
        (
            "bad option magic",
            Box::new(|c| {
                c.greet()?;
                c.send(&[0x55; 16])
            }),
            true,
        ),
        (
            "info request lying about its name length",
            Box::new(|c| {
                c.greet()?;
                c.send(
                    &OptionRequest {
                        option: OPT_GO,
                        data: vec![0, 0, 0x10, 0, 0, 0],
                    }
                    .encode(),
                )?;
                let (reply, _) = c.option_reply()?;
                ensure(reply == REP_ERR_INVALID, || format!("reply {reply:#x}"))?;
                // Still in the handshake: a proper GO works.
                c.send(
                    &OptionRequest {
                        option: OPT_ABORT,
                        data: vec![],
                    }
                    .encode(),
                )
            }),
            false,
        ),
        (
            "request with bad magic",
            Box::new(move |c| {
                go(c)?;
                c.send(&[0x42; 28])
            }),
            true,
        ),
        (
            "write of 4 GiB claimed",
            Box::new(move |c| {
                go(c)?;
                let r = Request {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: 1,
                    offset: 0,
                    len: u32::MAX,
                };
                c.send(&r.encode())
            }),
            true,
        ),
        (
            "write payload cut short",
            Box::new(move |c| {
                go(c)?;
                let r = Request {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: 1,
                    offset: 0,
                    len: 65536,
                };
                c.send(&r.encode())?;
                c.send(&[0xee; 1000])?;
                c.sock
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())
            }),
            true,
        ),
        (
            "header cut short",
            Box::new(move |c| {
                go(c)?;
                let r = Request {
                    flags: 0,
                    command: CMD_READ,
                    cookie: 1,
                    offset: 0,
                    len: 512,
                };
                c.send(&r.encode()[..20])?;
                c.sock
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())
            }),
            true,
        ),
        (
            "oversized read, past-the-end write, unknown command: errors, connection kept",
            Box::new(move |c| {
                go(c)?;
                let mut reply = [0u8; 16];
                let mut expect = |c: &mut RawClient, req: Request, payload: &[u8], errno: u32| {
                    c.send(&req.encode())?;
                    c.send(payload)?;
                    std::io::Read::read_exact(&mut c.sock, &mut reply)
                        .map_err(|e| e.to_string())?;
                    let got = u32::from_be_bytes(reply[4..8].try_into().unwrap());
                    ensure(got == errno, || {
                        format!("{req:?}: error {got}, expected {errno}")
                    })
                };
                let r = Request {
                    flags: 0,
                    command: CMD_READ,
                    cookie: 2,
                    offset: 0,
                    len: 64 << 20,
                };
                expect(c, r, &[], EINVAL)?;
                let r = Request {
                    command: CMD_WRITE,
                    offset: 8 << 20,
                    len: 512,
                    ..r
                };
                expect(c, r, &[9; 512], ENOSPC)?;
                let r = Request {
                    command: 99,
                    len: 0,
                    ..r
                };
                expect(c, r, &[], EINVAL)?;
                let r = Request {
                    command: CMD_BLOCK_STATUS,
                    offset: 0,
                    len: 512,
                    ..r
                };
                expect(c, r, &[], EINVAL)?;
                let r = Request {
                    command: CMD_READ,
                    flags: 0x80,
                    offset: 0,
                    len: 512,
                    ..r
                };
                expect(c, r, &[], EINVAL)?;
                let r = Request {
                    command: CMD_DISC,
                    flags: 0,
                    len: 0,
                    ..r
                };
                c.send(&r.encode())
            }),
            true,
        ),
    ];
    let contents = qemu_io_uri(&srv.addr.uri(), &["read -P 0x11 0 64k"]);
    assert!(contents.is_ok(), "{contents:?}");
    for (name, act, dropped) in &cases {
        let mut c = RawClient::connect(&sock);
        if let Err(e) = act(&mut c) {
            panic!("{name}: {e}");
        }
        if *dropped {
            assert!(c.closed_by_server(), "{name}: connection not closed");
        }
        drop(c);
        assert!(srv.running(), "{name}: the server died: {}", srv.stderr());
        // Another client is served as before.
        let r = qemu_io_uri(
            &srv.addr.uri(),
            &["read -P 0x22 1M 192k", "write -P 0x5a 5M 4k"],
        );
        assert!(r.is_ok(), "{name}: {r:?}");
    }
    drop(holder);
    let st = srv
        .wait_exit(Duration::from_secs(10))
        .expect("server exits after its last client");
    assert!(st.success(), "{st}: {}", srv.stderr());
    assert_qemu_check_clean(&image);
    let out = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0x5a 5M 4k",
        "-c",
        "read -P 0x11 0 64k",
        s(&image),
    ]);
    assert!(
        !out.stdout.contains("fail") && out.success(),
        "{}",
        out.report()
    );
}

#[test]
fn server_exits_after_the_last_client_without_persistent() {
    let d = tempdir();
    let image = make_image(d.path(), "raw");
    let sock = d.path().join("s");
    let mut srv = serve(
        &["-f", "raw", s(&image)],
        Addr::Unix(sock.clone()),
        d.path(),
    );
    qemu_io_uri(&srv.addr.uri(), &["read -P 0x11 0 64k"]).unwrap();
    let st = srv
        .wait_exit(Duration::from_secs(10))
        .expect("server still running");
    assert!(st.success(), "{st}: {}", srv.stderr());
    assert!(!sock.exists(), "the socket file is left behind");

    // With -t it stays for the next client.
    let mut srv = serve(
        &["-t", "-f", "raw", s(&image)],
        Addr::Unix(sock.clone()),
        d.path(),
    );
    qemu_io_uri(&srv.addr.uri(), &["read -P 0x11 0 64k"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(srv.running(), "-t server exited");
    qemu_io_uri(&srv.addr.uri(), &["read -P 0x22 1M 4k"]).unwrap();
}

#[test]
fn the_image_stays_locked_while_served() {
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    let _srv = serve(&["-t", s(&image)], unix(d.path(), "s"), d.path());
    let out = qemu_io(&["-f", "qcow2", "-c", "read 0 512", s(&image)]);
    assert!(
        out.stderr.contains("Failed to get") && out.stderr.contains("lock"),
        "{}",
        out.report()
    );
}

#[test]
fn bad_arguments_fail_like_qemu_nbd() {
    let d = tempdir();
    let image = make_image(d.path(), "raw");
    let cases: [(&[&str], &str); 3] = [
        (&["--cache=bogus", s(&image)], "img: Invalid cache mode `bogus'\n"),
        (&["-k", "x"], "img: Invalid number of arguments\nTry `img serve --help' for more information.\n"),
        (&["-k", "x", "/nonexistent"], "img: Failed to blk_new_open '/nonexistent': Could not open '/nonexistent': No such file or directory\n"),
    ];
    for (args, err) in cases {
        let mut full = vec!["serve"];
        full.extend_from_slice(args);
        let out = img_in(d.path(), &full);
        assert_eq!(out.code, Some(1), "{}", out.report());
        assert_eq!(out.stderr, err);
    }
}

#[test]
fn sigterm_ends_the_clients_flushes_and_exits() {
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    let sock = d.path().join("s");
    let mut srv = serve(
        &["-t", "-e", "0", s(&image)],
        Addr::Unix(sock.clone()),
        d.path(),
    );
    qemu_io_uri(
        &srv.addr.uri(),
        &["write -P 0x61 6M 1M", "write -P 0x62 100k 8k"],
    )
    .unwrap();
    // A client still connected when the signal comes.
    let mut idle = RawClient::connect(&sock);
    idle.go().unwrap();
    srv.terminate();
    let st = srv
        .wait_exit(Duration::from_secs(10))
        .expect("server exits on SIGTERM");
    assert!(st.success(), "{st}: {}", srv.stderr());
    assert!(
        idle.closed_by_server(),
        "the connected client was not ended"
    );
    assert!(!sock.exists(), "the socket file is left behind");
    assert_qemu_check_clean(&image);
    let out = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0x61 6M 1M",
        "-c",
        "read -P 0x62 100k 8k",
        s(&image),
    ]);
    assert!(
        out.success() && !out.stdout.contains("fail"),
        "{}",
        out.report()
    );
}

#[test]
fn allocation_depth_matches_qemu_nbd() {
    // qemu-img maps another meta context in place of base:allocation with the nbd
    // driver's x-dirty-bitmap option: the qemu:allocation-depth values, run by run.
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    let depth_map = |sock: &Path| {
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:allocation-depth",
            sock.display()
        );
        qemu_img(&["map", "--output=json", "--image-opts", &opts])
            .ok()
            .stdout
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let _ours = serve(
        &["-t", "-r", "-A", s(&image)],
        Addr::Unix(a.clone()),
        d.path(),
    );
    let _theirs = Server::start(
        Path::new("qemu-nbd"),
        &["-t", "-r", "-A", s(&image)],
        Addr::Unix(b.clone()),
        d.path(),
    );
    let (ours, theirs) = (depth_map(&a), depth_map(&b));
    assert!(theirs.lines().count() > 3, "too simple a map: {theirs}");
    if let Some(diff) = text_diff("qemu-nbd", &theirs, "img serve", &ours) {
        panic!("{diff}");
    }
}

#[test]
fn flags_without_structured_replies_match_qemu_nbd() {
    // A client that goes straight to NBD_OPT_GO: no DF flag, the rest as qemu-nbd's.
    let d = tempdir();
    let image = make_image(d.path(), "qcow2");
    for (i, opts) in [vec![], vec!["-r"], vec!["-e", "3"]]
        .into_iter()
        .enumerate()
    {
        let mut args = opts.clone();
        args.push(s(&image));
        let go = |srv: Server| {
            let Addr::Unix(p) = &srv.addr else {
                unreachable!()
            };
            RawClient::connect(p).go().unwrap()
        };
        let ours = go(serve(&args, unix(d.path(), &format!("a{i}")), d.path()));
        let qemu = Path::new("qemu-nbd");
        let theirs = go(Server::start(
            qemu,
            &args,
            unix(d.path(), &format!("b{i}")),
            d.path(),
        ));
        assert_eq!(ours, theirs, "{opts:?}: (size, flags)");
    }
}

#[test]
fn export_name_option_opens_the_export_or_hangs_up() {
    let d = tempdir();
    let image = make_image(d.path(), "raw");
    let sock = d.path().join("s");
    let _srv = serve(
        &["-t", "-e", "0", "-x", "disk", s(&image)],
        Addr::Unix(sock.clone()),
        d.path(),
    );
    for (name, ok) in [
        (&b"disk"[..], true),
        (b"other", false),
        (b"\xffdisk", false),
        (b"", false),
    ] {
        let mut c = RawClient::connect(&sock);
        c.greet().unwrap();
        c.send(
            &OptionRequest {
                option: OPT_EXPORT_NAME,
                data: name.to_vec(),
            }
            .encode(),
        )
        .unwrap();
        if ok {
            // NO_ZEROES was set: size and flags only.
            let mut reply = [0u8; 10];
            std::io::Read::read_exact(&mut c.sock, &mut reply).unwrap();
            assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 8 << 20);
            let r = Request {
                flags: 0,
                command: CMD_READ,
                cookie: 5,
                offset: 0,
                len: 4096,
            };
            c.send(&r.encode()).unwrap();
            let mut head = [0u8; 16];
            std::io::Read::read_exact(&mut c.sock, &mut head).unwrap();
            assert_eq!(&head[4..8], &[0, 0, 0, 0], "read failed");
            let mut data = vec![0u8; 4096];
            std::io::Read::read_exact(&mut c.sock, &mut data).unwrap();
            assert!(data.iter().all(|&b| b == 0x11), "wrong data");
        } else {
            assert!(c.closed_by_server(), "{name:?}: not refused");
        }
    }
}
