//! all-MiniLM-L6-v2 against transformers (tests/golden/minilm.json, made by make_golden.py).

mod common;
use common::*;
use keel::Engine;

/// Per-component tolerance against PyTorch: both compute in f32; different summation orders in
/// the matrix products leave differences of a few 1e-7 on unit vectors.
const GOLDEN_TOLERANCE: f32 = 1e-4;
/// Batched vs one at a time: padding is masked out exactly, so only summation order differs.
const BATCH_TOLERANCE: f32 = 1e-5;

fn engine() -> (Engine, String) {
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(minilm_dir()).unwrap();
    (engine, id.to_string())
}

#[test]
fn embeddings_match_pytorch() {
    let (engine, id) = engine();
    let golden = golden("minilm.json");
    let sentences = golden["sentences"].as_array().unwrap();
    assert!(sentences.len() >= 8);
    let mut worst = 0.0f32;
    for s in sentences {
        let text = s["text"].as_str().unwrap();
        assert_eq!(
            engine.tokenize(&id, text, false).unwrap(),
            ids(&s["token_ids"]),
            "token ids of {text:?}"
        );
        let got = engine.embed(&id, &[text]).unwrap().vectors.remove(0);
        let diff = max_abs_diff(&got, &floats(&s["embedding"]));
        assert!(
            diff <= GOLDEN_TOLERANCE,
            "{text:?}: max abs diff {diff} > {GOLDEN_TOLERANCE}"
        );
        worst = worst.max(diff);
    }
    eprintln!("worst max abs diff vs PyTorch: {worst:e}");
}

#[test]
fn batched_equals_one_at_a_time() {
    let (engine, id) = engine();
    let golden = golden("minilm.json");
    let texts: Vec<&str> = golden["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let batched = engine.embed(&id, &texts).unwrap().vectors;
    let mut worst = 0.0f32;
    for (text, b) in texts.iter().zip(&batched) {
        let single = engine.embed(&id, &[text]).unwrap().vectors.remove(0);
        let diff = max_abs_diff(b, &single);
        assert!(
            diff <= BATCH_TOLERANCE,
            "{text:?}: batched vs single differ by {diff}"
        );
        worst = worst.max(diff);
    }
    // Another order and another batch size must not change any vector either.
    let reversed: Vec<&str> = texts.iter().rev().copied().collect();
    let again = engine.embed(&id, &reversed[..3]).unwrap().vectors;
    for (i, v) in again.iter().enumerate() {
        let diff = max_abs_diff(v, &batched[texts.len() - 1 - i]);
        assert!(diff <= BATCH_TOLERANCE);
    }
    eprintln!("worst batched-vs-single diff: {worst:e}");
}

/// A batch of more tokens than the encoder runs through its layers at once (it splits such a
/// batch into groups of whole sequences): every vector still equals its sentence alone.
#[test]
fn batch_larger_than_a_layer_group_equals_one_at_a_time() {
    use keel_models::bert::{EncoderFiles, SentenceEncoder};
    let dir = minilm_dir();
    let files = EncoderFiles {
        config: &dir.join("config.json"),
        weights: &dir.join("model.safetensors"),
        tokenizer: &dir.join("tokenizer.json"),
        max_tokens: Some(256),
    };
    let device = keel_kernels::Device::cpu();
    let encoder = SentenceEncoder::load(&files, Default::default(), &device).unwrap();
    let golden = golden("minilm.json");
    let short: Vec<String> = golden["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    // Short sentences between long ones (up to 256 tokens), 2,000+ tokens in all.
    let mut texts = Vec::new();
    for round in 0..8 {
        texts.extend(short.iter().cloned());
        texts.push(short[round % short.len()].repeat(12 + 4 * round));
    }
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens: usize = encoder.tokenize(&texts).unwrap().iter().map(Vec::len).sum();
    assert!(
        tokens > 2048,
        "the batch must span several groups ({tokens} tokens)"
    );
    let batched = encoder.embed(&texts).unwrap();
    let mut worst = 0.0f32;
    for (text, b) in texts.iter().zip(&batched) {
        let diff = max_abs_diff(b, &encoder.embed(&[text]).unwrap()[0]);
        assert!(
            diff <= BATCH_TOLERANCE,
            "{text:?}: batched vs single differ by {diff}"
        );
        worst = worst.max(diff);
    }
    eprintln!(
        "{} sentences, {tokens} tokens: worst batched-vs-single diff {worst:e}",
        texts.len()
    );
}

#[test]
fn embeddings_are_unit_length_and_semantic() {
    let (engine, id) = engine();
    let v = engine
        .embed(
            &id,
            &[
                "A man is playing a guitar.",
                "Someone plays an instrument.",
                "The stock market fell.",
            ],
        )
        .unwrap()
        .vectors;
    for x in &v {
        let norm: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(
        cos(&v[0], &v[1]) > cos(&v[0], &v[2]) + 0.2,
        "related sentences must be closer"
    );
}

/// The int8 path (weights per output channel, activations per row) against the f32 path.
const INT8_MIN_COSINE: f32 = 0.995;

#[test]
fn int8_path_keeps_cosine_to_f32() {
    let engine = Engine::builder().build().unwrap();
    let f32_id = engine.load(minilm_dir()).unwrap().to_string();
    let int8_id = engine
        .load_with(
            minilm_dir(),
            keel::LoadOptions {
                weights: keel::WeightPath::Int8,
            },
        )
        .unwrap()
        .to_string();
    assert_ne!(f32_id, int8_id, "another weight path is another version");
    let golden = golden("minilm.json");
    let texts: Vec<&str> = golden["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let a = engine.embed(&f32_id, &texts).unwrap().vectors;
    let b = engine.embed(&int8_id, &texts).unwrap().vectors;
    let mut worst = 1.0f32;
    for ((x, y), text) in a.iter().zip(&b).zip(&texts) {
        let cosine: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        assert!(cosine >= INT8_MIN_COSINE, "{text:?}: cosine {cosine}");
        worst = worst.min(cosine);
    }
    eprintln!("int8 vs f32: worst cosine {worst}");
}
