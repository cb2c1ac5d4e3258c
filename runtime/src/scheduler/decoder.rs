//! Continuous batching for decoders: one worker runs one step at a time for every active
//! sequence together (`Llama::forward_batch`, each sequence with its own KV cache). A new
//! stream joins at the next step; a finished one leaves at once; a cancelled one (its
//! `TokenStream` dropped) is removed before the next step and its KV cache freed. Long prompts
//! run in chunks (`prefill_chunk`), so a new prompt delays the others by at most one chunk.

use super::encoder::clone_error;
use super::queue::{BatchQueue, Entry, Next, Policy};
use super::{guarded, next_batch_id, Counters, Ran, SchedulerConfig, SchedulerStats};
use crate::cache::PrefixCache;
use crate::generate::FinishReason;
use crate::manifest::VersionId;
use crate::model::Decoder;
use crate::request::Request;
use crate::{Error, Result};
use keel_models::llama::KvCache;
use keel_models::sampling::{Sampler, Sampling};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a generation's stream receives.
pub(crate) enum Event {
    /// A token, with its log-probability when the job asked for it.
    Token(u32, Option<f32>),
    Done(FinishReason, Ran),
    Failed(Error),
}

/// A generation to run.
pub(crate) struct GenJob {
    pub prompt: Vec<u32>,
    /// Where the shared part of the prompt ends (the system turn): the KV state there is stored
    /// in the prefix cache.
    pub boundary: Option<usize>,
    pub sampling: Sampling,
    pub max_tokens: usize,
    /// Send each token's log-probability under the model (a pass over the logits per token).
    pub logprobs: bool,
    pub events: Sender<Event>,
    pub cancel: Arc<AtomicBool>,
}

struct Shared {
    queue: BatchQueue<GenJob>,
    counters: Counters,
    name: String,
    version: VersionId,
    prefix: Option<Arc<PrefixCache>>,
    /// Set at a hard shutdown: active streams are answered `ShuttingDown` and dropped.
    abort: AtomicBool,
    max_streams: usize,
    chunk: usize,
}

pub(crate) struct DecoderScheduler {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl DecoderScheduler {
    pub fn start(
        name: &str,
        version: VersionId,
        decoder: Arc<Decoder>,
        prefix: Option<Arc<PrefixCache>>,
        config: &SchedulerConfig,
    ) -> Result<Self> {
        let policy = Policy {
            max_batch: config.max_streams.max(1),
            // A stream joins at the next step: no waiting for a batch to fill.
            max_delay: Duration::ZERO,
            preferred: Vec::new(),
            starvation_bound: config.starvation_bound,
            buckets: false,
            adaptive: false,
        };
        let shared = Arc::new(Shared {
            queue: BatchQueue::new(config.queue_capacity, policy),
            counters: Counters::default(),
            name: name.to_string(),
            version,
            prefix,
            abort: AtomicBool::new(false),
            max_streams: config.max_streams.max(1),
            chunk: config.prefill_chunk.max(1),
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("keel-decode".into())
                .spawn(move || worker(&shared, &decoder))
                .map_err(|e| Error::Internal(format!("cannot start a scheduler thread: {e}")))?
        };
        Ok(Self {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    pub fn submit(&self, model: &str, job: GenJob, request: &Request) -> Result<()> {
        let s = &self.shared;
        let size = (job.prompt.len(), 1);
        super::submit(&s.queue, &s.counters, model, job, size, request).map(drop)
    }

    pub fn stats(&self) -> SchedulerStats {
        self.shared.counters.snapshot(self.shared.queue.len())
    }

    /// Stops taking streams; waits up to `grace` for the queued and active ones to finish, then
    /// ends what is left with `ShuttingDown`. Returns whether everything finished in time.
    pub fn shutdown(&self, grace: Duration) -> bool {
        let s = &self.shared;
        s.queue.close();
        let Some(worker) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return true;
        };
        // The worker returns by itself once the queue is closed and empty and no stream is
        // active; past the grace period it is told to end what is left.
        let until = Instant::now().checked_add(grace);
        while !worker.is_finished() {
            if until.is_some_and(|u| Instant::now() >= u) {
                s.abort.store(true, Ordering::SeqCst);
                s.queue.notify_all();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = worker.join();
        !s.abort.load(Ordering::SeqCst)
    }
}

impl Drop for DecoderScheduler {
    fn drop(&mut self) {
        // Graceful: queued and active streams run to their end.
        self.shutdown(Duration::MAX);
    }
}

/// One active sequence.
struct Seq {
    job: GenJob,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens in the cache.
    fed: usize,
    /// Tokens fed at the current step.
    step: usize,
    last: u32,
    generated: usize,
    /// Its first step, queue wait and forward time, for the response's metadata.
    ran: Ran,
}

enum Outcome {
    Continue,
    Finished,
    Cancelled,
}

impl Seq {
    /// The sequence; None if no KV cache could be made for it (its stream gets the error).
    fn new(job: GenJob, queued: Duration, shared: &Shared, decoder: &Decoder) -> Option<Self> {
        // A copy of the longest cached prefix (none if the device has no memory for the copy).
        let copy = shared
            .prefix
            .as_ref()
            .and_then(|p| p.longest(&shared.version, &job.prompt))
            .and_then(|kv| kv.try_clone().ok());
        let (cache, fed) = match copy {
            Some(kv) => {
                let fed = kv.len();
                (kv, fed)
            }
            None => match decoder.llama.new_cache() {
                Ok(cache) => (cache, 0),
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.into()));
                    return None;
                }
            },
        };
        Some(Self {
            sampler: Sampler::new(job.sampling),
            job,
            cache,
            fed,
            step: 0,
            last: 0,
            generated: 0,
            ran: Ran {
                batch_id: 0,
                queue: queued,
                forward: Duration::ZERO,
            },
        })
    }

    fn input(&mut self, chunk: usize) -> (&[u32], &mut KvCache) {
        let prompt = &self.job.prompt;
        if self.fed < prompt.len() {
            let mut end = (self.fed + chunk).min(prompt.len());
            if let Some(b) = self.job.boundary.filter(|&b| b > self.fed) {
                end = end.min(b);
            }
            self.step = end - self.fed;
            (&prompt[self.fed..end], &mut self.cache)
        } else {
            self.step = 1;
            (std::slice::from_ref(&self.last), &mut self.cache)
        }
    }

    fn advance(&mut self, logits: &[f32], shared: &Shared, decoder: &Decoder) -> Outcome {
        let prompt_len = self.job.prompt.len();
        if self.fed < prompt_len {
            self.fed += self.step;
            if let (Some(prefix), Some(b)) = (&shared.prefix, self.job.boundary) {
                let key = &self.job.prompt[..b];
                if self.fed == b && !prefix.contains(&shared.version, key) {
                    // Without device memory for the copy, the prefix is simply not kept.
                    if let Ok(copy) = self.cache.try_clone() {
                        prefix.insert(&shared.version, key.to_vec(), copy);
                    }
                }
            }
            if self.fed < prompt_len {
                return Outcome::Continue;
            }
        }
        if logits.iter().any(|x| !x.is_finite()) {
            let broken = keel_models::Error::Weights(
                "the model computed non-finite logits: its weights or the backend are broken".into(),
            );
            let _ = self.job.events.send(Event::Failed(broken.into()));
            return Outcome::Finished;
        }
        let id = self.sampler.sample(logits);
        if decoder.tokenizer.eos_ids().contains(&id) {
            let _ = self.job.events.send(Event::Done(FinishReason::Stop, self.ran));
            return Outcome::Finished;
        }
        let logprob = self.job.logprobs.then(|| log_probability(logits, id));
        if self.job.events.send(Event::Token(id, logprob)).is_err() {
            // The stream is gone: cancelled.
            return Outcome::Cancelled;
        }
        self.generated += 1;
        let done = if self.generated >= self.job.max_tokens {
            Some(FinishReason::Length)
        } else if self.cache.len() + 1 > decoder.llama.config().context_length {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        match done {
            Some(reason) => {
                let _ = self.job.events.send(Event::Done(reason, self.ran));
                Outcome::Finished
            }
            None => {
                self.last = id;
                Outcome::Continue
            }
        }
    }
}

/// The log-probability of token `id` under the softmax of `logits` (the model's own
/// distribution, before any temperature): a generation's confidence, token by token.
fn log_probability(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits[id as usize] - max - sum.ln()
}

fn stopped(shared: &Shared) -> Event {
    Event::Failed(Error::ShuttingDown(format!(
        "model '{}' stopped before this generation finished",
        shared.name
    )))
}

fn worker(shared: &Shared, decoder: &Decoder) {
    let c = &shared.counters;
    let mut active: Vec<Seq> = Vec::new();
    loop {
        if shared.abort.load(Ordering::SeqCst) {
            for s in active.drain(..) {
                Counters::add(&c.shut_down, 1);
                let _ = s.job.events.send(stopped(shared));
            }
            for e in shared.queue.drain() {
                Counters::add(&c.shut_down, 1);
                let _ = e.item.events.send(stopped(shared));
            }
            break;
        }
        let room = shared.max_streams - active.len();
        let Next { run, expired } = if active.is_empty() {
            match shared.queue.next(room, true) {
                Some(next) => next,
                None => break,
            }
        } else if room > 0 {
            shared.queue.next(room, false).unwrap_or_default()
        } else {
            Next {
                run: Vec::new(),
                expired: shared.queue.expire(),
            }
        };
        answer_expired(shared, expired);
        let now = Instant::now();
        for e in run {
            if e.item.cancel.load(Ordering::Relaxed) {
                Counters::add(&c.cancelled, 1);
                continue;
            }
            let queued = now.duration_since(e.meta.enqueued);
            Counters::add_time(&c.queue_wait_ns, queued);
            active.extend(Seq::new(e.item, queued, shared, decoder));
        }
        active.retain(|s| {
            let cancelled = s.job.cancel.load(Ordering::Relaxed);
            if cancelled {
                Counters::add(&c.cancelled, 1);
            }
            !cancelled
        });
        if !active.is_empty() {
            step(shared, decoder, &mut active);
        }
        let kv: usize = active.iter().map(|s| s.cache.bytes()).sum();
        c.kv_bytes.store(kv as u64, Ordering::Relaxed);
        c.active_streams.store(active.len() as u64, Ordering::Relaxed);
    }
    c.kv_bytes.store(0, Ordering::Relaxed);
    c.active_streams.store(0, Ordering::Relaxed);
}

fn answer_expired(shared: &Shared, expired: Vec<Entry<GenJob>>) {
    for e in expired {
        Counters::add(&shared.counters.expired, 1);
        let _ = e.item.events.send(Event::Failed(Error::DeadlineExceeded {
            waited: e.meta.enqueued.elapsed(),
        }));
    }
}

fn step(shared: &Shared, decoder: &Decoder, active: &mut Vec<Seq>) {
    let c = &shared.counters;
    let mut batch: Vec<(&[u32], &mut KvCache)> = active.iter_mut().map(|s| s.input(shared.chunk)).collect();
    let tokens: usize = batch.iter().map(|(t, _)| t.len()).sum();
    let t = Instant::now();
    let result = guarded("the decoder", || Ok(decoder.llama.forward_batch(&mut batch)?));
    drop(batch);
    let took = t.elapsed();
    Counters::add_time(&c.compute_ns, took);
    let step_id = next_batch_id();
    for s in active.iter_mut() {
        if s.ran.batch_id == 0 {
            s.ran.batch_id = step_id;
        }
        s.ran.forward += took;
    }
    Counters::add(&c.batches, 1);
    Counters::add(&c.items, active.len() as u64);
    Counters::add(&c.tokens, tokens as u64);
    match result {
        Ok(logits) => {
            let mut keep = Vec::with_capacity(active.len());
            for (mut s, l) in active.drain(..).zip(logits) {
                match s.advance(&l, shared, decoder) {
                    Outcome::Continue => keep.push(s),
                    Outcome::Finished => Counters::add(&c.completed, 1),
                    Outcome::Cancelled => Counters::add(&c.cancelled, 1),
                }
            }
            *active = keep;
        }
        Err(e) => {
            // forward_batch rolled every cache back, but the step failed for all of them.
            for s in active.drain(..) {
                Counters::add(&c.failed, 1);
                let _ = s.job.events.send(Event::Failed(clone_error(&e)));
            }
        }
    }
}
