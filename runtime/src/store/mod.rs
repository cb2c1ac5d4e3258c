//! The store: where a deployment keeps its model registry, alias history and lineage records
//! (and, in later modules, the review queue and feedback).
//!
//! [`Store`] is the small trait the production modules talk to; [`SqliteStore`] is its embedded
//! implementation (one SQLite database in WAL mode inside the deployment's folder). No SQL lives
//! outside an implementation of the trait, so a fleet can plug a shared server database in.
#![forbid(unsafe_code)]

mod sqlite;

pub use sqlite::{SqliteStore, DATABASE_FILE, SCHEMA_VERSION};

use crate::manifest::{Manifest, VersionId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store's folder cannot be created or written.
    #[error("store {path}: cannot write there: {reason}")]
    NotWritable {
        /// The folder.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The database file exists but is not a Keel store (another application's SQLite file, or
    /// not SQLite at all).
    #[error("{path} is not a Keel store: {reason}")]
    NotAStore {
        /// The database file.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// The database was written by a newer Keel, with a schema this build does not know.
    #[error("store {path} has schema version {found}, newer than this Keel's {supported}: use a newer Keel")]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The schema version in the file.
        found: i64,
        /// The newest schema version this build reads.
        supported: i64,
    },
    /// The database failed (disk full, I/O error, a value it cannot decode).
    #[error("store {path}: {reason}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The result type of stores.
pub type Result<T> = std::result::Result<T, Error>;

/// A registered model version: immutable once registered.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    /// The model name it is registered under.
    pub name: String,
    /// Its content-derived id.
    pub id: VersionId,
    /// Where its files are (a Keel folder, a Hugging Face folder or a `.gguf` file).
    pub path: PathBuf,
    /// Its weight path: "quantized", "f32" or "int8".
    pub weights: String,
    /// Whether its lineage records keep each request's input (for replay).
    pub retain_input: bool,
    /// Its manifest, with every file's sha256 at registration.
    pub manifest: Manifest,
    /// When it was registered (milliseconds since the Unix epoch).
    pub registered_ms: i64,
}

/// Canary traffic of one model name: the `canary` alias gets `percent` of the requests (or, in
/// shadow mode, a copy of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryConfig {
    /// Share of requests, 0-100.
    pub percent: f64,
    /// Shadow mode: production answers every request; the canary runs on copies, off the hot
    /// path, and is compared, never returned.
    pub shadow: bool,
    /// Thresholds that roll the canary back automatically.
    pub guard: Option<Guard>,
}

/// The thresholds of a guarded canary, over the canary's requests since it was set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guard {
    /// Judge only after this many canary requests.
    pub min_requests: u64,
    /// Highest share of failed canary requests (0-1).
    pub max_error_rate: Option<f64>,
    /// Highest ratio of the canary's p99 latency to production's.
    pub max_p99_ratio: Option<f64>,
    /// Highest mean divergence from production (1 - cosine for embeddings, the share of
    /// differing tokens for generation), measured on requests both versions ran.
    pub max_divergence: Option<f64>,
}

/// The aliases of one model name and its canary settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routes {
    /// The model name.
    pub name: String,
    /// Alias -> version (`production`, `canary`, any other).
    pub aliases: BTreeMap<String, VersionId>,
    /// Canary traffic, while the `canary` alias is set.
    pub canary: Option<CanaryConfig>,
}

/// One alias move, as recorded (as JSON: `seq`, `time`, `name`, `alias`, `from`, `to`, `reason`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AliasEvent {
    /// Order of the moves in the store (increasing).
    pub seq: i64,
    /// When (milliseconds since the Unix epoch).
    #[serde(rename = "time")]
    pub time_ms: i64,
    /// The model name.
    pub name: String,
    /// The alias.
    pub alias: String,
    /// Where it pointed before (None: unset).
    pub from: Option<VersionId>,
    /// Where it points now (None: removed).
    pub to: Option<VersionId>,
    /// Why (the operation and the caller's reason).
    pub reason: String,
}

/// One lineage record as stored: the indexed fields and the whole record as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineageRow {
    /// The request id.
    pub request_id: String,
    /// When the prediction was made (milliseconds since the Unix epoch).
    pub time_ms: i64,
    /// The whole record (JSON), whose fields the lineage module defines.
    pub record: String,
}

/// How long lineage records are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Records older than this many milliseconds are pruned.
    pub max_age_ms: Option<i64>,
    /// Only the newest this many records are kept.
    pub max_records: Option<u64>,
}

/// A change of one model name's routes, made atomically by [`Store::update_routes`].
pub type RouteChange<'a> = dyn FnMut(&mut Routes, &[AliasEvent]) -> std::result::Result<String, String> + 'a;

/// Where a deployment's registry, alias history and lineage live.
///
/// Every method is safe to call from many threads (and, for [`SqliteStore`], from many processes
/// on the same folder).
pub trait Store: Send + Sync {
    /// Where the store is, for messages.
    fn location(&self) -> String;

    /// Records a version; returns false (and changes nothing) if that name already has it.
    fn register(&self, version: &VersionRecord) -> Result<bool>;

    /// A registered version of a name.
    fn version(&self, name: &str, id: &VersionId) -> Result<Option<VersionRecord>>;

    /// Every registered version, by name then registration time.
    fn versions(&self) -> Result<Vec<VersionRecord>>;

    /// A name's aliases and canary settings (empty if it has none).
    fn routes(&self, name: &str) -> Result<Routes>;

    /// Changes a name's routes in one transaction: `change` sees the routes and the name's alias
    /// history, edits the routes and returns the reason to record (or an error message, and
    /// nothing is changed). Every alias that moved is recorded with the time and that reason.
    /// Returns the routes after the change and the events recorded. `Ok(Err(message))` is the
    /// change's own refusal.
    fn update_routes(
        &self,
        name: &str,
        change: &mut RouteChange<'_>,
    ) -> Result<std::result::Result<(Routes, Vec<AliasEvent>), String>>;

    /// A number that changes whenever any routes change (in any process sharing the store), so
    /// that a server can notice another process's promote or rollback with one cheap read.
    fn routes_version(&self) -> Result<i64>;

    /// A name's alias moves, oldest first.
    fn history(&self, name: &str) -> Result<Vec<AliasEvent>>;

    /// Appends lineage records in one transaction: once this returns, they are durable.
    fn append_lineage(&self, rows: &[LineageRow]) -> Result<()>;

    /// The newest record of a request id.
    fn lineage(&self, request_id: &str) -> Result<Option<LineageRow>>;

    /// The newest `n` records, newest first.
    fn recent_lineage(&self, n: usize) -> Result<Vec<LineageRow>>;

    /// How many lineage records are held.
    fn lineage_count(&self) -> Result<u64>;

    /// Deletes the records `retention` no longer keeps; returns how many.
    fn prune_lineage(&self, retention: &Retention, now_ms: i64) -> Result<u64>;
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
