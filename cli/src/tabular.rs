//! `keel classify`, `keel profile`, `keel drift`, `keel metrics`: tabular data through the
//! contract and observability layers.

use keel::contract::{ContractViolation, Verdict};
use keel::observe::{ProfileBuilder, WindowSize, PROFILE_FILE};
use keel::stack::{ObserveConfig, Stack};
use keel::{Engine, Infer, InferRequest, Input, Note, Record, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

type Failure = Box<dyn std::error::Error>;

/// One input row: its values, or why it could not be read.
pub(crate) type Row = Result<Record, String>;

/// Reads rows from a CSV file (a header row of field names) or a JSON-lines file (one object per
/// line); `-` is standard input. JSON lines are recognized by the `.jsonl`/`.ndjson` extension or
/// a first character `{`.
pub(crate) fn read_rows(path: &str) -> Result<Vec<Row>, Failure> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?
    };
    let jsonl = path.ends_with(".jsonl") || path.ends_with(".ndjson") || text.trim_start().starts_with('{');
    if jsonl {
        return Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let object: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
                object
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            Value::from_json(v).map_err(|e| format!("field '{k}': {e}"))?,
                        ))
                    })
                    .collect()
            })
            .collect());
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
    Ok(reader
        .records()
        .map(|r| {
            let record = r.map_err(|e| format!("not a CSV row: {e}"))?;
            Ok(header
                .iter()
                .zip(record.iter())
                .map(|(name, cell)| {
                    let value = match cell.parse::<f64>() {
                        _ if cell.is_empty() => Value::Null,
                        Ok(x) => Value::Number(x),
                        Err(_) => Value::Text(cell.to_string()),
                    };
                    (name.clone(), value)
                })
                .collect())
        })
        .collect())
}

/// The contract and observability layers over an engine, with no store (`keel drift`).
pub(crate) fn watched(engine: &Engine, window: Option<usize>) -> Result<Stack, Failure> {
    let config = ObserveConfig {
        window: window.map(|n| WindowSize::Count(n.max(1))),
        on_drift: None,
    };
    Ok(Stack::builder(engine.clone())
        .contract()
        .observe_with(config)
        .build()?)
}

/// Writes the metrics text to `path` (at the end of a command).
pub(crate) fn write_metrics(stack: &Stack, path: Option<&Path>) -> Result<(), Failure> {
    if let Some(path) = path {
        std::fs::write(path, stack.metrics_text()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// One row's answer as `keel classify --json` prints it.
pub(crate) fn row_json(
    index: usize,
    labels: &[String],
    answer: Result<keel::InferResponse, keel::Error>,
) -> serde_json::Value {
    match answer {
        Ok(a) => {
            let Some(c) = a.output.classes().and_then(|c| c.first()) else {
                return serde_json::json!({"row": index, "error": {"message": "the model did not answer with a class"}});
            };
            let probabilities: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .zip(&c.probabilities)
                .map(|(l, p)| (l.clone(), serde_json::json!(p)))
                .collect();
            let contract = a
                .meta
                .notes
                .get::<Verdict>()
                .map_or(serde_json::Value::Null, Note::to_json);
            serde_json::json!({
                "row": index,
                "request_id": a.meta.request_id.as_str(),
                "class": c.label,
                "probabilities": probabilities,
                "contract": contract,
            })
        }
        Err(e) => serde_json::json!({"row": index, "error": error_json(&e)}),
    }
}

/// An error as JSON: a contract violation names its field, clause and value.
pub(crate) fn error_json(e: &keel::Error) -> serde_json::Value {
    if let keel::Error::Refused { source, .. } = e {
        if let Some(ContractViolation(v)) = source.downcast_ref::<ContractViolation>() {
            return serde_json::json!({
                "kind": "contract",
                "field": v.field,
                "clause": v.clause.as_str(),
                "value": v.value,
                "expected": v.expected,
                "message": e.to_string(),
            });
        }
    }
    serde_json::json!({"kind": format!("{:?}", e.kind()).to_lowercase(), "message": e.to_string()})
}

/// `keel profile`: runs DATA through the model (no contract, no lineage) and writes the
/// reference profile next to its manifest.
pub(crate) fn profile(engine: &Engine, folder: &Path, data: &str, window: usize) -> Result<PathBuf, Failure> {
    if !folder.is_dir() {
        return Err(format!(
            "{}: a profile is written into a model folder; name one",
            folder.display()
        )
        .into());
    }
    let id = engine.load(folder)?;
    let info = engine.info(id.as_str())?;
    let mut builder = ProfileBuilder::new();
    let mut skipped = 0;
    for row in read_rows(data)? {
        let Some(input) = row.ok().and_then(|r| input_of(&info, r)) else {
            skipped += 1;
            continue;
        };
        match engine.infer(InferRequest::new(id.as_str(), input.clone())) {
            Ok(a) => builder.add(&input, &a.output, &info.manifest.labels),
            Err(_) => skipped += 1,
        }
    }
    let profile = builder.finish(&info.manifest.name, window)?;
    let path = folder.join(PROFILE_FILE);
    profile.write(&path)?;
    if skipped > 0 {
        eprintln!(
            "keel: {skipped} rows could not be read or run (a tabular row, or a `text` field for an encoder) \
             and are not in the profile"
        );
    }
    Ok(path)
}

/// The request input of one data row: the row itself for a tabular model, its `text` field for
/// an encoder (a CSV column or a JSON-lines field named `text`). None: nothing to run.
pub(crate) fn input_of(info: &keel::ModelInfo, row: Record) -> Option<Input> {
    match info.manifest.architecture {
        keel::Architecture::Mlp => Some(Input::Classify(vec![row])),
        keel::Architecture::Bert => match row.get("text") {
            Some(Value::Text(t)) => Some(Input::Embed(vec![t.clone()])),
            _ => None,
        },
        keel::Architecture::Llama => None,
    }
}

/// Runs every row through `model` on `served` (one request per row, so that one bad row never
/// fails the file), printing each answer.
pub(crate) fn classify_rows(
    served: &Stack,
    model: &str,
    rows: Vec<Row>,
    json: bool,
) -> Result<(usize, usize), Failure> {
    let mut out = std::io::stdout().lock();
    let mut labels: std::collections::HashMap<keel::VersionId, Vec<String>> = Default::default();
    let (mut ok, mut failed) = (0, 0);
    for (i, row) in rows.into_iter().enumerate() {
        let answer = match row {
            Ok(row) => served.infer(InferRequest::classify(model, vec![row])),
            Err(reason) => Err(keel::Error::InvalidArgument(reason)),
        };
        match &answer {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
        if json {
            let version = answer.as_ref().ok().map(|a| a.meta.version.clone());
            let names = match version {
                Some(v) => match labels.get(&v) {
                    Some(l) => l.clone(),
                    None => {
                        // The registry's record: a version may be unloaded once its request ends.
                        let record = crate::registry_of(served)
                            .map_err(|e| e.to_string())?
                            .versions()?
                            .into_iter()
                            .find(|r| r.id == v);
                        let l = record.map(|r| r.manifest.labels).unwrap_or_default();
                        labels.insert(v, l.clone());
                        l
                    }
                },
                None => Vec::new(),
            };
            writeln!(out, "{}", row_json(i, &names, answer))?;
        } else {
            match answer {
                Ok(a) => {
                    let c = &a.output.classes().unwrap_or_default()[0];
                    let flagged = a.meta.notes.get::<Verdict>().is_some_and(|v| !v.passed());
                    let note = if flagged { "  (contract: flagged)" } else { "" };
                    writeln!(out, "{i}\t{}\t{:.4}{note}", c.label, c.probabilities[c.class])?;
                }
                Err(e) => writeln!(out, "{i}\terror: {e}")?,
            }
        }
    }
    Ok((ok, failed))
}

/// The output of `keel drift --json`: every window's report.
pub(crate) fn drift_json(stack: &Stack, model: &str) -> Result<serde_json::Value, Failure> {
    let state = stack
        .observed()
        .ok_or("the stack does not observe")?
        .drift(&stack.target(model)?)?
        .ok_or("the model has no reference profile: write one with `keel profile`")?;
    Ok(serde_json::json!({ "windows": state.reports }))
}
