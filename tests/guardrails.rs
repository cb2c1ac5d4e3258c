//! Every prediction through the guardrails, generation included: SmolLM2 (Q4_1 GGUF) streamed
//! through the stack the `keel` command, the C ABI and the server build, under a model folder
//! whose keel.toml carries `[contract.text]`, `[cost]` and `[review]`.

mod common;

use keel::contract::{Clause, ContractViolation};
use keel::cost::{Budget, BudgetError, Exhausted, Price};
use keel::review::{Judgement, ReviewError};
use keel::stack::Stack;
use keel::store::{SqliteStore, Store, TicketState};
use keel::version::RegisterOptions;
use keel::{ErrorKind, FinishReason, GenerateParams, Infer, InferRequest, InferResponse, Output};
use std::path::Path;
use std::sync::Arc;

/// The tables a deployment adds to SmolLM2's manifest: prompts of at most 24 tokens, a price
/// per token, and a rule that holds any reply mentioning dragons for a reviewer. (The model's
/// greedy replies: to "Write one sentence about a dragon." it says "The dragon, a majestic
/// creature..."; the other prompts here get replies without one.)
const TABLES: &str = include_str!("guardrails.toml");

/// A deployment in `dir`: a store, every layer, and the model folder registered as `chat`.
fn deployment(dir: &Path) -> (Stack, Arc<dyn Store>) {
    deployment_with(dir, TABLES)
}

/// [`deployment`] with other tables.
fn deployment_with(dir: &Path, tables: &str) -> (Stack, Arc<dyn Store>) {
    let folder =
        keel_benches::harness::with_tables(&common::smollm2_gguf(), tables, &dir.join("chat")).unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.join("store")).unwrap());
    let engine = keel::Engine::builder().build().unwrap();
    let stack = Stack::builder(engine)
        .store(store.clone())
        .all_layers()
        .build()
        .unwrap();
    let served = stack.versioned().unwrap();
    let id = served
        .register("chat", &folder, RegisterOptions::default())
        .unwrap();
    served
        .set_alias("chat", "production", id.as_str(), "test")
        .unwrap();
    (stack, store)
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams::greedy().max_tokens(max_tokens)
}

/// A layer's refusal, recovered.
fn refusal<E: std::error::Error + 'static>(e: &keel::Error) -> &E {
    let keel::Error::Refused { source, .. } = e else {
        panic!("not a refusal: {e}")
    };
    source
        .downcast_ref::<E>()
        .unwrap_or_else(|| panic!("another refusal: {e}"))
}

/// A sample's value in the metrics text (the first line starting with `prefix`).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

fn completion(answer: &InferResponse) -> &keel::Completion {
    answer.output.completion().expect("a completion")
}

#[test]
fn a_prompt_over_max_tokens_is_refused_naming_the_clause_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, _) = deployment(dir.path());
    let long =
        "Please tell me, in as much detail as you possibly can, everything that you happen to know about the long and winding history of the sea, its many ships, its sailors and its storms.";
    for streamed in [true, false] {
        let request = InferRequest::generate("chat", long, greedy(8));
        let e = match streamed {
            true => stack.infer_stream(request).map(drop).unwrap_err(),
            false => stack.infer(request).map(drop).unwrap_err(),
        };
        assert_eq!(e.kind(), ErrorKind::Contract, "{e}");
        let ContractViolation(v) = refusal::<ContractViolation>(&e);
        assert_eq!((v.field.as_str(), v.clause), ("text", Clause::MaxTokens));
        assert_eq!(v.expected, "at most 24 tokens");
        assert!(v.value.ends_with(" tokens"), "{v:?}");
    }
    let text = stack.metrics_text();
    assert_eq!(
        sample(
            &text,
            "keel_contract_violations_total{field=\"text\",clause=\"max_tokens\",action=\"reject\"}"
        ),
        2.0
    );
    let refused = text
        .lines()
        .find(|l| {
            l.starts_with("keel_requests_total{model=\"chat\"")
                && l.contains("outcome=\"contract_violation\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(refused, Some(2.0), "both refusals counted as outcomes:\n{text}");
}

#[test]
fn a_stream_is_priced_per_token_recorded_and_timed() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, _) = deployment(dir.path());
    let mut answers = Vec::new();
    for prompt in [
        "Name a colour.",
        "Describe the sea in one sentence.",
        "Count to five.",
    ] {
        let mut stream = stack
            .infer_stream(InferRequest::generate("chat", prompt, greedy(12)))
            .unwrap();
        let streamed: Vec<u32> = (&mut stream).map(|t| t.unwrap().id).collect();
        let answer = stream.finish().unwrap();
        let c = completion(&answer);
        assert_eq!(streamed, c.token_ids, "the tokens streamed are the answer's");
        // Priced per token: prompt (after the chat template) and completion, at 1.0 per 1,000.
        let price = answer.meta.notes.get::<Price>().unwrap();
        let tokens = c.prompt_ids.len() + c.token_ids.len();
        assert_eq!(price.tokens, tokens);
        assert!((price.cost - tokens as f64 / 1000.0).abs() < 1e-12, "{price:?}");
        assert_eq!(
            answer.meta.notes.get::<Judgement>().unwrap().decision.as_str(),
            "auto"
        );
        answers.push(answer);
    }
    stack.flush().unwrap();
    let served = stack.versioned().unwrap();
    for answer in &answers {
        let record = served.explain(answer.meta.request_id.as_str()).unwrap();
        let price = answer.meta.notes.get::<Price>().unwrap();
        assert_eq!(record.cost.as_ref().unwrap()["cost"], price.cost);
        assert_eq!(record.review.as_ref().unwrap()["decision"], "auto");
        assert_eq!(
            record.contract.as_ref().unwrap()["violations"],
            serde_json::json!([])
        );
        assert_eq!(record.route, "production");
    }
    // One time-to-first-token observation per stream, one gap per later token; the text parses
    // with Python's prometheus_client (installed by scripts/setup-models.sh).
    let text = stack.metrics_text();
    let generated: usize = answers.iter().map(|a| completion(a).token_ids.len()).sum();
    let parsed = common::prometheus(&text);
    let value = |name: &str| {
        parsed[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: {parsed}"))
    };
    assert_eq!(value("keel_time_to_first_token_seconds_count"), 3.0);
    assert_eq!(
        value("keel_time_between_tokens_seconds_count"),
        (generated - 3) as f64
    );
    assert_eq!(value("keel_generated_tokens_total"), generated as f64);
    assert_eq!(value("keel_generated_length_tokens_count"), 3.0);
    let cost: f64 = answers
        .iter()
        .map(|a| a.meta.notes.get::<Price>().unwrap().cost)
        .sum();
    assert!((value("keel_cost_total") - cost).abs() < 1e-9);
}

#[test]
fn thirty_two_streams_never_overspend_one_budget_and_refusals_start_at_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, _) = deployment(dir.path());
    // Every stream runs to its max_tokens (the reply is longer), so each costs exactly what it
    // reserved: (prompt + 8) tokens.
    let prompt = "Write a long story about a cat who learns to sing.";
    let probe = stack
        .infer(InferRequest::generate("chat", prompt, greedy(8)))
        .unwrap();
    assert_eq!(completion(&probe).finish, FinishReason::Length);
    let each = probe.meta.notes.get::<Price>().unwrap().cost;
    let costed = stack.costed().unwrap();
    let limit = each * 10.5;
    costed
        .set_budget(
            "tenant",
            Budget {
                limit,
                period: None,
                on_exhausted: Exhausted::Reject,
            },
        )
        .unwrap();
    let results: Vec<keel::Result<InferResponse>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..32)
            .map(|_| {
                let stack = &stack;
                scope.spawn(move || {
                    let request = InferRequest::generate("chat", prompt, greedy(8)).key("tenant");
                    let mut stream = stack.infer_stream(request)?;
                    for token in &mut stream {
                        token?;
                    }
                    stream.finish()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(served, 10, "the budget pays for exactly 10 streams");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.kind(), ErrorKind::Budget, "{e}");
        let refused = refusal::<BudgetError>(e);
        assert!(
            refused.left < refused.needed,
            "refused while it could pay: {refused:?}"
        );
    }
    let spend = costed.spend("tenant").unwrap().unwrap();
    assert!(spend.spent <= limit, "{spend:?}");
    assert!((spend.spent - each * 10.0).abs() < 1e-9, "{spend:?}");
    assert_eq!(spend.reserved, 0.0);
}

#[test]
fn a_cancelled_stream_is_charged_what_it_generated_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    // Provisional review: replies stream as they are made (a policy that may hold a reply runs
    // it to its end before giving any of it out, and then has nothing left to cancel).
    let provisional = TABLES.replace("provisional = false", "provisional = true");
    let (stack, _) = deployment_with(dir.path(), &provisional);
    let costed = stack.costed().unwrap();
    costed
        .set_budget(
            "c",
            Budget {
                limit: 100.0,
                period: None,
                on_exhausted: Exhausted::Reject,
            },
        )
        .unwrap();
    let request = InferRequest::generate("chat", "Write a long story about a ship.", greedy(64))
        .key("c")
        .id("cancelled-1");
    let mut stream = stack.infer_stream(request).unwrap();
    let prompt_tokens = stream.meta().tokens;
    let taken: Vec<u32> = (&mut stream).take(3).map(|t| t.unwrap().id).collect();
    let answer = stream.cancel().unwrap();
    let c = completion(&answer);
    assert_eq!((c.finish, &c.token_ids), (FinishReason::Cancelled, &taken));
    let charged = (prompt_tokens + 3) as f64 / 1000.0;
    let spend = costed.spend("c").unwrap().unwrap();
    assert!((spend.spent - charged).abs() < 1e-12, "{spend:?} vs {charged}");
    assert_eq!(spend.reserved, 0.0, "the rest of the worst case is released");
    // Dropped without a word: the same.
    let mut dropped = stack
        .infer_stream(InferRequest::generate("chat", "Count to twenty.", greedy(64)).key("c"))
        .unwrap();
    let dropped_prompt = dropped.meta().tokens;
    dropped.next().unwrap().unwrap();
    drop(dropped);
    let spend = costed.spend("c").unwrap().unwrap();
    let both = charged + (dropped_prompt + 1) as f64 / 1000.0;
    assert!((spend.spent - both).abs() < 1e-12, "{spend:?} vs {both}");
    stack.flush().unwrap();
    let record = stack.versioned().unwrap().explain("cancelled-1").unwrap();
    assert_eq!(record.cost.as_ref().unwrap()["cost"], charged);
    let keel::version::OutputSummary::Generate {
        token_ids,
        finish_reason,
        ..
    } = &record.output
    else {
        panic!("{:?}", record.output)
    };
    assert_eq!((token_ids, finish_reason.as_str()), (&taken, "cancelled"));
    let text = stack.metrics_text();
    assert_eq!(sample(&text, "keel_finish_reasons_total{model=\"chat\""), 2.0);
    assert!(text.contains("reason=\"cancelled\""));
}

#[test]
fn a_regex_rule_holds_a_reply_and_its_ticket_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, store) = deployment(dir.path());
    let request =
        InferRequest::generate("chat", "Write one sentence about a dragon.", greedy(16)).id("held-1");
    let mut stream = stack.infer_stream(request).unwrap();
    // Held: not one token is given out; the stream ends with the refusal naming the ticket.
    let first = stream.next().unwrap();
    let e = first.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Review, "{e}");
    let ReviewError::Held { ticket, reasons } = refusal::<ReviewError>(&e) else {
        panic!("{e}")
    };
    assert!(reasons[0].starts_with("mentions dragons: "), "{reasons:?}");
    assert!(stream.next().is_none());
    let pending = store
        .tickets(Some(TicketState::Pending), 10, keel::store::now_ms())
        .unwrap();
    assert_eq!(pending.len(), 1);
    let t = &pending[0];
    assert_eq!((t.id, t.ticket.request_id.as_str()), (*ticket, "held-1"));
    assert_eq!(
        (t.ticket.model.as_str(), t.ticket.decision.as_str()),
        ("chat", "review")
    );
    let input: serde_json::Value = serde_json::from_str(&t.ticket.input).unwrap();
    assert_eq!(input["prompt"], "Write one sentence about a dragon.");
    let output: serde_json::Value = serde_json::from_str(&t.ticket.output).unwrap();
    assert!(output["token_ids"].as_array().is_some_and(|ids| !ids.is_empty()));
    // The same prompt answered whole is held the same way.
    let e = stack
        .infer(InferRequest::generate(
            "chat",
            "Write one sentence about a dragon.",
            greedy(16),
        ))
        .unwrap_err();
    assert!(matches!(refusal::<ReviewError>(&e), ReviewError::Held { .. }));
    // A reply the rule does not match streams as it is made.
    let mut fine = stack
        .infer_stream(InferRequest::generate("chat", "Name a colour.", greedy(8)))
        .unwrap();
    assert!(fine.next().unwrap().is_ok());
    let _: Output = fine.finish().unwrap().output;
}

#[test]
fn the_chat_rules_check_the_conversation_before_the_first_token() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, _) = deployment(dir.path());
    // A system turn: its role is not allowed.
    let params = greedy(4).system_prompt("You are terse.");
    let e = stack
        .infer_stream(InferRequest::generate("chat", "Name a colour.", params))
        .map(drop)
        .unwrap_err();
    let ContractViolation(v) = refusal::<ContractViolation>(&e);
    assert_eq!(
        (v.field.as_str(), v.clause, v.value.as_str()),
        ("messages", Clause::Roles, "a system message")
    );
    // Two exchanges before the prompt: 5 messages, over 4: served, flagged, recorded.
    let history = vec![
        keel::Turn {
            user: "Hello.".into(),
            assistant: "Hello!".into(),
        },
        keel::Turn {
            user: "Name a colour.".into(),
            assistant: "Blue.".into(),
        },
    ];
    let params = greedy(4).after(history);
    let answer = stack
        .infer_stream(InferRequest::generate("chat", "Another one.", params))
        .unwrap()
        .finish()
        .unwrap();
    let verdict = answer.meta.notes.get::<keel::contract::Verdict>().unwrap();
    assert_eq!(verdict.violations.len(), 1, "{verdict:?}");
    assert_eq!(verdict.violations[0].clause, Clause::Messages);
    assert_eq!(verdict.violations[0].value, "5 messages");
    let text = stack.metrics_text();
    assert!(
        text.contains(
            "keel_contract_violations_total{field=\"messages\",clause=\"roles\",action=\"reject\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn under_load_a_chat_goes_to_the_cheaper_version_and_a_cascade_escalates_an_unsure_reply() {
    use keel::cost::{CascadeConfig, DegradeConfig, Routed};
    use keel::{Priority, WeightPath};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("store")).unwrap());
    let engine = keel::Engine::builder().build().unwrap();
    let strict = DegradeConfig {
        name: "assistant".into(),
        strong: "smol-f32".into(),
        cheap: "smol".into(),
        cheap_max_tokens: Some(3),
        // An objective no model meets: every request goes the cheap way (normal priority is
        // never shed here).
        objective: std::time::Duration::from_nanos(1),
        shed_at: Priority::Low,
    };
    let cascade = |min_confidence: f64| CascadeConfig {
        name: "answer".into(),
        cheap: "smol".into(),
        strong: "smol-f32".into(),
        min_confidence,
        max_cheap_tokens: None,
    };
    let stack = Stack::builder(engine)
        .store(store)
        .all_layers()
        .degrade(strict)
        .cascade(cascade(0.0), false)
        .build()
        .unwrap();
    let served = stack.versioned().unwrap();
    for (name, weights) in [("smol", WeightPath::Quantized), ("smol-f32", WeightPath::F32)] {
        let options = RegisterOptions {
            weights,
            retain_input: false,
        };
        let id = served.register(name, common::smollm2_gguf(), options).unwrap();
        served.set_alias(name, "production", id.as_str(), "test").unwrap();
    }
    // Both versions have run once: their compute per request is known.
    for name in ["smol", "smol-f32"] {
        stack
            .infer(InferRequest::generate(name, "Name a colour.", greedy(2)))
            .unwrap();
    }
    let request = InferRequest::generate("assistant", "Count to twenty.", greedy(12)).id("degraded-1");
    let mut stream = stack.infer_stream(request).unwrap();
    let n = (&mut stream).count();
    let answer = stream.finish().unwrap();
    let routed = answer.meta.notes.get::<Routed>().unwrap();
    assert_eq!(
        (routed.route, routed.max_tokens),
        ("cheap", Some(3)),
        "{routed:?}"
    );
    assert!(routed.reason.starts_with("load:"), "{routed:?}");
    assert_eq!(n, 3, "cut to the cheap way's max_tokens");
    assert_eq!(answer.meta.model, "smol");
    stack.flush().unwrap();
    let record = served.explain("degraded-1").unwrap();
    assert_eq!(record.model, "smol");
    assert_eq!(record.notes["routed"]["route"], "cheap");
    assert_eq!(record.notes["routed"]["by"], "degrade");

    // The cascade: a reply whose tokens' mean probability is under the threshold escalates.
    let sure = Stack::builder(stack.engine().clone())
        .store(served.store().clone())
        .all_layers()
        .cascade(cascade(0.0), false)
        .build()
        .unwrap();
    let unsure = Stack::builder(stack.engine().clone())
        .store(served.store().clone())
        .all_layers()
        .cascade(cascade(1.0), false)
        .build()
        .unwrap();
    let ask = |stack: &Stack| {
        let request = InferRequest::generate("answer", "Name a colour.", greedy(6));
        let mut stream = stack.infer_stream(request).unwrap();
        let tokens: Vec<u32> = (&mut stream).map(|t| t.unwrap().id).collect();
        let answer = stream.finish().unwrap();
        assert_eq!(
            tokens,
            completion(&answer).token_ids,
            "the tokens given out are the answer's"
        );
        answer
    };
    let kept = ask(&sure);
    let routed = kept.meta.notes.get::<Routed>().unwrap();
    assert_eq!(
        (routed.route, kept.meta.model.as_str()),
        ("cheap", "smol"),
        "{routed:?}"
    );
    let escalated = ask(&unsure);
    let routed = escalated.meta.notes.get::<Routed>().unwrap();
    assert_eq!(
        (routed.route, escalated.meta.model.as_str()),
        ("strong", "smol-f32"),
        "{routed:?}"
    );
    let confidence = routed.confidence.unwrap();
    assert!(confidence > 0.0 && confidence < 1.0, "{routed:?}");
}
