//! A consumer's view of one producer through JetStream.

use crate::{Lane, NatsBus, POSITION_HEADER, breaker, timed};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use async_trait::async_trait;
use futures_util::StreamExt;
use orderly_domain::Timestamp;
use orderly_domain::event::Envelope;
use orderly_domain::shipping::breaker::CircuitBreaker;
use orderly_engine::bus::{EventSource, Polled};
use orderly_engine::ports::{Batch, Clock, OutboxRecord, Row, Store, StoreError};
use orderly_engine::runtime::{DEAD_LETTERS, DeadLetter};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// One fetched message, held until the batch that handled it commits.
struct Item {
    /// Local position: the order this source offers messages in.
    position: u64,
    msg: jetstream::Message,
    /// None: not for this consumer (filtered), undecodable, or given up on.
    envelope: Option<Envelope>,
    published_ms: i64,
    /// A dead letter to commit in place of handling it (`max_deliver` reached).
    dead: Option<Row>,
}

#[derive(Default)]
struct Held {
    buffer: VecDeque<Item>,
    next: u64,
    acked: u64,
    /// Dead letters this source decided on, by local position, staged into
    /// the consumer's commit by `mark`.
    dead: Vec<(u64, Row)>,
}

struct Fetcher {
    consumers: Option<[PullConsumer; 2]>,
    breaker: CircuitBreaker,
}

/// Reads one producer's events for one consumer from both lanes' durable
/// pull consumers. At-least-once: messages are acknowledged once the
/// consumer's batch that handled them (with its inbox) has committed.
pub struct JetStreamSource {
    bus: NatsBus,
    consumer: &'static str,
    producer: &'static str,
    filter: fn(&str) -> bool,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    held: Mutex<Held>,
    fetcher: tokio::sync::Mutex<Fetcher>,
    pending: AtomicU64,
    wake: watch::Receiver<u64>,
}

impl JetStreamSource {
    /// A source; the broker's consumers are created on first poll.
    pub fn new(
        bus: NatsBus,
        consumer: &'static str,
        producer: &'static str,
        filter: fn(&str) -> bool,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> JetStreamSource {
        let wake = bus.wake(producer);
        let breaker = breaker(bus.options());
        JetStreamSource {
            bus,
            consumer,
            producer,
            filter,
            store,
            clock,
            held: Mutex::new(Held::default()),
            fetcher: tokio::sync::Mutex::new(Fetcher { consumers: None, breaker }),
            pending: AtomicU64::new(0),
            wake,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch(&self, fetcher: &mut Fetcher, want: usize) -> Result<Vec<jetstream::Message>, crate::BusError> {
        if fetcher.consumers.is_none() {
            let events = self.bus.pull_consumer(self.consumer, self.producer, Lane::Events).await?;
            let priority = self.bus.pull_consumer(self.consumer, self.producer, Lane::Priority).await?;
            fetcher.consumers = Some([events, priority]);
        }
        let consumers = fetcher.consumers.as_ref().expect("consumers were just created");
        // Bulk first, then priority: a bulk event seen here was published
        // after every earlier priority event, which the second fetch then
        // sees, so merging by producer position keeps each order's events
        // in publish order; the priority lane has its own fetch budget, so a
        // bulk backlog never delays it (bulkhead).
        let mut out = Vec::new();
        for c in consumers {
            let mut batch = timed(c.fetch().max_messages(want.max(1)).messages()).await?;
            loop {
                match tokio::time::timeout(crate::OP_TIMEOUT, batch.next()).await {
                    Ok(Some(Ok(m))) => out.push(m),
                    Ok(Some(Err(e))) => return Err(crate::BusError::Unavailable(e.to_string())),
                    Ok(None) => break,
                    Err(_) => return Err(crate::BusError::Unavailable("fetch timed out".into())),
                }
            }
        }
        Ok(out)
    }

    /// Turns fetched messages into held items, oldest producer position first.
    async fn admit(&self, mut msgs: Vec<jetstream::Message>) -> Result<Vec<Item>, StoreError> {
        msgs.sort_by_key(producer_position);
        let mut items = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let (delivered, pending, published_ms) = match msg.info() {
                Ok(i) => (i.delivered, i.pending, (i.published.unix_timestamp_nanos() / 1_000_000) as i64),
                Err(_) => (1, 0, self.clock.now().millis()),
            };
            self.pending.store(pending, Ordering::Relaxed);
            let envelope = match serde_json::from_slice::<Envelope>(&msg.message.payload) {
                Ok(env) if (self.filter)(env.event_type.as_str()) => Some(env),
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(consumer = self.consumer, producer = self.producer, error = %e,
                        "undecodable message skipped");
                    None
                }
            };
            let give_up = delivered >= self.bus.options().max_deliver;
            let (envelope, dead) = match envelope {
                Some(env) if give_up && !self.store.inbox_contains(&env.id).await? => {
                    (None, Some(self.dead_letter(env, delivered)))
                }
                Some(_) if give_up => (None, None),
                other => (other, None),
            };
            items.push(Item { position: 0, msg, envelope, published_ms, dead });
        }
        Ok(items)
    }

    fn dead_letter(&self, env: Envelope, delivered: i64) -> Row {
        let letter = DeadLetter {
            id: env.id.clone(),
            consumer: self.consumer.to_owned(),
            producer: self.producer.to_owned(),
            error: format!("delivered {delivered} times by the broker without being committed (max_deliver)"),
            attempts: u32::try_from(delivered).unwrap_or(u32::MAX),
            failed_at: self.clock.now(),
            envelope: env,
        };
        tracing::warn!(consumer = self.consumer, producer = self.producer, event_id = %letter.id,
            "dead-lettered after max_deliver");
        let doc = serde_json::to_vec(&letter).expect("a dead letter always serializes");
        Row { table: DEAD_LETTERS, key: letter.id, idx: Some(self.producer.to_owned()), doc }
    }
}

fn producer_position(m: &jetstream::Message) -> u64 {
    m.message.headers.as_ref().and_then(|h| h.get(POSITION_HEADER)).and_then(|v| v.as_str().parse().ok()).unwrap_or(0)
}

#[async_trait]
impl EventSource for JetStreamSource {
    fn producer(&self) -> &'static str {
        self.producer
    }

    async fn poll(&self, max: u32) -> Result<Polled, StoreError> {
        let max = max.max(1) as usize;
        let mut fetcher = self.fetcher.lock().await;
        let (held_len, reoffered): (usize, Vec<jetstream::Message>) = {
            let held = self.held();
            (held.buffer.len(), held.buffer.iter().take(max).map(|i| i.msg.clone()).collect())
        };
        if !reoffered.is_empty() {
            // Still working on them (a retry backoff): keep them ours.
            tokio::spawn(async move {
                for m in reoffered {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            });
        }
        let now = self.clock.now();
        if held_len < max && fetcher.breaker.allow(now) {
            match self.fetch(&mut fetcher, max - held_len).await {
                Ok(msgs) => {
                    if fetcher.breaker.state_name() != "closed" {
                        tracing::info!(consumer = self.consumer, producer = self.producer, "broker reachable again");
                    }
                    fetcher.breaker.on_success(now);
                    let items = self.admit(msgs).await?;
                    let mut held = self.held();
                    let base = held.next;
                    for (i, mut item) in items.into_iter().enumerate() {
                        item.position = base + i as u64 + 1;
                        held.next = item.position;
                        if let Some(row) = item.dead.take() {
                            held.dead.push((item.position, row));
                        }
                        held.buffer.push_back(item);
                    }
                }
                Err(e) => {
                    fetcher.breaker.on_failure(now);
                    fetcher.consumers = None;
                    tracing::warn!(consumer = self.consumer, producer = self.producer,
                        breaker = fetcher.breaker.state_name(), error = %e, "fetch from the broker failed");
                }
            }
        }
        let held = self.held();
        let offered: Vec<&Item> = held.buffer.iter().take(max).collect();
        let upto = offered.last().map_or(held.acked, |i| i.position);
        let records = offered
            .iter()
            .filter_map(|i| i.envelope.clone().map(|envelope| OutboxRecord { position: i.position, envelope }))
            .collect();
        Ok(Polled { records, from: held.acked, upto })
    }

    fn mark(&self, upto: u64, batch: &mut Batch) {
        let held = self.held();
        for (position, row) in &held.dead {
            if *position <= upto {
                batch.puts.push(row.clone());
            }
        }
    }

    fn committed(&self, upto: u64) {
        let mut held = self.held();
        let mut done = Vec::new();
        while held.buffer.front().is_some_and(|i| i.position <= upto) {
            done.push(held.buffer.pop_front().expect("front exists").msg);
        }
        held.dead.retain(|(p, _)| *p > upto);
        held.acked = held.acked.max(upto);
        drop(held);
        if !done.is_empty() {
            // Fire-and-forget acks: a lost ack means a redelivery, which the
            // consumer's inbox absorbs.
            tokio::spawn(async move {
                for m in done {
                    let _ = m.ack().await;
                }
            });
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.wake.clone()
    }

    fn backlog(&self) -> u64 {
        self.pending.load(Ordering::Relaxed) + self.held().buffer.len() as u64
    }

    fn at_least_once(&self) -> bool {
        true
    }

    fn oldest_pending(&self) -> Option<Timestamp> {
        self.held().buffer.front().map(|i| Timestamp(i.published_ms))
    }
}
