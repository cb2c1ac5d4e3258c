//! A loaded model version: its manifest and the model that runs it.

use crate::manifest::{Architecture, Manifest, ModelSource, VersionId};
use crate::Result;
use keel_kernels::Device;
use keel_models::bert::{EncoderFiles, SentenceEncoder};
use keel_models::llama::{Llama, WeightPath};
use keel_models::mlp::Mlp;
use keel_models::tokenizer::ChatTokenizer;
use keel_models::weights::GgufFile;
use std::sync::Arc;

/// A decoder and its tokenizer.
pub(crate) struct Decoder {
    pub(crate) llama: Llama,
    pub(crate) tokenizer: ChatTokenizer,
}

pub(crate) enum Model {
    Encoder(Arc<SentenceEncoder>),
    Decoder(Arc<Decoder>),
    Classifier(Mlp),
}

/// A model version held by the engine.
pub(crate) struct LoadedModel {
    pub(crate) id: VersionId,
    pub(crate) manifest: Manifest,
    /// The folder its files are in (the production modules keep their files beside them).
    pub(crate) folder: std::path::PathBuf,
    pub(crate) weights: WeightPath,
    pub(crate) model: Model,
}

impl LoadedModel {
    pub(crate) fn load(source: &ModelSource, weights: WeightPath, device: &Device) -> Result<Self> {
        let m = &source.manifest;
        let model = match m.architecture {
            Architecture::Bert => {
                let (config, tokenizer) = match (&m.config, &m.tokenizer) {
                    (Some(c), Some(t)) => (source.file(c), source.file(t)),
                    _ => {
                        return Err(crate::Error::Manifest {
                            path: source.folder.join(crate::manifest::MANIFEST_FILE),
                            reason: "a bert model needs `config` and `tokenizer`".into(),
                        })
                    }
                };
                let files = EncoderFiles {
                    config: &config,
                    weights: &source.file(&m.weights),
                    tokenizer: &tokenizer,
                    max_tokens: m.max_tokens,
                };
                Model::Encoder(Arc::new(SentenceEncoder::load(&files, weights, device)?))
            }
            Architecture::Llama => {
                let gguf = GgufFile::open(&source.file(&m.weights))?;
                let llama = Llama::load(&gguf, weights, device)?;
                let tokenizer = ChatTokenizer::from_gguf(&gguf)?;
                Model::Decoder(Arc::new(Decoder { llama, tokenizer }))
            }
            Architecture::Mlp => {
                let mlp = Mlp::load(&source.file(&m.weights))?;
                if mlp.features() != m.features.len() || mlp.classes() != m.labels.len() {
                    return Err(crate::Error::Manifest {
                        path: source.folder.join(crate::manifest::MANIFEST_FILE),
                        reason: format!(
                            "the manifest names {} features and {} labels; the weights take {} and give {}",
                            m.features.len(),
                            m.labels.len(),
                            mlp.features(),
                            mlp.classes()
                        ),
                    });
                }
                Model::Classifier(mlp)
            }
        };
        Ok(Self {
            id: source.version_id(),
            manifest: m.clone(),
            folder: source.folder.clone(),
            weights,
            model,
        })
    }
}
