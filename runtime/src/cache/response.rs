//! The response cache: one encoder output per (model version, normalized input).
//!
//! The normalized input is the token id sequence: two texts the tokenizer cannot tell apart
//! (case, accents, spacing, for an uncased model) get the same answer, and the ids are compared
//! in full (not only their hash), so a collision cannot serve a wrong vector. The version id is
//! part of the key: a cached answer is never served for another version.

use super::lru::Lru;
use super::CacheStats;
use crate::manifest::VersionId;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

type Key = (VersionId, Vec<u32>);

pub(crate) struct ResponseCache {
    lru: Mutex<Lru<Key, Arc<[f32]>>>,
}

/// Bookkeeping bytes per entry beyond its key and value (map slot, order entry, Arc header).
const OVERHEAD: usize = 96;

impl ResponseCache {
    pub fn new(budget: usize, ttl: Option<Duration>) -> Self {
        Self {
            lru: Mutex::new(Lru::new(budget, ttl)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru<Key, Arc<[f32]>>> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, version: &VersionId, ids: &[u32]) -> Option<Arc<[f32]>> {
        self.lock().get(&(version.clone(), ids.to_vec()))
    }

    /// Whether the answer is held, without counting a hit or a miss.
    pub fn contains(&self, version: &VersionId, ids: &[u32]) -> bool {
        self.lock().contains(&(version.clone(), ids.to_vec()))
    }

    pub fn insert(&self, version: &VersionId, ids: Vec<u32>, vector: &[f32]) {
        let bytes = OVERHEAD + version.as_str().len() + ids.len() * 4 + vector.len() * 4;
        self.lock()
            .insert((version.clone(), ids), Arc::from(vector), bytes);
    }

    /// Forgets every answer of `version` (it was unloaded: its entries could never be hit again).
    pub fn purge(&self, version: &VersionId) {
        self.lock().retain(|(v, _)| v != version);
    }

    pub fn stats(&self) -> CacheStats {
        self.lock().stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_answers_for_another_version() {
        let cache = ResponseCache::new(1 << 20, None);
        let (v1, v2) = (
            VersionId::from_hex("a".repeat(64)),
            VersionId::from_hex("b".repeat(64)),
        );
        cache.insert(&v1, vec![101, 7592, 102], &[1.0, 0.0]);
        assert_eq!(
            cache.get(&v1, &[101, 7592, 102]).as_deref(),
            Some(&[1.0, 0.0][..])
        );
        assert!(cache.get(&v2, &[101, 7592, 102]).is_none());
        assert!(cache.get(&v1, &[101, 7593, 102]).is_none());
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
    }
}
