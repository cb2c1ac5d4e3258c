//! [`Observed`]: the layer that watches each request's behaviour.

use super::drift::{DriftConfig, DriftMonitor, State, WindowReport, WindowSize};
use super::metrics::{
    labels_of, Metrics, ModelLabels, RequestLabels, Samples, SignalLabels, StageLabels, Violations,
};
use super::profile::{confidence, Profile, PROFILE_FILE};
use crate::{Engine, Infer, InferRequest, InferResponse, Output, Result, VersionId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A drift callback: the model's name and the report of a window whose state changed.
pub type DriftCallback = Arc<dyn Fn(&str, &WindowReport) + Send + Sync>;

/// The observability layer: per request, outcome counts, time per stage (`contract`, `queue`,
/// `forward`, `post`, `total`), cache hits, confidence, tokens/s; per model version with a
/// reference profile (`profile.json` beside its manifest), drift windows over its inputs and
/// outputs. [`Observed::metrics_text`] exports it all in Prometheus text, with the engine's
/// queue, batch and cache counters read at export.
///
/// Put it above the contract layer (it then counts refusals as outcomes, and sees inputs as
/// they came, before a contract repaired them).
pub struct Observed {
    engine: Engine,
    below: Arc<dyn Infer>,
    metrics: Metrics,
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

impl Observed {
    /// The layer over `below`; versions are looked up in `engine`.
    pub fn new(engine: Engine, below: Arc<dyn Infer>) -> Self {
        Self::build(engine, below, None)
    }

    /// The layer over a contract layer, whose violation tally it exports too.
    #[cfg(feature = "contract")]
    pub fn over_contracts(engine: Engine, contracts: Arc<crate::contract::Contracted>) -> Self {
        let tally = contracts.clone();
        let violations: Violations = Arc::new(move || {
            tally
                .violations()
                .into_iter()
                .map(|v| {
                    (
                        v.field,
                        v.clause.as_str().to_string(),
                        v.action.as_str().to_string(),
                        v.count,
                    )
                })
                .collect()
        });
        Self::build(engine, contracts, Some(violations))
    }

    fn build(engine: Engine, below: Arc<dyn Infer>, violations: Option<Violations>) -> Self {
        Self {
            metrics: Metrics::new(engine.clone(), violations),
            engine,
            below,
            window: None,
            on_drift: None,
            watched: RwLock::default(),
        }
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

    /// Judges the version `model` names against `profile` from now on (a profile from
    /// elsewhere than the `profile.json` beside its manifest), in new windows.
    ///
    /// # Errors
    /// An unknown model.
    pub fn set_profile(&self, model: &str, profile: Profile) -> Result<()> {
        let id = self.engine.version_of(model)?;
        let w = self.watch(model)?;
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
            .insert(id, replaced);
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

    /// Everything observed, in Prometheus (OpenMetrics) text format.
    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// Adds figures of another layer to the export (read at each export): for instance
    /// `Costed::samples` and `Reviewed::samples`.
    pub fn add_samples(&self, source: Samples) {
        self.metrics
            .sources
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(source);
    }

    /// The drift monitor of the version `model` names (None: it has no profile).
    ///
    /// # Errors
    /// An unknown model.
    pub fn drift(&self, model: &str) -> Result<Option<DriftState>> {
        let w = self.watch(model)?;
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
                    self.publish(&w.labels, &r);
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<VersionId, Arc<Watched>>> {
        self.watched.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching the version `model` names now, so that [`Observed::observe`] can
    /// record its requests by version id after the engine has let go of it (a stream's
    /// version may be unloaded when it ends).
    ///
    /// # Errors
    /// An unknown model; a profile that cannot be read.
    pub fn watch_model(&self, model: &str) -> Result<()> {
        self.watch(model).map(drop)
    }

    fn watch(&self, model: &str) -> Result<Arc<Watched>> {
        if let Some(w) = VersionId::parse(model).and_then(|id| self.read().get(&id).cloned()) {
            return Ok(w);
        }
        let id = self.engine.version_of(model)?;
        if let Some(w) = self.read().get(&id) {
            return Ok(w.clone());
        }
        let info = self.engine.info(id.as_str())?;
        let labels = labels_of(&info.manifest.name, id.as_str());
        let profile_path = info.folder.join(PROFILE_FILE);
        let drift = match profile_path.is_file() {
            true => {
                let profile = Profile::read(&profile_path).map_err(|reason| crate::Error::Manifest {
                    path: profile_path.clone(),
                    reason,
                })?;
                let size = self.window.unwrap_or(WindowSize::Count(profile.window));
                Some(self.monitor(&info.manifest.name, profile, size))
            }
            false => None,
        };
        let f = &self.metrics.families;
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
        let ok = f
            .requests
            .get_or_create(&RequestLabels {
                model: labels.model.clone(),
                version: labels.version.clone(),
                task: task.into(),
                outcome: "ok".into(),
            })
            .clone();
        let watched = Arc::new(Watched {
            task,
            ok,
            stages: STAGES.map(stage),
            confidence: f.confidence.get_or_create(&labels).clone(),
            labels,
            drift,
        });
        let mut map = self.watched.write().unwrap_or_else(|p| p.into_inner());
        Ok(map.entry(id).or_insert(watched).clone())
    }

    fn outcome(&self, w: &Watched, task: &str, outcome: &str) -> Counter {
        self.metrics
            .families
            .requests
            .get_or_create(&RequestLabels {
                model: w.labels.model.clone(),
                version: w.labels.version.clone(),
                task: task.into(),
                outcome: outcome.into(),
            })
            .clone()
    }

    fn publish(&self, labels: &ModelLabels, report: &WindowReport) {
        let f = &self.metrics.families;
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

    fn record(&self, w: &Watched, answer: &InferResponse) {
        let meta = &answer.meta;
        let t = &meta.timings;
        let contract_us = meta
            .annotations
            .get("contract_us")
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(us) = contract_us {
            w.stages[0].observe(us * 1e-6);
        }
        for (h, d) in w.stages[1..].iter().zip([t.queue, t.forward, t.post, t.total]) {
            h.observe(d.as_secs_f64());
        }
        if meta.cache_hit {
            self.metrics.families.cache_hits.get_or_create(&w.labels).inc();
        }
        match &answer.output {
            Output::Classes(classes) => {
                for c in classes {
                    w.confidence.observe(confidence(c)[0].1);
                }
            }
            Output::Completion(c) if !t.forward.is_zero() => {
                let rate = c.token_ids.len() as f64 / t.forward.as_secs_f64();
                self.metrics
                    .families
                    .tokens_per_second
                    .get_or_create(&w.labels)
                    .observe(rate);
            }
            _ => {}
        }
    }
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

impl Observed {
    /// Watches a request answered elsewhere than through this layer (a streamed generation,
    /// which goes to the engine directly): its input, its answer or error, as
    /// [`Infer::infer`] would have.
    ///
    /// # Errors
    /// An unknown model.
    pub fn observe(
        &self,
        model: &str,
        input: &crate::Input,
        answer: std::result::Result<&InferResponse, &crate::Error>,
    ) -> Result<()> {
        let w = self.watch(model)?;
        if let Some(d) = &w.drift {
            d.observe_input(input);
        }
        self.conclude(&w, input.task(), answer);
        Ok(())
    }

    fn conclude(&self, w: &Watched, task: &str, answer: std::result::Result<&InferResponse, &crate::Error>) {
        let a = match answer {
            Ok(a) => a,
            Err(e) => {
                self.outcome(w, task, error_class(e)).inc();
                return;
            }
        };
        self.record(w, a);
        if task == w.task {
            w.ok.inc();
        } else {
            self.outcome(w, task, "ok").inc();
        }
        if let Some(d) = &w.drift {
            let before = d.windows();
            d.observe_output(&a.output);
            if d.windows() != before {
                if let Some(r) = d.last() {
                    self.publish(&w.labels, &r);
                }
            }
        }
    }
}

impl Infer for Observed {
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
        let w = self.watch(&request.model)?;
        let task = request.input.task();
        if let Some(d) = &w.drift {
            d.observe_input(&request.input);
        }
        let mut answer = self.below.infer(request);
        if let Ok(a) = &answer {
            let t = &a.meta.timings;
            span.record("queue_us", t.queue.as_micros() as u64);
            span.record("forward_us", t.forward.as_micros() as u64);
            span.record("post_us", t.post.as_micros() as u64);
            span.record("total_us", t.total.as_micros() as u64);
        }
        self.conclude(&w, task, answer.as_ref());
        // The drift state rides on the answer (the review policy and the lineage read it).
        if let (Ok(a), Some(d)) = (&mut answer, &w.drift) {
            a.meta
                .annotations
                .insert("drift".into(), d.state().as_str().into());
        }
        answer
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
