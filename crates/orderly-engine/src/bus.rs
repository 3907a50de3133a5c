//! The event bus as seen by a consumer: an [`EventSource`] per subscription.
//! The embedded implementation reads the producer's outbox by position and
//! stores the consumer's cursor in the consumer's own commit, so processing is
//! exactly-once; the distributed one (NATS JetStream) implements the same trait.

use crate::ports::{Batch, OutboxRecord, Store, StoreError};
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

/// Events fetched for a consumer, and how far the fetch reached in the
/// producer's log (events filtered out still advance the cursor).
#[derive(Debug, Default)]
pub struct Polled {
    /// Events to process, oldest first.
    pub records: Vec<OutboxRecord>,
    /// The consumer's committed position when polled.
    pub from: u64,
    /// The producer position this poll covered.
    pub upto: u64,
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
}

/// Announces a producer's outbox head to its embedded consumers.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: watch::Sender<u64>,
}

impl Publisher {
    /// A publisher whose head starts at `head`.
    pub fn new(head: u64) -> Publisher {
        Publisher { tx: watch::Sender::new(head) }
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
    cursor: AtomicU64,
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
        OutboxSource { producer, store, publisher, cursor: AtomicU64::new(cursor), filter }
    }
}

#[async_trait]
impl EventSource for OutboxSource {
    fn producer(&self) -> &'static str {
        self.producer
    }

    async fn poll(&self, max: u32) -> Result<Polled, StoreError> {
        let after = self.cursor.load(Ordering::Acquire);
        if self.publisher.head() <= after {
            return Ok(Polled { records: Vec::new(), from: after, upto: after });
        }
        let records = self.store.outbox_after(after, max).await?;
        let upto = records.last().map_or(after, |r| r.position);
        let records = records.into_iter().filter(|r| (self.filter)(r.envelope.event_type.as_str())).collect();
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
}
