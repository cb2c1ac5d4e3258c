//! Classification, contract verdicts, drift state and metrics through the C ABI, on the
//! breast-cancer MLP of examples/models (release mode: `cargo test --release -p keel-ffi`).

use crate::engine::*;
use crate::model::*;
use crate::observe::*;
use crate::status::keel_status::*;
use crate::string::*;
use crate::tests::{c, expect, id_of, junk, load, new_engine, ok};
use std::ffi::CStr;
use std::path::PathBuf;

fn mlp() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/breast-cancer-mlp")
}

fn text(s: *mut keel_string) -> String {
    let t = unsafe { CStr::from_ptr(keel_string_data(s)) }
        .to_str()
        .unwrap()
        .to_string();
    keel_string_free(s);
    t
}

/// The first held-out row of the golden data, as a JSON object.
fn row() -> serde_json::Map<String, serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/mlp.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let names = golden["features"].as_array().unwrap();
    let values = golden["rows"][0]["values"].as_array().unwrap();
    names
        .iter()
        .zip(values)
        .map(|(n, v)| (n.as_str().unwrap().to_string(), v.clone()))
        .collect()
}

#[test]
fn classify_verdicts_drift_and_metrics() {
    let engine = new_engine();
    let model = load(engine, &mlp());
    let id = id_of(model);
    let classify = |rows: &serde_json::Value, out: &mut *mut keel_string, err| unsafe {
        keel_classify(engine, id.as_ptr(), c(&rows.to_string()).as_ptr(), out, err)
    };
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mlp().join("../../../tests/golden/mlp.json")).unwrap())
            .unwrap();
    let mut out = junk();
    ok(|err| classify(&serde_json::Value::Object(row()), &mut out, err));
    let answer: serde_json::Value = serde_json::from_str(&text(out)).unwrap();
    assert_eq!(answer["classes"][0]["class"], golden["rows"][0]["class"]);
    let p = answer["classes"][0]["probabilities"]["malignant"]
        .as_f64()
        .unwrap();
    assert!((p - golden["rows"][0]["probabilities"][0].as_f64().unwrap()).abs() < 1e-5);
    assert_eq!(answer["contract"]["violations"], serde_json::json!([]));

    // Flagged: served, with the verdict.
    let mut flagged = row();
    flagged.insert("worst area".into(), serde_json::json!(1e6));
    ok(|err| classify(&serde_json::json!([flagged]), &mut out, err));
    let answer: serde_json::Value = serde_json::from_str(&text(out)).unwrap();
    assert_eq!(answer["contract"]["violations"][0]["clause"], "range");
    assert_eq!(answer["contract"]["violations"][0]["action"], "flag");

    // Rejected: KEEL_ERR_CONTRACT naming the field, the clause and the value.
    let mut bad = row();
    bad.insert("mean radius".into(), serde_json::json!(-3));
    let mut out = junk();
    let message = expect(KEEL_ERR_CONTRACT, |err| {
        classify(&serde_json::Value::Object(bad), &mut out, err)
    });
    assert!(out.is_null());
    assert!(
        message.contains("'mean radius'") && message.contains("range") && message.contains("-3"),
        "{message}"
    );
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| {
        classify(&serde_json::json!(7), &mut out, err)
    });
    assert!(message.contains("object"), "{message}");

    // Drift: the model's profile is there; no window has finished after three rows.
    let mut state = junk();
    ok(|err| unsafe { keel_drift_state(engine, id.as_ptr(), &mut state, err) });
    let state: serde_json::Value = serde_json::from_str(&text(state)).unwrap();
    assert_eq!(
        (state["state"].as_str(), state["last"].is_null()),
        (Some("ok"), true)
    );
    let mut state = junk();
    expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_drift_state(engine, c("nope").as_ptr(), &mut state, err)
    });

    let mut metrics = junk();
    ok(|err| unsafe { keel_metrics_text(engine, &mut metrics, err) });
    let metrics = text(metrics);
    assert!(
        metrics.contains("keel_requests_total{") && metrics.contains(r#"outcome="contract_violation""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"keel_contract_violations_total{field="mean radius",clause="range",action="reject"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"));
    keel_model_free(model);
    keel_engine_free(engine);
}
