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
//! # Ok::<(), keel::version::Error>(())
//! ```
#![forbid(unsafe_code)]

mod error;
mod guard;
mod lineage;
mod shadow;

pub use error::{Error, Result};
pub use guard::GuardReport;
pub use lineage::{
    LineageRecord, LineageStats, OutputSummary, Overflow, RecordedInput, RecordedSampling, StageTimes,
};
pub use shadow::ShadowStats;

use crate::manifest::{ModelSource, VersionId};
use crate::store::{
    AliasEvent, CanaryConfig, LineageRow, Retention, Routes, SqliteStore, Store, VersionRecord,
};
use crate::{Engine, Infer, InferRequest, InferResponse, LoadOptions, Output, WeightPath};
use guard::GuardState;
use lineage::Writer;
use sha2::{Digest, Sha256};
use shadow::{InFlight, Pacing, ShadowJob, ShadowQueue, Traffic};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

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
    /// rollback from `keel registry`); None: never (only this process's changes apply).
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

/// A loaded version as the layer holds it. The engine unloads it when the last holder (a route
/// or a request in flight) lets go.
struct Slot {
    record: VersionRecord,
    /// The sha256 of the manifest and the files' sha256, computed once for every lineage record.
    manifest_hash: String,
    files: BTreeMap<String, String>,
    engine: Engine,
    pool: Weak<SlotPool>,
    /// The host had loaded this version itself: not the layer's to unload.
    borrowed: bool,
}

#[derive(Default)]
struct SlotPool {
    /// Held while loading or unloading, so that a version is never unloaded under a new holder.
    slots: Mutex<HashMap<VersionId, PoolEntry>>,
}

/// A version the layer holds, for as long as a slot of it lives or is being dropped.
struct PoolEntry {
    slot: Weak<Slot>,
    /// Whether the host had loaded it (see [`Slot::borrowed`]), decided when the layer first
    /// loaded it. A slot made while the last one is still being dropped takes this over: asked
    /// again, the engine would say "loaded" (the dropping slot has not unloaded it yet), and
    /// neither slot would ever unload the version.
    borrowed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            if !self.borrowed {
                let _ = self.engine.unload(self.record.id.as_str());
            }
            return;
        };
        let mut slots = pool.slots.lock().unwrap_or_else(|p| p.into_inner());
        // A new holder may have taken the version meanwhile (under this lock): leave it loaded.
        if slots
            .get(&self.record.id)
            .is_some_and(|e| e.slot.strong_count() > 0)
        {
            return;
        }
        slots.remove(&self.record.id);
        if !self.borrowed {
            let _ = self.engine.unload(self.record.id.as_str());
        }
    }
}

/// The routes of one name, with their versions loaded.
struct Live {
    routes: Routes,
    /// Production and canary, loaded with the routes (any request may need them).
    slots: BTreeMap<String, Arc<Slot>>,
    /// Other aliases, loaded when a request first addresses them.
    others: Mutex<BTreeMap<String, Arc<Slot>>>,
    guard: Option<Arc<GuardState>>,
}

/// Where a request goes.
struct Decision {
    slot: Arc<Slot>,
    route: String,
    reason: String,
    /// Shadow mode: the canary runs on a copy.
    shadow: Option<Arc<Slot>>,
    /// Split mode with a divergence guard: production runs on a copy for comparison.
    compare: Option<Arc<Slot>>,
    guard: Option<Arc<GuardState>>,
    name: String,
}

/// The version layer around an engine. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Versioned {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    engine: Engine,
    below: Arc<dyn Infer>,
    store: Arc<dyn Store>,
    pool: Arc<SlotPool>,
    live: RwLock<HashMap<String, Arc<Live>>>,
    /// Serializes route changes in this process (the store serializes them across processes).
    changing: Mutex<()>,
    lineage: Writer,
    shadow: ShadowQueue,
    traffic: Arc<Traffic>,
    refresh: Option<Duration>,
    /// When the routes were last polled (ms since `epoch`), the version seen, and whether a
    /// refresh is running.
    epoch: Instant,
    polled_ms: AtomicU64,
    routes_seen: AtomicI64,
    refreshing: AtomicBool,
}

impl Versioned {
    /// The layer over `engine`, with the embedded store in `folder` (created if needed).
    ///
    /// # Errors
    /// The store's errors: a folder that cannot be written, a database that is not a Keel
    /// store or is from a newer schema.
    pub fn open(engine: Engine, folder: impl AsRef<Path>, config: VersionConfig) -> Result<Self> {
        let store = Arc::new(SqliteStore::open(folder)?);
        Self::new(engine, store, config)
    }

    /// The layer over a stack of other layers (`below`, whose bottom is `engine`), with the
    /// embedded store in `folder`.
    ///
    /// # Errors
    /// As [`Versioned::open`].
    pub fn open_layered(
        engine: Engine,
        below: Arc<dyn Infer>,
        folder: impl AsRef<Path>,
        config: VersionConfig,
    ) -> Result<Self> {
        let store = Arc::new(SqliteStore::open(folder)?);
        Self::layered(engine, below, store, config)
    }

    /// The layer over `engine` with any store.
    pub fn new(engine: Engine, store: Arc<dyn Store>, config: VersionConfig) -> Result<Self> {
        let below: Arc<dyn Infer> = Arc::new(engine.clone());
        Self::layered(engine, below, store, config)
    }

    /// The layer over a stack of other layers (`below`) whose bottom is `engine`: requests go
    /// through `below`; versions are loaded into `engine`.
    pub fn layered(
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
        let routes_version = store.routes_version()?;
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
            changing: Mutex::default(),
            lineage,
            traffic: pacing.traffic.clone(),
            shadow: ShadowQueue::new(config.shadow_queue, weak.clone(), pacing),
            refresh: config.refresh,
            epoch: Instant::now(),
            polled_ms: AtomicU64::new(0),
            routes_seen: AtomicI64::new(routes_version),
            refreshing: AtomicBool::new(false),
        });
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

    /// Points `alias` of `name` at `version` (a registered id or a unique prefix of one).
    ///
    /// # Errors
    /// An unknown name or version; a version whose files changed since registration.
    pub fn set_alias(&self, name: &str, alias: &str, version: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        check_name(alias)?;
        let target = self.find_version(name, version)?;
        let id = target.id.clone();
        let alias = alias.to_string();
        self.change(name, Some(target), &mut |routes, _| {
            routes.aliases.insert(alias.clone(), id.clone());
            if alias == CANARY && routes.canary.is_none() {
                // A canary alias set by hand gets no traffic until a split is given.
                routes.canary = Some(CanaryConfig {
                    percent: 0.0,
                    shadow: false,
                    guard: None,
                });
            }
            Ok(format!("alias: {reason}"))
        })
    }

    /// Makes `version` the canary of `name` with `config` (its share of traffic, shadow mode,
    /// guard). Production must be set.
    ///
    /// # Errors
    /// A percent outside 0-100, an unknown name or version, no production alias.
    pub fn canary(
        &self,
        name: &str,
        version: &str,
        config: CanaryConfig,
        reason: &str,
    ) -> Result<Vec<AliasEvent>> {
        if !(0.0..=100.0).contains(&config.percent) {
            return Err(Error::InvalidArgument(format!(
                "a canary percent must be within 0-100, not {}",
                config.percent
            )));
        }
        let target = self.find_version(name, version)?;
        let id = target.id.clone();
        self.change(name, Some(target), &mut |routes, _| {
            if !routes.aliases.contains_key(PRODUCTION) {
                return Err(format!(
                    "model '{name}' has no production version to canary against"
                ));
            }
            routes.aliases.insert(CANARY.into(), id.clone());
            routes.canary = Some(config.clone());
            let mode = if config.shadow { "shadow" } else { "split" };
            Ok(format!("canary {}% {mode}: {reason}", config.percent))
        })
    }

    /// Makes the canary the production version, in one step (the canary alias is cleared).
    ///
    /// # Errors
    /// No canary.
    pub fn promote(&self, name: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        self.change(name, None, &mut |routes, _| {
            let Some(canary) = routes.aliases.remove(CANARY) else {
                return Err(format!("model '{name}' has no canary to promote"));
            };
            routes.aliases.insert(PRODUCTION.into(), canary);
            routes.canary = None;
            Ok(format!("promote: {reason}"))
        })
    }

    /// Returns production to the version it replaced, in one step. Successive rollbacks walk
    /// back through production's history.
    ///
    /// # Errors
    /// No earlier production version.
    pub fn rollback(&self, name: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        let routes = self.shared.store.routes(name)?;
        let history = self.shared.store.history(name)?;
        let target = routes
            .aliases
            .get(PRODUCTION)
            .and_then(|now| replaced(&history, now))
            .and_then(|id| self.shared.store.version(name, &id).ok().flatten());
        self.change(name, target, &mut |routes, history| {
            let now = routes.aliases.get(PRODUCTION).cloned();
            let Some(before) = now.as_ref().and_then(|now| replaced(history, now)) else {
                return Err(format!(
                    "model '{name}' has no earlier production version to roll back to"
                ));
            };
            routes.aliases.insert(PRODUCTION.into(), before);
            Ok(format!("rollback: {reason}"))
        })
    }

    /// Ends the canary of `name` (its alias is cleared, production takes all traffic).
    ///
    /// # Errors
    /// No canary.
    pub fn abort_canary(&self, name: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        self.change(name, None, &mut |routes, _| {
            if routes.aliases.remove(CANARY).is_none() {
                return Err(format!("model '{name}' has no canary"));
            }
            routes.canary = None;
            Ok(format!("canary rolled back: {reason}"))
        })
    }

    /// Drops this process's loaded versions of `name` (they are unloaded once their requests
    /// are answered); the next request loads what the routes say. Also the way to pick up
    /// route changes made by another process.
    pub fn release(&self, name: &str) {
        let old = self.shared.write_live().remove(name);
        drop(old);
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

    fn find_version(&self, name: &str, version: &str) -> Result<VersionRecord> {
        self.shared.find_version(name, version)
    }

    /// A route change: the target version is loaded (and checked) first, then the store changes
    /// the routes atomically, then this process serves the new routes.
    fn change(
        &self,
        name: &str,
        target: Option<VersionRecord>,
        change: &mut crate::store::RouteChange<'_>,
    ) -> Result<Vec<AliasEvent>> {
        check_name(name)?;
        let s = &self.shared;
        let _serial = s.changing.lock().unwrap_or_else(|p| p.into_inner());
        let any = s.store.versions()?.iter().any(|v| v.name == name);
        if !any {
            return Err(Error::UnknownName(name.to_string()));
        }
        // Loaded before the switch: no request waits for a load, and a tampered version is
        // refused before any alias moves.
        let _preloaded = target.as_ref().map(|t| s.slot(t)).transpose()?;
        let (routes, events) = s
            .store
            .update_routes(name, change)?
            .map_err(Error::InvalidArgument)?;
        let live = s.build_live(routes)?;
        let old = s.write_live().insert(name.to_string(), live);
        // The old versions are let go outside the lock; requests in flight keep theirs.
        drop(old);
        Ok(events)
    }
}

impl Shared {
    fn read_live(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_live(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.write().unwrap_or_else(|p| p.into_inner())
    }

    fn find_version(&self, name: &str, version: &str) -> Result<VersionRecord> {
        let all: Vec<VersionRecord> = self
            .store
            .versions()?
            .into_iter()
            .filter(|v| v.name == name)
            .collect();
        if all.is_empty() {
            return Err(Error::UnknownName(name.to_string()));
        }
        let unknown = || Error::UnknownVersion {
            name: name.to_string(),
            version: version.to_string(),
        };
        if version.len() < 8 {
            return Err(unknown());
        }
        let mut matches = all
            .into_iter()
            .filter(|v| v.id.as_str().starts_with(&version.to_ascii_lowercase()));
        match (matches.next(), matches.next()) {
            (Some(v), None) => Ok(v),
            _ => Err(unknown()),
        }
    }

    /// The loaded version of a record, loading it if no one holds it. The files are read and
    /// hashed again: a version whose files changed since registration is refused.
    fn slot(self: &Arc<Self>, record: &VersionRecord) -> Result<Arc<Slot>> {
        let mut slots = self.pool.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(&record.id).and_then(|e| e.slot.upgrade()) {
            return Ok(slot);
        }
        // An entry without a live slot: its last slot is being dropped, waiting for this lock.
        let dropping = slots.get(&record.id).map(|e| e.borrowed);
        let source = ModelSource::open(&record.path).map_err(|e| match e {
            crate::Error::ChecksumMismatch {
                path,
                expected,
                actual,
            } => Error::Tampered {
                version: record.id.to_string(),
                file: path.display().to_string(),
                registered: expected,
                actual,
            },
            other => Error::Engine(other),
        })?;
        for registered in &record.manifest.files {
            let now = source.manifest.files.iter().find(|f| f.path == registered.path);
            if now.map(|f| &f.sha256) != Some(&registered.sha256) {
                return Err(Error::Tampered {
                    version: record.id.to_string(),
                    file: record.path.join(&registered.path).display().to_string(),
                    registered: registered.sha256.clone(),
                    actual: now.map_or_else(|| "missing".into(), |f| f.sha256.clone()),
                });
            }
        }
        let weights = weight_path(&record.weights);
        // A version the host loaded into the engine itself stays loaded after the layer is done.
        let borrowed = dropping.unwrap_or_else(|| self.engine.info(record.id.as_str()).is_ok());
        let id = self.engine.load_with(&record.path, LoadOptions { weights })?;
        if id != record.id {
            return Err(Error::Tampered {
                version: record.id.to_string(),
                file: record.path.display().to_string(),
                registered: record.id.to_string(),
                actual: id.to_string(),
            });
        }
        let slot = Arc::new(Slot {
            manifest_hash: lineage::hex(&Sha256::digest(record.manifest.to_toml().as_bytes())),
            files: record
                .manifest
                .files
                .iter()
                .map(|f| (f.path.clone(), f.sha256.clone()))
                .collect(),
            record: record.clone(),
            engine: self.engine.clone(),
            pool: Arc::downgrade(&self.pool),
            borrowed,
        });
        slots.insert(
            record.id.clone(),
            PoolEntry {
                slot: Arc::downgrade(&slot),
                borrowed,
            },
        );
        Ok(slot)
    }

    /// Loads every version the routes name.
    fn build_live(self: &Arc<Self>, routes: Routes) -> Result<Arc<Live>> {
        let mut slots = BTreeMap::new();
        let served = routes
            .aliases
            .iter()
            .filter(|(a, _)| *a == PRODUCTION || *a == CANARY);
        for (alias, id) in served {
            let record = self
                .store
                .version(&routes.name, id)?
                .ok_or_else(|| Error::UnknownVersion {
                    name: routes.name.clone(),
                    version: id.to_string(),
                })?;
            slots.insert(alias.clone(), self.slot(&record)?);
        }
        let guard = routes
            .canary
            .as_ref()
            .and_then(|c| c.guard.clone())
            .map(|g| Arc::new(GuardState::new(g)));
        Ok(Arc::new(Live {
            routes,
            slots,
            others: Mutex::default(),
            guard,
        }))
    }

    /// The routes of `name` in this process, loading them from the store at first use.
    fn live(self: &Arc<Self>, name: &str) -> Result<Arc<Live>> {
        self.poll();
        if let Some(live) = self.read_live().get(name) {
            return Ok(live.clone());
        }
        let _serial = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = self.read_live().get(name) {
            return Ok(live.clone());
        }
        let routes = self.store.routes(name)?;
        if routes.aliases.is_empty() {
            let registered = self.store.versions()?.iter().any(|v| v.name == name);
            return Err(if registered {
                Error::UnknownAlias {
                    name: name.to_string(),
                    alias: PRODUCTION.into(),
                }
            } else {
                Error::UnknownName(name.to_string())
            });
        }
        let live = self.build_live(routes)?;
        self.write_live().insert(name.to_string(), live.clone());
        Ok(live)
    }

    /// At most once per `refresh` period (one thread at a time): if another process changed the
    /// routes, serve the new ones. The reload runs on a thread of its own, so that no request
    /// waits for a version to load; requests keep the old routes until it is done.
    fn poll(self: &Arc<Self>) {
        let Some(every) = self.refresh else { return };
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.polled_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < every.as_millis() as u64
            || self
                .polled_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Ok(version) = self.store.routes_version() else {
            return;
        };
        if version == self.routes_seen.load(Ordering::Relaxed) || self.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("keel-routes".into())
            .spawn(move || {
                shared.routes_seen.store(version, Ordering::Relaxed);
                shared.reload_changed();
                shared.refreshing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.refreshing.store(false, Ordering::Release);
        }
    }

    /// Rebuilds the routes of every served name whose stored routes differ from this process's.
    fn reload_changed(self: &Arc<Self>) {
        let _serial = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        // Names only: holding a name's old routes here would keep their versions loaded.
        let names: Vec<String> = self.read_live().keys().cloned().collect();
        for name in names {
            let Ok(routes) = self.store.routes(&name) else {
                continue;
            };
            let same = self
                .read_live()
                .get(&name)
                .is_some_and(|live| live.routes == routes);
            if same {
                continue;
            }
            // A version that cannot be loaded (files gone or changed) keeps the old routes.
            if let Ok(new) = self.build_live(routes) {
                let old = self.write_live().insert(name, new);
                drop(old);
            }
        }
    }

    /// Where a request goes, and why.
    fn decide(self: &Arc<Self>, request: &InferRequest) -> Result<Decision> {
        let addressed = request.model.as_str();
        if let Some(id) = VersionId::parse(addressed) {
            // A version id: registered under some name, served as is.
            let record = self
                .store
                .versions()?
                .into_iter()
                .find(|v| v.id == id)
                .ok_or_else(|| Error::Unregistered(addressed.to_string()))?;
            return Ok(Decision {
                name: record.name.clone(),
                slot: self.slot(&record)?,
                route: "direct".into(),
                reason: "addressed by version id".into(),
                shadow: None,
                compare: None,
                guard: None,
            });
        }
        let (name, alias) = match addressed.split_once('@') {
            Some((name, alias)) => (name, Some(alias)),
            None => (addressed, None),
        };
        let live = self.live(name)?;
        let slot_of = |alias: &str| -> Result<Arc<Slot>> {
            if let Some(slot) = live.slots.get(alias) {
                return Ok(slot.clone());
            }
            let unknown = || Error::UnknownAlias {
                name: name.to_string(),
                alias: alias.to_string(),
            };
            let id = live.routes.aliases.get(alias).ok_or_else(unknown)?;
            let mut others = live.others.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = others.get(alias) {
                return Ok(slot.clone());
            }
            let record = self.store.version(name, id)?.ok_or_else(unknown)?;
            let slot = self.slot(&record)?;
            others.insert(alias.to_string(), slot.clone());
            Ok(slot)
        };
        let decision = |slot, route: &str, reason: String| Decision {
            slot,
            route: route.to_string(),
            reason,
            shadow: None,
            compare: None,
            guard: None,
            name: name.to_string(),
        };
        if let Some(alias) = alias {
            return Ok(decision(slot_of(alias)?, alias, format!("addressed {addressed}")));
        }
        let production = slot_of(PRODUCTION)?;
        let (Some(canary), Some(config)) = (live.slots.get(CANARY), &live.routes.canary) else {
            return Ok(decision(production, PRODUCTION, "no canary".into()));
        };
        let (bucket, by) = match &request.key {
            Some(key) => (bucket_of(name, key), "key"),
            None => (rand::random::<u32>() % BUCKETS, "random draw"),
        };
        let chosen = f64::from(bucket) < config.percent * f64::from(BUCKETS) / 100.0;
        let guard = live.guard.clone();
        Ok(match (chosen, config.shadow) {
            (true, false) => Decision {
                reason: format!(
                    "canary {}% split: {by} bucket {bucket} of {BUCKETS}",
                    config.percent
                ),
                compare: guard
                    .as_ref()
                    .filter(|g| g.wants_divergence())
                    .map(|_| production.clone()),
                guard,
                ..decision(canary.clone(), CANARY, String::new())
            },
            (true, true) => Decision {
                reason: format!(
                    "production; shadow copy to the canary ({}%, {by} bucket {bucket})",
                    config.percent
                ),
                shadow: Some(canary.clone()),
                guard,
                ..decision(production, PRODUCTION, String::new())
            },
            (false, _) => Decision {
                guard,
                ..decision(
                    production,
                    PRODUCTION,
                    format!(
                        "canary {}%: {by} bucket {bucket} of {BUCKETS} stays on production",
                        config.percent
                    ),
                )
            },
        })
    }

    /// The lineage record of an answer.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        request: &InferRequest,
        answer: &InferResponse,
        slot: &Slot,
        name: &str,
        route: &str,
        reason: &str,
        shadow_of: Option<(&str, f64)>,
        retain: bool,
        started: Instant,
    ) {
        let recorded = RecordedInput::of(&request.input);
        let meta = &answer.meta;
        let take = |key: &str| {
            meta.annotations
                .get(key)
                .map(|v| serde_json::from_str(v).unwrap_or(serde_json::Value::String(v.clone())))
        };
        let record = LineageRecord {
            request_id: match shadow_of {
                Some((of, _)) => format!("{of}.shadow"),
                None => request.id.to_string(),
            },
            time: crate::store::now_ms(),
            key: request.key.clone(),
            model: name.to_string(),
            addressed: request.model.clone(),
            version: slot.record.id.to_string(),
            weights: slot.record.weights.clone(),
            files: slot.files.clone(),
            manifest_hash: slot.manifest_hash.clone(),
            keel_version: env!("CARGO_PKG_VERSION").to_string(),
            backend: meta.backend.clone(),
            batch_id: meta.batch_id,
            cache_hit: meta.cache_hit,
            route: route.to_string(),
            route_reason: reason.to_string(),
            shadow_of: shadow_of.map(|(of, _)| of.to_string()),
            divergence: shadow_of.map(|(_, d)| d),
            input_hash: recorded.hash(),
            input: (retain || slot.record.retain_input).then_some(recorded),
            output: OutputSummary::of(&answer.output),
            timings_us: StageTimes::of(&meta.timings, started.elapsed()),
            contract: take("contract"),
            review: take("review"),
            cost: take("cost"),
            annotations: meta.annotations.clone(),
        };
        self.lineage.submit(LineageRow {
            request_id: record.request_id.clone(),
            time_ms: record.time,
            record: serde_json::to_string(&record).unwrap_or_default(),
        });
    }
}

impl Infer for Versioned {
    /// Routes the request (`NAME`, `NAME@ALIAS` or a version id), answers it on the version
    /// chosen, queues shadow copies, feeds the canary guard, and records its lineage. The
    /// response's `annotations` carry `route` and `route_reason`; `meta.model` is the name.
    fn infer(&self, mut request: InferRequest) -> crate::Result<InferResponse> {
        self.infer_versioned(&mut request, false)
            .map_err(into_engine_error)
    }
}

impl Versioned {
    /// [`Infer::infer`] with the layer's own error type.
    ///
    /// # Errors
    /// An unknown name or alias, the engine's errors.
    pub fn serve(&self, mut request: InferRequest) -> Result<InferResponse> {
        self.infer_versioned(&mut request, false)
    }

    /// [`Versioned::serve`], keeping this request's input in its lineage record whatever the
    /// version's retention setting (so that it can be replayed).
    ///
    /// # Errors
    /// As [`Versioned::serve`].
    pub fn serve_retaining(&self, mut request: InferRequest) -> Result<InferResponse> {
        self.infer_versioned(&mut request, true)
    }

    fn infer_versioned(&self, request: &mut InferRequest, retain: bool) -> Result<InferResponse> {
        let _busy = self.shared.traffic.begin();
        let started = Instant::now();
        let d = self.shared.decide(request)?;
        let result = self.shared.below.infer(routed(request, &d));
        self.conclude(&d, request, result, started, retain)
    }

    /// Starts a generation routed as [`Versioned::serve`] routes, and streams its tokens as
    /// they are made. Its lineage is recorded when it ends (a stream dropped before its end is
    /// cancelled and leaves no record); shadow copies run then. The stream goes straight to the
    /// engine (not through the layers between, `below`, which answer whole requests).
    ///
    /// # Errors
    /// As [`Versioned::serve`]; an input that is not a generation.
    pub fn serve_stream(&self, request: InferRequest, retain_input: bool) -> Result<ServedStream> {
        let busy = self.shared.traffic.begin();
        let started = Instant::now();
        let d = self.shared.decide(&request)?;
        let inner = self.shared.engine.infer_stream(routed(&request, &d));
        if let (Err(_), Some(guard)) = (&inner, &d.guard) {
            guard.observe(d.route == CANARY, false, started.elapsed());
        }
        Ok(ServedStream {
            inner: Some(inner?),
            layer: self.clone(),
            request,
            decision: d,
            retain: retain_input,
            started,
            failed: None,
            done: None,
            _busy: busy,
        })
    }

    /// After an answer: the guard's figures, the response's annotations, the lineage record, a
    /// shadow copy, and a rollback if the guard tripped.
    fn conclude(
        &self,
        d: &Decision,
        request: &InferRequest,
        result: crate::Result<InferResponse>,
        started: Instant,
        retain: bool,
    ) -> Result<InferResponse> {
        let s = &self.shared;
        if let Some(guard) = &d.guard {
            guard.observe(d.route == CANARY, result.is_ok(), started.elapsed());
        }
        let mut answer = result?;
        answer.meta.model = d.name.clone();
        let notes = &mut answer.meta.annotations;
        notes.insert("route".into(), d.route.clone());
        notes.insert("route_reason".into(), d.reason.clone());
        s.record(
            request, &answer, &d.slot, &d.name, &d.route, &d.reason, None, retain, started,
        );
        let other = match (&d.shadow, &d.compare) {
            (Some(canary), _) => Some((canary, true)),
            (None, Some(production)) => Some((production, false)),
            (None, None) => None,
        };
        if let Some((slot, recorded)) = other {
            s.shadow.offer(ShadowJob {
                request: request.clone(),
                addressed: request.model.clone(),
                original: answer.output.clone(),
                slot: slot.clone(),
                name: d.name.clone(),
                guard: d.guard.clone(),
                recorded,
                queued: Instant::now(),
            });
        }
        if let Some(guard) = &d.guard {
            self.check_guard(&d.name, guard);
        }
        Ok(answer)
    }

    /// Rolls the canary back if its guard has tripped (once).
    fn check_guard(&self, name: &str, guard: &GuardState) {
        if let Some(why) = guard.tripped() {
            let _ = self.abort_canary(name, &format!("guard: {why}"));
        }
    }
}

/// The request as the layers below see it: addressed to the version chosen.
fn routed(request: &InferRequest, d: &Decision) -> InferRequest {
    let mut routed = request.clone();
    routed.model = d.slot.record.id.to_string();
    routed
}

/// A generation served by the version layer ([`Versioned::serve_stream`]): its tokens as they
/// are made. It holds the version it was routed to until it is dropped.
pub struct ServedStream {
    inner: Option<crate::InferStream>,
    layer: Versioned,
    request: InferRequest,
    decision: Decision,
    retain: bool,
    started: Instant,
    failed: Option<crate::Error>,
    done: Option<Result<InferResponse>>,
    /// Production traffic in flight until the stream is dropped (shadow copies wait).
    _busy: InFlight,
}

impl ServedStream {
    /// Where the request went: the route (`production`, `canary`, an alias, `direct`) and why.
    pub fn route(&self) -> (&str, &str) {
        (&self.decision.route, &self.decision.reason)
    }

    /// The response's metadata known before the end (request id, version, backend).
    pub fn meta(&self) -> Option<&crate::Meta> {
        self.inner.as_ref().map(crate::InferStream::meta)
    }

    /// Runs the generation to its end and returns the response as [`Versioned::serve`] would.
    ///
    /// # Errors
    /// The generation's error.
    pub fn finish(mut self) -> Result<InferResponse> {
        for token in &mut self {
            token?;
        }
        self.done.take().unwrap_or_else(|| {
            Err(Error::Engine(crate::Error::Internal(
                "the generation ended without an answer".into(),
            )))
        })
    }
}

impl Iterator for ServedStream {
    type Item = crate::Result<crate::Token>;

    fn next(&mut self) -> Option<Self::Item> {
        let inner = self.inner.as_mut()?;
        match inner.next() {
            Some(Ok(token)) => Some(Ok(token)),
            Some(Err(e)) => {
                self.failed = Some(crate::scheduler::clone_error(&e));
                Some(Err(e))
            }
            None => {
                let inner = self.inner.take()?;
                let result = match self.failed.take() {
                    Some(e) => Err(e),
                    None => inner.finish(),
                };
                let (d, request) = (&self.decision, &self.request);
                self.done = Some(self.layer.conclude(d, request, result, self.started, self.retain));
                None
            }
        }
    }
}

/// Output divergence: 1 - the least cosine over the texts, or the share of differing tokens.
pub(crate) fn divergence(a: &Output, b: &Output) -> f64 {
    match (a, b) {
        (Output::Embeddings(x), Output::Embeddings(y)) => {
            let least = x
                .iter()
                .zip(y)
                .map(|(u, v)| {
                    let dot: f64 = u.iter().zip(v).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
                    let nu: f64 = u.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
                    let nv: f64 = v.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
                    dot / (nu * nv).max(f64::MIN_POSITIVE)
                })
                .fold(1.0, f64::min);
            (1.0 - least).max(0.0)
        }
        (Output::Completion(x), Output::Completion(y)) => {
            let n = x.token_ids.len().max(y.token_ids.len());
            if n == 0 {
                return 0.0;
            }
            let same = x
                .token_ids
                .iter()
                .zip(&y.token_ids)
                .filter(|(p, q)| p == q)
                .count();
            1.0 - same as f64 / n as f64
        }
        _ => 1.0,
    }
}

/// Sticky buckets: a key's bucket is the same in every process and after restarts.
const BUCKETS: u32 = 10_000;

/// The bucket (0-9999) of a routing key for a model name: a hash of both, so that one key is
/// not always the canary for every model.
pub fn bucket_of(name: &str, key: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let n = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (n % u64::from(BUCKETS)) as u32
}

/// The version production had before its latest move to `now` that was not a rollback.
fn replaced(history: &[AliasEvent], now: &VersionId) -> Option<VersionId> {
    history
        .iter()
        .rev()
        .filter(|e| e.alias == PRODUCTION && e.to.as_ref() == Some(now))
        .find(|e| !e.reason.starts_with("rollback"))
        .and_then(|e| e.from.clone())
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

/// The layer's errors through the engine's `Infer` signature: engine errors as they are, the
/// rest by class.
fn into_engine_error(e: Error) -> crate::Error {
    match e {
        Error::Engine(e) => e,
        Error::UnknownName(_)
        | Error::UnknownAlias { .. }
        | Error::UnknownVersion { .. }
        | Error::Unregistered(_) => crate::Error::UnknownModel(e.to_string()),
        Error::InvalidArgument(m) => crate::Error::InvalidArgument(m),
        other => crate::Error::Internal(other.to_string()),
    }
}
