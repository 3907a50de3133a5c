//! API keys over HTTP: 401 without or with a bad key, 403 for the wrong role,
//! keys compared by hash, viewer read-only, ops everything, runtime revocation.

mod common;

use axum::body::Body;
use axum::http::StatusCode;
use common::*;
use orderly_engine::config::AuthSettings;
use orderly_http::auth::{generate_key, render_key_block};
use orderly_http::{KeyRing, Role};

fn get(uri: &str, token: Option<&str>) -> axum::http::Request<Body> {
    let mut builder = request("GET", uri);
    if let Some(token) = token {
        builder = builder.header("authorization", bearer(token));
    }
    builder.body(Body::empty()).expect("valid request")
}

const ORDER: &str = r#"{"sku":"SKU-1","qty":1}"#;

#[tokio::test]
async fn a_missing_key_is_a_401_with_www_authenticate() {
    let app = app();
    let answer = call(&app.router, get("/v1/orders/1", None)).await;
    answer.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(answer.header("www-authenticate").is_some_and(|value| value.starts_with("Bearer")));
}

#[tokio::test]
async fn an_unknown_or_malformed_key_is_a_401() {
    let app = app();
    for header in ["Bearer ok_not_a_key", "Basic b3BzOm9wcw==", "Bearer", "ok_ops_test_key"] {
        let req = request("GET", "/v1/orders/1").header("authorization", header).body(Body::empty()).expect("valid");
        let answer = call(&app.router, req).await;
        answer.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
        assert!(answer.header("www-authenticate").is_some());
    }
}

#[tokio::test]
async fn the_wrong_role_is_a_403_and_the_right_one_passes() {
    let app = app();
    let denied = call(&app.router, post_json("/v1/orders", WAREHOUSE_KEY, None, ORDER)).await;
    let problem = denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("storefront")), "{problem}");
    let created = call(&app.router, post_json("/v1/orders", SHOP_KEY, None, ORDER)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.json()["by"], "shop");
    let read = call(&app.router, get("/v1/orders/ord-1", Some(WAREHOUSE_KEY))).await;
    assert_eq!(read.status, StatusCode::OK);
}

#[tokio::test]
async fn a_route_layer_requires_roles_too() {
    let app = app();
    assert_eq!(call(&app.router, get("/v1/picks/next", Some(WAREHOUSE_KEY))).await.status, StatusCode::OK);
    assert_eq!(call(&app.router, get("/v1/picks/next", Some(OPS_KEY))).await.status, StatusCode::OK);
    call(&app.router, get("/v1/picks/next", Some(SHOP_KEY))).await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    call(&app.router, get("/v1/picks/next", None)).await.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn ops_may_do_everything_and_only_ops_may_adjust() {
    let app = app();
    assert_eq!(call(&app.router, post_json("/v1/orders", OPS_KEY, None, ORDER)).await.status, StatusCode::CREATED);
    assert_eq!(call(&app.router, post_json("/v1/adjustments", OPS_KEY, None, "")).await.status, StatusCode::NO_CONTENT);
    call(&app.router, post_json("/v1/adjustments", SHOP_KEY, None, ""))
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn a_viewer_reads_but_never_writes() {
    let app = app();
    assert_eq!(call(&app.router, get("/v1/orders/1", Some(VIEWER_KEY))).await.status, StatusCode::OK);
    let answer = call(&app.router, post_json("/v1/orders", VIEWER_KEY, None, ORDER)).await;
    let problem = answer.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("read-only")));
}

#[tokio::test]
async fn keys_are_compared_by_hash_so_the_hash_itself_is_no_key() {
    let (key, hash) = generate_key().expect("os rng");
    let app = app();
    let mut settings = auth_settings();
    settings.keys.push(orderly_engine::config::ApiKey { name: "fresh".into(), role: "ops".into(), hash: hash.clone() });
    app.keys.reload(&settings).expect("valid settings");
    assert_eq!(call(&app.router, get("/v1/orders/1", Some(&key))).await.status, StatusCode::OK);
    for not_a_key in [hash.as_str(), hash.trim_start_matches("sha256:")] {
        call(&app.router, get("/v1/orders/1", Some(not_a_key)))
            .await
            .assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
    }
}

#[tokio::test]
async fn swapping_the_ring_revokes_a_key_on_the_next_request() {
    let app = app();
    let server = Server::start(app.router.clone(), test_limits()).await;
    let client = client();
    let url = format!("{}/v1/orders/1", server.base);
    let before = client.get(&url).bearer_auth(SHOP_KEY).send().await.expect("request");
    assert_eq!(before.status(), StatusCode::OK);
    let mut settings = auth_settings();
    settings.keys.retain(|key| key.name != "shop");
    app.keys.replace(KeyRing::from_settings(&settings).expect("valid settings"));
    let after = client.get(&url).bearer_auth(SHOP_KEY).send().await.expect("request");
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(after.headers()["content-type"], "application/problem+json");
    assert!(after.headers().contains_key("www-authenticate"));
    let others = client.get(&url).bearer_auth(OPS_KEY).send().await.expect("request");
    assert_eq!(others.status(), StatusCode::OK);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_ring() {
    let app = app();
    let mut settings = auth_settings();
    settings.keys[0].hash = "sha256:nothex".into();
    assert!(app.keys.reload(&settings).is_err());
    assert_eq!(call(&app.router, get("/v1/orders/1", Some(SHOP_KEY))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn with_no_key_configured_the_401_says_so_and_open_routes_stay_open() {
    let app = app();
    app.keys.replace(KeyRing::empty());
    let answer = call(&app.router, post_json("/v1/orders", "", None, ORDER)).await;
    answer.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
    let anonymous = call(
        &app.router,
        request("POST", "/v1/orders")
            .header("content-type", "application/json")
            .body(Body::from(ORDER))
            .expect("valid"),
    )
    .await;
    let problem = anonymous.assert_problem(StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(problem["detail"].as_str().is_some_and(|detail| detail.contains("orderly keys new")), "{problem}");
    assert_eq!(call(&app.router, get("/healthz", None)).await.status, StatusCode::OK);
}

#[test]
fn the_rendered_key_block_is_valid_config_that_authenticates_the_key() {
    let (key, hash) = generate_key().expect("os rng");
    let block = render_key_block("ops-console", Role::Ops, &hash);
    assert!(block.starts_with("[[auth.keys]]\n"));
    #[derive(serde::Deserialize)]
    struct Config {
        auth: AuthSettings,
    }
    let config: Config = toml::from_str(&block).expect("valid TOML for [auth]");
    let ring = KeyRing::from_settings(&config.auth).expect("valid keys");
    let principal = ring.authenticate(&key).expect("the key authenticates");
    assert_eq!(principal.name, "ops-console");
    assert_eq!(principal.role, Role::Ops);
    assert!(!block.contains(&key), "the block never holds the key itself");
}
