//! Status codes and error objects: the one error convention of the C ABI.

use crate::guard;
use crate::handle::{self, Handle};
use std::ffi::{c_char, CString};

/// The outcome of a call. Every function that can fail returns one; `KEEL_OK` is zero, every
/// failure is non-zero, so `if (keel_x(...) != KEEL_OK)` and `if (keel_x(...))` both work.
/// New codes may be added at the end in later ABI versions: treat an unknown code as an error.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum keel_status {
    /// Success.
    KEEL_OK = 0,
    /// The caller's input is wrong: a NULL or stale handle, a NULL pointer, a buffer too short,
    /// invalid UTF-8, an empty text, a prompt longer than the context, an out-of-range parameter,
    /// a model used for the wrong task, a registry, lineage, review or feedback call on an engine
    /// without a store, a route change the routes do not allow (a promote with no canary, a
    /// rollback with no earlier production version), a review ticket that may not be resolved
    /// (already closed, or claimed by another reviewer).
    KEEL_ERR_INVALID_ARGUMENT = 1,
    /// A file, model or alias that does not exist; in the store, an unknown model name, alias,
    /// version, request id or review ticket, or a prediction that cannot be replayed (its input
    /// was not kept, its version's files are gone).
    KEEL_ERR_NOT_FOUND = 2,
    /// A model file that exists but is corrupt, truncated, of an unknown architecture, or fails
    /// its checksum; a registered version whose files changed since it was registered.
    KEEL_ERR_INVALID_MODEL = 3,
    /// The requested device (wgpu, CUDA) is not available in this build or on this machine.
    KEEL_ERR_NO_DEVICE = 4,
    /// The request was shed at once because the model's queue is full: retry later.
    KEEL_ERR_OVERLOADED = 5,
    /// The request's deadline passed while it was queued (it was never run) or before its answer
    /// was ready.
    KEEL_ERR_DEADLINE = 6,
    /// The input broke the model's data contract (a field out of range, missing, stale, of the
    /// wrong type): the message names the field, the clause and the value.
    KEEL_ERR_CONTRACT = 7,
    /// A failure inside Keel or its backend, including a panic caught at the boundary. The
    /// engine stays usable; the message says what happened.
    KEEL_ERR_INTERNAL = 8,
    /// The engine is shutting down (`keel_engine_shutdown`) and takes no more requests, or stopped
    /// before this one could run.
    KEEL_ERR_SHUTTING_DOWN = 9,
    /// The engine's store (registry, lineage) failed or cannot be used: a folder that cannot be
    /// written, a database that is not a Keel store or comes from a newer Keel.
    KEEL_ERR_STORAGE = 10,
    /// The model's review policy blocked the prediction, or holds it for a human reviewer
    /// without serving it: the message names the rules and the ticket.
    KEEL_ERR_REVIEW = 11,
    /// The caller's cost budget cannot pay for the request (and its policy does not downgrade).
    KEEL_ERR_BUDGET = 12,
}

use keel_status::*;

/// The one place where Rust errors are sorted into status codes.
pub(crate) fn status_of(kind: keel::ErrorKind) -> keel_status {
    match kind {
        keel::ErrorKind::InvalidArgument => KEEL_ERR_INVALID_ARGUMENT,
        keel::ErrorKind::NotFound => KEEL_ERR_NOT_FOUND,
        keel::ErrorKind::InvalidModel => KEEL_ERR_INVALID_MODEL,
        keel::ErrorKind::NoDevice => KEEL_ERR_NO_DEVICE,
        keel::ErrorKind::Internal => KEEL_ERR_INTERNAL,
        keel::ErrorKind::Overloaded => KEEL_ERR_OVERLOADED,
        keel::ErrorKind::DeadlineExceeded => KEEL_ERR_DEADLINE,
        keel::ErrorKind::ShuttingDown => KEEL_ERR_SHUTTING_DOWN,
        keel::ErrorKind::Storage => KEEL_ERR_STORAGE,
        keel::ErrorKind::Contract => KEEL_ERR_CONTRACT,
        keel::ErrorKind::Review => KEEL_ERR_REVIEW,
        keel::ErrorKind::Budget => KEEL_ERR_BUDGET,
    }
}

/// A failed call, before it becomes a `keel_error` object.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: keel_status,
    pub(crate) message: String,
}

impl Failure {
    /// A caller mistake caught at the boundary (NULL pointer, stale handle, short buffer).
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: KEEL_ERR_INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    /// A failure inside the library that is not the caller's doing.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self {
            code: KEEL_ERR_INTERNAL,
            message: message.into(),
        }
    }

    /// A panic caught at the boundary.
    pub(crate) fn panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".into());
        Self {
            code: KEEL_ERR_INTERNAL,
            message: format!("internal error: a panic inside libkeel was caught at the C boundary: {what}"),
        }
    }
}

impl From<keel::Error> for Failure {
    fn from(e: keel::Error) -> Self {
        Self {
            code: status_of(e.kind()),
            message: e.to_string(),
        }
    }
}

impl From<keel::store::Error> for Failure {
    fn from(e: keel::store::Error) -> Self {
        keel::version::Error::from(e).into()
    }
}

impl From<keel::version::Error> for Failure {
    fn from(e: keel::version::Error) -> Self {
        Self {
            code: status_of(e.kind()),
            message: e.to_string(),
        }
    }
}

/// An error: a status code and a message. Returned through the `err` out-parameter of a failed
/// call; owned by the caller, who frees it with `keel_error_free`.
pub struct keel_error {
    _opaque: [u8; 0],
}

/// What a `keel_error` handle stands for.
pub(crate) struct ErrorObject {
    code: keel_status,
    message: CString,
}

impl Handle for ErrorObject {
    type C = keel_error;
    const NAME: &'static str = "keel_error";
}

impl ErrorObject {
    pub(crate) fn new(failure: Failure) -> Self {
        // A message is text for people, on one line whatever the environment; an interior NUL
        // (which C could not read past) is dropped.
        let lines: Vec<&str> = failure
            .message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let bytes: Vec<u8> = lines
            .join("; ")
            .into_bytes()
            .into_iter()
            .filter(|&b| b != 0)
            .collect();
        Self {
            code: failure.code,
            message: CString::new(bytes).unwrap_or_default(),
        }
    }
}

/// The status code of an error.
///
/// Returns `KEEL_ERR_INVALID_ARGUMENT` if `err` is NULL or not a live `keel_error` (already freed).
///
/// Thread safety: may be called from any thread, also on the same error concurrently.
#[no_mangle]
pub extern "C" fn keel_error_code(err: *const keel_error) -> keel_status {
    guard::value(KEEL_ERR_INVALID_ARGUMENT, || {
        handle::get::<ErrorObject>(err, "err").ok().map(|e| e.code)
    })
}

/// The message of an error: a NUL-terminated UTF-8 string owned by the error, valid until
/// `keel_error_free(err)`; never free it yourself.
///
/// Never returns NULL: if `err` is NULL or not a live `keel_error`, returns a static string saying
/// so.
///
/// Thread safety: may be called from any thread, also on the same error concurrently.
#[no_mangle]
pub extern "C" fn keel_error_message(err: *const keel_error) -> *const c_char {
    let stale = c"(not a live keel_error: NULL, already freed, or another kind of handle)";
    guard::value(stale.as_ptr(), || {
        handle::get::<ErrorObject>(err, "err")
            .ok()
            .map(|e| e.message.as_ptr())
    })
}

/// Frees an error. NULL is ignored; so is a handle that is not a live `keel_error` (a double free
/// is detected and does nothing). The string from `keel_error_message` dies with it.
///
/// Thread safety: may be called from any thread; an error must be freed once.
#[no_mangle]
pub extern "C" fn keel_error_free(err: *mut keel_error) {
    guard::value((), || {
        handle::remove::<ErrorObject>(err);
        Some(())
    })
}

/// The name of a status code, e.g. "KEEL_ERR_NOT_FOUND": a static string owned by the library.
/// An unknown code gives "KEEL_ERR_UNKNOWN".
///
/// `status` is an `int32_t` rather than a `keel_status` so that any integer is a valid argument.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_status_name(status: i32) -> *const c_char {
    let name: &'static std::ffi::CStr = match status {
        0 => c"KEEL_OK",
        1 => c"KEEL_ERR_INVALID_ARGUMENT",
        2 => c"KEEL_ERR_NOT_FOUND",
        3 => c"KEEL_ERR_INVALID_MODEL",
        4 => c"KEEL_ERR_NO_DEVICE",
        5 => c"KEEL_ERR_OVERLOADED",
        6 => c"KEEL_ERR_DEADLINE",
        7 => c"KEEL_ERR_CONTRACT",
        8 => c"KEEL_ERR_INTERNAL",
        9 => c"KEEL_ERR_SHUTTING_DOWN",
        10 => c"KEEL_ERR_STORAGE",
        11 => c"KEEL_ERR_REVIEW",
        12 => c"KEEL_ERR_BUDGET",
        _ => c"KEEL_ERR_UNKNOWN",
    };
    name.as_ptr()
}
