//! libkeel: Keel's C ABI, for hosts written in C, C++, Python (ctypes) or anything that can call C.
//!
//! A thin layer over [`keel::Engine`] and, for an engine with a store, the version layer
//! [`keel::version::Versioned`] (registry, canary routing, lineage) and the review layer
//! [`keel::review::Reviewed`] (review queue, feedback); every engine has the cost layer
//! [`keel::cost::Costed`] (prices, budgets). Its conventions, stated once in `include/keel.h` (which
//! cbindgen generates from the `///` docs in this crate) and kept by every function here:
//!
//! - **One wrapper.** Every entry point runs its body through [`guard::call`] (or
//!   [`guard::value`] for accessors that return a value): the error out-parameter is cleared
//!   first, the other out-parameters are cleared before any other check, null pointers and stale
//!   handles become `KEEL_ERR_INVALID_ARGUMENT`, and a panic is caught and becomes
//!   `KEEL_ERR_INTERNAL`: nothing unwinds into C.
//! - **One error convention.** A [`status::keel_status`] code plus an owned [`status::keel_error`]
//!   object; Rust errors are sorted into codes in one place, [`status::status_of`].
//! - **Handles are looked up, never trusted.** A handle is a token for an entry in a table of live
//!   objects ([`handle`]), so a freed, never-created or wrong-type handle is refused, not
//!   dereferenced.
#![warn(missing_docs)]
// The exported names are C names (`keel_engine`, `KEEL_OK`): they are the API.
#![allow(non_camel_case_types)]

// cbindgen writes include/keel.h in the order of these modules (blank lines keep rustfmt from
// sorting them): errors, engines, models, request controls, the registry, embeddings,
// generation, classification and observability, lineage, review and cost, strings, test
// hooks.
pub mod status;

pub mod engine;

pub mod model;

pub mod request;

pub mod registry;

pub mod embed;

pub mod generate;

pub mod observe;

pub mod lineage;

pub mod review;

pub mod string;

pub mod debug;

pub(crate) mod guard;
pub(crate) mod handle;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_observe;
#[cfg(test)]
mod tests_parity;
#[cfg(test)]
mod tests_registry;
#[cfg(test)]
mod tests_review;

/// The version of the C ABI that this header describes. It grows by one with every change that
/// breaks a program compiled against an older header. A host should compare it with
/// `keel_abi_version()` at start-up and refuse to run on a mismatch: "keel.h is ABI X but the
/// libkeel it loaded is ABI Y".
pub const KEEL_ABI_VERSION: u32 = 2;

/// The ABI version of the loaded library: compare it with `KEEL_ABI_VERSION` from the header the
/// host was compiled with.
///
/// Thread safety: may be called from any thread at any time, before any other call.
#[no_mangle]
pub extern "C" fn keel_abi_version() -> u32 {
    KEEL_ABI_VERSION
}

/// The version of the library, e.g. "0.1.0": a static, NUL-terminated string owned by the library
/// (never free it).
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_version() -> *const std::ffi::c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
