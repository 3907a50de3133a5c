//! The authorization matrix: every operation in `api/openapi.json` (so a new
//! route is covered the day it is documented) × every role, plus no key, a
//! wrong key and a revoked key, against the table of PRODUCT.md §5:
//! storefront orders and holds, warehouse picks/packs/receiving, carrier
//! delivery callbacks, ops everything, viewer read-only. Refusals are 401
//! (no or unknown key) or 403 (wrong role), as problem+json. Everything the
//! server logs meanwhile, at TRACE, is captured and must contain no key and
//! no key hash.

mod support;

use orderly::{Application, RunOptions};
use orderly_engine::config::AuthSettings;
use orderly_http::Role;
use orderly_http::auth::hash_key;
use orderly_store_sqlite::Durability;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::*;

const WRONG_KEY: &str = "ok_this_key_was_never_configured";

/// Who may call an operation, by PRODUCT.md §5 (ops may always).
#[derive(Debug, Clone, PartialEq)]
enum Access {
    /// No key needed (probes, docs, the dashboard shell).
    Open,
    /// A key with one of these roles (or ops).
    Roles(Vec<Role>),
}

/// The table, by rule rather than by route, so new routes fall under it.
fn expected(method: &Method, path: &str, open: bool) -> Access {
    use Role::*;
    if open {
        return Access::Open;
    }
    if *method == Method::GET {
        // Taking the next pick task is warehouse work; every other read is open to every role.
        return Access::Roles(if path.starts_with("/v1/picks") { vec![Warehouse] } else { Role::ALL.to_vec() });
    }
    let roles = match path {
        "/v1/orders" | "/v1/holds" | "/v1/orders/{id}/cancel" | "/v1/orders/{id}/return" => vec![Storefront],
        "/v1/orders/{id}/return/received" | "/v1/inventory/receipts" | "/v1/inventory/cycle-counts" => vec![Warehouse],
        p if p.starts_with("/v1/picks/") || p == "/v1/packages" => vec![Warehouse],
        p if p.starts_with("/v1/shipments/") && p.ends_with("/delivered") => vec![Carrier],
        "/v1/inventory/adjustments" => vec![Ops],
        p if p.starts_with("/v1/locations") || p.starts_with("/v1/ops/") => vec![Ops],
        other => panic!("{method} {other} is not in the authorization table: classify it here (PRODUCT.md §5)"),
    };
    Access::Roles(roles)
}

/// One documented operation, with a concrete path to call.
struct Operation {
    method: Method,
    template: String,
    path: String,
    access: Access,
}

fn operations() -> Vec<Operation> {
    let spec: Value =
        serde_json::from_str(include_str!("../../orderly-http/api/openapi.json")).expect("openapi.json is JSON");
    let resolve = |p: &Value| -> Value {
        match p["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/parameters/")) {
            Some(name) => spec["components"]["parameters"][name].clone(),
            None => p.clone(),
        }
    };
    let mut out = Vec::new();
    for (template, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else { continue };
            if !op.is_object() || op.get("responses").is_none() {
                continue;
            }
            let open = op["security"].as_array().is_some_and(Vec::is_empty);
            let mut path = template.clone();
            for (name, value) in [("{id}", "00000000-0000-7000-8000-000000000000"), ("{sku}", "SKU-AUTHZ")] {
                path = path.replace(name, value);
            }
            assert!(!path.contains('{'), "a path parameter this test does not fill: {template}");
            let required_query: Vec<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(&resolve)
                .filter(|p| p["in"] == "query" && p["required"] == true)
                .map(|p| format!("{}={WAREHOUSE}", p["name"].as_str().expect("a named parameter")))
                .collect();
            if !required_query.is_empty() {
                path = format!("{path}?{}", required_query.join("&"));
            }
            let access = expected(&method, template, open);
            out.push(Operation { method, template: template.clone(), path, access });
        }
    }
    assert!(out.len() >= 30, "openapi.json lists only {} operations", out.len());
    out
}

async fn call(api: &Api, op: &Operation, key: Option<&str>) -> Resp {
    let mut request = api.request(op.method.clone(), &op.path, key);
    if op.method == Method::POST || op.method == Method::PUT {
        request = request.header("content-type", "application/json").body("{}");
    }
    api.send(request).await.unwrap_or_else(|e| panic!("{} {} unanswered: {e:#}", op.method, op.path))
}

#[track_caller]
fn assert_refused(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text);
    assert!(r.content_type().starts_with("application/problem+json"), "{what}: {:?}", r.content_type());
    assert_eq!(r.body["status"].as_u64(), Some(u64::from(status)), "{what}: {}", r.text);
    assert!(r.body["type"].as_str().is_some_and(|t| !t.is_empty()), "{what}: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_by_every_role_no_key_wrong_key_and_revoked_key() {
    let log = Captured::default();
    let sink = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .init();

    let settings = orderly::settings::parse_str(&config_toml(None, "")).expect("valid test config");
    let dir = tempfile::tempdir().expect("temp dir");
    let options = RunOptions {
        data_dir: dir.path().join("data"),
        store: None,
        listen: "127.0.0.1:0".parse().expect("address"),
        durability: Durability::Normal,
    };
    let app = Application::build(settings.clone(), &options).await.expect("application starts");
    let api = Api::new(app.local_addr());
    let keys = app.keys();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));

    let roles = [
        (Role::Storefront, SHOP_KEY),
        (Role::Warehouse, WAREHOUSE_KEY),
        (Role::Carrier, CARRIER_KEY),
        (Role::Ops, OPS_KEY),
        (Role::Viewer, VIEWER_KEY),
    ];
    let ops = operations();
    let mut checked = 0;
    for op in &ops {
        let what = |who: &str| format!("{} {} as {who}", op.method, op.template);
        let anonymous = call(&api, op, None).await;
        let wrong = call(&api, op, Some(WRONG_KEY)).await;
        match &op.access {
            Access::Open => {
                assert!(anonymous.status.is_success(), "{}: {}", what("no key"), anonymous.text);
                // A presented key that is not valid is refused even where none is needed.
                assert_refused(&wrong, 401, &what("a wrong key"));
            }
            Access::Roles(allowed) => {
                assert_refused(&anonymous, 401, &what("no key"));
                assert_refused(&wrong, 401, &what("a wrong key"));
                for (role, key) in roles {
                    let r = call(&api, op, Some(key)).await;
                    let may = role == Role::Ops || allowed.contains(&role);
                    if may {
                        assert!(
                            !matches!(r.status.as_u16(), 401 | 403) && !r.status.is_server_error(),
                            "{} must be allowed, got {}: {}",
                            what(role.as_str()),
                            r.status,
                            r.text
                        );
                    } else {
                        assert_refused(&r, 403, &what(role.as_str()));
                    }
                    checked += 1;
                }
            }
        }
        checked += 2;
    }

    // Revoke the ops key by reloading the key ring without it: refused at once, everywhere.
    let mut without_ops = settings.auth.clone();
    without_ops.keys.retain(|k| k.role != "ops");
    assert_eq!(without_ops.keys.len(), settings.auth.keys.len() - 1);
    keys.reload(&AuthSettings { ..without_ops }).expect("valid ring");
    for op in ops.iter().filter(|op| op.access != Access::Open) {
        let r = call(&api, op, Some(OPS_KEY)).await;
        assert_refused(&r, 401, &format!("{} {} with the revoked ops key", op.method, op.template));
        checked += 1;
    }
    let still = api.get("/v1/orders", VIEWER_KEY).await;
    assert_eq!(still.status, StatusCode::OK, "other keys keep working: {}", still.text);

    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");
    println!("authorization matrix: {} operations, {checked} requests checked", ops.len());

    let text = log.text();
    assert!(text.lines().count() > 100, "the log was captured ({} lines)", text.lines().count());
    for key in [SHOP_KEY, WAREHOUSE_KEY, CARRIER_KEY, OPS_KEY, VIEWER_KEY, WRONG_KEY] {
        assert!(!text.contains(key), "the key {key} appears in the log");
        let hash = hash_key(key);
        let hex = hash.trim_start_matches("sha256:");
        assert!(!text.contains(hex), "the hash of {key} appears in the log");
    }
    assert!(!text.contains("Bearer "), "an Authorization header appears in the log");
}
