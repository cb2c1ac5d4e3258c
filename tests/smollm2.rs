//! SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers (tests/golden/smollm2_*.json, made by
//! make_golden.py from the same file).

mod common;
use common::*;
use keel::{Engine, FinishReason, GenerateParams, LoadOptions, WeightPath};
use keel_kernels::Device;
use keel_models::llama::Llama;
use keel_models::sampling::argmax;
use keel_models::weights::GgufFile;

/// A greedy step may differ from the reference only where the reference's two best logits are
/// closer than this: float rounding (different summation orders) can flip such a near-tie, and
/// the sequences go separate ways from there. Measured f32-path logit differences are ~1e-4,
/// so 0.01 leaves a wide margin; every step of the committed golden runs has a larger gap, so in
/// practice all steps must match.
const NEAR_TIE: f32 = 0.01;
/// First-step logits of Keel's f32 path vs PyTorch's, on the 50 largest (values around 25).
const F32_LOGIT_TOLERANCE: f32 = 2e-3;
/// Quantized path vs f32 path, first step, over the whole vocabulary (logits span about -10..25).
/// The quantized path also quantizes every activation row to 8 bits per block of 32 before each
/// matrix product, prompt included, as llama.cpp does on the CPU; over 30 layers that moves
/// logits by up to about 2 (measured: 2.10 and 1.35 on the two prompts).
const QUANTIZED_LOGIT_TOLERANCE: f32 = 3.0;
/// ...while the logit vector as a whole keeps its direction (measured: 0.9960 and 0.9979).
const QUANTIZED_MIN_COSINE: f32 = 0.99;

fn load(path: WeightPath) -> Llama {
    let gguf = GgufFile::open(&smollm2_gguf()).unwrap();
    Llama::load(&gguf, path, &Device::cpu()).unwrap()
}

#[test]
fn tokenizer_matches_hugging_face() {
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(smollm2_gguf()).unwrap().to_string();
    let golden = golden("smollm2_tokenizer.json");
    for p in golden["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        assert_eq!(
            engine.tokenize(&id, text, false).unwrap(),
            ids(&p["ids"]),
            "ids of {text:?}"
        );
    }
    for c in golden["chat"].as_array().unwrap() {
        let user = c["user"].as_str().unwrap();
        assert_eq!(
            engine.tokenize(&id, user, true).unwrap(),
            ids(&c["ids"]),
            "chat ids of {user:?}"
        );
    }
}

#[test]
fn f32_path_greedy_matches_transformers() {
    let model = load(WeightPath::F32);
    let golden = golden("smollm2_greedy.json");
    let steps = golden["steps"].as_u64().unwrap() as usize;
    assert!(steps >= 32);
    for run in golden["runs"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let expected = ids(&run["greedy_ids"]);
        let margins = floats(&run["top2_margins"]);
        let mut cache = model.new_cache().unwrap();
        let mut logits = model.forward(&prompt, &mut cache).unwrap();

        let top_ids = ids(&run["first_step_top_ids"]);
        let top_logits = floats(&run["first_step_top_logits"]);
        let ours: Vec<f32> = top_ids.iter().map(|&i| logits[i as usize]).collect();
        let diff = max_abs_diff(&ours, &top_logits);
        assert!(diff <= F32_LOGIT_TOLERANCE, "first-step logits differ by {diff}");
        eprintln!("first-step top-50 logits vs PyTorch: max abs diff {diff:e}");

        for step in 0..steps {
            // The reference ran with min_new_tokens = steps, which bans EOS (id 2): do the same.
            logits[2] = f32::NEG_INFINITY;
            let next = argmax(&logits);
            if next != expected[step] {
                assert!(
                    margins[step] < NEAR_TIE,
                    "step {step}: {next} != {} and the reference's margin {} is no near-tie",
                    expected[step],
                    margins[step]
                );
                eprintln!("near-tie at step {step}: stopping the comparison there");
                break;
            }
            logits = model.forward(&[next], &mut cache).unwrap();
        }
    }
}

#[test]
fn quantized_first_step_logits_are_close_to_f32() {
    let (q, f) = (load(WeightPath::Quantized), load(WeightPath::F32));
    let golden = golden("smollm2_greedy.json");
    for run in golden["runs"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let lq = q.forward(&prompt, &mut q.new_cache().unwrap()).unwrap();
        let lf = f.forward(&prompt, &mut f.new_cache().unwrap()).unwrap();
        let diff = max_abs_diff(&lq, &lf);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let cosine = dot(&lq, &lf) / (dot(&lq, &lq).sqrt() * dot(&lf, &lf).sqrt());
        eprintln!("quantized vs f32 first-step logits: max abs diff {diff}, cosine {cosine}");
        assert!(
            diff <= QUANTIZED_LOGIT_TOLERANCE,
            "quantized logits differ by {diff}"
        );
        assert!(cosine >= QUANTIZED_MIN_COSINE, "cosine {cosine}");
        // The first token may flip only among near-ties: it must be one of the f32 path's best
        // five (the reference's top two logits differ by 0.08 and 0.11 on these prompts).
        let mut order: Vec<usize> = (0..lf.len()).collect();
        order.sort_by(|&a, &b| lf[b].total_cmp(&lf[a]));
        assert!(
            order[..5].contains(&(argmax(&lq) as usize)),
            "quantized first token is far from f32's"
        );
    }
}

#[test]
fn quantized_chat_reply_is_coherent_and_stops_at_eos() {
    let engine = Engine::builder().build().unwrap();
    let id = engine
        .load_with(
            smollm2_gguf(),
            LoadOptions {
                weights: WeightPath::Quantized,
            },
        )
        .unwrap()
        .to_string();
    let done = engine
        .generate(
            &id,
            "What is the capital of France? Answer in one short sentence.",
            &GenerateParams::greedy().max_tokens(64),
        )
        .unwrap()
        .complete()
        .unwrap();
    eprintln!("reply: {:?}", done.text);
    assert_eq!(
        done.finish,
        FinishReason::Stop,
        "the reply must end with the end-of-turn token"
    );
    assert!(!done.text.trim().is_empty());
    assert!(done.text.contains("Paris"), "reply: {:?}", done.text);
}

#[test]
fn streaming_text_equals_decoded_ids_and_sampling_is_seeded() {
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(smollm2_gguf()).unwrap().to_string();
    let params = GenerateParams::sampled(0.8, 40, 0.95, 7).max_tokens(24);
    let a = engine
        .generate(&id, "Tell me about the sea.", &params)
        .unwrap()
        .complete()
        .unwrap();
    let b = engine
        .generate(&id, "Tell me about the sea.", &params)
        .unwrap()
        .complete()
        .unwrap();
    assert_eq!(
        a.token_ids, b.token_ids,
        "the same seed must give the same tokens"
    );
    let c = engine
        .generate(
            &id,
            "Tell me about the sea.",
            &GenerateParams {
                sampling: keel::Sampling::Random {
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.95,
                    seed: 8,
                },
                ..params.clone()
            },
        )
        .unwrap()
        .complete()
        .unwrap();
    assert_ne!(a.token_ids, c.token_ids, "another seed should give other tokens");
    assert!(a.token_ids.len() <= 24);
}

#[test]
fn batched_decode_equals_one_sequence_at_a_time() {
    let model = load(WeightPath::Quantized);
    let golden = golden("smollm2_greedy.json");
    let prompts: Vec<Vec<u32>> = golden["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["prompt_ids"]))
        .collect();
    // Alone: greedy tokens of each prompt.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = model.new_cache().unwrap();
            let mut logits = model.forward(p, &mut cache).unwrap();
            (0..12)
                .map(|_| {
                    let next = argmax(&logits);
                    logits = model.forward(&[next], &mut cache).unwrap();
                    next
                })
                .collect()
        })
        .collect();
    // Together: both prompts prefilled in one batch, then decoded side by side.
    let (mut c0, mut c1) = (model.new_cache().unwrap(), model.new_cache().unwrap());
    let mut logits = model
        .forward_batch(&mut [(&prompts[0][..], &mut c0), (&prompts[1][..], &mut c1)])
        .unwrap();
    let mut together = vec![Vec::new(), Vec::new()];
    for _ in 0..12 {
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        together[0].push(next[0]);
        together[1].push(next[1]);
        logits = model
            .forward_batch(&mut [(&next[..1], &mut c0), (&next[1..], &mut c1)])
            .unwrap();
    }
    assert_eq!(alone, together);
    assert_eq!(c0.len(), prompts[0].len() + 12);
}

#[test]
fn stop_texts_end_the_reply_where_they_appear() {
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(smollm2_gguf()).unwrap().to_string();
    let greedy = GenerateParams::greedy().max_tokens(40);
    let prompt = "Name three colours.";
    let full = engine.generate(&id, prompt, &greedy).unwrap().complete().unwrap();
    // A stop text from the middle of the reply (and spanning tokens): the reply ends before it.
    let start = full
        .text
        .char_indices()
        .nth(full.text.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = full.text[start..].chars().take(4).collect();
    let at = full.text.find(&stop).unwrap();
    let mut stream = engine
        .generate(&id, prompt, &greedy.clone().stop_at(stop.as_str()))
        .unwrap();
    let streamed: String = (&mut stream).map(|t| t.unwrap().text).collect();
    assert_eq!(streamed, full.text[..at], "stop text {stop:?}");
    assert_eq!(stream.finish_reason(), Some(FinishReason::Stop));
    // A stop text that never appears, but whose start does: nothing is lost or held back.
    let never = format!("{}\u{1}never", &full.text[..1]);
    let same = engine
        .generate(&id, prompt, &greedy.clone().stop_at(never))
        .unwrap()
        .complete()
        .unwrap();
    assert_eq!((same.text, same.finish), (full.text, full.finish));
    let e = engine.generate(&id, prompt, &greedy.stop_at("")).err().unwrap();
    assert_eq!(e.kind(), keel::ErrorKind::InvalidArgument);
}
