//! The model manifest, `keel.toml`: what a model version is made of, with a sha256 per file.
//!
//! A model can be named three ways, as users of other runtimes expect:
//! - a Keel model folder, with a `keel.toml` (every file's sha256 is checked at load);
//! - a Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`);
//! - a `.gguf` file (weights, tokenizer and chat template in one).
//!
//! For the last two the manifest is derived from the files. Either way the [`VersionId`] is a hash
//! of the manifest, which holds every file's sha256: the same bytes always get the same id.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The file name of a manifest inside a model folder.
pub const MANIFEST_FILE: &str = "keel.toml";

/// The model architectures this build implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT sentence encoder (safetensors + `config.json` + `tokenizer.json`): embeddings.
    Bert,
    /// Llama decoder (GGUF with its tokenizer): text generation.
    Llama,
    /// Tabular classifier (safetensors; `features` and `labels` in the manifest).
    Mlp,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Bert => "bert",
            Architecture::Llama => "llama",
            Architecture::Mlp => "mlp",
        })
    }
}

/// One file of a model version and its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the model folder.
    pub path: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
}

/// A model version's manifest (`keel.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// A human-readable name.
    pub name: String,
    /// The architecture that reads the files.
    pub architecture: Architecture,
    /// The weights: a `.safetensors` file (bert) or a `.gguf` file (llama).
    pub weights: String,
    /// transformers' `config.json` (bert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// A tokenizers `tokenizer.json` (bert; llama reads its tokenizer from the GGUF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Longest input in tokens, where the model was trained for less than its positions allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// The input fields a tabular model reads, in the order it reads them (mlp).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The classes' names, in the order of the model's outputs (mlp).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Every file above, with its sha256.
    pub files: Vec<FileEntry>,
    /// The production modules' own tables (`[contract]`, `[drift]`, ...), kept as written: the
    /// engine does not read them, but they are part of the version (its id hashes them).
    #[serde(flatten)]
    pub sections: toml::Table,
}

/// A content-derived model version id: the sha256 of the manifest (which holds every file's sha256).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct VersionId(String);

impl VersionId {
    /// The full id (64 hex digits).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A version id from its text (64 hex digits, as [`VersionId::as_str`] gives it).
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(text.to_ascii_lowercase()))
    }

    #[cfg(test)]
    pub(crate) fn from_hex(hex: String) -> Self {
        Self(hex)
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VersionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The lower-case hex sha256 of a file, read in chunks (weight files can be large).
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| {
        Error::Model(keel_models::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex_digest(&hasher.finalize()))
}

pub(crate) fn hex_digest(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A manifest together with the folder its paths are relative to.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// The folder holding the model's files.
    pub folder: PathBuf,
    /// The manifest, read or derived.
    pub manifest: Manifest,
}

impl ModelSource {
    /// Reads the model at `path` (any of the three forms in the module docs). For a Keel folder
    /// every file's sha256 is checked against the manifest; for the other forms it is computed.
    pub fn open(path: &Path) -> Result<Self> {
        let not_a_model = |reason: &str| Error::NotAModel {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !path.exists() {
            return Err(not_a_model("no such file or folder"));
        }
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(not_a_model(
                    "a model file must be a .gguf (or name a model folder)",
                ));
            }
            let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let weights = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| not_a_model("bad file name"))?;
            let name = weights.trim_end_matches(".gguf").to_string();
            let manifest = Manifest {
                name,
                architecture: Architecture::Llama,
                weights: weights.to_string(),
                config: None,
                tokenizer: None,
                max_tokens: None,
                features: Vec::new(),
                labels: Vec::new(),
                files: vec![FileEntry {
                    path: weights.to_string(),
                    sha256: sha256_file(path)?,
                }],
                sections: toml::Table::new(),
            };
            return Ok(Self { folder, manifest });
        }
        let manifest_path = path.join(MANIFEST_FILE);
        if manifest_path.is_file() {
            let source = Self {
                folder: path.to_path_buf(),
                manifest: Manifest::read(&manifest_path)?,
            };
            source.verify()?;
            return Ok(source);
        }
        if path.join("config.json").is_file() {
            return Self::derive_hf(path);
        }
        Err(not_a_model(
            "expected keel.toml, a Hugging Face folder (config.json) or a .gguf file",
        ))
    }

    /// The manifest of a Hugging Face folder, derived from its files (every file hashed), whatever
    /// `keel.toml` the folder holds: what `keel inspect --write-manifest` writes.
    ///
    /// # Errors
    /// A folder without `config.json`, `model.safetensors` or `tokenizer.json`, an unknown
    /// architecture.
    pub fn derive(folder: &Path) -> Result<Self> {
        if !folder.join("config.json").is_file() {
            return Err(Error::NotAModel {
                path: folder.to_path_buf(),
                reason: "a manifest is derived from a Hugging Face folder (config.json, model.safetensors, tokenizer.json)".into(),
            });
        }
        Self::derive_hf(folder)
    }

    fn derive_hf(folder: &Path) -> Result<Self> {
        let missing = |what: &str| Error::NotAModel {
            path: folder.to_path_buf(),
            reason: format!("a Hugging Face folder needs {what}"),
        };
        let config_text =
            std::fs::read_to_string(folder.join("config.json")).map_err(|source| keel_models::Error::Io {
                path: folder.join("config.json"),
                source,
            })?;
        let config: serde_json::Value =
            serde_json::from_str(&config_text).map_err(|e| keel_models::Error::Format {
                path: folder.join("config.json"),
                format: "config.json",
                reason: e.to_string(),
            })?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("(none)");
        if model_type != "bert" {
            return Err(keel_models::Error::UnknownArchitecture(model_type.to_string()).into());
        }
        for file in ["model.safetensors", "tokenizer.json"] {
            if !folder.join(file).is_file() {
                return Err(missing(file));
            }
        }
        // sentence-transformers records the length the model was trained for.
        let max_tokens = std::fs::read_to_string(folder.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .map(|n| n as usize);
        let name = config
            .get("_name_or_path")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(|s| s.rsplit('/').next().unwrap_or(s).to_string())
            .or_else(|| folder.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "bert".into());
        let files = ["model.safetensors", "config.json", "tokenizer.json"]
            .iter()
            .map(|f| {
                Ok(FileEntry {
                    path: f.to_string(),
                    sha256: sha256_file(&folder.join(f))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let manifest = Manifest {
            name,
            architecture: Architecture::Bert,
            weights: "model.safetensors".into(),
            config: Some("config.json".into()),
            tokenizer: Some("tokenizer.json".into()),
            max_tokens,
            features: Vec::new(),
            labels: Vec::new(),
            files,
            sections: toml::Table::new(),
        };
        Ok(Self {
            folder: folder.to_path_buf(),
            manifest,
        })
    }

    /// The version that runs these files with `weights`: another weight path computes other
    /// numbers from the same files, so it is a version of its own (its name says which).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for int8 on a decoder: its GGUF weights are already quantized
    /// (int8 quantizes an encoder's f32 matrices).
    pub fn with_weights(mut self, weights: keel_models::llama::WeightPath) -> Result<Self> {
        use keel_models::llama::WeightPath;
        match weights {
            WeightPath::Quantized => {}
            WeightPath::F32 => self.manifest.name.push_str(" (f32)"),
            WeightPath::Int8 if self.manifest.architecture == Architecture::Llama => {
                return Err(Error::InvalidArgument(format!(
                    "int8 weights are for encoders' f32 matrices; {} is a GGUF decoder whose weights are \
                     already quantized: use quantized (as stored) or f32",
                    self.manifest.name
                )))
            }
            WeightPath::Int8 => self.manifest.name.push_str(" (int8)"),
        }
        Ok(self)
    }

    /// Checks every file's sha256 against the manifest.
    pub fn verify(&self) -> Result<()> {
        for entry in &self.manifest.files {
            let path = self.folder.join(&entry.path);
            let actual = sha256_file(&path)?;
            if !actual.eq_ignore_ascii_case(&entry.sha256) {
                return Err(Error::ChecksumMismatch {
                    path,
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// The absolute path of a file named by the manifest.
    pub fn file(&self, relative: &str) -> PathBuf {
        self.folder.join(relative)
    }

    /// The content-derived id of this version.
    pub fn version_id(&self) -> VersionId {
        let canonical = toml::to_string(&self.manifest).expect("a manifest always serializes");
        VersionId(hex_digest(&Sha256::digest(canonical.as_bytes())))
    }
}

impl Manifest {
    /// Reads and checks a `keel.toml`: every file it names must be listed with a sha256, and no
    /// path may leave the model folder.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| keel_models::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let folder = path.parent().unwrap_or(Path::new(".")).display().to_string();
        let remedy = format!(
            "write it with `keel inspect --write-manifest {folder}` (derived from the files), or delete \
             it to load the folder as a Hugging Face folder"
        );
        if text.trim().is_empty() {
            return Err(bad(format!("the file is empty: {remedy}")));
        }
        let manifest: Manifest = toml::from_str(&text).map_err(|e| {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            bad(format!("{first}; fix it, or {remedy}"))
        })?;
        let named = [
            Some(&manifest.weights),
            manifest.config.as_ref(),
            manifest.tokenizer.as_ref(),
        ];
        for file in named.into_iter().flatten() {
            if !manifest.files.iter().any(|f| &f.path == file) {
                return Err(bad(format!(
                    "'{file}' is used but has no entry (with its sha256) in [[files]]"
                )));
            }
        }
        for f in &manifest.files {
            let p = Path::new(&f.path);
            if p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(bad(format!(
                    "'{}' must be a path inside the model folder",
                    f.path
                )));
            }
            if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(format!("sha256 of '{}' is not 64 hex digits", f.path)));
            }
        }
        match manifest.architecture {
            Architecture::Bert if manifest.config.is_none() || manifest.tokenizer.is_none() => {
                Err(bad("a bert model needs `config` and `tokenizer`".into()))
            }
            Architecture::Mlp if manifest.features.is_empty() || manifest.labels.len() < 2 => Err(bad(
                "an mlp model needs `features` (its input fields) and at least two `labels`".into(),
            )),
            _ => Ok(manifest),
        }
    }

    /// A production module's table (`[contract]`, `[drift]`), if the manifest has one.
    pub fn section(&self, name: &str) -> Option<&toml::Table> {
        self.sections.get(name)?.as_table()
    }

    /// The manifest as `keel.toml` text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serializes")
    }
}
