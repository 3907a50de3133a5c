//! Orderly's distributed event bus over NATS JetStream.
//!
//! - Two streams per deployment prefix: `<prefix>_events` (bulk) and
//!   `<prefix>_priority` (events marked `priority: high`, i.e. `same_day`
//!   orders). Each consumer reads both through its own durable pull
//!   consumers, so a bulk backlog cannot starve same-day work (bulkhead).
//! - Subjects are `<prefix>.<producer>.<lane>.<audience>.<partition>`, the
//!   partition a hash of the event's subject (the order id), so an order's
//!   events stay in one partition, in publish order. The audience is one
//!   token per engine service ([`SERVICES`] order): `1` when that service
//!   subscribes to the event's type from this producer, else `0`
//!   ([`audience`]). A service's durable consumers filter on their own
//!   token, so the broker delivers each service only what it handles: in a
//!   flash sale about a quarter of what it would deliver without (each
//!   order event went to all five other services).
//! - A relay per producing service reads its outbox after commit and
//!   publishes each event with `Nats-Msg-Id` = event id (the broker drops a
//!   duplicate inside its window) and `Orderly-Position` = outbox position.
//!   Its position is stored in the producer's own store (cursor
//!   [`RELAY_CURSOR`]); a failed publish is retried from there, so the
//!   outbox buffers while the broker is down, behind a circuit breaker.
//! - JetStream may acknowledge before fsync: the outbox stays the source of
//!   truth for a retention horizon, and [`NatsBus::republish`] sends a
//!   producer's events again from any position after broker data loss.
//! - Consumers ([`JetStreamSource`]) are at-least-once: the runtime
//!   deduplicates through the consumer's inbox in the same commit as the
//!   effect, and messages are acknowledged only after that commit. A failed
//!   event is retried by the runtime in order (the rest of the fetch is kept
//!   and re-offered, with in-progress acks); a message JetStream has
//!   delivered `max_deliver` times (a consumer that crashed on it each time)
//!   is dead-lettered into the consumer's store instead of being processed.
//! - A replica starting on a consumer (a process restarting, a partition
//!   taken over) whose messages are pending acknowledgement with a process
//!   that died rewinds it to its ack floor
//!   ([`NatsBus::rewound_pull_consumer`]): those messages come again first
//!   and in order, not after `ack_wait` behind newer ones.

mod relay;
mod source;

pub use relay::RELAY_CURSOR;
pub use source::JetStreamSource;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use orderly_domain::event::{Envelope, EventType};
use orderly_engine::app::subscriptions;
use orderly_engine::broker::{Broker, EventFilter};
use orderly_engine::bus::EventSource;
pub use orderly_engine::engine::SERVICES;
use orderly_engine::partitions::Ownership;
use orderly_engine::ports::{Batch, Clock, OutboxRecord, Row, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The table, in a consumer's store, of its durable consumers' rewinds
/// (see [`NatsBus::rewound_pull_consumer`]), keyed by durable name.
pub const REWINDS: &str = "bus_rewinds";

/// The last rewind of one durable consumer.
#[derive(Debug, Serialize, Deserialize)]
struct RewindRow {
    /// The ack floor it was rewound to.
    floor: u64,
    /// Rewinds in a row to this floor.
    rewinds: i64,
}

/// A durable consumer created again from its ack floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    /// The durable consumer's name.
    pub consumer: String,
    /// Every message up to this stream sequence was acknowledged.
    pub floor: u64,
    /// The last stream sequence handed out before the rewind: the messages
    /// after `floor` up to this one are delivered again.
    pub upto: u64,
    /// Rewinds in a row to this floor: the deliveries of those messages
    /// the broker no longer counts.
    pub rewinds: i64,
}

/// Suffix of every durable consumer's name: the version of the subject
/// layout its filter is written for (see [`NatsBus::durable_name`]).
pub const LAYOUT: &str = "v2";

/// The audience tokens of an event of `event_type` from `producer`: for each
/// engine service, in [`SERVICES`] order, `1` when its subscriptions take
/// that type from that producer (`app::subscriptions`), else `0`. Joined
/// by dots: `0.0.1.1.0.1` is for picking, packing and notifications.
pub fn audience(producer: &str, event_type: &str) -> String {
    let mut tokens = String::with_capacity(2 * SERVICES.len());
    for (i, service) in SERVICES.iter().enumerate() {
        if i > 0 {
            tokens.push('.');
        }
        let wants = subscriptions(service).iter().any(|(p, wants)| *p == producer && wants(event_type));
        tokens.push(if wants { '1' } else { '0' });
    }
    tokens
}

/// Where `consumer`'s token is in the audience, when the broker may filter
/// its deliveries from `producer` by it: an engine service whose `filter`
/// takes exactly what its subscription table says, type for type (what
/// the producer marks). Any other reader (a test's, a filter of its own)
/// gets `None`: every event of the producer, filtered on this side.
pub fn interest(consumer: &str, producer: &str, filter: EventFilter) -> Option<usize> {
    let index = SERVICES.iter().position(|s| *s == consumer)?;
    let (_, table) = subscriptions(consumer).iter().find(|(p, _)| *p == producer)?;
    EventType::ALL.iter().all(|t| filter(t.as_str()) == table(t.as_str())).then_some(index)
}

/// The header carrying the event's position in its producer's outbox.
pub const POSITION_HEADER: &str = "Orderly-Position";

/// Most messages a durable consumer has out unacknowledged: what a consumer
/// holds ahead stays well inside `ack_wait`, so a slow consumer is not
/// mistaken for a crashing one.
pub const MAX_ACK_PENDING: i64 = 1024;

/// Longest a single broker operation may take before it counts as a failure.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// The two lanes (streams) events travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Everything not marked high priority.
    Events,
    /// Events marked `priority: high` (same-day orders).
    Priority,
}

impl Lane {
    /// Both lanes.
    pub const ALL: [Lane; 2] = [Lane::Events, Lane::Priority];

    /// The subject token and stream suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Events => "events",
            Lane::Priority => "priority",
        }
    }

    /// The lane an event travels in.
    pub fn of(env: &Envelope) -> Lane {
        if env.priority.as_deref() == Some("high") { Lane::Priority } else { Lane::Events }
    }
}

/// How the bus is set up.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port`.
    pub url: String,
    /// Names streams, subjects and nothing else: one deployment per prefix.
    pub prefix: String,
    /// Subject partitions per producer and lane.
    pub partitions: u32,
    /// Deliveries of one message before it is dead-lettered.
    pub max_deliver: i64,
    /// How long a fetched, unacknowledged message is kept from others.
    pub ack_wait: Duration,
    /// How long the broker remembers a `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// How long the broker keeps events (the outbox keeps them at least as long).
    pub max_age: Duration,
    /// Failures in a row that open the broker circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe.
    pub breaker_cooldown: Duration,
    /// Most events the relay publishes before waiting for their acks.
    pub publish_batch: u32,
}

impl NatsOptions {
    /// Defaults for `url` under `prefix`.
    pub fn new(url: &str, prefix: &str) -> NatsOptions {
        NatsOptions {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            partitions: 16,
            max_deliver: 10,
            ack_wait: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(2),
            publish_batch: 1024,
        }
    }
}

/// Why the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The options are unusable.
    #[error("invalid bus configuration: {0}")]
    Config(String),
    /// The broker could not be reached or refused an operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl From<BusError> for StoreError {
    fn from(e: BusError) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// The JetStream bus: a connection, and what is created on it.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsOptions,
    streams_ready: tokio::sync::Mutex<bool>,
}

impl NatsBus {
    /// Connects to `opts.url`. The connection retries in the background, so
    /// this succeeds while the broker is down; streams and consumers are
    /// created (idempotently) on first use.
    pub async fn connect(opts: NatsOptions) -> Result<NatsBus, BusError> {
        let prefix_ok = !opts.prefix.is_empty()
            && opts.prefix.len() <= 32
            && opts.prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !prefix_ok {
            return Err(BusError::Config(format!("prefix {:?}: 1 to 32 of A-Z a-z 0-9 _ -", opts.prefix)));
        }
        if opts.partitions == 0 || opts.max_deliver < 2 || opts.publish_batch == 0 {
            return Err(BusError::Config("partitions, publish_batch > 0 and max_deliver >= 2".into()));
        }
        let url = opts.url.strip_prefix("nats://").unwrap_or(&opts.url).to_owned();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(OP_TIMEOUT))
            .max_reconnects(None)
            .connect(url.as_str())
            .await
            .map_err(|e| BusError::Config(format!("nats url {:?}: {e}", opts.url)))?;
        let js = jetstream::new(client.clone());
        Ok(NatsBus { inner: Arc::new(Inner { client, js, opts, streams_ready: tokio::sync::Mutex::new(false) }) })
    }

    /// The options.
    pub fn options(&self) -> &NatsOptions {
        &self.inner.opts
    }

    /// The stream a lane lives in.
    pub fn stream_name(&self, lane: Lane) -> String {
        format!("{}_{}", self.inner.opts.prefix, lane.as_str())
    }

    /// The subject an event of `producer` is published on:
    /// `<prefix>.<producer>.<lane>.<audience>.<partition>`.
    pub fn subject(&self, producer: &str, env: &Envelope) -> String {
        let partition = orderly_domain::ids::fnv1a(env.subject.as_bytes()) % u64::from(self.inner.opts.partitions);
        let audience = audience(producer, env.event_type.as_str());
        format!("{}.{producer}.{}.{audience}.{partition}", self.inner.opts.prefix, Lane::of(env).as_str())
    }

    /// What a durable consumer of `producer` in `lane` takes: its own
    /// audience token set (`interest`; the others any), in one partition or
    /// all of them.
    pub fn filter_subject(
        &self,
        producer: &str,
        lane: Lane,
        interest: Option<usize>,
        partition: Option<u32>,
    ) -> String {
        let audience: Vec<&str> = (0..SERVICES.len()).map(|i| if Some(i) == interest { "1" } else { "*" }).collect();
        let partition = partition.map_or_else(|| "*".to_owned(), |p| p.to_string());
        format!("{}.{producer}.{}.{}.{partition}", self.inner.opts.prefix, lane.as_str(), audience.join("."))
    }

    /// The durable consumer name of `consumer` reading `producer` in
    /// `lane`: one for every partition (a service with one active replica),
    /// or one per partition (`-p<n>`: a service whose replicas split the
    /// partitions between them); ending in the subject layout's version
    /// ([`LAYOUT`]), since a consumer's filter is written for one layout.
    pub fn durable_name(consumer: &str, producer: &str, lane: Lane, partition: Option<u32>) -> String {
        match partition {
            None => format!("{consumer}-{producer}-{}-{LAYOUT}", lane.as_str()),
            Some(p) => format!("{consumer}-{producer}-{}-p{p}-{LAYOUT}", lane.as_str()),
        }
    }

    /// Creates both streams if they are missing, and widens the subjects of
    /// streams made for the previous layout (idempotent; cached once done).
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let mut ready = self.inner.streams_ready.lock().await;
        if *ready {
            return Ok(());
        }
        for lane in Lane::ALL {
            let config = stream::Config {
                name: self.stream_name(lane),
                subjects: vec![format!("{}.*.{}.>", self.inner.opts.prefix, lane.as_str())],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                max_age: self.inner.opts.max_age,
                duplicate_window: self.inner.opts.duplicate_window,
                ..Default::default()
            };
            let stream = timed(self.inner.js.get_or_create_stream(config.clone())).await?;
            if stream.cached_info().config.subjects != config.subjects {
                // Made by a build before the audience tokens: `<prefix>.*.<lane>.*`.
                let mut widened = stream.cached_info().config.clone();
                widened.subjects = config.subjects;
                timed(self.inner.js.update_stream(widened)).await?;
            }
        }
        *ready = true;
        Ok(())
    }

    /// The durable consumer's name and configuration.
    fn consumer_config(
        &self,
        consumer: &str,
        producer: &str,
        lane: Lane,
        interest: Option<usize>,
        partition: Option<u32>,
        deliver_policy: consumer::DeliverPolicy,
    ) -> (String, consumer::pull::Config) {
        let name = NatsBus::durable_name(consumer, producer, lane, partition);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: self.filter_subject(producer, lane, interest, partition),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy,
            ack_wait: self.inner.opts.ack_wait,
            max_deliver: self.inner.opts.max_deliver,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        (name, config)
    }

    /// A durable pull consumer of every partition or of one (created if
    /// missing, idempotent), of the events marked for `interest` (see
    /// [`interest`]; `None`: every event).
    pub async fn pull_consumer(
        &self,
        consumer: &str,
        producer: &str,
        lane: Lane,
        interest: Option<usize>,
        partition: Option<u32>,
    ) -> Result<consumer::PullConsumer, BusError> {
        self.ensure_streams().await?;
        let (name, config) =
            self.consumer_config(consumer, producer, lane, interest, partition, consumer::DeliverPolicy::All);
        let stream = timed(self.inner.js.get_stream(self.stream_name(lane))).await?;
        timed(stream.get_or_create_consumer(&name, config)).await
    }

    /// The durable pull consumer for a replica that starts consuming it (a
    /// process starting, a partition taken over): messages handed out
    /// before and never acknowledged (held by a process that died, or by a
    /// pull that was cut off) are delivered again first, in order, now.
    ///
    /// JetStream would redeliver them only after `ack_wait`, while newer
    /// messages of the same subjects went to the new replica at once: a
    /// consumer would see an order's events out of order (and the orders
    /// service drops an event older than one it applied from the same
    /// source as stale, losing a fact). So when any message is pending
    /// acknowledgement, the consumer is created again from its ack floor
    /// (every message up to it acknowledged): the messages after it come in
    /// stream order; those the previous holder had already acknowledged
    /// come again too and the consumer's inbox drops them.
    ///
    /// A rewind starts the broker's delivery counts afresh, so the rewinds
    /// in a row at the same floor (a consumer that crashes on a message
    /// every time) are counted in `store` (table [`REWINDS`]) and added to
    /// the deliveries of the messages after the floor: `max_deliver` still
    /// dead-letters such a message.
    ///
    /// Only for a consumer this replica does not pull from yet: it must own
    /// the consumer alone (its service's single active replica, or the
    /// partition's owner).
    pub async fn rewound_pull_consumer(
        &self,
        consumer: &str,
        producer: &str,
        lane: Lane,
        interest: Option<usize>,
        partition: Option<u32>,
        store: &dyn Store,
    ) -> Result<(consumer::PullConsumer, Option<Rewound>), BusError> {
        let current = self.pull_consumer(consumer, producer, lane, interest, partition).await?;
        let info = current.cached_info();
        if info.num_ack_pending == 0 {
            return Ok((current, None));
        }
        let (floor, upto, pending) =
            (info.ack_floor.stream_sequence, info.delivered.stream_sequence, info.num_ack_pending);
        let (name, config) = self.consumer_config(
            consumer,
            producer,
            lane,
            interest,
            partition,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: floor + 1 },
        );
        let previous = store.get(REWINDS, &name).await.map_err(unavailable)?;
        let previous = previous.and_then(|row| serde_json::from_slice::<RewindRow>(&row.doc).ok());
        let rewinds = match previous {
            Some(p) if p.floor == floor => p.rewinds.saturating_add(1),
            _ => 1,
        };
        let doc = serde_json::to_vec(&RewindRow { floor, rewinds }).expect("a rewind row always serializes");
        let row = Row { table: REWINDS, key: name.clone(), idx: None, doc };
        store.commit(Batch { puts: vec![row], ..Batch::default() }).await.map_err(unavailable)?;
        let stream = timed(self.inner.js.get_stream(self.stream_name(lane))).await?;
        timed(stream.delete_consumer(&name)).await?;
        // Gone now: looked up again after a failure, it would be created
        // anew from the stream's first message. Try a little harder.
        let mut attempts = 1;
        let rewound = loop {
            match timed(stream.create_consumer(config.clone())).await {
                Ok(c) => break c,
                Err(e) if attempts < 5 => {
                    tracing::warn!(consumer = %name, error = %e, "creating the rewound consumer failed; retrying");
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(consumer = %name, floor, upto, pending, rewinds,
            "consumer rewound to its ack floor: unacknowledged messages come again first");
        Ok((rewound, Some(Rewound { consumer: name, floor, upto, rewinds })))
    }

    /// Publishes outbox records of `producer` in order and waits for every
    /// acknowledgement. On an error some may be stored: publishing them again
    /// is harmless (`Nats-Msg-Id` inside the window, the consumers' inbox after).
    pub async fn publish(&self, producer: &str, records: &[OutboxRecord]) -> Result<(), BusError> {
        let sent = self.publish_once(producer, records).await;
        if sent.is_err() {
            // The broker may have come back without its streams (data lost):
            // make sure they exist before the next attempt.
            *self.inner.streams_ready.lock().await = false;
        }
        sent
    }

    async fn publish_once(&self, producer: &str, records: &[OutboxRecord]) -> Result<(), BusError> {
        self.ensure_streams().await?;
        let mut acks = Vec::with_capacity(records.len());
        for r in records {
            let payload = serde_json::to_vec(&r.envelope).map_err(|e| BusError::Config(e.to_string()))?;
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(&r.envelope.id)
                .header(POSITION_HEADER, r.position.to_string().as_str());
            acks.push(timed(self.inner.js.send_publish(self.subject(producer, &r.envelope), msg)).await?);
        }
        for ack in acks {
            timed(ack.into_future()).await?;
        }
        Ok(())
    }

    /// Publishes `producer`'s outbox from position `from` (inclusive) to its
    /// head again, e.g. after the broker lost data it had acknowledged.
    /// Returns how many events were sent. Consumers deduplicate.
    pub async fn republish(&self, producer: &str, store: &dyn Store, from: u64) -> Result<u64, BusError> {
        let mut after = from.saturating_sub(1);
        let mut sent = 0;
        loop {
            let records = store.outbox_after(after, self.inner.opts.publish_batch).await.map_err(unavailable)?;
            let Some(last) = records.last().map(|r| r.position) else { return Ok(sent) };
            self.publish(producer, &records).await?;
            sent += records.len() as u64;
            after = last;
        }
    }

    /// Deletes both streams (tests and teardown; consumers go with them).
    pub async fn delete_streams(&self) -> Result<(), BusError> {
        for lane in Lane::ALL {
            match timed(self.inner.js.delete_stream(self.stream_name(lane))).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(e),
            }
        }
        *self.inner.streams_ready.lock().await = false;
        Ok(())
    }

    /// Messages currently stored in a lane's stream.
    pub async fn stream_messages(&self, lane: Lane) -> Result<u64, BusError> {
        let mut s = timed(self.inner.js.get_stream(self.stream_name(lane))).await?;
        Ok(timed(s.info()).await?.state.messages)
    }

    /// Flushes the connection (tests).
    pub async fn flush(&self) -> Result<(), BusError> {
        timed(self.inner.client.flush()).await
    }
}

/// Runs a broker operation with [`OP_TIMEOUT`].
pub(crate) async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(BusError::Unavailable(format!("no answer from the broker in {} ms", OP_TIMEOUT.as_millis()))),
    }
}

#[async_trait]
impl Broker for NatsBus {
    async fn source(
        &self,
        consumer: &'static str,
        producer: &'static str,
        filter: EventFilter,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        ownership: Arc<Ownership>,
    ) -> Result<Arc<dyn EventSource>, StoreError> {
        Ok(Arc::new(JetStreamSource::new(self.clone(), consumer, producer, filter, store, clock, ownership)))
    }

    fn partitions(&self) -> u32 {
        self.inner.opts.partitions
    }

    fn relay(
        &self,
        producer: &'static str,
        store: Arc<dyn Store>,
        head: watch::Receiver<u64>,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(relay::run(self.clone(), producer, store, head, shutdown))
    }
}

/// A breaker over broker calls, on the engine's clock.
pub(crate) fn breaker(opts: &NatsOptions) -> orderly_domain::shipping::breaker::CircuitBreaker {
    use orderly_domain::shipping::breaker::{BreakerConfig, CircuitBreaker};
    let cooldown = u64::try_from(opts.breaker_cooldown.as_millis()).unwrap_or(u64::MAX).clamp(1, 60_000);
    let config = BreakerConfig::new(opts.breaker_failures.max(1), cooldown)
        .unwrap_or_else(|_| BreakerConfig::new(3, 2_000).expect("3 failures, 2 s is a valid breaker"));
    CircuitBreaker::new(config)
}

#[cfg(test)]
mod tests {
    use super::{SERVICES, audience, interest};
    use orderly_domain::event::EventType;
    use orderly_engine::app::subscriptions;

    /// NATS subject matching for the filters used here: `*` is one token.
    fn matches(filter: &str, subject: &str) -> bool {
        let (f, s): (Vec<&str>, Vec<&str>) = (filter.split('.').collect(), subject.split('.').collect());
        f.len() == s.len() && f.iter().zip(&s).all(|(f, s)| *f == "*" || f == s)
    }

    #[test]
    fn an_event_is_marked_for_exactly_the_services_that_subscribe_to_it() {
        assert_eq!(audience("orders", "orderly.order.created"), "0.1.0.0.0.0", "inventory alone");
        assert_eq!(audience("orders", "orderly.order.allocated"), "0.0.1.1.0.1", "picking, packing, notifications");
        assert_eq!(audience("inventory", "orderly.inventory.reserved"), "1.0.0.0.0.0");
        assert_eq!(audience("orders", "orderly.no.such.type"), "0.0.0.0.0.0");
        // Every (producer, type, consumer): the consumer's own filter takes
        // the event exactly when the broker would deliver it to it.
        for producer in SERVICES {
            for t in EventType::ALL {
                let subject = format!("p.{producer}.events.{}.3", audience(producer, t.as_str()));
                for (i, consumer) in SERVICES.iter().enumerate() {
                    let Some((_, wants)) = subscriptions(consumer).iter().find(|(p, _)| *p == producer) else {
                        continue;
                    };
                    assert_eq!(interest(consumer, producer, *wants), Some(i));
                    let tokens: Vec<&str> = (0..SERVICES.len()).map(|j| if j == i { "1" } else { "*" }).collect();
                    let filter = format!("p.{producer}.events.{}.3", tokens.join("."));
                    assert_eq!(matches(&filter, &subject), wants(t.as_str()), "{consumer} <- {producer} {t:?}");
                }
            }
        }
    }

    #[test]
    fn a_reader_with_a_filter_of_its_own_is_not_filtered_by_the_broker() {
        let all: fn(&str) -> bool = |_| true;
        assert_eq!(interest("inventory", "orders", all), None, "takes more than inventory subscribes to");
        assert_eq!(interest("auditor", "orders", all), None, "not an engine service");
        assert_eq!(interest("shipping", "inventory", all), None, "shipping reads nothing from inventory");
    }
}
