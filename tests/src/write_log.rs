//! The write log of a workload (writes, zero writes, discards, flushes issued by several
//! threads at once) and the model that decides what an image may read after it: after a
//! crash ([`Log::verify`]), or at any moment of the run ([`Log::verify_range`]).
//!
//! Records, one a line, in the order they happened (appended under one lock, or each by
//! one `write(2)` to an `O_APPEND` file): `B ID KIND OFF LEN SEED` before an operation
//! ([`Kind`]), `E ID` once it returned, `F ID` / `G ID` before and after a flush. Write data
//! is a function of its seed and the guest offset ([`data`]), so the log holds no data.
//!
//! An operation that ended before another began comes before it; two that overlapped in
//! time may land in either order, and per byte each way (a write that covers bytes another
//! writes at the same time may win some of them and lose others).

use crate::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `write_at` of [`data`] bytes.
    Write,
    /// `write_zeroes`, `may_unmap` false / true.
    Zero,
    ZeroUnmap,
    /// `discard`: the clusters it covers whole read zero, the partial ones at either end
    /// may read zero or as they were.
    Discard,
}

impl Kind {
    pub fn code(self) -> char {
        match self {
            Kind::Write => 'w',
            Kind::Zero => 'z',
            Kind::ZeroUnmap => 'u',
            Kind::Discard => 'd',
        }
    }
    pub fn from_code(c: &str) -> Option<Kind> {
        Some(match c {
            "w" => Kind::Write,
            "z" => Kind::Zero,
            "u" => Kind::ZeroUnmap,
            "d" => Kind::Discard,
            _ => return None,
        })
    }
}

/// The byte a write with data seed `seed` puts at guest offset `pos`. A function of the
/// guest offset, so that any part of a write's data is cheap to recompute; one seed in
/// eight writes a repeated byte (one in sixteen zeroes).
pub fn data_byte(seed: u64, pos: u64) -> u8 {
    if seed.is_multiple_of(8) {
        return if seed.is_multiple_of(16) {
            0
        } else {
            (seed >> 8) as u8
        };
    }
    let word = Rng::new(seed ^ (pos / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
    word.to_le_bytes()[(pos % 8) as usize]
}

/// The data of a write with seed `seed` at guest offsets `off..off + len`.
pub fn data(seed: u64, off: u64, len: u64) -> Vec<u8> {
    if seed.is_multiple_of(8) {
        return vec![data_byte(seed, 0); len as usize];
    }
    // Word by word: the test's debug build checks megabytes of it after each kill.
    let mut out = Vec::with_capacity(len as usize + 16);
    for w in off / 8..(off + len).div_ceil(8) {
        let word = Rng::new(seed ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        out.extend_from_slice(&word.to_le_bytes());
    }
    let skip = (off % 8) as usize;
    out.drain(..skip);
    out.truncate(len as usize);
    out
}

/// What one operation may have left at the bytes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Its data (a write) or zeroes (zero writes, the whole clusters of a discard).
    Data,
    Zeroes,
    /// Zeroes or nothing: the partial clusters at a discard's ends. Never makes what was
    /// there before impossible.
    MaybeZeroes,
}

/// A piece of a logged operation, with the positions of its records in the log.
#[derive(Clone, Debug)]
pub struct Piece {
    pub effect: Effect,
    pub off: u64,
    pub len: u64,
    pub seed: u64,
    /// The operation, for messages.
    pub what: String,
    pub begin: usize,
    pub end: Option<usize>,
}

/// A moment a reader looks at the image: the pieces that must be there (unless one
/// that must be there too replaced them), and those that may.
pub struct Moment<'a> {
    pub must: &'a dyn Fn(&Piece) -> bool,
    pub may: &'a dyn Fn(&Piece) -> bool,
}

/// A write log, parsed.
pub struct Log {
    pub pieces: Vec<Piece>,
    /// The `F` position of the last flush that completed (0: none).
    pub flushed_before: usize,
    /// Operations begun, begun and not ended (in flight at the kill), flushes completed.
    pub begun: usize,
    pub in_flight: usize,
    pub flushes: usize,
}

impl Log {
    pub fn parse(text: &str, cluster: u64) -> Result<Log, String> {
        use std::collections::HashMap;
        let mut open: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut flush_begin: HashMap<u64, usize> = HashMap::new();
        let mut pieces = Vec::new();
        let (mut flushed_before, mut flushes) = (0, 0);
        // A torn last line: the kill came while its write(2) was copying (Linux's buffered
        // write stops between pages once a fatal signal is pending, keeping what it copied).
        // That write never returned, so what the record says had not been relied on: an
        // operation starts only after its `B` is written, and a missing `E` or `G` only
        // makes the model allow more. It is left out.
        let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
        for (pos, line) in whole.lines().enumerate() {
            let pos = pos + 1;
            let f: Vec<&str> = line.split(' ').collect();
            let bad = || format!("bad log record {pos}: {line:?}");
            let id: u64 = f.get(1).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
            match f[0] {
                "B" if f.len() == 6 => {
                    let kind = Kind::from_code(f[2]).ok_or_else(bad)?;
                    let n = |i: usize| f[i].parse::<u64>().map_err(|_| bad());
                    let (off, len, seed) = (n(3)?, n(4)?, n(5)?);
                    let what = format!(
                        "{kind:?} {off:#x}+{len:#x} (thread {}, op {})",
                        id >> 40,
                        id & 0xff_ffff_ffff
                    );
                    let mut add = |effect, off: u64, end: u64| {
                        if end > off {
                            open.entry(id).or_default().push(pieces.len());
                            pieces.push(Piece {
                                effect,
                                off,
                                len: end - off,
                                seed,
                                what: what.clone(),
                                begin: pos,
                                end: None,
                            });
                        }
                    };
                    match kind {
                        Kind::Write => add(Effect::Data, off, off + len),
                        Kind::Zero | Kind::ZeroUnmap => add(Effect::Zeroes, off, off + len),
                        Kind::Discard => {
                            let end = off + len;
                            let a = off.div_ceil(cluster) * cluster;
                            let b = end / cluster * cluster;
                            if a < b {
                                add(Effect::MaybeZeroes, off, a);
                                add(Effect::Zeroes, a, b);
                                add(Effect::MaybeZeroes, b, end);
                            } else {
                                add(Effect::MaybeZeroes, off, end);
                            }
                        }
                    }
                    open.entry(id).or_default();
                }
                "E" => {
                    for i in open.remove(&id).ok_or_else(bad)? {
                        pieces[i].end = Some(pos);
                    }
                }
                "F" => {
                    flush_begin.insert(id, pos);
                }
                "G" => {
                    flushed_before = flushed_before.max(flush_begin.remove(&id).ok_or_else(bad)?);
                    flushes += 1;
                }
                _ => return Err(bad()),
            }
        }
        let begun = whole.lines().filter(|l| l.starts_with("B ")).count();
        Ok(Log {
            pieces,
            flushed_before,
            begun,
            in_flight: open.len(),
            flushes,
        })
    }

    /// Whether `p` completed before a flush that completed began.
    pub fn durable(&self, p: &Piece) -> bool {
        p.effect != Effect::MaybeZeroes && p.end.is_some_and(|e| e < self.flushed_before)
    }

    /// Check `got` (the image after a crash) against `before` (the image before the run):
    /// every byte must hold what one of the operations allowed there left, or what was
    /// there before when no durable operation covers it.
    pub fn verify(&self, before: &[u8], got: &[u8]) -> Result<(), String> {
        if before.len() != got.len() {
            return Err(format!("size changed: {} -> {}", before.len(), got.len()));
        }
        let moment = Moment {
            must: &|p| self.durable(p),
            may: &|_| true,
        };
        self.verify_range(0, before, got, &moment)
    }

    /// Check `got`, read at guest offset `off` at `moment`, against `before` (the whole
    /// image before the run).
    pub fn verify_range(
        &self,
        off: u64,
        before: &[u8],
        got: &[u8],
        moment: &Moment,
    ) -> Result<(), String> {
        let (lo, hi) = (off, off + got.len() as u64);
        let seen: Vec<usize> = (0..self.pieces.len())
            .filter(|&i| {
                let p = &self.pieces[i];
                p.off < hi && p.off + p.len > lo && (moment.may)(p)
            })
            .collect();
        // Elementary intervals: the same operations cover every byte of one.
        let mut cuts: Vec<u64> = vec![lo, hi];
        for &i in &seen {
            let p = &self.pieces[i];
            cuts.push(p.off.max(lo));
            cuts.push((p.off + p.len).min(hi));
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut starts = seen;
        starts.sort_by_key(|&i| self.pieces[i].off);
        let mut next = 0;
        let mut active: Vec<usize> = Vec::new();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            active.retain(|&i| self.pieces[i].off + self.pieces[i].len > a);
            while next < starts.len() && self.pieces[starts[next]].off <= a {
                active.push(starts[next]);
                next += 1;
            }
            let part = &got[(a - lo) as usize..(b - lo) as usize];
            self.verify_interval(a, b, &active, moment, before, part)?;
        }
        Ok(())
    }

    fn verify_interval(
        &self,
        lo: u64,
        hi: u64,
        active: &[usize],
        moment: &Moment,
        before: &[u8],
        got: &[u8],
    ) -> Result<(), String> {
        let p = |i: usize| &self.pieces[i];
        // `b` began after `a` ended: `a` cannot have landed over `b`.
        let after = |a: &Piece, b: &Piece| a.end.is_some_and(|e| e < b.begin);
        let durable: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| (moment.must)(p(i)))
            .collect();
        let allowed: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| !durable.iter().any(|&d| after(p(i), p(d))))
            .collect();
        let range = lo as usize..hi as usize;
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        if durable.is_empty() {
            candidates.push(before[range].to_vec());
        }
        for &i in &allowed {
            candidates.push(match p(i).effect {
                Effect::Data => data(p(i).seed, lo, hi - lo),
                Effect::Zeroes | Effect::MaybeZeroes => vec![0; (hi - lo) as usize],
            });
        }
        if candidates.iter().any(|c| c == got) {
            return Ok(());
        }
        // Mixed: per byte, any candidate (concurrent writes, a write torn by the kill).
        let Some(k) = (0..got.len()).find(|&k| !candidates.iter().any(|c| c[k] == got[k])) else {
            return Ok(());
        };
        let at = lo + k as u64;
        let mut msg = format!(
            "guest byte {at:#x} reads {:#04x}; allowed there: {}",
            got[k],
            if durable.is_empty() {
                format!("{:#04x} (as before the run)", before[at as usize])
            } else {
                "nothing from before the run".into()
            }
        );
        let describe = |i: usize| {
            let q = p(i);
            format!(
                "{} [{:?}, records {}..{}{}]",
                q.what,
                q.effect,
                q.begin,
                q.end.map_or("(in flight)".to_string(), |e| e.to_string()),
                if (moment.must)(q) {
                    ", must be there"
                } else {
                    ""
                }
            )
        };
        // The allowed ones, and the last few superseded ones.
        let superseded: Vec<usize> = active
            .iter()
            .copied()
            .filter(|i| !allowed.contains(i))
            .collect();
        let shown = superseded.len().saturating_sub(6);
        if shown > 0 {
            msg += &format!("\n  ({shown} older superseded operations)");
        }
        for &i in allowed.iter().chain(&superseded[shown..]) {
            let byte = match p(i).effect {
                Effect::Data => data_byte(p(i).seed, at),
                _ => 0,
            };
            msg += &format!(
                "\n  {} {byte:#04x} from {}",
                if allowed.contains(&i) {
                    "allowed"
                } else {
                    "superseded"
                },
                describe(i)
            );
        }
        msg += &format!(
            "\n  last completed flush began at record {}",
            self.flushed_before
        );
        Err(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model itself: a flushed write must read back, an unflushed one may or may not, a
    /// write superseded by a later durable one may not, overlapping concurrent ones either way.
    #[test]
    fn model_self_test() {
        let log = |t: &str| Log::parse(t, 512).unwrap();
        let before = vec![7u8; 4096];
        let with = |seed, off: u64, len: u64, mut img: Vec<u8>| {
            img[off as usize..(off + len) as usize].copy_from_slice(&data(seed, off, len));
            img
        };
        // Written then flushed: must be there.
        let l = log("B 1 w 100 50 3\nE 1\nF 2\nG 2\n");
        assert!(l.verify(&before, &with(3, 100, 50, before.clone())).is_ok());
        assert!(l.verify(&before, &before).is_err());
        // Written, flush begun before the write ended: not durable, either way.
        let l = log("B 1 w 100 50 3\nF 2\nE 1\nG 2\n");
        assert!(l.verify(&before, &before).is_ok());
        assert!(l.verify(&before, &with(3, 100, 50, before.clone())).is_ok());
        // Superseded: the second write began after the first ended and is durable.
        let l = log("B 1 w 0 512 3\nE 1\nB 2 w 0 512 5\nE 2\nF 3\nG 3\n");
        assert!(l.verify(&before, &with(3, 0, 512, before.clone())).is_err());
        assert!(l.verify(&before, &with(5, 0, 512, before.clone())).is_ok());
        // Concurrent and both durable: either, or a mix.
        let l = log("B 1 w 0 512 3\nB 2 w 0 512 5\nE 1\nE 2\nF 3\nG 3\n");
        assert!(l.verify(&before, &with(3, 0, 512, before.clone())).is_ok());
        assert!(l
            .verify(&before, &with(5, 0, 256, with(3, 0, 512, before.clone())))
            .is_ok());
        assert!(l.verify(&before, &before).is_err());
        // A discard: the whole cluster reads zero once durable, the partial ends either way.
        let l = log("B 1 d 256 1024 0\nE 1\nF 2\nG 2\n");
        let mut z = before.clone();
        z[512..1024].fill(0);
        assert!(l.verify(&before, &z).is_ok());
        z[256..300].fill(0);
        assert!(l.verify(&before, &z).is_ok());
        assert!(l.verify(&before, &before).is_err());
        // The data of a piece of a write is that piece of the write's data.
        for seed in [3, 8, 16, 0x1234_5677] {
            let whole = data(seed, 0, 100);
            for (off, len) in [(0, 100), (3, 50), (8, 8), (13, 1), (97, 3)] {
                let want: Vec<u8> = (off..off + len).map(|p| data_byte(seed, p)).collect();
                assert_eq!(data(seed, off, len), want);
                assert_eq!(want, whole[off as usize..(off + len) as usize]);
            }
        }
        // A torn last record (the kill mid-write(2)) is left out, whatever it was.
        let whole = "B 1 w 0 512 3\nE 1\nF 2\n";
        let w = log(whole);
        for torn in ["B 3 w 0 1", "E", "G 2", "F"] {
            let l = log(&format!("{whole}{torn}"));
            let figures = |l: &Log| (l.begun, l.in_flight, l.flushes, l.flushed_before);
            assert_eq!(figures(&l), figures(&w), "{torn}");
            assert_eq!(l.pieces.len(), w.pieces.len(), "{torn}");
            // The flush never completed: the write may be missing.
            assert!(l.verify(&before, &before).is_ok(), "{torn}");
        }
    }
}
