//! The queue core under both schedulers: bounded, ordered by priority with aging, aware of
//! deadlines, closable; and the batching policy that decides when a batch leaves it.
//!
//! A `Mutex` + `Condvar` rather than a channel: the batcher needs to look at the whole queue
//! (priorities, length buckets, deadlines) and to let a caller withdraw its own request when its
//! deadline passes, which a FIFO channel cannot do. Waiting is always on the condition variable
//! (with a timeout at the next moment something can change), so an idle queue costs no CPU.

use crate::request::Priority;
#[cfg(loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
use std::cmp::Reverse;
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// When a batch leaves the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Most items (sequences) in one batch.
    pub max_batch: usize,
    /// Longest a batch waits to fill once its oldest request is queued and a worker is free
    /// for it (a request that waited for a busy worker has not waited for its batch).
    pub max_delay: Duration,
    /// Batch sizes to prefer (ascending): a batch reaching the largest is sent at once; a batch
    /// smaller than `max_batch` is cut down to the largest preferred size it holds.
    pub preferred: Vec<usize>,
    /// A request that has waited this long is served before any priority level.
    pub starvation_bound: Duration,
    /// Batch only requests of similar length (length buckets).
    pub buckets: bool,
    /// A batch also leaves once it holds as many items as the previous batch did.
    pub adaptive: bool,
}

/// What the queue knows of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub priority: Priority,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    /// Length in tokens (the longest of its sequences), for the length buckets.
    pub tokens: usize,
    /// Sequences it holds (counted against `max_batch`).
    pub items: usize,
}

pub(crate) struct Entry<T> {
    pub id: u64,
    pub meta: Meta,
    pub item: T,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds `capacity` requests.
    Full,
    /// The queue is closed (shutting down).
    Closed,
}

/// What a worker takes from the queue: a batch to run, and requests whose deadline passed while
/// queued (to be answered, never run).
pub(crate) struct Next<T> {
    pub run: Vec<Entry<T>>,
    pub expired: Vec<Entry<T>>,
}

impl<T> Default for Next<T> {
    fn default() -> Self {
        Self {
            run: Vec::new(),
            expired: Vec::new(),
        }
    }
}

/// Batches the adaptive policy remembers: after the load drops, a lone caller waits
/// `max_delay` for this many batches at most.
const RECENT: usize = 4;

struct State<T> {
    entries: Vec<Entry<T>>,
    closed: bool,
    next_id: u64,
    /// Callers seen by the last batches: each batch's items plus those it left queued (they
    /// all come back). The adaptive policy waits for the largest, so that one straggler (a
    /// batch that left on `max_delay` short of a caller) does not shrink the batches after it.
    recent: [usize; RECENT],
    /// Where the next batch's count goes in `recent`.
    next_slot: usize,
}

pub(crate) struct BatchQueue<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    capacity: usize,
    policy: Policy,
}

/// Length bucket of a sequence: powers of two from 16 tokens up, so that a batch pads a
/// sequence to at most twice its length (at most 15 tokens for the shortest ones).
pub(crate) fn bucket(tokens: usize) -> u32 {
    usize::BITS - (tokens.max(16) - 1).leading_zeros()
}

impl<T> BatchQueue<T> {
    pub fn new(capacity: usize, policy: Policy) -> Self {
        Self {
            state: Mutex::new(State {
                entries: Vec::new(),
                closed: false,
                next_id: 0,
                recent: [1; RECENT],
                next_slot: 0,
            }),
            wake: Condvar::new(),
            capacity: capacity.max(1),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state whole (pushes and removals of whole entries),
        // so a panic elsewhere while holding the lock does not make it unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Queues `item`, or hands it back at once if the queue is full or closed: never blocks.
    pub fn push(&self, item: T, meta: Meta) -> Result<u64, (PushError, T)> {
        let mut st = self.lock();
        if st.closed {
            return Err((PushError::Closed, item));
        }
        if st.entries.len() >= self.capacity {
            return Err((PushError::Full, item));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.entries.push(Entry { id, meta, item });
        drop(st);
        self.wake.notify_one();
        Ok(id)
    }

    /// Takes back a request that is still queued (its caller gave up): `None` if a worker has
    /// taken it already.
    pub fn remove(&self, id: u64) -> Option<T> {
        let mut st = self.lock();
        let at = st.entries.iter().position(|e| e.id == id)?;
        Some(st.entries.swap_remove(at).item)
    }

    /// Requests queued now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Refuses new requests from now on; workers go on taking what is queued, and get `None`
    /// once it is empty.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Takes every queued request (to answer them at a hard shutdown).
    pub fn drain(&self) -> Vec<Entry<T>> {
        let mut st = self.lock();
        std::mem::take(&mut st.entries)
    }

    /// Takes the requests whose deadline has passed (without waiting).
    pub fn expire(&self) -> Vec<Entry<T>> {
        let now = Instant::now();
        take_where(&mut self.lock().entries, |e| {
            e.meta.deadline.is_some_and(|d| d <= now)
        })
    }

    /// Wakes every waiting worker (to look at a flag of its own).
    pub fn notify_all(&self) {
        self.wake.notify_all();
    }

    /// The next batch of at most `limit` items. With `block`, waits (without spinning) until the
    /// policy says a batch is ready, or requests expire; without, takes what is queued now, in
    /// priority order (possibly nothing). `None`: the queue is closed and empty.
    pub fn next(&self, limit: usize, block: bool) -> Option<Next<T>> {
        let limit = limit.max(1);
        // The worker is free from now: the batch's wait counts from here at the earliest, so
        // that under load (callers queued while the last batch ran) the callers that batch
        // just answered may come back and join; else the load splits into two cohorts that
        // alternate in half-size batches.
        let free_since = Instant::now();
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let expired = take_where(&mut st.entries, |e| e.meta.deadline.is_some_and(|d| d <= now));
            if !expired.is_empty() {
                return Some(Next {
                    run: Vec::new(),
                    expired,
                });
            }
            if st.entries.is_empty() {
                if st.closed {
                    return None;
                }
                if !block {
                    return Some(Next::default());
                }
                st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let expected = st.recent.iter().copied().max().unwrap_or(1);
            let plan = self.plan(&st.entries, now, free_since, limit, expected);
            if plan.ready || !block || st.closed {
                let mut picked = plan.picked;
                // Remove from the highest index down so that swap_remove keeps the others valid.
                picked.sort_unstable_by(|a, b| b.cmp(a));
                let mut run: Vec<Entry<T>> = picked.into_iter().map(|i| st.entries.swap_remove(i)).collect();
                run.sort_by_key(|e| order_key(e, now, self.policy.starvation_bound));
                run.reverse();
                // The callers of this batch come back once answered, to find those left queued.
                let slot = st.next_slot;
                st.recent[slot] = items(&run) + items(&st.entries);
                st.next_slot = (slot + 1) % RECENT;
                return Some(Next {
                    run,
                    expired: Vec::new(),
                });
            }
            let deadline = st.entries.iter().filter_map(|e| e.meta.deadline).min();
            let until = deadline.map_or(plan.wake_at, |d| d.min(plan.wake_at));
            let wait = until
                .saturating_duration_since(now)
                .max(Duration::from_micros(50));
            st = self
                .wake
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Which entries the next batch would hold, and whether it should leave now (`expected`:
    /// items the adaptive policy waits for).
    fn plan(
        &self,
        entries: &[Entry<T>],
        now: Instant,
        free_since: Instant,
        limit: usize,
        expected: usize,
    ) -> Plan {
        let p = &self.policy;
        let head = (0..entries.len())
            .max_by_key(|&i| order_key(&entries[i], now, p.starvation_bound))
            .expect("plan of an empty queue");
        let same_bucket =
            |e: &Entry<T>| !p.buckets || bucket(e.meta.tokens) == bucket(entries[head].meta.tokens);
        let mut candidates: Vec<usize> = (0..entries.len()).filter(|&i| same_bucket(&entries[i])).collect();
        candidates.sort_by_key(|&i| Reverse(order_key(&entries[i], now, p.starvation_bound)));
        let oldest = candidates
            .iter()
            .map(|&i| entries[i].meta.enqueued)
            .min()
            .unwrap_or(now);
        let mut picked = Vec::new();
        let mut items = 0;
        for i in candidates {
            let n = entries[i].meta.items.max(1);
            // The head always goes, even if it alone is larger than a batch (the worker splits it).
            if picked.is_empty() || items + n <= limit {
                picked.push(i);
                items += n;
            }
        }
        let full = items >= limit || p.preferred.last().is_some_and(|&largest| items >= largest);
        let waiting_since = oldest.max(free_since);
        let overdue = now.duration_since(waiting_since) >= p.max_delay;
        // Under steady load the same callers come back batch after batch: once they are all
        // here, waiting longer only delays them; and a lone caller never waits.
        let expected_here = p.adaptive && items >= expected.min(limit);
        let ready = full || overdue || expected_here;
        if ready && items < limit {
            if let Some(&size) = p.preferred.iter().rev().find(|&&s| s <= items) {
                while items > size && picked.len() > 1 {
                    let last = picked.pop().expect("more than one picked");
                    items -= entries[last].meta.items.max(1);
                }
            }
        }
        Plan {
            picked,
            ready,
            wake_at: waiting_since + p.max_delay,
        }
    }
}

struct Plan {
    picked: Vec<usize>,
    ready: bool,
    wake_at: Instant,
}

/// Larger is served first: starved requests, then priority, then age (lower id).
fn order_key<T>(e: &Entry<T>, now: Instant, starvation_bound: Duration) -> (bool, Priority, Reverse<u64>) {
    (
        now.duration_since(e.meta.enqueued) >= starvation_bound,
        e.meta.priority,
        Reverse(e.id),
    )
}

/// Items (sequences) in `entries`.
fn items<T>(entries: &[Entry<T>]) -> usize {
    entries.iter().map(|e| e.meta.items.max(1)).sum()
}

fn take_where<T>(entries: &mut Vec<Entry<T>>, pred: impl Fn(&Entry<T>) -> bool) -> Vec<Entry<T>> {
    let mut taken = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        if pred(&entries[i]) {
            taken.push(entries.swap_remove(i));
        } else {
            i += 1;
        }
    }
    taken
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn policy() -> Policy {
        Policy {
            max_batch: 4,
            max_delay: Duration::from_millis(20),
            preferred: Vec::new(),
            starvation_bound: Duration::from_secs(60),
            buckets: true,
            adaptive: false,
        }
    }

    fn meta(priority: Priority, tokens: usize) -> Meta {
        Meta {
            priority,
            deadline: None,
            enqueued: Instant::now(),
            tokens,
            items: 1,
        }
    }

    fn ids<T: Copy>(next: &Next<T>) -> Vec<T> {
        next.run.iter().map(|e| e.item).collect()
    }

    #[test]
    fn buckets_split_lengths() {
        assert_eq!(bucket(1), bucket(16));
        assert_ne!(bucket(16), bucket(17));
        assert_eq!(bucket(17), bucket(32));
        assert_eq!(bucket(100), bucket(128));
        assert_ne!(bucket(128), bucket(129));
    }

    #[test]
    fn full_queue_refuses_at_once_and_keeps_what_it_has() {
        let q = BatchQueue::new(3, policy());
        for i in 0..3 {
            q.push(i, meta(Priority::Normal, 8)).unwrap();
        }
        let start = Instant::now();
        let (err, item) = q.push(99, meta(Priority::Normal, 8)).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(50));
        assert_eq!((err, item), (PushError::Full, 99));
        assert_eq!(q.len(), 3);
        let mut got = ids(&q.next(10, false).unwrap());
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn higher_priority_first_then_age() {
        let q = BatchQueue::new(16, policy());
        q.push(1, meta(Priority::Low, 8)).unwrap();
        q.push(2, meta(Priority::Normal, 8)).unwrap();
        q.push(3, meta(Priority::High, 8)).unwrap();
        q.push(4, meta(Priority::Normal, 8)).unwrap();
        q.push(5, meta(Priority::High, 8)).unwrap();
        let order: Vec<i32> = (0..5).flat_map(|_| ids(&q.next(1, false).unwrap())).collect();
        assert_eq!(order, vec![3, 5, 2, 4, 1]);
    }

    #[test]
    fn starved_requests_overtake_priorities() {
        let mut p = policy();
        p.starvation_bound = Duration::from_millis(30);
        let q = BatchQueue::new(16, p);
        q.push(1, meta(Priority::Low, 8)).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        q.push(2, meta(Priority::High, 8)).unwrap();
        assert_eq!(ids(&q.next(1, false).unwrap()), vec![1]);
        assert_eq!(ids(&q.next(1, false).unwrap()), vec![2]);
    }

    #[test]
    fn expired_requests_come_back_unrun() {
        let q = BatchQueue::new(16, policy());
        let mut m = meta(Priority::Normal, 8);
        m.deadline = Some(Instant::now() + Duration::from_millis(5));
        q.push(1, m).unwrap();
        q.push(2, meta(Priority::Normal, 200)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let next = q.next(4, true).unwrap();
        assert!(next.run.is_empty());
        assert_eq!(next.expired.iter().map(|e| e.item).collect::<Vec<_>>(), vec![1]);
        assert_eq!(ids(&q.next(4, true).unwrap()), vec![2]);
    }

    #[test]
    fn a_batch_holds_one_length_bucket() {
        let q = BatchQueue::new(16, policy());
        q.push(1, meta(Priority::Normal, 10)).unwrap();
        q.push(2, meta(Priority::Normal, 100)).unwrap();
        q.push(3, meta(Priority::Normal, 12)).unwrap();
        q.push(4, meta(Priority::Normal, 120)).unwrap();
        assert_eq!(ids(&q.next(4, true).unwrap()), vec![1, 3]);
        assert_eq!(ids(&q.next(4, true).unwrap()), vec![2, 4]);
    }

    #[test]
    fn waits_for_the_delay_unless_full() {
        let q = BatchQueue::new(16, policy());
        q.push(1, meta(Priority::Normal, 8)).unwrap();
        let start = Instant::now();
        assert_eq!(ids(&q.next(4, true).unwrap()), vec![1]);
        assert!(
            start.elapsed() >= Duration::from_millis(15),
            "left before max_delay"
        );
        for i in 0..4 {
            q.push(i, meta(Priority::Normal, 8)).unwrap();
        }
        let start = Instant::now();
        assert_eq!(q.next(4, true).unwrap().run.len(), 4);
        assert!(start.elapsed() < Duration::from_millis(15), "a full batch waited");
    }

    #[test]
    fn adaptive_waits_for_the_callers_of_the_last_batches() {
        let mut p = policy();
        p.adaptive = true;
        let q = BatchQueue::new(16, p);
        // Nothing ran yet: a lone request leaves at once.
        q.push(0, meta(Priority::Normal, 8)).unwrap();
        let start = Instant::now();
        assert_eq!(ids(&q.next(4, true).unwrap()), vec![0]);
        assert!(
            start.elapsed() < Duration::from_millis(15),
            "a lone caller waited"
        );
        // Three came together (queued while the worker was busy): the next batch waits for three.
        for i in 1..4 {
            q.push(i, meta(Priority::Normal, 8)).unwrap();
        }
        assert_eq!(q.next(4, true).unwrap().run.len(), 3);
        for i in 4..6 {
            q.push(i, meta(Priority::Normal, 8)).unwrap();
        }
        let start = Instant::now();
        assert_eq!(q.next(4, true).unwrap().run.len(), 2);
        assert!(
            start.elapsed() >= Duration::from_millis(15),
            "left before the third caller or max_delay"
        );
        // Three callers were seen within the last RECENT batches: two still wait for a third
        // until three batches have held two; then two leave at once.
        let mut next_item = 6;
        for round in 0..RECENT {
            for _ in 0..2 {
                q.push(next_item, meta(Priority::Normal, 8)).unwrap();
                next_item += 1;
            }
            let start = Instant::now();
            assert_eq!(q.next(4, true).unwrap().run.len(), 2);
            let waited = start.elapsed() >= Duration::from_millis(15);
            assert_eq!(waited, round < RECENT - 1, "round {round}");
        }
    }

    #[test]
    fn preferred_sizes_cut_an_overdue_batch() {
        let mut p = policy();
        p.max_batch = 16;
        p.preferred = vec![2, 4];
        let q = BatchQueue::new(16, p);
        for i in 0..3 {
            q.push(i, meta(Priority::Normal, 8)).unwrap();
        }
        assert_eq!(q.next(16, true).unwrap().run.len(), 2);
        for i in 0..5 {
            q.push(i, meta(Priority::Normal, 8)).unwrap();
        }
        // 6 queued, the largest preferred size (4) is reached: sent at once.
        assert_eq!(q.next(16, true).unwrap().run.len(), 4);
    }

    #[test]
    fn close_lets_workers_drain_then_stop() {
        let q = Arc::new(BatchQueue::new(16, policy()));
        q.push(1, meta(Priority::Normal, 8)).unwrap();
        q.close();
        assert_eq!(
            q.push(2, meta(Priority::Normal, 8)).unwrap_err().0,
            PushError::Closed
        );
        // Closed: no waiting for the batch to fill.
        let start = Instant::now();
        assert_eq!(ids(&q.next(4, true).unwrap()), vec![1]);
        assert!(start.elapsed() < Duration::from_millis(15));
        assert!(q.next(4, true).is_none());
        // A worker blocked on an empty queue is woken by close.
        let q = Arc::new(BatchQueue::<u32>::new(16, policy()));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.next(4, true).is_none())
        };
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert!(worker.join().unwrap());
    }

    #[test]
    fn remove_takes_back_only_queued_requests() {
        let q = BatchQueue::new(16, policy());
        let a = q.push(1, meta(Priority::Normal, 8)).unwrap();
        let b = q.push(2, meta(Priority::Normal, 8)).unwrap();
        assert_eq!(q.remove(a), Some(1));
        assert_eq!(q.remove(a), None);
        assert_eq!(ids(&q.next(4, false).unwrap()), vec![2]);
        assert_eq!(q.remove(b), None);
    }

    #[test]
    fn many_producers_nothing_lost() {
        let q = Arc::new(BatchQueue::new(64, policy()));
        let producers: Vec<_> = (0..8)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut refused = 0;
                    for i in 0..200 {
                        loop {
                            match q.push(t * 1000 + i, meta(Priority::Normal, 8)) {
                                Ok(_) => break,
                                Err((PushError::Full, _)) => {
                                    refused += 1;
                                    std::thread::yield_now();
                                }
                                Err((PushError::Closed, _)) => unreachable!(),
                            }
                        }
                    }
                    refused
                })
            })
            .collect();
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(next) = q.next(4, true) {
                    got.extend(next.run.into_iter().map(|e| e.item));
                }
                got
            })
        };
        for p in producers {
            p.join().unwrap();
        }
        q.close();
        let mut got = consumer.join().unwrap();
        got.sort();
        let mut want: Vec<i32> = (0..8).flat_map(|t| (0..200).map(move |i| t * 1000 + i)).collect();
        want.sort();
        assert_eq!(got, want);
    }
}

/// The queue under loom's model checker: every interleaving of a few threads, for lost
/// wake-ups, lost or doubled requests and stuck workers. The keel-loom crate (`runtime/loom`)
/// compiles this file with `cfg(loom)`, which swaps the `Mutex`/`Condvar` for loom's models;
/// `cargo test --workspace` runs it. Timing is out of the model: `max_delay` is zero (a batch is
/// ready as soon as anything is queued) and no request has a deadline, so every wait is one that
/// only a notification may end.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn queue(capacity: usize) -> Arc<BatchQueue<u32>> {
        let policy = Policy {
            max_batch: 4,
            max_delay: Duration::ZERO,
            preferred: Vec::new(),
            starvation_bound: Duration::from_secs(3600),
            buckets: true,
            adaptive: false,
        };
        Arc::new(BatchQueue::new(capacity, policy))
    }

    fn meta() -> Meta {
        Meta {
            priority: Priority::Normal,
            deadline: None,
            enqueued: Instant::now(),
            tokens: 8,
            items: 1,
        }
    }

    /// A worker blocked on an empty queue is woken by a push, whatever the order.
    #[test]
    fn loom_a_push_always_wakes_a_blocked_worker() {
        loom::model(|| {
            let q = queue(4);
            let producer = {
                let q = q.clone();
                thread::spawn(move || q.push(7, meta()).is_ok())
            };
            let next = q.next(4, true).expect("open queue");
            assert!(producer.join().unwrap());
            let got: Vec<u32> = next.run.iter().map(|e| e.item).collect();
            assert_eq!(got, vec![7]);
        });
    }

    /// Two producers against a queue of one and a worker draining it until close: every
    /// request is either refused at once (and handed back) or run exactly once.
    #[test]
    fn loom_nothing_lost_or_doubled_under_overload_and_close() {
        loom::model(|| {
            let q = queue(1);
            let producers: Vec<_> = [1u32, 2]
                .into_iter()
                .map(|item| {
                    let q = q.clone();
                    thread::spawn(move || match q.push(item, meta()) {
                        Ok(_) => Some(item),
                        Err((PushError::Full, back)) => {
                            assert_eq!(back, item);
                            None
                        }
                        Err((PushError::Closed, _)) => unreachable!("closed after the joins"),
                    })
                })
                .collect();
            let worker = {
                let q = q.clone();
                thread::spawn(move || {
                    let mut ran = Vec::new();
                    while let Some(next) = q.next(4, true) {
                        assert!(next.expired.is_empty());
                        ran.extend(next.run.into_iter().map(|e| e.item));
                    }
                    ran
                })
            };
            let mut accepted: Vec<u32> = producers.into_iter().filter_map(|p| p.join().unwrap()).collect();
            assert!(!accepted.is_empty(), "an empty queue of one refused a request");
            q.close();
            let mut ran = worker.join().unwrap();
            accepted.sort();
            ran.sort();
            assert_eq!(ran, accepted);
        });
    }

    /// A caller withdrawing its request races a worker taking it: exactly one of them gets it.
    #[test]
    fn loom_withdraw_and_take_never_both_or_neither() {
        loom::model(|| {
            let q = queue(4);
            let id = q.push(3, meta()).unwrap();
            let caller = {
                let q = q.clone();
                thread::spawn(move || q.remove(id))
            };
            let taken = q.next(4, false).expect("open queue").run.len();
            let withdrawn = caller.join().unwrap();
            assert_eq!(taken + usize::from(withdrawn.is_some()), 1);
            assert_eq!(q.len(), 0);
        });
    }

    /// Close wakes a worker blocked on an empty queue, which then stops.
    #[test]
    fn loom_close_wakes_a_blocked_worker() {
        loom::model(|| {
            let q = queue(4);
            let worker = {
                let q = q.clone();
                thread::spawn(move || q.next(4, true).is_none())
            };
            q.close();
            assert!(worker.join().unwrap());
        });
    }
}
