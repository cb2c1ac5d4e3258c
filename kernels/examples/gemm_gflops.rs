//! GFLOP/s of the dense f32 `linear` on MiniLM's shapes at batch 32 (4096 tokens), Keel's packed
//! GEMM and the gemm crate measured back to back in rounds (the median of each), so that a noisy
//! machine affects both alike.
//!
//! Run: `cargo run --release -p keel-kernels --example gemm_gflops [tokens] [rounds]`.

use keel_kernels::candle_core::Tensor;
use keel_kernels::{set_dense_gemm, Activation, DenseGemm, Device, Linear, Weight};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let tokens = args.first().copied().unwrap_or(4096);
    let rounds = args.get(1).copied().unwrap_or(15);
    let d = Device::cpu();
    let cpu = &candle_core::Device::Cpu;
    println!("tokens  n     k     act      gemm-crate GFLOP/s  keel GFLOP/s  ratio");
    // QKV (stacked), attention output, intermediate (+GELU), output.
    for (n, k, act) in [
        (1152, 384, Activation::None),
        (384, 384, Activation::None),
        (1536, 384, Activation::GeluErf),
        (384, 1536, Activation::None),
    ] {
        let x: keel_kernels::Tensor = Tensor::randn(0f32, 1.0, &[tokens, k], cpu).unwrap().into();
        let w = Tensor::randn(0f32, 1.0, &[n, k], cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, &[n], cpu).unwrap();
        let layer = Linear::new(Weight::Dense(w.into()))
            .with_bias(b.into())
            .with_activation(act);
        let flops = 2.0 * (tokens * n * k) as f64;
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for round in 0..=rounds {
            for (choice, into) in [(DenseGemm::GemmCrate, &mut old), (DenseGemm::Auto, &mut new)] {
                set_dense_gemm(choice);
                let start = Instant::now();
                std::hint::black_box(d.linear(&x, &layer).unwrap());
                // Round 0 warms up (and packs the weight).
                if round > 0 {
                    into.push(flops / start.elapsed().as_secs_f64() / 1e9);
                }
            }
        }
        let (old, new) = (median(old), median(new));
        println!(
            "{tokens:<7} {n:<5} {k:<5} {:<8} {old:>18.1} {new:>13.1} {:>6.2}",
            format!("{act:?}"),
            new / old
        );
    }
}
