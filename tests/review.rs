//! Review, feedback, cost, budgets and the cascade on real data: scikit-learn's breast-cancer
//! rows through the MLP (examples/models/breast-cancer-mlp, PyTorch-trained) and the cheap
//! logistic regression (examples/models/breast-cancer-linear, scikit-learn-trained).

mod common;

use common::cancer::{features, mlp_dir, record, split};
use keel::cost::{Budget, CascadeConfig, Exhausted, Routed};
use keel::review::{self, ReviewError};
use keel::stack::Stack;
use keel::store::{FeedbackSource, SqliteStore, Store, TicketState};
use keel::version::{RegisterOptions, Versioned};
use keel::{Engine, ErrorKind, Infer, InferRequest, InferResponse};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn linear_dir() -> PathBuf {
    common::workspace().join("examples/models/breast-cancer-linear")
}

/// The layers a deployment stacks, top to bottom: version (lineage), review, cost, observe,
/// contract, engine; and its store.
struct Deployment {
    stack: Stack,
    store: Arc<dyn Store>,
}

impl Deployment {
    fn served(&self) -> &Versioned {
        self.stack.versioned().unwrap()
    }

    fn costed(&self) -> &keel::cost::Costed {
        self.stack.costed().unwrap()
    }
}

fn stack(engine: &Engine, folder: &Path) -> Deployment {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(folder).unwrap());
    let stack = Stack::builder(engine.clone())
        .store(store.clone())
        .all_layers()
        .build()
        .unwrap();
    Deployment { stack, store }
}

/// What a layer noted on an answer, as JSON (null if nothing).
fn note(answer: &InferResponse, key: &str) -> serde_json::Value {
    answer.meta.notes.to_json().get(key).cloned().unwrap_or_default()
}

fn register(served: &Versioned, name: &str, dir: &Path) {
    let id = served.register(name, dir, RegisterOptions::default()).unwrap();
    served.set_alias(name, "production", id.as_str(), "test").unwrap();
}

/// A copy of the MLP whose manifest ends with `extra` (other review rules).
fn mlp_with(extra: &str, dir: &Path) -> PathBuf {
    let to = dir.join("mlp");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["model.safetensors", "profile.json"] {
        std::fs::copy(mlp_dir().join(f), to.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(mlp_dir().join("keel.toml")).unwrap();
    let head = &manifest[..manifest.find("\n[review]").unwrap()];
    std::fs::write(to.join("keel.toml"), format!("{head}\n{extra}")).unwrap();
    to
}

#[test]
fn the_cheap_model_matches_scikit_learn_on_the_held_out_rows() {
    let golden = common::golden("linear.json");
    let names: Vec<String> = features();
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(linear_dir()).unwrap();
    let held = split(0);
    let mut worst = 0.0f64;
    for (row, (values, _)) in golden["rows"].as_array().unwrap().iter().zip(&held) {
        let answer = engine
            .infer(InferRequest::classify(id.as_str(), vec![record(&names, values)]))
            .unwrap();
        let got = &answer.output.classes().unwrap()[0].probabilities;
        for (g, want) in got.iter().zip(row["probabilities"].as_array().unwrap()) {
            worst = worst.max((f64::from(*g) - want.as_f64().unwrap()).abs());
        }
    }
    // float32 standardization and dot product against scikit-learn's float64.
    assert!(worst < 1e-5, "largest probability difference {worst}");
}

#[test]
fn the_policy_queues_what_it_should_and_labels_become_accuracy_and_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder().build().unwrap();
    let s = stack(&engine, &dir.path().join("store"));
    register(s.served(), "cancer", &mlp_dir());
    let names = features();
    let held = split(0);
    let golden = common::golden("mlp.json");
    // What the policy should do to each held-out row: below 0.9 confidence goes to review.
    let unsure: Vec<bool> = golden["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let p = r["probabilities"].as_array().unwrap();
            p.iter().map(|x| x.as_f64().unwrap()).fold(0.0, f64::max) < 0.9
        })
        .collect();
    let mut ids = Vec::new();
    for (i, (values, _)) in held.iter().enumerate() {
        let answer = s
            .stack
            .infer(InferRequest::classify("cancer", vec![record(&names, values)]).id(format!("row-{i}")))
            .unwrap();
        let judged = note(&answer, "review");
        let expected = if unsure[i] { "review" } else { "auto" };
        assert_eq!(judged["decision"], expected, "row {i}: {judged}");
        ids.push(answer.meta.request_id.to_string());
        // Each answer is priced at the MLP's per_call.
        assert_eq!(note(&answer, "cost")["cost"], 0.01);
    }
    let queued = unsure.iter().filter(|u| **u).count();
    assert!(queued >= 1, "the held-out rows have unsure answers to review");
    // A flagged field (worst area past its range, action flag) is sent to review too.
    let mut flagged = record(&names, &held[0].0);
    flagged.insert("worst area".into(), keel::Value::Number(1e6));
    let answer = s
        .stack
        .infer(InferRequest::classify("cancer", vec![flagged]).id("flagged"))
        .unwrap();
    let judged = note(&answer, "review");
    assert_eq!(judged["decision"], "review");
    assert!(
        judged["reasons"][0].as_str().unwrap().contains("flagged input"),
        "{judged}"
    );
    let pending = s
        .store
        .tickets(Some(TicketState::Pending), 1000, keel::store::now_ms())
        .unwrap();
    assert_eq!(pending.len(), queued + 1);

    // Reviewers label every ticket with the data set's truth; the host reports ground truth
    // for the rows nobody reviewed.
    let truth = |i: usize| ["malignant", "benign"][held[i].1];
    while let Some(t) = s
        .store
        .claim_review("ana", 60_000, keel::store::now_ms())
        .unwrap()
    {
        let i = t
            .ticket
            .request_id
            .strip_prefix("row-")
            .map(|n| n.parse::<usize>().unwrap());
        let label = i.map_or("malignant", truth);
        s.store
            .resolve_review(t.id, "ana", label, Some("checked"), keel::store::now_ms())
            .unwrap()
            .unwrap();
    }
    s.stack.flush().unwrap();
    let reviewed = s.stack.reviewed().unwrap();
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| !unsure[*i]) {
        reviewed.feedback(id, truth(i)).unwrap();
    }
    let quality = review::quality(s.store.as_ref()).unwrap();
    let of = |source| quality.iter().find(|q| q.source == source).unwrap();
    let (truth_q, review_q) = (of(FeedbackSource::GroundTruth), of(FeedbackSource::Review));
    assert_eq!(truth_q.labelled as usize, held.len() - queued);
    assert_eq!(review_q.labelled as usize, queued + 1);
    // The accuracy against ground truth is what PyTorch's outputs give on those rows.
    let right = (0..held.len())
        .filter(|&i| !unsure[i] && golden["rows"][i]["class"] == truth(i))
        .count();
    assert_eq!(truth_q.matched as usize, right);
    assert!(truth_q.rate > 0.95, "{truth_q:?}");

    // The metrics text carries the decisions, the queue, the feedback rates and the cost.
    let text = s.stack.metrics_text();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .to_string()
    };
    let value = |l: String| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    let cost = value(line("keel_cost_total{model=\""));
    assert!((cost - 0.01 * (held.len() + 1) as f64).abs() < 1e-9, "{cost}");
    assert_eq!(value(line("keel_review_pending")), 0.0);
    let accuracy = text
        .lines()
        .find(|l| l.starts_with("keel_feedback_match_rate{model=\"cancer\"") && l.contains("ground_truth"))
        .map(|l| value(l.to_string()))
        .unwrap();
    assert!(accuracy > 0.95, "{accuracy}");

    let mut out = Vec::new();
    let lines = review::export(s.store.as_ref(), &mut out).unwrap();
    assert_eq!(lines, held.len() + 1);
    let text = String::from_utf8(out).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["source"], "review");
    assert_eq!(first["reviewer"], "ana");
    assert!(first["input"]["rows"][0]["mean radius"].is_number(), "{first}");
    assert!(first["prediction"].is_string());
}

#[test]
fn block_and_held_decisions_refuse_with_their_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder().build().unwrap();
    let s = stack(&engine, &dir.path().join("store"));
    let rules = "[review]\nprovisional = false
[[review.rules]]\nname = \"large\"\nwhen = \"input.mean radius\"\nabove = 20\naction = \"block\"
[[review.rules]]\nwhen = \"class\"\nequals = \"malignant\"\naction = \"review\"
[[review.rules]]\nwhen = \"cost\"\nabove = 0.5\naction = \"block\"\n";
    register(s.served(), "cancer", &mlp_with(rules, dir.path()));
    let names = features();
    let held = split(0);
    let golden = common::golden("mlp.json");
    let (mut blocked, mut held_back, mut served) = (0, 0, 0);
    for (i, (values, _)) in held.iter().enumerate() {
        match s
            .stack
            .infer(InferRequest::classify("cancer", vec![record(&names, values)]))
        {
            Ok(a) => {
                assert_eq!(a.output.classes().unwrap()[0].label, "benign");
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Review);
                let keel::Error::Refused { source, .. } = &e else {
                    panic!("{e}")
                };
                let r = source.downcast_ref::<ReviewError>().unwrap();
                let ticket = s
                    .store
                    .ticket(r.ticket(), keel::store::now_ms())
                    .unwrap()
                    .unwrap();
                match r {
                    ReviewError::Blocked { .. } => {
                        assert!(values[0] > 20.0, "row {i}: {e}");
                        assert_eq!(ticket.ticket.decision, "block");
                        blocked += 1;
                    }
                    ReviewError::Held { .. } => {
                        assert_eq!(golden["rows"][i]["class"], "malignant", "row {i}");
                        held_back += 1;
                    }
                }
            }
        }
    }
    assert!(
        blocked > 0 && held_back > 0 && served > 0,
        "{blocked} {held_back} {served}"
    );
    let tickets = s.store.tickets(None, 1000, keel::store::now_ms()).unwrap();
    assert_eq!(
        tickets.len(),
        blocked + held_back,
        "one ticket per refused request"
    );
}

#[test]
fn sixty_four_threads_never_overspend_a_budget_and_it_downgrades_exactly_at_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder().build().unwrap();
    let s = stack(&engine, &dir.path().join("store"));
    let mlp = engine.load(mlp_dir()).unwrap();
    let linear = engine.load(linear_dir()).unwrap();
    let names = features();
    let row = record(&names, &split(0)[0].0);
    // 0.55 pays for exactly 55 MLP calls at 0.01.
    s.costed()
        .set_budget(
            "tenant",
            Budget {
                limit: 0.55,
                period: None,
                on_exhausted: Exhausted::Reject,
            },
        )
        .unwrap();
    let results: Vec<Result<keel::InferResponse, keel::Error>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..64)
            .map(|_| {
                let (stack, row, mlp) = (&s.stack, row.clone(), mlp.as_str());
                scope.spawn(move || stack.infer(InferRequest::classify(mlp, vec![row]).key("tenant")))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 55, "the budget pays for 55 calls");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.kind(), ErrorKind::Budget, "{r}");
    }
    let spend = s.costed().spend("tenant").unwrap().unwrap();
    assert!(spend.spent <= 0.55 + 1e-12 && spend.reserved == 0.0, "{spend:?}");

    // Downgrade: 3 MLP calls fit in 0.035; the 4th goes to the cheap model (0.001), which
    // the last 0.005 pays for 5 times; then refused.
    s.costed()
        .set_budget(
            "small",
            Budget {
                limit: 0.035,
                period: None,
                on_exhausted: Exhausted::Downgrade(linear.to_string()),
            },
        )
        .unwrap();
    let mut routes = Vec::new();
    for _ in 0..10 {
        match s
            .stack
            .infer(InferRequest::classify(mlp.as_str(), vec![row.clone()]).key("small"))
        {
            Ok(a) => {
                routes.push(if note(&a, "cost")["downgraded_from"].is_string() {
                    "cheap"
                } else {
                    "strong"
                });
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Budget);
                routes.push("refused");
            }
        }
    }
    assert_eq!(
        routes,
        ["strong", "strong", "strong", "cheap", "cheap", "cheap", "cheap", "cheap", "refused", "refused"]
    );
}

#[test]
fn the_cascade_escalates_the_unsure_answers_and_keeps_the_strong_models_accuracy() {
    let engine = Engine::builder().build().unwrap();
    let mlp = engine.load(mlp_dir()).unwrap();
    let linear = engine.load(linear_dir()).unwrap();
    let config = CascadeConfig {
        name: "cancer".into(),
        cheap: linear.to_string(),
        strong: mlp.to_string(),
        min_confidence: 0.95,
        max_cheap_tokens: None,
    };
    let cascade = Stack::builder(engine.clone())
        .cost()
        .cascade(config, false)
        .build()
        .unwrap();
    let names = features();
    let held = split(0);
    let (mut escalated, mut right, mut strong_right) = (0, 0, 0);
    for (values, target) in &held {
        let req = InferRequest::classify("cancer", vec![record(&names, values)]);
        let answer = cascade.infer(req).unwrap();
        escalated += usize::from(answer.meta.notes.get::<Routed>().unwrap().route == "strong");
        right += usize::from(answer.output.classes().unwrap()[0].class == *target);
        let strong = engine
            .infer(InferRequest::classify(mlp.as_str(), vec![record(&names, values)]))
            .unwrap();
        strong_right += usize::from(strong.output.classes().unwrap()[0].class == *target);
    }
    let cost: f64 = cascade.costed().unwrap().report().iter().map(|l| l.cost).sum();
    let always_strong = 0.01 * held.len() as f64;
    eprintln!(
        "cascade: {escalated} of {} escalated, cost {cost:.3} vs {always_strong:.3}, accuracy {right} vs {strong_right}",
        held.len()
    );
    assert!(
        escalated > 0 && escalated < held.len() / 2,
        "{escalated} escalated"
    );
    let expected = 0.001 * held.len() as f64 + 0.01 * escalated as f64;
    assert!((cost - expected).abs() < 1e-9, "{cost} vs {expected}");
    assert!(cost < always_strong / 2.0);
    assert!(
        right + 3 >= strong_right,
        "cascade {right} vs strong {strong_right} right"
    );
}

#[test]
fn degradation_routes_to_the_cheap_model_when_the_objective_is_threatened_and_sheds_low_priority() {
    use keel::cost::DegradeConfig;
    use keel::{LoadOptions, Priority, Request, WeightPath};
    let engine = Engine::builder().build().unwrap();
    let minilm = common::minilm_dir();
    let strong = engine
        .load_with(
            &minilm,
            LoadOptions {
                weights: WeightPath::F32,
            },
        )
        .unwrap();
    let cheap = engine
        .load_with(
            &minilm,
            LoadOptions {
                weights: WeightPath::Int8,
            },
        )
        .unwrap();
    let degrade = |objective| {
        Stack::builder(engine.clone())
            .degrade(DegradeConfig {
                name: "embed".into(),
                strong: strong.to_string(),
                cheap: cheap.to_string(),
                cheap_max_tokens: None,
                objective,
                shed_at: Priority::Low,
            })
            .build()
            .unwrap()
    };
    let ask = |layer: &Stack, priority| {
        let options = Request::default().priority(priority).no_cache();
        layer.infer(InferRequest::embed("embed", ["a sentence to embed"]).options(options))
    };
    let route = |a: &keel::InferResponse| -> serde_json::Value { note(a, "routed") };
    // Before either model has run there is nothing to judge by: the strong model answers.
    let generous = degrade(std::time::Duration::from_secs(3600));
    let first = ask(&generous, Priority::Normal).unwrap();
    assert_eq!(route(&first)["route"], "strong");
    assert_eq!(first.meta.version, strong);
    engine.embed(cheap.as_str(), &["warm"]).unwrap();
    assert_eq!(route(&ask(&generous, Priority::Low).unwrap())["route"], "strong");
    // An objective no model can meet: normal priority goes to the cheap model, low is shed.
    let strict = degrade(std::time::Duration::from_nanos(1));
    let degraded = ask(&strict, Priority::Normal).unwrap();
    let note = route(&degraded);
    assert_eq!(note["route"], "cheap");
    assert!(note["reason"].as_str().unwrap().starts_with("load:"), "{note}");
    assert_eq!(degraded.meta.version, cheap);
    let shed = ask(&strict, Priority::Low).unwrap_err();
    assert_eq!(shed.kind(), ErrorKind::Overloaded);
    assert!(shed.to_string().contains("shed"), "{shed}");
    // Other names pass through untouched.
    let direct = strict.infer(InferRequest::embed(strong.as_str(), ["x"])).unwrap();
    assert!(direct.meta.notes.get::<Routed>().is_none());
}

#[test]
fn cache_first_sends_a_request_whose_strong_answer_is_cached_to_the_strong_model() {
    use keel::{LoadOptions, WeightPath};
    let engine = Engine::builder().build().unwrap();
    let minilm = common::minilm_dir();
    let strong = engine
        .load_with(
            &minilm,
            LoadOptions {
                weights: WeightPath::F32,
            },
        )
        .unwrap();
    let cheap = engine
        .load_with(
            &minilm,
            LoadOptions {
                weights: WeightPath::Int8,
            },
        )
        .unwrap();
    let config = CascadeConfig {
        name: "embed".into(),
        cheap: cheap.to_string(),
        strong: strong.to_string(),
        min_confidence: 0.9,
        max_cheap_tokens: Some(64),
    };
    let cascade = Stack::builder(engine.clone())
        .cost()
        .cascade(config, true)
        .build()
        .unwrap();
    let ask = |text: &str| {
        let a = cascade.infer(InferRequest::embed("embed", [text])).unwrap();
        let routed = note(&a, "routed");
        (a, routed)
    };
    // An embedding has no confidence: the cheap answer stands.
    let (a, note) = ask("the weather is fine today");
    assert_eq!((note["route"].as_str(), &a.meta.version), (Some("cheap"), &cheap));
    // Once the strong model's answer is cached, it is asked first, and the cache answers.
    engine
        .embed(strong.as_str(), &["the weather is fine today"])
        .unwrap();
    let (a, note) = ask("the weather is fine today");
    assert_eq!(note["route"], "strong", "{note}");
    assert!(note["reason"].as_str().unwrap().starts_with("cached"));
    assert!(a.meta.cache_hit);
    assert_eq!(
        a.meta.notes.get::<keel::cost::Price>().unwrap().cost,
        0.0,
        "a cache hit costs nothing"
    );
    // A long input goes to the strong model directly.
    let long = "word ".repeat(100);
    let (a, note) = ask(&long);
    assert!(note["reason"].as_str().unwrap().starts_with("complex"), "{note}");
    assert_eq!(a.meta.version, strong);
}
