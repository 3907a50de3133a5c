//! The Orderly application: settings, adapters and the engine wired
//! together behind the HTTP API. `main.rs` parses the command line and calls
//! into here; tests start [`Application`] on port 0.

pub mod adapters;
pub mod bench;
pub mod demo;
pub mod memory;
pub mod settings;
pub mod simulate;
pub mod soak;
pub mod telemetry;

use anyhow::{Context, Result};
use orderly_engine::app::Engine;
use orderly_engine::broker::Topology;
use orderly_engine::config::Settings;
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::partitions::{Ownership, SHAREABLE};
use orderly_engine::ports::SystemClock;
use orderly_engine::runtime::Sharing;
use orderly_engine::versioned::VersionedStore;
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

/// The distributed mode: a broker between processes, and which services
/// this process runs.
#[derive(Debug, Clone, Default)]
pub struct Distributed {
    /// A `nats://` URL: events travel through NATS JetStream.
    pub bus: Option<String>,
    /// Names the streams (one deployment per prefix).
    pub bus_prefix: Option<String>,
    /// Comma-separated services to run (default: all).
    pub services: Option<String>,
}

/// The services this process shares with other replicas: the shareable
/// ones it runs, in distributed mode (PostgreSQL and a broker).
fn shared_services(location: &adapters::StoreLocation, topology: &Topology) -> Vec<&'static str> {
    let distributed = matches!(location, adapters::StoreLocation::Postgres(_)) && topology.broker.is_some();
    SHAREABLE.into_iter().filter(|s| distributed && topology.runs(s)).collect()
}

/// A shared service's sharing, and its store wrapped to version its commits.
fn sharing(
    store: Arc<dyn orderly_engine::ports::Store>,
    ownership: Arc<Ownership>,
) -> (Sharing, Arc<dyn orderly_engine::ports::Store>) {
    let versioned = Arc::new(VersionedStore::new(store));
    (Sharing { ownership, versioned: versioned.clone() }, versioned)
}

/// The default stream prefix.
pub const DEFAULT_BUS_PREFIX: &str = "orderly";

impl Distributed {
    /// Checks the combination and connects to the broker.
    pub async fn topology(&self, store: &adapters::StoreLocation) -> Result<Topology> {
        let services = self
            .services
            .as_deref()
            .map(Topology::parse_services)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--services: {e}"))?;
        let Some(url) = &self.bus else {
            anyhow::ensure!(
                services.is_none(),
                "--services needs --bus nats://…: services in other processes are reached through the broker"
            );
            return Ok(Topology::default());
        };
        anyhow::ensure!(url.starts_with("nats://"), "--bus must be a nats:// URL, not {url:?}");
        anyhow::ensure!(
            matches!(store, adapters::StoreLocation::Postgres(_)),
            "--bus needs --store postgres://…: every process must reach every service's state"
        );
        let prefix = self.bus_prefix.as_deref().unwrap_or(DEFAULT_BUS_PREFIX);
        let bus = orderly_bus_nats::NatsBus::connect(orderly_bus_nats::NatsOptions::new(url, prefix))
            .await
            .context("cannot use the NATS bus")?;
        if let Err(e) = bus.ensure_streams().await {
            tracing::warn!(error = %e, "NATS streams not ready yet; services start and the outbox buffers until it is");
        }
        tracing::info!(bus = %url, prefix, services = ?services, "distributed mode");
        Ok(Topology { broker: Some(Arc::new(bus)), services, ..Topology::default() })
    }
}

/// A built, listening application.
pub struct Application {
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    keys: SharedKeyRing,
    leases: Option<LeaseGuard>,
    /// Membership in the replicas of shared services (ends when dropped).
    members: Vec<AbortOnDrop>,
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The leases on the services this process runs, watched: if the session
/// holding them dies, another replica may take over, so this process stops
/// at once (fail-stop) rather than run on beside it.
struct LeaseGuard {
    task: tokio::task::JoinHandle<()>,
}

/// How often the leases' session is checked.
const LEASE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

impl LeaseGuard {
    async fn take(url: &str, topology: &Topology) -> Result<LeaseGuard> {
        let mut leases = Vec::new();
        let alone = |s: &&str| topology.runs(s) && !topology.sharing.contains_key(*s);
        for name in orderly_engine::engine::SERVICES.into_iter().filter(alone) {
            let lease = orderly_store_postgres::Lease::acquire(url, name, || {
                println!("standby: waiting for the {name} lease (another replica runs {name})");
                tracing::warn!(service = name, "standby: another replica holds the lease; waiting to take over");
            })
            .await
            .with_context(|| format!("cannot take the {name} lease"))?;
            leases.push(lease);
        }
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_CHECK).await;
                for lease in &mut leases {
                    if let Err(e) = lease.check().await {
                        tracing::error!(service = lease.service(), error = %e,
                            "lost the service lease: stopping so a standby can take over");
                        eprintln!("lost the {} lease ({e}): stopping", lease.service());
                        std::process::exit(75);
                    }
                }
            }
        });
        Ok(LeaseGuard { task })
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // The task owns the leases: aborting it drops them, which ends their sessions.
        self.task.abort();
    }
}

impl Application {
    /// Opens the stores, starts the engine and binds the listener.
    pub async fn build(settings: Settings, options: &RunOptions) -> Result<Application> {
        Application::build_with(settings, options, &Distributed::default()).await
    }

    /// Like [`Application::build`], in the distributed mode `dist` describes:
    /// this process runs only the services it names, and every route is
    /// served; a command for a service that runs elsewhere answers 503
    /// problem+json naming it, reads work in every process.
    pub async fn build_with(settings: Settings, options: &RunOptions, dist: &Distributed) -> Result<Application> {
        orderly_carrier::install_crypto_provider();
        let keys = SharedKeyRing::new(KeyRing::from_settings(&settings.auth).context("invalid [auth] keys")?);
        if settings.auth.keys.is_empty() {
            tracing::warn!(
                "no API keys configured: every /v1 request will be refused (create one with `orderly keys new --role ops`)"
            );
        }
        let location = adapters::StoreLocation::from_args(options.store.as_deref(), &options.data_dir)?;
        let mut topology = dist.topology(&location).await?;
        let shared = shared_services(&location, &topology);
        // Placeholders until the stores are open: the leases skip these.
        for name in &shared {
            let placeholder: Arc<dyn orderly_engine::ports::Store> = Arc::new(MemoryStore::new());
            topology.sharing.insert(name, sharing(placeholder, Arc::new(Ownership::shared())).0);
        }
        let leases = match &location {
            adapters::StoreLocation::Postgres(url) => Some(LeaseGuard::take(url, &topology).await?),
            adapters::StoreLocation::Sqlite(_) => None,
        };
        let (mut adapters, api_store) = location.open_for(options.durability, &topology).await?;
        let mut members = Vec::new();
        if let (adapters::StoreLocation::Postgres(url), Some(broker)) = (&location, topology.broker.clone()) {
            for name in shared {
                let ownership = Arc::new(Ownership::shared());
                let (share, store) = sharing(adapters.stores[name].clone(), ownership.clone());
                adapters.stores.insert(name, store);
                topology.sharing.insert(name, share);
                let task = orderly_store_postgres::share_partitions(url, name, broker.partitions(), ownership)
                    .await
                    .with_context(|| format!("cannot join the {name} replicas"))?;
                tracing::info!(service = name, "sharing the work with any other replica of {name}");
                members.push(AbortOnDrop(task));
            }
        }
        let carriers = adapters::carriers(&settings)?;
        let notifier = adapters::notifier(&settings)?;
        let rates = match &settings.carriers.rates_dir {
            Some(dir) => adapters::load_rates(std::path::Path::new(dir))?,
            None => None,
        };
        let limits = Limits::from_settings(&settings.http);
        let engine = Arc::new(
            Engine::start_with(settings, adapters, carriers, rates, notifier, topology)
                .await
                .context("engine failed to start")?,
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
        Ok(Application { engine, listener, app, limits, keys, leases, members })
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
        drop(self.members);
        drop(self.leases);
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
