//! Strings the library returns: JSON listings, registry histories, lineage records.

use crate::guard;
use crate::handle::{self, Handle};
use std::ffi::{c_char, CString};

/// A string of the library's as a C string, for an accessor to hand out (a NUL inside, which
/// none of these hold, would end it).
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.split('\0').next().unwrap_or_default()).unwrap_or_default()
}

/// A UTF-8 string owned by the library, returned by calls such as `keel_engine_models`. Read it
/// with `keel_string_data` and `keel_string_len`; free it with `keel_string_free`. Immutable: may
/// be read from any number of threads at once.
pub struct keel_string {
    _opaque: [u8; 0],
}

/// What a `keel_string` handle stands for: the text and a NUL after it.
pub(crate) struct StringObject {
    bytes: Vec<u8>,
}

impl Handle for StringObject {
    type C = keel_string;
    const NAME: &'static str = "keel_string";
}

impl StringObject {
    pub(crate) fn new(text: String) -> Self {
        let mut bytes = text.into_bytes();
        bytes.push(0);
        Self { bytes }
    }

    /// A value as JSON text: what the calls that answer in JSON hand out.
    pub(crate) fn json(value: &impl serde::Serialize) -> Result<Self, crate::status::Failure> {
        serde_json::to_string(value)
            .map(Self::new)
            .map_err(|e| crate::status::Failure::internal(format!("cannot write the answer as JSON: {e}")))
    }
}

/// The string's bytes, NUL-terminated (the text itself holds no NUL). Owned by the string, valid
/// until `keel_string_free`; NULL if `s` is NULL or not a live `keel_string`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_string_data(s: *const keel_string) -> *const c_char {
    guard::value(std::ptr::null(), || {
        handle::get::<StringObject>(s, "s")
            .ok()
            .map(|s| s.bytes.as_ptr().cast())
    })
}

/// The string's length in bytes, without the terminating NUL; 0 if `s` is NULL or not a live
/// `keel_string`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_string_len(s: *const keel_string) -> usize {
    guard::value(0, || {
        handle::get::<StringObject>(s, "s")
            .ok()
            .map(|s| s.bytes.len() - 1)
    })
}

/// Frees a string. NULL is ignored; so is a handle that is not a live `keel_string` (a double free
/// is detected and does nothing).
///
/// Thread safety: may be called from any thread; a string must be freed once.
#[no_mangle]
pub extern "C" fn keel_string_free(s: *mut keel_string) {
    guard::value((), || {
        handle::remove::<StringObject>(s);
        Some(())
    })
}
