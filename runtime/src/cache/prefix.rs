//! The decoder's prefix cache: the KV state after a shared prompt prefix (a system prompt, a
//! chat history), so that a later prompt starting with the same tokens skips running them.
//!
//! Keyed by (model version, the prefix's token ids); a lookup finds the longest stored prefix of
//! a prompt. Entries are LRU under a byte budget (a 200-token prefix of SmolLM2-135M holds
//! about 9 MB of keys and values).

use super::lru::Lru;
use super::CacheStats;
use crate::manifest::VersionId;
use keel_models::llama::KvCache;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

type Key = (VersionId, Vec<u32>);

struct Inner {
    lru: Lru<Key, Arc<KvCache>>,
    /// Per version: the prefix lengths stored, with how many entries have each.
    lengths: HashMap<VersionId, BTreeMap<usize, usize>>,
}

pub(crate) struct PrefixCache {
    inner: Mutex<Inner>,
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: Lru::new(budget, None),
                lengths: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The KV state of the longest stored prefix of `prompt` shorter than the whole prompt (at
    /// least one token must run to give the next token's logits).
    pub fn longest(&self, version: &VersionId, prompt: &[u32]) -> Option<Arc<KvCache>> {
        let mut inner = self.lock();
        let lengths: Vec<usize> = inner
            .lengths
            .get(version)
            .map(|l| l.keys().rev().copied().filter(|&n| n < prompt.len()).collect())
            .unwrap_or_default();
        for n in lengths {
            let key = (version.clone(), prompt[..n].to_vec());
            if inner.lru.contains(&key) {
                return inner.lru.get(&key);
            }
        }
        // Counted once per lookup, not once per length tried.
        let _ = inner.lru.get(&(version.clone(), Vec::new()));
        None
    }

    /// Whether the state after exactly `prefix` is stored.
    pub fn contains(&self, version: &VersionId, prefix: &[u32]) -> bool {
        self.lock().lru.contains(&(version.clone(), prefix.to_vec()))
    }

    pub fn insert(&self, version: &VersionId, prefix: Vec<u32>, cache: KvCache) {
        let bytes = cache.bytes() + prefix.len() * 4 + 128;
        let n = prefix.len();
        let mut inner = self.lock();
        let key = (version.clone(), prefix);
        let had = inner.lru.contains(&key);
        let evicted = inner.lru.insert(key.clone(), Arc::new(cache), bytes);
        let stored = inner.lru.contains(&key);
        for (v, p) in evicted {
            forget(&mut inner.lengths, &v, p.len());
        }
        if stored && !had {
            *inner
                .lengths
                .entry(version.clone())
                .or_default()
                .entry(n)
                .or_default() += 1;
        }
    }

    /// Forgets every KV state of `version` (it was unloaded).
    pub fn purge(&self, version: &VersionId) {
        let mut inner = self.lock();
        inner.lru.retain(|(v, _)| v != version);
        inner.lengths.remove(version);
    }

    pub fn stats(&self) -> CacheStats {
        self.lock().lru.stats()
    }
}

fn forget(lengths: &mut HashMap<VersionId, BTreeMap<usize, usize>>, version: &VersionId, n: usize) {
    if let Some(l) = lengths.get_mut(version) {
        if let Some(count) = l.get_mut(&n) {
            *count -= 1;
            if *count == 0 {
                l.remove(&n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_of(tokens: usize) -> KvCache {
        let mut c = KvCache::new(1, 1, 2);
        c.commit(tokens);
        c
    }

    #[test]
    fn finds_the_longest_stored_prefix_of_the_same_version() {
        let pc = PrefixCache::new(1 << 20);
        let (v1, v2) = (
            VersionId::from_hex("a".repeat(64)),
            VersionId::from_hex("b".repeat(64)),
        );
        pc.insert(&v1, vec![1, 2], cache_of(2));
        pc.insert(&v1, vec![1, 2, 3, 4], cache_of(4));
        pc.insert(&v1, vec![9, 9, 9], cache_of(3));
        assert_eq!(pc.longest(&v1, &[1, 2, 3, 4, 5]).unwrap().len(), 4);
        assert_eq!(pc.longest(&v1, &[1, 2, 3, 9, 5]).unwrap().len(), 2);
        // The whole prompt is never served: one token must be left to run.
        assert_eq!(pc.longest(&v1, &[1, 2, 3, 4]).unwrap().len(), 2);
        assert!(pc.longest(&v2, &[1, 2, 3, 4, 5]).is_none());
        assert!(pc.longest(&v1, &[7, 1, 2]).is_none());
        let s = pc.stats();
        assert_eq!((s.hits, s.misses, s.entries), (3, 2, 3));
    }

    #[test]
    fn eviction_forgets_the_prefix_length() {
        let big = cache_of(1);
        let pc = PrefixCache::new(2 * (big.bytes() + 4 * 3 + 128));
        pc.insert(&VersionId::from_hex("a".repeat(64)), vec![1, 2, 3], cache_of(3));
        pc.insert(&VersionId::from_hex("a".repeat(64)), vec![4, 5, 6], cache_of(3));
        pc.insert(&VersionId::from_hex("a".repeat(64)), vec![7, 8, 9], cache_of(3));
        let v = VersionId::from_hex("a".repeat(64));
        assert!(pc.longest(&v, &[1, 2, 3, 0]).is_none());
        assert!(pc.longest(&v, &[7, 8, 9, 0]).is_some());
        assert_eq!(pc.stats().evictions, 1);
    }
}
