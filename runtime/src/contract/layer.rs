//! [`Contracted`]: the layer that checks each request against its version's contract.

use super::{Action, Clause, Contract, ContractViolation, Verdict, Violation};
use crate::{Engine, Error, ErrorKind, Infer, InferRequest, InferResponse, Input, Result, VersionId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
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
/// manifest (read once per version); broken clauses refuse, flag or repair as declared. Served
/// responses carry the verdict in `meta.annotations["contract"]` (JSON, which the lineage record
/// keeps) and the check's time in `annotations["contract_us"]`. A version without a
/// `[contract]` table passes everything through untouched.
///
/// ```no_run
/// use keel::contract::Contracted;
/// use keel::{Engine, InferRequest, Record, Value};
/// use std::sync::Arc;
/// let engine = Engine::builder().build()?;
/// let mlp = engine.load("examples/models/breast-cancer-mlp")?;
/// let layer = Contracted::new(engine.clone(), Arc::new(engine.clone()));
/// let row: Record = [("mean radius".to_string(), Value::Number(99.0))].into();
/// let refused = layer.check(&mut InferRequest::classify(mlp.as_str(), vec![row]));
/// assert_eq!(refused.unwrap_err().kind(), keel::ErrorKind::Contract);
/// # Ok::<(), keel::Error>(())
/// ```
pub struct Contracted {
    engine: Engine,
    below: Arc<dyn Infer>,
    contracts: RwLock<HashMap<VersionId, Option<Arc<Contract>>>>,
    tally: Mutex<Tally>,
}

impl Contracted {
    /// The layer over `below` (the engine itself, or the layers over it); versions are looked
    /// up in `engine`.
    pub fn new(engine: Engine, below: Arc<dyn Infer>) -> Self {
        Self {
            engine,
            below,
            contracts: RwLock::default(),
            tally: Mutex::default(),
        }
    }

    /// The contract of the version `model` names now, if its manifest has one.
    ///
    /// # Errors
    /// An unknown model; a `[contract]` table that cannot be read (an error naming the field).
    pub fn contract_of(&self, model: &str) -> Result<Option<Arc<Contract>>> {
        let id = self.engine.version_of(model)?;
        if let Some(c) = self.contracts.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(c.clone());
        }
        let info = self.engine.info(id.as_str())?;
        let contract = match info.manifest.section("contract") {
            Some(table) => Some(Arc::new(Contract::from_table(table).map_err(|reason| {
                Error::Manifest {
                    path: info.folder.join(crate::manifest::MANIFEST_FILE),
                    reason,
                }
            })?)),
            None => None,
        };
        let mut map = self.contracts.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|id, _| self.engine.version_of(id.as_str()).is_ok());
        map.insert(id, contract.clone());
        Ok(contract)
    }

    /// Checks (and, where a clause says `clamp`, repairs) the request's inputs, counts what
    /// broke, and gives the verdict. Nothing is run.
    ///
    /// # Errors
    /// [`ErrorKind::Contract`] for the first clause with action `reject` that an input broke
    /// (its source is a [`ContractViolation`]: field, clause, value); an unknown model.
    pub fn check(&self, request: &mut InferRequest) -> Result<Verdict> {
        let Some(contract) = self.contract_of(&request.model)? else {
            return Ok(Verdict::default());
        };
        let mut found = Vec::new();
        let checked = match &mut request.input {
            Input::Classify(rows) => {
                let now = SystemTime::now();
                rows.iter_mut()
                    .enumerate()
                    .try_for_each(|(i, row)| contract.check_row(i, row, now, &mut found))
            }
            Input::Embed(texts) => texts.iter().enumerate().try_for_each(|(i, text)| {
                let count = |t: &str| self.engine.count_tokens(&request.model, t).ok();
                contract.check_text(i, text, count, &mut found)
            }),
            Input::Generate { prompt, .. } => {
                let count = |t: &str| self.engine.count_tokens(&request.model, t).ok();
                contract.check_text(0, prompt, count, &mut found)
            }
        };
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let mut count = |v: &Violation| *tally.entry((v.field.clone(), v.clause, v.action)).or_default() += 1;
        found.iter().for_each(&mut count);
        if let Err(refused) = checked {
            count(&refused.0);
            return Err(refused.into());
        }
        Ok(Verdict {
            contract: contract.hash().to_string(),
            violations: found,
        })
    }

    /// How often each field broke each clause, since the layer started.
    pub fn violations(&self) -> Vec<ViolationCount> {
        let tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
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
    /// Checks the request, then answers it from the layer below, with the verdict annotated.
    fn infer(&self, mut request: InferRequest) -> Result<InferResponse> {
        let started = Instant::now();
        let verdict = tracing::info_span!("keel.contract").in_scope(|| self.check(&mut request))?;
        let took = started.elapsed();
        let mut answer = self.below.infer(request)?;
        if !verdict.contract.is_empty() {
            let notes = &mut answer.meta.annotations;
            notes.insert(
                "contract".into(),
                serde_json::to_string(&verdict).unwrap_or_default(),
            );
            notes.insert("contract_us".into(), took.as_micros().to_string());
        }
        Ok(answer)
    }
}
