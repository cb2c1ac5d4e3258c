//! Per-request controls: priority and deadline, and whether the response cache may answer.

use std::time::{Duration, Instant};

/// How urgent a request is. Higher levels are served first; a lower-level request that has
/// waited longer than the scheduler's starvation bound is served as if it were the highest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Background work (batch jobs, re-indexing).
    Low,
    /// Interactive traffic (the default).
    #[default]
    Normal,
    /// Latency-critical traffic.
    High,
}

/// Controls of one request: priority, deadline, cache use.
///
/// ```
/// use keel::{Priority, Request};
/// use std::time::Duration;
/// let r = Request::default().priority(Priority::High).deadline(Duration::from_millis(50));
/// assert_eq!(r.priority, Priority::High);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Where the request stands in the queue.
    pub priority: Priority,
    /// The request must have started running this long after it was submitted; if it is still
    /// queued then, it is answered [`crate::Error::DeadlineExceeded`] and never run. The caller
    /// is answered at the deadline at the latest.
    pub timeout: Option<Duration>,
    /// The same as an absolute instant (the earlier of the two applies).
    pub deadline_at: Option<Instant>,
    /// Whether the response cache may answer (and store) this request (default: true).
    pub use_cache: bool,
    /// What an encoder does with a text longer than its maximum (default: cut it, and say so
    /// in [`crate::Meta::truncated`]).
    pub truncate: Truncate,
}

/// What an encoder does with a text longer than the model's maximum number of tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Truncate {
    /// Embed its first tokens (up to the maximum, `[SEP]` kept last), as sentence-transformers
    /// does; the response lists it in [`crate::Meta::truncated`].
    #[default]
    Cut,
    /// Refuse the request with [`crate::Error::InvalidArgument`] naming the text.
    Refuse,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            priority: Priority::Normal,
            timeout: None,
            deadline_at: None,
            use_cache: true,
            truncate: Truncate::Cut,
        }
    }
}

impl Request {
    /// With this priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// With a deadline `after` the moment the request is submitted.
    pub fn deadline(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }

    /// With a deadline at an absolute instant.
    pub fn deadline_at(mut self, at: Instant) -> Self {
        self.deadline_at = Some(at);
        self
    }

    /// Refuse texts longer than the model's maximum instead of cutting them.
    pub fn refuse_long_texts(mut self) -> Self {
        self.truncate = Truncate::Refuse;
        self
    }

    /// Bypass the response cache (neither read nor written).
    pub fn no_cache(mut self) -> Self {
        self.use_cache = false;
        self
    }

    /// The deadline of a request submitted at `now`.
    pub(crate) fn deadline_from(&self, now: Instant) -> Option<Instant> {
        let relative = self.timeout.map(|t| {
            now.checked_add(t)
                .unwrap_or(now + Duration::from_secs(86_400 * 365))
        });
        match (relative, self.deadline_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
