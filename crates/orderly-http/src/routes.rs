//! The `/v1` API over the engine (PRODUCT.md §8), the probes and
//! `/metrics`. Handlers parse and authorize, call one engine method, and
//! shape the answer; every rule lives in the engine and the domain.

use crate::errors::{bad_id, problem};
use crate::problem::{ApiJson, Problem};
use crate::{Principal, Role};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::order::OrderState;
use orderly_domain::{LocationId, OrderId, PickId, Qty, ShipmentId, Sku, Zone};
use orderly_engine::app::{Engine, OrderRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The running engine.
    pub engine: Arc<Engine>,
}

type ApiResult = Result<Response, Problem>;

const WRITE_ORDERS: &[Role] = &[Role::Storefront];
const WAREHOUSE: &[Role] = &[Role::Warehouse];
const OPS: &[Role] = &[Role::Ops];
const ANY: &[Role] = Role::ALL;

/// Every route, without the cross-cutting layers (see [`crate::HttpLayers`]).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(crate::dashboard::dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/docs", get(crate::openapi::docs))
        .route("/v1/locations", get(list_locations))
        .route("/v1/locations/{id}", put(put_location))
        .route("/v1/inventory/receipts", post(receive))
        .route("/v1/inventory/adjustments", post(adjust))
        .route("/v1/inventory/cycle-counts", post(cycle_count))
        .route("/v1/inventory/{sku}", get(get_inventory))
        .route("/v1/holds", post(create_hold))
        .route("/v1/orders", post(create_order).get(list_orders))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/events", get(order_events))
        .route("/v1/orders/{id}/cancel", post(cancel_order))
        .route("/v1/orders/{id}/return", post(request_return))
        .route("/v1/orders/{id}/return/received", post(return_received))
        .route("/v1/picks/next", get(next_pick))
        .route("/v1/picks/{id}/confirm", post(confirm_pick))
        .route("/v1/picks/{id}/short", post(short_pick))
        .route("/v1/packages", post(pack))
        .route("/v1/shipments/{id}", get(get_shipment))
        .route("/v1/shipments/{id}/delivered", post(shipment_delivered))
        .route("/v1/ops/carrier-rates", put(upload_rates).get(rates_info))
        .route("/v1/ops/summary", get(summary))
        .route("/v1/ops/dead-letters", get(dead_letters))
        .route("/v1/ops/dead-letters/replay", post(replay_all))
        .route("/v1/ops/dead-letters/{id}/replay", post(replay_dead_letter))
        .route("/v1/ops/dead-letters/{id}/discard", post(discard_dead_letter))
        .route("/v1/ops/notifications/failed", get(failed_notifications))
        .route("/v1/ops/notifications/{id}/retry", post(retry_notification))
        .route("/v1/ops/reconcile", post(reconcile))
        .route("/v1/ops/reconcile/last", get(last_reconcile))
        .with_state(state)
}

/// Counts every request and its latency per method, matched route template
/// (never the raw path, so ids do not explode the series) and status:
/// `orderly_http_requests_total` and `orderly_http_request_duration_seconds`.
/// Wrap the complete application with it (outermost), so requests refused
/// by authentication or limits are counted too.
pub fn with_request_metrics(router: Router, metrics: Arc<orderly_engine::metrics::Metrics>) -> Router {
    metrics.describe("orderly_http_requests_total", "HTTP requests by method, route template and status.");
    metrics.describe("orderly_http_request_duration_seconds", "HTTP request latency by method and route template.");
    router.layer(axum::middleware::from_fn_with_state(metrics, track_request))
}

async fn track_request(
    State(m): State<Arc<orderly_engine::metrics::Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_owned();
    let route = route_template(req.uri().path());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    m.inc("orderly_http_requests_total", &[("method", &method), ("route", route), ("status", &status)], 1);
    m.observe(
        "orderly_http_request_duration_seconds",
        &[("method", &method), ("route", route)],
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Route templates (the OpenAPI document's paths, which a test keeps equal
/// to this router's), as segments, most literal first.
static TEMPLATES: std::sync::LazyLock<Vec<(&'static str, Vec<&'static str>)>> = std::sync::LazyLock::new(|| {
    let doc: Value = serde_json::from_str(crate::openapi::OPENAPI_JSON).expect("the embedded OpenAPI document parses");
    let mut out: Vec<(&'static str, Vec<&'static str>)> = doc["paths"]
        .as_object()
        .map(|paths| {
            paths
                .keys()
                .map(|p| {
                    let p: &'static str = Box::leak(p.clone().into_boxed_str());
                    (p, p.split('/').collect())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(_, segs)| std::cmp::Reverse(segs.iter().filter(|s| !s.starts_with('{')).count()));
    out
});

/// The route template a path matches, or `unmatched`.
pub fn route_template(path: &str) -> &'static str {
    let segs: Vec<&str> = path.split('/').collect();
    TEMPLATES
        .iter()
        .find(|(_, t)| {
            t.len() == segs.len() && t.iter().zip(&segs).all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
        })
        .map_or("unmatched", |(p, _)| *p)
}

fn json_response(status: StatusCode, body: impl serde::Serialize) -> Response {
    (status, ApiJson(body)).into_response()
}

fn parse<T: TryFrom<String>>(kind: &str, raw: String) -> Result<T, Problem>
where
    T::Error: std::fmt::Display,
{
    T::try_from(raw).map_err(|e| bad_id(kind, e))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, json!({"status": "ok"}))
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.engine.orders_by_state().await {
        Ok(_) => json_response(StatusCode::OK, json!({"status": "ready"})),
        Err(e) => problem(e).into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let e = &s.engine;
    let m = &e.runtime.metrics;
    if let Ok(counts) = e.orders_by_state().await {
        for st in OrderState::ALL {
            let n = counts.iter().find(|(k, _)| k == st.as_str()).map_or(0, |(_, n)| *n);
            m.set("orderly_orders", &[("state", st.as_str())], n as f64);
        }
    }
    // Refreshes the alert gauges and the manual-adjustment ratio.
    if let Err(err) = crate::ops::summary(e).await {
        tracing::debug!(error = %err, "ops summary unavailable for /metrics");
    }
    for lag in e.runtime.consumer_lag().await {
        m.set(
            "orderly_consumer_lag_seconds",
            &[("consumer", lag.consumer), ("producer", lag.producer)],
            lag.lag_seconds,
        );
        m.set(
            "orderly_consumer_backlog_events",
            &[("consumer", lag.consumer), ("producer", lag.producer)],
            lag.backlog as f64,
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocationBody {
    zone: Zone,
    kind: LocationKind,
}

async fn put_location(
    State(s): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Result<ApiJson<LocationBody>, Problem>,
) -> ApiResult {
    who.require(OPS)?;
    let ApiJson(b) = body?;
    let id: LocationId = parse("location", id)?;
    let loc = s.engine.put_location(Location { id, zone: b.zone, kind: b.kind }).await.map_err(problem)?;
    Ok(json_response(StatusCode::OK, loc))
}

async fn list_locations(State(s): State<AppState>, who: Principal) -> ApiResult {
    who.require(ANY)?;
    Ok(json_response(StatusCode::OK, json!({"locations": s.engine.locations().await.map_err(problem)?})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptBody {
    location: LocationId,
    sku: Sku,
    qty: Qty,
}

async fn receive(
    State(s): State<AppState>,
    who: Principal,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<ReceiptBody>, Problem>,
) -> ApiResult {
    who.require(WAREHOUSE)?;
    let ApiJson(b) = body?;
    let key = crate::idempotency::scoped_key(&who, &headers);
    let inv = s.engine.receive_keyed(b.location, b.sku, b.qty, key).await.map_err(problem)?;
    Ok(json_response(StatusCode::CREATED, inv))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    sku: Sku,
    location: LocationId,
    delta: i64,
    reason: String,
}

async fn adjust(
    State(s): State<AppState>,
    who: Principal,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<AdjustBody>, Problem>,
) -> ApiResult {
    who.require(OPS)?;
    let ApiJson(b) = body?;
    if b.delta == 0 {
        return Err(Problem::unprocessable("delta must not be 0"));
    }
    let key = crate::idempotency::scoped_key(&who, &headers);
    let inv = s
        .engine
        .adjust_keyed(b.sku, b.location, b.delta, None, b.reason, who.name.clone(), key)
        .await
        .map_err(problem)?;
    Ok(json_response(StatusCode::CREATED, inv))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CycleCountBody {
    sku: Sku,
    location: LocationId,
    counted: u32,
}

async fn cycle_count(
    State(s): State<AppState>,
    who: Principal,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<CycleCountBody>, Problem>,
) -> ApiResult {
    who.require(&[Role::Warehouse, Role::Ops])?;
    let ApiJson(b) = body?;
    let key = crate::idempotency::scoped_key(&who, &headers);
    let inv = s
        .engine
        .adjust_keyed(b.sku, b.location, 0, Some(u64::from(b.counted)), "cycle_count".into(), who.name.clone(), key)
        .await
        .map_err(problem)?;
    Ok(json_response(StatusCode::CREATED, inv))
}

async fn get_inventory(State(s): State<AppState>, who: Principal, Path(sku): Path<String>) -> ApiResult {
    who.require(ANY)?;
    let sku: Sku = parse("sku", sku)?;
    Ok(json_response(StatusCode::OK, s.engine.inventory(sku).await.map_err(problem)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    sku: Sku,
    qty: Qty,
    #[serde(default)]
    location: Option<LocationId>,
}

async fn create_hold(
    State(s): State<AppState>,
    who: Principal,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<HoldBody>, Problem>,
) -> ApiResult {
    who.require(WRITE_ORDERS)?;
    let ApiJson(b) = body?;
    let key = crate::idempotency::scoped_key(&who, &headers);
    let hold = s.engine.create_hold_keyed(b.sku, b.qty, b.location, key).await.map_err(problem)?;
    Ok(json_response(StatusCode::CREATED, hold))
}

async fn create_order(
    State(s): State<AppState>,
    who: Principal,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<OrderRequest>, Problem>,
) -> ApiResult {
    who.require(WRITE_ORDERS)?;
    let ApiJson(b) = body?;
    let key = crate::idempotency::scoped_key(&who, &headers);
    let order = s.engine.create_order_keyed(b, key).await.map_err(problem)?;
    let location = format!("/v1/orders/{}", order.id());
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], ApiJson(order)).into_response())
}

async fn get_order(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(ANY)?;
    let id: OrderId = parse("order", id)?;
    Ok(json_response(StatusCode::OK, s.engine.order(&id).await.map_err(problem)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    after: Option<String>,
}

async fn list_orders(State(s): State<AppState>, who: Principal, Query(q): Query<ListQuery>) -> ApiResult {
    who.require(ANY)?;
    let state = match q.state.as_deref() {
        None => None,
        Some(raw) => {
            Some(OrderState::parse(raw).ok_or_else(|| Problem::unprocessable(format!("unknown state {raw:?}")))?)
        }
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=orderly_engine::app::LIST_LIMIT_MAX).contains(&limit) {
        return Err(Problem::unprocessable(format!("limit must be 1..={}", orderly_engine::app::LIST_LIMIT_MAX)));
    }
    let orders = s.engine.orders(state, q.after.as_deref(), limit).await.map_err(problem)?;
    let next = (orders.len() == limit as usize).then(|| orders.last().map(|o| o.id().to_string())).flatten();
    Ok(json_response(StatusCode::OK, json!({"orders": orders, "next": next})))
}

async fn order_events(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(ANY)?;
    let id: OrderId = parse("order", id)?;
    let events: Vec<_> = s.engine.order_events(&id).await.map_err(problem)?.into_iter().map(|r| r.envelope).collect();
    Ok(json_response(StatusCode::OK, events))
}

/// An optional JSON body: empty means the defaults.
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Problem::malformed_json(e.to_string()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel_order(
    State(s): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    who.require(&[Role::Storefront, Role::Ops])?;
    let id: OrderId = parse("order", id)?;
    let reason = optional_json::<ReasonBody>(&body)?.reason.unwrap_or_else(|| format!("canceled by {}", who.name));
    Ok(json_response(StatusCode::OK, s.engine.cancel_order(id, reason).await.map_err(problem)?))
}

async fn request_return(
    State(s): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    who.require(&[Role::Storefront, Role::Ops])?;
    let id: OrderId = parse("order", id)?;
    let reason = optional_json::<ReasonBody>(&body)?.reason.unwrap_or_else(|| "customer return".into());
    Ok(json_response(StatusCode::OK, s.engine.request_return(id, reason).await.map_err(problem)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReturnReceivedBody {
    location: LocationId,
}

async fn return_received(
    State(s): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Result<ApiJson<ReturnReceivedBody>, Problem>,
) -> ApiResult {
    who.require(WAREHOUSE)?;
    let ApiJson(b) = body?;
    let id: OrderId = parse("order", id)?;
    Ok(json_response(StatusCode::OK, s.engine.record_return(id, b.location).await.map_err(problem)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NextQuery {
    location: String,
}

async fn next_pick(State(s): State<AppState>, who: Principal, Query(q): Query<NextQuery>) -> ApiResult {
    who.require(WAREHOUSE)?;
    let location: LocationId = parse("location", q.location)?;
    match s.engine.next_pick(location).await.map_err(problem)? {
        Some(task) => Ok(json_response(StatusCode::OK, task)),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmBody {
    instruction_key: String,
    qty: Qty,
}

async fn confirm_pick(
    State(s): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Result<ApiJson<ConfirmBody>, Problem>,
) -> ApiResult {
    who.require(WAREHOUSE)?;
    let ApiJson(b) = body?;
    let id: PickId = parse("pick", id)?;
    let outcome = s.engine.confirm_pick(id, b.instruction_key, b.qty).await.map_err(problem)?;
    Ok(json_response(StatusCode::OK, pick_outcome(outcome)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShortBody {
    instruction_key: String,
    qty_found: Qty,
    reason: String,
}

async fn short_pick(
    State(s): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Result<ApiJson<ShortBody>, Problem>,
) -> ApiResult {
    who.require(WAREHOUSE)?;
    let ApiJson(b) = body?;
    let id: PickId = parse("pick", id)?;
    if b.reason.trim().is_empty() || b.reason.len() > 500 {
        return Err(Problem::unprocessable("reason must be 1..=500 characters"));
    }
    let outcome = s.engine.short_pick(id, b.instruction_key, b.qty_found, b.reason).await.map_err(problem)?;
    Ok(json_response(StatusCode::OK, pick_outcome(outcome)))
}

fn pick_outcome(o: orderly_engine::services::picking::PickOutcome) -> Value {
    let mut v = serde_json::to_value(&o.task).unwrap_or_else(|_| json!({}));
    if let Value::Object(map) = &mut v {
        map.insert("duplicate".into(), json!(o.duplicate));
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackBody {
    order_id: OrderId,
    location: LocationId,
    pick_ids: Vec<PickId>,
}

async fn pack(State(s): State<AppState>, who: Principal, body: Result<ApiJson<PackBody>, Problem>) -> ApiResult {
    who.require(WAREHOUSE)?;
    let ApiJson(b) = body?;
    let package = s.engine.pack(b.order_id, b.location, b.pick_ids).await.map_err(problem)?;
    Ok(json_response(StatusCode::CREATED, package))
}

async fn summary(State(s): State<AppState>, who: Principal) -> ApiResult {
    who.require(ANY)?;
    Ok(json_response(StatusCode::OK, crate::ops::summary(&s.engine).await.map_err(problem)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    #[serde(default)]
    limit: Option<u32>,
}

async fn dead_letters(State(s): State<AppState>, who: Principal, Query(q): Query<DeadLetterQuery>) -> ApiResult {
    who.require(ANY)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(json_response(StatusCode::OK, json!({"dead_letters": s.engine.dead_letters(limit).await.map_err(problem)?})))
}

async fn get_shipment(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(ANY)?;
    let id: ShipmentId = parse("shipment", id)?;
    Ok(json_response(StatusCode::OK, s.engine.shipment(id).await.map_err(problem)?.view()))
}

async fn shipment_delivered(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(&[Role::Carrier])?;
    let id: ShipmentId = parse("shipment", id)?;
    Ok(json_response(StatusCode::OK, s.engine.delivered(id).await.map_err(problem)?.view()))
}

/// Largest rate table accepted through the API.
const RATES_UPLOAD_MAX: usize = 1 << 20;

async fn upload_rates(State(s): State<AppState>, who: Principal, body: axum::body::Bytes) -> ApiResult {
    who.require(OPS)?;
    if body.len() > RATES_UPLOAD_MAX {
        return Err(Problem::payload_too_large(Some(RATES_UPLOAD_MAX)));
    }
    let text = String::from_utf8(body.to_vec()).map_err(|_| Problem::bad_request("a rate table is UTF-8 text"))?;
    Ok(json_response(StatusCode::OK, s.engine.upload_rates(text).await.map_err(problem)?))
}

async fn rates_info(State(s): State<AppState>, who: Principal) -> ApiResult {
    who.require(ANY)?;
    Ok(json_response(StatusCode::OK, s.engine.shipping_summary().await.map_err(problem)?.rates))
}

async fn replay_dead_letter(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(OPS)?;
    s.engine.replay_dead_letter(&id).await.map_err(problem)?;
    Ok(json_response(StatusCode::OK, json!({"id": id, "replayed": true})))
}

async fn discard_dead_letter(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(OPS)?;
    s.engine.discard_dead_letter(&id).await.map_err(problem)?;
    Ok(json_response(StatusCode::OK, json!({"id": id, "discarded": true})))
}

/// Query of `GET /v1/ops/notifications/failed`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailedNotificationsQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// Notifications that failed after every attempt (a page, oldest id first).
async fn failed_notifications(
    State(s): State<AppState>,
    who: Principal,
    Query(q): Query<FailedNotificationsQuery>,
) -> ApiResult {
    who.require(ANY)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 500);
    let page = s.engine.failed_notifications(q.after, limit).await.map_err(problem)?;
    let next = (page.len() == limit as usize).then(|| page.last().map(|n| n.id.clone())).flatten();
    Ok(json_response(StatusCode::OK, json!({"notifications": page, "next": next})))
}

/// Sends a failed notification again (fresh attempts); the customer still
/// gets it at most once.
async fn retry_notification(State(s): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult {
    who.require(OPS)?;
    Ok(json_response(StatusCode::OK, s.engine.retry_notification(id).await.map_err(problem)?))
}

/// Replays every dead letter (bounded); reports what succeeded and failed.
async fn replay_all(State(s): State<AppState>, who: Principal) -> ApiResult {
    who.require(OPS)?;
    let letters = s.engine.dead_letters(1000).await.map_err(problem)?;
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for d in letters {
        match s.engine.replay_dead_letter(&d.id).await {
            Ok(()) => replayed.push(d.id),
            Err(e) => failed.push(json!({"id": d.id, "error": e.to_string()})),
        }
    }
    Ok(json_response(StatusCode::OK, json!({"replayed": replayed, "failed": failed})))
}

async fn reconcile(State(s): State<AppState>, who: Principal) -> ApiResult {
    who.require(OPS)?;
    let report = s.engine.reconcile(&who.name).await.map_err(problem)?;
    Ok(json_response(StatusCode::OK, report))
}

async fn last_reconcile(State(s): State<AppState>, who: Principal) -> ApiResult {
    who.require(ANY)?;
    match s.engine.last_reconcile() {
        Some(report) => Ok(json_response(StatusCode::OK, report)),
        None => Err(problem(orderly_engine::services::common::ApiError::NotFound(
            "reconciliation report (none has run since the engine started)".into(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::route_template;

    #[test]
    fn paths_map_to_their_route_template() {
        assert_eq!(route_template("/v1/orders/o-123"), "/v1/orders/{id}");
        assert_eq!(route_template("/v1/orders/o-123/cancel"), "/v1/orders/{id}/cancel");
        assert_eq!(route_template("/v1/inventory/receipts"), "/v1/inventory/receipts");
        assert_eq!(route_template("/v1/inventory/SKU-1"), "/v1/inventory/{sku}");
        assert_eq!(route_template("/v1/ops/dead-letters/replay"), "/v1/ops/dead-letters/replay");
        assert_eq!(route_template("/v1/ops/dead-letters/e1/replay"), "/v1/ops/dead-letters/{id}/replay");
        assert_eq!(route_template("/v1/ops/reconcile/last"), "/v1/ops/reconcile/last");
        assert_eq!(route_template("/"), "/");
        assert_eq!(route_template("/metrics"), "/metrics");
        assert_eq!(route_template("/v1/orders/"), "unmatched");
        assert_eq!(route_template("/nope/x/y"), "unmatched");
    }
}
