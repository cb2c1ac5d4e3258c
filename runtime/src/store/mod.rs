//! The store: where a deployment keeps its model registry, alias history, lineage records, the
//! review queue and the feedback (reviewers' labels and ground truth).
//!
//! [`Store`] is the small trait the production modules talk to; [`SqliteStore`] is its embedded
//! implementation (one SQLite database in WAL mode inside the deployment's folder), and `PgStore`
//! (feature `postgres`) the fleet's (one PostgreSQL database shared by many hosts). No SQL lives
//! outside an implementation of the trait.

#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;
pub mod suite;

#[cfg(feature = "postgres")]
pub use postgres::PgStore;
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

/// A store's failure on the prediction path (a budget or a lineage record it cannot write):
/// [`crate::ErrorKind::Storage`], the store's error kept whole.
impl From<Error> for crate::Error {
    fn from(e: Error) -> Self {
        crate::Error::Refused {
            kind: crate::ErrorKind::Storage,
            source: Box::new(e),
        }
    }
}

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

/// Where a review ticket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TicketState {
    /// Waiting for a reviewer (or claimed once, with a lease that has run out).
    Pending,
    /// A reviewer holds it until its lease ends.
    Claimed,
    /// A reviewer labelled it.
    Resolved,
    /// Nobody labelled it in time.
    Expired,
}

impl TicketState {
    /// The state as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::Pending => "pending",
            TicketState::Claimed => "claimed",
            TicketState::Resolved => "resolved",
            TicketState::Expired => "expired",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Claimed, Self::Resolved, Self::Expired]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// A prediction to put before a reviewer ([`Store::enqueue_review`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewTicket {
    /// The prediction's request id (one ticket per request).
    pub request_id: String,
    /// The model as the caller named it.
    pub model: String,
    /// The version that answered.
    pub version: String,
    /// `review` (served provisionally or held) or `block` (refused, kept for a reviewer's label).
    pub decision: String,
    /// The rules that sent it, as JSON.
    pub reasons: String,
    /// The input, as JSON (what the reviewer looks at).
    pub input: String,
    /// The model's output, as JSON.
    pub output: String,
    /// When (milliseconds since the Unix epoch).
    pub created_ms: i64,
}

/// A review ticket as stored (as JSON: every field, `input` and `output` as JSON values).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ticket {
    /// The ticket id (increasing).
    pub id: i64,
    /// What was queued.
    #[serde(flatten, with = "new_ticket_json")]
    pub ticket: NewTicket,
    /// Where it stands.
    pub state: TicketState,
    /// Who holds or resolved it.
    pub reviewer: Option<String>,
    /// While claimed: when the lease ends (milliseconds since the Unix epoch).
    pub lease_until_ms: Option<i64>,
    /// The reviewer's label.
    pub label: Option<String>,
    /// The reviewer's comment.
    pub comment: Option<String>,
    /// When it was resolved or expired.
    pub closed_ms: Option<i64>,
}

mod new_ticket_json {
    use super::NewTicket;
    use serde::ser::SerializeMap;
    pub fn serialize<S: serde::Serializer>(t: &NewTicket, s: S) -> Result<S::Ok, S::Error> {
        let json = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::String(text.into()));
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("request_id", &t.request_id)?;
        m.serialize_entry("model", &t.model)?;
        m.serialize_entry("version", &t.version)?;
        m.serialize_entry("decision", &t.decision)?;
        m.serialize_entry("reasons", &json(&t.reasons))?;
        m.serialize_entry("input", &json(&t.input))?;
        m.serialize_entry("output", &json(&t.output))?;
        m.serialize_entry("created_ms", &t.created_ms)?;
        m.end()
    }
}

/// Where a label came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackSource {
    /// A reviewer resolved the prediction's ticket.
    Review,
    /// The true outcome, reported later by the host ([`Store::add_feedback`]).
    GroundTruth,
}

impl FeedbackSource {
    /// The source as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackSource::Review => "review",
            FeedbackSource::GroundTruth => "ground_truth",
        }
    }

    /// The source named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Review, Self::GroundTruth]
            .into_iter()
            .find(|f| f.as_str() == s)
    }
}

/// A label for one prediction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feedback {
    /// The prediction's request id.
    pub request_id: String,
    /// The label.
    pub label: String,
    /// Where it came from.
    pub source: FeedbackSource,
    /// The reviewer (for a review).
    pub reviewer: Option<String>,
    /// The reviewer's comment.
    pub comment: Option<String>,
    /// The ticket it resolved (for a review).
    pub ticket: Option<i64>,
    /// When (milliseconds since the Unix epoch).
    pub time_ms: i64,
}

/// A change of one model name's routes, made atomically by [`Store::update_routes`].
pub type RouteChange<'a> = dyn FnMut(&mut Routes, &[AliasEvent]) -> std::result::Result<String, String> + 'a;

/// Where a deployment's registry, lineage and review queue live: one store holds all three
/// (each a trait of its own, for the layer that uses it).
///
/// Every method is safe to call from many threads (and, for [`SqliteStore`], from many processes
/// on the same folder; for [`PgStore`], from many hosts).
pub trait Store: RegistryStore + LineageStore + ReviewStore + KeyStore + BudgetStore {
    /// Where the store is, for messages.
    fn location(&self) -> String;

    /// Whether hosts of a fleet share this store (and may die at any moment): then budgets are
    /// kept in it rather than in each process, and every answer waits until its lineage record
    /// is committed. False for the embedded store, whose process keeps the fast paths.
    fn is_shared(&self) -> bool {
        false
    }

    /// Blocks until the routes may have changed in another process (a promote, a rollback, a
    /// canary's guard), or until `timeout`; returns whether a change was announced. A store
    /// that cannot announce changes just waits (its callers poll [`RegistryStore::routes_version`]
    /// after each wait).
    ///
    /// # Errors
    /// The store's connection failed (the caller waits and polls as without announcements).
    fn wait_routes_change(&self, timeout: std::time::Duration) -> Result<bool> {
        std::thread::sleep(timeout);
        Ok(false)
    }
}

/// Opens the store at `location`: a `postgres://` (or `postgresql://`) URL names a fleet's
/// `PgStore` (feature `postgres`), anything else the folder of an embedded [`SqliteStore`].
/// The one way the CLI, the C ABI and the server open a store.
///
/// # Errors
/// As [`SqliteStore::open`]'s or `PgStore::connect`'s; [`Error::Database`] for a PostgreSQL URL
/// in a build without the `postgres` feature.
pub fn open(location: impl AsRef<std::ffi::OsStr>) -> Result<std::sync::Arc<dyn Store>> {
    let location = location.as_ref();
    let url = location
        .to_str()
        .filter(|l| l.starts_with("postgres://") || l.starts_with("postgresql://"));
    if let Some(_url) = url {
        #[cfg(feature = "postgres")]
        return Ok(std::sync::Arc::new(PgStore::connect(_url)?));
        #[cfg(not(feature = "postgres"))]
        return Err(Error::Database {
            path: PathBuf::from("postgres"),
            reason: "this Keel was built without PostgreSQL support (feature `postgres`)".into(),
        });
    }
    Ok(std::sync::Arc::new(SqliteStore::open(location)?))
}

/// The model registry: versions, and each name's routes (aliases, canary) with their history.
pub trait RegistryStore: Send + Sync {
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
}

/// The lineage of every prediction.
pub trait LineageStore: Send + Sync {
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

/// The review queue, and the labels (reviewers' and ground truth) stored as feedback.
pub trait ReviewStore: Send + Sync {
    /// Queues a prediction for review; returns its ticket id. A request id already queued keeps
    /// its one ticket (its id is returned), so a retried enqueue never duplicates it.
    fn enqueue_review(&self, ticket: &NewTicket) -> Result<i64>;

    /// Tickets in `state` (every state if None), oldest first, at most `limit`. A claimed
    /// ticket whose lease ended before `now_ms` is pending again.
    fn tickets(&self, state: Option<TicketState>, limit: usize, now_ms: i64) -> Result<Vec<Ticket>>;

    /// One ticket, as of `now_ms`.
    fn ticket(&self, id: i64, now_ms: i64) -> Result<Option<Ticket>>;

    /// Gives `reviewer` the oldest pending ticket until `now_ms + lease_ms`; None if none is
    /// pending. Two reviewers (threads, processes, hosts) never get the same ticket.
    fn claim_review(&self, reviewer: &str, lease_ms: i64, now_ms: i64) -> Result<Option<Ticket>>;

    /// Resolves a ticket with a label and stores the label as feedback, in one transaction.
    /// `Ok(Err(message))`: refused (no such ticket, already closed, or claimed by another
    /// reviewer whose lease runs).
    fn resolve_review(
        &self,
        id: i64,
        reviewer: &str,
        label: &str,
        comment: Option<&str>,
        now_ms: i64,
    ) -> Result<std::result::Result<Ticket, String>>;

    /// Expires the pending tickets created before `created_before_ms`; returns how many.
    fn expire_reviews(&self, created_before_ms: i64, now_ms: i64) -> Result<u64>;

    /// Stores a label for a prediction (ground truth that arrived later).
    fn add_feedback(&self, feedback: &Feedback) -> Result<()>;

    /// Every label, oldest first.
    fn feedback(&self) -> Result<Vec<Feedback>>;
}

/// An API key of a server (`keel keys`): who may do what, and for which tenant. Only the
/// sha256 of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Its name (unique in the store).
    pub name: String,
    /// The sha256 of its secret, lower-case hex.
    pub hash: String,
    /// What it may do: `infer`, `review`, `admin`.
    pub scopes: Vec<String>,
    /// The routing key its requests carry (budgets and canary stickiness follow it).
    pub tenant: Option<String>,
    /// When it was made (milliseconds since the Unix epoch).
    pub created_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// The API keys of the servers on a store.
pub trait KeyStore: Send + Sync {
    /// Adds a key. `Ok(Err(message))`: refused (its name is taken).
    fn add_key(&self, key: &ApiKey) -> Result<std::result::Result<(), String>>;

    /// Every key, revoked ones included, by name.
    fn keys(&self) -> Result<Vec<ApiKey>>;

    /// The key whose secret has this sha256 (revoked or not).
    fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>>;

    /// Revokes the key of this name; returns whether it existed and was not revoked yet.
    fn revoke_key(&self, name: &str, now_ms: i64) -> Result<bool>;
}

/// A routing key's budget as a store keeps it. Amounts are in billionths of the manifests' unit,
/// as integers, so that sums are exact (a budget of 10 calls at 0.1 admits exactly 10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRow {
    /// The routing key.
    pub key: String,
    /// The most the key may spend per period.
    pub limit: i64,
    /// The period (milliseconds), starting when the budget was first set; None: one period.
    pub period_ms: Option<i64>,
    /// The cheaper model that serves the key at exhaustion; None: refused.
    pub downgrade_to: Option<String>,
    /// When the current period started (milliseconds since the Unix epoch).
    pub period_start_ms: i64,
    /// Charged in the current period.
    pub spent: i64,
    /// Held by requests running now (in any process sharing the store).
    pub reserved: i64,
}

impl BudgetRow {
    /// The row as of `now_ms`: a period that ended is renewed (nothing spent in it yet).
    pub fn rolled(mut self, now_ms: i64) -> Self {
        if let Some(period) = self.period_ms.filter(|p| *p > 0) {
            if now_ms - self.period_start_ms >= period {
                self.period_start_ms += (now_ms - self.period_start_ms) / period * period;
                self.spent = 0;
            }
        }
        self
    }

    /// What is left to reserve.
    pub fn left(&self) -> i64 {
        (self.limit - self.spent - self.reserved).max(0)
    }
}

/// What [`BudgetStore::reserve_budget`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// The key has no budget: nothing was held.
    NoBudget,
    /// The amount is held against the key's budget.
    Held,
    /// The budget cannot pay: nothing was held; where it stood.
    Short(BudgetRow),
}

/// Budgets kept in the store, for the processes that share it (a fleet's replicas): each
/// reservation is one atomic update of the key's row, so that concurrent requests through any
/// replica never spend more than the budget.
pub trait BudgetStore: Send + Sync {
    /// Sets (or replaces) a key's limit, period and downgrade; what it spent in its current
    /// period is kept (a new budget's period starts at `now_ms`).
    fn set_budget(
        &self,
        key: &str,
        limit: i64,
        period_ms: Option<i64>,
        downgrade_to: Option<&str>,
        now_ms: i64,
    ) -> Result<()>;

    /// The budget of `key` (every budget if None), by key, as stored (see [`BudgetRow::rolled`]).
    fn budget_rows(&self, key: Option<&str>) -> Result<Vec<BudgetRow>>;

    /// Holds `amount` against the key's budget if what is left as of `now_ms` can pay for it,
    /// in one atomic step.
    fn reserve_budget(&self, key: &str, amount: i64, now_ms: i64) -> Result<Reserved>;

    /// Releases `held` (a reservation's amount) and charges `charged` (at most `held`).
    fn release_budget(&self, key: &str, held: i64, charged: i64) -> Result<()>;
}

/// A key's scopes as the store keeps them.
fn scopes_text(scopes: &[String]) -> String {
    scopes.join(",")
}

fn scopes_of(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The writes of a route change, in a transaction of a store's own: what [`write_change`]
/// drives, so that the change itself is worked out once for every store.
pub(crate) trait RouteWrites {
    /// Points `alias` of `name` at `to`, or removes it.
    fn set_alias(&mut self, name: &str, alias: &str, to: Option<&VersionId>) -> Result<()>;
    /// Appends one move to the alias history; returns its sequence number.
    fn record_move(&mut self, name: &str, event: &AliasEvent) -> Result<i64>;
    /// Marks the routes changed (for the other processes polling them).
    fn bump_routes_version(&mut self) -> Result<()>;
    /// Sets or clears the canary settings of `name`.
    fn set_canary(&mut self, name: &str, canary: Option<&CanaryConfig>) -> Result<()>;
}

/// Writes a route change (the routes `before` it and `after` it) through `w`: every alias that
/// moved, each move in the history with the time and `reason`, the canary settings, the routes'
/// version. Returns the moves recorded.
pub(crate) fn write_change(
    w: &mut impl RouteWrites,
    name: &str,
    before: &Routes,
    after: &Routes,
    reason: &str,
) -> Result<Vec<AliasEvent>> {
    let now = now_ms();
    let aliases: std::collections::BTreeSet<&String> =
        before.aliases.keys().chain(after.aliases.keys()).collect();
    let mut events = Vec::new();
    for alias in aliases {
        let (from, to) = (before.aliases.get(alias), after.aliases.get(alias));
        if from == to {
            continue;
        }
        w.set_alias(name, alias, to)?;
        let mut event = AliasEvent {
            seq: 0,
            time_ms: now,
            name: name.to_string(),
            alias: alias.clone(),
            from: from.cloned(),
            to: to.cloned(),
            reason: reason.to_string(),
        };
        event.seq = w.record_move(name, &event)?;
        events.push(event);
    }
    if before != after {
        w.bump_routes_version()?;
    }
    if before.canary != after.canary {
        w.set_canary(name, after.canary.as_ref())?;
    }
    Ok(events)
}

/// Whether `reviewer` may resolve `ticket` (the rule every store applies).
fn may_resolve(ticket: &Ticket, reviewer: &str) -> std::result::Result<(), String> {
    match (ticket.state, ticket.reviewer.as_deref()) {
        (TicketState::Resolved | TicketState::Expired, _) => Err(format!(
            "ticket {} is already {}",
            ticket.id,
            ticket.state.as_str()
        )),
        (TicketState::Claimed, Some(holder)) if holder != reviewer => Err(format!(
            "ticket {} is claimed by {holder} until their lease ends",
            ticket.id
        )),
        _ => Ok(()),
    }
}

/// The feedback a resolved ticket leaves.
fn review_feedback(
    ticket: &Ticket,
    reviewer: &str,
    label: &str,
    comment: Option<&str>,
    now_ms: i64,
) -> Feedback {
    Feedback {
        request_id: ticket.ticket.request_id.clone(),
        label: label.to_string(),
        source: FeedbackSource::Review,
        reviewer: Some(reviewer.to_string()),
        comment: comment.map(str::to_string),
        ticket: Some(ticket.id),
        time_ms: now_ms,
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
