//! Writing chunks in order: the worker holding chunk `seq` waits until every chunk before it
//! is written. Each waiter is woken alone, when its turn comes (or the copy fails), instead of
//! every worker at each step.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, Thread};

#[derive(Default)]
pub struct Turn {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The sequence number that may write now.
    next: u64,
    /// The workers waiting, by the sequence number they hold.
    waiting: HashMap<u64, Thread>,
    /// The copy failed: nobody waits any more.
    stopped: bool,
}

impl Turn {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until chunk `seq` may write; false if the copy stopped meanwhile.
    pub fn wait(&self, seq: u64) -> bool {
        let mut st = self.state();
        loop {
            if st.stopped {
                return false;
            }
            if st.next == seq {
                return true;
            }
            st.waiting.insert(seq, thread::current());
            drop(st);
            // Woken by `done` or `stop` (or spuriously: the loop looks again).
            thread::park();
            st = self.state();
        }
    }

    /// Chunk `next` is written: the next one's worker may go on.
    pub fn done(&self) {
        let mut st = self.state();
        st.next += 1;
        let next = st.next;
        if let Some(t) = st.waiting.remove(&next) {
            t.unpark();
        }
    }

    /// The copy failed: every waiter gives up.
    pub fn stop(&self) {
        let mut st = self.state();
        st.stopped = true;
        for (_, t) in st.waiting.drain() {
            t.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Eight threads hold the chunks in reverse order of their start: each writes only
    /// after all chunks before its own, and all of them finish.
    #[test]
    fn chunks_are_written_in_order() {
        let turn = Turn::default();
        let written = Mutex::new(Vec::new());
        let n = 8u64;
        thread::scope(|s| {
            for seq in (0..n).rev() {
                let (turn, written) = (&turn, &written);
                s.spawn(move || {
                    assert!(turn.wait(seq));
                    written.lock().unwrap().push(seq);
                    turn.done();
                });
            }
        });
        assert_eq!(*written.lock().unwrap(), (0..n).collect::<Vec<_>>());
    }

    /// A stop wakes every waiter with false, and a later wait returns false at once.
    #[test]
    fn a_stop_releases_every_waiter() {
        let turn = Turn::default();
        let gave_up = AtomicU64::new(0);
        thread::scope(|s| {
            for seq in 1..5 {
                let (turn, gave_up) = (&turn, &gave_up);
                s.spawn(move || {
                    if !turn.wait(seq) {
                        gave_up.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            while turn.state().waiting.len() < 4 {
                thread::yield_now();
            }
            turn.stop();
        });
        assert_eq!(gave_up.load(Ordering::SeqCst), 4);
        assert!(!turn.wait(0));
    }
}
