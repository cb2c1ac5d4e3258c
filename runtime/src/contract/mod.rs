//! Data contracts: what a model version accepts, declared in its manifest's `[contract]` table and
//! versioned with it (the version id hashes the manifest; [`Contract::hash`] names the contract
//! alone). Inputs that break a clause are refused, served with the violation recorded, or
//! repaired, as the clause's [`Action`] says; never silently passed on.
//!
//! ```toml
//! [contract.fields."mean radius"]
//! type = "number"            # number | category | timestamp | tensor
//! required = true            # a missing required field is refused
//! range = [0.0, 42.3]
//! range_action = "reject"    # reject | flag | clamp (to the range)
//! non_finite = "reject"      # NaN/Inf: reject | flag | clamp (Inf to the range's end, NaN to `default`)
//!
//! [contract.fields.observed_at]
//! type = "timestamp"         # RFC 3339 text, or seconds since the Unix epoch
//! required = false
//! max_age = "30d"
//! max_age_action = "reject"
//!
//! [contract.fields.site]
//! type = "category"
//! categories = ["clinic-a", "clinic-b"]
//! categories_action = "flag"
//!
//! [contract.text]            # encoders and decoders: each text, a generation's prompt
//! non_empty = "reject"
//! max_tokens = 256
//! max_tokens_action = "flag" # clamp: served cut to max_tokens (the encoder cuts), recorded
//!
//! [contract.chat]            # decoders: the conversation a generation runs
//! max_messages = 16          # system turn, history and prompt, each a message
//! max_messages_action = "reject"
//! roles = ["user", "assistant"]  # a system turn here is refused
//! roles_action = "reject"
//! max_total_tokens = 1024    # the whole conversation after the chat template
//! max_total_tokens_action = "reject"
//! ```
//!
//! [`Contracted`] is the layer that applies a version's contract on the request path.

mod layer;

pub use layer::{Contracted, ViolationCount};

use crate::{Record, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What happens to an input that breaks a clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refused: the caller gets a [`ContractViolation`].
    Reject,
    /// Served, with the violation recorded.
    Flag,
    /// Repaired (clamped into range, a default put in), served, and recorded.
    Clamp,
}

impl Action {
    /// The action's name as the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reject => "reject",
            Action::Flag => "flag",
            Action::Clamp => "clamp",
        }
    }
}

/// The kinds of clause a contract has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Clause {
    /// A required field is missing.
    Required,
    /// A value of the wrong type (text where a number is declared, ...).
    Type,
    /// A number that is not of the declared dtype (an integer field with a fraction).
    Dtype,
    /// A tensor of the wrong shape.
    Shape,
    /// A number outside its range.
    Range,
    /// NaN or an infinity.
    NonFinite,
    /// A category not in the allowed set.
    Categories,
    /// A timestamp older than the maximum age.
    Freshness,
    /// An empty (or all-whitespace) text.
    NonEmpty,
    /// A text longer than the maximum number of tokens.
    MaxTokens,
    /// A conversation with more messages than allowed.
    Messages,
    /// A message of a role not allowed.
    Roles,
    /// A conversation longer, in tokens after the chat template, than allowed.
    TotalTokens,
}

impl Clause {
    /// The clause's name, as errors, metrics and lineage spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Clause::Required => "required",
            Clause::Type => "type",
            Clause::Dtype => "dtype",
            Clause::Shape => "shape",
            Clause::Range => "range",
            Clause::NonFinite => "non_finite",
            Clause::Categories => "categories",
            Clause::Freshness => "freshness",
            Clause::NonEmpty => "non_empty",
            Clause::MaxTokens => "max_tokens",
            Clause::Messages => "max_messages",
            Clause::Roles => "roles",
            Clause::TotalTokens => "max_total_tokens",
        }
    }
}

/// One broken clause.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    /// The row (tabular input) or text it was found in.
    pub item: usize,
    /// The field (`text` for a text input).
    pub field: String,
    /// The clause.
    pub clause: Clause,
    /// The value as it came, as text.
    pub value: String,
    /// What the clause expects.
    pub expected: String,
    /// What was done.
    pub action: Action,
}

impl Violation {
    /// Refuses the input (a clause with action `reject`), or records the violation in `found`.
    fn noted(self, found: &mut Vec<Violation>) -> std::result::Result<(), ContractViolation> {
        if self.action == Action::Reject {
            return Err(ContractViolation(self));
        }
        found.push(self);
        Ok(())
    }
}

/// The error of a refused request: the first clause with action `reject` that an input broke.
#[derive(Debug, Clone, PartialEq)]
pub struct ContractViolation(pub Violation);

impl fmt::Display for ContractViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.0;
        write!(
            f,
            "contract violation: item {}: field '{}' breaks its {} clause (expected {}, got {})",
            v.item,
            v.field,
            v.clause.as_str(),
            v.expected,
            v.value
        )
    }
}

impl std::error::Error for ContractViolation {}

/// A request's verdict: the clauses its inputs broke (flagged or repaired; a refused request has
/// none, it has an error). Empty when every input passed. The contract layer notes it on the
/// request, so that it travels with the answer (the review policy reads it, lineage keeps it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verdict {
    /// The contract's hash (see [`Contract::hash`]).
    pub contract: String,
    /// The broken clauses.
    pub violations: Vec<Violation>,
    /// How long the check took (the `contract` stage of the metrics).
    #[serde(skip)]
    pub took: Duration,
}

impl crate::Note for Verdict {
    fn key(&self) -> &'static str {
        "contract"
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

impl Verdict {
    /// Whether every input passed.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// A field's declared type.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Number { integer: bool },
    Category,
    Timestamp,
    Tensor { shape: Option<Vec<Option<usize>>> },
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    name: String,
    kind: Kind,
    required: bool,
    default: Option<f64>,
    range: Option<(f64, f64, Action)>,
    non_finite: Action,
    categories: Option<(Vec<String>, Action)>,
    max_age: Option<(Duration, Action)>,
    shape_action: Action,
}

#[derive(Debug, Clone, PartialEq)]
struct TextRules {
    non_empty: Option<Action>,
    max_tokens: Option<(usize, Action)>,
}

#[derive(Debug, Clone, PartialEq)]
struct ChatRules {
    max_messages: Option<(usize, Action)>,
    roles: Option<(Vec<String>, Action)>,
    max_total_tokens: Option<(usize, Action)>,
}

/// A version's contract, read from its manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    fields: Vec<Field>,
    text: Option<TextRules>,
    chat: Option<ChatRules>,
    hash: String,
}

/// The manifest's spelling of a field, checked strictly: a misspelled key is an error, not a
/// clause silently missing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldSpec {
    #[serde(rename = "type")]
    kind: String,
    dtype: Option<String>,
    #[serde(default = "yes")]
    required: bool,
    default: Option<f64>,
    range: Option<[f64; 2]>,
    range_action: Option<Action>,
    non_finite: Option<Action>,
    categories: Option<Vec<String>>,
    categories_action: Option<Action>,
    max_age: Option<String>,
    max_age_action: Option<Action>,
    shape: Option<Vec<i64>>,
    shape_action: Option<Action>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextSpec {
    non_empty: Option<Action>,
    max_tokens: Option<usize>,
    max_tokens_action: Option<Action>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatSpec {
    max_messages: Option<usize>,
    max_messages_action: Option<Action>,
    roles: Option<Vec<String>>,
    roles_action: Option<Action>,
    max_total_tokens: Option<usize>,
    max_total_tokens_action: Option<Action>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContractSpec {
    #[serde(default)]
    fields: BTreeMap<String, FieldSpec>,
    text: Option<TextSpec>,
    chat: Option<ChatSpec>,
}

impl Contract {
    /// The contract of a manifest's `[contract]` table.
    ///
    /// # Errors
    /// A clause that is misspelled, of the wrong shape, or with an action it cannot take
    /// (`clamp` on a category), as a message naming the field.
    pub fn from_table(table: &toml::Table) -> std::result::Result<Self, String> {
        let spec: ContractSpec = table
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| format!("[contract]: {}", e.message()))?;
        let mut fields = Vec::with_capacity(spec.fields.len());
        for (name, f) in spec.fields {
            let bad = |why: &str| Err(format!("[contract.fields.\"{name}\"]: {why}"));
            let kind = match (f.kind.as_str(), f.dtype.as_deref()) {
                ("number", None | Some("float" | "f32" | "f64")) => Kind::Number { integer: false },
                ("number", Some("int" | "i64")) => Kind::Number { integer: true },
                ("number", Some(d)) => return bad(&format!("dtype '{d}' is not float or int")),
                ("category", _) => Kind::Category,
                ("timestamp", _) => Kind::Timestamp,
                ("tensor", _) => Kind::Tensor {
                    shape: f
                        .shape
                        .as_ref()
                        .map(|s| s.iter().map(|&d| usize::try_from(d).ok()).collect()),
                },
                (other, _) => {
                    return bad(&format!(
                        "type '{other}' is not number, category, timestamp or tensor"
                    ))
                }
            };
            let range = match f.range {
                Some([lo, hi]) if lo <= hi => Some((lo, hi, f.range_action.unwrap_or(Action::Reject))),
                Some(_) => return bad("range must be [min, max] with min <= max"),
                None => None,
            };
            let max_age = match &f.max_age {
                Some(text) => match humantime::parse_duration(text) {
                    Ok(d) => Some((d, f.max_age_action.unwrap_or(Action::Reject))),
                    Err(e) => return bad(&format!("max_age '{text}': {e}")),
                },
                None => None,
            };
            let categories = f
                .categories
                .map(|c| (c, f.categories_action.unwrap_or(Action::Reject)));
            if matches!(categories, Some((_, Action::Clamp))) || matches!(max_age, Some((_, Action::Clamp))) {
                return bad("a category or a timestamp cannot be clamped: use reject or flag");
            }
            if f.shape_action == Some(Action::Clamp) {
                return bad("a shape cannot be clamped: use reject or flag");
            }
            let non_finite = f.non_finite.unwrap_or(Action::Reject);
            fields.push(Field {
                name,
                kind,
                required: f.required,
                default: f.default,
                range,
                non_finite,
                categories,
                max_age,
                shape_action: f.shape_action.unwrap_or(Action::Reject),
            });
        }
        let text = spec.text.map(|t| TextRules {
            non_empty: t.non_empty,
            max_tokens: t
                .max_tokens
                .map(|n| (n, t.max_tokens_action.unwrap_or(Action::Reject))),
        });
        let chat = match spec.chat {
            Some(c) => {
                // A conversation cannot be repaired: only reject or flag.
                fn rule<T>(
                    v: Option<T>,
                    action: Option<Action>,
                ) -> std::result::Result<Option<(T, Action)>, String> {
                    match (v, action.unwrap_or(Action::Reject)) {
                        (Some(_), Action::Clamp) => Err(
                            "[contract.chat]: a conversation cannot be clamped: use reject or flag".into(),
                        ),
                        (v, a) => Ok(v.map(|v| (v, a))),
                    }
                }
                Some(ChatRules {
                    max_messages: rule(c.max_messages, c.max_messages_action)?,
                    roles: rule(c.roles, c.roles_action)?,
                    max_total_tokens: rule(c.max_total_tokens, c.max_total_tokens_action)?,
                })
            }
            None => None,
        };
        let canonical = toml::to_string(table).unwrap_or_default();
        let hash = crate::manifest::hex_digest(&Sha256::digest(canonical.as_bytes()));
        Ok(Self {
            fields,
            text,
            chat,
            hash,
        })
    }

    /// Checks a generation's conversation: the roles of its messages (`system` for the system
    /// turn, `user` and `assistant` for each exchange of the history, `user` for the prompt),
    /// their number, and its length in tokens after the chat template (`total_tokens`, called
    /// only if the contract limits it).
    ///
    /// # Errors
    /// The first clause with action `reject` that the conversation broke.
    pub fn check_chat(
        &self,
        roles: &[&str],
        total_tokens: impl FnOnce() -> Option<usize>,
        found: &mut Vec<Violation>,
    ) -> std::result::Result<(), ContractViolation> {
        let Some(rules) = &self.chat else { return Ok(()) };
        let mut note = |clause: Clause, value: String, expected: String, action: Action| {
            Violation {
                item: 0,
                field: "messages".into(),
                clause,
                value,
                expected,
                action,
            }
            .noted(found)
        };
        if let Some((allowed, action)) = &rules.roles {
            if let Some(role) = roles.iter().find(|r| !allowed.iter().any(|a| a == *r)) {
                let expected = format!("roles {}", allowed.join(", "));
                note(Clause::Roles, format!("a {role} message"), expected, *action)?;
            }
        }
        if let Some((max, action)) = rules.max_messages {
            if roles.len() > max {
                let got = format!("{} messages", roles.len());
                note(Clause::Messages, got, format!("at most {max} messages"), action)?;
            }
        }
        if let Some((max, action)) = rules.max_total_tokens {
            if let Some(n) = total_tokens().filter(|n| *n > max) {
                note(
                    Clause::TotalTokens,
                    format!("{n} tokens"),
                    format!("at most {max} tokens in all"),
                    action,
                )?;
            }
        }
        Ok(())
    }

    /// The sha256 of the contract's table: which contract judged an input, in lineage.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The largest number of tokens a text may have, if the contract says.
    pub fn max_tokens(&self) -> Option<usize> {
        self.text.as_ref()?.max_tokens.map(|(n, _)| n)
    }

    /// Checks (and repairs, where a clause says `clamp`) one row. Violations are appended to
    /// `found`; the first one whose action is `reject` is returned as the error.
    ///
    /// # Errors
    /// The first clause with action `reject` that the row broke.
    pub fn check_row(
        &self,
        item: usize,
        row: &mut Record,
        now: SystemTime,
        found: &mut Vec<Violation>,
    ) -> std::result::Result<(), ContractViolation> {
        for field in &self.fields {
            let mut note = |clause: Clause, value: String, expected: String, action: Action| {
                Violation {
                    item,
                    field: field.name.clone(),
                    clause,
                    value,
                    expected,
                    action,
                }
                .noted(found)
            };
            let value = match row.get_mut(&field.name) {
                Some(Value::Null) | None => {
                    match field.default {
                        Some(d) if matches!(field.kind, Kind::Number { .. }) => {
                            row.insert(field.name.clone(), Value::Number(d));
                        }
                        _ if field.required => note(
                            Clause::Required,
                            "missing".into(),
                            "a value".into(),
                            Action::Reject,
                        )?,
                        _ => {}
                    }
                    continue;
                }
                Some(v) => v,
            };
            match &field.kind {
                Kind::Number { integer } => {
                    // CSV cells arrive as text: a number written as text is a number.
                    if let Value::Text(t) = value {
                        match t.trim().parse::<f64>() {
                            Ok(x) => *value = Value::Number(x),
                            Err(_) => {
                                let got = format!("{t:?}");
                                note(Clause::Type, got, "a number".into(), Action::Reject)?;
                                continue;
                            }
                        }
                    }
                    let Value::Number(x) = value else {
                        note(Clause::Type, describe(value), "a number".into(), Action::Reject)?;
                        continue;
                    };
                    if !x.is_finite() {
                        let got = x.to_string();
                        let repaired = match (field.non_finite, field.range) {
                            (Action::Clamp, Some((lo, hi, _))) if x.is_infinite() => {
                                Some(if *x > 0.0 { hi } else { lo })
                            }
                            (Action::Clamp, _) if x.is_nan() => field.default,
                            _ => None,
                        };
                        match (field.non_finite, repaired) {
                            (Action::Clamp, Some(r)) => {
                                *x = r;
                                note(Clause::NonFinite, got, "a finite number".into(), Action::Clamp)?;
                            }
                            (Action::Clamp, None) | (Action::Reject, _) => {
                                note(Clause::NonFinite, got, "a finite number".into(), Action::Reject)?
                            }
                            (Action::Flag, _) => {
                                note(Clause::NonFinite, got, "a finite number".into(), Action::Flag)?;
                                continue;
                            }
                        }
                    }
                    if *integer && x.fract() != 0.0 {
                        note(Clause::Dtype, x.to_string(), "an integer".into(), Action::Reject)?;
                    }
                    if let Some((lo, hi, action)) = field.range {
                        if *x < lo || *x > hi {
                            let got = x.to_string();
                            if action == Action::Clamp {
                                *x = x.clamp(lo, hi);
                            }
                            note(Clause::Range, got, format!("[{lo}, {hi}]"), action)?;
                        }
                    }
                }
                Kind::Category => {
                    let Value::Text(t) = value else {
                        note(
                            Clause::Type,
                            describe(value),
                            "a category (text)".into(),
                            Action::Reject,
                        )?;
                        continue;
                    };
                    if let Some((allowed, action)) = &field.categories {
                        if !allowed.iter().any(|c| c == t) {
                            let expected = format!("one of {}", allowed.join(", "));
                            note(Clause::Categories, format!("{t:?}"), expected, *action)?;
                        }
                    }
                }
                Kind::Timestamp => {
                    let Some(at) = timestamp(value) else {
                        let expected = "an RFC 3339 time or seconds since the epoch".into();
                        note(Clause::Type, describe(value), expected, Action::Reject)?;
                        continue;
                    };
                    if let Some((max_age, action)) = field.max_age {
                        let age = now.duration_since(at).unwrap_or_default();
                        if age > max_age {
                            let got = format!(
                                "{} ({} old)",
                                describe(value),
                                humantime::format_duration(round(age))
                            );
                            let expected = format!("at most {} old", humantime::format_duration(max_age));
                            note(Clause::Freshness, got, expected, action)?;
                        }
                    }
                }
                Kind::Tensor { shape } => {
                    let (got, values) = match value {
                        Value::Tensor { shape, values } => (shape.clone(), values.as_slice()),
                        Value::Number(x) => (Vec::new(), std::slice::from_ref(x)),
                        other => {
                            note(
                                Clause::Type,
                                describe(other),
                                "a tensor (nested lists of numbers)".into(),
                                Action::Reject,
                            )?;
                            continue;
                        }
                    };
                    if let Some(want) = shape {
                        let fits = want.len() == got.len()
                            && want.iter().zip(&got).all(|(w, g)| w.is_none_or(|w| w == *g));
                        if !fits {
                            let expected = format!(
                                "shape [{}]",
                                want.iter()
                                    .map(|d| d.map_or("*".into(), |d| d.to_string()))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            );
                            note(Clause::Shape, format!("{got:?}"), expected, field.shape_action)?;
                        }
                    }
                    if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
                        let action = if field.non_finite == Action::Flag {
                            Action::Flag
                        } else {
                            Action::Reject
                        };
                        note(
                            Clause::NonFinite,
                            bad.to_string(),
                            "finite numbers".into(),
                            action,
                        )?;
                    }
                    let outside = field.range.and_then(|(lo, hi, action)| {
                        Some((lo, hi, action, values.iter().find(|x| **x < lo || **x > hi)?))
                    });
                    if let Some((lo, hi, action, x)) = outside {
                        let got = x.to_string();
                        if action == Action::Clamp {
                            if let Value::Tensor { values, .. } = value {
                                values.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
                            }
                        }
                        note(Clause::Range, got, format!("values in [{lo}, {hi}]"), action)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks one text; `tokens` counts its tokens (called only if the contract limits them).
    ///
    /// # Errors
    /// The first clause with action `reject` that the text broke.
    pub fn check_text(
        &self,
        item: usize,
        text: &str,
        tokens: impl FnOnce(&str) -> Option<usize>,
        found: &mut Vec<Violation>,
    ) -> std::result::Result<(), ContractViolation> {
        let Some(rules) = &self.text else { return Ok(()) };
        let mut note = |clause: Clause, value: String, expected: String, action: Action| {
            Violation {
                item,
                field: "text".into(),
                clause,
                value,
                expected,
                action,
            }
            .noted(found)
        };
        if let Some(action) = rules.non_empty {
            if text.trim().is_empty() {
                note(
                    Clause::NonEmpty,
                    format!("{text:?}"),
                    "a non-empty text".into(),
                    action,
                )?;
            }
        }
        if let Some((max, action)) = rules.max_tokens {
            if let Some(n) = tokens(text).filter(|n| *n > max) {
                note(
                    Clause::MaxTokens,
                    format!("{n} tokens"),
                    format!("at most {max} tokens"),
                    action,
                )?;
            }
        }
        Ok(())
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Number(x) => x.to_string(),
        Value::Text(t) => format!("{t:?}"),
        Value::Tensor { shape, .. } => format!("a tensor of shape {shape:?}"),
        Value::Null => "null".into(),
    }
}

fn timestamp(value: &Value) -> Option<SystemTime> {
    match value {
        Value::Text(t) => humantime::parse_rfc3339_weak(t.trim()).ok(),
        Value::Number(s) if s.is_finite() && *s >= 0.0 => UNIX_EPOCH.checked_add(Duration::from_secs_f64(*s)),
        _ => None,
    }
}

/// An age to the second, for messages.
fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(text: &str) -> Contract {
        Contract::from_table(&toml::from_str(text).unwrap()).unwrap()
    }

    fn row(pairs: &[(&str, Value)]) -> Record {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn each_action_does_what_it_says() {
        let c = contract(
            r#"
            [fields.a]
            type = "number"
            range = [0.0, 10.0]
            range_action = "clamp"
            [fields.b]
            type = "number"
            range = [0.0, 10.0]
            range_action = "flag"
            [fields.c]
            type = "number"
            range = [0.0, 10.0]
            "#,
        );
        let now = SystemTime::now();
        let mut found = Vec::new();
        let mut r = row(&[
            ("a", Value::Number(12.0)),
            ("b", Value::Number(-1.0)),
            ("c", Value::Text("5".into())),
        ]);
        c.check_row(0, &mut r, now, &mut found).unwrap();
        assert_eq!(r["a"], Value::Number(10.0), "clamped into range");
        assert_eq!(r["b"], Value::Number(-1.0), "flagged, served as it came");
        assert_eq!(r["c"], Value::Number(5.0), "a number written as text is a number");
        let clauses: Vec<_> = found
            .iter()
            .map(|v| (v.field.as_str(), v.clause, v.action))
            .collect();
        assert_eq!(
            clauses,
            [
                ("a", Clause::Range, Action::Clamp),
                ("b", Clause::Range, Action::Flag)
            ]
        );

        let mut r = row(&[
            ("a", Value::Number(1.0)),
            ("b", Value::Number(1.0)),
            ("c", Value::Number(11.0)),
        ]);
        let e = c.check_row(3, &mut r, now, &mut Vec::new()).unwrap_err();
        assert_eq!(
            (e.0.item, e.0.field.as_str(), e.0.clause),
            (3, "c", Clause::Range)
        );
        assert!(
            e.to_string()
                .contains("field 'c' breaks its range clause (expected [0, 10], got 11)"),
            "{e}"
        );

        let mut r = row(&[("a", Value::Number(1.0)), ("b", Value::Number(1.0))]);
        let e = c.check_row(0, &mut r, now, &mut Vec::new()).unwrap_err();
        assert_eq!((e.0.field.as_str(), e.0.clause), ("c", Clause::Required));
    }

    #[test]
    fn non_finite_clamp_uses_the_range_and_the_default() {
        let c = contract(
            r#"
            [fields.x]
            type = "number"
            range = [0.0, 5.0]
            non_finite = "clamp"
            default = 2.5
            "#,
        );
        let now = SystemTime::now();
        for (input, want) in [(f64::INFINITY, 5.0), (f64::NEG_INFINITY, 0.0), (f64::NAN, 2.5)] {
            let mut r = row(&[("x", Value::Number(input))]);
            let mut found = Vec::new();
            c.check_row(0, &mut r, now, &mut found).unwrap();
            assert_eq!(r["x"], Value::Number(want));
            assert_eq!(found[0].clause, Clause::NonFinite);
        }
        // Missing: the default goes in, and that is no violation.
        let mut r = Record::new();
        let mut found = Vec::new();
        c.check_row(0, &mut r, now, &mut found).unwrap();
        assert_eq!((r["x"].clone(), found.len()), (Value::Number(2.5), 0));
    }

    #[test]
    fn categories_freshness_shape_and_types() {
        let c = contract(
            r#"
            [fields.site]
            type = "category"
            required = false
            categories = ["a", "b"]
            categories_action = "flag"
            [fields.at]
            type = "timestamp"
            required = false
            max_age = "1h"
            [fields.image]
            type = "tensor"
            required = false
            shape = [2, -1]
            "#,
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut found = Vec::new();
        let mut r = row(&[("site", Value::Text("c".into()))]);
        c.check_row(0, &mut r, now, &mut found).unwrap();
        assert_eq!(found[0].clause, Clause::Categories);

        let fresh = row(&[("at", Value::Number(1_800_000_000.0 - 60.0))]);
        c.check_row(0, &mut fresh.clone(), now, &mut Vec::new()).unwrap();
        let stale = row(&[("at", Value::Text("2027-01-15T00:00:00Z".into()))]);
        let e = c
            .check_row(0, &mut stale.clone(), now, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.0.clause, Clause::Freshness, "{e}");
        let garbage = row(&[("at", Value::Text("yesterday".into()))]);
        assert_eq!(
            c.check_row(0, &mut garbage.clone(), now, &mut Vec::new())
                .unwrap_err()
                .0
                .clause,
            Clause::Type
        );

        let ok = row(&[(
            "image",
            Value::Tensor {
                shape: vec![2, 7],
                values: vec![0.0; 14],
            },
        )]);
        c.check_row(0, &mut ok.clone(), now, &mut Vec::new()).unwrap();
        let wrong = row(&[(
            "image",
            Value::Tensor {
                shape: vec![3, 7],
                values: vec![0.0; 21],
            },
        )]);
        assert_eq!(
            c.check_row(0, &mut wrong.clone(), now, &mut Vec::new())
                .unwrap_err()
                .0
                .clause,
            Clause::Shape
        );
    }

    #[test]
    fn bad_contracts_are_errors_that_name_the_field() {
        for (text, says) in [
            ("[fields.x]\ntype = \"number\"\nrange = [5.0, 1.0]", "min <= max"),
            ("[fields.x]\ntype = \"nubmer\"", "type 'nubmer'"),
            ("[fields.x]\ntype = \"number\"\nrnage = [0.0, 1.0]", "rnage"),
            (
                "[fields.x]\ntype = \"category\"\ncategories = [\"a\"]\ncategories_action = \"clamp\"",
                "cannot be clamped",
            ),
            (
                "[fields.x]\ntype = \"timestamp\"\nmax_age = \"soon\"",
                "max_age 'soon'",
            ),
        ] {
            let e = Contract::from_table(&toml::from_str(text).unwrap()).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn texts() {
        let c = contract("[text]\nnon_empty = \"reject\"\nmax_tokens = 4\nmax_tokens_action = \"flag\"");
        let mut found = Vec::new();
        c.check_text(0, "a b c d e f", |t| Some(t.split(' ').count()), &mut found)
            .unwrap();
        assert_eq!(found[0].clause, Clause::MaxTokens);
        let e = c.check_text(1, "  ", |_| Some(0), &mut Vec::new()).unwrap_err();
        assert_eq!((e.0.item, e.0.clause), (1, Clause::NonEmpty));
    }

    #[test]
    fn conversations() {
        let c = contract(
            "[chat]\nroles = [\"user\", \"assistant\"]\nmax_messages = 3\nmax_messages_action = \"flag\"\nmax_total_tokens = 10",
        );
        let e = c
            .check_chat(&["system", "user"], || Some(5), &mut Vec::new())
            .unwrap_err();
        assert_eq!(
            (e.0.clause, e.0.value.as_str()),
            (Clause::Roles, "a system message")
        );
        let mut found = Vec::new();
        c.check_chat(
            &["user", "assistant", "user", "assistant", "user"],
            || Some(9),
            &mut found,
        )
        .unwrap();
        assert_eq!(found[0].clause, Clause::Messages);
        let e = c.check_chat(&["user"], || Some(11), &mut Vec::new()).unwrap_err();
        assert_eq!(e.0.clause, Clause::TotalTokens);
        let clamp = Contract::from_table(
            &toml::from_str("[chat]\nroles = [\"user\"]\nroles_action = \"clamp\"").unwrap(),
        );
        assert!(clamp.unwrap_err().contains("cannot be clamped"));
    }
}
