//! Reading ahead what a batch will need, for a store a round trip away.
//!
//! On PostgreSQL every cache miss in a handler is a round trip, and a
//! service's handlers run one after another: a batch of 500 events whose
//! handlers each look up a key that almost never exists (an order's parked
//! events, a notification per event) costs 500 sequential round trips. Before
//! the handlers run, the runtime asks the service which documents they will
//! read ([`Reads`]: `Service::event_reads`, `Service::command_reads`), reads
//! them all in one statement ([`Store::get_many_versioned`]) and keeps the
//! answers, present and absent, in a [`Prefetched`] store that the handlers
//! read through. The hints only save time: a key not read ahead is read when
//! needed, one read ahead and never used is dropped with the batch.
//!
//! The answers are true for the whole batch: a service's store changes only
//! when the service commits, and the answers are dropped before the next
//! batch. Under a [`crate::versioned::VersionedStore`] (replicas sharing a
//! store) the read-ahead versions become commit preconditions like any read.

use crate::ports::{Batch, OutboxRecord, Row, Store, StoreError};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Most keys read in one statement (a batch reads ahead in as many as it needs).
pub const READS_PER_STATEMENT_MAX: usize = 4096;

/// The documents a batch's handlers will read: (table, key) pairs.
#[derive(Debug, Default)]
pub struct Reads {
    keys: Vec<(&'static str, String)>,
}

impl Reads {
    /// Asks for the document `key` of `table`.
    pub fn add(&mut self, table: &'static str, key: impl Into<String>) {
        self.keys.push((table, key.into()));
    }

    /// Number of keys asked for (repeats included).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when nothing was asked for.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

type Answers = HashMap<&'static str, HashMap<String, Option<(Row, u64)>>>;

/// A store that answers reads from what was read ahead for the current
/// batch, and passes everything else to the store it wraps.
pub struct Prefetched {
    inner: Arc<dyn Store>,
    answers: Mutex<Answers>,
}

impl Prefetched {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Prefetched {
        Prefetched { inner, answers: Mutex::default() }
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `reads` ahead (those not read ahead already), in as few
    /// statements as [`READS_PER_STATEMENT_MAX`] allows.
    pub async fn fetch(&self, reads: Reads) -> Result<(), StoreError> {
        let wanted: Vec<(&'static str, String)> = {
            let answers = self.answers();
            let mut seen: HashSet<(&'static str, &str)> = HashSet::new();
            reads
                .keys
                .iter()
                .filter(|(table, key)| answers.get(table).is_none_or(|t| !t.contains_key(key.as_str())))
                .filter(|(table, key)| seen.insert((table, key.as_str())))
                .map(|(table, key)| (*table, key.clone()))
                .collect()
        };
        for chunk in wanted.chunks(READS_PER_STATEMENT_MAX) {
            let keys: Vec<(&'static str, &str)> = chunk.iter().map(|(t, k)| (*t, k.as_str())).collect();
            let found = self.inner.get_many_versioned(&keys).await?;
            let mut answers = self.answers();
            for (table, key) in chunk {
                answers.entry(table).or_default().insert(key.clone(), None);
            }
            for (row, version) in found {
                let table = answers.entry(row.table).or_default();
                table.insert(row.key.clone(), Some((row, version)));
            }
        }
        Ok(())
    }

    /// Drops every answer (before each batch: the store may have changed).
    pub fn clear(&self) {
        self.answers().clear();
    }

    /// Answers held (tests).
    pub fn held(&self) -> usize {
        self.answers().values().map(HashMap::len).sum()
    }
}

#[async_trait]
impl Store for Prefetched {
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError> {
        // An answer is used once: the caller caches what it read.
        let answer = self.answers().get_mut(table).and_then(|t| t.remove(key));
        match answer {
            Some(found) => Ok(found),
            None => self.inner.get_versioned(table, key).await,
        }
    }

    async fn get_many_versioned(&self, keys: &[(&'static str, &str)]) -> Result<Vec<(Row, u64)>, StoreError> {
        self.inner.get_many_versioned(keys).await
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
        self.inner.scan_versioned(table, idx, after, limit).await
    }

    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.count_by_idx(table).await
    }

    async fn greatest_key(&self, table: &'static str) -> Result<crate::ports::GreatestKey, StoreError> {
        self.inner.greatest_key(table).await
    }

    async fn commit(&self, batch: Batch) -> Result<u64, StoreError> {
        // What was read ahead may be changed by this commit.
        self.clear();
        self.inner.commit(batch).await
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

    async fn inbox_contains_many(&self, event_ids: &[&str]) -> Result<Option<HashSet<String>>, StoreError> {
        self.inner.inbox_contains_many(event_ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_store::MemoryStore;

    fn put(table: &'static str, key: &str, doc: &str) -> Batch {
        Batch {
            puts: vec![Row { table, key: key.into(), idx: None, doc: doc.as_bytes().to_vec() }],
            ..Batch::default()
        }
    }

    #[tokio::test]
    async fn read_ahead_answers_present_and_absent_keys_once_each() {
        let inner = Arc::new(MemoryStore::new());
        inner.commit(put("a", "k1", "1")).await.expect("commit");
        let store = Prefetched::new(inner.clone());
        let mut reads = Reads::default();
        reads.add("a", "k1");
        reads.add("a", "k2");
        reads.add("a", "k1");
        store.fetch(reads).await.expect("fetch");
        assert_eq!(store.held(), 2, "one answer per distinct key, the absent one included");
        // Changed behind the answers' back (another writer): the answer
        // still says what the batch read ahead; the next read goes through.
        inner.commit(put("a", "k2", "2")).await.expect("commit");
        assert_eq!(store.get("a", "k1").await.expect("get").map(|r| r.doc), Some(b"1".to_vec()));
        assert!(store.get("a", "k2").await.expect("get").is_none(), "answered from the read-ahead");
        assert_eq!(store.held(), 0);
        assert_eq!(store.get("a", "k2").await.expect("get").map(|r| r.doc), Some(b"2".to_vec()));
    }

    #[tokio::test]
    async fn a_commit_or_a_new_batch_drops_what_was_read_ahead() {
        let inner = Arc::new(MemoryStore::new());
        let store = Prefetched::new(inner.clone());
        let mut reads = Reads::default();
        reads.add("a", "k");
        store.fetch(reads).await.expect("fetch");
        assert_eq!(store.held(), 1);
        store.commit(put("a", "k", "1")).await.expect("commit");
        assert_eq!(store.held(), 0);
        assert_eq!(store.get("a", "k").await.expect("get").map(|r| r.doc), Some(b"1".to_vec()));
        let mut reads = Reads::default();
        reads.add("a", "other");
        store.fetch(reads).await.expect("fetch");
        store.clear();
        assert_eq!(store.held(), 0);
    }
}
