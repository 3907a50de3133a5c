//! Orderly's HTTP cross-cutting layer: RFC 9457 problem responses, API-key
//! authentication with roles, `Idempotency-Key` replay, limits, and serving
//! with graceful shutdown. Routes live elsewhere; this crate wraps them.
//!
//! A handler and the wiring, once every route is added:
//! ```no_run
//! use axum::{Router, http::StatusCode, routing::post};
//! use orderly_engine::{config::Settings, ports::{Store, SystemClock}};
//! use orderly_http::*;
//! use serde_json::{Value, json};
//! use std::sync::Arc;
//!
//! #[derive(serde::Deserialize)]
//! struct NewHold { sku: String, qty: u32 }
//!
//! async fn create_hold(who: Principal, ApiJson(hold): ApiJson<NewHold>) -> Result<(StatusCode, ApiJson<Value>), Problem> {
//!     who.require(&[Role::Storefront])?; // 403 problem otherwise; 401 came earlier
//!     if hold.qty == 0 {
//!         return Err(Problem::unprocessable("qty must be at least 1"));
//!     }
//!     Ok((StatusCode::CREATED, ApiJson(json!({ "sku": hold.sku, "qty": hold.qty }))))
//! }
//!
//! # async fn run(settings: Settings, store: Arc<dyn Store>) -> Result<(), Box<dyn std::error::Error>> {
//! let keys = SharedKeyRing::new(KeyRing::from_settings(&settings.auth)?);
//! let limits = Limits::from_settings(&settings.http);
//! let config = IdempotencyConfig { body_limit_bytes: limits.body_limit_bytes, ..IdempotencyConfig::default() };
//! let idempotency = Idempotency::new(store, Arc::new(SystemClock), config);
//! let routes = Router::new().route("/v1/holds", post(create_hold));
//! let app = HttpLayers { keys, idempotency: Some(idempotency), limits }.apply(routes);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! serve(listener, app, &limits, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod auth;
pub mod dashboard;
pub mod errors;
pub mod idempotency;
pub mod limits;
pub mod openapi;
pub mod ops;
pub mod problem;
pub mod routes;

pub use auth::{KeyRing, Principal, RequireRoles, Role, SharedKeyRing, require};
pub use idempotency::{Idempotency, IdempotencyConfig};
pub use limits::{Limits, serve};
pub use problem::{ApiJson, Problem};

use axum::Router;

/// Everything the cross-cutting layer needs, built once at startup.
#[derive(Debug, Clone)]
pub struct HttpLayers {
    /// The live API keys.
    pub keys: SharedKeyRing,
    /// Idempotency-key replay for mutating requests; `None` turns it off.
    pub idempotency: Option<Idempotency>,
    /// Body, time, concurrency limits.
    pub limits: Limits,
}

impl HttpLayers {
    /// Wraps a complete router, in the one order that works: problem
    /// fallbacks (404, 405), idempotency on each route, authentication
    /// around it (idempotency needs the principal), limits outermost.
    pub fn apply<S>(&self, router: Router<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let router = problem::with_fallbacks(router);
        let router = match &self.idempotency {
            Some(idempotency) => idempotency::with_idempotency(router, idempotency.clone()),
            None => router,
        };
        let router = auth::with_authentication(router, self.keys.clone());
        limits::with_limits(router, &self.limits)
    }
}
