//! However a connection ends - the stream cut inside a request with many in flight,
//! replies that cannot be sent, NBD_CMD_DISC with writes still running, the handshake cut
//! short - once the server's calls return and the export is dropped, nothing holds the
//! image: no descriptor of this process is open on it, it opens read-write again (its
//! locks are gone) and it checks clean. (The fuzz target `nbd_server` reopens its image
//! after every input and relies on this.)

use std::io::{self, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::check::Fix;
use common::create::{create, CreateOptions, Qcow2CreateOptions};
use common::nbd::consts::*;
use common::nbd::server::{negotiate, transmit, Context, Export, Limits, Session, WriteCache};
use common::open::{open_image, OpenOptions};
use integration_tests::nbd::{request, Gone};
use integration_tests::tempdir;

const SIZE: u64 = 1 << 20;

/// The request limits the fuzz target picks from, each with the standard byte budget and
/// a 64 KiB one.
fn all_limits() -> Vec<Limits> {
    let standard = Limits::default();
    [standard.requests, 1, 2, 4]
        .into_iter()
        .flat_map(|requests| [standard.bytes, 64 << 10].map(|bytes| Limits { requests, bytes }))
        .collect()
}

/// A 1 MiB qcow2 with 4 KiB clusters.
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("top.qcow2");
    let q = Qcow2CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        ..Default::default()
    };
    create(&path, &CreateOptions::Qcow2(q)).unwrap();
    path
}

fn export(path: &Path, limits: Limits) -> Export {
    Export {
        image: open_image(path, &OpenOptions::default())
            .expect("the image opens read-write")
            .into_driver(),
        name: String::new(),
        description: None,
        allocation_depth: false,
        cache: WriteCache::Back,
        multi_conn: false,
        limits,
    }
}

/// The descriptors of this process open on `path`, from `/proc/self/fd`.
fn fds_on(path: &Path) -> Vec<String> {
    let m = std::fs::metadata(path).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::metadata(e.path()).is_ok_and(|f| (f.dev(), f.ino()) == (m.dev(), m.ino()))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Nothing holds the image any more: no descriptor, it opens read-write, checks clean.
fn assert_released(path: &Path, what: &str) {
    let left = fds_on(path);
    assert!(
        left.is_empty(),
        "{what}: descriptors {left:?} outlive serving"
    );
    let img = open_image(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: the image does not reopen read-write: {e}"));
    let r = img.check(Fix::default()).unwrap();
    assert!(
        r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 && r.failure.is_none(),
        "{what}: {r:?}"
    );
    drop(img);
    assert!(
        fds_on(path).is_empty(),
        "{what}: the check's descriptor stays"
    );
}

/// 40 writes of 16 KiB (more than the budget and the request limit let in at once).
fn writes() -> Vec<u8> {
    let mut v = Vec::new();
    for c in 0..40u64 {
        v.extend(request(CMD_WRITE, c, c * (16 << 10) % SIZE, 16 << 10));
        v.extend(vec![c as u8 + 1; 16 << 10]);
    }
    v
}

/// 200 reads of 4 KiB.
fn reads() -> Vec<u8> {
    (0..200u64)
        .flat_map(|c| request(CMD_READ, c, c * 4096 % SIZE, 4096))
        .collect()
}

/// Serve `input` as one connection's transmission phase (structured replies,
/// `base:allocation`), replies to `w`, then drop the export and check what is left.
fn serve_then_release(input: &[u8], w: &mut (impl Write + Send), what: &str) {
    let d = tempdir();
    let path = image(d.path());
    for limits in all_limits() {
        let e = export(&path, limits);
        let session = Session {
            structured: true,
            contexts: vec![Context::BaseAllocation],
        };
        let _ = transmit(&e, &session, &mut BufReader::new(input), w);
        drop(e);
        assert_released(&path, &format!("{what}, {limits:?}"));
    }
}

#[test]
fn the_stream_cut_inside_a_payload_with_writes_in_flight_releases_the_image() {
    let mut input = writes();
    input.extend(request(CMD_WRITE, 99, 0, 16 << 10));
    input.extend([0xee; 100]);
    serve_then_release(&input, &mut io::sink(), "cut inside a payload");
}

#[test]
fn the_stream_cut_inside_a_header_with_reads_in_flight_releases_the_image() {
    let mut input = reads();
    input.extend(&request(CMD_READ, 999, 0, 4096)[..10]);
    serve_then_release(&input, &mut io::sink(), "cut inside a header");
}

#[test]
fn a_broken_request_after_writes_releases_the_image() {
    let mut input = writes();
    input.extend([0x42; 28]);
    serve_then_release(&input, &mut io::sink(), "bad magic");
}

#[test]
fn replies_that_cannot_be_sent_release_the_image() {
    serve_then_release(&reads(), &mut Gone, "client gone (reads)");
    serve_then_release(&writes(), &mut Gone, "client gone (writes)");
}

#[test]
fn disc_with_writes_in_flight_releases_the_image() {
    let mut input = writes();
    input.extend(request(CMD_FLUSH, 100, 0, 0));
    input.extend(request(CMD_DISC, 101, 0, 0));
    input.extend(writes());
    serve_then_release(&input, &mut io::sink(), "disc");
}

#[test]
fn a_handshake_cut_short_releases_the_image() {
    let d = tempdir();
    let path = image(d.path());
    // Fixed newstyle and no zeroes, then NBD_OPT_GO whose data ends early.
    let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    input.extend(IHAVEOPT.to_be_bytes());
    input.extend(OPT_GO.to_be_bytes());
    input.extend(6u32.to_be_bytes());
    input.extend([0, 0]);
    for cut in [0, 2, 4, 12, 16, input.len()] {
        let e = export(&path, Limits::default());
        let r = negotiate(&e, &mut &input[..cut], &mut io::sink());
        assert!(r.is_err(), "a handshake cut at {cut} was accepted");
        drop(e);
        assert_released(&path, &format!("handshake cut at {cut}"));
    }
}
