//! The one wrapper every entry point goes through, and the checks it is built from.

use crate::handle;
use crate::status::{keel_error, keel_status, ErrorObject, Failure};
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs the body of a fallible entry point: clears `*err` first (when `err` is not NULL), runs
/// `body` with panics caught, and turns its failure into a status code and, when `err` is not
/// NULL, a `keel_error` for the caller. `body` clears its own out-parameters before anything else
/// (with [`Out::clear`]), so that they read NULL or zero on every failure.
pub(crate) fn call(err: *mut *mut keel_error, body: impl FnOnce() -> Result<(), Failure>) -> keel_status {
    if !err.is_null() {
        // SAFETY: the caller passes NULL or a writable `keel_error *` (the documented contract).
        unsafe { err.write(std::ptr::null_mut()) };
    }
    // AssertUnwindSafe: after a panic the only state the body shared is behind locks that the
    // library recovers from poisoning, or in objects that a failed call never hands out.
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return keel_status::KEEL_OK,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::panic(payload),
    };
    let code = failure.code;
    if !err.is_null() {
        // Building the error object allocates; should even that panic, the code still gets out.
        if let Ok(object) = catch_unwind(|| handle::insert(ErrorObject::new(failure))) {
            // SAFETY: as above.
            unsafe { err.write(object) };
        }
    }
    code
}

/// Runs the body of an accessor that returns a value rather than a status: `fallback` if the body
/// gives `None` (a NULL or stale handle) or panics.
pub(crate) fn value<T>(fallback: T, body: impl FnOnce() -> Option<T>) -> T {
    catch_unwind(AssertUnwindSafe(body))
        .ok()
        .flatten()
        .unwrap_or(fallback)
}

/// A checked, cleared out-parameter.
pub(crate) struct Out<T>(*mut T);

impl<T> Out<T> {
    /// Checks that `ptr` is not NULL and writes `empty` (NULL, zero) through it, so that it holds
    /// `empty` if the call fails later.
    ///
    /// # Safety
    /// `ptr` is NULL or valid for writes of a `T`.
    pub(crate) unsafe fn clear(ptr: *mut T, what: &str, empty: T) -> Result<Self, Failure> {
        Self::clear_optional(ptr, empty).ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
    }

    /// [`Out::clear`] for an out-parameter the caller may leave NULL.
    ///
    /// # Safety
    /// As for [`Out::clear`].
    pub(crate) unsafe fn clear_optional(ptr: *mut T, empty: T) -> Option<Self> {
        if ptr.is_null() {
            return None;
        }
        ptr.write(empty);
        Some(Self(ptr))
    }

    /// Writes the result.
    pub(crate) fn set(self, value: T) {
        // SAFETY: checked and writable since `clear`.
        unsafe { self.0.write(value) }
    }
}

/// The bytes of a NUL-terminated string, checked for NULL.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays alive for `'a`.
pub(crate) unsafe fn c_bytes<'a>(ptr: *const c_char, what: &str) -> Result<&'a [u8], Failure> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    Ok(CStr::from_ptr(ptr).to_bytes())
}

/// A NUL-terminated string checked for NULL and UTF-8.
///
/// # Safety
/// As for [`c_bytes`].
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    utf8(c_bytes(ptr, what)?, what)
}

/// Bytes checked for UTF-8.
pub(crate) fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, Failure> {
    std::str::from_utf8(bytes).map_err(|e| {
        Failure::invalid(format!(
            "{what} is not valid UTF-8 (valid up to byte {})",
            e.valid_up_to()
        ))
    })
}

/// A caller's array of `len` elements, checked for NULL (an empty array may be NULL).
///
/// # Safety
/// `ptr` is NULL or points to `len` readable, initialized elements that stay alive for `'a`.
pub(crate) unsafe fn c_array<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL but its length is {len}"
        )));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}
