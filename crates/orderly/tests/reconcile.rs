//! Reconciliation end to end: discrepancies are planted in the services' own
//! SQLite files while the engine is stopped (a pick recorded in picking that
//! inventory never committed, an order canceled that inventory still
//! reserves for, on-hand stock changed behind the engine's back); after a
//! restart the scheduled job finds and repairs each one, a second run over
//! the API finds nothing, and `orderly reconcile` on stopped data reports
//! with its exit code.

mod support;

use orderly::{Application, RunOptions};
use orderly_store_sqlite::Durability;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::oneshot;

/// A running application over a data directory the test keeps.
struct Running {
    api: Api,
    engine: Arc<orderly_engine::app::Engine>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(config: &Path, data: &Path) -> Running {
    let settings = orderly::settings::load(Some(config), std::iter::empty::<(String, String)>()).expect("valid config");
    let options = RunOptions {
        data_dir: data.to_owned(),
        store: None,
        listen: "127.0.0.1:0".parse().expect("address"),
        durability: Durability::Full,
    };
    let app = Application::build(settings, &options).await.expect("application starts");
    let api = Api::new(app.local_addr());
    let engine = app.engine();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    Running { api, engine, stop, task }
}

impl Running {
    async fn quiet(&self) {
        let deadline = Instant::now() + WAIT;
        let mut in_a_row = 0;
        while in_a_row < 2 {
            let lag = self.engine.runtime.consumer_lag().await;
            in_a_row = if lag.iter().all(|l| l.backlog == 0) { in_a_row + 1 } else { 0 };
            assert!(Instant::now() < deadline, "the engine never caught up: {lag:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(self) {
        drop(self.engine);
        let _ = self.stop.send(());
        let done = tokio::time::timeout(Duration::from_secs(20), self.task).await;
        done.expect("shutdown in time").expect("server task").expect("server stops cleanly");
    }
}

/// Changes one JSON document of a service's store, as a script run against
/// the database would: no event, no engine.
fn edit_doc(db: &Path, table: &str, key: &str, idx: Option<&str>, edit: impl FnOnce(&mut Value)) {
    let conn = rusqlite::Connection::open(db).expect("open the service's SQLite file");
    let raw: Vec<u8> = conn
        .query_row("SELECT doc FROM docs WHERE tbl = ?1 AND key = ?2", (table, key), |r| r.get(0))
        .unwrap_or_else(|e| panic!("{table}/{key} in {}: {e}", db.display()));
    let mut doc: Value = serde_json::from_slice(&raw).expect("a JSON document");
    edit(&mut doc);
    let raw = serde_json::to_vec(&doc).expect("serializes");
    let changed = match idx {
        Some(idx) => {
            conn.execute("UPDATE docs SET doc = ?1, idx = ?2 WHERE tbl = ?3 AND key = ?4", (raw, idx, table, key))
        }
        None => conn.execute("UPDATE docs SET doc = ?1 WHERE tbl = ?2 AND key = ?3", (raw, table, key)),
    }
    .expect("update");
    assert_eq!(changed, 1);
}

/// The key of the pick task of an order in picking's store.
fn pick_of(db: &Path, order_id: &str) -> (String, Value) {
    let conn = rusqlite::Connection::open(db).expect("open picking's SQLite file");
    let mut stmt = conn.prepare("SELECT key, doc FROM docs WHERE tbl = 'picks'").expect("query");
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).expect("rows");
    for row in rows {
        let (key, raw) = row.expect("row");
        let doc: Value = serde_json::from_slice(&raw).expect("json");
        if doc["order_id"] == order_id {
            return (key, doc);
        }
    }
    panic!("no pick task for {order_id}");
}

fn on_hand(inv: &Value) -> u64 {
    at_location(inv, WAREHOUSE)["on_hand"].as_u64().expect("on_hand")
}

fn reserved(inv: &Value) -> u64 {
    at_location(inv, WAREHOUSE)["reserved"].as_u64().expect("reserved")
}

fn kinds(report: &Value) -> Vec<String> {
    let mut k: Vec<String> = report["discrepancies"]
        .as_array()
        .expect("discrepancies")
        .iter()
        .map(|d| d["kind"].as_str().expect("kind").to_owned())
        .collect();
    k.sort();
    k
}

fn cli_reconcile(config: &Path, data: &Path) -> (i32, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(["reconcile", "--json", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("ORDERLY_LOG", "warn")
        .output()
        .expect("orderly reconcile runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last =
        stdout.lines().last().unwrap_or_else(|| panic!("no output; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().expect("exit code"), serde_json::from_str(last).expect("a JSON report"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_discrepancies_are_found_and_repaired_once() {
    let (_dir, config, data, _log) = server_dir();
    std::fs::write(&config, config_toml(None, "[reconcile]\ninterval = \"0\"\n")).expect("config");

    // 1. Normal traffic: a control order, an order to be "canceled", an order to be "picked".
    let app = start(&config, &data).await;
    app.api.location(WAREHOUSE, ZONE).await;
    for sku in ["REC-CANCEL", "REC-PICK", "REC-DRIFT", "REC-OK"] {
        app.api.receive(WAREHOUSE, sku, 40).await;
    }
    let mut ids = Vec::new();
    for (sku, qty) in [("REC-CANCEL", 2), ("REC-PICK", 3), ("REC-OK", 4)] {
        let r = app.api.order(sku, qty, "10.00").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().expect("id").to_owned();
        app.api.wait_state(&id, &["allocated", "picking"]).await;
        ids.push(id);
    }
    let (canceled, picked, control) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    app.quiet().await;
    let clean = app.api.post_empty("/v1/ops/reconcile", OPS_KEY).await.ok();
    assert_eq!(kinds(&clean), Vec::<String>::new(), "a healthy engine has no discrepancy: {clean:#}");
    assert_eq!(clean["reservations_checked"], 3, "{clean:#}");
    app.shutdown().await;

    // 2. Plant, with the engine stopped.
    edit_doc(&data.join("orders.db"), "orders", &canceled, Some("canceled"), |o| o["state"] = json!("canceled"));
    let (pick_key, pick) = pick_of(&data.join("picking.db"), &picked);
    let qty = pick["qty"].clone();
    edit_doc(&data.join("picking.db"), "picks", &pick_key, Some("completed"), |t| {
        t["status"] = json!("completed");
        t["qty_picked"] = qty;
    });
    edit_doc(&data.join("inventory.db"), "ledgers", "REC-DRIFT", None, |l| {
        let p = &mut l["stock"][WAREHOUSE][0]["on_hand"];
        *p = json!(p.as_u64().expect("on_hand") - 3);
    });

    // 3. Restart with the scheduled job on: it finds and repairs each one.
    let extra = "[reconcile]\ninterval = \"2s\"\n[alerts]\nmax_manual_adjustment_ratio = 100.0\n";
    std::fs::write(&config, config_toml(None, extra)).expect("config");
    let app = start(&config, &data).await;
    let first = wait_for(Duration::from_secs(20), || async { app.engine.last_reconcile() })
        .await
        .expect("the scheduled reconciliation ran");
    let report = serde_json::to_value(&first).expect("report");
    assert_eq!(report["trigger"], "scheduler");
    assert_eq!(kinds(&report), vec!["pick_not_committed", "reservation_for_closed_order", "stock_drift"], "{report:#}");
    for d in report["discrepancies"].as_array().expect("list") {
        assert_eq!(d["repaired"], true, "{d:#}");
        assert!(d["detail"].as_str().is_some_and(|t| !t.is_empty()), "{d:#}");
    }
    assert_eq!(report["repaired"], 3);
    let by_kind =
        |k: &str| report["discrepancies"].as_array().unwrap().iter().find(|d| d["kind"] == k).cloned().unwrap();
    assert_eq!(by_kind("reservation_for_closed_order")["order_id"], canceled.as_str());
    assert_eq!(by_kind("pick_not_committed")["order_id"], picked.as_str());
    assert_eq!(by_kind("stock_drift")["sku"], "REC-DRIFT");

    // The repairs: the canceled order's units are free, the pick left the
    // ledger (and the order learned of it), the drift is on the books.
    let inv = app.api.inventory("REC-CANCEL").await;
    assert_eq!((reserved(&inv), on_hand(&inv)), (0, 40), "{inv:#}");
    let inv = app.api.inventory("REC-PICK").await;
    assert_eq!((reserved(&inv), on_hand(&inv)), (0, 37), "{inv:#}");
    app.api.wait_state(&picked, &["picked"]).await;
    let inv = app.api.inventory("REC-DRIFT").await;
    let part = &at_location(&inv, WAREHOUSE)["partitions"][0];
    assert_eq!((part["on_hand"].as_u64(), part["adjusted"].as_i64()), (Some(37), Some(-3)), "{inv:#}");
    let inv = app.api.inventory("REC-OK").await;
    assert_eq!(reserved(&inv), 4, "the control order keeps its reservation: {inv:#}");
    assert!(["allocated", "picking"].contains(&state(&app.api.get_order(&control).await)));

    // Running again repairs nothing twice.
    app.quiet().await;
    app.api.post_empty("/v1/ops/reconcile", VIEWER_KEY).await.assert_problem(403);
    let again = app.api.post_empty("/v1/ops/reconcile", OPS_KEY).await.ok();
    assert_eq!(kinds(&again), Vec::<String>::new(), "{again:#}");
    assert_eq!(again["trigger"], "console");
    let last = app.api.get("/v1/ops/reconcile/last", VIEWER_KEY).await.ok();
    assert!(last["trigger"] == "console" || last["trigger"] == "scheduler", "{last:#}");
    assert_eq!(app.engine.runtime.metrics.counter_total("orderly_reconciliation_repairs_total"), 3);
    let inv = app.api.inventory("REC-DRIFT").await;
    assert_eq!(on_hand(&inv), 37);
    let summary = app.api.get("/v1/ops/summary", VIEWER_KEY).await.ok();
    assert!(summary["reconciliation"]["id"].is_string(), "{summary:#}");
    // Reconciliation changes are recorded like manual ones, with their reason.
    let metrics = app.api.get("/metrics", VIEWER_KEY).await.text;
    assert!(metrics.contains("orderly_reconciliation_runs_total{trigger=\"scheduler\"}"), "{metrics}");
    app.shutdown().await;

    // 4. The CLI on stopped data: exit 2 while it finds something, 0 once clean.
    edit_doc(&data.join("inventory.db"), "ledgers", "REC-OK", None, |l| {
        let p = &mut l["stock"][WAREHOUSE][0]["on_hand"];
        *p = json!(p.as_u64().expect("on_hand") + 2);
    });
    std::fs::write(&config, config_toml(None, "[reconcile]\ninterval = \"0\"\n")).expect("config");
    let (code, report) = cli_reconcile(&config, &data);
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(kinds(&report), vec!["stock_drift"], "{report:#}");
    assert_eq!(report["discrepancies"][0]["repaired"], true);
    assert_eq!(report["trigger"], "cli");
    let (code, report) = cli_reconcile(&config, &data);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(kinds(&report), Vec::<String>::new());
}
