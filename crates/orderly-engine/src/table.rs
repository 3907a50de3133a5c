//! A typed, bounded cache over one store table. The service that owns the
//! table is its only writer, so the cache is always true: it is filled from
//! the store on a miss, changed in place, serialized into the batch on
//! commit, and its changed entries are dropped (to be reloaded) if a commit
//! fails.

use crate::ports::{Batch, Row, Store, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};

/// What a service's tables have in common, so the runtime can stage, roll
/// back and settle all of them after a batch.
pub trait Staged: Send {
    /// Serializes every changed entry into the batch.
    fn stage(&mut self, batch: &mut Batch) -> Result<(), StoreError>;
    /// Forgets every uncommitted change (the store still has the truth).
    fn rollback(&mut self);
    /// Marks staged changes as committed; may evict clean entries.
    fn committed(&mut self);
}

/// A typed cache over one table of a service's store.
pub struct Table<T> {
    name: &'static str,
    entries: HashMap<String, T>,
    dirty: HashSet<String>,
    deleted: HashSet<String>,
    capacity: usize,
    index: fn(&T) -> Option<String>,
}

impl<T: Serialize + DeserializeOwned + Send> Table<T> {
    /// A table cache holding at most about `capacity` clean entries; `index`
    /// gives each document's secondary index value.
    pub fn new(name: &'static str, capacity: usize, index: fn(&T) -> Option<String>) -> Table<T> {
        Table { name, entries: HashMap::new(), dirty: HashSet::new(), deleted: HashSet::new(), capacity, index }
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Makes sure `key` is cached if it exists; returns whether it exists.
    pub async fn load(&mut self, store: &dyn Store, key: &str) -> Result<bool, StoreError> {
        if self.entries.contains_key(key) {
            return Ok(true);
        }
        if self.deleted.contains(key) {
            return Ok(false);
        }
        match store.get(self.name, key).await? {
            Some(row) => {
                let value = decode(self.name, &row)?;
                self.entries.insert(row.key, value);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Loads every document of the table (for tables a service keeps whole in memory).
    pub async fn load_all(&mut self, store: &dyn Store) -> Result<usize, StoreError> {
        const PAGE: u32 = 1000;
        let mut after: Option<String> = None;
        loop {
            let rows = store.scan(self.name, None, after.as_deref(), PAGE).await?;
            let done = rows.len() < PAGE as usize;
            for row in rows {
                let value = decode(self.name, &row)?;
                after = Some(row.key.clone());
                self.entries.insert(row.key, value);
            }
            if done {
                return Ok(self.entries.len());
            }
        }
    }

    /// A cached entry (call [`Table::load`] first).
    pub fn get(&self, key: &str) -> Option<&T> {
        self.entries.get(key)
    }

    /// A cached entry, to change; marks it changed.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        let value = self.entries.get_mut(key)?;
        if !self.dirty.contains(key) {
            self.dirty.insert(key.to_owned());
        }
        Some(value)
    }

    /// Inserts or replaces an entry; marks it changed.
    pub fn insert(&mut self, key: String, value: T) {
        self.deleted.remove(&key);
        self.dirty.insert(key.clone());
        self.entries.insert(key, value);
    }

    /// Deletes an entry.
    pub fn remove(&mut self, key: &str) -> Option<T> {
        self.dirty.remove(key);
        self.deleted.insert(key.to_owned());
        self.entries.remove(key)
    }

    /// Every cached entry (the whole table for tables loaded with [`Table::load_all`]).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.entries.iter()
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<T: Serialize + DeserializeOwned + Send> Staged for Table<T> {
    fn stage(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        for key in &self.dirty {
            let Some(value) = self.entries.get(key) else { continue };
            let doc = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
                table: self.name.to_owned(),
                key: key.clone(),
                detail: e.to_string(),
            })?;
            batch.puts.push(Row { table: self.name, key: key.clone(), idx: (self.index)(value), doc });
        }
        for key in &self.deleted {
            batch.deletes.push((self.name, key.clone()));
        }
        Ok(())
    }

    fn rollback(&mut self) {
        for key in self.dirty.drain() {
            self.entries.remove(&key);
        }
        self.deleted.clear();
    }

    fn committed(&mut self) {
        self.dirty.clear();
        self.deleted.clear();
        if self.entries.len() > self.capacity {
            // Evict arbitrary clean entries down to 90% of capacity: the store
            // has them, and a later miss reloads them.
            let excess = self.entries.len() - self.capacity * 9 / 10;
            let victims: Vec<String> = self.entries.keys().take(excess).cloned().collect();
            for key in victims {
                self.entries.remove(&key);
            }
        }
    }
}

/// Marks in-memory indexes a service builds over its rows (queues,
/// schedules, whole-table caches) as stale when a commit fails: unlike a
/// [`Table`] they cannot roll back, so the service rebuilds them from the
/// store before it trusts them again.
#[derive(Debug, Default)]
pub struct IndexGuard {
    stale: bool,
}

impl IndexGuard {
    /// A guard whose indexes are not built yet.
    pub fn unbuilt() -> IndexGuard {
        IndexGuard { stale: true }
    }

    /// Whether the indexes must be rebuilt from the store.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Records that the indexes were just rebuilt from the store.
    pub fn rebuilt(&mut self) {
        self.stale = false;
    }
}

impl Staged for IndexGuard {
    fn stage(&mut self, _batch: &mut Batch) -> Result<(), StoreError> {
        Ok(())
    }

    fn rollback(&mut self) {
        self.stale = true;
    }

    fn committed(&mut self) {}
}

fn decode<T: DeserializeOwned>(table: &str, row: &Row) -> Result<T, StoreError> {
    serde_json::from_slice(&row.doc).map_err(|e| StoreError::Corrupt {
        table: table.to_owned(),
        key: row.key.clone(),
        detail: e.to_string(),
    })
}
