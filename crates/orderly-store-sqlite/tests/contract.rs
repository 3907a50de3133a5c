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
    assert_eq!(store.outbox_head().await.expect("head"), 3);
    assert_eq!(store.cursor("inventory").await.expect("cursor"), 9);
}
