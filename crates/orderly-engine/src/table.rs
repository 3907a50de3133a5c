//! A typed, bounded cache over one store table. The service that owns the
//! table is its only writer, so the cache is always true: it is filled from
//! the store on a miss, changed in place, serialized into the batch on
//! commit, and its changed entries are dropped (to be reloaded) if a commit
//! fails. Over capacity, the least recently loaded or changed entries are
//! evicted, so what a flow is working on (a new order awaiting its
//! allocation) stays cached.
//!
//! Memory stays bounded however long the engine runs: a table's entries
//! that are *settled* (a delivered order, a completed pick, a sent
//! notification: rows that will rarely be touched again) leave the cache as
//! soon as the batch that settled them (or loaded them) commits, and the
//! rest are capped at [`CACHE_ENTRIES_MAX`]. Evicted rows stay in the store
//! and are reloaded on demand. Only tables a service keeps whole in memory
//! (built with [`Table::whole`]) are never evicted.

use crate::ports::{Batch, Row, Store, StoreError};
use crate::prefetch::Reads;
use orderly_domain::ledger::{LedgerAssembly, LedgerCore, LedgerPiece, SkuLedger};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most entries a service's table cache keeps once a batch commits (what
/// a batch works on stays cached until it commits, whatever its size).
pub const CACHE_ENTRIES_MAX: usize = 20_000;
/// Most SKU ledgers the inventory service keeps cached (least recently used
/// evicted first, so a hot SKU's large ledger stays).
pub const LEDGER_CACHE_MAX: usize = 10_000;

/// A process-wide cap below every table's own capacity (see [`limit_cache_entries`]).
static CACHE_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Caps every bounded table and ledger cache of this process at `n` entries
/// (at least 1) from their next commit on. For tests: a cache must never
/// change a result, so a run with tiny caches (every entry reloaded from
/// the store again and again) must end exactly like one with large caches.
pub fn limit_cache_entries(n: usize) {
    CACHE_LIMIT.store(n.max(1), Ordering::Relaxed);
}

/// The capacity in force for a cache built with `capacity`.
fn effective(capacity: usize) -> usize {
    capacity.min(CACHE_LIMIT.load(Ordering::Relaxed))
}

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
    /// Most clean entries kept; `None` for a table kept whole in memory.
    capacity: Option<usize>,
    index: fn(&T) -> Option<String>,
    /// Entries for which this is true are evicted once their batch commits.
    settled: Option<fn(&T) -> bool>,
    /// Settled entries loaded (not changed) in the current batch.
    loaded_settled: Vec<String>,
    /// Changed entries found settled when the batch was staged: they leave
    /// the cache when it commits (found while serializing them, so the
    /// commit looks up only these, not every changed key).
    staged_settled: Vec<String>,
    /// Bytes to reserve for the next serialized document.
    doc_hint: usize,
    /// Keys known to have no row (read and not found, or declared with
    /// [`Table::known_absent`]), for a table built with
    /// [`Table::remembering_absent`]; bounded like the entries.
    absent: Option<HashSet<String>>,
}

impl<T: Serialize + DeserializeOwned + Send> Table<T> {
    /// A table cache holding at most about `capacity` clean entries (and never
    /// more than [`CACHE_ENTRIES_MAX`]); `index` gives each document's
    /// secondary index value.
    pub fn new(name: &'static str, capacity: usize, index: fn(&T) -> Option<String>) -> Table<T> {
        Table::with_capacity(name, Some(capacity.min(CACHE_ENTRIES_MAX)), index)
    }

    /// A table the service keeps whole in memory ([`Table::load_all`] at
    /// startup; small by nature, like locations): never evicted, so
    /// [`Table::iter`] sees every row.
    pub fn whole(name: &'static str, index: fn(&T) -> Option<String>) -> Table<T> {
        Table::with_capacity(name, None, index)
    }

    fn with_capacity(name: &'static str, capacity: Option<usize>, index: fn(&T) -> Option<String>) -> Table<T> {
        Table {
            name,
            entries: HashMap::new(),
            clock: 0,
            dirty: HashSet::new(),
            deleted: HashSet::new(),
            capacity,
            index,
            settled: None,
            loaded_settled: Vec::new(),
            staged_settled: Vec::new(),
            doc_hint: 256,
            absent: None,
        }
    }

    /// Remembers the keys a load found absent (and those the service
    /// declares absent with [`Table::known_absent`]), so asking again costs
    /// no read: for a table looked up far more often than it has rows (an
    /// order's parked events). Only this service may write the table (no
    /// replica shares it): a row written by anyone else would stay unseen.
    pub fn remembering_absent(mut self) -> Table<T> {
        self.absent = Some(HashSet::new());
        self
    }

    /// Declares that `key` has no row, as the caller knows without a read
    /// (a row that can only follow something created in this batch). Does
    /// nothing for a table not [remembering absent keys](Table::remembering_absent)
    /// or a key with an entry.
    pub fn known_absent(&mut self, key: &str) {
        if self.entries.contains_key(key) {
            return;
        }
        if let Some(absent) = &mut self.absent {
            absent.insert(key.to_owned());
        }
    }

    /// Whether `key` is known to have no row without a read.
    fn is_known_absent(&self, key: &str) -> bool {
        self.deleted.contains(key) || self.absent.as_ref().is_some_and(|a| a.contains(key))
    }

    /// Evicts an entry as soon as the batch that changed or loaded it
    /// commits when `settled` says the row is done with (a terminal state):
    /// it stays in the store and is reloaded if it is ever needed again.
    pub fn settled_when(mut self, settled: fn(&T) -> bool) -> Table<T> {
        if self.capacity.is_some() {
            self.settled = Some(settled);
        }
        self
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
        if self.is_known_absent(key) {
            return Ok(false);
        }
        match store.get(self.name, key).await? {
            Some(row) => {
                self.cache_loaded(row)?;
                Ok(true)
            }
            None => {
                self.known_absent(key);
                Ok(false)
            }
        }
    }

    /// Makes sure each of `keys` that exists is cached, in one read where
    /// the store reads many keys in about the time of one (PostgreSQL),
    /// else one [`Table::load`] at a time.
    pub async fn load_many(&mut self, store: &dyn Store, keys: &[&str]) -> Result<(), StoreError> {
        if !store.reads_many() {
            for key in keys {
                self.load(store, key).await?;
            }
            return Ok(());
        }
        let missing: Vec<(&'static str, &str)> = keys
            .iter()
            .filter(|k| !self.entries.contains_key(**k) && !self.is_known_absent(k))
            .map(|k| (self.name, *k))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        for (row, _) in store.get_many_versioned(&missing).await? {
            // A key named twice comes back twice.
            if !self.entries.contains_key(&row.key) {
                self.cache_loaded(row)?;
            }
        }
        for (_, key) in missing {
            self.known_absent(key);
        }
        Ok(())
    }

    fn cache_loaded(&mut self, row: Row) -> Result<(), StoreError> {
        let value = decode(self.name, &row)?;
        if self.settled.is_some_and(|settled| settled(&value)) {
            self.loaded_settled.push(row.key.clone());
        }
        self.clock += 1;
        self.entries.insert(row.key, (value, self.clock));
        Ok(())
    }

    /// Asks for `key` to be read ahead (see [`crate::prefetch`]) unless it is
    /// cached or known deleted: what a service's `event_reads` and
    /// `command_reads` hints call.
    pub fn want(&self, key: &str, reads: &mut Reads) {
        if !self.entries.contains_key(key) && !self.is_known_absent(key) {
            reads.add(self.name, key);
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
        if let Some(absent) = &mut self.absent {
            absent.remove(&key);
        }
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
        self.loaded_settled.clear();
        self.staged_settled.clear();
        if let Some(absent) = &mut self.absent {
            absent.clear();
        }
    }
}

impl<T: Serialize + DeserializeOwned + Send> Staged for Table<T> {
    fn stage(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        batch.puts.reserve(self.dirty.len());
        self.staged_settled.clear();
        for key in &self.dirty {
            let Some((value, _)) = self.entries.get(key) else { continue };
            if self.settled.is_some_and(|settled| settled(value)) {
                self.staged_settled.push(key.clone());
            }
            // Sized like the last document of this table, so most need one
            // allocation instead of a doubling series.
            let mut doc = Vec::with_capacity(self.doc_hint);
            serde_json::to_writer(&mut doc, value).map_err(|e| StoreError::Corrupt {
                table: self.name.to_owned(),
                key: key.clone(),
                detail: e.to_string(),
            })?;
            self.doc_hint = doc.len() + doc.len() / 8;
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
        self.staged_settled.clear();
        self.evict_settled(Vec::new());
    }

    fn committed(&mut self) {
        // The settled ones among the changed entries were noted at `stage`
        // (a commit always stages first); the rest stay cached.
        self.dirty.clear();
        let changed = std::mem::take(&mut self.staged_settled);
        match &mut self.absent {
            Some(absent) => {
                absent.extend(self.deleted.drain());
                if absent.len() > effective(self.capacity.unwrap_or(CACHE_ENTRIES_MAX)) {
                    // Forgetting costs a read per key asked again, never a wrong answer.
                    absent.clear();
                }
            }
            None => self.deleted.clear(),
        }
        self.evict_settled(changed);
        let Some(capacity) = self.capacity.map(effective) else { return };
        if self.entries.len() > capacity {
            // Evict the least recently used entries down to 90% of capacity
            // (all clean now): the store has them, and a later miss reloads them.
            let excess = self.entries.len() - capacity * 9 / 10;
            let mut by_age: Vec<(u64, &String)> = self.entries.iter().map(|(key, (_, used))| (*used, key)).collect();
            by_age.select_nth_unstable(excess - 1);
            let victims: Vec<String> = by_age[..excess].iter().map(|(_, key)| (*key).clone()).collect();
            for key in victims {
                self.entries.remove(&key);
            }
        }
    }
}

impl<T> Table<T> {
    /// Drops the settled entries among those the batch just changed
    /// (`changed`, all clean now) or loaded: the store has them.
    fn evict_settled(&mut self, changed: Vec<String>) {
        let loaded = std::mem::take(&mut self.loaded_settled);
        let Some(settled) = self.settled else { return };
        for key in changed.into_iter().chain(loaded) {
            if self.entries.get(&key).is_some_and(|(value, _)| settled(value)) {
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
/// with a hot SKU's backorder queue. Same contract as [`Table`]; over
/// capacity the least recently used ledgers are evicted first, so a hot
/// SKU's (large, costly to reload) ledger stays.
pub struct LedgerTable {
    /// Each ledger with when it was last loaded or changed (a logical clock).
    entries: HashMap<String, (SkuLedger, u64)>,
    clock: u64,
    dirty: HashSet<String>,
    capacity: usize,
}

impl LedgerTable {
    /// A cache holding at most about `capacity` clean ledgers (and never
    /// more than [`LEDGER_CACHE_MAX`]).
    pub fn new(capacity: usize) -> LedgerTable {
        LedgerTable {
            entries: HashMap::new(),
            clock: 0,
            dirty: HashSet::new(),
            capacity: capacity.min(LEDGER_CACHE_MAX),
        }
    }

    /// Makes sure the ledger of `sku` is cached if it exists; returns whether it exists.
    pub async fn load(&mut self, store: &dyn Store, sku: &str) -> Result<bool, StoreError> {
        self.clock += 1;
        if let Some((_, used)) = self.entries.get_mut(sku) {
            *used = self.clock;
            return Ok(true);
        }
        match read_ledger(store, sku).await? {
            Some(StoredLedger { mut ledger, whole }) => {
                if whole {
                    // Written by an older version as one document: rewrite it in pieces.
                    ledger.mark_all_changed();
                    self.dirty.insert(sku.to_owned());
                }
                self.entries.insert(sku.to_owned(), (ledger, self.clock));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A cached ledger (call [`LedgerTable::load`] first).
    pub fn get(&self, sku: &str) -> Option<&SkuLedger> {
        self.entries.get(sku).map(|(ledger, _)| ledger)
    }

    /// A cached ledger, to change; marks it changed.
    pub fn get_mut(&mut self, sku: &str) -> Option<&mut SkuLedger> {
        let (value, used) = self.entries.get_mut(sku)?;
        self.clock += 1;
        *used = self.clock;
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
        self.clock += 1;
        self.entries.insert(sku, (ledger, self.clock));
    }

    /// Every cached ledger.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &SkuLedger)> {
        self.entries.iter().map(|(sku, (ledger, _))| (sku, ledger))
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
            let Some((ledger, _)) = self.entries.get_mut(sku) else { continue };
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
        let capacity = effective(self.capacity);
        if self.entries.len() > capacity {
            // The least recently used ledgers go, down to 90% of capacity.
            let excess = self.entries.len() - capacity * 9 / 10;
            let mut by_age: Vec<(u64, &String)> = self.entries.iter().map(|(sku, (_, used))| (*used, sku)).collect();
            by_age.select_nth_unstable(excess - 1);
            let victims: Vec<String> = by_age[..excess].iter().map(|(_, sku)| (*sku).clone()).collect();
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
    // Pieces go into the ledger a page at a time: a hot SKU has one per
    // waiting line, and a list of them all would double the ledger's size.
    let mut assembly = LedgerAssembly::new(core).map_err(corrupt)?;
    let mut after: Option<String> = None;
    loop {
        let rows = store.scan(LEDGER_PIECES, Some(sku), after.as_deref(), PIECES_PAGE).await?;
        let done = rows.len() < PIECES_PAGE as usize;
        for row in &rows {
            assembly.add(decode::<LedgerPiece>(LEDGER_PIECES, row)?).map_err(corrupt)?;
        }
        after = rows.last().map(|r| r.key.clone());
        if done {
            break;
        }
    }
    let ledger = assembly.finish().map_err(corrupt)?;
    Ok(Some(StoredLedger { ledger, whole: false }))
}

/// The SKU of every ledger of an inventory store, in order.
pub async fn ledger_skus(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    let mut skus = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let rows = store.scan(LEDGERS, None, after.as_deref(), 1000).await?;
        let done = rows.len() < 1000;
        after = rows.last().map(|r| r.key.clone());
        skus.extend(rows.into_iter().map(|r| r.key));
        if done {
            return Ok(skus);
        }
    }
}

/// Reads every ledger of an inventory store, in SKU order (for checks after a
/// run: the simulator, reconciliation). A check over a store with large
/// ledgers reads them one at a time instead ([`ledger_skus`], [`read_ledger`]).
pub async fn read_all_ledgers(store: &dyn Store) -> Result<Vec<SkuLedger>, StoreError> {
    let skus = ledger_skus(store).await?;
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

    #[tokio::test]
    async fn load_many_reads_what_is_not_cached_in_one_read_where_the_store_reads_many() {
        for many in [true, false] {
            let store = if many { MemoryStore::reading_many() } else { MemoryStore::new() };
            let mut writer: Table<u32> = Table::new("things", 10, |_| None);
            for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
                writer.insert(k.into(), v);
            }
            commit(&store, &mut writer).await;
            let mut table: Table<u32> = Table::new("things", 10, |_| None);
            assert!(table.load(&store, "a").await.expect("load"));
            let before = store.reads();
            table.load_many(&store, &["a", "b", "c", "missing"]).await.expect("load_many");
            assert_eq!((table.get("a"), table.get("b"), table.get("c")), (Some(&1), Some(&2), Some(&3)));
            assert_eq!(table.get("missing"), None);
            let (point, many_reads) = (store.reads().0 - before.0, store.reads().1 - before.1);
            if many {
                assert_eq!((point, many_reads), (0, 1), "b, c and missing in one read; a was cached");
            } else {
                assert_eq!((point, many_reads), (3, 0), "one read each for b, c and missing");
            }
            // All cached or known: nothing is read.
            table.load_many(&store, &["a", "b"]).await.expect("load_many");
            assert_eq!(store.reads(), (before.0 + point, before.1 + many_reads));
        }
    }

    #[tokio::test]
    async fn a_table_remembering_absent_keys_reads_a_missing_key_once_and_sees_what_it_writes() {
        for many in [false, true] {
            let store = if many { MemoryStore::reading_many() } else { MemoryStore::new() };
            let mut table: Table<u32> = Table::new("parked", 10, |_| None).remembering_absent();
            let reads = |store: &MemoryStore| store.reads().0 + store.reads().1;
            assert!(!table.load(&store, "a").await.expect("load"));
            assert_eq!(reads(&store), 1, "the first miss reads the store");
            assert!(!table.load(&store, "a").await.expect("load"));
            table.load_many(&store, &["a"]).await.expect("load_many");
            let mut reads_ahead = Reads::default();
            table.want("a", &mut reads_ahead);
            assert!(reads_ahead.is_empty(), "a key known absent is not read ahead");
            assert_eq!(reads(&store), 1, "a key known absent is not read again");

            // Declared absent: never read.
            table.known_absent("b");
            assert!(!table.load(&store, "b").await.expect("load"));
            assert_eq!(reads(&store), 1);

            // Written here: it exists, whatever was remembered.
            table.insert("a".into(), 7);
            commit(&store, &mut table).await;
            assert_eq!(table.get("a"), Some(&7));
            table.clear();
            assert!(table.load(&store, "a").await.expect("load"), "cleared: read again, and found");

            // A rolled-back insert leaves the key unknown, read again (absent).
            table.insert("c".into(), 1);
            table.rollback();
            let before = reads(&store);
            assert!(!table.load(&store, "c").await.expect("load"));
            assert_eq!(reads(&store), before + 1);

            // A committed deletion is remembered as absent.
            table.remove("a");
            commit(&store, &mut table).await;
            let before = reads(&store);
            assert!(!table.load(&store, "a").await.expect("load"));
            assert_eq!(reads(&store), before, "deleted by this table: known absent");
            assert_eq!(store.get("parked", "a").await.expect("get"), None);
        }
    }

    #[tokio::test]
    async fn remembered_absent_keys_are_bounded_like_the_entries() {
        let store = MemoryStore::new();
        let mut table: Table<u32> = Table::new("parked", 10, |_| None).remembering_absent();
        for i in 0..11 {
            table.known_absent(&format!("k{i}"));
        }
        commit(&store, &mut table).await;
        assert!(!table.load(&store, "k0").await.expect("load"));
        assert_eq!(
            store.reads().0,
            1,
            "over capacity, what was remembered is forgotten (a read, never a wrong answer)"
        );
        // A table that does not remember absent keys reads every time.
        let mut plain: Table<u32> = Table::new("parked", 10, |_| None);
        plain.known_absent("x");
        assert!(!plain.load(&store, "x").await.expect("load"));
        assert!(!plain.load(&store, "x").await.expect("load"));
        assert_eq!(store.reads().0, 3);
    }

    async fn commit(store: &MemoryStore, table: &mut dyn Staged) {
        let mut batch = Batch::default();
        table.stage(&mut batch).expect("stage");
        store.commit(batch).await.expect("commit");
        table.committed();
    }

    /// An order-like row: settled once `done`.
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Doc {
        n: u32,
        done: bool,
    }

    #[tokio::test]
    async fn settled_entries_leave_the_cache_when_their_batch_commits_and_reload_on_demand() {
        let store = MemoryStore::new();
        let mut table: Table<Doc> = Table::new("things", 100, |_| None).settled_when(|r| r.done);
        table.insert("open".into(), Doc { n: 1, done: false });
        table.insert("born-done".into(), Doc { n: 2, done: true });
        commit(&store, &mut table).await;
        assert!(table.get("open").is_some(), "an unsettled entry stays cached");
        assert!(table.get("born-done").is_none(), "a settled entry leaves at its commit");

        // Settling an entry evicts it once its batch commits.
        table.get_mut("open").expect("cached").done = true;
        assert!(table.get("open").is_some(), "still cached until the batch commits");
        commit(&store, &mut table).await;
        assert!(table.get("open").is_none(), "settled, so evicted");

        // Loading a settled row (to answer a read) does not keep it either.
        assert!(table.load(&store, "open").await.expect("load"), "an evicted entry reloads from the store");
        assert_eq!(table.get("open"), Some(&Doc { n: 1, done: true }));
        commit(&store, &mut table).await;
        assert!(table.get("open").is_none(), "a settled row loaded by a batch leaves with it");

        // Reopened (settled → unsettled) in a batch: it stays.
        assert!(table.load(&store, "open").await.expect("load"));
        table.get_mut("open").expect("cached").done = false;
        commit(&store, &mut table).await;
        assert_eq!(table.get("open"), Some(&Doc { n: 1, done: false }), "no longer settled: cached");
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn every_bounded_table_is_capped_and_a_whole_table_is_never_evicted() {
        let store = MemoryStore::new();
        let mut bounded: Table<u32> = Table::new("bounded", usize::MAX, |_| None);
        let mut whole: Table<u32> = Table::whole("whole", |_| None);
        let n = CACHE_ENTRIES_MAX as u32 + 10;
        for i in 0..n {
            bounded.insert(format!("k{i}"), i);
            whole.insert(format!("k{i}"), i);
        }
        assert_eq!(bounded.len(), n as usize, "what a batch works on stays until it commits");
        commit(&store, &mut bounded).await;
        commit(&store, &mut whole).await;
        assert!(bounded.len() <= CACHE_ENTRIES_MAX, "{} entries cached", bounded.len());
        assert!(bounded.get(&format!("k{}", n - 1)).is_some(), "the newest entries stay");
        assert_eq!(whole.len(), n as usize, "a table kept whole keeps every row");
        assert!(bounded.load(&store, "k0").await.expect("load"), "evicted rows reload");
    }

    #[tokio::test]
    async fn the_ledger_cache_evicts_the_least_recently_used_ledgers() {
        use orderly_domain::Sku;
        let store = MemoryStore::new();
        let mut table = LedgerTable::new(10);
        let sku = |i: u32| format!("SKU-{i:02}");
        for i in 0..10 {
            table.insert(sku(i), SkuLedger::new(Sku::parse(sku(i)).expect("sku")));
        }
        commit(&store, &mut table).await;
        // The oldest ledger is used again (a hot SKU); then new SKUs push the cache over capacity.
        assert!(table.load(&store, &sku(0)).await.expect("load"));
        table.get_mut(&sku(0)).expect("cached");
        for i in 10..12 {
            table.insert(sku(i), SkuLedger::new(Sku::parse(sku(i)).expect("sku")));
        }
        commit(&store, &mut table).await;
        assert_eq!(table.len(), 9, "evicted down to 90% of capacity");
        for kept in [0, 10, 11] {
            assert!(table.get(&sku(kept)).is_some(), "{} was used last and stays cached", sku(kept));
        }
        for evicted in [1, 2, 3] {
            assert!(table.get(&sku(evicted)).is_none(), "{} was the least recently used", sku(evicted));
        }
        assert!(table.load(&store, &sku(1)).await.expect("load"), "an evicted ledger reloads from the store");
        assert!(LedgerTable::new(usize::MAX).capacity <= LEDGER_CACHE_MAX);
    }
}
