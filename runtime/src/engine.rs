//! The Engine: the model versions a host has loaded, and the requests it serves on them.

use crate::generate::{GenerateParams, TokenStream};
use crate::manifest::{Architecture, Manifest, ModelSource, VersionId};
use crate::model::{LoadedModel, Model};
use crate::{Error, Result};
use keel_kernels::{Device, DeviceKind};
use keel_models::llama::WeightPath;
use keel_models::tokenizer::Message;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Builds an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    device: DeviceChoice,
}

#[derive(Debug, Clone)]
enum DeviceChoice {
    Best,
    Kind(DeviceKind),
}

impl EngineBuilder {
    /// Run on this kind of device; [`EngineBuilder::build`] fails if it is not available.
    pub fn device(mut self, kind: DeviceKind) -> Self {
        self.device = DeviceChoice::Kind(kind);
        self
    }

    /// Run on the best device available, falling back to the CPU (the default).
    pub fn best_device(mut self) -> Self {
        self.device = DeviceChoice::Best;
        self
    }

    /// The engine.
    ///
    /// # Errors
    /// [`crate::ErrorKind::NoDevice`] if the requested device is not available.
    pub fn build(self) -> Result<Engine> {
        let device = match self.device {
            DeviceChoice::Best => Device::best(),
            DeviceChoice::Kind(kind) => Device::new(kind)?,
        };
        Ok(Engine {
            inner: Arc::new(Inner {
                device,
                models: RwLock::default(),
            }),
        })
    }
}

/// Options for loading a model version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// For quantized (GGUF) models: keep the quantized weights (default) or dequantize to f32.
    pub weights: WeightPath,
}

/// What the engine knows of a loaded model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The content-derived version id.
    pub id: VersionId,
    /// The version's manifest.
    pub manifest: Manifest,
    /// Which weights its matrix products use.
    pub weights: WeightPath,
}

/// Embeddings of a batch of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The model version that computed them.
    pub version: VersionId,
    /// One unit-length vector per text, in input order.
    pub vectors: Vec<Vec<f32>>,
}

/// An embedded inference engine: load model versions, then embed and generate on them from any
/// number of threads. Cheap to clone (clones share the same models).
///
/// ```no_run
/// use keel::{Engine, GenerateParams};
/// let engine = Engine::builder().build()?;
/// let minilm = engine.load("models/all-MiniLM-L6-v2")?;
/// engine.alias("embed", &minilm)?;
/// let out = engine.embed("embed", &["first text", "second"])?;
/// assert_eq!(out.vectors.len(), 2);
/// let smollm = engine.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// for token in engine.generate(smollm.as_str(), "Hello!", &GenerateParams::greedy().max_tokens(16))? {
///     print!("{}", token?.text);
/// }
/// # Ok::<(), keel::Error>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    device: Device,
    models: RwLock<Registry>,
}

#[derive(Default)]
struct Registry {
    versions: HashMap<VersionId, Arc<LoadedModel>>,
    aliases: HashMap<String, VersionId>,
}

impl Engine {
    /// A builder with the defaults: the best device available.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            device: DeviceChoice::Best,
        }
    }

    /// The device the engine runs on.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// Loads the model at `path` (a Keel model folder, a Hugging Face folder or a `.gguf` file)
    /// with the default options, and returns its version id. Loading the same bytes again
    /// returns the same id and keeps the model already loaded.
    ///
    /// # Errors
    /// A missing path, a corrupt or truncated file, a sha256 that differs from the manifest's, an
    /// unknown architecture: each is a typed error, see [`Error`].
    pub fn load(&self, path: impl AsRef<Path>) -> Result<VersionId> {
        self.load_with(path, LoadOptions::default())
    }

    /// [`Engine::load`] with options. Two weight paths of one file are two versions.
    pub fn load_with(&self, path: impl AsRef<Path>, options: LoadOptions) -> Result<VersionId> {
        let mut source = ModelSource::open(path.as_ref())?;
        if source.manifest.architecture == Architecture::Llama && options.weights == WeightPath::F32 {
            // The f32 path computes other numbers from the same files: it is a version of its own.
            source.manifest.name.push_str(" (f32)");
        }
        let id = source.version_id();
        if self.read().versions.contains_key(&id) {
            return Ok(id);
        }
        let model = Arc::new(LoadedModel::load(&source, options.weights, &self.inner.device)?);
        self.write().versions.entry(id.clone()).or_insert(model);
        Ok(id)
    }

    /// Points `alias` at a loaded version (replacing where it pointed before).
    pub fn alias(&self, alias: &str, version: &VersionId) -> Result<()> {
        if alias.is_empty() {
            return Err(Error::InvalidArgument("an alias cannot be empty".into()));
        }
        let mut registry = self.write();
        if !registry.versions.contains_key(version) {
            return Err(Error::UnknownModel(version.to_string()));
        }
        registry.aliases.insert(alias.to_string(), version.clone());
        Ok(())
    }

    /// Forgets a version and every alias pointing at it. Requests already running on it finish.
    pub fn unload(&self, model: &str) -> Result<()> {
        let id = self.resolve(model)?.id.clone();
        let mut registry = self.write();
        registry.versions.remove(&id);
        registry.aliases.retain(|_, v| *v != id);
        Ok(())
    }

    /// The loaded versions.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut infos: Vec<ModelInfo> = self
            .read()
            .versions
            .values()
            .map(|m| ModelInfo {
                id: m.id.clone(),
                manifest: m.manifest.clone(),
                weights: m.weights,
            })
            .collect();
        infos.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        infos
    }

    /// Unit-length sentence embeddings of `texts`, in order.
    ///
    /// # Errors
    /// An unknown model, a model that is not an encoder, an empty batch or an empty text.
    pub fn embed(&self, model: &str, texts: &[&str]) -> Result<Embeddings> {
        let loaded = self.resolve(model)?;
        let Model::Encoder(encoder) = &loaded.model else {
            return Err(wrong_task(model, &loaded, "embed"));
        };
        Ok(Embeddings {
            version: loaded.id.clone(),
            vectors: encoder.embed(texts)?,
        })
    }

    /// [`Engine::embed`] for texts given as bytes (from C, a socket, a file): each must be UTF-8.
    pub fn embed_bytes(&self, model: &str, texts: &[&[u8]]) -> Result<Embeddings> {
        let texts = texts
            .iter()
            .map(|t| {
                std::str::from_utf8(t).map_err(|e| keel_models::Error::InvalidUtf8 {
                    valid_up_to: e.valid_up_to(),
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.embed(model, &texts)
    }

    /// Starts generating a reply to `prompt` (wrapped in the chat template unless `params.chat`
    /// is false). The returned stream yields tokens as they are made; see [`TokenStream`].
    ///
    /// # Errors
    /// An unknown model, a model that is not a decoder, an empty prompt, a prompt that does not
    /// fit in the context, bad sampling parameters.
    pub fn generate(&self, model: &str, prompt: &str, params: &GenerateParams) -> Result<TokenStream> {
        params.validate()?;
        let loaded = self.resolve(model)?;
        let Model::Decoder(decoder) = &loaded.model else {
            return Err(wrong_task(model, &loaded, "generate"));
        };
        if prompt.is_empty() {
            return Err(keel_models::Error::EmptyInput("the prompt is empty".into()).into());
        }
        let text = if params.chat {
            decoder.tokenizer.apply_chat_template(&[Message::user(prompt)])?
        } else {
            prompt.to_string()
        };
        let ids = decoder.tokenizer.encode(&text)?;
        TokenStream::new(decoder.clone(), ids, params)
    }

    /// The token ids of `text` under a decoder's tokenizer (special tokens written in the text
    /// are recognized), after the chat template if `chat` is set.
    pub fn tokenize(&self, model: &str, text: &str, chat: bool) -> Result<Vec<u32>> {
        let loaded = self.resolve(model)?;
        match &loaded.model {
            Model::Decoder(d) => {
                let text = if chat {
                    d.tokenizer.apply_chat_template(&[Message::user(text)])?
                } else {
                    text.to_string()
                };
                Ok(d.tokenizer.encode(&text)?)
            }
            Model::Encoder(e) => Ok(e.tokenize(&[text])?.remove(0)),
        }
    }

    /// Finds a model by alias, by full version id, or by a unique prefix of at least 8 hex digits.
    fn resolve(&self, model: &str) -> Result<Arc<LoadedModel>> {
        let registry = self.read();
        if let Some(id) = registry.aliases.get(model) {
            if let Some(m) = registry.versions.get(id) {
                return Ok(m.clone());
            }
        }
        if model.len() >= 8 {
            let mut matches = registry
                .versions
                .iter()
                .filter(|(id, _)| id.as_str().starts_with(model));
            if let (Some((_, m)), None) = (matches.next(), matches.next()) {
                return Ok(m.clone());
            }
        }
        Err(Error::UnknownModel(model.to_string()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the registry half-written (every write is
        // one insert or remove), so a poisoned lock is still safe to use.
        self.inner.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.inner.models.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn wrong_task(model: &str, loaded: &LoadedModel, task: &'static str) -> Error {
    Error::WrongTask {
        model: model.to_string(),
        architecture: loaded.manifest.architecture.to_string(),
        task,
    }
}
