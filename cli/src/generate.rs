//! `keel generate` (one prompt) and `keel chat` (a conversation, one line a turn): the same
//! flags, the same path through the version layer, one reply at a time streamed to stdout.

use crate::{address, routed, said, serving, tabular, Routing, Weights};
use keel::stack::Stack;
use keel::{
    Completion, DeviceKind, ErrorKind, FinishReason, GenerateParams, Infer, InferRequest, Output, Turn,
};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

/// The flags `generate` and `chat` share: the model, how its tokens are chosen, the turns.
#[derive(clap::Args)]
pub(crate) struct Generation {
    /// A registered model, `NAME` or `NAME@ALIAS`; or a Keel model folder or a .gguf file.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    routing: Routing,
    /// Always take the most likely token (otherwise: seeded sampling).
    #[arg(long)]
    greedy: bool,
    /// Most tokens to generate (per reply).
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
    /// A system turn before the prompt (with the chat template).
    #[arg(long)]
    system: Option<String>,
    /// End the reply where this text appears (not printed); may be given several times.
    #[arg(long)]
    stop: Vec<String>,
    /// Threads for the model's matrix products (default: one per core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

impl Generation {
    fn params(&self) -> GenerateParams {
        let mut params = if self.greedy {
            GenerateParams::greedy()
        } else {
            GenerateParams::sampled(self.temperature, self.top_k, self.top_p, self.seed)
        };
        params = params.max_tokens(self.max_tokens);
        params.system = self.system.clone();
        params.stop = self.stop.clone();
        params
    }
}

/// A model to generate with, behind the stack's layers.
struct Session {
    served: Stack,
    model: String,
    routing: Routing,
}

impl Session {
    fn open(
        g: Generation,
        device: DeviceKind,
        store: Option<String>,
    ) -> Result<(Self, GenerateParams), Box<dyn std::error::Error>> {
        let params = g.params();
        let served = serving(device, store)?;
        let model = address(&served, &g.model, g.weights)?;
        let session = Self {
            served,
            model,
            routing: g.routing,
        };
        Ok((session, params))
    }

    /// One reply, streamed to stdout as it is made (unless `quiet`), recorded in lineage and
    /// observed; with the instants of the start, the first token and the end.
    fn reply(
        &self,
        prompt: &str,
        params: GenerateParams,
        quiet: bool,
    ) -> Result<Replied, Box<dyn std::error::Error>> {
        let request = routed(InferRequest::generate(&self.model, prompt, params), &self.routing);
        let started = Instant::now();
        let mut stream = self.served.infer_stream(request)?;
        let mut first = None;
        let mut stdout = std::io::stdout().lock();
        for token in &mut stream {
            let token = token?;
            first.get_or_insert_with(Instant::now);
            if !quiet {
                write!(stdout, "{}", token.text)?;
                stdout.flush()?;
            }
        }
        if !quiet {
            writeln!(stdout)?;
        }
        let ended = Instant::now();
        let answer = stream.finish()?;
        self.served.flush()?;
        let Output::Completion(done) = answer.output else {
            return Err("the model did not answer with a completion".into());
        };
        Ok(Replied {
            done,
            meta: answer.meta,
            started,
            first,
            ended,
        })
    }

    /// Writes the metrics text where `--metrics` says, if it does.
    fn write_metrics(&self) -> Result<(), Box<dyn std::error::Error>> {
        tabular::write_metrics(&self.served, self.routing.metrics.as_deref())
    }
}

/// A finished reply and when its parts happened.
struct Replied {
    done: Completion,
    meta: keel::Meta,
    started: Instant,
    first: Option<Instant>,
    ended: Instant,
}

impl Replied {
    /// The figures llama-cli prints at the end, on stderr: the prompt's tokens per second (to
    /// the first token: the prefill) and the generated tokens per second after it.
    fn timings(&self) {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let rate = |n: usize, d: std::time::Duration| {
            if d.is_zero() {
                0.0
            } else {
                n as f64 / d.as_secs_f64()
            }
        };
        let n = self.done.token_ids.len();
        let prompt = self.done.prompt_ids.len();
        let finish = self.done.finish.as_str();
        match self.first {
            Some(first) => eprintln!(
                "keel: prompt {prompt} tokens in {:.1} ms ({:.1} tokens/s, to the first token); generated {n} tokens, {:.1} tokens/s after the first; finish: {finish}",
                ms(first - self.started),
                rate(prompt, first - self.started),
                rate(n.saturating_sub(1), self.ended - first),
            ),
            None => eprintln!("keel: prompt {prompt} tokens; nothing generated; finish: {finish}"),
        }
    }
}

/// `keel generate`: one reply to one prompt.
pub(crate) fn generate(
    g: Generation,
    device: DeviceKind,
    store: Option<String>,
    prompt: String,
    raw: bool,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let (session, mut params) = Session::open(g, device, store)?;
    if raw {
        params = params.raw();
    }
    let replied = session.reply(&prompt, params, json);
    session.write_metrics()?;
    let replied = replied?;
    said(&replied.meta);
    replied.timings();
    if json {
        let done = &replied.done;
        let out = serde_json::json!({
            "token_ids": done.token_ids,
            "text": done.text,
            "prompt_tokens": done.prompt_ids.len(),
            "finish_reason": done.finish.as_str(),
        });
        println!("{out}");
    }
    Ok(())
}

/// `keel chat`: a conversation on standard input, one line a turn (a line ending in `\` goes
/// on to the next), each reply streamed to stdout. The model sees the whole conversation
/// (rendered by its chat template; the prefix cache keeps the KV state of the turns before).
/// `/reset` forgets the conversation, `/exit` or the end of the input ends it.
pub(crate) fn chat(
    g: Generation,
    device: DeviceKind,
    store: Option<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    if g.routing.request_id.is_some() {
        return Err("each turn of a chat is a request of its own: --request-id does not apply".into());
    }
    let (session, params) = Session::open(g, device, store)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "keel: chat with {}; /reset forgets the conversation, /exit or Ctrl-D ends it",
            session.model
        );
    }
    let mut history: Vec<Turn> = Vec::new();
    let mut lines = std::io::stdin().lock().lines();
    let ended = loop {
        if interactive {
            eprint!("> ");
        }
        let Some(said_now) = read_turn(&mut lines, interactive)? else {
            break Ok(());
        };
        match said_now.trim() {
            "" => continue,
            "/exit" | "/quit" => break Ok(()),
            "/reset" => {
                history.clear();
                eprintln!("keel: the conversation is forgotten");
                continue;
            }
            _ => {}
        }
        // A conversation that outgrows the context forgets its oldest turns, as llama-cli's does.
        let replied = loop {
            match session.reply(&said_now, params.clone().after(history.clone()), false) {
                Err(e) if refused_input(&*e) && !history.is_empty() => {
                    history.remove(0);
                    eprintln!(
                        "keel: the conversation outgrew the model's context: its oldest turn is forgotten"
                    );
                }
                other => break other,
            }
        };
        let replied = match replied {
            Ok(r) => r,
            // This turn alone cannot be answered (too long): say so, and take the next.
            Err(e) if refused_input(&*e) => {
                eprintln!("keel: error: {e}");
                continue;
            }
            Err(e) => break Err(e),
        };
        if interactive {
            replied.timings();
        }
        if replied.done.finish == FinishReason::ContextFull {
            eprintln!("keel: the reply filled the model's context: /reset to start again");
        }
        history.push(Turn {
            user: said_now,
            assistant: replied.done.text,
        });
    };
    session.write_metrics()?;
    ended
}

/// Whether the engine refused the request's input (in a chat: too long a conversation).
fn refused_input(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<keel::Error>()
        .is_some_and(|e| e.kind() == ErrorKind::InvalidArgument)
}

/// The next turn's text: a line, joined with the next while it ends in `\`. None at the end
/// of the input.
fn read_turn(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    interactive: bool,
) -> std::io::Result<Option<String>> {
    let mut turn = String::new();
    loop {
        let Some(line) = lines.next().transpose()? else {
            return Ok((!turn.is_empty()).then_some(turn));
        };
        match line.strip_suffix('\\') {
            Some(part) => {
                turn.push_str(part);
                turn.push('\n');
                if interactive {
                    eprint!(". ");
                }
            }
            None => {
                turn.push_str(&line);
                return Ok(Some(turn));
            }
        }
    }
}
