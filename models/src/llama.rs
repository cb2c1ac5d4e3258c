//! Llama-architecture decoders (SmolLM2 and kin) from GGUF, following transformers'
//! `modeling_llama.py`: RMSNorm, grouped-query attention with rotary embeddings, SiLU-gated FFN.
//!
//! GGUF files written by llama.cpp's converter store the query and key projections permuted for
//! rotary embeddings on interleaved pairs, so this file rotates interleaved pairs
//! ([`Device::rope_interleaved`]); transformers undoes the permutation and rotates halves. Both
//! compute the same function of the same weights.

use crate::weights::GgufFile;
use crate::{Error, Result};
use keel_kernels::{Activation, Device, Linear, Tensor, Weight};

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
    /// The block-quantized weights as stored (Q4_1, Q8_0): the fast path.
    #[default]
    Quantized,
    /// Every weight dequantized to f32 at load: the reference path.
    F32,
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
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
    cos: Tensor,
    sin: Tensor,
}

/// The keys and values a sequence has seen so far, one pair per block. Each sequence owns one;
/// dropping it frees its memory.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Llama {
    /// Loads a llama decoder from a GGUF file, keeping its quantized weights or dequantizing them.
    pub fn load(gguf: &GgufFile, path: WeightPath, device: &Device) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        let weight = |name: &str, rows: usize, cols: usize| -> Result<Weight> {
            let q = gguf.qtensor(name, device)?;
            if q.shape().dims() != [rows, cols] {
                return Err(Error::Weights(format!(
                    "'{name}' has shape {:?}, expected [{rows}, {cols}]",
                    q.shape().dims()
                )));
            }
            let w = Weight::from_qtensor(q)?;
            match path {
                WeightPath::Quantized => Ok(w),
                WeightPath::F32 => w.dequantized().map_err(Error::from),
            }
        };
        let vector = |name: &str| -> Result<Tensor> {
            let t = gguf.tensor(name, device)?;
            if t.dims() != [cfg.hidden_size] {
                return Err(Error::Weights(format!(
                    "'{name}' has shape {:?}, expected [{}]",
                    t.dims(),
                    cfg.hidden_size
                )));
            }
            Ok(t)
        };
        let (h, kv) = (cfg.hidden_size, cfg.kv_heads * cfg.head_dim);
        let blocks = (0..cfg.layers)
            .map(|i| {
                let p = format!("blk.{i}");
                Ok(Block {
                    attn_norm: vector(&format!("{p}.attn_norm.weight"))?,
                    q: Linear::new(weight(&format!("{p}.attn_q.weight"), h, h)?),
                    k: Linear::new(weight(&format!("{p}.attn_k.weight"), kv, h)?),
                    v: Linear::new(weight(&format!("{p}.attn_v.weight"), kv, h)?),
                    o: Linear::new(weight(&format!("{p}.attn_output.weight"), h, h)?),
                    ffn_norm: vector(&format!("{p}.ffn_norm.weight"))?,
                    gate: Linear::new(weight(&format!("{p}.ffn_gate.weight"), cfg.ffn_size, h)?)
                        .with_activation(Activation::Silu),
                    up: Linear::new(weight(&format!("{p}.ffn_up.weight"), cfg.ffn_size, h)?),
                    down: Linear::new(weight(&format!("{p}.ffn_down.weight"), h, cfg.ffn_size)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embedding = gguf.tensor("token_embd.weight", device)?;
        // Small models tie the output projection to the token embeddings.
        let head_name = if gguf.content().tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let lm_head = Linear::new(weight(head_name, cfg.vocab_size, h)?);
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            device: device.clone(),
            norm: vector("output_norm.weight")?,
            cfg,
            embedding,
            blocks,
            lm_head,
            cos,
            sin,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// An empty KV cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.cfg.layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Runs `tokens` after what `cache` holds (a whole prompt, or one token while decoding), adds
    /// them to the cache, and returns the logits for the token that follows the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let d = &self.device;
        let cfg = &self.cfg;
        let (t, pos) = (tokens.len(), cache.len);
        if t == 0 {
            return Err(Error::EmptyInput("no tokens to run".into()));
        }
        if pos + t > cfg.context_length {
            return Err(Error::ContextOverflow {
                tokens: pos + t,
                context: cfg.context_length,
            });
        }
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let ids = Tensor::from_slice(tokens, (1, t), d.candle())?;
        let mut x = d.embedding(&self.embedding, &ids)?;
        let (cos, sin) = (self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?);
        let mask = if t > 1 {
            Some(causal_mask(t, pos, d)?)
        } else {
            None
        };
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = d.rms_norm(&x, &block.attn_norm, cfg.rms_eps)?;
            let heads = |layer: &Linear, n: usize| -> Result<Tensor> {
                Ok(d.linear(&h, layer)?
                    .reshape((1, t, n, cfg.head_dim))?
                    .transpose(1, 2)?)
            };
            let q = d.rope_interleaved(&heads(&block.q, cfg.heads)?, &cos, &sin)?;
            let k = d.rope_interleaved(&heads(&block.k, cfg.kv_heads)?, &cos, &sin)?;
            let v = heads(&block.v, cfg.kv_heads)?.contiguous()?;
            let (k, v) = match layer_cache.take() {
                Some((past_k, past_v)) => (Tensor::cat(&[&past_k, &k], 2)?, Tensor::cat(&[&past_v, &v], 2)?),
                None => (k, v),
            };
            let context = d.attention(&q, &k, &v, mask.as_ref(), scale)?;
            *layer_cache = Some((k, v));
            let context = context.transpose(1, 2)?.reshape((1, t, cfg.hidden_size))?;
            x = d.add(&x, &d.linear(&context, &block.o)?)?;
            let h = d.rms_norm(&x, &block.ffn_norm, cfg.rms_eps)?;
            let gated = d.mul(&d.linear(&h, &block.gate)?, &d.linear(&h, &block.up)?)?;
            x = d.add(&x, &d.linear(&gated, &block.down)?)?;
        }
        cache.len += t;
        let last = d.rms_norm(&x.narrow(1, t - 1, 1)?, &self.norm, cfg.rms_eps)?;
        Ok(d.linear(&last, &self.lm_head)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// cos and sin of every position's rotation angles, `[context, head_dim / 2]`, computed in f32 as
/// transformers does so that both round alike.
fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32))
        .collect();
    let angles: Vec<f32> = (0..cfg.context_length)
        .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (cfg.context_length, half), device.candle())?;
    Ok((angles.cos()?, angles.sin()?))
}

/// `[t, pos + t]`: query i (at position pos + i) may see keys 0..=pos + i.
fn causal_mask(t: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..pos + t).map(move |j| if j > pos + i { -1e30 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, pos + t), device.candle())?)
}
