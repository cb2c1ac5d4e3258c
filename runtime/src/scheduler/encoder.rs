//! Dynamic batching for encoders: single requests from many threads become padded batches of
//! similar-length sequences.

use super::queue::{BatchQueue, Next, Policy};
use super::{guarded, next_batch_id, Counters, Ran, SchedulerConfig, SchedulerStats};
use crate::request::Request;
use crate::{Error, Result};
use keel_models::bert::SentenceEncoder;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What runs a batch of token-id sequences: the real encoder, or a stand-in in tests.
pub(crate) trait EmbedBatch: Send + Sync + 'static {
    fn embed_batch(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
}

impl EmbedBatch for SentenceEncoder {
    fn embed_batch(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_ids(batch)?)
    }
}

/// A request's vectors, and how it ran.
pub(crate) type Answer = (Vec<Vec<f32>>, Ran);

type Reply = SyncSender<Result<Answer>>;

struct Job {
    ids: Vec<Vec<u32>>,
    reply: Reply,
}

struct Shared {
    queue: BatchQueue<Job>,
    counters: Counters,
    name: String,
}

/// An encoder's scheduler: a bounded queue and its worker threads. Dropping it shuts it down
/// gracefully: queued requests are run, then the workers stop.
pub(crate) struct EncoderScheduler {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl EncoderScheduler {
    pub fn start(name: &str, model: Arc<dyn EmbedBatch>, config: &SchedulerConfig) -> Result<Self> {
        let policy = Policy {
            max_batch: config.max_batch_size.max(1),
            max_delay: config.max_queue_delay,
            preferred: config.preferred_batch_sizes.clone(),
            starvation_bound: config.starvation_bound,
            buckets: config.length_buckets,
            adaptive: config.adaptive_delay,
        };
        let shared = Arc::new(Shared {
            queue: BatchQueue::new(config.queue_capacity, policy),
            counters: Counters::default(),
            name: name.to_string(),
        });
        let workers = (0..config.workers.max(1))
            .map(|i| {
                let (shared, model) = (shared.clone(), model.clone());
                std::thread::Builder::new()
                    .name(format!("keel-embed-{i}"))
                    .spawn(move || worker(&shared, model.as_ref()))
                    .map_err(|e| Error::Internal(format!("cannot start a scheduler thread: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shared,
            workers: Mutex::new(workers),
        })
    }

    /// Embeds `ids` (one request, however many sequences), waiting for the answer.
    pub fn embed(&self, model: &str, ids: Vec<Vec<u32>>, request: &Request) -> Result<Answer> {
        let rx = self.submit(model, ids, request)?;
        rx.wait()
    }

    pub fn submit(&self, model: &str, ids: Vec<Vec<u32>>, request: &Request) -> Result<Pending> {
        let size = (ids.iter().map(Vec::len).max().unwrap_or(0), ids.len());
        let (reply, rx) = sync_channel(1);
        let s = &self.shared;
        let queued = super::submit(&s.queue, &s.counters, model, Job { ids, reply }, size, request)?;
        Ok(Pending {
            shared: s.clone(),
            id: queued.id,
            rx,
            submitted: queued.at,
            deadline: queued.deadline,
        })
    }

    pub fn stats(&self) -> SchedulerStats {
        self.shared.counters.snapshot(self.shared.queue.len())
    }

    /// Stops taking requests; waits up to `grace` for the workers to run what is queued, then
    /// answers what is left `ShuttingDown`. Returns whether the queue drained in time.
    pub fn shutdown(&self, grace: Duration) -> bool {
        self.shared.queue.close();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        // Workers return by themselves once the queue is closed and empty.
        let until = Instant::now().checked_add(grace);
        while !workers.iter().all(JoinHandle::is_finished) && until.is_none_or(|u| Instant::now() < u) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let left = self.shared.queue.drain();
        let drained = left.is_empty();
        for e in left {
            Counters::add(&self.shared.counters.shut_down, 1);
            let _ = e.item.reply.send(Err(Error::ShuttingDown(format!(
                "model '{}' stopped before this request ran",
                self.shared.name
            ))));
        }
        // A batch in flight finishes and is answered; then the workers see the closed, empty
        // queue and return.
        for w in workers {
            let _ = w.join();
        }
        drained
    }
}

impl Drop for EncoderScheduler {
    fn drop(&mut self) {
        // Graceful: everything queued is run (no deadline on the drain when dropped).
        self.shutdown(Duration::MAX);
    }
}

/// A submitted request's answer, to wait for.
pub(crate) struct Pending {
    shared: Arc<Shared>,
    id: u64,
    rx: Receiver<Result<Answer>>,
    submitted: Instant,
    deadline: Option<Instant>,
}

impl Pending {
    pub fn wait(self) -> Result<Answer> {
        let lost = || Error::Internal("the scheduler dropped a request".into());
        let Some(deadline) = self.deadline else {
            return self.rx.recv().unwrap_or_else(|_| Err(lost()));
        };
        match self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(r) => r,
            Err(RecvTimeoutError::Disconnected) => Err(lost()),
            Err(RecvTimeoutError::Timeout) => {
                // Withdraw it if it is still queued: it will never run. If a worker has it,
                // it runs, but the caller is answered at its deadline all the same.
                if self.shared.queue.remove(self.id).is_some() {
                    Counters::add(&self.shared.counters.expired, 1);
                }
                Err(Error::DeadlineExceeded {
                    waited: self.submitted.elapsed(),
                })
            }
        }
    }
}

fn worker(shared: &Shared, model: &dyn EmbedBatch) {
    let c = &shared.counters;
    let max = shared.queue.policy().max_batch;
    while let Some(Next { run, expired }) = shared.queue.next(max, true) {
        for e in expired {
            Counters::add(&c.expired, 1);
            let _ = e.item.reply.send(Err(Error::DeadlineExceeded {
                waited: e.meta.enqueued.elapsed(),
            }));
        }
        if run.is_empty() {
            continue;
        }
        let start = Instant::now();
        let mut queued = Vec::with_capacity(run.len());
        for e in &run {
            let waited = start.duration_since(e.meta.enqueued);
            Counters::add_time(&c.queue_wait_ns, waited);
            queued.push(waited);
        }
        let batch_id = next_batch_id();
        // One flat batch of every sequence; a single request larger than a batch runs in chunks.
        let mut flat = Vec::new();
        let mut owners = Vec::new();
        let mut replies = Vec::with_capacity(run.len());
        for (j, e) in run.into_iter().enumerate() {
            owners.extend(std::iter::repeat_n(j, e.item.ids.len()));
            flat.extend(e.item.ids);
            replies.push((e.item.reply, Vec::new()));
        }
        let mut failure = None;
        let mut forward = Duration::ZERO;
        for (chunk, chunk_owners) in flat.chunks(max).zip(owners.chunks(max)) {
            // The encoder runs the chunk packed: no padding tokens to count.
            let real: usize = chunk.iter().map(Vec::len).sum();
            Counters::add(&c.batches, 1);
            Counters::add(&c.items, chunk.len() as u64);
            Counters::add(&c.tokens, real as u64);
            let t = Instant::now();
            let result = guarded("the encoder", || model.embed_batch(chunk));
            forward += t.elapsed();
            Counters::add_time(&c.compute_ns, t.elapsed());
            match result {
                Ok(vectors) => {
                    for (v, &j) in vectors.into_iter().zip(chunk_owners) {
                        replies[j].1.push(v);
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        for ((reply, vectors), queue) in replies.into_iter().zip(queued) {
            let answer = match &failure {
                None => {
                    Counters::add(&c.completed, 1);
                    let ran = Ran {
                        batch_id,
                        queue,
                        forward,
                    };
                    Ok((vectors, ran))
                }
                Some(e) => {
                    Counters::add(&c.failed, 1);
                    Err(clone_error(e))
                }
            };
            // A caller that gave up (deadline) has dropped its receiver: nothing to do.
            let _ = reply.send(answer);
        }
    }
}

/// The same failure for every request of a failed batch (errors are not `Clone`: the message
/// and class are kept).
pub(crate) fn clone_error(e: &Error) -> Error {
    match e {
        Error::Overloaded { model, capacity } => Error::Overloaded {
            model: model.clone(),
            capacity: *capacity,
        },
        Error::DeadlineExceeded { waited } => Error::DeadlineExceeded { waited: *waited },
        Error::ShuttingDown(m) => Error::ShuttingDown(m.clone()),
        Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
        Error::UnknownModel(m) => Error::UnknownModel(m.clone()),
        other if other.kind() == crate::ErrorKind::InvalidArgument => {
            Error::InvalidArgument(other.to_string())
        }
        other => Error::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    /// Embeds a sequence as [its first id, its length]; can be held at a gate to fill the queue.
    #[derive(Default)]
    struct Fake {
        gate: Mutex<bool>,
        open: Condvar,
        batches: Mutex<Vec<Vec<u32>>>,
    }

    impl Fake {
        fn hold(&self) {
            *self.gate.lock().unwrap() = true;
        }
        fn release(&self) {
            *self.gate.lock().unwrap() = false;
            self.open.notify_all();
        }
    }

    impl EmbedBatch for Fake {
        fn embed_batch(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
            let mut held = self.gate.lock().unwrap();
            while *held {
                held = self.open.wait(held).unwrap();
            }
            drop(held);
            self.batches
                .lock()
                .unwrap()
                .push(batch.iter().map(|s| s[0]).collect());
            if batch.iter().any(|s| s[0] == 666) {
                panic!("bad batch");
            }
            Ok(batch.iter().map(|s| vec![s[0] as f32, s.len() as f32]).collect())
        }
    }

    fn config() -> SchedulerConfig {
        SchedulerConfig::default()
            .max_batch_size(4)
            .max_queue_delay(Duration::from_millis(2))
            .queue_capacity(8)
    }

    fn start(fake: &Arc<Fake>, config: &SchedulerConfig) -> Arc<EncoderScheduler> {
        Arc::new(EncoderScheduler::start("fake", fake.clone(), config).unwrap())
    }

    /// Waits until the worker is inside a batch held at the gate.
    fn until(cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn answers_each_caller_with_its_own_result() {
        let fake = Arc::new(Fake::default());
        let s = start(&fake, &config().queue_capacity(64));
        let threads: Vec<_> = (0..16u32)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let ids = vec![vec![i; 1 + i as usize % 5], vec![i + 100; 3]];
                    let got = s.embed("fake", ids, &Request::default()).unwrap().0;
                    assert_eq!(
                        got,
                        vec![vec![i as f32, (1 + i % 5) as f32], vec![(i + 100) as f32, 3.0]]
                    );
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let st = s.stats();
        assert_eq!(st.completed, 16);
        assert!(
            st.batches < 32,
            "{} batches for 32 sequences: no batching",
            st.batches
        );
    }

    #[test]
    fn overload_sheds_at_once_and_loses_nothing() {
        let fake = Arc::new(Fake::default());
        fake.hold();
        let s = start(&fake, &config());
        let first = s.submit("fake", vec![vec![1]], &Request::default()).unwrap();
        until(|| s.stats().queued == 0);
        let mut pending = vec![first];
        let mut refused = 0;
        for i in 0..20 {
            let start = Instant::now();
            match s.submit("fake", vec![vec![10 + i]], &Request::default()) {
                Ok(p) => pending.push(p),
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_millis(100));
                    assert_eq!(e.kind(), crate::ErrorKind::Overloaded);
                    refused += 1;
                }
            }
        }
        assert!(refused >= 11, "refused {refused}");
        fake.release();
        let mut answered = 0;
        for p in pending {
            p.wait().unwrap();
            answered += 1;
        }
        assert_eq!(answered + refused, 21);
        assert_eq!(s.stats().overloaded, refused as u64);
    }

    #[test]
    fn queued_past_deadline_is_never_run() {
        let fake = Arc::new(Fake::default());
        fake.hold();
        let s = start(&fake, &config());
        let blocker = s.submit("fake", vec![vec![1]], &Request::default()).unwrap();
        until(|| s.stats().queued == 0);
        let start = Instant::now();
        let r = s.embed(
            "fake",
            vec![vec![7]],
            &Request::default().deadline(Duration::from_millis(30)),
        );
        assert_eq!(r.unwrap_err().kind(), crate::ErrorKind::DeadlineExceeded);
        assert!(start.elapsed() < Duration::from_millis(500));
        fake.release();
        blocker.wait().unwrap();
        s.embed("fake", vec![vec![2]], &Request::default()).unwrap();
        let ran: Vec<u32> = fake.batches.lock().unwrap().concat();
        assert!(!ran.contains(&7), "an expired request ran: {ran:?}");
        assert_eq!(s.stats().expired, 1);
    }

    #[test]
    fn higher_priority_runs_first() {
        let fake = Arc::new(Fake::default());
        fake.hold();
        let s = start(&fake, &config().max_batch_size(1));
        let blocker = s.submit("fake", vec![vec![1]], &Request::default()).unwrap();
        until(|| s.stats().queued == 0);
        use crate::Priority::*;
        let mut pending = Vec::new();
        for (id, p) in [(10, Low), (20, Normal), (30, High), (11, Low), (31, High)] {
            pending.push(
                s.submit("fake", vec![vec![id]], &Request::default().priority(p))
                    .unwrap(),
            );
        }
        fake.release();
        blocker.wait().unwrap();
        pending.into_iter().for_each(|p| drop(p.wait().unwrap()));
        let ran: Vec<u32> = fake.batches.lock().unwrap().concat();
        assert_eq!(ran, vec![1, 30, 31, 20, 10, 11]);
    }

    #[test]
    fn shutdown_runs_or_answers_every_queued_request() {
        let fake = Arc::new(Fake::default());
        fake.hold();
        let s = EncoderScheduler::start("fake", fake.clone(), &config()).unwrap();
        let pending: Vec<_> = (0..6)
            .map(|i| s.submit("fake", vec![vec![i]], &Request::default()).unwrap())
            .collect();
        // The worker holds a batch of 4 at the gate; 2 stay queued.
        until(|| s.stats().queued == 2);
        let releaser = {
            let fake = fake.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                fake.release();
            })
        };
        // A short grace: the worker is held, so some requests are answered ShuttingDown.
        let drained = s.shutdown(Duration::from_millis(10));
        releaser.join().unwrap();
        assert!(!drained);
        let mut ok = 0;
        let mut stopped = 0;
        for p in pending {
            match p.wait() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(e.kind(), crate::ErrorKind::ShuttingDown);
                    stopped += 1;
                }
            }
        }
        assert_eq!(ok + stopped, 6);
        assert!(ok >= 1 && stopped >= 1, "ok {ok}, stopped {stopped}");
        let err = s
            .submit("fake", vec![vec![1]], &Request::default())
            .err()
            .unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::ShuttingDown);
    }

    #[test]
    fn a_panicking_batch_is_an_error_and_the_worker_lives_on() {
        let fake = Arc::new(Fake::default());
        let s = start(&fake, &config());
        let e = s.embed("fake", vec![vec![666]], &Request::default()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Internal);
        assert_eq!(
            s.embed("fake", vec![vec![5]], &Request::default()).unwrap().0,
            vec![vec![5.0, 1.0]]
        );
    }
}
