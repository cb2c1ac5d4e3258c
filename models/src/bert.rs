//! BERT encoders (all-MiniLM-L6-v2 and kin), following transformers' `modeling_bert.py`, and the
//! sentence-transformers recipe on top: mean pooling over each text's tokens, then L2 normalize.
//! A batch runs packed: the texts' tokens back to back, no padding.

use crate::llama::WeightPath;
use crate::weights::SafetensorsFile;
use crate::{Error, Result};
use keel_kernels::{Activation, Device, Linear, Tensor, Weight};
use serde::Deserialize;
use std::path::Path;

/// The fields of a transformers `config.json` that a BERT encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Must be "bert".
    pub model_type: String,
    /// Rows of the token embedding table.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer ("gelu" is the exact erf GELU).
    pub hidden_act: String,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding table.
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
}

impl Config {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let bad = |reason: String| Error::Format {
            path: path.into(),
            format: "config.json",
            reason,
        };
        let cfg: Config = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if cfg.model_type != "bert" {
            return Err(Error::UnknownArchitecture(cfg.model_type));
        }
        if cfg.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act '{}' is not supported (only 'gelu')",
                cfg.hidden_act
            )));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(bad("hidden_size must be a multiple of num_attention_heads".into()));
        }
        Ok(cfg)
    }
}

struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
}

struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

struct Layer {
    /// Query, key and value projections stacked into one `[3 * hidden, hidden]` matrix.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// Tokens that go through the layers together. A larger packed batch runs in groups of whole
/// sequences: past about a thousand tokens a group only adds memory traffic (MiniLM on the CPU:
/// 8 x 128 tokens at 78 sentences/s, 32 x 128 in one group at 70), and its activations outgrow a
/// worker thread's 64 MiB malloc heap, which is then unmapped and faulted in again every batch.
const GROUP_TOKENS: usize = 1024;

/// A BERT encoder: token ids and an attention mask in, hidden states out.
pub struct Bert {
    device: Device,
    cfg: Config,
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

struct Loader<'a> {
    file: &'a SafetensorsFile,
    device: &'a Device,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.device.upload(&self.file.tensor(name, shape)?)?)
    }

    fn norm(&self, prefix: &str, width: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: self.get(&format!("{prefix}.weight"), &[width])?,
            beta: self.get(&format!("{prefix}.bias"), &[width])?,
        })
    }

    /// A layer in host memory: stacked, quantized and uploaded by the caller.
    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let weight = self.file.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        Ok(
            Linear::new(Weight::Dense(weight))
                .with_bias(self.file.tensor(&format!("{prefix}.bias"), &[out])?),
        )
    }
}

impl Bert {
    /// Loads the encoder from a safetensors file whose names follow transformers' `BertModel`
    /// (with or without a leading `bert.`).
    pub fn load(weights: &SafetensorsFile, cfg: Config, path: WeightPath, device: &Device) -> Result<Self> {
        // The int8 path quantizes a dense layer per output channel. Measured on the golden sentences
        // (worst cosine to the f32 embeddings, one kind of layer in int8 at a time): QKV 0.9946,
        // attention output 0.99994, intermediate 0.9974, output 0.9977; all but QKV together
        // 0.9956. So the QKV projection stays f32 and the other three (75% of the MACs) go int8.
        let precision = |layer: Linear, quantize: bool| -> Result<Linear> {
            let layer = match path {
                WeightPath::Int8 if quantize => Linear {
                    weight: layer.weight.to_int8()?,
                    ..layer
                },
                WeightPath::Int8 | WeightPath::Quantized | WeightPath::F32 => layer,
            };
            Ok(device.upload_linear(&layer)?)
        };
        let prefix = if weights.info("bert.embeddings.word_embeddings.weight").is_some() {
            "bert."
        } else {
            ""
        };
        let l = Loader {
            file: weights,
            device,
        };
        let h = cfg.hidden_size;
        let embeddings = Embeddings {
            word: l.get(
                &format!("{prefix}embeddings.word_embeddings.weight"),
                &[cfg.vocab_size, h],
            )?,
            position: l.get(
                &format!("{prefix}embeddings.position_embeddings.weight"),
                &[cfg.max_position_embeddings, h],
            )?,
            token_type: l.get(
                &format!("{prefix}embeddings.token_type_embeddings.weight"),
                &[cfg.type_vocab_size, h],
            )?,
            norm: l.norm(&format!("{prefix}embeddings.LayerNorm"), h)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layer.{i}");
                let q = l.linear(&format!("{p}.attention.self.query"), h, h)?;
                let k = l.linear(&format!("{p}.attention.self.key"), h, h)?;
                let v = l.linear(&format!("{p}.attention.self.value"), h, h)?;
                Ok(Layer {
                    qkv: precision(Linear::stack(&[q, k, v])?, false)?,
                    attention_output: precision(
                        l.linear(&format!("{p}.attention.output.dense"), h, h)?,
                        true,
                    )?,
                    attention_norm: l.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                    intermediate: precision(
                        l.linear(&format!("{p}.intermediate.dense"), cfg.intermediate_size, h)?
                            .with_activation(Activation::GeluErf),
                        true,
                    )?,
                    output: precision(
                        l.linear(&format!("{p}.output.dense"), h, cfg.intermediate_size)?,
                        true,
                    )?,
                    output_norm: l.norm(&format!("{p}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            device: device.clone(),
            cfg,
            embeddings,
            layers,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Hidden states `[tokens, hidden]` for a packed batch of token ids (`[tokens]`, u32): the
    /// sequences back to back with no padding, `lengths[b]` tokens each. A sequence's result does
    /// not depend on its batch-mates, and no work is spent on padding.
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let d = &self.device;
        let tokens: usize = lengths.iter().sum();
        if ids.dims() != [tokens] || lengths.contains(&0) || lengths.is_empty() {
            return Err(Error::EmptyInput(format!(
                "token ids of shape {:?} for sequences of {lengths:?} tokens",
                ids.dims()
            )));
        }
        let longest = lengths.iter().max().copied().unwrap_or(0);
        if longest > self.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                tokens: longest,
                context: self.cfg.max_position_embeddings,
            });
        }
        d.run(|| self.forward_groups(ids, lengths))
    }

    /// `forward` after its checks: groups of sequences through the layers.
    fn forward_groups(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let d = &self.device;
        if ids.dims()[0] <= GROUP_TOKENS {
            return self.forward_group(ids, lengths);
        }
        // Whole sequences in groups of at most GROUP_TOKENS tokens (a longer sequence alone).
        let mut parts = Vec::new();
        let (mut first, mut start) = (0, 0);
        while first < lengths.len() {
            let mut end = first + 1;
            let mut len = lengths[first];
            while end < lengths.len() && len + lengths[end] <= GROUP_TOKENS {
                len += lengths[end];
                end += 1;
            }
            parts.push(self.forward_group(&d.rows(ids, start, len)?, &lengths[first..end])?);
            (first, start) = (end, start + len);
        }
        Ok(d.concat_rows(&parts)?)
    }

    /// `forward` on sequences that run through the layers together.
    fn forward_group(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let d = &self.device;
        let tokens = ids.dims()[0];
        let eps = self.cfg.layer_norm_eps as f32;
        let e = &self.embeddings;
        // Position ids restart at 0 in each sequence and every token type is 0, as transformers
        // uses for one segment.
        let positions: Vec<u32> = lengths.iter().flat_map(|&n| 0..n as u32).collect();
        let positions = d.embedding(&e.position, &d.tensor_u32(&positions, &[tokens])?)?;
        let x = d.add(&d.embedding(&e.word, ids)?, &positions)?;
        let x = d.add(&x, &d.rows(&e.token_type, 0, 1)?)?;
        let mut x = d.add_layer_norm(&x, None, &e.norm.gamma, &e.norm.beta, eps)?;
        for layer in &self.layers {
            let qkv = d.linear(&x, &layer.qkv)?;
            let context = d.encoder_attention(&qkv, lengths, self.cfg.num_attention_heads)?;
            let attended = d.linear(&context, &layer.attention_output)?;
            let n = &layer.attention_norm;
            let h = d.add_layer_norm(&attended, Some(&x), &n.gamma, &n.beta, eps)?;
            let ff = d.linear(&d.linear(&h, &layer.intermediate)?, &layer.output)?;
            let n = &layer.output_norm;
            x = d.add_layer_norm(&ff, Some(&h), &n.gamma, &n.beta, eps)?;
        }
        Ok(x)
    }
}

/// A sentence encoder: tokenizer + BERT + mean pooling + L2 normalization, as
/// sentence-transformers runs all-MiniLM-L6-v2.
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    max_tokens: usize,
}

/// The files of a sentence encoder.
pub struct EncoderFiles<'a> {
    /// transformers' `config.json`.
    pub config: &'a Path,
    /// The weights.
    pub weights: &'a Path,
    /// A tokenizers `tokenizer.json`.
    pub tokenizer: &'a Path,
    /// Longest input in tokens; longer texts are truncated (sentence-transformers' `max_seq_length`).
    pub max_tokens: Option<usize>,
}

impl SentenceEncoder {
    /// Loads the encoder from its files.
    pub fn load(files: &EncoderFiles<'_>, path: WeightPath, device: &Device) -> Result<Self> {
        let cfg = Config::from_file(files.config)?;
        let weights = SafetensorsFile::open(files.weights)?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(files.tokenizer).map_err(|e| Error::Format {
            path: files.tokenizer.into(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })?;
        // Truncation is the encoder's job, and a batch is packed without padding; a
        // tokenizer.json that pads every text to a fixed length would make padding look like
        // real tokens.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let max_tokens = files
            .max_tokens
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        let bert = Bert::load(&weights, cfg, path, device)?;
        Ok(Self {
            bert,
            tokenizer,
            max_tokens,
        })
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.bert.cfg.hidden_size
    }

    /// Longest input in tokens (longer texts are truncated).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of each text, with `[CLS]` and `[SEP]`, truncated to [`Self::max_tokens`].
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .tokenize_counted(texts)?
            .into_iter()
            .map(|(ids, _)| ids)
            .collect())
    }

    /// [`SentenceEncoder::tokenize`], with each text's length in tokens before the cut (more
    /// than [`Self::max_tokens`] means the text was cut).
    pub fn tokenize_counted(&self, texts: &[&str]) -> Result<Vec<(Vec<u32>, usize)>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| Ok(self.cut(self.encode(i, text)?)))
            .collect()
    }

    /// The token ids of text number `i` of a batch, with `[CLS]` and `[SEP]`, before any cut.
    ///
    /// # Errors
    /// An empty (or all-whitespace) text; the tokenizer's errors.
    pub fn encode(&self, i: usize, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(Error::EmptyInput(format!("text {i} is empty")));
        }
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids cut to [`Self::max_tokens`] (keeping `[SEP]` at the end, as the tokenizer's own
    /// truncation would), and their number before the cut.
    pub fn cut(&self, mut ids: Vec<u32>) -> (Vec<u32>, usize) {
        let tokens = ids.len();
        if ids.len() > self.max_tokens {
            let sep = ids[ids.len() - 1];
            ids.truncate(self.max_tokens - 1);
            ids.push(sep);
        }
        (ids, tokens)
    }

    /// How many tokens `text` has before any cut (the special tokens included): more than
    /// the model's maximum means [`SentenceEncoder::tokenize`] cuts it.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.len())
    }

    /// Unit-length embeddings of token-id sequences, run as one packed batch.
    pub fn embed_ids(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Err(Error::EmptyInput("no texts to embed".into()));
        }
        if let Some(i) = batch.iter().position(|ids| ids.is_empty()) {
            return Err(Error::EmptyInput(format!("sequence {i} has no tokens")));
        }
        let ids: Vec<u32> = batch.concat();
        let lengths: Vec<usize> = batch.iter().map(Vec::len).collect();
        let d = &self.bert.device;
        let hidden = self.bert.forward(&d.tensor_u32(&ids, &[ids.len()])?, &lengths)?;
        let pooled = d.l2_normalize(&d.mean_pool(&hidden, &lengths)?)?;
        let vectors: Vec<Vec<f32>> = pooled.to_vec2()?;
        // Never a silent NaN: finite weights and inputs give finite outputs, so this is a broken
        // backend or weights that escaped the load-time check.
        if let Some(i) = vectors.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
            return Err(Error::Weights(format!(
                "the model computed a non-finite embedding for sequence {i}: its weights or the backend are broken"
            )));
        }
        Ok(vectors)
    }

    /// Unit-length embeddings of texts.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.embed_ids(&self.tokenize(texts)?)
    }
}
