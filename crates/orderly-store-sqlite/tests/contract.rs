//! The store contract, run against SQLite.

use orderly_store_sqlite::{Durability, SqliteStore};

#[tokio::test]
async fn sqlite_store_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Full).expect("open");
    orderly_engine::contract::check_store(&store).await;
}

#[tokio::test]
async fn reopening_keeps_committed_state_and_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    {
        let store = SqliteStore::open(&path, Durability::Normal).expect("open");
        orderly_engine::contract::check_store(&store).await;
    }
    let store = SqliteStore::open(&path, Durability::Full).expect("reopen");
    use orderly_engine::ports::Store;
    assert_eq!(store.outbox_head().await.expect("head"), 5, "the five events check_store committed");
    assert_eq!(store.cursor("inventory").await.expect("cursor"), 9);
}

#[tokio::test]
async fn knows_the_greatest_key_in_byte_order() {
    use orderly_engine::ports::{GreatestKey, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Normal).expect("open");
    orderly_engine::contract::check_store(&store).await;
    assert_eq!(store.greatest_key("ordering").await.expect("key"), GreatestKey::Key("a".into()));
    assert_eq!(store.greatest_key("nothing").await.expect("key"), GreatestKey::Empty);
}

/// Files written before the compact outbox format keep CloudEvents JSON
/// rows; both read back as the same envelopes, in one outbox.
#[tokio::test]
async fn reads_outbox_rows_written_as_json_beside_compact_ones() {
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::ports::{Batch, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let event = |id: &str, seq| {
        Envelope::new(
            id.into(),
            "/orderly/orders",
            EventType::OrderCreated,
            "o-1",
            Timestamp(1_795_800_000_000),
            seq,
            serde_json::json!({"order_id": "o-1", "lines": [1, 2]}),
        )
    };
    let old = event("01a21f60-5230-7d63-a4be-84962b65bd79", 1);
    {
        let store = SqliteStore::open(&path, Durability::Normal).expect("open");
        drop(store);
        let c = rusqlite::Connection::open(&path).expect("raw");
        let json = serde_json::to_vec(&old).expect("json");
        c.execute(
            "INSERT INTO outbox (id, subject, event) VALUES (?1, ?2, ?3)",
            rusqlite::params![old.id, old.subject, json],
        )
        .expect("a row as an earlier version wrote it");
    }
    let store = SqliteStore::open(&path, Durability::Normal).expect("reopen");
    let new = event("01a21f60-5230-7d63-a4be-84962b65bd7a", 2);
    assert_eq!(store.commit(Batch { outbox: vec![new.clone()], ..Batch::default() }).await.expect("commit"), 2);
    let read: Vec<Envelope> =
        store.outbox_after(0, 10).await.expect("outbox").into_iter().map(|r| r.envelope).collect();
    assert_eq!(read, vec![old.clone(), new.clone()]);
    let by_subject: Vec<Envelope> =
        store.outbox_for_subject("o-1", 10).await.expect("subject").into_iter().map(|r| r.envelope).collect();
    assert_eq!(by_subject, vec![old, new]);
}

/// An order's events are indexed under its UUID's 16 bytes; rows written
/// before that, under the order id's text, and other subjects under their
/// text: an order's history reads both, in outbox order, and nothing else.
#[tokio::test]
async fn an_orders_history_reads_packed_and_earlier_spelled_subjects() {
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::ports::{Batch, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let order = "o-01a21f60-5230-7a00-8000-000000000001";
    let other = "o-01a21f60-5230-7a00-8000-000000000002";
    let event = |n: u64, subject: &str, seq| {
        Envelope::new(
            format!("01a21f60-5230-7d63-a4be-{n:012x}"),
            "/orderly/orders",
            EventType::OrderCreated,
            subject,
            Timestamp(1_795_800_000_000),
            seq,
            serde_json::json!({"order_id": subject}),
        )
    };
    let earlier = event(1, order, 1);
    {
        let store = SqliteStore::open(&path, Durability::Normal).expect("open");
        drop(store);
        let c = rusqlite::Connection::open(&path).expect("raw");
        let bytes = orderly_store_sqlite::codec::encode(&earlier).expect("encode");
        c.execute(
            "INSERT INTO outbox (id, subject, event) VALUES (?1, ?2, ?3)",
            rusqlite::params![earlier.id, earlier.subject, bytes],
        )
        .expect("a row with the subject spelled out, as an earlier version wrote it");
    }
    let store = SqliteStore::open(&path, Durability::Normal).expect("reopen");
    let (later, unrelated, sku, prefixed) =
        (event(2, order, 2), event(3, other, 1), event(4, "SKU-1", 1), event(5, &format!("x{order}"), 1));
    let batch =
        Batch { outbox: vec![unrelated.clone(), later.clone(), sku.clone(), prefixed.clone()], ..Batch::default() };
    assert_eq!(store.commit(batch).await.expect("commit"), 5);

    let history = |subject: String| {
        let store = &store;
        async move {
            let records = store.outbox_for_subject(&subject, 10).await.expect("subject");
            records.into_iter().map(|r| r.envelope).collect::<Vec<_>>()
        }
    };
    assert_eq!(history(order.into()).await, vec![earlier, later], "both spellings, in outbox order");
    assert_eq!(history(other.into()).await, vec![unrelated]);
    assert_eq!(history("SKU-1".into()).await, vec![sku], "other subjects stay text");
    assert_eq!(history(format!("x{order}")).await, vec![prefixed]);
    assert!(history("o-01a21f60-5230-7a00-8000-000000000003".into()).await.is_empty());
    let c = rusqlite::Connection::open(&path).expect("raw");
    let kinds: Vec<String> = c
        .prepare("SELECT typeof(subject) FROM outbox ORDER BY position")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(kinds, ["text", "blob", "blob", "text", "text"], "order ids packed, the rest spelled");
}

#[tokio::test]
async fn a_new_file_gets_the_larger_page_size_and_an_old_one_keeps_its_own() {
    use orderly_engine::ports::Store;
    let dir = tempfile::tempdir().expect("tempdir");
    let page_size = |path: &std::path::Path| -> u32 {
        rusqlite::Connection::open(path).expect("raw").query_row("PRAGMA page_size", [], |r| r.get(0)).expect("size")
    };
    let fresh = dir.path().join("new.db");
    drop(SqliteStore::open(&fresh, Durability::Normal).expect("open"));
    assert_eq!(page_size(&fresh), orderly_store_sqlite::PAGE_SIZE);

    let old = dir.path().join("old.db");
    {
        let c = rusqlite::Connection::open(&old).expect("raw");
        c.execute_batch("PRAGMA page_size=4096; PRAGMA journal_mode=WAL; CREATE TABLE earlier (x);").expect("old file");
    }
    let store = SqliteStore::open(&old, Durability::Normal).expect("an older file opens");
    orderly_engine::contract::check_store(&store).await;
    assert_eq!(store.outbox_head().await.expect("head"), 5, "the five events check_store committed");
    drop(store);
    assert_eq!(page_size(&old), 4096);
}

/// The store checkpoints the WAL once it passes the mark, after the commit
/// that crossed it has answered (SQLite's own automatic checkpoint is off):
/// the WAL stays near the mark however much is written, and what was
/// committed is all there after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_after_the_commit_that_crosses_the_mark_and_the_wal_stays_bounded() {
    use orderly_engine::ports::{Batch, Row, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let wal = dir.path().join("t.db-wal");
    let mark: u64 = 256 * 1024;
    let doc = vec![b'x'; 20_000];
    {
        let mut store = SqliteStore::open(&path, Durability::Normal).expect("open");
        store.set_checkpoint_bytes(mark);
        for i in 0..300 {
            let puts = vec![Row { table: "things", key: format!("k{i:04}"), idx: None, doc: doc.clone() }];
            store.commit(Batch { puts, ..Batch::default() }).await.expect("commit");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.checkpoints() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // 300 commits of 20 KB are about 7 MB of WAL without checkpoints.
        assert!(store.checkpoints() >= 5, "checkpoints run: {}", store.checkpoints());
        let wal_bytes = std::fs::metadata(&wal).expect("wal").len();
        assert!(wal_bytes < 4 * mark, "the WAL is {wal_bytes} bytes, the mark {mark}");
    }
    let store = SqliteStore::open(&path, Durability::Full).expect("reopen");
    for i in [0, 150, 299] {
        let row = store.get("things", &format!("k{i:04}")).await.expect("get").expect("committed");
        assert_eq!(row.doc.len(), doc.len());
    }
}

/// With `Full` durability a commit is written without a sync and synced by
/// the store's syncer; its `Durable` resolves once that sync ran (and a plain
/// commit returns only then). Commits written while a sync runs share the
/// next one. With `Normal` nothing syncs but checkpoints.
#[tokio::test]
async fn a_commit_counts_as_durable_once_the_wal_is_synced() {
    use orderly_engine::ports::{Batch, Durable, Row, Store};
    let row = |key: &str| Batch {
        puts: vec![Row { table: "things", key: key.into(), idx: None, doc: b"{}".to_vec() }],
        ..Batch::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Full).expect("open");
    assert_eq!(store.syncs(), 0);
    let mut pending = Vec::new();
    for i in 0..20 {
        let (_, durable) = store.commit_visible(row(&format!("k{i}"))).await.expect("commit");
        assert!(matches!(durable, Durable::After { seq, .. } if seq == i + 1), "numbered in write order");
        pending.push(durable);
    }
    for durable in pending {
        assert!(durable.wait().await, "synced");
    }
    let syncs = store.syncs();
    assert!((1..=20).contains(&syncs), "{syncs} syncs for 20 commits");
    store.commit(row("last")).await.expect("commit");
    assert!(store.syncs() > syncs, "a plain commit returns after its own sync");

    let relaxed = SqliteStore::open(&dir.path().join("n.db"), Durability::Normal).expect("open");
    let (_, durable) = relaxed.commit_visible(row("a")).await.expect("commit");
    assert!(matches!(durable, Durable::Now) && durable.is_done());
    assert_eq!(relaxed.syncs(), 0);

    // Closing the store finishes the syncs asked for; the data is there on reopen.
    drop(store);
    let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Full).expect("reopen");
    assert!(store.get("things", "last").await.expect("get").is_some());
}

/// The bundled SQLite is built (`.cargo/config.toml`, `LIBSQLITE3_FLAGS`)
/// with a page cache per connection and without memory statistics: with
/// `ENABLE_MEMORY_MANAGEMENT` every store's connections fetched pages
/// through one global mutex, and `MEMSTATUS` takes another around each of
/// SQLite's allocations (README, Performance).
#[test]
fn the_bundled_sqlite_takes_no_global_lock_per_page_or_allocation() {
    let c = rusqlite::Connection::open_in_memory().expect("open");
    let mut stmt = c.prepare("PRAGMA compile_options").expect("prepare");
    let options: Vec<String> =
        stmt.query_map([], |r| r.get::<_, String>(0)).expect("query").collect::<Result<_, _>>().expect("rows");
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "one page cache for all connections: {options:?}"
    );
    assert!(options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"), "memory statistics on: {options:?}");
    assert!(options.iter().any(|o| o == "THREADSAFE=1"), "the stores share it across threads: {options:?}");
}
