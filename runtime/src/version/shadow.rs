//! Shadow runs: a candidate version runs on copies of production's requests, off the hot path,
//! and its output is compared with the answer that was returned (never returned itself).
//!
//! The queue is bounded: when it is full a copy is dropped and counted, so production never
//! waits for its shadow.

use super::{divergence, GuardState, Shared, Slot, Versioned};
use crate::{InferRequest, Output};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

/// Counters of the shadow queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Copies run to the end.
    pub run: u64,
    /// Copies dropped because the queue was full.
    pub dropped: u64,
    /// Copies whose run failed.
    pub failed: u64,
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
}

#[derive(Default)]
struct Counters {
    run: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    /// Copies queued or running.
    pending: Mutex<u64>,
    idle: Condvar,
}

pub(crate) struct ShadowQueue {
    tx: Mutex<Option<SyncSender<ShadowJob>>>,
    counters: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ShadowQueue {
    pub fn new(capacity: usize, shared: Weak<Shared>) -> Self {
        let (tx, rx) = sync_channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread = {
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("keel-shadow".into())
                .spawn(move || run(&rx, &shared, &counters))
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

fn run(rx: &Receiver<ShadowJob>, shared: &Weak<Shared>, c: &Counters) {
    while let Ok(job) = rx.recv() {
        if let Some(shared) = shared.upgrade() {
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
                shared.record(
                    &request,
                    &answer,
                    &job.slot,
                    &job.name,
                    "shadow",
                    reason,
                    Some((request.id.as_str(), d)),
                    false,
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
