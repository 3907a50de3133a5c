//! End to end over HTTP: a flash sale. Thousands of concurrent orders race
//! for about a hundred sellable units of one hot SKU spread over two
//! warehouses and four partitions; exactly the sellable units are
//! allocated, every other order waits in the backorder queue, nothing is
//! oversold, and restocking serves the queue.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::*;

const SKU: &str = "HOT-1";
const ORDERS: usize = 2_000;
const CONCURRENCY: usize = 64;
/// Every 25th order is worth more than `allocation.sync_min_line_value`: it is
/// reserved before the answer (201 with its allocation) or refused with 409.
const SYNC_EVERY: usize = 25;
const SECOND_WAREHOUSE: &str = "WH-EU-2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_allocates_exactly_the_sellable_units() {
    let app = TestApp::spawn_with("[inventory]\npartitions = 4\n").await;
    app.stock(SKU, 60).await;
    app.api.location(SECOND_WAREHOUSE, ZONE).await;
    app.api.receive(SECOND_WAREHOUSE, SKU, 50).await;
    let before = app.inventory(SKU).await;
    let sellable = before["available"].as_u64().expect("available");
    assert!((90..=110).contains(&sellable), "a safety buffer is held back from 110 units: {before}");

    let started = Instant::now();
    let outcomes = place_orders(&app.api).await;
    let intake = started.elapsed();
    let accepted: Vec<&Value> = outcomes.iter().filter_map(|(status, body)| (*status == 201).then_some(body)).collect();
    let refused = outcomes.iter().filter(|(status, _)| *status == 409).count();
    assert_eq!(accepted.len() + refused, ORDERS, "every order is accepted or (sync, no stock) refused with 409");
    assert!(refused < ORDERS / SYNC_EVERY + 1, "only synchronous orders are refused: {refused}");
    let ids: BTreeSet<&str> = accepted.iter().map(|o| o["id"].as_str().expect("id")).collect();
    assert_eq!(ids.len(), accepted.len(), "order ids are unique");
    for o in &accepted {
        if o["lines"][0]["unit_price"] == "150.00" {
            assert_eq!(allocated_units(o), 1, "a synchronous order is answered with its reservation: {o}");
        }
    }

    let orders = wait_until_settled(&app.api, accepted.len()).await;
    let settled = started.elapsed();
    let listed: BTreeSet<&str> = orders.iter().map(|o| o["id"].as_str().expect("id")).collect();
    assert_eq!(listed, ids, "the list holds exactly the acknowledged orders");
    let allocated: u64 = orders.iter().map(allocated_units).sum();
    let by_state = count_states(&orders);
    assert_eq!(allocated, sellable, "exactly the sellable units are allocated; states: {by_state:?}");
    let waiting = by_state.get("backordered").copied().unwrap_or(0);
    assert_eq!(waiting as u64, accepted.len() as u64 - sellable, "everyone else waits: {by_state:?}");
    check_ledger_matches_orders(&app, &orders).await;
    let summary = app.get("/v1/ops/summary", VIEWER_KEY).await.ok();
    assert_eq!(summary["orders_by_state"]["backordered"].as_u64(), Some(waiting as u64), "{summary}");

    // Restocking serves the backorder queue first: the new sellable units all go to waiting orders.
    app.api.receive(SECOND_WAREHOUSE, SKU, 30).await;
    app.wait_quiet().await;
    let orders = wait_until_settled(&app.api, accepted.len()).await;
    let after = app.inventory(SKU).await;
    let allocated_after: u64 = orders.iter().map(allocated_units).sum();
    let reserved: u64 =
        after["locations"].as_array().expect("locations").iter().map(|l| l["reserved"].as_u64().unwrap_or(0)).sum();
    assert!(allocated_after > allocated, "the receipt filled backorders");
    assert_eq!(after["available"], 0, "backorders take every new sellable unit: {after}");
    assert_eq!(allocated_after, reserved, "{after}");
    check_ledger_matches_orders(&app, &orders).await;
    eprintln!(
        "flash sale: {ORDERS} orders, {sellable} sellable, intake {:.2}s, settled {:.2}s, {refused} sync refusals",
        intake.as_secs_f64(),
        settled.as_secs_f64()
    );
    app.stop().await;
}

/// Places [`ORDERS`] orders from [`CONCURRENCY`] tasks; returns (status, body) of each.
async fn place_orders(api: &Api) -> Vec<(u16, Value)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (api, next) = (api.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ORDERS {
                    return out;
                }
                let sync = i % SYNC_EVERY == 0;
                let mut body = order_body(SKU, 1, if sync { "150.00" } else { "19.99" });
                body["customer"] = json!({"id": format!("c-{i}"), "email": format!("c{i}@example.com")});
                body["priority"] = json!(if i % 3 == 0 { "same_day" } else { "standard" });
                let r = api.post("/v1/orders", SHOP_KEY, &body).await;
                assert!(
                    r.status == StatusCode::CREATED || (sync && r.status == StatusCode::CONFLICT),
                    "order {i}: {} {}",
                    r.status,
                    r.text
                );
                if r.status == StatusCode::CONFLICT {
                    r.assert_problem(409);
                }
                out.push((r.status.as_u16(), r.body));
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("order worker"));
    }
    all
}

/// Waits until no order is still being allocated; returns them all.
async fn wait_until_settled(api: &Api, expected: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let orders = api.all_orders(None).await;
        let pending = orders.iter().filter(|o| ["created", "allocating"].contains(&state(o))).count();
        if orders.len() == expected && pending == 0 {
            return orders;
        }
        assert!(
            Instant::now() < deadline,
            "orders never settled: {} listed, {:?}",
            orders.len(),
            count_states(&orders)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count_states(orders: &[Value]) -> BTreeMap<String, usize> {
    let mut by_state = BTreeMap::new();
    for o in orders {
        *by_state.entry(state(o).to_owned()).or_default() += 1;
    }
    by_state
}

/// At every location: no oversell, and the ledger reserves exactly what the orders hold there.
async fn check_ledger_matches_orders(app: &TestApp, orders: &[Value]) {
    let inv = app.inventory(SKU).await;
    assert_no_oversell(&inv);
    for location in [WAREHOUSE, SECOND_WAREHOUSE] {
        let reserved: u64 = orders.iter().map(|o| reserved_units(o, SKU, location)).sum();
        assert_eq!(at_location(&inv, location)["reserved"].as_u64(), Some(reserved), "at {location}: {inv}");
    }
}
