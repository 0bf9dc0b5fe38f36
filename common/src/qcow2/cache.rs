//! A bounded LRU cache of metadata tables (L2 tables, refcount blocks), keyed by host offset.
//!
//! The cache does no I/O itself: the owner loads tables into it and writes dirty ones back,
//! so that it controls the order in which metadata reaches the file.
//!
//! Every operation is O(1): the tables sit in a vector linked in recency order, found by
//! one hash probe on their offset (none when the table asked for is the last one asked
//! for, the common case of a walk over one table).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// End of the recency list.
const NIL: usize = usize::MAX;

struct Slot {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
    /// Next more recently used slot.
    newer: usize,
    /// Next less recently used slot.
    older: usize,
}

/// Hashes table offsets (cluster-aligned, so their low bits are zero) by one multiply.
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

/// LRU of cluster-sized tables.
pub struct TableCache {
    slots: Vec<Slot>,
    index: HashMap<u64, usize, BuildHasherDefault<OffsetHasher>>,
    /// The most recently used slot (it is also the one asked for last).
    newest: usize,
    /// The least recently used slot.
    oldest: usize,
    capacity: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: Vec::new(),
            index: HashMap::default(),
            newest: NIL,
            oldest: NIL,
            capacity: capacity.max(2),
        }
    }

    /// Take slot `i` out of the recency list.
    fn unlink(&mut self, i: usize) {
        let (newer, older) = (self.slots[i].newer, self.slots[i].older);
        match newer {
            NIL => self.newest = older,
            n => self.slots[n].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o].newer = newer,
        }
    }

    /// Put slot `i` at the most recent end of the list.
    fn link_newest(&mut self, i: usize) {
        self.slots[i].newer = NIL;
        self.slots[i].older = self.newest;
        match self.newest {
            NIL => self.oldest = i,
            n => self.slots[n].newer = i,
        }
        self.newest = i;
    }

    /// The slot holding `offset`, made the most recently used.
    fn touch(&mut self, offset: u64) -> Option<usize> {
        if self.newest != NIL && self.slots[self.newest].offset == offset {
            return Some(self.newest);
        }
        let i = *self.index.get(&offset)?;
        self.unlink(i);
        self.link_newest(i);
        Some(i)
    }

    /// The table at `offset`, if cached (marks it recently used).
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        let i = self.touch(offset)?;
        Some(&self.slots[i].data)
    }

    /// Mutable access to a cached table; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        let i = self.touch(offset)?;
        let slot = &mut self.slots[i];
        slot.dirty = true;
        Some(&mut slot.data)
    }

    /// Whether the cache is full, so that inserting needs an eviction first.
    pub fn needs_eviction(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used table and whether it is dirty.
    pub fn lru(&self) -> Option<(u64, bool)> {
        let s = self.slots.get(self.oldest)?;
        Some((s.offset, s.dirty))
    }

    /// Drop a table from the cache (the caller has written it back if it was dirty).
    pub fn remove(&mut self, offset: u64) {
        let Some(i) = self.index.remove(&offset) else {
            return;
        };
        self.unlink(i);
        self.slots.swap_remove(i);
        let Some(moved) = self.slots.get(i) else {
            return;
        };
        // The last slot moved into `i`: point its neighbours and its key at `i`.
        let (newer, older, key) = (moved.newer, moved.older, moved.offset);
        match newer {
            NIL => self.newest = i,
            n => self.slots[n].older = i,
        }
        match older {
            NIL => self.oldest = i,
            o => self.slots[o].newer = i,
        }
        self.index.insert(key, i);
    }

    /// Insert a table (the caller evicted first if needed).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.remove(offset);
        let i = self.slots.len();
        self.slots.push(Slot {
            offset,
            data,
            dirty,
            newer: NIL,
            older: NIL,
        });
        self.index.insert(offset, i);
        self.link_newest(i);
    }

    /// Offsets of all dirty tables, in ascending order.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.offset)
            .collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a cached table without touching LRU order.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.index
            .get(&offset)
            .map(|&i| self.slots[i].data.as_slice())
    }

    /// Mark a table clean after it was written back.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(&i) = self.index.get(&offset) {
            self.slots[i].dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1], false);
        c.insert(2, vec![2], true);
        assert!(c.needs_eviction());
        assert_eq!(c.lru(), Some((1, false)));
        c.get(1);
        assert_eq!(c.lru(), Some((2, true)));
        c.get_mut(1).unwrap()[0] = 9;
        assert_eq!(c.dirty_offsets(), vec![1, 2]);
        c.mark_clean(2);
        c.remove(2);
        assert_eq!(c.dirty_offsets(), vec![1]);
        assert_eq!(c.peek(1), Some(&[9u8][..]));
    }

    /// Random operations against a list kept in recency order.
    #[test]
    fn matches_a_recency_list_model() {
        let mut c = TableCache::new(8);
        let mut model: Vec<u64> = Vec::new(); // least recent first
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % 12) * 4096;
            match (x >> 8) % 4 {
                0 | 1 => {
                    let hit = c.get(off).is_some();
                    assert_eq!(hit, model.contains(&off));
                    if hit {
                        model.retain(|&o| o != off);
                        model.push(off);
                    }
                }
                2 => {
                    if c.needs_eviction() {
                        let (victim, _) = c.lru().unwrap();
                        assert_eq!(victim, model[0]);
                        c.remove(victim);
                        model.remove(0);
                    }
                    c.insert(off, vec![off as u8], false);
                    model.retain(|&o| o != off);
                    model.push(off);
                }
                _ => {
                    c.remove(off);
                    model.retain(|&o| o != off);
                }
            }
            assert_eq!(c.lru().map(|l| l.0), model.first().copied());
            for &o in &model {
                assert_eq!(c.peek(o), Some(&[o as u8][..]));
            }
        }
    }
}
