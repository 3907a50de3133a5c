//! Micro-benchmarks of the embedded store's commit, the cost that bounds a
//! flash sale (README, Performance): one orders group commit of 120 orders
//! (each a new 650-byte document, an update of an order from two commits
//! before, and three events), and a single-row commit (the per-transaction
//! floor: the WAL frame, the fsync). `synchronous=FULL`, as served. Run
//! with `cargo bench -p orderly-store-sqlite`; a store change can be
//! compared here, against the same disk in the same minute, with much less
//! noise than a whole sale.

use criterion::{Criterion, criterion_group, criterion_main};
use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventType};
use orderly_engine::ports::{Batch, Row, Store};
use orderly_store_sqlite::{Durability, SqliteStore};

/// Orders per group commit: about what the orders loop commits at a time
/// under the bench's 256 clients.
const ORDERS_PER_COMMIT: u64 = 120;

fn order_key(commit: u64, i: u64) -> String {
    format!("o-01a225d7-{:04x}-7bbb-8ccc-{i:012x}", commit & 0xffff)
}

/// Commit number `n` of a sale: `ORDERS_PER_COMMIT` new orders, the orders
/// of commit `n - 2` updated (backordered), three events per new order.
fn sale_batch(n: u64, doc: &[u8]) -> Batch {
    let data = serde_json::json!({
        "order_id": order_key(n, 0),
        "lines": [{"sku": "HOT-1", "qty": 1, "unit_price": "29.00"}],
        "email": "c1@example.com",
    });
    let mut batch = Batch::default();
    for i in 0..ORDERS_PER_COMMIT {
        let key = order_key(n, i);
        batch.puts.push(Row { table: "orders", key: key.clone(), idx: Some("allocating".into()), doc: doc.to_vec() });
        if n >= 2 {
            let idx = Some("backordered".into());
            batch.puts.push(Row { table: "orders", key: order_key(n - 2, i), idx, doc: doc.to_vec() });
        }
        for e in 0..3 {
            let id = format!("01a225d7-{:04x}-7d63-a4be-{:012x}", n & 0xffff, i * 3 + e);
            let seq = n * ORDERS_PER_COMMIT * 3 + i * 3 + e + 1;
            let env =
                Envelope::new(id, "/orderly/orders", EventType::OrderCreated, &key, Timestamp(0), seq, data.clone());
            batch.outbox.push(env);
        }
    }
    batch
}

fn commits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = vec![b'x'; 650];

    let store = SqliteStore::open(&dir.path().join("orders.db"), Durability::Full).expect("open");
    let mut n = 0;
    c.bench_function("sqlite_commit_120_orders", |b| {
        b.iter_batched(
            || {
                n += 1;
                sale_batch(n, &doc)
            },
            |batch| rt.block_on(store.commit(batch)).expect("commit"),
            criterion::BatchSize::LargeInput,
        )
    });

    let single = SqliteStore::open(&dir.path().join("single.db"), Durability::Full).expect("open");
    let mut k = 0u64;
    c.bench_function("sqlite_commit_one_row", |b| {
        b.iter(|| {
            k += 1;
            let row = Row { table: "t", key: format!("k{k:012}"), idx: None, doc: doc.clone() };
            rt.block_on(single.commit(Batch { puts: vec![row], ..Batch::default() })).expect("commit")
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(5));
    targets = commits
}
criterion_main!(benches);
