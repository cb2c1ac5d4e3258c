//! The Engine: the model versions a host has loaded, and the requests it serves on them.

use crate::cache::{CacheConfig, CacheStats, PrefixCache, ResponseCache};
use crate::generate::{chat, EngineStream, GenerateParams, InferStream, TokenStream};
use crate::infer::{
    Classification, Infer, InferRequest, InferResponse, Input, Meta, Output, Record, Timings, TokenIds,
    Truncated, Value,
};
use crate::manifest::{Manifest, ModelSource, VersionId};
use crate::model::{Decoder, LoadedModel, Model};
use crate::request::{Request, Truncate};
use crate::scheduler::decoder::GenJob;
use crate::scheduler::{DecoderScheduler, EncoderScheduler, Ran, SchedulerConfig, SchedulerStats};
use crate::target::{ModelVersion, Target};
use crate::{Error, Result};
use keel_kernels::{Device, DeviceKind};
use keel_models::llama::WeightPath;
use keel_models::tokenizer::Message;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Builds an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    device: DeviceChoice,
    scheduler: SchedulerConfig,
    caches: CacheConfig,
}

#[derive(Debug, Clone)]
enum DeviceChoice {
    Best,
    Kind(DeviceKind),
    Device(Device),
}

impl EngineBuilder {
    /// Run on this kind of device; [`EngineBuilder::build`] fails if it is not available.
    pub fn device(mut self, kind: DeviceKind) -> Self {
        self.device = DeviceChoice::Kind(kind);
        self
    }

    /// Run on this device (for instance a wgpu adapter chosen by name with [`Device::wgpu`]).
    pub fn on(mut self, device: Device) -> Self {
        self.device = DeviceChoice::Device(device);
        self
    }

    /// Run on the best device available ([`Device::best`]: CUDA, a real GPU through wgpu, else
    /// the CPU).
    pub fn best_device(mut self) -> Self {
        self.device = DeviceChoice::Best;
        self
    }

    /// How each model version's scheduler batches (see [`SchedulerConfig`]).
    pub fn scheduler(mut self, config: SchedulerConfig) -> Self {
        self.scheduler = config;
        self
    }

    /// Sizes of the response and prefix caches (see [`CacheConfig`]).
    pub fn caches(mut self, config: CacheConfig) -> Self {
        self.caches = config;
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
            DeviceChoice::Device(device) => device,
        };
        let caches = self.caches;
        Ok(Engine {
            inner: Arc::new(Inner {
                backend: device.caps().kind.to_string(),
                device,
                models: RwLock::default(),
                scheduler: self.scheduler,
                response_cache: (caches.response_bytes > 0)
                    .then(|| ResponseCache::new(caches.response_bytes, caches.response_ttl)),
                prefix_cache: (caches.prefix_bytes > 0)
                    .then(|| Arc::new(PrefixCache::new(caches.prefix_bytes))),
                closed: AtomicBool::new(false),
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
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The content-derived version id.
    pub id: VersionId,
    /// The version's manifest.
    pub manifest: Manifest,
    /// The folder its files were loaded from.
    pub folder: std::path::PathBuf,
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
    /// The device's kind as text, for every response's metadata.
    backend: String,
    models: RwLock<Registry>,
    scheduler: SchedulerConfig,
    response_cache: Option<ResponseCache>,
    prefix_cache: Option<Arc<PrefixCache>>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Registry {
    versions: HashMap<VersionId, Arc<Version>>,
    aliases: HashMap<String, VersionId>,
}

/// A loaded version and the scheduler that serves it. Dropping the last handle shuts the
/// scheduler down gracefully (what is queued runs).
pub(crate) struct Version {
    pub(crate) loaded: LoadedModel,
    /// The version as the layers see it (made once, with a weak way back to this).
    card: Arc<ModelVersion>,
    scheduler: Scheduler,
    /// Decoders: per system prompt, the chat-template tokens that do not depend on the user's
    /// text (where the prefix cache cuts).
    shared_prefixes: Mutex<HashMap<Option<String>, Arc<Vec<u32>>>>,
}

enum Scheduler {
    Encoder(EncoderScheduler),
    Decoder(DecoderScheduler),
    /// No queue: a tabular classifier answers on the caller's thread (a forward pass costs less
    /// than a hand-off to another thread would).
    Direct,
}

impl Scheduler {
    fn stats(&self) -> SchedulerStats {
        match self {
            Scheduler::Encoder(s) => s.stats(),
            Scheduler::Decoder(s) => s.stats(),
            Scheduler::Direct => SchedulerStats::default(),
        }
    }

    fn shutdown(&self, grace: Duration) -> bool {
        match self {
            Scheduler::Encoder(s) => s.shutdown(grace),
            Scheduler::Decoder(s) => s.shutdown(grace),
            Scheduler::Direct => true,
        }
    }
}

impl Version {
    pub(crate) fn scheduler_stats(&self) -> SchedulerStats {
        self.scheduler.stats()
    }
}

impl std::ops::Deref for Version {
    type Target = LoadedModel;
    fn deref(&self) -> &LoadedModel {
        &self.loaded
    }
}

impl Engine {
    /// A builder with the defaults: the CPU (an embedded default: probing GPU drivers costs
    /// start-up time; ask for [`EngineBuilder::best_device`] or a device to use one).
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            device: DeviceChoice::Kind(DeviceKind::Cpu),
            scheduler: SchedulerConfig::default(),
            caches: CacheConfig::default(),
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
        let source = ModelSource::open(path.as_ref())?.with_weights(options.weights)?;
        let id = source.version_id();
        if self.read().versions.contains_key(&id) {
            return Ok(id);
        }
        let model = LoadedModel::load(&source, options.weights, &self.inner.device)?;
        let name = model.manifest.name.clone();
        let config = &self.inner.scheduler;
        let scheduler = match &model.model {
            Model::Encoder(e) => Scheduler::Encoder(EncoderScheduler::start(&name, e.clone(), config)?),
            Model::Decoder(d) => Scheduler::Decoder(DecoderScheduler::start(
                &name,
                id.clone(),
                d.clone(),
                self.inner.prefix_cache.clone(),
                config,
            )?),
            Model::Classifier(_) => Scheduler::Direct,
        };
        let info = ModelInfo {
            id: id.clone(),
            manifest: model.manifest.clone(),
            folder: model.folder.clone(),
            weights: model.weights,
        };
        let version = Arc::new_cyclic(|me| Version {
            card: Arc::new(ModelVersion::new(info, me.clone())),
            loaded: model,
            scheduler,
            shared_prefixes: Mutex::default(),
        });
        // A version loaded meanwhile by another thread wins; ours is dropped (outside the lock).
        let ours = {
            let mut registry = self.write();
            match registry.versions.entry(id.clone()) {
                std::collections::hash_map::Entry::Occupied(_) => Some(version),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(version);
                    None
                }
            }
        };
        drop(ours);
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

    /// Points `alias` at `to` only if it points at `expect` now (None: the alias is unset), in
    /// one step: two threads moving the same alias cannot both succeed from the same state.
    ///
    /// # Errors
    /// [`Error::UnknownModel`] if `to` is not loaded; [`Error::InvalidArgument`] if the alias
    /// does not point at `expect` (nothing is changed).
    pub fn swap_alias(&self, alias: &str, expect: Option<&VersionId>, to: &VersionId) -> Result<()> {
        let mut registry = self.write();
        if !registry.versions.contains_key(to) {
            return Err(Error::UnknownModel(to.to_string()));
        }
        let now = registry.aliases.get(alias);
        if now != expect {
            return Err(Error::InvalidArgument(format!(
                "alias '{alias}' points at {}, not {}",
                now.map_or("nothing", VersionId::as_str),
                expect.map_or("nothing", VersionId::as_str)
            )));
        }
        registry.aliases.insert(alias.to_string(), to.clone());
        Ok(())
    }

    /// Forgets a version and every alias pointing at it, and purges its entries from the
    /// response and prefix caches. Requests already queued or running on it finish (the call
    /// waits for them once the last of them lets go of the version).
    pub fn unload(&self, model: &str) -> Result<()> {
        let id = self.resolve(model)?.id.clone();
        let removed = {
            let mut registry = self.write();
            registry.aliases.retain(|_, v| *v != id);
            registry.versions.remove(&id)
        };
        if let Some(cache) = &self.inner.response_cache {
            cache.purge(&id);
        }
        if let Some(cache) = &self.inner.prefix_cache {
            cache.purge(&id);
        }
        // Its scheduler drains outside the registry lock.
        let last = removed.is_some_and(|v| Arc::strong_count(&v) == 1);
        if last {
            self.inner.device.release_free_memory();
        }
        Ok(())
    }

    /// Shuts the engine down: no new request is taken (they are answered
    /// [`Error::ShuttingDown`]); queued and running requests get up to `grace` to finish, and
    /// what is left then is answered `ShuttingDown`: none is lost silently. Returns whether
    /// everything finished within `grace`. Dropping the last clone of an engine shuts it down
    /// with no time limit.
    pub fn shutdown(&self, grace: Duration) -> bool {
        self.inner.closed.store(true, Ordering::SeqCst);
        let versions: Vec<Arc<Version>> = self.read().versions.values().cloned().collect();
        let until = std::time::Instant::now() + grace;
        let mut all = true;
        for v in versions {
            all &= v
                .scheduler
                .shutdown(until.saturating_duration_since(std::time::Instant::now()));
        }
        all
    }

    /// The counters of a model version's scheduler (queue, batches, padding, KV memory).
    pub fn scheduler_stats(&self, model: &str) -> Result<SchedulerStats> {
        Ok(self.resolve(model)?.scheduler.stats())
    }

    /// Whether the response cache holds the answer to every text of `input` for `model` now
    /// (only embeddings are cached: false for other tasks), so that a router can send the
    /// request where it costs no compute. Counts no hit or miss and changes no entry's age.
    ///
    /// # Errors
    /// An unknown model; a text the tokenizer refuses.
    pub fn is_cached(&self, model: &str, input: &Input) -> Result<bool> {
        let (Input::Embed(texts), Some(cache)) = (input, &self.inner.response_cache) else {
            return Ok(false);
        };
        let version = self.resolve(model)?;
        let Model::Encoder(encoder) = &version.model else {
            return Ok(false);
        };
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        if texts.is_empty() {
            return Ok(false);
        }
        Ok(encoder
            .tokenize_counted(&texts)?
            .iter()
            .all(|(ids, _)| cache.contains(&version.id, ids)))
    }

    /// The response cache's counters (None: it is off).
    pub fn response_cache_stats(&self) -> Option<CacheStats> {
        self.inner.response_cache.as_ref().map(ResponseCache::stats)
    }

    /// The decoder prefix cache's counters (None: it is off).
    pub fn prefix_cache_stats(&self) -> Option<CacheStats> {
        self.inner.prefix_cache.as_ref().map(|p| p.stats())
    }

    /// The loaded versions.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut infos: Vec<ModelInfo> = self.read().versions.values().map(|m| info_of(m)).collect();
        infos.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        infos
    }

    /// What the engine knows of one loaded version (named as in [`Engine::embed`]).
    ///
    /// # Errors
    /// [`Error::UnknownModel`] if no loaded version has that name.
    pub fn info(&self, model: &str) -> Result<ModelInfo> {
        Ok(info_of(&*self.resolve(model)?))
    }

    /// Unit-length sentence embeddings of `texts`, in order, with the default [`Request`].
    ///
    /// # Errors
    /// An unknown model, a model that is not an encoder, an empty batch or an empty text; see
    /// [`Engine::embed_with`] for the scheduler's errors.
    pub fn embed(&self, model: &str, texts: &[&str]) -> Result<Embeddings> {
        self.embed_with(model, texts, &Request::default())
    }

    /// [`Engine::embed`] with a priority, a deadline and cache control. Texts are tokenized on
    /// the calling thread; texts the response cache holds (for this very version) are answered
    /// from it; the others go to the model's scheduler as one request, which batches it with
    /// other threads' requests (packed, so lengths mix freely). The vectors do not depend on the
    /// batch.
    ///
    /// # Errors
    /// As [`Engine::embed`], and: [`Error::Overloaded`] at once if the model's queue is full;
    /// [`Error::DeadlineExceeded`] if the deadline passes before the request runs (it is then
    /// never run) or before its answer is ready; [`Error::ShuttingDown`] after
    /// [`Engine::shutdown`].
    pub fn embed_with(&self, model: &str, texts: &[&str], request: &Request) -> Result<Embeddings> {
        let version = self.resolve(model)?;
        let vectors = self.run_embed(model, &version, texts, None, request)?.vectors;
        Ok(Embeddings {
            version: version.id.clone(),
            vectors,
        })
    }

    /// The one embedding path, for [`Engine::embed_with`] and [`Engine::infer`].
    fn run_embed(
        &self,
        model: &str,
        version: &Version,
        texts: &[&str],
        tokenized: Option<Vec<Vec<u32>>>,
        request: &Request,
    ) -> Result<Embedded> {
        self.open()?;
        let (Model::Encoder(encoder), Scheduler::Encoder(scheduler)) = (&version.model, &version.scheduler)
        else {
            return Err(wrong_task(model, version, "embed"));
        };
        if texts.is_empty() {
            return Err(keel_models::Error::EmptyInput("no texts to embed".into()).into());
        }
        let start = Instant::now();
        let counted = match tokenized.filter(|ids| ids.len() == texts.len()) {
            Some(ids) => ids.into_iter().map(|ids| encoder.cut(ids)).collect(),
            None => encoder.tokenize_counted(texts)?,
        };
        let max = encoder.max_tokens();
        let truncated: Vec<Truncated> = counted
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > max)
            .map(|(text, (_, tokens))| Truncated {
                text,
                tokens: *tokens,
                kept: max,
            })
            .collect();
        if let (Some(t), Truncate::Refuse) = (truncated.first(), request.truncate) {
            return Err(Error::InvalidArgument(format!(
                "text {} has {} tokens; {} reads at most {}: shorten it, or let it be cut (Truncate::Cut, the default)",
                t.text, t.tokens, version.manifest.name, max
            )));
        }
        let ids: Vec<Vec<u32>> = counted.into_iter().map(|(ids, _)| ids).collect();
        let tokens = ids.iter().map(Vec::len).sum();
        let prepared = Instant::now();
        let cache = self.inner.response_cache.as_ref().filter(|_| request.use_cache);
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; ids.len()];
        let mut missing = Vec::new();
        let mut missing_ids = Vec::new();
        for (i, seq) in ids.into_iter().enumerate() {
            match cache.and_then(|c| c.get(&version.id, &seq)) {
                Some(hit) => vectors[i] = Some(hit.to_vec()),
                None => {
                    missing.push(i);
                    missing_ids.push(seq);
                }
            }
        }
        let mut ran = None;
        let mut computed_at = prepared;
        if !missing_ids.is_empty() {
            let keys = cache.map(|_| missing_ids.clone());
            let (computed, how) = scheduler.embed(model, missing_ids, request)?;
            computed_at = Instant::now();
            ran = Some(how);
            if let (Some(cache), Some(keys)) = (cache, keys) {
                for (key, v) in keys.into_iter().zip(&computed) {
                    cache.insert(&version.id, key, v);
                }
            }
            for (i, v) in missing.into_iter().zip(computed) {
                vectors[i] = Some(v);
            }
        }
        let vectors = vectors.into_iter().map(Option::unwrap_or_default).collect();
        let done = Instant::now();
        Ok(Embedded {
            vectors,
            tokens,
            truncated,
            ran,
            prepare: prepared - start,
            post: done - computed_at,
            total: done - start,
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
        self.generate_with(model, prompt, params, &Request::default())
    }

    /// [`Engine::generate`] with a priority and a deadline. The generation is queued at once and
    /// joins the model's running batch at its next step (continuous batching); the deadline
    /// bounds its wait in the queue (a stream whose deadline passes there yields
    /// [`Error::DeadlineExceeded`] and never runs). With the prefix cache on, the KV state after
    /// the chat template's system turn is stored and reused by later prompts that share it.
    ///
    /// # Errors
    /// As [`Engine::generate`], and [`Error::Overloaded`] at once if the model's queue is full,
    /// [`Error::ShuttingDown`] after [`Engine::shutdown`].
    pub fn generate_with(
        &self,
        model: &str,
        prompt: &str,
        params: &GenerateParams,
        request: &Request,
    ) -> Result<TokenStream> {
        let version = self.resolve(model)?;
        self.start_generation(model, &version, prompt, params, request)
    }

    /// The one generation path, for [`Engine::generate_with`] and [`Engine::infer`].
    fn start_generation(
        &self,
        model: &str,
        version: &Version,
        prompt: &str,
        params: &GenerateParams,
        request: &Request,
    ) -> Result<TokenStream> {
        params.validate()?;
        self.open()?;
        let (Model::Decoder(decoder), Scheduler::Decoder(scheduler)) = (&version.model, &version.scheduler)
        else {
            return Err(wrong_task(model, version, "generate"));
        };
        if prompt.is_empty() {
            return Err(keel_models::Error::EmptyInput("the prompt is empty".into()).into());
        }
        let text = if params.chat {
            decoder.tokenizer.apply_chat_template(&chat(params, prompt))?
        } else {
            prompt.to_string()
        };
        let ids = decoder.tokenizer.encode(&text)?;
        let context = decoder.llama.config().context_length;
        if ids.is_empty() {
            return Err(keel_models::Error::EmptyInput("the prompt has no tokens".into()).into());
        }
        if ids.len() >= context {
            return Err(keel_models::Error::ContextOverflow {
                tokens: ids.len() + 1,
                context,
            }
            .into());
        }
        let cancel = Arc::new(AtomicBool::new(false));
        if params.max_tokens == 0 {
            return Ok(TokenStream::new(decoder.clone(), ids, None, cancel));
        }
        let boundary = match (&self.inner.prefix_cache, params.chat) {
            (Some(_), true) => shared_prefix(version, decoder, params)
                .map(|p| common_prefix(&p, &ids))
                // A few tokens are not worth a cache entry; the whole prompt leaves nothing to run.
                .filter(|&n| n >= 16 && n < ids.len()),
            _ => None,
        };
        let (events, rx) = std::sync::mpsc::channel();
        let job = GenJob {
            prompt: ids.clone(),
            boundary,
            sampling: params.sampling,
            max_tokens: params.max_tokens,
            logprobs: params.logprobs,
            events,
            cancel: cancel.clone(),
        };
        scheduler.submit(model, job, request)?;
        Ok(TokenStream::new(decoder.clone(), ids, Some(rx), cancel).stopping_at(params.stop.clone()))
    }

    fn stream_on(&self, request: InferRequest, version: &Version) -> Result<InferStream> {
        let start = Instant::now();
        let Input::Generate { prompt, params } = &request.input else {
            return Err(Error::InvalidArgument(format!(
                "only a generation streams; {} with infer",
                request.input.task()
            )));
        };
        let stream = self.start_generation(&request.model, version, prompt, params, &request.options)?;
        let meta = self.meta_of(&request, version);
        Ok(EngineStream::start(stream, meta, start))
    }

    fn meta_of(&self, request: &InferRequest, version: &Version) -> Meta {
        Meta {
            request_id: request.id.clone(),
            model: request.model.clone(),
            version: version.id.clone(),
            backend: self.inner.backend.clone(),
            batch_id: None,
            cache_hit: false,
            truncated: Vec::new(),
            tokens: 0,
            timings: Timings::default(),
            // What the layers above decided travels on with the answer.
            notes: request.notes.clone(),
        }
    }

    fn infer_on(&self, mut request: InferRequest, version: &Version) -> Result<InferResponse> {
        // Token ids a layer above already computed for these texts, with this version.
        let tokenized = request
            .notes
            .take::<TokenIds>()
            .map(Arc::unwrap_or_clone)
            .filter(|t| t.version == version.id)
            .map(|t| t.ids);
        let texts = match &request.input {
            Input::Embed(texts) => texts,
            Input::Classify(rows) => return self.classify_on(&request, version, rows),
            Input::Generate { .. } => return self.stream_on(request, version)?.finish(),
        };
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let e = self.run_embed(&request.model, version, &texts, tokenized, &request.options)?;
        let mut meta = self.meta_of(&request, version);
        meta.batch_id = e.ran.map(|r| r.batch_id);
        meta.cache_hit = e.ran.is_none();
        meta.truncated = e.truncated;
        meta.tokens = e.tokens;
        meta.timings = Timings {
            prepare: e.prepare,
            queue: e.ran.map(|r| r.queue).unwrap_or_default(),
            forward: e.ran.map(|r| r.forward).unwrap_or_default(),
            post: e.post,
            total: e.total,
        };
        Ok(InferResponse {
            output: Output::Embeddings(e.vectors),
            meta,
        })
    }

    /// A tabular classifier's answers, computed on this thread. Each row must hold every feature
    /// the manifest names as a finite number (the contract layer is where rows are repaired or
    /// refused field by field; the engine refuses the whole request).
    fn classify_on(
        &self,
        request: &InferRequest,
        version: &Version,
        rows: &[Record],
    ) -> Result<InferResponse> {
        self.open()?;
        let Model::Classifier(mlp) = &version.model else {
            return Err(wrong_task(&request.model, version, "classify"));
        };
        if rows.is_empty() {
            return Err(keel_models::Error::EmptyInput("no rows to classify".into()).into());
        }
        let start = Instant::now();
        let manifest = &version.manifest;
        let mut values = Vec::with_capacity(manifest.features.len());
        let mut classes = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            values.clear();
            for name in &manifest.features {
                let x = match row.get(name) {
                    Some(Value::Number(x)) if x.is_finite() => *x,
                    Some(Value::Number(x)) => {
                        return Err(Error::InvalidArgument(format!(
                            "row {i}: '{name}' is {x}, not a finite number"
                        )))
                    }
                    Some(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "row {i}: '{name}' is not a number"
                        )))
                    }
                    None => return Err(Error::InvalidArgument(format!("row {i}: '{name}' is missing"))),
                };
                values.push(x as f32);
            }
            let probabilities = mlp.probabilities(&values)?;
            let class = argmax(&probabilities);
            classes.push(Classification {
                class,
                label: manifest.labels[class].clone(),
                probabilities,
            });
        }
        let mut meta = self.meta_of(request, version);
        let took = start.elapsed();
        meta.timings.forward = took;
        meta.timings.total = took;
        Ok(InferResponse {
            output: Output::Classes(classes),
            meta,
        })
    }

    fn open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::ShuttingDown("the engine takes no more requests".into()));
        }
        Ok(())
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
            Model::Classifier(_) => Err(wrong_task(model, &loaded, "tokenize")),
        }
    }

    /// How many tokens `text` has under the model's tokenizer, before any cut (an encoder cuts
    /// texts longer than its maximum; a decoder refuses prompts longer than its context).
    ///
    /// # Errors
    /// An unknown model, a model without a tokenizer.
    pub fn count_tokens(&self, model: &str, text: &str) -> Result<usize> {
        let loaded = self.resolve(model)?;
        match &loaded.model {
            Model::Encoder(e) => Ok(e.count_tokens(text)?),
            Model::Decoder(d) => Ok(d.tokenizer.encode(text)?.len()),
            Model::Classifier(_) => Err(wrong_task(model, &loaded, "tokenize")),
        }
    }

    /// The version that `model` (an alias, a version id or a prefix of one) names now.
    ///
    /// # Errors
    /// [`Error::UnknownModel`].
    pub fn version_of(&self, model: &str) -> Result<VersionId> {
        Ok(self.resolve(model)?.id.clone())
    }

    /// Finds a model by alias, by full version id, or by a unique prefix of at least 8 hex digits.
    fn resolve(&self, model: &str) -> Result<Arc<Version>> {
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

impl Infer for Engine {
    /// The loaded version `model` (an alias, a version id or a prefix of one) names now, under
    /// its manifest's name.
    fn target(&self, model: &str) -> Result<Target> {
        let version = self.resolve(model)?;
        Ok(Target {
            name: version.manifest.name.clone(),
            version: version.card.clone(),
        })
    }

    /// Embeds, classifies or generates (to the end) on the named model, and says how: version,
    /// backend, batch, cache hit, time per stage. [`Engine::embed`] and [`Engine::generate`]
    /// take the same path without building a request object.
    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        let version = self.resolve(addressed(&request))?;
        self.infer_on(request, &version)
    }

    /// A generation on the prediction path: its tokens as they are made, then the response with
    /// its metadata ([`InferStream::finish`]). [`Infer::infer`] is this, run to the end.
    ///
    /// # Errors
    /// As [`Engine::generate_with`]; [`Error::InvalidArgument`] for an input that is not a
    /// generation.
    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        let version = self.resolve(addressed(&request))?;
        self.stream_on(request, &version)
    }
}

/// The version a request runs on: the one resolved at the top of the stack (an alias moved
/// since does not change it), else the model as named.
fn addressed(request: &InferRequest) -> &str {
    request
        .target
        .as_ref()
        .map_or(request.model.as_str(), |t| t.version.id().as_str())
}

/// An embedding's vectors and how they were made.
struct Embedded {
    vectors: Vec<Vec<f32>>,
    /// Tokens read (every text's, after truncation).
    tokens: usize,
    truncated: Vec<Truncated>,
    /// None: the response cache answered every text.
    ran: Option<Ran>,
    prepare: Duration,
    post: Duration,
    total: Duration,
}

fn info_of(m: &Version) -> ModelInfo {
    ModelInfo {
        id: m.id.clone(),
        manifest: m.manifest.clone(),
        folder: m.folder.clone(),
        weights: m.weights,
    }
}

/// The chat-template tokens before the user's text, for this system turn and history: the
/// common prefix of two renderings with different user texts (where the prefix cache cuts).
/// Kept per version for a conversation's first turn (a few system prompts); a history's is
/// rendered each time (it changes every turn).
fn shared_prefix(version: &Version, decoder: &Decoder, params: &GenerateParams) -> Option<Arc<Vec<u32>>> {
    let render = |user: &str| -> Option<Vec<u32>> {
        let text = decoder.tokenizer.apply_chat_template(&chat(params, user)).ok()?;
        decoder.tokenizer.encode(&text).ok()
    };
    let prefix = || -> Option<Arc<Vec<u32>>> {
        let (a, b) = (render("\u{1}a")?, render("\u{2}b")?);
        Some(Arc::new(a[..common_prefix(&a, &b)].to_vec()))
    };
    if !params.history.is_empty() {
        return prefix();
    }
    let key = params.system.clone();
    if let Some(p) = version
        .shared_prefixes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
    {
        return Some(p.clone());
    }
    let prefix = prefix()?;
    let mut map = version.shared_prefixes.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= 64 {
        map.clear();
    }
    map.insert(key, prefix.clone());
    Some(prefix)
}

/// The index of the largest value (the first of equals).
fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold(0, |best, (i, v)| if *v > values[best] { i } else { best })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn wrong_task(model: &str, loaded: &LoadedModel, task: &'static str) -> Error {
    Error::WrongTask {
        model: model.to_string(),
        architecture: loaded.manifest.architecture.to_string(),
        task,
    }
}
