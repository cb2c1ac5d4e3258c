//! The scheduler and caches on the real models, under many threads: batched equals unbatched,
//! load shedding, deadlines, shutdown with requests in flight, the response cache never crossing
//! versions, continuous batching, cancellation freeing KV memory, the prefix cache.
//! No timing is asserted beyond "answered at once" bounds that are orders of magnitude loose.

mod common;
use common::*;
use keel::{CacheConfig, Completion, Engine, ErrorKind, GenerateParams, Request, SchedulerConfig, Turn};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Sentences of realistic, varied length (5 to ~60 tokens).
fn sentences() -> Vec<String> {
    let base = [
        "The cat sat on the mat.",
        "A quick brown fox jumps over the lazy dog near the river bank.",
        "Rust guarantees memory safety without a garbage collector.",
        "What time is it?",
        "Inference runtimes batch requests from many threads to use the hardware well, and they cache answers that repeat.",
        "Paris is the capital of France.",
        "The weather today is sunny with a light breeze from the west, and tomorrow it will rain in the afternoon.",
        "Hello!",
    ];
    (0..32)
        .map(|i| format!("{} ({i})", base[i % base.len()]))
        .collect()
}

fn minilm_engine(config: SchedulerConfig, caches: CacheConfig) -> (Engine, String) {
    let engine = Engine::builder()
        .scheduler(config)
        .caches(caches)
        .build()
        .unwrap();
    let id = engine.load(minilm_dir()).unwrap().to_string();
    (engine, id)
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn concurrent_requests_are_batched_and_equal_unbatched_results() {
    let texts = sentences();
    let (alone, id) = minilm_engine(SchedulerConfig::default().unbatched(), CacheConfig::off());
    let expected: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| alone.embed(&id, &[t]).unwrap().vectors.remove(0))
        .collect();
    let (engine, id) = minilm_engine(
        SchedulerConfig::default().max_queue_delay(Duration::from_millis(20)),
        CacheConfig::off(),
    );
    let barrier = Arc::new(Barrier::new(texts.len()));
    let threads: Vec<_> = texts
        .iter()
        .cloned()
        .map(|t| {
            let (engine, id, barrier) = (engine.clone(), id.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                engine.embed(&id, &[&t]).unwrap().vectors.remove(0)
            })
        })
        .collect();
    let got: Vec<Vec<f32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        let diff = max_abs_diff(g, e);
        assert!(diff <= 1e-5, "sentence {i}: batched differs from alone by {diff}");
    }
    let stats = engine.scheduler_stats(&id).unwrap();
    eprintln!("{stats:?}");
    assert_eq!(stats.completed, texts.len() as u64);
    assert!(
        stats.batches < texts.len() as u64,
        "{} batches for {} concurrent requests: nothing was batched",
        stats.batches,
        texts.len()
    );
}

#[test]
fn a_full_queue_answers_overloaded_at_once_and_loses_nothing() {
    let (engine, id) = minilm_engine(
        SchedulerConfig::default().queue_capacity(4).max_batch_size(2),
        CacheConfig::off(),
    );
    let long = "word ".repeat(120);
    let barrier = Arc::new(Barrier::new(32));
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let (engine, id, barrier, text) =
                (engine.clone(), id.clone(), barrier.clone(), format!("{long} {i}"));
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let r = engine.embed(&id, &[&text]);
                (r.map(|e| e.vectors.len()), start.elapsed())
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for t in threads {
        match t.join().unwrap() {
            (Ok(1), _) => ok += 1,
            (Err(e), took) => {
                assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
                assert!(took < Duration::from_millis(500), "shedding took {took:?}");
                shed += 1;
            }
            (Ok(n), _) => panic!("{n} vectors for one text"),
        }
    }
    let stats = engine.scheduler_stats(&id).unwrap();
    eprintln!("ok {ok}, shed {shed}: {stats:?}");
    assert!(shed > 0, "32 simultaneous requests into a queue of 4 shed none");
    assert_eq!(ok + shed, 32);
    assert_eq!(stats.completed, ok as u64);
    assert_eq!(stats.overloaded, shed as u64);
    assert_eq!(stats.accepted, ok as u64);
}

#[test]
fn a_request_whose_deadline_passes_in_the_queue_is_never_run() {
    let (engine, id) = minilm_engine(SchedulerConfig::default(), CacheConfig::off());
    let long = "word ".repeat(120);
    let big: Vec<String> = (0..48).map(|i| format!("{long} {i}")).collect();
    let busy = {
        let (engine, id) = (engine.clone(), id.clone());
        std::thread::spawn(move || {
            let refs: Vec<&str> = big.iter().map(String::as_str).collect();
            engine.embed(&id, &refs).unwrap().vectors.len()
        })
    };
    // The big request is running (taken from the queue): the next one waits behind it.
    wait_until("the worker to take the big request", || {
        let s = engine.scheduler_stats(&id).unwrap();
        s.accepted == 1 && s.queued == 0 && s.batches >= 1
    });
    let start = Instant::now();
    let err = engine
        .embed_with(
            &id,
            &["too late"],
            &Request::default().deadline(Duration::from_millis(20)),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        start.elapsed()
    );
    assert_eq!(busy.join().unwrap(), 48);
    let stats = engine.scheduler_stats(&id).unwrap();
    assert_eq!(stats.expired, 1);
    assert_eq!(stats.items, 48, "the expired request ran");
    // A deadline that is already past is refused without queueing.
    let err = engine
        .embed_with(&id, &["x"], &Request::default().deadline(Duration::ZERO))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
}

#[test]
fn shutdown_with_requests_in_flight_answers_every_one() {
    let (engine, id) = minilm_engine(SchedulerConfig::default(), CacheConfig::off());
    let texts = sentences();
    let barrier = Arc::new(Barrier::new(17));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (engine, id, barrier, texts) = (engine.clone(), id.clone(), barrier.clone(), texts.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let (mut ok, mut stopped) = (0, 0);
                for i in 0..20 {
                    match engine.embed(&id, &[&texts[(t + i) % texts.len()]]) {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            assert_eq!(e.kind(), ErrorKind::ShuttingDown, "{e}");
                            stopped += 1;
                        }
                    }
                }
                (ok, stopped)
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        engine.shutdown(Duration::from_secs(30)),
        "queued requests did not drain in time"
    );
    let (ok, stopped) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    eprintln!("before shutdown: {ok} answered; after: {stopped} refused");
    assert_eq!(ok + stopped, 16 * 20);
    assert!(ok > 0 && stopped > 0);
    let stats = engine.scheduler_stats(&id).unwrap();
    assert_eq!(stats.completed, ok as u64, "an accepted request was not answered");
    let err = engine.embed(&id, &["after"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ShuttingDown);
}

#[test]
fn the_response_cache_never_answers_for_another_version() {
    // A second version of the same weights: a Keel model folder with another name.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(minilm_dir().join(f), dir.path().join(f)).unwrap();
    }
    let mut manifest = keel::inspect(&minilm_dir()).unwrap().manifest;
    manifest.name.push_str(" (copy)");
    std::fs::write(dir.path().join("keel.toml"), manifest.to_toml()).unwrap();
    let (engine, v1) = minilm_engine(SchedulerConfig::default(), CacheConfig::default());
    let v2 = engine.load(dir.path()).unwrap().to_string();
    assert_ne!(v1, v2);

    let first = engine.embed(&v1, &["The cat sat on the mat."]).unwrap();
    let s = engine.response_cache_stats().unwrap();
    assert_eq!((s.hits, s.misses, s.entries), (0, 1, 1));
    // The same normalized input (the uncased tokenizer cannot tell these apart): a hit.
    let again = engine.embed(&v1, &["the CAT sat on the mat."]).unwrap();
    assert_eq!(again, first);
    assert_eq!(engine.response_cache_stats().unwrap().hits, 1);
    // Another version: a miss, computed by that version.
    let other = engine.embed(&v2, &["The cat sat on the mat."]).unwrap();
    let s = engine.response_cache_stats().unwrap();
    assert_eq!((s.hits, s.misses, s.entries), (1, 2, 2));
    assert_eq!(other.version.to_string(), v2);
    assert_eq!(engine.scheduler_stats(&v2).unwrap().completed, 1);
    // Same weights, so the same numbers: computed, not served across.
    assert!(max_abs_diff(&other.vectors[0], &first.vectors[0]) <= 1e-6);
    // A batch mixing hits and misses keeps its order.
    let mixed = engine.embed(&v1, &["Hello!", "The cat sat on the mat."]).unwrap();
    assert_eq!(mixed.vectors[1], first.vectors[0]);
    assert_eq!(
        mixed.vectors[0],
        engine
            .embed_with(&v1, &["Hello!"], &Request::default().no_cache())
            .unwrap()
            .vectors[0]
    );
    assert!(engine.response_cache_stats().unwrap().bytes > 0);
}

fn smollm_engine(caches: CacheConfig) -> (Engine, String) {
    let engine = Engine::builder()
        .scheduler(SchedulerConfig::default().max_streams(8))
        .caches(caches)
        .build()
        .unwrap();
    let id = engine.load(smollm2_gguf()).unwrap().to_string();
    (engine, id)
}

#[test]
fn dropping_a_stream_cancels_it_and_frees_its_kv_cache() {
    let (engine, id) = smollm_engine(CacheConfig::off());
    let mut stream = engine
        .generate(
            &id,
            "Write a long story about the sea.",
            &GenerateParams::greedy().max_tokens(500),
        )
        .unwrap();
    for _ in 0..3 {
        stream.next().unwrap().unwrap();
    }
    wait_until("the stream to be active", || {
        let s = engine.scheduler_stats(&id).unwrap();
        s.active_streams == 1 && s.kv_bytes > 0
    });
    let held = engine.scheduler_stats(&id).unwrap().kv_bytes;
    eprintln!("KV cache of the running stream: {held} bytes");
    drop(stream);
    wait_until("the cancelled stream to leave", || {
        let s = engine.scheduler_stats(&id).unwrap();
        s.active_streams == 0 && s.kv_bytes == 0
    });
    let s = engine.scheduler_stats(&id).unwrap();
    assert_eq!(s.cancelled, 1);
    assert!(
        s.tokens < 500,
        "the cancelled stream ran on: {} tokens fed",
        s.tokens
    );
}

#[test]
fn streams_joining_a_running_batch_get_the_tokens_they_get_alone() {
    let prompts = [
        "What is the capital of France?",
        "Name three colors.",
        "Count from one to five.",
        "Say hello in Spanish.",
    ];
    let params = GenerateParams::greedy().max_tokens(16);
    let (alone, id) = smollm_engine(CacheConfig::off());
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            alone
                .generate(&id, p, &params)
                .unwrap()
                .complete()
                .unwrap()
                .token_ids
        })
        .collect();
    drop(alone);
    let (engine, id) = smollm_engine(CacheConfig::off());
    // Each stream starts once the one before it has its first token, so it joins a batch that
    // is already running (a token count, not a sleep: faster kernels must not let one stream
    // finish before the next arrives).
    let mut started = None;
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (engine, id, params, p) = (engine.clone(), id.clone(), params.clone(), p.to_string());
            let (signal, next) = std::sync::mpsc::channel::<()>();
            let wait = started.replace(next);
            std::thread::spawn(move || {
                if let Some(wait) = wait {
                    let _ = wait.recv();
                }
                let mut stream = engine.generate(&id, &p, &params).unwrap();
                stream.next().unwrap().unwrap();
                let _ = signal.send(());
                stream.complete().unwrap().token_ids
            })
        })
        .collect();
    let got: Vec<Vec<u32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(got, expected);
    wait_until("the worker to go idle", || {
        engine.scheduler_stats(&id).unwrap().active_streams == 0
    });
    let s = engine.scheduler_stats(&id).unwrap();
    eprintln!("{s:?}, mean sequences per step {:.2}", s.mean_batch());
    assert!(s.mean_batch() > 1.0, "the streams never shared a step");
    assert_eq!(s.completed, 4);
}

#[test]
fn a_prefix_cache_hit_skips_the_system_prompt_and_changes_no_token() {
    let system = "You are a careful assistant for a shipping company. ".repeat(8);
    let params = GenerateParams::greedy()
        .max_tokens(8)
        .system_prompt(system.clone());
    let (plain, id) = smollm_engine(CacheConfig::off());
    let expected: Vec<Vec<u32>> = ["Where is my parcel?", "How do I return an item?"]
        .iter()
        .map(|p| {
            plain
                .generate(&id, p, &params)
                .unwrap()
                .complete()
                .unwrap()
                .token_ids
        })
        .collect();
    drop(plain);
    let (engine, id) = smollm_engine(CacheConfig::default());
    let first = engine
        .generate(&id, "Where is my parcel?", &params)
        .unwrap()
        .complete()
        .unwrap();
    let fed_first = engine.scheduler_stats(&id).unwrap().tokens;
    let s = engine.prefix_cache_stats().unwrap();
    assert_eq!((s.hits, s.entries), (0, 1), "{s:?}");
    let second = engine
        .generate(&id, "How do I return an item?", &params)
        .unwrap()
        .complete()
        .unwrap();
    let fed_second = engine.scheduler_stats(&id).unwrap().tokens - fed_first;
    let s = engine.prefix_cache_stats().unwrap();
    assert_eq!(s.hits, 1, "{s:?}");
    assert_eq!(vec![first.token_ids, second.token_ids.clone()], expected);
    // The second prompt ran only its own turn, not the system prompt's ~100 tokens.
    let system_tokens = engine.tokenize(&id, &system, false).unwrap().len();
    assert!(
        (fed_second as usize) < second.prompt_ids.len() - system_tokens + second.token_ids.len() + 8,
        "fed {fed_second} tokens for a {}-token prompt",
        second.prompt_ids.len()
    );
}

#[test]
fn a_conversation_is_rendered_turn_by_turn_and_reuses_the_turns_before() {
    let system = "You are a helpful assistant. Answer in one short sentence.";
    let turns = [
        "What is the capital of France?",
        "What language do people speak there?",
        "Name a famous building there.",
    ];
    let params = GenerateParams::greedy().max_tokens(24).system_prompt(system);
    // Each turn with the turns before as its history; with the tokens fed for it.
    let converse = |engine: &Engine, id: &str| -> Vec<(Completion, u64)> {
        let mut history = Vec::new();
        let mut replies = Vec::new();
        for t in turns {
            let before = engine.scheduler_stats(id).unwrap().tokens;
            let done = engine
                .generate(id, t, &params.clone().after(history.clone()))
                .unwrap()
                .complete()
                .unwrap();
            let fed = engine.scheduler_stats(id).unwrap().tokens - before;
            history.push(Turn {
                user: t.into(),
                assistant: done.text.clone(),
            });
            replies.push((done, fed));
        }
        replies
    };
    let (plain, id) = smollm_engine(CacheConfig::off());
    let expected = converse(&plain, &id);
    // The history is the chat template's turns: the conversation written out in ChatML (the
    // template of SmolLM2) gives the same prompt.
    let written = format!(
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        turns[0], expected[0].0.text, turns[1]
    );
    assert_eq!(
        expected[1].0.prompt_ids,
        plain.tokenize(&id, &written, false).unwrap()
    );
    // "There" is the city of the turn before (alone, the question gets "Ashkelon ... Hebrew").
    assert!(
        expected[1].0.text.contains("French"),
        "reply: {:?}",
        expected[1].0.text
    );
    drop(plain);

    let (engine, id) = smollm_engine(CacheConfig::default());
    let got = converse(&engine, &id);
    for (turn, ((want, _), (have, _))) in expected.iter().zip(&got).enumerate() {
        assert_eq!(have.token_ids, want.token_ids, "turn {turn}");
    }
    // The third turn ran only the second exchange and its own prompt: the KV state of the
    // system turn and the first exchange came from the prefix cache.
    let (third, fed) = &got[2];
    let second = &got[1].0;
    let new_tokens = third.prompt_ids.len() - second.prompt_ids.len();
    let second_user = engine.tokenize(&id, turns[1], false).unwrap().len();
    assert!(
        (*fed as usize) <= new_tokens + second_user + 8 + third.token_ids.len(),
        "fed {fed} tokens for a {}-token prompt",
        third.prompt_ids.len()
    );
    assert!(engine.prefix_cache_stats().unwrap().hits >= 2);
}
