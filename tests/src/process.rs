//! Running a child process to completion with a time limit, capturing what it printed.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default timeout for one external command.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished (or killed) command left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code; `None` when killed by a signal or by the timeout.
    pub code: Option<i32>,
    /// The signal that ended the process, if any.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Whether we killed it because it ran past its timeout.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// Panic with a full report unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Output {
        if !self.success() {
            panic!("command failed:\n{}", self.report());
        }
        self
    }

    /// `Err` with the full report unless the command exited 0.
    pub fn check(self) -> Result<Output, String> {
        if self.success() {
            Ok(self)
        } else {
            Err(format!("command failed:\n{}", self.report()))
        }
    }

    /// A multi-line description for failure messages.
    pub fn report(&self) -> String {
        format!(
            "  $ {}\n  exit: {:?}{}{}\n  stdout:\n{}\n  stderr:\n{}",
            self.cmdline,
            self.code,
            self.signal
                .map(|s| format!(" (signal {s})"))
                .unwrap_or_default(),
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    | {l}\n")).collect()
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The command line of `cmd` as a shell would show it, for messages.
pub(crate) fn cmdline(cmd: &Command) -> String {
    let line = std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| quote(&a.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ");
    match cmd.get_current_dir() {
        Some(d) => format!("(cd {} && {line})", d.display()),
        None => line,
    }
}

/// SIGKILL the process group `pid` leads (a group that is gone is not an error).
pub(crate) fn kill_group(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; a group that is gone is ESRCH.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

/// Run `cmd` (stdin from /dev/null, in a process group of its own) to completion or until
/// `timeout`, capturing everything. At the timeout the whole group is killed, and whatever is
/// left of it when the command exits is killed too (a leftover child would keep the output
/// pipes open): this never hangs.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let cmdline = cmdline(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(st) => break st,
            None if start.elapsed() > timeout => {
                timed_out = true;
                kill_group(child.id());
                break child.wait().expect("wait after kill");
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    kill_group(child.id());
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    Output {
        cmdline,
        code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        timed_out,
        elapsed: start.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command that outlives its timeout is killed with its children, and `run` returns
    /// promptly (a hung guest or tool must fail a test, not hang CI). So does a command that
    /// exits while a child it left behind still holds the output pipes.
    #[test]
    fn run_kills_the_whole_group() {
        let t0 = Instant::now();
        let o = run(
            Command::new("sh").args(["-c", "sleep 100 & sleep 100; echo never"]),
            Duration::from_millis(500),
        );
        assert!(o.timed_out && o.code.is_none(), "{}", o.report());
        assert!(!o.stdout.contains("never"), "{}", o.report());
        let o = run(
            Command::new("sh").args(["-c", "sleep 100 & echo started"]),
            Duration::from_secs(60),
        );
        assert!(o.success() && o.stdout == "started\n", "{}", o.report());
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "run() did not return promptly"
        );
    }
}
