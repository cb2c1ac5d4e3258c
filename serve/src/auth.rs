//! Who is asking: API keys (kept hashed in the store, made by `keel keys create`), their scopes
//! and tenants; and every request's id.
//!
//! With no key in the store the server is open (and [`crate::run`] keeps it on the loopback
//! interface unless told otherwise); once one exists every request needs one
//! (`Authorization: Bearer SECRET`), except the health probes: 401 without a known, unrevoked
//! key, 403 outside its scope. A key's tenant is the routing key of its requests (budgets and
//! canary stickiness follow it): its callers cannot speak for another tenant.

use crate::wire::ApiError;
use crate::Server;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel::store::{ApiKey, Store};
use keel::RequestId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Predictions: `/v1/...`, `/v2/models/...`.
    Infer,
    /// The review queue: list, claim, resolve.
    Review,
    /// The registry, lineage, keys, cost reports.
    Admin,
    /// Any key at all (`/metrics`).
    Any,
}

impl Scope {
    /// The scopes a key can hold, as `keel keys create --scope` spells them.
    pub const NAMES: [&'static str; 3] = ["infer", "review", "admin"];

    fn name(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Review => "review",
            Scope::Admin => "admin",
            Scope::Any => "any",
        }
    }
}

/// How long a read of the keys is trusted: a key made or revoked elsewhere counts within it.
const KEYS_FRESH: Duration = Duration::from_secs(1);

/// The keys in force by the sha256 of their secret.
type KeysByHash = Arc<HashMap<String, ApiKey>>;

/// The store's keys, read at most once per [`KEYS_FRESH`] (a request does not wait on the store).
pub(crate) struct Keys {
    store: Option<Arc<dyn Store>>,
    read: Mutex<Option<(Instant, KeysByHash)>>,
}

impl Keys {
    pub(crate) fn new(store: Option<Arc<dyn Store>>) -> Self {
        Self {
            store,
            read: Mutex::new(None),
        }
    }

    /// The keys by the sha256 of their secret, revoked ones left out. Blocking (the store).
    fn current(&self) -> Result<KeysByHash, ApiError> {
        let Some(store) = &self.store else {
            return Ok(Arc::default());
        };
        let mut read = self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, keys)) = read.as_ref() {
            if at.elapsed() < KEYS_FRESH {
                return Ok(keys.clone());
            }
        }
        let keys: HashMap<String, ApiKey> = store
            .keys()?
            .into_iter()
            .filter(|k| k.revoked_ms.is_none())
            .map(|k| (k.hash.clone(), k))
            .collect();
        let keys = Arc::new(keys);
        *read = Some((Instant::now(), keys.clone()));
        Ok(keys)
    }

    /// Whether the store holds a key in force. Blocking (the store).
    pub(crate) fn any(&self) -> Result<bool, ApiError> {
        Ok(!self.current()?.is_empty())
    }
}

/// A new key: its secret (shown once, never stored) and what the store keeps of it.
///
/// # Errors
/// An empty name, no scope, or a scope that is not one of [`Scope::NAMES`].
pub fn new_key(name: &str, scopes: &[String], tenant: Option<String>) -> Result<(String, ApiKey), String> {
    if name.trim().is_empty() {
        return Err("a key needs a name".into());
    }
    if scopes.is_empty() {
        return Err(format!(
            "a key needs at least one scope of {}",
            Scope::NAMES.join(", ")
        ));
    }
    if let Some(bad) = scopes.iter().find(|s| !Scope::NAMES.contains(&s.as_str())) {
        return Err(format!(
            "unknown scope '{bad}': the scopes are {}",
            Scope::NAMES.join(", ")
        ));
    }
    let bytes: [u8; 24] = rand::random();
    let secret = format!("keel_{}", hex(&bytes));
    let key = ApiKey {
        name: name.to_string(),
        hash: hash_of(&secret),
        scopes: scopes.to_vec(),
        tenant,
        created_ms: keel::store::now_ms(),
        revoked_ms: None,
    };
    Ok((secret, key))
}

/// The sha256 of a secret, lower-case hex: what the store keeps.
pub fn hash_of(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who is asking, as a handler sees it: the request's id, the key's name and tenant (None on an
/// open server), and the deadline the client set.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The request's id (the client's `x-request-id`, else a new one).
    pub id: RequestId,
    /// The key's name.
    pub key: Option<String>,
    /// The key's tenant: the routing key of its requests.
    pub tenant: Option<String>,
    /// `x-keel-deadline-ms`: the request must have started running within it.
    pub deadline: Option<Duration>,
}

/// The gate of a group of routes: the server and the scope they need.
#[derive(Clone)]
pub(crate) struct Gate {
    pub(crate) server: Server,
    pub(crate) scope: Scope,
}

/// The middleware that lets a request through `gate`: a known key in scope (any request while
/// the store has no key), with the [`Caller`] it makes for the handler.
pub(crate) async fn check(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let asked = match asked(&request) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    match caller(&gate, asked).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

/// What a request says of its caller: its id, its deadline, its key's secret.
struct Asked {
    id: RequestId,
    deadline: Option<Duration>,
    secret: Option<String>,
}

fn asked(request: &Request) -> Result<Asked, ApiError> {
    let id = request
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_default();
    let deadline = match request.headers().get("x-keel-deadline-ms") {
        None => None,
        Some(v) => {
            let ms: u64 = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("x-keel-deadline-ms must be a whole number of milliseconds")
                })?;
            Some(Duration::from_millis(ms))
        }
    };
    let secret = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|s| s.trim().to_string());
    Ok(Asked { id, deadline, secret })
}

async fn caller(gate: &Gate, asked: Asked) -> Result<Caller, ApiError> {
    let Asked { id, deadline, secret } = asked;
    let shared = gate.server.shared.clone();
    let keys = crate::blocking(move || shared.keys.current()).await??;
    if keys.is_empty() {
        return Ok(Caller {
            id,
            key: None,
            tenant: None,
            deadline,
        });
    }
    let secret = secret
        .ok_or_else(|| ApiError::unauthorized("this server needs an API key: Authorization: Bearer KEY"))?;
    let key = keys
        .get(&hash_of(&secret))
        .ok_or_else(|| ApiError::unauthorized("the API key is not known here, or was revoked"))?;
    let allowed = gate.scope == Scope::Any || key.scopes.iter().any(|s| s == gate.scope.name());
    if !allowed {
        return Err(ApiError::forbidden(format!(
            "the key '{}' has the scopes [{}]; this route needs '{}'",
            key.name,
            key.scopes.join(", "),
            gate.scope.name()
        )));
    }
    Ok(Caller {
        id,
        key: Some(key.name.clone()),
        tenant: key.tenant.clone(),
        deadline,
    })
}

/// The outermost middleware: gives every request its id (the client's `x-request-id` when it is
/// a sane one, else a new UUIDv7), logs it with the status and the time taken, and puts the id
/// on every answer, errors included.
pub(crate) async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(RequestId::generate, RequestId::from);
    request.extensions_mut().insert(id.clone());
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let span = tracing::info_span!("request", id = %id, %method, %path);
    let start = Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status();
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(
                status = status.as_u16(),
                ms = start.elapsed().as_millis() as u64,
                "answered"
            );
        } else {
            tracing::info!(
                status = status.as_u16(),
                ms = start.elapsed().as_millis() as u64,
                "answered"
            );
        }
    });
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().entry("x-request-id").or_insert(v);
    }
    response
}
