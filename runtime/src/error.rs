use std::path::PathBuf;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running a model failed (bad files, bad input, backend errors).
    #[error(transparent)]
    Model(#[from] keel_models::Error),
    /// A `keel.toml` that cannot be read or does not describe a loadable model.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file whose content is not what the manifest says it is.
    #[error("sha256 of {path} is {actual}, but the manifest says {expected}: refusing to load it")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The digest the manifest names.
        expected: String,
        /// The digest of the file on disk.
        actual: String,
    },
    /// A path that is neither a Keel model folder, a Hugging Face folder nor a `.gguf` file.
    #[error("{path} is not a model: {reason}")]
    NotAModel {
        /// The path.
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// No loaded model version or alias has this name.
    #[error("no model named '{0}' is loaded")]
    UnknownModel(String),
    /// The model cannot do what was asked (embedding with a decoder, generating with an encoder).
    #[error("model '{model}' is a {architecture} model and cannot {task}")]
    WrongTask {
        /// The model as named by the caller.
        model: String,
        /// Its architecture.
        architecture: String,
        /// What was asked.
        task: &'static str,
    },
    /// An argument out of its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The model version's queue is full: the request was refused at once (load shedding).
    /// Retry later, or elsewhere.
    #[error("model '{model}' is overloaded: its queue holds {capacity} requests")]
    Overloaded {
        /// The model as named by the caller.
        model: String,
        /// The queue's capacity.
        capacity: usize,
    },
    /// The request's deadline passed before it ran (it was never run), or before its answer
    /// was ready.
    #[error("deadline exceeded after {waited:?}")]
    DeadlineExceeded {
        /// How long the request had been submitted.
        waited: std::time::Duration,
    },
    /// The engine (or this model version) is shutting down and takes no more requests, or
    /// stopped before this one could run.
    #[error("the engine is shutting down: {0}")]
    ShuttingDown(String),
    /// A failure inside Keel (a panic in a worker caught and reported, a worker gone).
    #[error("internal error: {0}")]
    Internal(String),
    /// A production layer around the engine refused the request for a reason of its own (a
    /// broken data contract): its own error, which `source.downcast_ref` recovers.
    #[error("{source}")]
    Refused {
        /// The class the layer gives it.
        kind: ErrorKind,
        /// The layer's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The broad class of an [`Error`]: what a caller (or the C ABI's status code) branches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (bad argument, empty text, invalid UTF-8, too long a prompt).
    InvalidArgument,
    /// A file, model or alias that does not exist.
    NotFound,
    /// A file that exists but is corrupt, truncated, of an unknown architecture, or fails its
    /// checksum.
    InvalidModel,
    /// The requested device is not available.
    NoDevice,
    /// A failure inside Keel or its backend.
    Internal,
    /// The request was shed because the model's queue is full: retry later.
    Overloaded,
    /// The request's deadline passed before it ran.
    DeadlineExceeded,
    /// The engine is shutting down and takes no more requests.
    ShuttingDown,
    /// A production module's store failed or cannot be used (not writable, not a Keel store,
    /// from a newer schema). The engine itself never returns it.
    Storage,
    /// The input broke the model's data contract (the contract layer refused it). The engine
    /// itself never returns it.
    Contract,
    /// The review policy blocked the prediction, or holds it for a reviewer (the error names
    /// the ticket). The engine itself never returns it.
    Review,
    /// The caller's cost budget cannot pay for the request. The engine itself never returns it.
    Budget,
}

impl Error {
    /// The class of this error. This is the one place where errors are sorted into classes.
    pub fn kind(&self) -> ErrorKind {
        use keel_models::Error as M;
        match self {
            Error::Model(m) => match m {
                M::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                M::Io { .. } => ErrorKind::InvalidModel,
                M::Format { .. } | M::Weights(_) | M::UnknownArchitecture(_) => ErrorKind::InvalidModel,
                M::Tokenizer(_) => ErrorKind::InvalidArgument,
                M::EmptyInput(_) | M::InvalidUtf8 { .. } | M::ContextOverflow { .. } => {
                    ErrorKind::InvalidArgument
                }
                M::Kernel(keel_kernels::Error::NoSuchDevice { .. }) => ErrorKind::NoDevice,
                M::Kernel(_) => ErrorKind::Internal,
            },
            Error::Manifest { .. } | Error::ChecksumMismatch { .. } => ErrorKind::InvalidModel,
            Error::NotAModel { .. } => ErrorKind::NotFound,
            Error::UnknownModel(_) => ErrorKind::NotFound,
            Error::WrongTask { .. } | Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            Error::ShuttingDown(_) => ErrorKind::ShuttingDown,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Refused { kind, .. } => *kind,
        }
    }
}

impl From<keel_kernels::Error> for Error {
    fn from(e: keel_kernels::Error) -> Self {
        Error::Model(e.into())
    }
}

/// The result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;
