//! Keel's model architectures, written once over the op set of [`keel_kernels::Device`].
//!
//! - [`bert`]: BERT encoders such as all-MiniLM-L6-v2, with mean pooling and L2 normalization
//!   ([`bert::SentenceEncoder`]).
//! - [`llama`]: llama-architecture decoders such as SmolLM2, from GGUF, with a KV cache and two
//!   weight paths (quantized, and dequantized f32 as the reference).
//! - [`mlp`]: tabular classifiers (standardization, dense layers, softmax) from safetensors.
//! - [`tokenizer`]: the decoder's tokenizer and chat template, built from GGUF metadata.
//! - [`sampling`]: greedy and seeded temperature / top-k / top-p sampling.
//! - [`weights`]: memory-mapped safetensors and GGUF files, checked before use.
//!
//! A model knows nothing of queues, caches or policies: the runtime wraps it.
#![warn(missing_docs)]

pub mod bert;
mod error;
pub mod llama;
pub mod mlp;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
