//! The Orderly application: settings, adapters and the engine wired
//! together behind the HTTP API. `main.rs` parses the command line and calls
//! into here; tests start [`Application`] on port 0.

pub mod adapters;
pub mod bench;
pub mod demo;
pub mod settings;
pub mod soak;

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
