//! `orderly bench flash-sale`: a real engine on a fresh data directory takes
//! a flash sale (N orders racing for U units of one hot SKU, mixed with
//! regular orders on other SKUs) through the service layer or the HTTP API.
//! The same run measures the naive design on the same store (one row per
//! SKU, one transaction and row lock per order) and the same orders spread
//! over many SKUs. `oversold` is computed from the stores after the run.

use crate::{Application, RunOptions};
use anyhow::{Context, Result, bail};
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::order::{Order, OrderState};
use orderly_domain::{CustomerId, LocationId, Money, Priority, Sku, Zone};
use orderly_engine::app::{Customer, Engine, LineRequest, OrderRequest, ShipTo};
use orderly_engine::config::{ApiKey, Settings};
use orderly_engine::engine::SERVICES;
use orderly_engine::ports::{Rng, SeededRng};
use orderly_store_sqlite::Durability;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Most orders the naive baseline runs (it is slow by design).
pub const BASELINE_ORDERS_MAX: u64 = 20_000;
/// Longest the naive baseline runs.
const BASELINE_SECONDS_MAX: u64 = 15;
/// Longest the engine may take to settle every accepted order.
const SETTLE_SECONDS_MAX: u64 = 600;
/// Regular orders per 100 flash-sale orders.
const REGULAR_PER_100: u64 = 10;
/// SKUs the hot stock is spread over in the uniform comparison run.
const UNIFORM_SKUS: u32 = 100;

/// How orders reach the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Through the HTTP API with a concurrent client.
    Http,
    /// Calling the service layer in-process.
    Engine,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FlashSale {
    /// Flash-sale orders.
    pub orders: u64,
    /// Units of the hot SKU.
    pub units: u32,
    /// Regular SKUs.
    pub skus: u32,
    /// How orders are sent.
    pub via: Via,
    /// Orders in flight at once.
    pub concurrency: usize,
    /// Skip the uniform comparison run.
    pub skip_uniform: bool,
    /// A `postgres://` server: each run's state in a fresh database on it
    /// (dropped after), instead of SQLite. The url's parameters (e.g.
    /// `?sslmode=disable`) apply to that database's connections too.
    pub store: Option<String>,
    /// A `nats://` server: events through JetStream (streams under a fresh
    /// prefix, deleted after), instead of the in-process bus.
    pub bus: Option<String>,
}

/// The benchmark's JSON line (PRODUCT.md §7).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Flash-sale orders sent.
    pub orders: u64,
    /// Hot units received.
    pub units: u32,
    /// Hot units sellable after the safety buffer.
    pub sellable_units: u64,
    /// Regular orders sent alongside.
    pub regular_orders: u64,
    /// Flash-sale orders acknowledged (2xx).
    pub accepted: u64,
    /// Flash-sale orders allocated.
    pub allocated: u64,
    /// Flash-sale orders backordered.
    pub backordered: u64,
    /// Units allocated beyond stock, from the stores (must be 0).
    pub oversold: u64,
    /// Accepted orders per second, first intake to last allocation decision, durable.
    pub orders_per_sec: f64,
    /// Acknowledgement latency of flash-sale orders, median.
    pub p50_ms: f64,
    /// Acknowledgement latency of flash-sale orders, 99th percentile.
    pub p99_ms: f64,
    /// Acknowledgement latency of regular orders during the sale, 99th percentile.
    pub regular_p99_ms: f64,
    /// Peak resident memory of this process.
    pub peak_rss_mb: f64,
    /// The naive design's throughput on the same store.
    pub baseline_orders_per_sec: f64,
    /// orders_per_sec / baseline_orders_per_sec.
    pub speedup_vs_baseline: f64,
    /// Throughput with one hot SKU / with the same orders over many SKUs.
    pub hot_vs_uniform: Option<f64>,
    /// `embedded` (SQLite + in-process bus), `postgres` (in-process bus) or
    /// `postgres+nats` (JetStream between the services; all in this process).
    pub mode: &'static str,
    /// `http` or `engine`.
    pub via: Via,
    /// Whether every invariant checked after the run held.
    pub invariants_ok: bool,
}

/// Runs the benchmark and returns its report (exit 1 is the caller's call).
pub async fn run(cfg: &FlashSale) -> Result<Report> {
    if cfg.orders == 0 || cfg.units == 0 {
        bail!("--orders and --units must be positive");
    }
    let hot = sale(cfg, false).await.context("flash sale run")?;
    let uniform = if cfg.skip_uniform { None } else { Some(sale(cfg, true).await.context("uniform run")?) };
    let baseline = naive_baseline(cfg).await.context("naive baseline")?;
    let flash = &hot.flash_latency_ms;
    Ok(Report {
        orders: cfg.orders,
        units: cfg.units,
        sellable_units: hot.sellable,
        regular_orders: hot.regular_sent,
        accepted: hot.accepted,
        allocated: hot.allocated,
        backordered: hot.backordered,
        oversold: hot.oversold,
        orders_per_sec: hot.orders_per_sec,
        p50_ms: percentile(flash, 50.0),
        p99_ms: percentile(flash, 99.0),
        regular_p99_ms: percentile(&hot.regular_latency_ms, 99.0),
        peak_rss_mb: peak_rss_mb(),
        baseline_orders_per_sec: baseline,
        speedup_vs_baseline: if baseline > 0.0 { hot.orders_per_sec / baseline } else { 0.0 },
        hot_vs_uniform: uniform
            .map(|u| if u.orders_per_sec > 0.0 { hot.orders_per_sec / u.orders_per_sec } else { 0.0 }),
        mode: match (&cfg.store, &cfg.bus) {
            (None, _) => "embedded",
            (Some(_), None) => "postgres",
            (Some(_), Some(_)) => "postgres+nats",
        },
        via: cfg.via,
        invariants_ok: hot.invariants_ok && hot.oversold == 0,
    })
}

struct SaleResult {
    accepted: u64,
    allocated: u64,
    backordered: u64,
    oversold: u64,
    sellable: u64,
    regular_sent: u64,
    orders_per_sec: f64,
    flash_latency_ms: Vec<f64>,
    regular_latency_ms: Vec<f64>,
    invariants_ok: bool,
}

/// One order to send: its SKU, price, and whether it is part of the sale.
/// The SKU is shared: a million planned orders hold one copy of each.
#[derive(Clone)]
struct Planned {
    sku: Arc<Sku>,
    flash: bool,
    priority: Priority,
}

fn id<T: TryFrom<String>>(s: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(s.to_owned()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn plan(cfg: &FlashSale, uniform: bool) -> Result<Vec<Planned>> {
    let rng = SeededRng::new(0x5A1E);
    let regular = cfg.orders * REGULAR_PER_100 / 100;
    let mut v = Vec::with_capacity((cfg.orders + regular) as usize);
    let hot = Arc::new(id::<Sku>("HOT-1")?);
    let uniform_skus: Vec<Arc<Sku>> =
        (0..UNIFORM_SKUS).map(|i| id(&format!("U-{i}")).map(Arc::new)).collect::<Result<_>>()?;
    let regular_skus: Vec<Arc<Sku>> =
        (0..cfg.skus.max(1)).map(|i| id(&format!("REG-{i}")).map(Arc::new)).collect::<Result<_>>()?;
    for i in 0..cfg.orders {
        let sku = if uniform { uniform_skus[(i % u64::from(UNIFORM_SKUS)) as usize].clone() } else { hot.clone() };
        v.push(Planned { sku, flash: true, priority: Priority::SameDay });
    }
    for i in 0..regular {
        let sku = regular_skus[(rng.next_u64() % regular_skus.len() as u64) as usize].clone();
        let priority = if i % 3 == 0 { Priority::SameDay } else { Priority::Standard };
        v.push(Planned { sku, flash: false, priority });
    }
    // Interleave deterministically so regular orders arrive during the sale.
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    Ok(v)
}

fn bench_settings() -> Result<(Settings, String)> {
    let mut s = Settings::default();
    let (key, hash) = orderly_http::auth::generate_key().context("no randomness")?;
    s.auth.keys.push(ApiKey { name: "bench".into(), role: "ops".into(), hash });
    s.bus.queue_capacity = 65_536;
    s.http.max_connections = 8192;
    Ok((s, key))
}

async fn stock(engine: &Engine, cfg: &FlashSale, uniform: bool) -> Result<()> {
    for (loc, zone) in [("WH-1", "EU"), ("WH-2", "EU")] {
        engine.put_location(Location { id: id(loc)?, zone: id(zone)?, kind: LocationKind::Warehouse }).await?;
    }
    let receive = |sku: String, qty: u32, loc: &'static str| async move {
        let mut left = qty;
        while left > 0 {
            let chunk = left.min(orderly_domain::order::LINE_QTY_MAX);
            engine.receive(id::<LocationId>(loc)?, id::<Sku>(&sku)?, chunk).await?;
            left -= chunk;
        }
        anyhow::Ok(())
    };
    if uniform {
        for i in 0..UNIFORM_SKUS {
            let per = cfg.units / UNIFORM_SKUS + u32::from(i < cfg.units % UNIFORM_SKUS);
            receive(format!("U-{i}"), per.div_ceil(2), "WH-1").await?;
            receive(format!("U-{i}"), per / 2, "WH-2").await?;
        }
    } else {
        receive("HOT-1".into(), cfg.units.div_ceil(2), "WH-1").await?;
        receive("HOT-1".into(), cfg.units / 2, "WH-2").await?;
    }
    for i in 0..cfg.skus.max(1) {
        receive(format!("REG-{i}"), 1_000_000, "WH-1").await?;
    }
    Ok(())
}

fn request(p: &Planned, n: usize) -> Result<OrderRequest> {
    let price = if p.flash { "29.00" } else { "12.50" };
    Ok(OrderRequest {
        customer: Customer {
            id: id::<CustomerId>(&format!("c-{}", n % 100_000))?,
            email: format!("c{}@example.com", n % 100_000),
        },
        ship_to: ShipTo { zone: id::<Zone>("EU")? },
        priority: p.priority,
        lines: vec![LineRequest {
            sku: Sku::clone(&p.sku),
            qty: 1,
            unit_price: Money::parse(price).map_err(|e| anyhow::anyhow!("{e}"))?,
        }],
        hold_ids: vec![],
        delivery_window: None,
    })
}

/// What became of one sent order: its latency in milliseconds as `f32`
/// bits, or [`REFUSED`]. One slot per order, written by whichever worker
/// sent it (4 bytes an order, nothing that grows while the sale runs).
type Outcome = std::sync::atomic::AtomicU32;

/// The [`Outcome`] of an order the engine did not accept (a NaN pattern, so
/// never a latency).
const REFUSED: u32 = u32::MAX;

/// The latency in ms of an accepted order.
fn accepted_ms(outcome: &Outcome) -> Option<f32> {
    let bits = outcome.load(Ordering::Relaxed);
    (bits != REFUSED).then(|| f32::from_bits(bits))
}

/// Sends every planned order with `concurrency` workers; returns per-order
/// latency (ms) and whether it was accepted, in plan order.
async fn drive(
    cfg: &FlashSale,
    engine: Arc<Engine>,
    addr: std::net::SocketAddr,
    key: &str,
    planned: Arc<Vec<Planned>>,
) -> Result<Arc<Vec<Outcome>>> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress(planned.len() as u64);
    let auth = Arc::new(format!("Bearer {key}"));
    let outcomes: Arc<Vec<Outcome>> = Arc::new((0..planned.len()).map(|_| Outcome::new(REFUSED)).collect());
    let mut workers = Vec::new();
    for _ in 0..cfg.concurrency.max(1) {
        let (engine, planned, outcomes, next, done, auth, via) =
            (engine.clone(), planned.clone(), outcomes.clone(), next.clone(), done.clone(), auth.clone(), cfg.via);
        workers.push(tokio::spawn(async move {
            let mut connection: Option<Connection> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = planned.get(i) else { break };
                let req = request(p, i)?;
                let start = Instant::now();
                let ok = match via {
                    Via::Engine => engine.create_order(req).await.is_ok(),
                    Via::Http => post_order(&mut connection, addr, &auth, &req).await,
                };
                if ok {
                    let ms = (start.elapsed().as_secs_f64() * 1000.0) as f32;
                    outcomes[i].store(ms.to_bits(), Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let ticker = {
        let (done, bar) = (done.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for w in workers {
        w.await.context("worker panicked")??;
    }
    ticker.abort();
    bar.finish_and_clear();
    Ok(outcomes)
}

/// One worker's HTTP/1.1 connection to the engine's API, kept alive
/// across its requests (one request in flight on it at a time).
type Connection = hyper::client::conn::http1::SendRequest<http_body_util::Full<axum::body::Bytes>>;

/// Posts one order on the worker's connection (opened on first use, and
/// again after a failure); true when the API answered 2xx.
///
/// A bare HTTP/1.1 connection per worker rather than a pooled general
/// client: the client shares the machine's two cores with the server it
/// measures, so the less it spends per request (no pool lookup, URL parse
/// or middleware per request), the more of the figure is the server's.
async fn post_order(
    connection: &mut Option<Connection>,
    addr: std::net::SocketAddr,
    auth: &str,
    req: &OrderRequest,
) -> bool {
    use axum::http::{Request, header};
    use http_body_util::BodyExt;
    if connection.is_none() {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { return false };
        let _ = stream.set_nodelay(true);
        let Ok((sender, conn)) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            return false;
        };
        tokio::spawn(conn);
        *connection = Some(sender);
    }
    let Some(sender) = connection.as_mut() else { return false };
    let Ok(body) = serde_json::to_vec(req) else { return false };
    let request = Request::post("/v1/orders")
        .header(header::HOST, "orderly")
        .header(header::AUTHORIZATION, auth)
        .header(header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(body)));
    let Ok(request) = request else { return false };
    let answered = match sender.ready().await {
        Ok(()) => sender.send_request(request).await,
        Err(e) => Err(e),
    };
    match answered {
        Ok(response) => {
            let ok = response.status().is_success();
            // Read to the end, so the connection can carry the next request.
            match response.into_body().collect().await {
                Ok(_) => ok,
                Err(_) => {
                    *connection = None;
                    false
                }
            }
        }
        Err(_) => {
            *connection = None;
            false
        }
    }
}

fn progress(len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} orders [{elapsed_precise}] {per_sec}")
    {
        bar.set_style(style);
    }
    bar
}

/// A fresh database (and bus prefix) for one run on `--store`/`--bus`,
/// removed when the run ends.
struct Scratch {
    server_url: String,
    database: String,
    bus: Option<orderly_bus_nats::NatsBus>,
}

/// `url` (`postgres://user@host:port/db[?params]`) naming `database` on the
/// same server instead, with the same parameters (e.g. `sslmode=disable`).
fn database_url(url: &str, database: &str) -> Result<String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (server, _) = base
        .rsplit_once('/')
        .filter(|(s, _)| s.contains("://"))
        .context("--store must be postgres://user@host:port/db")?;
    Ok(match query {
        "" => format!("{server}/{database}"),
        query => format!("{server}/{database}?{query}"),
    })
}

impl Scratch {
    async fn new(cfg: &FlashSale, uniform: bool) -> Result<Option<(Scratch, String, crate::Distributed)>> {
        let Some(url) = &cfg.store else {
            anyhow::ensure!(cfg.bus.is_none(), "--bus needs --store postgres://…");
            return Ok(None);
        };
        let on = |database: &str| database_url(url, database);
        let tag = format!("bench_{}_{}", std::process::id(), if uniform { "uniform" } else { "hot" });
        let database = format!("orderly_{tag}");
        let admin = on("postgres")?;
        let _ = orderly_store_postgres::drop_database(&admin, &database).await;
        orderly_store_postgres::create_database(&admin, &database).await.context("cannot create the bench database")?;
        let bus = match &cfg.bus {
            Some(b) => Some(orderly_bus_nats::NatsBus::connect(orderly_bus_nats::NatsOptions::new(b, &tag)).await?),
            None => None,
        };
        let dist = crate::Distributed { bus: cfg.bus.clone(), bus_prefix: Some(tag), services: None };
        Ok(Some((Scratch { server_url: admin, database: database.clone(), bus }, on(&database)?, dist)))
    }

    async fn remove(self) {
        if let Some(bus) = &self.bus
            && let Err(e) = bus.delete_streams().await
        {
            eprintln!("warning: bench streams not deleted: {e}");
        }
        if let Err(e) = orderly_store_postgres::drop_database(&self.server_url, &self.database).await {
            eprintln!("warning: bench database {} not dropped: {e}", self.database);
        }
    }
}

async fn sale(cfg: &FlashSale, uniform: bool) -> Result<SaleResult> {
    let scratch = Scratch::new(cfg, uniform).await?;
    let result = sale_on(cfg, uniform, scratch.as_ref().map(|(_, url, dist)| (url.clone(), dist.clone()))).await;
    if let Some((s, _, _)) = scratch {
        s.remove().await;
    }
    result
}

async fn sale_on(cfg: &FlashSale, uniform: bool, remote: Option<(String, crate::Distributed)>) -> Result<SaleResult> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let (settings, key) = bench_settings()?;
    let (store, dist) = match remote {
        Some((url, dist)) => (Some(url), dist),
        None => (None, crate::Distributed::default()),
    };
    let options = RunOptions {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse()?,
        store,
        durability: Durability::Full,
    };
    let app = Application::build_with(settings, &options, &dist).await?;
    let (engine, addr) = (app.engine(), app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    stock(&engine, cfg, uniform).await?;
    let sellable = hot_sellable(&engine, uniform).await?;
    let planned = Arc::new(plan(cfg, uniform)?);
    // The services' figures count from the engine's start; the table shows
    // the sale's share only (stocking is a few thousand one-command batches).
    let before = service_figures(&engine);
    let start = Instant::now();
    let outcomes = drive(cfg, engine.clone(), addr, &key, planned.clone()).await?;
    let driven = start.elapsed().as_secs_f64();
    // Per order: flash or regular, and its latency if accepted.
    let results = || planned.iter().zip(outcomes.iter()).map(|(p, o)| (p.flash, accepted_ms(o)));
    let accepted_total = results().filter(|r| r.1.is_some()).count() as u64;
    settle(&engine, accepted_total).await?;
    let elapsed = start.elapsed().as_secs_f64();
    print_service_times(&before, &service_figures(&engine), driven, elapsed, uniform);
    // The stores are checked once the engine has stopped (its caches freed),
    // one ledger and one page of orders at a time.
    let _ = stop.send(());
    let _ = server.await;
    let check = check_stores(&engine, cfg, uniform).await?;
    let flash_latency_ms: Vec<f64> = results().filter_map(|(flash, ms)| ms.filter(|_| flash).map(f64::from)).collect();
    Ok(SaleResult {
        accepted: flash_latency_ms.len() as u64,
        allocated: check.allocated,
        backordered: check.backordered,
        oversold: check.oversold,
        sellable,
        regular_sent: results().filter(|r| !r.0).count() as u64,
        orders_per_sec: accepted_total as f64 / elapsed,
        flash_latency_ms,
        regular_latency_ms: results().filter_map(|(flash, ms)| ms.filter(|_| !flash).map(f64::from)).collect(),
        invariants_ok: check.invariants_ok,
    })
}

/// One service's running totals, as [`service_figures`] reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ServiceFigures {
    batches: u64,
    deferred: u64,
    commands: u64,
    build_s: f64,
    commit_s: f64,
    synced: u64,
    sync_s: f64,
    consumed: u64,
    emitted: u64,
    rows: u64,
}

impl ServiceFigures {
    /// What happened between `before` and `self`.
    fn since(&self, before: &ServiceFigures) -> ServiceFigures {
        ServiceFigures {
            batches: self.batches.saturating_sub(before.batches),
            deferred: self.deferred.saturating_sub(before.deferred),
            commands: self.commands.saturating_sub(before.commands),
            build_s: self.build_s - before.build_s,
            commit_s: self.commit_s - before.commit_s,
            synced: self.synced.saturating_sub(before.synced),
            sync_s: self.sync_s - before.sync_s,
            consumed: self.consumed.saturating_sub(before.consumed),
            emitted: self.emitted.saturating_sub(before.emitted),
            rows: self.rows.saturating_sub(before.rows),
        }
    }
}

/// Every service's totals since the engine started, in [`SERVICES`] order.
fn service_figures(engine: &Engine) -> [ServiceFigures; 6] {
    let m = &engine.runtime.metrics;
    SERVICES.map(|service| {
        let label = [("service", service)];
        ServiceFigures {
            batches: m.histogram_count("orderly_commit_seconds", &label),
            deferred: m.counter("orderly_cursor_commits_deferred_total", &label),
            commands: m.counter("orderly_batch_commands_total", &label),
            build_s: m.histogram_sum("orderly_batch_build_seconds", &label),
            commit_s: m.histogram_sum("orderly_commit_seconds", &label),
            synced: m.histogram_count("orderly_commit_sync_seconds", &label),
            sync_s: m.histogram_sum("orderly_commit_sync_seconds", &label),
            consumed: m.counter("orderly_events_consumed_total", &[("consumer", service)]),
            emitted: m.counter("orderly_events_emitted_total", &label),
            rows: m.counter("orderly_commit_rows_total", &label),
        }
    })
}

/// Prints, per service, how the sale's wall time was spent (the figures
/// from `before`, taken as the first order was sent, to `after`, once every
/// order was decided; stocking is not counted): building batches
/// (deciding, in the service loop) and committing them (the store's write;
/// SQLite's fsync runs apart, after it, and `sync ms` is the mean wait from
/// a write to its sync), with the batch count (commits, and batches that
/// only moved consumer cursors, deferred to a later commit), events in and
/// out, and rows written (documents put or deleted, outbox events, inbox
/// ids, cursors).
fn print_service_times(
    before: &[ServiceFigures; 6],
    after: &[ServiceFigures; 6],
    driven: f64,
    elapsed: f64,
    uniform: bool,
) {
    eprintln!(
        "{} sale, {elapsed:.1} s ({driven:.1} s sending): service  batches  deferred  commands  build s  commit s  sync ms  consumed  emitted     rows",
        if uniform { "uniform" } else { "hot" }
    );
    for (service, (before, after)) in SERVICES.iter().zip(before.iter().zip(after)) {
        let f = after.since(before);
        eprintln!(
            "  {service:>13} {:>8} {:>9} {:>9} {:>8.2} {:>9.2} {:>8.2} {:>9} {:>8} {:>8}",
            f.batches,
            f.deferred,
            f.commands,
            f.build_s,
            f.commit_s,
            1000.0 * f.sync_s / f.synced.max(1) as f64,
            f.consumed,
            f.emitted,
            f.rows,
        );
    }
}

async fn hot_sellable(engine: &Engine, uniform: bool) -> Result<u64> {
    if uniform {
        return Ok(0);
    }
    Ok(engine.inventory(id("HOT-1")?).await?.available)
}

/// Waits until every accepted order has had its allocation decided (the
/// orders service counts first decisions; polling a counter costs nothing).
async fn settle(engine: &Engine, accepted: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(SETTLE_SECONDS_MAX);
    let metrics = engine.runtime.metrics.clone();
    loop {
        let decided = metrics.counter("orderly_orders_decided_total", &[]);
        if decided >= accepted {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} orders still waiting for allocation after {SETTLE_SECONDS_MAX} s", accepted - decided);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct StoreCheck {
    allocated: u64,
    backordered: u64,
    oversold: u64,
    invariants_ok: bool,
}

/// Reads the stores after the run: allocation per flash order, oversell per
/// ledger partition and against the units received, every ledger's
/// invariants. One ledger is in memory at a time (a hot SKU's may be large).
async fn check_stores(engine: &Engine, cfg: &FlashSale, uniform: bool) -> Result<StoreCheck> {
    let store = engine.runtime.store("inventory").context("inventory store")?;
    let mut oversold = 0u64;
    let mut invariants_ok = true;
    for sku in orderly_engine::table::ledger_skus(store.as_ref()).await? {
        let Some(stored) = orderly_engine::table::read_ledger(store.as_ref(), &sku).await? else { continue };
        let ledger = stored.ledger;
        if let Err(e) = ledger.check_invariants() {
            eprintln!("invariant violated for {}: {e}", ledger.sku());
            invariants_ok = false;
        }
        for loc in ledger.snapshot().locations {
            for p in loc.partitions {
                oversold += (p.reserved + p.safety).saturating_sub(p.on_hand);
            }
        }
    }
    let (mut allocated, mut backordered, mut hot_units) = (0u64, 0u64, 0u64);
    let mut cursor: Option<String> = None;
    loop {
        let orders: Vec<Order> = engine.orders(None, cursor.as_deref(), 500).await?;
        for o in &orders {
            let flash = o.lines().iter().any(|l| l.sku.as_str() == "HOT-1" || l.sku.as_str().starts_with("U-"));
            if !flash {
                continue;
            }
            let units: u64 = o.lines().iter().map(|l| u64::from(l.allocated_qty())).sum();
            hot_units += units;
            if o.state() == OrderState::Backordered {
                backordered += 1;
            } else if units > 0 {
                allocated += 1;
            }
            if o.check_invariants().is_err() {
                invariants_ok = false;
            }
        }
        cursor = orders.last().map(|o| o.id().to_string());
        if orders.len() < 500 {
            break;
        }
    }
    oversold += hot_units.saturating_sub(u64::from(cfg.units));
    let _ = uniform;
    Ok(StoreCheck { allocated, backordered, oversold, invariants_ok })
}

/// The naive design on the same store: one row per SKU, one transaction and
/// one row write lock per order, a durable commit each. On SQLite by
/// default; on the `--store` PostgreSQL server (a fresh database, dropped
/// after) when the engine ran there.
async fn naive_baseline(cfg: &FlashSale) -> Result<f64> {
    let total = cfg.orders.min(BASELINE_ORDERS_MAX);
    let workers = cfg.concurrency.clamp(1, 16);
    match &cfg.store {
        None => naive_sqlite(cfg.units, total, workers).await,
        Some(url) => {
            let database = format!("orderly_bench_{}_naive", std::process::id());
            let admin = database_url(url, "postgres")?;
            let _ = orderly_store_postgres::drop_database(&admin, &database).await;
            orderly_store_postgres::create_database(&admin, &database)
                .await
                .context("cannot create the baseline database")?;
            let result = naive_postgres(&database_url(url, &database)?, cfg.units, total, workers).await;
            if let Err(e) = orderly_store_postgres::drop_database(&admin, &database).await {
                eprintln!("warning: baseline database {database} not dropped: {e}");
            }
            result
        }
    }
}

/// The naive design on SQLite: `BEGIN IMMEDIATE` (the database's one write
/// lock), a conditional decrement, the order row, `synchronous=FULL` commit.
async fn naive_sqlite(units: u32, total: u64, workers: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("naive.db");
    {
        let c = rusqlite::Connection::open(&path)?;
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);
             CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, status TEXT NOT NULL);",
        )?;
        c.execute("INSERT INTO stock VALUES ('HOT-1', ?1)", [units])?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(BASELINE_SECONDS_MAX);
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (path, next) = (path.clone(), next.clone());
        handles.push(tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut c = rusqlite::Connection::open(&path)?;
            c.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=60000;")?;
            let mut done = 0;
            while next.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < deadline {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let took = tx.execute("UPDATE stock SET qty = qty - 1 WHERE sku = 'HOT-1' AND qty > 0", [])?;
                let status = if took == 1 { "allocated" } else { "backordered" };
                tx.execute("INSERT INTO orders (sku, status) VALUES ('HOT-1', ?1)", [status])?;
                tx.commit()?;
                done += 1;
            }
            Ok(done)
        }));
    }
    let mut done = 0;
    for h in handles {
        done += h.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let c = rusqlite::Connection::open(&path)?;
    let left: i64 = c.query_row("SELECT qty FROM stock WHERE sku = 'HOT-1'", [], |r| r.get(0))?;
    let allocated: i64 = c.query_row("SELECT count(*) FROM orders WHERE status = 'allocated'", [], |r| r.get(0))?;
    naive_check(units, left, allocated)?;
    Ok(done as f64 / elapsed)
}

/// The naive design on PostgreSQL: per order one transaction whose
/// `UPDATE … WHERE qty > 0` takes the SKU row's lock until its commit
/// (`synchronous_commit = on`, the server's default), one connection per
/// worker.
async fn naive_postgres(url: &str, units: u32, total: u64, workers: usize) -> Result<f64> {
    use sqlx::Connection as _;
    let connect = || async {
        let mut c = sqlx::PgConnection::connect(url).await.context("baseline connection")?;
        sqlx::query("SET synchronous_commit = on").execute(&mut c).await?;
        anyhow::Ok(c)
    };
    {
        let mut c = connect().await?;
        sqlx::raw_sql(
            "CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);
             CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, sku TEXT NOT NULL, status TEXT NOT NULL);",
        )
        .execute(&mut c)
        .await?;
        sqlx::query("INSERT INTO stock VALUES ('HOT-1', $1)").bind(i64::from(units)).execute(&mut c).await?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(BASELINE_SECONDS_MAX);
    let mut conns = Vec::with_capacity(workers);
    for _ in 0..workers {
        conns.push(connect().await?);
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for mut c in conns {
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut done = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < deadline {
                let mut tx = c.begin().await?;
                let took = sqlx::query("UPDATE stock SET qty = qty - 1 WHERE sku = 'HOT-1' AND qty > 0")
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let status = if took == 1 { "allocated" } else { "backordered" };
                sqlx::query("INSERT INTO orders (sku, status) VALUES ('HOT-1', $1)")
                    .bind(status)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                done += 1;
            }
            c.close().await?;
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for h in handles {
        done += h.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut c = connect().await?;
    let left: i64 = sqlx::query_scalar("SELECT qty::BIGINT FROM stock WHERE sku = 'HOT-1'").fetch_one(&mut c).await?;
    let allocated: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'allocated'").fetch_one(&mut c).await?;
    c.close().await?;
    naive_check(units, left, allocated)?;
    Ok(done as f64 / elapsed)
}

/// The naive design's own invariants: never below zero, and every unit
/// either left or allocated.
fn naive_check(units: u32, left: i64, allocated: i64) -> Result<()> {
    anyhow::ensure!(left >= 0, "the naive baseline oversold: {left} units left");
    anyhow::ensure!(
        left + allocated == i64::from(units),
        "the naive baseline lost stock: {left} left + {allocated} allocated != {units} received"
    );
    Ok(())
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::{ServiceFigures, database_url};

    #[test]
    fn the_service_table_counts_only_what_happened_since_the_sale_began() {
        let before = ServiceFigures {
            batches: 2000,
            commands: 2000,
            commit_s: 1.5,
            synced: 2000,
            sync_s: 1.0,
            rows: 8000,
            ..Default::default()
        };
        let after = ServiceFigures {
            batches: 2300,
            commands: 2010,
            commit_s: 2.0,
            synced: 2300,
            sync_s: 1.6,
            consumed: 22_000,
            rows: 9000,
            ..Default::default()
        };
        let sale = after.since(&before);
        assert_eq!((sale.batches, sale.commands, sale.synced, sale.consumed, sale.rows), (300, 10, 300, 22_000, 1000));
        assert!((sale.commit_s - 0.5).abs() < 1e-9 && (sale.sync_s - 0.6).abs() < 1e-9);
    }

    #[test]
    fn a_run_database_keeps_the_server_and_the_url_parameters() {
        let url = "postgres://root@127.0.0.1:5432/test";
        assert_eq!(
            database_url(url, "orderly_bench_1_hot").unwrap(),
            "postgres://root@127.0.0.1:5432/orderly_bench_1_hot"
        );
        assert_eq!(
            database_url(&format!("{url}?sslmode=disable&application_name=x"), "postgres").unwrap(),
            "postgres://root@127.0.0.1:5432/postgres?sslmode=disable&application_name=x"
        );
        assert!(database_url("not a url", "postgres").is_err());
        assert!(database_url("postgres:/nohost?sslmode=disable", "postgres").is_err());
    }
}
