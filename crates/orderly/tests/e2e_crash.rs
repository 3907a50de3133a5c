//! Crash safety of the real binary, in both modes: under a load of orders,
//! keyed stock receipts and pick confirmations, a process is killed with
//! SIGKILL at a random moment, several rounds in a row, and restarted on the
//! same durable state. Clients keep a log of what they sent and what was
//! acknowledged, and retry what they never got an answer for with the same
//! Idempotency-Key. In the end, checked against that log:
//!
//! - every acknowledged (2xx) order exists exactly once, no request made two
//!   orders, a refused one made none, and every order settled;
//! - stock is conserved: on hand = received (each acknowledged receipt once)
//!   − picked, reserved = what the orders hold, nothing oversold;
//! - notifications keep their contract (README "Crash safety"): every
//!   order's allocation or backorder is notified; delivery is at least once,
//!   and a notification is delivered again only after the process sending it
//!   was killed (between the webhook's answer and the commit that marks it
//!   sent), with the same `Orderly-Event-Id` and the same body, at most
//!   [`REPEATS_PER_KILL_MAX`] per kill. A receiver that deduplicates on the
//!   id (as documented) so gets each notification once.
//!
//! The kill schedule comes from a seed: `ORDERLY_CRASH_SEED=N` replays it
//! (the load's interleaving still varies); otherwise the seed is random and
//! printed.

mod support;

use orderly_carrier::webhook::{Delivery, ReceiverConfig, ReceiverHandle, spawn_receiver};
use orderly_engine::services::notifications::DELIVERIES_IN_FLIGHT_MAX;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::cluster::*;
use support::*;

/// SKUs and the stock received before the load.
const SKUS: [(&str, u32); 2] = [("CRASH-A", 300), ("CRASH-B", 150)];
const ROUNDS: usize = 5;
/// Concurrent order clients.
const CLIENTS: usize = 8;
/// A client's pause between two orders: the load stays within what the
/// notifications can deliver meanwhile, so the test does not wait long for
/// them at the end.
const THINK: Duration = Duration::from_millis(20);
/// A kill comes this long after the round's load started, at random in between.
const KILL_AFTER_MS: (u64, u64) = (300, 3_000);
/// Most notifications one kill may cause to be delivered again: deliveries
/// out at the kill and answers not yet committed as sent.
const REPEATS_PER_KILL_MAX: usize = 2 * DELIVERIES_IN_FLIGHT_MAX;
/// The hold of a synchronous reservation whose order was never created (a
/// crash between the two) is released about one TTL later, once inventory
/// asked orders (`hold.unclaimed`), so the stock check need not wait long.
/// An acknowledged order's hold never lapses, whatever the TTL.
const HOLDS_TOML: &str = "[inventory]\nhold_ttl = \"3s\"\nhold_release_jitter = \"1s\"\n";

/// The seed of the kill schedule: `ORDERLY_CRASH_SEED`, else random (printed).
fn seed() -> u64 {
    let seed = std::env::var("ORDERLY_CRASH_SEED").ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) % 1_000_000_007
    });
    eprintln!("crash test seed: {seed} (ORDERLY_CRASH_SEED={seed} replays this kill schedule)");
    seed
}

/// SplitMix64: enough randomness for a kill schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between_ms(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What a client knows about one keyed request.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// 2xx; for an order, its id.
    Acked(String),
    /// 409: a synchronous order found no stock (nothing was created).
    Refused,
    /// No answer (the process died), or "retry later": to be sent again.
    Unknown,
}

/// One order request: its key and body never change across retries.
#[derive(Debug, Clone)]
struct Request {
    key: String,
    body: Value,
}

/// The clients' log.
#[derive(Default)]
struct Log {
    orders: Mutex<BTreeMap<String, (Request, Outcome)>>,
    /// Stock receipts by key: the SKU, the quantity and what came back.
    receipts: Mutex<BTreeMap<String, (String, u32, Outcome)>>,
    /// Pick tasks handed to the picker, by id, and whether their confirmation was acknowledged.
    picks: Mutex<BTreeMap<String, (Value, bool)>>,
}

impl Log {
    fn acked_orders(&self) -> BTreeMap<String, String> {
        let orders = self.orders.lock().expect("lock");
        orders
            .values()
            .filter_map(|(req, o)| match o {
                Outcome::Acked(id) => Some((id.clone(), req.key.clone())),
                _ => None,
            })
            .collect()
    }

    /// Units received per SKU: the initial stock and every acknowledged receipt once.
    fn received(&self, sku: &str) -> u64 {
        let initial = SKUS.iter().find(|(s, _)| *s == sku).map_or(0, |(_, q)| u64::from(*q));
        let receipts = self.receipts.lock().expect("lock");
        initial
            + receipts
                .values()
                .filter(|(s, _, o)| s == sku && matches!(o, Outcome::Acked(_)))
                .map(|(_, q, _)| u64::from(*q))
                .sum::<u64>()
    }
}

/// Where each kind of request goes: one process in the embedded mode, the
/// process running the service in the distributed one.
#[derive(Clone)]
struct Targets {
    orders: Api,
    inventory: Api,
    picking: Api,
    notifications: Api,
    /// `/v1/ops/reconcile`, served by a process running orders, inventory
    /// and picking: none in the distributed layout (see
    /// [`diagnose_with_one_process`]).
    reconcile: Option<Api>,
}

impl Targets {
    fn all(api: &Api) -> Targets {
        Targets {
            orders: api.clone(),
            inventory: api.clone(),
            picking: api.clone(),
            notifications: api.clone(),
            reconcile: Some(api.clone()),
        }
    }
}

/// The sum of a process's `orderly_stale_events_total` counters (events the
/// orders service dropped as older than one already applied from their
/// source): 0 if it cannot be read.
async fn stale_events(api: &Api) -> u64 {
    let metrics = api.send(api.request(Method::GET, "/metrics", None)).await.map(|r| r.text).unwrap_or_default();
    metrics
        .lines()
        .filter(|l| l.starts_with("orderly_stale_events_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The webhook receiver and the moments the notifications process was killed.
struct Hooks {
    receiver: ReceiverHandle,
    url: String,
    /// Taken before the receiver started, so a delivery's `received_ms` is
    /// never later than the same moment measured from here.
    t0: Instant,
    /// Milliseconds from `t0` to just after each kill of the process
    /// sending notifications.
    kills_ms: Vec<u64>,
}

impl Hooks {
    async fn start() -> Hooks {
        let t0 = Instant::now();
        let (url, receiver) = spawn_receiver(ReceiverConfig::default()).await.expect("webhook receiver");
        Hooks { receiver, url, t0, kills_ms: Vec::new() }
    }

    fn toml(&self) -> String {
        format!("[notifications]\nwebhook_url = \"{}/hooks\"\n", self.url)
    }

    /// Call right after the process running notifications is dead.
    fn killed(&mut self) {
        self.kills_ms.push(u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_orders_survive_random_sigkills() {
    let mut rng = Rng(seed());
    let mut hooks = Hooks::start().await;
    let (_dir, config, data, log_path) = server_dir();
    std::fs::write(&config, config_toml(None, &format!("{HOLDS_TOML}{}", hooks.toml()))).expect("config written");
    let mut server = Server::start(&config, &data, &log_path).expect("server starts");
    stock(&server.api).await;
    let log = Arc::new(Log::default());
    let started = Instant::now();
    for round in 0..ROUNDS {
        let load = Load::start(&Targets::all(&server.api), &log, round);
        let after = rng.between_ms(KILL_AFTER_MS);
        tokio::time::sleep(after).await;
        server.kill();
        hooks.killed();
        load.stop().await;
        eprintln!("round {round}: killed after {after:?}; {} orders acknowledged so far", log.acked_orders().len());
        server = Server::start(&config, &data, &log_path)
            .unwrap_or_else(|e| panic!("restart {round}: {e:#}\n{}", tail(&log_path)));
        retry_unknown(&Targets::all(&server.api), &log).await;
    }
    let targets = Targets::all(&server.api);
    let report = check_everything(&targets, &log, &hooks, Duration::from_secs(30)).await;
    eprintln!("embedded crash test: {ROUNDS} kills, {report}, {:.1}s", started.elapsed().as_secs_f64());
}

/// The process layout of the distributed test: every service in one of three
/// processes (orders with inventory, so lines worth at least
/// `allocation.sync_min_line_value` can be reserved before the answer).
const GROUPS: [&str; 3] = ["orders,inventory", "picking", "packing,shipping,notifications"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_acknowledged_orders_survive_random_sigkills() {
    if !servers_up() {
        return;
    }
    let mut rng = Rng(seed());
    let mut hooks = Hooks::start().await;
    let world = World::new(&format!("nats://{NATS}"));
    let config = world.config_with(None, &format!("{HOLDS_TOML}{}", hooks.toml()));
    let mut procs: Vec<Proc> = GROUPS.iter().map(|g| world.serve_patiently(&config, g)).collect();
    let targets_of = |procs: &[Proc]| Targets {
        orders: procs[0].api.clone(),
        inventory: procs[0].api.clone(),
        picking: procs[1].api.clone(),
        notifications: procs[2].api.clone(),
        reconcile: None,
    };
    stock(&procs[0].api).await;
    let log = Arc::new(Log::default());
    let started = Instant::now();
    let mut killed = Vec::new();
    // Counted over every lifetime of the orders process (its counters restart with it).
    let mut stale = 0;
    for round in 0..ROUNDS {
        let load = Load::start(&targets_of(&procs), &log, round);
        let after = rng.between_ms(KILL_AFTER_MS);
        tokio::time::sleep(after).await;
        let victim = usize::try_from(rng.below(GROUPS.len() as u64)).expect("small");
        if victim == 0 {
            stale += stale_events(&procs[0].api).await;
        }
        procs.remove(victim).kill();
        if GROUPS[victim].contains("notifications") {
            hooks.killed();
        }
        killed.push(GROUPS[victim]);
        // The other processes keep taking load for a moment while this one is down.
        tokio::time::sleep(rng.between_ms((0, 500))).await;
        load.stop().await;
        eprintln!(
            "round {round}: killed `{}` after {after:?}; {} orders acknowledged so far",
            GROUPS[victim],
            log.acked_orders().len()
        );
        procs.insert(victim, world.serve_patiently(&config, GROUPS[victim]));
        retry_unknown(&targets_of(&procs), &log).await;
    }
    let targets = targets_of(&procs);
    let checked = std::panic::AssertUnwindSafe(check_everything(&targets, &log, &hooks, WITHIN));
    let settled = match futures_util::FutureExt::catch_unwind(checked).await {
        Ok(settled) => settled,
        Err(failure) => {
            diagnose_with_one_process(&world, &config, procs).await;
            std::panic::resume_unwind(failure)
        }
    };
    stale += stale_events(&procs[0].api).await;
    eprintln!(
        "distributed crash test: {ROUNDS} kills ({killed:?}), {settled}, {stale} events dropped as stale, {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// How long the distributed test waits for the engine to settle.
const WITHIN: Duration = Duration::from_secs(120);

/// After a failed check in the distributed layout: stops the three
/// processes and runs every service in one process on the same database
/// and streams, to print what reconciliation (which needs orders, inventory
/// and picking in one process) finds.
async fn diagnose_with_one_process(world: &World, config: &std::path::Path, procs: Vec<Proc>) {
    for p in procs {
        p.kill();
    }
    let all = world.serve_patiently(config, &GROUPS.join(","));
    let found = all.api.post_empty("/v1/ops/reconcile", OPS_KEY).await;
    eprintln!("reconciliation, by one process running every service after the failure: {}", found.text);
    all.kill();
}

/// Creates the warehouse and receives the initial stock.
async fn stock(inventory: &Api) {
    inventory.location(WAREHOUSE, ZONE).await;
    for (sku, qty) in SKUS {
        inventory.receive(WAREHOUSE, sku, qty).await;
    }
}

/// The load of one round: order clients, a restocker and a picker.
struct Load {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(targets: &Targets, log: &Arc<Log>, round: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let (api, log, stop) = (targets.orders.clone(), log.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let req = new_request(round, client, n);
                    let outcome = place(&api, &req).await;
                    let unknown = outcome == Outcome::Unknown;
                    log.orders.lock().expect("lock").insert(req.key.clone(), (req, outcome));
                    if unknown {
                        return; // The process is gone: retried after the restart.
                    }
                    tokio::time::sleep(THINK).await;
                }
            }));
        }
        let (api, restock_log, restock_stop) = (targets.inventory.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                if restock_stop.load(Ordering::Relaxed) {
                    return;
                }
                let (key, sku, qty) = (format!("rcv-r{round}-n{n}"), SKUS[n % SKUS.len()].0, 1 + (n % 4) as u32);
                restock_log.receipts.lock().expect("lock").insert(key.clone(), (sku.to_owned(), qty, Outcome::Unknown));
                let outcome = receive(&api, &key, sku, qty).await;
                let unknown = outcome == Outcome::Unknown;
                restock_log.receipts.lock().expect("lock").insert(key, (sku.to_owned(), qty, outcome));
                if unknown {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        let (api, pick_log, pick_stop) = (targets.picking.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { pick_until(&api, &pick_log, &pick_stop).await }));
        Load { tasks, stop }
    }

    /// Stops the clients and waits for their last requests' answers (or errors).
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("a client ends once stopped")
                .expect("a client never panics");
        }
    }
}

fn new_request(round: usize, client: usize, n: usize) -> Request {
    let key = format!("r{round}-c{client}-n{n}");
    let sku = SKUS[(client + n) % SKUS.len()].0;
    let sync = (client + n).is_multiple_of(10);
    let qty = 1 + u32::try_from(n % 3).expect("small");
    let mut body = order_body(sku, qty, if sync { "150.00" } else { "10.00" });
    body["customer"] = json!({"id": format!("cust-{key}"), "email": format!("{key}@example.com")});
    Request { key, body }
}

/// True for an answer that means "not done, send it again later".
fn retry_later(r: &Resp) -> bool {
    r.status.is_server_error()
        || r.status == StatusCode::TOO_MANY_REQUESTS
        || (r.status == StatusCode::CONFLICT
            && r.body["type"].as_str().is_some_and(|t| t.ends_with("/idempotency-key-in-flight")))
}

/// Sends one order request; a transport error or a "retry later" answer is `Unknown`.
async fn place(api: &Api, req: &Request) -> Outcome {
    let rb =
        api.request(Method::POST, "/v1/orders", Some(SHOP_KEY)).header("Idempotency-Key", &req.key).json(&req.body);
    let Ok(r) = api.send(rb.timeout(Duration::from_secs(10))).await else { return Outcome::Unknown };
    if retry_later(&r) {
        return Outcome::Unknown;
    }
    match r.status {
        StatusCode::CREATED => Outcome::Acked(r.body["id"].as_str().expect("order id").to_owned()),
        StatusCode::CONFLICT if r.body["type"].as_str().is_some_and(|t| t.ends_with("/insufficient-stock")) => {
            Outcome::Refused
        }
        other => panic!("order {}: {other}: {}", req.key, r.text),
    }
}

/// Sends one keyed stock receipt.
async fn receive(api: &Api, key: &str, sku: &str, qty: u32) -> Outcome {
    let body = json!({"location": WAREHOUSE, "sku": sku, "qty": qty});
    let rb = api.request(Method::POST, "/v1/inventory/receipts", Some(WAREHOUSE_KEY)).header("Idempotency-Key", key);
    let Ok(r) = api.send(rb.json(&body).timeout(Duration::from_secs(10))).await else { return Outcome::Unknown };
    if retry_later(&r) {
        return Outcome::Unknown;
    }
    assert_eq!(r.status, StatusCode::CREATED, "receipt {key}: {}", r.text);
    Outcome::Acked(key.to_owned())
}

/// Takes pick tasks and confirms them until told to stop (or the process dies).
async fn pick_until(api: &Api, log: &Log, stop: &AtomicBool) {
    let path = format!("/v1/picks/next?location={WAREHOUSE}");
    while !stop.load(Ordering::Relaxed) {
        let Ok(r) = api.send(api.request(Method::GET, &path, Some(WAREHOUSE_KEY))).await else { return };
        if r.status == StatusCode::NO_CONTENT {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert!(r.status.is_success() || r.status.is_server_error(), "next pick: {}: {}", r.status, r.text);
        if !r.status.is_success() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let id = r.body["id"].as_str().expect("pick id").to_owned();
        log.picks.lock().expect("lock").insert(id.clone(), (r.body.clone(), false));
        if confirm_once(api, &r.body).await {
            log.picks.lock().expect("lock").insert(id, (r.body, true));
        }
    }
}

/// True when the confirmation was acknowledged (first time or duplicate).
async fn confirm_once(api: &Api, pick: &Value) -> bool {
    let body = json!({"instruction_key": pick["instruction_key"], "qty": pick["qty"]});
    let path = format!("/v1/picks/{}/confirm", pick["id"].as_str().expect("pick id"));
    let Ok(r) = api.send(api.request(Method::POST, &path, Some(WAREHOUSE_KEY)).json(&body)).await else { return false };
    assert!(r.status.is_success() || r.status.is_server_error(), "confirm {path}: {}: {}", r.status, r.text);
    r.status.is_success()
}

/// Sends every request that got no answer again, with the same key and
/// body, and confirms every pick whose confirmation was not acknowledged
/// (a scanner retries its last instruction after a restart).
async fn retry_unknown(targets: &Targets, log: &Log) {
    let unknown: Vec<Request> = log
        .orders
        .lock()
        .expect("lock")
        .values()
        .filter(|(_, o)| *o == Outcome::Unknown)
        .map(|(r, _)| r.clone())
        .collect();
    for req in unknown {
        let outcome = wait_for(WAIT, || async {
            match place(&targets.orders, &req).await {
                Outcome::Unknown => None,
                known => Some(known),
            }
        })
        .await
        .unwrap_or_else(|| panic!("order request {} never answered after the restart", req.key));
        log.orders.lock().expect("lock").insert(req.key.clone(), (req, outcome));
    }
    let receipts: Vec<(String, String, u32)> = log
        .receipts
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, (_, _, o))| *o == Outcome::Unknown)
        .map(|(k, (s, q, _))| (k.clone(), s.clone(), *q))
        .collect();
    for (key, sku, qty) in receipts {
        let outcome = wait_for(WAIT, || async {
            match receive(&targets.inventory, &key, &sku, qty).await {
                Outcome::Unknown => None,
                known => Some(known),
            }
        })
        .await
        .unwrap_or_else(|| panic!("receipt {key} never answered after the restart"));
        log.receipts.lock().expect("lock").insert(key, (sku, qty, outcome));
    }
    let open: Vec<Value> =
        log.picks.lock().expect("lock").values().filter(|(_, done)| !done).map(|(p, _)| p.clone()).collect();
    for pick in open {
        let done = wait_for(WAIT, || async { confirm_once(&targets.picking, &pick).await.then_some(()) }).await;
        assert!(done.is_some(), "pick {} never confirmed after the restart", pick["id"]);
        let id = pick["id"].as_str().expect("id").to_owned();
        log.picks.lock().expect("lock").insert(id, (pick, true));
    }
}

/// Settles and runs every check; returns a line of figures.
async fn check_everything(targets: &Targets, log: &Log, hooks: &Hooks, within: Duration) -> String {
    let acked = log.acked_orders();
    assert!(acked.len() >= 50, "the load ran: only {} orders acknowledged", acked.len());
    let orders = settle(targets, within).await;
    check_orders(&orders, &acked, &log.orders.lock().expect("lock"));
    check_stock(targets, log, within).await;
    check_histories(&targets.orders, acked.keys().step_by(25)).await;
    let (notified, repeats) = check_notifications(targets, hooks, &acked, within).await;
    let receipts = log.receipts.lock().expect("lock").len();
    let confirmed = log.picks.lock().expect("lock").values().filter(|(_, done)| *done).count();
    format!(
        "{} orders acknowledged ({} in total), {receipts} keyed receipts, {confirmed} picks confirmed, \
         {notified} notifications ({repeats})",
        acked.len(),
        orders.len()
    )
}

/// Waits until no order is still being allocated; returns every order.
async fn settle(targets: &Targets, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let orders = targets.orders.all_orders(None).await;
        let pending: Vec<&Value> = orders.iter().filter(|o| ["created", "allocating"].contains(&state(o))).collect();
        if pending.is_empty() {
            return orders;
        }
        if Instant::now() >= deadline {
            // Their histories and every process's dead letters say where they stopped.
            let mut report = Vec::new();
            for o in &pending {
                let id = o["id"].as_str().unwrap_or("");
                let events = targets.orders.get(&format!("/v1/orders/{id}/events"), VIEWER_KEY).await;
                report.push(format!("order {id}: {o}\nits events: {}", events.text));
            }
            for api in [&targets.orders, &targets.picking, &targets.notifications] {
                let dead = api.get("/v1/ops/dead-letters", VIEWER_KEY).await;
                report.push(format!("dead letters at {}: {}", api.base, dead.text));
                let metrics = api.send(api.request(Method::GET, "/metrics", None)).await.map(|r| r.text);
                let counters: Vec<String> = metrics
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| {
                        !l.starts_with('#')
                            && ["stale", "ignored", "parked", "dead_letter"].iter().any(|k| l.contains(k))
                    })
                    .map(str::to_owned)
                    .collect();
                report.push(format!("counters at {}: {counters:?}", api.base));
            }
            panic!("{} orders stuck in allocation after {within:?}:\n{}", pending.len(), report.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every acknowledged order exists once, no request made two orders, a
/// refused one made none, and every order waits in a legal state.
fn check_orders(orders: &[Value], acked: &BTreeMap<String, String>, log: &BTreeMap<String, (Request, Outcome)>) {
    let mut by_customer: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for o in orders {
        let id = o["id"].as_str().expect("id");
        assert!(ids.insert(id), "order {id} listed twice");
        by_customer.entry(o["customer_id"].as_str().expect("customer")).or_default().push(id);
        assert!(
            ["allocated", "picking", "picked", "backordered"].contains(&state(o)),
            "order {id} ended in {}: {o:#}",
            state(o)
        );
    }
    for (id, key) in acked {
        assert!(ids.contains(id.as_str()), "acknowledged order {id} (request {key}) was lost");
    }
    for (customer, orders) in &by_customer {
        assert_eq!(orders.len(), 1, "request of {customer} created {} orders: {orders:?}", orders.len());
    }
    for (key, (_, outcome)) in log {
        let customer = format!("cust-{key}");
        match outcome {
            Outcome::Acked(id) => assert_eq!(by_customer.get(customer.as_str()), Some(&vec![id.as_str()])),
            Outcome::Refused => assert!(!by_customer.contains_key(customer.as_str()), "refused {key} exists"),
            Outcome::Unknown => panic!("request {key} was never answered"),
        }
    }
}

/// On hand = received (each acknowledged receipt once) − picked; reserved =
/// what orders hold; no oversell. Holds orphaned by a crash between a
/// synchronous reservation and its order lapse after `inventory.hold_ttl`
/// and then fill backorders, so the check re-reads until the books balance
/// (or the deadline passes).
async fn check_stock(targets: &Targets, log: &Log, within: Duration) {
    let unanswered = log.receipts.lock().expect("lock").values().filter(|(_, _, o)| *o == Outcome::Unknown).count();
    assert_eq!(unanswered, 0, "receipts never answered");
    let deadline = Instant::now() + within;
    loop {
        let orders = targets.orders.all_orders(None).await;
        let mut balanced = true;
        let mut report = Vec::new();
        for (sku, _) in SKUS {
            let picked: u64 = orders
                .iter()
                .flat_map(|o| o["lines"].as_array().cloned().unwrap_or_default())
                .filter(|l| l["sku"] == sku)
                .flat_map(|l| l["allocations"].as_array().cloned().unwrap_or_default())
                .map(|a| a["picked"].as_u64().unwrap_or(0))
                .sum();
            let held: u64 = orders.iter().map(|o| reserved_units(o, sku, WAREHOUSE)).sum();
            let inv = targets.inventory.inventory(sku).await;
            assert_no_oversell(&inv);
            let here = at_location(&inv, WAREHOUSE);
            let received = log.received(sku);
            let on_hand = received - picked;
            balanced &= here["on_hand"].as_u64() == Some(on_hand) && here["reserved"].as_u64() == Some(held);
            report.push(format!(
                "{sku}: expected on hand {on_hand} (received {received} - picked {picked}), reserved {held}: {inv}"
            ));
        }
        if balanced {
            return;
        }
        if Instant::now() >= deadline {
            // What reconciliation finds (reservations against orders and picks) names the culprit.
            let found = match &targets.reconcile {
                Some(api) => api.post_empty("/v1/ops/reconcile", OPS_KEY).await.text,
                None => "printed after this failure".to_owned(),
            };
            panic!("stock does not balance:\n{}\nreconciliation: {found}", report.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A sample of orders' histories: strictly increasing sequences, no repeats.
async fn check_histories<'a>(api: &Api, ids: impl Iterator<Item = &'a String>) {
    for id in ids {
        let events = api.get(&format!("/v1/orders/{id}/events"), VIEWER_KEY).await.ok();
        let events = events.as_array().expect("events");
        let sequences: Vec<u64> = events.iter().filter_map(|e| e["sequence"].as_u64()).collect();
        assert!(sequences.windows(2).all(|w| w[0] < w[1]), "order {id}: sequences {sequences:?}");
        let order = api.get_order(id).await;
        assert_eq!(sequences.last().copied(), order["version"].as_u64(), "order {id}");
    }
}

/// The notification contract under crashes (see the module docs). Waits
/// until every order's allocation or backorder was delivered and nothing is
/// pending; returns the distinct notifications and a line on the repeats.
async fn check_notifications(
    targets: &Targets,
    hooks: &Hooks,
    acked: &BTreeMap<String, String>,
    within: Duration,
) -> (usize, String) {
    let deadline = Instant::now() + within;
    let deliveries = loop {
        let orders = targets.orders.all_orders(None).await;
        let deliveries = hooks.receiver.deliveries();
        let told: BTreeSet<(String, String)> = deliveries
            .iter()
            .filter_map(|d| d.json().ok())
            .map(|b| (b["order_id"].as_str().unwrap_or("").to_owned(), b["state"].as_str().unwrap_or("").to_owned()))
            .collect();
        let untold: Vec<(String, &str)> = orders
            .iter()
            .map(|o| {
                let id = o["id"].as_str().expect("id").to_owned();
                (id, if state(o) == "backordered" { "backordered" } else { "allocated" })
            })
            .filter(|(id, s)| !told.contains(&(id.clone(), (*s).to_owned())))
            .collect();
        let summary = targets.notifications.get("/v1/ops/summary", VIEWER_KEY).await.ok();
        let pending = summary["notifications"]["by_status"]["pending"].as_u64().unwrap_or(0);
        if untold.is_empty() && pending == 0 {
            break deliveries;
        }
        assert!(
            Instant::now() < deadline,
            "notifications missing after {within:?}: {pending} pending, {} orders untold, e.g. {:?}",
            untold.len(),
            &untold[..untold.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (received, _) = hooks.receiver.counts();
    assert_eq!(received, deliveries.len() as u64, "the receiver kept every delivery");
    let told: BTreeSet<String> =
        deliveries.iter().filter_map(|d| d.json().ok()?["order_id"].as_str().map(str::to_owned)).collect();
    for id in acked.keys() {
        assert!(told.contains(id), "acknowledged order {id} was never notified");
    }
    check_repeats(&deliveries, &hooks.kills_ms)
}

/// Same id, same body; a repeat only across a kill of the sender, at most
/// [`REPEATS_PER_KILL_MAX`] per kill. Returns the distinct ids and a line on the repeats.
fn check_repeats(deliveries: &[Delivery], kills_ms: &[u64]) -> (usize, String) {
    // Lifetime of the sending process a delivery came from: how many kills before it.
    let lifetime = |d: &Delivery| kills_ms.iter().filter(|k| **k < d.received_ms).count();
    let mut by_id: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in deliveries {
        assert!(d.accepted(), "the receiver accepts every delivery: {d:?}");
        let id = d.header("orderly-event-id").expect("every delivery carries Orderly-Event-Id");
        let body = d.json().expect("a JSON body");
        assert_eq!(body["notification_id"], id, "the body names the notification it is");
        by_id.entry(id).or_default().push(d);
    }
    let mut repeats_per_kill = vec![0usize; kills_ms.len()];
    let mut repeats = 0;
    for (id, ds) in &by_id {
        for pair in ds.windows(2) {
            let (first, again) = (pair[0], pair[1]);
            assert_eq!(first.body, again.body, "notification {id} delivered again with another body");
            let (was, is) = (lifetime(first), lifetime(again));
            assert!(
                was < is,
                "notification {id} delivered twice by one process (at {} ms and {} ms; kills at {kills_ms:?} ms)",
                first.received_ms,
                again.received_ms
            );
            // The kill that ended the first delivery's process lost its "sent".
            repeats_per_kill[was] += 1;
            repeats += 1;
        }
    }
    for (kill, n) in repeats_per_kill.iter().enumerate() {
        assert!(*n <= REPEATS_PER_KILL_MAX, "kill {kill} caused {n} repeated notifications");
    }
    (by_id.len(), format!("{repeats} delivered again after a kill, per kill {repeats_per_kill:?}"))
}

fn tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}
