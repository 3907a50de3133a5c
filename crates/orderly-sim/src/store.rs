//! The simulator's store: a [`MemoryStore`] (the engine's own in-memory
//! adapter, crash-able through `fail_next_commits`) that also records what
//! each successful commit carried, so the invariant checker can see which
//! events were applied and which documents changed without scanning everything.

use async_trait::async_trait;
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::{Batch, OutboxRecord, Row, Store, StoreError};
use std::collections::BTreeSet;
use std::sync::Mutex;

/// What one successful commit carried.
#[derive(Debug, Clone, Default)]
pub struct CommitRecord {
    /// Event ids marked processed (the inbox), in batch order.
    pub inbox: Vec<String>,
    /// Documents written, as (table, key).
    pub puts: Vec<(&'static str, String)>,
}

/// A memory store with a commit log.
#[derive(Default)]
pub struct SimStore {
    inner: MemoryStore,
    log: Mutex<Vec<CommitRecord>>,
    tables: Mutex<BTreeSet<&'static str>>,
}

impl SimStore {
    /// An empty store.
    pub fn new() -> SimStore {
        SimStore::default()
    }

    /// Makes the next `n` commits fail, like a disk or database going away.
    pub fn fail_next_commits(&self, n: u32) {
        self.inner.fail_next_commits(n);
    }

    /// The commits since the last call, oldest first.
    pub fn take_log(&self) -> Vec<CommitRecord> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every table ever written, in name order.
    pub fn tables(&self) -> Vec<&'static str> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

#[async_trait]
impl Store for SimStore {
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError> {
        self.inner.get_versioned(table, key).await
    }

    async fn scan_versioned(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Row, u64)>, StoreError> {
        self.inner.scan_versioned(table, idx, after, limit).await
    }

    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.count_by_idx(table).await
    }

    async fn greatest_key(&self, table: &'static str) -> Result<orderly_engine::ports::GreatestKey, StoreError> {
        self.inner.greatest_key(table).await
    }

    async fn commit(&self, batch: Batch) -> Result<u64, StoreError> {
        let record = CommitRecord {
            inbox: batch.inbox.clone(),
            puts: batch.puts.iter().map(|r| (r.table, r.key.clone())).collect(),
        };
        let head = self.inner.commit(batch).await?;
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).extend(record.puts.iter().map(|(t, _)| *t));
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(record);
        Ok(head)
    }

    async fn outbox_after(&self, position: u64, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        self.inner.outbox_after(position, limit).await
    }

    async fn outbox_for_subject(&self, subject: &str, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        self.inner.outbox_for_subject(subject, limit).await
    }

    async fn outbox_head(&self) -> Result<u64, StoreError> {
        self.inner.outbox_head().await
    }

    async fn cursor(&self, producer: &str) -> Result<u64, StoreError> {
        self.inner.cursor(producer).await
    }

    async fn inbox_contains(&self, event_id: &str) -> Result<bool, StoreError> {
        self.inner.inbox_contains(event_id).await
    }
}
