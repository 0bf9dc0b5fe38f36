//! The NBD code against libnbd and nbdkit, independent implementations: `nbdinfo` sees an
//! `img serve` export exactly as it sees qemu-nbd's of the same image (handshake, flags,
//! block sizes, contexts, both maps), `nbdcopy` copies out of and into it; `img` reads
//! nbdkit exports as qemu-img does. Needs libnbd-bin and nbdkit
//! (`fixtures/install-host-deps.sh`); without them the tests are skipped, but fail in CI.

use integration_tests::nbd::{serve_img, unix_at, unix_listening, Addr, Server};
use integration_tests::*;
use std::path::{Path, PathBuf};

/// Whether `nbdinfo`, `nbdcopy` and `nbdkit` are installed (a missing one skips the test,
/// or fails it in CI).
fn have_nbd_tools() -> bool {
    let have = ["nbdinfo", "nbdcopy", "nbdkit"].iter().all(|t| {
        std::process::Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !have {
        assert!(!in_ci(), "nbdinfo, nbdcopy and nbdkit are required in CI");
        eprintln!("SKIPPED: libnbd-bin or nbdkit not installed");
    }
    have
}

/// A qcow2 over a backing file (data, zeroes, discards), and a copy of it (the two
/// servers each lock their own file read-write).
fn twin_images(dir: &Path) -> (PathBuf, PathBuf) {
    let q = |args: &[&str]| assert!(qemu_img_in(dir, args).success(), "{args:?}");
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io_cmds(
        &dir.join("base.qcow2"),
        "qcow2",
        &["write -P 1 0 1M".into(), "write -z 2M 64k".into()],
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
        "a.qcow2",
    ]);
    qemu_io_cmds(
        &dir.join("a.qcow2"),
        "qcow2",
        &[
            "write -P 2 512k 64k".into(),
            "write -z 3M 64k".into(),
            "discard 0 64k".into(),
        ],
    );
    std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
    (dir.join("a.qcow2"), dir.join("b.qcow2"))
}

fn run_tool(program: &str, args: &[&str]) -> Output {
    Tool::at(program).run(None, args)
}

#[test]
fn nbdinfo_sees_img_serve_as_it_sees_qemu_nbd() {
    if !have_nbd_tools() {
        return;
    }
    let d = tempdir();
    let (a, b) = twin_images(d.path());
    let mut f = Failures::new();
    for (i, (opts, export)) in [
        (vec!["-t", "-A"], ""),
        (
            vec!["-t", "-r", "-x", "ex", "-D", "a description", "-e", "0"],
            "ex",
        ),
        (vec!["-t", "-e", "2"], ""),
    ]
    .into_iter()
    .enumerate()
    {
        let start = |program: &Path, image: &Path, sock: &str| {
            let mut args = vec![];
            if program.ends_with("img") {
                args.push("serve");
            }
            args.extend(opts.iter().copied());
            args.push(s(image));
            Server::start(program, &args, Addr::Unix(d.path().join(sock)), d.path())
        };
        let ours = start(&img_bin(), &a, &format!("a{i}"));
        let theirs = start(Path::new("qemu-nbd"), &b, &format!("b{i}"));
        let uri = |sock: &str| {
            format!(
                "nbd+unix:///{export}?socket={}",
                d.path().join(sock).display()
            )
        };
        for flags in [
            &[][..],
            &["--map"],
            &["--map=qemu:allocation-depth"],
            &["--list"],
            &["--json"],
        ] {
            let run = |sock: String| {
                let mut args = flags.to_vec();
                let u = uri(&sock);
                args.push(&u);
                let out = run_tool("nbdinfo", &args);
                (
                    out.code,
                    // The whole socket path: the directory's random name may hold `sock`.
                    format!("{}{}", out.stdout, out.stderr)
                        .replace(&d.path().join(&sock).display().to_string(), "SOCK"),
                )
            };
            let (x, y) = (run(format!("a{i}")), run(format!("b{i}")));
            f.record(
                &format!("{opts:?} nbdinfo {flags:?}"),
                ensure(x == y, || {
                    format!(
                        "exit {:?} vs {:?}\n{}",
                        x.0,
                        y.0,
                        text_diff("qemu-nbd", &y.1, "img serve", &x.1).unwrap_or_default()
                    )
                }),
            );
        }
        drop((ours, theirs));
    }
    f.finish();
}

#[test]
fn nbdcopy_copies_out_of_and_into_img_serve() {
    if !have_nbd_tools() {
        return;
    }
    let d = tempdir();
    let (a, _) = twin_images(d.path());
    let out = d.path().join("out.raw");
    {
        let srv = Server::start(
            &img_bin(),
            &["serve", "-t", "-r", s(&a)],
            Addr::Unix(d.path().join("r")),
            d.path(),
        );
        run_tool("nbdcopy", &[&srv.addr.uri(), s(&out)]).ok();
    }
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&out), s(&a)]).ok();

    // Into an empty qcow2 through a writable export (several connections: -e 4).
    qemu_img_in(
        d.path(),
        &["create", "-q", "-f", "qcow2", "dst.qcow2", "4M"],
    )
    .ok();
    let dst = d.path().join("dst.qcow2");
    let mut srv = Server::start(
        &img_bin(),
        &["serve", "-e", "4", s(&dst)],
        Addr::Unix(d.path().join("w")),
        d.path(),
    );
    run_tool("nbdcopy", &["--connections=4", s(&out), &srv.addr.uri()]).ok();
    let st = srv
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("server exits");
    assert!(st.success(), "{}", srv.stderr());
    assert_qemu_check_clean(&dst);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&dst), s(&out)]).ok();
}

/// `nbdkit -f -U SOCK ARGS...` (a plugin and its arguments), once it listens.
fn start_nbdkit(sock: &std::path::Path, plugin: &[&str]) -> std::process::Child {
    let child = std::process::Command::new("nbdkit")
        .args(["-f", "-U", s(sock)])
        .args(plugin)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let start = std::time::Instant::now();
    while !unix_listening(sock) && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child
}

#[test]
fn img_reads_nbdkit_exports_as_qemu_img_does() {
    if !have_nbd_tools() {
        return;
    }
    let d = tempdir();
    qemu_img_in(
        d.path(),
        &["create", "-q", "-f", "raw", "sparse.raw", "16M"],
    )
    .ok();
    let raw = d.path().join("sparse.raw");
    qemu_io_cmds(
        &raw,
        "raw",
        &["write -P 3 1M 100k".into(), "write -P 4 9M 3M".into()],
    );
    let mut f = Failures::new();
    for (i, plugin) in [vec!["file", s(&raw)], vec!["sparse-random", "64M"]]
        .into_iter()
        .enumerate()
    {
        let sock = d.path().join(format!("k{i}"));
        let mut child = start_nbdkit(&sock, &plugin);
        let uri = Addr::Unix(sock.clone()).uri();
        for cmd in [
            vec!["info", &uri],
            vec!["info", "--output=json", &uri],
            vec!["map", &uri],
            vec!["map", "--output=json", &uri],
            vec!["measure", "-O", "qcow2", &uri],
        ] {
            let (x, y) = (img(&cmd), qemu_img(&cmd));
            f.record(
                &format!("{} {}", plugin[0], cmd[..cmd.len() - 1].join(" ")),
                ensure(x.code == y.code && x.stdout == y.stdout, || {
                    text_diff("qemu-img", &y.stdout, "img", &x.stdout).unwrap_or_default()
                }),
            );
        }
        let out = d.path().join(format!("c{i}.qcow2"));
        f.record(
            &format!("{} convert", plugin[0]),
            (|| {
                img(&["convert", "-O", "qcow2", &uri, s(&out)]).check()?;
                qemu_img(&["compare", &uri, s(&out)]).check().map(|_| ())
            })(),
        );
        let _ = child.kill();
        let _ = child.wait();
    }
    f.finish();
}

/// An extent with the hole flag and no zero flag may hold data (the NBD spec). nbdkit's
/// extentlist filter marks a data export's runs with each pair of flags: `map` shows the
/// hole-only run as qemu-img does (not present, not zero, not data, no offset), convert
/// (plain, and with `-B`, which leaves it to the backing file) and dd copy what qemu-img
/// copies, compare reads it, and `img serve` passes the flags on. qemu-img compare counts it as unallocated and then checks
/// only the other side for zeroes, so it calls the export identical to zeroes and
/// different from its own copy; img gives the true verdicts.
#[test]
fn a_hole_without_the_zero_flag_is_read_and_mapped_as_qemu_img_maps_it() {
    if !have_nbd_tools() {
        return;
    }
    let d = tempdir();
    let list = d.path().join("extents");
    let runs = "0 65536 hole\n65536 65536\n131072 65536 hole,zero\n196608 65536 zero\n\
                262144 131072 hole\n393216 655360\n";
    std::fs::write(&list, runs).unwrap();
    let sock = d.path().join("k");
    let extents = format!("extentlist={}", s(&list));
    let plugin = [
        "--filter=extentlist",
        "data",
        "data=1 2 3 4 5 6 7 8 *8192",
        "size=1M",
        &extents,
    ];
    let mut child = start_nbdkit(&sock, &plugin);
    let uri = Addr::Unix(sock.clone()).uri();
    let dir = d.path();
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]).ok();
    qemu_io_cmds(
        &dir.join("base.qcow2"),
        "qcow2",
        &["write -P 9 0 1M".into()],
    );
    qemu_img_in(dir, &["create", "-q", "-f", "raw", "zeroes.raw", "1M"]).ok();
    let mut f = Failures::new();
    for cmd in [
        vec!["map", "-f", "raw", &uri],
        vec!["map", "-f", "raw", "--output=json", &uri],
    ] {
        let (x, y) = (img(&cmd), qemu_img(&cmd));
        f.record(
            &cmd[..cmd.len() - 1].join(" "),
            ensure(x.code == y.code && x.stdout == y.stdout, || {
                text_diff("qemu-img", &y.stdout, "img", &x.stdout).unwrap_or_default()
            }),
        );
    }
    // Served again by img serve, the run keeps its flags: qemu-img maps both alike.
    let again = unix_at(dir, "again");
    let server = serve_img(&["-f", "raw", "-r", &uri], again.clone(), dir);
    let map = |u: &str| qemu_img(&["map", "-f", "raw", "--output=json", u]).stdout;
    let (direct, served) = (map(&uri), map(&again.uri()));
    f.record(
        "qemu-img map through img serve",
        ensure(direct == served, || {
            text_diff("nbdkit", &direct, "img serve", &served).unwrap_or_default()
        }),
    );
    drop(server);
    let raw = |name: &str| std::fs::read(dir.join(name)).unwrap();
    // What each tool copies, read back as raw by qemu-img.
    let copies: [(&str, Vec<&str>); 3] = [
        ("raw", vec!["convert", "-f", "raw", "-O", "raw", &uri]),
        (
            "-B",
            vec![
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                &uri,
            ],
        ),
        ("dd", vec!["dd", "-f", "raw", "-O", "raw"]),
    ];
    for (what, args) in copies {
        let result = (|| {
            let mut out = Vec::new();
            for (tool, name) in [("img", "i.out"), ("qemu-img", "q.out")] {
                let mut a: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                if what == "dd" {
                    a.extend([format!("if={uri}"), format!("of={name}"), "bs=64k".into()]);
                } else {
                    a.push(name.into());
                }
                let run = if tool == "img" {
                    img_in(dir, &a)
                } else {
                    qemu_img_in(dir, &a)
                };
                run.check()?;
                qemu_img_in(dir, &["convert", "-O", "raw", name, "back.raw"]).check()?;
                out.push(raw("back.raw"));
            }
            ensure(out[0][..8] == out[1][..8] && out[0] == out[1], || {
                format!(
                    "img's copy starts {:?}, qemu-img's {:?}",
                    &out[0][..8],
                    &out[1][..8]
                )
            })
        })();
        f.record(what, result);
    }
    img_in(
        dir,
        &["convert", "-f", "raw", "-O", "raw", &uri, "copy.raw"],
    )
    .ok();
    for (other, verdict, code) in [
        ("copy.raw", "Images are identical.", 0),
        ("zeroes.raw", "Content mismatch at offset 0!", 1),
    ] {
        let x = img_in(dir, &["compare", "-f", "raw", "-F", "raw", &uri, other]);
        f.record(
            &format!("compare with {other}"),
            ensure(x.code == Some(code) && x.stdout.trim() == verdict, || {
                format!("img compare: {:?} {}", x.code, x.stdout)
            }),
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    f.finish();
}
