//! The one place engine errors become HTTP statuses.

use crate::problem::Problem;
use axum::http::StatusCode;
use orderly_engine::services::common::ApiError;

/// Maps an engine answer to an RFC 9457 problem.
pub fn problem(e: ApiError) -> Problem {
    match e {
        ApiError::Invalid { kind, detail } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, kind, "Invalid request", detail)
        }
        ApiError::NotFound(what) => Problem::not_found(format!("{what} not found")),
        ApiError::Conflict { kind, detail } => Problem::new(StatusCode::CONFLICT, kind, "Conflict", detail),
        ApiError::Busy => Problem::too_many_requests(1, "the engine's queue is full; retry shortly"),
        ApiError::Unavailable(detail) => Problem::unavailable(detail).with_retry_after(1),
    }
}

/// A 404 for an id that cannot exist because it is malformed.
pub fn bad_id(kind: &str, e: impl std::fmt::Display) -> Problem {
    Problem::not_found(format!("no such {kind}: {e}"))
}
