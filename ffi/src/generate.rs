//! Text generation: streamed to a callback, collected into a library-owned completion, or both.

use crate::engine::{engine_of, keel_engine};
use crate::guard::{self, Out};
use crate::handle::{self, Handle};
use crate::request::{infer_request_of, keel_request_info, keel_request_params, request_of, route_of};
use crate::status::{keel_error, keel_status, Failure};
use crate::string::c_string;
use keel::{FinishReason, GenerateParams, InferRequest, Input, Output};
use std::ffi::{c_char, c_void, CString};

/// How to generate. Get the defaults from `keel_generate_default_params()` and change the fields
/// you care about.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct keel_generate_params {
    /// Most tokens to generate (fewer if the model ends its reply or the context is full).
    /// Default: 256.
    pub max_tokens: u32,
    /// 0 for greedy decoding (always the most likely token); above 0, seeded random sampling at
    /// this temperature. Must be finite and not negative. Default: 0.
    pub temperature: f32,
    /// When sampling: keep only the `top_k` most likely tokens (0: no limit). Default: 0.
    pub top_k: u32,
    /// When sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`, in (0, 1] (1: all). Default: 1.
    pub top_p: f32,
    /// When sampling: the seed; the same seed, prompt and parameters give the same tokens.
    /// Default: 0.
    pub seed: u64,
    /// Wrap the prompt in the model's chat template as one user turn (true), or feed it as is
    /// (false). Default: true.
    pub chat: bool,
    /// With `chat`: the system turn of the template, NUL-terminated UTF-8, borrowed for the call;
    /// NULL for the model's own default. Default: NULL.
    pub system: *const c_char,
}

/// Receives each token as it is generated, on the thread that called `keel_generate`.
///
/// `user_data` is the pointer given to `keel_generate`. `token_id` is the token's id in the
/// model's vocabulary. `text` is the text the token completes (`text_len` bytes of UTF-8, followed
/// by a NUL), owned by the library and valid only during the callback; it is empty while a
/// multi-byte character spans several tokens (the character comes with the token that finishes
/// it). Return true to go on, false to stop: the generation then ends with
/// `KEEL_FINISH_CANCELLED` and frees its state.
///
/// The callback may call other keel functions (also on the same engine). It must not unwind
/// (C++ exceptions, longjmp) through the library.
pub type keel_token_callback = Option<
    unsafe extern "C" fn(user_data: *mut c_void, token_id: u32, text: *const c_char, text_len: usize) -> bool,
>;

/// Why a generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum keel_finish_reason {
    /// The model ended its reply (the end-of-turn token is not part of the output).
    KEEL_FINISH_STOP = 0,
    /// `max_tokens` tokens were generated.
    KEEL_FINISH_LENGTH = 1,
    /// The context window is full.
    KEEL_FINISH_CONTEXT_FULL = 2,
    /// The token callback returned false.
    KEEL_FINISH_CANCELLED = 3,
}

use keel_finish_reason::*;

/// A finished generation, returned by `keel_generate` and `keel_infer_generate`: the generated
/// text and token ids, why it ended, and how it was made. Free it
/// with `keel_completion_free`. Immutable: may be read from any number of threads at once.
pub struct keel_completion {
    _opaque: [u8; 0],
}

/// What a `keel_completion` handle stands for.
pub(crate) struct CompletionObject {
    /// The text, then a NUL.
    text: Vec<u8>,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    finish: keel_finish_reason,
    request_id: Option<CString>,
    /// Set on an engine with a store.
    route: Option<CString>,
    version: Option<CString>,
}

impl Handle for CompletionObject {
    type C = keel_completion;
    const NAME: &'static str = "keel_completion";
}

/// The default generation parameters: greedy, at most 256 tokens, with the chat template.
///
/// Thread safety: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn keel_generate_default_params() -> keel_generate_params {
    keel_generate_params {
        max_tokens: 256,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        chat: true,
        system: std::ptr::null(),
    }
}

/// The Rust parameters of a caller's.
///
/// # Safety
/// `p.system` is NULL or NUL-terminated.
unsafe fn params_of(p: &keel_generate_params) -> Result<GenerateParams, Failure> {
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return Err(Failure::invalid(format!(
            "temperature {} must be finite and >= 0",
            p.temperature
        )));
    }
    let mut params = if p.temperature == 0.0 {
        GenerateParams::greedy()
    } else {
        GenerateParams::sampled(p.temperature, p.top_k as usize, p.top_p, p.seed)
    };
    params.max_tokens = p.max_tokens as usize;
    params.chat = p.chat;
    if !p.system.is_null() {
        params = params.system_prompt(guard::c_str(p.system, "params.system")?);
    }
    // The engine checks the rest (top_p's range) and says what is wrong.
    Ok(params)
}

/// Generates a reply to `prompt` with the decoder `model`, streamed through the engine's layers
/// as `keel_infer_generate`'s reply is (contract, metrics, price per token; with a store, `NAME`
/// routing, review and a lineage record), with a generated request id and no routing key.
/// `model` is a version id or an alias of `keel_model_alias`, or, on an engine with a store, a
/// registered `NAME` or `NAME@ALIAS`. A generation its callback cancels is charged, counted
/// and recorded with what it generated.
///
/// Each token is passed to `on_token` (if not NULL) as soon as it is made; the callback can stop
/// the generation. When `out` is not NULL, `*out` receives the whole completion at the end (also
/// after a cancel). Pass a callback, an `out`, or both.
///
/// `prompt` is NUL-terminated UTF-8, read during the call only. `params` may be NULL for the
/// defaults (greedy, 256 tokens, chat template); `request` may be NULL for the default controls.
/// The generation joins the model's running batch (continuous batching with the other
/// generations in flight); a deadline in `request` bounds its wait in the queue.
///
/// On success `*out` (if `out` is not NULL) holds a completion owned by the caller (free it with
/// `keel_completion_free`). On failure `*out` is NULL and `*err` (if `err` is not NULL) holds the
/// error: `KEEL_ERR_INVALID_ARGUMENT` for NULL or stale arguments, invalid UTF-8, an empty prompt,
/// a prompt that does not fit in the context, bad sampling parameters or a model that is not a
/// decoder; `KEEL_ERR_NOT_FOUND` for an unknown model; `KEEL_ERR_OVERLOADED` when the model's
/// queue is full; `KEEL_ERR_DEADLINE` when the deadline passed while queued;
/// `KEEL_ERR_SHUTTING_DOWN` after `keel_engine_shutdown`. A failure after some tokens were
/// streamed (a shutdown, a backend error) also returns no completion.
///
/// # Safety
/// `model` and `prompt` are NULL or NUL-terminated; `params` is NULL or points to a
/// `keel_generate_params` (whose `system` is NULL or NUL-terminated); `request` is NULL or points
/// to a `keel_request_params`; `on_token` is NULL or a function as described at
/// `keel_token_callback`; `out` is NULL or points to a writable `keel_completion *`; `err` is NULL
/// or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine; each call
/// generates on its own state.
#[no_mangle]
pub unsafe extern "C" fn keel_generate(
    engine: *const keel_engine,
    model: *const c_char,
    prompt: *const c_char,
    params: *const keel_generate_params,
    request: *const keel_request_params,
    on_token: keel_token_callback,
    user_data: *mut c_void,
    out: *mut *mut keel_completion,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear_optional(out, std::ptr::null_mut());
        let engine = engine_of(engine)?;
        let model = guard::c_str(model, "model")?;
        let prompt = guard::c_str(prompt, "prompt")?;
        let params = params
            .as_ref()
            .copied()
            .unwrap_or_else(|| keel_generate_default_params());
        let params = params_of(&params)?;
        let request = request_of(request)?;
        let request = InferRequest::generate(model, prompt, params).options(request);
        let mut stream = engine.infer_stream(request)?;
        let mut cancelled = false;
        // One buffer for the callback's NUL-terminated token text, reused for every token.
        let mut token_text = Vec::new();
        for token in &mut stream {
            let token = token?;
            if let Some(on_token) = on_token {
                token_text.clear();
                token_text.extend_from_slice(token.text.as_bytes());
                token_text.push(0);
                let go_on = on_token(user_data, token.id, token_text.as_ptr().cast(), token.text.len());
                if !go_on {
                    cancelled = true;
                    break;
                }
            }
        }
        // Cancelling frees the generation's KV cache now; every layer settles it.
        let answer = if cancelled {
            stream.cancel()
        } else {
            stream.finish()
        }?;
        if let Some(out) = out {
            let mut completion = completion_of(answer)?;
            if cancelled {
                // As the callback said, whatever the layers had already run (a reply a review
                // policy holds runs to its end before its first token is given out).
                completion.finish = KEEL_FINISH_CANCELLED;
            }
            out.set(handle::insert(completion));
        }
        Ok(())
    })
}

/// The result object of a generation's answer.
fn completion_of(answer: keel::InferResponse) -> Result<CompletionObject, Failure> {
    let Output::Completion(completion) = answer.output else {
        return Err(Failure::internal(
            "a generation request was answered with another output",
        ));
    };
    let meta = answer.meta;
    let mut text = completion.text.into_bytes();
    text.push(0);
    Ok(CompletionObject {
        text,
        tokens: completion.token_ids,
        prompt_tokens: completion.prompt_ids.len(),
        finish: match completion.finish {
            FinishReason::Stop => KEEL_FINISH_STOP,
            FinishReason::Length => KEEL_FINISH_LENGTH,
            FinishReason::ContextFull => KEEL_FINISH_CONTEXT_FULL,
            FinishReason::Cancelled => KEEL_FINISH_CANCELLED,
        },
        request_id: Some(c_string(meta.request_id.as_str())),
        route: route_of(&meta),
        version: Some(c_string(meta.version.as_str())),
    })
}

/// Generates a reply to `prompt` on the one prediction path, to its end, with a request id, a
/// routing key, and the metadata of the answer in the completion
/// (`keel_completion_request_id`, `keel_completion_route`, `keel_completion_model_id`). No
/// streaming and no cancel: use `keel_generate` for those.
///
/// `model` is addressed as for `keel_infer_embed`: through the version layer (`NAME`,
/// `NAME@ALIAS`, a version id; a lineage record is written) on an engine with a store, else a
/// version id or an alias of `keel_model_alias`. `prompt` and `params` are as for
/// `keel_generate`; `info` may be NULL (see `keel_request_info`).
///
/// On success `*out` holds a completion owned by the caller (free it with
/// `keel_completion_free`). On failure `*out` is NULL and `*err` (if `err` is not NULL) holds the
/// error: as for `keel_generate`, plus those of `keel_infer_embed`'s store and request info.
///
/// # Safety
/// `model` and `prompt` are NULL or NUL-terminated; `params` is NULL or points to a
/// `keel_generate_params` (whose `system` is NULL or NUL-terminated); `info` is NULL or points to a
/// `keel_request_info` whose pointers are NULL or valid as documented there; `out` points to a
/// writable `keel_completion *`; `err` is NULL or points to a writable `keel_error *`.
///
/// Thread safety: may be called concurrently with any call on the same engine, also with route
/// changes: a request keeps the version it was routed to until it is answered.
#[no_mangle]
pub unsafe extern "C" fn keel_infer_generate(
    engine: *const keel_engine,
    model: *const c_char,
    prompt: *const c_char,
    params: *const keel_generate_params,
    info: *const keel_request_info,
    out: *mut *mut keel_completion,
    err: *mut *mut keel_error,
) -> keel_status {
    guard::call(err, || {
        let out = Out::clear(out, "out", std::ptr::null_mut())?;
        let engine = engine_of(engine)?;
        let model = guard::c_str(model, "model")?;
        let prompt = guard::c_str(prompt, "prompt")?;
        let params = params
            .as_ref()
            .copied()
            .unwrap_or_else(|| keel_generate_default_params());
        let input = Input::Generate {
            prompt: prompt.to_string(),
            params: params_of(&params)?,
        };
        let request = infer_request_of(model, input, info)?;
        out.set(handle::insert(completion_of(engine.infer(request)?)?));
        Ok(())
    })
}

/// Looks a completion handle up and reads one of its fields.
fn read<T>(c: *const keel_completion, fallback: T, field: impl FnOnce(&CompletionObject) -> T) -> T {
    guard::value(fallback, || {
        handle::get::<CompletionObject>(c, "completion")
            .ok()
            .map(|c| field(&c))
    })
}

/// The generated text, NUL-terminated UTF-8, owned by `c`, valid until
/// `keel_completion_free(c)`; NULL if `c` is NULL or not a live `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_text(c: *const keel_completion) -> *const c_char {
    read(c, std::ptr::null(), |c| c.text.as_ptr().cast())
}

/// The length of the generated text in bytes, without the NUL; 0 if `c` is NULL or not a live
/// `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_text_len(c: *const keel_completion) -> usize {
    read(c, 0, |c| c.text.len() - 1)
}

/// The number of generated tokens; 0 if `c` is NULL or not a live `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_token_count(c: *const keel_completion) -> usize {
    read(c, 0, |c| c.tokens.len())
}

/// The generated token ids (`keel_completion_token_count(c)` of them), owned by `c`, valid until
/// `keel_completion_free(c)`; NULL if there are none or `c` is NULL or not a live
/// `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_tokens(c: *const keel_completion) -> *const u32 {
    read(c, std::ptr::null(), |c| {
        if c.tokens.is_empty() {
            std::ptr::null()
        } else {
            c.tokens.as_ptr()
        }
    })
}

/// The number of tokens of the prompt (after the chat template); 0 if `c` is NULL or not a live
/// `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_prompt_token_count(c: *const keel_completion) -> usize {
    read(c, 0, |c| c.prompt_tokens)
}

/// Why the generation ended; `KEEL_FINISH_STOP` if `c` is NULL or not a live `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_finish_reason(c: *const keel_completion) -> keel_finish_reason {
    read(c, KEEL_FINISH_STOP, |c| c.finish)
}

/// The id of the request that made the completion (the caller's `info.request_id`, or the one
/// the library made): the key of its lineage record. Owned by `c`, valid until
/// `keel_completion_free(c)`; NULL if `c` is NULL or not a live `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_request_id(c: *const keel_completion) -> *const c_char {
    read(c, std::ptr::null(), |c| {
        c.request_id.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
    })
}

/// The route the version layer chose ("production", "canary", the alias named, "direct"), as
/// for `keel_embeddings_route`. Owned by `c`, valid until `keel_completion_free(c)`; NULL for a
/// completion made on an engine without a `storage_path`, or if `c` is NULL or not a live
/// `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_route(c: *const keel_completion) -> *const c_char {
    read(c, std::ptr::null(), |c| {
        c.route.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
    })
}

/// The version id of the model that made the completion (64 hex digits). Owned by `c`, valid
/// until `keel_completion_free(c)`; NULL if `c` is NULL or not a live `keel_completion`.
///
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn keel_completion_model_id(c: *const keel_completion) -> *const c_char {
    read(c, std::ptr::null(), |c| {
        c.version.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
    })
}

/// Frees a completion. NULL is ignored; so is a handle that is not a live `keel_completion` (a
/// double free is detected and does nothing).
///
/// Thread safety: may be called from any thread; a completion must be freed once.
#[no_mangle]
pub extern "C" fn keel_completion_free(c: *mut keel_completion) {
    guard::value((), || {
        handle::remove::<CompletionObject>(c);
        Some(())
    })
}
