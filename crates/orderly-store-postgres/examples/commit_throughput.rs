//! Measures (does not assert) PgStore commit throughput on a real server:
//! batches of 1 and of 1,000 documents + events, from one writer and from
//! several writers sharing one schema.
//!
//! `cargo run --release -p orderly-store-postgres --example commit_throughput [URL]`
//! (default `postgres://postgres@127.0.0.1:5432/test`). It works in a schema
//! of its own and drops it at the end.

use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventType};
use orderly_engine::ports::{Batch, Row, Store, StoreError};
use orderly_store_postgres::PgStore;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long each single-event scenario runs.
const RUN_FOR: Duration = Duration::from_secs(3);
/// How many 1,000-row batches the large scenarios commit per writer.
const LARGE_BATCHES: usize = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_commit_{}", std::process::id());
    let result = run(&url, &schema).await;
    let mut conn = PgConnection::connect(&url).await?;
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).execute(&mut conn).await?;
    conn.close().await?;
    result
}

async fn run(url: &str, schema: &str) -> Result<(), Box<dyn std::error::Error>> {
    let store = PgStore::connect(url, schema, 8).await?;
    println!("scenario                                   commits/s    rows/s   (rows = docs + events)");
    for writers in [1, 4] {
        report(&format!("batch of 1 doc + 1 event, {writers} writer(s)"), time(&store, writers, 1, None).await?);
        report(&format!("batch of 1 doc, no event, {writers} writer(s)"), time_docs_only(&store, writers).await?);
    }
    for writers in [1, 2] {
        let label = format!("batch of 1000 docs + 1000 events, {writers} writer(s)");
        report(&label, time(&store, writers, 1_000, Some(LARGE_BATCHES)).await?);
    }
    store.close().await;
    Ok(())
}

struct Measured {
    commits: usize,
    rows: usize,
    elapsed: Duration,
}

fn report(label: &str, m: Measured) {
    let secs = m.elapsed.as_secs_f64();
    println!("{label:<42} {:>9.0} {:>9.0}", m.commits as f64 / secs, m.rows as f64 / secs);
}

/// `writers` tasks commit batches of `size` docs + `size` events, for
/// `batches` each or, when `None`, for [`RUN_FOR`].
async fn time(store: &PgStore, writers: usize, size: usize, batches: Option<usize>) -> Result<Measured, StoreError> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            let mut commits = 0;
            while batches.map_or(started.elapsed() < RUN_FOR, |b| commits < b) {
                store.commit(batch(w, commits, size, true)).await?;
                commits += 1;
            }
            Ok::<_, StoreError>(commits)
        });
    }
    collect(tasks, size * 2, started).await
}

async fn time_docs_only(store: &PgStore, writers: usize) -> Result<Measured, StoreError> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            let mut commits = 0;
            while started.elapsed() < RUN_FOR {
                store.commit(batch(w + 100, commits, 1, false)).await?;
                commits += 1;
            }
            Ok::<_, StoreError>(commits)
        });
    }
    collect(tasks, 1, started).await
}

async fn collect(
    mut tasks: tokio::task::JoinSet<Result<usize, StoreError>>,
    rows_per_commit: usize,
    started: Instant,
) -> Result<Measured, StoreError> {
    let mut commits = 0;
    while let Some(done) = tasks.join_next().await {
        commits += done.map_err(|e| StoreError::Unavailable(e.to_string()))??;
    }
    Ok(Measured { commits, rows: commits * rows_per_commit, elapsed: started.elapsed() })
}

/// Numbers every batch the benchmark builds, so event ids never repeat.
static BATCHES: AtomicUsize = AtomicUsize::new(0);

fn batch(writer: usize, commit: usize, size: usize, with_events: bool) -> Batch {
    let tag = format!("b{}", BATCHES.fetch_add(1, Ordering::Relaxed));
    let puts = (0..size)
        .map(|i| Row {
            table: "orders",
            key: format!("order-{writer}-{}", i % 5_000),
            idx: Some("created".to_owned()),
            doc: format!("{{\"commit\":{commit},\"line\":{i},\"sku\":\"SKU-{i}\"}}").into_bytes(),
        })
        .collect();
    let outbox = if with_events { (0..size).map(|i| event(&format!("{tag}-{i}"), i)).collect() } else { Vec::new() };
    Batch { puts, outbox, ..Batch::default() }
}

fn event(id: &str, i: usize) -> Envelope {
    Envelope::new(
        id.to_owned(),
        "/orderly/bench",
        EventType::OrderCreated,
        &format!("order-{i}"),
        Timestamp(1_000),
        1,
        serde_json::json!({"line": i, "qty": 1}),
    )
}
