//! Weight files, memory-mapped and checked before anything reads a tensor from them.

use crate::{Error, Result};
use keel_kernels::candle_core::quantized::{gguf_file, QTensor};
use keel_kernels::{candle_core, DType, Tensor};

/// Files are read into host memory; a model uploads what it keeps to its device.
const HOST: candle_core::Device = candle_core::Device::Cpu;
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// The index of the first NaN or infinity among little-endian f32, f16 or bf16 values.
fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        // All-ones exponent: f16 5 bits (0x7c00), bf16 8 bits (0x7f80).
        DType::F16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
        DType::BF16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        _ => None,
    }
}

fn map(path: &Path) -> Result<Mmap> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only; Keel's weight files are not modified while a model is loaded
    // (the manifest's sha256 check at load time is what guards their content).
    unsafe { Mmap::map(&file) }.map_err(io)
}

/// A safetensors file, memory-mapped; its header is parsed and bounds-checked once at open.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (offsets, sizes, dtypes) against the file's length.
    pub fn open(path: &Path) -> Result<Self> {
        let mmap = map(path)?;
        let bad = |reason: String| Error::Format {
            path: path.to_path_buf(),
            format: "safetensors",
            reason,
        };
        // `deserialize` checks that every tensor lies inside the file and that sizes match dtypes.
        SafeTensors::deserialize(&mmap).map_err(|e| bad(e.to_string()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header_len,
            metadata,
        })
    }

    /// The tensor names in the file.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// The dtype and shape of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        self.metadata.info(name).map(|i| (i.dtype, i.shape.clone()))
    }

    /// Loads tensor `name` as f32 into host memory (upload it with [`Device::upload`]), checking
    /// that it has the `expected` shape.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| Error::Weights(format!("{} has no tensor '{name}'", self.path.display())))?;
        if info.shape != expected {
            return Err(Error::Weights(format!(
                "'{name}' has shape {:?}, expected {expected:?}",
                info.shape
            )));
        }
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::Weights(format!(
                    "'{name}' has dtype {other:?}; Keel reads f32, f16, bf16"
                )))
            }
        };
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        // A NaN or an infinity in the weights would turn every output it touches into NaN.
        if let Some(i) = first_non_finite(&self.mmap[start..end], dtype) {
            return Err(Error::Weights(format!(
                "'{name}' in {} holds a non-finite value (NaN or infinity) at element {i}: the file is corrupt",
                self.path.display()
            )));
        }
        // Straight from the page cache into the tensor: one copy when the dtype is already f32.
        let tensor = candle_core::Tensor::from_raw_buffer(&self.mmap[start..end], dtype, &info.shape, &HOST)?;
        Ok(if dtype == DType::F32 {
            tensor
        } else {
            tensor.to_dtype(DType::F32)?
        }
        .into())
    }
}

/// A GGUF file, memory-mapped; its header and metadata are parsed and bounds-checked at open.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    content: gguf_file::Content,
}

impl GgufFile {
    /// Maps `path` and parses its header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<Self> {
        let mmap = map(path)?;
        let content = gguf_file::Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "GGUF",
            reason: keel_kernels::one_line(&e),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and tensor table.
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// A block-quantized (or plain) tensor by name in host memory, checked against the file's
    /// length.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::Weights(format!(
                "{} has no tensor '{name}'",
                self.path.display()
            )));
        }
        let tensor = self
            .content
            .tensor(&mut Cursor::new(&self.mmap[..]), name, &HOST)
            .map_err(|e| Error::Format {
                path: self.path.clone(),
                format: "GGUF",
                reason: keel_kernels::one_line(&e),
            })?;
        Ok(tensor)
    }

    /// A tensor by name, dequantized to f32 in host memory.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(&HOST)?.into())
    }

    fn value(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content.metadata.get(key).ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &str) -> Error {
        Error::Format {
            path: self.path.clone(),
            format: "GGUF",
            reason: format!("metadata key '{key}' is missing"),
        }
    }

    fn wrong_type(&self, key: &str, e: impl std::fmt::Display) -> Error {
        Error::Format {
            path: self.path.clone(),
            format: "GGUF",
            reason: format!("metadata key '{key}': {e}"),
        }
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Result<&str> {
        self.value(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| self.wrong_type(key, e))
    }

    /// An integer metadata value of any width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        use gguf_file::Value::*;
        let v = self.value(key)?;
        let n: i128 = match v {
            U8(x) => *x as i128,
            I8(x) => *x as i128,
            U16(x) => *x as i128,
            I16(x) => *x as i128,
            U32(x) => *x as i128,
            I32(x) => *x as i128,
            U64(x) => *x as i128,
            I64(x) => *x as i128,
            _ => return Err(self.wrong_type(key, "not an integer")),
        };
        usize::try_from(n).map_err(|e| self.wrong_type(key, e))
    }

    /// A float metadata value.
    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.value(key)? {
            gguf_file::Value::F32(x) => Ok(*x),
            gguf_file::Value::F64(x) => Ok(*x as f32),
            _ => Err(self.wrong_type(key, "not a float")),
        }
    }

    /// An array metadata value, each element converted by `f`.
    pub fn array<T>(&self, key: &str, f: impl Fn(&gguf_file::Value) -> Option<T>) -> Result<Vec<T>> {
        let items = self.value(key)?.to_vec().map_err(|e| self.wrong_type(key, e))?;
        items
            .iter()
            .map(|v| f(v).ok_or_else(|| self.wrong_type(key, "element of the wrong type")))
            .collect()
    }

    /// Whether a metadata key is present.
    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }
}
