//! Shared fixtures of the end-to-end suites: the real [`orderly::Application`]
//! on port 0 over a fresh data directory (or the real binary, for crash
//! tests), API keys for every role, a local carrier simulator, an HTTP client
//! and condition polling with deadlines (never bare sleeps).

#![allow(dead_code)]

pub mod cluster;

use anyhow::{Context, Result, bail};
use orderly::{Application, RunOptions};
use orderly_carrier::sim::{LocalSim, SimConfig, spawn_local};
use orderly_http::auth::hash_key;
use orderly_store_sqlite::Durability;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The storefront's key.
pub const SHOP_KEY: &str = "ok_e2e_storefront_key";
/// The warehouse scanners' key.
pub const WAREHOUSE_KEY: &str = "ok_e2e_warehouse_key";
/// The carrier callbacks' key.
pub const CARRIER_KEY: &str = "ok_e2e_carrier_key";
/// The operations console's key.
pub const OPS_KEY: &str = "ok_e2e_ops_key";
/// The read-only dashboard's key.
pub const VIEWER_KEY: &str = "ok_e2e_viewer_key";

/// The warehouse every suite stocks.
pub const WAREHOUSE: &str = "WH-EU-1";
/// Its zone, and the customers'.
pub const ZONE: &str = "EU";

/// Longest a test waits for the engine to reach a state.
pub const WAIT: Duration = Duration::from_secs(15);

/// The `orderly.toml` of the tests: one key per role, the carrier simulator
/// (when given) for zone EU, and `extra` appended verbatim.
pub fn config_toml(carrier_url: Option<&str>, extra: &str) -> String {
    let mut toml = String::new();
    for (name, role, key) in [
        ("shop", "storefront", SHOP_KEY),
        ("scanner", "warehouse", WAREHOUSE_KEY),
        ("carrier", "carrier", CARRIER_KEY),
        ("console", "ops", OPS_KEY),
        ("dashboard", "viewer", VIEWER_KEY),
    ] {
        toml.push_str(&format!(
            "[[auth.keys]]\nname = \"{name}\"\nrole = \"{role}\"\nhash = \"{}\"\n\n",
            hash_key(key)
        ));
    }
    if let Some(url) = carrier_url {
        toml.push_str(&format!(
            "[carriers]\nendpoints = [{{ id = \"fastship\", url = \"{url}\" }}, {{ id = \"slowpost\", url = \"{url}\" }}]\n\
             routes = [{{ zone = \"{ZONE}\", primary = \"fastship\", secondary = \"slowpost\" }}]\n\n"
        ));
    }
    toml.push_str(extra);
    toml
}

/// An HTTP answer: status, headers, the body as JSON (`Null` when empty or not JSON) and as text.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Parsed body.
    pub body: Value,
    /// Raw body.
    pub text: String,
}

impl Resp {
    /// The content type, or "".
    pub fn content_type(&self) -> &str {
        self.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// Asserts a 2xx and returns the body.
    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(self.status.is_success(), "expected 2xx, got {}: {}", self.status, self.text);
        self.body
    }

    /// Asserts an RFC 9457 problem with this status (and a type and detail).
    #[track_caller]
    pub fn assert_problem(&self, status: u16) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        self.assert_client_problem();
    }

    /// Asserts a 4xx problem+json answer (never 5xx).
    #[track_caller]
    pub fn assert_client_problem(&self) {
        assert!(self.status.is_client_error(), "expected 4xx, got {}: {}", self.status, self.text);
        assert!(
            self.content_type().starts_with("application/problem+json"),
            "{} answered with content type {:?}: {}",
            self.status,
            self.content_type(),
            self.text
        );
        assert!(self.body["type"].as_str().is_some_and(|t| !t.is_empty()), "problem without type: {}", self.text);
        assert!(self.body["detail"].is_string(), "problem without detail: {}", self.text);
        assert_eq!(self.body["status"].as_u64(), Some(u64::from(self.status.as_u16())), "{}", self.text);
    }
}

/// A client of one running engine, by base URL.
#[derive(Clone, Debug)]
pub struct Api {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The HTTP client.
    pub client: reqwest::Client,
}

impl Api {
    /// A client for `addr`.
    pub fn new(addr: SocketAddr) -> Api {
        // reqwest is built with `rustls-no-provider` in this workspace (for
        // the carrier client); even a plain HTTP client needs the provider.
        orderly_carrier::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(128)
            .build()
            .expect("a plain HTTP client builds");
        Api { base: format!("http://{addr}"), client }
    }

    /// A request with `key` (if any) as bearer token.
    pub fn request(&self, method: Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, format!("{}{path}", self.base));
        match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Resp> {
        let response = rb.send().await.context("request failed")?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.context("reading the body")?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp { status, headers, body, text })
    }

    /// GET with a key.
    pub async fn get(&self, path: &str, key: &str) -> Resp {
        self.send(self.request(Method::GET, path, Some(key))).await.expect("GET answered")
    }

    /// POST a JSON body with a key.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Resp {
        self.send(self.request(Method::POST, path, Some(key)).json(body)).await.expect("POST answered")
    }

    /// POST with no body.
    pub async fn post_empty(&self, path: &str, key: &str) -> Resp {
        self.send(self.request(Method::POST, path, Some(key))).await.expect("POST answered")
    }

    /// PUT a JSON body with a key.
    pub async fn put(&self, path: &str, key: &str, body: &Value) -> Resp {
        self.send(self.request(Method::PUT, path, Some(key)).json(body)).await.expect("PUT answered")
    }

    /// Creates a location (ops).
    pub async fn location(&self, id: &str, zone: &str) {
        self.put(&format!("/v1/locations/{id}"), OPS_KEY, &json!({"zone": zone, "kind": "warehouse"})).await.ok();
    }

    /// Receives stock (warehouse).
    pub async fn receive(&self, location: &str, sku: &str, qty: u32) -> Value {
        let r = self
            .post("/v1/inventory/receipts", WAREHOUSE_KEY, &json!({"location": location, "sku": sku, "qty": qty}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body
    }

    /// Places an order of `qty` × `sku` at `price` each (storefront).
    pub async fn order(&self, sku: &str, qty: u32, price: &str) -> Resp {
        self.post("/v1/orders", SHOP_KEY, &order_body(sku, qty, price)).await
    }

    /// Reads an order.
    pub async fn get_order(&self, id: &str) -> Value {
        self.get(&format!("/v1/orders/{id}"), VIEWER_KEY).await.ok()
    }

    /// A SKU's stock.
    pub async fn inventory(&self, sku: &str) -> Value {
        self.get(&format!("/v1/inventory/{sku}"), VIEWER_KEY).await.ok()
    }

    /// Waits until the order satisfies `pred`; panics with its last state after [`WAIT`].
    pub async fn wait_order(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut pause = Duration::from_millis(5);
        loop {
            let order = self.get_order(id).await;
            if pred(&order) {
                return order;
            }
            assert!(Instant::now() < deadline, "order {id} never became {what}; last seen: {order:#}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Waits until the order is in one of `states`.
    pub async fn wait_state(&self, id: &str, states: &[&str]) -> Value {
        let what = states.join("|");
        self.wait_order(id, &what, |o| states.contains(&state(o))).await
    }

    /// Every order, optionally in one state, through the paginated list.
    pub async fn all_orders(&self, state: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = "/v1/orders?limit=500".to_owned();
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let page = self.get(&path, VIEWER_KEY).await.ok();
            let orders = page["orders"].as_array().expect("orders is a list").clone();
            out.extend(orders);
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return out,
            }
        }
    }

    /// Takes the next pick task of a location, waiting for one to be queued.
    pub async fn next_pick(&self, location: &str) -> Value {
        let path = format!("/v1/picks/next?location={location}");
        let found = wait_for(WAIT, || async {
            let r = self.get(&path, WAREHOUSE_KEY).await;
            match r.status {
                StatusCode::OK => Some(r.body),
                StatusCode::NO_CONTENT => None,
                other => panic!("GET {path}: {other}: {}", r.text),
            }
        })
        .await;
        found.unwrap_or_else(|| panic!("no pick task appeared at {location}"))
    }

    /// Confirms a pick task in full.
    pub async fn confirm(&self, pick: &Value) -> Resp {
        let body = json!({"instruction_key": pick["instruction_key"], "qty": pick["qty"]});
        self.post(&format!("/v1/picks/{}/confirm", pick["id"].as_str().expect("pick id")), WAREHOUSE_KEY, &body).await
    }
}

/// The JSON of a one-line order.
pub fn order_body(sku: &str, qty: u32, price: &str) -> Value {
    json!({
        "customer": {"id": "c-1", "email": "c1@example.com"},
        "ship_to": {"zone": ZONE},
        "priority": "standard",
        "lines": [{"sku": sku, "qty": qty, "unit_price": price}],
    })
}

/// An order's state.
pub fn state(order: &Value) -> &str {
    order["state"].as_str().unwrap_or("")
}

/// Units allocated to an order, summed over its lines and locations.
pub fn allocated_units(order: &Value) -> u64 {
    lines(order).iter().flat_map(allocations).map(|a| a["qty"].as_u64().unwrap_or(0)).sum()
}

/// Units of an order allocated but not yet picked at `location` for `sku`:
/// what the inventory ledger must hold reserved for it.
pub fn reserved_units(order: &Value, sku: &str, location: &str) -> u64 {
    lines(order)
        .iter()
        .filter(|l| l["sku"] == sku)
        .flat_map(allocations)
        .filter(|a| a["location"] == location)
        .map(|a| a["qty"].as_u64().unwrap_or(0).saturating_sub(a["picked"].as_u64().unwrap_or(0)))
        .sum()
}

/// Units of an order picked, over all lines and locations.
pub fn picked_units(order: &Value) -> u64 {
    lines(order).iter().flat_map(allocations).map(|a| a["picked"].as_u64().unwrap_or(0)).sum()
}

fn lines(order: &Value) -> Vec<Value> {
    order["lines"].as_array().cloned().unwrap_or_default()
}

fn allocations(line: &Value) -> Vec<Value> {
    line["allocations"].as_array().cloned().unwrap_or_default()
}

/// A location's stock in an inventory snapshot.
pub fn at_location<'a>(inventory: &'a Value, location: &str) -> &'a Value {
    inventory["locations"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["location"] == location))
        .unwrap_or_else(|| panic!("no location {location} in {inventory:#}"))
}

/// Asserts the no-oversell invariant at every location of a snapshot:
/// reserved + safety <= on hand, and available = on hand - reserved - safety.
#[track_caller]
pub fn assert_no_oversell(inventory: &Value) {
    for l in inventory["locations"].as_array().expect("locations") {
        let n = |k: &str| l[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {l}"));
        assert!(n("reserved") + n("safety") <= n("on_hand"), "oversold: {l}");
        assert_eq!(n("available"), n("on_hand") - n("reserved") - n("safety"), "available is wrong: {l}");
    }
}

/// Polls `probe` until it yields a value or `timeout` passes (then `None`).
/// The pause between probes grows from 5 ms to 100 ms.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The application, running in-process on port 0 over a fresh data directory.
pub struct TestApp {
    /// Its client.
    pub api: Api,
    /// The engine (for checks the API does not offer).
    pub engine: std::sync::Arc<orderly_engine::app::Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
    _sim: Option<LocalSim>,
    _dir: TempDir,
}

impl TestApp {
    /// Starts the application with the carrier simulator and the test keys.
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with("").await
    }

    /// Starts the application with `extra` TOML appended to the test config.
    pub async fn spawn_with(extra: &str) -> TestApp {
        TestApp::spawn_custom(SimConfig::demo(7), |_| extra.to_owned()).await
    }

    /// Starts the application against a carrier simulator configured with
    /// `sim`; `extra(dir)` is TOML appended to the test config, given the
    /// test's own directory (for rate files and the like).
    pub async fn spawn_custom(sim: SimConfig, extra: impl FnOnce(&Path) -> String) -> TestApp {
        let sim = spawn_local(sim).await.expect("carrier simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let extra = extra(dir.path());
        let settings = orderly::settings::parse_str(&config_toml(Some(sim.url()), &extra)).expect("valid test config");
        let options = RunOptions {
            data_dir: dir.path().join("data"),
            store: None,
            listen: "127.0.0.1:0".parse().expect("valid address"),
            durability: Durability::Normal,
        };
        let app = Application::build(settings, &options).await.expect("application starts");
        let api = Api::new(app.local_addr());
        let engine = app.engine();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        TestApp { api, engine, shutdown: Some(tx), task: Some(task), _sim: Some(sim), _dir: dir }
    }

    /// The carrier simulator's base URL.
    pub fn sim_url(&self) -> &str {
        self._sim.as_ref().map(LocalSim::url).expect("this app runs with a carrier simulator")
    }

    /// Creates the warehouse and receives `qty` of `sku` there.
    pub async fn stock(&self, sku: &str, qty: u32) {
        self.api.location(WAREHOUSE, ZONE).await;
        self.api.receive(WAREHOUSE, sku, qty).await;
    }

    /// Waits until every consumer has processed everything its producers
    /// published (seen twice in a row, so an event in flight between a commit
    /// and its announcement is not missed).
    pub async fn wait_quiet(&self) {
        let deadline = Instant::now() + WAIT;
        let mut quiet_in_a_row = 0;
        while quiet_in_a_row < 2 {
            let lag = self.engine.runtime.consumer_lag().await;
            quiet_in_a_row = if lag.iter().all(|l| l.backlog == 0) { quiet_in_a_row + 1 } else { 0 };
            assert!(Instant::now() < deadline, "the engine never caught up with its events: {lag:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Shuts down gracefully and checks the server stopped cleanly.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(20), task).await;
            stopped.expect("shutdown finishes in time").expect("server task").expect("server stops cleanly");
        }
    }
}

impl std::ops::Deref for TestApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The real `orderly serve` binary, in its own process.
pub struct Server {
    child: Child,
    /// Its client.
    pub api: Api,
}

impl Server {
    /// Starts `orderly serve --config CONFIG --data-dir DATA --listen 127.0.0.1:0
    /// --durability full` and waits for its `listening on ADDR` line.
    pub fn start(config: &Path, data_dir: &Path, log: &Path) -> Result<Server> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).context("log file")?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_orderly"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--durability", "full"])
            .env("ORDERLY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start the orderly binary")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keep draining stdout so the server never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        let addr: SocketAddr = addr.trim().parse().context("the announced address")?;
                        return Ok(Server { child, api: Api::new(addr) });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    bail!("the server never announced its address (exit: {status:?})");
                }
            }
        }
    }

    /// SIGKILL: no shutdown, no flush, no goodbye.
    pub fn kill(mut self) {
        self.child.kill().expect("the server can be killed");
        self.child.wait().expect("the killed server is reaped");
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory for a server's config, data and log.
/// With `ORDERLY_E2E_KEEP` set, the directory is kept (and named on stderr) for a post-mortem.
pub fn server_dir() -> (TempDir, PathBuf, PathBuf, PathBuf) {
    let mut dir = tempfile::tempdir().expect("temp dir");
    if std::env::var_os("ORDERLY_E2E_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    let config = dir.path().join("orderly.toml");
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    (dir, config, data, log)
}

/// A log sink shared with the test: what a `tracing` subscriber writes to it
/// can be read back.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}
