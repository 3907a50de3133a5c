//! The simulator's statistics over real HTTP: per-carrier counters and the
//! label creation times a client's rate limit is checked against.

use orderly_carrier::sim::{self, SimConfig};
use orderly_carrier::{CarrierClient, CarrierError, LabelRequest};
use std::time::Duration;

fn request(carrier: &str, key: &str) -> LabelRequest {
    LabelRequest {
        carrier: carrier.to_owned(),
        shipment_id: "s-1".to_owned(),
        zone: "EU".to_owned(),
        weight_g: 500,
        idempotency_key: key.to_owned(),
    }
}

#[tokio::test]
async fn stats_count_every_outcome_per_carrier() {
    let config = SimConfig::from_specs(3, &["fastship", "slowpost:down=true"]).expect("valid specs");
    let sim = sim::spawn_local(config).await.expect("bind 127.0.0.1:0");
    let client = CarrierClient::new(sim.url(), Duration::from_secs(5)).expect("valid URL");

    for i in 0..5 {
        client.create_label(&request("fastship", &format!("k-{i}"))).await.expect("label");
    }
    client.create_label(&request("fastship", "k-0")).await.expect("replay");
    let invalid = LabelRequest { weight_g: 0, ..request("fastship", "k-bad") };
    assert!(matches!(client.create_label(&invalid).await, Err(CarrierError::Rejected { status: 422, .. })));
    for i in 0..2 {
        assert!(client.create_label(&request("slowpost", &format!("k-{i}"))).await.is_err());
    }

    let stats = client.stats().await.expect("stats");
    let fastship = &stats.carriers["fastship"];
    assert_eq!(fastship.requests, 7);
    assert_eq!(fastship.labels_created, 5);
    assert_eq!(fastship.idempotent_replays, 1);
    assert_eq!(fastship.rejected, 1);
    assert_eq!(fastship.errors, 0);
    assert_eq!(fastship.label_times_ms.len(), 5);
    assert!(fastship.label_times_ms.windows(2).all(|w| w[0] <= w[1]));
    assert!(fastship.label_times_ms.iter().all(|&t| t <= stats.uptime_ms));
    assert_eq!(fastship.labels_per_second.iter().map(|s| s.count).sum::<u64>(), 5);
    assert_eq!(fastship.max_labels_in_window(60_000), 5);

    let slowpost = &stats.carriers["slowpost"];
    assert_eq!((slowpost.requests, slowpost.errors, slowpost.labels_created), (2, 2, 0));
    assert!(slowpost.label_times_ms.is_empty());
}

#[tokio::test]
async fn label_times_show_a_paced_client() {
    let sim = sim::spawn_local(SimConfig::demo(0)).await.expect("bind 127.0.0.1:0");
    let client = CarrierClient::new(sim.url(), Duration::from_secs(5)).expect("valid URL");
    // A client paced at one label per 200 ms never has two labels within 50 ms.
    let mut pace = tokio::time::interval(Duration::from_millis(200));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..4 {
        pace.tick().await;
        client.create_label(&request("fastship", &format!("k-{i}"))).await.expect("label");
    }
    let stats = client.stats().await.expect("stats");
    let fastship = &stats.carriers["fastship"];
    assert_eq!(fastship.max_labels_in_window(50), 1);
    assert_eq!(fastship.max_labels_in_window(10_000), 4);
}
