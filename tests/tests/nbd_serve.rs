//! `img serve` against qemu's NBD clients (`qemu-io`, `qemu-img`) and `qemu-nbd`: the
//! export reads, writes, maps and converts as the file does, over a unix socket and TCP;
//! the handshake as qemu-nbd's; the server exits after its last client unless `-t`, and
//! on SIGTERM. Hostile and read-only clients: `nbd_hostile.rs`.

use integration_tests::nbd::{
    free_port, qemu_io_uri, sample_image, serve_img, unix_at, Addr, RawClient, Server,
};
use integration_tests::*;
use std::path::Path;
use std::time::Duration;

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
                let image = sample_image(d.path(), fmt);
                let before = qemu_read_all(&image, Some(fmt), d.path());
                let addr = if tcp {
                    Addr::Tcp(free_port())
                } else {
                    unix_at(d.path(), "sock")
                };
                let srv = serve_img(&["-t", "-f", fmt, s(&image)], addr, d.path());
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
                let image = sample_image(d.path(), fmt);
                let ours = serve_img(
                    &["-t", "-r", "-f", fmt, s(&image)],
                    unix_at(d.path(), "a"),
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
                    unix_at(d.path(), "b"),
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
    let image = sample_image(d.path(), "qcow2");
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
                let ours = serve_img(&args, Addr::Unix(sa.clone()), d.path());
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
fn server_exits_after_the_last_client_without_persistent() {
    let d = tempdir();
    let image = sample_image(d.path(), "raw");
    let sock = d.path().join("s");
    let mut srv = serve_img(
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
    let mut srv = serve_img(
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
    let image = sample_image(d.path(), "qcow2");
    let _srv = serve_img(&["-t", s(&image)], unix_at(d.path(), "s"), d.path());
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
    let image = sample_image(d.path(), "raw");
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
    let image = sample_image(d.path(), "qcow2");
    let sock = d.path().join("s");
    let mut srv = serve_img(
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
    let image = sample_image(d.path(), "qcow2");
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
    let _ours = serve_img(
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
    let image = sample_image(d.path(), "qcow2");
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
        let ours = go(serve_img(
            &args,
            unix_at(d.path(), &format!("a{i}")),
            d.path(),
        ));
        let qemu = Path::new("qemu-nbd");
        let theirs = go(Server::start(
            qemu,
            &args,
            unix_at(d.path(), &format!("b{i}")),
            d.path(),
        ));
        assert_eq!(ours, theirs, "{opts:?}: (size, flags)");
    }
}
