//! Optimistic concurrency for a service whose replicas share one store: a
//! [`Store`] wrapper that remembers the version of every document it read
//! and makes each commit expect it, so a batch decided on a stale copy of a
//! row (another replica changed it since) is a [`StoreError::Conflict`]:
//! the runtime rolls the caches back (the changed rows are reloaded) and
//! the inputs are tried again. The stores check the versions inside the
//! commit, so two replicas can never both take the same unit of stock.
//!
//! A document read as absent, or written without being read first (a key
//! new by construction), is expected absent; so forgetting versions is
//! always safe: a row whose version was forgotten costs one conflict, after
//! which its cache reloads it. Dead letters are the one exception, written
//! as they are.

use crate::ports::{Batch, Expect, OutboxRecord, Row, Store, StoreError};
use crate::runtime::DEAD_LETTERS;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Versions remembered before they are all forgotten (and relearned).
pub const VERSIONS_MAX: usize = 500_000;

/// A store that turns what was read into commit preconditions.
pub struct VersionedStore {
    inner: Arc<dyn Store>,
    versions: Mutex<HashMap<(&'static str, String), u64>>,
    overflow: std::sync::atomic::AtomicBool,
}

impl VersionedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>) -> VersionedStore {
        VersionedStore { inner, versions: Mutex::default(), overflow: Default::default() }
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, HashMap<(&'static str, String), u64>> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the version a read saw, unless one is remembered already:
    /// a cache keeps its copy when the same row is read again around it (a
    /// scan), and the version must stay the one of the copy. An older
    /// version can only cost a conflict; a newer one could let a stale copy
    /// overwrite a change.
    fn learn(&self, table: &'static str, key: &str, version: u64) {
        let mut v = self.versions();
        if v.len() >= VERSIONS_MAX {
            // Unknown rows are expected absent, so a row not learnt costs a
            // conflict, never a lost update; the service drops its caches
            // and these versions together at its next step.
            self.overflow.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        v.entry((table, key.to_owned())).or_insert(version);
    }

    /// True (once) when the versions outgrew [`VERSIONS_MAX`]: time to drop
    /// the caches and [`VersionedStore::forget`].
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets every version. Only together with dropping every cached copy
    /// of the rows (see `Service::drop_shared`).
    pub fn forget(&self) {
        self.versions().clear();
    }

    /// Versions remembered (tests, metrics).
    pub fn remembered(&self) -> usize {
        self.versions().len()
    }
}

#[async_trait]
impl Store for VersionedStore {
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError> {
        let found = self.inner.get_versioned(table, key).await?;
        self.learn(table, key, found.as_ref().map_or(0, |(_, v)| *v));
        Ok(found)
    }

    async fn get_many_versioned(&self, keys: &[(&'static str, &str)]) -> Result<Vec<(Row, u64)>, StoreError> {
        let found = self.inner.get_many_versioned(keys).await?;
        let versions: HashMap<(&str, &str), u64> =
            found.iter().map(|(row, v)| ((row.table, row.key.as_str()), *v)).collect();
        for (table, key) in keys {
            self.learn(table, key, versions.get(&(*table, *key)).copied().unwrap_or(0));
        }
        Ok(found)
    }

    fn reads_many(&self) -> bool {
        self.inner.reads_many()
    }

    async fn scan_versioned(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Row, u64)>, StoreError> {
        let rows = self.inner.scan_versioned(table, idx, after, limit).await?;
        for (row, v) in &rows {
            self.learn(table, &row.key, *v);
        }
        Ok(rows)
    }

    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.count_by_idx(table).await
    }

    async fn greatest_key(&self, table: &'static str) -> Result<crate::ports::GreatestKey, StoreError> {
        self.inner.greatest_key(table).await
    }

    async fn commit(&self, mut batch: Batch) -> Result<u64, StoreError> {
        let touched: Vec<(&'static str, String, bool)> = batch
            .puts
            .iter()
            .map(|r| (r.table, r.key.clone(), true))
            .chain(batch.deletes.iter().map(|(t, k)| (*t, k.clone(), false)))
            .collect();
        {
            let mut known = self.versions();
            let mut seen = std::collections::HashSet::new();
            for (table, key, put) in &touched {
                if !seen.insert((*table, key.as_str())) || *table == DEAD_LETTERS {
                    continue;
                }
                let slot = (*table, key.clone());
                let version = match known.get(&slot) {
                    Some(v) => *v,
                    None if *put => {
                        known.insert(slot, 0);
                        0
                    }
                    None => continue,
                };
                batch.expect.push(Expect { table, key: key.clone(), version });
            }
        }
        let result = self.inner.commit(batch).await;
        let mut known = self.versions();
        match &result {
            Ok(_) => {
                // A key put several times is written once (one version
                // more); a key deleted anywhere in the batch ends absent.
                let mut after: HashMap<(&'static str, String), bool> = HashMap::new();
                for (table, key, put) in touched {
                    let deleted = after.entry((table, key)).or_insert(false);
                    *deleted |= !put;
                }
                for (slot, deleted) in after {
                    match (deleted, known.get(&slot).copied()) {
                        (true, _) => {
                            known.insert(slot, 0);
                        }
                        (false, Some(v)) => {
                            known.insert(slot, v + 1);
                        }
                        (false, None) => {}
                    }
                }
            }
            Err(_) => {
                // Whatever this batch touched is reloaded by the caches'
                // rollback; its versions are learnt again then.
                for (table, key, _) in touched {
                    known.remove(&(table, key));
                }
            }
        }
        result
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

    async fn inbox_contains_many(
        &self,
        event_ids: &[&str],
    ) -> Result<Option<std::collections::HashSet<String>>, StoreError> {
        self.inner.inbox_contains_many(event_ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_store::MemoryStore;

    fn put(key: &str, doc: &str) -> Batch {
        Batch {
            puts: vec![Row { table: "t", key: key.into(), idx: None, doc: doc.as_bytes().to_vec() }],
            ..Batch::default()
        }
    }

    #[tokio::test]
    async fn two_writers_on_one_store_cannot_both_update_from_the_same_read() {
        let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let (a, b) = (VersionedStore::new(shared.clone()), VersionedStore::new(shared.clone()));
        a.commit(put("stock", "10")).await.expect("a creates");
        // Both read version 1, both decide on it.
        assert!(a.get("t", "stock").await.expect("a reads").is_some());
        assert!(b.get("t", "stock").await.expect("b reads").is_some());
        a.commit(put("stock", "9")).await.expect("a's update wins");
        let lost = b.commit(put("stock", "9")).await;
        assert!(matches!(lost, Err(StoreError::Conflict(_))), "b decided on a stale copy: {lost:?}");
        // b reloads (as its cache's rollback makes it) and then succeeds.
        assert_eq!(b.get("t", "stock").await.expect("reload").expect("row").doc, b"9");
        b.commit(put("stock", "8")).await.expect("b's retry on the fresh copy");
        // a's own next write knows its version moved on: its copy is stale now.
        assert!(matches!(a.commit(put("stock", "7")).await, Err(StoreError::Conflict(_))));
    }

    #[tokio::test]
    async fn a_key_written_unread_is_expected_absent_and_known_after() {
        let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let (a, b) = (VersionedStore::new(shared.clone()), VersionedStore::new(shared.clone()));
        a.commit(put("task", "queued")).await.expect("a creates the task without reading");
        assert!(b.get("t", "task").await.expect("b reads").is_some());
        b.commit(put("task", "assigned to b")).await.expect("b assigns it");
        let lost = a.commit(put("task", "assigned to a")).await;
        assert!(matches!(lost, Err(StoreError::Conflict(_))), "a's copy is stale: {lost:?}");
        assert!(
            b.commit(put("new", "x")).await.is_ok() && a.commit(put("new", "y")).await.is_err(),
            "a key two writers both create unread: the second conflicts"
        );
    }

    #[tokio::test]
    async fn read_as_absent_means_expected_absent() {
        let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let (a, b) = (VersionedStore::new(shared.clone()), VersionedStore::new(shared.clone()));
        assert!(a.get("t", "sku").await.expect("read").is_none());
        assert!(b.get("t", "sku").await.expect("read").is_none());
        a.commit(put("sku", "new")).await.expect("a creates it");
        assert!(matches!(b.commit(put("sku", "other")).await, Err(StoreError::Conflict(_))), "b would overwrite");
        // Its own writes keep a writer's versions current.
        a.commit(put("sku", "again")).await.expect("a knows version 1");
        assert_eq!(a.remembered(), 1);
        a.forget();
        assert_eq!(a.remembered(), 0);
    }
}
