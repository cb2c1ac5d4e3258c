//! The store conformance suite (`keel::store::suite`) on every store implementation.

use keel::store::{suite, SqliteStore, Store};
use std::sync::Arc;

#[test]
fn the_embedded_sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    suite::run(&|| Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn Store>);
}
