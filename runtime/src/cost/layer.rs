//! [`Costed`]: the layer that prices every request and enforces the budgets.

use super::{Budget, Budgets, CostModel, Exhausted, Spend};
use crate::{Engine, Error, Infer, InferRequest, InferResponse, Result, VersionId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// What one (model, version, key) has cost so far in this process.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CostLine {
    /// The model as requests named it.
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

/// The cost layer: every answered request is priced by its version's `[cost]` table (an answer
/// of the response cache costs nothing) and the price annotated (`meta.annotations["cost"]`: JSON with `cost`, `key`, and `downgraded_from`
/// when a budget sent it to a cheaper model); requests with a routing key that has a
/// [`Budget`] reserve their worst case first, so that concurrent requests can never spend
/// more than the budget. A version without `[cost]` costs nothing.
///
/// Put it under the version and review layers (lineage keeps the price; review rules read it).
pub struct Costed {
    engine: Engine,
    below: Arc<dyn Infer>,
    budgets: Budgets,
    prices: RwLock<HashMap<VersionId, CostModel>>,
    totals: Mutex<BTreeMap<(String, String, String), CostLine>>,
}

impl Costed {
    /// The layer over `below`; versions are looked up in `engine`.
    pub fn new(engine: Engine, below: Arc<dyn Infer>) -> Self {
        Self {
            engine,
            below,
            budgets: Budgets::default(),
            prices: RwLock::default(),
            totals: Mutex::default(),
        }
    }

    /// Sets a routing key's budget.
    pub fn set_budget(&self, key: &str, budget: Budget) {
        self.budgets.set(key, budget);
    }

    /// Where a key's budget stands.
    pub fn spend(&self, key: &str) -> Option<Spend> {
        self.budgets.spend(key)
    }

    /// What every (model, version, key) has cost in this process.
    pub fn report(&self) -> Vec<CostLine> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The price list of the version `model` names now.
    ///
    /// # Errors
    /// An unknown model; a `[cost]` table that cannot be read.
    pub fn price_of(&self, model: &str) -> Result<CostModel> {
        let id = self.engine.version_of(model)?;
        if let Some(p) = self.prices.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(*p);
        }
        let info = self.engine.info(id.as_str())?;
        let price = match info.manifest.section("cost") {
            Some(table) => CostModel::from_table(table).map_err(|reason| Error::Manifest {
                path: info.folder.join(crate::manifest::MANIFEST_FILE),
                reason,
            })?,
            None => CostModel::default(),
        };
        let mut map = self.prices.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|id, _| self.engine.version_of(id.as_str()).is_ok());
        map.insert(id, price);
        Ok(price)
    }

    fn worst_case(&self, request: &InferRequest) -> Result<(CostModel, f64)> {
        let price = self.price_of(&request.model)?;
        let max_tokens = self.engine.info(&request.model)?.manifest.max_tokens;
        Ok((price, price.worst_case(&request.input, max_tokens)))
    }
}

impl Infer for Costed {
    /// Reserves the request's worst case against its key's budget (downgrading or refusing as
    /// the budget says when it cannot pay), answers it from the layer below, and charges it.
    fn infer(&self, mut request: InferRequest) -> Result<InferResponse> {
        let key = request.key.clone().unwrap_or_default();
        let (mut price, worst) = self.worst_case(&request)?;
        let mut downgraded_from = None;
        // The version layer's own runs (shadow copies, replays) are priced but not the caller's
        // to pay: no budget is asked.
        let reserved = if request.purpose == crate::Purpose::Serve {
            self.budgets.reserve(&key, worst)
        } else {
            Ok(self.budgets.unpaid())
        };
        let reservation = match reserved {
            Ok(r) => r,
            Err(refusal) => match self.budgets.budget(&key).map(|b| b.on_exhausted) {
                Some(Exhausted::Downgrade(cheaper)) if cheaper != request.model => {
                    downgraded_from = Some(std::mem::replace(&mut request.model, cheaper));
                    let (cheap_price, cheap_worst) = self.worst_case(&request)?;
                    price = cheap_price;
                    self.budgets.reserve(&key, cheap_worst).map_err(Error::from)?
                }
                _ => return Err(refusal.into()),
            },
        };
        let model = request.model.clone();
        let mut answer = self.below.infer(request)?;
        // A response-cache answer ran nothing: it costs nothing.
        let cost = if answer.meta.cache_hit {
            0.0
        } else {
            price.cost(answer.meta.tokens, answer.meta.timings.forward)
        };
        reservation.settle(cost);
        let mut note = serde_json::json!({"cost": cost, "key": key});
        if let Some(from) = downgraded_from {
            note["downgraded_from"] = from.into();
        }
        answer.meta.annotations.insert("cost".into(), note.to_string());
        let version = answer.meta.version.to_string();
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let line = totals
            .entry((model.clone(), version.clone(), key.clone()))
            .or_insert_with(|| CostLine {
                model,
                version,
                key,
                requests: 0,
                tokens: 0,
                cost: 0.0,
            });
        line.requests += 1;
        line.tokens += answer.meta.tokens as u64;
        line.cost += cost;
        Ok(answer)
    }
}

#[cfg(feature = "observe")]
impl Costed {
    /// The totals as metrics (`keel_cost_total`, `keel_cost_requests_total` by model, version
    /// and key; `keel_budget_left` by key), for [`crate::observe::Observed::add_samples`].
    pub fn samples(&self) -> Vec<crate::observe::Sample> {
        use crate::observe::Sample;
        let mut out = Vec::new();
        for line in self.report() {
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
        for (key, spend) in self.budgets.all() {
            out.push(Sample {
                name: "budget_left",
                help: "What a key's budget has left this period",
                counter: false,
                labels: vec![("key", key)],
                value: spend.left,
            });
        }
        out
    }
}
