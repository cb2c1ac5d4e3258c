//! Human review as a structural control: a policy declared in the manifest sends predictions
//! to a durable review queue, and the labels reviewers give (and ground truth reported later)
//! become feedback: online accuracy, model/reviewer agreement, and labelled examples to retrain on.
//!
//! The policy is the manifest's `[review]` table: rules over the output (confidence, margin,
//! entropy, predicted class; for a generation its text, length, finish reason and token
//! log-probabilities), the input's fields, the contract's flags, the drift state and the cost,
//! each leading to `auto`, `review` or `block`. The strictest matching rule decides.
//!
//! ```toml
//! [review]
//! provisional = true         # a prediction held for review is served, marked (false: refused)
//! [[review.rules]]
//! when = "confidence"        # max probability of a row
//! below = 0.9
//! action = "review"
//! [[review.rules]]
//! when = "class"
//! equals = "malignant"
//! action = "review"
//! [[review.rules]]
//! when = "input.mean radius" # a field of the row
//! above = 40.0
//! action = "block"
//! [[review.rules]]
//! when = "text"              # a generation's reply
//! matches = "(?i)refund|lawsuit"
//! action = "review"
//! [[review.rules]]
//! when = "mean_logprob"      # also min_logprob, length (tokens), finish ("stop", "length", ...)
//! below = -2.5
//! action = "review"
//! ```
//!
//! A generation is judged when it ends. Under a policy that may refuse it (a `block` rule, or
//! `review` rules with `provisional = false`) its tokens are held until then: a held or blocked
//! reply streams nothing; otherwise it streams as it is made and its answer carries the ticket.
//!
//! [`Reviewed`] is the layer that applies it; [`quality`] and [`export`] read the feedback.

mod layer;
mod quality;

pub use layer::{Judgement, ReviewError, Reviewed};
pub use quality::{add_ground_truth, export, quality, Quality};

use crate::{Classification, Output, Record, Value};
use serde::Serialize;

/// What a rule (and a policy) decides for a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Served, nobody looks.
    Auto,
    /// Put before a reviewer (served provisionally or held, as the policy says).
    Review,
    /// Refused, and put before a reviewer.
    Block,
}

impl Decision {
    /// The decision as written in the manifest and in the answer's notes.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Auto => "auto",
            Decision::Review => "review",
            Decision::Block => "block",
        }
    }
}

/// What a rule looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A row's top probability.
    Confidence,
    /// A row's top probability minus the second.
    Margin,
    /// A row's entropy (nats).
    Entropy,
    /// A row's predicted label.
    Class,
    /// A field of the input row.
    Input(String),
    /// `flagged` when the contract layer flagged or repaired a field, else `clean`.
    Contract,
    /// The version's drift state: `ok`, `warn` or `alarm`.
    Drift,
    /// The request's cost (from the cost layer below).
    Cost,
    /// A generation's text (tested with `matches`, a regular expression).
    Text,
    /// A generation's length in tokens.
    Length,
    /// Why a generation ended: `stop`, `length`, `context_full`.
    Finish,
    /// The mean of a generation's token log-probabilities (its confidence).
    MeanLogprob,
    /// The least of a generation's token log-probabilities.
    MinLogprob,
}

impl Signal {
    /// Whether the signal needs the generation's token log-probabilities.
    fn needs_logprobs(&self) -> bool {
        matches!(self, Signal::MeanLogprob | Signal::MinLogprob)
    }
}

/// A regular expression of a rule (compared by its text).
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// When a rule matches.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// A number below this.
    Below(f64),
    /// A number above this.
    Above(f64),
    /// A text (or a number's text) equal to one of these.
    In(Vec<String>),
    /// A text in which this regular expression finds a match.
    Matches(Pattern),
}

/// One rule: a signal, a test, an action.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name in reasons (the manifest's `name`, or the rule as written).
    pub name: String,
    /// What it looks at.
    pub signal: Signal,
    /// When it matches.
    pub test: Test,
    /// What it decides.
    pub action: Decision,
}

/// A version's review policy: its rules and what happens to a held prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The rules, in the manifest's order.
    pub rules: Vec<Rule>,
    /// Whether a prediction sent to review is served (marked, with its ticket) or refused with
    /// [`ErrorKind::Review`](crate::ErrorKind::Review) until a reviewer labels it.
    pub provisional: bool,
}

/// What a request's outcome looked like to the policy.
#[derive(Debug, Default, Clone)]
pub struct Observation<'a> {
    /// The input rows (a tabular model).
    pub rows: &'a [Record],
    /// The output.
    pub output: Option<&'a Output>,
    /// Whether the contract layer flagged or repaired anything.
    pub contract_flagged: bool,
    /// The drift state (`ok`, `warn`, `alarm`), if the version has a drift monitor.
    pub drift: Option<&'a str>,
    /// The request's cost, if a cost layer priced it.
    pub cost: Option<f64>,
}

/// The policy's verdict on one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The strictest matching rule's action (`auto` when none matched).
    pub decision: Decision,
    /// Each matching rule, with what it saw ("confidence 0.62 below 0.9", "row 3: ...").
    pub reasons: Vec<String>,
}

impl Policy {
    /// Whether the policy can refuse a generation (a `block` rule, or `review` rules that hold):
    /// then its tokens are held until it is judged.
    pub fn may_refuse(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == Decision::Block || (r.action == Decision::Review && !self.provisional))
    }

    /// Whether a rule reads the generation's token log-probabilities (they are then asked for).
    pub fn needs_logprobs(&self) -> bool {
        self.rules.iter().any(|r| r.signal.needs_logprobs())
    }

    /// The policy of a manifest's `[review]` table.
    ///
    /// # Errors
    /// A message naming the rule and what is wrong with it.
    pub fn from_table(table: &toml::Table) -> Result<Self, String> {
        let provisional = match table.get("provisional") {
            None => true,
            Some(v) => v.as_bool().ok_or("[review] provisional must be true or false")?,
        };
        let rules = match table.get("rules") {
            None => Vec::new(),
            Some(toml::Value::Array(rules)) => rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let r = r
                        .as_table()
                        .ok_or(format!("[[review.rules]] {i} is not a table"))?;
                    rule(r).map_err(|e| format!("[[review.rules]] {i}: {e}"))
                })
                .collect::<Result<_, String>>()?,
            Some(_) => return Err("[review] rules must be an array of tables ([[review.rules]])".into()),
        };
        Ok(Self { rules, provisional })
    }

    /// Applies every rule; the strictest matching one decides.
    pub fn judge(&self, seen: &Observation<'_>) -> Verdict {
        let mut verdict = Verdict {
            decision: Decision::Auto,
            reasons: Vec::new(),
        };
        for rule in &self.rules {
            for (row, value) in values(&rule.signal, seen) {
                if let Some(saw) = rule.test.matches(&value) {
                    let at = row.map(|r| format!("row {r}: ")).unwrap_or_default();
                    verdict.reasons.push(format!("{at}{}: {saw}", rule.name));
                    verdict.decision = verdict.decision.max(rule.action);
                    break;
                }
            }
        }
        verdict
    }
}

fn rule(r: &toml::Table) -> Result<Rule, String> {
    let when = r
        .get("when")
        .and_then(toml::Value::as_str)
        .ok_or("it needs `when` (a signal)")?;
    let signal = match when {
        "confidence" => Signal::Confidence,
        "margin" => Signal::Margin,
        "entropy" => Signal::Entropy,
        "class" => Signal::Class,
        "contract" => Signal::Contract,
        "drift" => Signal::Drift,
        "cost" => Signal::Cost,
        "text" => Signal::Text,
        "length" => Signal::Length,
        "finish" => Signal::Finish,
        "mean_logprob" => Signal::MeanLogprob,
        "min_logprob" => Signal::MinLogprob,
        other => match other.strip_prefix("input.") {
            Some(field) if !field.is_empty() => Signal::Input(field.to_string()),
            _ => {
                return Err(format!(
                    "unknown signal '{other}' (confidence, margin, entropy, class, input.FIELD, contract, drift, cost, text, length, finish, mean_logprob, min_logprob)"
                ))
            }
        },
    };
    let number = |key: &str| -> Result<Option<f64>, String> {
        match r.get(key) {
            None => Ok(None),
            Some(toml::Value::Float(x)) => Ok(Some(*x)),
            Some(toml::Value::Integer(x)) => Ok(Some(*x as f64)),
            Some(_) => Err(format!("`{key}` must be a number")),
        }
    };
    let text = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(x) => Ok(x.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        _ => Err("`equals` and `in` take texts".to_string()),
    };
    let (below, above) = (number("below")?, number("above")?);
    let set = match (r.get("equals"), r.get("in")) {
        (Some(v), None) => Some(vec![text(v)?]),
        (None, Some(toml::Value::Array(items))) => Some(items.iter().map(text).collect::<Result<_, _>>()?),
        (None, Some(_)) => return Err("`in` must be an array".into()),
        (Some(_), Some(_)) => return Err("give `equals` or `in`, not both".into()),
        (None, None) => None,
    };
    let pattern = match r.get("matches") {
        None => None,
        Some(toml::Value::String(p)) => {
            Some(Pattern(regex::Regex::new(p).map_err(|e| {
                format!("`matches` is not a regular expression: {e}")
            })?))
        }
        Some(_) => return Err("`matches` must be a text (a regular expression)".into()),
    };
    let (test, written) = match (below, above, set, pattern) {
        (Some(x), None, None, None) => (Test::Below(x), format!("{when} below {x}")),
        (None, Some(x), None, None) => (Test::Above(x), format!("{when} above {x}")),
        (None, None, Some(set), None) => {
            let written = format!("{when} in [{}]", set.join(", "));
            (Test::In(set), written)
        }
        (None, None, None, Some(p)) => {
            let written = format!("{when} matches /{}/", p.0.as_str());
            (Test::Matches(p), written)
        }
        _ => return Err("give exactly one of `below`, `above`, `equals`, `in`, `matches`".into()),
    };
    let numeric = matches!(
        signal,
        Signal::Confidence
            | Signal::Margin
            | Signal::Entropy
            | Signal::Cost
            | Signal::Length
            | Signal::MeanLogprob
            | Signal::MinLogprob
    );
    if !numeric && matches!(signal, Signal::Text) != matches!(test, Test::Matches(_)) {
        return Err(format!(
            "`matches` tests a generation's text: `when = \"text\"` takes it, and only it ({when})"
        ));
    }
    if numeric && matches!(test, Test::In(_) | Test::Matches(_)) {
        return Err(format!("{when} is a number: compare it with `below` or `above`"));
    }
    if matches!(
        signal,
        Signal::Class | Signal::Contract | Signal::Drift | Signal::Finish
    ) && !matches!(test, Test::In(_))
    {
        return Err(format!("{when} is a text: compare it with `equals` or `in`"));
    }
    let action = match r.get("action").and_then(toml::Value::as_str) {
        Some("auto") => Decision::Auto,
        Some("review") => Decision::Review,
        Some("block") => Decision::Block,
        _ => return Err("`action` must be \"auto\", \"review\" or \"block\"".into()),
    };
    let name = match r.get("name") {
        Some(toml::Value::String(n)) => n.clone(),
        Some(_) => return Err("`name` must be a text".into()),
        None => written,
    };
    Ok(Rule {
        name,
        signal,
        test,
        action,
    })
}

/// A value a rule can test.
enum Seen {
    Number(f64),
    Text(String),
}

impl Test {
    /// What matched, for the reason; None if it does not.
    fn matches(&self, value: &Seen) -> Option<String> {
        match (self, value) {
            (Test::Below(x), Seen::Number(v)) if v < x => Some(format!("{v:.4} < {x}")),
            (Test::Above(x), Seen::Number(v)) if v > x => Some(format!("{v:.4} > {x}")),
            (Test::In(set), Seen::Text(t)) if set.contains(t) => Some(format!("'{t}'")),
            (Test::In(set), Seen::Number(v)) if set.contains(&v.to_string()) => Some(format!("{v}")),
            (Test::Matches(p), Seen::Text(t)) => p.0.find(t).map(|m| format!("'{}'", m.as_str())),
            _ => None,
        }
    }
}

/// The values of a signal in an observation: per row for rows and classes, once otherwise.
fn values(signal: &Signal, seen: &Observation<'_>) -> Vec<(Option<usize>, Seen)> {
    let classes: &[Classification] = seen.output.and_then(Output::classes).unwrap_or(&[]);
    let completion = seen.output.and_then(Output::completion);
    let per_class = |f: &dyn Fn(&Classification) -> Seen| -> Vec<(Option<usize>, Seen)> {
        classes.iter().enumerate().map(|(i, c)| (Some(i), f(c))).collect()
    };
    match signal {
        Signal::Confidence => per_class(&|c| Seen::Number(c.confidence().max_probability)),
        Signal::Margin => per_class(&|c| Seen::Number(c.confidence().margin)),
        Signal::Entropy => per_class(&|c| Seen::Number(c.confidence().entropy)),
        Signal::Class => per_class(&|c| Seen::Text(c.label.clone())),
        Signal::Input(field) => seen
            .rows
            .iter()
            .enumerate()
            .filter_map(|(i, row)| match row.get(field)? {
                Value::Number(x) => Some((Some(i), Seen::Number(*x))),
                Value::Text(t) => Some((Some(i), Seen::Text(t.clone()))),
                _ => None,
            })
            .collect(),
        Signal::Contract => {
            let state = if seen.contract_flagged { "flagged" } else { "clean" };
            vec![(None, Seen::Text(state.into()))]
        }
        Signal::Drift => seen
            .drift
            .map(|d| (None, Seen::Text(d.into())))
            .into_iter()
            .collect(),
        Signal::Cost => seen.cost.map(|c| (None, Seen::Number(c))).into_iter().collect(),
        Signal::Text => completion
            .map(|c| (None, Seen::Text(c.text.clone())))
            .into_iter()
            .collect(),
        Signal::Length => completion
            .map(|c| (None, Seen::Number(c.token_ids.len() as f64)))
            .into_iter()
            .collect(),
        Signal::Finish => completion
            .map(|c| (None, Seen::Text(c.finish.as_str().into())))
            .into_iter()
            .collect(),
        Signal::MeanLogprob => completion
            .and_then(crate::Completion::mean_logprob)
            .map(|l| (None, Seen::Number(l)))
            .into_iter()
            .collect(),
        Signal::MinLogprob => completion
            .and_then(crate::Completion::min_logprob)
            .map(|l| (None, Seen::Number(l)))
            .into_iter()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy, String> {
        let table: toml::Table = toml::from_str(text).unwrap();
        Policy::from_table(table["review"].as_table().unwrap())
    }

    #[test]
    fn rules_are_checked_when_read() {
        for (text, expected) in [
            ("[review]\nrules = 3", "array of tables"),
            (
                "[[review.rules]]\nwhen = \"mood\"\nbelow = 1\naction = \"review\"",
                "unknown signal 'mood'",
            ),
            (
                "[[review.rules]]\nwhen = \"confidence\"\naction = \"review\"",
                "exactly one of",
            ),
            (
                "[[review.rules]]\nwhen = \"confidence\"\nequals = \"x\"\naction = \"review\"",
                "is a number",
            ),
            (
                "[[review.rules]]\nwhen = \"class\"\nbelow = 1\naction = \"review\"",
                "is a text",
            ),
            (
                "[[review.rules]]\nwhen = \"class\"\nequals = \"a\"\naction = \"later\"",
                "`action` must be",
            ),
        ] {
            let e = policy(text).unwrap_err();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn the_strictest_matching_rule_decides() {
        let p = policy(
            "[review]\nprovisional = false
             [[review.rules]]\nwhen = \"confidence\"\nbelow = 0.9\naction = \"review\"
             [[review.rules]]\nwhen = \"input.size\"\nabove = 40\naction = \"block\"
             [[review.rules]]\nname = \"drifting\"\nwhen = \"drift\"\nequals = \"alarm\"\naction = \"review\"",
        )
        .unwrap();
        assert!(!p.provisional);
        let class = |p: f32| Classification {
            class: 0,
            label: "a".into(),
            probabilities: vec![p, 1.0 - p],
        };
        let rows: Vec<Record> = [10.0, 50.0]
            .iter()
            .map(|x| [("size".to_string(), Value::Number(*x))].into())
            .collect();
        let output = Output::Classes(vec![class(0.99), class(0.6)]);
        let seen = |rows, drift| Observation {
            rows,
            output: Some(&output),
            drift,
            ..Default::default()
        };
        let v = p.judge(&seen(&rows[..1], Some("ok")));
        assert_eq!(v.decision, Decision::Review, "{v:?}");
        assert_eq!(v.reasons, ["row 1: confidence below 0.9: 0.6000 < 0.9"]);
        let v = p.judge(&seen(&rows, Some("alarm")));
        assert_eq!(v.decision, Decision::Block);
        assert_eq!(v.reasons.len(), 3, "{v:?}");
        // The other signals, each on its own.
        let rule = |text: &str| policy(&format!("[[review.rules]]\n{text}\naction = \"review\"")).unwrap();
        let unsure = Output::Classes(vec![class(0.55)]);
        let judged = |p: &Policy, seen: Observation<'_>| p.judge(&seen).decision;
        let on = |output| Observation {
            output: Some(output),
            ..Default::default()
        };
        assert_eq!(
            judged(&rule("when = \"margin\"\nbelow = 0.2"), on(&unsure)),
            Decision::Review
        );
        assert_eq!(
            judged(&rule("when = \"margin\"\nbelow = 0.25"), on(&output)),
            Decision::Review
        );
        assert_eq!(
            judged(&rule("when = \"entropy\"\nabove = 0.6"), on(&unsure)),
            Decision::Review
        );
        let sure = Output::Classes(vec![class(0.99)]);
        assert_eq!(
            judged(&rule("when = \"entropy\"\nabove = 0.6"), on(&sure)),
            Decision::Auto
        );
        assert_eq!(
            judged(&rule("when = \"class\"\nin = [\"a\", \"c\"]"), on(&sure)),
            Decision::Review
        );
        assert_eq!(
            judged(&rule("when = \"class\"\nequals = \"b\""), on(&sure)),
            Decision::Auto
        );
        let contract = rule("when = \"contract\"\nequals = \"flagged\"");
        let flagged = |f| Observation {
            contract_flagged: f,
            ..Default::default()
        };
        assert_eq!(judged(&contract, flagged(true)), Decision::Review);
        assert_eq!(judged(&contract, flagged(false)), Decision::Auto);
        let cost = rule("when = \"cost\"\nabove = 0.05");
        let priced = |c| Observation {
            cost: Some(c),
            ..Default::default()
        };
        assert_eq!(judged(&cost, priced(0.1)), Decision::Review);
        assert_eq!(judged(&cost, priced(0.01)), Decision::Auto);
        assert_eq!(
            judged(&cost, Observation::default()),
            Decision::Auto,
            "unpriced: no cost to judge"
        );
        let calm = Output::Classes(vec![class(0.99)]);
        let v = p.judge(&Observation {
            rows: &rows[..1],
            output: Some(&calm),
            ..Default::default()
        });
        assert_eq!((v.decision, v.reasons.len()), (Decision::Auto, 0));
    }

    #[test]
    fn generations_are_judged_by_text_length_finish_and_logprobs() {
        let reply = Output::Completion(crate::Completion {
            prompt_ids: vec![1, 2],
            token_ids: vec![5, 6, 7],
            text: "We will refund you.".into(),
            finish: crate::FinishReason::Length,
            logprobs: vec![-0.5, -4.0, -0.5],
        });
        let on = Observation {
            output: Some(&reply),
            ..Default::default()
        };
        let rule = |text: &str| policy(&format!("[[review.rules]]\n{text}\naction = \"review\"")).unwrap();
        let v = rule("when = \"text\"\nmatches = \"(?i)REFUND|lawsuit\"").judge(&on);
        assert_eq!(v.reasons, ["text matches /(?i)REFUND|lawsuit/: 'refund'"]);
        for (text, decision) in [
            ("when = \"text\"\nmatches = \"lawsuit\"", Decision::Auto),
            ("when = \"length\"\nabove = 2", Decision::Review),
            ("when = \"length\"\nabove = 3", Decision::Auto),
            ("when = \"finish\"\nequals = \"length\"", Decision::Review),
            ("when = \"finish\"\nequals = \"stop\"", Decision::Auto),
            ("when = \"mean_logprob\"\nbelow = -1.5", Decision::Review),
            ("when = \"mean_logprob\"\nbelow = -2.0", Decision::Auto),
            ("when = \"min_logprob\"\nbelow = -3.0", Decision::Review),
        ] {
            assert_eq!(rule(text).judge(&on).decision, decision, "{text}");
        }
        assert!(rule("when = \"min_logprob\"\nbelow = -3.0").needs_logprobs());
        assert!(!rule("when = \"length\"\nabove = 3").needs_logprobs());
        for (text, expected) in [
            ("when = \"text\"\nmatches = \"(\"", "not a regular expression"),
            ("when = \"class\"\nmatches = \"a\"", "only it"),
            ("when = \"length\"\nmatches = \"a\"", "is a number"),
            ("when = \"finish\"\nbelow = 1", "is a text"),
        ] {
            let e = policy(&format!("[[review.rules]]\n{text}\naction = \"review\"")).unwrap_err();
            assert!(e.contains(expected), "{text}: {e}");
        }
        // A policy that may refuse holds a generation's tokens; a provisional one streams them.
        let holds = |text: &str| policy(text).unwrap().may_refuse();
        assert!(!holds(
            "[[review.rules]]\nwhen = \"length\"\nabove = 3\naction = \"review\""
        ));
        assert!(holds("[review]\nprovisional = false\n[[review.rules]]\nwhen = \"length\"\nabove = 3\naction = \"review\""));
        assert!(holds(
            "[[review.rules]]\nwhen = \"length\"\nabove = 3\naction = \"block\""
        ));
    }
}
