//! The OpenAPI document against the code it describes: it is valid OpenAPI
//! 3.1 (checked with the official meta-schema, vendored in `api/meta/`),
//! every `$ref` resolves, it documents exactly the routes `routes.rs`
//! registers, every documented operation reaches a handler, and the real
//! engine's responses — successes and problems — match the documented status
//! codes, media types and schemas. Response schemas are checked strictly
//! (an undocumented field fails), so the document cannot drift from the
//! serde shapes.

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use orderly_engine::app::Engine;
use orderly_engine::config::{ApiKey, AuthSettings, Settings, ZoneRoute};
use orderly_engine::engine::{Adapters, SERVICES};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::{CarrierApi, CarrierCallError, Label, LabelRequest, SeededRng, Store, SystemClock};
use orderly_http::auth::hash_key;
use orderly_http::openapi::OPENAPI_JSON;
use orderly_http::routes::{AppState, router};
use orderly_http::{HttpLayers, Idempotency, IdempotencyConfig, KeyRing, Limits, SharedKeyRing};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// The OpenAPI 3.1 meta-schema (OAI, Apache-2.0), `$id`
/// `https://spec.openapis.org/oas/3.1/schema/2022-10-07`.
const OAS_3_1_SCHEMA: &str = include_str!("../api/meta/oas-3.1-schema.json");
const ROUTES_RS: &str = include_str!("../src/routes.rs");
const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];
const WAIT_MAX: Duration = Duration::from_secs(10);
const RATES: &str = "version,2026-11-01.1\ncarrier,zone,max_weight_g,price\nfast,EU,50000,5.00\nslow,EU,50000,7.50\n";

const OPS: &str = "ok_openapi_ops";
const SHOP: &str = "ok_openapi_shop";
const WAREHOUSE: &str = "ok_openapi_warehouse";
const CARRIER: &str = "ok_openapi_carrier";
const VIEWER: &str = "ok_openapi_viewer";

fn doc() -> Value {
    serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON")
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let doc = doc();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "openapi: {}", doc["openapi"]);
    let meta: Value = serde_json::from_str(OAS_3_1_SCHEMA).expect("meta-schema is JSON");
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&meta)
        .expect("the OpenAPI 3.1 meta-schema compiles");
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "not valid OpenAPI 3.1:\n{}", errors.join("\n"));
}

#[test]
fn the_checks_themselves_catch_drift() {
    let meta: Value = serde_json::from_str(OAS_3_1_SCHEMA).expect("meta-schema is JSON");
    let validator = jsonschema::validator_for(&meta).expect("compiles");
    let mut broken = doc();
    broken["paths"]["/healthz"]["get"]["responses"] = json!({"200": {"content": {}}});
    assert!(!validator.is_valid(&broken), "a response without a description is invalid OpenAPI");

    let strict = Schemas::new(&doc(), true);
    let location = json!({"id": "WH-1", "zone": "EU", "kind": "warehouse"});
    assert!(strict.errors(&component_ref("Location"), &location).is_empty());
    let extra = json!({"id": "WH-1", "zone": "EU", "kind": "warehouse", "new_field": 1});
    assert!(!strict.errors(&component_ref("Location"), &extra).is_empty(), "an undocumented field fails");
    let wrong = json!({"id": "WH 1", "zone": "EU", "kind": "depot"});
    assert_eq!(strict.errors(&component_ref("Location"), &wrong).len(), 2, "a bad id and an unknown kind fail");
    let time = json!("yesterday");
    assert!(!strict.errors(&component_ref("Timestamp"), &time).is_empty(), "formats are checked");
}

#[test]
fn every_component_schema_compiles_as_json_schema_2020_12() {
    let doc = doc();
    let schemas = doc["components"]["schemas"].as_object().expect("components.schemas");
    for name in schemas.keys() {
        Schemas::new(&doc, false).validator(&component_ref(name));
    }
}

#[test]
fn every_ref_resolves() {
    let doc = doc();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 50, "expected many refs, found {}", refs.len());
    for r in refs {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("only local refs: {r}"));
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

#[test]
fn the_document_lists_exactly_the_routes_of_routes_rs() {
    let in_source = routes_in_source();
    assert!(in_source.len() >= 25, "parsed too few routes from routes.rs: {in_source:?}");
    let documented: BTreeMap<String, BTreeSet<String>> =
        operations(&doc()).into_iter().fold(BTreeMap::new(), |mut m, (path, method, _)| {
            m.entry(path).or_default().insert(method);
            m
        });
    assert_eq!(documented, in_source, "openapi.json paths (left) differ from routes.rs (right)");
}

#[test]
fn every_operation_is_complete() {
    let doc = doc();
    let mut ids = BTreeSet::new();
    for (path, method, op) in operations(&doc) {
        let at = format!("{method} {path}");
        let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{at}: operationId"));
        assert!(ids.insert(id.to_owned()), "{at}: duplicate operationId {id}");
        assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{at}: tags");
        assert!(op["summary"].is_string(), "{at}: summary");
        let security = op["security"].as_array().unwrap_or_else(|| panic!("{at}: explicit security"));
        let open = !path.starts_with("/v1/");
        assert_eq!(security.is_empty(), open, "{at}: /v1 needs a key, nothing else does");
        let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{at}: responses"));
        assert!(responses.keys().any(|s| s.starts_with('2')), "{at}: a success response");
        for (status, response) in responses {
            let response = deref(&doc, response);
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/problem+json"]["schema"];
                assert_eq!(schema["$ref"], "#/components/schemas/Problem", "{at} {status}: problem+json");
            }
        }
        if !open {
            for status in ["401", "429", "503"] {
                assert!(responses.contains_key(status), "{at}: documents {status}");
            }
        }
        if method != "get" {
            for status in ["400", "409", "422"] {
                assert!(responses.contains_key(status), "{at}: documents {status} (idempotency keys)");
            }
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            assert!(
                params.iter().any(|p| p["$ref"] == "#/components/parameters/IdempotencyKey"),
                "{at}: takes an Idempotency-Key"
            );
        }
        if op.get("requestBody").is_some_and(|b| b["content"].get("application/json").is_some()) {
            for status in ["400", "413", "415", "422"] {
                assert!(responses.contains_key(status), "{at}: a JSON body documents {status}");
            }
        }
        for name in path_params(&path) {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let declared = params.iter().map(|p| deref(&doc, p)).any(|p| p["in"] == "path" && p["name"] == name);
            assert!(declared, "{at}: path parameter {name} declared");
        }
    }
}

#[test]
fn request_bodies_match_the_rust_structs() {
    // deny_unknown_fields structs are closed; the order request is not.
    let doc = doc();
    let schemas = &doc["components"]["schemas"];
    for closed in [
        "LocationRequest",
        "ReceiptRequest",
        "AdjustmentRequest",
        "CycleCountRequest",
        "HoldRequest",
        "ReasonRequest",
        "ReturnReceivedRequest",
        "ConfirmPickRequest",
        "ShortPickRequest",
        "PackageRequest",
    ] {
        assert_eq!(schemas[closed]["additionalProperties"], false, "{closed} is deny_unknown_fields");
    }
    let required = |name: &str| -> Vec<&str> {
        schemas[name]["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
    };
    assert_eq!(required("OrderRequest"), ["customer", "ship_to", "lines"]);
    assert_eq!(required("HoldRequest"), ["sku", "qty"]);
    assert!(required("ReasonRequest").is_empty());
    assert_eq!(required("AdjustmentRequest"), ["sku", "location", "delta", "reason"]);
}

#[test]
fn shapes_the_walk_cannot_reach_match_their_schemas() {
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_domain::shipping::BreakerState;
    let strict = Schemas::new(&doc(), true);
    let envelope = Envelope::new(
        "01a217a4-099f-7915-a341-6f73aaab06d1".into(),
        "/orderly/inventory",
        EventType::parse("orderly.inventory.backordered"),
        "o-1",
        Timestamp(1_764_150_000_000),
        3,
        json!({"order_id": "o-1"}),
    );
    let dead_letter = orderly_engine::runtime::DeadLetter {
        id: envelope.id.clone(),
        consumer: "orders".into(),
        producer: "inventory".into(),
        error: "poison: …".into(),
        attempts: 3,
        failed_at: Timestamp(1_764_150_000_500),
        envelope,
    };
    let list = json!({"dead_letters": [serde_json::to_value(&dead_letter).expect("serializes")]});
    let breakers = [
        BreakerState::Closed { consecutive_failures: 2 },
        BreakerState::Open { until: Timestamp(1_764_150_030_000) },
        BreakerState::HalfOpen { probe_in_flight: true },
    ];
    let mut cases = vec![("DeadLetterList", list)];
    cases.extend(breakers.iter().map(|b| ("BreakerState", serde_json::to_value(b).expect("serializes"))));
    for (name, value) in cases {
        let errors = strict.errors(&component_ref(name), &value);
        assert!(errors.is_empty(), "{name}: {}\n{value:#}", errors.join("\n"));
    }
}

#[tokio::test]
async fn every_documented_operation_reaches_a_handler() {
    let api = Api::start().await;
    for (path, method, _) in operations(&api.schemas.doc) {
        let uri = path.replace("{id}", "X-1").replace("{sku}", "SKU-X");
        let uri = if path == "/v1/picks/next" { format!("{uri}?location=WH-X") } else { uri };
        let response = api.raw(&method, &uri, Some(OPS), None, None).await;
        let not_routed = response.status == StatusCode::METHOD_NOT_ALLOWED
            || (response.status == StatusCode::NOT_FOUND
                && response.body["detail"].as_str().is_some_and(|d| d.starts_with("no route for")));
        assert!(!not_routed, "{method} {uri} is documented but not routed: {}", response.body);
    }
    api.engine.shutdown().await;
}

#[tokio::test]
async fn real_responses_match_the_documented_schemas() {
    let api = Api::start().await;
    probes_and_meta(&api).await;
    let order_id = stock_and_order(&api).await;
    let shipment_id = pick_pack_ship(&api, &order_id).await;
    deliver_and_return(&api, &order_id, &shipment_id).await;
    short_and_cancel(&api).await;
    ops_endpoints(&api).await;
    problems(&api).await;
    let seen = api.checked.lock().expect("not poisoned").clone();
    for must in ["createOrder 201", "confirmPick 200", "getShipment 200", "getSummary 200", "nextPick 204"] {
        assert!(seen.contains(must), "the walk did not check {must}: {seen:?}");
    }
    api.engine.shutdown().await;
}

async fn probes_and_meta(api: &Api) {
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"] {
        api.call("GET", path, None, None, StatusCode::OK).await;
    }
    let served = api.call("GET", "/openapi.json", None, None, StatusCode::OK).await;
    assert_eq!(served, api.schemas.doc, "/openapi.json serves the embedded document");
}

async fn stock_and_order(api: &Api) -> String {
    let loc = json!({"zone": "EU", "kind": "warehouse"});
    api.call("PUT", "/v1/locations/WH-EU-1", Some(OPS), Some(loc), StatusCode::OK).await;
    api.call(
        "PUT",
        "/v1/locations/WH-EMPTY",
        Some(OPS),
        Some(json!({"zone": "US", "kind": "dropship"})),
        StatusCode::OK,
    )
    .await;
    api.call("GET", "/v1/locations", Some(VIEWER), None, StatusCode::OK).await;
    let receipt = json!({"location": "WH-EU-1", "sku": "SKU-1", "qty": 100});
    api.call("POST", "/v1/inventory/receipts", Some(WAREHOUSE), Some(receipt), StatusCode::CREATED).await;
    let count = json!({"sku": "SKU-1", "location": "WH-EU-1", "counted": 100});
    api.call("POST", "/v1/inventory/cycle-counts", Some(WAREHOUSE), Some(count), StatusCode::CREATED).await;
    let adjust = json!({"sku": "SKU-1", "location": "WH-EU-1", "delta": 5, "reason": "found a box"});
    api.call("POST", "/v1/inventory/adjustments", Some(OPS), Some(adjust), StatusCode::CREATED).await;
    api.call("GET", "/v1/inventory/SKU-1", Some(VIEWER), None, StatusCode::OK).await;
    let hold =
        api.call("POST", "/v1/holds", Some(SHOP), Some(json!({"sku": "SKU-1", "qty": 1})), StatusCode::CREATED).await;
    let mut order = order_body("SKU-1", 1, "19.99");
    order["hold_ids"] = json!([hold["id"]]);
    order["delivery_window"] = json!({"start": "2030-01-01T08:00:00Z", "end": "2030-01-01T18:00:00Z"});
    let created = api.call("POST", "/v1/orders", Some(SHOP), Some(order), StatusCode::CREATED).await;
    let id = created["id"].as_str().expect("an order id").to_owned();
    api.call("GET", &format!("/v1/orders/{id}"), Some(VIEWER), None, StatusCode::OK).await;
    api.call("GET", "/v1/orders?limit=1", Some(VIEWER), None, StatusCode::OK).await;
    api.call("GET", "/v1/orders?state=canceled", Some(VIEWER), None, StatusCode::OK).await;
    api.call("GET", &format!("/v1/orders/{id}/events"), Some(VIEWER), None, StatusCode::OK).await;
    id
}

async fn pick_pack_ship(api: &Api, order_id: &str) -> String {
    api.call("GET", "/v1/picks/next?location=WH-EMPTY", Some(WAREHOUSE), None, StatusCode::NO_CONTENT).await;
    let task = api.next_pick().await;
    let confirm = json!({"instruction_key": task["instruction_key"], "qty": task["qty"]});
    let path = format!("/v1/picks/{}/confirm", task["id"].as_str().expect("pick id"));
    let done = api.call("POST", &path, Some(WAREHOUSE), Some(confirm.clone()), StatusCode::OK).await;
    assert_eq!(done["duplicate"], false);
    let again = api.call("POST", &path, Some(WAREHOUSE), Some(confirm), StatusCode::OK).await;
    assert_eq!(again["duplicate"], true);
    let pack = json!({"order_id": order_id, "location": "WH-EU-1", "pick_ids": [task["id"]]});
    api.eventually("POST", "/v1/packages", WAREHOUSE, Some(pack), StatusCode::CREATED).await;
    let order = api.wait_for_order(order_id, |o| o["shipments"].as_array().is_some_and(|s| !s.is_empty())).await;
    let shipment_id = order["shipments"][0]["shipment_id"].as_str().expect("shipment id").to_owned();
    let shipment = api.call("GET", &format!("/v1/shipments/{shipment_id}"), Some(VIEWER), None, StatusCode::OK).await;
    assert!(shipment["label_created_at"].is_string(), "labeled: {shipment}");
    shipment_id
}

async fn deliver_and_return(api: &Api, order_id: &str, shipment_id: &str) {
    let path = format!("/v1/shipments/{shipment_id}/delivered");
    api.call("POST", &path, Some(CARRIER), None, StatusCode::OK).await;
    api.wait_for_order(order_id, |o| o["state"] == "delivered").await;
    let reason = json!({"reason": "too small"});
    api.call("POST", &format!("/v1/orders/{order_id}/return"), Some(SHOP), Some(reason), StatusCode::OK).await;
    let received = json!({"location": "WH-EU-1"});
    let path = format!("/v1/orders/{order_id}/return/received");
    api.call("POST", &path, Some(WAREHOUSE), Some(received), StatusCode::OK).await;
}

async fn short_and_cancel(api: &Api) {
    let created =
        api.call("POST", "/v1/orders", Some(SHOP), Some(order_body("SKU-1", 2, "5.00")), StatusCode::CREATED).await;
    let order_id = created["id"].as_str().expect("id").to_owned();
    let task = api.next_pick().await;
    assert_eq!(task["order_id"], order_id.as_str());
    let short = json!({"instruction_key": task["instruction_key"], "qty_found": 1, "reason": "one broken"});
    let path = format!("/v1/picks/{}/short", task["id"].as_str().expect("pick id"));
    api.call("POST", &path, Some(WAREHOUSE), Some(short), StatusCode::OK).await;

    let created =
        api.call("POST", "/v1/orders", Some(SHOP), Some(order_body("SKU-1", 1, "5.00")), StatusCode::CREATED).await;
    let path = format!("/v1/orders/{}/cancel", created["id"].as_str().expect("id"));
    api.call("POST", &path, Some(SHOP), None, StatusCode::OK).await;
}

async fn ops_endpoints(api: &Api) {
    api.call("GET", "/v1/ops/summary", Some(VIEWER), None, StatusCode::OK).await;
    api.call("GET", "/v1/ops/dead-letters?limit=10", Some(VIEWER), None, StatusCode::OK).await;
    api.call("POST", "/v1/ops/dead-letters/replay", Some(OPS), None, StatusCode::OK).await;
    api.call("POST", "/v1/ops/dead-letters/d-missing/replay", Some(OPS), None, StatusCode::NOT_FOUND).await;
    api.call("POST", "/v1/ops/dead-letters/d-missing/discard", Some(OPS), None, StatusCode::NOT_FOUND).await;
    api.call("GET", "/v1/ops/reconcile/last", Some(VIEWER), None, StatusCode::NOT_FOUND).await;
    api.call("POST", "/v1/ops/reconcile", Some(VIEWER), None, StatusCode::FORBIDDEN).await;
    api.call("POST", "/v1/ops/reconcile", Some(OPS), None, StatusCode::OK).await;
    api.call("GET", "/v1/ops/reconcile/last", Some(VIEWER), None, StatusCode::OK).await;
    api.call("GET", "/v1/ops/summary", Some(VIEWER), None, StatusCode::OK).await;
    api.call("GET", "/v1/ops/carrier-rates", Some(VIEWER), None, StatusCode::OK).await;
    let newer = RATES.replace("2026-11-01.1", "2026-11-02.1");
    let response = api.raw("PUT", "/v1/ops/carrier-rates", Some(OPS), Some("text/csv"), Some(newer.into_bytes())).await;
    api.check("PUT", "/v1/ops/carrier-rates", &response, StatusCode::OK);
}

async fn problems(api: &Api) {
    let order = Some(order_body("SKU-1", 1, "1.00"));
    api.call("POST", "/v1/orders", None, order.clone(), StatusCode::UNAUTHORIZED).await;
    api.call("POST", "/v1/orders", Some(VIEWER), order.clone(), StatusCode::FORBIDDEN).await;
    api.call("POST", "/v1/orders", Some(WAREHOUSE), order, StatusCode::FORBIDDEN).await;
    api.call("GET", "/v1/orders/o-missing", Some(VIEWER), None, StatusCode::NOT_FOUND).await;
    api.call("GET", "/v1/inventory/bad%20sku", Some(VIEWER), None, StatusCode::NOT_FOUND).await;
    api.call("GET", "/v1/orders?state=lost", Some(VIEWER), None, StatusCode::UNPROCESSABLE_ENTITY).await;
    api.call("GET", "/v1/orders?limit=x", Some(VIEWER), None, StatusCode::BAD_REQUEST).await;
    api.call("GET", "/v1/picks/next", Some(WAREHOUSE), None, StatusCode::BAD_REQUEST).await;
    let json = Some("application/json");
    let r = api.raw("POST", "/v1/holds", Some(SHOP), json, Some(b"{".to_vec())).await;
    api.check("POST", "/v1/holds", &r, StatusCode::BAD_REQUEST);
    let r = api.raw("POST", "/v1/holds", Some(SHOP), None, Some(br#"{"sku":"SKU-1","qty":1}"#.to_vec())).await;
    api.check("POST", "/v1/holds", &r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = api.raw("POST", "/v1/holds", Some(SHOP), json, Some(vec![b' '; 70_000])).await;
    api.check("POST", "/v1/holds", &r, StatusCode::PAYLOAD_TOO_LARGE);
    let unknown_field = json!({"sku": "SKU-1", "qty": 1, "colour": "red"});
    api.call("POST", "/v1/holds", Some(SHOP), Some(unknown_field), StatusCode::UNPROCESSABLE_ENTITY).await;
    let too_many = json!({"sku": "SKU-1", "qty": 10_000});
    api.call("POST", "/v1/holds", Some(SHOP), Some(too_many), StatusCode::CONFLICT).await;
    let sync_short = order_body("SKU-NONE", 5, "500.00");
    api.call("POST", "/v1/orders", Some(SHOP), Some(sync_short), StatusCode::CONFLICT).await;
    let delivered_unlabeled = "/v1/shipments/s-unknown/delivered";
    api.call("POST", delivered_unlabeled, Some(CARRIER), None, StatusCode::NOT_FOUND).await;
    let first = api.keyed("POST", "/v1/holds", json!({"sku": "SKU-1", "qty": 1}), "k-1").await;
    api.check("POST", "/v1/holds", &first, StatusCode::CREATED);
    let reused = api.keyed("POST", "/v1/holds", json!({"sku": "SKU-1", "qty": 2}), "k-1").await;
    api.check("POST", "/v1/holds", &reused, StatusCode::UNPROCESSABLE_ENTITY);
}

fn order_body(sku: &str, qty: u32, price: &str) -> Value {
    json!({
        "customer": {"id": "c-1", "email": "ada@example.com"},
        "ship_to": {"zone": "EU"},
        "priority": "same_day",
        "lines": [{"sku": sku, "qty": qty, "unit_price": price}],
    })
}

// ------------------------------------------------------------------ the app

/// The real router and engine over memory stores, a fake carrier pair and
/// one key per role; calls go through the full layer stack in process.
struct Api {
    router: Router,
    engine: Arc<Engine>,
    schemas: Schemas,
    checked: Mutex<BTreeSet<String>>,
}

/// One answer: status, content type and the body (JSON, or a string).
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Value,
}

impl Api {
    async fn start() -> Api {
        let mut settings = Settings::default();
        settings.carriers.routes =
            vec![ZoneRoute { zone: "EU".into(), primary: "fast".into(), secondary: "slow".into() }];
        settings.auth = AuthSettings {
            keys: vec![
                key("ops", "ops", OPS),
                key("shop", "storefront", SHOP),
                key("wh", "warehouse", WAREHOUSE),
                key("carrier", "carrier", CARRIER),
                key("viewer", "viewer", VIEWER),
            ],
            open_probes: true,
        };
        let stores: HashMap<&'static str, Arc<dyn Store>> =
            SERVICES.iter().map(|s| (*s, Arc::new(MemoryStore::new()) as Arc<dyn Store>)).collect();
        let adapters = Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::new(11)) };
        let mut carriers: HashMap<String, Arc<dyn CarrierApi>> = HashMap::new();
        carriers.insert("fast".into(), Arc::new(FakeCarrier::default()));
        carriers.insert("slow".into(), Arc::new(FakeCarrier::default()));
        let rates = orderly_domain::shipping::rates::RateTable::parse(RATES).expect("valid rates");
        let keys = SharedKeyRing::new(KeyRing::from_settings(&settings.auth).expect("valid keys"));
        let limits = Limits::from_settings(&settings.http);
        let engine = Arc::new(
            Engine::start(settings, adapters, carriers, Some(rates), Arc::new(NoWebhook)).await.expect("engine starts"),
        );
        let idempotency = Idempotency::new(
            Arc::new(MemoryStore::new()),
            Arc::new(SystemClock),
            IdempotencyConfig { body_limit_bytes: limits.body_limit_bytes, ..IdempotencyConfig::default() },
        );
        let router = HttpLayers { keys, idempotency: Some(idempotency), limits }
            .apply(router(AppState { engine: engine.clone() }));
        Api { router, engine, schemas: Schemas::new(&doc(), true), checked: Mutex::default() }
    }

    /// Sends a request and returns the answer, unchecked.
    async fn raw(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        self.send(method, uri, token, content_type, body, None).await
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        idempotency_key: Option<&str>,
    ) -> Answer {
        let mut request = Request::builder().method(method.to_uppercase().as_str()).uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let request = request.body(body.map_or_else(Body::empty, Body::from)).expect("a valid request");
        let response = self.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let bytes = axum::body::to_bytes(response.into_body(), 4 << 20).await.expect("a readable body");
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer { status, content_type, body }
    }

    /// Sends JSON (or nothing), checks the answer against the document and
    /// that its status is `expected`, and returns the body.
    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("serializes"));
        let content_type = bytes.as_ref().map(|_| "application/json");
        let answer = self.raw(method, uri, token, content_type, bytes).await;
        self.check(method, uri, &answer, expected);
        answer.body
    }

    /// A keyed POST as the storefront.
    async fn keyed(&self, method: &str, uri: &str, body: Value, key: &str) -> Answer {
        let bytes = serde_json::to_vec(&body).expect("serializes");
        self.send(method, uri, Some(SHOP), Some("application/json"), Some(bytes), Some(key)).await
    }

    /// Checks an answer: expected status, documented for the operation, in
    /// a documented media type, with a body valid against its schema.
    fn check(&self, method: &str, uri: &str, answer: &Answer, expected: StatusCode) {
        let at = format!("{method} {uri}");
        assert_eq!(answer.status, expected, "{at}: {}", answer.body);
        let (template, op) = self.schemas.operation(method, uri).unwrap_or_else(|| panic!("{at}: not documented"));
        let op_id = op["operationId"].as_str().expect("operationId").to_owned();
        let status = answer.status.as_u16().to_string();
        let response = op["responses"]
            .get(&status)
            .map(|r| deref(&self.schemas.doc, r))
            .unwrap_or_else(|| panic!("{at} ({template}): status {status} is not documented"));
        self.checked.lock().expect("not poisoned").insert(format!("{op_id} {status}"));
        let Some(content) = response["content"].as_object() else {
            assert!(answer.body == Value::String(String::new()), "{at}: {status} documents no body");
            return;
        };
        let media = answer.content_type.split(';').next().unwrap_or_default().trim();
        let documented = content.get(media).unwrap_or_else(|| {
            panic!("{at}: {status} answered {media:?}, documented {:?}", content.keys().collect::<Vec<_>>())
        });
        let errors = self.schemas.errors(&documented["schema"], &answer.body);
        assert!(
            errors.is_empty(),
            "{at} → {status}: body does not match the schema:\n{}\n{:#}",
            errors.join("\n"),
            answer.body
        );
    }

    /// Retries a command the event flow has not caught up with yet.
    async fn eventually(
        &self,
        method: &str,
        uri: &str,
        token: &str,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let bytes = body.as_ref().map(|b| serde_json::to_vec(b).expect("serializes"));
            let answer = self.raw(method, uri, Some(token), Some("application/json"), bytes).await;
            if answer.status == expected || Instant::now() > deadline {
                self.check(method, uri, &answer, expected);
                return answer.body;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn next_pick(&self) -> Value {
        self.eventually("GET", "/v1/picks/next?location=WH-EU-1", WAREHOUSE, None, StatusCode::OK).await
    }

    async fn wait_for_order(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let order = self.call("GET", &format!("/v1/orders/{id}"), Some(VIEWER), None, StatusCode::OK).await;
            if done(&order) {
                return order;
            }
            assert!(Instant::now() < deadline, "order {id} stuck: {order:#}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn key(name: &str, role: &str, token: &str) -> ApiKey {
    ApiKey { name: name.into(), role: role.into(), hash: hash_key(token) }
}

#[derive(Default)]
struct FakeCarrier {
    labels: AtomicU64,
}

#[async_trait]
impl CarrierApi for FakeCarrier {
    async fn create_label(&self, req: &LabelRequest) -> Result<Label, CarrierCallError> {
        let n = self.labels.fetch_add(1, Ordering::SeqCst);
        Ok(Label { tracking_number: format!("{}-{n}", req.carrier), carrier: req.carrier.clone(), cost: "5.00".into() })
    }
}

struct NoWebhook;

#[async_trait]
impl orderly_engine::ports::WebhookSink for NoWebhook {
    async fn deliver(&self, _id: &str, _body: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

// ------------------------------------------------------------ the document

/// The document's schemas as JSON Schema 2020-12 validators; `strict` closes
/// every object schema that lists properties, so undocumented fields fail.
struct Schemas {
    doc: Value,
    components: Value,
    strict: bool,
}

impl Schemas {
    fn new(doc: &Value, strict: bool) -> Schemas {
        let mut components = doc["components"].clone();
        if strict {
            close_objects(&mut components);
        }
        Schemas { doc: doc.clone(), components, strict }
    }

    /// A validator for `schema`, whose refs point into the document's components.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut schema = schema.clone();
        if self.strict {
            close_objects(&mut schema);
        }
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.components,
            "allOf": [schema],
        });
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema:#}"))
    }

    fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        self.validator(schema).iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
    }

    /// The documented operation a concrete request hits.
    fn operation(&self, method: &str, uri: &str) -> Option<(String, Value)> {
        let path = uri.split('?').next().unwrap_or(uri);
        let method = method.to_lowercase();
        let paths = self.doc["paths"].as_object()?;
        let exact = paths.get(path).and_then(|item| item.get(&method)).map(|op| (path.to_owned(), op.clone()));
        exact.or_else(|| {
            paths.iter().find_map(|(template, item)| {
                let op = item.get(&method)?;
                matches_template(template, path).then(|| (template.clone(), op.clone()))
            })
        })
    }
}

fn component_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// Adds `additionalProperties: false` to every object schema that lists
/// properties and says nothing about others.
fn close_objects(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.get("properties").is_some_and(Value::is_object) && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

fn matches_template(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
}

fn deref<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
        Some(pointer) => doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {pointer}")),
        None => value,
    }
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Every (path, method, operation) of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let empty = Map::new();
    let paths = doc["paths"].as_object().unwrap_or(&empty);
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS.iter().filter_map(move |m| item.get(*m).map(|op| (path.clone(), (*m).to_owned(), op.clone())))
        })
        .collect()
}

fn path_params(path: &str) -> Vec<String> {
    path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}').map(str::to_owned)).collect()
}

/// The routes `router()` registers, read from its source: each
/// `.route("PATH", get(..).post(..))` gives a path and its methods.
fn routes_in_source() -> BTreeMap<String, BTreeSet<String>> {
    let start = ROUTES_RS.find("pub fn router").expect("routes.rs has router()");
    let body = &ROUTES_RS[start..];
    let end = body.find(".with_state(").expect("router() ends with .with_state");
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for chunk in body[..end].split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).expect("a route path literal").to_owned();
        let methods = routes.entry(path).or_default();
        for method in METHODS {
            let mut rest = chunk;
            while let Some(i) = rest.find(&format!("{method}(")) {
                let before = rest[..i].chars().next_back();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                    methods.insert(method.to_owned());
                }
                rest = &rest[i + method.len()..];
            }
        }
    }
    routes
}
