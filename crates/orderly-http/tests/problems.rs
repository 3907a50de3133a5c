//! Every error is application/problem+json with a stable type: bad bodies,
//! unknown routes, wrong methods, oversize bodies, panics and timeouts.

mod common;

use axum::body::Body;
use axum::http::StatusCode;
use common::*;

#[tokio::test]
async fn malformed_json_is_a_400_problem() {
    let app = app();
    let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, r#"{"sku": "A", "qty": "#)).await;
    let problem = answer.assert_problem(StatusCode::BAD_REQUEST, "malformed-json");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("line 1")), "{problem}");
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_a_422_naming_the_field() {
    let app = app();
    let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, r#"{"sku": "A", "qty": "two"}"#)).await;
    let problem = answer.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable-content");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("qty")), "{problem}");
    let missing = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, r#"{"sku": "A"}"#)).await;
    missing.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable-content");
}

#[tokio::test]
async fn a_wrong_or_missing_content_type_is_a_415() {
    let app = app();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut builder = request("POST", "/v1/orders").header("authorization", bearer(SHOP_KEY));
        if let Some(content_type) = content_type {
            builder = builder.header("content-type", content_type);
        }
        let req = builder.body(Body::from(r#"{"sku":"A","qty":1}"#)).expect("valid request");
        call(&app.router, req).await.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type");
    }
}

#[tokio::test]
async fn an_oversize_body_is_a_413_with_the_limit() {
    let app = app();
    let big = format!(r#"{{"sku":"{}","qty":1}}"#, "A".repeat(4096));
    // Through the idempotency middleware (it reads the body first) and without.
    for key in [None, Some("big-1")] {
        let answer = call(&app.router, post_json("/v1/orders", SHOP_KEY, key, &big)).await;
        let problem = answer.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large");
        assert_eq!(problem["limit_bytes"], 1024);
    }
}

#[tokio::test]
async fn an_oversize_body_over_real_http_is_a_413_with_and_without_content_length() {
    let app = app();
    let server = Server::start(app.router.clone(), test_limits()).await;
    let big = format!(r#"{{"sku":"{}","qty":1}}"#, "A".repeat(4096));
    let with_length = client()
        .post(format!("{}/v1/orders", server.base))
        .bearer_auth(SHOP_KEY)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(with_length.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(with_length.headers()["content-type"], "application/problem+json");
    // Chunked: no Content-Length, so the limit trips while reading.
    let mut raw = format!(
        "POST /v1/orders HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {SHOP_KEY}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    for chunk in big.as_bytes().chunks(512) {
        raw.push_str(&format!("{:x}\r\n{}\r\n", chunk.len(), String::from_utf8_lossy(chunk)));
    }
    raw.push_str("0\r\n\r\n");
    let answer = raw_http(server.address, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.to_lowercase().contains("content-type: application/problem+json"), "{answer}");
    assert!(answer.contains("https://orderly.dev/problems/payload-too-large"), "{answer}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_unknown_route_is_a_404_problem() {
    let app = app();
    let answer = call(&app.router, request("GET", "/v1/nope").body(Body::empty()).expect("valid")).await;
    let problem = answer.assert_problem(StatusCode::NOT_FOUND, "not-found");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("/v1/nope")));
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem_with_allow() {
    let app = app();
    let req =
        request("DELETE", "/v1/orders").header("authorization", bearer(OPS_KEY)).body(Body::empty()).expect("valid");
    let answer = call(&app.router, req).await;
    answer.assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed");
    assert_eq!(answer.header("allow"), Some("POST"));
}

#[tokio::test]
async fn a_bad_path_parameter_rejection_becomes_a_problem_keeping_axums_detail() {
    let app = app();
    let req =
        request("GET", "/v1/orders/%FF").header("authorization", bearer(OPS_KEY)).body(Body::empty()).expect("valid");
    let answer = call(&app.router, req).await;
    let problem = answer.assert_problem(StatusCode::BAD_REQUEST, "bad-request");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("UTF-8")), "{problem}");
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_problem_without_internals() {
    let app = app();
    let req = request("GET", "/v1/panic").header("authorization", bearer(OPS_KEY)).body(Body::empty()).expect("valid");
    let answer = call(&app.router, req).await;
    let problem = answer.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, "internal-error");
    assert!(!problem.to_string().contains("handler bug"));
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_time_limit_is_a_503_problem_not_a_hang() {
    let app = app();
    let req = post_json("/v1/slow", SHOP_KEY, None, "");
    let answer = call(&app.router, req).await;
    answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "request-timeout");
    assert_eq!(answer.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_callers() {
    let app = app();
    let fresh = call(&app.router, request("GET", "/healthz").body(Body::empty()).expect("valid")).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert!(fresh.header("x-request-id").is_some_and(|id| id.len() >= 32));
    let given = call(
        &app.router,
        request("GET", "/nope").header("x-request-id", "abc-123").body(Body::empty()).expect("valid"),
    )
    .await;
    assert_eq!(given.header("x-request-id"), Some("abc-123"));
}
