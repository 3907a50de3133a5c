//! A cycle count that finds less stock than is reserved: inventory takes the
//! newest reservations back into its backorder queue, and the order learns
//! of it (`orderly.inventory.deallocated`): it is de-allocated and waits as
//! backordered, its open pick task is canceled, and when stock returns it is
//! allocated again and picked, with no event dead-lettered on the way.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_count_backorders_the_order_until_stock_returns() {
    let app = TestApp::spawn().await;
    app.stock("CC-1", 10).await;
    let created = app.order("CC-1", 5, "10.00").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.body["id"].as_str().expect("id").to_owned();
    app.wait_state(&id, &["allocated", "picking"]).await;
    app.wait_quiet().await;

    let count = json!({"sku": "CC-1", "location": WAREHOUSE, "counted": 0});
    app.post("/v1/inventory/cycle-counts", WAREHOUSE_KEY, &count).await.ok();
    let order = app.wait_state(&id, &["backordered"]).await;
    assert_eq!(allocated_units(&order), 0, "{order:#}");
    app.wait_quiet().await;
    let inv = app.inventory("CC-1").await;
    assert_eq!(
        (at_location(&inv, WAREHOUSE)["on_hand"].as_u64(), at_location(&inv, WAREHOUSE)["reserved"].as_u64()),
        (Some(0), Some(0)),
        "{inv:#}"
    );
    let none = app.get(&format!("/v1/picks/next?location={WAREHOUSE}"), WAREHOUSE_KEY).await;
    assert_eq!(
        none.status,
        StatusCode::NO_CONTENT,
        "the pick task for units no longer there is canceled: {}",
        none.text
    );
    let events = app.get(&format!("/v1/orders/{id}/events"), VIEWER_KEY).await.ok();
    let types: Vec<&str> = events.as_array().expect("events").iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(types.contains(&"orderly.order.deallocated"), "{types:?}");

    app.receive(WAREHOUSE, "CC-1", 10).await;
    let order = app.wait_state(&id, &["allocated", "picking"]).await;
    assert_eq!(allocated_units(&order), 5, "{order:#}");
    let pick = app.next_pick(WAREHOUSE).await;
    assert_eq!((pick["order_id"].as_str(), pick["qty"].as_u64()), (Some(id.as_str()), Some(5)), "{pick:#}");
    app.confirm(&pick).await.ok();
    app.wait_state(&id, &["picked"]).await;
    app.wait_quiet().await;

    let dead = app.get("/v1/ops/dead-letters", VIEWER_KEY).await.ok();
    assert_eq!(dead["dead_letters"].as_array().map(Vec::len), Some(0), "{dead:#}");
    let report = app.post_empty("/v1/ops/reconcile", OPS_KEY).await.ok();
    assert_eq!(report["discrepancies"].as_array().map(Vec::len), Some(0), "{report:#}");
    app.stop().await;
}
