//! End to end over HTTP: idempotency keys on the real routes, and bad input
//! of every kind answered with a 4xx `application/problem+json`, never a 5xx.

mod support;

use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

fn keyed(api: &Api, path: &str, key: &str, idempotency_key: &str, body: &Value) -> reqwest::RequestBuilder {
    api.request(Method::POST, path, Some(key)).header("Idempotency-Key", idempotency_key).json(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replays_the_original_answer() {
    let app = TestApp::spawn().await;
    app.stock("SKU-IDEM", 100).await;
    let body = order_body("SKU-IDEM", 2, "10.00");

    let first = app.send(keyed(&app.api, "/v1/orders", SHOP_KEY, "order-1", &body)).await.expect("answered");
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let again = app.send(keyed(&app.api, "/v1/orders", SHOP_KEY, "order-1", &body)).await.expect("answered");
    assert_eq!(again.status, first.status);
    assert_eq!(again.text, first.text, "the original response, byte for byte");
    assert_eq!(again.headers["location"], first.headers["location"]);
    assert_eq!(again.headers.get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));

    let other_body = order_body("SKU-IDEM", 3, "10.00");
    let reused = app.send(keyed(&app.api, "/v1/orders", SHOP_KEY, "order-1", &other_body)).await.expect("answered");
    reused.assert_problem(422);
    let other_path = app
        .send(keyed(&app.api, "/v1/holds", SHOP_KEY, "order-1", &json!({"sku": "SKU-IDEM", "qty": 1})))
        .await
        .expect("answered");
    other_path.assert_problem(422);

    // Many retries at once: one order, every answer the original or "in flight, retry".
    let racing: Vec<_> = (0..16)
        .map(|_| {
            let api = app.api.clone();
            let body = order_body("SKU-IDEM", 1, "10.00");
            tokio::spawn(async move {
                api.send(keyed(&api, "/v1/orders", SHOP_KEY, "order-2", &body)).await.expect("answered")
            })
        })
        .collect();
    let mut created = Vec::new();
    for r in racing {
        let r = r.await.expect("racer");
        match r.status {
            StatusCode::CREATED => created.push(r.text),
            StatusCode::CONFLICT => r.assert_problem(409),
            other => panic!("concurrent retry answered {other}: {}", r.text),
        }
    }
    assert!(!created.is_empty());
    assert!(created.windows(2).all(|w| w[0] == w[1]), "every 201 is the same answer");

    let orders = app.all_orders(None).await;
    assert_eq!(orders.len(), 2, "one order per key: {orders:#?}");
    assert!(orders.iter().any(|o| o["id"] == first.body["id"]));

    // Other mutating routes: a repeated receipt is received once.
    let receipt = json!({"location": WAREHOUSE, "sku": "SKU-IDEM", "qty": 5});
    for _ in 0..3 {
        let r = app
            .send(keyed(&app.api, "/v1/inventory/receipts", WAREHOUSE_KEY, "receipt-1", &receipt))
            .await
            .expect("answered");
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    app.wait_quiet().await;
    let inv = app.inventory("SKU-IDEM").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["on_hand"], 105, "{inv}");
    // The same key from another principal is another key.
    let as_ops =
        app.send(keyed(&app.api, "/v1/orders/x/cancel", OPS_KEY, "order-1", &json!({}))).await.expect("answered");
    as_ops.assert_problem(404);
    let bad_key = app.send(keyed(&app.api, "/v1/orders", SHOP_KEY, &"k".repeat(300), &body)).await.expect("answered");
    bad_key.assert_problem(400);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_client_problem_never_a_server_error() {
    let app = TestApp::spawn().await;
    app.stock("SKU-IN", 10).await;
    let api = &app.api;
    let raw = |method: Method, path: &str, key: Option<&str>, content_type: Option<&str>, body: Vec<u8>| {
        // A fresh connection per case: a refused request may leave its
        // connection closed by the server, and a pooled reuse of it would
        // fail in the client, not in the server under test.
        let mut rb = api.request(method, path, key).header(reqwest::header::CONNECTION, "close").body(body);
        if let Some(ct) = content_type {
            rb = rb.header(CONTENT_TYPE, ct);
        }
        rb
    };
    let json_ct = Some("application/json");
    let line = |qty: Value, price: Value| {
        json!({"customer": {"id": "c-1", "email": "c@example.com"}, "ship_to": {"zone": ZONE},
               "lines": [{"sku": "SKU-IN", "qty": qty, "unit_price": price}]})
    };
    let mut with_extra = order_body("SKU-IN", 1, "1.00");
    with_extra["coupon"] = json!("FREE");
    let mut with_extra_line = order_body("SKU-IN", 1, "1.00");
    with_extra_line["lines"][0]["discount"] = json!("1.00");
    let mut with_extra_customer = order_body("SKU-IN", 1, "1.00");
    with_extra_customer["customer"]["vip"] = json!(true);
    let many_lines: Vec<Value> =
        (0..101).map(|i| json!({"sku": format!("S{i}"), "qty": 1, "unit_price": "1.00"})).collect();
    let mut too_many = order_body("SKU-IN", 1, "1.00");
    too_many["lines"] = json!(many_lines);
    let mut no_lines = order_body("SKU-IN", 1, "1.00");
    no_lines["lines"] = json!([]);
    let mut backwards_window = order_body("SKU-IN", 1, "1.00");
    backwards_window["delivery_window"] = json!({"start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z"});
    let mut long_email = order_body("SKU-IN", 1, "1.00");
    long_email["customer"]["email"] = json!(format!("{}@example.com", "a".repeat(300)));
    let mut bad_priority = order_body("SKU-IN", 1, "1.00");
    bad_priority["priority"] = json!("yesterday");
    let mut missing = order_body("SKU-IN", 1, "1.00");
    missing.as_object_mut().expect("object").remove("ship_to");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!("{{\"customer\":{{\"id\":\"c\",\"email\":\"{}\"}}}}", "x".repeat(70_000));
    let long_id = "o".repeat(65);

    let bodies: Vec<(&str, Value)> = vec![
        ("negative qty", line(json!(-1), json!("1.00"))),
        ("zero qty", line(json!(0), json!("1.00"))),
        ("qty too large", line(json!(10_001), json!("1.00"))),
        ("qty beyond u32", line(json!(5_000_000_000u64), json!("1.00"))),
        ("qty as text", line(json!("two"), json!("1.00"))),
        ("fractional qty", line(json!(1.5), json!("1.00"))),
        ("price as float", line(json!(1), json!(19.99))),
        ("negative price", line(json!(1), json!("-1.00"))),
        ("price not a number", line(json!(1), json!("abc"))),
        ("price with 3 decimals", line(json!(1), json!("1.001"))),
        ("unknown top-level field", with_extra),
        ("unknown line field", with_extra_line),
        ("unknown customer field", with_extra_customer),
        ("101 lines", too_many),
        ("no lines", no_lines),
        ("window ends before it starts", backwards_window),
        ("e-mail too long", long_email),
        ("unknown priority", bad_priority),
        ("missing ship_to", missing),
        ("array instead of object", json!([1, 2, 3])),
        ("null", Value::Null),
    ];
    for (what, body) in bodies {
        let r = api.post("/v1/orders", SHOP_KEY, &body).await;
        assert!(r.status.is_client_error(), "{what}: expected 4xx, got {}: {}", r.status, r.text);
        r.assert_client_problem();
    }

    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("malformed JSON", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), json_ct, b"{\"customer\":".to_vec()), 400),
        ("not UTF-8", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), json_ct, vec![0xff, 0xfe, 0x00]), 400),
        ("deeply nested", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), json_ct, deep.into_bytes()), 400), // json-too-deep: nesting is capped at 32 levels
        ("empty body", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), json_ct, Vec::new()), 400),
        ("huge body", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), json_ct, huge.into_bytes()), 413),
        ("text/plain", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), Some("text/plain"), b"{}".to_vec()), 415),
        ("no content type", raw(Method::POST, "/v1/orders", Some(SHOP_KEY), None, b"{}".to_vec()), 415),
        ("missing key", raw(Method::POST, "/v1/orders", None, json_ct, b"{}".to_vec()), 401),
        ("missing key on a read", raw(Method::GET, "/v1/orders", None, None, Vec::new()), 401),
        ("wrong key", raw(Method::GET, "/v1/orders", Some("ok_not_a_key"), None, Vec::new()), 401),
        ("wrong role: viewer orders", raw(Method::POST, "/v1/orders", Some(VIEWER_KEY), json_ct, b"{}".to_vec()), 403),
        (
            "wrong role: shop receives",
            raw(Method::POST, "/v1/inventory/receipts", Some(SHOP_KEY), json_ct, b"{}".to_vec()),
            403,
        ),
        (
            "wrong role: warehouse edits locations",
            raw(Method::PUT, "/v1/locations/X", Some(WAREHOUSE_KEY), json_ct, b"{}".to_vec()),
            403,
        ),
        (
            "wrong role: carrier picks",
            raw(Method::GET, "/v1/picks/next?location=WH-EU-1", Some(CARRIER_KEY), None, Vec::new()),
            403,
        ),
        ("unknown SKU", raw(Method::GET, "/v1/inventory/NO-SUCH-SKU", Some(VIEWER_KEY), None, Vec::new()), 404),
        ("invalid SKU", raw(Method::GET, "/v1/inventory/bad%20sku", Some(VIEWER_KEY), None, Vec::new()), 404),
        ("unknown order", raw(Method::GET, "/v1/orders/o-nope", Some(VIEWER_KEY), None, Vec::new()), 404),
        ("invalid order id", raw(Method::GET, "/v1/orders/bad%20id", Some(VIEWER_KEY), None, Vec::new()), 404),
        (
            "over-long order id",
            raw(Method::GET, &format!("/v1/orders/{long_id}"), Some(VIEWER_KEY), None, Vec::new()),
            404,
        ),
        (
            "events of an unknown order",
            raw(Method::GET, "/v1/orders/o-nope/events", Some(VIEWER_KEY), None, Vec::new()),
            404,
        ),
        (
            "cancel an unknown order",
            raw(Method::POST, "/v1/orders/o-nope/cancel", Some(SHOP_KEY), None, Vec::new()),
            404,
        ),
        (
            "cancel with a bad body",
            raw(Method::POST, "/v1/orders/o-nope/cancel", Some(SHOP_KEY), json_ct, b"{\"why\":1}".to_vec()),
            400,
        ),
        ("unknown shipment", raw(Method::GET, "/v1/shipments/s-nope", Some(VIEWER_KEY), None, Vec::new()), 404),
        (
            "invalid shipment id",
            raw(Method::POST, "/v1/shipments/%E2%9C%93/delivered", Some(CARRIER_KEY), None, Vec::new()),
            404,
        ),
        (
            "delivery of an unknown shipment",
            raw(Method::POST, "/v1/shipments/s-nope/delivered", Some(CARRIER_KEY), None, Vec::new()),
            404,
        ),
        ("unknown state filter", raw(Method::GET, "/v1/orders?state=lost", Some(VIEWER_KEY), None, Vec::new()), 422),
        ("limit 0", raw(Method::GET, "/v1/orders?limit=0", Some(VIEWER_KEY), None, Vec::new()), 422),
        ("limit too large", raw(Method::GET, "/v1/orders?limit=100000", Some(VIEWER_KEY), None, Vec::new()), 422),
        ("limit not a number", raw(Method::GET, "/v1/orders?limit=ten", Some(VIEWER_KEY), None, Vec::new()), 400),
        ("unknown query parameter", raw(Method::GET, "/v1/orders?colour=red", Some(VIEWER_KEY), None, Vec::new()), 400),
        ("next pick without location", raw(Method::GET, "/v1/picks/next", Some(WAREHOUSE_KEY), None, Vec::new()), 400),
        (
            "next pick at an invalid location",
            raw(Method::GET, "/v1/picks/next?location=a%20b", Some(WAREHOUSE_KEY), None, Vec::new()),
            404,
        ),
        ("unknown route", raw(Method::GET, "/v1/nothing-here", Some(VIEWER_KEY), None, Vec::new()), 404),
        ("wrong method", raw(Method::DELETE, "/v1/orders", Some(OPS_KEY), None, Vec::new()), 405),
    ];
    for (what, rb, status) in cases {
        let r = api.send(rb).await.unwrap_or_else(|e| panic!("{what}: no answer: {e:#}"));
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text);
        r.assert_client_problem();
    }

    let posts: Vec<(&str, &str, &str, Value)> = vec![
        (
            "receipt of 0",
            "/v1/inventory/receipts",
            WAREHOUSE_KEY,
            json!({"location": WAREHOUSE, "sku": "SKU-IN", "qty": 0}),
        ),
        (
            "receipt of -5",
            "/v1/inventory/receipts",
            WAREHOUSE_KEY,
            json!({"location": WAREHOUSE, "sku": "SKU-IN", "qty": -5}),
        ),
        (
            "receipt at an unknown location",
            "/v1/inventory/receipts",
            WAREHOUSE_KEY,
            json!({"location": "WH-NOPE", "sku": "SKU-IN", "qty": 5}),
        ),
        (
            "receipt of an invalid SKU",
            "/v1/inventory/receipts",
            WAREHOUSE_KEY,
            json!({"location": WAREHOUSE, "sku": "a b", "qty": 5}),
        ),
        (
            "adjustment of 0",
            "/v1/inventory/adjustments",
            OPS_KEY,
            json!({"sku": "SKU-IN", "location": WAREHOUSE, "delta": 0, "reason": "x"}),
        ),
        (
            "adjustment below zero",
            "/v1/inventory/adjustments",
            OPS_KEY,
            json!({"sku": "SKU-IN", "location": WAREHOUSE, "delta": -1000, "reason": "x"}),
        ),
        ("hold of 0", "/v1/holds", SHOP_KEY, json!({"sku": "SKU-IN", "qty": 0})),
        ("hold beyond stock", "/v1/holds", SHOP_KEY, json!({"sku": "SKU-IN", "qty": 10_000})),
        (
            "package without picks",
            "/v1/packages",
            WAREHOUSE_KEY,
            json!({"order_id": "o-x", "location": WAREHOUSE, "pick_ids": []}),
        ),
        (
            "package of unknown picks",
            "/v1/packages",
            WAREHOUSE_KEY,
            json!({"order_id": "o-x", "location": WAREHOUSE, "pick_ids": ["p-x"]}),
        ),
        (
            "short without reason",
            "/v1/picks/p-x/short",
            WAREHOUSE_KEY,
            json!({"instruction_key": "k", "qty_found": 0, "reason": " "}),
        ),
        ("confirm of 0", "/v1/picks/p-x/confirm", WAREHOUSE_KEY, json!({"instruction_key": "k", "qty": 0})),
        (
            "confirm of an unknown pick",
            "/v1/picks/p-x/confirm",
            WAREHOUSE_KEY,
            json!({"instruction_key": "k", "qty": 1}),
        ),
    ];
    for (what, path, key, body) in posts {
        let r = api.post(path, key, &body).await;
        assert!(r.status.is_client_error(), "{what}: expected 4xx, got {}: {}", r.status, r.text);
        r.assert_client_problem();
    }
    let bad_kind = api.put("/v1/locations/WH-X", OPS_KEY, &json!({"zone": ZONE, "kind": "castle"})).await;
    bad_kind.assert_problem(422);
    let bad_location = api.put("/v1/locations/bad%20id", OPS_KEY, &json!({"zone": ZONE, "kind": "warehouse"})).await;
    bad_location.assert_client_problem();

    // Nothing above changed anything, and the engine still serves.
    app.wait_quiet().await;
    assert_eq!(app.all_orders(None).await.len(), 0, "no bad request created an order");
    let inv = app.inventory("SKU-IN").await;
    assert_eq!(at_location(&inv, WAREHOUSE)["on_hand"], 10, "{inv}");
    assert_eq!(app.get("/readyz", VIEWER_KEY).await.status, StatusCode::OK);
    let ok = app.order("SKU-IN", 1, "1.00").await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
    app.stop().await;
}
