//! The engine's caches: a response cache for encoder outputs and a prefix cache of decoder KV
//! state. Both are LRU under a byte budget and keyed by the model version id first, so that
//! neither can ever answer for another version.

pub(crate) mod lru;
pub(crate) mod prefix;
pub(crate) mod response;

pub(crate) use prefix::PrefixCache;
pub(crate) use response::ResponseCache;

use std::time::Duration;

/// Counters of one cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups not answered.
    pub misses: u64,
    /// Entries stored.
    pub insertions: u64,
    /// Entries dropped to stay within the byte budget.
    pub evictions: u64,
    /// Entries dropped because their time to live passed.
    pub expirations: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now (keys and values).
    pub bytes: u64,
    /// The byte budget.
    pub budget: u64,
}

impl CacheStats {
    /// Hits over lookups.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

/// Sizes of the caches. Set with [`crate::EngineBuilder::caches`].
///
/// ```
/// use keel::CacheConfig;
/// use std::time::Duration;
/// let c = CacheConfig::default().response_bytes(16 << 20).response_ttl(Some(Duration::from_secs(60)));
/// assert_eq!(c.response_bytes, 16 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Byte budget of the response cache (0: off).
    pub response_bytes: usize,
    /// How long a cached response may be served (None: until evicted).
    pub response_ttl: Option<Duration>,
    /// Byte budget of the decoder prefix cache (0: off).
    pub prefix_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            response_bytes: 64 << 20,
            response_ttl: None,
            prefix_bytes: 256 << 20,
        }
    }
}

impl CacheConfig {
    /// No caching at all.
    pub fn off() -> Self {
        Self {
            response_bytes: 0,
            response_ttl: None,
            prefix_bytes: 0,
        }
    }

    /// With this response cache budget.
    pub fn response_bytes(mut self, bytes: usize) -> Self {
        self.response_bytes = bytes;
        self
    }

    /// With this response time to live.
    pub fn response_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.response_ttl = ttl;
        self
    }

    /// With this prefix cache budget.
    pub fn prefix_bytes(mut self, bytes: usize) -> Self {
        self.prefix_bytes = bytes;
        self
    }
}
