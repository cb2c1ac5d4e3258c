//! Text generation: parameters, and the stream of tokens a generation yields.

use crate::infer::{InferResponse, Meta, Output, Timings};
use crate::model::Decoder;
use crate::scheduler::decoder::Event;
use crate::scheduler::Ran;
use crate::{Error, Result};
use keel_models::sampling::Sampling;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Its id in the model's vocabulary.
    pub id: u32,
    /// The text it completes. Empty while a multi-byte character spans several tokens: the
    /// character comes with the token that finishes it.
    pub text: String,
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
}

impl FinishReason {
    /// The reason as the JSON outputs, C and Python spell it: "stop", "length", "context_full".
    ///
    /// ```
    /// assert_eq!(keel::FinishReason::ContextFull.as_str(), "context_full");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
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
        })
    }

    /// How the generation ran (once it has ended; None if nothing was generated).
    pub(crate) fn ran(&self) -> Option<Ran> {
        self.ran
    }

    /// The token ids generated so far.
    pub(crate) fn generated(&self) -> &[u32] {
        &self.generated
    }

    fn token(&mut self, id: u32) -> Result<Token> {
        self.generated.push(id);
        // Decode everything so far and hand out what is new, holding back an unfinished character.
        let all = self.decoder.tokenizer.decode(&self.generated)?;
        let text = if all.ends_with('\u{FFFD}') || all.len() < self.text_len {
            String::new()
        } else {
            let new = all[self.text_len..].to_string();
            self.text_len = all.len();
            new
        };
        Ok(Token { id, text })
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
                Ok(Event::Token(id)) => match self.token(id) {
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

/// A generation on the prediction path ([`crate::Engine::infer_stream`]): its tokens as they are
/// made, then, from [`InferStream::finish`], the whole response with its metadata. Dropping it
/// cancels the generation, as dropping a [`TokenStream`] does.
pub struct InferStream {
    stream: TokenStream,
    text: String,
    meta: Meta,
    start: Instant,
}

impl InferStream {
    pub(crate) fn new(stream: TokenStream, meta: Meta, start: Instant) -> Self {
        let mut meta = meta;
        meta.timings.prepare = start.elapsed();
        Self {
            stream,
            text: String::new(),
            meta,
            start,
        }
    }

    /// The response's metadata as known before the end: request id, model, version, backend.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Runs the generation to its end (the tokens not yet iterated included) and returns the
    /// response: the whole completion, the batch it joined and the time per stage.
    ///
    /// # Errors
    /// The generation's error (a deadline passed in the queue, a shutdown, a backend failure).
    pub fn finish(mut self) -> Result<InferResponse> {
        for token in &mut self {
            token?;
        }
        let ran = self.stream.ran();
        let total = self.start.elapsed();
        let mut meta = self.meta;
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
            prompt_ids: self.stream.prompt_ids().to_vec(),
            token_ids: self.stream.generated().to_vec(),
            text: std::mem::take(&mut self.text),
            finish: self.stream.finish_reason().unwrap_or(FinishReason::Length),
        };
        meta.tokens = completion.prompt_ids.len() + completion.token_ids.len();
        Ok(InferResponse {
            output: Output::Completion(completion),
            meta,
        })
    }
}

impl Iterator for InferStream {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Self::Item> {
        let token = self.stream.next()?;
        if let Ok(t) = &token {
            self.text.push_str(&t.text);
        }
        Some(token)
    }
}
