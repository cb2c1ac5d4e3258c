//! The administration and review API: what `keel registry`, `keel lineage`, `keel review`,
//! `keel feedback` and `keel cost` do, over HTTP, for the keys that hold the scope.
//!
//! `admin`: `/admin/models` (register, list), `/admin/models/{name}/aliases/{alias}`,
//! `.../canary`, `.../promote`, `.../rollback`, `.../history`; `/admin/lineage/{id}` and
//! `.../replay`; `/admin/cost`; `/admin/budgets/{key}`.
//! `review`: `/review/tickets` (list), `/review/claim`, `/review/tickets/{id}/resolve`,
//! `/review/expire`, `/review/feedback`, `/review/stats`. A reviewer is the key's name (the body's `reviewer`
//! only on a server without keys): a key cannot label in another's name.

use crate::auth::Caller;
use crate::body::Json;
use crate::wire::ApiError;
use crate::{blocking, Server};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use keel::cost::{Budget, Exhausted};
use keel::store::{CanaryConfig, Store, TicketState};
use keel::version::{RegisterOptions, Versioned};
use keel::WeightPath;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// The routes of the `admin` scope.
pub(crate) fn admin_routes() -> Router<Server> {
    Router::new()
        .route("/admin/models", get(catalog).post(register))
        .route("/admin/models/{name}/aliases/{alias}", put(set_alias))
        .route("/admin/models/{name}/canary", post(canary))
        .route("/admin/models/{name}/promote", post(promote))
        .route("/admin/models/{name}/rollback", post(rollback))
        .route("/admin/models/{name}/history", get(history))
        .route("/admin/lineage/{request_id}", get(lineage))
        .route("/admin/lineage/{request_id}/replay", post(replay))
        .route("/admin/cost", get(cost))
        .route("/admin/budgets/{key}", put(set_budget))
}

/// The routes of the `review` scope.
pub(crate) fn review_routes() -> Router<Server> {
    Router::new()
        .route("/review/tickets", get(tickets))
        .route("/review/claim", post(claim))
        .route("/review/tickets/{id}/resolve", post(resolve))
        .route("/review/expire", post(expire))
        .route("/review/feedback", post(feedback))
        .route("/review/stats", get(stats))
}

fn versioned(server: &Server) -> Result<&Versioned, ApiError> {
    server.stack().versioned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no_registry",
            "this server's stack has no registry (no version layer)",
        )
    })
}

fn costed(server: &Server) -> Result<&keel::cost::Costed, ApiError> {
    server
        .stack()
        .costed()
        .ok_or_else(|| ApiError::bad_request("this server's stack has no cost layer"))
}

fn store(server: &Server) -> Result<std::sync::Arc<dyn Store>, ApiError> {
    Ok(versioned(server)?.store().clone())
}

/// A JSON answer.
fn ok(value: impl serde::Serialize) -> Response {
    axum::Json(value).into_response()
}

async fn catalog(State(server): State<Server>) -> Result<Response, ApiError> {
    blocking(move || {
        let entries = versioned(&server)?.catalog()?;
        let entries: Vec<Value> = entries
            .into_iter()
            .map(|e| {
                json!({
                    "name": e.name, "version": e.version.as_str(), "architecture": e.architecture,
                    "weights": e.weights, "path": e.path, "aliases": e.aliases,
                    "retain_input": e.retain_input, "registered_ms": e.registered,
                    "canary_percent": e.canary_percent, "shadow": e.shadow,
                })
            })
            .collect();
        Ok(ok(entries))
    })
    .await?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    name: String,
    path: String,
    weights: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    retain_input: bool,
}

/// `POST /admin/models`: registers a model folder or file of the server's disk as a version of
/// `name` (and points `alias` at it).
async fn register(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Json(r): Json<Registration>,
) -> Result<Response, ApiError> {
    let weights = match r.weights.as_deref() {
        None | Some("quantized") => WeightPath::Quantized,
        Some("f32") => WeightPath::F32,
        Some("int8") => WeightPath::Int8,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "weights '{other}' is not one of quantized, f32, int8"
            )))
        }
    };
    blocking(move || {
        let v = versioned(&server)?;
        let options = RegisterOptions {
            weights,
            retain_input: r.retain_input,
        };
        let id = v.register(&r.name, std::path::Path::new(&r.path), options)?;
        let events = match &r.alias {
            Some(alias) => v.set_alias(
                &r.name,
                alias,
                id.as_str(),
                &format!("registered over HTTP, by {}", who(&caller)),
            )?,
            None => Vec::new(),
        };
        Ok((
            StatusCode::CREATED,
            axum::Json(json!({"version": id.as_str(), "moves": events})),
        )
            .into_response())
    })
    .await?
}

/// Who moved an alias, for its history: the key's name.
fn who(caller: &Caller) -> &str {
    caller.key.as_deref().unwrap_or("a caller without a key")
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Move {
    version: Option<String>,
    reason: Option<String>,
    percent: Option<f64>,
    #[serde(default)]
    shadow: bool,
}

impl Move {
    fn reason(&self, caller: &Caller) -> String {
        match &self.reason {
            Some(r) => format!("{r} (by {})", who(caller)),
            None => format!("over HTTP, by {}", who(caller)),
        }
    }

    fn version(&self) -> Result<&str, ApiError> {
        self.version.as_deref().ok_or_else(|| {
            ApiError::bad_request("`version` is needed (an id or a unique prefix of 8+ hex digits)")
        })
    }
}

async fn set_alias(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Path((name, alias)): Path<(String, String)>,
    Json(m): Json<Move>,
) -> Result<Response, ApiError> {
    blocking(move || {
        Ok(ok(versioned(&server)?.set_alias(
            &name,
            &alias,
            m.version()?,
            &m.reason(&caller),
        )?))
    })
    .await?
}

async fn canary(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(m): Json<Move>,
) -> Result<Response, ApiError> {
    let percent = m
        .percent
        .ok_or_else(|| ApiError::bad_request("`percent` (0-100) is needed"))?;
    blocking(move || {
        let config = CanaryConfig {
            percent,
            shadow: m.shadow,
            guard: None,
        };
        Ok(ok(versioned(&server)?.canary(
            &name,
            m.version()?,
            config,
            &m.reason(&caller),
        )?))
    })
    .await?
}

async fn promote(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Option<Json<Move>>,
) -> Result<Response, ApiError> {
    let m = body.map(|b| b.0).unwrap_or_default();
    blocking(move || Ok(ok(versioned(&server)?.promote(&name, &m.reason(&caller))?))).await?
}

async fn rollback(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Option<Json<Move>>,
) -> Result<Response, ApiError> {
    let m = body.map(|b| b.0).unwrap_or_default();
    blocking(move || Ok(ok(versioned(&server)?.rollback(&name, &m.reason(&caller))?))).await?
}

async fn history(State(server): State<Server>, Path(name): Path<String>) -> Result<Response, ApiError> {
    blocking(move || Ok(ok(versioned(&server)?.history(&name)?))).await?
}

async fn lineage(State(server): State<Server>, Path(id): Path<String>) -> Result<Response, ApiError> {
    blocking(move || {
        let v = versioned(&server)?;
        // An answer made a moment ago may still be on its way to the store.
        v.flush()?;
        Ok(ok(v.explain(&id)?))
    })
    .await?
}

async fn replay(State(server): State<Server>, Path(id): Path<String>) -> Result<Response, ApiError> {
    blocking(move || {
        let v = versioned(&server)?;
        v.flush()?;
        let r = v.replay(&id)?;
        Ok(ok(json!({
            "request_id": r.request_id, "version": r.version, "identical": r.identical,
            "recorded": r.recorded, "replayed": r.replayed,
        })))
    })
    .await?
}

/// `GET /admin/cost`: what every (model, version, key) has cost in this process, and where
/// every budget stands (fleet-wide on a shared store).
async fn cost(State(server): State<Server>) -> Result<Response, ApiError> {
    // Budgets may be read from the store: off the runtime's workers.
    blocking(move || {
        let costed = costed(&server)?;
        let lines = costed.report();
        let budgets: serde_json::Map<String, Value> = costed
            .budgets()?
            .into_iter()
            .map(|(k, s)| (k, json!(s)))
            .collect();
        Ok(ok(json!({"lines": lines, "budgets": budgets})))
    })
    .await?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    limit: f64,
    period_s: Option<f64>,
    /// "reject" (the default), or the name of a cheaper model to serve instead.
    downgrade_to: Option<String>,
}

/// `PUT /admin/budgets/{key}`: sets a routing key's budget (what it spent in its period is kept).
async fn set_budget(
    State(server): State<Server>,
    Path(key): Path<String>,
    Json(b): Json<BudgetBody>,
) -> Result<Response, ApiError> {
    if !(b.limit.is_finite() && b.limit >= 0.0) {
        return Err(ApiError::bad_request("`limit` must be a number >= 0"));
    }
    let period = match b.period_s {
        None => None,
        Some(s) => Some(
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| ApiError::bad_request("`period_s` must be a number of seconds > 0"))?,
        ),
    };
    let on_exhausted = b.downgrade_to.map_or(Exhausted::Reject, Exhausted::Downgrade);
    let budget = Budget {
        limit: b.limit,
        period,
        on_exhausted,
    };
    // A fleet's budgets are written to the store: off the runtime's workers.
    blocking(move || {
        let costed = costed(&server)?;
        costed.set_budget(&key, budget)?;
        Ok(ok(json!({"key": key, "spend": costed.spend(&key)?})))
    })
    .await?
}

#[derive(Deserialize)]
struct TicketQuery {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /review/tickets?state=pending&limit=100`.
async fn tickets(State(server): State<Server>, Query(q): Query<TicketQuery>) -> Result<Response, ApiError> {
    let state = match q.state.as_deref().unwrap_or("pending") {
        "all" => None,
        s => Some(TicketState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state '{s}' is not one of pending, claimed, resolved, expired, all"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    blocking(move || {
        Ok(ok(store(&server)?.tickets(
            state,
            limit,
            keel::store::now_ms(),
        )?))
    })
    .await?
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    lease_s: Option<u64>,
    reviewer: Option<String>,
}

/// Who reviews: the key's name; the body's only where the server has no keys.
fn reviewer(caller: &Caller, given: Option<String>) -> Result<String, ApiError> {
    match (&caller.key, given) {
        (Some(key), _) => Ok(key.clone()),
        (None, Some(r)) if !r.trim().is_empty() => Ok(r),
        (None, _) => Err(ApiError::bad_request(
            "`reviewer` is needed (a server without keys cannot tell)",
        )),
    }
}

/// `POST /review/claim`: the oldest pending ticket, for a lease (default 900 s); 204 if none.
async fn claim(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    body: Option<Json<ClaimBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let who = reviewer(&caller, body.reviewer)?;
    let lease_ms = i64::try_from(body.lease_s.unwrap_or(900).saturating_mul(1000)).unwrap_or(i64::MAX);
    blocking(
        move || match store(&server)?.claim_review(&who, lease_ms, keel::store::now_ms())? {
            Some(t) => Ok(ok(t)),
            None => Ok(StatusCode::NO_CONTENT.into_response()),
        },
    )
    .await?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    label: String,
    comment: Option<String>,
    reviewer: Option<String>,
}

/// `POST /review/tickets/{id}/resolve`: labels a ticket (stored as feedback); 409 if it is
/// closed or another reviewer's lease runs.
async fn resolve(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
    Json(body): Json<ResolveBody>,
) -> Result<Response, ApiError> {
    let who = reviewer(&caller, body.reviewer)?;
    blocking(move || {
        match store(&server)?.resolve_review(
            id,
            &who,
            &body.label,
            body.comment.as_deref(),
            keel::store::now_ms(),
        )? {
            Ok(t) => Ok(ok(t)),
            Err(refusal) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "ticket_not_open",
                refusal,
            )),
        }
    })
    .await?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpireBody {
    older_than_s: u64,
}

async fn expire(State(server): State<Server>, Json(body): Json<ExpireBody>) -> Result<Response, ApiError> {
    let age = i64::try_from(body.older_than_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    blocking(move || {
        let now = keel::store::now_ms();
        let n = store(&server)?.expire_reviews(now.saturating_sub(age), now)?;
        Ok(ok(json!({"expired": n})))
    })
    .await?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    request_id: String,
    label: String,
}

/// `POST /review/feedback`: ground truth for a recorded prediction; 404 if none has the id.
async fn feedback(
    State(server): State<Server>,
    Json(body): Json<FeedbackBody>,
) -> Result<Response, ApiError> {
    blocking(move || {
        let v = versioned(&server)?;
        // The prediction may have been answered a moment ago: its record on its way to the store.
        v.flush()?;
        if !keel::review::add_ground_truth(&**v.store(), &body.request_id, &body.label)? {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "prediction_not_found",
                format!("no prediction has the request id '{}'", body.request_id),
            ));
        }
        Ok(StatusCode::CREATED.into_response())
    })
    .await?
}

/// `GET /review/stats`: accuracy (ground truth) and agreement with reviewers, per version.
async fn stats(State(server): State<Server>) -> Result<Response, ApiError> {
    blocking(move || Ok(ok(keel::review::quality(&*store(&server)?)?))).await?
}
