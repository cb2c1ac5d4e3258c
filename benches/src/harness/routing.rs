//! Cost-aware routing under the harness: `cascade` (cheap model first, escalate when unsure) on
//! the breast-cancer held-out rows, and `overload` (degradation under load) on MiniLM f32 and
//! int8 at an arrival rate the f32 model cannot keep up with.

use super::{corpus, percentile, Progress, Res};
use keel::cost::{CascadeConfig, Costed, DegradeConfig, Routed};
use keel::stack::Stack;
use keel::{
    CacheConfig, Engine, Infer, InferRequest, LoadOptions, Priority, Record, Value as Cell, WeightPath,
};
use keel_kernels::Device;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// scikit-learn's breast-cancer rows of index % 5 == 0 (held out by both models' training).
fn held_out_rows(models: &Path) -> Res<Vec<(Record, usize)>> {
    let path = models.join("sklearn/datasets/data/breast_cancer.csv");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let names: Vec<String> = (0..30).map(|i| FEATURE_NAMES[i].to_string()).collect();
    let mut rows = Vec::new();
    for (i, line) in text.lines().skip(1).enumerate().filter(|(i, _)| i % 5 == 0) {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect();
        if v.len() != 31 {
            return Err(format!("{}: row {i} has {} cells, not 31", path.display(), v.len()).into());
        }
        let record = names
            .iter()
            .cloned()
            .zip(v[..30].iter().map(|x| Cell::Number(*x)))
            .collect();
        rows.push((record, v[30] as usize));
    }
    Ok(rows)
}

/// scikit-learn's names of the 30 features, in the CSV's order.
const FEATURE_NAMES: [&str; 30] = [
    "mean radius",
    "mean texture",
    "mean perimeter",
    "mean area",
    "mean smoothness",
    "mean compactness",
    "mean concavity",
    "mean concave points",
    "mean symmetry",
    "mean fractal dimension",
    "radius error",
    "texture error",
    "perimeter error",
    "area error",
    "smoothness error",
    "compactness error",
    "concavity error",
    "concave points error",
    "symmetry error",
    "fractal dimension error",
    "worst radius",
    "worst texture",
    "worst perimeter",
    "worst area",
    "worst smoothness",
    "worst compactness",
    "worst concavity",
    "worst concave points",
    "worst symmetry",
    "worst fractal dimension",
];

/// The cascade at several confidence thresholds: share escalated, cost against always asking
/// the strong model, accuracy against the data set's labels and agreement with the strong model.
pub(super) fn cascade(device: &Device, models: &Path, p: &Progress) -> Res<Value> {
    let engine = Engine::builder().on(device.clone()).build()?;
    let strong = engine.load("examples/models/breast-cancer-mlp")?;
    let cheap = engine.load("examples/models/breast-cancer-linear")?;
    let rows = held_out_rows(models)?;
    let class_of = |model: &str, row: &Record| -> Res<usize> {
        let a = engine.infer(InferRequest::classify(model, vec![row.clone()]))?;
        Ok(a.output.classes().map_or(usize::MAX, |c| c[0].class))
    };
    let strong_classes: Vec<usize> = rows
        .iter()
        .map(|(r, _)| class_of(strong.as_str(), r))
        .collect::<Res<_>>()?;
    let cheap_classes: Vec<usize> = rows
        .iter()
        .map(|(r, _)| class_of(cheap.as_str(), r))
        .collect::<Res<_>>()?;
    let accuracy = |classes: &[usize]| {
        classes.iter().zip(&rows).filter(|(c, (_, t))| *c == t).count() as f64 / rows.len() as f64
    };
    let price_of = |model: &str| -> Res<_> { Ok(Costed::price_of(&engine.target(model)?.version)?) };
    let (strong_price, cheap_price) = (price_of(strong.as_str())?, price_of(cheap.as_str())?);
    let always_strong = strong_price.per_call * rows.len() as f64;
    let mut results = Vec::new();
    for threshold in [0.8, 0.9, 0.95, 0.99] {
        p.step(&format!("cascade at confidence {threshold}"));
        let config = CascadeConfig {
            name: "cancer".into(),
            cheap: cheap.to_string(),
            strong: strong.to_string(),
            min_confidence: threshold,
            max_cheap_tokens: None,
        };
        let cascade = Stack::builder(engine.clone())
            .cost()
            .cascade(config, false)
            .build()?;
        let (mut escalated, mut right, mut agree) = (0, 0, 0);
        for (i, (row, target)) in rows.iter().enumerate() {
            let a = cascade.infer(InferRequest::classify("cancer", vec![row.clone()]))?;
            escalated += usize::from(a.meta.notes.get::<Routed>().is_some_and(|r| r.route == "strong"));
            let class = a.output.classes().map_or(usize::MAX, |c| c[0].class);
            right += usize::from(class == *target);
            agree += usize::from(class == strong_classes[i]);
        }
        let cost: f64 = cascade
            .costed()
            .map_or(0.0, |c| c.report().iter().map(|l| l.cost).sum());
        results.push(json!({
            "min_confidence": threshold,
            "escalated_share": escalated as f64 / rows.len() as f64,
            "cost": cost,
            "cost_saved_share": 1.0 - cost / always_strong,
            "accuracy": right as f64 / rows.len() as f64,
            "agreement_with_strong": agree as f64 / rows.len() as f64,
        }));
    }
    Ok(json!({
        "rows": rows.len(),
        "price": {"cheap_per_call": cheap_price.per_call, "strong_per_call": strong_price.per_call},
        "always_strong": {"cost": always_strong, "accuracy": accuracy(&strong_classes)},
        "always_cheap": {"cost": cheap_price.per_call * rows.len() as f64, "accuracy": accuracy(&cheap_classes)},
        "results": results,
    }))
}

/// Closed-loop throughput of one model (requests/s) with `clients` threads for `time`.
fn capacity(engine: &Engine, model: &str, texts: &[String], clients: usize, time: Duration) -> f64 {
    let start = Instant::now();
    let done: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut n = 0;
                    while start.elapsed() < time {
                        let _ = engine.embed(model, &[texts[(c * 31 + n) % texts.len()].as_str()]);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    done as f64 / start.elapsed().as_secs_f64()
}

/// Open-loop arrivals at `rate` per second for `time`, through `service`: latency of each
/// request from its scheduled arrival (so time waiting for a free client counts), and where
/// the degradation layer sent it.
fn open_loop(
    service: &dyn Infer,
    name: &str,
    texts: &[String],
    rate: f64,
    time: Duration,
) -> (Vec<f64>, usize, usize) {
    let n = (rate * time.as_secs_f64()) as usize;
    let clients = 256;
    let start = Instant::now() + Duration::from_millis(20);
    let results: Vec<(f64, Option<bool>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for i in (c..n).step_by(clients) {
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        // One request in five is background work (low priority: may be shed).
                        let priority = if i % 5 == 0 {
                            Priority::Low
                        } else {
                            Priority::Normal
                        };
                        let request = InferRequest::embed(name, [texts[i % texts.len()].as_str()])
                            .options(keel::Request::default().priority(priority));
                        let answer = service.infer(request);
                        let ms = due.elapsed().as_secs_f64() * 1e3;
                        let cheap = answer
                            .ok()
                            .map(|a| a.meta.notes.get::<Routed>().is_some_and(|r| r.route == "cheap"));
                        out.push((ms, cheap));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let shed = results.iter().filter(|(_, c)| c.is_none()).count();
    let cheap = results.iter().filter(|(_, c)| *c == Some(true)).count();
    let latencies = results
        .iter()
        .filter(|(_, c)| c.is_some())
        .map(|(ms, _)| *ms)
        .collect();
    (latencies, cheap, shed)
}

/// The p99 latency objective of the overload scenario: an interactive service's.
const OBJECTIVE: Duration = Duration::from_millis(100);

/// Degradation under load: MiniLM f32 (strong) and int8 (cheap) on one engine, at 1.1x the f32
/// model's measured capacity, always-strong against the degradation layer, against a 100 ms
/// p99 objective.
pub(super) fn overload(device: &Device, model: &Path, budget: Duration, p: &Progress) -> Res<Value> {
    let engine = Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .build()?;
    let strong = engine.load_with(
        model,
        LoadOptions {
            weights: WeightPath::F32,
        },
    )?;
    let cheap = engine.load_with(
        model,
        LoadOptions {
            weights: WeightPath::Int8,
        },
    )?;
    let texts = corpus();
    p.step("unloaded latency and capacity");
    let mut unloaded: Vec<f64> = (0..40)
        .map(|i| {
            let t = Instant::now();
            let _ = engine.embed(strong.as_str(), &[texts[i % texts.len()].as_str()]);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let unloaded_p50 = percentile(&mut unloaded, 0.5);
    let strong_capacity = capacity(&engine, strong.as_str(), &texts, 32, budget / 2);
    let cheap_capacity = capacity(&engine, cheap.as_str(), &texts, 32, budget / 2);
    let objective = OBJECTIVE;
    let rate = strong_capacity * 1.1;
    let degrade = Stack::builder(engine.clone())
        .degrade(DegradeConfig {
            name: "embed".into(),
            strong: strong.to_string(),
            cheap: cheap.to_string(),
            cheap_max_tokens: None,
            objective,
            shed_at: Priority::Low,
        })
        .build()?;
    let mut rows = Vec::new();
    for (label, name, service) in [
        ("always strong", strong.as_str(), &engine as &dyn Infer),
        ("degrade", "embed", &degrade as &dyn Infer),
    ] {
        p.step(&format!("{label} at {rate:.0} requests/s"));
        // Let the queue drain between runs.
        std::thread::sleep(Duration::from_millis(300));
        let (mut latencies, cheap_n, shed) = open_loop(service, name, &texts, rate, budget);
        let served = latencies.len();
        rows.push(json!({
            "config": label,
            "served": served,
            "to_cheap_share": cheap_n as f64 / served.max(1) as f64,
            "shed": shed,
            "p50_ms": percentile(&mut latencies, 0.5),
            "p99_ms": percentile(&mut latencies, 0.99),
            "p99_within_objective": percentile(&mut latencies, 0.99) <= objective.as_secs_f64() * 1e3,
        }));
    }
    // What sending to the cheap model costs in quality: its cosine to the strong embedding.
    let sample: Vec<&str> = texts.iter().take(64).map(String::as_str).collect();
    let (a, b) = (
        engine.embed(strong.as_str(), &sample)?,
        engine.embed(cheap.as_str(), &sample)?,
    );
    let mut cosines: Vec<f64> = a
        .vectors
        .iter()
        .zip(&b.vectors)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum())
        .collect();
    Ok(json!({
        "objective_ms": objective.as_secs_f64() * 1e3,
        "unloaded_p50_ms": unloaded_p50,
        "strong_capacity_per_s": strong_capacity,
        "cheap_capacity_per_s": cheap_capacity,
        "arrival_rate_per_s": rate,
        "cheap_cosine_to_strong_median": percentile(&mut cosines, 0.5),
        "results": rows,
    }))
}
