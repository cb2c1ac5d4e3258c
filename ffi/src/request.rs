//! Per-request controls: priority, deadline, use of the response cache.

use crate::status::Failure;
use keel::{Priority, Request};
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

/// Controls of one request (`keel_embed`, `keel_embed_into`, `keel_generate`); pass NULL for the
/// defaults. Get the defaults from `keel_request_default_params()` and change the fields you
/// care about.
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
