//! `img serve` against clients that break the rules: garbage, truncated handshakes and
//! requests, lying lengths, writes to a read-only export, the old-style NBD_OPT_EXPORT_NAME
//! with wrong names. Each is answered with an error or dropped; the server keeps serving
//! other clients and the image stays intact.

use integration_tests::nbd::{qemu_io_uri, sample_image, serve_img, unix_at, Addr, RawClient};
use integration_tests::*;
use std::time::Duration;

use common::nbd::consts::*;
use common::nbd::handshake::OptionRequest;
use common::nbd::request::Request;

#[test]
fn read_only_export_refuses_writes() {
    let d = tempdir();
    let image = sample_image(d.path(), "qcow2");
    let before = std::fs::read(&image).unwrap();
    let srv = serve_img(&["-t", "-r", s(&image)], unix_at(d.path(), "s"), d.path());
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
    let image = sample_image(d.path(), "qcow2");
    let sock = d.path().join("s");
    let mut srv = serve_img(
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
fn export_name_option_opens_the_export_or_hangs_up() {
    let d = tempdir();
    let image = sample_image(d.path(), "raw");
    let sock = d.path().join("s");
    let _srv = serve_img(
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
