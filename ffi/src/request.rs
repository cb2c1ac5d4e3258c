//! Per-request controls: priority, deadline, use of the response cache; and, for the calls of
//! the one prediction path (`keel_infer_*`), the request's id and routing key.

use crate::guard;
use crate::status::Failure;
use keel::{InferRequest, Input, Priority, Request};
use std::ffi::c_char;
use std::time::Duration;

/// How urgent a request is: one of the `KEEL_PRIORITY_*` values. Higher levels are served first;
/// a request that has waited long is served as if it were the highest, so none starves.
pub type keel_priority = u32;

/// Background work (batch jobs, re-indexing).
pub const KEEL_PRIORITY_LOW: keel_priority = 0;
/// Interactive traffic: the default.
pub const KEEL_PRIORITY_NORMAL: keel_priority = 1;
/// Latency-critical traffic.
pub const KEEL_PRIORITY_HIGH: keel_priority = 2;

/// Controls of one request (`keel_embed`, `keel_embed_into`, `keel_generate`, and through
/// `keel_request_info` the `keel_infer_*` calls); pass NULL for the defaults. Get the defaults
/// from `keel_request_default_params()` and change the fields you care about.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_request_params {
    /// Where the request stands in the model's queue (a `KEEL_PRIORITY_*` value). Default:
    /// `KEEL_PRIORITY_NORMAL`.
    pub priority: keel_priority,
    /// 0 for none; otherwise the request must have started running this many milliseconds after
    /// it was submitted, or it fails with `KEEL_ERR_DEADLINE` and is never run (the caller is
    /// answered by then at the latest). Default: 0.
    pub deadline_ms: u32,
    /// Whether the response cache may answer (and store) this request's embeddings. Default:
    /// true.
    pub use_cache: bool,
}

/// The default request controls: normal priority, no deadline, the response cache on.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_request_default_params() -> keel_request_params {
    keel_request_params {
        priority: KEEL_PRIORITY_NORMAL,
        deadline_ms: 0,
        use_cache: true,
    }
}

/// The Rust request of a caller's controls (NULL: the defaults).
///
/// # Safety
/// `params` is NULL or points to a `keel_request_params`.
pub(crate) unsafe fn request_of(params: *const keel_request_params) -> Result<Request, Failure> {
    let p = params
        .as_ref()
        .copied()
        .unwrap_or_else(|| keel_request_default_params());
    let priority = match p.priority {
        KEEL_PRIORITY_LOW => Priority::Low,
        KEEL_PRIORITY_NORMAL => Priority::Normal,
        KEEL_PRIORITY_HIGH => Priority::High,
        other => return Err(Failure::invalid(format!("unknown priority {other}"))),
    };
    let mut request = Request::default().priority(priority);
    if p.deadline_ms > 0 {
        request = request.deadline(Duration::from_millis(p.deadline_ms.into()));
    }
    if !p.use_cache {
        request = request.no_cache();
    }
    Ok(request)
}

/// Who a request is and how to route it, for `keel_infer_embed`, `keel_infer_generate` and
/// `keel_infer_classify`; pass NULL for all the defaults. Get the defaults from `keel_request_default_info()` and set the
/// fields you care about. Every pointer is borrowed for the duration of the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_request_info {
    /// The request's id, NUL-terminated UTF-8, not empty: the key of its lineage record
    /// (`keel_lineage_show`). NULL: the library makes a new time-ordered id (a UUIDv7), which
    /// the result reports (`keel_embeddings_request_id`, `keel_completion_request_id`). Ids
    /// should be unique: a lookup finds the newest record of an id. Default: NULL.
    pub request_id: *const c_char,
    /// The routing key (a tenant, user or session), NUL-terminated UTF-8: with a canary, the same
    /// key goes the same way on every call, in every process, across restarts. NULL: none (the
    /// canary share is then drawn at random for each request). Default: NULL.
    pub key: *const c_char,
    /// Priority, deadline and cache use (see `keel_request_params`); NULL for the defaults.
    /// Default: NULL.
    pub params: *const keel_request_params,
}

/// The default request info: a generated id, no routing key, the default controls.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_request_default_info() -> keel_request_info {
    keel_request_info {
        request_id: std::ptr::null(),
        key: std::ptr::null(),
        params: std::ptr::null(),
    }
}

/// The request of a `keel_infer_*` call: `input` for `model`, with the caller's info (NULL: the
/// defaults).
///
/// # Safety
/// `info` is NULL or points to a `keel_request_info` whose pointers are NULL or valid as
/// documented there.
pub(crate) unsafe fn infer_request_of(
    model: &str,
    input: Input,
    info: *const keel_request_info,
) -> Result<InferRequest, Failure> {
    let info = info
        .as_ref()
        .copied()
        .unwrap_or_else(|| keel_request_default_info());
    let mut request = InferRequest::new(model, input).options(request_of(info.params)?);
    if !info.request_id.is_null() {
        let id = guard::c_str(info.request_id, "info.request_id")?;
        if id.is_empty() {
            return Err(Failure::invalid(
                "info.request_id is empty (NULL for a generated id)",
            ));
        }
        request = request.id(id);
    }
    if !info.key.is_null() {
        let key = guard::c_str(info.key, "info.key")?;
        if key.is_empty() {
            return Err(Failure::invalid("info.key is empty (NULL for none)"));
        }
        request = request.key(key);
    }
    Ok(request)
}

/// The route an answer took (`production`, `canary`, an alias, `direct`), on an engine with a
/// store.
pub(crate) fn route_of(meta: &keel::Meta) -> Option<std::ffi::CString> {
    meta.notes
        .get::<keel::version::Route>()
        .map(|r| crate::string::c_string(&r.route))
}
