//! One scheduler per loaded model version: a bounded priority queue, worker threads, and a
//! batching policy.
//!
//! - Encoders ([`EncoderScheduler`]): dynamic batching. Callers on any thread submit single
//!   requests; a worker takes a batch once it is full, once its oldest request has waited
//!   `max_queue_delay` with the worker free, or (adaptive delay) once the callers of the recent
//!   batches are back, runs
//!   it as one packed forward pass (no padding), and answers each caller.
//! - Decoders ([`DecoderScheduler`]): continuous batching. One worker runs one step at a time for
//!   every active sequence together; a new stream joins at the next step, a finished or cancelled
//!   one leaves at once and its KV cache is freed.
//!
//! Both answer a full queue with [`crate::Error::Overloaded`] at once, a request whose deadline
//! passes while queued with [`crate::Error::DeadlineExceeded`] (it is never run), and requests
//! after shutdown with [`crate::Error::ShuttingDown`]. Idle workers sleep on a condition
//! variable: an idle engine uses no CPU.

pub(crate) mod decoder;
pub(crate) mod encoder;
pub(crate) mod queue;

pub(crate) use decoder::DecoderScheduler;
pub(crate) use encoder::clone_error;
pub(crate) use encoder::EncoderScheduler;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How one request ran in its scheduler (the response's metadata).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ran {
    /// The batch (encoders) or first decoder step (decoders) it ran in.
    pub batch_id: u64,
    /// Time it waited in the queue.
    pub queue: Duration,
    /// Time of the forward passes it took part in.
    pub forward: Duration,
}

/// Batch ids are unique in the process, so that a lineage store can group batch-mates.
pub(crate) fn next_batch_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// How a model version's scheduler batches. Set with [`crate::EngineBuilder::scheduler`].
///
/// ```
/// use keel::SchedulerConfig;
/// use std::time::Duration;
/// let c = SchedulerConfig::default().max_batch_size(16).max_queue_delay(Duration::from_millis(2));
/// assert_eq!(c.max_batch_size, 16);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Encoders: most sequences in one batch.
    pub max_batch_size: usize,
    /// Encoders: longest a batch waits to fill after its oldest request is queued and a worker
    /// is free to run it.
    pub max_queue_delay: Duration,
    /// Encoders: a batch also leaves as soon as it holds as many sequences as the most callers
    /// seen over the last 4 batches (a batch's sequences plus those it left queued; on by
    /// default). Under steady load that is when those callers are all back, so nobody waits
    /// `max_queue_delay` for batch-mates who are not coming, and a lone caller never waits; when
    /// the load rises, requests that arrive during a batch's compute form the next one. Off: a
    /// batch waits for `max_batch_size` or `max_queue_delay`, as Triton's dynamic batcher does.
    pub adaptive_delay: bool,
    /// Encoders: batch sizes to prefer, e.g. `[8, 16, 32]` (empty: none). A batch reaching the
    /// largest is sent at once; one sent because its delay ran out is cut to the largest
    /// preferred size it holds (the rest go in the next batch).
    pub preferred_batch_sizes: Vec<usize>,
    /// Encoders: batch only requests of similar token length (buckets of powers of two). Off by
    /// default: the encoders run a batch packed, without padding, so mixing lengths costs
    /// nothing and larger batches form sooner.
    pub length_buckets: bool,
    /// Requests that may wait in the queue; one more is answered `Overloaded` at once.
    pub queue_capacity: usize,
    /// A request that has waited this long is served before every priority level, so low
    /// priorities are not starved.
    pub starvation_bound: Duration,
    /// Encoders: worker threads per model version. Each drives the shared compute pool, so
    /// one is usually right on a CPU.
    pub workers: usize,
    /// Decoders: most sequences decoding together (more wait in the queue).
    pub max_streams: usize,
    /// Decoders: most prompt tokens one sequence runs in one step (chunked prefill), so a long
    /// prompt delays the other streams' next token by at most one chunk.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay: Duration::from_millis(5),
            adaptive_delay: true,
            preferred_batch_sizes: Vec::new(),
            length_buckets: false,
            queue_capacity: 1024,
            starvation_bound: Duration::from_millis(500),
            workers: 1,
            max_streams: 16,
            prefill_chunk: 128,
        }
    }
}

impl SchedulerConfig {
    /// With this `max_batch_size`.
    pub fn max_batch_size(mut self, n: usize) -> Self {
        self.max_batch_size = n.max(1);
        self
    }

    /// With this `max_queue_delay`.
    pub fn max_queue_delay(mut self, d: Duration) -> Self {
        self.max_queue_delay = d;
        self
    }

    /// With or without the adaptive delay ([`Self::adaptive_delay`]).
    pub fn adaptive_delay(mut self, on: bool) -> Self {
        self.adaptive_delay = on;
        self
    }

    /// With these preferred batch sizes.
    pub fn preferred_batch_sizes(mut self, mut sizes: Vec<usize>) -> Self {
        sizes.retain(|&s| s > 0);
        sizes.sort_unstable();
        sizes.dedup();
        self.preferred_batch_sizes = sizes;
        self
    }

    /// With this queue capacity.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// With this starvation bound.
    pub fn starvation_bound(mut self, d: Duration) -> Self {
        self.starvation_bound = d;
        self
    }

    /// With this many concurrent decoder streams.
    pub fn max_streams(mut self, n: usize) -> Self {
        self.max_streams = n.max(1);
        self
    }

    /// One request per batch, no waiting: the "one request at a time" baseline.
    pub fn unbatched(self) -> Self {
        self.max_batch_size(1)
            .max_queue_delay(Duration::ZERO)
            .max_streams(1)
    }
}

/// Counters of one model version's scheduler, since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Requests accepted into the queue.
    pub accepted: u64,
    /// Requests answered with a result.
    pub completed: u64,
    /// Requests answered with an error from the model.
    pub failed: u64,
    /// Requests refused because the queue was full.
    pub overloaded: u64,
    /// Requests whose deadline passed while queued (never run).
    pub expired: u64,
    /// Requests answered `ShuttingDown`.
    pub shut_down: u64,
    /// Requests or streams cancelled by their caller (a dropped stream).
    pub cancelled: u64,
    /// Requests queued now.
    pub queued: u64,
    /// Batches (encoder) or steps (decoder) run.
    pub batches: u64,
    /// Sequences run, summed over batches (`items / batches` is the mean batch size).
    pub items: u64,
    /// Tokens run (encoder: sum of sequence lengths, each batch run packed, without padding;
    /// decoder: tokens fed).
    pub tokens: u64,
    /// Time spent in the model's forward passes.
    pub compute: Duration,
    /// Time requests spent queued, summed.
    pub queue_wait: Duration,
    /// Decoder: sequences decoding now.
    pub active_streams: u64,
    /// Decoder: bytes held by the active sequences' KV caches.
    pub kv_bytes: u64,
}

impl SchedulerStats {
    /// Mean sequences per batch (or per decoder step).
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.items as f64 / self.batches as f64
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub overloaded: AtomicU64,
    pub expired: AtomicU64,
    pub shut_down: AtomicU64,
    pub cancelled: AtomicU64,
    pub batches: AtomicU64,
    pub items: AtomicU64,
    pub tokens: AtomicU64,
    pub compute_ns: AtomicU64,
    pub queue_wait_ns: AtomicU64,
    pub active_streams: AtomicU64,
    pub kv_bytes: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Counts a refused submission and says why, in the caller's words.
    pub fn refused(&self, why: &queue::PushError, model: &str, capacity: usize) -> crate::Error {
        match why {
            queue::PushError::Full => {
                Counters::add(&self.overloaded, 1);
                crate::Error::Overloaded {
                    model: model.to_string(),
                    capacity,
                }
            }
            queue::PushError::Closed => {
                Counters::add(&self.shut_down, 1);
                crate::Error::ShuttingDown(format!("model '{model}' takes no more requests"))
            }
        }
    }

    pub fn add_time(c: &AtomicU64, d: Duration) {
        c.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn snapshot(&self, queued: usize) -> SchedulerStats {
        let g = |c: &AtomicU64| c.load(Relaxed);
        SchedulerStats {
            accepted: g(&self.accepted),
            completed: g(&self.completed),
            failed: g(&self.failed),
            overloaded: g(&self.overloaded),
            expired: g(&self.expired),
            shut_down: g(&self.shut_down),
            cancelled: g(&self.cancelled),
            queued: queued as u64,
            batches: g(&self.batches),
            items: g(&self.items),
            tokens: g(&self.tokens),
            compute: Duration::from_nanos(g(&self.compute_ns)),
            queue_wait: Duration::from_nanos(g(&self.queue_wait_ns)),
            active_streams: g(&self.active_streams),
            kv_bytes: g(&self.kv_bytes),
        }
    }
}

/// When a request was queued, and until when it may wait.
pub(crate) struct Queued {
    /// Its id in the queue.
    pub id: u64,
    pub at: std::time::Instant,
    pub deadline: Option<std::time::Instant>,
}

/// Queues `item` (`items` sequences, the longest of `tokens` tokens) with the request's
/// priority and deadline: the one admission of both schedulers. A deadline already passed is
/// refused without queueing; a full or closed queue refuses at once, counted and said in the
/// caller's words.
pub(crate) fn submit<T>(
    queue: &queue::BatchQueue<T>,
    counters: &Counters,
    model: &str,
    item: T,
    (tokens, items): (usize, usize),
    request: &crate::Request,
) -> crate::Result<Queued> {
    let now = std::time::Instant::now();
    let deadline = request.deadline_from(now);
    if deadline.is_some_and(|d| d <= now) {
        Counters::add(&counters.expired, 1);
        return Err(crate::Error::DeadlineExceeded {
            waited: Duration::ZERO,
        });
    }
    let meta = queue::Meta {
        priority: request.priority,
        deadline,
        enqueued: now,
        tokens,
        items,
    };
    match queue.push(item, meta) {
        Ok(id) => {
            Counters::add(&counters.accepted, 1);
            Ok(Queued {
                id,
                at: now,
                deadline,
            })
        }
        Err((why, _)) => Err(counters.refused(&why, model, queue.capacity())),
    }
}

/// Runs `f`, turning a panic into an internal error: a worker thread must outlive any one bad
/// batch, or every later caller would wait forever.
pub(crate) fn guarded<R>(what: &str, f: impl FnOnce() -> crate::Result<R>) -> crate::Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(crate::Error::Internal(format!("{what} panicked: {msg}")))
        }
    }
}
