//! Tabular classification with its contract verdicts, drift state, and the metrics text.
//!
//! Every request of an engine goes through its contract layer (the `[contract]` table of the
//! version's `keel.toml`) and its observability layer; these calls expose what they found.

use crate::engine::{engine_of, keel_engine};
use crate::guard::{self, Out};
use crate::handle;
use crate::request::{infer_request_of, keel_request_info};
use crate::status::keel_status::KEEL_ERR_NOT_FOUND;
use crate::status::{keel_error, keel_status, Failure};
use crate::string::{keel_string, StringObject};
use keel::{Infer, InferRequest, Input, Output, Record, Value};
use std::ffi::c_char;

/// Rows as the C caller gives them: one JSON object, or an array of objects.
fn rows_of(json: &str) -> Result<Vec<Record>, Failure> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| Failure::invalid(format!("rows_json is not JSON: {e}")))?;
    let objects = match value {
        serde_json::Value::Array(items) => items,
        object @ serde_json::Value::Object(_) => vec![object],
        _ => {
            return Err(Failure::invalid(
                "rows_json must be a JSON object or an array of objects",
            ))
        }
    };
    objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let o = o
                .as_object()
                .ok_or_else(|| Failure::invalid(format!("row {i} is not a JSON object")))?;
            o.iter()
                .map(|(k, v)| {
                    let v = Value::from_json(v)
                        .map_err(|e| Failure::invalid(format!("row {i}, field '{k}': {e}")))?;
                    Ok((k.clone(), v))
                })
                .collect()
        })
        .collect()
}

/// Classifies rows with a tabular model (an `mlp` model folder: `keel.toml` names its features
/// and labels). `rows_json` is one JSON object (field name to value: a number, a string for
/// categories and timestamps, null) or an array of them, run as one request, with no routing
/// key (its budget is that of the key "", see `keel_budget_set`; `keel_infer_classify` takes
/// one). On an engine with a store,
/// `model` is addressed as for `keel_infer_embed` (`NAME`, `NAME@ALIAS`, a version id), a
/// lineage record is written and the version's `[review]` policy applies.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`): `{"request_id", "model", "version", "classes": [{"class", "probabilities":
/// {label: p}}], "contract": {"contract": sha256, "violations": [{"item", "field", "clause",
/// "value", "expected", "action"}]} or null, "review": {"decision": "auto" | "review", "ticket",
/// "reasons"} or null, "cost": {"cost", "key", "downgraded_from"} or null}`: the contract's
/// verdict lists the clauses that were flagged or clamped; `review` (null without a store or a
/// policy) says whether the answer is provisional, waiting in the review queue under `ticket`;
/// `cost` is the answer's price (`downgraded_from`: the model a budget sent it away from). On
/// failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_CONTRACT` when a row breaks a clause whose action is `reject` (the message names
/// the row, the field, the clause and the value); `KEEL_ERR_INVALID_ARGUMENT` for NULL
/// arguments, rows that are not JSON objects, a row missing a feature or holding a non-number
/// where the model has no contract to say more; `KEEL_ERR_NOT_FOUND` for an unknown model;
/// `KEEL_ERR_REVIEW` when the review policy blocks the prediction or holds it for a reviewer
/// (the message names the ticket); `KEEL_ERR_BUDGET` when the budget of the key "" cannot pay
/// for it; `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `model` and `rows_json` are NULL or NUL-terminated; `out_json` points to a writable
/// `keel_string *`; `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_classify(
    engine: *const keel_engine,
    model: *const c_char,
    rows_json: *const c_char,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let model = guard::c_str(model, "model")?;
        let rows = rows_of(guard::c_str(rows_json, "rows_json")?)?;
        out.set(handle::insert(StringObject::json(&classified(
            engine,
            InferRequest::classify(model, rows),
        )?)?));
        Ok(())
    })
}

/// `keel_classify` with a request id, a routing key and controls (`keel_request_info`; NULL for
/// the defaults): the rows are billed to the budget of `info.key` (`keel_budget_set`), and a
/// canary is chosen by it, as for `keel_infer_embed`. The answer is `keel_classify`'s JSON.
///
/// Errors: as for `keel_classify`, plus `KEEL_ERR_INVALID_ARGUMENT` for an empty or non-UTF-8
/// `info.request_id` or `info.key`; `KEEL_ERR_BUDGET` when the budget of `info.key` cannot pay
/// for the request (and does not downgrade).
///
/// # Safety
/// As for `keel_classify`; `info` is NULL or points to a `keel_request_info` whose pointers are
/// NULL or valid as documented there.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_infer_classify(
    engine: *const keel_engine,
    model: *const c_char,
    rows_json: *const c_char,
    info: *const keel_request_info,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let model = guard::c_str(model, "model")?;
        let rows = rows_of(guard::c_str(rows_json, "rows_json")?)?;
        let request = infer_request_of(model, Input::Classify(rows), info)?;
        out.set(handle::insert(StringObject::json(&classified(engine, request)?)?));
        Ok(())
    })
}

/// Runs a classification through the engine's stack; the answer as `keel_classify` gives it.
///
/// # Safety
/// `engine` is NULL or a pointer from `keel_engine_new`.
unsafe fn classified(
    engine: *const keel_engine,
    request: InferRequest,
) -> Result<serde_json::Value, Failure> {
    let engine = engine_of(engine)?;
    let answer = engine.infer(request)?;
    let Output::Classes(classes) = &answer.output else {
        return Err(Failure::internal("the model did not answer with classes"));
    };
    let labels = match engine.engine.info(answer.meta.version.as_str()) {
        Ok(info) => info.manifest.labels,
        Err(_) => classes.iter().map(|c| c.label.clone()).collect(),
    };
    let notes = answer.meta.notes.to_json();
    let classes: Vec<serde_json::Value> = classes
        .iter()
        .map(|c| {
            let p: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .zip(&c.probabilities)
                .map(|(l, p)| (l.clone(), serde_json::json!(p)))
                .collect();
            serde_json::json!({"class": c.label, "probabilities": p})
        })
        .collect();
    let note = |layer: &str| notes.get(layer).cloned();
    let json = serde_json::json!({
        "request_id": answer.meta.request_id.as_str(),
        "model": answer.meta.model,
        "version": answer.meta.version,
        "classes": classes,
        "contract": note("contract"),
        "review": note("review"),
        "cost": note("cost"),
    });
    Ok(json)
}

/// The drift state of the version `model` names (a loaded version's id or alias, as
/// `keel_engine_models` lists them; on an engine with a store also `NAME` or `NAME@ALIAS`:
/// the version a request would go to now), judged against the `profile.json` beside its manifest
/// (`keel profile` writes it), as one JSON object: `{"state": "ok"|"warn"|"alarm", "last": the
/// last finished window or null, "reports": [windows, oldest first]}`; a window is `{"index",
/// "count", "state", "signals": {name: {"value", "warn", "alarm", "state"}}}`.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_NOT_FOUND` for an unknown model or a model without a profile;
/// `KEEL_ERR_INVALID_MODEL` for a profile that cannot be read; `KEEL_ERR_INVALID_ARGUMENT` for
/// NULL arguments.
///
/// # Safety
/// `model` is NULL or NUL-terminated; `out_json` points to a writable `keel_string *`; `err` is
/// NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_drift_state(
    engine: *const keel_engine,
    model: *const c_char,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let model = guard::c_str(model, "model")?;
        let state = engine
            .observed()?
            .drift(&engine.stack.target(model)?)?
            .ok_or_else(|| Failure {
                code: KEEL_ERR_NOT_FOUND,
                message: format!(
                    "model '{model}' has no reference profile (profile.json): write one with `keel profile`"
                ),
            })?;
        out.set(handle::insert(StringObject::json(&state)?));
        Ok(())
    })
}

/// Everything the engine observed, in Prometheus (OpenMetrics) text format: requests by
/// outcome, time per stage, confidence, tokens per second, time to the first token and between
/// tokens, tokens generated and finish reasons, drift signals and states, contract violations
/// by field and clause, cost and budgets, review decisions, queue depth, batches, cache hits.
/// Serve it on the host's `/metrics`.
///
/// On success `*out_text` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_text` is NULL and `*err` (if `err` is not NULL) holds
/// `KEEL_ERR_INVALID_ARGUMENT` (a NULL or stale engine).
///
/// # Safety
/// `out_text` points to a writable `keel_string *`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_metrics_text(
    engine: *const keel_engine,
    out_text: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_text, "out_text", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        out.set(handle::insert(StringObject::new(engine.stack.metrics_text())));
        Ok(())
    })
}
