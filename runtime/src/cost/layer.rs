//! [`Costed`]: the layer that prices every request and enforces the budgets.

use super::budget::Reservation;
use super::{Budget, Budgets, CostModel, Exhausted, Spend};
use crate::{
    Error, Generating, Infer, InferRequest, InferResponse, InferStream, Input, ModelVersion, Note, Result,
    Step, Target,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one (model, version, key) has cost so far in this process.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CostLine {
    /// The model's name.
    pub model: String,
    /// The version that answered.
    pub version: String,
    /// The routing key ("" for none).
    pub key: String,
    /// Requests answered.
    pub requests: u64,
    /// Tokens run.
    pub tokens: u64,
    /// What they cost.
    pub cost: f64,
}

/// What a request cost: noted on its answer (lineage keeps it; the review policy's `cost`
/// signal reads it).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Price {
    /// The cost, in the manifest's unit.
    pub cost: f64,
    /// The routing key charged ("" for none).
    pub key: String,
    /// The tokens priced (a generation's prompt and completion).
    pub tokens: usize,
    /// The model the caller asked for, when its budget sent the request to a cheaper one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downgraded_from: Option<String>,
}

impl Note for Price {
    fn key(&self) -> &'static str {
        "cost"
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

type Totals = Arc<Mutex<BTreeMap<(String, String, String), CostLine>>>;

/// The cost layer: every answered request is priced by its version's `[cost]` table (an answer
/// of the response cache costs nothing; a generation is priced per token, its prompt and what
/// it generated) and the [`Price`] noted on the answer; requests with a routing key that has a
/// [`Budget`] reserve their worst case first (a generation: its prompt and `max_tokens`), so
/// that concurrent requests can never spend more than the budget. A stream is charged what it
/// ran when it ends, fails or is cancelled. A version without `[cost]` costs nothing.
///
/// Put it under the version and review layers (lineage keeps the price; review rules read it).
pub struct Costed {
    below: Arc<dyn Infer>,
    budgets: Budgets,
    totals: Totals,
}

/// What a request admitted by its budget will be charged by.
struct Charge {
    price: CostModel,
    reservation: Reservation,
    key: String,
    name: String,
    downgraded_from: Option<String>,
    totals: Totals,
}

impl Costed {
    /// The layer over `below`.
    pub fn new(below: Arc<dyn Infer>) -> Self {
        Self {
            below,
            budgets: Budgets::default(),
            totals: Arc::default(),
        }
    }

    /// The layer over `below`, with the budgets of `store` (shared by every process on it)
    /// rather than this process's.
    #[cfg(feature = "store")]
    pub fn with_stored_budgets(below: Arc<dyn Infer>, store: Arc<dyn crate::store::Store>) -> Self {
        Self {
            budgets: Budgets::stored(store),
            ..Self::new(below)
        }
    }

    /// Sets a routing key's budget.
    ///
    /// # Errors
    /// The store's, for stored budgets.
    pub fn set_budget(&self, key: &str, budget: Budget) -> Result<()> {
        self.budgets.set(key, budget)
    }

    /// Where a key's budget stands.
    ///
    /// # Errors
    /// The store's, for stored budgets.
    pub fn spend(&self, key: &str) -> Result<Option<Spend>> {
        self.budgets.spend(key)
    }

    /// Every key's budget and where it stands, by key.
    ///
    /// # Errors
    /// The store's, for stored budgets.
    pub fn budgets(&self) -> Result<Vec<(String, Spend)>> {
        self.budgets.all()
    }

    /// What every (model, version, key) has cost in this process.
    pub fn report(&self) -> Vec<CostLine> {
        report(&self.totals)
    }

    /// The price list of a version (read once per version).
    ///
    /// # Errors
    /// A `[cost]` table that cannot be read.
    pub fn price_of(version: &ModelVersion) -> Result<CostModel> {
        let price = version.derived(|info| match info.manifest.section("cost") {
            Some(table) => CostModel::from_table(table).map_err(|reason| Error::Manifest {
                path: info.folder.join(crate::manifest::MANIFEST_FILE),
                reason,
            }),
            None => Ok(CostModel::default()),
        })?;
        Ok(*price)
    }

    /// The request's price list and the most it can cost: a generation's prompt counted
    /// exactly (after the chat template) plus its `max_tokens`; other inputs estimated from
    /// their bytes.
    fn worst_case(request: &InferRequest) -> Result<(CostModel, f64)> {
        let version = &request.target()?.version;
        let price = Self::price_of(version)?;
        let worst = match &request.input {
            Input::Generate { prompt, params } => match version.prompt_tokens(prompt, params) {
                Ok(n) => price.worst_case_of(n + params.max_tokens),
                Err(_) => price.worst_case(&request.input, None),
            },
            input => price.worst_case(input, version.manifest().max_tokens),
        };
        Ok((price, worst))
    }

    /// Reserves the request's worst case against its key's budget, downgrading it to a cheaper
    /// model or refusing it as the budget says when it cannot pay.
    fn admit(&self, mut request: InferRequest) -> Result<(InferRequest, Charge)> {
        let key = request.key.clone().unwrap_or_default();
        let (mut price, worst) = Self::worst_case(&request)?;
        let mut downgraded_from = None;
        // The version layer's own runs (shadow copies, replays) are priced but not the caller's
        // to pay: no budget is asked.
        let reserved = if request.purpose == crate::Purpose::Serve {
            self.budgets.reserve(&key, worst)?
        } else {
            Ok(self.budgets.unpaid())
        };
        let reservation = match reserved {
            Ok(r) => r,
            Err(refusal) => match &refusal.on_exhausted {
                Exhausted::Downgrade(cheaper) if *cheaper != request.model => {
                    let target = self.below.target(cheaper)?;
                    request.model = target.version.id().to_string();
                    downgraded_from = request.target.replace(target).map(|t| t.name);
                    let (cheap_price, cheap_worst) = Self::worst_case(&request)?;
                    price = cheap_price;
                    self.budgets.reserve(&key, cheap_worst)??
                }
                _ => return Err(refusal.into()),
            },
        };
        let charge = Charge {
            price,
            reservation,
            key,
            name: request.target()?.name.clone(),
            downgraded_from,
            totals: self.totals.clone(),
        };
        Ok((request, charge))
    }
}

impl Charge {
    /// Charges what `tokens` tokens and `forward` of compute cost (nothing for an answer of
    /// the response cache) and returns the price.
    fn settle(self, tokens: usize, forward: Duration, cache_hit: bool, version: &str) -> Result<Price> {
        let cost = if cache_hit {
            0.0
        } else {
            self.price.cost(tokens, forward)
        };
        self.reservation.settle(cost)?;
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let line = totals
            .entry((self.name.clone(), version.to_string(), self.key.clone()))
            .or_insert_with(|| CostLine {
                model: self.name,
                version: version.to_string(),
                key: self.key.clone(),
                requests: 0,
                tokens: 0,
                cost: 0.0,
            });
        line.requests += 1;
        line.tokens += tokens as u64;
        line.cost += cost;
        Ok(Price {
            cost,
            key: self.key,
            tokens,
            downgraded_from: self.downgraded_from,
        })
    }

    /// Charges an answer and notes its price on it; an answer whose charge the store cannot
    /// record is refused ([`crate::ErrorKind::Storage`]).
    fn answer(self, mut answer: InferResponse) -> Result<InferResponse> {
        let m = &answer.meta;
        let price = self.settle(m.tokens, m.timings.forward, m.cache_hit, m.version.as_ref())?;
        answer.meta.notes.insert(price);
        Ok(answer)
    }
}

fn report(totals: &Totals) -> Vec<CostLine> {
    totals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect()
}

impl Infer for Costed {
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    /// Reserves the request's worst case against its key's budget (downgrading or refusing as
    /// the budget says when it cannot pay), answers it from the layer below, and charges it.
    /// A request that fails is charged nothing.
    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        let (request, charge) = self.admit(request)?;
        charge.answer(self.below.infer(request)?)
    }

    /// Reserves the generation's worst case (its prompt and `max_tokens`) before its first
    /// token, and charges what it ran when it ends, fails or is cancelled.
    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        let (request, charge) = self.admit(request)?;
        let inner = self.below.infer_stream(request)?;
        let meta = inner.meta().clone();
        Ok(InferStream::new(
            meta.clone(),
            Charging {
                prompt_tokens: meta.tokens,
                version: meta.version.to_string(),
                generated: 0,
                charge: Some(charge),
                inner,
            },
        ))
    }
}

/// A generation as the cost layer charges it.
struct Charging {
    inner: InferStream,
    charge: Option<Charge>,
    prompt_tokens: usize,
    generated: usize,
    version: String,
}

impl Generating for Charging {
    fn step(&mut self) -> Step {
        match self.inner.step() {
            Step::Token(t) => {
                self.generated += 1;
                Step::Token(t)
            }
            Step::End(end) => {
                let Some(charge) = self.charge.take() else {
                    return Step::End(end);
                };
                Step::End(match end {
                    Ok(answer) => charge.answer(answer),
                    Err(e) => {
                        // A failure after tokens were made is charged what was made.
                        let _ = charge.settle(
                            self.prompt_tokens + self.generated,
                            Duration::ZERO,
                            false,
                            &self.version,
                        );
                        Err(e)
                    }
                })
            }
        }
    }

    fn cancel(mut self: Box<Self>) -> Result<InferResponse> {
        let partial = self.inner.cancel()?;
        Ok(match self.charge.take() {
            Some(charge) => charge.answer(partial)?,
            None => partial,
        })
    }
}

#[cfg(feature = "observe")]
impl Costed {
    /// Registers the totals (`keel_cost_total`, `keel_cost_requests_total` by model, version
    /// and key; `keel_budget_left` by key; read at each export) in the stack's metrics.
    pub fn register(&self, metrics: &mut crate::observe::MetricsBuilder) {
        use crate::observe::Sample;
        let (totals, budgets) = (self.totals.clone(), self.budgets.clone());
        metrics.samples(move || {
            let mut out = Vec::new();
            for line in report(&totals) {
                let labels = vec![
                    ("model", line.model.clone()),
                    ("version", line.version.chars().take(12).collect()),
                    ("key", line.key.clone()),
                ];
                out.push(Sample {
                    name: "cost",
                    help: "What the answered requests cost, in the manifests' unit",
                    counter: true,
                    labels: labels.clone(),
                    value: line.cost,
                });
                out.push(Sample {
                    name: "cost_requests",
                    help: "Requests priced",
                    counter: true,
                    labels,
                    value: line.requests as f64,
                });
            }
            // A store that cannot be read leaves the gauge out of this scrape.
            for (key, spend) in budgets.all().unwrap_or_default() {
                out.push(Sample {
                    name: "budget_left",
                    help: "What a key's budget has left this period",
                    counter: false,
                    labels: vec![("key", key)],
                    value: spend.left,
                });
            }
            out
        });
    }
}
