//! Text generation: parameters, and the stream of tokens a generation yields.

use crate::model::Decoder;
use crate::{Error, Result};
use keel_models::llama::KvCache;
use keel_models::sampling::{Sampler, Sampling};
use std::sync::Arc;

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
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: Sampling::Greedy,
            chat: true,
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

/// The tokens of one generation, produced as they are iterated. The prompt is run on the first
/// call to `next`. Dropping the stream cancels the generation and frees its KV cache.
pub struct TokenStream {
    decoder: Arc<Decoder>,
    cache: KvCache,
    sampler: Sampler,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    max_tokens: usize,
    text_len: usize,
    next_logits: Option<Vec<f32>>,
    finish: Option<FinishReason>,
}

impl TokenStream {
    pub(crate) fn new(decoder: Arc<Decoder>, prompt: Vec<u32>, params: &GenerateParams) -> Result<Self> {
        let context = decoder.llama.config().context_length;
        if prompt.is_empty() {
            return Err(keel_models::Error::EmptyInput("the prompt has no tokens".into()).into());
        }
        if prompt.len() >= context {
            return Err(keel_models::Error::ContextOverflow {
                tokens: prompt.len() + 1,
                context,
            }
            .into());
        }
        let cache = decoder.llama.new_cache();
        Ok(Self {
            cache,
            sampler: Sampler::new(params.sampling),
            prompt,
            generated: Vec::new(),
            max_tokens: params.max_tokens,
            text_len: 0,
            next_logits: None,
            finish: if params.max_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            decoder,
        })
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
        let mut text = String::new();
        for token in &mut self {
            text.push_str(&token?.text);
        }
        Ok(Completion {
            prompt_ids: self.prompt.clone(),
            token_ids: self.generated.clone(),
            text,
            finish: self.finish.unwrap_or(FinishReason::Length),
        })
    }

    fn step(&mut self) -> Result<Option<Token>> {
        let decoder = self.decoder.clone();
        let logits = match self.next_logits.take() {
            Some(logits) => logits,
            None => decoder.llama.forward(&self.prompt, &mut self.cache)?,
        };
        let id = self.sampler.sample(&logits);
        if decoder.tokenizer.eos_ids().contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        self.generated.push(id);
        // Decode everything so far and hand out what is new, holding back an unfinished character.
        let all = decoder.tokenizer.decode(&self.generated)?;
        let text = if all.ends_with('\u{FFFD}') || all.len() < self.text_len {
            String::new()
        } else {
            let new = all[self.text_len..].to_string();
            self.text_len = all.len();
            new
        };
        if self.generated.len() >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
        } else if self.cache.len() + 1 > decoder.llama.config().context_length {
            self.finish = Some(FinishReason::ContextFull);
        } else {
            self.next_logits = Some(decoder.llama.forward(&[id], &mut self.cache)?);
        }
        Ok(Some(Token { id, text }))
    }
}

impl Iterator for TokenStream {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finish.is_some() {
            return None;
        }
        match self.step() {
            Ok(Some(token)) => Some(Ok(token)),
            Ok(None) => None,
            Err(e) => {
                // An error ends the stream: the cache may hold a half-run step.
                self.finish = Some(FinishReason::Stop);
                Some(Err(e))
            }
        }
    }
}
