//! Keel: an embedded inference runtime.
//!
//! A host process links Keel in and runs real models with it: no server. The [`Engine`] loads
//! model versions (from a Keel model folder, a Hugging Face folder or a `.gguf` file), gives each
//! a content-derived [`VersionId`], and serves [`Engine::embed`] and [`Engine::generate`] on them
//! from any number of threads.
//!
//! The layers below it: `keel_kernels` (the backends and their op set) and `keel_models` (the
//! architectures). The production modules of later issues wrap the engine's request path; the
//! engine knows nothing of them.
#![warn(missing_docs)]
// The kernels below hold every unsafe line; the engine and the production layers need none.
#![forbid(unsafe_code)]

mod cache;
#[cfg(feature = "contract")]
pub mod contract;
#[cfg(feature = "cost")]
pub mod cost;
mod engine;
mod error;
mod generate;
mod infer;
mod inspect;
pub mod manifest;
mod model;
mod notes;
#[cfg(feature = "observe")]
pub mod observe;
mod request;
#[cfg(feature = "review")]
pub mod review;
mod scheduler;
pub mod stack;
#[cfg(feature = "store")]
pub mod store;
mod target;
#[cfg(feature = "version")]
pub mod version;

pub use cache::{CacheConfig, CacheStats};
pub use engine::{Embeddings, Engine, EngineBuilder, LoadOptions, ModelInfo};
pub use error::{Error, ErrorKind, Result};
pub use generate::{
    Completion, FinishReason, GenerateParams, Generating, InferStream, Replayed, Step, Token, TokenStream,
    Turn,
};
pub use infer::{
    Classification, Confidence, Infer, InferRequest, InferResponse, Input, Meta, Output, Purpose, Received,
    Record, RequestId, Timings, TokenIds, Truncated, Value,
};
pub use inspect::{inspect, Inspection, TensorSummary};
pub use keel_kernels::{cuda, Caps, Device, DeviceKind};
pub use keel_models::llama::WeightPath;
pub use keel_models::sampling::Sampling;
pub use manifest::{Architecture, Manifest, VersionId};
pub use notes::{Note, Notes};
pub use request::{Priority, Request, Truncate};
pub use scheduler::{SchedulerConfig, SchedulerStats};
pub use target::{ModelVersion, Target};

/// README.md's Rust snippets, compiled as doctests (scripts/check-docs.py runs the others).
#[cfg(all(doctest, feature = "version"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeSnippets;
