//! Contracts, drift and metrics on real data: the breast-cancer MLP (examples/models/), trained
//! by its committed script on scikit-learn's bundled data set (installed by
//! scripts/setup-models.sh and read here as the CSV file it ships), and all-MiniLM-L6-v2.

mod common;

use common::cancer::{cancer_rows, features, mlp_dir, record, split};

use keel::contract::{Action, Clause, ContractViolation, Verdict};
use keel::observe::stats::{self, Bins};
use keel::observe::{Profile, ProfileBuilder, State, WindowSize};
use keel::stack::{ObserveConfig, Stack};
use keel::{Engine, ErrorKind, Infer, InferRequest, Input, Record, Value};
use std::sync::Arc;

#[test]
fn mlp_matches_pytorch_on_the_held_out_rows() {
    let golden = common::golden("mlp.json");
    let names = features();
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(mlp_dir()).unwrap();
    let rows = golden["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 114);
    let data = split(0);
    let mut worst = 0.0f64;
    for (row, (values, _)) in rows.iter().zip(&data) {
        let golden_values: Vec<f64> = row["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(
            &golden_values, values,
            "the package's CSV is the data set the script trained on"
        );
        let answer = engine
            .infer(InferRequest::classify(id.as_str(), vec![record(&names, values)]))
            .unwrap();
        let c = &answer.output.classes().unwrap()[0];
        assert_eq!(c.label, row["class"].as_str().unwrap());
        for (p, want) in c
            .probabilities
            .iter()
            .zip(row["probabilities"].as_array().unwrap())
        {
            worst = worst.max((f64::from(*p) - want.as_f64().unwrap()).abs());
        }
    }
    // f32 arithmetic in another order than PyTorch's.
    assert!(worst < 1e-5, "largest probability difference {worst}");
}

fn contracted() -> (Engine, Stack, String) {
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(mlp_dir()).unwrap();
    let layer = Stack::builder(engine.clone()).contract().build().unwrap();
    (engine, layer, id.to_string())
}

/// The contract's verdict on an answer.
fn verdict(answer: &keel::InferResponse) -> &Verdict {
    answer.meta.notes.get::<Verdict>().expect("a contract verdict")
}

/// A stack with the observability layer, windows of `window`.
fn observing(engine: &Engine, window: WindowSize) -> Stack {
    let config = ObserveConfig {
        window: Some(window),
        on_drift: None,
    };
    Stack::builder(engine.clone())
        .observe_with(config)
        .build()
        .unwrap()
}

fn violation(e: &keel::Error) -> &keel::contract::Violation {
    match e {
        keel::Error::Refused { source, .. } => {
            &source
                .downcast_ref::<ContractViolation>()
                .expect("a contract violation")
                .0
        }
        other => panic!("not a refusal: {other}"),
    }
}

#[test]
fn the_contract_passes_real_rows_and_acts_per_clause() {
    let (_engine, layer, id) = contracted();
    let names = features();
    let held = split(0);
    for (values, _) in &held {
        let answer = layer
            .infer(InferRequest::classify(&id, vec![record(&names, values)]))
            .unwrap();
        assert!(verdict(&answer).passed(), "a held-out row passes");
    }
    let base = record(&names, &held[0].0);
    let with = |field: &str, value: Value| {
        let mut r = base.clone();
        r.insert(field.into(), value);
        InferRequest::classify(&id, vec![r])
    };
    // `mean ...` out of range: rejected, naming the field, the clause and the value.
    let e = layer
        .infer(with("mean radius", Value::Number(400.0)))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Contract);
    let v = violation(&e);
    assert_eq!(
        (v.field.as_str(), v.clause, v.value.as_str()),
        ("mean radius", Clause::Range, "400")
    );
    // `worst ...` out of range: served, flagged.
    let a = layer.infer(with("worst area", Value::Number(1e6))).unwrap();
    let v = &verdict(&a).violations[0];
    assert_eq!(
        (v.field.as_str(), v.clause, v.value.as_str(), v.action),
        ("worst area", Clause::Range, "1000000", Action::Flag)
    );
    // `... error` out of range: clamped to the range's end, served, recorded.
    let mut clamped = with("area error", Value::Number(1e6));
    clamped.target = Some(layer.target(&id).unwrap());
    let checked = layer.contracted().unwrap().check(&mut clamped).unwrap();
    assert_eq!(checked.violations[0].action, Action::Clamp);
    let Input::Classify(rows) = &clamped.input else {
        unreachable!()
    };
    let Value::Number(x) = rows[0]["area error"] else {
        panic!()
    };
    assert!(x < 1e6 && x > 500.0, "clamped to the declared maximum, got {x}");
    // A missing field, text where a number belongs, NaN: rejected.
    let mut missing = base.clone();
    missing.remove("mean texture");
    assert_eq!(
        violation(
            &layer
                .infer(InferRequest::classify(&id, vec![missing]))
                .unwrap_err()
        )
        .clause,
        Clause::Required
    );
    assert_eq!(
        violation(
            &layer
                .infer(with("mean area", Value::Text("big".into())))
                .unwrap_err()
        )
        .clause,
        Clause::Type
    );
    assert_eq!(
        violation(
            &layer
                .infer(with("mean area", Value::Number(f64::NAN)))
                .unwrap_err()
        )
        .clause,
        Clause::NonFinite
    );
    // Freshness: a stale timestamp is refused; a fresh one passes.
    let stale = layer
        .infer(with("observed_at", Value::Text("2020-01-01T00:00:00Z".into())))
        .unwrap_err();
    assert_eq!(violation(&stale).clause, Clause::Freshness);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    layer
        .infer(with("observed_at", Value::Number(now - 3600.0)))
        .unwrap();
    // An unknown site is flagged.
    let a = layer.infer(with("site", Value::Text("clinic-z".into()))).unwrap();
    assert_eq!(verdict(&a).violations[0].clause, Clause::Categories);
    // Every violation was counted per field and clause.
    let counts = layer.contracted().unwrap().violations();
    let count = |f: &str, c: Clause| {
        counts
            .iter()
            .find(|v| v.field == f && v.clause == c)
            .map_or(0, |v| v.count)
    };
    assert_eq!(count("mean radius", Clause::Range), 1);
    assert_eq!(count("worst area", Clause::Range), 1);
    assert_eq!(count("observed_at", Clause::Freshness), 1);
}

/// Draws `k` distinct indices of `n` (a seeded Fisher-Yates prefix).
fn subset(n: usize, k: usize, seed: &mut u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = i + (*seed >> 33) as usize % (n - i);
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

#[test]
fn drift_stays_ok_on_held_out_data_and_alarms_on_real_shifts() {
    let names = features();
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(mlp_dir()).unwrap();
    let profile = Profile::read(&mlp_dir().join("profile.json")).unwrap();
    assert_eq!(
        profile.count, 114,
        "the committed profile is train.py's calibration split"
    );
    let window = 50;
    let monitor = |rows: Vec<Record>| {
        let observed = observing(&engine, WindowSize::Count(window));
        for r in rows {
            observed
                .infer(InferRequest::classify(id.as_str(), vec![r]))
                .unwrap();
        }
        observed
            .observed()
            .unwrap()
            .drift(&observed.target(id.as_str()).unwrap())
            .unwrap()
            .unwrap()
            .reports
    };
    let held = split(0);
    // 1,000 windows of the held-out rows (50 of the 114, drawn without replacement each time),
    // counted by a monitor of their own that keeps every report.
    let answers: Vec<(Input, keel::Output)> = held
        .iter()
        .map(|(v, _)| {
            let input = Input::Classify(vec![record(&names, v)]);
            let out = engine
                .infer(InferRequest::new(id.as_str(), input.clone()))
                .unwrap()
                .output;
            (input, out)
        })
        .collect();
    let windows = 1000;
    let config = keel::observe::DriftConfig {
        history: windows,
        ..keel::observe::DriftConfig::count(window)
    };
    let null = keel::observe::DriftMonitor::new(Arc::new(profile.clone()), config);
    let mut seed = 1;
    for _ in 0..windows {
        for i in subset(held.len(), window, &mut seed) {
            null.observe_input(&answers[i].0);
            null.observe_output(&answers[i].1);
        }
    }
    let reports = null.reports();
    assert_eq!(reports.len(), windows);
    let not_ok = reports.iter().filter(|r| r.state != State::Ok).count();
    let alarms = reports.iter().filter(|r| r.state == State::Alarm).count();
    eprintln!("held-out: {not_ok} of {windows} windows not ok, {alarms} alarms");
    assert!(
        not_ok * 100 <= windows,
        "false alarm rate over 1%: {not_ok} of {windows}"
    );

    // `mean radius` rescaled by 1.5: alarm in the first window.
    let shifted: Vec<Record> = held
        .iter()
        .take(window)
        .map(|(v, _)| {
            let mut v = v.clone();
            v[0] *= 1.5;
            record(&names, &v)
        })
        .collect();
    let r = monitor(shifted);
    assert_eq!(
        r[0].state,
        State::Alarm,
        "{:?}",
        r[0].signals.iter().max_by(|a, b| a.1.value.total_cmp(&b.1.value))
    );
    // One class only (malignant rows of the whole data set): alarm in the first window.
    let malignant: Vec<Record> = cancer_rows()
        .into_iter()
        .filter(|(_, t)| *t == 0)
        .take(window)
        .map(|(v, _)| record(&names, &v))
        .collect();
    let r = monitor(malignant);
    assert_eq!(r[0].state, State::Alarm);
    assert_eq!(r[0].signals["output.class_mix.chi2"].state, State::Alarm);
}

#[test]
fn statistics_agree_with_scipy() {
    let g = common::golden("drift_stats.json");
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-12 + 1e-9 * b.abs(),
            "{what}: {a} vs scipy {b}"
        )
    };
    for case in g["samples"].as_array().unwrap() {
        let (a, b) = (floats(&case["a"]), floats(&case["b"]));
        let name = case["name"].as_str().unwrap();
        close(stats::ks_statistic(&a, &b), case["ks"].as_f64().unwrap(), name);
        close(
            stats::wasserstein_1(&a, &b),
            case["wasserstein"].as_f64().unwrap(),
            name,
        );
        if name.starts_with("big") {
            // The binned forms the windows use, with 32 quantile bins of `a`: KS within the
            // largest bin's share (1/32) plus ties; W1 within 2% of a's spread.
            let bins = Bins::from_sample(&a, 32);
            let (ca, ma, cb, mb) = (bins.counts(&a), bins.means(&a), bins.counts(&b), bins.means(&b));
            let side = |counts, means| stats::Binned { counts, means };
            let d = stats::binned_drift(&bins, side(&ca, &ma), side(&cb, &mb));
            let mean = a.iter().sum::<f64>() / a.len() as f64;
            let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
            let (ks, w1) = (
                case["ks"].as_f64().unwrap(),
                case["wasserstein"].as_f64().unwrap(),
            );
            eprintln!(
                "{name}: binned ks {:.4} vs {ks:.4}, w1 {:.4} vs {w1:.4}",
                d.ks, d.wasserstein
            );
            assert!((d.ks - ks).abs() <= 0.035, "{name}: binned ks {} vs {ks}", d.ks);
            assert!(
                (d.wasserstein - w1).abs() <= 0.02 * std,
                "{name}: binned w1 {} vs {w1}",
                d.wasserstein
            );
        }
    }
    for d in g["distributions"].as_array().unwrap() {
        let (p, q) = (floats(&d["p"]), floats(&d["q"]));
        close(stats::js_distance(&p, &q), d["js"].as_f64().unwrap(), "js");
        close(stats::psi(&p, &q), d["psi"].as_f64().unwrap(), "psi");
        close(
            stats::chi_square(&floats(&d["counts"]), &p),
            d["chi_square"].as_f64().unwrap(),
            "chi-square",
        );
    }
    for q in g["chi2_upper"].as_array().unwrap() {
        let (p, dof, x) = (
            q["p"].as_f64().unwrap(),
            q["dof"].as_u64().unwrap() as usize,
            q["x"].as_f64().unwrap(),
        );
        let ours = stats::chi_square_upper(p, dof);
        // Wilson-Hilferty: within 6% below 10 degrees of freedom, 2% from 10 on, to p = 1e-5.
        let tolerance = if dof >= 10 { 0.02 } else { 0.06 };
        assert!(
            (ours / x - 1.0).abs() < tolerance,
            "chi2 upper({p}, {dof}): {ours} vs scipy {x}"
        );
    }
}

const COOKING: &[&str] = &[
    "Whisk the eggs with sugar until the mixture turns pale.",
    "Simmer the tomato sauce for twenty minutes on low heat.",
    "Knead the dough and let it rise for an hour.",
    "Roast the vegetables with olive oil and rosemary.",
    "Season the soup with salt, pepper and a pinch of nutmeg.",
    "Fold the whipped cream gently into the chocolate.",
    "Sear the steak in a hot cast-iron pan for two minutes per side.",
    "Chop the onions finely and fry them until golden.",
    "Bake the bread at two hundred degrees for forty minutes.",
    "Marinate the chicken overnight in yogurt and spices.",
    "Grate the parmesan over the pasta just before serving.",
    "Blanch the green beans and plunge them into ice water.",
    "Caramelize the sugar slowly in a heavy saucepan.",
    "Stir the risotto often and add the stock a ladle at a time.",
    "Peel and dice the potatoes for the gratin.",
    "Toast the cumin seeds before grinding them.",
    "Let the cake cool before you spread the frosting.",
    "Deglaze the pan with white wine and scrape the bits.",
    "Steam the rice with a bay leaf for more aroma.",
    "Brush the pastry with beaten egg for a golden crust.",
    "Reduce the balsamic vinegar until it becomes syrupy.",
    "Slice the cucumbers thinly for the salad.",
    "Poach the pears in red wine and cinnamon.",
    "Melt the butter and brown it until it smells nutty.",
    "Squeeze half a lemon over the grilled fish.",
    "Soak the beans overnight before cooking them.",
    "Sprinkle fresh basil over the pizza after baking.",
    "Whip the egg whites until stiff peaks form.",
    "Cook the lentils with garlic, carrots and thyme.",
    "Drizzle honey over the roasted figs.",
    "Mix flour, baking powder and salt in a bowl.",
    "Fry the tofu until crisp on every side.",
    "Blend the soup until smooth and creamy.",
    "Add the cream at the end and do not let it boil.",
    "Sauté the mushrooms in butter with shallots.",
    "Cut the mango into cubes for the dessert.",
    "Rub the pork shoulder with paprika and brown sugar.",
    "Line the tin with baking paper before pouring the batter.",
    "Taste the sauce and adjust the seasoning.",
    "Garnish the curry with coriander leaves.",
    "Boil the pasta in plenty of salted water.",
    "Crush the garlic cloves with the flat of the knife.",
    "Chill the dough for thirty minutes before rolling it.",
    "Stuff the peppers with rice and minced meat.",
    "Beat the butter and sugar until fluffy.",
    "Pour the custard through a sieve into the ramekins.",
    "Scatter toasted almonds over the salad.",
    "Glaze the carrots with butter and a little honey.",
];

const FINANCE: &[&str] = &[
    "The central bank raised interest rates by a quarter point.",
    "Quarterly earnings beat analysts' expectations.",
    "The bond yield curve inverted again this week.",
    "Investors moved money from equities into treasuries.",
    "The company announced a share buyback program.",
    "Inflation came in above the forecast for the third month.",
    "The merger still needs approval from regulators.",
    "Credit spreads widened after the downgrade.",
    "The fund rebalanced its portfolio toward dividend stocks.",
    "Mortgage applications fell as rates climbed.",
    "The currency weakened against the dollar.",
    "Venture capital funding slowed in the second quarter.",
    "The stock dropped eight percent after the guidance cut.",
    "Oil futures rallied on supply concerns.",
    "The bank set aside more reserves for loan losses.",
    "Hedge funds increased their short positions.",
    "Consumer spending rose despite higher prices.",
    "The startup raised a series B round at a higher valuation.",
    "Payrolls grew faster than economists predicted.",
    "The index closed at a record high on Friday.",
];

#[test]
fn embedding_drift_tells_domains_apart() {
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(common::minilm_dir()).unwrap();
    let embed = |texts: &[&str]| {
        engine
            .infer(InferRequest::embed(id.as_str(), texts.to_vec()))
            .unwrap()
    };
    // The reference: the first 28 cooking sentences.
    let (reference, fresh) = COOKING.split_at(28);
    let mut builder = ProfileBuilder::new();
    let input = Input::Embed(reference.iter().map(|s| s.to_string()).collect());
    builder.add(&input, &embed(reference).output, &[]);
    let profile = Arc::new(builder.finish("minilm", 20).unwrap());
    let judge = |texts: &[&str]| {
        let monitor =
            keel::observe::DriftMonitor::new(profile.clone(), keel::observe::DriftConfig::count(texts.len()));
        let answer = embed(texts);
        monitor.observe_input(&Input::Embed(texts.iter().map(|s| s.to_string()).collect()));
        monitor.observe_output(&answer.output);
        monitor.last().unwrap()
    };
    let same = judge(fresh);
    let other = judge(FINANCE);
    let show = |r: &keel::observe::WindowReport| {
        format!(
            "mmd {:.2} (alarm {:.2}), distance ks {:.3} (alarm {:.3})",
            r.signals["embedding.mmd"].value,
            r.signals["embedding.mmd"].alarm,
            r.signals["embedding.centroid_distance.ks"].value,
            r.signals["embedding.centroid_distance.ks"].alarm
        )
    };
    eprintln!("same domain: {}; other domain: {}", show(&same), show(&other));
    assert_eq!(
        other.signals["embedding.mmd"].state,
        State::Alarm,
        "{}",
        show(&other)
    );
    assert_eq!(
        other.signals["embedding.centroid_distance.ks"].state,
        State::Alarm,
        "{}",
        show(&other)
    );
    assert_ne!(
        same.signals["embedding.mmd"].state,
        State::Alarm,
        "{}",
        show(&same)
    );
    assert_ne!(
        same.signals["embedding.centroid_distance.ks"].state,
        State::Alarm,
        "{}",
        show(&same)
    );
}

#[test]
fn the_metrics_text_parses_with_prometheus_client() {
    let names = features();
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(mlp_dir()).unwrap();
    let config = ObserveConfig {
        window: Some(WindowSize::Count(20)),
        on_drift: None,
    };
    let observed = Stack::builder(engine.clone())
        .contract()
        .observe_with(config)
        .build()
        .unwrap();
    for (values, _) in split(0).iter().take(60) {
        observed
            .infer(InferRequest::classify(id.as_str(), vec![record(&names, values)]))
            .unwrap();
    }
    let mut bad = record(&names, &split(0)[0].0);
    bad.insert("mean radius".into(), Value::Number(-5.0));
    assert!(observed
        .infer(InferRequest::classify(id.as_str(), vec![bad]))
        .is_err());
    let text = observed.metrics_text();
    for family in [
        "keel_requests_total",
        "keel_stage_seconds_bucket",
        "keel_confidence_bucket",
        "keel_drift_state",
        "keel_drift_signal",
        "keel_contract_violations_total",
        "keel_queue_depth",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
    assert!(text.contains(r#"outcome="contract_violation""#));
    // Python's prometheus_client (installed by scripts/setup-models.sh) parses it: every family
    // and sample, names and values.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = list(text_string_to_metric_families(open(sys.argv[1]).read()))
samples = sum(len(f.samples) for f in families)
names = {f.name for f in families}
assert "keel_requests" in names and "keel_stage_seconds" in names, names
ok = [s.value for f in families for s in f.samples if s.name == "keel_requests_total" and s.labels.get("outcome") == "ok"]
print(len(families), samples, ok[0])
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&file)
        .env("PYTHONPATH", common::models_dir())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        fields[2].parse::<f64>().unwrap(),
        60.0,
        "60 requests answered ok: {stdout}"
    );
    assert!(fields[0].parse::<usize>().unwrap() >= 10, "{stdout}");

    // The same text on a local port (feature metrics-http), as a Prometheus server scrapes it.
    let server = keel::observe::MetricsServer::start(observed.metrics(), "127.0.0.1:0").unwrap();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.address()).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: keel\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let scraped = get("/metrics");
    assert!(
        scraped.starts_with("HTTP/1.1 200") || scraped.starts_with("HTTP/1.0 200"),
        "{scraped}"
    );
    assert!(
        scraped.contains("application/openmetrics-text") && scraped.contains("keel_requests_total"),
        "{scraped}"
    );
    assert!(get("/other").contains(" 404 "));
}

#[test]
fn a_text_contract_on_minilm() {
    let dir = tempfile::tempdir().unwrap();
    let contract = "[contract.text]\nnon_empty = \"reject\"\nmax_tokens = 16\nmax_tokens_action = \"flag\"\n";
    let folder =
        keel_benches::harness::with_tables(&common::minilm_dir(), contract, &dir.path().join("minilm"))
            .unwrap();
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(&folder).unwrap();
    let layer = Stack::builder(engine.clone()).contract().build().unwrap();
    let answer = layer
        .infer(InferRequest::embed(id.as_str(), ["A short text."]))
        .unwrap();
    assert!(verdict(&answer).passed());
    let long = "word ".repeat(30);
    let answer = layer
        .infer(InferRequest::embed(id.as_str(), ["fine", long.as_str()]))
        .unwrap();
    let noted = answer.meta.notes.to_json();
    let v = &noted["contract"]["violations"][0];
    assert_eq!(
        (v["item"].as_u64(), v["clause"].as_str(), v["action"].as_str()),
        (Some(1), Some("max_tokens"), Some("flag"))
    );
    assert_eq!(v["value"], "32 tokens", "30 words and [CLS], [SEP]");
    let e = layer
        .infer(InferRequest::embed(id.as_str(), ["ok", "   "]))
        .unwrap_err();
    assert_eq!((violation(&e).item, violation(&e).clause), (1, Clause::NonEmpty));
}

#[test]
fn time_windows_and_the_state_change_callback() {
    let names = features();
    let engine = Engine::builder().build().unwrap();
    let id = engine.load(mlp_dir()).unwrap();
    let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = changes.clone();
    let config = ObserveConfig {
        window: Some(WindowSize::Time(std::time::Duration::from_millis(50))),
        on_drift: Some(Arc::new(
            move |model: &str, report: &keel::observe::WindowReport| {
                seen.lock().unwrap().push((model.to_string(), report.state))
            },
        )),
    };
    let observed = Stack::builder(engine.clone())
        .observe_with(config)
        .build()
        .unwrap();
    let held = split(0);
    let send = |values: &[f64], scale: f64| {
        let mut v = values.to_vec();
        v[0] *= scale;
        observed
            .infer(InferRequest::classify(id.as_str(), vec![record(&names, &v)]))
            .unwrap();
    };
    // A time window ends at the first row after 50 ms that finds at least 10 rows in it.
    for (values, _) in held.iter().take(40) {
        send(values, 1.0);
    }
    std::thread::sleep(std::time::Duration::from_millis(60));
    send(&held[40].0, 1.0);
    let state = observed
        .observed()
        .unwrap()
        .drift(&observed.target(id.as_str()).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((state.reports.len(), state.state), (1, State::Ok));
    assert_eq!(state.reports[0].count, 41);
    assert!(
        changes.lock().unwrap().is_empty(),
        "an ok first window is no change"
    );
    for (values, _) in held.iter().take(40) {
        send(values, 1.5);
    }
    std::thread::sleep(std::time::Duration::from_millis(60));
    send(&held[0].0, 1.5);
    assert_eq!(
        *changes.lock().unwrap(),
        [("breast-cancer-mlp".to_string(), State::Alarm)]
    );
}
