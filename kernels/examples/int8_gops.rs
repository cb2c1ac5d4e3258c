//! Throughput of the int8 `linear` against the f32 one on MiniLM's shapes (default batch 32:
//! 4096 tokens), measured back to back in rounds (the median of each), so that a noisy machine
//! affects both alike. GOP/s counts a multiply-add as 2 operations.
//!
//! Run: `cargo run --release -p keel-kernels --example int8_gops [tokens] [rounds]`.

use keel_kernels::candle_core::Tensor;
use keel_kernels::{Activation, Device, Linear, Weight};
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
    println!("tokens  n     k     act      f32 GOP/s  int8 GOP/s  ratio");
    // The layers the int8 path quantizes: attention output, intermediate (+GELU), output.
    for (n, k, act) in [
        (384, 384, Activation::None),
        (1536, 384, Activation::GeluErf),
        (384, 1536, Activation::None),
    ] {
        let x: keel_kernels::Tensor = Tensor::randn(0f32, 1.0, &[tokens, k], cpu).unwrap().into();
        let w = Tensor::randn(0f32, 1.0, &[n, k], cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, &[n], cpu).unwrap();
        let dense = Linear::new(Weight::Dense(w.into()))
            .with_bias(b.into())
            .with_activation(act);
        let int8 = dense.clone().with_weight(dense.weight.to_int8().unwrap());
        let ops = 2.0 * (tokens * n * k) as f64;
        let (mut f32s, mut int8s) = (Vec::new(), Vec::new());
        for round in 0..=rounds {
            for (layer, into) in [(&dense, &mut f32s), (&int8, &mut int8s)] {
                let start = Instant::now();
                std::hint::black_box(d.linear(&x, layer).unwrap());
                // Round 0 warms up (and packs the f32 weight).
                if round > 0 {
                    into.push(ops / start.elapsed().as_secs_f64() / 1e9);
                }
            }
        }
        let (f, i) = (median(f32s), median(int8s));
        println!(
            "{tokens:<7} {n:<5} {k:<5} {:<8} {f:>9.1} {i:>11.1} {:>6.2}",
            format!("{act:?}"),
            i / f
        );
    }
}
