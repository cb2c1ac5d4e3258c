//! A JSON request body, its refusals in the error shape: over the limit 413, not JSON or not the
//! expected fields 400 (with serde's line, column and field).

use crate::wire::ApiError;
use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A body read whole (up to the server's limit) and parsed as `T`.
pub(crate) struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        parse(&read(request, state).await?)
    }
}

/// `Option<Json<T>>`: an empty body is `None` (a POST whose fields are all optional).
impl<S: Send + Sync, T: DeserializeOwned> OptionalFromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, ApiError> {
        let bytes = read(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        parse(&bytes).map(Some)
    }
}

async fn read<S: Send + Sync>(request: Request, state: &S) -> Result<axum::body::Bytes, ApiError> {
    axum::body::Bytes::from_request(request, state)
        .await
        .map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "payload_too_large",
                "the request body is over the server's limit",
            ),
            _ => ApiError::bad_request(format!("the request body could not be read: {rejection}")),
        })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<Json<T>, ApiError> {
    serde_json::from_slice(bytes)
        .map(Json)
        .map_err(|e| ApiError::bad_request(format!("the request body is not the JSON expected: {e}")))
}
