//! `keel registry ...` and `keel lineage ...`: the deployment's versions, aliases and lineage.

use crate::{registry_of, serving, Weights};
use clap::Subcommand;
use keel::store::{AliasEvent, CanaryConfig, Guard};
use keel::version::{LineageRecord, RegisterOptions, Versioned};
use keel::DeviceKind;
use serde_json::json;
use std::path::PathBuf;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub(crate) enum RegistryCommand {
    /// Register a model path as an immutable version of NAME; prints its version id.
    Register {
        /// A Keel model folder, a Hugging Face folder or a .gguf file.
        path: PathBuf,
        /// The model name it is a version of.
        #[arg(long)]
        name: String,
        /// Which weights its products use.
        #[arg(long, value_enum, default_value = "quantized")]
        weights: Weights,
        /// Also point this alias at it (e.g. production).
        #[arg(long)]
        alias: Option<String>,
        /// Keep every request's input in lineage (for replay).
        #[arg(long)]
        retain_input: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the registered versions and the aliases pointing at them.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Point an alias of NAME at a version (an id or a unique prefix of 8+ hex digits).
    Alias {
        /// The model name.
        name: String,
        /// The alias (production, canary, any other).
        alias: String,
        /// The version.
        version: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "by hand")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make VERSION the canary of NAME, with a share of traffic (sticky by --key) or in shadow.
    Canary {
        /// The model name.
        name: String,
        /// The version.
        version: String,
        /// Share of requests sent to the canary (0-100); in shadow mode, share copied to it.
        #[arg(long)]
        percent: f64,
        /// Shadow mode: production answers; the canary runs on copies and is only compared.
        #[arg(long)]
        shadow: bool,
        /// Guard: judge after this many canary requests.
        #[arg(long, default_value_t = 50)]
        guard_min_requests: u64,
        /// Guard: roll back above this share of failed canary requests.
        #[arg(long)]
        guard_max_error_rate: Option<f64>,
        /// Guard: roll back when the canary's p99 latency exceeds production's by this factor.
        #[arg(long)]
        guard_max_p99_ratio: Option<f64>,
        /// Guard: roll back above this mean divergence from production.
        #[arg(long)]
        guard_max_divergence: Option<f64>,
        /// Why (recorded in the history).
        #[arg(long, default_value = "by hand")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make NAME's canary its production version.
    Promote {
        /// The model name.
        name: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "by hand")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Return NAME's production alias to the version it replaced.
    Rollback {
        /// The model name.
        name: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "by hand")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// NAME's alias moves, oldest first.
    History {
        /// The model name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum LineageCommand {
    /// The newest lineage records.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Print JSON (one array of records).
        #[arg(long)]
        json: bool,
    },
    /// The whole record of one request.
    Show {
        /// The request id.
        request_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a recorded request again on its version and say whether the output is identical.
    Replay {
        /// The request id.
        request_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn short(id: Option<&keel::VersionId>) -> String {
    id.map_or_else(|| "-".into(), |v| v.as_str()[..12].to_string())
}

fn print_events(events: &[AliasEvent], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(events)?);
    } else {
        for e in events {
            println!(
                "{:>4}  {}@{:<12} {} -> {}  ({})",
                e.seq,
                e.name,
                e.alias,
                short(e.from.as_ref()),
                short(e.to.as_ref()),
                e.reason
            );
        }
    }
    Ok(())
}

pub(crate) fn registry(device: DeviceKind, store: Option<String>, command: RegistryCommand) -> Result<()> {
    let stack = serving(device, store)?;
    let served = registry_of(&stack)?;
    match command {
        RegistryCommand::Register {
            path,
            name,
            weights,
            alias,
            retain_input,
            json,
        } => {
            let options = RegisterOptions {
                weights: weights.into(),
                retain_input,
            };
            let id = served.register(&name, &path, options)?;
            let events = match &alias {
                Some(alias) => served.set_alias(&name, alias, id.as_str(), "registered with --alias")?,
                None => Vec::new(),
            };
            if json {
                println!(
                    "{}",
                    json!({"name": name, "version": id.as_str(), "events": events})
                );
            } else {
                println!("{id}");
            }
        }
        RegistryCommand::List { json } => list(served, json)?,
        RegistryCommand::Alias {
            name,
            alias,
            version,
            reason,
            json,
        } => print_events(&served.set_alias(&name, &alias, &version, &reason)?, json)?,
        RegistryCommand::Canary {
            name,
            version,
            percent,
            shadow,
            guard_min_requests,
            guard_max_error_rate,
            guard_max_p99_ratio,
            guard_max_divergence,
            reason,
            json,
        } => {
            let guarded = guard_max_error_rate.is_some()
                || guard_max_p99_ratio.is_some()
                || guard_max_divergence.is_some();
            let config = CanaryConfig {
                percent,
                shadow,
                guard: guarded.then_some(Guard {
                    min_requests: guard_min_requests,
                    max_error_rate: guard_max_error_rate,
                    max_p99_ratio: guard_max_p99_ratio,
                    max_divergence: guard_max_divergence,
                }),
            };
            print_events(&served.canary(&name, &version, config, &reason)?, json)?;
        }
        RegistryCommand::Promote { name, reason, json } => {
            print_events(&served.promote(&name, &reason)?, json)?
        }
        RegistryCommand::Rollback { name, reason, json } => {
            print_events(&served.rollback(&name, &reason)?, json)?
        }
        RegistryCommand::History { name, json } => {
            if !served.versions()?.iter().any(|v| v.name == name) {
                return Err(keel::version::Error::UnknownName(name).into());
            }
            print_events(&served.history(&name)?, json)?;
        }
    }
    Ok(())
}

fn list(served: &Versioned, json: bool) -> Result<()> {
    let catalog = served.catalog()?;
    if json {
        println!("{}", serde_json::to_string(&catalog)?);
        return Ok(());
    }
    for v in &catalog {
        println!(
            "{:<20} {}  {:<9} {:<6} {}",
            v.name,
            &v.version.as_str()[..12],
            v.weights,
            v.architecture,
            v.aliases.join(",")
        );
    }
    Ok(())
}

fn summary(r: &LineageRecord) -> String {
    format!(
        "{}  {}  {}@{} ({})  version {}  key {}  {} us{}",
        r.request_id,
        r.time,
        r.model,
        r.route,
        r.backend,
        &r.version[..12.min(r.version.len())],
        r.key.as_deref().unwrap_or("-"),
        r.timings_us.total,
        if r.cache_hit { "  cache hit" } else { "" }
    )
}

pub(crate) fn lineage(device: DeviceKind, store: Option<String>, command: LineageCommand) -> Result<()> {
    let stack = serving(device, store)?;
    let served = registry_of(&stack)?;
    match command {
        LineageCommand::List { last, json } => {
            let records = served.recent(last)?;
            if json {
                println!("{}", serde_json::to_string(&records)?);
            } else {
                for r in &records {
                    println!("{}", summary(r));
                }
            }
        }
        LineageCommand::Show { request_id, json } => {
            let record = served.explain(&request_id)?;
            if json {
                println!("{}", serde_json::to_string(&record)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&record)?);
            }
        }
        LineageCommand::Replay { request_id, json } => {
            let replay = served.replay(&request_id)?;
            if json {
                println!(
                    "{}",
                    json!({
                        "request_id": replay.request_id,
                        "version": replay.version,
                        "identical": replay.identical,
                        "recorded": replay.recorded,
                        "replayed": replay.replayed,
                    })
                );
            } else if replay.identical {
                println!(
                    "identical: request {} gives the recorded output on version {}",
                    replay.request_id,
                    &replay.version[..12]
                );
            } else {
                println!(
                    "DIFFERENT: request {} no longer gives the recorded output on version {}",
                    replay.request_id,
                    &replay.version[..12]
                );
            }
            if !replay.identical {
                return Err("the replay's output differs from the recorded one".into());
            }
        }
    }
    Ok(())
}
