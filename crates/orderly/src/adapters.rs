//! Wiring the engine's ports to real technology for `serve` and `demo`:
//! SQLite stores in the data directory, HTTP carriers, the webhook sender.

use anyhow::{Context, Result};
use async_trait::async_trait;
use orderly_carrier::signing::WebhookSender;
use orderly_carrier::{CarrierClient, CarrierError};
use orderly_engine::config::Settings;
use orderly_engine::engine::{Adapters, SERVICES};
use orderly_engine::ports::{
    CarrierApi, CarrierCallError, Clock, Label, LabelRequest, SeededRng, Store, SystemClock, WebhookSink,
};
use orderly_store_sqlite::{Durability, SqliteStore};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One SQLite file per service under `data_dir`.
pub fn sqlite_adapters(data_dir: &Path, durability: Durability) -> Result<Adapters> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let mut stores: HashMap<&'static str, Arc<dyn Store>> = HashMap::new();
    for name in SERVICES {
        let path = data_dir.join(format!("{name}.db"));
        let store = SqliteStore::open(&path, durability).with_context(|| format!("cannot open {}", path.display()))?;
        stores.insert(name, Arc::new(store));
    }
    Ok(Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::from_entropy()) })
}

/// Connections per service schema when one process runs every service.
const PG_POOL_PER_SERVICE: u32 = 8;
/// Connections per schema of a service this process runs, when it runs only some.
const PG_POOL_RUN_HERE: u32 = 4;
/// Connections per schema of a service that runs elsewhere (reads only).
const PG_POOL_ELSEWHERE: u32 = 1;

/// One PostgreSQL schema per service (`orderly_orders`, …) in the database at `url`.
pub async fn postgres_adapters(url: &str) -> Result<Adapters> {
    postgres_adapters_sized(url, |_| PG_POOL_PER_SERVICE).await
}

/// Like [`postgres_adapters`], with `pool(service)` connections per schema.
/// Several processes share one server's `max_connections`: a process gives
/// the services it does not run one connection each.
pub async fn postgres_adapters_sized(url: &str, pool: impl Fn(&str) -> u32) -> Result<Adapters> {
    let mut stores: HashMap<&'static str, Arc<dyn Store>> = HashMap::new();
    for name in SERVICES {
        let store = orderly_store_postgres::PgStore::connect(url, &format!("orderly_{name}"), pool(name))
            .await
            .with_context(|| format!("cannot open the {name} store in PostgreSQL"))?;
        stores.insert(name, Arc::new(store));
    }
    Ok(Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::from_entropy()) })
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// SQLite files in a directory (embedded mode).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database (distributed mode).
    Postgres(String),
}

impl StoreLocation {
    /// `--store` (a `postgres://` URL) wins over `--data-dir`.
    pub fn from_args(store: Option<&str>, data_dir: &Path) -> Result<StoreLocation> {
        match store {
            None => Ok(StoreLocation::Sqlite(data_dir.to_owned())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreLocation::Postgres(url.to_owned()))
            }
            Some(other) => {
                anyhow::bail!("--store must be a postgres:// URL (or omitted for SQLite in --data-dir), not {other:?}")
            }
        }
    }

    /// Opens every service's store, and the API's own (idempotency keys).
    pub async fn open(&self, durability: Durability) -> Result<(Adapters, Arc<dyn Store>)> {
        self.open_for(durability, &orderly_engine::broker::Topology::default()).await
    }

    /// Like [`StoreLocation::open`], with PostgreSQL pools sized for the
    /// services `topology` runs in this process.
    pub async fn open_for(
        &self,
        durability: Durability,
        topology: &orderly_engine::broker::Topology,
    ) -> Result<(Adapters, Arc<dyn Store>)> {
        let all = topology.services.is_none();
        let pool = |name: &str| match (all, topology.runs(name)) {
            (true, _) => PG_POOL_PER_SERVICE,
            (false, true) => PG_POOL_RUN_HERE,
            (false, false) => PG_POOL_ELSEWHERE,
        };
        let api_pool = if all { PG_POOL_PER_SERVICE } else { PG_POOL_RUN_HERE };
        match self {
            StoreLocation::Sqlite(dir) => {
                let adapters = sqlite_adapters(dir, durability)?;
                let api = SqliteStore::open(&dir.join("api.db"), durability).context("cannot open the API store")?;
                Ok((adapters, Arc::new(api)))
            }
            StoreLocation::Postgres(url) => {
                let adapters = postgres_adapters_sized(url, pool).await?;
                let api = orderly_store_postgres::PgStore::connect(url, "orderly_api", api_pool)
                    .await
                    .context("cannot open the API store in PostgreSQL")?;
                Ok((adapters, Arc::new(api)))
            }
        }
    }
}

/// A carrier reached over HTTP.
pub struct HttpCarrier(pub CarrierClient);

#[async_trait]
impl CarrierApi for HttpCarrier {
    async fn create_label(&self, req: &LabelRequest) -> Result<Label, CarrierCallError> {
        let wire = orderly_carrier::LabelRequest {
            carrier: req.carrier.clone(),
            shipment_id: req.shipment_id.clone(),
            zone: req.zone.clone(),
            weight_g: req.weight_g,
            idempotency_key: req.idempotency_key.clone(),
        };
        match self.0.create_label(&wire).await {
            Ok(l) => Ok(Label { tracking_number: l.tracking_number, carrier: l.carrier, cost: l.cost }),
            Err(e @ CarrierError::Rejected { .. }) => Err(CarrierCallError::Rejected(e.to_string())),
            Err(e) => Err(CarrierCallError::Unavailable(e.to_string())),
        }
    }
}

/// The carriers configured in `[carriers]`.
pub fn carriers(settings: &Settings) -> Result<HashMap<String, Arc<dyn CarrierApi>>> {
    let timeout = Duration::from_millis(settings.shipping.carrier_timeout.0.max(1) as u64);
    let mut out: HashMap<String, Arc<dyn CarrierApi>> = HashMap::new();
    for ep in &settings.carriers.endpoints {
        let client =
            CarrierClient::new(&ep.url, timeout).with_context(|| format!("carrier {} at {}", ep.id, ep.url))?;
        out.insert(ep.id.clone(), Arc::new(HttpCarrier(client)));
    }
    Ok(out)
}

/// Notifications to a webhook, signed; or to the log when none is configured.
pub enum Notifier {
    /// POST to a webhook.
    Webhook(WebhookSender, Arc<dyn Clock>),
    /// Write to the log.
    Log,
}

#[async_trait]
impl WebhookSink for Notifier {
    async fn deliver(&self, event_id: &str, body: &[u8]) -> Result<(), String> {
        match self {
            Notifier::Webhook(sender, clock) => {
                sender.send(event_id, body, clock.now().millis() / 1000).await.map_err(|e| e.to_string())
            }
            Notifier::Log => {
                tracing::info!(event_id, body = %String::from_utf8_lossy(body), "notification");
                Ok(())
            }
        }
    }
}

/// The notifier configured in `[notifications]`.
pub fn notifier(settings: &Settings) -> Result<Arc<dyn WebhookSink>> {
    Ok(match &settings.notifications.webhook_url {
        Some(url) => {
            let sender =
                WebhookSender::new(url, settings.notifications.webhook_secret.as_deref(), Duration::from_secs(5))
                    .with_context(|| format!("webhook {url}"))?;
            Arc::new(Notifier::Webhook(sender, Arc::new(SystemClock)))
        }
        None => Arc::new(Notifier::Log),
    })
}

/// Most rate files read from `carriers.rates_dir`.
const RATE_FILES_MAX: usize = 1000;

/// Loads every `*.csv` rate table in `dir` and returns the newest version;
/// a file that does not parse stops startup with its name and line.
pub fn load_rates(dir: &Path) -> Result<Option<orderly_domain::shipping::rates::RateTable>> {
    use orderly_domain::shipping::rates::RateTable;
    let mut newest: Option<RateTable> = None;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read carriers.rates_dir {}", dir.display()))?;
    for (i, entry) in entries.enumerate() {
        anyhow::ensure!(i < RATE_FILES_MAX, "more than {RATE_FILES_MAX} files in {}", dir.display());
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("csv") {
            continue;
        }
        let table = read_rates(&path)?;
        if newest.as_ref().is_none_or(|n| table.version() > n.version()) {
            newest = Some(table);
        }
    }
    if let Some(t) = &newest {
        tracing::info!(version = %t.version(), "carrier rates loaded");
    }
    Ok(newest)
}

/// Reads and validates one rate table file.
pub fn read_rates(path: &Path) -> Result<orderly_domain::shipping::rates::RateTable> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    orderly_domain::shipping::rates::RateTable::parse(&text)
        .with_context(|| format!("invalid rate table {}", path.display()))
}
