//! Scripted faults of the carrier simulator over real HTTP, and how the
//! client classifies them: errors, downtime, timeouts, latency, outage
//! windows, seeded repeatability and admin validation.

use orderly_carrier::sim::{self, LocalSim, SimConfig};
use orderly_carrier::{CarrierClient, CarrierError, CarrierSettings, Label, LabelRequest, Outage};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(10);

async fn start(config: SimConfig) -> (LocalSim, CarrierClient) {
    let sim = sim::spawn_local(config).await.expect("bind 127.0.0.1:0");
    let client = CarrierClient::new(sim.url(), CLIENT_TIMEOUT).expect("valid URL");
    (sim, client)
}

fn config(spec: &str) -> SimConfig {
    SimConfig::from_specs(7, &[spec]).expect("valid spec")
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

/// Polls `check` until it yields a value, failing the test at `DEADLINE`.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn error_rate_one_always_answers_503_and_is_retryable() {
    let (_sim, client) = start(config("fastship:error_rate=1.0")).await;
    for i in 0..20 {
        let error = client.create_label(&request(&format!("k-{i}"))).await.expect_err("scripted error");
        assert_eq!(error, CarrierError::Unavailable(503));
        assert!(error.is_retryable());
    }
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.carriers["fastship"].errors, 20);
    assert_eq!(stats.carriers["fastship"].labels_created, 0);
}

#[tokio::test]
async fn down_always_answers_503_until_brought_back() {
    let (_sim, client) = start(config("fastship:down=true")).await;
    let error = client.create_label(&request("k-1")).await.expect_err("down");
    assert_eq!(error, CarrierError::Unavailable(503));
    client.admin_set("fastship", &CarrierSettings::default()).await.expect("settings applied");
    client.create_label(&request("k-1")).await.expect("back up");
}

#[tokio::test]
async fn a_held_request_times_out_within_the_client_timeout() {
    let (_sim, _) = start(config("fastship:timeout_rate=1.0")).await;
    let timeout = Duration::from_millis(300);
    let client = CarrierClient::new(_sim.url(), timeout).expect("valid URL");
    let started = Instant::now();
    let error = client.create_label(&request("k-1")).await.expect_err("held");
    let elapsed = started.elapsed();
    assert_eq!(error, CarrierError::Timeout);
    assert!(error.is_retryable());
    assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(2), "took {elapsed:?}");
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.carriers["fastship"].timeouts, 1);
}

#[tokio::test]
async fn shutdown_releases_held_requests_at_once() {
    let (sim, client) = start(config("fastship:timeout_rate=1.0")).await;
    let patient = CarrierClient::new(sim.url(), Duration::from_secs(120)).expect("valid URL");
    let held = tokio::spawn(async move { patient.create_label(&request("k-1")).await });
    eventually("the request to be held", || async {
        client.stats().await.ok().filter(|s| s.carriers["fastship"].timeouts == 1)
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(DEADLINE, sim.shutdown()).await.expect("shutdown is prompt").expect("clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(5));
    let outcome = held.await.expect("the task ran");
    assert_eq!(outcome, Err(CarrierError::Unavailable(503)));
}

#[tokio::test]
async fn latency_is_added_to_every_call() {
    let (_sim, client) = start(config("fastship:latency_ms=150")).await;
    let started = Instant::now();
    let label = client.create_label(&request("k-1")).await.expect("label");
    assert!(started.elapsed() >= Duration::from_millis(150));
    let started = Instant::now();
    client.track(&label.tracking_number).await.expect("tracking");
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn an_outage_in_the_future_is_not_active_yet() {
    let (_sim, client) = start(config("fastship:outage=60000+1000")).await;
    client.create_label(&request("k-1")).await.expect("not down yet");
}

#[tokio::test]
async fn a_current_outage_fails_every_call() {
    let (_sim, client) = start(config("fastship:outage=0+3600000")).await;
    for i in 0..5 {
        let error = client.create_label(&request(&format!("k-{i}"))).await.expect_err("in the outage");
        assert_eq!(error, CarrierError::Unavailable(503));
    }
    client.admin_set("fastship", &CarrierSettings::default()).await.expect("outage lifted");
    client.create_label(&request("k-1")).await.expect("back up");
}

#[tokio::test]
async fn an_outage_window_ends_after_its_duration() {
    let (_sim, client) = start(config("fastship")).await;
    let duration = Duration::from_millis(500);
    let outage = Outage { after_ms: 0, duration_ms: 500 };
    let settings = CarrierSettings { outage: Some(outage), ..CarrierSettings::default() };
    let applied_at = Instant::now();
    client.admin_set("fastship", &settings).await.expect("settings applied");
    let first = client.create_label(&request("k-1")).await;
    // A very slow machine may only get its first call in after the window.
    assert!(first == Err(CarrierError::Unavailable(503)) || applied_at.elapsed() >= duration, "{first:?}");
    let label: Label =
        eventually("the outage to end", || async { client.create_label(&request("k-1")).await.ok() }).await;
    assert!(applied_at.elapsed() >= duration);
    assert_eq!(label.carrier, "fastship");
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.carriers["fastship"].labels_created, 1);
}

/// The outcome of `count` sequential label calls: true for a label.
async fn outcomes(seed: u64, count: usize) -> Vec<bool> {
    let config = SimConfig::from_specs(seed, &["fastship:error_rate=0.5"]).expect("valid spec");
    let (_sim, client) = start(config).await;
    let mut outcomes = Vec::with_capacity(count);
    for i in 0..count {
        outcomes.push(client.create_label(&request(&format!("k-{i}"))).await.is_ok());
    }
    outcomes
}

#[tokio::test]
async fn the_same_seed_replays_the_same_faults() {
    let first = outcomes(42, 40).await;
    let second = outcomes(42, 40).await;
    assert_eq!(first, second);
    assert!(first.contains(&true) && first.contains(&false), "{first:?}");
    assert_ne!(first, outcomes(43, 40).await);
}

#[tokio::test]
async fn admin_refuses_invalid_settings_and_adds_carriers() {
    let (_sim, client) = start(config("fastship")).await;
    let bad = CarrierSettings { error_rate: 1.5, ..CarrierSettings::default() };
    let error = client.admin_set("fastship", &bad).await.expect_err("invalid rate");
    assert!(matches!(error, CarrierError::Rejected { status: 422, .. }), "{error:?}");
    let bad = CarrierSettings { base_price: "cheap".to_owned(), ..CarrierSettings::default() };
    assert!(client.admin_set("fastship", &bad).await.is_err());
    let error = client.admin_set("Bad Name", &CarrierSettings::default()).await.expect_err("invalid name");
    assert!(matches!(error, CarrierError::Rejected { status: 422, .. }), "{error:?}");

    let applied = client.admin_set("newco", &CarrierSettings::default()).await.expect("carrier added");
    assert_eq!(applied, CarrierSettings::default());
    let label = client.create_label(&LabelRequest { carrier: "newco".to_owned(), ..request("k-1") }).await;
    assert_eq!(label.map(|l| l.carrier), Ok("newco".to_owned()));
}

#[tokio::test]
async fn a_closed_port_is_a_retryable_transport_error() {
    let (sim, _) = start(config("fastship")).await;
    let url = sim.url().to_owned();
    sim.shutdown().await.expect("clean shutdown");
    let client = CarrierClient::new(&url, CLIENT_TIMEOUT).expect("valid URL");
    let error = client.create_label(&request("k-1")).await.expect_err("nobody listens");
    assert!(matches!(error, CarrierError::Transport(_)), "{error:?}");
    assert!(error.is_retryable());
}
