//! Shared test fixtures: a small API wrapped by the real layers, the keys it
//! accepts, a settable clock, and helpers to call it in-process or over TCP.

#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::LOCATION;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use orderly_domain::Timestamp;
use orderly_engine::config::{ApiKey, AuthSettings};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::Clock;
use orderly_http::auth::hash_key;
use orderly_http::{
    ApiJson, HttpLayers, Idempotency, IdempotencyConfig, KeyRing, Limits, Principal, Problem, RequireRoles, Role,
    SharedKeyRing,
};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use tower::ServiceExt;

pub const SHOP_KEY: &str = "ok_shop_test_key";
pub const OTHER_SHOP_KEY: &str = "ok_other_shop_test_key";
pub const WAREHOUSE_KEY: &str = "ok_warehouse_test_key";
pub const OPS_KEY: &str = "ok_ops_test_key";
pub const VIEWER_KEY: &str = "ok_viewer_test_key";

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Test handlers' shared state.
#[derive(Clone, Default)]
pub struct Handlers {
    /// How many times a mutating handler ran (replays do not count).
    pub executions: Arc<AtomicU64>,
    /// `/v1/slow` waits for this before answering.
    pub release: Arc<Notify>,
    /// Notified when `/v1/slow` has started.
    pub started: Arc<Notify>,
}

/// The test application.
pub struct TestApp {
    pub router: Router,
    pub keys: SharedKeyRing,
    pub store: Arc<MemoryStore>,
    pub clock: Arc<ManualClock>,
    pub handlers: Handlers,
    pub idempotency: Idempotency,
}

pub fn key(name: &str, role: &str, token: &str) -> ApiKey {
    ApiKey { name: name.to_string(), role: role.to_string(), hash: hash_key(token) }
}

pub fn auth_settings() -> AuthSettings {
    AuthSettings {
        keys: vec![
            key("shop", "storefront", SHOP_KEY),
            key("other-shop", "storefront", OTHER_SHOP_KEY),
            key("wh-1", "warehouse", WAREHOUSE_KEY),
            key("console", "ops", OPS_KEY),
            key("dashboard", "viewer", VIEWER_KEY),
        ],
        open_probes: true,
    }
}

pub fn test_limits() -> Limits {
    Limits {
        body_limit_bytes: 1024,
        request_timeout_ms: 2_000,
        max_in_flight_requests: 64,
        max_connections: 64,
        shutdown_drain_ms: 2_000,
        header_read_timeout_ms: 2_000,
    }
}

pub fn app() -> TestApp {
    app_with(test_limits())
}

pub fn app_with(limits: Limits) -> TestApp {
    let keys = SharedKeyRing::new(KeyRing::from_settings(&auth_settings()).expect("valid test keys"));
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::default());
    let idempotency = Idempotency::new(store.clone(), clock.clone(), IdempotencyConfig::default());
    let handlers = Handlers::default();
    let router = router(keys.clone(), idempotency.clone(), handlers.clone(), limits);
    TestApp { router, keys, store, clock, handlers, idempotency }
}

/// The test routes wrapped by the real layers.
pub fn router(keys: SharedKeyRing, idempotency: Idempotency, handlers: Handlers, limits: Limits) -> Router {
    HttpLayers { keys, idempotency: Some(idempotency), limits }.apply(routes(handlers))
}

#[derive(Debug, serde::Deserialize)]
struct NewOrder {
    sku: String,
    qty: u32,
}

fn routes(handlers: Handlers) -> Router {
    let warehouse = Router::new()
        .route("/v1/picks/next", get(|| async { "task" }))
        .route_layer(RequireRoles::new(&[Role::Warehouse]));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/adjustments", post(adjust))
        .route("/v1/slow", post(slow))
        .route("/v1/flaky", post(flaky))
        .route("/v1/panic", get(|| async { panic_now() }))
        .merge(warehouse)
        .with_state(handlers)
}

fn panic_now() -> &'static str {
    panic!("handler bug")
}

async fn create_order(
    State(handlers): State<Handlers>,
    principal: Principal,
    ApiJson(order): ApiJson<NewOrder>,
) -> Result<Response, Problem> {
    principal.require(&[Role::Storefront])?;
    if order.qty == 0 {
        return Err(Problem::unprocessable("qty must be at least 1"));
    }
    let n = handlers.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let id = format!("ord-{n}");
    let body = json!({"id": id, "sku": order.sku, "qty": order.qty, "by": principal.name});
    Ok((StatusCode::CREATED, [(LOCATION, format!("/v1/orders/{id}"))], ApiJson(body)).into_response())
}

async fn get_order(
    principal: Principal,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<ApiJson<Value>, Problem> {
    principal.require(Role::ALL)?;
    Ok(ApiJson(json!({"id": id})))
}

async fn adjust(principal: Principal) -> Result<StatusCode, Problem> {
    principal.require(&[])?;
    Ok(StatusCode::NO_CONTENT)
}

async fn slow(State(handlers): State<Handlers>, principal: Principal) -> Result<StatusCode, Problem> {
    principal.require(&[Role::Storefront])?;
    handlers.executions.fetch_add(1, Ordering::SeqCst);
    handlers.started.notify_one();
    handlers.release.notified().await;
    Ok(StatusCode::ACCEPTED)
}

async fn flaky(State(handlers): State<Handlers>, principal: Principal) -> Result<StatusCode, Problem> {
    principal.require(&[Role::Storefront])?;
    handlers.executions.fetch_add(1, Ordering::SeqCst);
    Err(Problem::unavailable("downstream is down"))
}

/// A request builder with the usual headers.
pub fn request(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder().method(method).uri(uri)
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A JSON POST as `token`, with an optional idempotency key.
pub fn post_json(uri: &str, token: &str, idempotency_key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder =
        request("POST", uri).header("authorization", bearer(token)).header("content-type", "application/json");
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_string())).expect("valid request")
}

/// What a test looks at in a response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Asserts a problem+json answer with this status and `type` slug.
    pub fn assert_problem(&self, status: StatusCode, slug: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.header("content-type"), Some("application/problem+json"));
        let problem = self.json();
        assert_eq!(problem["type"], format!("https://orderly.dev/problems/{slug}"), "{problem}");
        assert_eq!(problem["status"], status.as_u16());
        assert!(problem["title"].as_str().is_some_and(|title| !title.is_empty()));
        assert!(problem["detail"].as_str().is_some_and(|detail| !detail.is_empty()), "{problem}");
        problem
    }
}

/// Sends one request through the router in-process.
pub async fn call(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.expect("body").to_vec();
    Answer { status: parts.status, headers: parts.headers, body }
}

/// A server on 127.0.0.1:0; dropping `shutdown` (or sending) stops it.
pub struct Server {
    pub base: String,
    pub address: SocketAddr,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub stopped: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(router: Router, limits: Limits) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let address = listener.local_addr().expect("bound address");
        let (shutdown, signal) = oneshot::channel::<()>();
        let stopped = tokio::spawn(async move {
            orderly_http::serve(listener, router, &limits, async move {
                let _ = signal.await;
            })
            .await
        });
        Server { base: format!("http://{address}"), address, shutdown: Some(shutdown), stopped }
    }

    /// Signals shutdown and waits (with a deadline) for the server to stop.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.stopped)
            .await
            .expect("server stops within the deadline")
            .expect("server task did not panic")
    }
}

pub fn client() -> reqwest::Client {
    // In a workspace build reqwest is compiled without a TLS provider of its
    // own (orderly-carrier picks ring for the whole process), and building a
    // client panics unless one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

/// Writes raw bytes to a server and reads the whole answer (the request
/// should say `connection: close`).
pub async fn raw_http(address: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    // The server may answer before reading everything; a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.expect("answer in time");
    if let Err(error) = read {
        assert!(!answer.is_empty(), "no answer: {error}");
    }
    String::from_utf8_lossy(&answer).into_owned()
}
