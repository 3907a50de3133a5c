//! Outbound integrations end to end, over real HTTP: the real application
//! calls the bundled carrier simulator (`orderly carrier-sim`, in-process on
//! a loopback port) for labels and a local webhook receiver for customer
//! notifications. Covers the label rate limit, fallback to the secondary
//! carrier after exactly the configured retries, the carrier breaker opening
//! and recovering, rate tables swapped at runtime (and a bad one refused),
//! and signed webhooks delivered exactly once across endpoint failures and an
//! operator's retry.

mod support;

use orderly_carrier::signing;
use orderly_carrier::sim::SimConfig;
use orderly_carrier::webhook::{ReceiverConfig, spawn_receiver};
use orderly_carrier::wire::{CarrierSettings, SimStats};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

/// Rate file version 1: slowpost is cheaper than fastship in zone EU.
const RATES_V1: &str = "version,2026-11-01.1\ncarrier,zone,max_weight_g,price\n\
    fastship,EU,1000,4.95\nfastship,EU,5000,8.50\nslowpost,EU,1000,3.50\nslowpost,EU,5000,6.00\n";
/// Rate file version 2, uploaded mid-run.
const RATES_V2: &str = "version,2026-11-02.1\ncarrier,zone,max_weight_g,price\n\
    fastship,EU,1000,5.45\nfastship,EU,5000,9.00\nslowpost,EU,1000,3.60\nslowpost,EU,5000,6.10\n";

/// Writes [`RATES_V1`] into `dir/rates` and returns the `[carriers]` TOML
/// line pointing at it (merged into the test config's `[carriers]` table).
fn rates_dir(dir: &Path) -> String {
    let rates = dir.join("rates");
    std::fs::create_dir_all(&rates).expect("rates dir");
    std::fs::write(rates.join("v1.csv"), RATES_V1).expect("rate file");
    rates.display().to_string()
}

/// The test config's `[carriers]` table is already open (endpoints, routes):
/// keys for it have to come before any other table in `extra`.
fn carriers_extra(dir: &Path, more_carrier_keys: &str, rest: &str) -> String {
    format!("rates_dir = {:?}\n{more_carrier_keys}\n{rest}", rates_dir(dir))
}

/// A simulator with both carriers healthy (fastship 4.95, slowpost 3.50).
fn healthy() -> SimConfig {
    SimConfig::demo(11)
}

/// A simulator whose primary (`fastship`) answers 503 to everything.
fn primary_down() -> SimConfig {
    let down = CarrierSettings { down: true, ..CarrierSettings::default() };
    healthy().with_carrier("fastship", &down).expect("valid carrier settings")
}

async fn sim_stats(app: &TestApp) -> SimStats {
    let url = format!("{}/admin/stats", app.sim_url());
    app.api.client.get(url).send().await.expect("sim answers").json().await.expect("sim stats JSON")
}

async fn set_carrier(app: &TestApp, carrier: &str, settings: &CarrierSettings) {
    let url = format!("{}/admin/carriers/{carrier}", app.sim_url());
    let r = app.api.client.put(url).json(settings).send().await.expect("sim answers");
    assert!(r.status().is_success(), "PUT carrier settings: {}", r.status());
}

async fn summary(app: &TestApp) -> Value {
    app.get("/v1/ops/summary", OPS_KEY).await.ok()
}

/// Orders `n` one-unit orders of `sku`, picks and packs each, and returns the
/// order ids. Packages are posted together at the end, so their labels are
/// requested as one burst.
async fn pack_orders(app: &TestApp, sku: &str, n: usize) -> Vec<String> {
    app.stock(sku, (n as u32) * 2).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let created = app.order(sku, 1, "12.00").await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
        ids.push(created.body["id"].as_str().expect("order id").to_owned());
    }
    let mut picks: BTreeMap<String, Value> = BTreeMap::new();
    while picks.len() < n {
        let pick = app.next_pick(WAREHOUSE).await;
        app.confirm(&pick).await.ok();
        picks.insert(pick["order_id"].as_str().expect("order of pick").to_owned(), pick);
    }
    for id in &ids {
        app.wait_state(id, &["picked"]).await;
    }
    for id in &ids {
        let body = json!({"order_id": id, "location": WAREHOUSE, "pick_ids": [picks[id]["id"]]});
        wait_for(WAIT, || async {
            let r = app.post("/v1/packages", WAREHOUSE_KEY, &body).await;
            match r.status {
                StatusCode::CREATED => Some(()),
                StatusCode::CONFLICT => None,
                other => panic!("POST /v1/packages: {other}: {}", r.text),
            }
        })
        .await
        .expect("packing accepts the package once it has seen the pick");
    }
    ids
}

/// Waits until every order is shipped and returns each one's shipment.
async fn shipments(app: &TestApp, ids: &[String], within: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ids {
        let found = wait_for(within, || async {
            let order = app.get_order(id).await;
            (state(&order) == "shipped").then_some(order)
        })
        .await
        .unwrap_or_else(|| panic!("order {id} was never shipped within {within:?}"));
        let shipment_id = found["shipments"][0]["shipment_id"].as_str().expect("shipment id").to_owned();
        out.push(app.get(&format!("/v1/shipments/{shipment_id}"), VIEWER_KEY).await.ok());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_respect_the_token_bucket_over_a_burst() {
    // 60 labels a minute = one a second, with a burst of 2.
    let app = TestApp::spawn_custom(healthy(), |dir| {
        carriers_extra(dir, "", "[shipping]\nlabels_per_minute = 60\nlabel_burst = 2\n")
    })
    .await;
    const N: usize = 8;
    let started = Instant::now();
    let ids = pack_orders(&app, "SKU-BUCKET", N).await;
    // While the bucket is empty, label work waits in the queue (visible in the summary).
    let queued = wait_for(WAIT, || async {
        let s = summary(&app).await;
        (s["shipping"]["label_queue_depth"].as_u64().unwrap_or(0) > 0).then_some(s)
    })
    .await;
    assert!(queued.is_some(), "the label queue never showed waiting work");
    let shipped = shipments(&app, &ids, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();

    let stats = sim_stats(&app).await;
    let fastship = &stats.carriers["fastship"];
    assert_eq!(fastship.labels_created, N as u64, "every label at the primary: {stats:?}");
    // In any window of w ms a token bucket of rate 1/s and burst 2 grants at
    // most 2 + floor(w / 1000) labels; 150 ms of slack covers the request's
    // flight between the engine's bucket and the simulator's clock.
    let times = &fastship.label_times_ms;
    for (i, &start) in times.iter().enumerate() {
        for (j, &end) in times.iter().enumerate().skip(i) {
            let labels = (j - i + 1) as u64;
            let allowed = 2 + (end - start + 150) / 1000;
            assert!(labels <= allowed, "{labels} labels within {} ms: {times:?}", end - start);
        }
    }
    assert!(elapsed >= Duration::from_secs((N as u64 - 2) - 1), "8 labels at 1/s after a burst of 2 took {elapsed:?}");
    // The shipment resource shows when its label was created (RFC 3339, UTC).
    for s in &shipped {
        assert!(s["label_created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{s}");
    }
    let metrics = app.api.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("orderly_label_queue_depth"), "label queue depth is exported");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_every_label_goes_to_the_secondary_after_exactly_the_configured_retries() {
    // A breaker that never opens here: this test is about retries.
    let app = TestApp::spawn_custom(primary_down(), |dir| {
        carriers_extra(dir, "breaker_failures = 1000", "[shipping]\nmax_retries = 3\n")
    })
    .await;
    const N: usize = 4;
    let ids = pack_orders(&app, "SKU-FALLBACK", N).await;
    let shipped = shipments(&app, &ids, Duration::from_secs(40)).await;
    for s in &shipped {
        assert_eq!(s["carrier"], "slowpost", "{s}");
        assert_eq!(s["fallback_from"], "fastship", "{s}");
        // Priced from the rate table: 3.50 at slowpost instead of 4.95 at fastship.
        assert_eq!(s["cost_difference"], "-1.45", "{s}");
        assert_eq!(s["rate_version"], "2026-11-01.1", "{s}");
        assert_eq!(s["state"], "labeled", "{s}");
    }
    let stats = sim_stats(&app).await;
    assert_eq!(stats.carriers["fastship"].requests, 3 * N as u64, "exactly max_retries calls per label: {stats:?}");
    assert_eq!(stats.carriers["fastship"].labels_created, 0);
    assert_eq!(stats.carriers["slowpost"].labels_created, N as u64);
    let s = summary(&app).await;
    assert_eq!(s["carrier_fallbacks"], N as u64, "{s:#}");
    // Each fallback is counted, with its cost difference.
    let metrics = app.api.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    let fallbacks: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("orderly_carrier_fallbacks_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(fallbacks, N as f64, "orderly_carrier_fallbacks_total in {metrics}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrier_breaker_opens_sheds_calls_and_recovers() {
    let app = TestApp::spawn_custom(primary_down(), |dir| {
        carriers_extra(dir, "breaker_failures = 3\nbreaker_cooldown = \"5s\"", "[shipping]\nmax_retries = 3\n")
    })
    .await;
    let first = pack_orders(&app, "SKU-BREAKER", 1).await;
    shipments(&app, &first, Duration::from_secs(30)).await;
    let open = summary(&app).await;
    assert_eq!(open["shipping"]["breakers"]["fastship"]["state"], "open", "{open:#}");
    assert!(open["alerts"].as_array().expect("alerts").iter().any(|a| a.to_string().contains("fastship")), "{open:#}");
    let calls_when_open = sim_stats(&app).await.carriers["fastship"].requests;

    // While open, labels go straight to the secondary: the primary is not called.
    let second = pack_orders(&app, "SKU-BREAKER-2", 2).await;
    for s in shipments(&app, &second, Duration::from_secs(30)).await {
        assert_eq!(s["carrier"], "slowpost", "{s}");
    }
    let stats = sim_stats(&app).await;
    let still = summary(&app).await;
    let breaker = &still["shipping"]["breakers"]["fastship"];
    assert_eq!(breaker["state"], "open", "the 5 s cooldown outlasts two labels: {still:#}");
    assert_eq!(stats.carriers["fastship"].requests, calls_when_open, "an open breaker sheds every call");

    // The carrier recovers; after the cooldown one probe goes through and closes the breaker.
    set_carrier(&app, "fastship", &CarrierSettings::default()).await;
    let half_open = wait_for(Duration::from_secs(10), || async {
        let s = summary(&app).await;
        (s["shipping"]["breakers"]["fastship"]["state"] == "half_open").then_some(())
    })
    .await;
    assert!(half_open.is_some(), "the breaker half-opens after its cooldown");
    let third = pack_orders(&app, "SKU-BREAKER-3", 2).await;
    let labels = shipments(&app, &third, Duration::from_secs(30)).await;
    assert!(labels.iter().any(|s| s["carrier"] == "fastship"), "a label goes to the primary again: {labels:?}");
    let closed = summary(&app).await;
    assert_eq!(closed["shipping"]["breakers"]["fastship"]["state"], "closed", "{closed:#}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_table_swapped_mid_run_prices_the_next_batch_and_a_bad_one_changes_nothing() {
    let app = TestApp::spawn_custom(primary_down(), |dir| {
        carriers_extra(dir, "breaker_failures = 1000", "[shipping]\nmax_retries = 1\n")
    })
    .await;
    let before = pack_orders(&app, "SKU-RATES", 1).await;
    let s = &shipments(&app, &before, Duration::from_secs(30)).await[0];
    assert_eq!((s["rate_version"].as_str(), s["cost_difference"].as_str()), (Some("2026-11-01.1"), Some("-1.45")));

    let put = |body: &'static str| {
        app.api
            .request(reqwest::Method::PUT, "/v1/ops/carrier-rates", Some(OPS_KEY))
            .header("content-type", "text/csv")
            .body(body)
    };
    // Only ops may upload.
    let r = app
        .send(app.api.request(reqwest::Method::PUT, "/v1/ops/carrier-rates", Some(WAREHOUSE_KEY)).body(RATES_V2))
        .await
        .unwrap();
    r.assert_problem(403);
    let r = app.send(put(RATES_V2)).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let after = pack_orders(&app, "SKU-RATES-2", 1).await;
    let s = &shipments(&app, &after, Duration::from_secs(30)).await[0];
    assert_eq!((s["rate_version"].as_str(), s["cost_difference"].as_str()), (Some("2026-11-02.1"), Some("-1.85")));

    // A bad file: a negative price on line 4. Refused with the line, and version 2 stays.
    let r =
        app.send(put("version,2026-11-03.1\ncarrier,zone,max_weight_g,price\nfastship,EU,1000,-1\n")).await.unwrap();
    r.assert_client_problem();
    assert!(r.body["detail"].as_str().is_some_and(|d| d.contains("line")), "{}", r.text);
    // An older version is refused too.
    app.send(put(RATES_V1)).await.unwrap().assert_client_problem();
    let info = app.get("/v1/ops/carrier-rates", VIEWER_KEY).await.ok();
    assert_eq!(info["active_version"], "2026-11-02.1", "{info}");
    let later = pack_orders(&app, "SKU-RATES-3", 1).await;
    assert_eq!(shipments(&app, &later, Duration::from_secs(30)).await[0]["rate_version"], "2026-11-02.1");
    app.stop().await;
}

const SECRET: &str = "whsec_e2e_integrations";

/// Every delivery's signature checks out against the body and its timestamp.
fn assert_signed(deliveries: &[orderly_carrier::webhook::Delivery]) {
    let now = time_now();
    for d in deliveries {
        let header = d.header("orderly-signature").expect("Orderly-Signature header");
        assert!(signing::verify(SECRET.as_bytes(), header, &d.body, now, 600), "bad signature {header}");
        assert!(d.header("orderly-event-id").is_some(), "Orderly-Event-Id header");
    }
}

fn time_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

/// Event ids of the accepted deliveries, each with how often it was accepted.
fn accepted_ids(receiver: &orderly_carrier::webhook::ReceiverHandle) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for d in receiver.accepted() {
        *ids.entry(d.header("orderly-event-id").expect("event id").to_owned()).or_insert(0) += 1;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_endpoint_gets_each_notification_exactly_once_signed_after_it_recovers() {
    let (url, receiver) = spawn_receiver(ReceiverConfig::default()).await.expect("receiver starts");
    receiver.fail_for(Duration::from_secs(3));
    let app = TestApp::spawn_custom(healthy(), |dir| {
        carriers_extra(dir, "", &format!("[notifications]\nwebhook_url = \"{url}/hooks\"\nwebhook_secret = \"{SECRET}\"\nbreaker_failures = 3\nbreaker_cooldown = \"1s\"\n"))
    })
    .await;
    let ids = pack_orders(&app, "SKU-HOOK", 3).await;
    // The endpoint's breaker opens while it fails.
    let opened = wait_for(Duration::from_secs(10), || async {
        (summary(&app).await["notifications"]["breaker"]["state"] == "open").then_some(())
    })
    .await;
    assert!(opened.is_some(), "the webhook breaker opens after failures in a row");
    shipments(&app, &ids, Duration::from_secs(30)).await;
    app.wait_quiet().await;
    // Every notification the service created is eventually sent; wait for the queue to drain.
    let drained = wait_for(Duration::from_secs(40), || async {
        let s = summary(&app).await;
        let n = &s["notifications"];
        let by = &n["by_status"];
        (n["queue_depth"] == 0 && by["failed"].as_u64().unwrap_or(0) == 0 && by["pending"].as_u64().unwrap_or(0) == 0)
            .then_some(s)
    })
    .await
    .expect("every notification is delivered once the endpoint recovers");
    let (received, _) = receiver.counts();
    let accepted = accepted_ids(&receiver);
    assert!(accepted.values().all(|&n| n == 1), "a notification accepted twice: {accepted:?}");
    assert_eq!(
        accepted.len() as u64,
        drained["notifications"]["by_status"]["sent"].as_u64().unwrap_or(0),
        "{drained:#}"
    );
    assert!(received > accepted.len() as u64, "the endpoint refused some deliveries first ({received} received)");
    // Every order was announced (order.created and shipped at least), each event once.
    let bodies: Vec<Value> = receiver.accepted().iter().map(|d| d.json().expect("JSON body")).collect();
    for id in &ids {
        let states: BTreeSet<&str> =
            bodies.iter().filter(|b| b["order_id"] == id.as_str()).filter_map(|b| b["state"].as_str()).collect();
        assert!(states.contains("shipped"), "order {id} heard of: {states:?}");
    }
    assert_signed(&receiver.accepted());
    assert_eq!(drained["notifications"]["breaker"]["state"], "closed", "the breaker closes again: {drained:#}");
    app.stop().await;
    receiver.shutdown().await.expect("receiver stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_that_failed_every_attempt_is_retried_by_ops_and_delivered_once() {
    let (url, receiver) = spawn_receiver(ReceiverConfig::default()).await.expect("receiver starts");
    receiver.fail_for(Duration::from_secs(600));
    // Two attempts (1 s apart) before a notification is marked failed.
    let app = TestApp::spawn_custom(healthy(), |dir| {
        carriers_extra(
            dir,
            "",
            &format!("[notifications]\nwebhook_url = \"{url}/hooks\"\nwebhook_secret = \"{SECRET}\"\n[bus]\nmax_attempts = 2\n"),
        )
    })
    .await;
    app.stock("SKU-RETRY", 5).await;
    let created = app.order("SKU-RETRY", 1, "12.00").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let failed = wait_for(Duration::from_secs(30), || async {
        let page = app.get("/v1/ops/notifications/failed", VIEWER_KEY).await.ok();
        let list = page["notifications"].as_array().cloned().unwrap_or_default();
        (!list.is_empty()).then_some(list)
    })
    .await
    .expect("a notification fails after its attempts");
    let n = &failed[0];
    assert_eq!(n["status"], "failed", "{n}");
    assert!(n["last_error"].is_string(), "{n}");
    let id = n["id"].as_str().expect("notification id").to_owned();
    let accepted_before = receiver.counts().1;
    assert_eq!(accepted_before, 0);

    // Only ops may retry; an unknown id is a 404.
    app.post_empty(&format!("/v1/ops/notifications/{id}/retry"), VIEWER_KEY).await.assert_problem(403);
    app.post_empty("/v1/ops/notifications/no-such-notification/retry", OPS_KEY).await.assert_problem(404);

    receiver.recover();
    let retried = app.post_empty(&format!("/v1/ops/notifications/{id}/retry"), OPS_KEY).await.ok();
    assert_eq!(retried["status"], "pending", "{retried}");
    // A second retry changes nothing: still pending (200) or already sent (409).
    let twice = app.post_empty(&format!("/v1/ops/notifications/{id}/retry"), OPS_KEY).await;
    assert!(matches!(twice.status.as_u16(), 200 | 409), "{}", twice.text);
    let delivered = wait_for(Duration::from_secs(20), || async { accepted_ids(&receiver).get(&id).copied() })
        .await
        .expect("the retried notification is delivered");
    assert_eq!(delivered, 1);
    // Once sent, a retry is refused: the customer never gets it twice.
    let again = wait_for(Duration::from_secs(10), || async {
        let r = app.post_empty(&format!("/v1/ops/notifications/{id}/retry"), OPS_KEY).await;
        (r.status == StatusCode::CONFLICT).then_some(r)
    })
    .await
    .expect("a sent notification cannot be retried");
    again.assert_problem(409);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(accepted_ids(&receiver).get(&id), Some(&1), "delivered exactly once");
    assert_signed(&receiver.accepted());
    app.stop().await;
    receiver.shutdown().await.expect("receiver stops");
}
