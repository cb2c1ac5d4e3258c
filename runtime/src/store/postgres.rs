//! The fleet store: the same [`Store`] on a PostgreSQL server that many hosts share.
//!
//! The tables mirror `sqlite.rs`'s. `keel_schema` holds the schema version; opening applies the
//! migrations it lacks in one transaction under an advisory lock, so that hosts opening a new
//! database at once see it whole or not at all. Route changes serialize on a row lock; review
//! claims take their ticket with `FOR UPDATE SKIP LOCKED`, so claimers never wait on each other.
//!
//! A lapsed lease is not written back as "pending" by readers (as SQLite's store does): every
//! query reads a claimed ticket whose lease ended as pending, and a claim takes it directly. So a
//! read never takes a row lock, and the only writers of a ticket are the claim, the resolution
//! and the expiry, which lock the row they change.

use super::{
    AliasEvent, CanaryConfig, Error, Feedback, FeedbackSource, LineageRow, LineageStore, NewTicket,
    RegistryStore, Result, Retention, ReviewStore, RouteChange, Routes, Store, Ticket, TicketState,
    VersionRecord,
};
use crate::manifest::{Manifest, VersionId};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::FromSql;
use postgres::{Client, GenericClient, NoTls, Row};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The schema version this build writes (the number of migrations).
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The key of the advisory lock that migrations run under ("KEEL" in ASCII).
const MIGRATION_LOCK: i64 = 0x4B45_454C;

/// The channel a route change is announced on (NOTIFY), for the other hosts' routes.
const ROUTES_CHANNEL: &str = "keel_routes";

/// Idle connections kept per store: a server's connection slots are shared by the whole fleet,
/// so a burst of calls does not leave its peak number of connections open.
const MAX_IDLE: usize = 8;

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only; numbered as
/// `sqlite.rs`'s, so that the two schemas move together.
const MIGRATIONS: &[&str] = &[
    // 1: registry, aliases and their history, canary settings, lineage.
    "CREATE TABLE versions (
        name TEXT NOT NULL, version_id TEXT NOT NULL, path TEXT NOT NULL, weights TEXT NOT NULL,
        retain_input BOOLEAN NOT NULL, manifest TEXT NOT NULL, registered_ms BIGINT NOT NULL,
        PRIMARY KEY (name, version_id));
     CREATE TABLE aliases (
        name TEXT NOT NULL, alias TEXT NOT NULL, version_id TEXT NOT NULL,
        PRIMARY KEY (name, alias));
     CREATE TABLE canaries (name TEXT PRIMARY KEY, config TEXT NOT NULL);
     CREATE TABLE alias_history (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name TEXT NOT NULL,
        alias TEXT NOT NULL, from_version TEXT, to_version TEXT, time_ms BIGINT NOT NULL,
        reason TEXT NOT NULL);
     CREATE INDEX alias_history_by_name ON alias_history (name, seq);
     CREATE TABLE lineage (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL,
        time_ms BIGINT NOT NULL, record TEXT NOT NULL);
     CREATE INDEX lineage_by_request ON lineage (request_id, seq);
     CREATE INDEX lineage_by_time ON lineage (time_ms);
     CREATE TABLE routes_version (id INTEGER PRIMARY KEY CHECK (id = 0), version BIGINT NOT NULL);
     INSERT INTO routes_version VALUES (0, 0);",
    // 2: the review queue and feedback. `review_open` keeps a claim's search off the closed
    // tickets, however many there are.
    "CREATE TABLE review (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL, version TEXT NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL,
        input TEXT NOT NULL, output TEXT NOT NULL, created_ms BIGINT NOT NULL,
        state TEXT NOT NULL, reviewer TEXT, lease_until_ms BIGINT, label TEXT, comment TEXT,
        closed_ms BIGINT);
     CREATE INDEX review_by_state ON review (state, id);
     CREATE INDEX review_open ON review (id) WHERE state IN ('pending', 'claimed');
     CREATE TABLE feedback (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL,
        label TEXT NOT NULL, source TEXT NOT NULL, reviewer TEXT, comment TEXT, ticket BIGINT,
        time_ms BIGINT NOT NULL);
     CREATE INDEX feedback_by_request ON feedback (request_id);",
    // 3: the API keys of `keel serve`.
    "CREATE TABLE api_keys (
        name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL, tenant TEXT,
        created_ms BIGINT NOT NULL, revoked_ms BIGINT);",
    // 4: budgets kept fleet-wide (amounts in billionths of a unit).
    "CREATE TABLE budgets (
        key TEXT PRIMARY KEY, limit_units BIGINT NOT NULL, period_ms BIGINT, downgrade_to TEXT,
        period_start_ms BIGINT NOT NULL, spent BIGINT NOT NULL, reserved BIGINT NOT NULL);",
];

/// The tables the migrations create: a database holding one of them without `keel_schema`
/// belongs to another application, and is refused rather than written into.
const TABLES: &[&str] = &[
    "versions",
    "aliases",
    "canaries",
    "alias_history",
    "lineage",
    "routes_version",
    "review",
    "feedback",
    "api_keys",
    "budgets",
];

/// The columns of a ticket, in the order `read_ticket` reads them.
const TICKET_COLUMNS: &str = "id, request_id, model, version, decision, reasons, input, output, created_ms,
     state, reviewer, lease_until_ms, label, comment, closed_ms";

/// The columns of a version, in the order `read_version` reads them.
const VERSION_COLUMNS: &str = "name, version_id, path, weights, retain_input, manifest, registered_ms";

/// A pooled connection and the statements prepared on it: a statement of the request path
/// (a budget's reservation, a lineage batch) is parsed once per connection, and then costs one
/// round trip, not two.
struct Conn {
    client: Client,
    prepared: std::collections::HashMap<&'static str, postgres::Statement>,
}

impl Conn {
    fn new(client: Client) -> Self {
        Self {
            client,
            prepared: Default::default(),
        }
    }

    /// `sql`, prepared on this connection (once).
    fn prepared(&mut self, sql: &'static str) -> std::result::Result<postgres::Statement, postgres::Error> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The fleet store: one PostgreSQL database shared by every host of a fleet.
///
/// Each call takes an idle connection of its own small pool (or opens one), so that threads do
/// not serialize on one connection; a connection the server closed is dropped, and the next
/// call opens a new one. The client is synchronous (it blocks the calling thread), so call it
/// from plain threads, not from inside an async runtime.
pub struct PgStore {
    config: postgres::Config,
    location: String,
    idle: Mutex<Vec<Conn>>,
    /// The connection that waits for route changes ([`Store::wait_routes_change`]).
    listener: Mutex<Option<Client>>,
}

impl PgStore {
    /// Connects to the database of `url` (a libpq connection string, such as
    /// `host=127.0.0.1 port=5433 user=keel dbname=keel`, or a `postgresql://` URL), creating the
    /// store's tables or applying the migrations they lack.
    ///
    /// # Errors
    /// [`Error::Database`] for a string that is not a connection string; [`Error::NotWritable`]
    /// if the server cannot be reached or refuses the login; [`Error::NotAStore`] for a database
    /// holding tables of the store's names that another application made; [`Error::NewerSchema`]
    /// for a store written by a newer Keel.
    pub fn connect(url: &str) -> Result<Self> {
        let config = parse(url)?;
        let store = Self {
            location: location(&config),
            config,
            idle: Mutex::new(Vec::new()),
            listener: Mutex::new(None),
        };
        store.with(|c| store.migrate(c))?;
        Ok(store)
    }

    /// Creates the empty database `name` on the server of `url` (whose role needs the CREATEDB
    /// privilege), for a new fleet's store or a test run; [`PgStore::connect`] to it then makes
    /// the store's tables.
    ///
    /// # Errors
    /// As [`PgStore::connect`]'s; [`Error::Database`] if the server refuses (the database exists,
    /// or the role may not create one).
    pub fn create_database(url: &str, name: &str) -> Result<()> {
        admin(url, &format!("CREATE DATABASE {}", quote_identifier(name)))
    }

    /// Drops the database `name` of the server of `url`, if there is one. Every connection to it
    /// must have closed: drop the [`PgStore`]s connected to it first.
    ///
    /// # Errors
    /// As [`PgStore::create_database`]'s.
    pub fn drop_database(url: &str, name: &str) -> Result<()> {
        admin(
            url,
            &format!("DROP DATABASE IF EXISTS {}", quote_identifier(name)),
        )
    }

    fn db_error(&self, e: postgres::Error) -> Error {
        Error::Database {
            path: PathBuf::from(&self.location),
            reason: describe(&e),
        }
    }

    fn bad_value(&self, what: String) -> Error {
        Error::Database {
            path: PathBuf::from(&self.location),
            reason: what,
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Conn>> {
        // The vector is never left half-changed: a panic elsewhere does not spoil it.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on a connection of the pool, and gives it back unless it was closed. A call that
    /// panics drops its connection (and with it any transaction it left open).
    ///
    /// A pooled connection may have been cut since it was last used (the server restarted):
    /// that is known only when a call on it fails, so a call that fails because its pooled
    /// connection closed is run once more, on a new connection.
    fn with<T>(&self, mut f: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        let pooled = std::iter::from_fn(|| self.idle().pop()).find(|c| !c.is_closed());
        let reused = pooled.is_some();
        let mut client = match pooled {
            Some(client) => client,
            None => Conn::new(self.new_connection()?),
        };
        let mut out = f(&mut client);
        if out.is_err() && reused && client.is_closed() {
            client = Conn::new(self.new_connection()?);
            out = f(&mut client);
        }
        if !client.is_closed() {
            let mut idle = self.idle();
            if idle.len() < MAX_IDLE {
                idle.push(client);
            }
        }
        out
    }

    fn new_connection(&self) -> Result<Client> {
        self.config.connect(NoTls).map_err(|e| Error::NotWritable {
            path: PathBuf::from(&self.location),
            reason: describe(&e),
        })
    }

    /// Checks that the database is a Keel store of a schema this build reads, and migrates it.
    fn migrate(&self, client: &mut Client) -> Result<()> {
        let db = |e| self.db_error(e);
        let not_a_store = |reason: String| Error::NotAStore {
            path: PathBuf::from(&self.location),
            reason,
        };
        let mut tx = client.transaction().map_err(db)?;
        // Hosts opening a new database at once wait here for each other (until this
        // transaction ends): the first creates the schema, the others find it whole.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(db)?;
        let row = tx
            .query_one("SELECT to_regclass('keel_schema') IS NOT NULL", &[])
            .map_err(db)?;
        if !self.get::<bool>(&row, 0)? {
            let row = tx
                .query_one(
                    "SELECT array_agg(table_name::text ORDER BY table_name) FROM information_schema.tables
                     WHERE table_schema = current_schema() AND table_name::text = ANY($1::text[])",
                    &[&TABLES],
                )
                .map_err(db)?;
            if let Some(found) = self.get::<Option<Vec<String>>>(&row, 0)? {
                return Err(not_a_store(format!(
                    "it has tables named {} but no keel_schema table",
                    found.join(", ")
                )));
            }
            tx.batch_execute(
                "CREATE TABLE keel_schema (version BIGINT NOT NULL); INSERT INTO keel_schema VALUES (0);",
            )
            .map_err(db)?;
        }
        let rows = tx.query("SELECT version FROM keel_schema", &[]).map_err(db)?;
        let found = match rows.as_slice() {
            [row] => row
                .try_get::<_, i64>(0)
                .map_err(|e| not_a_store(format!("its keel_schema table: {}", describe(&e))))?,
            _ => {
                return Err(not_a_store(format!(
                    "its keel_schema table has {} rows, not one",
                    rows.len()
                )))
            }
        };
        if found > SCHEMA_VERSION {
            return Err(Error::NewerSchema {
                path: PathBuf::from(&self.location),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            tx.batch_execute(sql).map_err(db)?;
            tx.execute("UPDATE keel_schema SET version = $1", &[&(i as i64 + 1)])
                .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Column `i` of a row, or a database error naming it (never a panic).
    fn get<'a, T: FromSql<'a>>(&self, row: &'a Row, i: usize) -> Result<T> {
        row.try_get(i).map_err(|e| self.db_error(e))
    }

    fn version_id(&self, text: &str) -> Result<VersionId> {
        VersionId::parse(text).ok_or_else(|| self.bad_value(format!("'{text}' is not a version id")))
    }

    fn read_version(&self, r: &Row) -> Result<VersionRecord> {
        let manifest: String = self.get(r, 5)?;
        let manifest: Manifest = toml::from_str(&manifest)
            .map_err(|e| self.bad_value(format!("a stored manifest does not parse: {e}")))?;
        Ok(VersionRecord {
            name: self.get(r, 0)?,
            id: self.version_id(self.get(r, 1)?)?,
            path: PathBuf::from(self.get::<String>(r, 2)?),
            weights: self.get(r, 3)?,
            retain_input: self.get(r, 4)?,
            manifest,
            registered_ms: self.get(r, 6)?,
        })
    }

    fn read_routes(&self, c: &mut impl GenericClient, name: &str) -> Result<Routes> {
        let db = |e| self.db_error(e);
        let mut aliases = BTreeMap::new();
        for r in c
            .query("SELECT alias, version_id FROM aliases WHERE name = $1", &[&name])
            .map_err(db)?
        {
            aliases.insert(self.get::<String>(&r, 0)?, self.version_id(self.get(&r, 1)?)?);
        }
        let canary = match c
            .query_opt("SELECT config FROM canaries WHERE name = $1", &[&name])
            .map_err(db)?
        {
            Some(r) => Some(
                serde_json::from_str::<CanaryConfig>(self.get(&r, 0)?)
                    .map_err(|e| self.bad_value(format!("the canary of {name}: {e}")))?,
            ),
            None => None,
        };
        Ok(Routes {
            name: name.to_string(),
            aliases,
            canary,
        })
    }

    fn read_history(&self, c: &mut impl GenericClient, name: &str) -> Result<Vec<AliasEvent>> {
        let rows = c
            .query(
                "SELECT seq, time_ms, name, alias, from_version, to_version, reason
                 FROM alias_history WHERE name = $1 ORDER BY seq",
                &[&name],
            )
            .map_err(|e| self.db_error(e))?;
        let id = |r: &Row, i| -> Result<Option<VersionId>> {
            self.get::<Option<&str>>(r, i)?
                .map(|t| self.version_id(t))
                .transpose()
        };
        rows.iter()
            .map(|r| {
                Ok(AliasEvent {
                    seq: self.get(r, 0)?,
                    time_ms: self.get(r, 1)?,
                    name: self.get(r, 2)?,
                    alias: self.get(r, 3)?,
                    from: id(r, 4)?,
                    to: id(r, 5)?,
                    reason: self.get(r, 6)?,
                })
            })
            .collect()
    }

    /// A ticket as stored.
    fn read_ticket(&self, r: &Row) -> Result<Ticket> {
        let state: &str = self.get(r, 9)?;
        Ok(Ticket {
            id: self.get(r, 0)?,
            ticket: NewTicket {
                request_id: self.get(r, 1)?,
                model: self.get(r, 2)?,
                version: self.get(r, 3)?,
                decision: self.get(r, 4)?,
                reasons: self.get(r, 5)?,
                input: self.get(r, 6)?,
                output: self.get(r, 7)?,
                created_ms: self.get(r, 8)?,
            },
            state: TicketState::parse(state)
                .ok_or_else(|| self.bad_value(format!("a ticket's state is '{state}'")))?,
            reviewer: self.get(r, 10)?,
            lease_until_ms: self.get(r, 11)?,
            label: self.get(r, 12)?,
            comment: self.get(r, 13)?,
            closed_ms: self.get(r, 14)?,
        })
    }

    /// A ticket as stored, as of `now_ms`: claimed with a lease that ended is pending (what
    /// SQLite's store writes back before it reads).
    fn read_ticket_at(&self, r: &Row, now_ms: i64) -> Result<Ticket> {
        let mut ticket = self.read_ticket(r)?;
        if ticket.state == TicketState::Claimed && ticket.lease_until_ms.is_some_and(|l| l <= now_ms) {
            ticket.state = TicketState::Pending;
            ticket.reviewer = None;
            ticket.lease_until_ms = None;
        }
        Ok(ticket)
    }

    fn read_lineage(&self, r: &Row) -> Result<LineageRow> {
        Ok(LineageRow {
            request_id: self.get(r, 0)?,
            time_ms: self.get(r, 1)?,
            record: self.get(r, 2)?,
        })
    }

    fn read_feedback(&self, r: &Row) -> Result<Feedback> {
        let source: &str = self.get(r, 2)?;
        Ok(Feedback {
            request_id: self.get(r, 0)?,
            label: self.get(r, 1)?,
            source: FeedbackSource::parse(source)
                .ok_or_else(|| self.bad_value(format!("a label's source is '{source}'")))?,
            reviewer: self.get(r, 3)?,
            comment: self.get(r, 4)?,
            ticket: self.get(r, 5)?,
            time_ms: self.get(r, 6)?,
        })
    }
}

/// The settings of a connection string, with Keel's defaults where it has none.
fn parse(url: &str) -> Result<postgres::Config> {
    let mut config: postgres::Config = url.parse().map_err(|e| Error::Database {
        path: PathBuf::from("postgres"),
        reason: format!("not a PostgreSQL connection string: {}", describe(&e)),
    })?;
    // Without a timeout, a host that drops packets would hang the caller for minutes.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    // So that a fleet's DBA sees whose connections these are (pg_stat_activity).
    if config.get_application_name().is_none() {
        config.application_name("keel");
    }
    Ok(config)
}

/// Runs one statement that cannot run in a transaction (CREATE/DROP DATABASE) on its own
/// connection.
fn admin(url: &str, sql: &str) -> Result<()> {
    let config = parse(url)?;
    let path = || PathBuf::from(location(&config));
    let mut client = config.connect(NoTls).map_err(|e| Error::NotWritable {
        path: path(),
        reason: describe(&e),
    })?;
    client.batch_execute(sql).map_err(|e| Error::Database {
        path: path(),
        reason: describe(&e),
    })
}

/// `name` as a quoted SQL identifier (any text is a valid one, quoted).
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Where the store is, for messages: the connection string without its password.
fn location(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    let mut parts = Vec::new();
    if !hosts.is_empty() {
        parts.push(format!("host={}", hosts.join(",")));
    }
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={db}"));
    }
    format!("postgres {}", parts.join(" "))
}

/// A client error with its causes (the server's message is the cause of a "db error").
fn describe(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn insert_feedback(c: &mut impl GenericClient, f: &Feedback) -> std::result::Result<u64, postgres::Error> {
    c.execute(
        "INSERT INTO feedback (request_id, label, source, reviewer, comment, ticket, time_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &f.request_id,
            &f.label,
            &f.source.as_str(),
            &f.reviewer,
            &f.comment,
            &f.ticket,
            &f.time_ms,
        ],
    )
}

impl Store for PgStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    /// Waits on a connection of its own that LISTENs to the routes' channel: a route change
    /// NOTIFYs it when its transaction commits, on whichever host made it.
    fn wait_routes_change(&self, timeout: Duration) -> Result<bool> {
        let mut listener = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        if listener.as_ref().is_none_or(Client::is_closed) {
            let mut client = self.new_connection()?;
            client
                .batch_execute(&format!("LISTEN {ROUTES_CHANNEL}"))
                .map_err(|e| self.db_error(e))?;
            *listener = Some(client);
        }
        let Some(client) = listener.as_mut() else {
            return Ok(false);
        };
        let first = client
            .notifications()
            .timeout_iter(timeout)
            .next()
            .map(|n| n.is_some());
        let announced = match first {
            Ok(announced) => announced,
            Err(e) => {
                let e = self.db_error(e);
                *listener = None;
                return Err(e);
            }
        };
        // Several changes at once are one reload.
        while let Ok(Some(_)) = client.notifications().iter().next() {}
        Ok(announced)
    }
}

impl RegistryStore for PgStore {
    fn register(&self, v: &VersionRecord) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    &format!(
                        "INSERT INTO versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT DO NOTHING"
                    ),
                    &[
                        &v.name,
                        &v.id.as_str(),
                        &v.path.to_string_lossy(),
                        &v.weights,
                        &v.retain_input,
                        &v.manifest.to_toml(),
                        &v.registered_ms,
                    ],
                )
                .map_err(|e| self.db_error(e))?;
            Ok(n == 1)
        })
    }

    fn version(&self, name: &str, id: &VersionId) -> Result<Option<VersionRecord>> {
        self.with(|c| {
            c.query_opt(
                &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE name = $1 AND version_id = $2"),
                &[&name, &id.as_str()],
            )
            .map_err(|e| self.db_error(e))?
            .map(|r| self.read_version(&r))
            .transpose()
        })
    }

    fn versions(&self) -> Result<Vec<VersionRecord>> {
        self.with(|c| {
            // COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
            c.query(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM versions
                     ORDER BY name COLLATE \"C\", registered_ms, version_id COLLATE \"C\""
                ),
                &[],
            )
            .map_err(|e| self.db_error(e))?
            .iter()
            .map(|r| self.read_version(r))
            .collect()
        })
    }

    fn routes(&self, name: &str) -> Result<Routes> {
        self.with(|c| self.read_routes(&mut c.client, name))
    }

    fn update_routes(
        &self,
        name: &str,
        change: &mut RouteChange<'_>,
    ) -> Result<std::result::Result<(Routes, Vec<AliasEvent>), String>> {
        self.with(|c| {
            let db = |e| self.db_error(e);
            let mut tx = c.transaction().map_err(db)?;
            // Every route change locks this row first: two hosts changing routes serialize, and
            // the second reads what the first committed rather than acting on a stale read.
            tx.execute("SELECT version FROM routes_version FOR UPDATE", &[])
                .map_err(db)?;
            let before = self.read_routes(&mut tx, name)?;
            let history = self.read_history(&mut tx, name)?;
            let mut after = before.clone();
            let reason = match change(&mut after, &history) {
                Ok(reason) => reason,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let events = super::write_change(
                &mut Writes {
                    store: self,
                    tx: &mut tx,
                },
                name,
                &before,
                &after,
                &reason,
            )?;
            tx.commit().map_err(db)?;
            Ok(Ok((after, events)))
        })
    }

    fn routes_version(&self) -> Result<i64> {
        self.with(|c| {
            let row = c
                .query_one("SELECT version FROM routes_version", &[])
                .map_err(|e| self.db_error(e))?;
            self.get(&row, 0)
        })
    }

    fn history(&self, name: &str) -> Result<Vec<AliasEvent>> {
        self.with(|c| self.read_history(&mut c.client, name))
    }
}

/// A route change's writes in one PostgreSQL transaction.
struct Writes<'a, 'b> {
    store: &'a PgStore,
    tx: &'a mut postgres::Transaction<'b>,
}

impl super::RouteWrites for Writes<'_, '_> {
    fn set_alias(&mut self, name: &str, alias: &str, to: Option<&VersionId>) -> Result<()> {
        match to {
            Some(to) => self.tx.execute(
                "INSERT INTO aliases (name, alias, version_id) VALUES ($1, $2, $3)
                 ON CONFLICT (name, alias) DO UPDATE SET version_id = excluded.version_id",
                &[&name, &alias, &to.as_str()],
            ),
            None => self.tx.execute(
                "DELETE FROM aliases WHERE name = $1 AND alias = $2",
                &[&name, &alias],
            ),
        }
        .map_err(|e| self.store.db_error(e))?;
        Ok(())
    }

    fn record_move(&mut self, name: &str, e: &AliasEvent) -> Result<i64> {
        let row = self
            .tx
            .query_one(
                "INSERT INTO alias_history (name, alias, from_version, to_version, time_ms, reason)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
                &[
                    &name,
                    &e.alias,
                    &e.from.as_ref().map(VersionId::as_str),
                    &e.to.as_ref().map(VersionId::as_str),
                    &e.time_ms,
                    &e.reason,
                ],
            )
            .map_err(|e| self.store.db_error(e))?;
        self.store.get(&row, 0)
    }

    fn bump_routes_version(&mut self) -> Result<()> {
        self.tx
            .batch_execute(&format!(
                "UPDATE routes_version SET version = version + 1; NOTIFY {ROUTES_CHANNEL}"
            ))
            .map_err(|e| self.store.db_error(e))?;
        Ok(())
    }

    fn set_canary(&mut self, name: &str, canary: Option<&CanaryConfig>) -> Result<()> {
        match canary {
            Some(canary) => {
                let config = serde_json::to_string(canary)
                    .map_err(|e| self.store.bad_value(format!("the canary of {name}: {e}")))?;
                self.tx.execute(
                    "INSERT INTO canaries (name, config) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET config = excluded.config",
                    &[&name, &config],
                )
            }
            None => self.tx.execute("DELETE FROM canaries WHERE name = $1", &[&name]),
        }
        .map_err(|e| self.store.db_error(e))?;
        Ok(())
    }
}

/// The columns of a budget, in the order `read_budget` reads them.
const BUDGET_COLUMNS: &str = "key, limit_units, period_ms, downgrade_to, period_start_ms, spent, reserved";

/// A reservation of `$2` against the budget of key `$1` as of `$3` (see `reserve_budget`). The
/// row is locked and read first (`cur`: its period renewed if it ended, as
/// `period_ms > 0 AND $3 - period_start_ms >= period_ms` says), so that what the statement
/// decides on and reports is the row as the reservations before it left it.
const RESERVE: &str = "WITH cur AS (
        SELECT key, limit_units, period_ms, downgrade_to,
            CASE WHEN (period_ms > 0 AND $3 - period_start_ms >= period_ms)
                THEN period_start_ms + ($3 - period_start_ms) / period_ms * period_ms
                ELSE period_start_ms END AS period_start_ms,
            CASE WHEN (period_ms > 0 AND $3 - period_start_ms >= period_ms) THEN 0 ELSE spent END AS spent,
            reserved
        FROM budgets WHERE key = $1 FOR UPDATE),
    held AS (
        UPDATE budgets b
        SET period_start_ms = cur.period_start_ms, spent = cur.spent, reserved = cur.reserved + $2
        FROM cur WHERE b.key = cur.key AND cur.limit_units - cur.spent - cur.reserved >= $2
        RETURNING b.key)
     SELECT (SELECT count(*) FROM held), key, limit_units, period_ms, downgrade_to, period_start_ms, spent, reserved
     FROM cur";

impl super::BudgetStore for PgStore {
    fn set_budget(
        &self,
        key: &str,
        limit: i64,
        period_ms: Option<i64>,
        downgrade_to: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO budgets (key, limit_units, period_ms, downgrade_to, period_start_ms, spent, reserved)
                 VALUES ($1, $2, $3, $4, $5, 0, 0)
                 ON CONFLICT (key) DO UPDATE SET limit_units = excluded.limit_units,
                    period_ms = excluded.period_ms, downgrade_to = excluded.downgrade_to",
                &[&key, &limit, &period_ms, &downgrade_to, &now_ms],
            )
            .map(|_| ())
            .map_err(|e| self.db_error(e))
        })
    }

    fn budget_rows(&self, key: Option<&str>) -> Result<Vec<super::BudgetRow>> {
        self.with(|c| {
            let rows = c
                .query(
                    &format!("SELECT {BUDGET_COLUMNS} FROM budgets WHERE $1::TEXT IS NULL OR key = $1 ORDER BY key"),
                    &[&key],
                )
                .map_err(|e| self.db_error(e))?;
            rows.iter().map(|r| self.read_budget(r, 0)).collect()
        })
    }

    fn reserve_budget(&self, key: &str, amount: i64, now_ms: i64) -> Result<super::Reserved> {
        // One statement, one round trip: the row is locked (concurrent reservations of the key
        // queue on it, each reading the row as the one before left it), an ended period is
        // renewed, and the amount is held only if what is left pays for it. A refusal reports
        // the row it was decided on.
        self.with(|c| {
            let reserve = c.prepared(RESERVE).map_err(|e| self.db_error(e))?;
            let row = c
                .query_opt(&reserve, &[&key, &amount, &now_ms])
                .map_err(|e| self.db_error(e))?;
            Ok(match row {
                None => super::Reserved::NoBudget,
                Some(r) if r.get::<_, i64>(0) > 0 => super::Reserved::Held,
                Some(r) => super::Reserved::Short(self.read_budget(&r, 1)?.rolled(now_ms)),
            })
        })
    }

    fn release_budget(&self, key: &str, held: i64, charged: i64) -> Result<()> {
        self.with(|c| {
            let release = c
                .prepared(
                    "UPDATE budgets SET reserved = GREATEST(reserved - $2, 0), spent = spent + $3
                     WHERE key = $1",
                )
                .map_err(|e| self.db_error(e))?;
            c.execute(&release, &[&key, &held, &charged.min(held)])
                .map(|_| ())
                .map_err(|e| self.db_error(e))
        })
    }
}

impl PgStore {
    /// A budget of BUDGET_COLUMNS, from column `first` on.
    fn read_budget(&self, row: &Row, first: usize) -> Result<super::BudgetRow> {
        let get = |i: usize| first + i;
        Ok(super::BudgetRow {
            key: self.get(row, get(0))?,
            limit: self.get(row, get(1))?,
            period_ms: self.get(row, get(2))?,
            downgrade_to: self.get(row, get(3))?,
            period_start_ms: self.get(row, get(4))?,
            spent: self.get(row, get(5))?,
            reserved: self.get(row, get(6))?,
        })
    }
}

impl super::KeyStore for PgStore {
    fn add_key(&self, key: &super::ApiKey) -> Result<std::result::Result<(), String>> {
        self.with(|c| {
            let added = c
                .execute(
                    "INSERT INTO api_keys (name, hash, scopes, tenant, created_ms, revoked_ms)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[
                        &key.name,
                        &key.hash,
                        &super::scopes_text(&key.scopes),
                        &key.tenant,
                        &key.created_ms,
                        &key.revoked_ms,
                    ],
                )
                .map_err(|e| self.db_error(e))?;
            Ok(match added {
                0 => Err(format!("a key named '{}' exists already", key.name)),
                _ => Ok(()),
            })
        })
    }

    fn keys(&self) -> Result<Vec<super::ApiKey>> {
        self.with(|c| {
            let rows = c
                .query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name"), &[])
                .map_err(|e| self.db_error(e))?;
            rows.iter().map(|r| self.read_key(r)).collect()
        })
    }

    fn key_by_hash(&self, hash: &str) -> Result<Option<super::ApiKey>> {
        self.with(|c| {
            let row = c
                .query_opt(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1"),
                    &[&hash],
                )
                .map_err(|e| self.db_error(e))?;
            row.map(|r| self.read_key(&r)).transpose()
        })
    }

    fn revoke_key(&self, name: &str, now_ms: i64) -> Result<bool> {
        self.with(|c| {
            let n = c
                .execute(
                    "UPDATE api_keys SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
                    &[&name, &now_ms],
                )
                .map_err(|e| self.db_error(e))?;
            Ok(n > 0)
        })
    }
}

/// The columns of a key, in the order `read_key` reads them.
const KEY_COLUMNS: &str = "name, hash, scopes, tenant, created_ms, revoked_ms";

impl PgStore {
    fn read_key(&self, row: &Row) -> Result<super::ApiKey> {
        Ok(super::ApiKey {
            name: self.get(row, 0)?,
            hash: self.get(row, 1)?,
            scopes: super::scopes_of(&self.get::<String>(row, 2)?),
            tenant: self.get(row, 3)?,
            created_ms: self.get(row, 4)?,
            revoked_ms: self.get(row, 5)?,
        })
    }
}

impl LineageStore for PgStore {
    fn append_lineage(&self, rows: &[LineageRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        let times: Vec<i64> = rows.iter().map(|r| r.time_ms).collect();
        let records: Vec<&str> = rows.iter().map(|r| r.record.as_str()).collect();
        self.with(|c| {
            // One statement (so one round trip, and atomic), the rows numbered in their order.
            let insert = c
                .prepared(
                    "INSERT INTO lineage (request_id, time_ms, record)
                     SELECT r, t, d FROM UNNEST($1::text[], $2::bigint[], $3::text[])
                     WITH ORDINALITY AS x (r, t, d, n) ORDER BY n",
                )
                .map_err(|e| self.db_error(e))?;
            c.execute(&insert, &[&ids, &times, &records])
                .map(|_| ())
                .map_err(|e| self.db_error(e))
        })
    }

    fn lineage(&self, request_id: &str) -> Result<Option<LineageRow>> {
        self.with(|c| {
            c.query_opt(
                "SELECT request_id, time_ms, record FROM lineage WHERE request_id = $1
                 ORDER BY seq DESC LIMIT 1",
                &[&request_id],
            )
            .map_err(|e| self.db_error(e))?
            .map(|r| self.read_lineage(&r))
            .transpose()
        })
    }

    fn recent_lineage(&self, n: usize) -> Result<Vec<LineageRow>> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.with(|c| {
            c.query(
                "SELECT request_id, time_ms, record FROM lineage ORDER BY seq DESC LIMIT $1",
                &[&n],
            )
            .map_err(|e| self.db_error(e))?
            .iter()
            .map(|r| self.read_lineage(r))
            .collect()
        })
    }

    fn lineage_count(&self) -> Result<u64> {
        self.with(|c| {
            let row = c
                .query_one("SELECT count(*) FROM lineage", &[])
                .map_err(|e| self.db_error(e))?;
            Ok(self.get::<i64>(&row, 0)?.max(0) as u64)
        })
    }

    fn prune_lineage(&self, retention: &Retention, now_ms: i64) -> Result<u64> {
        self.with(|c| {
            let db = |e| self.db_error(e);
            let mut pruned = 0;
            if let Some(age) = retention.max_age_ms {
                pruned += c
                    .execute(
                        "DELETE FROM lineage WHERE time_ms < $1",
                        &[&now_ms.saturating_sub(age)],
                    )
                    .map_err(db)?;
            }
            if let Some(keep) = retention.max_records {
                pruned += c
                    .execute(
                        "DELETE FROM lineage WHERE seq <= (SELECT seq FROM lineage ORDER BY seq DESC
                         LIMIT 1 OFFSET $1)",
                        &[&i64::try_from(keep).unwrap_or(i64::MAX)],
                    )
                    .map_err(db)?;
            }
            Ok(pruned)
        })
    }
}

impl ReviewStore for PgStore {
    fn enqueue_review(&self, t: &NewTicket) -> Result<i64> {
        self.with(|c| {
            let db = |e| self.db_error(e);
            // Two statements, not one: under READ COMMITTED the SELECT sees the ticket that a
            // concurrent enqueue of the same request committed (the one the INSERT yielded to).
            c.execute(
                "INSERT INTO review
                 (request_id, model, version, decision, reasons, input, output, created_ms, state)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending')
                 ON CONFLICT (request_id) DO NOTHING",
                &[
                    &t.request_id,
                    &t.model,
                    &t.version,
                    &t.decision,
                    &t.reasons,
                    &t.input,
                    &t.output,
                    &t.created_ms,
                ],
            )
            .map_err(db)?;
            let row = c
                .query_one("SELECT id FROM review WHERE request_id = $1", &[&t.request_id])
                .map_err(db)?;
            self.get(&row, 0)
        })
    }

    fn tickets(&self, state: Option<TicketState>, limit: usize, now_ms: i64) -> Result<Vec<Ticket>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // $1 is the limit; the filters that depend on leases read the time as $2.
        let (filter, leases) = match state {
            None => ("TRUE", false),
            Some(TicketState::Pending) => (
                "state = 'pending' OR (state = 'claimed' AND lease_until_ms <= $2)",
                true,
            ),
            Some(TicketState::Claimed) => (
                "state = 'claimed' AND (lease_until_ms IS NULL OR lease_until_ms > $2)",
                true,
            ),
            Some(TicketState::Resolved) => ("state = 'resolved'", false),
            Some(TicketState::Expired) => ("state = 'expired'", false),
        };
        let sql = format!("SELECT {TICKET_COLUMNS} FROM review WHERE {filter} ORDER BY id LIMIT $1");
        self.with(|c| {
            let rows = if leases {
                c.query(&sql, &[&limit, &now_ms])
            } else {
                c.query(&sql, &[&limit])
            }
            .map_err(|e| self.db_error(e))?;
            rows.iter().map(|r| self.read_ticket_at(r, now_ms)).collect()
        })
    }

    fn ticket(&self, id: i64, now_ms: i64) -> Result<Option<Ticket>> {
        self.with(|c| {
            c.query_opt(
                &format!("SELECT {TICKET_COLUMNS} FROM review WHERE id = $1"),
                &[&id],
            )
            .map_err(|e| self.db_error(e))?
            .map(|r| self.read_ticket_at(&r, now_ms))
            .transpose()
        })
    }

    fn claim_review(&self, reviewer: &str, lease_ms: i64, now_ms: i64) -> Result<Option<Ticket>> {
        self.with(|c| {
            // SKIP LOCKED: a ticket another host is claiming (or resolving) right now is passed
            // over, not waited for; a row claimed and committed since this statement began is
            // checked again against the WHERE clause once locked, so it is never taken twice. A
            // lapsed lease is claimed directly, so there is no separate release to race with.
            let row = c
                .query_opt(
                    &format!(
                        "WITH next AS (
                            SELECT id FROM review
                            WHERE state IN ('pending', 'claimed')
                              AND (state = 'pending' OR lease_until_ms <= $3)
                            ORDER BY id LIMIT 1
                            FOR UPDATE SKIP LOCKED)
                         UPDATE review SET state = 'claimed', reviewer = $1, lease_until_ms = $2
                         WHERE id = (SELECT id FROM next)
                         RETURNING {TICKET_COLUMNS}"
                    ),
                    &[&reviewer, &now_ms.saturating_add(lease_ms), &now_ms],
                )
                .map_err(|e| self.db_error(e))?;
            // Read as written, even with a lease of zero (as SQLite's store returns it).
            row.map(|r| self.read_ticket(&r)).transpose()
        })
    }

    fn resolve_review(
        &self,
        id: i64,
        reviewer: &str,
        label: &str,
        comment: Option<&str>,
        now_ms: i64,
    ) -> Result<std::result::Result<Ticket, String>> {
        self.with(|c| {
            let db = |e| self.db_error(e);
            let mut tx = c.transaction().map_err(db)?;
            // The ticket's row lock, held to the commit: a claim passes over it meanwhile, and a
            // second resolution of it waits and then finds it resolved.
            let select = format!("SELECT {TICKET_COLUMNS} FROM review WHERE id = $1 FOR UPDATE");
            let Some(row) = tx.query_opt(&select, &[&id]).map_err(db)? else {
                return Ok(Err(format!("there is no ticket {id}")));
            };
            let before = self.read_ticket_at(&row, now_ms)?;
            if let Err(refusal) = super::may_resolve(&before, reviewer) {
                return Ok(Err(refusal));
            }
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE review SET state = 'resolved', reviewer = $2, label = $3, comment = $4,
                         lease_until_ms = NULL, closed_ms = $5 WHERE id = $1 RETURNING {TICKET_COLUMNS}"
                    ),
                    &[&id, &reviewer, &label, &comment, &now_ms],
                )
                .map_err(db)?;
            let after = self.read_ticket(&row)?;
            insert_feedback(
                &mut tx,
                &super::review_feedback(&before, reviewer, label, comment, now_ms),
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(Ok(after))
        })
    }

    fn expire_reviews(&self, created_before_ms: i64, now_ms: i64) -> Result<u64> {
        self.with(|c| {
            // Pending as of `now_ms` includes a lapsed claim; it expires unclaimed, as SQLite's
            // store (which releases it first) leaves it.
            c.execute(
                "UPDATE review SET state = 'expired', closed_ms = $2, reviewer = NULL, lease_until_ms = NULL
                 WHERE created_ms < $1 AND state IN ('pending', 'claimed')
                   AND (state = 'pending' OR lease_until_ms <= $2)",
                &[&created_before_ms, &now_ms],
            )
            .map_err(|e| self.db_error(e))
        })
    }

    fn add_feedback(&self, feedback: &Feedback) -> Result<()> {
        self.with(|c| {
            insert_feedback(&mut c.client, feedback)
                .map(|_| ())
                .map_err(|e| self.db_error(e))
        })
    }

    fn feedback(&self) -> Result<Vec<Feedback>> {
        self.with(|c| {
            c.query(
                "SELECT request_id, label, source, reviewer, comment, ticket, time_ms
                 FROM feedback ORDER BY seq",
                &[],
            )
            .map_err(|e| self.db_error(e))?
            .iter()
            .map(|r| self.read_feedback(r))
            .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of its own on the server of `KEEL_TEST_POSTGRES`, dropped at the end; None
    /// (the test is skipped) where that is not set, except in CI.
    struct Scratch {
        server: String,
        name: String,
    }

    impl Scratch {
        fn new(tag: &str) -> Option<Self> {
            let Ok(server) = std::env::var("KEEL_TEST_POSTGRES") else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "KEEL_TEST_POSTGRES is not set, and CI must run the PostgreSQL store's tests"
                );
                return None;
            };
            let name = format!("keel_unit_{tag}_{}", std::process::id());
            PgStore::drop_database(&server, &name).unwrap();
            PgStore::create_database(&server, &name).unwrap();
            Some(Self { server, name })
        }

        fn url(&self) -> String {
            format!("{} dbname={}", self.server, self.name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = PgStore::drop_database(&self.server, &self.name);
        }
    }

    #[test]
    fn refuses_foreign_and_newer_databases_and_migrates_its_own() {
        let Some(db) = Scratch::new("refuse") else { return };
        let mut other = Client::connect(&db.url(), NoTls).unwrap();
        // Another application's table of one of the store's names is not written into.
        other.batch_execute("CREATE TABLE versions (x INT)").unwrap();
        let e = PgStore::connect(&db.url()).err().unwrap();
        assert!(matches!(e, Error::NotAStore { .. }), "{e}");
        other.batch_execute("DROP TABLE versions").unwrap();
        drop(PgStore::connect(&db.url()).unwrap());
        // Opening again changes nothing.
        PgStore::connect(&db.url()).unwrap();
        // A newer schema is refused.
        other
            .execute("UPDATE keel_schema SET version = $1", &[&(SCHEMA_VERSION + 1)])
            .unwrap();
        let e = PgStore::connect(&db.url()).err().unwrap();
        assert!(
            matches!(e, Error::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{e}"
        );
    }

    #[test]
    fn hosts_opening_a_new_database_at_once_all_open_it() {
        let Some(db) = Scratch::new("race") else { return };
        let url = db.url();
        std::thread::scope(|s| {
            let hosts: Vec<_> = (0..8)
                .map(|_| s.spawn(|| PgStore::connect(&url).map(|_| ())))
                .collect();
            for host in hosts {
                host.join().unwrap().unwrap();
            }
        });
    }

    #[test]
    fn names_a_server_it_cannot_reach_without_the_password() {
        let e = PgStore::connect("host=127.0.0.1 port=1 user=keel password=secret dbname=keel")
            .err()
            .unwrap();
        let text = e.to_string();
        assert!(matches!(e, Error::NotWritable { .. }), "{text}");
        assert!(text.contains("port=1") && !text.contains("secret"), "{text}");
        let e = PgStore::connect("port=not-a-port").err().unwrap();
        assert!(matches!(e, Error::Database { .. }), "{e}");
    }
}
