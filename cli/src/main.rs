//! `keel`: embed, generate and inspect with Keel from the command line.

use clap::{Parser, Subcommand, ValueEnum};
use keel::{DeviceKind, Engine, GenerateParams, LoadOptions, WeightPath};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: an embedded inference runtime")]
struct Cli {
    /// Device to run on.
    #[arg(long, global = true, default_value = "cpu", value_parser = parse_device)]
    device: DeviceKind,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed texts with a sentence encoder; prints cosine similarities for several texts.
    Embed {
        /// A Keel model folder, a Hugging Face folder or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Print the vectors instead of the similarities.
        #[arg(long)]
        vectors: bool,
        /// Print one JSON array holding one array of floats per text.
        #[arg(long)]
        json: bool,
        /// Which weights the matrix products use.
        #[arg(long, value_enum, default_value = "quantized")]
        weights: Weights,
        /// The texts.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Generate a reply to a prompt, streaming it as it is made.
    Generate {
        /// A Keel model folder or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Feed the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Always take the most likely token (otherwise: seeded sampling).
        #[arg(long)]
        greedy: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Which weights the matrix products use.
        #[arg(long, value_enum, default_value = "quantized")]
        weights: Weights,
        /// Sampling temperature.
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        /// Sample among the k most likely tokens (0: all).
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        /// Sample among the most likely tokens holding this much probability.
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        /// Seed of the sampler: the same seed gives the same text.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print one JSON object with the generated `token_ids` and `text`.
        #[arg(long)]
        json: bool,
        /// The prompt.
        prompt: String,
    },
    /// Benchmark harness: minilm-throughput, minilm-load, smollm2, cache (a table, or --json;
    /// always writes OUT/SCENARIO.json, and minilm-load's chart OUT/minilm-load.svg).
    Bench(keel_benches::harness::Args),
    /// Show a model's architecture, version id, files with sha256, and tensors.
    Inspect {
        /// A Keel model folder, a Hugging Face folder or a .gguf file.
        path: PathBuf,
        /// Print the manifest as keel.toml (to make a Keel model folder of it).
        #[arg(long)]
        manifest: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Weights {
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

/// An engine on `device` with the model at `path` loaded.
fn open(
    device: DeviceKind,
    path: &std::path::Path,
    weights: Weights,
) -> Result<(Engine, keel::VersionId), Box<dyn std::error::Error>> {
    let engine = Engine::builder().device(device).build()?;
    let id = engine.load_with(
        path,
        LoadOptions {
            weights: weights.into(),
        },
    )?;
    Ok((engine, id))
}

fn parse_device(s: &str) -> Result<DeviceKind, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Inspect { path, manifest } => inspect(&path, manifest),
        Command::Bench(args) => {
            keel_benches::harness::run(&args)?;
            Ok(())
        }
        Command::Embed {
            model,
            vectors,
            json,
            weights,
            texts,
        } => {
            let (engine, id) = open(cli.device, &model, weights)?;
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let out = engine.embed(id.as_str(), &texts)?;
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
            model,
            raw,
            greedy,
            max_tokens,
            weights,
            temperature,
            top_k,
            top_p,
            seed,
            json,
            prompt,
        } => {
            let (engine, id) = open(cli.device, &model, weights)?;
            let mut params = if greedy {
                GenerateParams::greedy()
            } else {
                GenerateParams::sampled(temperature, top_k, top_p, seed)
            };
            params = params.max_tokens(max_tokens);
            if raw {
                params = params.raw();
            }
            let stream = engine.generate(id.as_str(), &prompt, &params)?;
            if json {
                let done = stream.complete()?;
                let out = serde_json::json!({
                    "token_ids": done.token_ids,
                    "text": done.text,
                    "prompt_tokens": done.prompt_ids.len(),
                    "finish_reason": format!("{:?}", done.finish).to_lowercase(),
                });
                println!("{out}");
            } else {
                let mut stdout = std::io::stdout().lock();
                for token in stream {
                    write!(stdout, "{}", token?.text)?;
                    stdout.flush()?;
                }
                writeln!(stdout)?;
            }
            Ok(())
        }
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
