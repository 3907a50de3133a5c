//! Label API of the carrier simulator over real HTTP: creation, idempotency,
//! tracking, and refusal of bad input.

use orderly_carrier::sim::{self, BODY_BYTES_MAX, LocalSim, REPLAYED_HEADER, SimConfig};
use orderly_carrier::{CarrierClient, CarrierError, CarrierSettings, LabelRequest, Problem};
use std::time::Duration;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

async fn start() -> (LocalSim, CarrierClient) {
    let sim = sim::spawn_local(SimConfig::demo(1)).await.expect("bind 127.0.0.1:0");
    let client = CarrierClient::new(sim.url(), CLIENT_TIMEOUT).expect("valid URL");
    (sim, client)
}

fn request(key: &str) -> LabelRequest {
    LabelRequest {
        carrier: "fastship".to_owned(),
        shipment_id: "s-1".to_owned(),
        zone: "EU".to_owned(),
        weight_g: 500,
        idempotency_key: key.to_owned(),
    }
}

/// Posts raw bytes to the label endpoint; returns the status and the problem body.
async fn post_raw(sim: &LocalSim, body: Vec<u8>) -> (u16, Option<Problem>) {
    orderly_carrier::install_crypto_provider();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/labels", sim.url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the simulator answers");
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").map(|v| v.as_bytes().to_vec());
    assert_eq!(content_type.as_deref(), Some(&b"application/problem+json"[..]));
    let bytes = response.bytes().await.expect("a body");
    (status, serde_json::from_slice(&bytes).ok())
}

#[tokio::test]
async fn creates_a_label_with_the_documented_fields() {
    let (_sim, client) = start().await;
    let label = client.create_label(&request("k-1")).await.expect("label created");
    assert_eq!(label.carrier, "fastship");
    assert_eq!(label.cost, "4.95");
    assert!(!label.tracking_number.is_empty());
    assert!(!label.label_id.is_empty());
    assert!(label.created_at.ends_with('Z') && label.created_at.contains('T'), "{}", label.created_at);
}

#[tokio::test]
async fn same_key_returns_the_same_label_and_charges_once() {
    let (sim, client) = start().await;
    let first = client.create_label(&request("k-1")).await.expect("label created");
    let again = client.create_label(&request("k-1")).await.expect("replayed");
    assert_eq!(first, again);
    let other = client.create_label(&request("k-2")).await.expect("second label");
    assert_ne!(first.tracking_number, other.tracking_number);

    let stats = client.stats().await.expect("stats");
    let fastship = &stats.carriers["fastship"];
    assert_eq!(fastship.labels_created, 2);
    assert_eq!(fastship.idempotent_replays, 1);

    orderly_carrier::install_crypto_provider();
    let body = serde_json::to_vec(&request("k-1")).expect("serializes");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/labels", sim.url()))
        .body(body)
        .send()
        .await
        .expect("the simulator answers");
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers().get(REPLAYED_HEADER).map(|v| v.as_bytes()), Some(&b"true"[..]));
}

#[tokio::test]
async fn a_key_reused_for_a_different_request_is_rejected() {
    let (_sim, client) = start().await;
    client.create_label(&request("k-1")).await.expect("label created");
    let changed = LabelRequest { weight_g: 900, ..request("k-1") };
    let error = client.create_label(&changed).await.expect_err("key reuse");
    assert!(
        matches!(&error, CarrierError::Rejected { status: 422, detail } if detail.contains("idempotency")),
        "{error:?}"
    );
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn keys_are_scoped_per_carrier() {
    let (_sim, client) = start().await;
    let fast = client.create_label(&request("k-1")).await.expect("fastship label");
    let slow = client
        .create_label(&LabelRequest { carrier: "slowpost".to_owned(), ..request("k-1") })
        .await
        .expect("slowpost label");
    assert_ne!(fast.tracking_number, slow.tracking_number);
    assert_eq!(slow.cost, "3.50");
}

#[tokio::test]
async fn unknown_carrier_is_404_and_final() {
    let (_sim, client) = start().await;
    let error = client
        .create_label(&LabelRequest { carrier: "nope".to_owned(), ..request("k-1") })
        .await
        .expect_err("unknown carrier");
    assert!(matches!(&error, CarrierError::Rejected { status: 404, detail } if detail.contains("nope")), "{error:?}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn malformed_json_is_400_and_wrong_shape_is_422() {
    let (sim, _client) = start().await;
    let (status, problem) = post_raw(&sim, b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert_eq!(problem.map(|p| p.status), Some(400));

    let (status, problem) = post_raw(&sim, br#"{"carrier":"fastship"}"#.to_vec()).await;
    assert_eq!(status, 422);
    assert!(problem.is_some_and(|p| p.detail.contains("missing field")));

    let (status, _) = post_raw(
        &sim,
        br#"{"carrier":"fastship","shipment_id":"s","zone":"EU","weight_g":-5,"idempotency_key":"k"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn out_of_range_fields_are_422() {
    let (_sim, client) = start().await;
    for bad in [
        LabelRequest { weight_g: 0, ..request("k-1") },
        LabelRequest { weight_g: 1_000_000, ..request("k-2") },
        LabelRequest { zone: "E U".to_owned(), ..request("k-3") },
    ] {
        let error = client.create_label(&bad).await.expect_err("invalid request");
        assert!(matches!(error, CarrierError::Rejected { status: 422, .. }), "{bad:?}: {error:?}");
    }
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.carriers["fastship"].rejected, 3);
    assert_eq!(stats.carriers["fastship"].labels_created, 0);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let (sim, _client) = start().await;
    let (status, _) = post_raw(&sim, vec![b' '; BODY_BYTES_MAX + 1]).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn tracking_returns_the_label() {
    let (_sim, client) = start().await;
    let label = client.create_label(&request("k-1")).await.expect("label created");
    let info = client.track(&label.tracking_number).await.expect("tracking info");
    assert_eq!(info.tracking_number, label.tracking_number);
    assert_eq!(info.created_at, label.created_at);
    assert_eq!(info.shipment_id, "s-1");
    assert_eq!(info.weight_g, 500);
    assert_eq!(info.status, "label_created");

    let error = client.track("NOPE-1").await.expect_err("unknown tracking number");
    assert!(matches!(error, CarrierError::Rejected { status: 404, .. }), "{error:?}");
}

#[tokio::test]
async fn price_follows_base_price_and_weight() {
    let (_sim, client) = start().await;
    let settings = CarrierSettings { base_price: "6.00".to_owned(), ..CarrierSettings::default() };
    client.admin_set("fastship", &settings).await.expect("settings applied");
    let light = client.create_label(&request("k-1")).await.expect("label");
    let heavy = client.create_label(&LabelRequest { weight_g: 2_500, ..request("k-2") }).await.expect("label");
    assert_eq!(light.cost, "6.00");
    assert_eq!(heavy.cost, "7.00");
}
