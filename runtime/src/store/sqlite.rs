//! The embedded store: one SQLite database (bundled SQLite, WAL mode) in the deployment's folder.
//!
//! The file is marked as Keel's (`PRAGMA application_id`) and carries its schema version
//! (`PRAGMA user_version`); opening it applies the migrations it lacks, and refuses another
//! application's database or one from a newer Keel.

use super::{
    AliasEvent, CanaryConfig, Error, Feedback, FeedbackSource, LineageRow, LineageStore, NewTicket,
    RegistryStore, Result, Retention, ReviewStore, RouteChange, Routes, Store, Ticket, TicketState,
    VersionRecord,
};
use crate::manifest::{Manifest, VersionId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The database's file name inside a store folder.
pub const DATABASE_FILE: &str = "keel.db";

/// The schema version this build writes (the number of migrations).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// "KEEL" in ASCII: marks a SQLite file as a Keel store.
const APPLICATION_ID: i64 = 0x4B45_454C;

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: registry, aliases and their history, canary settings, lineage.
    "CREATE TABLE versions (
        name TEXT NOT NULL, version_id TEXT NOT NULL, path TEXT NOT NULL, weights TEXT NOT NULL,
        retain_input INTEGER NOT NULL, manifest TEXT NOT NULL, registered_ms INTEGER NOT NULL,
        PRIMARY KEY (name, version_id));
     CREATE TABLE aliases (
        name TEXT NOT NULL, alias TEXT NOT NULL, version_id TEXT NOT NULL,
        PRIMARY KEY (name, alias));
     CREATE TABLE canaries (name TEXT PRIMARY KEY, config TEXT NOT NULL);
     CREATE TABLE alias_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
        from_version TEXT, to_version TEXT, time_ms INTEGER NOT NULL, reason TEXT NOT NULL);
     CREATE INDEX alias_history_by_name ON alias_history (name, seq);
     CREATE TABLE lineage (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,
        time_ms INTEGER NOT NULL, record TEXT NOT NULL);
     CREATE INDEX lineage_by_request ON lineage (request_id);
     CREATE INDEX lineage_by_time ON lineage (time_ms);
     CREATE TABLE routes_version (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
     INSERT INTO routes_version VALUES (0, 0);",
    // 2: the review queue and feedback.
    "CREATE TABLE review (
        id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL, version TEXT NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL,
        input TEXT NOT NULL, output TEXT NOT NULL, created_ms INTEGER NOT NULL,
        state TEXT NOT NULL, reviewer TEXT, lease_until_ms INTEGER, label TEXT, comment TEXT,
        closed_ms INTEGER);
     CREATE INDEX review_by_state ON review (state, id);
     CREATE TABLE feedback (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, label TEXT NOT NULL,
        source TEXT NOT NULL, reviewer TEXT, comment TEXT, ticket INTEGER, time_ms INTEGER NOT NULL);
     CREATE INDEX feedback_by_request ON feedback (request_id);",
    // 3: the API keys of `keel serve`.
    "CREATE TABLE api_keys (
        name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL, tenant TEXT,
        created_ms INTEGER NOT NULL, revoked_ms INTEGER);",
    // 4: budgets kept in the store (amounts in billionths of a unit), for the processes sharing it.
    "CREATE TABLE budgets (
        key TEXT PRIMARY KEY, limit_units INTEGER NOT NULL, period_ms INTEGER, downgrade_to TEXT,
        period_start_ms INTEGER NOT NULL, spent INTEGER NOT NULL, reserved INTEGER NOT NULL);",
];

/// The columns of a ticket, in the order `read_ticket` reads them.
const TICKET_COLUMNS: &str = "id, request_id, model, version, decision, reasons, input, output, created_ms,
     state, reviewer, lease_until_ms, label, comment, closed_ms";

/// Returns the claimed tickets whose lease ended to the pending ones.
const RELEASE_LAPSED: &str = "UPDATE review SET state = 'pending', reviewer = NULL, lease_until_ms = NULL
     WHERE state = 'claimed' AND lease_until_ms <= ?1";

/// The embedded store. One connection, behind a mutex: writes are batched by their callers (the
/// lineage writer commits many records per transaction), so one is enough.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `folder`, applying missing migrations.
    ///
    /// # Errors
    /// [`Error::NotWritable`] if the folder cannot be created or written, [`Error::NotAStore`]
    /// for a database of another application (or a file that is not SQLite),
    /// [`Error::NewerSchema`] for a store written by a newer Keel.
    pub fn open(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        let not_writable = |reason: String| Error::NotWritable {
            path: folder.to_path_buf(),
            reason,
        };
        if folder.exists() && !folder.is_dir() {
            return Err(not_writable("it is a file, not a folder".into()));
        }
        std::fs::create_dir_all(folder).map_err(|e| not_writable(e.to_string()))?;
        let path = folder.join(DATABASE_FILE);
        let conn = Connection::open(&path).map_err(|e| not_writable(e.to_string()))?;
        let store = Self {
            path,
            conn: Mutex::new(conn),
        };
        // The first opens of a new store by several processes at once can find it locked without
        // SQLite's busy handler being asked (the switch to WAL mode): try again for a while.
        let mut tries = 0;
        loop {
            match store.prepare() {
                Err(Error::Database { reason, .. }) if reason.contains("locked") && tries < 200 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5 + tries % 20));
                }
                other => return other.map(|()| store),
            }
        }
    }

    fn db_error(&self, e: rusqlite::Error) -> Error {
        Error::Database {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite rolls back a transaction left open by a panic when it is dropped.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that the file is a Keel store of a schema this build reads, and migrates it.
    fn prepare(&self) -> Result<()> {
        let mut conn = self.conn();
        let not_a_store = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => Error::NotAStore {
                path: self.path.clone(),
                reason: e.to_string(),
            },
            _ => self.db_error(e),
        };
        // Processes opening a new store at once wait for each other here.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| self.db_error(e))?;
        // Checked and migrated under the write lock, so that a store another process is
        // creating is seen whole or not at all. Nothing is written to a file that is refused.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(not_a_store)?;
        let read = |sql: &str| tx.query_row(sql, [], |r| r.get::<_, i64>(0)).map_err(not_a_store);
        let (app, tables, found) = (
            read("PRAGMA application_id")?,
            read("SELECT count(*) FROM sqlite_master")?,
            read("PRAGMA user_version")?,
        );
        if app != APPLICATION_ID && !(app == 0 && tables == 0) {
            return Err(Error::NotAStore {
                path: self.path.clone(),
                reason: format!("its application id is {app:#x} with {tables} schema objects"),
            });
        }
        if found > SCHEMA_VERSION {
            return Err(Error::NewerSchema {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            tx.execute_batch(sql).map_err(|e| self.db_error(e))?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .map_err(|e| self.db_error(e))?;
        }
        tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}"))
            .map_err(|e| self.db_error(e))?;
        tx.commit().map_err(|e| self.db_error(e))?;
        // WAL: readers never block the writer; `synchronous = NORMAL` in WAL mode makes a
        // committed transaction survive a crash of the process (not of the machine's power).
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| self.db_error(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Database {
                path: self.path.clone(),
                reason: format!("cannot use WAL mode (the journal mode is {mode})"),
            });
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(|e| self.db_error(e))
    }

    /// SQLite's own integrity check: "ok", or what is wrong.
    pub fn integrity_check(&self) -> Result<String> {
        self.conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.db_error(e))
    }

    fn version_id(&self, text: String) -> rusqlite::Result<VersionId> {
        VersionId::parse(&text).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("'{text}' is not a version id").into(),
            )
        })
    }

    fn read_version(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRecord> {
        let manifest: String = r.get(5)?;
        let manifest: Manifest = toml::from_str(&manifest).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
        })?;
        Ok(VersionRecord {
            name: r.get(0)?,
            id: self.version_id(r.get(1)?)?,
            path: PathBuf::from(r.get::<_, String>(2)?),
            weights: r.get(3)?,
            retain_input: r.get(4)?,
            manifest,
            registered_ms: r.get(6)?,
        })
    }

    fn read_routes(&self, conn: &Connection, name: &str) -> rusqlite::Result<Routes> {
        let mut aliases = BTreeMap::new();
        let mut stmt = conn.prepare_cached("SELECT alias, version_id FROM aliases WHERE name = ?1")?;
        for row in stmt.query_map([name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (alias, id) = row?;
            aliases.insert(alias, self.version_id(id)?);
        }
        let canary: Option<String> = conn
            .query_row("SELECT config FROM canaries WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        let canary = canary
            .map(|c| serde_json::from_str::<CanaryConfig>(&c))
            .transpose()
            .map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
            })?;
        Ok(Routes {
            name: name.to_string(),
            aliases,
            canary,
        })
    }

    fn read_history(&self, conn: &Connection, name: &str) -> rusqlite::Result<Vec<AliasEvent>> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, time_ms, name, alias, from_version, to_version, reason
             FROM alias_history WHERE name = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([name], |r| {
            let id = |i: usize| -> rusqlite::Result<Option<VersionId>> {
                r.get::<_, Option<String>>(i)?
                    .map(|t| self.version_id(t))
                    .transpose()
            };
            Ok(AliasEvent {
                seq: r.get(0)?,
                time_ms: r.get(1)?,
                name: r.get(2)?,
                alias: r.get(3)?,
                from: id(4)?,
                to: id(5)?,
                reason: r.get(6)?,
            })
        })?;
        rows.collect()
    }
}

fn read_ticket(r: &rusqlite::Row<'_>) -> rusqlite::Result<Ticket> {
    let state: String = r.get(9)?;
    Ok(Ticket {
        id: r.get(0)?,
        ticket: NewTicket {
            request_id: r.get(1)?,
            model: r.get(2)?,
            version: r.get(3)?,
            decision: r.get(4)?,
            reasons: r.get(5)?,
            input: r.get(6)?,
            output: r.get(7)?,
            created_ms: r.get(8)?,
        },
        state: TicketState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                9,
                rusqlite::types::Type::Text,
                format!("state '{state}'").into(),
            )
        })?,
        reviewer: r.get(10)?,
        lease_until_ms: r.get(11)?,
        label: r.get(12)?,
        comment: r.get(13)?,
        closed_ms: r.get(14)?,
    })
}

fn read_feedback(r: &rusqlite::Row<'_>) -> rusqlite::Result<Feedback> {
    let source: String = r.get(2)?;
    Ok(Feedback {
        request_id: r.get(0)?,
        label: r.get(1)?,
        source: FeedbackSource::parse(&source).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                2,
                rusqlite::types::Type::Text,
                format!("source '{source}'").into(),
            )
        })?,
        reviewer: r.get(3)?,
        comment: r.get(4)?,
        ticket: r.get(5)?,
        time_ms: r.get(6)?,
    })
}

fn insert_feedback(conn: &Connection, f: &Feedback) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT INTO feedback (request_id, label, source, reviewer, comment, ticket, time_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            f.request_id,
            f.label,
            f.source.as_str(),
            f.reviewer,
            f.comment,
            f.ticket,
            f.time_ms
        ],
    )
}

impl Store for SqliteStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

impl RegistryStore for SqliteStore {
    fn register(&self, v: &VersionRecord) -> Result<bool> {
        let conn = self.conn();
        let n = conn
            .execute(
                "INSERT OR IGNORE INTO versions
                 (name, version_id, path, weights, retain_input, manifest, registered_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    v.name,
                    v.id.as_str(),
                    v.path.to_string_lossy(),
                    v.weights,
                    v.retain_input,
                    v.manifest.to_toml(),
                    v.registered_ms
                ],
            )
            .map_err(|e| self.db_error(e))?;
        Ok(n == 1)
    }

    fn version(&self, name: &str, id: &VersionId) -> Result<Option<VersionRecord>> {
        let conn = self.conn();
        conn.query_row(
            "SELECT name, version_id, path, weights, retain_input, manifest, registered_ms
             FROM versions WHERE name = ?1 AND version_id = ?2",
            params![name, id.as_str()],
            |r| self.read_version(r),
        )
        .optional()
        .map_err(|e| self.db_error(e))
    }

    fn versions(&self) -> Result<Vec<VersionRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT name, version_id, path, weights, retain_input, manifest, registered_ms
                 FROM versions ORDER BY name, registered_ms, version_id",
            )
            .map_err(|e| self.db_error(e))?;
        let rows = stmt
            .query_map([], |r| self.read_version(r))
            .map_err(|e| self.db_error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.db_error(e))
    }

    fn routes(&self, name: &str) -> Result<Routes> {
        let conn = self.conn();
        self.read_routes(&conn, name).map_err(|e| self.db_error(e))
    }

    fn update_routes(
        &self,
        name: &str,
        change: &mut RouteChange<'_>,
    ) -> Result<std::result::Result<(Routes, Vec<AliasEvent>), String>> {
        let mut conn = self.conn();
        let db = |e| self.db_error(e);
        // IMMEDIATE: the write lock is taken before reading, so two processes changing the same
        // routes are serialized rather than one of them acting on a stale read.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let before = self.read_routes(&tx, name).map_err(db)?;
        let history = self.read_history(&tx, name).map_err(db)?;
        let mut after = before.clone();
        let reason = match change(&mut after, &history) {
            Ok(reason) => reason,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let events = super::write_change(
            &mut Writes { store: self, tx: &tx },
            name,
            &before,
            &after,
            &reason,
        )?;
        tx.commit().map_err(db)?;
        Ok(Ok((after, events)))
    }

    fn routes_version(&self) -> Result<i64> {
        let conn = self.conn();
        conn.query_row("SELECT version FROM routes_version", [], |r| r.get(0))
            .map_err(|e| self.db_error(e))
    }

    fn history(&self, name: &str) -> Result<Vec<AliasEvent>> {
        let conn = self.conn();
        self.read_history(&conn, name).map_err(|e| self.db_error(e))
    }
}

/// A route change's writes in one SQLite transaction.
struct Writes<'a> {
    store: &'a SqliteStore,
    tx: &'a rusqlite::Transaction<'a>,
}

impl super::RouteWrites for Writes<'_> {
    fn set_alias(&mut self, name: &str, alias: &str, to: Option<&VersionId>) -> Result<()> {
        match to {
            Some(to) => self.tx.execute(
                "INSERT INTO aliases (name, alias, version_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name, alias) DO UPDATE SET version_id = excluded.version_id",
                params![name, alias, to.as_str()],
            ),
            None => self.tx.execute(
                "DELETE FROM aliases WHERE name = ?1 AND alias = ?2",
                params![name, alias],
            ),
        }
        .map_err(|e| self.store.db_error(e))?;
        Ok(())
    }

    fn record_move(&mut self, name: &str, e: &AliasEvent) -> Result<i64> {
        self.tx
            .execute(
                "INSERT INTO alias_history (name, alias, from_version, to_version, time_ms, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    name,
                    e.alias,
                    e.from.as_ref().map(VersionId::as_str),
                    e.to.as_ref().map(VersionId::as_str),
                    e.time_ms,
                    e.reason
                ],
            )
            .map_err(|e| self.store.db_error(e))?;
        Ok(self.tx.last_insert_rowid())
    }

    fn bump_routes_version(&mut self) -> Result<()> {
        self.tx
            .execute("UPDATE routes_version SET version = version + 1", [])
            .map_err(|e| self.store.db_error(e))?;
        Ok(())
    }

    fn set_canary(&mut self, name: &str, canary: Option<&CanaryConfig>) -> Result<()> {
        match canary {
            Some(c) => self.tx.execute(
                "INSERT INTO canaries (name, config) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET config = excluded.config",
                params![name, serde_json::to_string(c).unwrap_or_default()],
            ),
            None => self.tx.execute("DELETE FROM canaries WHERE name = ?1", [name]),
        }
        .map_err(|e| self.store.db_error(e))?;
        Ok(())
    }
}

/// The columns of a budget, in the order `read_budget` reads them.
const BUDGET_COLUMNS: &str = "key, limit_units, period_ms, downgrade_to, period_start_ms, spent, reserved";

fn read_budget(row: &rusqlite::Row<'_>) -> rusqlite::Result<super::BudgetRow> {
    Ok(super::BudgetRow {
        key: row.get(0)?,
        limit: row.get(1)?,
        period_ms: row.get(2)?,
        downgrade_to: row.get(3)?,
        period_start_ms: row.get(4)?,
        spent: row.get(5)?,
        reserved: row.get(6)?,
    })
}

impl super::BudgetStore for SqliteStore {
    fn set_budget(
        &self,
        key: &str,
        limit: i64,
        period_ms: Option<i64>,
        downgrade_to: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO budgets (key, limit_units, period_ms, downgrade_to, period_start_ms, spent, reserved)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, 0)
                 ON CONFLICT (key) DO UPDATE SET limit_units = excluded.limit_units,
                    period_ms = excluded.period_ms, downgrade_to = excluded.downgrade_to",
                params![key, limit, period_ms, downgrade_to, now_ms],
            )
            .map(|_| ())
            .map_err(|e| self.db_error(e))
    }

    fn budget_rows(&self, key: Option<&str>) -> Result<Vec<super::BudgetRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {BUDGET_COLUMNS} FROM budgets WHERE ?1 IS NULL OR key = ?1 ORDER BY key"
            ))
            .map_err(|e| self.db_error(e))?;
        let rows = stmt.query_map([key], read_budget).map_err(|e| self.db_error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.db_error(e))
    }

    fn reserve_budget(&self, key: &str, amount: i64, now_ms: i64) -> Result<super::Reserved> {
        // One update renews an ended period and holds the amount only if what is left pays for
        // it, in a write transaction with the read of a refusal's row: another process's
        // reservation cannot come between the decision and what it reports.
        let ended = "(period_ms > 0 AND ?3 - period_start_ms >= period_ms)";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.db_error(e))?;
        let held = tx
            .execute(
                &format!(
                    "UPDATE budgets SET
                        period_start_ms = CASE WHEN {ended}
                            THEN period_start_ms + (?3 - period_start_ms) / period_ms * period_ms
                            ELSE period_start_ms END,
                        spent = CASE WHEN {ended} THEN 0 ELSE spent END,
                        reserved = reserved + ?2
                     WHERE key = ?1
                       AND limit_units - reserved - CASE WHEN {ended} THEN 0 ELSE spent END >= ?2"
                ),
                params![key, amount, now_ms],
            )
            .map_err(|e| self.db_error(e))?;
        let reserved = if held > 0 {
            super::Reserved::Held
        } else {
            let row = tx
                .query_row(
                    &format!("SELECT {BUDGET_COLUMNS} FROM budgets WHERE key = ?1"),
                    [key],
                    read_budget,
                )
                .optional()
                .map_err(|e| self.db_error(e))?;
            match row {
                None => super::Reserved::NoBudget,
                Some(row) => super::Reserved::Short(row.rolled(now_ms)),
            }
        };
        tx.commit().map_err(|e| self.db_error(e))?;
        Ok(reserved)
    }

    fn release_budget(&self, key: &str, held: i64, charged: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE budgets SET reserved = MAX(reserved - ?2, 0), spent = spent + ?3 WHERE key = ?1",
                params![key, held, charged.min(held)],
            )
            .map(|_| ())
            .map_err(|e| self.db_error(e))
    }
}

impl super::KeyStore for SqliteStore {
    fn add_key(&self, key: &super::ApiKey) -> Result<std::result::Result<(), String>> {
        let conn = self.conn();
        let added = conn.execute(
            "INSERT INTO api_keys (name, hash, scopes, tenant, created_ms, revoked_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![
                key.name,
                key.hash,
                super::scopes_text(&key.scopes),
                key.tenant,
                key.created_ms,
                key.revoked_ms
            ],
        );
        match added.map_err(|e| self.db_error(e))? {
            0 => Ok(Err(format!("a key named '{}' exists already", key.name))),
            _ => Ok(Ok(())),
        }
    }

    fn keys(&self) -> Result<Vec<super::ApiKey>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name"))
            .map_err(|e| self.db_error(e))?;
        let rows = stmt.query_map([], read_key).map_err(|e| self.db_error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.db_error(e))
    }

    fn key_by_hash(&self, hash: &str) -> Result<Option<super::ApiKey>> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?1"),
            [hash],
            read_key,
        )
        .optional()
        .map_err(|e| self.db_error(e))
    }

    fn revoke_key(&self, name: &str, now_ms: i64) -> Result<bool> {
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE api_keys SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                params![name, now_ms],
            )
            .map_err(|e| self.db_error(e))?;
        Ok(n > 0)
    }
}

/// The columns of a key, in the order `read_key` reads them.
const KEY_COLUMNS: &str = "name, hash, scopes, tenant, created_ms, revoked_ms";

fn read_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<super::ApiKey> {
    Ok(super::ApiKey {
        name: row.get(0)?,
        hash: row.get(1)?,
        scopes: super::scopes_of(&row.get::<_, String>(2)?),
        tenant: row.get(3)?,
        created_ms: row.get(4)?,
        revoked_ms: row.get(5)?,
    })
}

impl LineageStore for SqliteStore {
    fn append_lineage(&self, rows: &[LineageRow]) -> Result<()> {
        let mut conn = self.conn();
        let db = |e| self.db_error(e);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO lineage (request_id, time_ms, record) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for row in rows {
                stmt.execute(params![row.request_id, row.time_ms, row.record])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn lineage(&self, request_id: &str) -> Result<Option<LineageRow>> {
        let conn = self.conn();
        conn.query_row(
            "SELECT request_id, time_ms, record FROM lineage WHERE request_id = ?1
             ORDER BY seq DESC LIMIT 1",
            [request_id],
            |r| {
                Ok(LineageRow {
                    request_id: r.get(0)?,
                    time_ms: r.get(1)?,
                    record: r.get(2)?,
                })
            },
        )
        .optional()
        .map_err(|e| self.db_error(e))
    }

    fn recent_lineage(&self, n: usize) -> Result<Vec<LineageRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT request_id, time_ms, record FROM lineage ORDER BY seq DESC LIMIT ?1")
            .map_err(|e| self.db_error(e))?;
        let rows = stmt
            .query_map([i64::try_from(n).unwrap_or(i64::MAX)], |r| {
                Ok(LineageRow {
                    request_id: r.get(0)?,
                    time_ms: r.get(1)?,
                    record: r.get(2)?,
                })
            })
            .map_err(|e| self.db_error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.db_error(e))
    }

    fn lineage_count(&self) -> Result<u64> {
        let conn = self.conn();
        conn.query_row("SELECT count(*) FROM lineage", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.db_error(e))
    }

    fn prune_lineage(&self, retention: &Retention, now_ms: i64) -> Result<u64> {
        let conn = self.conn();
        let db = |e| self.db_error(e);
        let mut pruned = 0;
        if let Some(age) = retention.max_age_ms {
            pruned += conn
                .execute(
                    "DELETE FROM lineage WHERE time_ms < ?1",
                    [now_ms.saturating_sub(age)],
                )
                .map_err(db)? as u64;
        }
        if let Some(keep) = retention.max_records {
            pruned += conn
                .execute(
                    "DELETE FROM lineage WHERE seq <= (SELECT seq FROM lineage ORDER BY seq DESC
                     LIMIT 1 OFFSET ?1)",
                    [i64::try_from(keep).unwrap_or(i64::MAX)],
                )
                .map_err(db)? as u64;
        }
        Ok(pruned)
    }
}

impl ReviewStore for SqliteStore {
    fn enqueue_review(&self, t: &NewTicket) -> Result<i64> {
        let conn = self.conn();
        let db = |e| self.db_error(e);
        conn.execute(
            "INSERT OR IGNORE INTO review
             (request_id, model, version, decision, reasons, input, output, created_ms, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending')",
            params![
                t.request_id,
                t.model,
                t.version,
                t.decision,
                t.reasons,
                t.input,
                t.output,
                t.created_ms
            ],
        )
        .map_err(db)?;
        conn.query_row(
            "SELECT id FROM review WHERE request_id = ?1",
            [&t.request_id],
            |r| r.get(0),
        )
        .map_err(db)
    }

    fn tickets(&self, state: Option<TicketState>, limit: usize, now_ms: i64) -> Result<Vec<Ticket>> {
        let conn = self.conn();
        let db = |e| self.db_error(e);
        conn.execute(RELEASE_LAPSED, [now_ms]).map_err(db)?;
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {TICKET_COLUMNS} FROM review WHERE ?1 IS NULL OR state = ?1 ORDER BY id LIMIT ?2"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![
                    state.map(TicketState::as_str),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                read_ticket,
            )
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn ticket(&self, id: i64, now_ms: i64) -> Result<Option<Ticket>> {
        let conn = self.conn();
        let db = |e| self.db_error(e);
        conn.execute(RELEASE_LAPSED, [now_ms]).map_err(db)?;
        conn.query_row(
            &format!("SELECT {TICKET_COLUMNS} FROM review WHERE id = ?1"),
            [id],
            read_ticket,
        )
        .optional()
        .map_err(db)
    }

    fn claim_review(&self, reviewer: &str, lease_ms: i64, now_ms: i64) -> Result<Option<Ticket>> {
        let mut conn = self.conn();
        let db = |e| self.db_error(e);
        // IMMEDIATE: the write lock before the read, so two processes cannot pick the same row.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        tx.execute(RELEASE_LAPSED, [now_ms]).map_err(db)?;
        let id: Option<i64> = tx
            .query_row(
                "SELECT id FROM review WHERE state = 'pending' ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let Some(id) = id else { return Ok(None) };
        tx.execute(
            "UPDATE review SET state = 'claimed', reviewer = ?2, lease_until_ms = ?3 WHERE id = ?1",
            params![id, reviewer, now_ms.saturating_add(lease_ms)],
        )
        .map_err(db)?;
        let ticket = tx
            .query_row(
                &format!("SELECT {TICKET_COLUMNS} FROM review WHERE id = ?1"),
                [id],
                read_ticket,
            )
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Some(ticket))
    }

    fn resolve_review(
        &self,
        id: i64,
        reviewer: &str,
        label: &str,
        comment: Option<&str>,
        now_ms: i64,
    ) -> Result<std::result::Result<Ticket, String>> {
        let mut conn = self.conn();
        let db = |e| self.db_error(e);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        tx.execute(RELEASE_LAPSED, [now_ms]).map_err(db)?;
        let select = format!("SELECT {TICKET_COLUMNS} FROM review WHERE id = ?1");
        let Some(before) = tx.query_row(&select, [id], read_ticket).optional().map_err(db)? else {
            return Ok(Err(format!("there is no ticket {id}")));
        };
        if let Err(refusal) = super::may_resolve(&before, reviewer) {
            return Ok(Err(refusal));
        }
        tx.execute(
            "UPDATE review SET state = 'resolved', reviewer = ?2, label = ?3, comment = ?4,
             lease_until_ms = NULL, closed_ms = ?5 WHERE id = ?1",
            params![id, reviewer, label, comment, now_ms],
        )
        .map_err(db)?;
        insert_feedback(
            &tx,
            &super::review_feedback(&before, reviewer, label, comment, now_ms),
        )
        .map_err(db)?;
        let after = tx.query_row(&select, [id], read_ticket).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Ok(after))
    }

    fn expire_reviews(&self, created_before_ms: i64, now_ms: i64) -> Result<u64> {
        let conn = self.conn();
        let db = |e| self.db_error(e);
        conn.execute(RELEASE_LAPSED, [now_ms]).map_err(db)?;
        conn.execute(
            "UPDATE review SET state = 'expired', closed_ms = ?2 WHERE state = 'pending' AND created_ms < ?1",
            params![created_before_ms, now_ms],
        )
        .map(|n| n as u64)
        .map_err(db)
    }

    fn add_feedback(&self, feedback: &Feedback) -> Result<()> {
        insert_feedback(&self.conn(), feedback)
            .map(|_| ())
            .map_err(|e| self.db_error(e))
    }

    fn feedback(&self) -> Result<Vec<Feedback>> {
        let conn = self.conn();
        let db = |e| self.db_error(e);
        let mut stmt = conn
            .prepare_cached(
                "SELECT request_id, label, source, reviewer, comment, ticket, time_ms FROM feedback ORDER BY seq",
            )
            .map_err(db)?;
        let rows = stmt.query_map([], read_feedback).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_foreign_and_newer_databases_and_migrates_its_own() {
        let dir = std::env::temp_dir().join(format!("keel-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SqliteStore::open(&dir).unwrap();
        assert_eq!(store.integrity_check().unwrap(), "ok");
        drop(store);
        // Opening again changes nothing.
        SqliteStore::open(&dir).unwrap();
        // A newer schema is refused.
        let conn = Connection::open(dir.join(DATABASE_FILE)).unwrap();
        conn.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        drop(conn);
        let e = SqliteStore::open(&dir).err().unwrap();
        assert!(
            matches!(e, Error::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{e}"
        );
        // Another application's database is refused.
        let other = dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        Connection::open(other.join(DATABASE_FILE))
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = SqliteStore::open(&other).err().unwrap();
        assert!(matches!(e, Error::NotAStore { .. }), "{e}");
        // So is a file that is not SQLite at all.
        let junk = dir.join("junk");
        std::fs::create_dir_all(&junk).unwrap();
        std::fs::write(junk.join(DATABASE_FILE), vec![0x5a; 4096]).unwrap();
        let e = SqliteStore::open(&junk).err().unwrap();
        assert!(matches!(e, Error::NotAStore { .. }), "{e}");
        // A folder that cannot be made (under a file) is not writable.
        let e = SqliteStore::open(junk.join(DATABASE_FILE).join("sub"))
            .err()
            .unwrap();
        assert!(matches!(e, Error::NotWritable { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn processes_creating_one_store_at_once_all_open_it() {
        let dir = std::env::temp_dir().join(format!("keel-store-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                // Separate connections race as separate processes do.
                std::thread::spawn(move || SqliteStore::open(&dir).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prunes_by_count_and_age() {
        let dir = std::env::temp_dir().join(format!("keel-store-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SqliteStore::open(&dir).unwrap();
        let rows: Vec<LineageRow> = (0..10)
            .map(|i| LineageRow {
                request_id: format!("r{i}"),
                time_ms: 1000 + i,
                record: "{}".into(),
            })
            .collect();
        store.append_lineage(&rows).unwrap();
        let keep = |n| Retention {
            max_records: Some(n),
            max_age_ms: None,
        };
        assert_eq!(store.prune_lineage(&keep(6), 0).unwrap(), 4);
        assert_eq!(store.lineage_count().unwrap(), 6);
        assert!(store.lineage("r3").unwrap().is_none());
        assert!(store.lineage("r4").unwrap().is_some());
        let age = Retention {
            max_age_ms: Some(3),
            max_records: None,
        };
        // Now 1010: records older than 1007 go (r4, r5, r6).
        assert_eq!(store.prune_lineage(&age, 1010).unwrap(), 3);
        let ids: Vec<String> = store
            .recent_lineage(10)
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids, vec!["r9", "r8", "r7"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
