//! OpenAI's routes: `/v1/models`, `/v1/embeddings`, `/v1/chat/completions`, `/v1/completions`
//! (whole, or streamed as server-sent events). The `model` field is a registry name
//! (`NAME`, `NAME@ALIAS`) or a version id.
//!
//! Sampling: no `temperature` (or 0) is greedy, Keel's default, so that an answer can be
//! replayed; a `temperature` above 0 samples with `top_p` and `seed` (a random seed if none).

use crate::auth::Caller;
use crate::body::Json;
use crate::wire::{keel_headers, keel_object, ApiError};
use crate::{blocking, Server};
use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use keel::{FinishReason, GenerateParams, Infer, InferRequest, InferResponse, Input, Step, Turn};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;

pub(crate) fn routes() -> Router<Server> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

/// A stack request for `caller`: its id, its tenant as the routing key (else the body's `user`),
/// its deadline.
pub(crate) fn request_for(caller: &Caller, model: &str, input: Input, user: Option<String>) -> InferRequest {
    let mut options = keel::Request::default();
    if let Some(d) = caller.deadline {
        options = options.deadline(d);
    }
    InferRequest::new(model, input)
        .id(caller.id.clone())
        .with_key(caller.tenant.clone().or(user))
        .options(options)
}

/// Seconds since the Unix epoch (OpenAI's `created`).
fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `GET /v1/models`: every registered name, and each `NAME@ALIAS`.
async fn models(State(server): State<Server>) -> Result<Response, ApiError> {
    let catalog = blocking(move || match server.stack().versioned() {
        Some(v) => v.catalog(),
        None => Ok(Vec::new()),
    })
    .await??;
    let mut data = Vec::new();
    let mut named = std::collections::BTreeSet::new();
    for entry in &catalog {
        let created = entry.registered / 1000;
        let mut ids: Vec<String> = entry
            .aliases
            .iter()
            .map(|a| format!("{}@{a}", entry.name))
            .collect();
        if entry.aliases.iter().any(|a| a == keel::version::PRODUCTION) && named.insert(entry.name.clone()) {
            ids.insert(0, entry.name.clone());
        }
        for id in ids {
            data.push(json!({
                "id": id,
                "object": "model",
                "created": created,
                "owned_by": "keel",
                "keel": {"version": entry.version.as_str(), "architecture": entry.architecture, "aliases": entry.aliases},
            }));
        }
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    user: Option<String>,
    dimensions: Option<usize>,
}

/// `POST /v1/embeddings`: one text or a list of texts; vectors as floats or base64 (the `openai`
/// Python package asks for base64: little-endian f32).
async fn embeddings(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<EmbeddingsBody>,
) -> Result<Response, ApiError> {
    let texts = match &body.input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad_request("`input` must be a text or a list of texts (token ids are not taken)")
            })?,
        _ => {
            return Err(ApiError::bad_request(
                "`input` must be a text or a non-empty list of texts",
            ))
        }
    };
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format '{other}' is not one of float, base64"
            )))
        }
    };
    let request = request_for(&caller, &body.model, Input::Embed(texts), body.user);
    let stack = server.clone();
    let answer = blocking(move || stack.stack().infer(request)).await??;
    let vectors = answer
        .output
        .embeddings()
        .ok_or_else(|| ApiError::internal("an embedding request was answered with something else"))?;
    if let Some(d) = body.dimensions {
        if vectors.first().is_some_and(|v| v.len() != d) {
            return Err(ApiError::bad_request(format!(
                "dimensions {d}: the model's vectors have {} (it does not shorten them)",
                vectors[0].len()
            )));
        }
    }
    // Serialized from the f32s themselves (no JSON tree of f64s between): each component in
    // its shortest form that reads back as the same f32.
    let data: Vec<EmbeddingItem> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Embedding::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Embedding::Floats(v)
            },
        })
        .collect();
    let tokens = answer.meta.tokens;
    let body = EmbeddingsAnswer {
        object: "list",
        data,
        model: &body.model,
        usage: json!({"prompt_tokens": tokens, "total_tokens": tokens}),
        keel: keel_object(&answer.meta),
    };
    Ok((keel_headers(&answer.meta), axum::Json(body)).into_response())
}

/// `/v1/embeddings`' answer.
#[derive(serde::Serialize)]
struct EmbeddingsAnswer<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem<'a>>,
    model: &'a str,
    usage: Value,
    keel: Value,
}

#[derive(serde::Serialize)]
struct EmbeddingItem<'a> {
    object: &'static str,
    index: usize,
    embedding: Embedding<'a>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Embedding<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

/// The generation fields common to both routes.
#[derive(Deserialize, Default)]
struct Generation {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
    user: Option<String>,
    logprobs: Option<bool>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

impl Generation {
    /// The stack's parameters, within the server's limits.
    fn params(&self, server: &Server) -> Result<GenerateParams, ApiError> {
        let config = server.config();
        let max = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(config.default_max_tokens);
        if max == 0 || max > config.max_tokens {
            return Err(ApiError::bad_request(format!(
                "max_tokens {max} is outside this server's range 1..={}",
                config.max_tokens
            )));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("n: one choice per request is served"));
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::bad_request("logprobs are not served over HTTP yet"));
        }
        let mut params = match self.temperature {
            Some(t) if t != 0.0 => GenerateParams::sampled(
                t,
                0,
                self.top_p.unwrap_or(1.0),
                self.seed.unwrap_or_else(rand::random),
            ),
            _ => GenerateParams::greedy(),
        }
        .max_tokens(max);
        params.stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::bad_request("`stop` must be a text or a list of texts"))?,
            Some(_) => return Err(ApiError::bad_request("`stop` must be a text or a list of texts")),
        };
        Ok(params)
    }

    fn streams(&self) -> bool {
        self.stream == Some(true)
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

#[derive(Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<Message>,
    #[serde(flatten)]
    generation: Generation,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

impl Message {
    /// The message's text: a string, or the text parts of a list.
    fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Array(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(ApiError::bad_request(
                        "only text content is served (parts of type \"text\")",
                    )),
                })
                .collect(),
            _ => Err(ApiError::bad_request(format!(
                "a {} message needs its content",
                self.role
            ))),
        }
    }
}

/// A conversation as the stack takes it: an optional system turn, finished exchanges, the prompt.
fn conversation(messages: &[Message]) -> Result<(Option<String>, Vec<Turn>, String), ApiError> {
    let shape = || {
        ApiError::bad_request(
            "messages must be an optional system message, then user and assistant messages in turn, ending with a user message",
        )
    };
    let mut rest = messages;
    let mut system = None;
    if let Some((first, tail)) = rest.split_first() {
        if first.role == "system" || first.role == "developer" {
            system = Some(first.text()?);
            rest = tail;
        }
    }
    let (last, exchanges) = rest.split_last().ok_or_else(shape)?;
    if last.role != "user" || exchanges.len() % 2 != 0 {
        return Err(shape());
    }
    let mut history = Vec::with_capacity(exchanges.len() / 2);
    for pair in exchanges.chunks(2) {
        if pair[0].role != "user" || pair[1].role != "assistant" {
            return Err(shape());
        }
        history.push(Turn {
            user: pair[0].text()?,
            assistant: pair[1].text()?,
        });
    }
    Ok((system, history, last.text()?))
}

/// `POST /v1/chat/completions`.
async fn chat(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<ChatBody>,
) -> Result<Response, ApiError> {
    let (system, history, prompt) = conversation(&body.messages)?;
    let mut params = body.generation.params(&server)?;
    params.system = system;
    params.history = history;
    let input = Input::Generate { prompt, params };
    let format = Format {
        chat: true,
        model: body.model.clone(),
        include_usage: body.generation.include_usage(),
    };
    let request = request_for(&caller, &body.model, input, body.generation.user.clone());
    generate(server, request, format, body.generation.streams()).await
}

#[derive(Deserialize)]
struct CompletionBody {
    model: String,
    prompt: Value,
    #[serde(flatten)]
    generation: Generation,
}

/// `POST /v1/completions`: the prompt fed as is (no chat template).
async fn completions(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CompletionBody>,
) -> Result<Response, ApiError> {
    let prompt = match &body.prompt {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        _ => return Err(ApiError::bad_request("`prompt` must be one text")),
    };
    let params = body.generation.params(&server)?.raw();
    let format = Format {
        chat: false,
        model: body.model.clone(),
        include_usage: body.generation.include_usage(),
    };
    let request = request_for(
        &caller,
        &body.model,
        Input::Generate { prompt, params },
        body.generation.user.clone(),
    );
    generate(server, request, format, body.generation.streams()).await
}

/// How a generation's answer is written: a chat completion or a text completion.
struct Format {
    chat: bool,
    model: String,
    include_usage: bool,
}

impl Format {
    fn id(&self, request_id: &str) -> String {
        let prefix = if self.chat { "chatcmpl" } else { "cmpl" };
        format!("{prefix}-{request_id}")
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    /// One choice: the whole text, or (streaming) a piece of it.
    fn choice(&self, text: &str, finish: Option<FinishReason>, chunk: bool) -> Value {
        let finish = finish.map(openai_finish);
        match (self.chat, chunk) {
            (true, false) => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": null})
            }
            (true, true) => {
                json!({"index": 0, "delta": {"content": text}, "finish_reason": finish, "logprobs": null})
            }
            (false, _) => json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
        }
    }

    fn envelope(&self, request_id: &str, version: &str, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id(request_id),
            "object": self.object(chunk),
            "created": now_s(),
            "model": self.model,
            "system_fingerprint": version,
            "choices": choices,
        })
    }

    /// The whole answer.
    fn whole(&self, answer: &InferResponse) -> Result<Value, ApiError> {
        let c = answer
            .output
            .completion()
            .ok_or_else(|| ApiError::internal("a generation was answered with something else"))?;
        let choice = self.choice(&c.text, Some(c.finish), false);
        let mut body = self.envelope(
            answer.meta.request_id.as_str(),
            answer.meta.version.as_str(),
            false,
            vec![choice],
        );
        body["usage"] = usage(answer);
        body["keel"] = keel_of(answer);
        Ok(body)
    }
}

/// OpenAI's finish reasons: `stop` or `length` (a full context is a length; a stream cut at
/// shutdown stopped).
fn openai_finish(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(answer: &InferResponse) -> Value {
    let (prompt, completion) = answer
        .output
        .completion()
        .map_or((0, 0), |c| (c.prompt_ids.len(), c.token_ids.len()));
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The `keel` object of a generation: the guardrails, and Keel's own finish reason.
fn keel_of(answer: &InferResponse) -> Value {
    let mut keel = keel_object(&answer.meta);
    if let Some(c) = answer.output.completion() {
        keel["finish"] = c.finish.as_str().into();
    }
    keel
}

/// Answers a generation whole, or streams it.
async fn generate(
    server: Server,
    request: InferRequest,
    format: Format,
    stream: bool,
) -> Result<Response, ApiError> {
    if !stream {
        let answer = blocking(move || server.stack().infer(request)).await??;
        let body = format.whole(&answer)?;
        return Ok((keel_headers(&answer.meta), axum::Json(body)).into_response());
    }
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::task::spawn_blocking(move || stream_on(&server, request, &format, head_tx, &tx));
    let meta = head_rx
        .await
        .map_err(|_| ApiError::internal("the generation's worker ended before its first token"))??;
    let events = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        keel_headers(&meta),
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
        .into_response())
}

/// Runs a streamed generation on a blocking thread: the metadata (or the refusal, before any
/// token: a contract's, a budget's, a review's hold) to `head`, then each piece as an event to
/// `events`. A client gone (the receiver dropped) drops the stream, which cancels the
/// generation and settles it in every layer; at shutdown past the grace the stream is cut.
fn stream_on(
    server: &Server,
    request: InferRequest,
    format: &Format,
    head: tokio::sync::oneshot::Sender<keel::Result<keel::Meta>>,
    events: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut stream = match server.stack().infer_stream(request) {
        Ok(s) => s,
        Err(e) => {
            let _ = head.send(Err(e));
            return;
        }
    };
    let mut step = match stream.step() {
        Step::End(Err(e)) => {
            let _ = head.send(Err(e));
            return;
        }
        step => step,
    };
    let meta = stream.meta().clone();
    if head.send(Ok(meta.clone())).is_err() {
        return;
    }
    let (id, version) = (meta.request_id.to_string(), meta.version.to_string());
    let send = |data: String| events.blocking_send(Ok(Event::default().data(data))).is_ok();
    if format.chat {
        let mut first = format.envelope(&id, &version, true, vec![format.choice("", None, true)]);
        first["choices"][0]["delta"]["role"] = "assistant".into();
        if !send(first.to_string()) {
            return;
        }
    }
    let end = loop {
        match step {
            Step::Token(t) => {
                if !t.text.is_empty() {
                    let chunk =
                        format.envelope(&id, &version, true, vec![format.choice(&t.text, None, true)]);
                    if !send(chunk.to_string()) {
                        return; // the client is gone: dropping the stream cancels it
                    }
                }
            }
            Step::End(end) => break end,
        }
        if server.cutting() {
            // Shutdown, past the grace: cut here (finish "cancelled"), settled in every layer.
            break stream.cancel();
        }
        step = stream.step();
    };
    match end {
        Ok(answer) => {
            let finish = answer.output.completion().map(|c| c.finish);
            let mut last = format.envelope(&id, &version, true, vec![format.choice("", finish, true)]);
            last["keel"] = keel_of(&answer);
            send(last.to_string());
            if format.include_usage {
                let mut tail = format.envelope(&id, &version, true, Vec::new());
                tail["usage"] = usage(&answer);
                send(tail.to_string());
            }
        }
        Err(e) => {
            send(ApiError::from(e).body().to_string());
        }
    }
    send("[DONE]".to_string());
}
