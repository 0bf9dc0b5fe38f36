//! The NBD code against libnbd and nbdkit, independent implementations: `nbdinfo` sees an
//! `img serve` export exactly as it sees qemu-nbd's of the same image (handshake, flags,
//! block sizes, contexts, both maps), `nbdcopy` copies out of and into it; `img` reads
//! nbdkit exports as qemu-img does. Needs libnbd-bin and nbdkit
//! (`fixtures/install-host-deps.sh`); without them the tests are skipped, but fail in CI.

use integration_tests::nbd::{unix_listening, Addr, Server};
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

/// An extent with the hole flag and no zero flag may hold data (the NBD spec): convert
/// reads it, as qemu-img does, instead of leaving zeroes (nbdkit's extentlist filter marks
/// the first 64 KiB of a data export so).
#[test]
fn a_hole_without_the_zero_flag_is_copied() {
    if !have_nbd_tools() {
        return;
    }
    let d = tempdir();
    let list = d.path().join("extents");
    std::fs::write(&list, "0 65536 hole\n65536 983040\n").unwrap();
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
    let (mine, theirs) = (d.path().join("i.raw"), d.path().join("q.raw"));
    let result = (|| {
        img(&["convert", "-f", "raw", "-O", "raw", &uri, s(&mine)]).check()?;
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri, s(&theirs)]).check()?;
        let (a, b) = (
            std::fs::read(&mine).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        ensure(a[..8] == [1, 2, 3, 4, 5, 6, 7, 8] && a == b, || {
            format!("img's copy starts {:?}, qemu-img's {:?}", &a[..8], &b[..8])
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
}
