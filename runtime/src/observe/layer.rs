//! [`Observed`]: the layer that watches each request's behaviour.

use super::drift::{DriftConfig, DriftMonitor, State, WindowReport, WindowSize};
use super::metrics::{
    labels_of, Families, FinishLabels, MetricsBuilder, ModelLabels, RequestLabels, SignalLabels, StageLabels,
};
use super::profile::{confidence, Profile, PROFILE_FILE};
use crate::{
    Generating, Infer, InferRequest, InferResponse, InferStream, Note, Output, Result, Step, Target,
    VersionId,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// A drift callback: the model's name and the report of a window whose state changed.
pub type DriftCallback = Arc<dyn Fn(&str, &WindowReport) + Send + Sync>;

/// The observability layer: per request, outcome counts, time per stage (`contract`, `queue`,
/// `forward`, `post`, `total`), cache hits, confidence; per generation, the time to its first
/// token and between tokens, tokens/s, tokens generated, its length and finish reason; per
/// model version with a reference profile (`profile.json` beside its manifest), drift windows
/// over its inputs and outputs (a generation's length among them), whose state is noted on
/// each answer. Its families are registered in the stack's one registry
/// ([`crate::stack::Stack::metrics_text`]).
///
/// Put it above the contract layer (it then counts refusals as outcomes, and sees inputs as
/// they came, before a contract repaired them).
pub struct Observed {
    below: Arc<dyn Infer>,
    families: Arc<Families>,
    window: Option<WindowSize>,
    on_drift: Option<DriftCallback>,
    watched: RwLock<HashMap<VersionId, Arc<Watched>>>,
}

/// What is kept per version: its labels, the handles that every request updates, its monitor.
struct Watched {
    labels: ModelLabels,
    /// The version's task, and its count of successes.
    task: &'static str,
    ok: Counter,
    stages: [Histogram; 5],
    confidence: Histogram,
    drift: Option<DriftMonitor>,
}

const STAGES: [&str; 5] = ["contract", "queue", "forward", "post", "total"];

/// The drift state of the answering version when it answered: noted on the answer (the review
/// policy's `drift` signal reads it; lineage keeps it).
impl Note for State {
    fn key(&self) -> &'static str {
        "drift"
    }

    fn to_json(&self) -> serde_json::Value {
        self.as_str().into()
    }
}

impl Observed {
    /// The layer over `below`.
    pub fn new(below: Arc<dyn Infer>) -> Self {
        Self {
            below,
            families: Arc::new(Families::new()),
            window: None,
            on_drift: None,
            watched: RwLock::default(),
        }
    }

    /// Registers the layer's families in the stack's metrics.
    pub fn register(&self, metrics: &mut MetricsBuilder) {
        self.families.register(metrics.registry());
    }

    /// Drift windows of this size, whatever the profiles say.
    pub fn window(mut self, size: WindowSize) -> Self {
        self.window = Some(size);
        self
    }

    /// Calls `f` whenever a model's drift state changes.
    pub fn on_drift_change(mut self, f: impl Fn(&str, &WindowReport) + Send + Sync + 'static) -> Self {
        self.on_drift = Some(Arc::new(f));
        self
    }

    /// Judges `target`'s version (`Stack::target(model)` resolves a model as a request would)
    /// against `profile` from now on (a profile from elsewhere than the `profile.json` beside
    /// its manifest), in new windows.
    ///
    /// # Errors
    /// A `profile.json` beside the manifest that cannot be read.
    pub fn set_profile(&self, target: &Target, profile: Profile) -> Result<()> {
        let w = self.watch(target)?;
        let size = self.window.unwrap_or(WindowSize::Count(profile.window));
        let monitor = self.monitor(&w.labels.model, profile, size);
        let replaced = Arc::new(Watched {
            labels: w.labels.clone(),
            task: w.task,
            ok: w.ok.clone(),
            stages: w.stages.clone(),
            confidence: w.confidence.clone(),
            drift: Some(monitor),
        });
        self.watched
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.version.id().clone(), replaced);
        Ok(())
    }

    fn monitor(&self, name: &str, profile: Profile, size: WindowSize) -> DriftMonitor {
        let config = DriftConfig {
            window: size,
            ..DriftConfig::count(1)
        };
        let monitor = DriftMonitor::new(Arc::new(profile), config);
        match &self.on_drift {
            Some(f) => {
                let (f, name) = (f.clone(), name.to_string());
                monitor.on_change(move |r| f(&name, r))
            }
            None => monitor,
        }
    }

    /// The drift state of `target`'s version (None: it has no profile).
    ///
    /// # Errors
    /// A profile that cannot be read.
    pub fn drift(&self, target: &Target) -> Result<Option<DriftState>> {
        let w = self.watch(target)?;
        Ok(w.drift.as_ref().map(|d| DriftState {
            state: d.state(),
            last: d.last(),
            reports: d.reports(),
        }))
    }

    /// Ends every version's current drift window now (for a finite data set: its last, partial
    /// window).
    pub fn close_windows(&self) {
        let watched: Vec<_> = self.read().values().cloned().collect();
        for w in watched {
            if let Some(d) = &w.drift {
                if let Some(r) = d.close_window() {
                    publish(&self.families, &w.labels, &r);
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<VersionId, Arc<Watched>>> {
        self.watched.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The handles and monitor of a version, made at its first request.
    fn watch(&self, target: &Target) -> Result<Arc<Watched>> {
        let info = target.version.info();
        if let Some(w) = self.read().get(&info.id) {
            return Ok(w.clone());
        }
        let labels = labels_of(&target.name, info.id.as_str());
        let profile_path = info.folder.join(PROFILE_FILE);
        let drift = match profile_path.is_file() {
            true => {
                let profile = Profile::read(&profile_path).map_err(|reason| crate::Error::Manifest {
                    path: profile_path.clone(),
                    reason,
                })?;
                let size = self.window.unwrap_or(WindowSize::Count(profile.window));
                Some(self.monitor(&target.name, profile, size))
            }
            false => None,
        };
        let f = &self.families;
        let stage = |s: &str| {
            f.stages
                .get_or_create(&StageLabels {
                    model: labels.model.clone(),
                    version: labels.version.clone(),
                    stage: s.into(),
                })
                .clone()
        };
        let task = match info.manifest.architecture {
            crate::Architecture::Bert => "embed",
            crate::Architecture::Llama => "generate",
            crate::Architecture::Mlp => "classify",
        };
        let ok = outcome(f, &labels, task, "ok");
        let watched = Arc::new(Watched {
            task,
            ok,
            stages: STAGES.map(stage),
            confidence: f.confidence.get_or_create(&labels).clone(),
            labels,
            drift,
        });
        let mut map = self.watched.write().unwrap_or_else(|p| p.into_inner());
        Ok(map.entry(info.id.clone()).or_insert(watched).clone())
    }

    /// The request's version watched, its input counted, its span opened.
    fn start(&self, request: &InferRequest) -> Result<Arc<Watched>> {
        let w = self.watch(request.target()?)?;
        if let Some(d) = &w.drift {
            d.observe_input(&request.input);
        }
        Ok(w)
    }
}

fn outcome(f: &Families, labels: &ModelLabels, task: &str, outcome: &str) -> Counter {
    f.requests
        .get_or_create(&RequestLabels {
            model: labels.model.clone(),
            version: labels.version.clone(),
            task: task.into(),
            outcome: outcome.into(),
        })
        .clone()
}

fn publish(f: &Families, labels: &ModelLabels, report: &WindowReport) {
    for (signal, s) in &report.signals {
        f.drift_value
            .get_or_create(&SignalLabels {
                model: labels.model.clone(),
                version: labels.version.clone(),
                signal: signal.clone(),
            })
            .set(s.value);
    }
    f.drift_state.get_or_create(labels).set(match report.state {
        State::Ok => 0,
        State::Warn => 1,
        State::Alarm => 2,
    });
    f.drift_windows
        .get_or_create(&RequestLabels {
            model: labels.model.clone(),
            version: labels.version.clone(),
            task: "drift".into(),
            outcome: report.state.as_str().into(),
        })
        .inc();
}

impl Watched {
    /// Counts an answer (or its error) and notes the drift state on it.
    fn conclude(&self, f: &Families, task: &str, answer: Result<InferResponse>) -> Result<InferResponse> {
        let mut a = answer.map_err(|e| self.refused(f, task, e))?;
        self.record(f, &a);
        let cancelled = a
            .output
            .completion()
            .is_some_and(|c| c.finish == crate::FinishReason::Cancelled);
        match (cancelled, task == self.task) {
            (true, _) => outcome(f, &self.labels, task, "cancelled").inc(),
            (false, true) => self.ok.inc(),
            (false, false) => outcome(f, &self.labels, task, "ok").inc(),
        };
        if let Some(d) = &self.drift {
            if !cancelled {
                let before = d.windows();
                d.observe_output(&a.output);
                if d.windows() != before {
                    if let Some(r) = d.last() {
                        publish(f, &self.labels, &r);
                    }
                }
            }
            a.meta.notes.insert(d.state());
        }
        Ok(a)
    }

    /// Counts a refusal or a failure by its class.
    fn refused(&self, f: &Families, task: &str, e: crate::Error) -> crate::Error {
        outcome(f, &self.labels, task, error_class(&e)).inc();
        e
    }

    fn record(&self, f: &Families, answer: &InferResponse) {
        let meta = &answer.meta;
        let t = &meta.timings;
        if let Some(verdict) = contract_time(meta) {
            self.stages[0].observe(verdict);
        }
        for (h, d) in self.stages[1..].iter().zip([t.queue, t.forward, t.post, t.total]) {
            h.observe(d.as_secs_f64());
        }
        if meta.cache_hit {
            f.cache_hits.get_or_create(&self.labels).inc();
        }
        match &answer.output {
            Output::Classes(classes) => {
                for c in classes {
                    self.confidence.observe(confidence(c)[0].1);
                }
            }
            Output::Completion(c) => {
                if !t.forward.is_zero() {
                    let rate = c.token_ids.len() as f64 / t.forward.as_secs_f64();
                    f.tokens_per_second.get_or_create(&self.labels).observe(rate);
                }
                f.generated
                    .get_or_create(&self.labels)
                    .inc_by(c.token_ids.len() as u64);
                f.finishes
                    .get_or_create(&FinishLabels {
                        model: self.labels.model.clone(),
                        version: self.labels.version.clone(),
                        reason: c.finish.as_str().into(),
                    })
                    .inc();
                if c.finish != crate::FinishReason::Cancelled {
                    f.lengths
                        .get_or_create(&self.labels)
                        .observe(c.token_ids.len() as f64);
                }
            }
            Output::Embeddings(_) => {}
        }
    }
}

/// The contract check's time, in seconds, if a contract judged the request.
#[cfg(feature = "contract")]
fn contract_time(meta: &crate::Meta) -> Option<f64> {
    meta.notes
        .get::<crate::contract::Verdict>()
        .map(|v| v.took.as_secs_f64())
}

#[cfg(not(feature = "contract"))]
fn contract_time(_: &crate::Meta) -> Option<f64> {
    None
}

/// A version's drift state.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DriftState {
    /// The last finished window's state (ok before the first window ends).
    pub state: State,
    /// The last finished window.
    pub last: Option<WindowReport>,
    /// The finished windows kept, newest last.
    pub reports: Vec<WindowReport>,
}

impl Infer for Observed {
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    /// Answers from the layer below, watching the request on the way.
    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        use tracing::field::Empty;
        // The engine's stages become the span's fields (a subscriber sees where the time went).
        let span = tracing::info_span!(
            "keel.observe",
            request_id = %request.id,
            queue_us = Empty,
            forward_us = Empty,
            post_us = Empty,
            total_us = Empty
        );
        let _entered = span.enter();
        let w = self.start(&request)?;
        let task = request.input.task();
        let answer = self.below.infer(request);
        if let Ok(a) = &answer {
            let t = &a.meta.timings;
            span.record("queue_us", t.queue.as_micros() as u64);
            span.record("forward_us", t.forward.as_micros() as u64);
            span.record("post_us", t.post.as_micros() as u64);
            span.record("total_us", t.total.as_micros() as u64);
        }
        w.conclude(&self.families, task, answer)
    }

    /// Streams from the layer below, timing each token: the first from the start, each next
    /// from the one before.
    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        let w = self.start(&request)?;
        let task = request.input.task();
        let started = Instant::now();
        let inner = self
            .below
            .infer_stream(request)
            .map_err(|e| w.refused(&self.families, task, e))?;
        let f = &self.families;
        let watching = Watching {
            first_token: f.first_token.get_or_create(&w.labels).clone(),
            between_tokens: f.between_tokens.get_or_create(&w.labels).clone(),
            families: self.families.clone(),
            watched: w,
            last: None,
            started,
            inner,
        };
        Ok(InferStream::new(watching.inner.meta().clone(), watching))
    }
}

/// A generation as the observability layer watches it.
struct Watching {
    inner: InferStream,
    families: Arc<Families>,
    watched: Arc<Watched>,
    first_token: Histogram,
    between_tokens: Histogram,
    started: Instant,
    /// When the last token came (None: none yet).
    last: Option<Instant>,
}

impl Generating for Watching {
    fn step(&mut self) -> Step {
        match self.inner.step() {
            Step::Token(t) => {
                let now = Instant::now();
                match self.last {
                    None => self.first_token.observe((now - self.started).as_secs_f64()),
                    Some(last) => self.between_tokens.observe((now - last).as_secs_f64()),
                }
                self.last = Some(now);
                Step::Token(t)
            }
            Step::End(answer) => Step::End(self.watched.conclude(&self.families, "generate", answer)),
        }
    }

    fn cancel(self: Box<Self>) -> Result<InferResponse> {
        let partial = self.inner.cancel();
        self.watched.conclude(&self.families, "generate", partial)
    }
}

/// An error's class, as the `outcome` label spells it.
fn error_class(e: &crate::Error) -> &'static str {
    use crate::ErrorKind as K;
    match e.kind() {
        K::InvalidArgument => "invalid_argument",
        K::NotFound => "not_found",
        K::InvalidModel => "invalid_model",
        K::NoDevice => "no_device",
        K::Internal => "internal",
        K::Overloaded => "overloaded",
        K::DeadlineExceeded => "deadline_exceeded",
        K::ShuttingDown => "shutting_down",
        K::Storage => "storage",
        K::Contract => "contract_violation",
        K::Review => "review",
        K::Budget => "budget",
    }
}
