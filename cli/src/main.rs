//! `keel`: embed, generate and inspect with Keel from the command line; manage a deployment's
//! model registry and look its predictions up (`registry`, `lineage`).

mod devices;
mod generate;
mod registry;
mod review;
mod serve;
mod tabular;

use clap::{Parser, Subcommand, ValueEnum};
use generate::Generation;
use keel::stack::Stack;
use keel::version::{RegisterOptions, RetainInput, Versioned};
use keel::{DeviceKind, Engine, Infer, InferRequest, Output, WeightPath};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: an embedded inference runtime")]
struct Cli {
    /// Device to run on (default: cpu); cuda needs an NVIDIA GPU, its driver, NVRTC and cuBLAS.
    #[arg(long, global = true, value_parser = device_parser())]
    device: Option<DeviceKind>,
    /// The deployment's store (registry, alias history, lineage, review queue, keys): a folder,
    /// or a fleet's PostgreSQL database, `postgres://USER@HOST:PORT/DB`. Default: $KEEL_STORE,
    /// else ./.keel.
    #[arg(long, global = true)]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed texts with a sentence encoder; prints cosine similarities for several texts.
    Embed {
        /// A registered model, `NAME` (its production version) or `NAME@ALIAS`; or a Keel model
        /// folder, a Hugging Face folder or a .gguf file (registered on first use).
        #[arg(long)]
        model: String,
        #[command(flatten)]
        routing: Routing,
        /// Print the vectors instead of the similarities.
        #[arg(long)]
        vectors: bool,
        /// Print one JSON array holding one array of floats per text.
        #[arg(long)]
        json: bool,
        /// Which weights the matrix products use.
        #[arg(long, value_enum, default_value = "quantized")]
        weights: Weights,
        /// Refuse a text longer than the model reads (256 tokens for all-MiniLM-L6-v2) instead
        /// of embedding its first tokens (which is said on stderr).
        #[arg(long)]
        no_truncate: bool,
        /// Embed a corpus: one text per line of FILE (`-`: standard input), or JSON lines with a
        /// `text` field; prints one JSON object per text (`index`, `embedding`), with progress
        /// on stderr.
        #[arg(long, conflicts_with = "texts")]
        input: Option<String>,
        /// The texts.
        #[arg(required_unless_present = "input")]
        texts: Vec<String>,
    },
    /// Generate a reply to a prompt, streaming it as it is made.
    Generate {
        #[command(flatten)]
        generation: Generation,
        /// Feed the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Print one JSON object with the generated `token_ids` and `text`.
        #[arg(long)]
        json: bool,
        /// Read the prompt from this file (`-`: standard input) instead of the command line.
        #[arg(long, conflicts_with = "prompt")]
        prompt_file: Option<PathBuf>,
        /// The prompt.
        #[arg(required_unless_present = "prompt_file")]
        prompt: Option<String>,
    },
    /// Chat with a decoder: each line of standard input is a turn (a line ending in `\` goes on
    /// to the next), each reply is streamed; the model sees the whole conversation. `/reset`
    /// forgets it; `/exit` or the end of the input ends the chat.
    Chat {
        #[command(flatten)]
        generation: Generation,
    },
    /// Classify the rows of a CSV file (a header row of field names) or a JSON-lines file (one
    /// object per line; `-` reads standard input) with a tabular model, one row at a time: a
    /// row the contract refuses is reported and the next row goes on.
    Classify {
        /// A registered model, `NAME` or `NAME@ALIAS`; or a Keel model folder.
        #[arg(long)]
        model: String,
        /// One JSON object per row: `class`, `probabilities` (by label), `contract` (the
        /// verdict), or `error` (for a refused row: field, clause, value).
        #[arg(long)]
        json: bool,
        /// Write the Prometheus metrics text here at exit.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// The data: FILE.csv, FILE.jsonl, or - for standard input.
        data: String,
    },
    /// Write a model's reference profile (DIR/profile.json) from a calibration set: the
    /// distributions that drift is judged against (rows for a tabular model; a `text` column or
    /// field for an encoder, whose embeddings are profiled).
    Profile {
        /// A Keel model folder.
        #[arg(long)]
        model: PathBuf,
        /// Rows per drift window, by default.
        #[arg(long, default_value_t = 50)]
        window: usize,
        /// The calibration data: FILE.csv, FILE.jsonl, or -.
        data: String,
    },
    /// Judge data for drift against the model's reference profile, window by window.
    Drift {
        /// A Keel model folder with a profile.json (see `keel profile`).
        #[arg(long)]
        model: PathBuf,
        /// Rows per window (default: the profile's).
        #[arg(long)]
        window: Option<usize>,
        /// Print {"windows": [{"index", "state", "signals": {...}}]}.
        #[arg(long)]
        json: bool,
        /// Write the Prometheus metrics text here at exit.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// The data: FILE.csv, FILE.jsonl, or -.
        data: String,
    },
    /// Print the Prometheus metrics text of running DATA (if given) through a model: requests
    /// by outcome, time per stage, confidence, drift, contract violations, queues, batches.
    Metrics {
        /// A Keel model folder (or a registered NAME).
        #[arg(long)]
        model: String,
        /// Rows to classify first: FILE.csv, FILE.jsonl, or -.
        data: Option<String>,
    },
    /// Benchmark harness: minilm-throughput, minilm-load, smollm2, cache (a table, or --json;
    /// always writes OUT/SCENARIO.json, and minilm-load's chart OUT/minilm-load.svg).
    Bench(keel_benches::harness::Args),
    /// The model registry: register versions, move aliases, canary, promote, roll back.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Lineage records: what answered a prediction and why; replay it.
    #[command(subcommand)]
    Lineage(registry::LineageCommand),
    /// The review queue: predictions the models' review policies sent to a human.
    #[command(subcommand)]
    Review(review::ReviewCommand),
    /// Report the true label of a prediction (ground truth that arrived later).
    Feedback {
        /// The prediction's request id.
        request_id: String,
        /// Its true label.
        #[arg(long)]
        label: String,
    },
    /// What the recorded predictions cost, per model, version and routing key.
    Cost {
        /// Only `report` for now.
        #[arg(value_parser = ["report"])]
        what: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the stack over HTTP: OpenAI's routes (/v1/embeddings, /v1/chat/completions,
    /// /v1/completions, /v1/models), KServe v2 (/v2/...), /health and /metrics.
    Serve(serve::ServeArgs),
    /// API keys of `keel serve`: create (the secret is printed once), list, revoke.
    #[command(subcommand)]
    Keys(serve::KeysCommand),
    /// What this build and machine offer: the CPU's features, the wgpu adapters, and CUDA (the
    /// driver, NVRTC and cuBLAS found or not), so that a missing device says why.
    Devices {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show a model's architecture, version id, files with sha256, and tensors.
    Inspect {
        /// A Keel model folder, a Hugging Face folder or a .gguf file.
        path: PathBuf,
        /// Print the manifest as keel.toml.
        #[arg(long)]
        manifest: bool,
        /// Make PATH (a Hugging Face folder) a Keel model folder: write PATH/keel.toml, derived
        /// from its files (replacing an empty or broken one).
        #[arg(long, conflicts_with = "manifest")]
        write_manifest: bool,
    },
}

/// How a predicting command's request is routed and recorded.
#[derive(clap::Args)]
struct Routing {
    /// Routing key (tenant, user, session): the same key always gets the same version.
    #[arg(long)]
    key: Option<String>,
    /// Keep the input in the lineage record, so that `keel lineage replay` can run it again.
    #[arg(long)]
    retain_input: bool,
    /// The request's id (default: a new time-ordered id).
    #[arg(long)]
    request_id: Option<String>,
    /// Write the Prometheus metrics text here at exit.
    #[arg(long)]
    metrics: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Weights {
    /// As stored: GGUF blocks stay quantized, f32 safetensors stay f32.
    Quantized,
    /// Everything dequantized to f32 (the reference path).
    F32,
    /// f32 matrices quantized to int8 at load (encoders' fast path).
    Int8,
}

impl From<Weights> for WeightPath {
    fn from(w: Weights) -> Self {
        match w {
            Weights::Quantized => WeightPath::Quantized,
            Weights::F32 => WeightPath::F32,
            Weights::Int8 => WeightPath::Int8,
        }
    }
}

/// The deployment's store: `--store`, else $KEEL_STORE, else the folder ./.keel.
pub(crate) fn open_store(
    store: Option<String>,
) -> Result<std::sync::Arc<dyn keel::store::Store>, keel::store::Error> {
    let location = store
        .or_else(|| std::env::var("KEEL_STORE").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| ".keel".to_string());
    keel::store::open(&location)
}

/// The stack every prediction goes through, over an engine on `device`: the version layer
/// (with the deployment's store), review, cost, observability, then the contract.
pub(crate) fn serving(
    device: DeviceKind,
    store: Option<String>,
) -> Result<Stack, Box<dyn std::error::Error>> {
    let engine = Engine::builder().device(device).build()?;
    Ok(Stack::builder(engine)
        .store(open_store(store)?)
        .all_layers()
        .build()?)
}

/// The version layer of a serving stack: the registry, aliases, lineage.
pub(crate) fn registry_of(stack: &Stack) -> Result<&Versioned, Box<dyn std::error::Error>> {
    Ok(stack.versioned().ok_or("the stack has no version layer")?)
}

/// What `--model` names: a registered `NAME[@ALIAS]` as is; a path is registered (under its
/// manifest's name; a no-op if it is already) and addressed by its version id.
fn address(served: &Stack, model: &str, weights: Weights) -> Result<String, Box<dyn std::error::Error>> {
    let path = Path::new(model);
    // A name has no '/': anything else is a path, and a missing one says so.
    let looks_like_path = model.contains('/') || model.ends_with(".gguf");
    if !path.exists() && !looks_like_path {
        return Ok(model.to_string());
    }
    let name = keel::inspect(path)?.manifest.name;
    let name = name.replace(['@', '/'], "-");
    let options = RegisterOptions {
        weights: weights.into(),
        retain_input: false,
    };
    Ok(registry_of(served)?.register(&name, path, options)?.to_string())
}

/// The request with the routing flags applied.
fn routed(request: InferRequest, routing: &Routing) -> InferRequest {
    let mut request = request;
    if let Some(key) = &routing.key {
        request = request.key(key.clone());
    }
    if let Some(id) = &routing.request_id {
        request = request.id(id.clone());
    }
    if routing.retain_input {
        request.notes.insert(RetainInput);
    }
    request
}

/// Answers one request through the stack and says on stderr what answered it.
fn predict(
    served: &Stack,
    request: InferRequest,
    routing: Routing,
) -> Result<keel::InferResponse, Box<dyn std::error::Error>> {
    let answer = served.infer(routed(request, &routing))?;
    served.flush()?;
    said(&answer.meta);
    Ok(answer)
}

/// A warning on stderr for each text the encoder cut (`first`: the index of the request's first
/// text in the whole input).
fn warn_truncated(meta: &keel::Meta, first: usize) {
    for t in &meta.truncated {
        eprintln!(
            "keel: warning: text {} has {} tokens; the model reads its first {} (--no-truncate refuses it instead)",
            first + t.text,
            t.tokens,
            t.kept
        );
    }
}

/// `keel embed --input`: the texts of a file (or stdin) in requests of 32, one JSON line per text.
fn embed_corpus(
    served: &Stack,
    model: &str,
    input: &str,
    options: keel::Request,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, IsTerminal};
    let reader: Box<dyn BufRead> = if input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(input).map_err(|e| format!("{input}: {e}"))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut texts = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format!("{input}, line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            let object: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("{input}, line {}: not JSON: {e}", n + 1))?;
            let text = object["text"]
                .as_str()
                .ok_or_else(|| format!("{input}, line {}: a JSON line needs a \"text\" string", n + 1))?;
            texts.push(text.to_string());
        } else {
            texts.push(line);
        }
    }
    let progress = std::io::stderr().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut done = 0;
    for chunk in texts.chunks(32) {
        let answer =
            served.infer(InferRequest::embed(model, chunk.iter().cloned()).options(options.clone()))?;
        warn_truncated(&answer.meta, done);
        for v in answer.output.embeddings().unwrap_or_default() {
            writeln!(out, "{}", serde_json::json!({"index": done, "embedding": v}))?;
            done += 1;
        }
        if progress {
            eprint!("\rkeel: embedded {done}/{} texts", texts.len());
        }
    }
    if progress {
        eprintln!();
    }
    served.flush()?;
    eprintln!("keel: {done} texts embedded");
    Ok(())
}

/// One line on stderr: the request id (for `keel lineage show`) and what answered it.
fn said(m: &keel::Meta) {
    eprintln!(
        "keel: request {} answered by {} ({}, version {})",
        m.request_id,
        m.model,
        m.notes
            .get::<keel::version::Route>()
            .map_or("direct", |r| r.route.as_str()),
        &m.version.as_str()[..12]
    );
}

/// The device names, listed in `--help` and checked by clap.
fn device_parser() -> impl clap::builder::TypedValueParser<Value = DeviceKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["cpu", "wgpu", "cuda"])
        .map(|s| s.parse::<DeviceKind>().unwrap_or(DeviceKind::Cpu))
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a closed pipe (`keel inspect M | head -1`) would make every later
    // print fail or panic; with the default action the process ends quietly, as Unix tools do.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_DFL before any thread starts is sound.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Command::Generate { generation, .. } | Command::Chat { generation } = &cli.command {
        if let Some(n) = generation.threads {
            // Before the first parallel product builds the thread pool, with no other thread
            // running.
            std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line whatever the environment (a library's message may span several).
            let message = e.to_string();
            let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("keel: error: {}", lines.join("; "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if matches!(cli.command, Command::Inspect { .. }) && cli.device.is_some() {
        return Err("inspect reads a model's files and runs nothing: --device does not apply".into());
    }
    if matches!(cli.command, Command::Devices { .. }) && cli.device.is_some() {
        return Err("devices lists every device: --device does not apply".into());
    }
    let device = cli.device.unwrap_or(DeviceKind::Cpu);
    match cli.command {
        Command::Inspect {
            path,
            write_manifest: true,
            ..
        } => {
            let source = keel::manifest::ModelSource::derive(&path)?;
            let target = path.join(keel::manifest::MANIFEST_FILE);
            // Written beside, then renamed: a failure never leaves a half-written keel.toml.
            let partial = path.join(".keel.toml.partial");
            std::fs::write(&partial, source.manifest.to_toml())?;
            std::fs::rename(&partial, &target)?;
            println!("wrote {} (version {})", target.display(), source.version_id());
            Ok(())
        }
        Command::Inspect { path, manifest, .. } => inspect(&path, manifest),
        Command::Bench(args) => {
            keel_benches::harness::run(&args)?;
            Ok(())
        }
        Command::Classify {
            model,
            json,
            metrics,
            data,
        } => {
            let served = serving(device, cli.store)?;
            let model = address(&served, &model, Weights::Quantized)?;
            let rows = tabular::read_rows(&data)?;
            let (ok, failed) = tabular::classify_rows(&served, &model, rows, json)?;
            served.flush()?;
            tabular::write_metrics(&served, metrics.as_deref())?;
            eprintln!("keel: {ok} rows classified, {failed} refused or unreadable");
            Ok(())
        }
        Command::Profile { model, window, data } => {
            let engine = Engine::builder().device(device).build()?;
            let path = tabular::profile(&engine, &model, &data, window)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Drift {
            model,
            window,
            json,
            metrics,
            data,
        } => {
            let engine = Engine::builder().device(device).build()?;
            let id = engine.load(&model)?;
            let info = engine.info(id.as_str())?;
            let observed = tabular::watched(&engine, window)?;
            // The answers are not printed: the windows are (a refused row counts in no window).
            for row in tabular::read_rows(&data)?.into_iter().flatten() {
                if let Some(input) = tabular::input_of(&info, row) {
                    let _ = observed.infer(InferRequest::new(id.as_str(), input));
                }
            }
            if let Some(o) = observed.observed() {
                o.close_windows();
            }
            let report = tabular::drift_json(&observed, id.as_str())?;
            if json {
                println!("{report}");
            } else {
                for w in report["windows"].as_array().into_iter().flatten() {
                    let worst = w["signals"]
                        .as_object()
                        .and_then(|s| {
                            s.iter().max_by(|a, b| {
                                let r = |v: &serde_json::Value| {
                                    v["value"].as_f64().unwrap_or(0.0)
                                        / v["alarm"].as_f64().unwrap_or(1.0).max(1e-12)
                                };
                                r(a.1).total_cmp(&r(b.1))
                            })
                        })
                        .map(|(name, v)| {
                            format!(
                                "{name} = {:.4} (alarm {:.4})",
                                v["value"].as_f64().unwrap_or(0.0),
                                v["alarm"].as_f64().unwrap_or(0.0)
                            )
                        })
                        .unwrap_or_default();
                    println!(
                        "window {:>3}  {:>3} rows  {:<5}  nearest its alarm: {worst}",
                        w["index"],
                        w["count"],
                        w["state"].as_str().unwrap_or("")
                    );
                }
            }
            tabular::write_metrics(&observed, metrics.as_deref())?;
            Ok(())
        }
        Command::Metrics { model, data } => {
            let served = serving(device, cli.store)?;
            let model = address(&served, &model, Weights::Quantized)?;
            if let Some(data) = data {
                for row in tabular::read_rows(&data)?.into_iter().flatten() {
                    let _ = served.infer(InferRequest::classify(&model, vec![row]));
                }
                served.flush()?;
            }
            print!("{}", served.metrics_text());
            Ok(())
        }
        Command::Registry(command) => registry::registry(device, cli.store, command),
        Command::Lineage(command) => registry::lineage(device, cli.store, command),
        Command::Review(command) => review::review(cli.store, command),
        Command::Feedback { request_id, label } => review::feedback(cli.store, &request_id, &label),
        Command::Cost { json, .. } => review::cost_report(cli.store, json),
        Command::Embed {
            model,
            routing,
            vectors,
            json,
            weights,
            no_truncate,
            input,
            texts,
        } => {
            let served = serving(device, cli.store)?;
            let model = address(&served, &model, weights)?;
            let metrics = routing.metrics.clone();
            let options = if no_truncate {
                keel::Request::default().refuse_long_texts()
            } else {
                keel::Request::default()
            };
            if let Some(input) = input {
                embed_corpus(&served, &model, &input, options)?;
                tabular::write_metrics(&served, metrics.as_deref())?;
                return Ok(());
            }
            let answer = predict(
                &served,
                InferRequest::embed(&model, &texts).options(options),
                routing,
            )?;
            tabular::write_metrics(&served, metrics.as_deref())?;
            warn_truncated(&answer.meta, 0);
            let Output::Embeddings(vectors_out) = answer.output else {
                return Err("the model did not answer with embeddings".into());
            };
            let out = keel::Embeddings {
                version: answer.meta.version,
                vectors: vectors_out,
            };
            if json {
                println!("{}", serde_json::to_string(&out.vectors)?);
            } else if vectors || texts.len() == 1 {
                for (text, v) in texts.iter().zip(&out.vectors) {
                    let shown: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
                    println!("{text}\n[{}]", shown.join(", "));
                }
            } else {
                println!(
                    "cosine similarity ({} texts, dim {})",
                    texts.len(),
                    out.vectors[0].len()
                );
                for i in 0..texts.len() {
                    for j in i + 1..texts.len() {
                        let cos: f32 = out.vectors[i]
                            .iter()
                            .zip(&out.vectors[j])
                            .map(|(a, b)| a * b)
                            .sum();
                        println!("{cos:+.4}  {:?} ~ {:?}", texts[i], texts[j]);
                    }
                }
            }
            Ok(())
        }
        Command::Generate {
            generation,
            raw,
            json,
            prompt_file,
            prompt,
        } => {
            let prompt = match (prompt, prompt_file) {
                (Some(p), _) => p,
                (None, Some(f)) if f.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())?,
                (None, Some(f)) => {
                    std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?
                }
                (None, None) => return Err("give a prompt, or --prompt-file".into()),
            };
            generate::generate(generation, device, cli.store, prompt, raw, json)
        }
        Command::Chat { generation } => generate::chat(generation, device, cli.store),
        Command::Devices { json } => devices::devices(json),
        Command::Serve(args) => serve::serve(args, device, cli.store),
        Command::Keys(command) => serve::keys(command, cli.store),
    }
}

fn inspect(path: &std::path::Path, manifest_only: bool) -> Result<(), Box<dyn std::error::Error>> {
    let info = keel::inspect(path)?;
    if manifest_only {
        print!("{}", info.manifest.to_toml());
        return Ok(());
    }
    let m = &info.manifest;
    println!("name:         {}", m.name);
    println!("architecture: {}", m.architecture);
    println!("version id:   {}", info.id);
    if !info.hyperparameters.is_empty() {
        println!("hyperparameters:");
        for (name, value) in &info.hyperparameters {
            println!("  {name:<18} {value}");
        }
    }
    println!("files:");
    for f in &m.files {
        println!("  {}  sha256 {}", f.path, f.sha256);
    }
    let total: usize = info.tensors.iter().map(|t| t.bytes).sum();
    println!(
        "tensors:      {} ({:.1} MB)",
        info.tensors.len(),
        total as f64 / 1e6
    );
    for t in &info.tensors {
        println!("  {:<52} {:<6} {:?} {} bytes", t.name, t.dtype, t.shape, t.bytes);
    }
    Ok(())
}
