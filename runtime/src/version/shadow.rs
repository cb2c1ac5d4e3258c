//! Shadow runs: a candidate version runs on copies of production's requests, off the hot path,
//! and its output is compared with the answer that was returned (never returned itself).
//!
//! The queue is bounded: when it is full a copy is dropped and counted, so production never
//! waits for its shadow. A copy runs only in production's idle time (no request of the layer in
//! flight for `shadow_idle_gap`), so that on a small machine it does not take the cores from
//! production; one that finds no idle time within `shadow_max_wait` is dropped as stale.

use super::guard::GuardState;
use super::slots::Slot;
use super::{Shared, Versioned};
use crate::{InferRequest, Output};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Counters of the shadow queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Copies run to the end.
    pub run: u64,
    /// Copies dropped because the queue was full.
    pub dropped: u64,
    /// Copies dropped because production left no idle time for them within `shadow_max_wait`.
    pub stale: u64,
    /// Copies whose run failed.
    pub failed: u64,
}

/// Production traffic through the layer: how many requests are in flight and when the last one
/// ended, for the shadow queue to run in the gaps.
#[derive(Default)]
pub(crate) struct Traffic {
    busy: Mutex<Busy>,
    quiet: Condvar,
}

#[derive(Default)]
struct Busy {
    in_flight: usize,
    last_done: Option<Instant>,
}

/// A request in flight; its drop ends it.
pub(crate) struct InFlight(Arc<Traffic>);

impl Traffic {
    fn lock(&self) -> std::sync::MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.lock().in_flight += 1;
        InFlight(self.clone())
    }

    /// Waits until no request has been in flight for `gap`; false if that did not happen by
    /// `until`.
    fn wait_quiet(&self, gap: Duration, until: Instant) -> bool {
        let mut busy = self.lock();
        loop {
            let now = Instant::now();
            let quiet_for = busy.last_done.map_or(gap, |t| now.duration_since(t));
            if busy.in_flight == 0 && quiet_for >= gap {
                return true;
            }
            if now >= until {
                return false;
            }
            let wait = if busy.in_flight == 0 {
                gap - quiet_for
            } else {
                until - now
            };
            busy = self
                .quiet
                .wait_timeout(busy, wait.min(until - now))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut busy = self.0.lock();
        busy.in_flight -= 1;
        busy.last_done = Some(Instant::now());
        if busy.in_flight == 0 {
            self.0.quiet.notify_all();
        }
    }
}

pub(crate) struct ShadowJob {
    /// The request as production ran it.
    pub request: InferRequest,
    /// The model as the caller named it.
    pub addressed: String,
    /// The answer that was returned.
    pub original: Output,
    /// The version to run the copy on.
    pub slot: Arc<Slot>,
    pub name: String,
    pub guard: Option<Arc<GuardState>>,
    /// A shadow run of the canary (recorded in lineage, counted as a canary request); false: a
    /// production run for comparison with a canary's answer.
    pub recorded: bool,
    /// When it was queued.
    pub queued: Instant,
}

#[derive(Default)]
struct Counters {
    run: AtomicU64,
    dropped: AtomicU64,
    stale: AtomicU64,
    failed: AtomicU64,
    /// Copies queued or running.
    pending: Mutex<u64>,
    idle: Condvar,
}

/// When copies may run: in production's idle time.
#[derive(Clone)]
pub(crate) struct Pacing {
    pub traffic: Arc<Traffic>,
    pub idle_gap: Duration,
    pub max_wait: Duration,
}

pub(crate) struct ShadowQueue {
    tx: Mutex<Option<SyncSender<ShadowJob>>>,
    counters: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ShadowQueue {
    pub fn new(capacity: usize, shared: Weak<Shared>, pacing: Pacing) -> Self {
        let (tx, rx) = sync_channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread = {
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("keel-shadow".into())
                .spawn(move || run(&rx, &shared, &counters, &pacing))
                .ok()
        };
        Self {
            tx: Mutex::new(Some(tx)),
            counters,
            thread: Mutex::new(thread),
        }
    }

    /// Queues a copy, or drops and counts it if the queue is full.
    pub fn offer(&self, job: ShadowJob) {
        let c = &self.counters;
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut pending = c.pending.lock().unwrap_or_else(|p| p.into_inner());
        let sent = match tx {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if sent {
            *pending += 1;
        } else {
            c.dropped.fetch_add(1, Relaxed);
        }
    }

    pub fn drain(&self) {
        let c = &self.counters;
        let mut pending = c.pending.lock().unwrap_or_else(|p| p.into_inner());
        while *pending > 0 {
            pending = c.idle.wait(pending).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn stats(&self) -> ShadowStats {
        let c = &self.counters;
        ShadowStats {
            run: c.run.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            stale: c.stale.load(Relaxed),
            failed: c.failed.load(Relaxed),
        }
    }
}

impl Drop for ShadowQueue {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // The layer may be dropped by the shadow thread itself (it held the last reference
            // for a moment): that thread ends by itself once the channel is closed.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn run(rx: &Receiver<ShadowJob>, shared: &Weak<Shared>, c: &Counters, pacing: &Pacing) {
    while let Ok(job) = rx.recv() {
        let until = job.queued + pacing.max_wait;
        if !pacing.traffic.wait_quiet(pacing.idle_gap, until) {
            c.stale.fetch_add(1, Relaxed);
        } else if let Some(shared) = shared.upgrade() {
            run_one(&shared, job, c);
        }
        let mut pending = c.pending.lock().unwrap_or_else(|p| p.into_inner());
        *pending = pending.saturating_sub(1);
        c.idle.notify_all();
    }
}

fn run_one(shared: &Arc<Shared>, job: ShadowJob, c: &Counters) {
    let started = Instant::now();
    let mut request = job.request;
    request.model = job.slot.record.id.to_string();
    request.target = Some(job.slot.target());
    request.purpose = crate::Purpose::Shadow;
    let result = shared.below.infer(request.clone());
    request.model = job.addressed;
    let guard = job.guard.as_deref();
    match result {
        Ok(answer) => {
            c.run.fetch_add(1, Relaxed);
            let d = divergence(&job.original, &answer.output);
            if let Some(g) = guard {
                g.observe_divergence(d);
                if job.recorded {
                    g.observe(true, true, started.elapsed());
                }
            }
            if job.recorded {
                let reason = "shadow copy of a production request";
                let input = std::sync::Arc::new(request.input.clone());
                // Off the hot path: nobody waits for a shadow run's record.
                let _ = shared.record(
                    super::serve::Asked::of(&request, input),
                    &answer,
                    &job.slot,
                    &job.name,
                    "shadow",
                    reason,
                    Some((request.id.as_str(), d)),
                    started,
                );
            }
        }
        Err(_) => {
            c.failed.fetch_add(1, Relaxed);
            if let (Some(g), true) = (guard, job.recorded) {
                g.observe(true, false, started.elapsed());
            }
        }
    }
    drop(job.slot);
    if let Some(g) = guard {
        if let Some(why) = g.tripped() {
            let layer = Versioned {
                shared: shared.clone(),
            };
            let _ = layer.abort_canary(&job.name, &format!("guard: {why}"));
        }
    }
}
/// Output divergence: 1 - the least cosine over the texts, or the share of differing tokens.
fn divergence(a: &Output, b: &Output) -> f64 {
    match (a, b) {
        (Output::Embeddings(x), Output::Embeddings(y)) => {
            let least = x
                .iter()
                .zip(y)
                .map(|(u, v)| {
                    let dot: f64 = u.iter().zip(v).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
                    let nu: f64 = u.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
                    let nv: f64 = v.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
                    dot / (nu * nv).max(f64::MIN_POSITIVE)
                })
                .fold(1.0, f64::min);
            (1.0 - least).max(0.0)
        }
        (Output::Completion(x), Output::Completion(y)) => {
            let n = x.token_ids.len().max(y.token_ids.len());
            if n == 0 {
                return 0.0;
            }
            let same = x
                .token_ids
                .iter()
                .zip(&y.token_ids)
                .filter(|(p, q)| p == q)
                .count();
            1.0 - same as f64 / n as f64
        }
        _ => 1.0,
    }
}
