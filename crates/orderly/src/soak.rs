//! `orderly bench soak`: steady load for minutes against a real engine
//! (embedded SQLite stores in a fresh directory, the HTTP API on loopback)
//! with the carrier simulator in a child process injecting faults, a webhook
//! receiver counting notifications, random cancellations and cart holds
//! left to expire, pickers and packers, a restocker, and a courier reporting each
//! shipment delivered a moment after its label (so orders settle, and the
//! engine's caches can let them go). It samples RSS and consumer lag
//! every second and at the end checks the invariants: no oversell,
//! conservation of units, every acknowledged order exists exactly once, no
//! notification delivered twice, no 5xx. Any violation is reported (and the
//! command exits 1).

use crate::{Application, RunOptions};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::HeaderMap;
use orderly_engine::config::{ApiKey, Millis, Settings};
use orderly_store_sqlite::Durability;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct Soak {
    /// How long the load lasts.
    pub duration: Duration,
    /// Orders per second.
    pub rate: u32,
}

/// One sample: (second, RSS MB, max consumer lag s, total backlog).
pub type Sample = (u64, f64, f64, u64);

/// What happened, and whether every invariant held.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// Seconds of load.
    pub seconds: f64,
    /// Target orders per second.
    pub rate: u32,
    /// Orders acknowledged (201).
    pub orders_acked: u64,
    /// Orders refused with a 4xx (409 out of stock for synchronous lines, 429 when the queue is full).
    pub orders_refused: u64,
    /// Cancellations that took effect.
    pub cancellations: u64,
    /// Cart holds created and left to expire.
    pub holds: u64,
    /// Receipts the restocker made (a location's SKU topped up when half sold).
    pub restocks: u64,
    /// Pick tasks confirmed.
    pub picks: u64,
    /// Packages packed.
    pub packages: u64,
    /// Shipments the courier reported delivered (200 from `POST /v1/shipments/{id}/delivered`).
    pub deliveries: u64,
    /// Orders that reached `delivered` (from the final states).
    pub orders_delivered: u64,
    /// Orders per final state.
    pub states: BTreeMap<String, u64>,
    /// Notifications the webhook accepted.
    pub notifications: u64,
    /// Carrier label calls that failed by injected fault.
    pub carrier_faults: u64,
    /// Resident memory at the start of the load, MB.
    pub rss_start_mb: f64,
    /// Resident memory at half time of the load, MB.
    pub rss_mid_mb: f64,
    /// Resident memory at the end of the load, MB.
    pub rss_end_mb: f64,
    /// Resident memory after the engine settled (just before shutdown), MB.
    pub rss_settled_mb: f64,
    /// Highest resident memory sampled, MB.
    pub rss_max_mb: f64,
    /// Highest consumer lag sampled (age of the oldest unprocessed event), seconds.
    pub max_lag_seconds: f64,
    /// Highest consumer backlog sampled, events.
    pub max_backlog: u64,
    /// Samples: (second, RSS MB, max lag s, total backlog).
    pub samples: Vec<Sample>,
    /// Every invariant violation found; empty means the run passed.
    pub violations: Vec<String>,
}

const SKUS: u32 = 10;
const LOCATIONS: [(&str, &str); 2] = [("WH-SOAK-EU", "EU"), ("WH-SOAK-US", "US")];
const INITIAL_UNITS: u32 = 2_000;
const RATES: &str = "version,2026-11-01.1\ncarrier,zone,max_weight_g,price\n\
fastship,EU,100000,4.95\nfastship,US,100000,6.95\nslowpost,EU,100000,3.50\nslowpost,US,100000,4.50\n";

/// Resident set size of this process in MB (Linux; 0 elsewhere).
pub fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()))
        .map_or(0.0, |pages| pages * 4096.0 / 1_048_576.0)
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    refused: AtomicU64,
    cancels: AtomicU64,
    holds: AtomicU64,
    picks: AtomicU64,
    packages: AtomicU64,
    deliveries: AtomicU64,
    restocks: AtomicU64,
    /// Shipments labeled and not yet reported delivered (or given up on) by the courier.
    courier_pending: AtomicU64,
    server_errors: AtomicU64,
}

/// Webhook deliveries by a 64-bit hash of `Orderly-Event-Id` (the soak's own
/// bookkeeping stays small next to the engine it measures).
type Deliveries = Arc<Mutex<HashMap<u64, u32>>>;

/// What the webhook receiver shares: the deliveries seen, and the courier's
/// queue of labeled shipments (with when their label was announced).
#[derive(Clone)]
struct Hook {
    seen: Deliveries,
    labeled: tokio::sync::mpsc::UnboundedSender<(Instant, String)>,
    counters: Arc<Counters>,
}

async fn webhook(State(hook): State<Hook>, headers: HeaderMap, body: axum::body::Bytes) -> axum::http::StatusCode {
    let id = headers.get("orderly-event-id").map_or(0, |v| {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(v.as_bytes())
    });
    let first = match hook.seen.lock() {
        Ok(mut seen) => {
            let n = seen.entry(id).or_default();
            *n += 1;
            *n == 1
        }
        Err(_) => false,
    };
    // A label announced: the courier picks the parcel up and reports it delivered shortly after.
    if first
        && let Ok(note) = serde_json::from_slice::<Value>(&body)
        && note["state"] == "label_created"
        && let Some(shipment) = note["shipment_id"].as_str()
    {
        hook.counters.courier_pending.fetch_add(1, Ordering::Relaxed);
        if hook.labeled.send((Instant::now(), shipment.to_owned())).is_err() {
            hook.counters.courier_pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
    axum::http::StatusCode::NO_CONTENT
}

/// How long after its label the courier reports a shipment delivered.
const TRANSIT: Duration = Duration::from_secs(2);

struct Client {
    http: reqwest::Client,
    base: String,
    keys: HashMap<&'static str, String>,
    counters: Arc<Counters>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Client {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        role: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> Option<(u16, Value)> {
        let mut rb = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(&self.keys[role]);
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let response = rb.send().await.ok()?;
        let status = response.status().as_u16();
        let value = response.json::<Value>().await.unwrap_or(Value::Null);
        if status >= 500 && status != 503 {
            self.counters.server_errors.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut e) = self.errors.lock()
                && e.len() < 20
            {
                e.push(format!("{method} {path} answered {status}: {value}"));
            }
        }
        Some((status, value))
    }
}

fn settings(
    carrier_url: &str,
    webhook_url: &str,
    rates_dir: &std::path::Path,
    rate: u32,
) -> Result<(Settings, HashMap<&'static str, String>)> {
    let mut settings = Settings::default();
    let mut keys = HashMap::new();
    for role in ["ops", "storefront", "warehouse", "carrier", "viewer"] {
        let (key, hash) = orderly_http::auth::generate_key().context("no randomness")?;
        settings.auth.keys.push(ApiKey { name: format!("soak-{role}"), role: role.to_owned(), hash });
        keys.insert(role, key);
    }
    crate::demo::wire_carriers(&mut settings, carrier_url, rates_dir);
    settings.carriers.breaker_cooldown = Millis(2_000);
    settings.shipping.max_retries = 2;
    settings.inventory.hold_ttl = Millis(2_000);
    settings.inventory.hold_release_jitter = Millis(1_000);
    // Labels keep up with the orders (the default 600 a minute is half of 20 orders a second),
    // so orders ship, get delivered and settle instead of piling up `packed`.
    settings.shipping.labels_per_minute = settings.shipping.labels_per_minute.max(rate.saturating_mul(60 * 2));
    settings.notifications.webhook_url = Some(webhook_url.to_owned());
    settings.notifications.webhook_secret = Some("soak-secret".to_owned());
    Ok((settings, keys))
}

/// A small deterministic generator for the load's choices.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Runs the soak and checks the invariants.
pub async fn run(cfg: &Soak) -> Result<SoakReport> {
    orderly_carrier::install_crypto_provider();
    let dir = tempfile::tempdir().context("temp dir")?;
    // The carrier simulator runs as its own process (`orderly carrier-sim`), like a
    // real carrier: its label book (kept for idempotency, bounded) is not counted
    // in the engine's memory. The primary EU carrier fails 10% of label calls and
    // is slow; the breaker and fallback absorb it.
    let sim = CarrierProcess::spawn(&["fastship:latency_ms=5,error_rate=0.1", "slowpost:base_price=3.50"])?;

    let counters = Arc::new(Counters::default());
    let deliveries: Deliveries = Arc::default();
    let (labeled_tx, mut labeled_rx) = tokio::sync::mpsc::unbounded_channel();
    let hook_state = Hook { seen: deliveries.clone(), labeled: labeled_tx, counters: counters.clone() };
    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", hook_listener.local_addr()?);
    let hook_app = axum::Router::new().route("/hook", axum::routing::post(webhook)).with_state(hook_state);
    let hook = tokio::spawn(async move { axum::serve(hook_listener, hook_app).await });

    let rates_dir = dir.path().join("rates");
    std::fs::create_dir_all(&rates_dir)?;
    std::fs::write(rates_dir.join("soak.csv"), RATES)?;
    let (settings, keys) = settings(sim.url(), &hook_url, &rates_dir, cfg.rate)?;
    let options = RunOptions {
        data_dir: dir.path().join("data"),
        store: None,
        listen: "127.0.0.1:0".parse()?,
        durability: Durability::Normal,
    };
    let app = Application::build(settings, &options).await?;
    let engine = app.engine();
    let base = format!("http://{}", app.local_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stop_rx.await;
    }));

    let errors = Arc::new(Mutex::new(Vec::new()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(64).build()?;
    let client = Arc::new(Client { http, base, keys, counters: counters.clone(), errors: errors.clone() });

    // Catalog: two warehouses, SKUS SKUs stocked at both.
    let received: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    for (loc, zone) in LOCATIONS {
        client
            .send(
                reqwest::Method::PUT,
                &format!("/v1/locations/{loc}"),
                "ops",
                Some(json!({"zone": zone, "kind": "warehouse"})),
                None,
            )
            .await;
        for s in 0..SKUS {
            let sku = format!("SOAK-{s}");
            let r = client
                .send(
                    reqwest::Method::POST,
                    "/v1/inventory/receipts",
                    "warehouse",
                    Some(json!({"location": loc, "sku": sku, "qty": INITIAL_UNITS})),
                    None,
                )
                .await;
            anyhow::ensure!(r.as_ref().is_some_and(|(s, _)| *s == 201), "stocking failed: {r:?}");
            if let Ok(mut r) = received.lock() {
                *r.entry(sku).or_default() += u64::from(INITIAL_UNITS);
            }
        }
    }

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let rss_start = rss_mb();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));

    // Pickers and packers: one per warehouse.
    let mut workers = Vec::new();
    for (loc, _) in LOCATIONS {
        let client = client.clone();
        let running = running.clone();
        workers.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                match client
                    .send(reqwest::Method::GET, &format!("/v1/picks/next?location={loc}"), "warehouse", None, None)
                    .await
                {
                    Some((200, task)) => {
                        let id = task["id"].as_str().unwrap_or_default().to_owned();
                        let body = json!({"instruction_key": task["instruction_key"], "qty": task["qty"]});
                        if let Some((200, _)) = client
                            .send(
                                reqwest::Method::POST,
                                &format!("/v1/picks/{id}/confirm"),
                                "warehouse",
                                Some(body),
                                None,
                            )
                            .await
                        {
                            client.counters.picks.fetch_add(1, Ordering::Relaxed);
                            // The order reaches `picked` once the pick event is consumed: retry a 409 briefly.
                            let pack = json!({"order_id": task["order_id"], "location": loc, "pick_ids": [id]});
                            for _ in 0..10 {
                                let path = "/v1/packages";
                                match client
                                    .send(reqwest::Method::POST, path, "warehouse", Some(pack.clone()), None)
                                    .await
                                {
                                    Some((201, _)) => {
                                        client.counters.packages.fetch_add(1, Ordering::Relaxed);
                                        break;
                                    }
                                    Some((409, _)) => tokio::time::sleep(Duration::from_millis(100)).await,
                                    _ => break,
                                }
                            }
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }

    // The courier: each labeled shipment is reported delivered TRANSIT after its label
    // (labels arrive in order, so waiting for the head of the queue is enough).
    let courier = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut reports = tokio::task::JoinSet::new();
            while let Some((labeled_at, shipment)) = labeled_rx.recv().await {
                tokio::time::sleep_until((labeled_at + TRANSIT).into()).await;
                let client = client.clone();
                reports.spawn(async move {
                    let path = format!("/v1/shipments/{shipment}/delivered");
                    for _ in 0..5 {
                        match client.send(reqwest::Method::POST, &path, "carrier", None, None).await {
                            Some((200, _)) => {
                                client.counters.deliveries.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Some((status, _)) if (400..500).contains(&status) => break,
                            _ => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                    }
                    client.counters.courier_pending.fetch_sub(1, Ordering::Relaxed);
                });
                while reports.try_join_next().is_some() {}
            }
            while reports.join_next().await.is_some() {}
        })
    };

    let lost_receipts: Arc<Mutex<Vec<String>>> = Arc::default();
    // The restocker: every 2 s, a location's SKU with less than half its initial units
    // available is topped up by a keyed receipt (answered or not, it counts once).
    let restocker = {
        let client = client.clone();
        let running = running.clone();
        let received = received.clone();
        let lost = lost_receipts.clone();
        tokio::spawn(async move {
            let mut round = 0u64;
            while running.load(Ordering::Relaxed) {
                round += 1;
                for s in 0..SKUS {
                    let sku = format!("SOAK-{s}");
                    let path = format!("/v1/inventory/{sku}");
                    let Some((200, inv)) = client.send(reqwest::Method::GET, &path, "viewer", None, None).await else {
                        continue;
                    };
                    for l in inv["locations"].as_array().into_iter().flatten() {
                        let available = l["available"].as_u64().unwrap_or(0);
                        if available >= u64::from(INITIAL_UNITS / 2) {
                            continue;
                        }
                        let qty = u64::from(INITIAL_UNITS) - available;
                        let loc = l["location"].as_str().unwrap_or_default().to_owned();
                        let key = format!("soak-receipt-{round}-{loc}-{sku}");
                        let body = json!({"location": loc, "sku": sku, "qty": qty});
                        let mut answered = false;
                        for _ in 0..10 {
                            match client
                                .send(
                                    reqwest::Method::POST,
                                    "/v1/inventory/receipts",
                                    "warehouse",
                                    Some(body.clone()),
                                    Some(&key),
                                )
                                .await
                            {
                                Some((200 | 201, _)) => {
                                    answered = true;
                                    if let Ok(mut r) = received.lock() {
                                        *r.entry(sku.clone()).or_default() += qty;
                                    }
                                    client.counters.restocks.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Some((status, _)) if (400..500).contains(&status) => break,
                                _ => tokio::time::sleep(Duration::from_millis(200)).await,
                            }
                        }
                        if !answered && let Ok(mut e) = lost.lock() {
                            e.push(format!("receipt {key} was never accepted: units received unknown"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };

    // The sampler.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let engine = engine.clone();
        let samples = samples.clone();
        let running = running.clone();
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                let lags = engine.runtime.consumer_lag().await;
                let lag = lags.iter().map(|l| l.lag_seconds).fold(0.0, f64::max);
                let backlog = lags.iter().map(|l| l.backlog).sum();
                if let Ok(mut s) = samples.lock() {
                    s.push((started.elapsed().as_secs(), rss_mb(), lag, backlog));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The storefront: `rate` orders per second, holds, cancellations.
    let mut rng = Lcg(0x5eed);
    let interval = Duration::from_secs_f64(1.0 / f64::from(cfg.rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    let mut n = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        n += 1;
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let client = client.clone();
        let acked = acked.clone();
        let sku = format!("SOAK-{}", rng.below(u64::from(SKUS)));
        let zone = LOCATIONS[rng.below(2) as usize].1;
        let qty = 1 + rng.below(3);
        let roll = rng.below(100);
        tasks.spawn(async move {
            let _permit = permit;
            if roll < 10 {
                // A cart hold nobody turns into an order: it must expire and give its units back.
                if let Some((201, _)) = client
                    .send(reqwest::Method::POST, "/v1/holds", "storefront", Some(json!({"sku": sku, "qty": 1})), None)
                    .await
                {
                    client.counters.holds.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            let price = if roll < 20 { "120.00" } else { "9.99" };
            let body = json!({
                "customer": {"id": format!("c-{n}"), "email": format!("c{n}@example.com")},
                "ship_to": {"zone": zone},
                "priority": if roll.is_multiple_of(7) { "same_day" } else { "standard" },
                "lines": [{"sku": sku, "qty": qty, "unit_price": price}],
            });
            let key = format!("soak-order-{n}");
            // Retried with the same idempotency key until answered: one order per key whatever happens.
            for _ in 0..3 {
                match client
                    .send(reqwest::Method::POST, "/v1/orders", "storefront", Some(body.clone()), Some(&key))
                    .await
                {
                    Some((201, order)) => {
                        let id = order["id"].as_str().unwrap_or_default().to_owned();
                        client.counters.acked.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut a) = acked.lock() {
                            a.push(id.clone());
                        }
                        if roll >= 85 {
                            // The customer changes their mind at once, or a moment later (labels
                            // keep up, so an order ships, and can no longer be canceled, within
                            // a second or so).
                            tokio::time::sleep(Duration::from_millis((roll - 85) * 10)).await;
                            if let Some((200, _)) = client
                                .send(
                                    reqwest::Method::POST,
                                    &format!("/v1/orders/{id}/cancel"),
                                    "storefront",
                                    None,
                                    None,
                                )
                                .await
                            {
                                client.counters.cancels.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        return;
                    }
                    Some((status, _)) if (400..500).contains(&status) => {
                        client.counters.refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let load_seconds = started.elapsed().as_secs_f64();

    let rss_end = rss_mb();
    // Let the engine settle: holds expire, labels go through the faults, the
    // courier reports what was labeled, everything is consumed.
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < settle_deadline {
        let lags = engine.runtime.consumer_lag().await;
        let idle = lags.iter().all(|l| l.backlog == 0) && counters.courier_pending.load(Ordering::Relaxed) == 0;
        quiet = if idle { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the jittered hold expiry pass, then drain once more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    running.store(false, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let _ = restocker.await;
    let _ = sampler.await;
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < settle_deadline + Duration::from_secs(30) {
        let lags = engine.runtime.consumer_lag().await;
        let idle = lags.iter().all(|l| l.backlog == 0) && counters.courier_pending.load(Ordering::Relaxed) == 0;
        quiet = if idle { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Before the checks below read every order into this process.
    let rss_settled = rss_mb();
    let mut violations = Vec::new();
    if quiet < 3 {
        violations.push("the engine never caught up with its events after the load".to_owned());
    }
    // Every order, through the paginated list.
    let mut orders = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = "/v1/orders?limit=500".to_owned();
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let Some((200, page)) = client.send(reqwest::Method::GET, &path, "viewer", None, None).await else {
            violations.push("the order list could not be read".to_owned());
            break;
        };
        orders.extend(page["orders"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let mut by_id: HashMap<String, u32> = HashMap::new();
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    let mut picked_kept: HashMap<String, u64> = HashMap::new();
    for o in &orders {
        *by_id.entry(o["id"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
        let state = o["state"].as_str().unwrap_or_default().to_owned();
        if state != "canceled" {
            for line in o["lines"].as_array().into_iter().flatten() {
                let picked: u64 = line["allocations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a["picked"].as_u64().unwrap_or(0))
                    .sum();
                *picked_kept.entry(line["sku"].as_str().unwrap_or_default().to_owned()).or_default() += picked;
            }
        }
        *states.entry(state).or_default() += 1;
    }
    let acked_ids = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let unique: HashSet<&String> = acked_ids.iter().collect();
    if unique.len() != acked_ids.len() {
        violations.push(format!("{} acknowledgements for {} distinct orders", acked_ids.len(), unique.len()));
    }
    for id in &acked_ids {
        match by_id.get(id) {
            Some(1) => {}
            Some(n) => violations.push(format!("acknowledged order {id} listed {n} times")),
            None => violations.push(format!("acknowledged order {id} does not exist")),
        }
    }
    if by_id.len() != unique.len() {
        violations.push(format!("{} orders exist but {} were acknowledged", by_id.len(), unique.len()));
    }
    // Stock: no oversell at any location; units conserved (received = on hand + picked for live orders).
    let received = received.lock().map(|r| r.clone()).unwrap_or_default();
    for (sku, got) in &received {
        let Some((200, inv)) =
            client.send(reqwest::Method::GET, &format!("/v1/inventory/{sku}"), "viewer", None, None).await
        else {
            violations.push(format!("inventory of {sku} unreadable"));
            continue;
        };
        let mut on_hand = 0;
        for l in inv["locations"].as_array().into_iter().flatten() {
            let n = |k: &str| l[k].as_u64().unwrap_or(0);
            if n("reserved") + n("safety") > n("on_hand") {
                violations.push(format!("oversold {sku} at {}: {l}", l["location"]));
            }
            on_hand += n("on_hand");
        }
        let picked = picked_kept.get(sku).copied().unwrap_or(0);
        if on_hand + picked != *got {
            violations.push(format!("{sku}: received {got} but on hand {on_hand} + picked for live orders {picked}"));
        }
    }
    let seen = deliveries.lock().map(|d| d.clone()).unwrap_or_default();
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    if !duplicates.is_empty() {
        violations.push(format!("notifications delivered more than once: {duplicates:?}"));
    }
    violations.extend(lost_receipts.lock().map(|l| l.clone()).unwrap_or_default());
    let server_errors = counters.server_errors.load(Ordering::Relaxed);
    if server_errors > 0 {
        violations.push(format!(
            "{server_errors} server errors, e.g. {:?}",
            errors.lock().map(|e| e.clone()).unwrap_or_default()
        ));
    }
    let carrier_faults = sim_faults(&client.http, sim.url()).await;

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    hook.abort();
    courier.abort();
    drop(sim);

    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let half = (load_seconds / 2.0) as u64;
    let rss_mid = samples.iter().find(|s| s.0 >= half).map_or(rss_start, |s| s.1);
    Ok(SoakReport {
        seconds: load_seconds,
        rate: cfg.rate,
        orders_acked: counters.acked.load(Ordering::Relaxed),
        orders_refused: counters.refused.load(Ordering::Relaxed),
        cancellations: counters.cancels.load(Ordering::Relaxed),
        holds: counters.holds.load(Ordering::Relaxed),
        restocks: counters.restocks.load(Ordering::Relaxed),
        picks: counters.picks.load(Ordering::Relaxed),
        packages: counters.packages.load(Ordering::Relaxed),
        deliveries: counters.deliveries.load(Ordering::Relaxed),
        orders_delivered: states.get("delivered").copied().unwrap_or(0),
        states,
        notifications: seen.values().map(|n| u64::from(*n)).sum(),
        carrier_faults,
        rss_start_mb: rss_start,
        rss_mid_mb: rss_mid,
        rss_end_mb: rss_end,
        rss_settled_mb: rss_settled,
        rss_max_mb: samples.iter().map(|s| s.1).fold(rss_settled.max(rss_end), f64::max),
        max_lag_seconds: samples.iter().map(|s| s.2).fold(0.0, f64::max),
        max_backlog: samples.iter().map(|s| s.3).max().unwrap_or(0),
        samples,
        violations,
    })
}

/// `orderly carrier-sim` as a child process of this binary, killed on drop.
struct CarrierProcess {
    child: std::process::Child,
    url: String,
}

impl CarrierProcess {
    fn spawn(carriers: &[&str]) -> Result<CarrierProcess> {
        use std::io::BufRead;
        let exe = std::env::current_exe().context("the soak runs the simulator from its own binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["carrier-sim", "--listen", "127.0.0.1:0", "--seed", "11"]);
        for c in carriers {
            cmd.args(["--carrier", c]);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start orderly carrier-sim")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let mut out = std::io::BufReader::new(out);
            out.read_line(&mut line).context("carrier-sim output")?;
            // Keep draining its output so it never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        }
        // "carrier-sim listening on 127.0.0.1:PORT (carriers: ...)"
        let Some(addr) = line.split_whitespace().nth(3) else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("carrier-sim did not say where it listens: {line:?}");
        };
        Ok(CarrierProcess { url: format!("http://{addr}"), child })
    }

    fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for CarrierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Label calls the simulator failed on purpose, from its admin stats (read
/// directly: after minutes of load they outgrow the carrier client's response limit).
async fn sim_faults(http: &reqwest::Client, url: &str) -> u64 {
    let Ok(response) = http.get(format!("{url}/admin/stats")).send().await else { return 0 };
    let Ok(stats) = response.json::<Value>().await else { return 0 };
    count_key(&stats, "errors") + count_key(&stats, "timeouts")
}

fn count_key(v: &Value, key: &str) -> u64 {
    match v {
        Value::Object(m) => {
            m.iter().map(|(k, x)| if k == key { x.as_u64().unwrap_or(0) } else { count_key(x, key) }).sum()
        }
        Value::Array(a) => a.iter().map(|x| count_key(x, key)).sum(),
        _ => 0,
    }
}
