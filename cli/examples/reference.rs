//! What the Rust API computes for the inputs of `examples/c/embed_generate.c`, written in its dump
//! format, so that scripts/test-ffi.sh can check that C (and Python) get the same bits.
//!
//! `cargo run --release -p keel-cli --example reference -- MINILM_DIR SMOLLM2_GGUF DUMP_FILE` (an example of
//! the CLI crate, not of keel-ffi: keel-ffi's dev-dependency cbindgen would rebuild the tree with
//! other features)

use keel::{Engine, GenerateParams};
use std::fmt::Write as _;

/// The inputs: the same in examples/c/embed_generate.c and examples/python/embed_generate.py.
const TEXTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog.",
    "Keel runs models inside the host process.",
    "Ünïcödé text, too: 日本語.",
];
const PROMPT: &str = "What is 2+2?";
const MAX_TOKENS: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [minilm, smollm2, dump] = args.as_slice() else {
        return Err("usage: reference MINILM_DIR SMOLLM2_GGUF DUMP_FILE".into());
    };
    let engine = Engine::builder().build()?;
    let mut out = String::new();

    let encoder = engine.load(minilm)?;
    let embeddings = engine.embed(encoder.as_str(), &TEXTS)?;
    for (i, v) in embeddings.vectors.iter().enumerate() {
        write!(out, "embedding {i} {}", v.len())?;
        for x in v {
            write!(out, " {:08x}", x.to_bits())?;
        }
        out.push('\n');
    }

    let decoder = engine.load(smollm2)?;
    let params = GenerateParams::greedy().max_tokens(MAX_TOKENS);
    let completion = engine.generate(decoder.as_str(), PROMPT, &params)?.complete()?;
    let finish = completion.finish.as_str();
    writeln!(out, "completion {} {finish}", completion.token_ids.len())?;
    out.push_str("tokens");
    for id in &completion.token_ids {
        write!(out, " {id}")?;
    }
    out.push_str("\ntext ");
    for b in completion.text.bytes() {
        write!(out, "{b:02x}")?;
    }
    out.push('\n');
    std::fs::write(dump, out)?;
    Ok(())
}
