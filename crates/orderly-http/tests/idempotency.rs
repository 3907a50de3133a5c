//! Idempotency-Key semantics: replay byte for byte, 422 on reuse with another
//! request, 409 while in flight, scoping per principal, TTL, durability and
//! purging; server errors are never recorded.

mod common;

use axum::http::StatusCode;
use common::*;
use orderly_engine::ports::Store;
use orderly_http::idempotency::IDEMPOTENCY_TABLE;
use orderly_http::{Idempotency, IdempotencyConfig};
use std::sync::atomic::Ordering;

const ORDER: &str = r#"{"sku":"SKU-1","qty":2}"#;

#[tokio::test]
async fn a_retry_replays_the_original_response_byte_for_byte() {
    let app = app();
    let first = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("key-1"), ORDER)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotent-replayed"), None);
    let second = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("key-1"), ORDER)).await;
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("content-type"), first.header("content-type"));
    assert_eq!(second.header("location"), Some("/v1/orders/ord-1"));
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 1, "the handler ran once");
}

#[tokio::test]
async fn replay_works_over_real_http() {
    let app = app();
    let server = Server::start(app.router.clone(), test_limits()).await;
    let client = client();
    let send = || {
        client
            .post(format!("{}/v1/orders", server.base))
            .bearer_auth(SHOP_KEY)
            .header("content-type", "application/json")
            .header("idempotency-key", "http-key")
            .body(ORDER)
            .send()
    };
    let first = send().await.expect("request");
    let (first_status, first_body) = (first.status(), first.bytes().await.expect("body"));
    let second = send().await.expect("request");
    assert_eq!(second.status(), first_status);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.bytes().await.expect("body"), first_body);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_same_key_with_another_body_is_a_422() {
    let app = app();
    call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("key-2"), ORDER)).await;
    let other = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("key-2"), r#"{"sku":"SKU-1","qty":3}"#)).await;
    other.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reuse");
    let other_path = call(&app.router, post_json("/v1/adjustments", SHOP_KEY, Some("key-2"), ORDER)).await;
    other_path.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reuse");
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn keys_are_scoped_per_principal() {
    let app = app();
    let mine = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("shared"), ORDER)).await;
    let theirs = call(&app.router, post_json("/v1/orders", OTHER_SHOP_KEY, Some("shared"), ORDER)).await;
    assert_eq!(theirs.status, StatusCode::CREATED);
    assert_eq!(theirs.header("idempotent-replayed"), None);
    assert_ne!(mine.body, theirs.body);
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_is_a_409() {
    let app = app();
    let router = app.router.clone();
    let first = tokio::spawn(async move { call(&router, post_json("/v1/slow", SHOP_KEY, Some("slow-1"), "")).await });
    app.handlers.started.notified().await;
    let duplicate = call(&app.router, post_json("/v1/slow", SHOP_KEY, Some("slow-1"), "")).await;
    duplicate.assert_problem(StatusCode::CONFLICT, "idempotency-key-in-flight");
    assert_eq!(duplicate.header("retry-after"), Some("1"));
    app.handlers.release.notify_one();
    let first = first.await.expect("first request task");
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let after = call(&app.router, post_json("/v1/slow", SHOP_KEY, Some("slow-1"), "")).await;
    assert_eq!(after.status, StatusCode::ACCEPTED);
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_overlong_or_invalid_key_is_a_400() {
    let app = app();
    let long = "k".repeat(256);
    for key in [long.as_str(), "has space", ""] {
        let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some(key), ORDER)).await;
        answer.assert_problem(StatusCode::BAD_REQUEST, "invalid-idempotency-key");
    }
    let longest = "k".repeat(255);
    assert_eq!(
        call(&app.router, post_json("/v1/orders", SHOP_KEY, Some(&longest), ORDER)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_errors_are_not_recorded_so_a_retry_runs_again() {
    let app = app();
    for _ in 0..2 {
        let answer = call(&app.router, post_json("/v1/flaky", SHOP_KEY, Some("flaky-1"), "")).await;
        answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "service-unavailable");
        assert_eq!(answer.header("idempotent-replayed"), None);
    }
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn client_errors_are_recorded_and_replayed() {
    let app = app();
    let body = r#"{"sku":"SKU-1","qty":0}"#;
    let first = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("zero"), body)).await;
    first.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable-content");
    let again = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("zero"), body)).await;
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("content-type"), Some("application/problem+json"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn records_are_durable_in_the_store_and_survive_a_restart() {
    let app = app();
    let first = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("durable"), ORDER)).await;
    let rows = app.store.scan(IDEMPOTENCY_TABLE, None, None, 10).await.expect("scan");
    assert_eq!(rows.len(), 1);
    let doc = String::from_utf8_lossy(&rows[0].doc);
    assert!(!doc.contains(SHOP_KEY), "the API key is never stored");
    // A fresh Idempotency over the same store (a restarted process) replays.
    let restarted = Idempotency::new(app.store.clone(), app.clock.clone(), IdempotencyConfig::default());
    let handlers = Handlers::default();
    let restarted_router = router(app.keys.clone(), restarted, handlers.clone(), test_limits());
    let second = call(&restarted_router, post_json("/v1/orders", SHOP_KEY, Some("durable"), ORDER)).await;
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(handlers.executions.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn expired_records_are_ignored_then_purged() {
    let app = app();
    call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("old"), ORDER)).await;
    app.clock.advance_ms(24 * 3_600_000 + 1);
    let rerun = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("old"), r#"{"sku":"SKU-2","qty":1}"#)).await;
    assert_eq!(rerun.status, StatusCode::CREATED, "an expired key may be reused");
    assert_eq!(rerun.header("idempotent-replayed"), None);
    call(&app.router, post_json("/v1/orders", OTHER_SHOP_KEY, Some("other"), ORDER)).await;
    assert_eq!(app.idempotency.purge_expired().await.expect("purge"), 0, "nothing has expired yet");
    app.clock.advance_ms(26 * 3_600_000);
    assert_eq!(app.idempotency.purge_expired().await.expect("purge"), 2);
    assert!(app.store.scan(IDEMPOTENCY_TABLE, None, None, 10).await.expect("scan").is_empty());
}

#[tokio::test]
async fn a_failed_record_still_answers_and_the_next_try_runs_again() {
    let app = app();
    app.store.fail_next_commits(1);
    let first = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("lost"), ORDER)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = call(&app.router, post_json("/v1/orders", SHOP_KEY, Some("lost"), ORDER)).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(second.header("idempotent-replayed"), None);
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_without_a_key_or_safe_methods_are_untouched() {
    let app = app();
    call(&app.router, post_json("/v1/orders", SHOP_KEY, None, ORDER)).await;
    call(&app.router, post_json("/v1/orders", SHOP_KEY, None, ORDER)).await;
    assert_eq!(app.handlers.executions.load(Ordering::SeqCst), 2);
    assert!(app.store.scan(IDEMPOTENCY_TABLE, None, None, 10).await.expect("scan").is_empty());
}
