//! Each fused CPU kernel against the stock candle ops it replaces, on the shapes MiniLM and
//! SmolLM2 run. Criterion reports both in one run; the ratio is the figure.
//!
//! Run: `cargo bench -p keel-benches --bench kernels`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor, D};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_kernels::{set_dense_gemm, Activation, DenseGemm, Device, KvCache, Linear, Rope, Weight};
use std::time::Duration;

fn randn(dims: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, &candle_core::Device::Cpu).unwrap()
}

/// The same values as a Keel tensor on the CPU (shared storage, no copy).
fn keel(t: &Tensor) -> keel_kernels::Tensor {
    t.clone().into()
}

fn config<'a>(
    c: &'a mut Criterion,
    name: &str,
    elements: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(format!("cpu/{name}"));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(elements));
    group
}

/// MiniLM's feed-forward input: [8 x 128 tokens, 384] -> 1536 with bias and GELU.
fn linear_bias_gelu(c: &mut Criterion) {
    let d = Device::cpu();
    let (x, w, b) = (randn(&[8, 128, 384]), randn(&[1536, 384]), randn(&[1536]));
    let layer = Linear::new(Weight::Dense(keel(&w)))
        .with_bias(keel(&b))
        .with_activation(Activation::GeluErf);
    let mut g = config(c, "linear_bias_gelu_1024x384x1536", 1024 * 1536);
    let xk = keel(&x);
    g.bench_function("keel", |bench| bench.iter(|| d.linear(&xk, &layer).unwrap()));
    // The same op on the gemm crate: Keel's path before its own GEMM (and on CPUs without AVX-512).
    set_dense_gemm(DenseGemm::GemmCrate);
    g.bench_function("keel_gemm_crate", |bench| {
        bench.iter(|| d.linear(&xk, &layer).unwrap())
    });
    set_dense_gemm(DenseGemm::Auto);
    g.bench_function("candle", |bench| {
        bench.iter(|| {
            QMatMul::Tensor(w.clone())
                .forward(&x)
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .gelu_erf()
                .unwrap()
        })
    });
    g.finish();
}

/// MiniLM's residual + LayerNorm over [8 x 128, 384].
fn add_layer_norm(c: &mut Criterion) {
    let d = Device::cpu();
    let (x, r, gamma, beta) = (
        randn(&[8, 128, 384]),
        randn(&[8, 128, 384]),
        randn(&[384]),
        randn(&[384]),
    );
    let mut g = config(c, "add_layer_norm_1024x384", 1024 * 384);
    let (xk, rk, gk, bk) = (keel(&x), keel(&r), keel(&gamma), keel(&beta));
    g.bench_function("keel", |bench| {
        bench.iter(|| d.add_layer_norm(&xk, Some(&rk), &gk, &bk, 1e-12).unwrap())
    });
    g.bench_function("candle", |bench| {
        bench.iter(|| candle_nn::ops::layer_norm(&(&x + &r).unwrap(), &gamma, &beta, 1e-12).unwrap())
    });
    g.finish();
}

/// MiniLM's attention: 8 sequences x 128 tokens, 12 heads of 32, from a stacked QKV projection.
fn encoder_attention(c: &mut Criterion) {
    let d = Device::cpu();
    let (batch, len, heads, hd) = (8, 128, 12, 32);
    let qkv = randn(&[batch, len, 3 * heads * hd]);
    let lengths = vec![len; batch];
    let mut g = config(c, "encoder_attention_8x128x12x32", (batch * len) as u64);
    // Keel's kernel takes the batch packed: the same values as [tokens, 3 * width].
    let qkvk = keel(&qkv.reshape((batch * len, 3 * heads * hd)).unwrap());
    g.bench_function("keel", |bench| {
        bench.iter(|| d.encoder_attention(&qkvk, &lengths, heads).unwrap())
    });
    g.bench_function("candle", |bench| {
        // candle-transformers' bert: split, transpose to [b, h, t, d], two matmuls, softmax.
        bench.iter(|| {
            let parts = qkv.reshape((batch, len, 3, heads, hd)).unwrap();
            let split = |i| {
                parts
                    .narrow(2, i, 1)
                    .unwrap()
                    .squeeze(2)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            probs
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch, len, heads * hd))
                .unwrap()
        })
    });
    g.finish();
}

/// SmolLM2's gate/up projection in Q4_1: 1 token (decode) and 64 tokens (prefill), 576 -> 3072.
fn quantized_linear(c: &mut Criterion) {
    let d = Device::cpu();
    let w = randn(&[3072, 576]);
    let ours = Weight::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
    let theirs = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
    let layer = Linear::new(ours);
    for tokens in [1usize, 64] {
        let x = randn(&[tokens, 576]);
        let mut g = config(
            c,
            &format!("q4_1_linear_{tokens}x576x3072"),
            (tokens * 3072 * 576) as u64,
        );
        g.bench_with_input(BenchmarkId::new("keel", tokens), &keel(&x), |bench, x| {
            bench.iter(|| d.linear(x, &layer).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("candle", tokens), &x, |bench, x| {
            bench.iter(|| theirs.forward(x).unwrap())
        });
        g.finish();
    }
}

/// SmolLM2's SwiGLU over one token's [gate | up] of 2 x 1536, and 64 tokens.
fn swiglu(c: &mut Criterion) {
    let d = Device::cpu();
    let x = randn(&[64, 3072]);
    let mut g = config(c, "swiglu_64x1536", 64 * 1536);
    let xk = keel(&x);
    g.bench_function("keel", |bench| bench.iter(|| d.swiglu(&xk).unwrap()));
    g.bench_function("candle", |bench| {
        bench.iter(|| {
            let gate = x.narrow(D::Minus1, 0, 1536).unwrap();
            let up = x.narrow(D::Minus1, 1536, 1536).unwrap();
            (candle_nn::ops::silu(&gate).unwrap() * up).unwrap()
        })
    });
    g.finish();
}

/// SmolLM2's decode attention: one new token after 256 cached, 9 heads over 3 kv heads of 64.
fn causal_attention(c: &mut Criterion) {
    let d = Device::cpu();
    let (heads, kv_heads, hd, past) = (9, 3, 64, 256);
    let rope = Rope::new(hd, 100_000.0, 1024);
    let mut cache = KvCache::new(1, kv_heads, hd);
    let prompt = randn(&[past, (heads + 2 * kv_heads) * hd]);
    d.causal_attention(&keel(&prompt), heads, kv_heads, &rope, &mut cache, 0)
        .unwrap();
    cache.commit(past);
    let step = keel(&randn(&[1, (heads + 2 * kv_heads) * hd]));
    let (k, v) = (
        randn(&[1, kv_heads, past + 1, hd]),
        randn(&[1, kv_heads, past + 1, hd]),
    );
    let q = randn(&[1, heads, 1, hd]);
    let mut g = config(c, "decode_attention_9x3x64_past256", 1);
    g.bench_function("keel", |bench| {
        bench.iter(|| {
            let out = d
                .causal_attention(&step, heads, kv_heads, &rope, &mut cache, 0)
                .unwrap();
            cache.rollback();
            out
        })
    });
    g.bench_function("candle", |bench| {
        // candle's quantized_llama: repeat kv heads, matmul, softmax, matmul (cache concat not counted).
        bench.iter(|| {
            let rep = |t: &Tensor| {
                t.unsqueeze(2)
                    .unwrap()
                    .expand((1, kv_heads, 3, past + 1, hd))
                    .unwrap()
                    .reshape((1, heads, past + 1, hd))
                    .unwrap()
            };
            let scores = (q.matmul(&rep(&k).t().unwrap()).unwrap() / 8.0).unwrap();
            candle_nn::ops::softmax_last_dim(&scores)
                .unwrap()
                .matmul(&rep(&v))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    kernels,
    linear_bias_gelu,
    add_layer_norm,
    encoder_attention,
    quantized_linear,
    swiglu,
    causal_attention
);
criterion_main!(kernels);
