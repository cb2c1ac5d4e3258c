//! The timed workloads that both Keel figures come from: `keel bench` (the harness) and
//! `compare_keel` (the side-by-side comparison) call these same functions, so that the two agree
//! by construction.
//!
//! One timing method: a fresh [`Engine`] with the response cache off (the same inputs again must
//! be computed again), the default scheduler (a lone caller never waits for batch-mates), the
//! public call a host makes (text in: tokenization is inside the timing), a few untimed warm-up
//! calls, then each call timed on its own; the figure is the median of the timed calls.

use keel::{CacheConfig, Engine, Result};
use keel_kernels::Device;
use keel_models::llama::Llama;
use std::time::{Duration, Instant};

/// MiniLM's benchmark input: "hello" is one token, so 126 of them plus [CLS] and [SEP] make
/// exactly [`MINILM_TOKENS`].
pub fn minilm_text() -> String {
    "hello ".repeat(MINILM_TOKENS - 2)
}

/// Tokens of [`minilm_text`].
pub const MINILM_TOKENS: usize = 128;

/// The engine every Keel figure is measured on: default scheduler, caches off.
pub fn engine(device: &Device) -> Result<Engine> {
    Engine::builder()
        .on(device.clone())
        .caches(CacheConfig::off())
        .build()
}

/// Seconds per call of `f`: `warm` untimed calls, then `reps` timed ones.
pub fn time<E>(
    warm: usize,
    reps: usize,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<Vec<f64>, E> {
    for _ in 0..warm {
        f()?;
    }
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        out.push(start.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Seconds per call of `f` as [`time`] takes them, but for at least `budget` (and `reps` calls).
pub fn time_for<E>(
    warm: usize,
    reps: usize,
    budget: Duration,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<Vec<f64>, E> {
    let mut out = time(warm, reps, &mut f)?;
    let start = Instant::now();
    while start.elapsed() < budget {
        out.extend(time(0, 1, &mut f)?);
    }
    Ok(out)
}

/// Seconds per `Engine::embed` of `batch` copies of [`minilm_text`] on model `id`: one warm-up
/// call (three at batch 1, whose calls are short), then `reps` timed calls, and more until
/// `budget` has passed.
pub fn minilm_embed(
    engine: &Engine,
    id: &str,
    batch: usize,
    reps: usize,
    budget: Duration,
) -> Result<Vec<f64>> {
    let text = minilm_text();
    let texts = vec![text.as_str(); batch];
    let warm = if batch == 1 { 3 } else { 1 };
    time_for(warm, reps, budget, || engine.embed(id, &texts).map(drop))
}

/// The median of `v` (NaN if empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Seconds of `steps` greedy decode steps of `model` at batch 1, one `Llama::forward` per token,
/// after `prompt` (not timed), and the tokens made.
pub fn llama_decode(model: &Llama, prompt: &[u32], steps: usize) -> keel_models::Result<(f64, Vec<u32>)> {
    let mut cache = model.new_cache()?;
    let mut next = model.forward(prompt, &mut cache)?;
    let mut tokens = Vec::with_capacity(steps);
    let start = Instant::now();
    for _ in 0..steps {
        let token = keel_models::sampling::argmax(&next);
        tokens.push(token);
        next = model.forward(&[token], &mut cache)?;
    }
    Ok((start.elapsed().as_secs_f64(), tokens))
}
