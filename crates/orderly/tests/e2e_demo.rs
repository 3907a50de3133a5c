//! `orderly demo --carrier-down fastship`, the real binary: the simulated
//! storefront, pickers and packers keep orders flowing while the primary EU
//! carrier is down, and the ops summary shows labels falling back to the
//! secondary carrier with the primary's breaker open.

mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Api, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_its_primary_carrier_down_shows_fallbacks_in_the_ops_summary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(["demo", "--listen", "127.0.0.1:0", "--carrier-down", "fastship", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("ORDERLY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the orderly binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut ops_key) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while addr.is_none() || ops_key.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo prints its address and keys");
        if let Some(a) = line.strip_prefix("listening on ") {
            addr = Some(a.trim().parse().expect("an address"));
        }
        if let Some(k) = line.trim().strip_prefix("ops ") {
            ops_key = Some(k.trim().to_owned());
        }
    }
    let api = Api::new(addr.expect("address"));
    let key = ops_key.expect("ops key");

    let summary = wait_for(Duration::from_secs(90), || async {
        let s = api.get("/v1/ops/summary", &key).await.ok();
        let fallbacks = s["carrier_fallbacks"].as_u64().unwrap_or(0);
        let open = s["shipping"]["breakers"]["fastship"]["state"] == "open";
        (fallbacks >= 3 && open).then_some(s)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let summary: Value = summary.expect("fallbacks and an open fastship breaker show in the ops summary");
    assert!(
        summary["alerts"].as_array().expect("alerts").iter().any(|a| a.to_string().contains("fastship")),
        "an open breaker is an alert: {summary:#}"
    );
}
