//! Every error the simulator answers, and its one mapping to an HTTP status
//! and an RFC 9457 `application/problem+json` body.

use super::config::ConfigError;
use super::labels::LabelError;
use crate::wire::Problem;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// An error answered to a simulator client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ApiError {
    /// The body is not JSON, or could not be read.
    #[error("{detail}")]
    BadBody {
        /// The status the body reader chose (400, 413, ...).
        status: StatusCode,
        /// What is wrong with it.
        detail: String,
    },
    /// The JSON is well formed but a field is missing, mistyped or invalid.
    #[error("{0}")]
    Invalid(String),
    /// An idempotency key reused with a different request.
    #[error("{0}")]
    KeyReused(String),
    /// No such carrier.
    #[error("unknown carrier {0:?}")]
    UnknownCarrier(String),
    /// No label with this tracking number.
    #[error("unknown tracking number {0:?}")]
    UnknownTracking(String),
    /// No such route.
    #[error("no such resource")]
    NotFound,
    /// A scripted failure: error rate, `down` or an outage.
    #[error("{0}")]
    Unavailable(&'static str),
    /// A held request that nobody gave up on.
    #[error("the carrier did not answer in time (scripted timeout)")]
    HeldTooLong,
    /// The simulator is shutting down.
    #[error("the simulator is shutting down")]
    ShuttingDown,
    /// Too many requests in flight.
    #[error("too many requests in flight")]
    Overloaded,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadBody { status, .. } => *status,
            ApiError::Invalid(_) | ApiError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnknownCarrier(_) | ApiError::UnknownTracking(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) | ApiError::ShuttingDown | ApiError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::HeldTooLong => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A stable name for the kind of problem.
    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadBody { .. } => "bad-body",
            ApiError::Invalid(_) => "invalid-request",
            ApiError::KeyReused(_) => "idempotency-key-reused",
            ApiError::UnknownCarrier(_) => "unknown-carrier",
            ApiError::UnknownTracking(_) => "unknown-tracking-number",
            ApiError::NotFound => "not-found",
            ApiError::Unavailable(_) => "carrier-unavailable",
            ApiError::HeldTooLong => "carrier-timeout",
            ApiError::ShuttingDown => "shutting-down",
            ApiError::Overloaded => "overloaded",
        }
    }
}

impl From<LabelError> for ApiError {
    fn from(error: LabelError) -> Self {
        match error {
            LabelError::Invalid(detail) => ApiError::Invalid(detail),
            LabelError::KeyReused(_) => ApiError::KeyReused(error.to_string()),
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(error: ConfigError) -> Self {
        ApiError::Invalid(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let problem = Problem {
            kind: format!("urn:orderly:carrier-sim:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let body = serde_json::to_vec(&problem).expect("a problem always serializes");
        (status, [(header::CONTENT_TYPE, "application/problem+json")], body).into_response()
    }
}
