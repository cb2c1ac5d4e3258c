//! The real models on a GPU backend against the CPU backend, through the same model code:
//! MiniLM's embeddings within a cosine of 0.9999 of the CPU's, SmolLM2's greedy tokens the same for
//! 16 steps, the engine's continuous batching and prefix cache. Each runs on both GPU backends,
//! as the modules `wgpu::` and `cuda::`.
//!
//! wgpu runs on any Vulkan/Metal/DX12 adapter; on CI that is Mesa's lavapipe (a Vulkan driver on
//! the CPU, installed by scripts/setup-system.sh). CUDA needs an NVIDIA GPU: where there is none,
//! each `cuda::` test prints why and passes without running (scripts/gpu-check.sh runs them where
//! there is one).

mod common;
use common::*;
use keel::{Engine, GenerateParams, LoadOptions, WeightPath};
use keel_kernels::{CudaOptions, Device, DeviceKind, WgpuOptions};
use keel_models::llama::Llama;
use keel_models::sampling::argmax;
use keel_models::weights::GgufFile;

/// Each test of the suite, run on the backend's device (or skipped where it has none).
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                if let Some(device) = device() {
                    super::$test(&device)
                }
            }
        )*
        #[test]
        fn minilm_with_f16_weights_matches_the_cpu() {
            if let Some(half) = f16_device() {
                super::minilm_with_f16_weights_matches_the_cpu(&half)
            }
        }
    };
}

mod wgpu {
    use super::*;

    fn device() -> Option<Device> {
        Some(
            Device::new(DeviceKind::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)"),
        )
    }

    fn f16_device() -> Option<Device> {
        let half = WgpuOptions {
            f16_weights: true,
            ..WgpuOptions::default()
        };
        Some(Device::wgpu(&half).unwrap())
    }

    suite!(
        minilm_embeddings_match_the_cpu,
        smollm2_greedy_tokens_match_the_cpu,
        engine_generates_on_the_gpu_with_continuous_batching_and_the_prefix_cache,
        batched_steps_and_cache_copies_match_one_sequence_at_a_time,
    );

    #[test]
    fn steady_state_inference_creates_no_buffers() {
        super::steady_state_inference_creates_no_buffers(&device().unwrap())
    }
}

mod cuda {
    use super::*;

    /// The GPU, or None after saying why there is none (in the test's output); with
    /// `KEEL_REQUIRE_CUDA` set (scripts/gpu-check.sh), no GPU is a failure.
    fn open(options: &CudaOptions) -> Option<Device> {
        match Device::cuda(options) {
            Ok(d) => Some(d),
            Err(e) if std::env::var_os("KEEL_REQUIRE_CUDA").is_some() => panic!("{e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn device() -> Option<Device> {
        open(&CudaOptions::default())
    }

    fn f16_device() -> Option<Device> {
        open(&CudaOptions {
            f16_weights: true,
            ..CudaOptions::default()
        })
    }

    suite!(
        minilm_embeddings_match_the_cpu,
        smollm2_greedy_tokens_match_the_cpu,
        engine_generates_on_the_gpu_with_continuous_batching_and_the_prefix_cache,
        batched_steps_and_cache_copies_match_one_sequence_at_a_time,
    );
}

/// MiniLM embeddings on the GPU vs the CPU, per sentence (the bound).
const MIN_COSINE: f32 = 0.9999;
/// Greedy steps that must agree on each prompt.
const STEPS: usize = 16;

/// The golden file's sentences.
fn sentences() -> Vec<&'static str> {
    static GOLDEN: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    GOLDEN.get_or_init(|| golden("minilm.json"))["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn minilm_embeddings_match_the_cpu(gpu: &Device) {
    let kind = gpu.caps().kind;
    let cpu = Engine::builder().device(DeviceKind::Cpu).build().unwrap();
    let gpu = Engine::builder().on(gpu.clone()).build().unwrap();
    let (c, g) = (cpu.load(minilm_dir()).unwrap(), gpu.load(minilm_dir()).unwrap());
    assert_eq!(c, g, "the version id is the content's, whatever the device");
    let texts = sentences();
    // One at a time and as one padded batch: both must match.
    let batched = gpu.embed(g.as_str(), &texts).unwrap().vectors;
    let mut worst = 1.0f32;
    for (text, on_gpu) in texts.iter().zip(&batched) {
        let want = cpu.embed(c.as_str(), &[text]).unwrap().vectors.remove(0);
        let alone = gpu.embed(g.as_str(), &[text]).unwrap().vectors.remove(0);
        for got in [&alone, on_gpu] {
            let cos = cosine(&want, got);
            assert!(cos >= MIN_COSINE, "{text:?}: cosine {cos} < {MIN_COSINE}");
            worst = worst.min(cos);
        }
    }
    eprintln!(
        "worst cosine {kind} vs cpu over {} sentences: {worst}",
        texts.len()
    );
}

/// MiniLM with its weights stored as f16 on the device (half the memory), still within the bound.
fn minilm_with_f16_weights_matches_the_cpu(half: &Device) {
    let cpu = Engine::builder().device(DeviceKind::Cpu).build().unwrap();
    let c = cpu.load(minilm_dir()).unwrap();
    let texts = sentences();
    let half = Engine::builder().on(half.clone()).build().unwrap();
    let h = half.load(minilm_dir()).unwrap();
    let mut worst = 1.0f32;
    for (text, got) in texts.iter().zip(half.embed(h.as_str(), &texts).unwrap().vectors) {
        let cos = cosine(&cpu.embed(c.as_str(), &[text]).unwrap().vectors.remove(0), &got);
        assert!(
            cos >= MIN_COSINE,
            "f16 weights, {text:?}: cosine {cos} < {MIN_COSINE}"
        );
        worst = worst.min(cos);
    }
    eprintln!("worst cosine with f16 weights vs cpu: {worst}");
}

fn greedy(model: &Llama, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache = model.new_cache().unwrap();
    let mut logits = model.forward(prompt, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = argmax(&logits);
        out.push(next);
        logits = model.forward(&[next], &mut cache).unwrap();
    }
    out
}

fn smollm2_greedy_tokens_match_the_cpu(gpu: &Device) {
    let gguf = GgufFile::open(&smollm2_gguf()).unwrap();
    let golden = golden("smollm2_greedy.json");
    let prompts: Vec<Vec<u32>> = golden["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["prompt_ids"]))
        .collect();
    assert!(prompts.len() >= 2);
    // The f32 path on both devices; and the GPU's quantized kernels, which multiply the same
    // dequantized weight values in f32 (the CPU's also round activations to 8 bits).
    let cpu = Llama::load(&gguf, WeightPath::F32, &Device::cpu()).unwrap();
    for path in [WeightPath::F32, WeightPath::Quantized] {
        let model = Llama::load(&gguf, path, gpu).unwrap();
        for prompt in &prompts {
            let want = greedy(&cpu, prompt, STEPS);
            let got = greedy(&model, prompt, STEPS);
            assert_eq!(got, want, "{path:?} greedy tokens on the GPU vs cpu");
        }
        // The first step's logits, for the record.
        let want = cpu.forward(&prompts[0], &mut cpu.new_cache().unwrap()).unwrap();
        let got = model
            .forward(&prompts[0], &mut model.new_cache().unwrap())
            .unwrap();
        eprintln!(
            "{path:?}: first-step logits max abs diff {}",
            max_abs_diff(&want, &got)
        );
    }
}

fn engine_generates_on_the_gpu_with_continuous_batching_and_the_prefix_cache(gpu: &Device) {
    let engine = Engine::builder().on(gpu.clone()).build().unwrap();
    let id = engine.load(smollm2_gguf()).unwrap().to_string();
    let cpu = Engine::builder().device(DeviceKind::Cpu).build().unwrap();
    let cpu_id = cpu
        .load_with(
            smollm2_gguf(),
            LoadOptions {
                weights: WeightPath::F32,
            },
        )
        .unwrap()
        .to_string();
    let params = GenerateParams {
        max_tokens: 12,
        // Long enough (16 tokens or more) for the prefix cache to keep.
        system: Some("You are a terse assistant. Answer in one short sentence, without any preamble.".into()),
        ..GenerateParams::default()
    };
    let run = |engine: &Engine, id: &str, q: &str| -> Vec<u32> {
        engine
            .generate(id, q, &params)
            .unwrap()
            .map(|t| t.unwrap().id)
            .collect()
    };
    // Two streams at once share each step (continuous batching, a KV cache on the device each).
    let questions = ["What is the capital of France?", "Name a primary colour."];
    let streams: Vec<_> = questions
        .iter()
        .map(|q| engine.generate(&id, q, &params).unwrap())
        .collect();
    for (q, stream) in questions.iter().zip(streams) {
        let got: Vec<u32> = stream.map(|t| t.unwrap().id).collect();
        assert_eq!(got, run(&cpu, &cpu_id, q), "{q}");
    }
    // A later prompt with the same system turn starts from a copy of its cached KV state.
    let hits = engine.prefix_cache_stats().unwrap().hits;
    let q = "Say hello.";
    assert_eq!(run(&engine, &id, q), run(&cpu, &cpu_id, q), "{q}");
    assert!(engine.prefix_cache_stats().unwrap().hits > hits);
}

fn batched_steps_and_cache_copies_match_one_sequence_at_a_time(gpu: &Device) {
    let gguf = GgufFile::open(&smollm2_gguf()).unwrap();
    let model = Llama::load(&gguf, WeightPath::Quantized, gpu).unwrap();
    let golden = golden("smollm2_greedy.json");
    let prompts: Vec<Vec<u32>> = golden["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["prompt_ids"]))
        .collect();
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&model, p, 6)).collect();
    // The second prompt's first half runs first; a copy of that cache takes the rest.
    let half = prompts[1].len() / 2;
    let mut prefix = model.new_cache().unwrap();
    model.forward(&prompts[1][..half], &mut prefix).unwrap();
    let (mut c0, mut c1) = (model.new_cache().unwrap(), prefix.clone());
    drop(prefix);
    let mut logits = model
        .forward_batch(&mut [(&prompts[0][..], &mut c0), (&prompts[1][half..], &mut c1)])
        .unwrap();
    let mut together = vec![Vec::new(), Vec::new()];
    for _ in 0..6 {
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        together[0].push(next[0]);
        together[1].push(next[1]);
        logits = model
            .forward_batch(&mut [(&next[..1], &mut c0), (&next[1..], &mut c1)])
            .unwrap();
    }
    assert_eq!(alone, together);
}

fn steady_state_inference_creates_no_buffers(gpu: &Device) {
    let device = gpu;
    let engine = Engine::builder().on(device.clone()).build().unwrap();
    let id = engine.load(minilm_dir()).unwrap().to_string();
    let texts = [
        "a sentence to embed",
        "and another, a little longer than the first one",
    ];
    let request = keel::Request::default().no_cache();
    let first = engine.embed_with(&id, &texts, &request).unwrap().vectors;
    let before = device.stats();
    for _ in 0..3 {
        assert_eq!(engine.embed_with(&id, &texts, &request).unwrap().vectors, first);
    }
    let after = device.stats();
    assert_eq!(
        after.buffers_created, before.buffers_created,
        "{before:?} -> {after:?}"
    );
    // One submission per forward pass, not one per op.
    assert_eq!(after.submits - before.submits, 3, "{before:?} -> {after:?}");
    assert!(after.dispatches - before.dispatches >= 3 * 40);
}
