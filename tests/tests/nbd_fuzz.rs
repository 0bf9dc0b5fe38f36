//! Seeded random requests against `img serve` (qcow2 over a backing file): headers with
//! random commands, flags, offsets and lengths around the export's end, payloads that do
//! or do not match, connections cut anywhere. The server must keep serving, and the
//! image must pass `qemu-img check` and read back what the accepted writes left.

use integration_tests::nbd::{Addr, RawClient, Server};
use integration_tests::*;
use std::io::Read;
use std::time::Duration;

use common::nbd::consts::*;
use common::nbd::request::Request;

const SIZE: u64 = 8 << 20;

#[test]
fn random_requests_never_harm_the_server_or_the_image() {
    let mut rng = Rng::new(seed(0x6e62_6466));
    let d = tempdir();
    let q = |args: &[&str]| assert!(qemu_img_in(d.path(), args).success(), "{args:?}");
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io_cmds(
        &d.path().join("base.qcow2"),
        "qcow2",
        &["write -P 1 0 4M".into()],
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
        "top.qcow2",
    ]);
    let image = d.path().join("top.qcow2");
    let sock = d.path().join("s");
    let mut srv = Server::start(
        &img_bin(),
        &["serve", "-e", "0", s(&image)],
        Addr::Unix(sock.clone()),
        d.path(),
    );
    let mut holder = RawClient::connect(&sock);
    holder.go().unwrap();
    let commands = [
        CMD_READ,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
        8,
        200,
    ];
    for round in 0..60 {
        assert!(
            srv.running(),
            "before round {round}: the server died: {}",
            srv.stderr()
        );
        let mut c = RawClient::connect(&sock);
        c.go().unwrap();
        for _ in 0..rng.range(1, 8) {
            let offset = match rng.below(3) {
                0 => rng.below(SIZE),
                1 => SIZE - rng.below(8192),
                _ => rng.next_u64(),
            };
            let len = match rng.below(4) {
                0 => rng.below(65536) as u32,
                1 => rng.below(1 << 26) as u32,
                2 => rng.next_u64() as u32,
                _ => 512,
            };
            let req = Request {
                flags: if rng.chance(1, 3) {
                    rng.next_u64() as u16
                } else {
                    0
                },
                command: *rng.pick(&commands),
                cookie: rng.next_u64(),
                offset,
                len,
            };
            let mut bytes = req.encode().to_vec();
            if rng.chance(1, 10) {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] ^= 1 << rng.below(8);
            }
            if req.command == CMD_WRITE {
                let n = if rng.chance(4, 5) {
                    len.min(1 << 20)
                } else {
                    rng.below(4096) as u32
                };
                bytes.extend(rng.bytes(n as usize));
            }
            if rng.chance(1, 8) {
                bytes.truncate(rng.below(bytes.len() as u64) as usize);
            }
            if c.send(&bytes).is_err() {
                break;
            }
            // Drain whatever comes back for a moment, so that replies do not pile up.
            c.sock
                .set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = c.sock.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
        drop(c);
        assert!(
            srv.running(),
            "round {round}: the server died: {}",
            srv.stderr()
        );
    }
    // Still served as before.
    let uri = srv.addr.uri();
    let out = qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x7e 6M 64k",
        "-c",
        "read -P 0x7e 6M 64k",
        &uri,
    ]);
    assert!(
        out.success() && !out.stdout.contains("fail"),
        "{}",
        out.report()
    );
    drop(holder);
    let st = srv
        .wait_exit(Duration::from_secs(10))
        .expect("server exits after its last client");
    assert!(st.success(), "{st}: {}", srv.stderr());
    assert_qemu_check_clean(&image);
    let out = qemu_io(&["-f", "qcow2", "-c", "read -P 0x7e 6M 64k", s(&image)]);
    assert!(
        out.success() && !out.stdout.contains("fail"),
        "{}",
        out.report()
    );
}
