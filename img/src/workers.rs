//! Independent pieces of a long job (commit, rebase) done on a few threads, as QEMU's
//! block jobs keep several requests in flight: each thread takes the next piece in order
//! until none is left or one failed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// At least this many threads: one reads while another writes.
const MIN_THREADS: usize = 2;
/// At most this many: past one per CPU they only contend for the file (measured).
const MAX_THREADS: usize = 8;

/// Do `f` for every piece, on a thread per CPU (at least two), each with its own state from
/// `init` (its buffers, allocated once); the first failure stops the others from taking
/// new pieces and is returned.
pub fn for_each_piece<T: Sync, S>(
    pieces: &[T],
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &T) -> Result<(), String> + Sync,
) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cpus.clamp(MIN_THREADS, MAX_THREADS).min(pieces.len());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let worker = || {
                let mut state = init();
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(piece) = pieces.get(i) else { break };
                    if let Err(e) = f(&mut state, piece) {
                        failed.store(true, Ordering::SeqCst);
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                    }
                }
            };
            std::thread::Builder::new()
                .stack_size(common::open::IO_THREAD_STACK)
                .spawn_scoped(s, worker)
                .expect("start a worker thread");
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_once_and_the_first_error_stops() {
        let done = Mutex::new(Vec::new());
        let pieces: Vec<u32> = (0..100).collect();
        for_each_piece(
            &pieces,
            || (),
            |_, &p| {
                done.lock().unwrap().push(p);
                Ok(())
            },
        )
        .unwrap();
        let mut d = done.into_inner().unwrap();
        d.sort();
        assert_eq!(d, pieces);
        let e = for_each_piece(
            &pieces,
            || (),
            |_, &p| {
                if p == 7 {
                    Err("seven".to_string())
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(e.unwrap_err(), "seven");
        assert!(for_each_piece::<u32, ()>(&[], || (), |_, _| Err("none".into())).is_ok());
    }
}
