//! The ports: the small traits through which services reach storage, the
//! clock, randomness, carriers and webhooks. Adapters (SQLite, PostgreSQL,
//! memory, HTTP) implement them; nothing in the engine knows which.

use async_trait::async_trait;
use orderly_domain::Timestamp;
use orderly_domain::event::Envelope;
use std::sync::Mutex;

/// One stored document: a service-local table, a key, an optional secondary
/// index value (e.g. an order's state) and the document itself (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The service-local table name.
    pub table: &'static str,
    /// The document's key, unique within the table.
    pub key: String,
    /// A secondary index value to scan by (e.g. `backordered`), if any.
    pub idx: Option<String>,
    /// The document, JSON-encoded.
    pub doc: Vec<u8>,
}

/// Everything one service commits at once: state changes, the events they emit
/// (the outbox), and how far it has consumed each producer (cursors) or which
/// event ids it has processed (inbox). One batch is one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Documents to insert or replace.
    pub puts: Vec<Row>,
    /// Documents to delete, as (table, key).
    pub deletes: Vec<(&'static str, String)>,
    /// Events to append to this service's outbox, in order.
    pub outbox: Vec<Envelope>,
    /// Consumer cursors to store: (producer, last processed outbox position).
    pub cursors: Vec<(String, u64)>,
    /// Processed event ids (distributed mode's inbox). An id already in the
    /// inbox makes the commit a [`StoreError::Conflict`] (another replica
    /// handled the event first).
    pub inbox: Vec<String>,
    /// Preconditions: documents that must be at a version when the batch
    /// commits, or it is a [`StoreError::Conflict`] and nothing is written.
    pub expect: Vec<Expect>,
    /// The outbox head the batch's `emit`ted sequences were numbered after.
    /// A store shared by replicas renumbers them from its real head, so an
    /// event's sequence is always its outbox position.
    pub assumed_head: Option<u64>,
}

/// A precondition on a document's version (the number of times it was put).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The document's table.
    pub table: &'static str,
    /// The document's key.
    pub key: String,
    /// The version the document must have: 0 means it must not exist.
    pub version: u64,
}

impl Batch {
    /// True when committing this batch would change nothing.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty()
            && self.deletes.is_empty()
            && self.outbox.is_empty()
            && self.cursors.is_empty()
            && self.inbox.is_empty()
    }
}

/// Checks `expect` against the versions `current` reports (None: absent);
/// the first mismatch is a [`StoreError::Conflict`]. For stores that check
/// in memory (the memory store, SQLite inside its write transaction).
pub fn check_expectations(
    expect: &[Expect],
    mut current: impl FnMut(&'static str, &str) -> Option<u64>,
) -> Result<(), StoreError> {
    for e in expect {
        let actual = current(e.table, &e.key).unwrap_or(0);
        if actual != e.version {
            return Err(version_conflict(e, actual));
        }
    }
    Ok(())
}

/// The conflict a failed [`Expect`] reports.
pub fn version_conflict(e: &Expect, actual: u64) -> StoreError {
    StoreError::Conflict(format!(
        "document {}/{} is at version {actual}, the batch expected {}",
        e.table, e.key, e.version
    ))
}

/// An event in a producer's outbox, with its position (1, 2, 3, …).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// Position in the producer's outbox, strictly increasing from 1.
    pub position: u64,
    /// The event.
    pub envelope: Envelope,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed what this batch depends on; retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store could not be reached or failed; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored document could not be decoded: a bug or a foreign write.
    #[error("corrupt document {table}/{key}: {detail}")]
    Corrupt {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// What went wrong.
        detail: String,
    },
}

/// What [`Store::greatest_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GreatestKey {
    /// The store cannot tell cheaply.
    Unknown,
    /// The table has no rows.
    Empty,
    /// Every key of the table is at most this one, in byte order.
    Key(String),
}

/// When a commit written by [`Store::commit_visible`] is on disk.
#[derive(Debug, Clone)]
pub enum Durable {
    /// Already.
    Now,
    /// Once the store's syncs reach `seq` (the number of its commits written
    /// so far when this one was).
    After {
        /// The commits the store has synced, in write order.
        synced: tokio::sync::watch::Receiver<u64>,
        /// This commit's number.
        seq: u64,
    },
}

impl Durable {
    /// Commit `seq` of a store that publishes its synced count on
    /// `synced`; [`Durable::Now`] for a store that syncs in its commit (`None`).
    pub fn at(synced: Option<tokio::sync::watch::Receiver<u64>>, seq: u64) -> Durable {
        match synced {
            Some(synced) => Durable::After { synced, seq },
            None => Durable::Now,
        }
    }

    /// Whether the commit is on disk already.
    pub fn is_done(&self) -> bool {
        match self {
            Durable::Now => true,
            Durable::After { synced, seq } => *synced.borrow() >= *seq,
        }
    }

    /// Waits until the commit is on disk: true then. False if the store
    /// stopped syncing first (it was dropped): then nothing that depends on
    /// the commit may be acknowledged. A store whose sync fails stops the
    /// process (nothing written after it can be trusted).
    pub async fn wait(self) -> bool {
        match self {
            Durable::Now => true,
            Durable::After { mut synced, seq } => synced.wait_for(|s| *s >= seq).await.is_ok(),
        }
    }

    /// `head` once the commit is on disk: [`Store::commit`] of a store
    /// built on [`Store::commit_visible`].
    pub async fn then_head(self, head: u64) -> Result<u64, StoreError> {
        match self.wait().await {
            true => Ok(head),
            false => Err(StoreError::Unavailable("the store closed before the commit was synced".into())),
        }
    }
}

/// A service's own storage. Every service has its own instance (its own
/// SQLite file or PostgreSQL database); no service reads another's.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one document.
    async fn get(&self, table: &'static str, key: &str) -> Result<Option<Row>, StoreError> {
        Ok(self.get_versioned(table, key).await?.map(|(row, _)| row))
    }
    /// Reads one document with its version (1 when first put, +1 per put).
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError>;
    /// Reads the documents of `keys`, as (table, key), with their versions;
    /// those absent are left out. The default reads one key after another;
    /// a store where one read of many costs about what one read of one does
    /// (a server a round trip away) reads them at once and says so in
    /// [`Store::reads_many`].
    async fn get_many_versioned(&self, keys: &[(&'static str, &str)]) -> Result<Vec<(Row, u64)>, StoreError> {
        let mut found = Vec::new();
        for (table, key) in keys {
            found.extend(self.get_versioned(table, key).await?);
        }
        Ok(found)
    }
    /// True when [`Store::get_many_versioned`] reads many keys in about the
    /// time of one (then the runtime reads what a batch's handlers will need
    /// before they run: see `Service::event_reads`).
    fn reads_many(&self) -> bool {
        false
    }
    /// [`Store::scan`] with each document's version.
    async fn scan_versioned(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Row, u64)>, StoreError>;
    /// Reads documents of a table in key order, optionally only those with
    /// index value `idx`, starting after key `after`, at most `limit`.
    async fn scan(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Row>, StoreError> {
        Ok(self.scan_versioned(table, idx, after, limit).await?.into_iter().map(|(row, _)| row).collect())
    }
    /// Counts documents per index value in a table.
    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError>;
    /// The greatest key of a table in byte order, where one indexed read
    /// answers it; [`GreatestKey::Unknown`] (the default) where it does not.
    async fn greatest_key(&self, table: &'static str) -> Result<GreatestKey, StoreError> {
        let _ = table;
        Ok(GreatestKey::Unknown)
    }
    /// Commits a batch atomically and durably; returns the outbox head after
    /// it. Honours `batch.expect` (all or nothing).
    async fn commit(&self, batch: Batch) -> Result<u64, StoreError>;
    /// Commits a batch atomically, returning as soon as it is written (the
    /// outbox head after it) with a [`Durable`] that resolves once the batch
    /// is on disk. A store that syncs apart from its writes lets its caller
    /// decide the next batch while this one syncs; nothing that depends on
    /// the batch may leave the process (a reply, an event to a consumer)
    /// before it resolves. By default, [`Store::commit`]: durable at once.
    async fn commit_visible(&self, batch: Batch) -> Result<(u64, Durable), StoreError> {
        Ok((self.commit(batch).await?, Durable::Now))
    }
    /// [`Store::commit_visible`], handing the batch's events back once they
    /// are written, in order: the runtime keeps a producer's newest events
    /// for its in-process consumers. A store that only reads them while
    /// writing moves them back; by default they are cloned first.
    async fn commit_visible_returning_events(&self, batch: Batch) -> Result<(u64, Durable, Vec<Envelope>), StoreError> {
        let events = batch.outbox.clone();
        let (head, durable) = self.commit_visible(batch).await?;
        Ok((head, durable, events))
    }
    /// True when a commit can be read (its outbox rows too) before it is
    /// on disk ([`Store::commit_visible`] returns before the sync): a reader
    /// of the outbox must then stop at the head its writer announced, which
    /// only counts synced batches. False by default: what a store shows is
    /// durable (a store shared by replicas holds their events beyond any
    /// one replica's head, and its relay must read them).
    fn visible_before_synced(&self) -> bool {
        false
    }
    /// Outbox records after `position`, oldest first, at most `limit`.
    async fn outbox_after(&self, position: u64, limit: u32) -> Result<Vec<OutboxRecord>, StoreError>;
    /// The events about one subject, oldest first, at most `limit`.
    async fn outbox_for_subject(&self, subject: &str, limit: u32) -> Result<Vec<OutboxRecord>, StoreError>;
    /// The last outbox position (0 when empty).
    async fn outbox_head(&self) -> Result<u64, StoreError>;
    /// This service's stored cursor for a producer (0 when none).
    async fn cursor(&self, producer: &str) -> Result<u64, StoreError>;
    /// True when an event id is in this service's inbox.
    async fn inbox_contains(&self, event_id: &str) -> Result<bool, StoreError>;
    /// Which of `event_ids` are in this service's inbox, read at once, for a
    /// store where one read of many costs about what one read of one does (a
    /// server a round trip away). `None` (the default): no such read; the
    /// caller asks [`Store::inbox_contains`] one id at a time.
    async fn inbox_contains_many(
        &self,
        event_ids: &[&str],
    ) -> Result<Option<std::collections::HashSet<String>>, StoreError> {
        let _ = event_ids;
        Ok(None)
    }
}

/// The source of time. The simulator passes a virtual clock.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
    }
}

/// The source of randomness (jitter, id entropy). The simulator seeds it.
pub trait Rng: Send + Sync + 'static {
    /// A uniformly random u64.
    fn next_u64(&self) -> u64;
}

/// A small, fast, seedable generator (SplitMix64). Not for secrets.
#[derive(Debug)]
pub struct SeededRng(Mutex<u64>);

impl SeededRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(Mutex::new(seed))
    }

    /// A generator seeded from the clock and process id.
    pub fn from_entropy() -> SeededRng {
        let t = SystemClock.now().millis() as u64;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or_default();
        SeededRng::new(t ^ (nanos << 20) ^ u64::from(std::process::id()).rotate_left(40))
    }
}

impl Rng for SeededRng {
    fn next_u64(&self) -> u64 {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Formats a UUIDv7 from a time and 74 random bits, so ids are time-ordered
/// and reproducible under a seeded [`Rng`].
pub fn uuid_v7(now: Timestamp, rng: &dyn Rng) -> String {
    let ms = (now.millis().max(0) as u64) & 0xFFFF_FFFF_FFFF;
    let r1 = rng.next_u64();
    let r2 = rng.next_u64();
    let rand_a = r1 & 0x0FFF;
    let rand_b = r2 & 0x3FFF_FFFF_FFFF_FFFF;
    // The 128 bits: 48 of time, version 7, 12 random, variant 0b10, 62
    // random. Spelled without `format!`: every event and order takes one,
    // and the formatting machinery cost more than the rest of making it.
    let hi = (ms << 16) | 0x7000 | rand_a;
    let lo = 0x8000_0000_0000_0000 | rand_b;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hi.to_be_bytes());
    bytes[8..].copy_from_slice(&lo.to_be_bytes());
    let mut id = String::with_capacity(36);
    orderly_domain::ids::push_uuid(&mut id, &bytes);
    id
}

/// A label request to a carrier.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabelRequest {
    /// Carrier id.
    pub carrier: String,
    /// Our shipment id.
    pub shipment_id: String,
    /// Destination zone.
    pub zone: String,
    /// Parcel weight in grams.
    pub weight_g: u32,
    /// Makes a retried request create no second label.
    pub idempotency_key: String,
}

/// A label the carrier created.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Label {
    /// Carrier's tracking number.
    pub tracking_number: String,
    /// Carrier id.
    pub carrier: String,
    /// What the carrier charged, decimal string.
    pub cost: String,
}

/// Why a carrier call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarrierCallError {
    /// Timed out, 5xx, 429 or a transport error: worth retrying.
    #[error("carrier unavailable: {0}")]
    Unavailable(String),
    /// The carrier refused the request (4xx): retrying will not help.
    #[error("carrier rejected the request: {0}")]
    Rejected(String),
}

/// A carrier's label API.
#[async_trait]
pub trait CarrierApi: Send + Sync + 'static {
    /// Creates (or, for a repeated idempotency key, returns) a label.
    async fn create_label(&self, req: &LabelRequest) -> Result<Label, CarrierCallError>;
}

/// Where customer notifications go (a webhook endpoint, a log).
#[async_trait]
pub trait WebhookSink: Send + Sync + 'static {
    /// Delivers one notification body; `Err` means retry later.
    async fn deliver(&self, event_id: &str, body: &[u8]) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `uuid_v7` printed with `format!` before it wrote its digits
    /// itself: ids already stored and the simulator's replays depend on the
    /// same bits coming out the same.
    fn formatted(now: Timestamp, r1: u64, r2: u64) -> String {
        let ms = (now.millis().max(0) as u64) & 0xFFFF_FFFF_FFFF;
        let rand_b = r2 & 0x3FFF_FFFF_FFFF_FFFF;
        format!(
            "{:08x}-{:04x}-7{:03x}-{:04x}-{:012x}",
            ms >> 16,
            ms & 0xFFFF,
            r1 & 0x0FFF,
            0x8000 | (rand_b >> 48),
            rand_b & 0xFFFF_FFFF_FFFF
        )
    }

    #[test]
    fn a_uuid_v7_is_spelled_as_it_always_was_and_sorts_by_time() {
        let seeds = SeededRng::new(7);
        let mut times: Vec<i64> = vec![0, 1, 0xFFFF, 0x1_0000, 1_764_000_000_000, 0xFFFF_FFFF_FFFF, -5];
        times.extend((0..2_000).map(|_| (seeds.next_u64() >> 16) as i64));
        let mut previous: Option<(i64, String)> = None;
        for t in times {
            let now = Timestamp(t);
            let (a, b) = (SeededRng::new(t as u64), SeededRng::new(t as u64));
            let id = uuid_v7(now, &a);
            assert_eq!(id, formatted(now, b.next_u64(), b.next_u64()), "time {t}");
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "7", "version 7: {id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "variant 0b10: {id}");
            let ms = t.max(0) & 0xFFFF_FFFF_FFFF;
            if let Some((earlier, earlier_id)) = &previous
                && *earlier < ms
            {
                assert!(*earlier_id < id, "{earlier_id} ({earlier}) sorts before {id} ({ms})");
            }
            previous = Some((ms, id));
        }
    }
}
