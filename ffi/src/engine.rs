//! Engines: create, configure, inspect, shut down, free.

use crate::guard::{self, Out};
use crate::handle::{self, Handle};
use crate::model::{path_of, ModelObject};
use crate::status::{keel_error, keel_status, Failure};
use crate::string::{keel_string, StringObject};
use keel::cost::Costed;
use keel::observe::Observed;
use keel::stack::Stack;
use keel::version::Versioned;
use keel::{
    CacheConfig, CacheStats, DeviceKind, Engine, Infer, InferRequest, InferResponse, InferStream,
    SchedulerConfig, VersionId,
};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, CStr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A kind of compute device: one of the `KEEL_DEVICE_*` values. An integer type rather than an
/// enum so that any value a caller passes is defined behaviour (an unknown one is refused).
pub type keel_device = u32;

/// The best device available: CUDA, then a real GPU through wgpu, then the CPU, which always
/// exists (a software Vulkan driver such as lavapipe is never chosen).
pub const KEEL_DEVICE_BEST: keel_device = 0;
/// The host CPU.
pub const KEEL_DEVICE_CPU: keel_device = 1;
/// A GPU through wgpu (Vulkan, Metal, DX12); `KEEL_WGPU_ADAPTER` picks an adapter by name.
/// KEEL_ERR_NO_DEVICE where there is no adapter.
pub const KEEL_DEVICE_WGPU: keel_device = 2;
/// An NVIDIA GPU through CUDA: KEEL_ERR_NO_DEVICE until the CUDA backend runs models, the
/// message naming what is missing (libcuda.so, libnvrtc.so, libcublas.so, a GPU).
pub const KEEL_DEVICE_CUDA: keel_device = 3;

/// Options for `keel_engine_new`. Get the defaults from `keel_engine_default_params()` and change
/// the fields you care about, so that fields added in later versions get their defaults too.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_engine_params {
    /// Which device to run on (a `KEEL_DEVICE_*` value). Default: `KEEL_DEVICE_CPU`.
    pub device: keel_device,
    /// Reserved, not used yet: compute threads (0: the library's choice). Default: 0.
    pub threads: u32,
    /// NULL for none; otherwise a folder (created if missing) where the engine keeps its store:
    /// one SQLite database holding the model registry, the alias history, a lineage record
    /// of every prediction made through `keel_infer_embed` / `keel_infer_generate` /
    /// `keel_classify`, the review queue and the feedback. With a store, those calls address
    /// models as `NAME` (its `production` alias), `NAME@ALIAS` or a version id, each version's
    /// `[review]` policy applies (tickets for `keel_review_*`), and the `keel_registry_*`,
    /// `keel_lineage_*`, `keel_review_*` and `keel_feedback` calls work (without one they fail
    /// with `KEEL_ERR_INVALID_ARGUMENT`). Several engines, also in other processes, may
    /// share a folder. A path of bytes (need not be UTF-8 on Unix), borrowed for the duration of
    /// the call. Default: NULL.
    ///
    /// Or a fleet's PostgreSQL database, `postgres://USER@HOST:PORT/DB`, shared by engines on
    /// many hosts: the same tables, plus the budgets (`keel_budget_set` holds across every
    /// engine on it), and every answer returns only once its lineage record is committed
    /// (`KEEL_ERR_STORAGE` when it cannot be).
    ///
    /// The version layer loads and unloads the versions it serves itself: do not also load one
    /// of them through `keel_model_load` on the same engine (freeing the last handle would
    /// unload it from under the layer, and a route change would unload it from under the
    /// handle).
    pub storage_path: *const c_char,
    /// Encoders: most texts the scheduler runs in one batch (0 is taken as 1). Default: 32.
    pub max_batch_size: u32,
    /// Encoders: longest a batch waits to fill after its first request arrived, in
    /// microseconds. Default: 5000.
    pub max_queue_delay_us: u32,
    /// Requests that may wait in each model's queue; one more is refused at once with
    /// `KEEL_ERR_OVERLOADED` (0 is taken as 1). Default: 1024.
    pub queue_capacity: u32,
    /// Decoders: most generations decoding together in one batch; more wait in the queue (0 is
    /// taken as 1). Default: 16.
    pub max_streams: u32,
    /// Byte budget of the response cache, which answers a repeated embedding of the same text by
    /// the same model version without running it (0: off). Default: 64 MiB.
    pub response_cache_bytes: u64,
    /// Byte budget of the decoder prefix cache, which keeps the KV state of the chat template's
    /// system turn for later prompts (0: off). Default: 256 MiB.
    pub prefix_cache_bytes: u64,
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
    /// Every layer over `engine` (contract, observe, cost; with a `storage_path`, review and
    /// versions on one store): every inference call goes through it.
    pub(crate) stack: Stack,
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
    /// The version layer, or the error of an engine created without a store.
    pub(crate) fn store(&self) -> Result<&Versioned, Failure> {
        self.stack
            .versioned()
            .ok_or_else(|| Failure::invalid("the engine was created without a storage_path"))
    }

    /// The observability layer (every engine has one).
    pub(crate) fn observed(&self) -> Result<&Observed, Failure> {
        self.stack
            .observed()
            .ok_or_else(|| Failure::internal("the engine has no observability layer"))
    }

    /// The cost layer (every engine has one).
    pub(crate) fn costed(&self) -> Result<&Costed, Failure> {
        self.stack
            .costed()
            .ok_or_else(|| Failure::internal("the engine has no cost layer"))
    }

    /// Answers a request through the stack: with a store the version layer (routing, lineage)
    /// and the review layer, then the cost, observability and contract layers, then the engine.
    /// The layers' own error kinds are kept (an unknown name is NOT_FOUND, a store failure
    /// STORAGE, a held or blocked prediction REVIEW, a budget refusal BUDGET).
    pub(crate) fn infer(&self, request: InferRequest) -> Result<InferResponse, Failure> {
        Ok(self.stack.infer(request)?)
    }

    /// Starts a generation through the stack.
    pub(crate) fn infer_stream(&self, request: InferRequest) -> Result<InferStream, Failure> {
        Ok(self.stack.infer_stream(request)?)
    }

    pub(crate) fn book(&self) -> MutexGuard<'_, ModelBook> {
        // The book is updated one field at a time with no panic in between.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The object behind a live engine handle.
pub(crate) fn engine_of(engine: *const keel_engine) -> Result<Arc<EngineObject>, Failure> {
    handle::get::<EngineObject>(engine, "engine")
}

/// The default engine options: the CPU (`KEEL_DEVICE_BEST` probes for a GPU), the scheduler's
/// and caches' defaults (in the field docs), no store (`storage_path` NULL) and `threads` (reserved)
/// at 0.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_engine_default_params() -> keel_engine_params {
    let scheduler = SchedulerConfig::default();
    let caches = CacheConfig::default();
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    keel_engine_params {
        device: KEEL_DEVICE_CPU,
        threads: 0,
        storage_path: std::ptr::null(),
        max_batch_size: clamp(scheduler.max_batch_size),
        max_queue_delay_us: u32::try_from(scheduler.max_queue_delay.as_micros()).unwrap_or(u32::MAX),
        queue_capacity: clamp(scheduler.queue_capacity),
        max_streams: clamp(scheduler.max_streams),
        response_cache_bytes: caches.response_bytes as u64,
        prefix_cache_bytes: caches.prefix_bytes as u64,
    }
}

/// The Rust configuration of a `keel_engine_params`.
fn configs_of(p: &keel_engine_params) -> (SchedulerConfig, CacheConfig) {
    let size = |n: u32| n as usize;
    let scheduler = SchedulerConfig::default()
        .max_batch_size(size(p.max_batch_size))
        .max_queue_delay(Duration::from_micros(p.max_queue_delay_us.into()))
        .queue_capacity(size(p.queue_capacity))
        .max_streams(size(p.max_streams));
    let bytes = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let caches = CacheConfig::default()
        .response_bytes(bytes(p.response_cache_bytes))
        .prefix_bytes(bytes(p.prefix_cache_bytes));
    (scheduler, caches)
}

/// Creates an engine.
///
/// `params` may be NULL for the defaults. On success `*out` holds a new engine, owned by the
/// caller, who frees it with `keel_engine_free`. On failure `*out` is NULL and, if `err` is not
/// NULL, `*err` holds an error the caller frees: `KEEL_ERR_NO_DEVICE` if the requested device is not
/// available, `KEEL_ERR_INVALID_ARGUMENT` for an unknown device value, an empty `storage_path`
/// or a NULL `out`, `KEEL_ERR_STORAGE` when the store in `storage_path` cannot be opened (a
/// folder that cannot be created or written, a database that is not a Keel store or comes from
/// a newer Keel; the message says which).
///
/// # Safety
/// `params` is NULL or points to a `keel_engine_params` (whose `storage_path` is NULL or
/// NUL-terminated); `out` points to a writable `keel_engine *`; `err` is NULL or points to a
/// writable `keel_error *`.
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
        let (scheduler, caches) = configs_of(&params);
        let builder = Engine::builder().scheduler(scheduler).caches(caches);
        let builder = match params.device {
            KEEL_DEVICE_BEST => builder.best_device(),
            KEEL_DEVICE_CPU => builder.device(DeviceKind::Cpu),
            KEEL_DEVICE_WGPU => builder.device(DeviceKind::Wgpu),
            KEEL_DEVICE_CUDA => builder.device(DeviceKind::Cuda),
            other => return Err(Failure::invalid(format!("unknown device {other}"))),
        };
        let engine = builder.build()?;
        let stack = Stack::builder(engine.clone());
        let stack = if params.storage_path.is_null() {
            stack
        } else {
            let location = CStr::from_ptr(params.storage_path).to_bytes();
            if location.is_empty() {
                return Err(Failure::invalid(
                    "params.storage_path is empty (NULL for no store)",
                ));
            }
            // The review queue and the lineage in one store, as the CLI's: a folder, or a
            // fleet's `postgres://` database.
            stack.store(keel::store::open(path_of(location)?)?)
        };
        let stack = stack.all_layers().build()?;
        out.set(handle::insert(EngineObject {
            engine,
            stack,
            book: Mutex::default(),
        }));
        Ok(())
    })
}

/// Shuts the engine down: from now on every request on it is refused with
/// `KEEL_ERR_SHUTTING_DOWN`; requests queued or running get up to `grace_ms` milliseconds to
/// finish, and those still unfinished then are answered `KEEL_ERR_SHUTTING_DOWN`: none is lost
/// silently. Writes whether everything finished in time to `*finished` (if `finished` is not
/// NULL; false on failure). The engine must still be freed with `keel_engine_free`.
///
/// # Safety
/// `finished` is NULL or points to a writable `bool`; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; it blocks for up
/// to `grace_ms`.
#[no_mangle]
pub unsafe extern "C" fn keel_engine_shutdown(
    engine: *const keel_engine,
    grace_ms: u32,
    finished: *mut bool,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let finished = Out::clear_optional(finished, false);
        let engine = engine_of(engine)?;
        let all = engine.engine.shutdown(Duration::from_millis(grace_ms.into()));
        if let Some(finished) = finished {
            finished.set(all);
        }
        Ok(())
    })
}

/// Frees an engine and every model loaded through it: their `keel_model` handles die with it
/// (later calls on them fail with `KEEL_ERR_INVALID_ARGUMENT`; freeing them does nothing). Result
/// objects it returned (embeddings, completions, strings) stay valid until their own `_free`.
/// Requests still queued on it run to their end first (`keel_engine_shutdown` bounds that wait).
/// With a store, the lineage records not yet written are committed before the store is closed
/// (once the last call running on the engine has returned).
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

fn cache_json(stats: Option<CacheStats>) -> serde_json::Value {
    stats.map_or(serde_json::Value::Null, |c| {
        serde_json::json!({
            "hits": c.hits,
            "misses": c.misses,
            "insertions": c.insertions,
            "evictions": c.evictions,
            "expirations": c.expirations,
            "entries": c.entries,
            "bytes": c.bytes,
            "budget": c.budget,
        })
    })
}

/// The engine's counters as a JSON object: `{"scheduler": {...} | null, "response_cache": {...} |
/// null, "prefix_cache": {...} | null}`. `"scheduler"` holds the counters of `model`'s scheduler
/// (`accepted`, `completed`, `failed`, `overloaded`, `expired`, `shut_down`, `cancelled`,
/// `queued`, `batches`, `items`, `tokens`, `compute_ms`, `queue_wait_ms`,
/// `active_streams`, `kv_bytes`), or null when `model` is NULL; a cache that is off is null.
///
/// `model` (a version id or an alias) may be NULL. On success `*out` holds a new string owned by
/// the caller (free it with `keel_string_free`). On failure `*out` is NULL and `*err` (if `err`
/// is not NULL) holds the error: `KEEL_ERR_NOT_FOUND` for an unknown model.
///
/// # Safety
/// `model` is NULL or NUL-terminated; `out` points to a writable `keel_string *`; `err` is NULL or
/// points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; the counters are
/// a snapshot.
#[no_mangle]
pub unsafe extern "C" fn keel_engine_stats(
    engine: *const keel_engine,
    model: *const c_char,
    out: *mut *mut keel_string,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let scheduler = if model.is_null() {
            serde_json::Value::Null
        } else {
            let s = engine.engine.scheduler_stats(guard::c_str(model, "model")?)?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            serde_json::json!({
                "accepted": s.accepted,
                "completed": s.completed,
                "failed": s.failed,
                "overloaded": s.overloaded,
                "expired": s.expired,
                "shut_down": s.shut_down,
                "cancelled": s.cancelled,
                "queued": s.queued,
                "batches": s.batches,
                "items": s.items,
                "tokens": s.tokens,
                "compute_ms": ms(s.compute),
                "queue_wait_ms": ms(s.queue_wait),
                "active_streams": s.active_streams,
                "kv_bytes": s.kv_bytes,
            })
        };
        let stats = serde_json::json!({
            "scheduler": scheduler,
            "response_cache": cache_json(engine.engine.response_cache_stats()),
            "prefix_cache": cache_json(engine.engine.prefix_cache_stats()),
        });
        out.set(handle::insert(StringObject::new(stats.to_string())));
        Ok(())
    })
}
