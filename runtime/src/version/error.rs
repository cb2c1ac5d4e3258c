use crate::ErrorKind;

/// What can go wrong in the version layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine failed (loading or running a model).
    #[error(transparent)]
    Engine(#[from] crate::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// No version is registered under this model name.
    #[error("no model named '{0}' is registered")]
    UnknownName(String),
    /// The name has no such alias.
    #[error("model '{name}' has no alias '{alias}'")]
    UnknownAlias {
        /// The model name.
        name: String,
        /// The alias.
        alias: String,
    },
    /// No registered version of the name matches.
    #[error("model '{name}' has no registered version '{version}'")]
    UnknownVersion {
        /// The model name.
        name: String,
        /// The version as given (an id or a prefix of one).
        version: String,
    },
    /// A version id that no name of the store has registered (loading it into the engine does
    /// not register it).
    #[error("version {0} is not registered in the store: register it first (Versioned::register, keel_registry_register, keel registry register)")]
    Unregistered(String),
    /// The store has no lineage record of this request id.
    #[error("no lineage record of request '{0}'")]
    UnknownRequest(String),
    /// A version's files changed since it was registered: it is refused.
    #[error("version {version} was registered with {file} of sha256 {registered}, but it is now {actual}: refusing to load it")]
    Tampered {
        /// The version id.
        version: String,
        /// The file that changed.
        file: String,
        /// Its sha256 at registration.
        registered: String,
        /// Its sha256 now.
        actual: String,
    },
    /// A prediction that cannot be replayed, and why.
    #[error("request '{request_id}' cannot be replayed: {reason}")]
    NotReplayable {
        /// The request id.
        request_id: String,
        /// Why (input not retained, version files gone).
        reason: String,
    },
    /// An operation the routes do not allow now (promote with no canary, rollback with no
    /// history), or an argument out of range.
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    /// The broad class of the error, in the engine's vocabulary.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Engine(e) => e.kind(),
            Error::Store(_) => ErrorKind::Storage,
            Error::UnknownName(_)
            | Error::UnknownAlias { .. }
            | Error::UnknownVersion { .. }
            | Error::Unregistered(_)
            | Error::UnknownRequest(_)
            | Error::NotReplayable { .. } => ErrorKind::NotFound,
            Error::Tampered { .. } => ErrorKind::InvalidModel,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
        }
    }
}

/// The result type of the version layer.
pub type Result<T> = std::result::Result<T, Error>;
