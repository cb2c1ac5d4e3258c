//! What goes on the wire besides the answer: errors as status codes with OpenAI's error shape,
//! and the guardrails of every answer (request id, version, route, price, review decision) as
//! headers and a `keel` object in the JSON body.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keel::contract::{ContractViolation, Verdict};
use keel::cost::{BudgetError, Price};
use keel::review::{Judgement, ReviewError};
use keel::version::Route;
use keel::{ErrorKind, Meta};
use serde_json::{json, Value};

/// An error answer: a status, a message, and OpenAI's error shape (`{"error": {"message",
/// "type", "param", "code"}}`) with Keel's typed reason beside it.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// A short machine code: `contract_violation`, `budget_exhausted`, `model_not_found`, ...
    pub code: &'static str,
    /// What Keel knows of it (a contract's field, clause and value; a ticket).
    pub detail: Value,
    /// Seconds a client should wait before trying again (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error of this status, OpenAI type, code and message.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
            detail: json!({}),
            retry_after: None,
        }
    }

    /// A request the server cannot read or does not take.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    /// No key, or a key the store does not know or has revoked.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    /// A key without the scope the route needs.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "insufficient_scope",
            message,
        )
    }

    /// A failure of the server's own (a worker gone).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            message,
        )
    }
}

/// A refusal or failure of the stack, by its class: the one place errors become statuses.
impl From<keel::Error> for ApiError {
    fn from(e: keel::Error) -> Self {
        let message = e.to_string();
        let source = match &e {
            keel::Error::Refused { source, .. } => Some(source.as_ref()),
            _ => None,
        };
        let api = match e.kind() {
            ErrorKind::InvalidArgument => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_input",
                message,
            ),
            ErrorKind::NotFound => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                message,
            ),
            ErrorKind::Contract => {
                let mut api = Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    "contract_violation",
                    message,
                );
                if let Some(ContractViolation(v)) = source.and_then(|s| s.downcast_ref::<ContractViolation>())
                {
                    api.detail = json!({"field": v.field, "clause": v.clause.as_str(), "value": v.value, "expected": v.expected});
                }
                api
            }
            ErrorKind::Budget => {
                let mut api = Self::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_quota",
                    "budget_exhausted",
                    message,
                );
                if let Some(b) = source.and_then(|s| s.downcast_ref::<BudgetError>()) {
                    api.detail = json!({"key": b.key, "needed": b.needed, "left": b.left, "limit": b.limit});
                }
                api
            }
            ErrorKind::Review => {
                let review = source.and_then(|s| s.downcast_ref::<ReviewError>());
                let (status, code) = match review {
                    Some(ReviewError::Held { .. }) => (StatusCode::ACCEPTED, "held_for_review"),
                    _ => (StatusCode::FORBIDDEN, "blocked_by_review"),
                };
                let mut api = Self::new(status, "review", code, message);
                if let Some(r) = review {
                    let (ReviewError::Held { ticket, reasons } | ReviewError::Blocked { ticket, reasons }) =
                        r;
                    api.detail = json!({"ticket": ticket, "reasons": reasons});
                }
                api
            }
            ErrorKind::Overloaded => {
                let mut api = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "overloaded",
                    message,
                );
                api.retry_after = Some(1);
                api
            }
            ErrorKind::DeadlineExceeded => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "deadline_exceeded",
                message,
            ),
            ErrorKind::ShuttingDown => {
                let mut api = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "shutting_down",
                    message,
                );
                api.retry_after = Some(1);
                api
            }
            ErrorKind::Storage => {
                let mut api = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "storage",
                    message,
                );
                api.retry_after = Some(1);
                api
            }
            ErrorKind::NoDevice => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_device",
                message,
            ),
            ErrorKind::InvalidModel => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "invalid_model",
                message,
            ),
            ErrorKind::Internal => Self::internal(message),
        };
        api
    }
}

impl ApiError {
    /// The error's JSON: OpenAI's `error` object and Keel's `keel` beside it (with the status).
    pub fn body(&self) -> Value {
        let mut keel = self.detail.clone();
        if let Value::Object(map) = &mut keel {
            map.insert("status".into(), self.status.as_u16().into());
        }
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": Value::Null,
                "code": self.code,
            },
            "keel": keel,
        })
    }
}

impl From<keel::version::Error> for ApiError {
    fn from(e: keel::version::Error) -> Self {
        keel::Error::from(e).into()
    }
}

impl From<keel::store::Error> for ApiError {
    fn from(e: keel::store::Error) -> Self {
        keel::version::Error::from(e).into()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The guardrails of an answer, as a `keel` object for its JSON body.
pub fn keel_object(meta: &Meta) -> Value {
    let mut keel = json!({
        "request_id": meta.request_id.as_str(),
        "model": meta.model,
        "version": meta.version.as_str(),
    });
    if let Some(r) = meta.notes.get::<Route>() {
        keel["route"] = r.route.as_str().into();
    }
    if let Some(p) = meta.notes.get::<Price>() {
        keel["cost"] = p.cost.into();
    }
    if let Some(j) = meta.notes.get::<Judgement>() {
        keel["review"] = json!({"decision": j.decision.as_str(), "ticket": j.ticket, "reasons": j.reasons});
    }
    if let Some(v) = meta.notes.get::<Verdict>() {
        keel["contract"] = json!({"violations": v.violations});
    }
    keel
}

/// The guardrails of an answer as headers: `x-request-id`, `x-keel-version`, `x-keel-route`,
/// and once known `x-keel-cost`, `x-keel-review` and `x-keel-ticket`.
pub fn keel_headers(meta: &Meta) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("x-request-id", meta.request_id.to_string());
    put("x-keel-version", meta.version.to_string());
    if let Some(r) = meta.notes.get::<Route>() {
        put("x-keel-route", r.route.clone());
    }
    if let Some(p) = meta.notes.get::<Price>() {
        put("x-keel-cost", p.cost.to_string());
    }
    if let Some(j) = meta.notes.get::<Judgement>() {
        put("x-keel-review", j.decision.as_str().to_string());
        if let Some(t) = j.ticket {
            put("x-keel-ticket", t.to_string());
        }
    }
    h
}
