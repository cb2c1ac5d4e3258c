//! The version layer: decoupled model serving inside the host, and a lineage record for every
//! prediction.
//!
//! [`Versioned`] wraps the [`Engine`] (through the [`Infer`] path). Callers address `NAME` (its
//! `production` alias) or `NAME@ALIAS`, never files. A model name's versions are registered in
//! the store, immutable and content-addressed; aliases move in single atomic steps (set,
//! canary, promote, rollback), each recorded with its time and reason. A canary gets a share of
//! the traffic, sticky by routing key, or runs in shadow on copies of production's requests; a
//! guard rolls it back when it fails, slows or diverges. Every answered request leaves a
//! [`LineageRecord`], written off the hot path, that [`Versioned::explain`] looks up and
//! [`Versioned::replay`] runs again.
//!
//! Hot swap: a request holds the version it was routed to until it is answered, so an alias
//! move never fails or re-routes a request in flight; a version no alias points at is unloaded
//! once its last request is answered (its memory and cache entries go with it).
//!
//! ```no_run
//! use keel::version::{RegisterOptions, Versioned, VersionConfig};
//! use keel::{Engine, InferRequest, Infer};
//! let served = Versioned::open(Engine::builder().build()?, ".keel", VersionConfig::default())?;
//! let v1 = served.register("embed", "models/minilm", RegisterOptions::default())?;
//! served.set_alias("embed", "production", v1.as_str(), "first release")?;
//! let answer = served.infer(InferRequest::embed("embed", ["hello"]).key("tenant-7"))?;
//! let record = served.explain(answer.meta.request_id.as_str())?;
//! assert_eq!(record.version, v1.as_str());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The layer's parts: `aliases.rs` (alias administration), `slots.rs` (loaded versions and
//! hot swap), `routes.rs` (routing and refresh), `serve.rs` (serving, whole and streamed),
//! `lineage.rs`, `shadow.rs`, `guard.rs`.

mod aliases;
mod error;
mod guard;
mod lineage;
mod routes;
mod serve;
mod shadow;
mod slots;

pub use error::{Error, Result};
pub use guard::GuardReport;
pub use lineage::{
    LineageRecord, LineageStats, OutputSummary, Overflow, RecordedInput, RecordedSampling, StageTimes,
};
pub use routes::bucket_of;
pub use serve::{RetainInput, Route};
pub use shadow::ShadowStats;

use crate::manifest::{ModelSource, VersionId};
use crate::store::{AliasEvent, LineageRow, Retention, Routes, SqliteStore, Store, VersionRecord};
use crate::{Engine, Infer, InferRequest, WeightPath};
use lineage::Writer;
use routes::Live;
use shadow::{Pacing, ShadowQueue, Traffic};
use slots::SlotPool;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

/// The alias that `NAME` means.
pub const PRODUCTION: &str = "production";
/// The alias that canary traffic goes to.
pub const CANARY: &str = "canary";

/// How the version layer runs.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionConfig {
    /// Lineage records buffered for the writer thread.
    pub lineage_buffer: usize,
    /// What happens when that buffer is full.
    pub overflow: Overflow,
    /// How long lineage records are kept (pruned in the background).
    pub retention: Retention,
    /// How often the background writer prunes what retention no longer keeps.
    pub prune_every: Duration,
    /// Shadow copies waiting to run; more are dropped and counted.
    pub shadow_queue: usize,
    /// A shadow copy runs only once no request of this layer has been in flight for this long
    /// (production's idle time), so that it does not take the cores from production.
    pub shadow_idle_gap: Duration,
    /// A copy that finds no idle time within this long is dropped (counted as stale).
    pub shadow_max_wait: Duration,
    /// How often the store is asked whether another process changed the routes (a promote or
    /// rollback from `keel registry`, another replica's canary), at the latest: a store that
    /// announces changes (PostgreSQL) has them served at once. None: never (only this
    /// process's changes apply).
    pub refresh: Option<Duration>,
}

impl Default for VersionConfig {
    fn default() -> Self {
        Self {
            lineage_buffer: 8192,
            overflow: Overflow::Block,
            retention: Retention::default(),
            prune_every: Duration::from_secs(10),
            shadow_queue: 64,
            shadow_idle_gap: Duration::from_millis(5),
            shadow_max_wait: Duration::from_secs(2),
            refresh: Some(Duration::from_secs(1)),
        }
    }
}

/// How to register a version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Which weights its products use.
    pub weights: WeightPath,
    /// Keep every request's input in its lineage records, so that any prediction can be
    /// replayed (off by default: inputs may be personal data).
    pub retain_input: bool,
}

/// A registered version and where the routes point at it: one entry of
/// [`Versioned::catalog`] (`keel registry list`, `keel_registry_list`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CatalogEntry {
    /// The model name.
    pub name: String,
    /// The version id.
    pub version: VersionId,
    /// Its architecture ("bert", "llama").
    pub architecture: String,
    /// Its weight path ("quantized", "f32", "int8").
    pub weights: String,
    /// Where its files are.
    pub path: String,
    /// The aliases of its name that point at it.
    pub aliases: Vec<String>,
    /// Whether its lineage keeps inputs.
    pub retain_input: bool,
    /// When it was registered (milliseconds since the Unix epoch).
    pub registered: i64,
    /// While it is the canary: its share of traffic.
    pub canary_percent: Option<f64>,
    /// While it is the canary: whether in shadow mode.
    pub shadow: Option<bool>,
}

/// What a replay found.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// The request replayed.
    pub request_id: String,
    /// The version it ran on.
    pub version: String,
    /// Whether the output is the recorded one, bit for bit.
    pub identical: bool,
    /// The recorded output.
    pub recorded: OutputSummary,
    /// The replayed output.
    pub replayed: OutputSummary,
}

/// The version layer around an engine. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Versioned {
    shared: Arc<Shared>,
}

/// What the layer's clones and its background threads share.
pub(crate) struct Shared {
    engine: Engine,
    below: Arc<dyn Infer>,
    store: Arc<dyn Store>,
    pool: Arc<SlotPool>,
    live: RwLock<HashMap<String, Arc<Live>>>,
    /// Registered versions addressed by id, as read from the store (they never change).
    by_id: RwLock<HashMap<VersionId, Arc<VersionRecord>>>,
    /// Serializes route changes in this process (the store serializes them across processes).
    changing: Mutex<()>,
    lineage: Writer,
    shadow: ShadowQueue,
    traffic: Arc<Traffic>,
}

impl Versioned {
    /// The layer right over `engine`, with the embedded store in `folder` (created if needed).
    /// A stack of layers under it is built with [`crate::stack::Stack`].
    ///
    /// # Errors
    /// The store's errors: a folder that cannot be written, a database that is not a Keel
    /// store or is from a newer schema.
    pub fn open(engine: Engine, folder: impl AsRef<Path>, config: VersionConfig) -> Result<Self> {
        let store = Arc::new(SqliteStore::open(folder)?);
        let below: Arc<dyn Infer> = Arc::new(engine.clone());
        Self::new(engine, below, store, config)
    }

    /// The layer over `below` (the engine, or the layers over it), with any store: requests go
    /// through `below`; the versions the routes name are loaded into `engine` (the layer
    /// manages which versions are loaded).
    pub fn new(
        engine: Engine,
        below: Arc<dyn Infer>,
        store: Arc<dyn Store>,
        config: VersionConfig,
    ) -> Result<Self> {
        let lineage = Writer::start(
            store.clone(),
            config.lineage_buffer,
            config.overflow,
            config.retention,
            config.prune_every,
        )?;
        let pacing = Pacing {
            traffic: Arc::default(),
            idle_gap: config.shadow_idle_gap,
            max_wait: config.shadow_max_wait,
        };
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
            engine,
            below,
            store,
            pool: Arc::default(),
            live: RwLock::default(),
            by_id: RwLock::default(),
            changing: Mutex::default(),
            lineage,
            traffic: pacing.traffic.clone(),
            shadow: ShadowQueue::new(config.shadow_queue, weak.clone(), pacing),
        });
        if let Some(every) = config.refresh {
            shared.watch_routes(every)?;
        }
        Ok(Self { shared })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The engine underneath.
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// Registers the model at `path` as an immutable version of `name` and returns its id. The
    /// files are read (and, for a Keel folder, checked against their sha256) now; registering the
    /// same bytes with the same options again changes nothing and returns the same id.
    ///
    /// # Errors
    /// A missing path, unreadable or tampered files, an empty name.
    pub fn register(
        &self,
        name: &str,
        path: impl AsRef<Path>,
        options: RegisterOptions,
    ) -> Result<VersionId> {
        check_name(name)?;
        let path = path.as_ref();
        let source = ModelSource::open(path)?.with_weights(options.weights)?;
        let id = source.version_id();
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.shared.store.register(&VersionRecord {
            name: name.to_string(),
            id: id.clone(),
            path,
            weights: weights_name(options.weights).into(),
            retain_input: options.retain_input,
            manifest: source.manifest,
            registered_ms: crate::store::now_ms(),
        })?;
        Ok(id)
    }

    /// Every registered version.
    pub fn versions(&self) -> Result<Vec<VersionRecord>> {
        Ok(self.shared.store.versions()?)
    }

    /// Every registered version with the aliases that point at it, by name then registration.
    pub fn catalog(&self) -> Result<Vec<CatalogEntry>> {
        let mut routes: HashMap<String, Routes> = HashMap::new();
        let mut entries = Vec::new();
        for v in self.shared.store.versions()? {
            if !routes.contains_key(&v.name) {
                routes.insert(v.name.clone(), self.shared.store.routes(&v.name)?);
            }
            let r = &routes[&v.name];
            let aliases: Vec<String> = r
                .aliases
                .iter()
                .filter(|(_, id)| **id == v.id)
                .map(|(a, _)| a.clone())
                .collect();
            let canary = r.canary.as_ref().filter(|_| aliases.iter().any(|a| a == CANARY));
            entries.push(CatalogEntry {
                architecture: v.manifest.architecture.to_string(),
                path: v.path.display().to_string(),
                canary_percent: canary.map(|c| c.percent),
                shadow: canary.map(|c| c.shadow),
                name: v.name,
                version: v.id,
                weights: v.weights,
                aliases,
                retain_input: v.retain_input,
                registered: v.registered_ms,
            });
        }
        Ok(entries)
    }

    /// A name's aliases and canary settings, as stored.
    pub fn routes(&self, name: &str) -> Result<Routes> {
        Ok(self.shared.store.routes(name)?)
    }

    /// A name's alias moves, oldest first.
    pub fn history(&self, name: &str) -> Result<Vec<AliasEvent>> {
        Ok(self.shared.store.history(name)?)
    }
    /// The lineage record of a request: the whole chain of what answered it and why.
    ///
    /// # Errors
    /// No record of that id (a record is findable once [`Versioned::flush`] returns).
    pub fn explain(&self, request_id: &str) -> Result<LineageRecord> {
        let row = self
            .shared
            .store
            .lineage(request_id)?
            .ok_or_else(|| Error::UnknownRequest(request_id.to_string()))?;
        parse_record(&row)
    }

    /// The newest `n` lineage records, newest first.
    pub fn recent(&self, n: usize) -> Result<Vec<LineageRecord>> {
        self.shared
            .store
            .recent_lineage(n)?
            .iter()
            .map(parse_record)
            .collect()
    }

    /// Runs a recorded prediction again on the version that made it (its files checked again),
    /// without the response cache, and compares the output with the recorded one.
    ///
    /// # Errors
    /// [`Error::NotReplayable`] when the input was not retained or the version's files are gone
    /// or changed; an unknown request id.
    pub fn replay(&self, request_id: &str) -> Result<Replay> {
        let record = self.explain(request_id)?;
        let not = |reason: String| Error::NotReplayable {
            request_id: request_id.to_string(),
            reason,
        };
        let Some(input) = &record.input else {
            return Err(not(
                "its input was not retained (register the version with retain_input, or send the request with it)".into(),
            ));
        };
        let id =
            VersionId::parse(&record.version).ok_or_else(|| not("its version id is malformed".into()))?;
        let version = self.shared.store.version(&record.model, &id)?.ok_or_else(|| {
            not(format!(
                "version {} of '{}' is not registered",
                record.version, record.model
            ))
        })?;
        let slot = self.shared.slot(&version).map_err(|e| match e {
            Error::Engine(e) if e.kind() == crate::ErrorKind::NotFound => {
                not(format!("the files of version {} are gone: {e}", record.version))
            }
            Error::Tampered { .. } => not(e.to_string()),
            other => other,
        })?;
        let mut request = InferRequest::new(slot.record.id.as_str(), input.to_input())
            .options(crate::Request::default().no_cache());
        request.purpose = crate::Purpose::Replay;
        request.target = Some(slot.target());
        let answer = self.shared.below.infer(request)?;
        drop(slot);
        let replayed = OutputSummary::of(&answer.output);
        Ok(Replay {
            request_id: request_id.to_string(),
            version: record.version,
            identical: replayed == record.output,
            recorded: record.output,
            replayed,
        })
    }

    /// Waits until the lineage of every request answered before the call is committed to the
    /// store: after it returns, those records survive a crash of the process.
    ///
    /// # Errors
    /// Records were lost since the last flush (the store failed to write them).
    pub fn flush(&self) -> Result<()> {
        self.shared.lineage.flush()
    }

    /// The lineage writer's counters.
    pub fn lineage_stats(&self) -> LineageStats {
        self.shared.lineage.stats()
    }

    /// The shadow queue's counters.
    pub fn shadow_stats(&self) -> ShadowStats {
        self.shared.shadow.stats()
    }

    /// Waits until the shadow queue has run (or dropped) every copy queued before the call.
    pub fn drain_shadow(&self) {
        self.shared.shadow.drain();
    }

    /// The guard's figures for the canary of `name` (None: no guarded canary is loaded).
    pub fn guard_report(&self, name: &str) -> Option<GuardReport> {
        let live = self.shared.read_live().get(name).cloned()?;
        live.guard.as_ref().map(|g| g.report())
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['@', '/']) || name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "'{name}' is not a valid name (non-empty, no '@' or '/', no control characters)"
        )));
    }
    Ok(())
}

fn parse_record(row: &LineageRow) -> Result<LineageRecord> {
    serde_json::from_str(&row.record).map_err(|e| {
        Error::Store(crate::store::Error::Database {
            path: row.request_id.clone().into(),
            reason: format!("lineage record of '{}' cannot be read: {e}", row.request_id),
        })
    })
}

/// The name a weight path is stored under.
pub fn weights_name(w: WeightPath) -> &'static str {
    match w {
        WeightPath::Quantized => "quantized",
        WeightPath::F32 => "f32",
        WeightPath::Int8 => "int8",
    }
}

fn weight_path(name: &str) -> WeightPath {
    match name {
        "f32" => WeightPath::F32,
        "int8" => WeightPath::Int8,
        _ => WeightPath::Quantized,
    }
}

/// The layer's errors on the prediction path: the engine's as they are, the layer's own kept
/// whole (their class, and the error itself by `downcast_ref`), so that a store failure or a
/// tampered version is told apart from an unknown name whichever way the request came.
impl From<Error> for crate::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Engine(e) => e,
            other => crate::Error::Refused {
                kind: other.kind(),
                source: Box::new(other),
            },
        }
    }
}
