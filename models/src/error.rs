use std::path::PathBuf;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A weight, config or tokenizer file that is truncated, corrupt or not of the expected format.
    #[error("{path} is not a valid {format} file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it was read as ("safetensors", "GGUF", "config.json", ...).
        format: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is not in the weights, or has the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// The weights are of an architecture this build does not implement.
    #[error("unknown architecture '{0}' (this build knows: bert, llama)")]
    UnknownArchitecture(String),
    /// The tokenizer could not be built or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An empty text (or an empty batch) where there must be something to process.
    #[error("empty input: {0}")]
    EmptyInput(String),
    /// Bytes that are not valid UTF-8 where text was expected.
    #[error("input is not valid UTF-8 (at byte {valid_up_to})")]
    InvalidUtf8 {
        /// How many bytes were valid before the first invalid one.
        valid_up_to: usize,
    },
    /// More tokens than the model's context window holds.
    #[error("{tokens} tokens do not fit in the model's context of {context} tokens")]
    ContextOverflow {
        /// Tokens needed (prompt plus what was asked to be generated, where known).
        tokens: usize,
        /// The context length.
        context: usize,
    },
    /// An error raised by the backend.
    #[error(transparent)]
    Kernel(#[from] keel_kernels::Error),
}

impl From<keel_kernels::candle_core::Error> for Error {
    fn from(e: keel_kernels::candle_core::Error) -> Self {
        Error::Kernel(e.into())
    }
}

/// The result type of the models crate.
pub type Result<T> = std::result::Result<T, Error>;
