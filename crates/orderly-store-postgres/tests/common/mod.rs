//! Test support: a uniquely named schema on the local PostgreSQL that is
//! dropped when the guard goes out of scope (also when the test panics), and
//! the rule for an unreachable server: fail under `CI=true`, else skip loudly.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventType};
use orderly_engine::ports::Row;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Where the tests find PostgreSQL unless `ORDERLY_TEST_PG_URL` says otherwise.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long the reachability probe waits.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh schema name, dropped (with everything in it) on drop.
pub struct TestSchema {
    /// The server url.
    pub url: String,
    /// The schema's name.
    pub name: String,
}

impl TestSchema {
    /// A new unique schema name (the schema itself is created by the store),
    /// or `None` after printing a SKIP banner when PostgreSQL is unreachable
    /// outside CI. Under `CI=true` an unreachable server fails the test.
    pub async fn new(label: &str) -> Option<TestSchema> {
        let url = std::env::var("ORDERLY_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        if let Err(e) = probe(&url).await {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("PostgreSQL is unreachable at {url} and CI=true: {e}");
            }
            eprintln!(
                "\n**********************************************************************\n\
                 SKIP {label}: PostgreSQL is unreachable at {url}: {e}\n\
                 (set ORDERLY_TEST_PG_URL, or CI=true to make this a failure)\n\
                 **********************************************************************\n"
            );
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("t_{label}_{}_{nanos:x}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        Some(TestSchema { url, name })
    }

    /// Another unique schema name on the same server, dropped with this guard's.
    pub fn sibling(&self, suffix: &str) -> TestSchema {
        TestSchema { url: self.url.clone(), name: format!("{}_{suffix}", self.name) }
    }

    /// Runs `sql` (test-controlled, never user input) on a fresh connection.
    pub async fn admin_scalar(&self, sql: String) -> i64 {
        let mut conn = PgConnection::connect(&self.url).await.expect("admin connection");
        let v: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&mut conn).await.expect("admin query");
        conn.close().await.expect("close admin connection");
        v
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop cannot await: drop the schema from a thread with its own runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime for cleanup");
            rt.block_on(async move {
                let mut conn = PgConnection::connect(&url).await.map_err(|e| e.to_string())?;
                let sql = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await.map_err(|e| e.to_string())?;
                conn.close().await.map_err(|e| e.to_string())
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test schema {}: {e}", self.name),
            Err(_) => eprintln!("warning: cleanup of test schema {} panicked", self.name),
        }
    }
}

/// Connects once; creates the database named in the url if it is missing.
async fn probe(url: &str) -> Result<(), String> {
    let attempt = tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect(url)).await;
    match attempt {
        Err(_) => Err("timed out".into()),
        Ok(Ok(conn)) => conn.close().await.map_err(|e| e.to_string()),
        Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("3D000") => create_database(url).await,
        Ok(Err(e)) => Err(e.to_string()),
    }
}

async fn create_database(url: &str) -> Result<(), String> {
    let (server, db) = url.rsplit_once('/').ok_or("url has no database")?;
    let db = db.split('?').next().unwrap_or(db);
    if !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("will not create database {db:?}"));
    }
    let mut conn = PgConnection::connect(&format!("{server}/postgres")).await.map_err(|e| e.to_string())?;
    let created = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{db}\""))).execute(&mut conn).await;
    match created {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()), // created concurrently
        Err(e) => Err(e.to_string()),
    }
}

/// A test event.
pub fn event(id: &str, subject: &str, seq: u64) -> Envelope {
    Envelope::new(
        id.into(),
        "/orderly/test",
        EventType::OrderCreated,
        subject,
        Timestamp(1_000),
        seq,
        serde_json::json!({"n": seq}),
    )
}

/// A test document in table `things`.
pub fn row(key: &str, idx: Option<&str>, doc: &str) -> Row {
    Row { table: "things", key: key.into(), idx: idx.map(str::to_owned), doc: doc.as_bytes().to_vec() }
}
