//! Crash safety of the real binary: `orderly serve --durability full` under a
//! load of orders and pick confirmations is killed with SIGKILL mid-load,
//! several times, and restarted on the same data directory. Clients retry
//! what they never got an answer for, with the same Idempotency-Key. In the
//! end every acknowledged order exists exactly once, every order settles,
//! and stock is conserved: on hand = received − picked, and the ledger
//! reserves exactly what the orders hold.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const SKUS: [(&str, u32); 2] = [("CRASH-A", 300), ("CRASH-B", 150)];
const ROUNDS: usize = 3;
const CLIENTS: usize = 24;
/// Orders acknowledged in a round before the server is killed.
const ACKED_BEFORE_KILL: [usize; ROUNDS] = [60, 110, 160];

/// What a client knows about one order request.
#[derive(Debug, Clone)]
enum Outcome {
    /// 201 with this order id.
    Acked(String),
    /// 409: a synchronous order found no stock (nothing was created).
    Refused,
    /// No answer (the server died), or "retry later": to be sent again.
    Unknown,
}

/// One order request: its key and body never change across retries.
#[derive(Debug, Clone)]
struct Request {
    key: String,
    body: Value,
}

#[derive(Default)]
struct Ledger {
    outcomes: Mutex<BTreeMap<String, (Request, Outcome)>>,
    /// Pick tasks handed to the picker, by id, and whether their confirmation was acknowledged.
    picks: Mutex<BTreeMap<String, (Value, bool)>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_orders_survive_sigkill() {
    let (_dir, config, data, log) = server_dir();
    let extra = "[inventory]\nhold_ttl = \"5s\"\nhold_release_jitter = \"1s\"\n";
    std::fs::write(&config, config_toml(None, extra)).expect("config written");
    let mut server = Server::start(&config, &data, &log).expect("server starts");
    server.api.location(WAREHOUSE, ZONE).await;
    for (sku, qty) in SKUS {
        server.api.receive(WAREHOUSE, sku, qty).await;
    }
    let ledger = Arc::new(Ledger::default());
    let started = Instant::now();
    for round in 0..ROUNDS {
        run_until_killed(&server.api, &ledger, round).await;
        server.kill();
        server =
            Server::start(&config, &data, &log).unwrap_or_else(|e| panic!("restart {round}: {e:#}\n{}", tail(&log)));
        retry_unknown(&server.api, &ledger).await;
        confirm_remembered_picks(&server.api, &ledger).await;
    }
    let api = server.api.clone();
    let outcomes = ledger.outcomes.lock().expect("lock").clone();
    let acked: BTreeMap<String, String> = outcomes
        .values()
        .filter_map(|(req, o)| match o {
            Outcome::Acked(id) => Some((id.clone(), req.key.clone())),
            _ => None,
        })
        .collect();
    assert!(acked.len() >= ACKED_BEFORE_KILL.iter().sum::<usize>(), "the load ran: {} acknowledged", acked.len());

    let orders = settle(&api).await;
    check_orders(&orders, &acked, &outcomes);
    check_stock(&api).await;
    check_histories(&api, acked.keys().step_by(25)).await;
    let confirmed = ledger.picks.lock().expect("lock").values().filter(|(_, done)| *done).count();
    eprintln!(
        "crash test: {ROUNDS} kills, {} orders acknowledged, {} in total, {confirmed} picks confirmed, {:.1}s",
        acked.len(),
        orders.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Runs order clients and a picker until the round's quota of acknowledged
/// orders is reached, then returns with requests still in flight.
async fn run_until_killed(api: &Api, ledger: &Arc<Ledger>, round: usize) {
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (api, ledger, acked, stop) = (api.clone(), ledger.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let req = new_request(round, client, n);
                let outcome = place(&api, &req).await;
                let unknown = matches!(outcome, Outcome::Unknown);
                if matches!(outcome, Outcome::Acked(_)) {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                ledger.outcomes.lock().expect("lock").insert(req.key.clone(), (req, outcome));
                if unknown {
                    return; // The server is gone: retried after the restart.
                }
            }
        }));
    }
    let picker = {
        let (api, ledger, stop) = (api.clone(), ledger.clone(), stop.clone());
        tokio::spawn(async move { pick_until(&api, &ledger, &stop).await })
    };
    let quota = ACKED_BEFORE_KILL[round];
    let reached =
        wait_for(Duration::from_secs(30), || async { (acked.load(Ordering::Relaxed) >= quota).then_some(()) }).await;
    assert!(reached.is_some(), "round {round}: only {} orders acknowledged", acked.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    // Kill while the clients' last requests are in flight: the caller kills
    // right after this returns, and the tasks are left to fail on their own.
    drop(tasks);
    drop(picker);
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

/// Sends one order request; a transport error or a "retry later" answer is `Unknown`.
async fn place(api: &Api, req: &Request) -> Outcome {
    let rb =
        api.request(Method::POST, "/v1/orders", Some(SHOP_KEY)).header("Idempotency-Key", &req.key).json(&req.body);
    let Ok(r) = api.send(rb.timeout(Duration::from_secs(10))).await else { return Outcome::Unknown };
    match r.status {
        StatusCode::CREATED => Outcome::Acked(r.body["id"].as_str().expect("order id").to_owned()),
        StatusCode::CONFLICT if r.body["type"].as_str().is_some_and(|t| t.ends_with("/insufficient-stock")) => {
            Outcome::Refused
        }
        StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Outcome::Unknown,
        other => panic!("order {}: {other}: {}", req.key, r.text),
    }
}

/// Takes pick tasks and confirms them until told to stop (or the server dies).
async fn pick_until(api: &Api, ledger: &Ledger, stop: &AtomicBool) {
    let path = format!("/v1/picks/next?location={WAREHOUSE}");
    while !stop.load(Ordering::Relaxed) {
        let Ok(r) = api.send(api.request(Method::GET, &path, Some(WAREHOUSE_KEY))).await else { return };
        if r.status == StatusCode::NO_CONTENT {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert!(r.status.is_success() || r.status.is_server_error(), "next pick: {}: {}", r.status, r.text);
        if !r.status.is_success() {
            continue;
        }
        let id = r.body["id"].as_str().expect("pick id").to_owned();
        ledger.picks.lock().expect("lock").insert(id.clone(), (r.body.clone(), false));
        if confirm_once(api, &r.body).await {
            ledger.picks.lock().expect("lock").insert(id, (r.body, true));
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

/// Sends every request that got no answer again, with the same key and body.
async fn retry_unknown(api: &Api, ledger: &Ledger) {
    let unknown: Vec<Request> = ledger
        .outcomes
        .lock()
        .expect("lock")
        .values()
        .filter(|(_, o)| matches!(o, Outcome::Unknown))
        .map(|(r, _)| r.clone())
        .collect();
    for req in unknown {
        let outcome = wait_for(WAIT, || async {
            match place(api, &req).await {
                Outcome::Unknown => None,
                known => Some(known),
            }
        })
        .await
        .unwrap_or_else(|| panic!("request {} never answered after the restart", req.key));
        ledger.outcomes.lock().expect("lock").insert(req.key.clone(), (req, outcome));
    }
}

/// Confirms every task the picker took but never saw acknowledged (a
/// scanner retries its last instruction after a restart).
async fn confirm_remembered_picks(api: &Api, ledger: &Ledger) {
    let open: Vec<Value> =
        ledger.picks.lock().expect("lock").values().filter(|(_, done)| !done).map(|(p, _)| p.clone()).collect();
    for pick in open {
        let done = wait_for(WAIT, || async { confirm_once(api, &pick).await.then_some(()) }).await;
        assert!(done.is_some(), "pick {} never confirmed after the restart", pick["id"]);
        let id = pick["id"].as_str().expect("id").to_owned();
        ledger.picks.lock().expect("lock").insert(id, (pick, true));
    }
}

/// Waits until no order is still being allocated; returns every order.
async fn settle(api: &Api) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let orders = api.all_orders(None).await;
        let pending: Vec<&str> = orders
            .iter()
            .filter(|o| ["created", "allocating"].contains(&state(o)))
            .filter_map(|o| o["id"].as_str())
            .collect();
        if pending.is_empty() {
            return orders;
        }
        assert!(Instant::now() < deadline, "orders stuck in allocation: {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every acknowledged order exists once, no request made two orders, and
/// every order waits in a legal state.
fn check_orders(orders: &[Value], acked: &BTreeMap<String, String>, outcomes: &BTreeMap<String, (Request, Outcome)>) {
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
    for (key, (_, outcome)) in outcomes {
        let customer = format!("cust-{key}");
        match outcome {
            Outcome::Acked(id) => assert_eq!(by_customer.get(customer.as_str()), Some(&vec![id.as_str()])),
            Outcome::Refused => assert!(!by_customer.contains_key(customer.as_str()), "refused {key} exists"),
            Outcome::Unknown => panic!("request {key} was never answered"),
        }
    }
}

/// On hand = received − picked; reserved = what orders hold; no oversell.
/// Holds orphaned by a crash between a synchronous reservation and its order
/// expire after `inventory.hold_ttl` and then fill backorders, so the check
/// re-reads the orders until the books balance (or the deadline passes).
async fn check_stock(api: &Api) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let orders = api.all_orders(None).await;
        let mut balanced = true;
        let mut report = Vec::new();
        for (sku, received) in SKUS {
            let picked: u64 = orders
                .iter()
                .flat_map(|o| o["lines"].as_array().cloned().unwrap_or_default())
                .filter(|l| l["sku"] == sku)
                .flat_map(|l| l["allocations"].as_array().cloned().unwrap_or_default())
                .map(|a| a["picked"].as_u64().unwrap_or(0))
                .sum();
            let held: u64 = orders.iter().map(|o| reserved_units(o, sku, WAREHOUSE)).sum();
            let inv = api.inventory(sku).await;
            assert_no_oversell(&inv);
            let here = at_location(&inv, WAREHOUSE);
            let expected_on_hand = u64::from(received) - picked;
            balanced &= here["on_hand"].as_u64() == Some(expected_on_hand) && here["reserved"].as_u64() == Some(held);
            report.push(format!("{sku}: expected on hand {expected_on_hand} (received {received} - picked {picked}), reserved {held}: {inv}"));
        }
        if balanced {
            return;
        }
        assert!(Instant::now() < deadline, "stock does not balance:\n{}", report.join("\n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
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

fn tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}
