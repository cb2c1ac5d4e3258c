//! Models: load a version into an engine, name it, free it.

use crate::engine::{engine_of, keel_engine, EngineObject};
use crate::guard::{self, Out};
use crate::handle::{self, Handle};
use crate::status::{keel_error, keel_status, Failure};
use keel::{LoadOptions, VersionId, WeightPath};
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::Arc;

/// Which weights a model's matrix products use: one of the `KEEL_WEIGHTS_*` values. Each path
/// other than the default computes other numbers from the same files, so it is a version of its
/// own (another version id).
pub type keel_weights = u32;

/// The weights as stored: block-quantized (Q4_1, Q8_0) for GGUF models, f32 for safetensors. The
/// default.
pub const KEEL_WEIGHTS_QUANTIZED: keel_weights = 0;
/// Every weight in f32 (GGUF models dequantized at load): the reference path.
pub const KEEL_WEIGHTS_F32: keel_weights = 1;
/// f32 matrices quantized to int8 per output channel at load: an encoder's fast path
/// (block-quantized GGUF tensors stay as stored).
pub const KEEL_WEIGHTS_INT8: keel_weights = 2;

/// Options for `keel_model_load`. Get the defaults from `keel_model_default_params()` and change
/// the fields you care about.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_model_params {
    /// Which weights to compute with (a `KEEL_WEIGHTS_*` value). Default:
    /// `KEEL_WEIGHTS_QUANTIZED` (the weights as stored).
    pub weights: keel_weights,
}

/// A model version loaded into an engine. Created by `keel_model_load`, freed by
/// `keel_model_free` (or, with all the others of its engine, by `keel_engine_free`).
///
/// Requests name a model by a string: its version id (`keel_model_id`) or an alias
/// (`keel_model_alias`). Loading the same bytes twice gives two handles on one version, which stays
/// loaded until the last of its handles is freed.
pub struct keel_model {
    _opaque: [u8; 0],
}

/// What a `keel_model` handle stands for.
pub(crate) struct ModelObject {
    engine: Arc<EngineObject>,
    version: VersionId,
    id: CString,
    name: CString,
    architecture: CString,
}

impl Handle for ModelObject {
    type C = keel_model;
    const NAME: &'static str = "keel_model";
}

/// The default load options: the weights as stored.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_model_default_params() -> keel_model_params {
    keel_model_params {
        weights: KEEL_WEIGHTS_QUANTIZED,
    }
}

/// A C string as a path. On Unix a path is bytes and need not be UTF-8.
pub(crate) fn path_of(bytes: &[u8]) -> Result<PathBuf, Failure> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::ffi::OsStr::from_bytes(bytes).into())
    }
    #[cfg(not(unix))]
    {
        Ok(guard::utf8(bytes, "path")?.into())
    }
}

/// The Rust weight path of a `KEEL_WEIGHTS_*` value.
pub(crate) fn weight_path_of(weights: keel_weights) -> Result<WeightPath, Failure> {
    match weights {
        KEEL_WEIGHTS_QUANTIZED => Ok(WeightPath::Quantized),
        KEEL_WEIGHTS_F32 => Ok(WeightPath::F32),
        KEEL_WEIGHTS_INT8 => Ok(WeightPath::Int8),
        other => Err(Failure::invalid(format!("unknown weights value {other}"))),
    }
}

/// Loads the model at `path` into `engine`: a Keel model folder (with `keel.toml`, whose sha256
/// sums are checked), a Hugging Face folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`), or a `.gguf` file.
///
/// `params` may be NULL for the defaults. On success `*out` holds a new model handle owned by the
/// caller (free it with `keel_model_free`). On failure `*out` is NULL and `*err` (if `err` is not
/// NULL) holds the error: `KEEL_ERR_NOT_FOUND` for a missing path, `KEEL_ERR_INVALID_MODEL` for a
/// corrupt, truncated, unknown or checksum-failing model, `KEEL_ERR_INVALID_ARGUMENT` for NULL or
/// stale arguments.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `params` is NULL or points to a
/// `keel_model_params`; `out` points to a writable `keel_model *`; `err` is NULL or points to a
/// writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; loads and frees of
/// models on one engine take turns (requests on loaded models keep running meanwhile).
#[no_mangle]
pub unsafe extern "C" fn keel_model_load(
    engine: *const keel_engine,
    path: *const c_char,
    params: *const keel_model_params,
    out: *mut *mut keel_model,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let path = path_of(guard::c_bytes(path, "path")?)?;
        let params = params
            .as_ref()
            .copied()
            .unwrap_or_else(|| keel_model_default_params());
        let weights = weight_path_of(params.weights)?;
        let mut book = engine.book();
        if book.freed {
            return Err(Failure::invalid(
                "engine was freed while the model was being loaded",
            ));
        }
        let version = engine.engine.load_with(&path, LoadOptions { weights })?;
        let info = engine
            .engine
            .models()
            .into_iter()
            .find(|m| m.id == version)
            .ok_or_else(|| Failure::from(keel::Error::UnknownModel(version.to_string())))?;
        let text = |s: String| CString::new(s).unwrap_or_default();
        let object = ModelObject {
            engine: engine.clone(),
            id: text(version.to_string()),
            name: text(info.manifest.name),
            architecture: text(info.manifest.architecture.to_string()),
            version: version.clone(),
        };
        let model = handle::insert(object);
        book.handles.insert(handle::id_of(model));
        *book.counts.entry(version).or_default() += 1;
        out.set(model);
        Ok(())
    })
}

/// Frees a model handle. When it was the last handle on its version, the version is unloaded from
/// the engine and every alias pointing at it is removed; requests already queued or running on it
/// finish first, and the call waits for them (so it can block up to the longest of them).
///
/// NULL is ignored; so is a handle that is not a live model (a double free, or a model whose
/// engine was freed already, is detected and does nothing).
///
/// Thread safety: may be called from any thread, also while other threads use the model.
#[no_mangle]
pub extern "C" fn keel_model_free(model: *mut keel_model) {
    guard::value((), || {
        let object = handle::remove::<ModelObject>(model)?;
        let mut book = object.engine.book();
        book.handles.remove(&handle::id_of(model));
        let count = book.counts.get_mut(&object.version)?;
        *count -= 1;
        if *count == 0 {
            book.counts.remove(&object.version);
            if !book.freed {
                // It can only fail if the version is gone already, which is what was asked.
                let _ = object.engine.engine.unload(object.version.as_str());
            }
        }
        Some(())
    })
}

/// Looks a model handle up and hands one of its strings out.
fn model_str(model: *const keel_model, field: fn(&ModelObject) -> &CString) -> *const c_char {
    guard::value(std::ptr::null(), || {
        handle::get::<ModelObject>(model, "model")
            .ok()
            .map(|m| field(&m).as_ptr())
    })
}

/// The model's version id: 64 lower-case hex digits derived from the content of its files (the
/// same bytes always have the same id). Pass it as the `model` argument of `keel_embed` or
/// `keel_generate`. Owned by the model handle, valid until it is freed; NULL if `model` is NULL or
/// not a live model.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_model_id(model: *const keel_model) -> *const c_char {
    model_str(model, |m| &m.id)
}

/// The model's human-readable name (from its manifest or file name). Owned by the model handle,
/// valid until it is freed; NULL if `model` is NULL or not a live model.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_model_name(model: *const keel_model) -> *const c_char {
    model_str(model, |m| &m.name)
}

/// The model's architecture: "bert" (an encoder: `keel_embed`) or "llama" (a decoder:
/// `keel_generate`). Owned by the model handle, valid until it is freed; NULL if `model` is NULL
/// or not a live model.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_model_architecture(model: *const keel_model) -> *const c_char {
    model_str(model, |m| &m.architecture)
}

/// Points the alias `alias` of the model's engine at the model's version, replacing where it
/// pointed before. Requests can then name the model by `alias`. The alias is removed when the
/// version is unloaded (when its last handle is freed).
///
/// On failure `*err` (if `err` is not NULL) holds the error: `KEEL_ERR_INVALID_ARGUMENT` for an
/// empty, NULL or non-UTF-8 alias or a stale model.
///
/// # Safety
/// `alias` is NULL or a NUL-terminated string; `err` is NULL or points to a writable
/// `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; a request that
/// resolves the alias at the same time sees the old or the new version.
#[no_mangle]
pub unsafe extern "C" fn keel_model_alias(
    model: *const keel_model,
    alias: *const c_char,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let model = handle::get::<ModelObject>(model, "model")?;
        let alias = guard::c_str(alias, "alias")?;
        model.engine.engine.alias(alias, &model.version)?;
        Ok(())
    })
}
