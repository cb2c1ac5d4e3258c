//! The one prediction path: every task (embed, classify, generate) is an [`InferRequest`]
//! answered by an [`InferResponse`] that says how it was made, whole ([`Infer::infer`]) or
//! streamed token by token ([`Infer::infer_stream`]). The production modules are layers that
//! implement [`Infer`] around the one below them (the [`crate::Engine`] at the bottom), reading
//! the request's [`Target`] and adding typed [`Notes`] on the way.

use crate::generate::{Completion, GenerateParams, InferStream};
use crate::manifest::VersionId;
use crate::notes::Notes;
use crate::request::Request;
use crate::target::Target;
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
    /// The class of each row of named values (a tabular classifier).
    Classify(Vec<Record>),
    /// A reply to a prompt, run to its end (a decoder).
    Generate {
        /// The prompt.
        prompt: String,
        /// How to generate.
        params: GenerateParams,
    },
}

impl Input {
    /// The task's name: "embed", "classify" or "generate".
    pub fn task(&self) -> &'static str {
        match self {
            Input::Embed(_) => "embed",
            Input::Classify(_) => "classify",
            Input::Generate { .. } => "generate",
        }
    }
}

/// One value of a tabular row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number (an integer is a number too; NaN and infinities are kept as they came).
    Number(f64),
    /// Text: a category, a timestamp (RFC 3339), or a number not parsed yet.
    Text(String),
    /// Numbers with a shape (a nested list), row-major.
    Tensor {
        /// The extent of each dimension.
        shape: Vec<usize>,
        /// The values, row-major.
        values: Vec<f64>,
    },
    /// An explicit null (JSON `null`, an empty CSV cell).
    Null,
}

impl Value {
    /// The value of a JSON value: numbers, strings, null, and (nested, rectangular) lists of
    /// numbers. Booleans are numbers 0 and 1; objects and ragged lists are refused.
    ///
    /// ```
    /// use keel::Value;
    /// let v = Value::from_json(&serde_json::json!([[1, 2], [3, 4]])).unwrap();
    /// assert_eq!(v, Value::Tensor { shape: vec![2, 2], values: vec![1.0, 2.0, 3.0, 4.0] });
    /// ```
    pub fn from_json(json: &serde_json::Value) -> std::result::Result<Self, String> {
        use serde_json::Value as J;
        match json {
            J::Null => Ok(Value::Null),
            J::Bool(b) => Ok(Value::Number(f64::from(u8::from(*b)))),
            J::Number(n) => Ok(Value::Number(n.as_f64().unwrap_or(f64::NAN))),
            J::String(s) => Ok(Value::Text(s.clone())),
            J::Array(_) => {
                let mut shape = Vec::new();
                let mut at = json;
                while let J::Array(items) = at {
                    shape.push(items.len());
                    match items.first() {
                        Some(first) => at = first,
                        None => break,
                    }
                }
                let mut values = Vec::with_capacity(shape.iter().product());
                flatten(json, &shape, &mut values)?;
                Ok(Value::Tensor { shape, values })
            }
            J::Object(_) => Err("an object is not a value".into()),
        }
    }

    /// The value as JSON (a tensor as a nested list; a non-finite number as null).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        fn nest(shape: &[usize], values: &[f64]) -> J {
            match shape {
                [] => values.first().map_or(J::Null, |x| serde_json::json!(x)),
                [_] => J::Array(values.iter().map(|x| serde_json::json!(x)).collect()),
                [n, rest @ ..] => {
                    let step = rest.iter().product::<usize>();
                    J::Array(
                        (0..*n)
                            .map(|i| nest(rest, &values[i * step..(i + 1) * step]))
                            .collect(),
                    )
                }
            }
        }
        match self {
            Value::Number(x) => serde_json::json!(x),
            Value::Text(s) => J::String(s.clone()),
            Value::Tensor { shape, values } => nest(shape, values),
            Value::Null => J::Null,
        }
    }
}

fn flatten(json: &serde_json::Value, shape: &[usize], out: &mut Vec<f64>) -> std::result::Result<(), String> {
    match (json, shape) {
        (serde_json::Value::Number(n), []) => {
            out.push(n.as_f64().unwrap_or(f64::NAN));
            Ok(())
        }
        (serde_json::Value::Array(items), [n, rest @ ..]) if items.len() == *n => {
            items.iter().try_for_each(|item| flatten(item, rest, out))
        }
        _ => Err("a list must be rectangular and hold only numbers".into()),
    }
}

/// One row of named values: a tabular model's input.
pub type Record = BTreeMap<String, Value>;

/// A classifier's answer for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// The most probable class's index in the model's `labels`.
    pub class: usize,
    /// Its name.
    pub label: String,
    /// Each class's probability, in the order of the model's `labels`.
    pub probabilities: Vec<f32>,
}

/// How sure a classifier was of one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    /// The top class's probability.
    pub max_probability: f64,
    /// The top probability minus the second's.
    pub margin: f64,
    /// The entropy of the probabilities (nats).
    pub entropy: f64,
}

impl Classification {
    /// How sure the model was.
    ///
    /// ```
    /// let c = keel::Classification { class: 0, label: "a".into(), probabilities: vec![0.75, 0.25] };
    /// let s = c.confidence();
    /// assert_eq!((s.max_probability, s.margin), (0.75, 0.5));
    /// ```
    pub fn confidence(&self) -> Confidence {
        let mut top = [0.0f64; 2];
        let mut entropy = 0.0;
        for &p in &self.probabilities {
            let p = f64::from(p);
            if p > top[0] {
                top = [p, top[0]];
            } else if p > top[1] {
                top[1] = p;
            }
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
        Confidence {
            max_probability: top[0],
            margin: top[0] - top[1],
            entropy,
        }
    }
}

/// What was computed.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// One unit-length vector per text, in input order.
    Embeddings(Vec<Vec<f32>>),
    /// One answer per row, in input order.
    Classes(Vec<Classification>),
    /// A finished generation.
    Completion(Completion),
}

impl Output {
    /// The vectors, for an embedding.
    pub fn embeddings(&self) -> Option<&[Vec<f32>]> {
        match self {
            Output::Embeddings(v) => Some(v),
            _ => None,
        }
    }

    /// The answers, for a classification.
    pub fn classes(&self) -> Option<&[Classification]> {
        match self {
            Output::Classes(c) => Some(c),
            _ => None,
        }
    }

    /// The completion, for a generation.
    pub fn completion(&self) -> Option<&Completion> {
        match self {
            Output::Completion(c) => Some(c),
            _ => None,
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
    /// Whose request it is: the caller's, or the version layer's own (a shadow copy, a replay),
    /// which the review and cost layers neither queue nor charge to the caller's budget.
    pub purpose: Purpose,
    /// The model version it goes to, resolved once at the top of the stack (the version layer,
    /// or the stack itself); None until then.
    pub target: Option<Target>,
    /// What the layers above noted for the layers below (a route, a contract verdict); the
    /// engine copies them onto the answer.
    pub notes: Notes,
}

/// Why a request runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A caller's prediction.
    #[default]
    Serve,
    /// A copy of a production request run on the canary in shadow mode (never returned).
    Shadow,
    /// A recorded prediction run again to check it (`Versioned::replay`).
    Replay,
}

impl InferRequest {
    /// Embeddings of `texts` by `model`, with a new id and the default options.
    pub fn embed<S: Into<String>>(model: &str, texts: impl IntoIterator<Item = S>) -> Self {
        Self::new(model, Input::Embed(texts.into_iter().map(Into::into).collect()))
    }

    /// The classes of `rows` by a tabular `model`, with a new id and the default options.
    pub fn classify(model: &str, rows: Vec<Record>) -> Self {
        Self::new(model, Input::Classify(rows))
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
            purpose: Purpose::Serve,
            target: None,
            notes: Notes::default(),
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

    /// With a routing key or none.
    pub fn with_key(mut self, key: Option<String>) -> Self {
        self.key = key;
        self
    }

    /// With these controls.
    pub fn options(mut self, options: Request) -> Self {
        self.options = options;
        self
    }

    /// The version the request goes to.
    ///
    /// # Errors
    /// [`crate::Error::Internal`] if nothing above resolved it (a layer used outside a
    /// [`crate::stack::Stack`] with no version layer over it).
    pub fn target(&self) -> Result<&Target> {
        self.target.as_ref().ok_or_else(|| {
            crate::Error::Internal(format!(
                "request {} reached a layer before its model '{}' was resolved: build the layers with keel::stack::Stack",
                self.id, self.model
            ))
        })
    }
}

/// The token ids of an embedding's texts (each with its special tokens, before any cut), which a
/// layer above the engine already computed (the contract layer counts them): noted on the
/// request, so that the engine does not tokenize the texts again. The engine takes it off the
/// request (it is not on the answer) and uses it only if it is for the version that answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds {
    /// The version whose tokenizer made them.
    pub version: VersionId,
    /// One sequence per text, in order.
    pub ids: Vec<Vec<u32>>,
}

impl crate::Note for TokenIds {
    fn key(&self) -> &'static str {
        "token_ids"
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self.ids.iter().map(Vec::len).collect::<Vec<_>>())
    }
}

/// The input as the caller sent it, before any layer repaired it: copied once at the top of the
/// stack and shared, rather than copied by each layer that keeps it (lineage hashes it, a review
/// ticket shows it). Not recorded: its JSON is null.
#[derive(Debug, Clone, PartialEq)]
pub struct Received(pub std::sync::Arc<Input>);

impl crate::Note for Received {
    fn key(&self) -> &'static str {
        "received"
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Null
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
    /// The texts an encoder cut to its maximum number of tokens (see
    /// [`crate::Request::truncate`]).
    pub truncated: Vec<Truncated>,
    /// Tokens run: an encoder's input tokens (after truncation; those the response cache
    /// answered included), a decoder's prompt plus generated tokens, 0 for a tabular model.
    pub tokens: usize,
    /// Time per stage.
    pub timings: Timings,
    /// What the layers noted (the version layer's route, the contract's verdict, the price,
    /// the review decision), typed; the lineage record keeps each as JSON by its key.
    pub notes: Notes,
}

/// A text that was longer than the model reads: only its first `kept` tokens were embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// The text's index in the request.
    pub text: usize,
    /// Its length in tokens.
    pub tokens: usize,
    /// The tokens embedded (the model's maximum).
    pub kept: usize,
}

/// An answer and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    /// What was computed.
    pub output: Output,
    /// How.
    pub meta: Meta,
}

/// A service that answers predictions: the engine, and each production layer around the one
/// below it (a layer knows only that one).
pub trait Infer: Send + Sync {
    /// The version a request for `model` would go to now, without running anything (a name's
    /// production version; a router reads its queue from it).
    ///
    /// # Errors
    /// An unknown model.
    fn target(&self, model: &str) -> Result<Target>;

    /// Answers one request.
    ///
    /// # Errors
    /// The engine's errors ([`crate::Error`]); a layer may refuse a request for its own reasons.
    fn infer(&self, request: InferRequest) -> Result<InferResponse>;

    /// Starts a generation and streams its tokens; every layer sees it as it does a whole
    /// request (checked, priced, observed, judged, recorded), token by token.
    ///
    /// # Errors
    /// As [`Infer::infer`] for what is known before the first token; an input that is not a
    /// generation.
    fn infer_stream(&self, request: InferRequest) -> Result<InferStream>;
}
