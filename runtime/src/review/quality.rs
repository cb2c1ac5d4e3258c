//! What the feedback says: accuracy against ground truth, agreement with reviewers, and the
//! labelled examples to retrain on.

use super::layer::storage;
use crate::store::{self, FeedbackSource, Store};
use crate::version::{LineageRecord, OutputSummary};
use crate::Result;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

/// How often one version's predictions matched the labels of one source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quality {
    /// The model as the predictions named it.
    pub model: String,
    /// The version that predicted.
    pub version: String,
    /// `ground_truth` (its rate is the online accuracy) or `review` (model/reviewer agreement).
    pub source: FeedbackSource,
    /// Labelled predictions.
    pub labelled: u64,
    /// Of those, the ones whose predicted class was the label.
    pub matched: u64,
    /// `matched / labelled`.
    pub rate: f64,
}

/// One labelled prediction, joined with what is known of it.
struct Labelled {
    feedback: store::Feedback,
    model: Option<String>,
    version: Option<String>,
    input: Option<serde_json::Value>,
    prediction: Option<String>,
}

/// Every label with its prediction: from the ticket it resolved, else from the lineage record.
/// A label is for the request's first row (tickets and feedback are per request).
fn labelled(store: &dyn Store) -> Result<Vec<Labelled>> {
    let now = store::now_ms();
    let tickets: HashMap<String, store::Ticket> = store
        .tickets(None, usize::MAX, now)
        .map_err(storage)?
        .into_iter()
        .map(|t| (t.ticket.request_id.clone(), t))
        .collect();
    let first_class = |summary: &OutputSummary| match summary {
        OutputSummary::Classify { classes, .. } => classes.first().cloned(),
        _ => None,
    };
    let mut out = Vec::new();
    for feedback in store.feedback().map_err(storage)? {
        let mut l = Labelled {
            feedback,
            model: None,
            version: None,
            input: None,
            prediction: None,
        };
        if let Some(t) = tickets.get(&l.feedback.request_id) {
            l.model = Some(t.ticket.model.clone());
            l.version = Some(t.ticket.version.clone());
            l.input = serde_json::from_str(&t.ticket.input).ok();
            l.prediction = serde_json::from_str::<OutputSummary>(&t.ticket.output)
                .ok()
                .and_then(|s| first_class(&s));
        } else if let Some(row) = store.lineage(&l.feedback.request_id).map_err(storage)? {
            if let Ok(record) = serde_json::from_str::<LineageRecord>(&row.record) {
                l.model = Some(record.model);
                l.version = Some(record.version);
                l.input = record.input.and_then(|i| serde_json::to_value(i).ok());
                l.prediction = first_class(&record.output);
            }
        }
        out.push(l);
    }
    Ok(out)
}

/// Stores `label` as the ground truth of the prediction `request_id` (feedback: the online
/// accuracy of [`quality`], a row of [`export`]). Returns `false`, storing nothing, when no
/// prediction has that id (neither a lineage record nor a review ticket): a label for nothing
/// would count for no version.
///
/// # Errors
/// [`crate::Error::InvalidArgument`] for an empty id or label; [`crate::ErrorKind::Storage`] if
/// the store fails.
pub fn add_ground_truth(store: &dyn Store, request_id: &str, label: &str) -> Result<bool> {
    let now = store::now_ms();
    let known = store.lineage(request_id).map_err(storage)?.is_some()
        || store
            .tickets(None, usize::MAX, now)
            .map_err(storage)?
            .iter()
            .any(|t| t.ticket.request_id == request_id);
    if known {
        super::layer::feedback(store, request_id, label)?;
    }
    Ok(known)
}

/// Accuracy (ground truth) and agreement (reviewers) per version, from every label in the store
/// whose prediction is known (a ticket, or a lineage record).
///
/// # Errors
/// [`crate::ErrorKind::Storage`] if the store fails.
pub fn quality(store: &dyn Store) -> Result<Vec<Quality>> {
    let mut tally: BTreeMap<(String, String, &'static str), (FeedbackSource, u64, u64)> = BTreeMap::new();
    for l in labelled(store)? {
        let (Some(model), Some(version), Some(prediction)) = (l.model, l.version, l.prediction) else {
            continue;
        };
        let source = l.feedback.source;
        let entry = tally
            .entry((model, version, source.as_str()))
            .or_insert((source, 0, 0));
        entry.1 += 1;
        entry.2 += u64::from(prediction == l.feedback.label);
    }
    Ok(tally
        .into_iter()
        .map(|((model, version, _), (source, labelled, matched))| Quality {
            model,
            version,
            source,
            labelled,
            matched,
            rate: matched as f64 / labelled as f64,
        })
        .collect())
}

/// Writes every label as one JSON object per line, for retraining: `request_id`, `label`,
/// `source`, `reviewer`, `comment`, `time_ms`, `model`, `version`, `input` (from the ticket, or
/// from the lineage record when it kept the input; else null) and `prediction`. Returns how
/// many lines.
///
/// # Errors
/// [`crate::ErrorKind::Storage`] if the store fails; an I/O error of `out` as
/// [`crate::Error::InvalidArgument`].
pub fn export(store: &dyn Store, out: &mut dyn Write) -> Result<usize> {
    let rows = labelled(store)?;
    for l in &rows {
        let line = serde_json::json!({
            "request_id": l.feedback.request_id,
            "label": l.feedback.label,
            "source": l.feedback.source,
            "reviewer": l.feedback.reviewer,
            "comment": l.feedback.comment,
            "time_ms": l.feedback.time_ms,
            "model": l.model,
            "version": l.version,
            "input": l.input,
            "prediction": l.prediction,
        });
        writeln!(out, "{line}")
            .map_err(|e| crate::Error::InvalidArgument(format!("cannot write the export: {e}")))?;
    }
    Ok(rows.len())
}
