//! End to end over HTTP: an order's whole life from intake to delivery,
//! warehouse instructions (duplicates, wrong keys, out of order), and
//! cancellation releasing stock to a backordered order.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_goes_from_intake_to_delivered() {
    let app = TestApp::spawn().await;
    app.stock("SKU-LIFE", 100).await;

    let created = app.order("SKU-LIFE", 2, "10.00").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.body["id"].as_str().expect("order id").to_owned();
    assert_eq!(created.headers["location"], format!("/v1/orders/{id}").as_str());
    assert!(["created", "allocating", "allocated"].contains(&state(&created.body)), "{}", created.text);
    assert_eq!(created.body["total"], "20.00");
    assert!(created.body["lines"][0]["line_id"].is_string(), "{}", created.text);

    let allocated = app.wait_state(&id, &["allocated", "picking"]).await;
    assert_eq!(allocated_units(&allocated), 2);
    let inv = app.inventory("SKU-LIFE").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["reserved"], 2, "{inv}");
    assert_no_oversell(&inv);

    let pick = app.next_pick(WAREHOUSE).await;
    assert_eq!(pick["order_id"], id.as_str());
    assert_eq!(
        (pick["sku"].as_str(), pick["qty"].as_u64(), pick["location"].as_str()),
        (Some("SKU-LIFE"), Some(2), Some(WAREHOUSE))
    );
    assert!(pick["instruction_key"].as_str().is_some_and(|k| !k.is_empty()), "{pick}");
    let confirmed = app.confirm(&pick).await.ok();
    assert_eq!(confirmed["duplicate"], false);
    app.wait_state(&id, &["picked"]).await;

    let package_body = json!({"order_id": id, "location": WAREHOUSE, "pick_ids": [pick["id"]]});
    let package = wait_for(WAIT, || async {
        let r = app.post("/v1/packages", WAREHOUSE_KEY, &package_body).await;
        match r.status {
            StatusCode::CREATED => Some(r.body),
            // Packing learns of the pick from an event: it may not have seen it yet.
            StatusCode::CONFLICT => None,
            other => panic!("POST /v1/packages: {other}: {}", r.text),
        }
    })
    .await
    .expect("the package is accepted once packing has seen the pick");
    assert_eq!(package["order_id"], id.as_str());

    let shipped = app.wait_state(&id, &["shipped"]).await;
    let shipments = shipped["shipments"].as_array().expect("shipments");
    assert_eq!(shipments.len(), 1, "{shipped:#}");
    let shipment_id = shipments[0]["shipment_id"].as_str().expect("shipment id").to_owned();
    let shipment = app.get(&format!("/v1/shipments/{shipment_id}"), VIEWER_KEY).await.ok();
    assert_eq!(shipment["order_id"], id.as_str());
    assert_eq!(shipment["state"], "labeled");
    assert_eq!(shipment["carrier"], "fastship", "the zone's primary carrier: {shipment}");
    assert!(shipment["tracking_number"].as_str().is_some_and(|t| !t.is_empty()), "{shipment}");
    assert!(shipment["label_created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{shipment}");
    assert!(shipment["cost"].as_str().is_some_and(|c| c.contains('.')), "money is a decimal string: {shipment}");

    let forbidden = app.post_empty(&format!("/v1/shipments/{shipment_id}/delivered"), SHOP_KEY).await;
    forbidden.assert_problem(403);
    let delivered = app.post_empty(&format!("/v1/shipments/{shipment_id}/delivered"), CARRIER_KEY).await.ok();
    assert_eq!(delivered["state"], "delivered");
    let again = app.post_empty(&format!("/v1/shipments/{shipment_id}/delivered"), CARRIER_KEY).await.ok();
    assert_eq!(again["delivered_at"], delivered["delivered_at"], "a repeated callback changes nothing");
    let order = app.wait_state(&id, &["delivered"]).await;

    let events = app.get(&format!("/v1/orders/{id}/events"), VIEWER_KEY).await.ok();
    let events = events.as_array().expect("a list of events");
    check_cloud_events(&id, events, order["version"].as_u64().expect("version"));
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.first(), Some(&"orderly.order.created"), "{types:?}");
    assert_eq!(types.last(), Some(&"orderly.order.delivered"), "{types:?}");
    for t in ["orderly.order.allocated", "orderly.order.shipped"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    let history = app.get(&format!("/v1/orders/{id}/events"), VIEWER_KEY).await.ok();
    assert_eq!(history.as_array().map(Vec::len), Some(events.len()), "a delivered order's history is stable");

    let inv = app.inventory("SKU-LIFE").await;
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!((here["on_hand"].as_u64(), here["reserved"].as_u64()), (Some(98), Some(0)), "{inv}");
    assert_no_oversell(&inv);
    let cancel = app.post_empty(&format!("/v1/orders/{id}/cancel"), SHOP_KEY).await;
    cancel.assert_problem(409);
    app.stop().await;
}

/// CloudEvents 1.0 envelopes about one order, oldest first, sequences
/// strictly increasing up to the order's version.
fn check_cloud_events(order_id: &str, events: &[Value], version: u64) {
    assert!(!events.is_empty());
    let mut last = 0;
    let mut ids = BTreeSet::new();
    for e in events {
        assert_eq!(e["specversion"], "1.0", "{e}");
        assert_eq!(e["subject"], order_id, "{e}");
        assert_eq!(e["source"], "/orderly/orders", "{e}");
        assert_eq!(e["datacontenttype"], "application/json", "{e}");
        assert!(e["type"].as_str().is_some_and(|t| t.starts_with("orderly.order.")), "{e}");
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
        assert!(e["idempotencykey"].as_str().is_some_and(|k| !k.is_empty()), "{e}");
        let id = e["id"].as_str().expect("id");
        assert!(id.len() == 36 && id.as_bytes()[14] == b'7', "id is a UUIDv7: {id}");
        assert!(ids.insert(id.to_owned()), "event id repeated: {id}");
        let sequence = e["sequence"].as_u64().expect("sequence");
        assert!(sequence > last, "sequence not strictly increasing: {last} then {sequence}");
        last = sequence;
    }
    assert_eq!(last, version, "the last event's sequence is the order's version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warehouse_instructions_take_effect_once() {
    let app = TestApp::spawn().await;
    app.stock("SKU-WH", 50).await;
    let a = app.order("SKU-WH", 3, "5.00").await.ok()["id"].as_str().expect("id").to_owned();
    app.wait_state(&a, &["allocated", "picking"]).await;
    let pick = app.next_pick(WAREHOUSE).await;
    assert_eq!(pick["order_id"], a.as_str());
    let path = format!("/v1/picks/{}/confirm", pick["id"].as_str().expect("pick id"));

    // Wrong key, wrong quantity, unknown or malformed pick: refused, nothing happens.
    let wrong_key = app.post(&path, WAREHOUSE_KEY, &json!({"instruction_key": "nope:1", "qty": 3})).await;
    wrong_key.assert_client_problem();
    let other_line = format!("{}x", pick["instruction_key"].as_str().expect("key"));
    app.post(&path, WAREHOUSE_KEY, &json!({"instruction_key": other_line, "qty": 3})).await.assert_client_problem();
    let wrong_qty =
        app.post(&path, WAREHOUSE_KEY, &json!({"instruction_key": pick["instruction_key"], "qty": 2})).await;
    wrong_qty.assert_client_problem();
    let body = json!({"instruction_key": pick["instruction_key"], "qty": 3});
    app.post("/v1/picks/p-unknown/confirm", WAREHOUSE_KEY, &body).await.assert_problem(404);
    app.post("/v1/picks/bad%20id/confirm", WAREHOUSE_KEY, &body).await.assert_client_problem();
    app.post(&path, SHOP_KEY, &body).await.assert_problem(403);
    app.wait_quiet().await;
    let inv = app.inventory("SKU-WH").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["on_hand"], 50, "refused instructions changed stock: {inv}");

    // The real confirmation, then duplicates: one effect.
    let first = app.post(&path, WAREHOUSE_KEY, &body).await.ok();
    assert_eq!(first["duplicate"], false);
    for _ in 0..3 {
        let dup = app.post(&path, WAREHOUSE_KEY, &body).await.ok();
        assert_eq!(dup["duplicate"], true, "{dup}");
    }
    app.wait_state(&a, &["picked"]).await;
    // A later pick travels the same event streams: once it is applied, any
    // second effect of the duplicates would have been applied too.
    let b = app.order("SKU-WH", 1, "5.00").await.ok()["id"].as_str().expect("id").to_owned();
    app.wait_state(&b, &["allocated", "picking"]).await;
    let pick_b = app.next_pick(WAREHOUSE).await;
    assert_eq!(pick_b["order_id"], b.as_str());
    app.confirm(&pick_b).await.ok();
    app.wait_state(&b, &["picked"]).await;
    app.wait_quiet().await;
    let inv = app.inventory("SKU-WH").await;
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!(here["on_hand"], 46, "3 + 1 units picked, duplicates ignored: {inv}");
    assert_eq!(here["reserved"], 0, "{inv}");
    assert_no_oversell(&inv);

    // A confirmation after the order was canceled (and picking knows it): refused, stock back.
    let c = app.order("SKU-WH", 4, "5.00").await.ok()["id"].as_str().expect("id").to_owned();
    app.wait_state(&c, &["allocated", "picking"]).await;
    let pick_c = app.next_pick(WAREHOUSE).await;
    assert_eq!(pick_c["order_id"], c.as_str());
    let canceled = app.post(&format!("/v1/orders/{c}/cancel"), SHOP_KEY, &json!({"reason": "changed mind"})).await;
    assert_eq!(state(&canceled.ok()), "canceled");
    app.wait_quiet().await;
    let late = app.confirm(&pick_c).await;
    late.assert_problem(409);
    app.wait_quiet().await;
    let inv = app.inventory("SKU-WH").await;
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!((here["on_hand"].as_u64(), here["reserved"].as_u64()), (Some(46), Some(0)), "{inv}");
    assert_eq!(state(&app.get_order(&c).await), "canceled");
    assert_eq!(
        app.get(&format!("/v1/picks/next?location={WAREHOUSE}"), WAREHOUSE_KEY).await.status,
        StatusCode::NO_CONTENT
    );

    // A confirmation before the task was handed out (or even created): a 404
    // while picking has not queued it, then either accepted once or refused;
    // never a 5xx, never two effects.
    let d = app.order("SKU-WH", 2, "5.00").await.ok();
    let line_id = d["lines"][0]["line_id"].as_str().expect("line id").to_owned();
    // The instruction key is the order line id + sequence (PRODUCT.md §4.1);
    // the task id is derived from it.
    let early = json!({"instruction_key": format!("{line_id}:1"), "qty": 2});
    let early_path = format!("/v1/picks/{line_id}.p1/confirm");
    let answer = wait_for(WAIT, || async {
        let r = app.post(&early_path, WAREHOUSE_KEY, &early).await;
        (r.status != StatusCode::NOT_FOUND).then_some(r)
    })
    .await
    .expect("the pick task is created once the order is allocated");
    let next = app.get(&format!("/v1/picks/next?location={WAREHOUSE}"), WAREHOUSE_KEY).await;
    if answer.status.is_success() {
        assert_eq!(answer.body["duplicate"], false, "{}", answer.text);
        assert_eq!(next.status, StatusCode::NO_CONTENT, "a confirmed task is not handed out again: {}", next.text);
    } else {
        answer.assert_client_problem();
        assert_eq!(next.status, StatusCode::OK, "a refused early confirmation leaves the task queued");
        app.confirm(&next.body).await.ok();
    }
    let d = d["id"].as_str().expect("id").to_owned();
    app.wait_state(&d, &["picked"]).await;
    app.wait_quiet().await;
    let inv = app.inventory("SKU-WH").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["on_hand"], 44, "{inv}");
    assert_no_oversell(&inv);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_racing_a_cancel_never_breaks_stock() {
    let app = TestApp::spawn().await;
    app.stock("SKU-RACE", 200).await;
    let mut orders = Vec::new();
    for _ in 0..10 {
        let id = app.order("SKU-RACE", 2, "5.00").await.ok()["id"].as_str().expect("id").to_owned();
        orders.push(id);
    }
    for id in &orders {
        app.wait_state(id, &["allocated", "picking"]).await;
    }
    // Take every task, then cancel each order and confirm its pick at the same time.
    let mut picks = Vec::new();
    for _ in 0..orders.len() {
        picks.push(app.next_pick(WAREHOUSE).await);
    }
    let mut racers = Vec::new();
    for pick in picks {
        let api = app.api.clone();
        racers.push(tokio::spawn(async move {
            let order = pick["order_id"].as_str().expect("order").to_owned();
            let cancel_path = format!("/v1/orders/{order}/cancel");
            let (cancel, confirm) = tokio::join!(api.post_empty(&cancel_path, SHOP_KEY), api.confirm(&pick));
            (order, cancel, confirm)
        }));
    }
    for r in racers {
        let (order, cancel, confirm) = r.await.expect("racer");
        assert!(cancel.status.is_success() || cancel.status == StatusCode::CONFLICT, "cancel {order}: {}", cancel.text);
        assert!(
            confirm.status.is_success() || confirm.status == StatusCode::CONFLICT,
            "confirm {order}: {}",
            confirm.text
        );
    }
    app.wait_quiet().await;
    let inv = app.inventory("SKU-RACE").await;
    assert_no_oversell(&inv);
    let here = at_location(&inv, WAREHOUSE);
    let mut picked = 0;
    let mut reserved = 0;
    for id in &orders {
        let o = app.get_order(id).await;
        assert!(["canceled", "picked"].contains(&state(&o)), "order {id} left in {}: {o:#}", state(&o));
        picked += picked_units(&o);
        reserved += reserved_units(&o, "SKU-RACE", WAREHOUSE);
    }
    assert_eq!(here["reserved"].as_u64(), Some(reserved), "the ledger reserves what orders hold: {inv}");
    assert_eq!(here["on_hand"].as_u64(), Some(200 - picked), "on hand = received - picked: {inv}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_releases_stock_to_a_backordered_order() {
    let app = TestApp::spawn().await;
    app.stock("SKU-CXL", 20).await;
    let sellable = app.inventory("SKU-CXL").await["available"].as_u64().expect("available");
    assert!(sellable < 20, "a safety buffer is held back");
    let sellable = u32::try_from(sellable).expect("small");

    let a = app.order("SKU-CXL", sellable, "1.00").await.ok()["id"].as_str().expect("id").to_owned();
    app.wait_state(&a, &["allocated", "picking"]).await;
    let b = app.order("SKU-CXL", 3, "1.00").await.ok()["id"].as_str().expect("id").to_owned();
    let backordered = app.wait_state(&b, &["backordered"]).await;
    assert_eq!(allocated_units(&backordered), 0);
    assert!(backordered["expected_ship_date"].is_string(), "the customer is told when: {backordered:#}");
    let listed = app.all_orders(Some("backordered")).await;
    assert!(listed.iter().any(|o| o["id"] == b.as_str()), "GET /v1/orders?state=backordered lists it");
    let inv = app.inventory("SKU-CXL").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["reserved"].as_u64(), Some(u64::from(sellable)));
    assert_no_oversell(&inv);

    let canceled = app.post_empty(&format!("/v1/orders/{a}/cancel"), SHOP_KEY).await.ok();
    assert_eq!(state(&canceled), "canceled");
    let filled = app.wait_state(&b, &["allocated", "picking"]).await;
    assert_eq!(allocated_units(&filled), 3);
    app.wait_quiet().await;
    let inv = app.inventory("SKU-CXL").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["reserved"], 3, "a's units went back and b took 3: {inv}");
    assert_no_oversell(&inv);
    let again = app.post_empty(&format!("/v1/orders/{a}/cancel"), SHOP_KEY).await;
    assert!(again.status.is_success() || again.status == StatusCode::CONFLICT, "{}", again.text);
    let events = app.get(&format!("/v1/orders/{a}/events"), VIEWER_KEY).await.ok();
    let types: Vec<&str> = events.as_array().expect("events").iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.iter().filter(|t| **t == "orderly.order.canceled").count(), 1, "{types:?}");

    // More stock: receiving serves nothing twice, and the rest stays available.
    app.api.receive(WAREHOUSE, "SKU-CXL", 10).await;
    app.wait_quiet().await;
    let inv = app.inventory("SKU-CXL").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["reserved"], 3, "{inv}");
    assert_no_oversell(&inv);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_a_picked_order_puts_its_units_back() {
    let app = TestApp::spawn().await;
    app.stock("SKU-BACK", 40).await;
    let id = app.order("SKU-BACK", 5, "2.00").await.ok()["id"].as_str().expect("id").to_owned();
    app.wait_state(&id, &["allocated", "picking"]).await;
    let pick = app.next_pick(WAREHOUSE).await;
    app.confirm(&pick).await.ok();
    app.wait_state(&id, &["picked"]).await;
    app.wait_quiet().await;
    assert_eq!(at_location(&app.inventory("SKU-BACK").await, WAREHOUSE)["on_hand"], 35);

    let canceled = app.post_empty(&format!("/v1/orders/{id}/cancel"), SHOP_KEY).await.ok();
    assert_eq!(state(&canceled), "canceled");
    app.wait_quiet().await;
    let inv = app.inventory("SKU-BACK").await;
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!(
        (here["on_hand"].as_u64(), here["reserved"].as_u64()),
        (Some(40), Some(0)),
        "the 5 picked units of a canceled order go back on the shelf: {inv}"
    );
    assert_no_oversell(&inv);
    // Nothing of a canceled order is packed or shipped any more.
    let package = json!({"order_id": id, "location": WAREHOUSE, "pick_ids": [pick["id"]]});
    app.post("/v1/packages", WAREHOUSE_KEY, &package).await.assert_problem(409);

    // Packed, waiting for a label (zone US has no carrier route): canceling
    // puts the packed units back too.
    let mut body = order_body("SKU-BACK", 4, "2.00");
    body["ship_to"] = json!({"zone": "US"});
    let packed_id = app.post("/v1/orders", SHOP_KEY, &body).await.ok()["id"].as_str().expect("id").to_owned();
    app.wait_state(&packed_id, &["allocated", "picking"]).await;
    let pick = app.next_pick(WAREHOUSE).await;
    assert_eq!(pick["order_id"], packed_id.as_str());
    app.confirm(&pick).await.ok();
    app.wait_state(&packed_id, &["picked"]).await;
    let package = json!({"order_id": packed_id, "location": WAREHOUSE, "pick_ids": [pick["id"]]});
    wait_for(WAIT, || async {
        let r = app.post("/v1/packages", WAREHOUSE_KEY, &package).await;
        (r.status == StatusCode::CREATED).then_some(())
    })
    .await
    .expect("packed");
    app.wait_state(&packed_id, &["packed"]).await;
    let canceled = app.post_empty(&format!("/v1/orders/{packed_id}/cancel"), SHOP_KEY).await.ok();
    assert_eq!(state(&canceled), "canceled");
    app.wait_quiet().await;
    let inv = app.inventory("SKU-BACK").await;
    let here = at_location(&inv, WAREHOUSE);
    assert_eq!((here["on_hand"].as_u64(), here["reserved"].as_u64()), (Some(40), Some(0)), "{inv}");
    assert_no_oversell(&inv);
    app.stop().await;
}
