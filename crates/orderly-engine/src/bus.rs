//! The event bus as seen by a consumer: an [`EventSource`] per subscription.
//! The embedded implementation reads the producer's outbox by position and
//! stores the consumer's cursor in the consumer's own commit, so processing is
//! exactly-once; the distributed one (NATS JetStream) implements the same trait.

use crate::ports::{Batch, OutboxRecord, Store, StoreError};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::watch;

/// Committed events an embedded producer keeps in memory for its consumers
/// (the newest, contiguous by position), so a consumer that keeps up reads
/// them without a store read or a decode. Bounded; older events are read
/// from the store. Events every registered consumer has committed past are
/// dropped sooner (see [`Publisher::retain`]).
pub const TAIL_MAX: usize = 16_384;

/// Events fetched for a consumer, and how far the fetch reached in the
/// producer's log (events filtered out still advance the cursor).
#[derive(Debug, Default)]
pub struct Polled {
    /// Events to process, oldest first (shared: the embedded bus hands the
    /// producer's committed copies to every consumer).
    pub records: Vec<Arc<OutboxRecord>>,
    /// The consumer's committed position when polled.
    pub from: u64,
    /// The producer position this poll covered.
    pub upto: u64,
}

/// Up to `max` outbox records after `after`, oldest first, never past
/// `head` (what the producer announced) from a store that shows a batch
/// before it is on disk ([`Store::visible_before_synced`]); any other store
/// is read in full, since what it shows is durable (a store shared by
/// replicas holds their events past one replica's head). The embedded bus
/// and the broker relay read the outbox through it.
pub async fn outbox_announced(
    store: &dyn Store,
    after: u64,
    max: u32,
    head: u64,
) -> Result<Vec<OutboxRecord>, StoreError> {
    if !store.visible_before_synced() {
        return store.outbox_after(after, max).await;
    }
    if head <= after {
        return Ok(Vec::new());
    }
    let limit = max.min(u32::try_from(head - after).unwrap_or(u32::MAX));
    let mut records = store.outbox_after(after, limit).await?;
    records.retain(|r| r.position <= head);
    Ok(records)
}

/// One consumer's view of one producer.
#[async_trait]
pub trait EventSource: Send + Sync {
    /// The producing service's name.
    fn producer(&self) -> &'static str;
    /// Up to `max` events after what the consumer has committed (no waiting).
    async fn poll(&self, max: u32) -> Result<Polled, StoreError>;
    /// Records in `batch` that everything up to `upto` was processed.
    fn mark(&self, upto: u64, batch: &mut Batch);
    /// Called once the batch carrying the mark committed.
    fn committed(&self, upto: u64);
    /// A receiver that changes whenever the producer may have new events.
    fn changes(&self) -> watch::Receiver<u64>;
    /// Events published but not yet committed by this consumer (for lag).
    fn backlog(&self) -> u64;
    /// True when the source may deliver an event again after it was
    /// committed (a broker): the runtime then deduplicates through the
    /// consumer's inbox, in the same commit as the effect.
    fn at_least_once(&self) -> bool {
        false
    }
    /// When the oldest event waiting for this consumer was published, if the
    /// source knows (a broker source; the embedded one is read from stores).
    fn oldest_pending(&self) -> Option<orderly_domain::Timestamp> {
        None
    }
    /// The outbox position this consumer has processed up to, where the
    /// source keeps one (the embedded bus); it may be ahead of the stored
    /// cursor while only cursors moved (the runtime defers those commits).
    fn position(&self) -> Option<u64> {
        None
    }
}

/// Announces a producer's outbox head to its embedded consumers, and keeps
/// its newest committed events in memory for them (see [`TAIL_MAX`]).
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: watch::Sender<u64>,
    tail: Arc<Mutex<VecDeque<Arc<OutboxRecord>>>>,
    /// The committed cursors of the embedded consumers reading this
    /// producer (dropped consumers fall out).
    consumers: Arc<Mutex<Vec<Weak<AtomicU64>>>>,
}

impl Publisher {
    /// A publisher whose head starts at `head`.
    pub fn new(head: u64) -> Publisher {
        Publisher { tx: watch::Sender::new(head), tail: Arc::default(), consumers: Arc::default() }
    }

    /// Keeps events the producer just committed, before their head is
    /// published. `records` must be exactly the committed positions, in
    /// order; a gap from what the tail holds empties it first, so the tail
    /// is always contiguous. Events at or below every registered consumer's
    /// committed cursor are dropped (none will read them again: cursors only
    /// move forward), and never more than [`TAIL_MAX`] are kept, so the
    /// tail holds what the slowest consumer still has to read, not the
    /// newest `TAIL_MAX` whatever the consumers' lag.
    pub fn retain(&self, records: impl IntoIterator<Item = Arc<OutboxRecord>>) {
        let floor = self.consumed();
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if tail.back().is_some_and(|last| last.position + 1 != r.position) {
                tail.clear();
            }
            tail.push_back(r);
        }
        while tail.len() > TAIL_MAX || tail.front().is_some_and(|r| floor.is_some_and(|f| r.position <= f)) {
            tail.pop_front();
        }
    }

    /// Registers an embedded consumer's committed cursor.
    fn register(&self, cursor: &Arc<AtomicU64>) {
        let mut consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers.retain(|c| c.strong_count() > 0);
        consumers.push(Arc::downgrade(cursor));
    }

    /// The position every live registered consumer has committed past;
    /// `None` without any (then only [`TAIL_MAX`] bounds the tail).
    fn consumed(&self) -> Option<u64> {
        let consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers.iter().filter_map(Weak::upgrade).map(|c| c.load(Ordering::Acquire)).min()
    }

    /// Up to `max` retained events after position `after`, and the last
    /// position they cover; None when the tail does not start at or before
    /// `after + 1` or holds nothing after `after` (read the store then).
    fn retained_after(&self, after: u64, max: u32) -> Option<(Vec<Arc<OutboxRecord>>, u64)> {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let first = tail.front()?.position;
        let last = tail.back()?.position;
        if first > after + 1 || last <= after {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        let taken: Vec<Arc<OutboxRecord>> = tail.range(skip..).take(max as usize).cloned().collect();
        let upto = taken.last().map_or(after, |r| r.position);
        Some((taken, upto))
    }

    /// Tells consumers the outbox now reaches `head`.
    pub fn publish(&self, head: u64) {
        self.tx.send_if_modified(|h| {
            if head > *h {
                *h = head;
                true
            } else {
                false
            }
        });
    }

    /// The last announced head.
    pub fn head(&self) -> u64 {
        *self.tx.borrow()
    }

    /// A receiver of head changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

/// The embedded bus: a consumer reading a producer's outbox by position.
pub struct OutboxSource {
    producer: &'static str,
    store: Arc<dyn Store>,
    publisher: Publisher,
    /// Registered with the publisher, which drops what every consumer passed.
    cursor: Arc<AtomicU64>,
    filter: fn(&str) -> bool,
}

impl OutboxSource {
    /// A source over `producer`'s outbox starting after `cursor` (as stored by
    /// the consumer), delivering only event types that pass `filter`.
    pub fn new(
        producer: &'static str,
        store: Arc<dyn Store>,
        publisher: Publisher,
        cursor: u64,
        filter: fn(&str) -> bool,
    ) -> OutboxSource {
        let cursor = Arc::new(AtomicU64::new(cursor));
        publisher.register(&cursor);
        OutboxSource { producer, store, publisher, cursor, filter }
    }
}

#[async_trait]
impl EventSource for OutboxSource {
    fn producer(&self) -> &'static str {
        self.producer
    }

    async fn poll(&self, max: u32) -> Result<Polled, StoreError> {
        let after = self.cursor.load(Ordering::Acquire);
        let head = self.publisher.head();
        if head <= after {
            return Ok(Polled { records: Vec::new(), from: after, upto: after });
        }
        if let Some((retained, upto)) = self.publisher.retained_after(after, max) {
            let records = retained.into_iter().filter(|r| (self.filter)(r.envelope.event_type.as_str())).collect();
            return Ok(Polled { records, from: after, upto });
        }
        let records = outbox_announced(self.store.as_ref(), after, max, head).await?;
        let upto = records.last().map_or(after, |r| r.position);
        let records =
            records.into_iter().filter(|r| (self.filter)(r.envelope.event_type.as_str())).map(Arc::new).collect();
        Ok(Polled { records, from: after, upto })
    }

    fn mark(&self, upto: u64, batch: &mut Batch) {
        if upto > self.cursor.load(Ordering::Acquire) {
            batch.cursors.push((self.producer.to_owned(), upto));
        }
    }

    fn committed(&self, upto: u64) {
        self.cursor.fetch_max(upto, Ordering::AcqRel);
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.publisher.subscribe()
    }

    fn backlog(&self) -> u64 {
        self.publisher.head().saturating_sub(self.cursor.load(Ordering::Acquire))
    }

    fn position(&self) -> Option<u64> {
        Some(self.cursor.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_store::MemoryStore;
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};

    fn record(position: u64) -> OutboxRecord {
        let envelope = Envelope::new(
            format!("ev-{position}"),
            "/orderly/orders",
            EventType::OrderCreated,
            "o-1",
            Timestamp(0),
            position,
            serde_json::json!({}),
        );
        OutboxRecord { position, envelope }
    }

    fn ids(p: &Polled) -> Vec<String> {
        p.records.iter().map(|r| r.envelope.id.clone()).collect()
    }

    #[tokio::test]
    async fn a_consumer_that_keeps_up_reads_the_retained_events_without_the_store() {
        // The store is empty: whatever the consumer gets came from the tail.
        let publisher = Publisher::new(0);
        publisher.retain((1..=3).map(|p| Arc::new(record(p))));
        publisher.publish(3);
        let source = OutboxSource::new("orders", Arc::new(MemoryStore::new()), publisher.clone(), 1, |_| true);
        let polled = source.poll(10).await.expect("poll");
        assert_eq!(ids(&polled), ["ev-2", "ev-3"]);
        assert_eq!((polled.from, polled.upto), (1, 3));
        let limited = source.poll(1).await.expect("poll");
        assert_eq!((ids(&limited), limited.upto), (vec!["ev-2".to_owned()], 2), "at most max events");
    }

    #[tokio::test]
    async fn a_consumer_behind_the_tail_or_past_a_gap_reads_the_store() {
        let store = Arc::new(MemoryStore::new());
        let events: Vec<Envelope> = (1..=5).map(|p| record(p).envelope).collect();
        let head = store.commit(Batch { outbox: events, ..Batch::default() }).await.expect("commit");
        let publisher = Publisher::new(0);
        publisher.retain((3..=4).map(|p| Arc::new(record(p))));
        publisher.publish(head);
        let behind = OutboxSource::new("orders", store.clone(), publisher.clone(), 0, |_| true);
        assert_eq!(ids(&behind.poll(10).await.expect("poll")), ["ev-1", "ev-2", "ev-3", "ev-4", "ev-5"]);
        // The tail reaches 4; the event after it is read from the store.
        let at_end = OutboxSource::new("orders", store.clone(), publisher.clone(), 4, |_| true);
        assert_eq!(ids(&at_end.poll(10).await.expect("poll")), ["ev-5"]);
        // A gap empties the tail: it never skips a position.
        publisher.retain([Arc::new(record(6))]);
        let past_gap = OutboxSource::new("orders", store.clone(), publisher.clone(), 4, |_| true);
        assert_eq!(ids(&past_gap.poll(10).await.expect("poll")), ["ev-5"], "5 is not retained: from the store");
    }

    #[tokio::test]
    async fn the_tail_drops_what_every_consumer_has_committed() {
        let store = Arc::new(MemoryStore::new());
        let events: Vec<Envelope> = (1..=8).map(|p| record(p).envelope).collect();
        store.commit(Batch { outbox: events, ..Batch::default() }).await.expect("commit");
        let publisher = Publisher::new(0);
        let fast = OutboxSource::new("orders", store.clone(), publisher.clone(), 0, |_| true);
        let slow = OutboxSource::new("orders", store.clone(), publisher.clone(), 0, |_| true);
        publisher.retain((1..=4).map(|p| Arc::new(record(p))));
        publisher.publish(4);
        fast.committed(4);
        slow.committed(2);
        publisher.retain((5..=6).map(|p| Arc::new(record(p))));
        publisher.publish(6);
        assert_eq!(publisher.retained_after(2, 10).map(|(r, u)| (r.len(), u)), Some((4, 6)), "3.. kept for slow");
        assert!(publisher.retained_after(1, 10).is_none(), "2 was dropped: both passed it");
        assert_eq!(ids(&slow.poll(10).await.expect("poll")), ["ev-3", "ev-4", "ev-5", "ev-6"]);
        slow.committed(6);
        // A dropped consumer no longer holds events back.
        let gone = OutboxSource::new("orders", store.clone(), publisher.clone(), 0, |_| true);
        drop(gone);
        publisher.retain((7..=8).map(|p| Arc::new(record(p))));
        publisher.publish(8);
        assert_eq!(publisher.retained_after(4, 10).map(|(r, u)| (r.len(), u)), Some((4, 8)), "5.. kept for fast");
        assert!(publisher.retained_after(3, 10).is_none(), "4 was dropped: every live consumer passed it");
        assert_eq!(ids(&fast.poll(10).await.expect("poll")), ["ev-5", "ev-6", "ev-7", "ev-8"]);
        // Without consumers only TAIL_MAX bounds the tail.
        drop((fast, slow));
        publisher.retain([Arc::new(record(9))]);
        assert_eq!(publisher.retained_after(6, 10).map(|(r, u)| (r.len(), u)), Some((3, 9)));
    }

    #[test]
    fn the_tail_is_bounded() {
        let publisher = Publisher::new(0);
        publisher.retain((1..=TAIL_MAX as u64 + 10).map(|p| Arc::new(record(p))));
        let (first, _) = publisher.retained_after(0, 1).map_or((0, 0), |(r, u)| (r.len(), u));
        assert_eq!(first, 0, "the oldest were dropped");
        let (kept, upto) = publisher.retained_after(10, u32::MAX).expect("retained");
        assert_eq!((kept.len(), upto), (TAIL_MAX, TAIL_MAX as u64 + 10));
    }
}
