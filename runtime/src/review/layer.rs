//! [`Reviewed`]: the layer that applies each version's review policy.

use super::{Decision, Observation, Policy};
use crate::store::{self, Feedback, FeedbackSource, NewTicket, Store, Ticket, TicketState};
use crate::version::{OutputSummary, RecordedInput};
use crate::{
    Error, ErrorKind, Generating, Infer, InferRequest, InferResponse, InferStream, Input, ModelVersion, Note,
    Notes, Received, Record, Replayed, Result, Step, Target,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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

/// The review policy's decision on an answer: noted on it (lineage keeps it).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Judgement {
    /// What the policy decided.
    pub decision: Decision,
    /// The review ticket, when the prediction was queued for a reviewer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<i64>,
    /// The rules that matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

impl Note for Judgement {
    fn key(&self) -> &'static str {
        "review"
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

type Decisions = Arc<Mutex<BTreeMap<(String, Decision), u64>>>;

/// The review layer: after the layers below answer, the version's `[review]` policy judges
/// the answer; a prediction it sends to review (or blocks) gets a ticket in the store's review
/// queue, with its input and output for the reviewer. Every answer carries the [`Judgement`].
/// A generation is judged when it ends: a policy that may refuse it holds its tokens until
/// then (a held or blocked reply streams nothing and is refused with its ticket); a provisional
/// one streams it and marks the answer with its ticket. A version without a `[review]` table
/// passes through.
///
/// Put it under the version layer (so that lineage records the decision) and over the cost,
/// observability and contract layers (whose notes its rules read).
pub struct Reviewed {
    store: Arc<dyn Store>,
    below: Arc<dyn Infer>,
    decisions: Decisions,
}

/// What is needed to judge a request's answer, taken before the request goes down.
struct Pending {
    policy: Arc<Policy>,
    request_id: String,
    /// The input as it came (a ticket records it; `input.FIELD` rules read its rows): the
    /// stack's shared copy when the layer above made one.
    input: Arc<Input>,
    name: String,
    store: Arc<dyn Store>,
    decisions: Decisions,
}

impl Reviewed {
    /// The layer over `below`, queueing into `store`.
    pub fn new(store: Arc<dyn Store>, below: Arc<dyn Infer>) -> Self {
        Self {
            store,
            below,
            decisions: Arc::default(),
        }
    }

    /// The store the queue is in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The policy of a version, if its manifest has one (read once per version).
    ///
    /// # Errors
    /// A `[review]` table that cannot be read (the error names the rule).
    pub fn policy_of(version: &ModelVersion) -> Result<Option<Arc<Policy>>> {
        let policy = version.derived(|info| match info.manifest.section("review") {
            Some(table) => Policy::from_table(table)
                .map(|p| Some(Arc::new(p)))
                .map_err(|reason| Error::Manifest {
                    path: info.folder.join(crate::manifest::MANIFEST_FILE),
                    reason,
                }),
            None => Ok(None),
        })?;
        Ok(policy.as_ref().clone())
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

    /// What judging the request's answer needs (None: no policy applies). A policy with a rule
    /// over token log-probabilities asks the generation for them.
    fn pending_of(&self, request: &mut InferRequest) -> Result<Option<Pending>> {
        // A shadow copy or a replay is not a prediction anyone acts on: nothing to review.
        if request.purpose != crate::Purpose::Serve {
            return Ok(None);
        }
        let target = request.target()?;
        let Some(policy) = Self::policy_of(&target.version)? else {
            return Ok(None);
        };
        let name = target.name.clone();
        if let (Input::Generate { params, .. }, true) = (&mut request.input, policy.needs_logprobs()) {
            params.logprobs = true;
        }
        Ok(Some(Pending {
            request_id: request.id.to_string(),
            input: match request.notes.get::<Received>() {
                Some(Received(input)) => input.clone(),
                None => Arc::new(request.input.clone()),
            },
            name,
            policy,
            store: self.store.clone(),
            decisions: self.decisions.clone(),
        }))
    }
}

/// The signals the policy reads from the notes of the layers below: whether the contract
/// flagged or repaired an input, the drift state, the price.
#[allow(unused_variables)] // without the contract, observe and cost features, no note is read
fn signals(notes: &Notes) -> (bool, Option<&'static str>, Option<f64>) {
    #[cfg(feature = "contract")]
    let flagged = notes
        .get::<crate::contract::Verdict>()
        .is_some_and(|v| !v.passed());
    #[cfg(not(feature = "contract"))]
    let flagged = false;
    #[cfg(feature = "observe")]
    let drift = notes.get::<crate::observe::State>().map(|s| s.as_str());
    #[cfg(not(feature = "observe"))]
    let drift = None;
    #[cfg(feature = "cost")]
    let cost = notes.get::<crate::cost::Price>().map(|p| p.cost);
    #[cfg(not(feature = "cost"))]
    let cost = None;
    (flagged, drift, cost)
}

impl Pending {
    /// Judges an answer: counts the decision, queues a ticket unless it is `auto`, refuses a
    /// blocked or held prediction with its ticket, notes the judgement on a served one.
    fn judge(self, answer: Result<InferResponse>) -> Result<InferResponse> {
        let mut answer = answer?;
        let (contract_flagged, drift, cost) = signals(&answer.meta.notes);
        let rows: &[Record] = match self.input.as_ref() {
            Input::Classify(rows) => rows,
            _ => &[],
        };
        let verdict = self.policy.judge(&Observation {
            rows,
            output: Some(&answer.output),
            contract_flagged,
            drift,
            cost,
        });
        *self
            .decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((self.name.clone(), verdict.decision))
            .or_default() += 1;
        let mut ticket = None;
        if verdict.decision != Decision::Auto {
            let queued = self
                .store
                .enqueue_review(&NewTicket {
                    request_id: self.request_id,
                    model: self.name,
                    version: answer.meta.version.to_string(),
                    decision: verdict.decision.as_str().into(),
                    reasons: serde_json::to_string(&verdict.reasons).unwrap_or_default(),
                    input: serde_json::to_string(&RecordedInput::of(&self.input)).unwrap_or_default(),
                    output: serde_json::to_string(&OutputSummary::of(&answer.output)).unwrap_or_default(),
                    created_ms: store::now_ms(),
                })
                .map_err(storage)?;
            let reasons = verdict.reasons.clone();
            match verdict.decision {
                Decision::Block => {
                    return Err(ReviewError::Blocked {
                        ticket: queued,
                        reasons,
                    }
                    .into())
                }
                Decision::Review if !self.policy.provisional => {
                    return Err(ReviewError::Held {
                        ticket: queued,
                        reasons,
                    }
                    .into())
                }
                _ => ticket = Some(queued),
            }
        }
        answer.meta.notes.insert(Judgement {
            decision: verdict.decision,
            ticket,
            reasons: verdict.reasons,
        });
        Ok(answer)
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
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    /// Answers from the layer below, then judges the answer by the version's policy.
    fn infer(&self, mut request: InferRequest) -> Result<InferResponse> {
        match self.pending_of(&mut request)? {
            None => self.below.infer(request),
            Some(pending) => pending.judge(self.below.infer(request)),
        }
    }

    /// Streams from the layer below and judges the reply when it ends; under a policy that may
    /// refuse it, nothing is given out before the judgement.
    fn infer_stream(&self, mut request: InferRequest) -> Result<InferStream> {
        let Some(pending) = self.pending_of(&mut request)? else {
            return self.below.infer_stream(request);
        };
        let inner = self.below.infer_stream(request)?;
        let meta = inner.meta().clone();
        if pending.policy.may_refuse() {
            let mut held = Replayed::run(inner);
            held.map_end(|end| pending.judge(end));
            return Ok(InferStream::new(meta, held));
        }
        Ok(InferStream::new(
            meta,
            Judging {
                inner,
                pending: Some(pending),
            },
        ))
    }
}

/// A generation streamed as it is made, judged when it ends.
struct Judging {
    inner: InferStream,
    pending: Option<Pending>,
}

impl Generating for Judging {
    fn step(&mut self) -> Step {
        match (self.inner.step(), self.pending.take()) {
            (Step::End(end), Some(pending)) => Step::End(pending.judge(end)),
            (step, pending) => {
                self.pending = pending;
                step
            }
        }
    }

    /// A reply the caller let go of before its end is not a prediction anyone acts on: it is
    /// not judged.
    fn cancel(self: Box<Self>) -> Result<InferResponse> {
        self.inner.cancel()
    }
}

#[cfg(feature = "observe")]
impl Reviewed {
    /// Registers, in the stack's metrics, the decisions, the pending queue, and the feedback's
    /// accuracy and agreement (`keel_review_decisions_total` by model and decision,
    /// `keel_review_pending`, `keel_feedback_match_rate` and `keel_feedback_labelled` by model,
    /// version and source), computed from the store at each export.
    pub fn register(&self, metrics: &mut crate::observe::MetricsBuilder) {
        use crate::observe::Sample;
        let (decisions, store) = (self.decisions.clone(), self.store.clone());
        metrics.samples(move || {
            let mut out: Vec<Sample> = decisions
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
            if let Ok(pending) = store.tickets(Some(TicketState::Pending), usize::MAX, store::now_ms()) {
                out.push(Sample {
                    name: "review_pending",
                    help: "Tickets waiting for a reviewer",
                    counter: false,
                    labels: Vec::new(),
                    value: pending.len() as f64,
                });
            }
            for q in super::quality(store.as_ref()).unwrap_or_default() {
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
        });
    }
}
