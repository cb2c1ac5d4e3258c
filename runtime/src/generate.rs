//! Text generation: parameters, the stream of tokens a generation yields, and the protocol by
//! which every layer of the stack passes a generation up ([`Generating`], [`InferStream`]).

use crate::infer::{InferResponse, Meta, Output, Timings};
use crate::model::Decoder;
use crate::scheduler::decoder::Event;
use crate::scheduler::{clone_error, Ran};
use crate::{Error, Result};
use keel_models::sampling::Sampling;
use keel_models::tokenizer::Message;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

/// How to generate.
///
/// ```
/// use keel::GenerateParams;
/// let p = GenerateParams::greedy().max_tokens(32).raw();
/// assert_eq!(p.max_tokens, 32);
/// assert!(!p.chat);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate (fewer if the model ends its reply or the context is full).
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Wrap the prompt in the model's chat template as one user turn (the default), or feed it raw.
    pub chat: bool,
    /// With `chat`: a system turn before the user's (None: the template's default, if any).
    /// The KV state after the system turn is kept in the prefix cache, so that later prompts
    /// with the same system turn skip running it.
    pub system: Option<String>,
    /// Texts that end the generation where they appear (not included in the output), as
    /// llama.cpp's `--reverse-prompt`/`stop` do; the finish reason is then `Stop`.
    pub stop: Vec<String>,
    /// With `chat`: the conversation so far, rendered by the chat template between the system
    /// turn and the prompt. With the prefix cache on, the KV state after it is kept, so that
    /// the next turn runs only the last exchange and its own prompt.
    pub history: Vec<Turn>,
    /// Give each token's log-probability under the model ([`Token::logprob`],
    /// [`Completion::logprobs`]): a pass over the logits per token, so off unless asked (a
    /// review rule over a generation's confidence asks for it).
    pub logprobs: bool,
}

/// One finished exchange of a conversation: what the user said and what the model replied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    /// The user's message.
    pub user: String,
    /// The model's reply.
    pub assistant: String,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: Sampling::Greedy,
            chat: true,
            system: None,
            stop: Vec::new(),
            history: Vec::new(),
            logprobs: false,
        }
    }
}

impl GenerateParams {
    /// Greedy decoding (the default).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Seeded sampling with the given temperature, top-k (0: off) and top-p (1.0: off).
    pub fn sampled(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Self {
        Self {
            sampling: Sampling::Random {
                temperature,
                top_k,
                top_p,
                seed,
            },
            ..Self::default()
        }
    }

    /// At most `n` new tokens.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// With a system turn (see [`GenerateParams::system`]).
    pub fn system_prompt(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }

    /// Ending the generation where `text` appears (see [`GenerateParams::stop`]).
    pub fn stop_at(mut self, text: impl Into<String>) -> Self {
        self.stop.push(text.into());
        self
    }

    /// After the exchanges of `history` (see [`GenerateParams::history`]).
    pub fn after(mut self, history: Vec<Turn>) -> Self {
        self.history = history;
        self
    }

    /// Feed the prompt as is, without the chat template.
    pub fn raw(mut self) -> Self {
        self.chat = false;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Sampling::Random {
            temperature, top_p, ..
        } = self.sampling
        {
            if !(temperature.is_finite() && temperature >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "temperature {temperature} must be finite and >= 0"
                )));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::InvalidArgument(format!("top_p {top_p} must be in (0, 1]")));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument("a stop text cannot be empty".into()));
        }
        if !self.chat && !self.history.is_empty() {
            return Err(Error::InvalidArgument(
                "a conversation's history needs the chat template (not a raw prompt)".into(),
            ));
        }
        Ok(())
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// Its id in the model's vocabulary.
    pub id: u32,
    /// The text it completes. Empty while a multi-byte character spans several tokens: the
    /// character comes with the token that finishes it.
    pub text: String,
    /// Its log-probability under the model, when [`GenerateParams::logprobs`] asked for it.
    pub logprob: Option<f32>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-turn token (not included in the output).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context window is full.
    ContextFull,
    /// The caller let go of the stream before its end.
    Cancelled,
}

impl FinishReason {
    /// The reason as the JSON outputs, C and Python spell it: "stop", "length",
    /// "context_full", "cancelled".
    ///
    /// ```
    /// assert_eq!(keel::FinishReason::ContextFull.as_str(), "context_full");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The prompt's token ids (after the chat template).
    pub prompt_ids: Vec<u32>,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// The generated text.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Each generated token's log-probability, when [`GenerateParams::logprobs`] asked for
    /// them (else empty).
    pub logprobs: Vec<f32>,
}

impl Completion {
    /// The mean of the tokens' log-probabilities (None: not asked for, or no token).
    pub fn mean_logprob(&self) -> Option<f64> {
        let n = self.logprobs.len();
        (n > 0).then(|| self.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64)
    }

    /// The least of the tokens' log-probabilities (None: not asked for, or no token).
    pub fn min_logprob(&self) -> Option<f64> {
        self.logprobs.iter().map(|&l| f64::from(l)).reduce(f64::min)
    }
}

/// The tokens of one generation, as the model's scheduler makes them.
///
/// The generation is queued when [`crate::Engine::generate`] returns and runs in the model's
/// continuous batch (with every other stream of that model); tokens wait in the stream until it
/// is iterated. Iterating blocks until the next token is made.
///
/// Dropping the stream cancels the generation: it leaves the batch before the next step and its
/// KV cache is freed. An error (a queued request whose deadline passed, a shutdown, a backend
/// failure) is yielded once, and ends the stream.
pub struct TokenStream {
    decoder: Arc<Decoder>,
    prompt: Vec<u32>,
    events: Option<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    text_len: usize,
    finish: Option<FinishReason>,
    ran: Option<Ran>,
    /// Stop texts; tokens held back because their text may be the start of one, and their
    /// text; tokens ready to be given out.
    stop: Vec<String>,
    held: VecDeque<Token>,
    held_text: String,
    ready: VecDeque<Token>,
}

impl TokenStream {
    /// A stream for a generation submitted with `events` and `cancel` (`None`: nothing to
    /// generate, `max_tokens` is 0).
    pub(crate) fn new(
        decoder: Arc<Decoder>,
        prompt: Vec<u32>,
        events: Option<Receiver<Event>>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            finish: if events.is_none() {
                Some(FinishReason::Length)
            } else {
                None
            },
            decoder,
            prompt,
            events,
            cancel,
            generated: Vec::new(),
            logprobs: Vec::new(),
            text_len: 0,
            ran: None,
            stop: Vec::new(),
            held: VecDeque::new(),
            held_text: String::new(),
            ready: VecDeque::new(),
        }
    }

    /// With stop texts (see [`GenerateParams::stop`]).
    pub(crate) fn stopping_at(mut self, stop: Vec<String>) -> Self {
        self.stop = stop;
        self
    }

    /// Takes a new token through the stop texts: tokens whose text cannot be the start of a
    /// stop text go to `ready`; the others wait in `held`. Returns whether a stop text was
    /// found (its first token is cut before it; the tokens after are dropped).
    fn screen(&mut self, token: Token) -> bool {
        self.held_text.push_str(&token.text);
        self.held.push_back(token);
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.held_text.find(s.as_str()))
            .min();
        // Text that is certainly out: up to the stop text, or before the longest tail that is
        // the start of one.
        let safe = found.unwrap_or_else(|| {
            let keep = self
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|n| s.is_char_boundary(*n))
                        .map(move |n| &s[..n])
                })
                .filter(|prefix| self.held_text.ends_with(prefix))
                .map(str::len)
                .max()
                .unwrap_or(0);
            self.held_text.len() - keep
        });
        let mut given = 0;
        while let Some(t) = self.held.front() {
            if found.is_none() && given + t.text.len() > safe {
                break;
            }
            let mut t = self.held.pop_front().expect("a front token");
            if given + t.text.len() > safe {
                t.text.truncate(safe - given);
            }
            given += t.text.len();
            let done = given >= safe && found.is_some();
            self.ready.push_back(t);
            if done {
                break;
            }
        }
        self.held_text.drain(..given.min(self.held_text.len()));
        if found.is_some() {
            self.held.clear();
            self.held_text.clear();
        }
        found.is_some()
    }

    /// The prompt's token ids.
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt
    }

    /// Why the generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Runs the generation to its end.
    pub fn complete(mut self) -> Result<Completion> {
        self.run_to_end()
    }

    /// Runs the generation to its end, keeping the stream (and how it ran) for the caller.
    pub(crate) fn run_to_end(&mut self) -> Result<Completion> {
        let mut text = String::new();
        for token in &mut *self {
            text.push_str(&token?.text);
        }
        Ok(Completion {
            prompt_ids: self.prompt.clone(),
            token_ids: self.generated.clone(),
            text,
            finish: self.finish.unwrap_or(FinishReason::Length),
            logprobs: self.logprobs.clone(),
        })
    }

    /// How the generation ran (once it has ended; None if nothing was generated).
    pub(crate) fn ran(&self) -> Option<Ran> {
        self.ran
    }

    fn token(&mut self, id: u32, logprob: Option<f32>) -> Result<Token> {
        self.generated.push(id);
        self.logprobs.extend(logprob);
        // Decode everything so far and hand out what is new, holding back an unfinished character.
        let all = self.decoder.tokenizer.decode(&self.generated)?;
        let text = if all.ends_with('\u{FFFD}') || all.len() < self.text_len {
            String::new()
        } else {
            let new = all[self.text_len..].to_string();
            self.text_len = all.len();
            new
        };
        Ok(Token { id, text, logprob })
    }
}

impl Iterator for TokenStream {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(t) = self.ready.pop_front() {
                return Some(Ok(t));
            }
            if self.finish.is_some() {
                return None;
            }
            let event = self.events.as_ref()?.recv();
            let failed = |stream: &mut Self, e| {
                stream.finish = Some(FinishReason::Stop);
                Some(Err(e))
            };
            match event {
                Ok(Event::Token(id, logprob)) => match self.token(id, logprob) {
                    Ok(t) if self.stop.is_empty() => return Some(Ok(t)),
                    Ok(t) => {
                        if self.screen(t) {
                            // Ends here: the worker drops the sequence before its next step.
                            self.finish = Some(FinishReason::Stop);
                            self.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => return Some(Err(e)),
                },
                Ok(Event::Done(reason, ran)) => {
                    self.finish = Some(reason);
                    self.ran = Some(ran);
                    // The end came first: what was held back was no stop text after all.
                    self.ready.extend(self.held.drain(..));
                    self.held_text.clear();
                }
                Ok(Event::Failed(e)) => return failed(self, e),
                Err(_) => return failed(self, Error::Internal("the scheduler dropped a generation".into())),
            }
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        // The worker sees it before its next step and drops the sequence (and its KV cache).
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The conversation the chat template renders: the system turn, the history, the prompt.
pub(crate) fn chat(params: &GenerateParams, prompt: &str) -> Vec<Message> {
    let turn = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let mut messages = Vec::with_capacity(2 + 2 * params.history.len());
    if let Some(system) = &params.system {
        messages.push(turn("system", system));
    }
    for t in &params.history {
        messages.push(turn("user", &t.user));
        messages.push(turn("assistant", &t.assistant));
    }
    messages.push(turn("user", prompt));
    messages
}

/// One step of a generation as a layer passes it up: a token, or the end.
// The end is moved a few times per stream (once per layer), a token a few hundred bytes a
// second: not worth a box per stream.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Step {
    /// The next token.
    Token(Token),
    /// The end: the whole response (the completion, how it was made, what each layer noted),
    /// or the error that ended the generation.
    End(Result<InferResponse>),
}

/// A generation in flight, as one layer of the stack holds it: the engine's stream at the
/// bottom, and each layer's around the one below (observing tokens, pricing the end, judging
/// the reply). [`InferStream`] is the handle callers hold.
pub trait Generating: Send {
    /// The next token, or the end. Not called again after the end.
    fn step(&mut self) -> Step;

    /// The caller let go before the end: stop the generation now and return what was made so
    /// far (finish [`FinishReason::Cancelled`]), so that each layer can settle (charge what
    /// was generated, count it, record its lineage). Not called after the end.
    ///
    /// # Errors
    /// A layer's own failure to settle.
    fn cancel(self: Box<Self>) -> Result<InferResponse>;
}

/// A streamed generation ([`crate::Infer::infer_stream`]): its tokens as they are made, then,
/// from [`InferStream::finish`], the whole response with its metadata and every layer's notes.
///
/// Dropping it before its end cancels the generation (it leaves the batch before the next step
/// and its KV cache is freed); every layer still settles it (see [`Generating::cancel`]).
///
/// ```no_run
/// use keel::{Engine, GenerateParams, Infer, InferRequest};
/// let engine = Engine::builder().build()?;
/// let smol = engine.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let mut stream = engine.infer_stream(InferRequest::generate(smol.as_str(), "Hi!", GenerateParams::greedy()))?;
/// for token in &mut stream {
///     print!("{}", token?.text);
/// }
/// let answer = stream.finish()?;
/// assert!(answer.output.completion().is_some());
/// # Ok::<(), keel::Error>(())
/// ```
pub struct InferStream {
    meta: Meta,
    inner: Option<Box<dyn Generating>>,
    ended: Option<Result<InferResponse>>,
}

impl InferStream {
    /// A stream of `generating`, whose metadata before the end is `meta`.
    pub fn new(meta: Meta, generating: impl Generating + 'static) -> Self {
        Self {
            meta,
            inner: Some(Box::new(generating)),
            ended: None,
        }
    }

    /// The response's metadata as known before the end: request id, model, version, backend,
    /// and the notes of the layers that decided before the first token (route, contract).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The next step (for a layer wrapping this stream): a token, or the end, once.
    pub fn step(&mut self) -> Step {
        let Some(inner) = self.inner.as_mut() else {
            return Step::End(match &self.ended {
                Some(Err(e)) => Err(clone_error(e)),
                _ => Err(Error::Internal("a generation was stepped after its end".into())),
            });
        };
        let step = inner.step();
        if let Step::End(end) = &step {
            self.inner = None;
            self.ended = Some(match end {
                Ok(r) => Ok(r.clone()),
                Err(e) => Err(clone_error(e)),
            });
        }
        step
    }

    /// Stops the generation now (if it has not ended) and returns what was made so far, with
    /// every layer's settlement (finish [`FinishReason::Cancelled`]); after the end, the
    /// response or its error.
    ///
    /// # Errors
    /// The error that ended the generation, if one did.
    pub fn cancel(mut self) -> Result<InferResponse> {
        match self.inner.take() {
            Some(inner) => inner.cancel(),
            None => self
                .ended
                .take()
                .unwrap_or_else(|| Err(Error::Internal("no generation".into()))),
        }
    }

    /// Runs the generation to its end (the tokens not yet iterated included) and returns the
    /// response: the whole completion, the batch it joined, the time per stage, the notes.
    ///
    /// # Errors
    /// The generation's error (a refusal of a layer, a deadline passed in the queue, a
    /// shutdown, a backend failure).
    pub fn finish(mut self) -> Result<InferResponse> {
        while self.inner.is_some() {
            self.step();
        }
        self.ended
            .take()
            .unwrap_or_else(|| Err(Error::Internal("the generation ended without an answer".into())))
    }
}

impl Iterator for InferStream {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.as_ref()?;
        match self.step() {
            Step::Token(t) => Some(Ok(t)),
            Step::End(Ok(_)) => None,
            Step::End(Err(e)) => Some(Err(e)),
        }
    }
}

impl Drop for InferStream {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            drop(inner.cancel());
        }
    }
}

impl std::fmt::Debug for InferStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferStream")
            .field("request_id", &self.meta.request_id)
            .field("ended", &self.inner.is_none())
            .finish()
    }
}

/// The engine's generation on the prediction path: the token stream, then the response.
pub(crate) struct EngineStream {
    stream: TokenStream,
    text: String,
    meta: Meta,
    start: Instant,
}

impl EngineStream {
    /// The stream of `stream`, started at `start` (its preparation: tokenizing, the template).
    pub(crate) fn start(stream: TokenStream, mut meta: Meta, start: Instant) -> InferStream {
        meta.timings.prepare = start.elapsed();
        meta.tokens = stream.prompt_ids().len();
        let engine = Self {
            stream,
            text: String::new(),
            meta: meta.clone(),
            start,
        };
        InferStream::new(meta, engine)
    }

    /// The response: what was generated and how, as the stream ended with `finish`.
    fn response(&mut self, finish: FinishReason) -> InferResponse {
        let ran = self.stream.ran();
        let total = self.start.elapsed();
        let mut meta = self.meta.clone();
        let (queue, forward) = ran.map(|r| (r.queue, r.forward)).unwrap_or_default();
        meta.batch_id = ran.map(|r| r.batch_id);
        meta.timings = Timings {
            queue,
            forward,
            // Sampling and decoding text, between and after the steps.
            post: total.saturating_sub(meta.timings.prepare + queue + forward),
            total,
            ..meta.timings
        };
        let completion = Completion {
            prompt_ids: self.stream.prompt.clone(),
            token_ids: self.stream.generated.clone(),
            text: std::mem::take(&mut self.text),
            finish,
            logprobs: std::mem::take(&mut self.stream.logprobs),
        };
        meta.tokens = completion.prompt_ids.len() + completion.token_ids.len();
        InferResponse {
            output: Output::Completion(completion),
            meta,
        }
    }
}

impl Generating for EngineStream {
    fn step(&mut self) -> Step {
        match self.stream.next() {
            Some(Ok(t)) => {
                self.text.push_str(&t.text);
                Step::Token(t)
            }
            Some(Err(e)) => Step::End(Err(e)),
            None => {
                let finish = self.stream.finish_reason().unwrap_or(FinishReason::Length);
                Step::End(Ok(self.response(finish)))
            }
        }
    }

    fn cancel(mut self: Box<Self>) -> Result<InferResponse> {
        // The worker drops the sequence before its next step (and its KV cache with it).
        self.stream.cancel.store(true, Ordering::Relaxed);
        Ok(self.response(FinishReason::Cancelled))
    }
}

/// A generation already run to its end, given out again: its tokens, then its end. For a layer
/// that must see the whole reply before letting any of it out (a review policy that may hold
/// it, a cascade that may escalate).
pub struct Replayed {
    tokens: std::collections::VecDeque<Token>,
    end: Option<Result<InferResponse>>,
}

impl Replayed {
    /// Runs `stream` to its end, keeping its tokens.
    pub fn run(mut stream: InferStream) -> Self {
        let mut tokens = std::collections::VecDeque::new();
        loop {
            match stream.step() {
                Step::Token(t) => tokens.push_back(t),
                Step::End(end) => {
                    return Self {
                        tokens,
                        end: Some(end),
                    }
                }
            }
        }
    }

    /// The end: the response, or the error that ended the generation.
    pub fn end(&self) -> Option<&Result<InferResponse>> {
        self.end.as_ref()
    }

    /// Replaces the end by what `f` makes of it (a note added, a refusal): an end that is then
    /// an error gives out none of the tokens.
    pub fn map_end(&mut self, f: impl FnOnce(Result<InferResponse>) -> Result<InferResponse>) {
        if let Some(end) = self.end.take() {
            let end = f(end);
            if end.is_err() {
                self.tokens.clear();
            }
            self.end = Some(end);
        }
    }
}

impl Generating for Replayed {
    fn step(&mut self) -> Step {
        match self.tokens.pop_front() {
            Some(t) => Step::Token(t),
            None => Step::End(
                self.end
                    .take()
                    .unwrap_or_else(|| Err(Error::Internal("a replay was stepped after its end".into()))),
            ),
        }
    }

    /// The generation has run: what it made is its answer.
    fn cancel(mut self: Box<Self>) -> Result<InferResponse> {
        self.end
            .take()
            .unwrap_or_else(|| Err(Error::Internal("a replay was cancelled after its end".into())))
    }
}
