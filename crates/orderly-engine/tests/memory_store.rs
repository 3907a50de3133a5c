//! The store contract, run against the in-memory store.

#[tokio::test]
async fn memory_store_meets_the_contract() {
    let store = orderly_engine::memory_store::MemoryStore::new();
    orderly_engine::contract::check_store(&store).await;
}
