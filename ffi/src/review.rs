//! Human review, feedback and cost: the tickets that the versions' `[review]` policies queue,
//! claimed and resolved by reviewers; ground truth reported by the host; what the labels say
//! (online accuracy, model/reviewer agreement, an export to retrain on); budgets per routing
//! key and what the answered requests cost.
//!
//! The review and feedback calls need an engine created with a `storage_path`: the queue and the
//! labels live in its store, shared by every engine and process opened on the same folder (and by
//! `keel review ...`, `keel feedback`); without one they fail with `KEEL_ERR_INVALID_ARGUMENT`.
//! The budget and cost calls work on any engine: budgets and the cost report belong to the
//! engine (this process), not to the store.

use crate::engine::{engine_of, keel_engine, EngineObject};
use crate::guard::{self, Out};
use crate::handle;
use crate::status::keel_status::{KEEL_ERR_INVALID_ARGUMENT, KEEL_ERR_NOT_FOUND};
use crate::status::{keel_error, keel_status, Failure};
use crate::string::{keel_string, StringObject};
use keel::cost::{Budget, Exhausted};
use keel::store::{now_ms, Store, TicketState};
use std::ffi::c_char;
use std::time::Duration;

/// The store holding the engine's review queue and feedback, or the error of an engine created
/// without a store.
fn queue(engine: &EngineObject) -> Result<&dyn Store, Failure> {
    Ok(engine.store()?.store().as_ref())
}

/// A NUL-terminated UTF-8 string that must not be empty.
///
/// # Safety
/// `ptr` is NULL or NUL-terminated.
unsafe fn non_empty<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    let s = guard::c_str(ptr, what)?;
    if s.is_empty() {
        return Err(Failure::invalid(format!("{what} is empty")));
    }
    Ok(s)
}

/// The review tickets in `state` ("pending", "claimed", "resolved", "expired", or NULL for every
/// state), oldest first, at most `limit` of them (0: no limit), as a JSON array of tickets:
/// `{"id", "request_id", "model" (the name the version is registered under; its manifest's name if it is not registered), "version", "decision": "review" | "block",
/// "reasons": [...], "input": {...}, "output": {...}, "created_ms", "state", "reviewer",
/// "lease_until_ms", "label", "comment", "closed_ms"}` (times in ms since the Unix epoch; fields
/// may be added later). A claimed ticket whose lease has ended is listed as pending. Every ticket
/// of the store, also those opened by other engines and processes on it.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, an unknown `state` or an
/// engine without a store; `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `state` is NULL or NUL-terminated; `out_json` points to a writable `keel_string *`; `err` is
/// NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; the listing is a
/// snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_review_list(
    engine: *const keel_engine,
    state: *const c_char,
    limit: u32,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let state = if state.is_null() {
            None
        } else {
            let s = guard::c_str(state, "state")?;
            Some(TicketState::parse(s).ok_or_else(|| {
                Failure::invalid(format!(
                    "unknown ticket state '{s}' (pending, claimed, resolved, expired, or NULL for all)"
                ))
            })?)
        };
        let limit = if limit == 0 { usize::MAX } else { limit as usize };
        let tickets = queue(&engine)?.tickets(state, limit, now_ms())?;
        out.set(handle::insert(StringObject::json(&tickets)?));
        Ok(())
    })
}

/// Gives `reviewer` the oldest pending ticket for `lease_ms` milliseconds: until the lease ends
/// no other reviewer gets it (two reviewers, in any threads or processes on the store, never get
/// the same ticket), and only `reviewer` may resolve it; then it is pending again.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`): the claimed ticket as one JSON object (as `keel_review_list` lists them,
/// in state "claimed"), or `null` when no ticket is pending. On failure `*out_json` is NULL and
/// `*err` (if `err` is not NULL) holds the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale
/// arguments, an empty `reviewer`, a `lease_ms` of 0 or an engine without a store;
/// `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `reviewer` is NULL or NUL-terminated; `out_json` points to a writable `keel_string *`; `err`
/// is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_review_claim(
    engine: *const keel_engine,
    reviewer: *const c_char,
    lease_ms: u64,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let reviewer = non_empty(reviewer, "reviewer")?;
        if lease_ms == 0 {
            return Err(Failure::invalid("lease_ms is 0: a claim must hold for some time"));
        }
        let lease = i64::try_from(lease_ms).unwrap_or(i64::MAX);
        let ticket = queue(&engine)?.claim_review(reviewer, lease, now_ms())?;
        out.set(handle::insert(StringObject::json(&ticket)?));
        Ok(())
    })
}

/// Resolves the ticket `ticket` with the label `label` (a class of the model) given by
/// `reviewer`, with an optional `comment` (NULL for none); the label is stored as feedback on the
/// ticket's prediction (source "review"), in the same transaction. A pending ticket may be
/// resolved by anyone; a claimed one only by the reviewer holding its lease.
///
/// On success `*out_json` (if `out_json` is not NULL) holds a new string owned by the caller
/// (free it with `keel_string_free`): the resolved ticket as one JSON object. On failure
/// `*out_json` is NULL, nothing changed, and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_NOT_FOUND` for a ticket id the store does not have; `KEEL_ERR_INVALID_ARGUMENT` for
/// a ticket that is already resolved or expired or is claimed by another reviewer whose lease
/// runs (the message is the store's), for NULL or stale arguments, an empty `reviewer` or
/// `label`, or an engine without a store; `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `reviewer` and `label` are NULL or NUL-terminated; `comment` is NULL or NUL-terminated;
/// `out_json` is NULL or points to a writable `keel_string *`; `err` is NULL or points to a
/// writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; of two
/// resolutions of one ticket, one succeeds and the other is refused.
#[no_mangle]
pub unsafe extern "C" fn keel_review_resolve(
    engine: *const keel_engine,
    ticket: i64,
    reviewer: *const c_char,
    label: *const c_char,
    comment: *const c_char,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear_optional(out_json, std::ptr::null_mut());
        let engine = engine_of(engine)?;
        let reviewer = non_empty(reviewer, "reviewer")?;
        let label = non_empty(label, "label")?;
        let comment = if comment.is_null() {
            None
        } else {
            Some(guard::c_str(comment, "comment")?)
        };
        let store = queue(&engine)?;
        let now = now_ms();
        match store.resolve_review(ticket, reviewer, label, comment, now)? {
            Ok(resolved) => {
                if let Some(out) = out {
                    out.set(handle::insert(StringObject::json(&resolved)?));
                }
                Ok(())
            }
            Err(refusal) => {
                let code = if store.ticket(ticket, now)?.is_none() {
                    KEEL_ERR_NOT_FOUND
                } else {
                    KEEL_ERR_INVALID_ARGUMENT
                };
                Err(Failure {
                    code,
                    message: format!("cannot resolve ticket {ticket}: {refusal}"),
                })
            }
        }
    })
}

/// Every label in the store (reviewers' resolutions and ground truth), oldest first, as JSON
/// lines for retraining: one object per line, `{"request_id", "label", "source": "review" |
/// "ground_truth", "reviewer", "comment", "time_ms", "model", "version", "input", "prediction"}`
/// (`input` from the ticket, or from the lineage record when its version keeps inputs; else
/// null), each line ending in "\n"; the empty string when there is no label.
///
/// On success `*out_jsonl` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_jsonl` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments or an engine without a
/// store; `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `out_jsonl` points to a writable `keel_string *`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; a snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_review_export(
    engine: *const keel_engine,
    out_jsonl: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_jsonl, "out_jsonl", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let mut lines = Vec::new();
        keel::review::export(queue(&engine)?, &mut lines)?;
        let text = String::from_utf8(lines)
            .map_err(|e| Failure::internal(format!("the export is not UTF-8: {e}")))?;
        out.set(handle::insert(StringObject::new(text)));
        Ok(())
    })
}

/// What the labels say, per version and source, as a JSON array: `{"model", "version", "source":
/// "ground_truth" | "review", "labelled", "matched", "rate"}`, where `rate` (`matched /
/// labelled`) is the online accuracy for ground truth and the model/reviewer agreement for
/// reviews. A label counts for the first row of its request; labels whose prediction is not known
/// (no ticket, no lineage record) are left out.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments or an engine without a
/// store; `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `out_json` points to a writable `keel_string *`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; a snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_review_stats(
    engine: *const keel_engine,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let quality = keel::review::quality(queue(&engine)?)?;
        out.set(handle::insert(StringObject::json(&quality)?));
        Ok(())
    })
}

/// Reports the true label of the prediction `request_id` (ground truth that arrived later): it
/// is stored as feedback (source "ground_truth") and counts in `keel_review_stats` and
/// `keel_review_export`. The prediction must be known to the store: a lineage record (a request
/// answered on this engine before the call is always found) or a review ticket.
///
/// On failure nothing is stored and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a non-UTF-8 or empty `request_id` or
/// `label`, or an engine without a store; `KEEL_ERR_NOT_FOUND` for a request id with no lineage
/// record and no ticket; `KEEL_ERR_STORAGE` when the store fails (or lineage records were lost,
/// as for `keel_lineage_flush`).
///
/// # Safety
/// `request_id` and `label` are NULL or NUL-terminated; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_feedback(
    engine: *const keel_engine,
    request_id: *const c_char,
    label: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let request_id = non_empty(request_id, "request_id")?;
        let label = non_empty(label, "label")?;
        let versioned = engine.store()?;
        // A prediction answered a moment ago may still be on its way to the store.
        versioned.flush()?;
        let store = versioned.store();
        if !keel::review::add_ground_truth(&**store, request_id, label)? {
            return Err(Failure {
                code: KEEL_ERR_NOT_FOUND,
                message: format!(
                    "no prediction has the request id '{request_id}' in {}",
                    store.location()
                ),
            });
        }
        Ok(())
    })
}

/// Sets (or replaces) the budget of the routing key `key` (`keel_request_info.key`; "" is the
/// budget of the requests sent without a key, such as every `keel_classify`): its requests may
/// spend at most `limit` (in the unit of the manifests' `[cost]` tables) per `period_ms`
/// milliseconds (0: in all, never renewed; the first period starts now). Each request reserves
/// its worst-case cost before it runs and is charged its actual cost when answered, so that
/// concurrent requests never spend more than the budget; a failed request is charged nothing.
/// What the key spent in its current period is kept when its budget is replaced.
///
/// A request the budget cannot pay for is refused with `KEEL_ERR_BUDGET` when `downgrade_to` is
/// NULL; otherwise it is served by `downgrade_to` instead (a model the engine has loaded: a
/// version id or an alias of `keel_model_alias`; on an engine with a store, the id of a version
/// that one of its aliases serves, since names of the registry are resolved above this layer),
/// if the budget can pay for that, else refused.
///
/// On failure nothing changed and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a non-UTF-8 `key`, a negative or
/// non-finite `limit`, or an empty `downgrade_to`; `KEEL_ERR_NOT_FOUND` for a `downgrade_to` the
/// engine does not have loaded now (if it is unloaded later, the downgraded requests fail with
/// `KEEL_ERR_NOT_FOUND`); `KEEL_ERR_STORAGE` when a fleet's store (a `postgres://`
/// `storage_path`, which keeps the budgets of every host on it) cannot record it.
///
/// # Safety
/// `key` is NULL or NUL-terminated; `downgrade_to` is NULL or NUL-terminated; `err` is NULL or
/// points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; requests that
/// reserved before the call keep their reservation.
#[no_mangle]
pub unsafe extern "C" fn keel_budget_set(
    engine: *const keel_engine,
    key: *const c_char,
    limit: f64,
    period_ms: u64,
    downgrade_to: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let key = guard::c_str(key, "key")?;
        if !(limit.is_finite() && limit >= 0.0) {
            return Err(Failure::invalid(format!(
                "limit must be a finite number >= 0, not {limit}"
            )));
        }
        let on_exhausted = if downgrade_to.is_null() {
            Exhausted::Reject
        } else {
            let cheaper = non_empty(downgrade_to, "downgrade_to")?;
            engine.engine.version_of(cheaper)?;
            Exhausted::Downgrade(cheaper.to_string())
        };
        let budget = Budget {
            limit,
            period: (period_ms > 0).then(|| Duration::from_millis(period_ms)),
            on_exhausted,
        };
        engine.costed()?.set_budget(key, budget)?;
        Ok(())
    })
}

/// Where the budget of the routing key `key` stands, as one JSON object: `{"limit", "spent"
/// (charged in the current period), "reserved" (held by requests running now), "left" (what
/// can still be reserved)}`, or `null` when the key has no budget (`keel_budget_set`).
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments or a non-UTF-8 `key`;
/// `KEEL_ERR_STORAGE` when a fleet's store (which keeps its budgets) cannot be read.
///
/// # Safety
/// `key` is NULL or NUL-terminated; `out_json` points to a writable `keel_string *`; `err` is
/// NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; a snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_budget_spend(
    engine: *const keel_engine,
    key: *const c_char,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let key = guard::c_str(key, "key")?;
        out.set(handle::insert(StringObject::json(&engine.costed()?.spend(key)?)?));
        Ok(())
    })
}

/// What the requests answered on this engine since it was created cost, per model, version and
/// routing key, as a JSON array: `{"model" (the name the version is registered under; the
/// manifest's name for a version the host loaded itself), "version", "key" ("" for none),
/// "requests", "tokens", "cost"}`, by model, version and key. Priced by
/// each version's `[cost]` table (a version without one costs 0); failed and refused requests
/// cost nothing. Only this engine's requests: the lineage records in the store keep each
/// request's price for a report across engines (`keel cost report`).
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// `KEEL_ERR_INVALID_ARGUMENT` (NULL or stale arguments).
///
/// # Safety
/// `out_json` points to a writable `keel_string *`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; a snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_cost_report(
    engine: *const keel_engine,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        out.set(handle::insert(StringObject::json(&engine.costed()?.report())?));
        Ok(())
    })
}
