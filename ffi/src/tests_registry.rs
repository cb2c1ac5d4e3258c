//! The version layer through the C ABI: an engine with a store, the registry calls, canary
//! routing by key, request ids and routes on results, lineage lookups and replay, and the codes
//! of their misuse. Model numerics need release mode: `cargo test --release -p keel-ffi`.

use crate::embed::*;
use crate::engine::*;
use crate::generate::*;
use crate::lineage::*;
use crate::model::*;
use crate::registry::*;
use crate::request::*;
use crate::status::keel_status::*;
use crate::status::*;
use crate::string::*;
use crate::tests::{bits, c, embed, expect, id_of, junk, load, minilm, new_engine, ok, path, smollm2};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A folder of its own under the system's temporary folder, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keel-ffi-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn store_engine(folder: &Path) -> *mut keel_engine {
    let folder = path(folder);
    let params = keel_engine_params {
        storage_path: folder.as_ptr(),
        ..keel_engine_default_params()
    };
    let mut engine = junk();
    ok(|err| unsafe { keel_engine_new(&params, &mut engine, err) });
    engine
}

/// Reads and frees a string.
pub(crate) fn take_string(s: *mut keel_string) -> String {
    assert!(!s.is_null());
    let text = unsafe { CStr::from_ptr(keel_string_data(s)) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(text.len(), keel_string_len(s));
    keel_string_free(s);
    text
}

pub(crate) fn json(s: *mut keel_string) -> serde_json::Value {
    serde_json::from_str(&take_string(s)).unwrap()
}

fn opt_str(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_string())
}

pub(crate) fn register(
    engine: *const keel_engine,
    name: &str,
    model: &Path,
    weights: keel_weights,
    retain: bool,
) -> String {
    let mut id = junk();
    ok(|err| unsafe {
        keel_registry_register(
            engine,
            c(name).as_ptr(),
            path(model).as_ptr(),
            weights,
            retain,
            &mut id,
            err,
        )
    });
    take_string(id)
}

pub(crate) fn alias(engine: *const keel_engine, name: &str, alias: &str, version: &str) {
    ok(|err| unsafe {
        keel_registry_alias(
            engine,
            c(name).as_ptr(),
            c(alias).as_ptr(),
            c(version).as_ptr(),
            c"first release".as_ptr(),
            err,
        )
    });
}

/// An answer of `keel_infer_embed` and its metadata.
struct Answer {
    vectors: Vec<Vec<f32>>,
    request_id: String,
    route: Option<String>,
    version: String,
}

fn infer(
    engine: *const keel_engine,
    model: &str,
    texts: &[&str],
    id: Option<&str>,
    key: Option<&str>,
) -> Answer {
    let owned: Vec<CString> = texts.iter().map(|t| c(t)).collect();
    let pointers: Vec<*const c_char> = owned.iter().map(|t| t.as_ptr()).collect();
    let (id, key) = (id.map(c), key.map(c));
    let info = keel_request_info {
        request_id: id.as_ref().map_or(null(), |s| s.as_ptr()),
        key: key.as_ref().map_or(null(), |s| s.as_ptr()),
        ..keel_request_default_info()
    };
    let mut emb = junk();
    ok(|err| unsafe {
        keel_infer_embed(
            engine,
            c(model).as_ptr(),
            pointers.as_ptr(),
            null(),
            texts.len(),
            &info,
            &mut emb,
            err,
        )
    });
    let (count, dim) = (keel_embeddings_count(emb), keel_embeddings_dim(emb));
    let data = unsafe { std::slice::from_raw_parts(keel_embeddings_data(emb), count * dim) };
    let answer = Answer {
        vectors: data.chunks(dim).map(<[f32]>::to_vec).collect(),
        request_id: opt_str(keel_embeddings_request_id(emb)).expect("a request id"),
        route: opt_str(keel_embeddings_route(emb)),
        version: opt_str(keel_embeddings_model_id(emb)).unwrap(),
    };
    keel_embeddings_free(emb);
    answer
}

fn show(engine: *const keel_engine, request_id: &str) -> serde_json::Value {
    let mut out = junk();
    ok(|err| unsafe { keel_lineage_show(engine, c(request_id).as_ptr(), &mut out, err) });
    json(out)
}

fn history(engine: *const keel_engine, name: &str) -> Vec<serde_json::Value> {
    let mut out = junk();
    ok(|err| unsafe { keel_registry_history(engine, c(name).as_ptr(), &mut out, err) });
    json(out).as_array().unwrap().clone()
}

fn production_of(engine: *const keel_engine, name: &str) -> Option<String> {
    let mut out = junk();
    ok(|err| unsafe { keel_registry_list(engine, &mut out, err) });
    let listed = json(out);
    listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name && v["aliases"].as_array().unwrap().iter().any(|a| a == "production"))
        .map(|v| v["version"].as_str().unwrap().to_string())
}

#[test]
fn register_canary_promote_and_rollback_with_lineage() {
    let dir = TempDir::new("canary");
    let engine = store_engine(&dir.0);
    let v1 = register(engine, "embed", &minilm(), KEEL_WEIGHTS_F32, true);
    let v2 = register(engine, "embed", &minilm(), KEEL_WEIGHTS_INT8, true);
    assert_eq!(v1.len(), 64);
    assert_ne!(v1, v2);
    // Registering the same bytes with the same weights again is the same version.
    assert_eq!(register(engine, "embed", &minilm(), KEEL_WEIGHTS_F32, true), v1);
    // Registration does not load anything.
    let mut models = junk();
    ok(|err| unsafe { keel_engine_models(engine, &mut models, err) });
    assert_eq!(json(models), serde_json::json!([]));

    let mut out = junk();
    ok(|err| unsafe { keel_registry_list(engine, &mut out, err) });
    let listed = json(out);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (id, weights) in [(&v1, "f32"), (&v2, "int8")] {
        let v = listed.iter().find(|v| v["version"] == id.as_str()).unwrap();
        assert_eq!(v["weights"], weights);
        assert_eq!(v["name"], "embed");
        assert_eq!(v["architecture"], "bert");
        assert_eq!(v["aliases"], serde_json::json!([]));
        assert_eq!(v["retain_input"], true);
        assert!(v["path"].as_str().unwrap().ends_with("model"), "{v}");
    }

    alias(engine, "embed", "production", &v1);
    let text = ["Canary traffic is sticky by routing key."];
    let first = infer(engine, "embed", &text, Some("req-production"), Some("tenant-0"));
    assert_eq!(first.request_id, "req-production");
    assert_eq!(first.route.as_deref(), Some("production"));
    assert_eq!(first.version, v1);
    // The f32 version's vectors are the engine's for that version id, bit for bit.
    assert_eq!(bits(&first.vectors), bits(&embed(engine, &c(&v1), &text)));

    // A 50% canary (by an 8-digit prefix of its id), sticky by key.
    ok(|err| unsafe {
        keel_registry_canary(
            engine,
            c"embed".as_ptr(),
            c(&v2[..8]).as_ptr(),
            50.0,
            false,
            c"try int8".as_ptr(),
            err,
        )
    });
    let mut by_route = std::collections::BTreeMap::<String, Vec<String>>::new();
    for i in 0..24 {
        let key = format!("tenant-{i}");
        let id = format!("req-{i}");
        let answer = infer(engine, "embed", &text, Some(&id), Some(&key));
        assert_eq!(answer.request_id, id);
        let canary = keel::version::bucket_of("embed", &key) < 5_000;
        let route = answer.route.unwrap();
        assert_eq!(route, if canary { "canary" } else { "production" }, "{key}");
        assert_eq!(&answer.version, if canary { &v2 } else { &v1 }, "{key}");
        // The same key again goes the same way.
        let again = infer(engine, "embed", &text, None, Some(&key));
        assert_eq!(again.route.as_deref(), Some(route.as_str()));
        assert_ne!(again.request_id, id);
        by_route.entry(route).or_default().push(id);
    }
    assert!(
        by_route.contains_key("canary") && by_route.contains_key("production"),
        "{by_route:?}"
    );

    // The lineage record names the version that answered, the route, the key.
    let on_canary = &by_route["canary"][0];
    let record = show(engine, on_canary);
    assert_eq!(record["request_id"], on_canary.as_str());
    assert_eq!(record["version"], v2.as_str());
    assert_eq!(record["route"], "canary");
    assert_eq!(record["model"], "embed");
    assert_eq!(record["addressed"], "embed");
    assert_eq!(record["weights"], "int8");
    assert_eq!(record["backend"], "cpu");
    let n: usize = on_canary.trim_start_matches("req-").parse().unwrap();
    assert_eq!(record["key"], format!("tenant-{n}"));
    assert!(
        record["route_reason"].as_str().unwrap().contains("50% split"),
        "{record}"
    );
    let record = show(engine, &by_route["production"][0]);
    assert_eq!(record["version"], v1.as_str());
    assert_eq!(record["route"], "production");
    // A generated request id (a UUIDv7) finds its record too.
    let generated = infer(engine, "embed", &text, None, None);
    assert_eq!(generated.request_id.len(), 36);
    assert_eq!(
        show(engine, &generated.request_id)["request_id"],
        generated.request_id.as_str()
    );

    // NAME@ALIAS and a version id.
    let named = infer(engine, "embed@canary", &text, None, Some("tenant-0"));
    assert_eq!(
        (named.route.as_deref(), named.version.as_str()),
        (Some("canary"), v2.as_str())
    );
    let direct = infer(engine, &v1, &text, None, None);
    assert_eq!(
        (direct.route.as_deref(), direct.version.as_str()),
        (Some("direct"), v1.as_str())
    );

    // Replay: the recorded output, bit for bit (inputs were retained).
    for id in [on_canary, &by_route["production"][0]] {
        let mut identical = false;
        ok(|err| unsafe { keel_lineage_replay(engine, c(id).as_ptr(), &mut identical, err) });
        assert!(identical, "{id}");
    }
    ok(|err| unsafe { keel_lineage_flush(engine, err) });
    let mut recent = junk();
    ok(|err| unsafe { keel_lineage_recent(engine, 3, &mut recent, err) });
    let recent = json(recent);
    assert_eq!(recent.as_array().unwrap().len(), 3);
    assert_eq!(recent[0]["request_id"], direct.request_id.as_str());

    // Promote: the canary takes all the traffic.
    ok(|err| unsafe { keel_registry_promote(engine, c"embed".as_ptr(), c"int8 is good".as_ptr(), err) });
    assert_eq!(production_of(engine, "embed").as_deref(), Some(v2.as_str()));
    for i in 0..6 {
        let answer = infer(engine, "embed", &text, None, Some(&format!("tenant-{i}")));
        assert_eq!(
            (answer.route.as_deref(), answer.version.as_str()),
            (Some("production"), v2.as_str())
        );
    }
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_infer_embed(
            engine,
            c"embed@canary".as_ptr(),
            [c"x".as_ptr()].as_ptr(),
            null(),
            1,
            null(),
            &mut junk(),
            err,
        )
    });
    // Rollback: production returns to the version it replaced (NULL reason).
    ok(|err| unsafe { keel_registry_rollback(engine, c"embed".as_ptr(), null(), err) });
    assert_eq!(production_of(engine, "embed").as_deref(), Some(v1.as_str()));
    assert_eq!(infer(engine, "embed", &text, None, Some("tenant-1")).version, v1);

    // The history, oldest first.
    let events = history(engine, "embed");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let moves: Vec<(String, Option<String>, Option<String>)> = events
        .iter()
        .map(|e| {
            let id = |v: &serde_json::Value| v.as_str().map(str::to_string);
            (
                e["alias"].as_str().unwrap().to_string(),
                id(&e["from"]),
                id(&e["to"]),
            )
        })
        .collect();
    let (s1, s2) = (Some(v1.clone()), Some(v2.clone()));
    let production =
        |from: &Option<String>, to: &Option<String>| ("production".to_string(), from.clone(), to.clone());
    assert_eq!(moves[0], production(&None, &s1));
    assert_eq!(moves[1], ("canary".to_string(), None, s2.clone()));
    // The promotion is one step of two moves (canary cleared, production moved).
    let mut promotion = moves[2..4].to_vec();
    promotion.sort();
    assert_eq!(
        promotion,
        [("canary".to_string(), s2.clone(), None), production(&s1, &s2)]
    );
    assert_eq!(moves[4], production(&s2, &s1));
    assert_eq!(moves.len(), 5, "{events:?}");
    let reasons: Vec<&str> = events.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons[0], "alias: first release");
    assert_eq!(reasons[1], "canary 50% split: try int8");
    assert_eq!(reasons[2], "promote: int8 is good");
    assert_eq!(reasons[4], "rollback: (no reason given)");
    keel_engine_free(engine);

    // The store outlives the engine: a new engine on the folder sees the routes and the records.
    let engine = store_engine(&dir.0);
    assert_eq!(production_of(engine, "embed").as_deref(), Some(v1.as_str()));
    assert_eq!(show(engine, on_canary)["version"], v2.as_str());
    assert_eq!(history(engine, "embed").len(), 5);
    keel_engine_free(engine);
}

#[test]
fn generation_through_the_version_layer_equals_keel_generate() {
    let dir = TempDir::new("generate");
    let engine = store_engine(&dir.0);
    let version = register(engine, "chat", &smollm2(), KEEL_WEIGHTS_QUANTIZED, false);
    alias(engine, "chat", "production", &version);
    let params = keel_generate_params {
        max_tokens: 8,
        ..keel_generate_default_params()
    };
    let info = keel_request_info {
        request_id: c"gen-1".as_ptr(),
        key: c"user-9".as_ptr(),
        ..keel_request_default_info()
    };
    let mut completion = junk();
    ok(|err| unsafe {
        keel_infer_generate(
            engine,
            c"chat".as_ptr(),
            c"What is the capital of France?".as_ptr(),
            &params,
            &info,
            &mut completion,
            err,
        )
    });
    assert_eq!(
        opt_str(keel_completion_request_id(completion)).as_deref(),
        Some("gen-1")
    );
    assert_eq!(
        opt_str(keel_completion_route(completion)).as_deref(),
        Some("production")
    );
    assert_eq!(
        opt_str(keel_completion_model_id(completion)).as_deref(),
        Some(version.as_str())
    );
    let n = keel_completion_token_count(completion);
    assert!(n > 0 && n <= 8);
    let tokens = unsafe { std::slice::from_raw_parts(keel_completion_tokens(completion), n) }.to_vec();
    let text = opt_str(keel_completion_text(completion)).unwrap();
    let prompt_tokens = keel_completion_prompt_token_count(completion);
    assert!(prompt_tokens > 0);
    keel_completion_free(completion);

    // The same greedy generation through keel_generate, by version id: the same tokens.
    let mut plain = junk();
    ok(|err| unsafe {
        keel_generate(
            engine,
            c(&version).as_ptr(),
            c"What is the capital of France?".as_ptr(),
            &params,
            null(),
            None,
            null_mut(),
            &mut plain,
            err,
        )
    });
    let m = keel_completion_token_count(plain);
    assert_eq!(
        unsafe { std::slice::from_raw_parts(keel_completion_tokens(plain), m) },
        tokens
    );
    assert_eq!(opt_str(keel_completion_text(plain)).unwrap(), text);
    assert_eq!(keel_completion_prompt_token_count(plain), prompt_tokens);
    // keel_generate goes through the same layers: its completion says how it was made.
    assert!(!keel_completion_request_id(plain).is_null());
    assert_eq!(opt_str(keel_completion_route(plain)).as_deref(), Some("direct"));
    assert_eq!(
        opt_str(keel_completion_model_id(plain)).as_deref(),
        Some(version.as_str())
    );
    keel_completion_free(plain);

    let record = show(engine, "gen-1");
    assert_eq!(record["version"], version.as_str());
    assert_eq!(record["key"], "user-9");
    assert_eq!(record["route"], "production");
    // Its input was not retained: it cannot be replayed.
    let mut identical = true;
    let message = expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_lineage_replay(engine, c"gen-1".as_ptr(), &mut identical, err)
    });
    assert!(!identical);
    assert!(message.contains("not retained"), "{message}");
    keel_engine_free(engine);
}

#[test]
fn without_a_store_infer_goes_to_the_engine_and_registry_calls_are_refused() {
    let engine = new_engine();
    let model = load(engine, &minilm());
    let id = id_of(model);
    let texts = ["no store, no lineage"];
    let answer = infer(engine, id.to_str().unwrap(), &texts, Some("plain-1"), Some("k"));
    assert_eq!(answer.request_id, "plain-1");
    assert_eq!(answer.route, None);
    assert_eq!(answer.version, id.to_str().unwrap());
    assert_eq!(bits(&answer.vectors), bits(&embed(engine, &id, &texts)));
    // Results of keel_embed carry no request id or route.
    let mut emb = junk();
    ok(|err| unsafe {
        keel_embed(
            engine,
            id.as_ptr(),
            [c"x".as_ptr()].as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    // Without a store: a request id, no route.
    assert!(!keel_embeddings_request_id(emb).is_null() && keel_embeddings_route(emb).is_null());
    keel_embeddings_free(emb);
    // Accessors on NULL and stale handles.
    assert!(keel_embeddings_request_id(null()).is_null());
    assert!(keel_embeddings_route(junk()).is_null());
    assert!(keel_completion_request_id(null()).is_null());
    assert!(keel_completion_route(junk()).is_null());
    assert!(keel_completion_model_id(null()).is_null());

    let no_store = |message: String| assert!(message.contains("without a storage_path"), "{message}");
    let mut s = junk();
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_register(
            engine,
            c"embed".as_ptr(),
            path(&minilm()).as_ptr(),
            KEEL_WEIGHTS_F32,
            false,
            &mut s,
            err,
        )
    }));
    assert!(s.is_null());
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_alias(
            engine,
            c"embed".as_ptr(),
            c"production".as_ptr(),
            id.as_ptr(),
            null(),
            err,
        )
    }));
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_canary(engine, c"embed".as_ptr(), id.as_ptr(), 10.0, false, null(), err)
    }));
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_promote(engine, c"embed".as_ptr(), null(), err)
    }));
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_rollback(engine, c"embed".as_ptr(), null(), err)
    }));
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_abort_canary(engine, c"embed".as_ptr(), null(), err)
    }));
    s = junk();
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_list(engine, &mut s, err)
    }));
    assert!(s.is_null());
    s = junk();
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_history(engine, c"embed".as_ptr(), &mut s, err)
    }));
    assert!(s.is_null());
    s = junk();
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_show(engine, c"plain-1".as_ptr(), &mut s, err)
    }));
    assert!(s.is_null());
    s = junk();
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_recent(engine, 5, &mut s, err)
    }));
    assert!(s.is_null());
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_flush(engine, err)
    }));
    let mut identical = true;
    no_store(expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_replay(engine, c"plain-1".as_ptr(), &mut identical, err)
    }));
    assert!(!identical);
    keel_model_free(model);
    keel_engine_free(engine);
}

#[test]
fn registry_and_lineage_misuse_have_their_codes() {
    let name = |s: i32| unsafe { CStr::from_ptr(keel_status_name(s)) }.to_str().unwrap();
    assert_eq!(name(KEEL_ERR_STORAGE as i32), "KEEL_ERR_STORAGE");
    assert_eq!(crate::KEEL_ABI_VERSION, 2);

    // A store that cannot be opened: a folder under a regular file.
    let dir = TempDir::new("misuse");
    let file = dir.0.join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let under = path(&file.join("store"));
    let params = keel_engine_params {
        storage_path: under.as_ptr(),
        ..keel_engine_default_params()
    };
    let mut engine = junk();
    let message = expect(KEEL_ERR_STORAGE, |err| unsafe {
        keel_engine_new(&params, &mut engine, err)
    });
    assert!(engine.is_null());
    assert!(message.contains("a-file"), "{message}");
    // A file that is not a Keel store.
    let params = keel_engine_default_params();
    let not_a_store = TempDir::new("foreign");
    std::fs::write(not_a_store.0.join(keel::store::DATABASE_FILE), vec![7u8; 4096]).unwrap();
    let foreign = path(&not_a_store.0);
    let foreign_params = keel_engine_params {
        storage_path: foreign.as_ptr(),
        ..params
    };
    engine = junk();
    expect(KEEL_ERR_STORAGE, |err| unsafe {
        keel_engine_new(&foreign_params, &mut engine, err)
    });
    assert!(engine.is_null());
    // An empty path.
    let empty_params = keel_engine_params {
        storage_path: c"".as_ptr(),
        ..params
    };
    engine = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_engine_new(&empty_params, &mut engine, err)
    });
    assert!(engine.is_null());

    let store = dir.0.join("store");
    let engine = store_engine(&store);
    let nope = c"nope";
    let v1 = c(&register(engine, "embed", &minilm(), KEEL_WEIGHTS_F32, false));

    // Unknown names, versions and request ids.
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_alias(
            engine,
            nope.as_ptr(),
            c"production".as_ptr(),
            v1.as_ptr(),
            null(),
            err,
        )
    });
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_alias(
            engine,
            c"embed".as_ptr(),
            c"production".as_ptr(),
            c"0123456789abcdef".as_ptr(),
            null(),
            err,
        )
    });
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_canary(engine, nope.as_ptr(), v1.as_ptr(), 10.0, false, null(), err)
    });
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_promote(engine, nope.as_ptr(), null(), err)
    });
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_rollback(engine, nope.as_ptr(), null(), err)
    });
    let mut s = junk();
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_history(engine, nope.as_ptr(), &mut s, err)
    });
    assert!(s.is_null());
    s = junk();
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_lineage_show(engine, c"no-such-request".as_ptr(), &mut s, err)
    });
    assert!(s.is_null());
    let mut identical = true;
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_lineage_replay(engine, c"no-such-request".as_ptr(), &mut identical, err)
    });
    assert!(!identical);
    let mut emb = junk();
    let texts = [c"x".as_ptr()];
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_infer_embed(
            engine,
            nope.as_ptr(),
            texts.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    assert!(emb.is_null());
    // A registered name with no production alias yet.
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_infer_embed(
            engine,
            c"embed".as_ptr(),
            texts.as_ptr(),
            null(),
            1,
            null(),
            &mut emb,
            err,
        )
    });
    s = junk();
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_registry_register(
            engine,
            c"embed".as_ptr(),
            c"/no/such/model".as_ptr(),
            KEEL_WEIGHTS_F32,
            false,
            &mut s,
            err,
        )
    });
    assert!(s.is_null());

    // Moves the routes do not allow, and bad arguments.
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_canary(engine, c"embed".as_ptr(), v1.as_ptr(), 10.0, false, null(), err)
    });
    assert!(message.contains("production"), "{message}");
    alias(engine, "embed", "production", v1.to_str().unwrap());
    for percent in [150.0, -1.0, f64::NAN] {
        let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_registry_canary(
                engine,
                c"embed".as_ptr(),
                v1.as_ptr(),
                percent,
                false,
                null(),
                err,
            )
        });
        assert!(message.contains("0-100"), "{message}");
    }
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_promote(engine, c"embed".as_ptr(), null(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_abort_canary(engine, c"embed".as_ptr(), null(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_rollback(engine, c"embed".as_ptr(), null(), err)
    });
    s = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_register(
            engine,
            c"embed".as_ptr(),
            path(&minilm()).as_ptr(),
            7,
            false,
            &mut s,
            err,
        )
    });
    assert!(s.is_null());
    for bad in [c"", c"a@b"] {
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_registry_register(
                engine,
                bad.as_ptr(),
                path(&minilm()).as_ptr(),
                KEEL_WEIGHTS_F32,
                false,
                null_mut(),
                err,
            )
        });
    }
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_register(
            engine,
            null(),
            path(&minilm()).as_ptr(),
            KEEL_WEIGHTS_F32,
            false,
            null_mut(),
            err,
        )
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_alias(engine, c"embed".as_ptr(), null(), v1.as_ptr(), null(), err)
    });
    let invalid_utf8 = [0xffu8, 0xfe, 0];
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_promote(engine, c"embed".as_ptr(), invalid_utf8.as_ptr().cast(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_list(engine, null_mut(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_history(engine, c"embed".as_ptr(), null_mut(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_show(engine, null(), &mut s, err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_replay(engine, c"x".as_ptr(), null_mut(), err)
    });
    // Request info: an empty id, non-UTF-8 key, an unknown priority.
    let bad_params = keel_request_params {
        priority: 9,
        ..keel_request_default_params()
    };
    let infos = [
        keel_request_info {
            request_id: c"".as_ptr(),
            ..keel_request_default_info()
        },
        keel_request_info {
            key: invalid_utf8.as_ptr().cast(),
            ..keel_request_default_info()
        },
        keel_request_info {
            params: &bad_params,
            ..keel_request_default_info()
        },
    ];
    for info in &infos {
        emb = junk();
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_infer_embed(
                engine,
                c"embed".as_ptr(),
                texts.as_ptr(),
                null(),
                1,
                info,
                &mut emb,
                err,
            )
        });
        assert!(emb.is_null());
    }
    // The wrong task, no texts, NULL out, a stale engine.
    let mut completion = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_infer_generate(
            engine,
            c"embed".as_ptr(),
            c"hi".as_ptr(),
            null(),
            null(),
            &mut completion,
            err,
        )
    });
    assert!(completion.is_null());
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_infer_embed(
            engine,
            c"embed".as_ptr(),
            null(),
            null(),
            0,
            null(),
            &mut emb,
            err,
        )
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_infer_embed(
            engine,
            c"embed".as_ptr(),
            texts.as_ptr(),
            null(),
            1,
            null(),
            null_mut(),
            err,
        )
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_infer_generate(
            engine,
            c"embed".as_ptr(),
            c"hi".as_ptr(),
            null(),
            null(),
            null_mut(),
            err,
        )
    });
    // A request that was not retained cannot be replayed; one that failed has no record.
    let answer = infer(
        engine,
        "embed",
        &["kept without its input"],
        Some("no-input"),
        None,
    );
    assert_eq!(answer.route.as_deref(), Some("production"));
    let message = expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_lineage_replay(engine, c"no-input".as_ptr(), &mut identical, err)
    });
    assert!(message.contains("not retained"), "{message}");
    // The engine still works after all that, and is refused once freed.
    assert_eq!(
        infer(engine, "embed", &["still fine"], None, None).version,
        v1.to_str().unwrap()
    );
    keel_engine_free(engine);
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_lineage_flush(engine, err)
    });
    s = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_registry_list(engine, &mut s, err)
    });
    assert!(s.is_null());
}

#[test]
fn a_guarded_canary_that_diverges_is_rolled_back_and_the_counters_say_so() {
    let dir = TempDir::new("guard");
    let engine = store_engine(&dir.0);
    let v1 = register(engine, "embed", &minilm(), KEEL_WEIGHTS_F32, false);
    let v2 = register(engine, "embed", &minilm(), KEEL_WEIGHTS_INT8, false);
    alias(engine, "embed", "production", &v1);
    // int8 diverges from f32 by more than 0.0002 (1 - cosine): the guard must trip.
    let guard = keel_guard_params {
        min_requests: 5,
        max_divergence: 0.0002,
        ..keel_guard_default_params()
    };
    ok(|err| unsafe {
        keel_registry_canary_guarded(
            engine,
            c"embed".as_ptr(),
            c(&v2).as_ptr(),
            100.0,
            false,
            &guard,
            c"guarded".as_ptr(),
            err,
        )
    });
    let start = std::time::Instant::now();
    let mut i = 0;
    while history(engine, "embed").last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .starts_with("canary 100")
    {
        assert!(start.elapsed().as_secs() < 30, "the guard never tripped");
        infer(engine, "embed", &[&format!("guarded text {i}")], None, None);
        // Leave the comparisons idle time to run in.
        std::thread::sleep(std::time::Duration::from_millis(20));
        i += 1;
    }
    let last = history(engine, "embed").last().unwrap().clone();
    assert!(
        last["reason"].as_str().unwrap().contains("guard: divergence"),
        "{last}"
    );
    assert_eq!(infer(engine, "embed", &["after"], None, None).version, v1);
    let mut out = junk();
    ok(|err| unsafe { keel_lineage_stats(engine, null(), &mut out, err) });
    let stats = json(out);
    assert!(stats["shadow"]["run"].as_u64().unwrap() >= 5, "{stats}");
    assert_eq!(stats["guard"], serde_json::Value::Null);
    keel_engine_free(engine);
}
