//! A typed, bounded cache over one store table. The service that owns the
//! table is its only writer, so the cache is always true: it is filled from
//! the store on a miss, changed in place, serialized into the batch on
//! commit, and its changed entries are dropped (to be reloaded) if a commit
//! fails. Over capacity, the least recently loaded or changed entries are
//! evicted, so what a flow is working on (a new order awaiting its
//! allocation) stays cached.

use crate::ports::{Batch, Row, Store, StoreError};
use orderly_domain::ledger::{LedgerCore, LedgerPiece, SkuLedger};
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
    /// Each entry with when it was last loaded or changed (a logical clock).
    entries: HashMap<String, (T, u64)>,
    clock: u64,
    dirty: HashSet<String>,
    deleted: HashSet<String>,
    capacity: usize,
    index: fn(&T) -> Option<String>,
}

impl<T: Serialize + DeserializeOwned + Send> Table<T> {
    /// A table cache holding at most about `capacity` clean entries; `index`
    /// gives each document's secondary index value.
    pub fn new(name: &'static str, capacity: usize, index: fn(&T) -> Option<String>) -> Table<T> {
        Table {
            name,
            entries: HashMap::new(),
            clock: 0,
            dirty: HashSet::new(),
            deleted: HashSet::new(),
            capacity,
            index,
        }
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
                self.clock += 1;
                self.entries.insert(row.key, (value, self.clock));
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
                self.clock += 1;
                self.entries.insert(row.key, (value, self.clock));
            }
            if done {
                return Ok(self.entries.len());
            }
        }
    }

    /// A cached entry (call [`Table::load`] first).
    pub fn get(&self, key: &str) -> Option<&T> {
        self.entries.get(key).map(|(value, _)| value)
    }

    /// A cached entry, to change; marks it changed.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        let (value, used) = self.entries.get_mut(key)?;
        self.clock += 1;
        *used = self.clock;
        if !self.dirty.contains(key) {
            self.dirty.insert(key.to_owned());
        }
        Some(value)
    }

    /// Inserts or replaces an entry; marks it changed.
    pub fn insert(&mut self, key: String, value: T) {
        self.deleted.remove(&key);
        self.dirty.insert(key.clone());
        self.clock += 1;
        self.entries.insert(key, (value, self.clock));
    }

    /// Deletes an entry.
    pub fn remove(&mut self, key: &str) -> Option<T> {
        self.dirty.remove(key);
        self.deleted.insert(key.to_owned());
        self.entries.remove(key).map(|(value, _)| value)
    }

    /// Every cached entry (the whole table for tables loaded with [`Table::load_all`]).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.entries.iter().map(|(key, (value, _))| (key, value))
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every cached entry, to be reloaded from the store (call it
    /// between batches: anything uncommitted is forgotten).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.dirty.clear();
        self.deleted.clear();
    }
}

impl<T: Serialize + DeserializeOwned + Send> Staged for Table<T> {
    fn stage(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        for key in &self.dirty {
            let Some((value, _)) = self.entries.get(key) else { continue };
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
            // Evict the least recently used entries down to 90% of capacity
            // (all clean now): the store has them, and a later miss reloads them.
            let excess = self.entries.len() - self.capacity * 9 / 10;
            let mut by_age: Vec<(u64, &String)> = self.entries.iter().map(|(key, (_, used))| (*used, key)).collect();
            by_age.select_nth_unstable(excess - 1);
            let victims: Vec<String> = by_age[..excess].iter().map(|(_, key)| (*key).clone()).collect();
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

    /// Makes the indexes be rebuilt from the store before next use.
    pub fn mark_stale(&mut self) {
        self.stale = true;
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

/// The table of ledger cores (one small document per SKU).
pub const LEDGERS: &str = "ledgers";
/// The table of ledger pieces: key `<sku>/<piece key>`, index value the SKU.
pub const LEDGER_PIECES: &str = "ledger_pieces";
/// Rows read per page when loading a ledger's pieces.
const PIECES_PAGE: u32 = 2000;

/// A cache of SKU ledgers stored incrementally: each commit writes a
/// ledger's small core document plus only the pieces (lines, holds,
/// backorders, done keys) that changed, so the cost of a batch does not grow
/// with a hot SKU's backorder queue. Same contract as [`Table`].
pub struct LedgerTable {
    entries: HashMap<String, SkuLedger>,
    dirty: HashSet<String>,
    capacity: usize,
}

impl LedgerTable {
    /// A cache holding at most about `capacity` clean ledgers.
    pub fn new(capacity: usize) -> LedgerTable {
        LedgerTable { entries: HashMap::new(), dirty: HashSet::new(), capacity }
    }

    /// Makes sure the ledger of `sku` is cached if it exists; returns whether it exists.
    pub async fn load(&mut self, store: &dyn Store, sku: &str) -> Result<bool, StoreError> {
        if self.entries.contains_key(sku) {
            return Ok(true);
        }
        match read_ledger(store, sku).await? {
            Some(StoredLedger { mut ledger, whole }) => {
                if whole {
                    // Written by an older version as one document: rewrite it in pieces.
                    ledger.mark_all_changed();
                    self.dirty.insert(sku.to_owned());
                }
                self.entries.insert(sku.to_owned(), ledger);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A cached ledger (call [`LedgerTable::load`] first).
    pub fn get(&self, sku: &str) -> Option<&SkuLedger> {
        self.entries.get(sku)
    }

    /// A cached ledger, to change; marks it changed.
    pub fn get_mut(&mut self, sku: &str) -> Option<&mut SkuLedger> {
        let value = self.entries.get_mut(sku)?;
        if !self.dirty.contains(sku) {
            self.dirty.insert(sku.to_owned());
        }
        Some(value)
    }

    /// Caches a ledger for a SKU that has none stored (a new SKU); every
    /// piece it has is written on commit.
    pub fn insert(&mut self, sku: String, mut ledger: SkuLedger) {
        ledger.mark_all_changed();
        self.dirty.insert(sku.clone());
        self.entries.insert(sku, ledger);
    }

    /// Every cached ledger.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &SkuLedger)> {
        self.entries.iter()
    }

    /// Number of cached ledgers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every cached ledger (between batches), to be reloaded.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.dirty.clear();
    }
}

impl Staged for LedgerTable {
    fn stage(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        for sku in &self.dirty {
            let Some(ledger) = self.entries.get_mut(sku) else { continue };
            for key in ledger.take_changes() {
                let row_key = format!("{sku}/{}", key.encode());
                match ledger.piece(&key) {
                    Some(piece) => batch.puts.push(Row {
                        table: LEDGER_PIECES,
                        idx: Some(sku.clone()),
                        doc: encode(LEDGER_PIECES, &row_key, &piece)?,
                        key: row_key,
                    }),
                    None => batch.deletes.push((LEDGER_PIECES, row_key)),
                }
            }
            let doc = encode(LEDGERS, sku, &ledger.core())?;
            batch.puts.push(Row { table: LEDGERS, key: sku.clone(), idx: None, doc });
        }
        Ok(())
    }

    fn rollback(&mut self) {
        for sku in self.dirty.drain() {
            self.entries.remove(&sku);
        }
    }

    fn committed(&mut self) {
        self.dirty.clear();
        if self.entries.len() > self.capacity {
            let excess = self.entries.len() - self.capacity * 9 / 10;
            let victims: Vec<String> = self.entries.keys().take(excess).cloned().collect();
            for sku in victims {
                self.entries.remove(&sku);
            }
        }
    }
}

/// A ledger read from a store, and whether it was stored as one whole
/// document (the format before pieces).
pub struct StoredLedger {
    /// The ledger.
    pub ledger: SkuLedger,
    /// True when it came from a whole document, not a core and pieces.
    pub whole: bool,
}

/// Reads one SKU's ledger from an inventory store (core and pieces, or a
/// whole document written by an older version).
pub async fn read_ledger(store: &dyn Store, sku: &str) -> Result<Option<StoredLedger>, StoreError> {
    let Some(row) = store.get(LEDGERS, sku).await? else { return Ok(None) };
    let corrupt = |detail: String| StoreError::Corrupt { table: LEDGERS.to_owned(), key: sku.to_owned(), detail };
    let core: LedgerCore = match serde_json::from_slice(&row.doc) {
        Ok(core) => core,
        Err(core_err) => {
            let ledger: SkuLedger = serde_json::from_slice(&row.doc)
                .map_err(|e| corrupt(format!("neither a ledger core ({core_err}) nor a whole ledger ({e})")))?;
            return Ok(Some(StoredLedger { ledger, whole: true }));
        }
    };
    let mut pieces = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let rows = store.scan(LEDGER_PIECES, Some(sku), after.as_deref(), PIECES_PAGE).await?;
        let done = rows.len() < PIECES_PAGE as usize;
        for row in &rows {
            pieces.push(decode::<LedgerPiece>(LEDGER_PIECES, row)?);
        }
        after = rows.last().map(|r| r.key.clone());
        if done {
            break;
        }
    }
    let ledger = SkuLedger::assemble(core, pieces).map_err(corrupt)?;
    Ok(Some(StoredLedger { ledger, whole: false }))
}

/// Reads every ledger of an inventory store, in SKU order (for checks after a
/// run: the benchmark, the simulator, reconciliation).
pub async fn read_all_ledgers(store: &dyn Store) -> Result<Vec<SkuLedger>, StoreError> {
    let mut skus = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let rows = store.scan(LEDGERS, None, after.as_deref(), 1000).await?;
        let done = rows.len() < 1000;
        after = rows.last().map(|r| r.key.clone());
        skus.extend(rows.into_iter().map(|r| r.key));
        if done {
            break;
        }
    }
    let mut out = Vec::with_capacity(skus.len());
    for sku in skus {
        if let Some(stored) = read_ledger(store, &sku).await? {
            out.push(stored.ledger);
        }
    }
    Ok(out)
}

fn encode<T: Serialize>(table: &str, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        table: table.to_owned(),
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_store::MemoryStore;

    #[tokio::test]
    async fn eviction_keeps_the_most_recently_used_entries() {
        let store = MemoryStore::new();
        let mut table: Table<u32> = Table::new("things", 10, |_| None);
        for i in 0..10u32 {
            table.insert(format!("k{i:02}"), i);
        }
        let mut batch = Batch::default();
        table.stage(&mut batch).expect("stage");
        store.commit(batch).await.expect("commit");
        table.committed();
        // The oldest entry is used again; then new ones push the cache over capacity.
        *table.get_mut("k00").expect("cached") += 100;
        for i in 10..12u32 {
            table.insert(format!("k{i:02}"), i);
        }
        let mut batch = Batch::default();
        table.stage(&mut batch).expect("stage");
        store.commit(batch).await.expect("commit");
        table.committed();
        assert_eq!(table.len(), 9, "evicted down to 90% of capacity");
        for kept in ["k00", "k10", "k11"] {
            assert!(table.get(kept).is_some(), "{kept} was used last and stays cached");
        }
        for evicted in ["k01", "k02", "k03"] {
            assert!(table.get(evicted).is_none(), "{evicted} was the least recently used");
        }
        assert!(table.load(&store, "k01").await.expect("load"), "an evicted entry reloads from the store");
        assert_eq!(table.get("k00"), Some(&100));
    }
}
