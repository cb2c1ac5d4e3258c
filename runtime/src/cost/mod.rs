//! Cost as a first-class constraint: what each request cost, budgets that are never overspent,
//! and routing between a cheap and a strong model.
//!
//! A version's price is the manifest's `[cost]` table (in any unit the deployment bills in):
//!
//! ```toml
//! [cost]
//! per_call = 0.0001       # every request
//! per_1k_tokens = 0.002   # tokens run (Meta::tokens)
//! per_ms = 0.00001        # compute (the forward passes), billed up to max_ms per request
//! max_ms = 2000
//! ```
//!
//! [`Costed`] prices every request (a [`Price`] noted on the answer, kept by lineage; a
//! generation per token, prompt and completion) and enforces [`Budget`]s per routing key. [`Cascade`] tries a cheap model first and escalates when it is
//! unsure; [`Degrade`] sends traffic to the cheap model (or sheds low priority) when the strong
//! one's queue would break the latency objective.

mod budget;
mod layer;
mod route;

pub use budget::{Budget, BudgetError, Budgets, Exhausted, Spend};
pub use layer::{CostLine, Costed, Price};
pub use route::{Cascade, CascadeConfig, Degrade, DegradeConfig, Routed};

use crate::Input;
use std::time::Duration;

/// A version's price list (`[cost]` in its manifest). Every field defaults to 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CostModel {
    /// Per request.
    pub per_call: f64,
    /// Per 1,000 tokens run.
    pub per_1k_tokens: f64,
    /// Per millisecond of compute.
    pub per_ms: f64,
    /// The most compute one request is billed for (milliseconds), so that its worst case is
    /// known before it runs (budgets reserve it).
    pub max_ms: f64,
}

impl CostModel {
    /// The price list of a manifest's `[cost]` table.
    ///
    /// # Errors
    /// A message naming the key that is not a non-negative number.
    pub fn from_table(table: &toml::Table) -> Result<Self, String> {
        let number = |key: &str, default: f64| -> Result<f64, String> {
            let x = match table.get(key) {
                None => return Ok(default),
                Some(toml::Value::Float(x)) => *x,
                Some(toml::Value::Integer(x)) => *x as f64,
                Some(_) => return Err(format!("[cost] {key} must be a number")),
            };
            if x.is_finite() && x >= 0.0 {
                Ok(x)
            } else {
                Err(format!("[cost] {key} must be a finite number >= 0, not {x}"))
            }
        };
        for key in table.keys() {
            if !["per_call", "per_1k_tokens", "per_ms", "max_ms"].contains(&key.as_str()) {
                return Err(format!(
                    "[cost] has an unknown key '{key}' (per_call, per_1k_tokens, per_ms, max_ms)"
                ));
            }
        }
        Ok(Self {
            per_call: number("per_call", 0.0)?,
            per_1k_tokens: number("per_1k_tokens", 0.0)?,
            per_ms: number("per_ms", 0.0)?,
            max_ms: number("max_ms", 10_000.0)?,
        })
    }

    /// What a request that ran `tokens` tokens in `forward` of compute costs.
    ///
    /// ```
    /// use keel::cost::CostModel;
    /// use std::time::Duration;
    /// let price = CostModel { per_call: 1.0, per_1k_tokens: 2.0, per_ms: 0.5, max_ms: 10.0 };
    /// // 30 ms of compute is billed as the 10 of max_ms.
    /// assert_eq!(price.cost(500, Duration::from_millis(30)), 1.0 + 1.0 + 5.0);
    /// ```
    pub fn cost(&self, tokens: usize, forward: Duration) -> f64 {
        let ms = (forward.as_secs_f64() * 1e3).min(self.max_ms);
        self.per_call + self.per_1k_tokens * tokens as f64 / 1e3 + self.per_ms * ms
    }

    /// The most a request can cost, known before it runs: a text has at most one token per
    /// byte (byte-level tokenizers) plus a few special ones, capped at `max_tokens` per text
    /// for an encoder; a generation adds its `max_tokens`; compute is billed up to `max_ms`.
    /// (The cost layer counts a generation's prompt exactly: [`CostModel::worst_case_of`].)
    pub fn worst_case(&self, input: &Input, max_tokens: Option<usize>) -> f64 {
        const SPECIAL: usize = 32; // chat template and special tokens around a text
        let cap = |n: usize| max_tokens.map_or(n, |m| n.min(m));
        let tokens = match input {
            Input::Embed(texts) => texts.iter().map(|t| cap(t.len() + SPECIAL)).sum(),
            Input::Classify(_) => 0,
            Input::Generate { prompt, params } => {
                let history: usize = params
                    .history
                    .iter()
                    .map(|t| t.user.len() + t.assistant.len() + SPECIAL)
                    .sum();
                let system = params.system.as_ref().map_or(0, String::len);
                prompt.len() + history + system + SPECIAL + params.max_tokens
            }
        };
        self.worst_case_of(tokens)
    }

    /// The most a request that runs at most `tokens` tokens can cost.
    ///
    /// ```
    /// use keel::cost::CostModel;
    /// let price = CostModel { per_call: 0.5, per_1k_tokens: 1.0, per_ms: 0.0, max_ms: 0.0 };
    /// assert_eq!(price.worst_case_of(2000), 2.5);
    /// ```
    pub fn worst_case_of(&self, tokens: usize) -> f64 {
        self.per_call + self.per_1k_tokens * tokens as f64 / 1e3 + self.per_ms * self.max_ms
    }
}
