//! Routing between a cheap and a strong model: a confidence cascade, and degradation under load.

use crate::{Engine, Error, Infer, InferRequest, InferResponse, Input, Priority, Result};
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
    /// A classification whose least sure row has a top probability below this escalates.
    pub min_confidence: f64,
    /// Inputs longer than this many tokens (estimated as bytes / 4) go to the strong model
    /// directly; None: no limit.
    pub max_cheap_tokens: Option<usize>,
}

/// The cascade layer (see [`CascadeConfig`]). Other model names pass through. The answer says
/// how it was routed in `meta.annotations["cascade"]` (JSON: `route` cheap or strong,
/// `reason`, and the cheap answer's `confidence` when it escalated). An escalated request's
/// strong call has the id `ID.strong` (the cheap call, under the caller's id, is a prediction of
/// its own in the lineage).
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
}

/// A rough token count of an input, for routing by complexity (about 4 bytes a token).
fn estimated_tokens(input: &Input) -> usize {
    match input {
        Input::Embed(texts) => texts.iter().map(String::len).max().unwrap_or(0) / 4,
        Input::Classify(_) => 0,
        Input::Generate { prompt, .. } => prompt.len() / 4,
    }
}

fn annotate(answer: &mut InferResponse, key: &str, note: serde_json::Value) {
    answer.meta.annotations.insert(key.into(), note.to_string());
}

impl Infer for Cascade {
    fn infer(&self, mut request: InferRequest) -> Result<InferResponse> {
        let c = &self.config;
        if request.model != c.name {
            return self.below.infer(request);
        }
        if let Some(engine) = &self.cache_of {
            if request.options.use_cache && engine.is_cached(&c.strong, &request.input)? {
                request.model = c.strong.clone();
                let mut answer = self.below.infer(request)?;
                let reason = "cached: the strong model's answer is in the response cache";
                annotate(
                    &mut answer,
                    "cascade",
                    serde_json::json!({"route": "strong", "reason": reason}),
                );
                return Ok(answer);
            }
        }
        let tokens = estimated_tokens(&request.input);
        if let Some(max) = c.max_cheap_tokens.filter(|&m| tokens > m) {
            request.model = c.strong.clone();
            let mut answer = self.below.infer(request)?;
            let reason = format!("complex: ~{tokens} tokens > {max}");
            annotate(
                &mut answer,
                "cascade",
                serde_json::json!({"route": "strong", "reason": reason}),
            );
            return Ok(answer);
        }
        let mut strong = request.clone();
        request.model = c.cheap.clone();
        let mut cheap = self.below.infer(request)?;
        let confidence = cheap.output.classes().and_then(|rows| {
            rows.iter()
                .map(|r| r.confidence().max_probability)
                .min_by(f64::total_cmp)
        });
        match confidence {
            Some(p) if p < c.min_confidence => {
                strong.model = c.strong.clone();
                strong.id = format!("{}.strong", strong.id).into();
                let mut answer = self.below.infer(strong)?;
                let reason = format!("unsure: confidence {p:.4} < {}", c.min_confidence);
                annotate(
                    &mut answer,
                    "cascade",
                    serde_json::json!({"route": "strong", "reason": reason, "confidence": p}),
                );
                Ok(answer)
            }
            _ => {
                let reason = match confidence {
                    Some(p) => format!("sure: confidence {p:.4} >= {}", c.min_confidence),
                    None => "no confidence to judge: the cheap answer stands".into(),
                };
                annotate(
                    &mut cheap,
                    "cascade",
                    serde_json::json!({"route": "cheap", "reason": reason}),
                );
                Ok(cheap)
            }
        }
    }
}

/// Degradation under load: requests for `name` go to `strong` unless its queue would keep them
/// past the latency objective; then to `cheap`; and when even the cheap model is that busy,
/// requests of priority `shed_at` or lower are refused at once
/// ([`crate::ErrorKind::Overloaded`], the message saying why).
#[derive(Debug, Clone, PartialEq)]
pub struct DegradeConfig {
    /// The name callers address.
    pub name: String,
    /// The strong model (a name the engine resolves: its queue is read from the engine).
    pub strong: String,
    /// The cheap model.
    pub cheap: String,
    /// The latency objective.
    pub objective: Duration,
    /// The priority at and below which requests are shed when both models are too busy.
    pub shed_at: Priority,
}

/// The degradation layer (see [`DegradeConfig`]). A model's expected latency is the work queued
/// ahead (requests queued x its mean compute per request, from the engine's scheduler
/// counters) plus one request's compute; a model is too busy when that exceeds a quarter of
/// the objective (the rest is for the batch running, the request's own batch filling, and the
/// cores the other model takes: in `keel bench overload`, a third still let p99 past the
/// objective in 2 runs of 3; a quarter kept it within in 3 of 3). The answer says where it went and why in
/// `meta.annotations["degrade"]` (JSON: `route`, `reason`, `expected_ms`).
pub struct Degrade {
    config: DegradeConfig,
    engine: Engine,
    below: Arc<dyn Infer>,
    recent: Mutex<HashMap<String, Recent>>,
}

impl Degrade {
    /// The layer over `below`; queues are read from `engine`.
    pub fn new(config: DegradeConfig, engine: Engine, below: Arc<dyn Infer>) -> Self {
        Self {
            config,
            engine,
            below,
            recent: Mutex::default(),
        }
    }

    /// The latency a request sent to `model` now can expect (None: the model has run nothing
    /// yet, so there is nothing to judge by): the requests queued ahead and its own, at the
    /// compute per request of the last fifth of a second (under load the cores are shared with
    /// the other model, so the lifetime mean would be too kind).
    pub fn expected(&self, model: &str) -> Result<Option<Duration>> {
        let s = self.engine.scheduler_stats(model)?;
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
}

/// A model's compute per request over the last window, and where that window began.
struct Recent {
    at: Instant,
    compute: Duration,
    items: u64,
    per_item: Option<f64>,
}

impl Infer for Degrade {
    fn infer(&self, mut request: InferRequest) -> Result<InferResponse> {
        let c = &self.config;
        if request.model != c.name {
            return self.below.infer(request);
        }
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        // A quarter of the objective: the estimate counts the work queued ahead, not the batch
        // running nor the wait for the request's own batch to fill and run.
        let limit = c.objective / 4;
        let strong = self.expected(&c.strong)?;
        let (route, reason, expected) = if strong.is_none_or(|d| d <= limit) {
            (&c.strong, "within the objective".to_string(), strong)
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
            let reason = format!(
                "load: the strong model expects {:.1} ms > a quarter of the {:.1} ms objective",
                ms(strong),
                ms(Some(c.objective))
            );
            (&c.cheap, reason, cheap)
        };
        let to = if route == &c.strong { "strong" } else { "cheap" };
        request.model = route.clone();
        let mut answer = self.below.infer(request)?;
        annotate(
            &mut answer,
            "degrade",
            serde_json::json!({"route": to, "reason": reason, "expected_ms": ms(expected)}),
        );
        Ok(answer)
    }
}
