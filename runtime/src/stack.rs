//! The stack: the one way to put the production layers around the engine, for a host, the C
//! ABI, the `keel` command, the benchmark harness and the server alike.
//!
//! A host picks the layers it wants; the builder puts them in their one order (each layer knows
//! only the one below it):
//!
//! ```text
//! request -> routers (cascade, degrade: between model names)
//!         -> version (resolves the name to a version, routes canary and shadow, lineage)
//!            or, without a store, the stack resolves the model itself
//!         -> review -> cost -> observe -> contract -> engine
//! ```
//!
//! The version is resolved once, at the top of the per-version layers, and travels down on the
//! request ([`crate::InferRequest::target`]); what a layer decides for the layers after it is
//! a typed note ([`crate::Notes`]). Every layer registers its metrics into the stack's one
//! registry ([`Stack::metrics_text`]). A stack with no layer is the engine behind a name
//! lookup.
//!
//! ```no_run
//! use keel::stack::Stack;
//! use keel::store::SqliteStore;
//! use keel::{Engine, Infer, InferRequest};
//! use std::sync::Arc;
//! let engine = Engine::builder().build()?;
//! let store = Arc::new(SqliteStore::open(".keel")?);
//! let stack = Stack::builder(engine).store(store).all_layers().build()?;
//! let answer = stack.infer(InferRequest::embed("embed", ["hello"]).key("tenant-7"))?;
//! println!("{}", stack.metrics_text());
//! # let _ = answer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "contract")]
use crate::contract::Contracted;
#[cfg(feature = "cost")]
use crate::cost::{Cascade, CascadeConfig, Costed, Degrade, DegradeConfig};
#[cfg(feature = "observe")]
use crate::observe::{DriftCallback, Metrics, MetricsBuilder, Observed, WindowSize};
#[cfg(feature = "review")]
use crate::review::Reviewed;
#[cfg(feature = "store")]
use crate::store::Store;
#[cfg(feature = "version")]
use crate::version::{VersionConfig, Versioned};
use crate::{Engine, Infer, InferRequest, InferResponse, InferStream, Result, Target};
use std::sync::Arc;

/// How the observability layer watches.
#[cfg(feature = "observe")]
#[derive(Clone, Default)]
pub struct ObserveConfig {
    /// Drift windows of this size, whatever the profiles say.
    pub window: Option<WindowSize>,
    /// Called whenever a model's drift state changes.
    pub on_drift: Option<DriftCallback>,
}

/// A router above the version layer.
#[cfg(feature = "cost")]
enum Router {
    Cascade(CascadeConfig, bool),
    Degrade(DegradeConfig),
}

/// Which layers a [`Stack`] has (see the module's documentation for their order).
pub struct StackBuilder {
    engine: Engine,
    #[cfg(feature = "store")]
    store: Option<Arc<dyn Store>>,
    #[cfg(feature = "version")]
    versions: Option<VersionConfig>,
    #[cfg(feature = "review")]
    review: bool,
    #[cfg(feature = "cost")]
    cost: bool,
    #[cfg(feature = "cost")]
    routers: Vec<Router>,
    #[cfg(feature = "observe")]
    observe: Option<ObserveConfig>,
    #[cfg(feature = "contract")]
    contract: bool,
}

impl StackBuilder {
    /// The deployment's store: the registry, lineage and the review queue (the version and
    /// review layers need it).
    #[cfg(feature = "store")]
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The version layer: `NAME` and `NAME@ALIAS` routed by the store's registry, canary and
    /// shadow traffic, lineage for every prediction.
    #[cfg(feature = "version")]
    pub fn versions(mut self, config: VersionConfig) -> Self {
        self.versions = Some(config);
        self
    }

    /// The review layer: each version's `[review]` policy, tickets in the store.
    #[cfg(feature = "review")]
    pub fn review(mut self) -> Self {
        self.review = true;
        self
    }

    /// The cost layer: prices (`[cost]`) and budgets.
    #[cfg(feature = "cost")]
    pub fn cost(mut self) -> Self {
        self.cost = true;
        self
    }

    /// A cascade between a cheap and a strong model, above the version layer (`cache_first`:
    /// see [`Cascade::cache_first`]).
    #[cfg(feature = "cost")]
    pub fn cascade(mut self, config: CascadeConfig, cache_first: bool) -> Self {
        self.routers.push(Router::Cascade(config, cache_first));
        self
    }

    /// Degradation under load between a strong and a cheap model, above the version layer.
    #[cfg(feature = "cost")]
    pub fn degrade(mut self, config: DegradeConfig) -> Self {
        self.routers.push(Router::Degrade(config));
        self
    }

    /// The observability layer, with the profiles' windows.
    #[cfg(feature = "observe")]
    pub fn observe(self) -> Self {
        self.observe_with(ObserveConfig::default())
    }

    /// The observability layer, configured.
    #[cfg(feature = "observe")]
    pub fn observe_with(mut self, config: ObserveConfig) -> Self {
        self.observe = Some(config);
        self
    }

    /// The contract layer: each version's `[contract]`.
    #[cfg(feature = "contract")]
    pub fn contract(mut self) -> Self {
        self.contract = true;
        self
    }

    /// Every layer this build has: contract, observe, cost, and, with a store, review and
    /// versions (with the default configuration).
    pub fn all_layers(self) -> Self {
        #[cfg(feature = "contract")]
        let self_ = self.contract();
        #[cfg(not(feature = "contract"))]
        let self_ = self;
        #[cfg(feature = "observe")]
        let self_ = self_.observe();
        #[cfg(feature = "cost")]
        let self_ = self_.cost();
        #[cfg(feature = "version")]
        let has_store = self_.store.is_some();
        #[cfg(feature = "review")]
        let self_ = if has_store { self_.review() } else { self_ };
        #[cfg(feature = "version")]
        let self_ = if has_store && self_.versions.is_none() {
            self_.versions(VersionConfig::default())
        } else {
            self_
        };
        self_
    }

    /// The stack.
    ///
    /// # Errors
    /// The version or review layer without a store; the version layer's start (its lineage
    /// writer, the store's routes).
    pub fn build(self) -> Result<Stack> {
        let engine = self.engine;
        let mut below: Arc<dyn Infer> = Arc::new(engine.clone());
        #[cfg(feature = "observe")]
        let mut metrics = MetricsBuilder::new(engine.clone());
        #[cfg(feature = "contract")]
        let contracted = self.contract.then(|| {
            let layer = Arc::new(Contracted::new(below.clone()));
            #[cfg(feature = "observe")]
            layer.register(&mut metrics);
            below = layer.clone();
            layer
        });
        #[cfg(feature = "observe")]
        let observed = self.observe.map(|config| {
            let mut layer = Observed::new(below.clone());
            if let Some(window) = config.window {
                layer = layer.window(window);
            }
            if let Some(f) = config.on_drift {
                layer = layer.on_drift_change(move |name, report| f(name, report));
            }
            layer.register(&mut metrics);
            let layer = Arc::new(layer);
            below = layer.clone();
            layer
        });
        #[cfg(feature = "cost")]
        let costed = self.cost.then(|| {
            // A fleet's replicas keep budgets in the store they share; one process, in memory.
            #[cfg(feature = "store")]
            let layer = match self.store.clone().filter(|s| s.is_shared()) {
                Some(store) => Costed::with_stored_budgets(below.clone(), store),
                None => Costed::new(below.clone()),
            };
            #[cfg(not(feature = "store"))]
            let layer = Costed::new(below.clone());
            let layer = Arc::new(layer);
            #[cfg(feature = "observe")]
            layer.register(&mut metrics);
            below = layer.clone();
            layer
        });
        #[cfg(feature = "version")]
        let needs_store = |layer: &str| {
            self.store.clone().ok_or_else(|| {
                crate::Error::InvalidArgument(format!(
                    "the {layer} layer needs a store (StackBuilder::store)"
                ))
            })
        };
        #[cfg(feature = "review")]
        let reviewed = match self.review {
            true => {
                let layer = Arc::new(Reviewed::new(needs_store("review")?, below.clone()));
                #[cfg(feature = "observe")]
                layer.register(&mut metrics);
                below = layer.clone();
                Some(layer)
            }
            false => None,
        };
        #[cfg(feature = "version")]
        let versioned = match self.versions {
            Some(config) => {
                let layer = Versioned::new(engine.clone(), below.clone(), needs_store("version")?, config)?;
                below = Arc::new(layer.clone());
                Some(layer)
            }
            None => None,
        };
        #[cfg(feature = "version")]
        let resolves_itself = versioned.is_some();
        #[cfg(not(feature = "version"))]
        let resolves_itself = false;
        if !resolves_itself {
            below = Arc::new(Resolve { below });
        }
        #[cfg(feature = "cost")]
        for router in self.routers {
            below = match router {
                Router::Cascade(config, cache_first) => {
                    let cascade = Cascade::new(config, below);
                    Arc::new(match cache_first {
                        true => cascade.cache_first(engine.clone()),
                        false => cascade,
                    })
                }
                Router::Degrade(config) => Arc::new(Degrade::new(config, below)),
            };
        }
        Ok(Stack {
            layers: Arc::new(Layers {
                top: below,
                engine,
                #[cfg(feature = "version")]
                versioned,
                #[cfg(feature = "review")]
                reviewed,
                #[cfg(feature = "cost")]
                costed,
                #[cfg(feature = "observe")]
                observed,
                #[cfg(feature = "contract")]
                contracted,
                #[cfg(feature = "observe")]
                metrics: Arc::new(metrics.finish()),
            }),
        })
    }
}

/// The model resolved at the top of a stack without a version layer: an engine alias or
/// version id, under its manifest's name.
struct Resolve {
    below: Arc<dyn Infer>,
}

impl Resolve {
    fn resolved(&self, mut request: InferRequest) -> Result<InferRequest> {
        if request.target.is_none() {
            request.target = Some(self.below.target(&request.model)?);
        }
        Ok(request)
    }
}

impl Infer for Resolve {
    fn target(&self, model: &str) -> Result<Target> {
        self.below.target(model)
    }

    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        self.below.infer(self.resolved(request)?)
    }

    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        self.below.infer_stream(self.resolved(request)?)
    }
}

/// The engine and the layers around it: every prediction of a host goes through one. Cheap to
/// clone; safe to share between threads. Built by [`Stack::builder`].
#[derive(Clone)]
pub struct Stack {
    layers: Arc<Layers>,
}

struct Layers {
    top: Arc<dyn Infer>,
    engine: Engine,
    #[cfg(feature = "version")]
    versioned: Option<Versioned>,
    #[cfg(feature = "review")]
    reviewed: Option<Arc<Reviewed>>,
    #[cfg(feature = "cost")]
    costed: Option<Arc<Costed>>,
    #[cfg(feature = "observe")]
    observed: Option<Arc<Observed>>,
    #[cfg(feature = "contract")]
    contracted: Option<Arc<Contracted>>,
    #[cfg(feature = "observe")]
    metrics: Arc<Metrics>,
}

impl Stack {
    /// A builder over `engine`, with no layer yet.
    pub fn builder(engine: Engine) -> StackBuilder {
        StackBuilder {
            engine,
            #[cfg(feature = "store")]
            store: None,
            #[cfg(feature = "version")]
            versions: None,
            #[cfg(feature = "review")]
            review: false,
            #[cfg(feature = "cost")]
            cost: false,
            #[cfg(feature = "cost")]
            routers: Vec::new(),
            #[cfg(feature = "observe")]
            observe: None,
            #[cfg(feature = "contract")]
            contract: false,
        }
    }

    /// The engine at the bottom (loading models, its counters, shutdown).
    pub fn engine(&self) -> &Engine {
        &self.layers.engine
    }

    /// The version layer: the registry, aliases, lineage, replay.
    #[cfg(feature = "version")]
    pub fn versioned(&self) -> Option<&Versioned> {
        self.layers.versioned.as_ref()
    }

    /// The review layer: the queue, feedback.
    #[cfg(feature = "review")]
    pub fn reviewed(&self) -> Option<&Reviewed> {
        self.layers.reviewed.as_deref()
    }

    /// The cost layer: budgets, the totals.
    #[cfg(feature = "cost")]
    pub fn costed(&self) -> Option<&Costed> {
        self.layers.costed.as_deref()
    }

    /// The observability layer: drift.
    #[cfg(feature = "observe")]
    pub fn observed(&self) -> Option<&Observed> {
        self.layers.observed.as_deref()
    }

    /// The contract layer: the violation tally.
    #[cfg(feature = "contract")]
    pub fn contracted(&self) -> Option<&Contracted> {
        self.layers.contracted.as_deref()
    }

    /// The stack's metrics (for [`crate::observe::MetricsServer`]).
    #[cfg(feature = "observe")]
    pub fn metrics(&self) -> Arc<Metrics> {
        self.layers.metrics.clone()
    }

    /// Everything the layers observe and count, and the engine's queues, batches and caches, in
    /// Prometheus (OpenMetrics) text.
    #[cfg(feature = "observe")]
    pub fn metrics_text(&self) -> String {
        self.layers.metrics.text()
    }

    /// Waits until the lineage of every request answered so far is committed (a no-op without
    /// a version layer).
    ///
    /// # Errors
    /// Records were lost since the last flush (the store failed to write them).
    pub fn flush(&self) -> Result<()> {
        #[cfg(feature = "version")]
        if let Some(v) = &self.layers.versioned {
            v.flush()?;
        }
        Ok(())
    }
}

impl Infer for Stack {
    fn target(&self, model: &str) -> Result<Target> {
        self.layers.top.target(model)
    }

    fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        self.layers.top.infer(request)
    }

    fn infer_stream(&self, request: InferRequest) -> Result<InferStream> {
        self.layers.top.infer_stream(request)
    }
}
