//! The simulator's HTTP routes: the carrier label API (`/v1`) and the admin
//! API that scripts faults and reports statistics (`/admin`).

use super::labels::Created;
use super::problem::ApiError;
use super::state::{Admission, Fault, SimState};
use crate::wire::{CarrierSettings, LabelRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The largest request body accepted.
pub const BODY_BYTES_MAX: usize = 16 * 1024;
/// The most requests served at once; more are answered `503` at once.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 512;
/// How long a scripted timeout holds a request (unless the server shuts down):
/// far beyond any sane client timeout.
pub const TIMEOUT_HOLD_MS: u64 = 30_000;
/// Header set on a label answer that replays an earlier label.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The simulator's router over `sim`.
pub(crate) fn router(sim: Arc<SimState>) -> Router {
    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    Router::new()
        .route("/v1/labels", post(create_label))
        .route("/v1/tracking/{tracking_number}", get(tracking))
        .route("/admin/carriers", get(list_carriers))
        .route("/admin/carriers/{carrier}", get(get_carrier).put(put_carrier))
        .route("/admin/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(in_flight, limit_in_flight))
        .with_state(sim)
}

/// `POST /v1/labels`: latency and faults first, then validation and the
/// idempotent label book.
async fn create_label(
    State(sim): State<Arc<SimState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: LabelRequest = parse_json(body)?;
    let admission = sim.admit(&request.carrier).ok_or_else(|| ApiError::UnknownCarrier(request.carrier.clone()))?;
    suffer(&sim, admission).await?;
    match sim.create_label(&request) {
        Ok(Created::New(label)) => Ok((StatusCode::CREATED, Json(label)).into_response()),
        Ok(Created::Replay(label)) => {
            let replayed = (HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true"));
            Ok((StatusCode::CREATED, [replayed], Json(label)).into_response())
        }
        Err(error) => {
            sim.count_rejected(&request.carrier);
            Err(error.into())
        }
    }
}

/// `GET /v1/tracking/{tracking_number}`: subject to the label's carrier's faults.
async fn tracking(State(sim): State<Arc<SimState>>, Path(tracking_number): Path<String>) -> Result<Response, ApiError> {
    let info = sim.tracking(&tracking_number).ok_or_else(|| ApiError::UnknownTracking(tracking_number.clone()))?;
    let admission = sim.admit(&info.carrier).ok_or_else(|| ApiError::UnknownCarrier(info.carrier.clone()))?;
    suffer(&sim, admission).await?;
    Ok(Json(info).into_response())
}

/// `GET /admin/carriers`: every carrier's settings.
async fn list_carriers(State(sim): State<Arc<SimState>>) -> Response {
    Json(sim.carriers()).into_response()
}

/// `GET /admin/carriers/{carrier}`: one carrier's settings.
async fn get_carrier(State(sim): State<Arc<SimState>>, Path(carrier): Path<String>) -> Result<Response, ApiError> {
    let settings = sim.carrier(&carrier).ok_or(ApiError::UnknownCarrier(carrier))?;
    Ok(Json(settings).into_response())
}

/// `PUT /admin/carriers/{carrier}`: replaces (or adds) a carrier's settings.
async fn put_carrier(
    State(sim): State<Arc<SimState>>,
    Path(carrier): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let settings: CarrierSettings = parse_json(body)?;
    let applied = sim.set_carrier(&carrier, &settings)?;
    Ok(Json(applied).into_response())
}

/// `GET /admin/stats`: every carrier's counters.
async fn stats(State(sim): State<Arc<SimState>>) -> Response {
    Json(sim.stats()).into_response()
}

/// Acts out an admission: waits its latency, then fails, holds or proceeds.
async fn suffer(sim: &SimState, admission: Admission) -> Result<(), ApiError> {
    if !sim.pause(admission.latency).await {
        return Err(ApiError::ShuttingDown);
    }
    match admission.fault {
        Fault::None => Ok(()),
        Fault::Unavailable(reason) => Err(ApiError::Unavailable(reason)),
        Fault::Hold if sim.pause(Duration::from_millis(TIMEOUT_HOLD_MS)).await => Err(ApiError::HeldTooLong),
        Fault::Hold => Err(ApiError::ShuttingDown),
    }
}

/// Parses a JSON body: unreadable or malformed → 400 (or the reader's status,
/// e.g. 413), well-formed but wrong shape → 422.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes =
        body.map_err(|rejection| ApiError::BadBody { status: rejection.status(), detail: rejection.body_text() })?;
    serde_json::from_slice(&bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(error.to_string()),
        _ => ApiError::BadBody { status: StatusCode::BAD_REQUEST, detail: format!("malformed JSON: {error}") },
    })
}

/// Answers `503` at once when [`REQUESTS_IN_FLIGHT_MAX`] requests are already being served.
async fn limit_in_flight(State(in_flight): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    match in_flight.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::Overloaded.into_response(),
    }
}
