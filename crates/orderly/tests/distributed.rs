//! The distributed mode end to end: the real `orderly` binary, one process
//! per group of services, state in PostgreSQL, events through NATS JetStream
//! (the fixtures are in `support/cluster.rs`, shared with `e2e_crash.rs`).
//!
//! Under `CI=true` an unreachable PostgreSQL or NATS fails the test;
//! elsewhere it skips, loudly.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::cluster::*;
use support::*;

fn id_of(created: &Resp) -> String {
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    created.body["id"].as_str().expect("order id").to_owned()
}

async fn stock(inventory: &Api, sku: &str, qty: u32) {
    let r = inventory
        .put(&format!("/v1/locations/{WAREHOUSE}"), OPS_KEY, &json!({"zone": ZONE, "kind": "warehouse"}))
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    inventory.receive(WAREHOUSE, sku, qty).await;
}

/// Places one order the way a careful storefront does: with an idempotency
/// key, retried (a few times) when the answer is lost or a 503.
async fn place_one(orders: &Api, sku: &str, key: String) -> String {
    let body = order_body(sku, 1, "5.00");
    for attempt in 1..=5 {
        let rb = orders.request(reqwest::Method::POST, "/v1/orders", Some(SHOP_KEY)).header("Idempotency-Key", &key);
        match orders.send(rb.json(&body)).await {
            Ok(r) if r.status == StatusCode::CREATED => return id_of(&r),
            Ok(r) if r.status == StatusCode::SERVICE_UNAVAILABLE || r.status == StatusCode::TOO_MANY_REQUESTS => {
                eprintln!("order {key} attempt {attempt}: {} {}", r.status, r.text);
            }
            Ok(r) => panic!("order {key}: {} {}", r.status, r.text),
            Err(e) => eprintln!("order {key} attempt {attempt}: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("order {key} was never accepted");
}

/// Places `n` one-unit orders of `sku` through `orders`, 16 at a time; returns their ids.
async fn place(orders: &Api, sku: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let k = left.min(16);
        let calls = (0..k).map(|_| place_one(orders, sku, unique("key")));
        ids.extend(futures_util::future::join_all(calls).await);
        left -= k;
    }
    ids
}

/// Waits until every order has an allocation decision; returns the orders.
async fn settled(api: &Api, ids: &[String], within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let all = api.all_orders(None).await;
        let done: Vec<Value> = all
            .into_iter()
            .filter(|o| ids.iter().any(|i| o["id"] == i.as_str()))
            .filter(|o| !["created", "allocating"].contains(&state(o)))
            .collect();
        if done.len() == ids.len() {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} orders were allocated or backordered in {within:?}",
            done.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Units allocated over `orders` equal units reserved in the ledger, and
/// nothing is oversold.
async fn check_ledger(api: &Api, orders: &[Value], sku: &str, received: u64) {
    let allocated: u64 = orders.iter().map(allocated_units).sum();
    let inv = api.inventory(sku).await;
    assert_no_oversell(&inv);
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!(here["reserved"].as_u64(), Some(allocated), "reserved = allocated, no double reservation: {inv}");
    assert!(allocated <= received, "allocated {allocated} of {received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_take_an_order_to_delivered() {
    if !servers_up() {
        return;
    }
    let sim = orderly_carrier::sim::spawn_local(orderly_carrier::sim::SimConfig::demo(7)).await.expect("carrier sim");
    let world = World::new(&format!("nats://{NATS}"));
    let config = world.config(Some(sim.url()));
    let orders = world.serve(&config, "orders");
    let warehouse = world.serve(&config, "inventory,picking");
    let dock = world.serve(&config, "packing,shipping,notifications");

    // A command for a service another process runs: a clear 503, nothing done.
    let misrouted = warehouse.order("SKU-D", 1, "5.00").await;
    assert_eq!(misrouted.status, StatusCode::SERVICE_UNAVAILABLE, "{}", misrouted.text);
    assert_eq!(misrouted.content_type(), "application/problem+json");
    assert!(misrouted.text.contains("--services including orders"), "{}", misrouted.text);

    stock(&warehouse, "SKU-D", 10).await;
    let id = id_of(&orders.order("SKU-D", 2, "5.00").await);
    // Reads work in any process.
    let allocated = dock.wait_state(&id, &["allocated", "picking"]).await;
    assert_eq!(allocated_units(&allocated), 2);

    let pick = warehouse.next_pick(WAREHOUSE).await;
    assert_eq!(pick["order_id"], id.as_str());
    warehouse.confirm(&pick).await.ok();
    orders.wait_state(&id, &["picked"]).await;

    let body = json!({"order_id": id, "location": WAREHOUSE, "pick_ids": [pick["id"]]});
    wait_for(WAIT, || async {
        let r = dock.post("/v1/packages", WAREHOUSE_KEY, &body).await;
        match r.status {
            StatusCode::CREATED => Some(()),
            StatusCode::CONFLICT => None,
            other => panic!("POST /v1/packages: {other}: {}", r.text),
        }
    })
    .await
    .expect("packing accepts the package once it has seen the pick");
    let shipped = orders.wait_state(&id, &["shipped"]).await;
    let shipment = shipped["shipments"][0]["shipment_id"].as_str().expect("shipment id").to_owned();
    dock.post_empty(&format!("/v1/shipments/{shipment}/delivered"), CARRIER_KEY).await.ok();
    orders.wait_state(&id, &["delivered"]).await;

    let inv = warehouse.inventory("SKU-D").await;
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!((here["on_hand"].as_u64(), here["reserved"].as_u64()), (Some(8), Some(0)), "{inv}");
    let events = orders.get(&format!("/v1/orders/{id}/events"), VIEWER_KEY).await.ok();
    let types: Vec<&str> = events.as_array().expect("events").iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.last(), Some(&"orderly.order.delivered"), "{types:?}");
    for p in [orders, warehouse, dock] {
        assert!(!p.services.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_process_restarts_with_no_loss_or_double_effect() {
    if !servers_up() {
        return;
    }
    let world = World::new(&format!("nats://{NATS}"));
    let config = world.config(None);
    let orders = world.serve(&config, "orders");
    let warehouse = world.serve(&config, "inventory,picking");
    let _rest = world.serve(&config, "packing,shipping,notifications");
    stock(&warehouse, "SKU-K", 150).await;

    let mut ids = place(&orders, "SKU-K", 60).await;
    warehouse.kill();
    // Orders keep being accepted while inventory is gone: the events wait in JetStream.
    ids.extend(place(&orders, "SKU-K", 60).await);
    let warehouse = world.serve(&config, "inventory,picking");
    ids.extend(place(&orders, "SKU-K", 60).await);

    let done = settled(&orders, &ids, Duration::from_secs(90)).await;
    assert_eq!(done.len(), 180, "no order lost");
    check_ledger(&warehouse, &done, "SKU-K", 150).await;
    let allocated: u64 = done.iter().map(allocated_units).sum();
    // 5% of 150 is held back as safety stock.
    assert_eq!(allocated, 142, "every sellable unit allocated exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_mid_load_drains_afterwards_with_nothing_lost() {
    if !servers_up() {
        return;
    }
    let Some(mut nats) = PrivateNats::start() else { return };
    let world = World::new(&nats.url());
    let config = world.config(None);
    let orders = world.serve(&config, "orders");
    let rest = world.serve(&config, "inventory,picking,packing,shipping,notifications");
    stock(&rest, "SKU-N", 500).await;

    let mut ids = place(&orders, "SKU-N", 50).await;
    nats.down();
    // The broker is gone: orders are still accepted (committed with their
    // events in the outbox), and stock can still be received.
    ids.extend(place(&orders, "SKU-N", 50).await);
    rest.receive(WAREHOUSE, "SKU-N", 100).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    ids.extend(place(&orders, "SKU-N", 50).await);
    nats.up();
    ids.extend(place(&orders, "SKU-N", 50).await);

    let done = settled(&orders, &ids, Duration::from_secs(90)).await;
    assert_eq!(done.len(), 200, "no order lost");
    assert!(done.iter().all(|o| allocated_units(o) == 1), "all 200 fit in the 570 sellable units");
    check_ledger(&rest, &done, "SKU-N", 600).await;
    let _ = world.bus().await.stream_messages(orderly_bus_nats::Lane::Events).await.expect("the stream is back");
}

/// A counter's value in a process's `/metrics` (0 when absent).
async fn counter(api: &Api, series: &str) -> f64 {
    let text = api.get("/metrics", VIEWER_KEY).await.text;
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok())).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_inventory_and_picking_share_a_flash_sale() {
    if !servers_up() {
        return;
    }
    let world = World::new(&format!("nats://{NATS}"));
    let config = world.config(None);
    let orders = world.serve(&config, "orders");
    let a = world.serve(&config, "inventory,picking");
    let b = world.serve(&config, "inventory,picking");
    let _rest = world.serve(&config, "packing,shipping,notifications");
    // Both replicas are active: stock goes in through either.
    stock(&a, "SKU-HOT", 60).await;
    b.receive(WAREHOUSE, "SKU-HOT", 40).await;
    // Let them split the partitions (a membership round is 0.5 s).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ids = place(&orders, "SKU-HOT", 240).await;
    let done = settled(&orders, &ids, Duration::from_secs(120)).await;
    assert_eq!(done.len(), 240, "no order lost");
    let allocated: u64 = done.iter().map(allocated_units).sum();
    assert_eq!(allocated, 95, "the 95 sellable units (5% safety stock), each sold once: 0 oversold");
    let backordered = done.iter().filter(|o| state(o) == "backordered").count();
    assert_eq!(backordered, 240 - 95, "the rest wait as backorders");
    // Both replicas answer the same ledger (shared rows are not trusted from a cache for long).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    check_ledger(&a, &done, "SKU-HOT", 100).await;
    check_ledger(&b, &done, "SKU-HOT", 100).await;

    let consumed = "orderly_events_consumed_total{consumer=\"inventory\"}";
    let (by_a, by_b) = (counter(&a, consumed).await, counter(&b, consumed).await);
    eprintln!("inventory events consumed: replica a {by_a}, replica b {by_b}");
    assert!(by_a > 0.0 && by_b > 0.0, "both replicas consumed orders' events: a {by_a}, b {by_b}");
    let conflicts = "orderly_commit_conflicts_total{service=\"inventory\"}";
    eprintln!("inventory commit conflicts: a {}, b {}", counter(&a, conflicts).await, counter(&b, conflicts).await);

    // Pickers on both replicas are never handed the same task.
    let mut picks = Vec::new();
    for round in 0..6 {
        let (x, y) = tokio::join!(a.next_pick(WAREHOUSE), b.next_pick(WAREHOUSE));
        assert!(x["id"].is_string() && y["id"].is_string(), "round {round}: {x} {y}");
        picks.push(x["id"].as_str().expect("id").to_owned());
        picks.push(y["id"].as_str().expect("id").to_owned());
    }
    let distinct: std::collections::BTreeSet<&String> = picks.iter().collect();
    assert_eq!(distinct.len(), picks.len(), "a task is assigned once: {picks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_sale_leaves_its_partitions_to_the_other() {
    if !servers_up() {
        return;
    }
    let world = World::new(&format!("nats://{NATS}"));
    let config = world.config(None);
    let orders = world.serve(&config, "orders");
    let doomed = world.serve(&config, "inventory,picking");
    let survivor = world.serve(&config, "inventory,picking");
    let _rest = world.serve(&config, "packing,shipping,notifications");
    stock(&survivor, "SKU-HOT", 100).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut ids = place(&orders, "SKU-HOT", 80).await;
    // One replica dies mid-sale; the other takes its partitions (what the
    // dead one had fetched and not acknowledged comes back after ack_wait).
    doomed.kill();
    ids.extend(place(&orders, "SKU-HOT", 160).await);

    let done = settled(&orders, &ids, Duration::from_secs(150)).await;
    assert_eq!(done.len(), 240, "no order lost");
    check_ledger(&survivor, &done, "SKU-HOT", 100).await;
    let allocated: u64 = done.iter().map(allocated_units).sum();
    assert_eq!(allocated, 95, "the 95 sellable units (5% safety stock), each sold once: 0 oversold");
}
