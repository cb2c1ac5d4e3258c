//! What a model file holds, without loading it: for `keel inspect`.

use crate::manifest::{Architecture, ModelSource, VersionId};
use crate::{Manifest, Result};
use keel_models::weights::{GgufFile, SafetensorsFile};
use std::path::Path;

/// One tensor of a weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSummary {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its stored dtype (`F32`, `Q4_1`, ...).
    pub dtype: String,
    /// Its shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Bytes it takes in the file.
    pub bytes: usize,
}

/// A model's manifest (read or derived, sha256s included), version id and tensors.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The manifest.
    pub manifest: Manifest,
    /// The version id the engine would give it.
    pub id: VersionId,
    /// The architecture's hyper-parameters, in the order a reader wants them (name, value).
    pub hyperparameters: Vec<(String, String)>,
    /// Every tensor of the weight file, in natural order of their names (`blk.2` before
    /// `blk.10`).
    pub tensors: Vec<TensorSummary>,
}

/// Names compared with their runs of digits as numbers.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let key = |(digits, run): (bool, &str)| {
        if digits {
            (
                run.trim_start_matches('0').len(),
                run.trim_start_matches('0').to_string(),
            )
        } else {
            (0, run.to_string())
        }
    };
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(&rb) {
        let order = match (x.0, y.0) {
            (true, true) => key(*x).cmp(&key(*y)),
            _ => x.1.cmp(y.1),
        };
        if order.is_ne() {
            return order;
        }
    }
    ra.len().cmp(&rb.len())
}

/// Reads the manifest and tensor table of the model at `path` (checking sha256s where the
/// manifest has them) without loading any weights.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let source = ModelSource::open(path)?;
    let weights = source.file(&source.manifest.weights);
    let pair = |k: &str, v: &dyn std::fmt::Display| (k.to_string(), v.to_string());
    let mut hyperparameters = Vec::new();
    let mut tensors = match source.manifest.architecture {
        Architecture::Bert => {
            if let Some(config) = &source.manifest.config {
                let c = keel_models::bert::Config::from_file(&source.file(config))?;
                hyperparameters = vec![
                    pair("vocabulary", &c.vocab_size),
                    pair("hidden size", &c.hidden_size),
                    pair("layers", &c.num_hidden_layers),
                    pair("attention heads", &c.num_attention_heads),
                    pair("feed-forward size", &c.intermediate_size),
                    pair("activation", &c.hidden_act),
                    pair("positions", &c.max_position_embeddings),
                ];
                if let Some(n) = source.manifest.max_tokens {
                    hyperparameters.push(pair("max tokens", &n));
                }
            }
            safetensors_tensors(&weights)?
        }
        Architecture::Mlp => {
            hyperparameters = vec![
                pair("features", &source.manifest.features.len()),
                pair("classes", &source.manifest.labels.join(", ")),
            ];
            safetensors_tensors(&weights)?
        }
        Architecture::Llama => {
            let file = GgufFile::open(&weights)?;
            let c = keel_models::llama::Config::from_gguf(&file)?;
            hyperparameters = vec![
                pair("context length", &c.context_length),
                pair("vocabulary", &c.vocab_size),
                pair("hidden size", &c.hidden_size),
                pair("layers", &c.layers),
                pair("attention heads", &c.heads),
                pair("key/value heads", &c.kv_heads),
                pair("head width", &c.head_dim),
                pair("feed-forward size", &c.ffn_size),
                pair("rope theta", &c.rope_theta),
                pair(
                    "chat template",
                    &if file.has("tokenizer.chat_template") {
                        "yes"
                    } else {
                        "no"
                    },
                ),
            ];
            file.content()
                .tensor_infos
                .iter()
                .map(|(name, info)| {
                    let elems = info.shape.elem_count();
                    let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                    TensorSummary {
                        name: name.clone(),
                        dtype: format!("{:?}", info.ggml_dtype),
                        shape: info.shape.dims().to_vec(),
                        bytes,
                    }
                })
                .collect::<Vec<_>>()
        }
    };
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    Ok(Inspection {
        id: source.version_id(),
        manifest: source.manifest,
        hyperparameters,
        tensors,
    })
}

fn safetensors_tensors(weights: &Path) -> Result<Vec<TensorSummary>> {
    let file = SafetensorsFile::open(weights)?;
    Ok(file
        .names()
        .into_iter()
        .filter_map(|name| {
            let (dtype, shape) = file.info(&name)?;
            let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            Some(TensorSummary {
                name,
                dtype: format!("{dtype:?}"),
                shape,
                bytes,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn natural_order_counts_numbers() {
        let mut names = vec![
            "blk.10.attn",
            "blk.2.ffn",
            "blk.2.attn",
            "output",
            "blk.1.x",
            "blk.02.y",
        ];
        names.sort_by(|a, b| super::natural_cmp(a, b));
        // 02 and 2 are the same number: the rest of the name decides.
        let expect = [
            "blk.1.x",
            "blk.2.attn",
            "blk.2.ffn",
            "blk.02.y",
            "blk.10.attn",
            "output",
        ];
        assert_eq!(names, expect);
    }
}
