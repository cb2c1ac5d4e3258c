//! The model registry of an engine's store: register versions of a model name, move its aliases
//! (set, canary, promote, roll back), list them, read their history.
//!
//! Every call here needs an engine created with a `storage_path`; without one it fails with
//! `KEEL_ERR_INVALID_ARGUMENT`. The store is shared by every engine (and process) opened on the
//! same folder; an alias move is one atomic step, recorded with its time and reason.

use crate::engine::{engine_of, keel_engine};
use crate::guard::{self, Out};
use crate::handle;
use crate::model::{keel_weights, path_of, weight_path_of};
use crate::status::{keel_error, keel_status, Failure};
use crate::string::{keel_string, StringObject};
use keel::store::{CanaryConfig, Guard};
use keel::version::RegisterOptions;
use std::ffi::c_char;

/// What the history records as the reason of a move whose `reason` is NULL.
const NO_REASON: &str = "(no reason given)";

/// A move's reason: the caller's, or [`NO_REASON`] for NULL.
///
/// # Safety
/// `reason` is NULL or NUL-terminated.
unsafe fn reason_of<'a>(reason: *const c_char) -> Result<&'a str, Failure> {
    if reason.is_null() {
        return Ok(NO_REASON);
    }
    guard::c_str(reason, "reason")
}

/// Registers the model at `path` (a Keel model folder, a Hugging Face folder or a `.gguf` file) as
/// an immutable version of the model name `name`, computing with the weights `weights` (a
/// `KEEL_WEIGHTS_*` value: each weight path of one file is a version of its own). With
/// `retain_input`, the lineage records of this version keep each request's input, so that its
/// predictions can be replayed (`keel_lineage_replay`); inputs may be personal data, so it is off
/// unless asked for.
///
/// The files are read and their sha256 recorded now; the version is loaded when a route first
/// names it. Registering the same bytes with the same weights again changes nothing and gives
/// the same id. No alias moves: point one at it with `keel_registry_alias`.
///
/// On success `*out_version` (if `out_version` is not NULL) holds the version id (64 hex
/// digits) in a new string owned by the caller (free it with `keel_string_free`). On failure
/// `*out_version` is NULL and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, an unknown `weights` value, an empty
/// name or one holding '@' or control characters, or an engine without a store;
/// `KEEL_ERR_NOT_FOUND` for a missing path; `KEEL_ERR_INVALID_MODEL` for corrupt or
/// checksum-failing files; `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `name` and `path` are NULL or NUL-terminated; `out_version` is NULL or points to a writable
/// `keel_string *`; `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_register(
    engine: *const keel_engine,
    name: *const c_char,
    path: *const c_char,
    weights: keel_weights,
    retain_input: bool,
    out_version: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear_optional(out_version, std::ptr::null_mut());
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let path = path_of(guard::c_bytes(path, "path")?)?;
        let options = RegisterOptions {
            weights: weight_path_of(weights)?,
            retain_input,
        };
        let id = engine.store()?.register(name, &path, options)?;
        if let Some(out) = out {
            out.set(handle::insert(StringObject::new(id.to_string())));
        }
        Ok(())
    })
}

/// Points the alias `alias` of `name` at `version` (a registered version id of that name, or a
/// unique prefix of 8 hex digits or more), in one step recorded in the history with `reason`
/// (NULL: "(no reason given)"). `production` is the alias that `NAME` means; setting
/// `canary` by hand gives it no traffic until `keel_registry_canary` gives it a share. The version
/// is loaded (and its files checked against their registered sha256) before the alias moves.
///
/// On failure nothing moved and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, an invalid alias (empty, '@', control
/// characters) or an engine without a store; `KEEL_ERR_NOT_FOUND` for an unknown name or
/// version; `KEEL_ERR_INVALID_MODEL` if the version's files changed since it was registered;
/// `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `name`, `alias` and `version` are NULL or NUL-terminated; `reason` is NULL or NUL-terminated;
/// `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; requests in
/// flight keep the version they were routed to, the next ones see the new route.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_alias(
    engine: *const keel_engine,
    name: *const c_char,
    alias: *const c_char,
    version: *const c_char,
    reason: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let alias = guard::c_str(alias, "alias")?;
        let version = guard::c_str(version, "version")?;
        let reason = reason_of(reason)?;
        engine.store()?.set_alias(name, alias, version, reason)?;
        Ok(())
    })
}

/// Makes `version` (an id or a unique prefix, as for `keel_registry_alias`) the canary of `name`:
/// `percent` (0 to 100) of the requests that address `NAME` go to it. A request with a routing key
/// (`keel_request_info.key`) is sticky: the same key goes the same way on every call, in every
/// process; one without is drawn at random. With `shadow`, production still answers every
/// request and the canary runs on copies of `percent` of them, off the caller's path, and is
/// only compared (never returned). The name must have a `production` alias. Recorded in the
/// history with `reason` (NULL: "(no reason given)").
///
/// On failure nothing moved and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a `percent` outside 0-100 (or NaN),
/// no production alias, or an engine without a store; `KEEL_ERR_NOT_FOUND` for an unknown name
/// or version; `KEEL_ERR_INVALID_MODEL` if the version's files changed since it was registered;
/// `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `name` and `version` are NULL or NUL-terminated; `reason` is NULL or NUL-terminated; `err` is
/// NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_canary(
    engine: *const keel_engine,
    name: *const c_char,
    version: *const c_char,
    percent: f64,
    shadow: bool,
    reason: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let version = guard::c_str(version, "version")?;
        let reason = reason_of(reason)?;
        let config = CanaryConfig {
            percent,
            shadow,
            guard: None,
        };
        engine.store()?.canary(name, version, config, reason)?;
        Ok(())
    })
}

/// The thresholds of a guarded canary (`keel_registry_canary_guarded`). Get the defaults from
/// `keel_guard_default_params()`. A threshold that is NaN or negative is off.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_guard_params {
    /// Judge only after this many canary requests (split traffic or shadow copies). Default: 50.
    pub min_requests: u64,
    /// Roll back above this share of failed canary requests (0 to 1). Default: off.
    pub max_error_rate: f64,
    /// Roll back when the canary's p99 latency exceeds production's by this factor. Default: off.
    pub max_p99_ratio: f64,
    /// Roll back above this mean divergence from production (1 - cosine for embeddings, the share
    /// of differing tokens for generation). Default: off.
    pub max_divergence: f64,
}

/// The default guard: judged after 50 requests, every threshold off.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_guard_default_params() -> keel_guard_params {
    keel_guard_params {
        min_requests: 50,
        max_error_rate: f64::NAN,
        max_p99_ratio: f64::NAN,
        max_divergence: f64::NAN,
    }
}

/// `keel_registry_canary` with a guard: when the canary crosses one of `guard`'s thresholds
/// (after `guard->min_requests` canary requests), it is rolled back by itself and the rollback
/// is recorded in the history with the figures. `guard` may be NULL (no guard). Errors and
/// ownership as for `keel_registry_canary`.
///
/// # Safety
/// As for `keel_registry_canary`; `guard` is NULL or points to a `keel_guard_params`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn keel_registry_canary_guarded(
    engine: *const keel_engine,
    name: *const c_char,
    version: *const c_char,
    percent: f64,
    shadow: bool,
    guard: *const keel_guard_params,
    reason: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let version = guard::c_str(version, "version")?;
        let reason = reason_of(reason)?;
        let on = |x: f64| (x >= 0.0).then_some(x);
        let config = CanaryConfig {
            percent,
            shadow,
            guard: guard.as_ref().map(|g| Guard {
                min_requests: g.min_requests,
                max_error_rate: on(g.max_error_rate),
                max_p99_ratio: on(g.max_p99_ratio),
                max_divergence: on(g.max_divergence),
            }),
        };
        engine.store()?.canary(name, version, config, reason)?;
        Ok(())
    })
}

/// Makes the canary of `name` its production version, in one step: the `canary` alias is
/// cleared and `production` takes all the traffic. Recorded in the history with `reason` (NULL:
/// "(no reason given)").
///
/// On failure nothing moved and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a name with no canary, or an engine
/// without a store; `KEEL_ERR_NOT_FOUND` for an unknown name; `KEEL_ERR_STORAGE` when the store
/// fails.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `reason` is NULL or NUL-terminated; `err` is NULL or points
/// to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_promote(
    engine: *const keel_engine,
    name: *const c_char,
    reason: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let reason = reason_of(reason)?;
        engine.store()?.promote(name, reason)?;
        Ok(())
    })
}

/// Returns the `production` alias of `name` to the version it replaced, in one step; successive
/// rollbacks walk back through production's history. Recorded with `reason` (NULL: "(no reason
/// given)").
///
/// On failure nothing moved and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a name with no earlier production
/// version, or an engine without a store; `KEEL_ERR_NOT_FOUND` for an unknown name;
/// `KEEL_ERR_STORAGE` when the store fails.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `reason` is NULL or NUL-terminated; `err` is NULL or points
/// to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_rollback(
    engine: *const keel_engine,
    name: *const c_char,
    reason: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let reason = reason_of(reason)?;
        engine.store()?.rollback(name, reason)?;
        Ok(())
    })
}

/// Ends the canary of `name`: the `canary` alias is cleared and `production` takes all the
/// traffic again. Recorded with `reason` (NULL: "(no reason given)").
///
/// On failure nothing moved and `*err` (if `err` is not NULL) holds the error:
/// `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, a name with no canary, or an engine
/// without a store; `KEEL_ERR_NOT_FOUND` for an unknown name; `KEEL_ERR_STORAGE` when the store
/// fails.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `reason` is NULL or NUL-terminated; `err` is NULL or points
/// to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_abort_canary(
    engine: *const keel_engine,
    name: *const c_char,
    reason: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let reason = reason_of(reason)?;
        engine.store()?.abort_canary(name, reason)?;
        Ok(())
    })
}

/// Every registered version, as a JSON array with one object per version, by name then
/// registration time: `{"name": "...", "version": "<64 hex digits>", "architecture": "bert" |
/// "llama", "weights": "quantized" | "f32" | "int8", "path": "...", "aliases": ["production",
/// ...], "retain_input": bool, "registered": <ms since the Unix epoch>, "canary_percent":
/// number | null, "shadow": bool | null}`. `aliases` are those of its name pointing at it;
/// `canary_percent` and `shadow` are set on the version the `canary` alias points at.
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
/// Thread safety: may be called concurrently with any call on the same engine; the listing is a
/// snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_list(
    engine: *const keel_engine,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let catalog = engine.store()?.catalog()?;
        out.set(handle::insert(StringObject::json(&catalog)?));
        Ok(())
    })
}

/// The alias moves of `name`, oldest first, as a JSON array: `{"seq": n, "time": <ms since the
/// Unix epoch>, "name": "...", "alias": "...", "from": "<version id>" | null, "to": "<version
/// id>" | null, "reason": "..."}` (`from` null: the alias was unset; `to` null: it was removed).
/// `reason` names the operation ("alias: ", "canary 30% split: ", "promote: ", "rollback: ",
/// "canary rolled back: ") followed by the caller's reason.
///
/// On success `*out_json` holds a new string owned by the caller (free it with
/// `keel_string_free`). On failure `*out_json` is NULL and `*err` (if `err` is not NULL) holds
/// the error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments or an engine without a
/// store; `KEEL_ERR_NOT_FOUND` for a name with no registered version; `KEEL_ERR_STORAGE` when
/// the store fails.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `out_json` points to a writable `keel_string *`; `err` is
/// NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_registry_history(
    engine: *const keel_engine,
    name: *const c_char,
    out_json: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out_json, "out_json", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let name = guard::c_str(name, "name")?;
        let store = engine.store()?;
        if !store.versions()?.iter().any(|v| v.name == name) {
            return Err(keel::version::Error::UnknownName(name.to_string()).into());
        }
        let events = store.history(name)?;
        out.set(handle::insert(StringObject::json(&events)?));
        Ok(())
    })
}
