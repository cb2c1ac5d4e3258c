//! Llama-architecture decoders (SmolLM2 and kin) from GGUF, following transformers'
//! `modeling_llama.py`: RMSNorm, grouped-query attention with rotary embeddings, SiLU-gated FFN.
//!
//! GGUF files written by llama.cpp's converter store the query and key projections permuted for
//! rotary embeddings on interleaved pairs, so Keel rotates interleaved pairs ([`Rope`]);
//! transformers undoes the permutation and rotates halves. Both compute the same function of the
//! same weights.

use crate::weights::GgufFile;
use crate::{Error, Result};
pub use keel_kernels::KvCache;
use keel_kernels::{Device, Linear, Rope, Tensor, Weight};

/// The hyper-parameters of a llama decoder, read from `llama.*` GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Rows of the token embedding table.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of decoder blocks.
    pub layers: usize,
    /// Query heads per block.
    pub heads: usize,
    /// Key/value heads per block (fewer than `heads` for grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn_size: usize,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f32,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f32,
    /// Longest sequence (prompt plus generated tokens) the model was trained for.
    pub context_length: usize,
}

impl Config {
    /// Reads the hyper-parameters of a llama GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.string("general.architecture")?;
        if arch != "llama" {
            return Err(Error::UnknownArchitecture(arch.to_string()));
        }
        let hidden_size = gguf.usize("llama.embedding_length")?;
        let heads = gguf.usize("llama.attention.head_count")?;
        let kv_heads = if gguf.has("llama.attention.head_count_kv") {
            gguf.usize("llama.attention.head_count_kv")?
        } else {
            heads
        };
        if heads == 0 || kv_heads == 0 || hidden_size % heads != 0 || heads % kv_heads != 0 {
            return Err(Error::Format {
                path: gguf.path().into(),
                format: "GGUF",
                reason: format!(
                    "{heads} heads, {kv_heads} kv heads and width {hidden_size} do not fit together"
                ),
            });
        }
        let embd = gguf
            .content()
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims().to_vec());
        let vocab_size = match embd.as_deref() {
            Some([rows, _]) => *rows,
            _ => {
                return Err(Error::Weights(
                    "token_embd.weight is missing or not a matrix".into(),
                ))
            }
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            layers: gguf.usize("llama.block_count")?,
            heads,
            kv_heads,
            head_dim: hidden_size / heads,
            ffn_size: gguf.usize("llama.feed_forward_length")?,
            rope_theta: if gguf.has("llama.rope.freq_base") {
                gguf.f32("llama.rope.freq_base")?
            } else {
                10_000.0
            },
            rms_eps: gguf.f32("llama.attention.layer_norm_rms_epsilon")?,
            context_length: gguf.usize("llama.context_length")?,
        })
    }
}

/// Which weights the matrix products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightPath {
    /// The weights as stored: block-quantized GGUF tensors (Q4_1, Q8_0) stay quantized, f32
    /// safetensors stay f32. The default.
    #[default]
    Quantized,
    /// Every weight dequantized to f32 at load: the reference path.
    F32,
    /// f32 matrices quantized at load to int8 per output channel (an encoder's fast path);
    /// block-quantized tensors stay as stored.
    Int8,
}

struct Block {
    attn_norm: Tensor,
    /// Query, key and value projections stacked: `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    qkv: Linear,
    o: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `[2 * ffn, hidden]`.
    gate_up: Linear,
    down: Linear,
}

/// A llama decoder, ready to run.
pub struct Llama {
    device: Device,
    cfg: Config,
    embedding: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
}

impl Llama {
    /// Loads a llama decoder from a GGUF file, keeping its quantized weights or dequantizing them.
    pub fn load(gguf: &GgufFile, path: WeightPath, device: &Device) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            let q = gguf.qtensor(name)?;
            if q.shape().dims() != [rows, cols] {
                return Err(Error::Weights(format!(
                    "'{name}' has shape {:?}, expected [{rows}, {cols}]",
                    q.shape().dims()
                )));
            }
            let w = Weight::from_qtensor(q)?;
            Ok(Linear::new(match path {
                WeightPath::Quantized => w,
                WeightPath::F32 => w.dequantized()?,
                WeightPath::Int8 => w.to_int8()?,
            }))
        };
        let upload = |layer: Linear| -> Result<Linear> { Ok(device.upload_linear(&layer)?) };
        let vector = |name: &str| -> Result<Tensor> {
            let t = gguf.tensor(name)?;
            if t.dims() != [cfg.hidden_size] {
                return Err(Error::Weights(format!(
                    "'{name}' has shape {:?}, expected [{}]",
                    t.dims(),
                    cfg.hidden_size
                )));
            }
            Ok(device.upload(&t)?)
        };
        let (h, kv) = (cfg.hidden_size, cfg.kv_heads * cfg.head_dim);
        let blocks = (0..cfg.layers)
            .map(|i| {
                let p = format!("blk.{i}");
                let q = linear(&format!("{p}.attn_q.weight"), h, h)?;
                let k = linear(&format!("{p}.attn_k.weight"), kv, h)?;
                let v = linear(&format!("{p}.attn_v.weight"), kv, h)?;
                let gate = linear(&format!("{p}.ffn_gate.weight"), cfg.ffn_size, h)?;
                let up = linear(&format!("{p}.ffn_up.weight"), cfg.ffn_size, h)?;
                Ok(Block {
                    attn_norm: vector(&format!("{p}.attn_norm.weight"))?,
                    qkv: upload(Linear::stack(&[q, k, v])?)?,
                    o: upload(linear(&format!("{p}.attn_output.weight"), h, h)?)?,
                    ffn_norm: vector(&format!("{p}.ffn_norm.weight"))?,
                    gate_up: upload(Linear::stack(&[gate, up])?)?,
                    down: upload(linear(&format!("{p}.ffn_down.weight"), h, cfg.ffn_size)?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embedding = device.upload(&gguf.tensor("token_embd.weight")?)?;
        // Small models tie the output projection to the token embeddings.
        let head_name = if gguf.content().tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let lm_head = upload(linear(head_name, cfg.vocab_size, h)?)?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.context_length);
        Ok(Self {
            device: device.clone(),
            norm: vector("output_norm.weight")?,
            cfg,
            embedding,
            blocks,
            lm_head,
            rope,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// An empty KV cache for a new sequence, on the model's device.
    pub fn new_cache(&self) -> Result<KvCache> {
        Ok(self
            .device
            .new_kv_cache(self.cfg.layers, self.cfg.kv_heads, self.cfg.head_dim)?)
    }

    /// Runs `tokens` after what `cache` holds (a whole prompt, or one token while decoding), adds
    /// them to the cache, and returns the logits for the token that follows the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut logits = self.forward_batch(&mut [(tokens, cache)])?;
        Ok(logits.remove(0))
    }

    /// One step for several sequences at once (continuous batching): each entry's tokens run
    /// after what its own cache holds. The matrix products see every sequence's tokens together
    /// (each weight is read once per step, not once per sequence); attention stays within each
    /// sequence. Returns each sequence's next-token logits, in order. A sequence's result does
    /// not depend on the others in the batch beyond float rounding.
    pub fn forward_batch(&self, batch: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for (tokens, cache) in batch.iter() {
            if tokens.is_empty() {
                return Err(Error::EmptyInput("no tokens to run".into()));
            }
            if cache.len() + tokens.len() > cfg.context_length {
                return Err(Error::ContextOverflow {
                    tokens: cache.len() + tokens.len(),
                    context: cfg.context_length,
                });
            }
            if let Some(bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(Error::Tokenizer(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
        }
        let result = self.device.run(|| self.run(batch));
        for (tokens, cache) in batch.iter_mut() {
            match result {
                Ok(_) => cache.commit(tokens.len()),
                // A failed step leaves no half-written tokens behind.
                Err(_) => cache.rollback(),
            }
        }
        result
    }

    fn run(&self, batch: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        let (d, cfg) = (&self.device, &self.cfg);
        // Token-major all the way: one [tokens, hidden] matrix for the whole batch, heads side by
        // side within a row.
        let all: Vec<u32> = batch.iter().flat_map(|(t, _)| t.iter().copied()).collect();
        let ids = d.tensor_u32(&all, &[all.len()])?;
        let mut x = d.embedding(&self.embedding, &ids)?;
        let (_, mut h) = d.add_rms_norm(&x, None, &self.blocks[0].attn_norm, cfg.rms_eps)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let qkv = d.linear(&h, &block.qkv)?;
            let single = batch.len() == 1;
            let mut contexts = Vec::with_capacity(batch.len());
            let mut start = 0;
            for (tokens, cache) in batch.iter_mut() {
                let rows = match single {
                    true => qkv.clone(),
                    false => d.rows(&qkv, start, tokens.len())?,
                };
                contexts.push(d.causal_attention(
                    &rows,
                    cfg.heads,
                    cfg.kv_heads,
                    &self.rope,
                    cache,
                    layer,
                )?);
                start += tokens.len();
            }
            let context = if contexts.len() == 1 {
                contexts.remove(0)
            } else {
                d.concat_rows(&contexts)?
            };
            let attended = d.linear(&context, &block.o)?;
            (x, h) = d.add_rms_norm(&attended, Some(&x), &block.ffn_norm, cfg.rms_eps)?;
            let ff = d.linear(&d.swiglu(&d.linear(&h, &block.gate_up)?)?, &block.down)?;
            let next_norm = self.blocks.get(layer + 1).map_or(&self.norm, |b| &b.attn_norm);
            (x, h) = d.add_rms_norm(&ff, Some(&x), next_norm, cfg.rms_eps)?;
        }
        // Only each sequence's last token needs logits.
        let mut ends = Vec::with_capacity(batch.len());
        let mut end = 0;
        for (tokens, _) in batch.iter() {
            end += tokens.len();
            ends.push(end as u32 - 1);
        }
        let last = d.embedding(&h, &d.tensor_u32(&ends, &[batch.len()])?)?;
        Ok(d.linear(&last, &self.lm_head)?.to_vec2()?)
    }
}
