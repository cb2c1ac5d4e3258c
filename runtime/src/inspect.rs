//! What a model file holds, without loading it: for `keel inspect`.

use crate::manifest::{Architecture, ModelSource, VersionId};
use crate::{Manifest, Result};
use keel_models::weights::{GgufFile, SafetensorsFile};
use std::path::Path;

/// One tensor of a weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSummary {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its stored dtype (`F32`, `Q4_1`, ...).
    pub dtype: String,
    /// Its shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Bytes it takes in the file.
    pub bytes: usize,
}

/// A model's manifest (read or derived, sha256s included), version id and tensors.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The manifest.
    pub manifest: Manifest,
    /// The version id the engine would give it.
    pub id: VersionId,
    /// Every tensor of the weight file, sorted by name.
    pub tensors: Vec<TensorSummary>,
}

/// Reads the manifest and tensor table of the model at `path` (checking sha256s where the
/// manifest has them) without loading any weights.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let source = ModelSource::open(path)?;
    let weights = source.file(&source.manifest.weights);
    let mut tensors = match source.manifest.architecture {
        Architecture::Bert => {
            let file = SafetensorsFile::open(&weights)?;
            file.names()
                .into_iter()
                .filter_map(|name| {
                    let (dtype, shape) = file.info(&name)?;
                    let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                    Some(TensorSummary {
                        name,
                        dtype: format!("{dtype:?}"),
                        shape,
                        bytes,
                    })
                })
                .collect()
        }
        Architecture::Llama => {
            let file = GgufFile::open(&weights)?;
            file.content()
                .tensor_infos
                .iter()
                .map(|(name, info)| {
                    let elems = info.shape.elem_count();
                    let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                    TensorSummary {
                        name: name.clone(),
                        dtype: format!("{:?}", info.ggml_dtype),
                        shape: info.shape.dims().to_vec(),
                        bytes,
                    }
                })
                .collect::<Vec<_>>()
        }
    };
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Inspection {
        id: source.version_id(),
        manifest: source.manifest,
        tensors,
    })
}
