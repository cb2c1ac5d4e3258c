//! A decoder's tokenizer and chat template, built from GGUF metadata (`tokenizer.ggml.*`), so that a
//! single `.gguf` file is all a user needs, as with llama.cpp.

use crate::weights::GgufFile;
use crate::{Error, Result};
use keel_kernels::candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`): control tokens and user-defined tokens are
/// matched whole in the text, before byte-level BPE sees it.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// One turn of a conversation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Byte-level BPE tokenizer, special tokens and chat template of a GGUF decoder.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    bos_token: String,
    eos_token: String,
    chat_template: Option<String>,
}

impl ChatTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata. Only GPT-2 style byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) is supported.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let kind = gguf.string("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model '{kind}' is not supported (only byte-level BPE, 'gpt2')"
            )));
        }
        let string = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        };
        let tokens = gguf.array("tokenizer.ggml.tokens", string)?;
        let merges = gguf.array("tokenizer.ggml.merges", string)?;
        let types = if gguf.has("tokenizer.ggml.token_type") {
            gguf.array("tokenizer.ggml.token_type", |v| v.to_i32().ok())?
        } else {
            vec![1; tokens.len()]
        };
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("merge '{m}' is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);

        let token = |key: &str| -> Result<Option<(u32, String)>> {
            if !gguf.has(key) {
                return Ok(None);
            }
            let id = gguf.usize(key)?;
            let text = tokens
                .get(id)
                .ok_or_else(|| Error::Tokenizer(format!("{key} = {id} is not in the vocabulary")))?;
            Ok(Some((id as u32, text.clone())))
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        let mut eos_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        // Chat models end a turn with their end-of-turn token even where the file names another EOS.
        for end_of_turn in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = tokenizer.token_to_id(end_of_turn) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let chat_template = if gguf.has("tokenizer.chat_template") {
            Some(gguf.string("tokenizer.chat_template")?.to_string())
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            eos: eos_ids,
            bos_token: bos.map(|(_, t)| t).unwrap_or_default(),
            eos_token: eos.map(|(_, t)| t).unwrap_or_default(),
            chat_template,
        })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are recognized.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of token ids (special tokens included, as the model wrote them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The tokens that end a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Size of the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders a conversation with the model's chat template, ending with the prompt for the
    /// assistant's reply.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("the model has no chat template (use a raw prompt)".into()))?;
        let mut env = minijinja::Environment::new();
        // Hugging Face templates call raise_exception() to reject conversations they cannot render.
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        let render = || -> std::result::Result<String, minijinja::Error> {
            env.template_from_str(template)?.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
        };
        render().map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
