//! The test webhook receiver over real HTTP: recording, scripted failures and
//! recovery, and waiting with a deadline.

use orderly_carrier::webhook::{FailWindow, ReceiverConfig, WaitTimeout, spawn_receiver};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);

fn http() -> reqwest::Client {
    orderly_carrier::install_crypto_provider();
    reqwest::Client::new()
}

async fn post(url: &str, body: &str) -> u16 {
    let response = http()
        .post(url)
        .header("x-orderly-signature", "sha256=abc")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("the receiver answers");
    response.status().as_u16()
}

#[tokio::test]
async fn records_path_headers_and_body() {
    let (url, receiver) = spawn_receiver(ReceiverConfig::default()).await.expect("bind 127.0.0.1:0");
    assert_eq!(post(&format!("{url}/hooks/orders?x=1"), r#"{"type":"orderly.order.created"}"#).await, 200);
    let deliveries = receiver.wait_for_accepted(1, DEADLINE).await.expect("one delivery");
    let delivery = &deliveries[0];
    assert_eq!(delivery.attempt, 1);
    assert_eq!(delivery.path, "/hooks/orders?x=1");
    assert_eq!(delivery.header("X-Orderly-Signature"), Some("sha256=abc"));
    assert_eq!(
        delivery.json().ok().and_then(|v| v["type"].as_str().map(str::to_owned)).as_deref(),
        Some("orderly.order.created")
    );
    assert!(delivery.accepted());
    receiver.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn fails_the_first_requests_then_recovers() {
    let config = ReceiverConfig { fail_first: 2, ..ReceiverConfig::default() };
    let (url, receiver) = spawn_receiver(config).await.expect("bind 127.0.0.1:0");
    let statuses = [post(&url, "{}").await, post(&url, "{}").await, post(&url, "{}").await];
    assert_eq!(statuses, [503, 503, 200]);
    let deliveries = receiver.wait_for_received(3, DEADLINE).await.expect("three attempts");
    assert_eq!(deliveries.iter().map(|d| d.status).collect::<Vec<_>>(), [503, 503, 200]);
    assert_eq!(receiver.accepted().len(), 1);
    assert_eq!(receiver.counts(), (3, 1));

    receiver.fail_next(1);
    assert_eq!(post(&url, "{}").await, 503);
    assert_eq!(post(&url, "{}").await, 200);
}

#[tokio::test]
async fn fails_during_a_window_then_recovers() {
    let window = FailWindow { after: Duration::ZERO, duration: Duration::from_secs(3600) };
    let config = ReceiverConfig { fail_window: Some(window), ..ReceiverConfig::default() };
    let (url, receiver) = spawn_receiver(config).await.expect("bind 127.0.0.1:0");
    assert_eq!(post(&url, "{}").await, 503);
    assert_eq!(post(&url, "{}").await, 503);
    receiver.recover();
    assert_eq!(post(&url, "{}").await, 200);

    let window = Duration::from_millis(500);
    let set_at = tokio::time::Instant::now();
    receiver.fail_for(window);
    let first = post(&url, "{}").await;
    // A very slow machine may only get its first POST in after the window.
    assert!(first == 503 || set_at.elapsed() >= window, "answered {first}");
    let deadline = set_at + DEADLINE;
    while post(&url, "{}").await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the window never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(set_at.elapsed() >= window);
}

#[tokio::test]
async fn waiting_reports_a_deadline() {
    let (_url, receiver) = spawn_receiver(ReceiverConfig::default()).await.expect("bind 127.0.0.1:0");
    let outcome = receiver.wait_for_accepted(1, Duration::from_millis(50)).await;
    assert_eq!(outcome, Err(WaitTimeout { wanted: 1, seen: 0 }));
}

#[tokio::test]
async fn only_posts_are_recorded() {
    let (url, receiver) = spawn_receiver(ReceiverConfig::default()).await.expect("bind 127.0.0.1:0");
    let status = http().get(&url).send().await.expect("the receiver answers").status().as_u16();
    assert_eq!(status, 405);
    assert!(receiver.deliveries().is_empty());
}
