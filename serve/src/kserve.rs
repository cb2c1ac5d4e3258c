//! KServe's Open Inference Protocol v2 (as Triton and MLServer serve it): health, model
//! metadata and readiness, and `infer` for the tabular classifier (one named input per feature,
//! or one `[N, features]` tensor) and for embeddings (a `BYTES` input of texts).
//! Errors in the protocol's shape: `{"error": "..."}` (with Keel's typed reason beside it).

use crate::auth::Caller;
use crate::body::Json;
use crate::openai::request_for;
use crate::wire::{keel_headers, keel_object, ApiError};
use crate::{blocking, Server};
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keel::{Architecture, Infer, Input, Record, VersionId};
use serde::Deserialize;
use serde_json::{json, Value};

/// The probes: answered without a key.
pub(crate) fn health() -> Router<Server> {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
}

/// The rest: behind the `infer` scope.
pub(crate) fn routes() -> Router<Server> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/versions/{version}", get(metadata_of_version))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_of_version),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_on_version),
        )
}

/// An error in the protocol's shape.
struct V2(ApiError);

impl From<ApiError> for V2 {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<keel::Error> for V2 {
    fn from(e: keel::Error) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for V2 {
    fn into_response(self) -> Response {
        let e = self.0;
        let mut keel = e.body()["keel"].clone();
        keel["code"] = e.code.into();
        let mut response = (e.status, axum::Json(json!({"error": e.message, "keel": keel}))).into_response();
        if let Some(seconds) = e.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

async fn live() -> impl IntoResponse {
    axum::Json(json!({"live": true}))
}

/// Ready when the store answers and every production alias's version is loaded.
async fn ready(State(server): State<Server>) -> Result<Response, V2> {
    let ready = blocking(move || server.ready()).await??;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, axum::Json(json!({"ready": ready}))).into_response())
}

async fn server_metadata() -> impl IntoResponse {
    axum::Json(json!({"name": "keel", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
}

/// The model string the stack takes for `name`, pinned to `version` if given.
fn address(name: &str, version: Option<&str>) -> String {
    version.map_or_else(|| name.to_string(), str::to_string)
}

/// The version that answers `name` (pinned to `version`), without loading it: an alias's, or
/// the id itself. A pinned version must be one of the name's.
fn resolve(server: &Server, name: &str, version: Option<&str>) -> Result<VersionId, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "no model '{name}'{}",
                version.map(|v| format!(" version '{v}'")).unwrap_or_default()
            ),
        )
    };
    let Some(versioned) = server.stack().versioned() else {
        return Ok(server.stack().engine().version_of(&address(name, version))?);
    };
    let (base, alias) = name.split_once('@').unwrap_or((name, keel::version::PRODUCTION));
    let routes = versioned.routes(base)?;
    match version {
        Some(v) => {
            let known = versioned
                .versions()?
                .into_iter()
                .any(|r| r.name == base && r.id.as_str() == v);
            match VersionId::parse(v) {
                Some(id) if known => Ok(id),
                _ => Err(not_found()),
            }
        }
        None => routes.aliases.get(alias).cloned().ok_or_else(not_found),
    }
}

async fn metadata(state: State<Server>, Path(name): Path<String>) -> Result<Response, V2> {
    metadata_for(state, name, None).await
}

async fn metadata_of_version(
    state: State<Server>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, V2> {
    metadata_for(state, name, Some(version)).await
}

/// A model's metadata: its versions, its inputs and outputs as the protocol lists them.
async fn metadata_for(
    State(server): State<Server>,
    name: String,
    version: Option<String>,
) -> Result<Response, V2> {
    let body = blocking(move || -> Result<Value, ApiError> {
        let id = resolve(&server, &name, version.as_deref())?;
        let target = server.stack().target(id.as_str())?;
        let manifest = target.version.manifest();
        let versions: Vec<String> = match server.stack().versioned() {
            Some(v) => v
                .versions()?
                .into_iter()
                .filter(|r| r.name == target.name)
                .map(|r| r.id.to_string())
                .collect(),
            None => vec![id.to_string()],
        };
        let tensor = |name: &str, datatype: &str, shape: Value| json!({"name": name, "datatype": datatype, "shape": shape});
        let (inputs, outputs) = match manifest.architecture {
            Architecture::Mlp => (
                manifest.features.iter().map(|f| tensor(f, "FP64", json!([-1]))).collect::<Vec<_>>(),
                vec![
                    tensor("label", "BYTES", json!([-1])),
                    tensor("class", "INT64", json!([-1])),
                    tensor("probabilities", "FP32", json!([-1, manifest.labels.len()])),
                ],
            ),
            Architecture::Bert => (
                vec![tensor("text", "BYTES", json!([-1]))],
                vec![tensor("embedding", "FP32", json!([-1, -1]))],
            ),
            Architecture::Llama => (
                vec![tensor("text_input", "BYTES", json!([1]))],
                vec![tensor("text_output", "BYTES", json!([1]))],
            ),
        };
        Ok(json!({
            "name": name,
            "versions": versions,
            "platform": format!("keel_{}", manifest.architecture),
            "inputs": inputs,
            "outputs": outputs,
            "keel": {"version": id.as_str(), "labels": manifest.labels},
        }))
    })
    .await??;
    Ok(axum::Json(body).into_response())
}

async fn model_ready(state: State<Server>, Path(name): Path<String>) -> Result<Response, V2> {
    ready_for(state, name, None).await
}

async fn model_ready_of_version(
    state: State<Server>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, V2> {
    ready_for(state, name, Some(version)).await
}

/// Whether the version that would answer is loaded (200) or not (503).
async fn ready_for(
    State(server): State<Server>,
    name: String,
    version: Option<String>,
) -> Result<Response, V2> {
    let (name, ready) = blocking(move || -> Result<(String, bool), ApiError> {
        let id = resolve(&server, &name, version.as_deref())?;
        let loaded = server.stack().engine().models().iter().any(|m| m.id == id);
        Ok((name, loaded))
    })
    .await??;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, axum::Json(json!({"name": name, "ready": ready}))).into_response())
}

#[derive(Deserialize)]
struct InferBody {
    id: Option<String>,
    inputs: Vec<Tensor>,
}

#[derive(Deserialize)]
struct Tensor {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    data: Value,
}

impl Tensor {
    /// Its elements, flat (the protocol allows the data nested or flat), checked against the
    /// shape and the datatype.
    fn elements(&self) -> Result<Vec<keel::Value>, ApiError> {
        let mut flat = Vec::new();
        flatten(&self.data, &mut flat);
        let expected: usize = self.shape.iter().product();
        if flat.len() != expected {
            return Err(ApiError::bad_request(format!(
                "input '{}' has {} elements; its shape {:?} says {expected}",
                self.name,
                flat.len(),
                self.shape
            )));
        }
        let numeric = matches!(
            self.datatype.as_str(),
            "FP64"
                | "FP32"
                | "FP16"
                | "INT64"
                | "INT32"
                | "INT16"
                | "INT8"
                | "UINT64"
                | "UINT32"
                | "UINT16"
                | "UINT8"
                | "BOOL"
        );
        flat.into_iter()
            .map(|v| match (&v, self.datatype.as_str()) {
                (Value::Number(n), _) if numeric => Ok(keel::Value::Number(n.as_f64().unwrap_or(f64::NAN))),
                (Value::Bool(b), "BOOL") => Ok(keel::Value::Number(f64::from(u8::from(*b)))),
                (Value::String(s), "BYTES") => Ok(keel::Value::Text(s.clone())),
                (Value::Null, _) => Ok(keel::Value::Null),
                _ => Err(ApiError::bad_request(format!(
                    "input '{}': {v} is not a {} element",
                    self.name, self.datatype
                ))),
            })
            .collect()
    }
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other.clone()),
    }
}

async fn infer(
    state: State<Server>,
    caller: Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Json<InferBody>, ApiError>,
) -> Result<Response, V2> {
    infer_for(state, caller, name, None, body?.0).await
}

async fn infer_on_version(
    state: State<Server>,
    caller: Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
    body: Result<Json<InferBody>, ApiError>,
) -> Result<Response, V2> {
    infer_for(state, caller, name, Some(version), body?.0).await
}

/// `POST .../infer`: rows for a tabular model, texts for an encoder.
async fn infer_for(
    State(server): State<Server>,
    Extension(caller): Extension<Caller>,
    name: String,
    version: Option<String>,
    body: InferBody,
) -> Result<Response, V2> {
    let (answer, id, name) = blocking(move || -> Result<_, ApiError> {
        let model = match version.as_deref() {
            Some(v) => resolve(&server, &name, Some(v))?.to_string(),
            None => name.clone(),
        };
        let target = server.stack().target(&model)?;
        let manifest = target.version.manifest();
        let input = match manifest.architecture {
            Architecture::Mlp => Input::Classify(rows(&body.inputs, &manifest.features)?),
            Architecture::Bert => Input::Embed(texts(&body.inputs)?),
            Architecture::Llama => {
                return Err(ApiError::bad_request(format!(
                    "'{name}' is a decoder: generate with /v1/chat/completions or /v1/completions"
                )))
            }
        };
        let answer = server.stack().infer(request_for(&caller, &model, input, None))?;
        Ok((answer, body.id, name))
    })
    .await??;
    let outputs = match &answer.output {
        keel::Output::Classes(classes) => {
            let n = classes.len();
            let width = classes.first().map_or(0, |c| c.probabilities.len());
            vec![
                json!({"name": "label", "datatype": "BYTES", "shape": [n], "data": classes.iter().map(|c| c.label.clone()).collect::<Vec<_>>()}),
                json!({"name": "class", "datatype": "INT64", "shape": [n], "data": classes.iter().map(|c| c.class).collect::<Vec<_>>()}),
                json!({"name": "probabilities", "datatype": "FP32", "shape": [n, width], "data": classes.iter().flat_map(|c| c.probabilities.iter().copied()).collect::<Vec<_>>()}),
            ]
        }
        keel::Output::Embeddings(vectors) => {
            let width = vectors.first().map_or(0, Vec::len);
            vec![
                json!({"name": "embedding", "datatype": "FP32", "shape": [vectors.len(), width], "data": vectors.iter().flatten().copied().collect::<Vec<_>>()}),
            ]
        }
        keel::Output::Completion(_) => {
            return Err(ApiError::internal("a generation answered an infer request").into())
        }
    };
    let body = json!({
        "model_name": name,
        "model_version": answer.meta.version.as_str(),
        "id": id.unwrap_or_else(|| answer.meta.request_id.to_string()),
        "outputs": outputs,
        "parameters": {"keel": keel_object(&answer.meta)},
    });
    Ok((keel_headers(&answer.meta), axum::Json(body)).into_response())
}

/// A tabular request's rows: one `[N, features]` tensor (its columns in the model's feature
/// order), or one input per feature of shape `[N]` (or `[N, 1]`).
fn rows(inputs: &[Tensor], features: &[String]) -> Result<Vec<Record>, ApiError> {
    if let [matrix] = inputs {
        // One [N, width] tensor is a matrix of rows (a width of 1 is a feature's column, unless
        // the model reads one feature).
        if let [n, width] = matrix.shape[..] {
            if width > 1 || features.len() == 1 {
                if width != features.len() {
                    return Err(ApiError::bad_request(format!(
                        "input '{}' has {width} columns; the model reads {} features ({})",
                        matrix.name,
                        features.len(),
                        features.join(", ")
                    )));
                }
                let values = matrix.elements()?;
                return Ok((0..n)
                    .map(|i| {
                        features
                            .iter()
                            .cloned()
                            .zip(values[i * width..(i + 1) * width].iter().cloned())
                            .collect()
                    })
                    .collect());
            }
        }
    }
    let mut n = None;
    let mut columns = Vec::with_capacity(inputs.len());
    for t in inputs {
        let rows = match t.shape[..] {
            [rows] | [rows, 1] => rows,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "input '{}' has shape {:?}: one input per feature is [N] or [N, 1]; all of them at once is one [N, {}] input",
                    t.name,
                    t.shape,
                    features.len()
                )))
            }
        };
        if *n.get_or_insert(rows) != rows {
            return Err(ApiError::bad_request(
                "every input must have the same number of rows",
            ));
        }
        columns.push((t.name.clone(), t.elements()?));
    }
    let n = n.ok_or_else(|| ApiError::bad_request("no inputs"))?;
    Ok((0..n)
        .map(|i| {
            columns
                .iter()
                .map(|(name, values)| (name.clone(), values[i].clone()))
                .collect()
        })
        .collect())
}

/// An encoder request's texts: one `BYTES` input.
fn texts(inputs: &[Tensor]) -> Result<Vec<String>, ApiError> {
    let [t] = inputs else {
        return Err(ApiError::bad_request(
            "an embedding model takes one BYTES input of texts",
        ));
    };
    if t.datatype != "BYTES" {
        return Err(ApiError::bad_request(format!(
            "input '{}' is {}: an embedding model takes texts (BYTES)",
            t.name, t.datatype
        )));
    }
    let texts: Vec<String> = t
        .elements()?
        .into_iter()
        .map(|v| match v {
            keel::Value::Text(s) => Ok(s),
            _ => Err(ApiError::bad_request(format!("input '{}' holds a null", t.name))),
        })
        .collect::<Result<_, _>>()?;
    if texts.is_empty() {
        return Err(ApiError::bad_request("no texts to embed"));
    }
    Ok(texts)
}
