//! The one way the engine's unit tests run qemu-img and qemu-io (the cross-crate tests
//! use the tests library instead; this crate cannot depend on it), and their
//! incompressible data.

use std::process::Command;
use std::time::{Duration, Instant};

/// Run `tool` (qemu-img or qemu-io) with `args`: its exit code (-1 when killed), and its
/// stdout followed by its stderr. A lock conflict is retried for a moment: another test thread's
/// child process may briefly hold a copy of a descriptor this test just closed.
pub fn qemu(tool: &str, args: &[&str]) -> (i32, String) {
    let start = Instant::now();
    loop {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} runs: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if text.contains("Is another process using the image")
            && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        return (out.status.code().unwrap_or(-1), text);
    }
}

/// [`qemu`] that must succeed; returns what the tool printed.
pub fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let (code, text) = qemu(tool, args);
    assert_eq!(code, 0, "{tool} {args:?} failed:\n{text}");
    text
}

/// `len` bytes of xorshift noise, the same every call: data no deflate shrinks.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
