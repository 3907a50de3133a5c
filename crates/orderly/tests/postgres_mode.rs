//! The engine on PostgreSQL (one schema per service, in a database made for
//! this test and dropped after it): orders allocate, a small flash sale
//! never oversells, and a restart on the same database keeps every order.
//! Under `CI=true` an unreachable server fails the test; elsewhere it skips.

use orderly::{Application, RunOptions};
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::order::OrderState;
use orderly_domain::{Money, Priority};
use orderly_engine::app::{Customer, LineRequest, OrderRequest, ShipTo};
use orderly_engine::config::Settings;
use orderly_store_sqlite::Durability;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).expect("valid id")
}

fn psql(db: &str, sql: &str) -> bool {
    std::process::Command::new("psql")
        .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-c", sql])
        .status()
        .is_ok_and(|s| s.success())
}

/// A database for this test, dropped when the guard goes.
struct TestDb(String);

impl Drop for TestDb {
    fn drop(&mut self) {
        psql("postgres", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0));
    }
}

fn test_db() -> Option<TestDb> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let name = format!("orderly_test_{}_{nanos}", std::process::id());
    if !psql("postgres", &format!("CREATE DATABASE {name}")) {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "PostgreSQL at {ADMIN_URL} is required under CI=true");
        eprintln!(
            "\n*** SKIPPED: PostgreSQL is not reachable at {ADMIN_URL} (set CI=true to make this a failure) ***\n"
        );
        return None;
    }
    Some(TestDb(name))
}

fn order(sku: &str, qty: u32) -> OrderRequest {
    OrderRequest {
        customer: Customer { id: id("c-1"), email: "c1@example.com".into() },
        ship_to: ShipTo { zone: id("EU") },
        priority: Priority::Standard,
        lines: vec![LineRequest { sku: id(sku), qty, unit_price: Money::parse("9.99").expect("money") }],
        hold_ids: vec![],
        delivery_window: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_on_postgres_without_overselling_and_survives_a_restart() {
    let Some(db) = test_db() else { return };
    let url = format!("postgres://postgres@127.0.0.1:5432/{}", db.0);
    let dir = tempfile::tempdir().expect("tempdir");
    let options = RunOptions {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        store: Some(url),
        durability: Durability::Full,
    };

    let app = Application::build(Settings::default(), &options).await.expect("starts on PostgreSQL");
    let engine = app.engine();
    engine
        .put_location(Location { id: id("WH-1"), zone: id("EU"), kind: LocationKind::Warehouse })
        .await
        .expect("location");
    engine.receive(id("WH-1"), id("HOT"), 21).await.expect("receipt");
    let sellable = engine.inventory(id("HOT")).await.expect("inventory").available;
    let mut handles = Vec::new();
    for _ in 0..120 {
        let e = engine.clone();
        handles
            .push(tokio::spawn(async move { e.create_order(order("HOT", 1)).await.expect("accepted").id().clone() }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.expect("task"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut allocated, mut backordered) = (0u64, 0u64);
    for oid in &ids {
        loop {
            let o = engine.order(oid).await.expect("order");
            match o.state() {
                OrderState::Allocated | OrderState::Picking => {
                    allocated += 1;
                    break;
                }
                OrderState::Backordered => {
                    backordered += 1;
                    break;
                }
                _ => {
                    assert!(Instant::now() < deadline, "order {oid} stuck in {:?}", o.state());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    assert_eq!(allocated, sellable, "exactly the sellable units were allocated");
    assert_eq!(allocated + backordered, 120);
    let inv = engine.inventory(id("HOT")).await.expect("inventory");
    assert!(inv.locations[0].reserved + inv.locations[0].safety <= inv.locations[0].on_hand, "no oversell");

    engine.shutdown().await;
    drop(app);
    let app = Application::build(Settings::default(), &options).await.expect("restarts on the same database");
    let engine = app.engine();
    for oid in &ids {
        engine.order(oid).await.expect("every acknowledged order survived the restart");
    }
    assert_eq!(engine.inventory(id("HOT")).await.expect("inventory").locations[0].reserved, sellable);
    engine.shutdown().await;
}
