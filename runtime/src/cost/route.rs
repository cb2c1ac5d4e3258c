//! Routing between a cheap and a strong model: a confidence cascade, and degradation under load.
//! Both sit above the version layer: they choose between model names, which it routes.

use crate::{
    Engine, Error, Infer, InferRequest, InferResponse, InferStream, Input, Note, Output, Priority, Replayed,
    Result, Target,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cascade: requests for `name` go to `cheap` first, and to `strong` when the cheap answer is
/// unsure or the input too complex for it (and, with [`Cascade::cache_first`], straight to
/// `strong` when its answer is cached).
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeConfig {
    /// The name callers address.
    pub name: String,
    /// The cheap model (a name the layer below resolves).
    pub cheap: String,
    /// The strong model.
    pub strong: String,
    /// A classification whose least sure row has a top probability below this escalates; a
    /// generation whose tokens' mean probability (the exponential of their mean log-probability)
    /// is below this escalates.
    pub min_confidence: f64,
    /// Inputs longer than this many tokens (estimated as bytes / 4) go to the strong model
    /// directly; None: no limit.
    pub max_cheap_tokens: Option<usize>,
}

/// Where a router sent a request and why: noted on the request, so that the layers below and
/// lineage see it, and on the answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Routed {
    /// `cheap` or `strong`.
    pub route: &'static str,
    /// Why.
    pub reason: String,
    /// A cascade: the cheap answer's confidence, when it escalated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    /// Degradation: the latency the chosen model was expected to give, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_ms: Option<f64>,
    /// Degradation: the `max_tokens` a generation was cut to under load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Which router: "cascade" or "degrade".
    #[serde(skip)]
    pub router: &'static str,
}

impl Note for Routed {
    fn key(&self) -> &'static str {
        "routed"
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["by"] = self.router.into();
        v
    }
}

/// The cascade layer (see [`CascadeConfig`]). Other model names pass through. The answer says
/// how it was routed (a [`Routed`] note). An escalated request's strong call has the id
/// `ID.strong` (the cheap call, under the caller's id, is a prediction of its own in the
/// lineage). A generation that may escalate runs on the cheap model to its end before its
/// first token is given out.
pub struct Cascade {
    config: CascadeConfig,
    below: Arc<dyn Infer>,
    cache_of: Option<Engine>,
}

impl Cascade {
    /// The cascade over `below`.
    pub fn new(config: CascadeConfig, below: Arc<dyn Infer>) -> Self {
        Self {
            config,
            below,
            cache_of: None,
        }
    }

    /// Cache first: a request whose strong answer is in `engine`'s response cache goes to the
    /// strong model (where it costs no compute) without asking the cheap one. The strong model
    /// must be a name `engine` resolves.
    pub fn cache_first(mut self, engine: Engine) -> Self {
        self.cache_of = Some(engine);
        self
    }

    fn routed(route: &'static str, reason: String, confidence: Option<f64>) -> Routed {
        Routed {
            route,
            reason,
            confidence,
            expected_ms: None,
            max_tokens: None,
            router: "cascade",
        }
    }

    /// Where the request goes before the cheap model is asked: Some(strong) when its answer is
    /// cached or the input too complex; None: ask the cheap one.
    fn before(&self, request: &mut InferRequest) -> Result<bool> {
        let c = &self.config;
        if let Some(engine) = &self.cache_of {
            if request.options.use_cache && engine.is_cached(&c.strong, &request.input)? {
                let reason = "cached: the strong model's answer is in the response cache".into();
                request.model = c.strong.clone();
                request.notes.insert(Self::routed("strong", reason, None));
                return Ok(true);
            }
        }
        let tokens = estimated_tokens(&request.input);
        if let Some(max) = c.max_cheap_tokens.filter(|&m| tokens > m) {
            request.model = c.strong.clone();
            let reason = format!("complex: ~{tokens} tokens > {max}");
            request.notes.insert(Self::routed("strong", reason, None));
            return Ok(true);
        }
        Ok(false)
    }

    /// The strong request after an unsure cheap answer.
    fn escalated(&self, mut strong: InferRequest, confidence: f64) -> InferRequest {
        let c = &self.config;
        strong.model = c.strong.clone();
        strong.id = format!("{}.strong", strong.id).into();
        let reason = format!("unsure: confidence {confidence:.4} < {}", c.min_confidence);
        strong
            .notes
            .insert(Self::routed("strong", reason, Some(confidence)));
        strong
    }

    fn sure(&self, confidence: Option<f64>) -> Routed {
        let c = &self.config;
        let reason = match confidence {
            Some(p) => format!("sure: confidence {p:.4} >= {}", c.min_confidence),
            None => "no confidence to judge: the cheap answer stands".into(),
        };
        Self::routed("cheap", reason, None)
    }
}

/// How sure an answer is: a classification's least sure row's top probability; a generation's
/// mean token probability (its log-probabilities were asked for).
fn confidence(output: &Output) -> Option<f64> {
    match output {
        Output::Classes(rows) => rows
            .iter()
            .map(|r| r.confidence().max_probability)
            .min_by(f64::total_cmp),
        Output::Completion(c) => c.mean_logprob().map(f64::exp),
        Output::Embeddings(_) => None,
    }
}

/// A rough token count of an input, for routing by complexity (about 4 bytes a token).
fn estimated_tokens(input: &Input) -> usize {
    match input {
        Input::Embed(texts) => texts.iter().map(String::len).max().unwrap_or(0) / 4,
        Input::Classify(_) => 0,
        Input::Generate { prompt, .. } => prompt.len() / 4,
    }
}

/// A generation asks for its tokens' log-probabilities (its confidence).
fn with_logprobs(mut request: InferRequest) -> InferRequest {
    if let Input::Generate { params, .. } = &mut request.input {
        params.logprobs = true;
    }
    request
}

impl Infer for Cascade {
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    fn infer(&self, mut request: InferRequest) -> Result<InferResponse> {
        if request.model != self.config.name || self.before(&mut request)? {
            return self.below.infer(request);
        }
        let strong = request.clone();
        request.model = self.config.cheap.clone();
        let mut cheap = self.below.infer(with_logprobs(request))?;
        match confidence(&cheap.output) {
            Some(p) if p < self.config.min_confidence => self.below.infer(self.escalated(strong, p)),
            p => {
                cheap.meta.notes.insert(self.sure(p));
                Ok(cheap)
            }
        }
    }

    /// As [`Infer::infer`]; the cheap model's reply is run to its end first (it may be thrown
    /// away), then given out, or the strong model's streamed.
    fn infer_stream(&self, mut request: InferRequest) -> Result<InferStream> {
        if request.model != self.config.name || self.before(&mut request)? {
            return self.below.infer_stream(request);
        }
        let strong = request.clone();
        request.model = self.config.cheap.clone();
        let cheap = self.below.infer_stream(with_logprobs(request))?;
        let meta = cheap.meta().clone();
        let mut cheap = Replayed::run(cheap);
        let sure = match cheap.end() {
            Some(Ok(answer)) => confidence(&answer.output),
            _ => None,
        };
        match sure {
            Some(p) if p < self.config.min_confidence => self.below.infer_stream(self.escalated(strong, p)),
            p => {
                cheap.map_end(|end| {
                    end.map(|mut answer| {
                        answer.meta.notes.insert(self.sure(p));
                        answer
                    })
                });
                Ok(InferStream::new(meta, cheap))
            }
        }
    }
}

/// Degradation under load: requests for `name` go to `strong` unless its queue would keep them
/// past the latency objective; then to `cheap` (for a generation, with `max_tokens` cut to
/// `cheap_max_tokens` if set: a shorter reply is the other cheap way); and when even the cheap
/// model is that busy, requests of priority `shed_at` or lower are refused at once
/// ([`crate::ErrorKind::Overloaded`], the message saying why).
#[derive(Debug, Clone, PartialEq)]
pub struct DegradeConfig {
    /// The name callers address.
    pub name: String,
    /// The strong model (a name the layer below resolves: its queue is read from its version).
    pub strong: String,
    /// The cheap model (it may be the strong one, with `cheap_max_tokens`).
    pub cheap: String,
    /// A generation sent the cheap way is cut to at most this many new tokens.
    pub cheap_max_tokens: Option<usize>,
    /// The latency objective.
    pub objective: Duration,
    /// The priority at and below which requests are shed when both models are too busy.
    pub shed_at: Priority,
}

/// The degradation layer (see [`DegradeConfig`]). A model's expected latency is the work queued
/// ahead (requests queued x its mean compute per request, from its scheduler's counters) plus
/// one request's compute; a model is too busy when that exceeds a quarter of the objective (the
/// rest is for the batch running, the request's own batch filling, and the cores the other
/// model takes: in `keel bench overload`, a third still let p99 past the objective in 2 runs of
/// 3; a quarter kept it within in 3 of 3). Where it went and why is noted on the request (a
/// [`Routed`] note: lineage records it) and so on the answer.
pub struct Degrade {
    config: DegradeConfig,
    below: Arc<dyn Infer>,
    recent: Mutex<HashMap<String, Recent>>,
}

impl Degrade {
    /// The layer over `below`.
    pub fn new(config: DegradeConfig, below: Arc<dyn Infer>) -> Self {
        Self {
            config,
            below,
            recent: Mutex::default(),
        }
    }

    /// The latency a request sent to `model` now can expect (None: the model has run nothing
    /// yet, so there is nothing to judge by): the requests queued ahead and its own, at the
    /// compute per request of the last fifth of a second (under load the cores are shared with
    /// the other model, so the lifetime mean would be too kind).
    ///
    /// # Errors
    /// An unknown model.
    pub fn expected(&self, model: &str) -> Result<Option<Duration>> {
        let s = self.below.target(model)?.version.scheduler_stats()?;
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = recent.entry(model.to_string()).or_insert(Recent {
            at: now,
            compute: s.compute,
            items: s.items,
            per_item: None,
        });
        let fresh = now.duration_since(entry.at) >= Duration::from_millis(200);
        if fresh && s.items > entry.items {
            entry.per_item = Some((s.compute - entry.compute).as_secs_f64() / (s.items - entry.items) as f64);
        }
        if fresh {
            (entry.at, entry.compute, entry.items) = (now, s.compute, s.items);
        }
        let lifetime = (s.items > 0).then(|| s.compute.as_secs_f64() / s.items as f64);
        Ok(entry
            .per_item
            .or(lifetime)
            .map(|per_item| Duration::from_secs_f64(per_item * (s.queued + 1) as f64)))
    }

    /// Sends the request the way the load says (or refuses it), noted on it.
    fn route(&self, mut request: InferRequest) -> Result<InferRequest> {
        let c = &self.config;
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        // A quarter of the objective: the estimate counts the work queued ahead, not the batch
        // running nor the wait for the request's own batch to fill and run.
        let limit = c.objective / 4;
        let strong = self.expected(&c.strong)?;
        let mut cut = None;
        let (route, reason, expected) = if strong.is_none_or(|d| d <= limit) {
            ("strong", "within the objective".to_string(), strong)
        } else {
            let cheap = self.expected(&c.cheap)?;
            if cheap.is_some_and(|d| d > limit) && request.options.priority <= c.shed_at {
                return Err(Error::Refused {
                    kind: crate::ErrorKind::Overloaded,
                    source: format!(
                        "'{}' shed this {:?}-priority request: the strong model expects {:.1} ms and the cheap one {:.1} ms, over a quarter of the {:.1} ms objective",
                        c.name,
                        request.options.priority,
                        ms(strong),
                        ms(cheap),
                        ms(Some(c.objective))
                    )
                    .into(),
                });
            }
            if let (Input::Generate { params, .. }, Some(max)) = (&mut request.input, c.cheap_max_tokens) {
                if params.max_tokens > max {
                    params.max_tokens = max;
                    cut = Some(max);
                }
            }
            let reason = format!(
                "load: the strong model expects {:.1} ms > a quarter of the {:.1} ms objective",
                ms(strong),
                ms(Some(c.objective))
            );
            ("cheap", reason, cheap)
        };
        request.model = if route == "strong" { &c.strong } else { &c.cheap }.clone();
        request.notes.insert(Routed {
            route,
            reason,
            confidence: None,
            expected_ms: Some(ms(expected)),
            max_tokens: cut,
            router: "degrade",
        });
        Ok(request)
    }
}

/// A model's compute per request over the last window, and where that window began.
struct Recent {
    at: Instant,
    compute: Duration,
    items: u64,
    per_item: Option<f64>,
}

impl Infer for Degrade {
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        if request.model != self.config.name {
            return self.below.infer(request);
        }
        self.below.infer(self.route(request)?)
    }

    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        if request.model != self.config.name {
            return self.below.infer_stream(request);
        }
        self.below.infer_stream(self.route(request)?)
    }
}
