//! The one prediction path: every task (embed, generate) is an [`InferRequest`] answered by an
//! [`InferResponse`] that says how it was made. The production modules are layers that implement
//! [`Infer`] around an inner [`Infer`] (the [`crate::Engine`] at the bottom), reading and
//! annotating requests and responses on the way.

use crate::generate::{Completion, GenerateParams};
use crate::manifest::VersionId;
use crate::request::Request;
use crate::Result;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A request's id: the caller's, or a time-ordered UUIDv7 (ids sort by creation time, so a
/// lineage store indexes them well).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(String);

impl RequestId {
    /// A new time-ordered id (UUIDv7).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::generate()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// What to compute.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Unit-length sentence embeddings of these texts (an encoder).
    Embed(Vec<String>),
    /// A reply to a prompt, run to its end (a decoder).
    Generate {
        /// The prompt.
        prompt: String,
        /// How to generate.
        params: GenerateParams,
    },
}

impl Input {
    /// The task's name: "embed" or "generate".
    pub fn task(&self) -> &'static str {
        match self {
            Input::Embed(_) => "embed",
            Input::Generate { .. } => "generate",
        }
    }
}

/// What was computed.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// One unit-length vector per text, in input order.
    Embeddings(Vec<Vec<f32>>),
    /// A finished generation.
    Completion(Completion),
}

impl Output {
    /// The vectors, for an embedding.
    pub fn embeddings(&self) -> Option<&[Vec<f32>]> {
        match self {
            Output::Embeddings(v) => Some(v),
            Output::Completion(_) => None,
        }
    }

    /// The completion, for a generation.
    pub fn completion(&self) -> Option<&Completion> {
        match self {
            Output::Completion(c) => Some(c),
            Output::Embeddings(_) => None,
        }
    }
}

/// One prediction to make.
///
/// ```
/// use keel::{InferRequest, Request};
/// let r = InferRequest::embed("embed", ["first text", "second"]).key("tenant-7");
/// assert_eq!(r.key.as_deref(), Some("tenant-7"));
/// assert_eq!(r.id.as_str().len(), 36);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The request's id (generated unless the caller gives one).
    pub id: RequestId,
    /// The model as the caller names it: an alias, a version id, or (with the version layer)
    /// `NAME` or `NAME@ALIAS`.
    pub model: String,
    /// What to compute.
    pub input: Input,
    /// Priority, deadline, cache use.
    pub options: Request,
    /// A routing key (tenant, user, session): the same key is routed the same way.
    pub key: Option<String>,
}

impl InferRequest {
    /// Embeddings of `texts` by `model`, with a new id and the default options.
    pub fn embed<S: Into<String>>(model: &str, texts: impl IntoIterator<Item = S>) -> Self {
        Self::new(model, Input::Embed(texts.into_iter().map(Into::into).collect()))
    }

    /// A generation by `model`, with a new id and the default options.
    pub fn generate(model: &str, prompt: &str, params: GenerateParams) -> Self {
        Self::new(
            model,
            Input::Generate {
                prompt: prompt.to_string(),
                params,
            },
        )
    }

    /// A request for `input`, with a new id and the default options.
    pub fn new(model: &str, input: Input) -> Self {
        Self {
            id: RequestId::generate(),
            model: model.to_string(),
            input,
            options: Request::default(),
            key: None,
        }
    }

    /// With the caller's own id.
    pub fn id(mut self, id: impl Into<RequestId>) -> Self {
        self.id = id.into();
        self
    }

    /// With a routing key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// With these controls.
    pub fn options(mut self, options: Request) -> Self {
        self.options = options;
        self
    }
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Tokenizing (and the chat template) on the caller's thread.
    pub prepare: Duration,
    /// Waiting in the model's queue.
    pub queue: Duration,
    /// The forward passes that computed it (the whole batch's, shared with its batch-mates).
    pub forward: Duration,
    /// After the forward passes: assembling the answer, the response cache, decoding text.
    pub post: Duration,
    /// From the engine taking the request to its answer.
    pub total: Duration,
}

/// How an answer was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// The request's id.
    pub request_id: RequestId,
    /// The model as the caller named it.
    pub model: String,
    /// The version that answered.
    pub version: VersionId,
    /// The backend that ran it ("cpu", "wgpu", "cuda").
    pub backend: String,
    /// The batch it ran in (encoders) or the first decoder step it joined (decoders); None when
    /// the response cache answered everything.
    pub batch_id: Option<u64>,
    /// Whether the response cache answered (every text of the request).
    pub cache_hit: bool,
    /// Time per stage.
    pub timings: Timings,
    /// What the layers around the engine added (for instance the version layer's `route`);
    /// the lineage record keeps them.
    pub annotations: BTreeMap<String, String>,
}

/// An answer and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    /// What was computed.
    pub output: Output,
    /// How.
    pub meta: Meta,
}

/// A service that answers predictions: the engine, and each production layer around it.
pub trait Infer: Send + Sync {
    /// Answers one request.
    ///
    /// # Errors
    /// The engine's errors ([`crate::Error`]); a layer may refuse a request for its own reasons.
    fn infer(&self, request: InferRequest) -> Result<InferResponse>;
}
