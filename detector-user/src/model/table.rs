//! A bounded table: a hash index from a compact key to a slot in a dense `Vec`, with approximate-LRU eviction.
//!
//! Invariants: `index[k] == i` ⇔ `slots[i].0 == k`; `slots.len() <= cap`. Removal swaps the last slot into the
//! hole, so slot numbers are not stable across removals (callers keep keys, not slot numbers, across calls that
//! may insert or evict).

use std::hash::Hash;

use hashbrown::HashMap;

/// What a table needs from its values: when they were last active, and whether they may be evicted now.
pub(crate) trait Aged {
    fn last_ns(&self) -> u64;
    /// A value under an active decision is kept while anything younger can go.
    fn pinned(&self, _now_ns: u64) -> bool {
        false
    }
}

pub(crate) struct Table<K, V> {
    index: HashMap<K, u32>,
    slots: Vec<(K, V)>,
    cap: usize,
    rng: u64,
    pub(crate) evicted: u64,
}

impl<K: Hash + Eq + Copy, V: Aged> Table<K, V> {
    /// A table holding at most `cap` entries; `prealloc` reserves the full capacity up front (what a daemon
    /// wants: no rehash pauses, and the memory report shows the real footprint).
    pub(crate) fn new(cap: usize, prealloc: bool) -> Self {
        let cap = cap.max(1);
        let (index, mut slots) = if prealloc {
            (HashMap::with_capacity(cap), Vec::with_capacity(cap))
        } else {
            (HashMap::new(), Vec::new())
        };
        if prealloc {
            huge_pages(&mut slots);
        }
        Table {
            index,
            slots,
            cap,
            rng: 0x9e37_79b9_7f4a_7c15,
            evicted: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.index.get(k).map(|&i| &self.slots[i as usize].1)
    }

    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        match self.index.get(k) {
            Some(&i) => Some(&mut self.slots[i as usize].1),
            None => None,
        }
    }

    /// The value for `k`, inserted with `make()` if absent (evicting the stalest of a few sampled entries when
    /// the table is full).
    pub(crate) fn get_or_insert(&mut self, k: K, now_ns: u64, make: impl FnOnce() -> V) -> &mut V {
        if let Some(&i) = self.index.get(&k) {
            return &mut self.slots[i as usize].1;
        }
        if self.slots.len() >= self.cap {
            let victim = self.pick_victim(now_ns);
            self.remove_slot(victim);
            self.evicted += 1;
        }
        let i = self.slots.len();
        self.slots.push((k, make()));
        self.index.insert(k, i as u32);
        &mut self.slots[i].1
    }

    /// Redis-style approximate LRU: the stalest unpinned entry among 8 random ones (any, if all are pinned).
    fn pick_victim(&mut self, now_ns: u64) -> usize {
        let n = self.slots.len();
        let mut best: Option<(bool, u64, usize)> = None;
        for _ in 0..8 {
            // xorshift64
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let i = (self.rng % n as u64) as usize;
            let v = &self.slots[i].1;
            let cand = (v.pinned(now_ns), v.last_ns(), i);
            if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                best = Some(cand);
            }
        }
        best.map_or(0, |b| b.2)
    }

    fn remove_slot(&mut self, i: usize) {
        let (k, _) = self.slots.swap_remove(i);
        self.index.remove(&k);
        if i < self.slots.len() {
            let moved = self.slots[i].0;
            self.index.insert(moved, i as u32);
        }
    }

    /// Removes every unpinned entry idle since before `cutoff_ns`, looking at no more than `budget` slots from
    /// the sweep cursor `cursor` (which is advanced). Returns how many were removed.
    pub(crate) fn age(&mut self, cutoff_ns: u64, now_ns: u64, cursor: &mut usize, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.slots.len()) {
            if *cursor >= self.slots.len() {
                *cursor = 0;
            }
            let v = &self.slots[*cursor].1;
            if v.last_ns() < cutoff_ns && !v.pinned(now_ns) {
                self.remove_slot(*cursor);
                removed += 1;
            } else {
                *cursor += 1;
            }
        }
        removed
    }

    /// The entry in slot `i` (slot numbers change on removal; for bounded sweeps with a cursor).
    pub(crate) fn at(&self, i: usize) -> Option<(&K, &V)> {
        self.slots.get(i).map(|(k, v)| (k, v))
    }

    pub(crate) fn at_mut(&mut self, i: usize) -> Option<(&K, &mut V)> {
        self.slots.get_mut(i).map(|(k, v)| (&*k, v))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.slots.iter_mut().map(|(k, v)| (&*k, v))
    }

    /// Bytes allocated: the hash index (buckets + control bytes) and the slot vector's capacity.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.index.allocation_size() + self.slots.capacity() * std::mem::size_of::<(K, V)>()
    }
}

/// Asks for transparent huge pages on a large reserved vector: the slots are read at random, and with 4 KiB
/// pages nearly every access also misses the TLB. Advisory; ignored where THP is off.
fn huge_pages<T>(v: &mut Vec<T>) {
    const HUGE: usize = 2 << 20;
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < 4 * HUGE {
        return;
    }
    let start = v.as_mut_ptr() as usize;
    let aligned = (start + HUGE - 1) & !(HUGE - 1);
    let len = (start + bytes).saturating_sub(aligned) & !(HUGE - 1);
    if len > 0 {
        // SAFETY: [aligned, aligned + len) lies inside the vector's own allocation; MADV_HUGEPAGE changes no
        // contents or mappings, only how the kernel backs them.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}
