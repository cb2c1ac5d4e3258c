//! [`Contracted`]: the layer that checks each request against its version's contract.

use super::{Action, Clause, Contract, ContractViolation, Verdict, Violation};
use crate::{
    Error, ErrorKind, Infer, InferRequest, InferResponse, InferStream, Input, ModelVersion, Result, Target,
    TokenIds,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

/// How often a field broke a clause, and what was done.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ViolationCount {
    /// The field.
    pub field: String,
    /// The clause.
    pub clause: Clause,
    /// What was done.
    pub action: Action,
    /// How many times.
    pub count: u64,
}

type Tally = BTreeMap<(String, Clause, Action), u64>;

/// The contract layer: each request's inputs are checked against the contract in its version's
/// manifest (read once per version); broken clauses refuse, flag or repair as declared. The
/// [`Verdict`] is noted on the request, so that it travels with the answer (review reads it,
/// lineage keeps it). A version without a `[contract]` table passes everything through untouched.
/// Generations are checked before their first token: the prompt by the text rules, the
/// conversation (system turn, history, prompt) by the chat rules.
///
/// ```no_run
/// use keel::stack::Stack;
/// use keel::{Engine, InferRequest, Infer, Record, Value};
/// let engine = Engine::builder().build()?;
/// let mlp = engine.load("examples/models/breast-cancer-mlp")?;
/// let stack = Stack::builder(engine).contract().build()?;
/// let row: Record = [("mean radius".to_string(), Value::Number(99.0))].into();
/// let refused = stack.infer(InferRequest::classify(mlp.as_str(), vec![row]));
/// assert_eq!(refused.unwrap_err().kind(), keel::ErrorKind::Contract);
/// # Ok::<(), keel::Error>(())
/// ```
pub struct Contracted {
    below: Arc<dyn Infer>,
    tally: Arc<Mutex<Tally>>,
}

impl Contracted {
    /// The layer over `below` (the engine itself, or the layers over it).
    pub fn new(below: Arc<dyn Infer>) -> Self {
        Self {
            below,
            tally: Arc::default(),
        }
    }

    /// The contract of a version, if its manifest has one (read once per version).
    ///
    /// # Errors
    /// A `[contract]` table that cannot be read (an error naming the field).
    pub fn contract_of(version: &ModelVersion) -> Result<Option<Arc<Contract>>> {
        let declared = version.derived(|info| match info.manifest.section("contract") {
            Some(table) => Contract::from_table(table)
                .map(|c| Some(Arc::new(c)))
                .map_err(|reason| Error::Manifest {
                    path: info.folder.join(crate::manifest::MANIFEST_FILE),
                    reason,
                }),
            None => Ok(None),
        })?;
        Ok(declared.as_ref().clone())
    }

    /// Checks (and, where a clause says `clamp`, repairs) the request's inputs, counts what
    /// broke, and gives the verdict. Nothing is run.
    ///
    /// # Errors
    /// [`ErrorKind::Contract`] for the first clause with action `reject` that an input broke
    /// (its source is a [`ContractViolation`]: field, clause, value); a request whose model was
    /// not resolved.
    pub fn check(&self, request: &mut InferRequest) -> Result<Verdict> {
        let started = Instant::now();
        let version = request.target()?.version.clone();
        let Some(contract) = Self::contract_of(&version)? else {
            return Ok(Verdict::default());
        };
        let mut found = Vec::new();
        let count = |t: &str| version.count_tokens(t).ok();
        let checked = match &mut request.input {
            Input::Classify(rows) => {
                let now = SystemTime::now();
                rows.iter_mut()
                    .enumerate()
                    .try_for_each(|(i, row)| contract.check_row(i, row, now, &mut found))
            }
            Input::Embed(texts) => {
                // The ids counted are handed down: the engine does not tokenize the texts again.
                let mut ids = Vec::new();
                let checked = texts.iter().enumerate().try_for_each(|(i, text)| {
                    let encode = |t: &str| {
                        let e = version.encode(t).ok()?;
                        let n = e.len();
                        ids.push(e);
                        Some(n)
                    };
                    contract.check_text(i, text, encode, &mut found)
                });
                if ids.len() == texts.len() {
                    request.notes.insert(TokenIds {
                        version: version.id().clone(),
                        ids,
                    });
                }
                checked
            }
            Input::Generate { prompt, params } => {
                let mut roles = Vec::with_capacity(2 + 2 * params.history.len());
                if params.chat {
                    roles.extend(params.system.as_ref().map(|_| "system"));
                    roles.extend(params.history.iter().flat_map(|_| ["user", "assistant"]));
                }
                roles.push("user");
                let total = || version.prompt_tokens(prompt, params).ok();
                contract
                    .check_text(0, prompt, count, &mut found)
                    .and_then(|()| contract.check_chat(&roles, total, &mut found))
            }
        };
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let mut counted =
            |v: &Violation| *tally.entry((v.field.clone(), v.clause, v.action)).or_default() += 1;
        found.iter().for_each(&mut counted);
        if let Err(refused) = checked {
            counted(&refused.0);
            return Err(refused.into());
        }
        Ok(Verdict {
            contract: contract.hash().to_string(),
            violations: found,
            took: started.elapsed(),
        })
    }

    /// How often each field broke each clause, since the layer started.
    pub fn violations(&self) -> Vec<ViolationCount> {
        tally_of(&self.tally)
    }

    /// Checks the request and notes the verdict on it.
    fn checked(&self, mut request: InferRequest) -> Result<InferRequest> {
        let verdict = tracing::info_span!("keel.contract").in_scope(|| self.check(&mut request))?;
        if !verdict.contract.is_empty() {
            request.notes.insert(verdict);
        }
        Ok(request)
    }
}

fn tally_of(tally: &Mutex<Tally>) -> Vec<ViolationCount> {
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    tally
        .iter()
        .map(|((field, clause, action), count)| ViolationCount {
            field: field.clone(),
            clause: *clause,
            action: *action,
            count: *count,
        })
        .collect()
}

#[cfg(feature = "observe")]
impl Contracted {
    /// Registers the violation tally (`keel_contract_violations_total` by field, clause and
    /// action, read at each export) in the stack's metrics.
    pub fn register(&self, metrics: &mut crate::observe::MetricsBuilder) {
        use crate::observe::Sample;
        let tally = self.tally.clone();
        metrics.samples(move || {
            tally_of(&tally)
                .into_iter()
                .map(|v| Sample {
                    name: "contract_violations",
                    help: "Inputs that broke a contract clause, by field, clause and action",
                    counter: true,
                    labels: vec![
                        ("field", v.field),
                        ("clause", v.clause.as_str().into()),
                        ("action", v.action.as_str().into()),
                    ],
                    value: v.count as f64,
                })
                .collect()
        });
    }
}

impl From<ContractViolation> for Error {
    fn from(v: ContractViolation) -> Self {
        Error::Refused {
            kind: ErrorKind::Contract,
            source: Box::new(v),
        }
    }
}

impl Infer for Contracted {
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    /// Checks the request, then answers it from the layer below.
    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        self.below.infer(self.checked(request)?)
    }

    /// Checks the prompt and the conversation, then streams from the layer below.
    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        self.below.infer_stream(self.checked(request)?)
    }
}
