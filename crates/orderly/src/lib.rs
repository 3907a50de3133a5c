//! The Orderly application: settings, adapters and the engine wired
//! together behind the HTTP API. `main.rs` parses the command line and calls
//! into here; tests start [`Application`] on port 0.

pub mod adapters;
pub mod bench;
pub mod demo;
pub mod settings;
pub mod telemetry;

use anyhow::{Context, Result};
use orderly_engine::app::Engine;
use orderly_engine::config::Settings;
use orderly_engine::ports::SystemClock;
use orderly_http::routes::{AppState, router};
use orderly_http::{HttpLayers, Idempotency, IdempotencyConfig, KeyRing, Limits, SharedKeyRing};
use orderly_store_sqlite::Durability;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// How to run: where the data lives and where to listen.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Directory of the embedded stores.
    pub data_dir: PathBuf,
    /// A `postgres://` URL: state in PostgreSQL (one schema per service) instead of `data_dir`.
    pub store: Option<String>,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// fsync on every commit (`full`) or at checkpoints (`normal`).
    pub durability: Durability,
}

/// A built, listening application.
pub struct Application {
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    keys: SharedKeyRing,
}

impl Application {
    /// Opens the stores, starts the engine and binds the listener.
    pub async fn build(settings: Settings, options: &RunOptions) -> Result<Application> {
        orderly_carrier::install_crypto_provider();
        let keys = SharedKeyRing::new(KeyRing::from_settings(&settings.auth).context("invalid [auth] keys")?);
        if settings.auth.keys.is_empty() {
            tracing::warn!(
                "no API keys configured: every /v1 request will be refused (create one with `orderly keys new --role ops`)"
            );
        }
        let location = adapters::StoreLocation::from_args(options.store.as_deref(), &options.data_dir)?;
        let (adapters, api_store) = location.open(options.durability).await?;
        let carriers = adapters::carriers(&settings)?;
        let notifier = adapters::notifier(&settings)?;
        let rates = match &settings.carriers.rates_dir {
            Some(dir) => adapters::load_rates(std::path::Path::new(dir))?,
            None => None,
        };
        let limits = Limits::from_settings(&settings.http);
        let engine = Arc::new(
            Engine::start(settings, adapters, carriers, rates, notifier).await.context("engine failed to start")?,
        );
        let idempotency = Idempotency::new(
            api_store,
            Arc::new(SystemClock),
            IdempotencyConfig { body_limit_bytes: limits.body_limit_bytes, ..IdempotencyConfig::default() },
        );
        let layers = HttpLayers { keys: keys.clone(), idempotency: Some(idempotency), limits };
        let app = layers.apply(router(AppState { engine: engine.clone() }));
        let app = orderly_http::routes::with_request_metrics(app, engine.runtime.metrics.clone());
        engine.spawn_reconciler();
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        Ok(Application { engine, listener, app, limits, keys })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The engine (for tests and the demo's simulated actors).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// The live key ring (a config reload swaps it).
    pub fn keys(&self) -> SharedKeyRing {
        self.keys.clone()
    }

    /// Serves until `shutdown` resolves, then drains requests and stops the
    /// engine after its batches in flight.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let addr = self.local_addr();
        tracing::info!(%addr, "listening on {addr}");
        println!("listening on {addr}");
        let served = orderly_http::serve(self.listener, self.app, &self.limits, shutdown).await;
        self.engine.shutdown().await;
        served.context("HTTP server failed")
    }
}

/// `orderly reconcile`: starts the engine over the stores (no HTTP), lets
/// every consumer catch up (at most `settle`), runs reconciliation once and
/// stops. Run it against a stopped engine's data; a running one has
/// `POST /v1/ops/reconcile`.
pub async fn reconcile_once(
    settings: Settings,
    options: &RunOptions,
    settle: std::time::Duration,
) -> Result<orderly_engine::services::reconcile::Report> {
    orderly_carrier::install_crypto_provider();
    let location = adapters::StoreLocation::from_args(options.store.as_deref(), &options.data_dir)?;
    let (adapters, _api_store) = location.open(options.durability).await?;
    let carriers = adapters::carriers(&settings)?;
    let notifier = adapters::notifier(&settings)?;
    let rates = match &settings.carriers.rates_dir {
        Some(dir) => adapters::load_rates(std::path::Path::new(dir))?,
        None => None,
    };
    let engine =
        Engine::start(settings, adapters, carriers, rates, notifier).await.context("engine failed to start")?;
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        let backlog: u64 = engine.runtime.consumer_lag().await.iter().map(|l| l.backlog).sum();
        if backlog == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(backlog, "consumers did not catch up in time; reconciling anyway");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let report = engine.reconcile("cli").await;
    engine.shutdown().await;
    report.map_err(|e| anyhow::anyhow!("reconciliation failed: {e}"))
}
