//! An in-memory [`Store`] for tests and the simulator. It can "crash": a
//! crash drops nothing committed (commits are the durable state) but can be
//! made to fail the next commits, like a disk or database going away.

use crate::ports::{Batch, Durable, GreatestKey, OutboxRecord, Row, Store, StoreError, check_expectations};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[derive(Default)]
struct Inner {
    /// Each document with its version.
    docs: BTreeMap<(&'static str, String), (Row, u64)>,
    outbox: Vec<OutboxRecord>,
    cursors: HashMap<String, u64>,
    inbox: BTreeSet<String>,
    event_ids: BTreeSet<String>,
}

/// A store held in memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    fail_commits: AtomicU32,
    /// Says it reads many keys at once (as PostgreSQL does), for tests of read-ahead.
    reads_many: AtomicBool,
    /// One-key reads and many-key reads made so far.
    point_reads: AtomicU64,
    many_reads: AtomicU64,
    /// Commits that succeeded so far.
    commits: AtomicU64,
    /// Set by [`MemoryStore::syncing_on_demand`]: the commits synced so far,
    /// moved only by [`MemoryStore::sync_upto`].
    synced: Option<tokio::sync::watch::Sender<u64>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// An empty store that says it reads many keys at once
    /// ([`Store::reads_many`]), so the runtime reads ahead through it.
    pub fn reading_many() -> MemoryStore {
        let store = MemoryStore::default();
        store.reads_many.store(true, Ordering::SeqCst);
        store
    }

    /// An empty store whose commits are written at once but synced only
    /// when a test says so ([`MemoryStore::sync_upto`]): each
    /// [`Store::commit_visible`] returns a [`Durable`] waiting for it, as a
    /// store that syncs apart from its writes does.
    pub fn syncing_on_demand() -> MemoryStore {
        MemoryStore { synced: Some(tokio::sync::watch::Sender::new(0)), ..MemoryStore::default() }
    }

    /// Marks the first `n` commits synced (see [`MemoryStore::syncing_on_demand`]).
    pub fn sync_upto(&self, n: u64) {
        if let Some(synced) = &self.synced {
            synced.send_replace(n);
        }
    }

    /// One-key reads ([`Store::get_versioned`]) and many-key reads
    /// ([`Store::get_many_versioned`]) made so far.
    pub fn reads(&self) -> (u64, u64) {
        (self.point_reads.load(Ordering::SeqCst), self.many_reads.load(Ordering::SeqCst))
    }

    /// Commits that succeeded so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Makes the next `n` commits fail with [`StoreError::Unavailable`].
    pub fn fail_next_commits(&self, n: u32) {
        self.fail_commits.store(n, Ordering::SeqCst);
    }

    /// Applies a batch (the commit itself); returns the new outbox head and
    /// the commit's number.
    fn write(&self, batch: Batch) -> Result<(u64, u64), StoreError> {
        if self.fail_commits.load(Ordering::SeqCst) > 0 {
            self.fail_commits.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected commit failure".into()));
        }
        let mut inner = self.lock();
        check_expectations(&batch.expect, |table, key| inner.docs.get(&(table, key.to_owned())).map(|(_, v)| *v))?;
        let mut fresh = BTreeSet::new();
        for env in &batch.outbox {
            if inner.event_ids.contains(&env.id) || !fresh.insert(env.id.clone()) {
                return Err(StoreError::Conflict(format!("duplicate event id {}", env.id)));
            }
        }
        inner.event_ids.extend(fresh);
        for row in batch.puts {
            let slot = (row.table, row.key.clone());
            let version = inner.docs.get(&slot).map_or(0, |(_, v)| *v) + 1;
            inner.docs.insert(slot, (row, version));
        }
        for (table, key) in batch.deletes {
            inner.docs.remove(&(table, key));
        }
        for envelope in batch.outbox {
            let position = inner.outbox.len() as u64 + 1;
            inner.outbox.push(OutboxRecord { position, envelope });
        }
        for (producer, position) in batch.cursors {
            inner.cursors.insert(producer, position);
        }
        inner.inbox.extend(batch.inbox);
        let seq = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((inner.outbox.len() as u64, seq))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError> {
        self.point_reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.lock().docs.get(&(table, key.to_owned())).cloned())
    }

    async fn get_many_versioned(&self, keys: &[(&'static str, &str)]) -> Result<Vec<(Row, u64)>, StoreError> {
        self.many_reads.fetch_add(1, Ordering::SeqCst);
        let inner = self.lock();
        Ok(keys.iter().filter_map(|(table, key)| inner.docs.get(&(*table, (*key).to_owned())).cloned()).collect())
    }

    fn reads_many(&self) -> bool {
        self.reads_many.load(Ordering::SeqCst)
    }

    async fn scan_versioned(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Row, u64)>, StoreError> {
        let inner = self.lock();
        let start = (table, after.map(|a| format!("{a}\u{0}")).unwrap_or_default());
        Ok(inner
            .docs
            .range(start..)
            .take_while(|((t, _), _)| *t == table)
            .filter(|(_, (r, _))| idx.is_none() || r.idx.as_deref() == idx)
            .take(limit as usize)
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn greatest_key(&self, table: &'static str) -> Result<GreatestKey, StoreError> {
        let inner = self.lock();
        let last = inner.docs.range((table, String::new())..).take_while(|((t, _), _)| *t == table).last();
        Ok(last.map_or(GreatestKey::Empty, |((_, k), _)| GreatestKey::Key(k.clone())))
    }

    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError> {
        let inner = self.lock();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for ((t, _), (r, _)) in inner.docs.range((table, String::new())..) {
            if *t != table {
                break;
            }
            if let Some(i) = &r.idx {
                *counts.entry(i.clone()).or_insert(0) += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    async fn commit(&self, batch: Batch) -> Result<u64, StoreError> {
        let (head, durable) = self.commit_visible(batch).await?;
        durable.then_head(head).await
    }

    fn visible_before_synced(&self) -> bool {
        self.synced.is_some()
    }

    async fn commit_visible(&self, batch: Batch) -> Result<(u64, Durable), StoreError> {
        let (head, seq) = self.write(batch)?;
        Ok((head, Durable::at(self.synced.as_ref().map(|s| s.subscribe()), seq)))
    }

    async fn outbox_after(&self, position: u64, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        let inner = self.lock();
        let start = (position as usize).min(inner.outbox.len());
        Ok(inner.outbox[start..].iter().take(limit as usize).cloned().collect())
    }

    async fn outbox_for_subject(&self, subject: &str, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner.outbox.iter().filter(|r| r.envelope.subject == subject).take(limit as usize).cloned().collect())
    }

    async fn outbox_head(&self) -> Result<u64, StoreError> {
        Ok(self.lock().outbox.len() as u64)
    }

    async fn cursor(&self, producer: &str) -> Result<u64, StoreError> {
        Ok(self.lock().cursors.get(producer).copied().unwrap_or(0))
    }

    async fn inbox_contains(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().inbox.contains(event_id))
    }
}
