//! Running a child process on hostile input (`img`, `vmm`, or this test binary re-executed to
//! run engine code): with an address-space limit (`setrlimit(RLIMIT_AS)` in the child between
//! fork and exec), so that an unbounded allocation fails inside the child instead of taking
//! the machine's memory, and a time limit after which the child's process group is killed,
//! so that a hang is a test failure rather than a hung test run.
//!
//! [`Sandbox::run`] runs a child to completion and returns an [`Output`] (exit code or signal,
//! stdout, stderr, whether it was killed at the time limit). [`Sandbox::spawn`] starts one
//! whose stdout the caller follows line by line, moving the deadline on as the child reports
//! progress ([`Running::extend_deadline`]), for children that run many cases each.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::process::{cmdline, kill_group, run, Output};

/// Limits for a child process.
#[derive(Clone, Copy, Debug)]
pub struct Sandbox {
    /// Address-space limit in bytes (soft and hard).
    pub memory: u64,
    /// Time after which the child (its whole process group) is killed.
    pub timeout: Duration,
}

impl Sandbox {
    pub const fn new(memory: u64, timeout: Duration) -> Sandbox {
        Sandbox { memory, timeout }
    }

    fn limit(&self, cmd: &mut Command) {
        let limit = libc::rlimit {
            rlim_cur: self.memory as libc::rlim_t,
            rlim_max: self.memory as libc::rlim_t,
        };
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setrlimit, which is async-signal-safe, on a value copied into the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    /// Run `cmd` (stdin from /dev/null) to completion under the limits.
    pub fn run(&self, cmd: &mut Command) -> Output {
        self.limit(cmd);
        run(cmd, self.timeout)
    }

    /// Start `cmd` (stdin from /dev/null, in a process group of its own) under the limits,
    /// with its stdout delivered line by line. The deadline starts at [`Sandbox::timeout`].
    pub fn spawn(&self, cmd: &mut Command) -> Running {
        self.limit(cmd);
        let line = cmdline(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {line}: {e}"));
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        Running {
            child,
            lines,
            stderr: Some(stderr),
            deadline: Instant::now() + self.timeout,
        }
    }
}

/// What [`Running::next_line`] saw.
#[derive(Debug)]
pub enum Event {
    /// A line of stdout (without its newline).
    Line(String),
    /// Nothing within the wait, and the deadline is still ahead.
    Quiet,
    /// The deadline passed: the child should be killed ([`Running::finish`]).
    Expired,
    /// Stdout was closed: the child exited (or closed it).
    Closed,
}

/// A child started by [`Sandbox::spawn`]. Dropping it kills the child's process group.
pub struct Running {
    child: Child,
    lines: Receiver<String>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    deadline: Instant,
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Move the deadline to `from_now` from now.
    pub fn extend_deadline(&mut self, from_now: Duration) {
        self.deadline = Instant::now() + from_now;
    }

    /// The next line of stdout, waiting at most `wait` (and never past the deadline).
    pub fn next_line(&self, wait: Duration) -> Event {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait.min(left)) {
            Ok(l) => Event::Line(l),
            Err(RecvTimeoutError::Disconnected) => Event::Closed,
            Err(RecvTimeoutError::Timeout) if Instant::now() >= self.deadline => Event::Expired,
            Err(RecvTimeoutError::Timeout) => Event::Quiet,
        }
    }

    /// User + system CPU time the child has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.id())) else {
            return 0;
        };
        let after = stat.rsplit_once(')').map_or("", |x| x.1);
        let f: Vec<&str> = after.split_whitespace().collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    }

    /// Whether any thread of the child is running or runnable (a child with none that uses
    /// no CPU time is blocked: deadlocked, or waiting on something that never comes).
    pub fn any_runnable(&self) -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.id())) else {
            return false;
        };
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')
                        .and_then(|x| x.1.split_whitespace().next().map(|c| c == "R"))
                })
                .unwrap_or(false)
        })
    }

    /// Kill the child's process group (if still there), reap the child, and return how it
    /// ended with everything it wrote to stderr.
    pub fn finish(mut self) -> (ExitStatus, String) {
        kill_group(self.child.id());
        let status = self.child.wait().expect("wait for the child");
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&stderr).into_owned())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Sandbox = Sandbox::new(256 << 20, Duration::from_secs(30));

    /// The address-space limit reaches the child: a 512 MiB allocation fails there.
    #[test]
    fn memory_limit_applies_to_the_child() {
        let o = LIMITS.run(Command::new("sh").args(["-c", "ulimit -v"]));
        assert!(o.success(), "{}", o.report());
        assert_eq!(o.stdout.trim(), (256 << 10).to_string(), "{}", o.report());
        let dd = |bs: &str| {
            LIMITS.run(Command::new("dd").args(["if=/dev/zero", "of=/dev/null", "count=1", bs]))
        };
        let o = dd("bs=512M");
        assert!(
            o.code == Some(1) && o.stderr.contains("memory exhausted"),
            "{}",
            o.report()
        );
        let o = dd("bs=16M");
        assert!(o.success(), "{}", o.report());
    }

    /// A child past its time limit is killed, and says so.
    #[test]
    fn time_limit_kills() {
        let t0 = Instant::now();
        let o = Sandbox::new(256 << 20, Duration::from_millis(300))
            .run(Command::new("sh").args(["-c", "sleep 100; echo never"]));
        assert!(o.timed_out && !o.success(), "{}", o.report());
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    /// A spawned child's lines arrive as they are written; the deadline moves on; past it,
    /// `next_line` says so; `finish` kills the child and returns its stderr.
    #[test]
    fn spawned_child_lines_and_deadline() {
        let mut r = Sandbox::new(256 << 20, Duration::from_secs(30))
            .spawn(Command::new("sh").args(["-c", "echo one; echo oops >&2; echo two; sleep 100"]));
        let mut got = Vec::new();
        while got.len() < 2 {
            match r.next_line(Duration::from_secs(10)) {
                Event::Line(l) => got.push(l),
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(got, ["one", "two"]);
        assert!(matches!(
            r.next_line(Duration::from_millis(50)),
            Event::Quiet
        ));
        r.extend_deadline(Duration::from_millis(100));
        let t0 = Instant::now();
        let e = loop {
            match r.next_line(Duration::from_secs(5)) {
                Event::Quiet => continue,
                e => break e,
            }
        };
        assert!(matches!(e, Event::Expired), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(4));
        let (status, stderr) = r.finish();
        assert!(!status.success());
        assert_eq!(stderr, "oops\n");
        let r = Sandbox::new(256 << 20, Duration::from_secs(30))
            .spawn(Command::new("sh").args(["-c", "exit 3"]));
        assert!(matches!(
            r.next_line(Duration::from_secs(10)),
            Event::Closed
        ));
        assert_eq!(r.finish().0.code(), Some(3));
    }
}
