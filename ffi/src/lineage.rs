//! Lineage: the record of every prediction made through the version layer (what answered it,
//! from which files, routed how and why), looked up, listed and replayed.
//!
//! Records are written by a background thread in batched transactions, off the caller's path.
//! `keel_lineage_flush` waits until every request answered before it is committed; the lookups
//! here flush by themselves when they would otherwise miss a request just answered.

use crate::engine::{engine_of, keel_engine};
use crate::guard::{self, Out};
use crate::handle;
use crate::status::{keel_error, keel_status, Failure};
use crate::string::{keel_string, StringObject};
use keel::version::{Error, Versioned};
use std::ffi::c_char;

/// Runs a lookup; if it misses the request, flushes the lineage writer (the record may still be
/// on its way to the store) and runs it again.
fn flushed<T>(store: &Versioned, lookup: impl Fn() -> Result<T, Error>) -> Result<T, Failure> {
    match lookup() {
        Err(Error::UnknownRequest(_)) => {
            store.flush()?;
            Ok(lookup()?)
        }
        other => Ok(other?),
    }
}

/// The lineage record of the request `request_id` (from `keel_embeddings_request_id`,
/// `keel_completion_request_id` or the caller's own `keel_request_info.request_id`), as one JSON
/// object: `request_id`, `time` (ms since the Unix epoch), `key`, `model` (the name), `addressed`
/// (as the caller named it), `version` (the id that answered), `weights`, `files` (each file's
/// sha256), `manifest_hash`, `keel_version`, `backend`, `batch_id`, `cache_hit`, `route`
/// ("production", "canary", an alias, "direct"), `route_reason`, `shadow_of` and `divergence`
/// (for a shadow run, whose id is the original's followed by ".shadow"), `input_hash`, `input`
/// (when the version keeps inputs), `output` (a summary), `timings_us` (per stage), `contract`
/// (the verdict), `cost` (the price), `review` (the decision and ticket) and `notes` (what the
/// other layers noted: the drift state, a router's choice). Fields may be added later. A request answered before the call is always
/// found (the call flushes the lineage writer when needed).
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a non-UTF-8 id or an engine
/// without a store; `KEEL_ERR_NOT_FOUND` for an id with no record (unknown, pruned, or a request
/// that failed); `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `request_id` is NULL or NUL-terminated; `out_json` points to a writable `keel_string *`; `err`
/// is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_lineage_show(
    engine: *const keel_engine,
    request_id: *const c_char,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let request_id = guard::c_str(request_id, "request_id")?;
        let store = engine.store()?;
        let record = flushed(store, || store.explain(request_id))?;
        out.set(handle::insert(StringObject::json(&record)?));
        Ok(())
    })
}

/// The newest `n` lineage records in the store, newest first, as a JSON array of the objects
/// `keel_lineage_show` describes (also those written by other engines on the same store). The
/// lineage writer is flushed first, so every request answered before the call is included.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments or an engine without a
/// store; `KEEL_ERR_STORAGE` when the store fails or records were lost since the last flush (as
/// for `keel_lineage_flush`).
///
/// # Safety
/// `out_json` points to a writable `keel_string *`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_lineage_recent(
    engine: *const keel_engine,
    n: usize,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let store = engine.store()?;
        store.flush()?;
        let records = store.recent(n)?;
        out.set(handle::insert(StringObject::json(&records)?));
        Ok(())
    })
}

/// Waits until the lineage record of every request answered on this engine before the call is
/// committed to the store: once it returns, those records survive a crash of the process and
/// other processes on the store see them.
///
/// On failure `*err` (if `err` is not NULL) holds the error: `KEEL_ERR_INVALID_ARGUMENT` for a
/// NULL or stale engine or an engine without a store; `KEEL_ERR_STORAGE` when records were lost
/// since the last flush (the store failed to write them; the message says why).
///
/// # Safety
/// `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; it blocks until
/// the writer has committed (normally milliseconds).
#[no_mangle]
pub unsafe extern "C" fn keel_lineage_flush(
    engine: *const keel_engine,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        engine.store()?.flush()?;
        Ok(())
    })
}

/// Runs the recorded prediction `request_id` again on the version that made it (its files
/// checked against their registered sha256 again), without the response cache, and writes to
/// `*out_identical` whether the output is the recorded one bit for bit. Only a request whose
/// version was registered with `retain_input` can be replayed. The replay writes no lineage
/// record of its own.
///
/// On failure `*out_identical` is false and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments or an engine without a store;
/// `KEEL_ERR_NOT_FOUND` for an unknown request id, an input that was not retained, or a
/// version whose files are gone or changed; `KEEL_ERR_STORAGE` when the store fails; the
/// engine's errors for the run itself.
///
/// # Safety
/// `request_id` is NULL or NUL-terminated; `out_identical` points to a writable `bool`; `err` is
/// NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_lineage_replay(
    engine: *const keel_engine,
    request_id: *const c_char,
    out_identical: *mut bool,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_identical, "out_identical", false)?;
        let engine = engine_of(engine)?;
        let request_id = guard::c_str(request_id, "request_id")?;
        let store = engine.store()?;
        let replay = flushed(store, || store.replay(request_id))?;
        out.set(replay.identical);
        Ok(())
    })
}

/// The version layer's counters as a JSON object: `{"lineage": {"written", "dropped", "failed",
/// "transactions", "pruned"}, "shadow": {"run", "dropped", "stale", "failed"}, "guard": {...} |
/// null}`. `"guard"` holds the figures of `name`'s guarded canary (`canary_requests`,
/// `error_rate`, `p99_ratio`, `divergence`, `compared`, `tripped`), or null when `name` is NULL
/// or has no guarded canary loaded.
///
/// On success `*out` holds a new string owned by the caller (free it with `keel_string_free`). On
/// failure `*out` is NULL and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for an engine without a store.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `out` points to a writable `keel_string *`; `err` is NULL or
/// points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; a snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_lineage_stats(
    engine: *const keel_engine,
    name: *const c_char,
    out: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let store = engine.store()?;
        let name = if name.is_null() {
            None
        } else {
            Some(guard::c_str(name, "name")?)
        };
        let l = store.lineage_stats();
        let sh = store.shadow_stats();
        let guard = name.and_then(|n| store.guard_report(n)).map(|g| {
            serde_json::json!({
                "canary_requests": g.canary_requests,
                "error_rate": g.error_rate,
                "p99_ratio": g.p99_ratio,
                "divergence": g.divergence,
                "compared": g.compared,
                "tripped": g.tripped,
            })
        });
        let stats = serde_json::json!({
            "lineage": {"written": l.written, "dropped": l.dropped, "failed": l.failed,
                        "transactions": l.transactions, "pruned": l.pruned},
            "shadow": {"run": sh.run, "dropped": sh.dropped, "stale": sh.stale, "failed": sh.failed},
            "guard": guard,
        });
        out.set(handle::insert(StringObject::new(stats.to_string())));
        Ok(())
    })
}
