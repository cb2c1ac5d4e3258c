//! Hooks for tests of the boundary itself: always present, cheap, and harmless to call.

use crate::guard;
use crate::handle;
use crate::status::{keel_error, keel_status};

/// Panics inside the library on purpose, to show that the boundary catches it: returns
/// `KEEL_ERR_INTERNAL` and, if `err` is not NULL, an error whose message holds the panic's. The
/// library stays usable. (The panic message is also printed to stderr by Rust's panic hook.)
///
/// # Safety
/// `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn keel_debug_panic(err: *mut *mut keel_error) -> keel_status {
    guard::call(err, || panic!("keel_debug_panic was called"))
}

/// The number of live handles of every kind (engines, models, results, errors, strings) in the
/// process: what has been created and not yet freed. A program that frees everything it got sees
/// 0, which makes a handle leak visible to a test.
///
/// Thread safety: may be called from any thread; the count is a snapshot.
#[no_mangle]
pub extern "C" fn keel_debug_live_handles() -> usize {
    guard::value(0, || Some(handle::live()))
}
