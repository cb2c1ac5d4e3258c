//! [`Reviewed`]: the layer that applies each version's review policy.

use super::{Decision, Observation, Policy, Verdict};
use crate::store::{self, Feedback, FeedbackSource, NewTicket, Store, Ticket, TicketState};
use crate::version::{OutputSummary, RecordedInput};
use crate::{Engine, Error, ErrorKind, Infer, InferRequest, InferResponse, Input, Result, VersionId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// Why the review layer did not serve a prediction.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReviewError {
    /// A rule with action `block` matched: refused, and queued for a reviewer's label.
    #[error("blocked by the review policy ({}); ticket {ticket}", reasons.join("; "))]
    Blocked {
        /// The review ticket.
        ticket: i64,
        /// The rules that matched.
        reasons: Vec<String>,
    },
    /// Sent to review by a policy that serves nothing before the reviewer's label.
    #[error("held for review ({}); ticket {ticket}", reasons.join("; "))]
    Held {
        /// The review ticket.
        ticket: i64,
        /// The rules that matched.
        reasons: Vec<String>,
    },
}

impl ReviewError {
    /// The ticket it names.
    pub fn ticket(&self) -> i64 {
        match self {
            ReviewError::Blocked { ticket, .. } | ReviewError::Held { ticket, .. } => *ticket,
        }
    }
}

impl From<ReviewError> for Error {
    fn from(e: ReviewError) -> Self {
        Error::Refused {
            kind: ErrorKind::Review,
            source: Box::new(e),
        }
    }
}

/// The review layer: after the layers below answer, the version's `[review]` policy judges
/// the answer; a prediction it sends to review (or blocks) gets a ticket in the store's review
/// queue, with its input and output for the reviewer. Every answer carries the decision in
/// `meta.annotations["review"]` (JSON: `decision`, and `ticket` and `reasons` when queued),
/// which the lineage record keeps. A version without a `[review]` table passes through.
///
/// Put it under the version layer (so that lineage records the decision) and over the cost,
/// observability and contract layers (whose annotations its rules read).
pub struct Reviewed {
    engine: Engine,
    store: Arc<dyn Store>,
    below: Arc<dyn Infer>,
    policies: RwLock<HashMap<VersionId, Option<Arc<Policy>>>>,
    decisions: Mutex<BTreeMap<(String, Decision), u64>>,
    names: RwLock<HashMap<VersionId, String>>,
}

impl Reviewed {
    /// The layer over `below`, queueing into `store`; versions are looked up in `engine`.
    pub fn new(engine: Engine, store: Arc<dyn Store>, below: Arc<dyn Infer>) -> Self {
        Self {
            engine,
            store,
            below,
            policies: RwLock::default(),
            decisions: Mutex::default(),
            names: RwLock::default(),
        }
    }

    /// The store the queue is in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The policy of the version `model` names now, if its manifest has one.
    ///
    /// # Errors
    /// An unknown model; a `[review]` table that cannot be read (the error names the rule).
    pub fn policy_of(&self, model: &str) -> Result<Option<Arc<Policy>>> {
        let id = self.engine.version_of(model)?;
        if let Some(p) = self.policies.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(p.clone());
        }
        let info = self.engine.info(id.as_str())?;
        let policy = match info.manifest.section("review") {
            Some(table) => Some(Arc::new(Policy::from_table(table).map_err(|reason| {
                Error::Manifest {
                    path: info.folder.join(crate::manifest::MANIFEST_FILE),
                    reason,
                }
            })?)),
            None => None,
        };
        let mut map = self.policies.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|id, _| self.engine.version_of(id.as_str()).is_ok());
        map.insert(id, policy.clone());
        Ok(policy)
    }

    /// The name a version is registered under in the store (what lineage records), else its
    /// manifest's name: below the version layer a request names a version id.
    fn name_of(&self, version: &VersionId, addressed: &str) -> String {
        if let Some(name) = self.names.read().unwrap_or_else(|p| p.into_inner()).get(version) {
            return name.clone();
        }
        let registered = self
            .store
            .versions()
            .ok()
            .and_then(|all| all.into_iter().find(|v| &v.id == version).map(|v| v.name));
        let name = registered.unwrap_or_else(|| {
            self.engine
                .info(version.as_str())
                .map_or_else(|_| addressed.to_string(), |i| i.manifest.name)
        });
        self.names
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(version.clone(), name.clone());
        name
    }

    /// Reports the true label of a prediction that arrived later (ground truth).
    ///
    /// # Errors
    /// [`ErrorKind::Storage`] if the store fails; an empty label or request id.
    pub fn feedback(&self, request_id: &str, label: &str) -> Result<()> {
        feedback(self.store.as_ref(), request_id, label)
    }

    /// The tickets waiting for a reviewer, oldest first.
    ///
    /// # Errors
    /// [`ErrorKind::Storage`] if the store fails.
    pub fn pending(&self, limit: usize) -> Result<Vec<Ticket>> {
        self.store
            .tickets(Some(TicketState::Pending), limit, store::now_ms())
            .map_err(storage)
    }
}

/// Stores ground truth for a prediction.
pub(super) fn feedback(store: &dyn Store, request_id: &str, label: &str) -> Result<()> {
    if request_id.is_empty() || label.is_empty() {
        return Err(Error::InvalidArgument(
            "feedback needs a request id and a label".into(),
        ));
    }
    store
        .add_feedback(&Feedback {
            request_id: request_id.to_string(),
            label: label.to_string(),
            source: FeedbackSource::GroundTruth,
            reviewer: None,
            comment: None,
            ticket: None,
            time_ms: store::now_ms(),
        })
        .map_err(storage)
}

pub(super) fn storage(e: store::Error) -> Error {
    Error::Refused {
        kind: ErrorKind::Storage,
        source: Box::new(e),
    }
}

impl Infer for Reviewed {
    /// Answers from the layer below, then judges the answer by the version's policy.
    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        // A shadow copy or a replay is not a prediction anyone acts on: nothing to review.
        if request.purpose != crate::Purpose::Serve {
            return self.below.infer(request);
        }
        let Some(policy) = self.policy_of(&request.model)? else {
            return self.below.infer(request);
        };
        let recorded = RecordedInput::of(&request.input);
        let rows = match &request.input {
            Input::Classify(rows) => rows.clone(),
            _ => Vec::new(),
        };
        let request_id = request.id.to_string();
        let mut answer = self.below.infer(request)?;
        let notes = &answer.meta.annotations;
        let contract_flagged = notes
            .get("contract")
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .is_some_and(|v| v["violations"].as_array().is_some_and(|a| !a.is_empty()));
        let cost = notes
            .get("cost")
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .and_then(|v| v["cost"].as_f64());
        let verdict: Verdict = policy.judge(&Observation {
            rows: &rows,
            output: Some(&answer.output),
            contract_flagged,
            drift: notes.get("drift").map(String::as_str),
            cost,
        });
        let model_name = self.name_of(&answer.meta.version, &answer.meta.model);
        *self
            .decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((model_name.clone(), verdict.decision))
            .or_default() += 1;
        let mut note = serde_json::json!({"decision": verdict.decision.as_str()});
        if verdict.decision != Decision::Auto {
            let ticket = self
                .store
                .enqueue_review(&NewTicket {
                    request_id,
                    // Below the version layer a request names a version id: the ticket
                    // names the model.
                    model: model_name,
                    version: answer.meta.version.to_string(),
                    decision: verdict.decision.as_str().into(),
                    reasons: serde_json::to_string(&verdict.reasons).unwrap_or_default(),
                    input: serde_json::to_string(&recorded).unwrap_or_default(),
                    output: serde_json::to_string(&OutputSummary::of(&answer.output)).unwrap_or_default(),
                    created_ms: store::now_ms(),
                })
                .map_err(storage)?;
            let reasons = verdict.reasons.clone();
            match verdict.decision {
                Decision::Block => return Err(ReviewError::Blocked { ticket, reasons }.into()),
                Decision::Review if !policy.provisional => {
                    return Err(ReviewError::Held { ticket, reasons }.into())
                }
                _ => {}
            }
            note["ticket"] = ticket.into();
            note["reasons"] = verdict.reasons.into();
        }
        answer.meta.annotations.insert("review".into(), note.to_string());
        Ok(answer)
    }
}

#[cfg(feature = "observe")]
impl Reviewed {
    /// Decisions, the pending queue, and the feedback's accuracy and agreement as metrics
    /// (`keel_review_decisions_total` by model and decision, `keel_review_pending`,
    /// `keel_feedback_match_rate` and `keel_feedback_labelled` by model, version and source),
    /// for [`crate::observe::Observed::add_samples`]. The feedback figures are computed from
    /// the store at each export.
    pub fn samples(&self) -> Vec<crate::observe::Sample> {
        use crate::observe::Sample;
        let mut out: Vec<Sample> = self
            .decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((model, decision), n)| Sample {
                name: "review_decisions",
                help: "Predictions judged by the review policy, by decision",
                counter: true,
                labels: vec![("model", model.clone()), ("decision", decision.as_str().into())],
                value: *n as f64,
            })
            .collect();
        if let Ok(pending) = self
            .store
            .tickets(Some(TicketState::Pending), usize::MAX, store::now_ms())
        {
            out.push(Sample {
                name: "review_pending",
                help: "Tickets waiting for a reviewer",
                counter: false,
                labels: Vec::new(),
                value: pending.len() as f64,
            });
        }
        for q in super::quality(self.store.as_ref()).unwrap_or_default() {
            let labels = vec![
                ("model", q.model.clone()),
                ("version", q.version.chars().take(12).collect()),
                ("source", q.source.as_str().into()),
            ];
            out.push(Sample {
                name: "feedback_match_rate",
                help: "Share of labelled predictions whose class was the label: accuracy (ground_truth), agreement (review)",
                counter: false,
                labels: labels.clone(),
                value: q.rate,
            });
            out.push(Sample {
                name: "feedback_labelled",
                help: "Labelled predictions",
                counter: false,
                labels,
                value: q.labelled as f64,
            });
        }
        out
    }
}
