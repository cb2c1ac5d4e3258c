//! `keel review ...`, `keel feedback` and `keel cost report`: the review queue, labels and what
//! predictions cost, read from the deployment's store.

use keel::store::{now_ms, Store, Ticket, TicketState};
use keel::version::LineageRecord;
use serde_json::json;
use std::collections::BTreeMap;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(clap::Subcommand)]
pub(crate) enum ReviewCommand {
    /// List tickets (default: the pending ones), oldest first.
    List {
        /// pending, claimed, resolved, expired or all.
        #[arg(long, default_value = "pending")]
        state: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Take the oldest pending ticket for a while (other reviewers do not get it meanwhile).
    Claim {
        /// Who reviews.
        #[arg(long)]
        reviewer: String,
        /// How long the claim holds (seconds); then the ticket is pending again.
        #[arg(long, default_value_t = 900)]
        lease: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Label a ticket; the label is stored as feedback on its prediction.
    Resolve {
        /// The ticket id.
        ticket: i64,
        /// The label (a class of the model).
        #[arg(long)]
        label: String,
        /// Who reviewed.
        #[arg(long)]
        reviewer: String,
        /// A note.
        #[arg(long)]
        comment: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Expire the pending tickets older than this many seconds.
    Expire {
        /// Age in seconds.
        #[arg(long)]
        older_than: u64,
    },
    /// Every label (reviews and ground truth) as JSON lines, for retraining.
    Export,
    /// Online accuracy (ground truth) and model/reviewer agreement, per version.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn open(store: Option<String>) -> Result<std::sync::Arc<dyn Store>> {
    Ok(crate::open_store(store)?)
}

fn print_ticket(t: &Ticket, json: bool) {
    if json {
        println!("{}", serde_json::to_string(t).unwrap_or_default());
    } else {
        let reasons: Vec<String> = serde_json::from_str(&t.ticket.reasons).unwrap_or_default();
        println!(
            "ticket {} [{}] {} {} request {}: {}",
            t.id,
            t.state.as_str(),
            t.ticket.decision,
            t.ticket.model,
            t.ticket.request_id,
            reasons.join("; ")
        );
    }
}

pub(crate) fn review(store: Option<String>, command: ReviewCommand) -> Result<()> {
    let store = open(store)?;
    match command {
        ReviewCommand::List { state, limit, json } => {
            let state = match state.as_str() {
                "all" => None,
                s => Some(TicketState::parse(s).ok_or(format!(
                    "--state {s}: expected pending, claimed, resolved, expired or all"
                ))?),
            };
            let tickets = store.tickets(state, limit, now_ms())?;
            if json {
                println!("{}", serde_json::to_string(&tickets)?);
            } else {
                tickets.iter().for_each(|t| print_ticket(t, false));
            }
        }
        ReviewCommand::Claim {
            reviewer,
            lease,
            json,
        } => {
            let lease_ms = i64::try_from(lease.saturating_mul(1000)).unwrap_or(i64::MAX);
            match store.claim_review(&reviewer, lease_ms, now_ms())? {
                Some(t) => print_ticket(&t, json),
                None if json => println!("null"),
                None => println!("no ticket is pending"),
            }
        }
        ReviewCommand::Resolve {
            ticket,
            label,
            reviewer,
            comment,
            json,
        } => {
            let t = store
                .resolve_review(ticket, &reviewer, &label, comment.as_deref(), now_ms())?
                .map_err(|refusal| format!("cannot resolve: {refusal}"))?;
            print_ticket(&t, json);
        }
        ReviewCommand::Expire { older_than } => {
            let age = i64::try_from(older_than.saturating_mul(1000)).unwrap_or(i64::MAX);
            let n = store.expire_reviews(now_ms().saturating_sub(age), now_ms())?;
            println!("expired {n} tickets");
        }
        ReviewCommand::Export => {
            let mut out = std::io::stdout().lock();
            keel::review::export(store.as_ref(), &mut out)?;
        }
        ReviewCommand::Stats { json } => {
            let quality = keel::review::quality(store.as_ref())?;
            if json {
                println!("{}", serde_json::to_string(&quality)?);
            }
            for q in quality.iter().filter(|_| !json) {
                let what = match q.source {
                    keel::store::FeedbackSource::GroundTruth => "accuracy",
                    keel::store::FeedbackSource::Review => "agreement with reviewers",
                };
                println!(
                    "{} {}: {what} {:.4} ({} of {})",
                    q.model,
                    &q.version[..12.min(q.version.len())],
                    q.rate,
                    q.matched,
                    q.labelled
                );
            }
        }
    }
    Ok(())
}

/// `keel feedback REQUEST_ID --label L`: ground truth for a prediction.
pub(crate) fn feedback(store: Option<String>, request_id: &str, label: &str) -> Result<()> {
    let store = open(store)?;
    if !keel::review::add_ground_truth(store.as_ref(), request_id, label)? {
        return Err(format!(
            "no prediction has the request id '{request_id}' in {}",
            store.location()
        )
        .into());
    }
    println!("stored: {request_id} is '{label}'");
    Ok(())
}

/// `keel cost report`: what the recorded predictions cost, per model, version and key.
pub(crate) fn cost_report(store: Option<String>, json: bool) -> Result<()> {
    let store = open(store)?;
    let n = usize::try_from(store.lineage_count()?).unwrap_or(usize::MAX);
    let mut lines: BTreeMap<(String, String, String), (u64, f64)> = BTreeMap::new();
    for row in store.recent_lineage(n)? {
        let Ok(record) = serde_json::from_str::<LineageRecord>(&row.record) else {
            continue;
        };
        let cost = record
            .cost
            .as_ref()
            .and_then(|c| c["cost"].as_f64())
            .unwrap_or(0.0);
        let line = lines
            .entry((record.model, record.version, record.key.unwrap_or_default()))
            .or_default();
        line.0 += 1;
        line.1 += cost;
    }
    let rows: Vec<_> = lines
        .into_iter()
        .map(|((model, version, key), (requests, cost))| {
            json!({"model": model, "version": version, "key": key, "requests": requests, "cost": cost})
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:<16} {:>9} {:>12}",
        "model", "version", "key", "requests", "cost"
    );
    for r in &rows {
        let version = r["version"].as_str().unwrap_or_default();
        println!(
            "{:<24} {:<12} {:<16} {:>9} {:>12.6}",
            r["model"].as_str().unwrap_or_default(),
            &version[..12.min(version.len())],
            r["key"].as_str().unwrap_or_default(),
            r["requests"],
            r["cost"].as_f64().unwrap_or_default()
        );
    }
    Ok(())
}
