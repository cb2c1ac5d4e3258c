//! Where a request goes: a model version as the layers see it, resolved once at the top of the
//! stack and carried down on the request ([`crate::InferRequest::target`]).

use crate::engine::Version;
use crate::generate::{chat, GenerateParams};
use crate::model::Model;
use crate::{Error, Manifest, ModelInfo, Result, SchedulerStats, VersionId};
use std::any::{Any, TypeId};
use std::fmt;
use std::sync::{Arc, RwLock, Weak};

/// A loaded model version: who it is (id, manifest, files, weight path), its tokenizer and its
/// queue, and the one per-version cache of what the layers derive from its manifest (a
/// contract, a price list, a review policy). The engine makes one per load; it is dropped
/// with the version.
pub struct ModelVersion {
    info: ModelInfo,
    loaded: Weak<Version>,
    derived: RwLock<Vec<(TypeId, Arc<dyn Any + Send + Sync>)>>,
}

impl ModelVersion {
    pub(crate) fn new(info: ModelInfo, loaded: Weak<Version>) -> Self {
        Self {
            info,
            loaded,
            derived: RwLock::default(),
        }
    }

    /// The version id.
    pub fn id(&self) -> &VersionId {
        &self.info.id
    }

    /// What the engine knows of it.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.info.manifest
    }

    fn loaded(&self) -> Result<Arc<Version>> {
        self.loaded
            .upgrade()
            .ok_or_else(|| Error::UnknownModel(format!("{} (unloaded)", self.info.id)))
    }

    /// How many tokens `text` has under the model's tokenizer, before any cut.
    ///
    /// # Errors
    /// A model without a tokenizer (a tabular classifier); a version unloaded meanwhile.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        let v = self.loaded()?;
        match &v.loaded.model {
            Model::Encoder(e) => Ok(e.count_tokens(text)?),
            Model::Decoder(d) => Ok(d.tokenizer.encode(text)?.len()),
            Model::Classifier(_) => Err(Error::InvalidArgument(format!(
                "model '{}' has no tokenizer",
                self.info.manifest.name
            ))),
        }
    }

    /// The token ids of `text` under the model's tokenizer, with its special tokens, before any
    /// cut (an encoder's: what [`crate::TokenIds`] hands down to the engine).
    ///
    /// # Errors
    /// A model without a tokenizer; an empty text (an encoder's); a version unloaded meanwhile.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let v = self.loaded()?;
        match &v.loaded.model {
            Model::Encoder(e) => Ok(e.encode(0, text)?),
            Model::Decoder(d) => Ok(d.tokenizer.encode(text)?),
            Model::Classifier(_) => Err(Error::InvalidArgument(format!(
                "model '{}' has no tokenizer",
                self.info.manifest.name
            ))),
        }
    }

    /// How many tokens a generation's prompt runs: after the chat template (system turn,
    /// history and prompt) unless `params.chat` is off. What [`crate::Completion::prompt_ids`]
    /// will hold.
    ///
    /// # Errors
    /// A model that is not a decoder; a version unloaded meanwhile; a template that fails.
    pub fn prompt_tokens(&self, prompt: &str, params: &GenerateParams) -> Result<usize> {
        let v = self.loaded()?;
        let Model::Decoder(d) = &v.loaded.model else {
            return Err(Error::InvalidArgument(format!(
                "model '{}' is not a decoder",
                self.info.manifest.name
            )));
        };
        let text = if params.chat {
            d.tokenizer.apply_chat_template(&chat(params, prompt))?
        } else {
            prompt.to_string()
        };
        Ok(d.tokenizer.encode(&text)?.len())
    }

    /// The counters of its scheduler (its queue now, its compute so far).
    ///
    /// # Errors
    /// A version unloaded meanwhile.
    pub fn scheduler_stats(&self) -> Result<SchedulerStats> {
        Ok(self.loaded()?.scheduler_stats())
    }

    /// What a layer derives from this version (its `[contract]` table read into a contract,
    /// ...), made by `make` the first time and kept with the version: one cache for every
    /// layer, keyed by the value's type. An error is not kept (the next call tries again).
    ///
    /// # Errors
    /// `make`'s.
    pub fn derived<T, E>(
        &self,
        make: impl FnOnce(&ModelInfo) -> std::result::Result<T, E>,
    ) -> std::result::Result<Arc<T>, E>
    where
        T: Send + Sync + 'static,
    {
        let key = TypeId::of::<T>();
        let found = |all: &[(TypeId, Arc<dyn Any + Send + Sync>)]| {
            all.iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.clone().downcast::<T>().ok())
        };
        if let Some(v) = found(&self.derived.read().unwrap_or_else(|p| p.into_inner())) {
            return Ok(v);
        }
        let made = Arc::new(make(&self.info)?);
        let mut all = self.derived.write().unwrap_or_else(|p| p.into_inner());
        // Another thread may have made it meanwhile: keep the first.
        if let Some(v) = found(&all) {
            return Ok(v);
        }
        all.push((key, made.clone()));
        Ok(made)
    }
}

impl fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelVersion")
            .field("id", &self.info.id)
            .field("name", &self.info.manifest.name)
            .finish_non_exhaustive()
    }
}

/// A request's destination, resolved once at the top of the stack: the model's name (as the
/// registry knows it, else its manifest's) and the version that answers.
#[derive(Clone, Debug)]
pub struct Target {
    /// The model's name.
    pub name: String,
    /// The version.
    pub version: Arc<ModelVersion>,
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.version.id() == other.version.id()
    }
}
