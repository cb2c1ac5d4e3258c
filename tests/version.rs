//! The version layer on the real models: canary split and stickiness, shadow runs, atomic
//! promote and rollback and hot swap under load, the guarded canary, durability of lineage
//! across SIGKILL, replay, and bad input.

mod common;

use keel::store::{CanaryConfig, Guard, LineageStore, SqliteStore};
use keel::version::{bucket_of, Error, RegisterOptions, Route, VersionConfig, Versioned};
use keel::{Engine, ErrorKind, GenerateParams, Infer, InferRequest, Output, VersionId, WeightPath};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn served(store: &Path, config: VersionConfig) -> Versioned {
    Versioned::open(Engine::builder().build().unwrap(), store, config).unwrap()
}

fn options(weights: WeightPath, retain_input: bool) -> RegisterOptions {
    RegisterOptions {
        weights,
        retain_input,
    }
}

/// MiniLM registered twice under "embed": f32 (production) and int8.
fn two_versions(s: &Versioned) -> (VersionId, VersionId) {
    let minilm = common::minilm_dir();
    let f32 = s
        .register("embed", &minilm, options(WeightPath::F32, true))
        .unwrap();
    let int8 = s
        .register("embed", &minilm, options(WeightPath::Int8, true))
        .unwrap();
    s.set_alias("embed", "production", f32.as_str(), "test").unwrap();
    (f32, int8)
}

fn split(percent: f64) -> CanaryConfig {
    CanaryConfig {
        percent,
        shadow: false,
        guard: None,
    }
}

const KEYS: usize = 10_000;

/// The canary's share of 10,000 keys at 10%, and a digest of every key's bucket.
fn key_buckets() -> (f64, String) {
    let mut canary = 0;
    let mut all = String::new();
    for k in 0..KEYS {
        let b = bucket_of("embed", &format!("user-{k}"));
        canary += usize::from(b < 1000);
        all.push_str(&b.to_string());
        all.push(',');
    }
    (canary as f64 / KEYS as f64 * 100.0, format!("{:x}", fxhash(&all)))
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn key_buckets_child() {
    // Run by `canary_split_is_sticky_by_key_across_processes` in a second process.
    if std::env::var_os("KEEL_BUCKETS_CHILD").is_some() {
        println!("buckets {}", key_buckets().1);
    }
}

#[test]
fn canary_split_is_sticky_by_key_across_processes() {
    let (share, digest) = key_buckets();
    assert!(
        (share - 10.0).abs() <= 1.0,
        "canary share {share}% for a 10% split"
    );
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "key_buckets_child", "--nocapture", "--test-threads=1"])
        .env("KEEL_BUCKETS_CHILD", "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        out.contains(&format!("buckets {digest}")),
        "another process maps keys differently: {out}"
    );

    // Through the layer: a key's route never changes, and the routes follow the buckets.
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path(), VersionConfig::default());
    let (f32, int8) = two_versions(&s);
    s.canary("embed", int8.as_str(), split(50.0), "test").unwrap();
    for k in 0..12 {
        let key = format!("user-{k}");
        let expect = if bucket_of("embed", &key) < 5000 {
            &int8
        } else {
            &f32
        };
        for _ in 0..2 {
            let a = s
                .infer(InferRequest::embed("embed", ["sticky"]).key(&key))
                .unwrap();
            assert_eq!(&a.meta.version, expect, "key {key}");
        }
    }
}

#[test]
fn shadow_output_is_never_returned_and_a_full_shadow_queue_drops() {
    let dir = tempfile::tempdir().unwrap();
    let config = VersionConfig {
        shadow_queue: 1,
        ..VersionConfig::default()
    };
    let s = served(dir.path(), config);
    let (f32, int8) = two_versions(&s);
    let shadow = CanaryConfig {
        percent: 100.0,
        shadow: true,
        guard: None,
    };
    s.canary("embed", int8.as_str(), shadow, "test").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            let f32 = f32.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let text = format!("thread {t} sentence {i}");
                    let a = s.infer(InferRequest::embed("embed", [text])).unwrap();
                    assert_eq!(a.meta.version, f32, "a shadow answer was returned");
                    assert_eq!(a.meta.notes.get::<Route>().unwrap().route, "production");
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    s.drain_shadow();
    let st = s.shadow_stats();
    assert_eq!(st.run + st.dropped + st.stale + st.failed, 80, "{st:?}");
    assert!(st.dropped > 0 && st.run > 0, "{st:?}");
    s.flush().unwrap();
    let shadows: Vec<_> = s
        .recent(200)
        .unwrap()
        .into_iter()
        .filter(|r| r.route == "shadow")
        .collect();
    assert_eq!(shadows.len() as u64, st.run);
    for r in &shadows {
        assert_eq!(r.version, int8.as_str());
        let d = r.divergence.unwrap();
        // int8 against f32: close, not equal (cosine >= 0.995 is tested in minilm.rs).
        assert!(d > 0.0 && d < 0.01, "divergence {d}");
        assert!(s.explain(r.shadow_of.as_deref().unwrap()).unwrap().route == "production");
    }
}

#[test]
fn hot_swap_promote_and_rollback_under_load_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path(), VersionConfig::default());
    let (f32, int8) = two_versions(&s);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..16)
        .map(|t| {
            let (s, stop, answered) = (s.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("thread {t} request {i}");
                    let a = s.infer(InferRequest::embed("embed", [text])).unwrap();
                    answered
                        .lock()
                        .unwrap()
                        .push((a.meta.request_id.to_string(), a.meta.version));
                    i += 1;
                }
            })
        })
        .collect();
    // 50 swaps: a canary set and promoted, or production rolled back, in turn (and now and then
    // every version let go of); the version let go is unloaded once its requests are answered,
    // and loaded again later.
    let mut expected = Vec::new();
    for swap in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let routes = s.routes("embed").unwrap();
        let now = routes.aliases["production"].clone();
        let other = if now == f32 { &int8 } else { &f32 };
        if swap % 10 == 9 {
            // This process lets go of its loaded versions; the next request loads them again.
            s.release("embed");
        }
        if swap % 3 == 2 {
            s.rollback("embed", "test").unwrap();
        } else {
            s.canary("embed", other.as_str(), split(30.0), "test").unwrap();
            s.promote("embed", "test").unwrap();
        }
        expected.push(s.routes("embed").unwrap().aliases["production"].clone());
    }
    stop.store(true, Ordering::Relaxed);
    senders.into_iter().for_each(|t| t.join().unwrap());
    s.flush().unwrap();
    let answered = answered.lock().unwrap();
    assert!(
        answered.len() > 100,
        "only {} requests in the run",
        answered.len()
    );
    assert_eq!(s.store().lineage_count().unwrap(), answered.len() as u64);
    for (id, version) in answered.iter() {
        assert_eq!(&s.explain(id).unwrap().version, version.as_str(), "request {id}");
        assert!(*version == f32 || *version == int8);
    }
    // The history is in order, and production moved as the swaps say.
    let history = s.history("embed").unwrap();
    assert!(history
        .windows(2)
        .all(|w| w[0].seq < w[1].seq && w[0].time_ms <= w[1].time_ms));
    let production: Vec<VersionId> = history
        .iter()
        .filter(|e| e.alias == "production")
        .skip(1)
        .map(|e| e.to.clone().unwrap())
        .collect();
    assert_eq!(production, expected);
    // Only production is loaded in the end: the version let go is unloaded when its last
    // holder does (a route refresh running on its own thread may hold it for a moment).
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while s.engine().models().len() > 1 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.engine().models().len(), 1);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn load_swap_unload_cycles_return_memory() {
    // In a process of its own: the other tests' models would move this one's RSS.
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "memory_child", "--nocapture", "--test-threads=1"])
        .env("KEEL_MEMORY_CHILD", "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&child.stderr)
    );
    // libtest may print the test's name on the same line first.
    let line = out
        .lines()
        .find_map(|l| l.split_once("rss ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("{out}"));
    let kib: Vec<u64> = line.split_whitespace().map(|n| n.parse().unwrap()).collect();
    let (before, after) = (kib[0], kib[1]);
    println!("RSS after 10 warm-up cycles {before} KiB, after 100 more {after} KiB");
    // A MiniLM version holds ~90 MB; the bound is a sixth of one version over 100 cycles.
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB over 100 cycles"
    );
}

#[test]
fn memory_child() {
    if std::env::var_os("KEEL_MEMORY_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path(), VersionConfig::default());
    let (f32, int8) = two_versions(&s);
    let cycle = |i: usize| {
        let v = if i.is_multiple_of(2) { &int8 } else { &f32 };
        s.set_alias("embed", "production", v.as_str(), "cycle").unwrap();
        s.infer(InferRequest::embed("embed", ["memory"])).unwrap();
        s.release("embed");
        assert!(s.engine().models().is_empty());
    };
    for i in 0..10 {
        cycle(i);
    }
    let before = rss_kib();
    for i in 0..100 {
        cycle(i);
    }
    println!("rss {before} {}", rss_kib());
}

#[test]
fn guard_rolls_back_a_divergent_canary_and_keeps_a_close_one() {
    for (threshold, rolled_back) in [(0.0002, true), (0.05, false)] {
        let dir = tempfile::tempdir().unwrap();
        let s = served(dir.path(), VersionConfig::default());
        let (_, int8) = two_versions(&s);
        let guarded = CanaryConfig {
            percent: 100.0,
            shadow: false,
            guard: Some(Guard {
                min_requests: 10,
                max_error_rate: Some(0.5),
                max_p99_ratio: None,
                max_divergence: Some(threshold),
            }),
        };
        s.canary("embed", int8.as_str(), guarded, "test").unwrap();
        for i in 0..30 {
            s.infer(InferRequest::embed("embed", [format!("guard sentence {i}")]))
                .unwrap();
            s.drain_shadow();
        }
        let routes = s.routes("embed").unwrap();
        let history = s.history("embed").unwrap();
        let last = history.last().unwrap();
        if rolled_back {
            assert!(!routes.aliases.contains_key("canary"), "{routes:?}");
            assert!(last.reason.contains("guard: divergence"), "{}", last.reason);
            // Requests after the rollback go to production.
            let a = s.infer(InferRequest::embed("embed", ["after"])).unwrap();
            assert_eq!(a.meta.notes.get::<Route>().unwrap().route, "production");
        } else {
            assert_eq!(routes.aliases.get("canary"), Some(&int8));
            let report = s.guard_report("embed").unwrap();
            assert!(report.tripped.is_none() && report.compared >= 10, "{report:?}");
            assert!(report.divergence.unwrap() > 0.0002, "{report:?}");
        }
    }
}

#[test]
fn durability_child() {
    // Run by `lineage_acknowledged_as_durable_survives_sigkill`: serves requests and prints
    // the ids of each flushed batch, until it is killed.
    let Some(dir) = std::env::var_os("KEEL_DURABILITY_CHILD") else {
        return;
    };
    let s = served(Path::new(&dir), VersionConfig::default());
    let minilm = common::minilm_dir();
    let v = s
        .register("embed", &minilm, options(WeightPath::Quantized, false))
        .unwrap();
    s.set_alias("embed", "production", v.as_str(), "child").unwrap();
    for batch in 0.. {
        let ids: Vec<String> = (0..8)
            .map(|i| {
                let r = InferRequest::embed("embed", [format!("batch {batch} text {i}")]);
                s.infer(r).unwrap().meta.request_id.to_string()
            })
            .collect();
        s.flush().unwrap();
        println!("durable {}", ids.join(" "));
    }
}

#[test]
fn lineage_acknowledged_as_durable_survives_sigkill() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = Vec::new();
    let mut seed = 0x9e37_79b9_u64;
    for _ in 0..3 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "durability_child", "--nocapture", "--test-threads=1"])
            .env("KEEL_DURABILITY_CHILD", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let acked = Arc::new(Mutex::new(Vec::new()));
        let collector = {
            let acked = acked.clone();
            std::thread::spawn(move || {
                for line in reader.lines().map_while(Result::ok) {
                    if let Some(ids) = line.strip_prefix("durable ") {
                        acked.lock().unwrap().extend(ids.split(' ').map(String::from));
                    }
                }
            })
        };
        // Kill at a random moment once it has acknowledged something.
        let start = Instant::now();
        while acked.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        // SIGKILL: no destructor, no flush, no chance to finish a transaction.
        child.kill().unwrap();
        child.wait().unwrap();
        collector.join().unwrap();
        let acked = acked.lock().unwrap();
        assert!(!acked.is_empty(), "the child acknowledged nothing");
        acknowledged.extend(acked.iter().cloned());
    }
    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    for id in &acknowledged {
        assert!(
            store.lineage(id).unwrap().is_some(),
            "acknowledged record {id} is missing"
        );
    }
    println!("{} acknowledged records survived 3 SIGKILLs", acknowledged.len());
}

#[test]
fn replay_reproduces_minilm_f32_int8_and_smollm2_greedy_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path(), VersionConfig::default());
    let (f32, int8) = two_versions(&s);
    let gguf = s
        .register(
            "chat",
            common::smollm2_gguf(),
            options(WeightPath::Quantized, true),
        )
        .unwrap();
    s.set_alias("chat", "production", gguf.as_str(), "test").unwrap();
    s.set_alias("embed", "int8", int8.as_str(), "test").unwrap();
    let mut ids = Vec::new();
    for model in ["embed", "embed@int8"] {
        let texts = ["A man is playing a guitar.", "Replay must give the same bits."];
        ids.push(
            s.infer(InferRequest::embed(model, texts))
                .unwrap()
                .meta
                .request_id,
        );
    }
    let params = GenerateParams::greedy().max_tokens(16);
    let prompt = "What is the capital of France?";
    let chat = s
        .infer(InferRequest::generate("chat", prompt, params.clone()))
        .unwrap();
    let Output::Completion(c) = &chat.output else {
        panic!("not a completion")
    };
    assert!(!c.token_ids.is_empty());
    // Streamed through the layer: the same tokens as they are made, and a record at the end.
    let mut stream = s
        .infer_stream(InferRequest::generate("chat", prompt, params))
        .unwrap();
    let streamed: Vec<u32> = (&mut stream).map(|t| t.unwrap().id).collect();
    let answer = stream.finish().unwrap();
    assert_eq!(streamed, c.token_ids);
    assert_eq!(answer.output, chat.output);
    assert_eq!(answer.meta.notes.get::<Route>().unwrap().route, "production");
    ids.push(answer.meta.request_id);
    ids.push(chat.meta.request_id);
    s.flush().unwrap();
    // Replays run without the response cache, on a fresh engine too.
    for s in [s.clone(), served(dir.path(), VersionConfig::default())] {
        for id in &ids {
            let r = s.replay(id.as_str()).unwrap();
            assert!(
                r.identical,
                "replay of {id}: {:?} vs {:?}",
                r.recorded, r.replayed
            );
        }
    }
    assert_eq!(s.explain(ids[0].as_str()).unwrap().version, f32.as_str());
}

#[test]
fn bad_input_gives_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path(), VersionConfig::default());
    let kind = |e: Error| e.kind();
    assert_eq!(
        kind(
            s.register("embed", "/no/such/model", RegisterOptions::default())
                .unwrap_err()
        ),
        ErrorKind::NotFound
    );
    let (f32, int8) = two_versions(&s);
    assert_eq!(
        s.infer(InferRequest::embed("nope", ["x"])).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.infer(InferRequest::embed("embed@staging", ["x"]))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    let unknown = "ab".repeat(32);
    assert!(matches!(
        s.set_alias("embed", "staging", &unknown, "x"),
        Err(Error::UnknownVersion { .. })
    ));
    assert!(matches!(
        s.set_alias("nope", "staging", f32.as_str(), "x"),
        Err(Error::UnknownName(_))
    ));
    for percent in [-1.0, 100.5, f64::NAN] {
        assert_eq!(
            kind(s.canary("embed", int8.as_str(), split(percent), "x").unwrap_err()),
            ErrorKind::InvalidArgument
        );
    }
    let e = s.promote("embed", "x").unwrap_err();
    assert!(e.to_string().contains("no canary"), "{e}");
    let e = s.rollback("embed", "x").unwrap_err();
    assert!(e.to_string().contains("no earlier production"), "{e}");
    assert!(matches!(
        s.replay("no-such-request"),
        Err(Error::UnknownRequest(_))
    ));
    // Unretained input: the replay says so.
    let plain = s
        .register("plain", common::minilm_dir(), RegisterOptions::default())
        .unwrap();
    s.set_alias("plain", "production", plain.as_str(), "x").unwrap();
    let id = s
        .infer(InferRequest::embed("plain", ["x"]))
        .unwrap()
        .meta
        .request_id;
    s.flush().unwrap();
    let e = s.replay(id.as_str()).unwrap_err();
    assert!(e.to_string().contains("not retained"), "{e}");

    // A tampered weight file is refused at load, naming the file.
    let copy = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(common::minilm_dir().join(f), copy.path().join(f)).unwrap();
    }
    let v = s
        .register("copy", copy.path(), RegisterOptions::default())
        .unwrap();
    let weights = copy.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let e = s.set_alias("copy", "production", v.as_str(), "x").unwrap_err();
    assert!(
        matches!(&e, Error::Tampered { file, .. } if file.ends_with("model.safetensors")),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::InvalidModel);
    assert!(
        s.routes("copy").unwrap().aliases.is_empty(),
        "an alias moved to a tampered version"
    );

    // Stores that cannot be used.
    let engine = Engine::builder().build().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let open = |p: &Path| {
        Versioned::open(engine.clone(), p, VersionConfig::default())
            .err()
            .unwrap()
    };
    assert_eq!(open(&file.join("store")).kind(), ErrorKind::Storage);
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(
        foreign.join("keel.db"),
        "not a database, just text that is long enough to be read",
    )
    .unwrap();
    let e = open(&foreign);
    assert!(e.to_string().contains("not a Keel store"), "{e}");
}

#[test]
fn many_threads_many_keys_every_request_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = served(dir.path(), VersionConfig::default());
    let (_, int8) = two_versions(&s);
    s.canary("embed", int8.as_str(), split(20.0), "test").unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (s, count) = (s.clone(), count.clone());
            std::thread::spawn(move || {
                for i in 0..10 {
                    let r = InferRequest::embed("embed", [format!("{t}/{i}")]).key(format!("k{t}"));
                    let a = s.infer(r).unwrap();
                    assert!(a.meta.batch_id.is_some());
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    s.flush().unwrap();
    let records = s.recent(1000).unwrap();
    assert_eq!(records.len(), count.load(Ordering::Relaxed));
    let canary = records.iter().filter(|r| r.route == "canary").count();
    let expect = (0..8)
        .filter(|t| bucket_of("embed", &format!("k{t}")) < 2000)
        .count()
        * 10;
    assert_eq!(canary, expect);
}

#[test]
fn a_promote_by_another_process_reaches_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = VersionConfig {
        refresh: Some(Duration::from_millis(100)),
        ..VersionConfig::default()
    };
    let server = served(dir.path(), config);
    let (f32, int8) = two_versions(&server);
    let ask = || {
        server
            .infer(InferRequest::embed("embed", ["who answers?"]))
            .unwrap()
            .meta
            .version
    };
    assert_eq!(ask(), f32);
    // Another process (here: another layer on the same store folder) promotes a canary.
    let operator = served(dir.path(), VersionConfig::default());
    operator
        .canary("embed", int8.as_str(), split(0.0), "ops")
        .unwrap();
    operator.promote("embed", "ops").unwrap();
    let start = Instant::now();
    while ask() != int8 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the server never saw the promote"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("the server followed the promote in {:?}", start.elapsed());
}

#[test]
fn retention_prunes_old_records_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let config = VersionConfig {
        retention: keel::store::Retention {
            max_records: Some(20),
            max_age_ms: None,
        },
        prune_every: Duration::from_millis(50),
        ..VersionConfig::default()
    };
    let s = served(dir.path(), config);
    two_versions(&s);
    let mut last = None;
    for i in 0..60 {
        last = Some(
            s.infer(InferRequest::embed("embed", [format!("retention {i}")]))
                .unwrap()
                .meta
                .request_id,
        );
    }
    s.flush().unwrap();
    let start = Instant::now();
    while s.store().lineage_count().unwrap() > 20 {
        assert!(start.elapsed() < Duration::from_secs(10), "never pruned");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        s.explain(last.unwrap().as_str()).is_ok(),
        "the newest record was pruned"
    );
    assert!(s.lineage_stats().pruned >= 40);
}

#[test]
fn a_version_the_host_loaded_itself_stays_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder().build().unwrap();
    let own = engine.load(common::minilm_dir()).unwrap();
    let s = Versioned::open(engine.clone(), dir.path(), VersionConfig::default()).unwrap();
    let v = s
        .register("embed", common::minilm_dir(), RegisterOptions::default())
        .unwrap();
    assert_eq!(v, own);
    s.set_alias("embed", "production", v.as_str(), "test").unwrap();
    s.infer(InferRequest::embed("embed", ["shared"])).unwrap();
    s.release("embed");
    engine.embed(own.as_str(), &["still loaded"]).unwrap();
}
