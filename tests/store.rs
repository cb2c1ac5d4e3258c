//! The store conformance suite (`keel::store::suite`) on every store implementation.

use keel::store::{suite, SqliteStore, Store};
use std::sync::Arc;

#[test]
fn the_embedded_sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    suite::run(&|| Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn Store>);
}

/// The suite on PostgreSQL, in a database made for the run (so that it starts empty) and dropped
/// after it, on the server of `KEEL_TEST_POSTGRES`: a `key=value` connection string whose role
/// may create databases, as `scripts/setup-postgres.sh` prints (scripts/test.sh sets it). No
/// `cfg`: this crate always builds keel with its `postgres` feature (tests/Cargo.toml).
#[test]
fn the_postgres_store_passes_the_suite() {
    use keel::store::PgStore;
    use std::io::Write;

    let Ok(url) = std::env::var("KEEL_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "KEEL_TEST_POSTGRES is not set, and CI must run the PostgreSQL store's suite \
             (scripts/test.sh sets it)"
        );
        // Written straight to stderr: the harness keeps a passing test's prints to itself.
        let _ = writeln!(
            std::io::stderr(),
            "the_postgres_store_passes_the_suite: skipped, KEEL_TEST_POSTGRES is not set; to run it: \
             KEEL_TEST_POSTGRES=$(bash scripts/setup-postgres.sh) cargo test --release -p keel-tests --test store"
        );
        return;
    };
    assert!(
        !url.contains("://"),
        "KEEL_TEST_POSTGRES must be a key=value connection string (the test appends dbname=), not a URL"
    );

    /// Drops the run's database when the test ends, passed or failed.
    struct Database<'a> {
        url: &'a str,
        name: String,
    }
    impl Drop for Database<'_> {
        fn drop(&mut self) {
            if let Err(e) = PgStore::drop_database(self.url, &self.name) {
                eprintln!("cannot drop the test database {}: {e}", self.name);
            }
        }
    }
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let db = Database {
        url: &url,
        name: format!("keel_suite_{}_{millis}", std::process::id()),
    };
    PgStore::create_database(&url, &db.name).unwrap();
    let store_url = format!("{url} dbname={}", db.name);
    let started = std::time::Instant::now();
    suite::run(&|| Arc::new(PgStore::connect(&store_url).unwrap()) as Arc<dyn Store>);
    let _ = writeln!(
        std::io::stderr(),
        "the_postgres_store_passes_the_suite: the suite ran in {:.2} s on {}",
        started.elapsed().as_secs_f64(),
        PgStore::connect(&store_url).unwrap().location()
    );
}
