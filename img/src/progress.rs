//! Progress of long jobs, as qemu-img shows it: with `-p`, `    (N.NN/100%)` on stdout
//! (an indicatif bar on a terminal, qemu-img's `\r`-separated lines elsewhere) and a
//! newline when the job ends, whether it succeeded or not; without it, one such line on
//! stderr per SIGUSR1.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Set by the SIGUSR1 handler, cleared when the line is printed.
static SIGUSR1_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    SIGUSR1_SEEN.store(true, Ordering::SeqCst);
}

/// How `-p` output is drawn.
enum Display {
    /// No `-p`: a line only when SIGUSR1 asks.
    OnSignal,
    /// `-p` on a terminal.
    Bar(ProgressBar),
    /// `-p` into a file or pipe: qemu-img's text, a line per percent.
    Text { last: Mutex<f64> },
}

/// Bytes done out of a total, shown as asked.
pub struct Progress {
    display: Display,
    total: AtomicU64,
    done: AtomicU64,
    /// The final line was ended.
    ended: AtomicBool,
}

impl Progress {
    /// `shown` is `-p` without `-q`.
    pub fn new(shown: bool) -> Progress {
        let display = if !shown {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(
                    libc::SIGUSR1,
                    on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
            Display::OnSignal
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(10_000), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template("    ({msg}/100%)").expect("a valid template"),
            );
            Display::Bar(bar)
        } else {
            Display::Text {
                last: Mutex::new(-1.0),
            }
        };
        let p = Progress {
            display,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        };
        p.show();
        p
    }

    /// The job has `total` bytes to do.
    pub fn start(&self, total: u64) {
        self.total.store(total, Ordering::SeqCst);
    }

    /// `n` more bytes are done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::SeqCst);
        self.show();
    }

    fn percent(&self) -> f64 {
        let total = self.total.load(Ordering::SeqCst);
        if total == 0 {
            return 0.0;
        }
        self.done.load(Ordering::SeqCst) as f64 * 100.0 / total as f64
    }

    fn show(&self) {
        let pct = self.percent();
        match &self.display {
            Display::OnSignal => {
                if SIGUSR1_SEEN.swap(false, Ordering::SeqCst) {
                    eprintln!("    ({pct:.2}/100%)");
                }
            }
            Display::Bar(bar) => {
                bar.set_position((pct * 100.0) as u64);
                bar.set_message(format!("{pct:.2}"));
            }
            Display::Text { last } => {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if pct - *last >= 1.0 || (pct >= 100.0 && *last < 100.0) {
                    *last = pct;
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "    ({pct:.2}/100%)\r");
                    let _ = out.flush();
                }
            }
        }
    }

    /// The job is done: show 100% and end the line.
    pub fn finish(&self) {
        self.done
            .store(self.total.load(Ordering::SeqCst), Ordering::SeqCst);
        if self.total.load(Ordering::SeqCst) == 0 {
            self.total.store(1, Ordering::SeqCst);
            self.done.store(1, Ordering::SeqCst);
        }
        self.show();
        self.end();
    }

    /// End the line (qemu-img's `qemu_progress_end`), once.
    fn end(&self) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        match &self.display {
            Display::OnSignal => {}
            Display::Bar(bar) => bar.finish(),
            Display::Text { .. } => println!(),
        }
    }
}

impl Drop for Progress {
    /// A job that failed ends its progress line too, as in qemu-img.
    fn drop(&mut self) {
        self.end();
    }
}
