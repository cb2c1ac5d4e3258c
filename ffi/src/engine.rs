//! Engines: create, inspect, free.

use crate::guard::{self, Out};
use crate::handle::{self, Handle};
use crate::model::ModelObject;
use crate::status::{keel_error, keel_status, Failure};
use crate::string::{keel_string, StringObject};
use keel::{DeviceKind, Engine, VersionId};
use std::collections::{HashMap, HashSet};
use std::ffi::c_char;
use std::sync::{Arc, Mutex, MutexGuard};

/// A kind of compute device: one of the `KEEL_DEVICE_*` values. An integer type rather than an
/// enum so that any value a caller passes is defined behaviour (an unknown one is refused).
pub type keel_device = u32;

/// The best device available: CUDA, then wgpu, then the CPU, which always exists.
pub const KEEL_DEVICE_BEST: keel_device = 0;
/// The host CPU.
pub const KEEL_DEVICE_CPU: keel_device = 1;
/// A GPU through wgpu (Vulkan, Metal, DX12). Not compiled into this build yet: KEEL_ERR_NO_DEVICE.
pub const KEEL_DEVICE_WGPU: keel_device = 2;
/// An NVIDIA GPU through CUDA. Not compiled into this build yet: KEEL_ERR_NO_DEVICE.
pub const KEEL_DEVICE_CUDA: keel_device = 3;

/// Options for `keel_engine_new`. Get the defaults from `keel_engine_default_params()` and change
/// the fields you care about, so that fields added in later versions get their defaults too.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_engine_params {
    /// Which device to run on (a `KEEL_DEVICE_*` value). Default: `KEEL_DEVICE_BEST`.
    pub device: keel_device,
    /// Reserved, not used yet: compute threads (0: the library's choice). Default: 0.
    pub threads: u32,
    /// Reserved, not used yet: where the engine will keep lineage records and the review queue (a
    /// SQLite file); NULL for none. Borrowed for the duration of the call. Default: NULL.
    pub storage_path: *const c_char,
}

/// An engine: the model versions a host has loaded and the requests it runs on them. Created by
/// `keel_engine_new`, freed by `keel_engine_free`. One engine serves any number of threads at
/// once: every function that takes a `const keel_engine *` may be called concurrently on the same
/// engine.
pub struct keel_engine {
    _opaque: [u8; 0],
}

/// What a `keel_engine` handle stands for.
pub(crate) struct EngineObject {
    pub(crate) engine: Engine,
    /// Serializes loads and frees of models, so that counting handles and unloading agree.
    book: Mutex<ModelBook>,
}

/// The model handles of an engine.
#[derive(Default)]
pub(crate) struct ModelBook {
    /// Set by `keel_engine_free`: no model may be loaded through the engine any more.
    pub(crate) freed: bool,
    /// The live model handles (their numbers), which die with the engine.
    pub(crate) handles: HashSet<u64>,
    /// How many live handles name each version: it is unloaded when the last one is freed.
    pub(crate) counts: HashMap<VersionId, usize>,
}

impl Handle for EngineObject {
    type C = keel_engine;
    const NAME: &'static str = "keel_engine";
}

impl EngineObject {
    pub(crate) fn book(&self) -> MutexGuard<'_, ModelBook> {
        // The book is updated one field at a time with no panic in between.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The object behind a live engine handle.
pub(crate) fn engine_of(engine: *const keel_engine) -> Result<Arc<EngineObject>, Failure> {
    handle::get::<EngineObject>(engine, "engine")
}

/// The default engine options: the best device, and the reserved fields at 0 / NULL.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_engine_default_params() -> keel_engine_params {
    keel_engine_params {
        device: KEEL_DEVICE_BEST,
        threads: 0,
        storage_path: std::ptr::null(),
    }
}

/// Creates an engine.
///
/// `params` may be NULL for the defaults. On success `*out` holds a new engine, owned by the
/// caller, who frees it with `keel_engine_free`. On failure `*out` is NULL and, if `err` is not
/// NULL, `*err` holds an error the caller frees: `KEEL_ERR_NO_DEVICE` if the requested device is not
/// available, `KEEL_ERR_INVALID_ARGUMENT` for an unknown device value or a NULL `out`.
///
/// # Safety
/// `params` is NULL or points to a `keel_engine_params`; `out` points to a writable
/// `keel_engine *`; `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called from any thread; engines are independent of each other.
#[no_mangle]
pub unsafe extern "C" fn keel_engine_new(
    params: *const keel_engine_params,
    out: *mut *mut keel_engine,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let params = params
            .as_ref()
            .copied()
            .unwrap_or_else(|| keel_engine_default_params());
        let builder = Engine::builder();
        let builder = match params.device {
            KEEL_DEVICE_BEST => builder.best_device(),
            KEEL_DEVICE_CPU => builder.device(DeviceKind::Cpu),
            KEEL_DEVICE_WGPU => builder.device(DeviceKind::Wgpu),
            KEEL_DEVICE_CUDA => builder.device(DeviceKind::Cuda),
            other => return Err(Failure::invalid(format!("unknown device {other}"))),
        };
        let engine = builder.build()?;
        out.set(handle::insert(EngineObject {
            engine,
            book: Mutex::default(),
        }));
        Ok(())
    })
}

/// Frees an engine and every model loaded through it: their `keel_model` handles die with it
/// (later calls on them fail with `KEEL_ERR_INVALID_ARGUMENT`; freeing them does nothing). Result
/// objects it returned (embeddings, completions, strings) stay valid until their own `_free`.
///
/// NULL is ignored; so is a handle that is not a live engine (a double free is detected and does
/// nothing). Calls running on the engine in other threads finish normally; calls that start after
/// this one fail with `KEEL_ERR_INVALID_ARGUMENT`, never crash.
///
/// Thread safety: may be called from any thread, also while other threads use the engine.
#[no_mangle]
pub extern "C" fn keel_engine_free(engine: *mut keel_engine) {
    guard::value((), || {
        let object = handle::remove::<EngineObject>(engine)?;
        let handles = {
            let mut book = object.book();
            book.freed = true;
            std::mem::take(&mut book.handles)
        };
        for id in handles {
            handle::remove_id::<ModelObject>(id);
        }
        Some(())
    })
}

/// The device the engine runs on (a `KEEL_DEVICE_*` value other than `KEEL_DEVICE_BEST`): where
/// `KEEL_DEVICE_BEST` was asked for, the one it chose.
///
/// On failure `*out` is 0 (`KEEL_DEVICE_BEST`) and `*err` (if `err` is not NULL) holds the error.
///
/// # Safety
/// `out` points to a writable `keel_device`; `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_engine_device(
    engine: *const keel_engine,
    out: *mut keel_device,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", KEEL_DEVICE_BEST)?;
        let engine = engine_of(engine)?;
        out.set(match engine.engine.device().caps().kind {
            DeviceKind::Cpu => KEEL_DEVICE_CPU,
            DeviceKind::Wgpu => KEEL_DEVICE_WGPU,
            DeviceKind::Cuda => KEEL_DEVICE_CUDA,
        });
        Ok(())
    })
}

/// The model versions loaded in the engine, as a JSON array with one object per version:
/// `{"id": "<64 hex digits>", "name": "...", "architecture": "bert" | "llama",
/// "weights": "quantized" | "f32" | ...}`, sorted by name.
///
/// On success `*out` holds a new string owned by the caller (free it with `keel_string_free`). On
/// failure `*out` is NULL and `*err` (if `err` is not NULL) holds the error.
///
/// # Safety
/// `out` points to a writable `keel_string *`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_engine_models(
    engine: *const keel_engine,
    out: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let models: Vec<serde_json::Value> = engine
            .engine
            .models()
            .into_iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id.as_str(),
                    "name": m.manifest.name,
                    "architecture": m.manifest.architecture.to_string(),
                    // "quantized", "f32", ...: the weight path's name, whatever paths the build has.
                    "weights": format!("{:?}", m.weights).to_lowercase(),
                })
            })
            .collect();
        let text = serde_json::Value::Array(models).to_string();
        out.set(handle::insert(StringObject::new(text)));
        Ok(())
    })
}
