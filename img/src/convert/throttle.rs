//! `-r`: a limit on the bytes per second written to the target, as QEMU's throttling
//! applies it: a leaky bucket that drains at the rate and lets a request start while it
//! holds no more than a tenth of a second's worth.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared by the workers; `None` rate means no limit.
pub struct Throttle {
    rate: Option<u64>,
    /// Bytes in the bucket and when it was last drained.
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// A limit of `rate` bytes per second; 0 is no limit (qemu-img's default).
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate: (rate != 0).then_some(rate),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Wait until a write of `bytes` may start, then account for it.
    pub fn admit(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let rate = rate as f64;
        let allowance = rate / 10.0;
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let drained = now.duration_since(s.1).as_secs_f64() * rate;
                *s = ((s.0 - drained).max(0.0), now);
                if s.0 <= allowance {
                    s.0 += bytes as f64;
                    return;
                }
                (s.0 - allowance) / rate
            };
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_past_the_allowance_wait_for_the_bucket_to_drain() {
        let t = Throttle::new(10 << 20);
        let start = Instant::now();
        t.admit(2 << 20); // an empty bucket lets it through
        assert!(start.elapsed() < Duration::from_millis(50));
        t.admit(1); // waits until 1 MiB of the 2 MiB is left: 0.1 s
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(95), "{waited:?}");
        let unlimited = Throttle::new(0);
        let start = Instant::now();
        for _ in 0..1000 {
            unlimited.admit(1 << 30);
        }
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
