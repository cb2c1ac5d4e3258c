//! A least-recently-used map under a byte budget, with an optional time to live.

use super::CacheStats;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

struct Slot<V> {
    value: V,
    bytes: usize,
    used: u64,
    inserted: Instant,
}

/// Not synchronized: its owners wrap it in a `Mutex` (every operation is short).
pub(crate) struct Lru<K, V> {
    map: HashMap<K, Slot<V>>,
    /// Use tick -> key, oldest first.
    order: BTreeMap<u64, K>,
    tick: u64,
    budget: usize,
    ttl: Option<Duration>,
    stats: CacheStats,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub fn new(budget: usize, ttl: Option<Duration>) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            budget,
            ttl,
            stats: CacheStats {
                budget: budget as u64,
                ..CacheStats::default()
            },
        }
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let expired = match self.map.get_mut(key) {
            None => {
                self.stats.misses += 1;
                return None;
            }
            Some(slot) if self.ttl.is_some_and(|ttl| slot.inserted.elapsed() >= ttl) => true,
            Some(slot) => {
                self.order.remove(&slot.used);
                slot.used = tick;
                self.order.insert(tick, key.clone());
                self.stats.hits += 1;
                return Some(slot.value.clone());
            }
        };
        debug_assert!(expired);
        self.remove(key);
        self.stats.expirations += 1;
        self.stats.misses += 1;
        None
    }

    /// Whether `key` is held (without counting a lookup or refreshing it).
    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Stores `value` (of `bytes`, key included), evicting the least recently used entries to
    /// stay within the budget; returns the evicted keys. A value larger than the whole budget is
    /// not stored.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) -> Vec<K> {
        let mut evicted = Vec::new();
        if bytes > self.budget {
            return evicted;
        }
        self.remove(&key);
        while self.stats.bytes as usize + bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.map.remove(&oldest) {
                self.stats.bytes -= slot.bytes as u64;
                self.stats.evictions += 1;
            }
            evicted.push(oldest);
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.map.insert(
            key,
            Slot {
                value,
                bytes,
                used: self.tick,
                inserted: Instant::now(),
            },
        );
        self.stats.bytes += bytes as u64;
        self.stats.insertions += 1;
        evicted
    }

    /// Drops every entry whose key fails `keep`; returns the dropped keys.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) -> Vec<K> {
        let gone: Vec<K> = self.map.keys().filter(|k| !keep(k)).cloned().collect();
        for k in &gone {
            self.remove(k);
        }
        gone
    }

    fn remove(&mut self, key: &K) -> bool {
        match self.map.remove(key) {
            Some(slot) => {
                self.order.remove(&slot.used);
                self.stats.bytes -= slot.bytes as u64;
                true
            }
            None => false,
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.map.len() as u64,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut lru = Lru::new(30, None);
        lru.insert("a", 1, 10);
        lru.insert("b", 2, 10);
        lru.insert("c", 3, 10);
        assert_eq!(lru.get(&"a"), Some(1)); // a is now the most recent
        assert_eq!(lru.insert("d", 4, 10), vec!["b"]);
        assert_eq!(lru.get(&"b"), None);
        assert_eq!(lru.get(&"c"), Some(3));
        let s = lru.stats();
        assert_eq!(
            (s.hits, s.misses, s.insertions, s.evictions, s.entries, s.bytes),
            (2, 1, 4, 1, 3, 30)
        );
        // Too large for the budget: not stored, nothing evicted.
        assert!(lru.insert("huge", 5, 31).is_empty());
        assert_eq!(lru.stats().entries, 3);
        // Replacing a key does not count its old bytes twice.
        lru.insert("c", 30, 10);
        assert_eq!(lru.stats().bytes, 30);
        assert_eq!(lru.get(&"c"), Some(30));
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let mut lru = Lru::new(100, Some(Duration::from_millis(20)));
        lru.insert(1, "x", 10);
        assert_eq!(lru.get(&1), Some("x"));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(lru.get(&1), None);
        let s = lru.stats();
        assert_eq!((s.expirations, s.entries, s.bytes), (1, 0, 0));
    }
}
