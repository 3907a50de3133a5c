//! The simulated broker: one [`SimSource`] per (consumer, producer)
//! subscription, delivering the producer's outbox at least once. The acked
//! position lives here, in the broker, not in the consumer's store, so the
//! consumer's runtime deduplicates through its inbox. Faults are armed by the
//! scheduler and applied at the next poll or ack: duplicates (an ack lost after
//! the commit, a copy inside a batch), reordering across subjects (each subject
//! keeps its order), delays (nothing, or only a prefix, is delivered for a
//! while) and outages (polls fail).

use crate::clock::VirtualClock;
use crate::rng::SimRng;
use crate::store::SimStore;
use async_trait::async_trait;
use orderly_domain::Timestamp;
use orderly_engine::bus::{EventSource, Polled};
use orderly_engine::ports::{Batch, Clock, OutboxRecord, Store, StoreError};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Faults armed on one subscription.
#[derive(Debug, Default)]
struct Armed {
    outage_until: Option<Timestamp>,
    delay_until: Option<Timestamp>,
    prefix: Option<usize>,
    reorder: bool,
    copy: bool,
    drop_acks: u32,
}

/// What a subscription has seen, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct SourceStats {
    /// Acks dropped (each means a redelivery).
    pub acks_dropped: u64,
    /// Polls refused by an outage.
    pub polls_refused: u64,
}

#[derive(Debug)]
struct State {
    acked: u64,
    armed: Armed,
    rng: SimRng,
    stats: SourceStats,
}

/// One consumer's subscription to one producer's outbox.
pub struct SimSource {
    consumer: &'static str,
    producer: &'static str,
    store: Arc<SimStore>,
    filter: fn(&str) -> bool,
    clock: Arc<VirtualClock>,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

impl SimSource {
    /// A subscription of `consumer` to `producer`'s outbox (held in `store`),
    /// delivering the event types `filter` accepts; `seed` drives its reordering.
    pub fn new(
        consumer: &'static str,
        producer: &'static str,
        store: Arc<SimStore>,
        filter: fn(&str) -> bool,
        clock: Arc<VirtualClock>,
        seed: u64,
    ) -> SimSource {
        let stream = orderly_domain::ids::fnv1a(format!("{consumer}<-{producer}").as_bytes());
        let state =
            State { acked: 0, armed: Armed::default(), rng: SimRng::new(seed, stream), stats: SourceStats::default() };
        SimSource { consumer, producer, store, filter, clock, state: Mutex::new(state), changes: watch::Sender::new(0) }
    }

    /// The consuming service.
    pub fn consumer(&self) -> &'static str {
        self.consumer
    }

    /// The producing service.
    pub fn producer(&self) -> &'static str {
        self.producer
    }

    /// The position acked by the consumer.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Counters for the report.
    pub fn stats(&self) -> SourceStats {
        self.lock().stats
    }

    /// Polls fail until `until`.
    pub fn outage(&self, until: Timestamp) {
        self.lock().armed.outage_until = Some(until);
    }

    /// Nothing is delivered until `until`.
    pub fn delay(&self, until: Timestamp) {
        self.lock().armed.delay_until = Some(until);
    }

    /// The next poll delivers at most `n` (≥ 1) events.
    pub fn prefix(&self, n: usize) {
        self.lock().armed.prefix = Some(n.max(1));
    }

    /// The next poll is reordered across subjects.
    pub fn reorder(&self) {
        self.lock().armed.reorder = true;
    }

    /// The next poll carries a copy of one of its events.
    pub fn copy(&self) {
        self.lock().armed.copy = true;
    }

    /// The next `n` acks are lost: what they acked is delivered again.
    pub fn drop_acks(&self, n: u32) {
        self.lock().armed.drop_acks += n;
    }

    /// Lifts every fault (the quiet phase).
    pub fn heal(&self) {
        self.lock().armed = Armed::default();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides what this poll does: refuse, deliver nothing, or deliver with
    /// the returned one-shot faults.
    fn plan_poll(&self) -> Result<Option<(u64, Armed, u64)>, StoreError> {
        let now = self.clock.now();
        let mut st = self.lock();
        if st.armed.outage_until.is_some_and(|t| t > now) {
            st.stats.polls_refused += 1;
            return Err(StoreError::Unavailable(format!("broker outage ({} <- {})", self.consumer, self.producer)));
        }
        if st.armed.delay_until.is_some_and(|t| t > now) {
            return Ok(None);
        }
        let once = Armed {
            prefix: st.armed.prefix.take(),
            reorder: std::mem::take(&mut st.armed.reorder),
            copy: std::mem::take(&mut st.armed.copy),
            ..Armed::default()
        };
        let noise = st.rng.next_u64();
        Ok(Some((st.acked, once, noise)))
    }
}

#[async_trait]
impl EventSource for SimSource {
    fn producer(&self) -> &'static str {
        self.producer
    }

    async fn poll(&self, max: u32) -> Result<Polled, StoreError> {
        let Some((acked, once, noise)) = self.plan_poll()? else {
            let acked = self.acked();
            return Ok(Polled { records: Vec::new(), from: acked, upto: acked });
        };
        let fetched = self.store.outbox_after(acked, max).await?;
        let Some(last) = fetched.last().map(|r| r.position) else {
            return Ok(Polled { records: Vec::new(), from: acked, upto: acked });
        };
        let mut records: Vec<OutboxRecord> =
            fetched.into_iter().filter(|r| (self.filter)(r.envelope.event_type.as_str())).collect();
        let mut upto = last;
        if let Some(n) = once.prefix.filter(|n| records.len() > *n) {
            records.truncate(n);
            upto = records.last().map_or(acked, |r| r.position);
        }
        let mut rng = SimRng::new(noise, 0);
        if once.reorder {
            records = interleave_by_subject(records, &mut rng);
        }
        if once.copy && !records.is_empty() {
            let i = rng.index(records.len());
            let at = i + 1 + rng.index(records.len() - i);
            records.insert(at, records[i].clone());
        }
        Ok(Polled { records: records.into_iter().map(Arc::new).collect(), from: acked, upto })
    }

    fn mark(&self, _upto: u64, _batch: &mut Batch) {
        // A broker's ack is not part of the consumer's commit: see `committed`.
    }

    fn committed(&self, upto: u64) {
        let mut st = self.lock();
        if st.armed.drop_acks > 0 {
            st.armed.drop_acks -= 1;
            st.stats.acks_dropped += 1;
            return;
        }
        st.acked = st.acked.max(upto);
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn backlog(&self) -> u64 {
        0
    }

    fn at_least_once(&self) -> bool {
        true
    }
}

/// A random merge of the per-subject sequences: any order across subjects,
/// the original order within each subject.
fn interleave_by_subject(records: Vec<OutboxRecord>, rng: &mut SimRng) -> Vec<OutboxRecord> {
    let mut queues: BTreeMap<String, VecDeque<OutboxRecord>> = BTreeMap::new();
    for r in records {
        queues.entry(r.envelope.subject.clone()).or_default().push_back(r);
    }
    let mut out = Vec::new();
    while !queues.is_empty() {
        let keys: Vec<String> = queues.keys().cloned().collect();
        let key = &keys[rng.index(keys.len())];
        if let Some(q) = queues.get_mut(key) {
            out.extend(q.pop_front());
            if q.is_empty() {
                queues.remove(key);
            }
        }
    }
    out
}
