//! Sentence embeddings, into a library-owned result or a caller's buffer.

use crate::engine::{engine_of, keel_engine};
use crate::guard::{self, Out};
use crate::handle::{self, Handle};
use crate::request::{infer_request_of, keel_request_info, keel_request_params, request_of, route_of};
use crate::status::{keel_error, keel_status, Failure};
use crate::string::c_string;
use keel::{InferRequest, InferResponse, Input, Output};
use std::ffi::{c_char, CStr, CString};

/// The embeddings of a batch of texts, returned by `keel_embed` and `keel_infer_embed`: `count`
/// vectors of `dim` floats, each of unit length, in the order of the texts, and how they were
/// made. Free it with `keel_embeddings_free`. Immutable: may be read from any number of threads
/// at once.
pub struct keel_embeddings {
    _opaque: [u8; 0],
}

/// What a `keel_embeddings` handle stands for.
pub(crate) struct EmbeddingsObject {
    count: usize,
    dim: usize,
    /// Row-major: vector `i` is `data[i * dim..(i + 1) * dim]`.
    data: Vec<f32>,
    version: CString,
    request_id: Option<CString>,
    /// Set on an engine with a store.
    route: Option<CString>,
}

impl Handle for EmbeddingsObject {
    type C = keel_embeddings;
    const NAME: &'static str = "keel_embeddings";
}

/// The texts of a call, checked for NULL and UTF-8.
///
/// # Safety
/// As documented on `keel_embed`.
unsafe fn texts_of<'a>(
    texts: *const *const c_char,
    lengths: *const usize,
    n_texts: usize,
) -> Result<Vec<&'a str>, Failure> {
    let pointers = guard::c_array(texts, n_texts, "texts")?;
    let lengths = if lengths.is_null() {
        None
    } else {
        Some(guard::c_array(lengths, n_texts, "lengths")?)
    };
    pointers
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            if p.is_null() {
                return Err(Failure::invalid(format!("texts[{i}] is NULL")));
            }
            let bytes = match lengths {
                Some(lengths) => std::slice::from_raw_parts(p.cast::<u8>(), lengths[i]),
                None => CStr::from_ptr(p).to_bytes(),
            };
            guard::utf8(bytes, &format!("texts[{i}]"))
        })
        .collect()
}

/// Runs the embedding of a call through the engine's stack.
///
/// # Safety
/// As documented on `keel_embed`.
unsafe fn embed(
    engine: *const keel_engine,
    model: *const c_char,
    texts: *const *const c_char,
    lengths: *const usize,
    n_texts: usize,
    request: *const keel_request_params,
) -> Result<EmbeddingsObject, Failure> {
    let engine = engine_of(engine)?;
    let model = guard::c_str(model, "model")?;
    let texts = texts_of(texts, lengths, n_texts)?;
    let request = InferRequest::embed(model, texts).options(request_of(request)?);
    embeddings_of(engine.infer(request)?)
}

/// The result object of an embedding's answer.
fn embeddings_of(answer: InferResponse) -> Result<EmbeddingsObject, Failure> {
    let Output::Embeddings(vectors) = answer.output else {
        return Err(Failure::internal(
            "an embedding request was answered with another output",
        ));
    };
    let meta = answer.meta;
    Ok(EmbeddingsObject {
        count: vectors.len(),
        dim: vectors.first().map_or(0, Vec::len),
        data: vectors.concat(),
        version: c_string(meta.version.as_str()),
        request_id: Some(c_string(meta.request_id.as_str())),
        route: route_of(&meta),
    })
}

/// Embeds `n_texts` texts with the encoder `model` into a new `keel_embeddings` result, through
/// the engine's layers as `keel_infer_embed` does (contract, metrics, price; with a store,
/// `NAME` routing, review and a lineage record), with a generated request id and no routing
/// key. `model` is a version id or an alias of `keel_model_alias`, or, on an engine with a
/// store, a registered `NAME` or `NAME@ALIAS`.
///
/// `texts` holds `n_texts` pointers to UTF-8 text. If `lengths` is NULL each text is
/// NUL-terminated; otherwise `lengths[i]` is the length in bytes of `texts[i]` (which then need not
/// be NUL-terminated). The library reads the texts during the call only. `request` may be NULL
/// for the default controls (see `keel_request_params`).
///
/// On success `*out` holds the result, owned by the caller (free it with
/// `keel_embeddings_free`). On failure `*out` is NULL and `*err` (if `err` is not NULL) holds the
/// error: `KEEL_ERR_INVALID_ARGUMENT` for NULL pointers, no texts, an empty text, invalid UTF-8, or a
/// model that is not an encoder; `KEEL_ERR_NOT_FOUND` for an unknown model; `KEEL_ERR_OVERLOADED`
/// when the model's queue is full; `KEEL_ERR_DEADLINE` when the request's deadline passed;
/// `KEEL_ERR_SHUTTING_DOWN` after `keel_engine_shutdown`.
///
/// # Safety
/// `texts` points to `n_texts` pointers, each to a text as described; `lengths` is NULL or points
/// to `n_texts` lengths; `model` is NULL or NUL-terminated; `request` is NULL or points to a
/// `keel_request_params`; `out` points to a writable
/// `keel_embeddings *`; `err` is NULL or points to a writable `keel_error *`. A wrong `n_texts`
/// cannot be detected and reads out of bounds.
///
/// Thread safety: may be called concurrently with any call on the same engine: the model's
/// scheduler batches concurrent requests together (a vector does not depend on its batch).
#[no_mangle]
pub unsafe extern "C" fn keel_embed(
    engine: *const keel_engine,
    model: *const c_char,
    texts: *const *const c_char,
    lengths: *const usize,
    n_texts: usize,
    request: *const keel_request_params,
    out: *mut *mut keel_embeddings,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        out.set(handle::insert(embed(
            engine, model, texts, lengths, n_texts, request,
        )?));
        Ok(())
    })
}

/// Embeds `n_texts` texts on the one prediction path, with a request id, a routing key, and the
/// metadata of the answer in the result (`keel_embeddings_request_id`, `keel_embeddings_route`,
/// `keel_embeddings_model_id`).
///
/// On an engine with a store (`keel_engine_params.storage_path`), `model` goes through the
/// version layer: `NAME` (its `production` alias, or the canary for the canary's share of the
/// routing keys), `NAME@ALIAS`, or a registered version id; the version is loaded on first use,
/// and a lineage record of the request is written in the background (`keel_lineage_show`). On an
/// engine without a store, `model` is a version id or an alias of `keel_model_alias`, as for
/// `keel_embed`, and no lineage is kept.
///
/// `texts`, `lengths` and `n_texts` are as for `keel_embed`. `info` may be NULL: a generated
/// request id, no routing key, the default controls (see `keel_request_info`).
///
/// On success `*out` holds the result, owned by the caller (free it with
/// `keel_embeddings_free`). On failure `*out` is NULL and `*err` (if `err` is not NULL) holds the
/// error: as for `keel_embed`, plus `KEEL_ERR_INVALID_ARGUMENT` for an empty or non-UTF-8
/// `info.request_id` or `info.key`; `KEEL_ERR_NOT_FOUND` for an unknown name, alias or version;
/// `KEEL_ERR_INVALID_MODEL` for a registered version whose files changed since it was registered;
/// `KEEL_ERR_STORAGE` when the store fails; `KEEL_ERR_REVIEW` when the version's `[review]`
/// policy blocks the prediction or holds it for a reviewer (an engine with a store; the message
/// names the ticket); `KEEL_ERR_BUDGET` when the budget of the routing key (`info.key`, "" for
/// none) cannot pay for the request and does not downgrade (`keel_budget_set`).
///
/// # Safety
/// As for `keel_embed`; `info` is NULL or points to a `keel_request_info` whose pointers are NULL
/// or valid as documented there.
///
/// Thread safety: may be called concurrently with any call on the same engine, also with route
/// changes (`keel_registry_*`): a request keeps the version it was routed to until it is
/// answered.
#[no_mangle]
pub unsafe extern "C" fn keel_infer_embed(
    engine: *const keel_engine,
    model: *const c_char,
    texts: *const *const c_char,
    lengths: *const usize,
    n_texts: usize,
    info: *const keel_request_info,
    out: *mut *mut keel_embeddings,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let model = guard::c_str(model, "model")?;
        let texts = texts_of(texts, lengths, n_texts)?;
        let input = Input::Embed(texts.into_iter().map(str::to_string).collect());
        let request = infer_request_of(model, input, info)?;
        out.set(handle::insert(embeddings_of(engine.infer(request)?)?));
        Ok(())
    })
}

/// `keel_embed` into a buffer of the caller's: writes the `n_texts` vectors one after the other
/// (row-major) into `out[0 .. n_texts * dim]`, and the dimension into `*out_dim` if `out_dim` is
/// not NULL.
///
/// `out_len` is the number of floats `out` can hold. On failure `*out_dim` is 0 and `out` is not
/// written, except that when `out_len` is too short for the result the call fails with
/// `KEEL_ERR_INVALID_ARGUMENT` and `*out_dim` holds the dimension, so that the caller can size the
/// buffer (`n_texts * dim` floats) and call again. Other errors as for `keel_embed`.
///
/// # Safety
/// As for `keel_embed`; `out` points to `out_len` writable floats; `out_dim` is NULL or points to
/// a writable `size_t`.
///
/// Thread safety: may be called concurrently with any call on the same engine.
#[no_mangle]
pub unsafe extern "C" fn keel_embed_into(
    engine: *const keel_engine,
    model: *const c_char,
    texts: *const *const c_char,
    lengths: *const usize,
    n_texts: usize,
    request: *const keel_request_params,
    out: *mut f32,
    out_len: usize,
    out_dim: *mut usize,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out_dim = Out::clear_optional(out_dim, 0);
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        if out_len < n_texts {
            // Every vector has at least one float: fail before running the model.
            return Err(Failure::invalid(format!(
                "out_len is {out_len} floats, too short for {n_texts} embeddings"
            )));
        }
        let embeddings = embed(engine, model, texts, lengths, n_texts, request)?;
        let dim = embeddings.dim;
        let needed = dim * embeddings.count;
        if out_len < needed {
            if let Some(out_dim) = out_dim {
                out_dim.set(dim);
            }
            return Err(Failure::invalid(format!(
                "out_len is {out_len} floats, but {n_texts} embeddings of dimension {dim} need {needed}"
            )));
        }
        std::slice::from_raw_parts_mut(out, needed).copy_from_slice(&embeddings.data);
        if let Some(out_dim) = out_dim {
            out_dim.set(dim);
        }
        Ok(())
    })
}

/// Looks an embeddings handle up and reads one of its fields.
fn read<T>(emb: *const keel_embeddings, fallback: T, field: impl FnOnce(&EmbeddingsObject) -> T) -> T {
    guard::value(fallback, || {
        handle::get::<EmbeddingsObject>(emb, "embeddings")
            .ok()
            .map(|e| field(&e))
    })
}

/// The number of vectors (the number of texts embedded); 0 if `emb` is NULL or not a live
/// `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_count(emb: *const keel_embeddings) -> usize {
    read(emb, 0, |e| e.count)
}

/// The number of floats in each vector (384 for all-MiniLM-L6-v2); 0 if `emb` is NULL or not a
/// live `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_dim(emb: *const keel_embeddings) -> usize {
    read(emb, 0, |e| e.dim)
}

/// All the vectors, one after the other: `count * dim` floats, vector `i` at `data + i * dim`.
/// Owned by `emb`, valid until `keel_embeddings_free(emb)`; NULL if `emb` is NULL or not a live
/// `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_data(emb: *const keel_embeddings) -> *const f32 {
    read(emb, std::ptr::null(), |e| e.data.as_ptr())
}

/// Vector `i` (`dim` floats), owned by `emb`, valid until `keel_embeddings_free(emb)`; NULL if `i`
/// is out of range or `emb` is NULL or not a live `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_vector(emb: *const keel_embeddings, i: usize) -> *const f32 {
    read(emb, std::ptr::null(), |e| {
        if i < e.count {
            e.data[i * e.dim..].as_ptr()
        } else {
            std::ptr::null()
        }
    })
}

/// The version id of the model that computed the vectors (64 hex digits), owned by `emb`, valid
/// until `keel_embeddings_free(emb)`; NULL if `emb` is NULL or not a live `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_model_id(emb: *const keel_embeddings) -> *const c_char {
    read(emb, std::ptr::null(), |e| e.version.as_ptr())
}

/// The id of the request that computed the vectors (the caller's `info.request_id`, or the one
/// the library made): the key of its lineage record. Owned by `emb`, valid until
/// `keel_embeddings_free(emb)`; NULL if `emb` is NULL or not a live `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_request_id(emb: *const keel_embeddings) -> *const c_char {
    read(emb, std::ptr::null(), |e| {
        e.request_id.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
    })
}

/// The route the version layer chose for the request: "production", "canary", the alias the
/// caller named (`NAME@ALIAS`), or "direct" (a version id). Owned by `emb`, valid until
/// `keel_embeddings_free(emb)`; NULL for a result computed on an engine without a
/// `storage_path`, or if `emb` is NULL or not a live `keel_embeddings`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_embeddings_route(emb: *const keel_embeddings) -> *const c_char {
    read(emb, std::ptr::null(), |e| {
        e.route.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
    })
}

/// Frees an embeddings result. NULL is ignored; so is a handle that is not a live
/// `keel_embeddings` (a double free is detected and does nothing).
///
/// Thread safety: may be called from any thread; a result must be freed once.
#[no_mangle]
pub extern "C" fn keel_embeddings_free(emb: *mut keel_embeddings) {
    guard::value((), || {
        handle::remove::<EmbeddingsObject>(emb);
        Some(())
    })
}
