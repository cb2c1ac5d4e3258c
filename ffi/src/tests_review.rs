//! Review, feedback and cost through the C ABI, on the breast-cancer MLP of examples/models
//! (its manifest's `[review]` sends rows under 0.9 confidence to review, served provisionally;
//! its `[cost]` is 0.01 a call) and the held-out rows of examples/data (release mode:
//! `cargo test --release -p keel-ffi`).

use crate::engine::*;
use crate::model::*;
use crate::observe::*;
use crate::review::*;
use crate::status::keel_status::*;
use crate::status::*;
use crate::string::*;
use crate::tests::{c, expect, id_of, junk, load, new_engine, ok};
use crate::tests_registry::{alias, json, register, store_engine, take_string, TempDir};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

/// The MLP's name in its manifest, which the cost report gives for a version the host loaded
/// itself (no registered name).
const MLP: &str = "breast-cancer-mlp";
/// The name the tests register the MLP under, which tickets, labels and the cost report give.
const NAME: &str = "cancer";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn mlp() -> PathBuf {
    workspace().join("examples/models/breast-cancer-mlp")
}

fn linear() -> PathBuf {
    workspace().join("examples/models/breast-cancer-linear")
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(workspace().join("tests/golden/mlp.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The held-out rows of examples/data, as JSON objects (every field is a number).
fn held_out() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(workspace().join("examples/data/breast-cancer-held-out.csv")).unwrap();
    let mut lines = text.lines();
    let names: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let row: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(l.split(','))
                .map(|(n, v)| (n.to_string(), serde_json::json!(v.parse::<f64>().unwrap())))
                .collect();
            serde_json::Value::Object(row)
        })
        .collect()
}

/// Whether the golden probabilities of each held-out row are under 0.9 (the policy's "unsure").
fn unsure() -> Vec<bool> {
    golden()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let p = r["probabilities"].as_array().unwrap();
            p.iter().map(|x| x.as_f64().unwrap()).fold(0.0, f64::max) < 0.9
        })
        .collect()
}

/// The data set's label of held-out row `i`.
fn truth(i: usize) -> &'static str {
    ["malignant", "benign"][golden()["rows"][i]["target"].as_u64().unwrap() as usize]
}

/// `keel_classify` of one row: the answer, or the status and message of the failure.
fn classify(
    engine: *const keel_engine,
    model: &str,
    row: &serde_json::Value,
) -> Result<serde_json::Value, (keel_status, String)> {
    let mut out = junk();
    let mut err = junk();
    let status = unsafe {
        keel_classify(
            engine,
            c(model).as_ptr(),
            c(&row.to_string()).as_ptr(),
            &mut out,
            &mut err,
        )
    };
    if status == KEEL_OK {
        assert!(err.is_null());
        return Ok(json(out));
    }
    assert!(out.is_null());
    let (code, message) = crate::tests::take_error(err);
    assert_eq!(code, status);
    Err((status, message))
}

fn list(engine: *const keel_engine, state: Option<&str>, limit: u32) -> Vec<serde_json::Value> {
    let state = state.map(c);
    let mut out = junk();
    ok(|err| unsafe {
        keel_review_list(
            engine,
            state.as_ref().map_or(null(), |s| s.as_ptr()),
            limit,
            &mut out,
            err,
        )
    });
    json(out).as_array().unwrap().clone()
}

fn string_of(
    engine: *const keel_engine,
    call: unsafe extern "C" fn(
        *const keel_engine,
        *mut *mut keel_string,
        *mut *mut keel_error,
    ) -> keel_status,
) -> String {
    let mut out = junk();
    ok(|err| unsafe { call(engine, &mut out, err) });
    take_string(out)
}

fn stats(engine: *const keel_engine) -> Vec<serde_json::Value> {
    let text = string_of(engine, keel_review_stats);
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn spend(engine: *const keel_engine, key: &str) -> serde_json::Value {
    let mut out = junk();
    ok(|err| unsafe { keel_budget_spend(engine, c(key).as_ptr(), &mut out, err) });
    json(out)
}

fn budget(engine: *const keel_engine, key: &str, limit: f64, downgrade_to: Option<&CString>) {
    ok(|err| unsafe {
        keel_budget_set(
            engine,
            c(key).as_ptr(),
            limit,
            0,
            downgrade_to.map_or(null(), |d| d.as_ptr()),
            err,
        )
    });
}

#[test]
fn review_feedback_budgets_and_cost_through_the_c_abi() {
    let dir = TempDir::new("review");
    let engine = store_engine(&dir.0);
    let version = register(engine, "cancer", &mlp(), KEEL_WEIGHTS_QUANTIZED, false);
    alias(engine, "cancer", "production", &version);
    let rows = held_out();
    let unsure = unsure();
    assert_eq!(rows.len(), unsure.len());
    let queued = unsure.iter().filter(|u| **u).count();
    assert!(queued >= 2, "the held-out rows have unsure answers to review");

    // Every row is served (the policy is provisional); the unsure ones carry their ticket.
    let mut ids = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let answer = classify(engine, "cancer", row).unwrap();
        let expected = if unsure[i] { "review" } else { "auto" };
        assert_eq!(answer["review"]["decision"], expected, "row {i}: {answer}");
        assert_eq!(
            answer["review"]["ticket"].is_i64(),
            unsure[i],
            "row {i}: {answer}"
        );
        assert_eq!(answer["cost"]["cost"], 0.01);
        assert_eq!(answer["cost"]["key"], "");
        assert_eq!(answer["version"], version.as_str());
        ids.push(answer["request_id"].as_str().unwrap().to_string());
    }

    // The queue: one pending ticket per unsure row, oldest first, naming the model by the name
    // it is registered under (as lineage does).
    let pending = list(engine, Some("pending"), 0);
    assert_eq!(pending.len(), queued);
    let queued_ids: Vec<&str> = (0..rows.len())
        .filter(|&i| unsure[i])
        .map(|i| ids[i].as_str())
        .collect();
    let pending_ids: Vec<&str> = pending
        .iter()
        .map(|t| t["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(pending_ids, queued_ids);
    for t in &pending {
        assert_eq!(
            (t["state"].as_str(), t["model"].as_str(), t["decision"].as_str()),
            (Some("pending"), Some(NAME), Some("review")),
            "{t}"
        );
        assert!(t["reasons"][0].as_str().unwrap().contains("unsure"), "{t}");
        assert!(t["input"]["rows"][0]["mean radius"].is_number(), "{t}");
    }
    assert_eq!(list(engine, None, 0).len(), queued);
    assert_eq!(list(engine, None, 1).len(), 1);
    assert_eq!(list(engine, Some("resolved"), 0).len(), 0);

    // Claimed by ana: bob may not resolve it, ana may, once.
    let mut out = junk();
    ok(|err| unsafe { keel_review_claim(engine, c"ana".as_ptr(), 60_000, &mut out, err) });
    let claimed = json(out);
    assert_eq!(claimed["id"], pending[0]["id"]);
    assert_eq!(
        (claimed["state"].as_str(), claimed["reviewer"].as_str()),
        (Some("claimed"), Some("ana"))
    );
    let ticket = claimed["id"].as_i64().unwrap();
    let row = ids
        .iter()
        .position(|id| claimed["request_id"] == id.as_str())
        .unwrap();
    let label = c(truth(row));
    let mut out = junk();
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_review_resolve(
            engine,
            ticket,
            c"bob".as_ptr(),
            label.as_ptr(),
            null(),
            &mut out,
            err,
        )
    });
    assert!(out.is_null());
    assert!(message.contains("claimed by ana"), "{message}");
    ok(|err| unsafe {
        keel_review_resolve(
            engine,
            ticket,
            c"ana".as_ptr(),
            label.as_ptr(),
            c"checked".as_ptr(),
            &mut out,
            err,
        )
    });
    let resolved = json(out);
    assert_eq!(
        (
            resolved["state"].as_str(),
            resolved["label"].as_str(),
            resolved["comment"].as_str()
        ),
        (Some("resolved"), Some(truth(row)), Some("checked"))
    );
    let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_review_resolve(
            engine,
            ticket,
            c"ana".as_ptr(),
            label.as_ptr(),
            null(),
            null_mut(),
            err,
        )
    });
    assert!(message.contains("already resolved"), "{message}");
    let message = expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_review_resolve(
            engine,
            1 << 40,
            c"ana".as_ptr(),
            label.as_ptr(),
            null(),
            &mut out,
            err,
        )
    });
    assert!(message.contains("no ticket"), "{message}");
    assert!(out.is_null());
    // The next claim gets the next ticket; with every ticket claimed or closed, "null".
    ok(|err| unsafe { keel_review_claim(engine, c"bob".as_ptr(), 60_000, &mut out, err) });
    assert_eq!(json(out)["id"], pending[1]["id"]);
    for _ in 2..queued {
        ok(|err| unsafe { keel_review_claim(engine, c"cy".as_ptr(), 60_000, &mut out, err) });
        assert!(json(out)["id"].is_i64());
    }
    ok(|err| unsafe { keel_review_claim(engine, c"dee".as_ptr(), 60_000, &mut out, err) });
    assert_eq!(take_string(out), "null");
    assert_eq!(list(engine, Some("claimed"), 0).len(), queued - 1);
    assert_eq!(list(engine, Some("resolved"), 0).len(), 1);

    // The label is in the export and counts as agreement.
    let export = string_of(engine, keel_review_export);
    assert_eq!(export.lines().count(), 1, "{export}");
    let line: serde_json::Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            line["label"].as_str(),
            line["source"].as_str(),
            line["reviewer"].as_str()
        ),
        (Some(truth(row)), Some("review"), Some("ana"))
    );
    assert_eq!(line["request_id"], ids[row].as_str());
    assert!(line["input"]["rows"][0]["mean radius"].is_number(), "{line}");
    let predicted = golden()["rows"][row]["class"].clone();
    assert_eq!(line["prediction"], predicted);
    let agreement = stats(engine);
    assert_eq!(agreement.len(), 1, "{agreement:?}");
    let matched = u64::from(predicted == truth(row));
    assert_eq!(
        (
            agreement[0]["source"].as_str(),
            agreement[0]["labelled"].as_u64(),
            agreement[0]["matched"].as_u64(),
            agreement[0]["model"].as_str()
        ),
        (Some("review"), Some(1), Some(matched), Some(NAME))
    );

    // Ground truth for every row nobody reviewed: the online accuracy is the golden one.
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| !unsure[*i]) {
        let (id, label) = (c(id), c(truth(i)));
        ok(|err| unsafe { keel_feedback(engine, id.as_ptr(), label.as_ptr(), err) });
    }
    let quality = stats(engine);
    let truth_q = quality.iter().find(|q| q["source"] == "ground_truth").unwrap();
    let right = (0..rows.len())
        .filter(|&i| !unsure[i] && golden()["rows"][i]["class"] == truth(i))
        .count() as u64;
    assert_eq!(truth_q["labelled"].as_u64(), Some((rows.len() - queued) as u64));
    assert_eq!(truth_q["matched"].as_u64(), Some(right));
    assert!(truth_q["rate"].as_f64().unwrap() > 0.95, "{truth_q}");
    assert_eq!(
        string_of(engine, keel_review_export).lines().count(),
        rows.len() - queued + 1
    );
    let message = expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_feedback(engine, c"no-such-request".as_ptr(), c"benign".as_ptr(), err)
    });
    assert!(message.contains("no-such-request"), "{message}");
    let id = c(&ids[0]);
    for (request_id, label) in [(c"", c"benign"), (id.as_c_str(), c"")] {
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_feedback(engine, request_id.as_ptr(), label.as_ptr(), err)
        });
    }

    // The cost report: 0.01 per answered request, under the registered name and the key "".
    let report: serde_json::Value = serde_json::from_str(&string_of(engine, keel_cost_report)).unwrap();
    assert_eq!(report.as_array().unwrap().len(), 1, "{report}");
    let line = &report[0];
    assert_eq!(
        (
            line["model"].as_str(),
            line["version"].as_str(),
            line["key"].as_str(),
            line["requests"].as_u64()
        ),
        (
            Some(NAME),
            Some(version.as_str()),
            Some(""),
            Some(rows.len() as u64)
        )
    );
    assert!(
        (line["cost"].as_f64().unwrap() - 0.01 * rows.len() as f64).abs() < 1e-9,
        "{line}"
    );

    // A budget of 0.03 on the key "" (keel_classify passes no key) pays for exactly 3 answers.
    assert_eq!(spend(engine, ""), serde_json::Value::Null);
    budget(engine, "", 0.03, None);
    for (i, row) in rows.iter().enumerate().take(3) {
        classify(engine, "cancer", row).unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    let (status, message) = classify(engine, "cancer", &rows[3]).unwrap_err();
    assert_eq!(status, KEEL_ERR_BUDGET, "{message}");
    assert!(message.contains("budget of key ''"), "{message}");
    assert_eq!(
        spend(engine, ""),
        serde_json::json!({"limit": 0.03, "spent": 0.03, "reserved": 0.0, "left": 0.0})
    );
    assert_eq!(spend(engine, "nobody"), serde_json::Value::Null);

    // Downgrade: with 0.035 left, 3 MLP calls, then 5 on the cheap model (0.001 each), then
    // refused. The cheap model is served by the version layer (loaded by its alias).
    let cheap = register(engine, "linear", &linear(), KEEL_WEIGHTS_QUANTIZED, false);
    alias(engine, "linear", "production", &cheap);
    let message = expect(KEEL_ERR_NOT_FOUND, |err| unsafe {
        keel_budget_set(engine, c"".as_ptr(), 1.0, 0, c"linear".as_ptr(), err)
    });
    assert!(message.contains("linear"), "{message}");
    budget(engine, "", 0.065, Some(&c(&cheap)));
    let mut routes = Vec::new();
    for row in rows.iter().take(10) {
        match classify(engine, "cancer", row) {
            Ok(a) if a["cost"]["downgraded_from"].is_string() => {
                assert_eq!(a["version"], cheap.as_str());
                routes.push("cheap");
            }
            Ok(a) => {
                assert_eq!(a["version"], version.as_str());
                routes.push("strong");
            }
            Err((status, message)) => {
                assert_eq!(status, KEEL_ERR_BUDGET, "{message}");
                routes.push("refused");
            }
        }
    }
    assert_eq!(
        routes,
        ["strong", "strong", "strong", "cheap", "cheap", "cheap", "cheap", "cheap", "refused", "refused"]
    );

    // Misuse: NULL and bad arguments are errors, out-parameters read NULL.
    let invalid_utf8 = [0xffu8, 0xfe, 0];
    let bad: *const std::ffi::c_char = invalid_utf8.as_ptr().cast();
    for state in [c"bogus".as_ptr(), bad] {
        let mut out = junk();
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_review_list(engine, state, 0, &mut out, err)
        });
        assert!(out.is_null());
    }
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_review_list(engine, null(), 0, null_mut(), err)
    });
    for (reviewer, lease) in [
        (null(), 1000),
        (c"".as_ptr(), 1000),
        (bad, 1000),
        (c"ana".as_ptr(), 0),
    ] {
        let mut out = junk();
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_review_claim(engine, reviewer, lease, &mut out, err)
        });
        assert!(out.is_null());
    }
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_review_claim(engine, c"ana".as_ptr(), 1000, null_mut(), err)
    });
    let t = pending[1]["id"].as_i64().unwrap();
    for (reviewer, label, comment) in [
        (null(), c"benign".as_ptr(), null()),
        (c"bob".as_ptr(), null(), null()),
        (c"".as_ptr(), c"benign".as_ptr(), null()),
        (c"bob".as_ptr(), c"".as_ptr(), null()),
        (c"bob".as_ptr(), c"benign".as_ptr(), bad),
    ] {
        let mut out = junk();
        expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_review_resolve(engine, t, reviewer, label, comment, &mut out, err)
        });
        assert!(out.is_null());
    }
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_review_export(engine, null_mut(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_review_stats(engine, null_mut(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_feedback(engine, null(), c"benign".as_ptr(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_feedback(engine, id.as_ptr(), null(), err)
    });
    for limit in [-0.5, f64::NAN, f64::INFINITY] {
        let message = expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
            keel_budget_set(engine, c"k".as_ptr(), limit, 0, null(), err)
        });
        assert!(message.contains("limit"), "{message}");
    }
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_budget_set(engine, null(), 1.0, 0, null(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_budget_set(engine, bad, 1.0, 0, null(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_budget_set(engine, c"k".as_ptr(), 1.0, 0, c"".as_ptr(), err)
    });
    assert_eq!(
        spend(engine, "k"),
        serde_json::Value::Null,
        "a refused budget is not set"
    );
    let mut out = junk();
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_budget_spend(engine, null(), &mut out, err)
    });
    assert!(out.is_null());
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_budget_spend(engine, c"k".as_ptr(), null_mut(), err)
    });
    expect(KEEL_ERR_INVALID_ARGUMENT, |err| unsafe {
        keel_cost_report(engine, null_mut(), err)
    });

    // A NULL or freed engine is refused by every call.
    keel_engine_free(engine);
    for e in [null(), engine.cast_const()] {
        calls_refuse_the_engine(e);
    }
}

/// Every call of review.rs on `engine`, which is not a live engine (or has no store, for the
/// review calls): all KEEL_ERR_INVALID_ARGUMENT with their out-parameters NULL.
fn calls_refuse_the_engine(engine: *const keel_engine) -> Vec<String> {
    let mut messages = Vec::new();
    // Calls without an out-parameter get NULL for it (the closure ignores it).
    let mut check = |call: &dyn Fn(*mut *mut keel_string, *mut *mut keel_error) -> keel_status| {
        let mut out = junk();
        messages.push(expect(KEEL_ERR_INVALID_ARGUMENT, |err| call(&mut out, err)));
        assert!(out.is_null());
    };
    let none = |out: *mut *mut keel_string| unsafe { out.write(null_mut()) };
    check(&|out, err| unsafe { keel_review_list(engine, null(), 0, out, err) });
    check(&|out, err| unsafe { keel_review_claim(engine, c"ana".as_ptr(), 1000, out, err) });
    check(&|out, err| unsafe {
        keel_review_resolve(engine, 1, c"ana".as_ptr(), c"benign".as_ptr(), null(), out, err)
    });
    check(&|out, err| unsafe { keel_review_export(engine, out, err) });
    check(&|out, err| unsafe { keel_review_stats(engine, out, err) });
    check(&|out, err| {
        none(out);
        unsafe { keel_feedback(engine, c"r".as_ptr(), c"benign".as_ptr(), err) }
    });
    if engine_of(engine).is_err() {
        check(&|out, err| {
            none(out);
            unsafe { keel_budget_set(engine, c"k".as_ptr(), 1.0, 0, null(), err) }
        });
        check(&|out, err| unsafe { keel_budget_spend(engine, c"k".as_ptr(), out, err) });
        check(&|out, err| unsafe { keel_cost_report(engine, out, err) });
    }
    messages
}

#[test]
fn without_a_store_review_is_refused_and_budgets_and_prices_still_apply() {
    let engine = new_engine();
    let model = load(engine, &mlp());
    let id = id_of(model);
    for message in calls_refuse_the_engine(engine) {
        assert!(message.contains("without a storage_path"), "{message}");
    }
    let rows = held_out();
    let answer = classify(engine, id.to_str().unwrap(), &rows[0]).unwrap();
    assert_eq!(answer["review"], serde_json::Value::Null);
    assert_eq!(answer["cost"]["cost"], 0.01);
    ok(|err| unsafe { keel_budget_set(engine, c"".as_ptr(), 0.03, 3_600_000, null(), err) });
    for row in &rows[1..4] {
        classify(engine, id.to_str().unwrap(), row).unwrap();
    }
    let (status, _) = classify(engine, id.to_str().unwrap(), &rows[4]).unwrap_err();
    assert_eq!(status, KEEL_ERR_BUDGET);
    let report: serde_json::Value = serde_json::from_str(&string_of(engine, keel_cost_report)).unwrap();
    assert_eq!(report[0]["model"], MLP);
    assert_eq!(report[0]["requests"], 4);
    keel_model_free(model);
    keel_engine_free(engine);
}

/// A copy of the MLP whose `[review]` table is `review` instead.
fn mlp_with(review: &str, dir: &Path) -> PathBuf {
    let to = dir.join("mlp");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["model.safetensors", "profile.json"] {
        std::fs::copy(mlp().join(f), to.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(mlp().join("keel.toml")).unwrap();
    let head = &manifest[..manifest.find("\n[review]").unwrap()];
    std::fs::write(to.join("keel.toml"), format!("{head}\n{review}")).unwrap();
    to
}

#[test]
fn held_and_blocked_predictions_are_keel_err_review_with_their_ticket() {
    let dir = TempDir::new("held");
    let engine = store_engine(&dir.0.join("store"));
    let review = "[review]\nprovisional = false
[[review.rules]]\nname = \"large\"\nwhen = \"input.mean radius\"\nabove = 20\naction = \"block\"
[[review.rules]]\nname = \"unsure\"\nwhen = \"confidence\"\nbelow = 0.9\naction = \"review\"\n";
    let version = register(
        engine,
        "cancer",
        &mlp_with(review, &dir.0),
        KEEL_WEIGHTS_QUANTIZED,
        false,
    );
    alias(engine, "cancer", "production", &version);
    let unsure = unsure();
    let (mut blocked, mut held, mut served) = (0, 0, 0);
    for (i, row) in held_out().iter().enumerate() {
        let large = row["mean radius"].as_f64().unwrap() > 20.0;
        match classify(engine, "cancer", row) {
            Ok(answer) => {
                assert!(!large && !unsure[i], "row {i}: {answer}");
                assert_eq!(answer["review"]["decision"], "auto");
                served += 1;
            }
            Err((status, message)) => {
                assert_eq!(status, KEEL_ERR_REVIEW, "row {i}: {message}");
                assert!(message.contains("ticket"), "{message}");
                if large {
                    assert!(
                        message.contains("blocked") && message.contains("large"),
                        "{message}"
                    );
                    blocked += 1;
                } else {
                    assert!(unsure[i], "row {i}: {message}");
                    assert!(message.contains("held for review"), "{message}");
                    held += 1;
                }
            }
        }
    }
    assert!(blocked > 0 && held > 0 && served > 0, "{blocked} {held} {served}");
    let tickets = list(engine, None, 0);
    assert_eq!(tickets.len(), blocked + held);
    assert_eq!(
        tickets.iter().filter(|t| t["decision"] == "block").count(),
        blocked
    );
    // A refused prediction has no lineage record, but its ticket names it: ground truth for it
    // is accepted.
    let refused = c(tickets[0]["request_id"].as_str().unwrap());
    ok(|err| unsafe { keel_feedback(engine, refused.as_ptr(), c"malignant".as_ptr(), err) });
    let line: serde_json::Value =
        serde_json::from_str(string_of(engine, keel_review_export).lines().next().unwrap()).unwrap();
    assert_eq!(
        (line["source"].as_str(), line["model"].as_str()),
        (Some("ground_truth"), Some(NAME))
    );
    keel_engine_free(engine);
}

#[test]
fn a_routing_key_from_c_has_its_own_budget() {
    let engine = new_engine();
    let model = load(engine, &mlp());
    let id = id_of(model);
    let rows = held_out();
    ok(|err| unsafe { keel_budget_set(engine, c"tenant-7".as_ptr(), 0.02, 0, null(), err) });
    let (key, request_id) = (c("tenant-7"), c("bc-1"));
    let mut info = crate::request::keel_request_default_info();
    info.key = key.as_ptr();
    info.request_id = request_id.as_ptr();
    let infer = |row: &serde_json::Value, info: &crate::request::keel_request_info| {
        let mut out = junk();
        let mut err = junk();
        let row = c(&row.to_string());
        let status =
            unsafe { keel_infer_classify(engine, id.as_ptr(), row.as_ptr(), info, &mut out, &mut err) };
        if status == KEEL_OK {
            Ok(json(out))
        } else {
            Err(crate::tests::take_error(err).0)
        }
    };
    let first = infer(&rows[0], &info).unwrap();
    assert_eq!(
        (first["request_id"].as_str(), first["cost"]["key"].as_str()),
        (Some("bc-1"), Some("tenant-7"))
    );
    info.request_id = null();
    infer(&rows[1], &info).unwrap();
    // 0.02 paid for two calls at 0.01: the third of this key is refused, the key "" is not.
    assert_eq!(infer(&rows[2], &info).unwrap_err(), KEEL_ERR_BUDGET);
    classify(engine, id.to_str().unwrap(), &rows[2]).unwrap();
    let spend: serde_json::Value = {
        let mut out = junk();
        ok(|err| unsafe { keel_budget_spend(engine, key.as_ptr(), &mut out, err) });
        json(out)
    };
    assert_eq!(
        (spend["spent"].as_f64(), spend["left"].as_f64()),
        (Some(0.02), Some(0.0))
    );
    // An empty key is refused, not billed to "".
    let empty = c("");
    info.key = empty.as_ptr();
    assert_eq!(infer(&rows[3], &info).unwrap_err(), KEEL_ERR_INVALID_ARGUMENT);
    keel_model_free(model);
    keel_engine_free(engine);
}

/// Two engines on one `postgres://` storage_path (a fleet's store, on the server of
/// `KEEL_TEST_POSTGRES`): a version registered through one is served by the other, and a budget
/// set through one holds across both. An unreachable server is `KEEL_ERR_STORAGE`.
#[test]
fn two_engines_on_one_postgres_store_share_the_registry_and_the_budgets() {
    use keel::store::PgStore;
    let Ok(server) = std::env::var("KEEL_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the PostgreSQL C ABI test"
        );
        return;
    };
    // The key=value string as a URL: what a host passes as storage_path.
    let field = |key: &str| {
        server
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_string()
    };
    let name = format!("keel_ffi_{}", std::process::id());
    PgStore::drop_database(&server, &name).unwrap();
    PgStore::create_database(&server, &name).unwrap();
    let url = format!(
        "postgres://{}@{}:{}/{name}",
        field("user"),
        field("host"),
        field("port")
    );
    let params = |location: &CString| keel_engine_params {
        storage_path: location.as_ptr(),
        ..keel_engine_default_params()
    };
    let location = c(&url);
    let open = || {
        let mut engine = junk();
        ok(|err| unsafe { keel_engine_new(&params(&location), &mut engine, err) });
        engine
    };
    let (a, b) = (open(), open());
    let version = register(a, "cancer", &mlp(), KEEL_WEIGHTS_QUANTIZED, false);
    alias(a, "cancer", "production", &version);
    // Two calls at 0.01 for requests without a key, set through A; one through each engine.
    budget(a, "", 0.02, None);
    let row = &held_out()[0];
    assert!(classify(b, "cancer", row).is_ok(), "B serves what A registered");
    assert!(classify(a, "cancer", row).is_ok());
    let (code, message) = classify(b, "cancer", row).unwrap_err();
    assert_eq!(code, KEEL_ERR_BUDGET, "{message}");
    let seen = spend(b, "");
    assert_eq!(
        (seen["limit"].as_f64(), seen["left"].as_f64()),
        (Some(0.02), Some(0.0)),
        "{seen}"
    );
    keel_engine_free(a);
    keel_engine_free(b);

    let nowhere = c("postgres://keel@127.0.0.1:1/keel");
    let message = expect(KEEL_ERR_STORAGE, |err| unsafe {
        keel_engine_new(&params(&nowhere), &mut junk(), err)
    });
    assert!(message.contains("127.0.0.1"), "{message}");
    // The engines' routes watchers end within a second of their engines, and with them the
    // last connections to the database.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = PgStore::drop_database(&server, &name);
}
