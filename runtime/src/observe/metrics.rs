//! Behaviour metrics in Prometheus (OpenMetrics) text, with the `prometheus-client` crate: one
//! registry per stack, which every layer registers into while the stack is built
//! ([`MetricsBuilder`]). What a request updates is kept in live families; what is counted
//! elsewhere (the engine's queues, batches and caches, a layer's totals) is read at each export,
//! so the request path pays nothing for it.

use crate::Engine;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A model version, as metrics name it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelLabels {
    pub(crate) model: String,
    pub(crate) version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) model: String,
    pub(crate) version: String,
    pub(crate) task: String,
    pub(crate) outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StageLabels {
    pub(crate) model: String,
    pub(crate) version: String,
    pub(crate) stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SignalLabels {
    pub(crate) model: String,
    pub(crate) version: String,
    pub(crate) signal: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 10 us to ~20 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

fn unit() -> Histogram {
    Histogram::new(linear_buckets(0.05, 0.05, 20))
}

fn rate() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn length() -> Histogram {
    // 1 to 4,096 tokens.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FinishLabels {
    pub(crate) model: String,
    pub(crate) version: String,
    pub(crate) reason: String,
}

/// The observability layer's live metric families.
pub(crate) struct Families {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) stages: HistogramFamily<StageLabels>,
    pub(crate) cache_hits: Family<ModelLabels, Counter>,
    pub(crate) confidence: HistogramFamily<ModelLabels>,
    pub(crate) tokens_per_second: HistogramFamily<ModelLabels>,
    pub(crate) first_token: HistogramFamily<ModelLabels>,
    pub(crate) between_tokens: HistogramFamily<ModelLabels>,
    pub(crate) generated: Family<ModelLabels, Counter>,
    pub(crate) lengths: HistogramFamily<ModelLabels>,
    pub(crate) finishes: Family<FinishLabels, Counter>,
    pub(crate) drift_value: Family<SignalLabels, Gauge<f64, AtomicU64>>,
    pub(crate) drift_state: Family<ModelLabels, Gauge>,
    pub(crate) drift_windows: Family<RequestLabels, Counter>,
}

impl Families {
    pub(crate) fn new() -> Self {
        Self {
            requests: Family::default(),
            stages: Family::new_with_constructor(latency),
            cache_hits: Family::default(),
            confidence: Family::new_with_constructor(unit),
            tokens_per_second: Family::new_with_constructor(rate),
            first_token: Family::new_with_constructor(latency),
            between_tokens: Family::new_with_constructor(latency),
            generated: Family::default(),
            lengths: Family::new_with_constructor(length),
            finishes: Family::default(),
            drift_value: Family::default(),
            drift_state: Family::default(),
            drift_windows: Family::default(),
        }
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        let f = self;
        registry.register(
            "requests",
            "Requests answered, by outcome (ok, cancelled, or the error's class)",
            f.requests.clone(),
        );
        registry.register(
            "stage_seconds",
            "Time per stage of a request: contract, queue, forward, post, total",
            f.stages.clone(),
        );
        registry.register(
            "cache_hits",
            "Requests answered by the response cache",
            f.cache_hits.clone(),
        );
        registry.register(
            "confidence",
            "A classifier's largest class probability",
            f.confidence.clone(),
        );
        registry.register(
            "tokens_per_second",
            "A generation's new tokens per second of its forward passes",
            f.tokens_per_second.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a generation's start to its first token, one observation per stream",
            f.first_token.clone(),
        );
        registry.register(
            "time_between_tokens_seconds",
            "Between a generation's successive tokens",
            f.between_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated (cancelled generations included)",
            f.generated.clone(),
        );
        registry.register(
            "generated_length_tokens",
            "Tokens per finished generation",
            f.lengths.clone(),
        );
        registry.register(
            "finish_reasons",
            "Generations ended, by reason: stop, length, context_full, cancelled",
            f.finishes.clone(),
        );
        registry.register(
            "drift_signal",
            "The last finished drift window's statistic per signal",
            f.drift_value.clone(),
        );
        registry.register(
            "drift_state",
            "The last finished drift window's state: 0 ok, 1 warn, 2 alarm",
            f.drift_state.clone(),
        );
        registry.register(
            "drift_windows",
            "Drift windows finished, by state (in the outcome label)",
            f.drift_windows.clone(),
        );
    }
}

/// One figure a layer reports (the cost and review layers' totals), read at each export.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name, without the `keel_` prefix (a counter's without `_total`).
    pub name: &'static str,
    /// Its help text.
    pub help: &'static str,
    /// A counter (true) or a gauge.
    pub counter: bool,
    /// Its labels.
    pub labels: Vec<(&'static str, String)>,
    /// Its value.
    pub value: f64,
}

/// A source of [`Sample`]s, called at each export.
pub type Samples = Arc<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// A stack's metrics registry while the stack is built: the engine's counters and each layer's
/// families and figures are registered into it, then it is finished into [`Metrics`].
pub struct MetricsBuilder {
    registry: Registry,
    sources: Vec<Samples>,
}

impl MetricsBuilder {
    /// A registry (names prefixed `keel_`) that exports `engine`'s queue, batch and cache
    /// counters.
    pub fn new(engine: Engine) -> Self {
        let mut registry = Registry::with_prefix("keel");
        registry.register_collector(Box::new(EngineCollector { engine }));
        Self {
            registry,
            sources: Vec::new(),
        }
    }

    /// The registry, for live families.
    pub(crate) fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Figures read at each export.
    pub fn samples(&mut self, source: impl Fn() -> Vec<Sample> + Send + Sync + 'static) {
        self.sources.push(Arc::new(source));
    }

    /// The finished registry.
    pub fn finish(mut self) -> Metrics {
        self.registry.register_collector(Box::new(SampleCollector {
            sources: self.sources,
        }));
        Metrics {
            registry: self.registry,
        }
    }
}

/// A stack's metrics: everything its layers observe, in Prometheus (OpenMetrics) text.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Everything, in Prometheus (OpenMetrics) text format.
    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// A scheduler figure exported as a metric: name, help, how to read it.
type Figure<T> = (&'static str, &'static str, fn(&crate::SchedulerStats) -> T);

/// The engine's own counters, read at each export.
struct EngineCollector {
    engine: Engine,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let models = self.engine.models();
        let stats: Vec<_> = models
            .iter()
            .filter_map(|m| {
                Some((
                    labels_of(&m.manifest.name, m.id.as_str()),
                    self.engine.scheduler_stats(m.id.as_str()).ok()?,
                ))
            })
            .collect();
        let gauges: [Figure<f64>; 3] = [
            ("queue_depth", "Requests queued now", |s| s.queued as f64),
            ("active_streams", "Decoder sequences decoding now", |s| {
                s.active_streams as f64
            }),
            (
                "mean_batch_size",
                "Sequences per batch (or decoder step), since load",
                |s| {
                    if s.batches == 0 {
                        0.0
                    } else {
                        s.items as f64 / s.batches as f64
                    }
                },
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(0.0f64);
            let mut family = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            for (labels, s) in &stats {
                ConstGauge::new(value(s)).encode(family.encode_family(labels)?)?;
            }
        }
        let counters: [Figure<u64>; 3] = [
            ("batches", "Batches (or decoder steps) run", |s| s.batches),
            ("batch_items", "Sequences run, summed over batches", |s| s.items),
            ("shed", "Requests refused because the queue was full", |s| {
                s.overloaded
            }),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for (labels, s) in &stats {
                ConstCounter::new(value(s)).encode(family.encode_family(labels)?)?;
            }
        }
        if let Some(cache) = self.engine.response_cache_stats() {
            let gauge = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "response_cache_lookups",
                "Response cache lookups, by result",
                None,
                gauge.metric_type(),
            )?;
            for (result, n) in [("hit", cache.hits), ("miss", cache.misses)] {
                let labels = [("result", result)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The layers' figures, read at each export.
struct SampleCollector {
    sources: Vec<Samples>,
}

impl std::fmt::Debug for SampleCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SampleCollector")
    }
}

impl Collector for SampleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = &self.sources;
        let mut by_name: std::collections::BTreeMap<&'static str, Vec<Sample>> = Default::default();
        for sample in sources.iter().flat_map(|f| f()) {
            by_name.entry(sample.name).or_default().push(sample);
        }
        for (name, samples) in by_name {
            let first = &samples[0];
            let kind = if first.counter {
                ConstCounter::new(0.0f64).metric_type()
            } else {
                ConstGauge::new(0.0f64).metric_type()
            };
            let mut family = encoder.encode_descriptor(name, first.help, None, kind)?;
            for s in &samples {
                let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if s.counter {
                    ConstCounter::new(s.value).encode(family.encode_family(&labels)?)?;
                } else {
                    ConstGauge::new(s.value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn labels_of(name: &str, version: &str) -> ModelLabels {
    ModelLabels {
        model: name.to_string(),
        version: version.chars().take(12).collect(),
    }
}
