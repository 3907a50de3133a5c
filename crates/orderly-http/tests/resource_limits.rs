//! Resource limits over real TCP: request head size, JSON nesting depth,
//! oversized bodies, request timeout, the connection cap, and slowloris
//! clients (connections that trickle header bytes) being cut off while a
//! normal client is still served.

mod common;

use axum::http::StatusCode;
use common::*;
use orderly_http::Limits;
use orderly_http::limits::{HEADER_BYTES_MAX, HEADERS_MAX};
use orderly_http::problem::JSON_DEPTH_MAX;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn status_of(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn request_heads_over_the_limit_are_refused_and_the_server_goes_on() {
    let app = app();
    let server = Server::start(app.router.clone(), test_limits()).await;
    let big = "x".repeat(HEADER_BYTES_MAX + 1024);
    let answer = raw_http(
        server.address,
        format!("GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: {big}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 431, "{}", &answer[..answer.len().min(200)]);
    let many: String = (0..HEADERS_MAX + 5).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_http(
        server.address,
        format!("GET /healthz HTTP/1.1\r\nhost: t\r\n{many}connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    let fine = raw_http(server.address, b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status_of(&fine), 200, "{fine}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn json_nested_deeper_than_the_limit_is_a_400_problem() {
    let limits = Limits { body_limit_bytes: 64 * 1024, ..test_limits() };
    let app = app_with(limits);
    let too_deep = format!("{{\"sku\":{}}}", nested(JSON_DEPTH_MAX));
    let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, &too_deep)).await;
    answer.assert_problem(StatusCode::BAD_REQUEST, "json-too-deep");
    // Far deeper than serde_json's own recursion limit: still the same typed answer.
    let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, &nested(20_000))).await;
    answer.assert_problem(StatusCode::BAD_REQUEST, "json-too-deep");
    // Brackets inside strings do not count; the limit itself is accepted by the check.
    let in_string = format!("{{\"sku\":\"{}\",\"qty\":1}}", "[".repeat(100));
    let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, &in_string)).await;
    assert_ne!(answer.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&answer.body));
    let at_limit = format!("{{\"sku\":{}}}", nested(JSON_DEPTH_MAX - 1));
    let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, &at_limit)).await;
    answer.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable-content");
    assert!(orderly_http::problem::check_json_depth(nested(JSON_DEPTH_MAX).as_bytes()).is_ok());
}

#[tokio::test]
async fn an_oversized_body_is_a_413_problem_over_tcp() {
    let app = app();
    let server = Server::start(app.router.clone(), test_limits()).await;
    let body = format!("{{\"sku\":\"{}\"}}", "a".repeat(test_limits().body_limit_bytes * 4));
    let response = client()
        .post(format!("{}/v1/orders", server.base))
        .bearer_auth(SHOP_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["status"], 413, "{problem}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_request_over_the_time_limit_is_a_503_problem() {
    let limits = Limits { request_timeout_ms: 200, ..test_limits() };
    let app = app_with(limits);
    let server = Server::start(app.router.clone(), limits).await;
    let started = Instant::now();
    let response =
        client().post(format!("{}/v1/slow", server.base)).bearer_auth(SHOP_KEY).send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert!(started.elapsed() < Duration::from_secs(5), "answered at the limit, not when the handler ended");
    let problem: serde_json::Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["type"], "https://orderly.dev/problems/request-timeout", "{problem}");
    server.stop().await.expect("clean stop");
}

/// Opens a connection and sends a request head one byte every `pause`,
/// never finishing it; returns how long the server kept it open.
async fn slowloris(address: std::net::SocketAddr, pause: Duration, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let head = b"POST /v1/orders HTTP/1.1\r\nhost: t\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut byte = 0;
    let mut buffer = [0u8; 512];
    while started.elapsed() < give_up {
        if stream.write_all(&head[byte % head.len()..byte % head.len() + 1]).await.is_err() {
            return Some(started.elapsed());
        }
        byte += 1;
        // The server closing shows as EOF (or a reset) on read.
        match tokio::time::timeout(pause, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => return Some(started.elapsed()), // an error answer (408) then close
            Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_off_and_a_normal_client_is_still_served() {
    let limits = Limits { max_connections: 4, header_read_timeout_ms: 600, ..test_limits() };
    let app = app_with(limits);
    let server = Server::start(app.router.clone(), limits).await;
    let give_up = Duration::from_secs(8);
    // More slow clients than connection slots.
    let attackers: Vec<_> =
        (0..8).map(|_| tokio::spawn(slowloris(server.address, Duration::from_millis(50), give_up))).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Meanwhile a normal client asks, several times, and is served each time.
    let started = Instant::now();
    for _ in 0..3 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            raw_http(server.address, b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"),
        )
        .await
        .expect("the normal client is served while slow clients trickle");
        assert_eq!(status_of(&answer), 200, "{answer}");
    }
    println!("normal client served 3 times in {:?} under 8 slowloris connections", started.elapsed());

    for attacker in attackers {
        let held = attacker.await.expect("attacker task").expect("the server cut the slow connection off");
        assert!(held < Duration::from_secs(5), "a slow connection was held {held:?}");
    }
    // An idle connection that sends nothing at all is cut off too.
    let mut idle = tokio::net::TcpStream::connect(server.address).await.expect("connect");
    let mut buffer = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buffer)).await;
    assert!(closed.is_ok(), "an idle connection that sends nothing is closed in time");
    server.stop().await.expect("clean stop");
}
