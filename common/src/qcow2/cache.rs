//! A bounded LRU cache of metadata tables (L2 tables, refcount blocks), keyed by host offset.
//!
//! The cache does no I/O itself: the owner loads tables into it and writes dirty ones back,
//! so that it controls the order in which metadata reaches the file.

use std::collections::{BTreeMap, HashMap};

struct Slot {
    data: Vec<u8>,
    dirty: bool,
    tick: u64,
}

/// LRU of cluster-sized tables.
pub struct TableCache {
    slots: HashMap<u64, Slot>,
    order: BTreeMap<u64, u64>,
    capacity: usize,
    tick: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    fn touch(&mut self, offset: u64) {
        self.tick += 1;
        if let Some(slot) = self.slots.get_mut(&offset) {
            self.order.remove(&slot.tick);
            slot.tick = self.tick;
            self.order.insert(self.tick, offset);
        }
    }

    /// The table at `offset`, if cached (marks it recently used).
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        if !self.slots.contains_key(&offset) {
            return None;
        }
        self.touch(offset);
        self.slots.get(&offset).map(|s| s.data.as_slice())
    }

    /// Mutable access to a cached table; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        if !self.slots.contains_key(&offset) {
            return None;
        }
        self.touch(offset);
        self.slots.get_mut(&offset).map(|s| {
            s.dirty = true;
            s.data.as_mut_slice()
        })
    }

    /// Whether the cache is full, so that inserting needs an eviction first.
    pub fn needs_eviction(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used table and whether it is dirty.
    pub fn lru(&self) -> Option<(u64, bool)> {
        let (_, &off) = self.order.iter().next()?;
        Some((off, self.slots[&off].dirty))
    }

    /// Drop a table from the cache (the caller has written it back if it was dirty).
    pub fn remove(&mut self, offset: u64) {
        if let Some(slot) = self.slots.remove(&offset) {
            self.order.remove(&slot.tick);
        }
    }

    /// Insert a table (the caller evicted first if needed).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.remove(offset);
        self.tick += 1;
        self.order.insert(self.tick, offset);
        self.slots.insert(
            offset,
            Slot {
                data,
                dirty,
                tick: self.tick,
            },
        );
    }

    /// Offsets of all dirty tables, in ascending order.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a cached table without touching LRU order.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.slots.get(&offset).map(|s| s.data.as_slice())
    }

    /// Mark a table clean after it was written back.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
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
}
