//! Every inference call of the C ABI goes through the engine's stack: a table over
//! `keel_embed`, `keel_embed_into`, `keel_generate`, `keel_classify` and the `keel_infer_*`
//! calls, each on an engine with a store, shows each leaves a lineage record with its price and
//! a metrics observation.

use crate::embed::*;
use crate::engine::*;
use crate::generate::*;
use crate::lineage::*;
use crate::model::KEEL_WEIGHTS_QUANTIZED;
use crate::observe::*;
use crate::request::*;
use crate::string::*;
use crate::tests::{c, junk, minilm, ok, smollm2};
use crate::tests_registry::{alias, json, register, store_engine, take_string, TempDir};
use std::ptr::{null, null_mut};

/// Every lineage record of the engine, newest first.
fn records(engine: *const keel_engine) -> Vec<serde_json::Value> {
    let mut out = junk();
    ok(|err| unsafe { keel_lineage_recent(engine, 10_000, &mut out, err) });
    json(out).as_array().unwrap().clone()
}

fn metrics(engine: *const keel_engine) -> String {
    let mut out = junk();
    ok(|err| unsafe { keel_metrics_text(engine, &mut out, err) });
    take_string(out)
}

/// The `ok` requests the metrics count for `model` and `task`.
fn counted(text: &str, model: &str, task: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("keel_requests_total{")
                && l.contains(&format!("model=\"{model}\""))
                && l.contains(&format!("task=\"{task}\""))
                && l.contains("outcome=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn every_inference_call_leaves_a_lineage_record_a_price_and_a_metrics_observation() {
    let dir = TempDir::new("parity");
    let price = "[cost]\nper_call = 0.5\nper_1k_tokens = 1.0\n";
    let with = |model: &std::path::Path, name: &str| {
        keel_benches::harness::with_tables(model, price, &dir.0.join(name)).unwrap()
    };
    let (embedder, decoder) = (with(&minilm(), "minilm"), with(&smollm2(), "smol"));
    let mlp =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/breast-cancer-mlp");
    let engine = store_engine(&dir.0.join("store"));
    for (name, model) in [("embed", &embedder), ("chat", &decoder), ("cancer", &mlp)] {
        let id = register(engine, name, model, KEEL_WEIGHTS_QUANTIZED, false);
        alias(engine, name, "production", &id);
    }
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/mlp.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let row: serde_json::Map<String, serde_json::Value> = golden["features"]
        .as_array()
        .unwrap()
        .iter()
        .zip(golden["rows"][0]["values"].as_array().unwrap())
        .map(|(n, v)| (n.as_str().unwrap().to_string(), v.clone()))
        .collect();
    let rows = serde_json::Value::Array(vec![serde_json::Value::Object(row)]).to_string();
    let texts = [c("one text"), c("another")];
    let text_ptrs: Vec<_> = texts.iter().map(|t| t.as_ptr()).collect();
    let generate_params = keel_generate_params {
        max_tokens: 6,
        ..keel_generate_default_params()
    };
    let prompt = c("Name a colour.");
    // (the call, the model's registered name, the task), each run once.
    type Call<'a> = Box<dyn Fn() + 'a>;
    let table: Vec<(&str, Call, &str, &str)> = vec![
        (
            "keel_embed",
            Box::new(|| {
                let mut out = junk();
                ok(|err| unsafe {
                    keel_embed(
                        engine,
                        c"embed".as_ptr(),
                        text_ptrs.as_ptr(),
                        null(),
                        2,
                        null(),
                        &mut out,
                        err,
                    )
                });
                assert!(!keel_embeddings_request_id(out).is_null());
                keel_embeddings_free(out);
            }),
            "embed",
            "embed",
        ),
        (
            "keel_embed_into",
            Box::new(|| {
                let mut buffer = vec![0f32; 2 * 384];
                let mut dim = 0;
                ok(|err| unsafe {
                    keel_embed_into(
                        engine,
                        c"embed".as_ptr(),
                        text_ptrs.as_ptr(),
                        null(),
                        2,
                        null(),
                        buffer.as_mut_ptr(),
                        buffer.len(),
                        &mut dim,
                        err,
                    )
                });
                assert_eq!(dim, 384);
            }),
            "embed",
            "embed",
        ),
        (
            "keel_infer_embed",
            Box::new(|| {
                let mut out = junk();
                ok(|err| unsafe {
                    keel_infer_embed(
                        engine,
                        c"embed".as_ptr(),
                        text_ptrs.as_ptr(),
                        null(),
                        2,
                        null(),
                        &mut out,
                        err,
                    )
                });
                keel_embeddings_free(out);
            }),
            "embed",
            "embed",
        ),
        (
            "keel_generate",
            Box::new(|| {
                let mut out = junk();
                ok(|err| unsafe {
                    keel_generate(
                        engine,
                        c"chat".as_ptr(),
                        prompt.as_ptr(),
                        &generate_params,
                        null(),
                        None,
                        null_mut(),
                        &mut out,
                        err,
                    )
                });
                assert!(!keel_completion_request_id(out).is_null());
                keel_completion_free(out);
            }),
            "chat",
            "generate",
        ),
        (
            "keel_infer_generate",
            Box::new(|| {
                let mut out = junk();
                ok(|err| unsafe {
                    keel_infer_generate(
                        engine,
                        c"chat".as_ptr(),
                        prompt.as_ptr(),
                        &generate_params,
                        null(),
                        &mut out,
                        err,
                    )
                });
                keel_completion_free(out);
            }),
            "chat",
            "generate",
        ),
        (
            "keel_classify",
            Box::new(|| {
                let mut out = junk();
                ok(|err| unsafe {
                    keel_classify(engine, c"cancer".as_ptr(), c(&rows).as_ptr(), &mut out, err)
                });
                let answer = json(out);
                assert!(answer["cost"]["cost"].as_f64().is_some(), "{answer}");
            }),
            "cancer",
            "classify",
        ),
        (
            "keel_infer_classify",
            Box::new(|| {
                let info = keel_request_info {
                    key: c"tenant".as_ptr(),
                    ..keel_request_default_info()
                };
                let mut out = junk();
                ok(|err| unsafe {
                    keel_infer_classify(
                        engine,
                        c"cancer".as_ptr(),
                        c(&rows).as_ptr(),
                        &info,
                        &mut out,
                        err,
                    )
                });
                keel_string_free(out);
            }),
            "cancer",
            "classify",
        ),
    ];
    for (call, run, model, task) in &table {
        let before = records(engine).len();
        let counted_before = counted(&metrics(engine), model, task);
        run();
        let all = records(engine);
        assert_eq!(all.len(), before + 1, "{call}: one lineage record");
        let record = &all[0];
        assert_eq!(record["model"], *model, "{call}: {record}");
        assert_eq!(record["route"], "production", "{call}: {record}");
        let cost = record["cost"]["cost"].as_f64();
        // Priced (a response-cache hit costs nothing).
        let cached = record["cache_hit"] == true;
        assert!(
            cost.is_some_and(|c| c > 0.0 || cached),
            "{call}: no price in {record}"
        );
        let after = counted(&metrics(engine), model, task);
        assert_eq!(after, counted_before + 1.0, "{call}: one more request counted");
    }
    keel_engine_free(engine);
}
