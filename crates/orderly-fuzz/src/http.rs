//! Request bodies through the real HTTP stack: the real routes and layers
//! (auth, idempotency, limits, problem mapping) over a real engine on
//! in-memory stores, called in-process. Whatever the body, the answer is a
//! 2xx JSON document or a 4xx `application/problem+json` with a `type` and
//! the same `status`: never a 5xx, never a panic.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::{LocationId, Qty, Sku, Zone};
use orderly_engine::app::Engine;
use orderly_engine::config::{ApiKey, AuthSettings, Settings};
use orderly_engine::engine::{Adapters, SERVICES};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::{SeededRng, Store, SystemClock};
use orderly_http::auth::hash_key;
use orderly_http::routes::{AppState, router};
use orderly_http::{HttpLayers, Idempotency, IdempotencyConfig, KeyRing, Limits, SharedKeyRing};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

const SHOP: &str = "ok_fuzz_storefront";
const WAREHOUSE: &str = "ok_fuzz_warehouse";
const CARRIER: &str = "ok_fuzz_carrier";
const OPS: &str = "ok_fuzz_ops";

/// The warehouse and SKU the engine is stocked with, so near-valid bodies
/// reach the engine's rules rather than stopping at "unknown location".
pub const LOCATION: &str = "WH-FUZZ";
/// The stocked SKU.
pub const SKU: &str = "SKU-FUZZ";

struct Api {
    runtime: tokio::runtime::Runtime,
    router: Router,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let router = runtime.block_on(build()).expect("the fuzzing engine starts");
        Api { runtime, router }
    })
}

async fn build() -> anyhow_free::Result<Router> {
    let mut settings = Settings::default();
    let key = |name: &str, role: &str, token: &str| ApiKey {
        name: name.to_owned(),
        role: role.to_owned(),
        hash: hash_key(token),
    };
    settings.auth = AuthSettings {
        keys: vec![
            key("shop", "storefront", SHOP),
            key("scanner", "warehouse", WAREHOUSE),
            key("carrier", "carrier", CARRIER),
            key("console", "ops", OPS),
        ],
        ..AuthSettings::default()
    };
    let keys = SharedKeyRing::new(KeyRing::from_settings(&settings.auth).map_err(|e| e.to_string())?);
    let stores: HashMap<&'static str, Arc<dyn Store>> =
        SERVICES.iter().map(|name| (*name, Arc::new(MemoryStore::new()) as Arc<dyn Store>)).collect();
    let adapters = Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::new(7)) };
    let notifier = orderly::adapters::notifier(&settings).map_err(|e| e.to_string())?;
    let limits = Limits::from_settings(&settings.http);
    let engine =
        Arc::new(Engine::start(settings, adapters, HashMap::new(), None, notifier).await.map_err(|e| e.to_string())?);
    let location = LocationId::try_from(LOCATION.to_owned()).map_err(|e| e.to_string())?;
    let zone = Zone::try_from("EU".to_owned()).map_err(|e| e.to_string())?;
    engine
        .put_location(Location { id: location.clone(), zone, kind: LocationKind::Warehouse })
        .await
        .map_err(|e| e.to_string())?;
    let sku = Sku::try_from(SKU.to_owned()).map_err(|e| e.to_string())?;
    let qty: Qty = 10_000;
    for _ in 0..10 {
        engine.receive(location.clone(), sku.clone(), qty).await.map_err(|e| e.to_string())?;
    }
    let idempotency =
        Idempotency::new(Arc::new(MemoryStore::new()), Arc::new(SystemClock), IdempotencyConfig::default());
    let layers = HttpLayers { keys, idempotency: Some(idempotency), limits };
    Ok(layers.apply(router(AppState { engine })))
}

/// Plain `Result<_, String>`: this crate has no error type of its own.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, String>;
}

/// Sends `body` as `method path` with `key` and checks the answer.
fn check(method: Method, path: &str, key: &str, content_type: &str, body: &[u8]) {
    let api = api();
    let request = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    let (status, content_type, bytes) = api.runtime.block_on(async {
        let response = api.router.clone().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = response.into_body().collect().await.expect("the body is readable").to_bytes();
        (status, content_type, bytes)
    });
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !status.is_server_error(),
        "{method} {path} answered {status}: {text}\nbody sent: {:?}",
        String::from_utf8_lossy(body)
    );
    if status == StatusCode::NO_CONTENT {
        return;
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{method} {path} answered {status} with a body that is not JSON ({e}): {text}"));
    if status.is_client_error() {
        assert!(content_type.starts_with("application/problem+json"), "{status} as {content_type:?}: {text}");
        assert!(json["type"].as_str().is_some_and(|t| !t.is_empty()), "problem without a type: {text}");
        assert_eq!(json["status"].as_u64(), Some(u64::from(status.as_u16())), "{text}");
        assert!(json["detail"].is_string(), "problem without a detail: {text}");
    } else {
        assert!(status.is_success(), "{method} {path} answered {status}: {text}");
    }
}

/// `POST /v1/orders` (storefront).
pub fn order_body(data: &[u8]) {
    check(Method::POST, "/v1/orders", SHOP, "application/json", data);
}

/// `POST /v1/holds` (storefront).
pub fn hold_body(data: &[u8]) {
    check(Method::POST, "/v1/holds", SHOP, "application/json", data);
}

/// `POST /v1/inventory/receipts` (warehouse).
pub fn receipt_body(data: &[u8]) {
    check(Method::POST, "/v1/inventory/receipts", WAREHOUSE, "application/json", data);
}

/// Every other endpoint that reads a body, chosen by the first byte.
pub const OTHER_ENDPOINTS: &[(&str, &str, &str)] = &[
    ("PUT", "/v1/locations/WH-FUZZ-2", OPS),
    ("POST", "/v1/inventory/adjustments", OPS),
    ("POST", "/v1/inventory/cycle-counts", WAREHOUSE),
    ("POST", "/v1/orders/00000000-0000-7000-8000-000000000000/cancel", SHOP),
    ("POST", "/v1/orders/00000000-0000-7000-8000-000000000000/return", SHOP),
    ("POST", "/v1/orders/00000000-0000-7000-8000-000000000000/return/received", WAREHOUSE),
    ("POST", "/v1/picks/00000000-0000-7000-8000-000000000000/confirm", WAREHOUSE),
    ("POST", "/v1/picks/00000000-0000-7000-8000-000000000000/short", WAREHOUSE),
    ("POST", "/v1/packages", WAREHOUSE),
    ("PUT", "/v1/ops/carrier-rates", OPS),
    ("POST", "/v1/shipments/00000000-0000-7000-8000-000000000000/delivered", CARRIER),
];

/// The body of any other endpoint: the first byte picks one of
/// [`OTHER_ENDPOINTS`], the rest is the body.
pub fn api_body(data: &[u8]) {
    let Some((&choice, body)) = data.split_first() else { return };
    let (method, path, key) = OTHER_ENDPOINTS[usize::from(choice) % OTHER_ENDPOINTS.len()];
    let method = Method::from_bytes(method.as_bytes()).expect("a valid method");
    let content_type = if path.ends_with("carrier-rates") { "text/csv" } else { "application/json" };
    check(method, path, key, content_type, body);
}
