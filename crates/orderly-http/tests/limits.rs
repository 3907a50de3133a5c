//! Limits and serving: the in-flight cap answers 503 at once, the connection
//! cap holds extra connections in the backlog, shutdown drains open requests
//! and never hangs past its deadline.

mod common;

use axum::body::Body;
use axum::http::StatusCode;
use common::*;
use orderly_engine::config::{HttpSettings, Millis};
use orderly_http::Limits;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn limits_come_from_the_http_settings() {
    let settings = HttpSettings { body_limit_bytes: 2048, request_timeout: Millis(1_500), max_connections: 7 };
    let limits = Limits::from_settings(&settings);
    assert_eq!(limits.body_limit_bytes, 2048);
    assert_eq!(limits.request_timeout_ms, 1_500);
    assert_eq!(limits.max_connections, 7);
    assert_eq!(limits.max_in_flight_requests, 7);
    let negative = Limits::from_settings(&HttpSettings { request_timeout: Millis(-5), ..settings });
    assert_eq!(negative.request_timeout_ms, 0);
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_get_a_503_at_once() {
    let app = app_with(Limits { max_in_flight_requests: 1, ..test_limits() });
    let router = app.router.clone();
    let slow = tokio::spawn(async move { call(&router, post_json("/v1/slow", SHOP_KEY, None, "")).await });
    app.handlers.started.notified().await;
    let refused = call(&app.router, request("GET", "/healthz").body(Body::empty()).expect("valid")).await;
    refused.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    app.handlers.release.notify_one();
    assert_eq!(slow.await.expect("slow task").status, StatusCode::ACCEPTED);
    let later = call(&app.router, request("GET", "/healthz").body(Body::empty()).expect("valid")).await;
    assert_eq!(later.status, StatusCode::OK);
}

const KEEP_ALIVE_GET: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n";

/// Reads from `stream` until a whole `ok` health answer has arrived.
async fn read_health_answer(stream: &mut tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.ends_with(b"ok") {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(read > 0, "connection closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let limits = Limits { max_connections: 1, ..test_limits() };
    let app = app_with(limits);
    let server = Server::start(app.router.clone(), limits).await;
    let mut first = tokio::net::TcpStream::connect(server.address).await.expect("connect");
    first.write_all(KEEP_ALIVE_GET).await.expect("write");
    assert!(read_health_answer(&mut first).await.starts_with("HTTP/1.1 200"));

    let mut second = tokio::net::TcpStream::connect(server.address).await.expect("connect (backlog)");
    second.write_all(KEEP_ALIVE_GET).await.expect("write");
    let waiting = tokio::time::timeout(Duration::from_millis(300), read_health_answer(&mut second)).await;
    assert!(waiting.is_err(), "the second connection is not served while the first holds the only slot");

    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(10), read_health_answer(&mut second)).await;
    assert!(served.expect("served once the first closed").starts_with("HTTP/1.1 200"));
    drop(second);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_lets_an_open_request_finish() {
    let app = app();
    let server = Server::start(app.router.clone(), test_limits()).await;
    let url = format!("{}/v1/slow", server.base);
    let open = tokio::spawn(async move { client().post(url).bearer_auth(SHOP_KEY).send().await });
    app.handlers.started.notified().await;
    let Server { shutdown, stopped, .. } = server;
    shutdown.expect("not yet stopped").send(()).expect("server listening for shutdown");
    app.handlers.release.notify_one();
    let answer = open.await.expect("client task").expect("the open request is answered");
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    let stopped = tokio::time::timeout(Duration::from_secs(10), stopped).await.expect("stops in time");
    stopped.expect("no panic").expect("clean stop");
}

#[tokio::test]
async fn shutdown_stops_after_the_drain_deadline_even_if_a_request_hangs() {
    let limits = Limits { shutdown_drain_ms: 200, request_timeout_ms: 60_000, ..test_limits() };
    let app = app_with(limits);
    let server = Server::start(app.router.clone(), limits).await;
    let url = format!("{}/v1/slow", server.base);
    let _hung = tokio::spawn(async move { client().post(url).bearer_auth(SHOP_KEY).send().await });
    app.handlers.started.notified().await;
    server.stop().await.expect("stops after the drain deadline");
}
