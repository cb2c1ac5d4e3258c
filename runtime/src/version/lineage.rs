//! Lineage: one record per prediction (what answered, from which files, with what input and
//! output, routed how and why), written by a background thread in batched transactions.

use super::{Error, Result};
use crate::store::{LineageRow, Retention, Store};
use crate::{GenerateParams, Input, Output, Sampling, Timings, Turn, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Everything known of one prediction. Serialized as one JSON object (`keel lineage show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageRecord {
    /// The request id.
    pub request_id: String,
    /// When it was answered (milliseconds since the Unix epoch).
    pub time: i64,
    /// The caller's routing key.
    pub key: Option<String>,
    /// The model name.
    pub model: String,
    /// The model as the caller addressed it (`NAME`, `NAME@ALIAS`, a version id).
    pub addressed: String,
    /// The version id that answered.
    pub version: String,
    /// Its weight path ("quantized", "f32", "int8").
    pub weights: String,
    /// Every file of the version and its sha256.
    pub files: BTreeMap<String, String>,
    /// The sha256 of the version's manifest (the version id is derived from it).
    pub manifest_hash: String,
    /// The Keel that ran it.
    pub keel_version: String,
    /// The backend ("cpu", "wgpu", "cuda").
    pub backend: String,
    /// The batch (or first decoder step) it ran in; None if the response cache answered.
    pub batch_id: Option<u64>,
    /// Whether the response cache answered.
    pub cache_hit: bool,
    /// `production`, `canary`, `shadow`, an alias the caller named, or `direct` (a version id).
    pub route: String,
    /// Why it was routed there.
    pub route_reason: String,
    /// For a shadow run: the request it copied.
    pub shadow_of: Option<String>,
    /// For a shadow run: its divergence from the answer that was returned (1 - cosine, or the
    /// share of differing tokens).
    pub divergence: Option<f64>,
    /// The sha256 of the input (its canonical JSON).
    pub input_hash: String,
    /// The input itself, when retention is on (for replay).
    pub input: Option<RecordedInput>,
    /// What came out.
    pub output: OutputSummary,
    /// Time per stage, in microseconds.
    pub timings_us: StageTimes,
    /// Filled by the contracts module.
    pub contract: Option<serde_json::Value>,
    /// Filled by the review module.
    pub review: Option<serde_json::Value>,
    /// Filled by the cost module.
    pub cost: Option<serde_json::Value>,
    /// What the other layers noted (the drift state, a cascade's or a degradation's route), by
    /// key. (Records written before notes were typed hold their `annotations` here.)
    #[serde(default, alias = "annotations")]
    pub notes: serde_json::Map<String, serde_json::Value>,
}

/// Time per stage, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimes {
    /// Tokenizing.
    pub prepare: u64,
    /// Queued.
    pub queue: u64,
    /// Forward passes.
    pub forward: u64,
    /// Post-processing.
    pub post: u64,
    /// In all, routing and lineage included.
    pub total: u64,
}

impl StageTimes {
    pub(crate) fn of(t: &Timings, total: Duration) -> Self {
        let us = |d: Duration| d.as_micros() as u64;
        Self {
            prepare: us(t.prepare),
            queue: us(t.queue),
            forward: us(t.forward),
            post: us(t.post),
            total: us(total),
        }
    }
}

/// A request's input as recorded, enough to run it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum RecordedInput {
    /// Texts to embed.
    Embed {
        /// The texts.
        texts: Vec<String>,
    },
    /// Rows to classify.
    Classify {
        /// The rows, each field's value as JSON.
        rows: Vec<BTreeMap<String, serde_json::Value>>,
    },
    /// A prompt to generate from.
    Generate {
        /// The prompt.
        prompt: String,
        /// Most new tokens.
        max_tokens: usize,
        /// Whether the chat template wrapped it.
        chat: bool,
        /// The system turn.
        system: Option<String>,
        /// Seeded sampling (None: greedy).
        sampling: Option<RecordedSampling>,
        /// Stop texts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stop: Vec<String>,
        /// The conversation before the prompt.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        history: Vec<Turn>,
    },
}

/// Seeded sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecordedSampling {
    /// Temperature.
    pub temperature: f32,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Top-p (1: off).
    pub top_p: f32,
    /// Seed.
    pub seed: u64,
}

impl RecordedInput {
    /// The record of an input.
    pub fn of(input: &Input) -> Self {
        match input {
            Input::Embed(texts) => RecordedInput::Embed { texts: texts.clone() },
            Input::Classify(rows) => RecordedInput::Classify {
                rows: rows
                    .iter()
                    .map(|row| row.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
                    .collect(),
            },
            Input::Generate { prompt, params } => RecordedInput::Generate {
                prompt: prompt.clone(),
                max_tokens: params.max_tokens,
                chat: params.chat,
                system: params.system.clone(),
                stop: params.stop.clone(),
                history: params.history.clone(),
                sampling: match params.sampling {
                    Sampling::Greedy => None,
                    Sampling::Random {
                        temperature,
                        top_k,
                        top_p,
                        seed,
                    } => Some(RecordedSampling {
                        temperature,
                        top_k,
                        top_p,
                        seed,
                    }),
                },
            },
        }
    }

    /// The input to run again.
    pub fn to_input(&self) -> Input {
        match self {
            RecordedInput::Embed { texts } => Input::Embed(texts.clone()),
            RecordedInput::Classify { rows } => Input::Classify(
                rows.iter()
                    .map(|row| {
                        row.iter()
                            .map(|(k, v)| (k.clone(), Value::from_json(v).unwrap_or(Value::Null)))
                            .collect()
                    })
                    .collect(),
            ),
            RecordedInput::Generate {
                prompt,
                max_tokens,
                chat,
                system,
                sampling,
                stop,
                history,
            } => {
                let mut params = match sampling {
                    None => GenerateParams::greedy(),
                    Some(s) => GenerateParams::sampled(s.temperature, s.top_k, s.top_p, s.seed),
                };
                params.max_tokens = *max_tokens;
                params.chat = *chat;
                params.system = system.clone();
                params.stop = stop.clone();
                params.history = history.clone();
                Input::Generate {
                    prompt: prompt.clone(),
                    params,
                }
            }
        }
    }

    /// The sha256 of the input's canonical JSON.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(serde_json::to_vec(self).unwrap_or_default()))
    }

    /// [`RecordedInput::hash`] of the record of `input`, without making the record: the same
    /// JSON is written straight into the hash (a tabular row's fields are not copied).
    pub fn hash_of(input: &Input) -> String {
        // Written whole, then hashed once: many small updates of the hash cost more.
        let json = match input {
            Input::Classify(rows) => serde_json::to_vec(&RowsView(rows)),
            other => serde_json::to_vec(&RecordedInput::of(other)),
        };
        match json {
            Ok(json) => hex(&Sha256::digest(json)),
            Err(_) => RecordedInput::of(input).hash(),
        }
    }
}

/// A tabular input serialized as its [`RecordedInput::Classify`] record is, borrowing the rows.
struct RowsView<'a>(&'a [crate::Record]);

impl Serialize for RowsView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Row<'a>(&'a crate::Record);
        impl Serialize for Row<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(k, v)| (k, v.to_json())))
            }
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("task", "classify")?;
        m.serialize_entry("rows", &self.0.iter().map(Row).collect::<Vec<_>>())?;
        m.end()
    }
}

/// A summary of an output: enough to tell whether a replay gave the same answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum OutputSummary {
    /// Embeddings.
    Embed {
        /// How many vectors.
        count: usize,
        /// Their dimension.
        dim: usize,
        /// Each vector's L2 norm.
        norms: Vec<f32>,
        /// The sha256 of every vector's f32 values (little-endian), in order.
        hash: String,
    },
    /// Classes.
    Classify {
        /// Each row's class.
        classes: Vec<String>,
        /// Each row's probabilities, in the order of the model's labels.
        probabilities: Vec<Vec<f32>>,
    },
    /// A generation.
    Generate {
        /// Tokens in the prompt (after the chat template).
        prompt_tokens: usize,
        /// The generated token ids.
        token_ids: Vec<u32>,
        /// Why it ended: "stop", "length", "context_full", "cancelled".
        finish_reason: String,
    },
}

impl OutputSummary {
    /// The summary of an output.
    pub fn of(output: &Output) -> Self {
        match output {
            Output::Embeddings(vectors) => {
                let mut h = Sha256::new();
                for v in vectors {
                    for x in v {
                        h.update(x.to_le_bytes());
                    }
                }
                OutputSummary::Embed {
                    count: vectors.len(),
                    dim: vectors.first().map_or(0, Vec::len),
                    norms: vectors
                        .iter()
                        .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt())
                        .collect(),
                    hash: hex(&h.finalize()),
                }
            }
            Output::Classes(classes) => OutputSummary::Classify {
                classes: classes.iter().map(|c| c.label.clone()).collect(),
                probabilities: classes.iter().map(|c| c.probabilities.clone()).collect(),
            },
            Output::Completion(c) => OutputSummary::Generate {
                prompt_tokens: c.prompt_ids.len(),
                token_ids: c.token_ids.clone(),
                finish_reason: c.finish.as_str().to_string(),
            },
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the lineage writer does when its buffer is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overflow {
    /// The request waits for room (back-pressure): no record is ever dropped. The default.
    #[default]
    Block,
    /// The record is dropped and counted ([`LineageStats::dropped`]): requests never wait.
    Drop,
}

/// Counters of the lineage writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineageStats {
    /// Records committed to the store.
    pub written: u64,
    /// Records dropped because the buffer was full ([`Overflow::Drop`]).
    pub dropped: u64,
    /// Records lost because the store failed to write them (each failure is also returned by the
    /// next [`super::Versioned::flush`]).
    pub failed: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Records pruned by retention.
    pub pruned: u64,
}

/// A record to write, made on the writer's thread: what a request's thread hands over is moved
/// (its input, a copy of the output, the notes), and the hashing and JSON happen off the request
/// path.
pub(crate) type Pending = Box<dyn FnOnce() -> LineageRow + Send>;

/// Answered with None once what it waits for is committed, or with why it was not.
type Done = SyncSender<Option<String>>;

enum Msg {
    /// A record, and who waits for its commit (a durable writer's request).
    Record(Pending, Option<Done>),
    /// Answered once everything sent before it is committed.
    Flush(Done),
}

/// A record's commit, waited for by the request that made it (a durable writer's).
pub(crate) struct Commit(Receiver<Option<String>>);

impl Commit {
    /// Waits until the record is committed.
    ///
    /// # Errors
    /// The store failed to write it (or the writer stopped): the record is lost.
    pub fn wait(self) -> Result<()> {
        match self.0.recv() {
            Ok(None) => Ok(()),
            Ok(Some(failure)) => Err(lost(&failure)),
            Err(_) => Err(lost("the lineage writer stopped")),
        }
    }
}

fn lost(failure: &str) -> Error {
    Error::Store(crate::store::Error::Database {
        path: "lineage".into(),
        reason: format!("lineage records were lost: {failure}"),
    })
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    transactions: AtomicU64,
    pruned: AtomicU64,
}

/// The background writer: a bounded buffer and one thread committing batches.
pub(crate) struct Writer {
    tx: Mutex<Option<SyncSender<Msg>>>,
    overflow: Overflow,
    /// Each record's request waits for its commit (a store that hosts share: a host may die at
    /// any moment, and an answer must not outlive its record).
    durable: bool,
    counters: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Most records in one transaction.
const BATCH: usize = 512;

impl Writer {
    pub fn start(
        store: Arc<dyn Store>,
        capacity: usize,
        overflow: Overflow,
        retention: Retention,
        prune_every: Duration,
    ) -> Result<Self> {
        let durable = store.is_shared();
        let (tx, rx) = sync_channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread = {
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("keel-lineage".into())
                .spawn(move || write_loop(store.as_ref(), &rx, &counters, retention, prune_every))
                .map_err(|e| {
                    Error::Engine(crate::Error::Internal(format!(
                        "cannot start the lineage writer: {e}"
                    )))
                })?
        };
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            // A durable record is never dropped: its request waits for room.
            overflow: if durable { Overflow::Block } else { overflow },
            durable,
            counters,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn sender(&self) -> Option<SyncSender<Msg>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Hands a record over. A durable writer returns its [`Commit`] to wait for; a record
    /// dropped (a full buffer with [`Overflow::Drop`], or a stopped writer) is counted.
    pub fn submit(&self, row: Pending) -> Option<Commit> {
        let Some(tx) = self.sender() else {
            Counters::bump(&self.counters.dropped);
            return self.durable.then(|| Commit(sync_channel(1).1));
        };
        let (done, commit) = match self.durable {
            true => {
                let (done, wait) = sync_channel(1);
                (Some(done), Some(Commit(wait)))
            }
            false => (None, None),
        };
        let sent = match self.overflow {
            Overflow::Block => tx.send(Msg::Record(row, done)).is_ok(),
            Overflow::Drop => match tx.try_send(Msg::Record(row, done)) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
        };
        if !sent {
            Counters::bump(&self.counters.dropped);
        }
        commit
    }

    /// Waits until every record submitted before the call is committed.
    pub fn flush(&self) -> Result<()> {
        let Some(tx) = self.sender() else {
            return Ok(());
        };
        let (done, wait) = sync_channel(1);
        let gone = || Error::Engine(crate::Error::Internal("the lineage writer stopped".into()));
        tx.send(Msg::Flush(done)).map_err(|_| gone())?;
        match wait.recv().map_err(|_| gone())? {
            None => Ok(()),
            Some(failure) => Err(lost(&failure)),
        }
    }

    pub fn stats(&self) -> LineageStats {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let c = &self.counters;
        LineageStats {
            written: g(&c.written),
            dropped: g(&c.dropped),
            failed: g(&c.failed),
            transactions: g(&c.transactions),
            pruned: g(&c.pruned),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel lets the thread commit what is buffered and return.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

fn write_loop(store: &dyn Store, rx: &Receiver<Msg>, c: &Counters, retention: Retention, every: Duration) {
    let prunes = retention.max_age_ms.is_some() || retention.max_records.is_some();
    let mut last_prune = Instant::now();
    let mut failure: Option<String> = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut waiting: Vec<Done> = Vec::new();
    let mut flushes = Vec::new();
    loop {
        // Without retention the thread sleeps until a record comes; with it, it also wakes to
        // prune on time when no record comes.
        let first = if prunes {
            match rx.recv_timeout(every.saturating_sub(last_prune.elapsed())) {
                Ok(msg) => Some(msg),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(msg) => Some(msg),
                Err(_) => break,
            }
        };
        let mut next = first;
        // Take what is buffered, up to a batch; a flush marker ends the batch.
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(make, done) => {
                    batch.push(make());
                    waiting.extend(done);
                }
                Msg::Flush(done) => {
                    flushes.push(done);
                    break;
                }
            }
            if batch.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            // One transaction for what came in while the last one committed: the requests
            // waiting on their records share it (group commit).
            let outcome = match store.append_lineage(&batch) {
                Ok(()) => {
                    c.written.fetch_add(batch.len() as u64, Relaxed);
                    Counters::bump(&c.transactions);
                    None
                }
                Err(e) => {
                    c.failed.fetch_add(batch.len() as u64, Relaxed);
                    failure = Some(e.to_string());
                    failure.clone()
                }
            };
            for done in waiting.drain(..) {
                let _ = done.send(outcome.clone());
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(failure.take());
        }
        if prunes && last_prune.elapsed() >= every {
            last_prune = Instant::now();
            if let Ok(n) = store.prune_lineage(&retention, crate::store::now_ms()) {
                c.pruned.fetch_add(n, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::VersionId;
    use crate::store::{
        AliasEvent, Feedback, LineageStore, NewTicket, RegistryStore, Result as StoreResult, ReviewStore,
        RouteChange, Routes, Ticket, TicketState, VersionRecord,
    };
    use std::sync::Condvar;

    #[test]
    fn an_input_hashed_without_its_record_has_its_records_hash() {
        let row: crate::Record = [
            ("b radius".to_string(), Value::Number(1.5)),
            ("a site".to_string(), Value::Text("clinic \"a\"".into())),
            ("nan".to_string(), Value::Number(f64::NAN)),
            ("none".to_string(), Value::Null),
            (
                "t".to_string(),
                Value::Tensor {
                    shape: vec![2, 1],
                    values: vec![1.0, -2.5],
                },
            ),
        ]
        .into();
        for input in [
            Input::Classify(vec![row.clone(), crate::Record::new(), row]),
            Input::Embed(vec!["a text".into(), "ünïcode".into()]),
            Input::Generate {
                prompt: "hi".into(),
                params: GenerateParams::sampled(0.7, 40, 0.9, 7).stop_at("."),
            },
        ] {
            assert_eq!(
                RecordedInput::hash_of(&input),
                RecordedInput::of(&input).hash(),
                "{input:?}"
            );
        }
    }

    /// A store whose lineage writes wait at a gate, to fill the writer's buffer.
    #[derive(Default)]
    struct Gated {
        closed: Mutex<bool>,
        open: Condvar,
        rows: Mutex<Vec<LineageRow>>,
        /// A fleet's store: the writer is durable.
        shared: bool,
        /// Appends fail (the database is gone).
        down: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        fn set(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.open.notify_all();
        }
    }

    impl crate::store::BudgetStore for Gated {
        fn set_budget(&self, _: &str, _: i64, _: Option<i64>, _: Option<&str>, _: i64) -> StoreResult<()> {
            Ok(())
        }
        fn budget_rows(&self, _: Option<&str>) -> StoreResult<Vec<crate::store::BudgetRow>> {
            Ok(Vec::new())
        }
        fn reserve_budget(&self, _: &str, _: i64, _: i64) -> StoreResult<crate::store::Reserved> {
            Ok(crate::store::Reserved::NoBudget)
        }
        fn release_budget(&self, _: &str, _: i64, _: i64) -> StoreResult<()> {
            Ok(())
        }
    }

    impl crate::store::KeyStore for Gated {
        fn add_key(&self, _: &crate::store::ApiKey) -> StoreResult<std::result::Result<(), String>> {
            Ok(Ok(()))
        }
        fn keys(&self) -> StoreResult<Vec<crate::store::ApiKey>> {
            Ok(Vec::new())
        }
        fn key_by_hash(&self, _: &str) -> StoreResult<Option<crate::store::ApiKey>> {
            Ok(None)
        }
        fn revoke_key(&self, _: &str, _: i64) -> StoreResult<bool> {
            Ok(false)
        }
    }

    impl Store for Gated {
        fn location(&self) -> String {
            "gated".into()
        }
        fn is_shared(&self) -> bool {
            self.shared
        }
    }

    impl RegistryStore for Gated {
        fn register(&self, _: &VersionRecord) -> StoreResult<bool> {
            Ok(false)
        }
        fn version(&self, _: &str, _: &VersionId) -> StoreResult<Option<VersionRecord>> {
            Ok(None)
        }
        fn versions(&self) -> StoreResult<Vec<VersionRecord>> {
            Ok(Vec::new())
        }
        fn routes(&self, _: &str) -> StoreResult<Routes> {
            Ok(Routes::default())
        }
        fn update_routes(
            &self,
            _: &str,
            _: &mut RouteChange<'_>,
        ) -> StoreResult<std::result::Result<(Routes, Vec<AliasEvent>), String>> {
            Ok(Err("not here".into()))
        }
        fn routes_version(&self) -> StoreResult<i64> {
            Ok(0)
        }
        fn history(&self, _: &str) -> StoreResult<Vec<AliasEvent>> {
            Ok(Vec::new())
        }
    }

    impl LineageStore for Gated {
        fn append_lineage(&self, rows: &[LineageRow]) -> StoreResult<()> {
            let mut closed = self.closed.lock().unwrap();
            while *closed {
                closed = self.open.wait(closed).unwrap();
            }
            if self.down.load(Relaxed) {
                return Err(crate::store::Error::Database {
                    path: "gated".into(),
                    reason: "the server is gone".into(),
                });
            }
            self.rows.lock().unwrap().extend_from_slice(rows);
            Ok(())
        }
        fn lineage(&self, _: &str) -> StoreResult<Option<LineageRow>> {
            Ok(None)
        }
        fn recent_lineage(&self, _: usize) -> StoreResult<Vec<LineageRow>> {
            Ok(Vec::new())
        }
        fn lineage_count(&self) -> StoreResult<u64> {
            Ok(self.rows.lock().unwrap().len() as u64)
        }
        fn prune_lineage(&self, _: &Retention, _: i64) -> StoreResult<u64> {
            Ok(0)
        }
    }

    impl ReviewStore for Gated {
        fn enqueue_review(&self, _: &NewTicket) -> StoreResult<i64> {
            Ok(0)
        }
        fn tickets(&self, _: Option<TicketState>, _: usize, _: i64) -> StoreResult<Vec<Ticket>> {
            Ok(Vec::new())
        }
        fn ticket(&self, _: i64, _: i64) -> StoreResult<Option<Ticket>> {
            Ok(None)
        }
        fn claim_review(&self, _: &str, _: i64, _: i64) -> StoreResult<Option<Ticket>> {
            Ok(None)
        }
        fn resolve_review(
            &self,
            _: i64,
            _: &str,
            _: &str,
            _: Option<&str>,
            _: i64,
        ) -> StoreResult<std::result::Result<Ticket, String>> {
            Ok(Err("not here".into()))
        }
        fn expire_reviews(&self, _: i64, _: i64) -> StoreResult<u64> {
            Ok(0)
        }
        fn add_feedback(&self, _: &Feedback) -> StoreResult<()> {
            Ok(())
        }
        fn feedback(&self) -> StoreResult<Vec<Feedback>> {
            Ok(Vec::new())
        }
    }

    fn row(i: usize) -> LineageRow {
        LineageRow {
            request_id: format!("r{i}"),
            time_ms: i as i64,
            record: "{}".into(),
        }
    }

    fn pending(row: LineageRow) -> Pending {
        Box::new(move || row)
    }

    fn writer(store: &Arc<Gated>, overflow: Overflow) -> Writer {
        let store: Arc<dyn Store> = store.clone();
        Writer::start(store, 4, overflow, Retention::default(), Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn on_a_shared_store_each_request_waits_for_its_records_commit() {
        let store = Arc::new(Gated {
            shared: true,
            ..Gated::default()
        });
        store.set(true);
        // Drop is not honoured: a fleet's record is never dropped.
        let w = Arc::new(writer(&store, Overflow::Drop));
        let waiter = {
            let w = w.clone();
            std::thread::spawn(move || w.submit(pending(row(0))).expect("durable").wait())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the answer went before its record was committed"
        );
        store.set(false);
        waiter.join().unwrap().unwrap();
        assert_eq!(store.rows.lock().unwrap().len(), 1);
        // A record the store cannot write fails its request.
        store.down.store(true, Relaxed);
        let e = w.submit(pending(row(1))).expect("durable").wait().unwrap_err();
        assert!(e.to_string().contains("the server is gone"), "{e}");
        // The embedded store's writer is not durable: nobody waits.
        let local = Arc::new(Gated::default());
        assert!(writer(&local, Overflow::Block).submit(pending(row(2))).is_none());
    }

    #[test]
    fn a_full_buffer_drops_and_counts_or_blocks_but_never_loses_silently() {
        // Drop: with the store stuck, the writer holds one batch and the buffer 4; the rest is
        // dropped and counted, and what was kept is committed once the store moves.
        let store = Arc::new(Gated::default());
        store.set(true);
        let w = writer(&store, Overflow::Drop);
        w.submit(pending(row(0)));
        // The writer has taken it and waits at the store: the buffer holds 4 of the next 19.
        std::thread::sleep(Duration::from_millis(50));
        for i in 1..20 {
            w.submit(pending(row(i)));
        }
        store.set(false);
        w.flush().unwrap();
        let st = w.stats();
        assert_eq!(st.dropped, 15, "{st:?}");
        assert_eq!(st.written + st.dropped, 20, "{st:?}");
        assert_eq!(store.rows.lock().unwrap().len() as u64, st.written);

        // Block: the submitter waits for room; every record is written.
        let store = Arc::new(Gated::default());
        store.set(true);
        let w = Arc::new(writer(&store, Overflow::Block));
        w.submit(pending(row(0)));
        std::thread::sleep(Duration::from_millis(50));
        let sender = {
            let w = w.clone();
            std::thread::spawn(move || (1..20).for_each(|i| drop(w.submit(pending(row(i))))))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !sender.is_finished(),
            "a full buffer did not hold the submitter back"
        );
        store.set(false);
        sender.join().unwrap();
        w.flush().unwrap();
        assert_eq!((w.stats().written, w.stats().dropped), (20, 0));
    }

    #[test]
    fn a_generation_is_recorded_with_all_it_needs_to_run_again() {
        let params = GenerateParams::sampled(0.8, 40, 0.95, 7)
            .max_tokens(12)
            .system_prompt("Be brief.")
            .stop_at("\n\n")
            .after(vec![Turn {
                user: "My name is Ada.".into(),
                assistant: "Hello, Ada!".into(),
            }]);
        let input = Input::Generate {
            prompt: "What is my name?".into(),
            params,
        };
        let recorded = RecordedInput::of(&input);
        let json = serde_json::to_string(&recorded).unwrap();
        let back: RecordedInput = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_input(), input);
        // A record from before histories were kept reads as a conversation's first turn.
        let old =
            r#"{"task":"generate","prompt":"Hi","max_tokens":4,"chat":true,"system":null,"sampling":null}"#;
        let old: RecordedInput = serde_json::from_str(old).unwrap();
        assert!(matches!(old.to_input(), Input::Generate { params, .. } if params.history.is_empty()));
    }
}
