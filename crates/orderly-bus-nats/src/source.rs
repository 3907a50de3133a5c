//! A consumer's view of one producer through JetStream.

use crate::{Lane, NatsBus, POSITION_HEADER, Rewound, breaker, timed};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use async_trait::async_trait;
use futures_util::StreamExt;
use orderly_domain::Timestamp;
use orderly_domain::event::Envelope;
use orderly_engine::bus::{EventSource, Polled};
use orderly_engine::partitions::{Ownership, partition_of_subject};
use orderly_engine::ports::{Batch, Clock, OutboxRecord, Row, Store, StoreError};
use orderly_engine::runtime::{DEAD_LETTERS, DeadLetter};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// One fetched message, held until the batch that handled it commits.
struct Item {
    /// Local position: the order this source offers messages in.
    position: u64,
    /// The bus partition it came from.
    partition: u32,
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

/// Reads one producer's events for one consumer from both lanes' durable
/// pull consumers, one per partition this replica owns. At-least-once:
/// messages are acknowledged once the consumer's batch that handled them
/// (with its inbox) has committed.
pub struct JetStreamSource {
    bus: NatsBus,
    consumer: &'static str,
    producer: &'static str,
    filter: fn(&str) -> bool,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    held: Mutex<Held>,
    /// Messages the lanes' prefetch tasks fetched, not yet offered.
    fetched: tokio::sync::Mutex<[mpsc::Receiver<jetstream::Message>; 2]>,
    pending: Arc<Pending>,
    wake: watch::Receiver<u64>,
    manager: tokio::task::JoinHandle<()>,
    last_progress: Mutex<std::time::Instant>,
    ownership: Arc<Ownership>,
    rewinds: Arc<Rewinds>,
}

impl Drop for JetStreamSource {
    fn drop(&mut self) {
        // The manager's drop guard aborts the prefetch tasks with it.
        self.manager.abort();
    }
}

/// The last rewind of each durable consumer this source started, by name
/// (see [`NatsBus::rewound_pull_consumer`]).
#[derive(Default)]
struct Rewinds(Mutex<HashMap<String, Rewound>>);

impl Rewinds {
    fn set(&self, name: String, rewound: Option<Rewound>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match rewound {
            Some(r) => all.insert(name, r),
            None => all.remove(&name),
        };
    }

    /// Deliveries of a message the broker no longer counts: the rewinds in
    /// a row of its consumer, for a message handed out before them.
    fn uncounted(&self, consumer: &str, stream_sequence: u64) -> i64 {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.get(consumer).filter(|r| r.floor < stream_sequence && stream_sequence <= r.upto).map_or(0, |r| r.rewinds)
    }
}

/// Messages waiting at the broker, per (lane, partition) consumer.
#[derive(Default)]
struct Pending(Mutex<HashMap<(Lane, u32), u64>>);

impl Pending {
    fn set(&self, lane: Lane, partition: u32, n: u64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert((lane, partition), n);
    }

    fn total(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }
}

/// The prefetch tasks of the partitions this replica consumes (`None`: one
/// pair for all of them), aborted when dropped.
#[derive(Default)]
struct Prefetchers(HashMap<Option<u32>, [tokio::task::JoinHandle<()>; 2]>);

impl Drop for Prefetchers {
    fn drop(&mut self) {
        self.0.values().flatten().for_each(|t| t.abort());
    }
}

/// Keeps one prefetch task per lane for every partition `ownership` gives
/// this replica: starts them for partitions gained, stops them for
/// partitions given up (what they fetched is still handled and committed
/// here, which is what the membership waits for before unlocking).
#[allow(clippy::too_many_arguments)]
async fn manage(
    bus: NatsBus,
    consumer: &'static str,
    producer: &'static str,
    interest: Option<usize>,
    ownership: Arc<Ownership>,
    lanes: [mpsc::Sender<jetstream::Message>; 2],
    wake: watch::Sender<u64>,
    pending: Arc<Pending>,
    store: Arc<dyn Store>,
    rewinds: Arc<Rewinds>,
) {
    let mut owned_rx = ownership.watch();
    let mut running = Prefetchers::default();
    loop {
        let owned: Vec<Option<u32>> = match owned_rx.borrow_and_update().as_ref() {
            None => vec![None],
            Some(set) => set.iter().copied().filter(|p| *p < bus.options().partitions).map(Some).collect(),
        };
        running.0.retain(|p, tasks| {
            let keep = owned.contains(p);
            if !keep {
                tasks.iter().for_each(|t| t.abort());
            }
            keep
        });
        for p in owned {
            running.0.entry(p).or_insert_with(|| {
                [Lane::Events, Lane::Priority].map(|lane| {
                    let out = lanes[usize::from(lane == Lane::Priority)].clone();
                    tokio::spawn(prefetch(
                        bus.clone(),
                        consumer,
                        producer,
                        lane,
                        interest,
                        p,
                        out,
                        wake.clone(),
                        pending.clone(),
                        ownership.clone(),
                        store.clone(),
                        rewinds.clone(),
                    ))
                })
            });
        }
        if owned_rx.changed().await.is_err() {
            return;
        }
    }
}

/// Most messages fetched ahead of the consumer, per lane (the consumer's
/// `max_ack_pending` bounds what the broker hands out unacknowledged).
const PREFETCH_MAX: usize = crate::MAX_ACK_PENDING as usize;
/// How often messages held across polls are reported in progress (well
/// inside the consumer's `ack_wait`).
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// Most messages one partition's pull asks for at a time (the lane's
/// buffer is shared by every partition's consumer).
const PULL_BATCH_MAX: usize = 128;
/// How long one pull request waits at the broker for messages.
const PULL_WAIT: Duration = Duration::from_secs(1);
/// How long a pull may stay silent (no message, no end) before this side
/// ends it: past [`PULL_WAIT`] the broker has expired the request, but it
/// does not always say so (seen while the consumer is at its
/// `max_ack_pending`: the end came seconds late or not at all, and the
/// partition was not pulled meanwhile).
const PULL_SILENT: Duration = Duration::from_secs(2);
/// Silent pulls in a row after which the broker counts as failing (a broker
/// that is down answers nothing at all).
const SILENT_PULLS_MAX: u32 = 3;

/// Keeps one partition's durable consumer in one lane pulled (`None`: the
/// one consumer of all partitions): messages go to `out` as they arrive
/// (long polls of [`PULL_WAIT`]), `wake` changes for each, `ownership`
/// counts each as work in flight in its partition. The first time, the
/// consumer is rewound to its ack floor if messages are pending
/// acknowledgement (handed to a process that died: see
/// [`NatsBus::rewound_pull_consumer`]). While the broker fails, a circuit
/// breaker spaces the attempts; the consumer is looked up again
/// (idempotently, not rewound: what it holds is this source's) after every
/// failure.
#[allow(clippy::too_many_arguments)]
async fn prefetch(
    bus: NatsBus,
    consumer: &'static str,
    producer: &'static str,
    lane: Lane,
    interest: Option<usize>,
    partition: Option<u32>,
    out: mpsc::Sender<jetstream::Message>,
    wake: watch::Sender<u64>,
    pending: Arc<Pending>,
    ownership: Arc<Ownership>,
    store: Arc<dyn Store>,
    rewinds: Arc<Rewinds>,
) {
    let clock = orderly_engine::ports::SystemClock;
    let mut breaker = breaker(bus.options());
    let mut pull: Option<PullConsumer> = None;
    let mut started = false;
    let mut silent = 0u32;
    loop {
        if out.is_closed() {
            return;
        }
        if !breaker.allow(clock.now()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let round = async {
            if pull.is_none() && !started {
                let (c, rewound) =
                    bus.rewound_pull_consumer(consumer, producer, lane, interest, partition, store.as_ref()).await?;
                rewinds.set(NatsBus::durable_name(consumer, producer, lane, partition), rewound);
                started = true;
                pull = Some(c);
            } else if pull.is_none() {
                pull = Some(bus.pull_consumer(consumer, producer, lane, interest, partition).await?);
            }
            let c = pull.as_ref().expect("consumer was just created");
            let most = if partition.is_some() { PULL_BATCH_MAX } else { 512 };
            let room = out.capacity().clamp(1, most);
            let mut batch = timed(c.batch().max_messages(room).expires(PULL_WAIT).messages()).await?;
            let mut got = 0u64;
            loop {
                match tokio::time::timeout(PULL_SILENT, batch.next()).await {
                    Ok(Some(Ok(m))) => {
                        if let Ok(info) = m.info() {
                            pending.set(lane, partition.unwrap_or(u32::MAX), info.pending);
                        }
                        if out.send(m).await.is_err() {
                            return Ok(got);
                        }
                        if let Some(p) = partition {
                            ownership.took(p);
                        }
                        got += 1;
                        wake.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Ok(Some(Err(e))) => return Err(crate::BusError::Unavailable(e.to_string())),
                    Ok(None) => {
                        silent = 0;
                        return Ok(got);
                    }
                    // Expired at the broker by now: pull again at once.
                    Err(_) if got > 0 || silent + 1 < SILENT_PULLS_MAX => {
                        silent = if got > 0 { 0 } else { silent + 1 };
                        return Ok(got);
                    }
                    Err(_) => {
                        silent = 0;
                        return Err(crate::BusError::Unavailable("pulls timed out".into()));
                    }
                }
            }
        };
        match round.await {
            Ok(_) => {
                if breaker.state_name() != "closed" {
                    tracing::info!(consumer, producer, lane = lane.as_str(), "broker reachable again");
                }
                breaker.on_success(clock.now());
            }
            Err(e) => {
                pull = None;
                breaker.on_failure(clock.now());
                tracing::warn!(consumer, producer, lane = lane.as_str(), breaker = breaker.state_name(),
                    error = %e, "pull from the broker failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl JetStreamSource {
    /// A source over the partitions `ownership` gives this replica (all of
    /// them for a service that is not shared); the broker's consumers are
    /// created on first pull.
    pub fn new(
        bus: NatsBus,
        consumer: &'static str,
        producer: &'static str,
        filter: fn(&str) -> bool,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        ownership: Arc<Ownership>,
    ) -> JetStreamSource {
        let (wake_tx, wake) = watch::channel(0u64);
        let pending = Arc::new(Pending::default());
        let rewinds = Arc::new(Rewinds::default());
        let (events_tx, events_rx) = mpsc::channel(PREFETCH_MAX);
        let (priority_tx, priority_rx) = mpsc::channel(PREFETCH_MAX);
        let manager = tokio::spawn(manage(
            bus.clone(),
            consumer,
            producer,
            crate::interest(consumer, producer, filter),
            ownership.clone(),
            [events_tx, priority_tx],
            wake_tx,
            pending.clone(),
            store.clone(),
            rewinds.clone(),
        ));
        JetStreamSource {
            bus,
            consumer,
            producer,
            filter,
            store,
            clock,
            held: Mutex::new(Held::default()),
            fetched: tokio::sync::Mutex::new([events_rx, priority_rx]),
            pending,
            wake,
            manager,
            last_progress: Mutex::new(std::time::Instant::now()),
            ownership,
            rewinds,
        }
    }

    /// True at most once per [`PROGRESS_EVERY`]: time to tell the broker
    /// that messages offered again are still being worked on.
    fn progress_due(&self) -> bool {
        let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = std::time::Instant::now();
            return true;
        }
        false
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns fetched messages into held items, oldest producer position first.
    async fn admit(&self, mut msgs: Vec<jetstream::Message>) -> Result<Vec<Item>, StoreError> {
        // Cached: the key is a header lookup and a parse, which a plain
        // sort would repeat in every comparison (O(n log n) of them per poll).
        msgs.sort_by_cached_key(producer_position);
        let mut items = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let (delivered, published_ms) = match msg.info() {
                Ok(i) => (
                    i.delivered.saturating_add(self.rewinds.uncounted(i.consumer, i.stream_sequence)),
                    (i.published.unix_timestamp_nanos() / 1_000_000) as i64,
                ),
                Err(_) => (1, self.clock.now().millis()),
            };
            // A reader the broker does not filter for (see `interest`) gets
            // every event of its producer: read the type alone first and
            // decode the whole envelope only when it is wanted.
            let payload = &msg.message.payload;
            let decoded = wanted(payload, self.filter).then(|| serde_json::from_slice::<Envelope>(payload));
            let envelope = match decoded {
                None => None,
                Some(Ok(env)) if (self.filter)(env.event_type.as_str()) => Some(env),
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    tracing::error!(consumer = self.consumer, producer = self.producer, error = %e,
                        "undecodable message skipped");
                    None
                }
            };
            // Delivered max_deliver times and not a redelivery of a copy we
            // still hold (a slow consumer, not a crashing one): give up.
            let give_up = delivered >= self.bus.options().max_deliver && !self.holds(&msg);
            let (envelope, dead) = match envelope {
                Some(env) if give_up && !self.store.inbox_contains(&env.id).await? => {
                    (None, Some(self.dead_letter(env, delivered)))
                }
                Some(_) if give_up => (None, None),
                other => (other, None),
            };
            let partition = partition_of_subject(msg.message.subject.as_str()).unwrap_or(u32::MAX);
            items.push(Item { position: 0, partition, msg, envelope, published_ms, dead });
        }
        Ok(items)
    }

    /// True when a copy of `msg` (same stream sequence) is held already.
    fn holds(&self, msg: &jetstream::Message) -> bool {
        let Ok(seq) = msg.info().map(|i| i.stream_sequence) else { return false };
        self.held().buffer.iter().any(|i| i.msg.info().is_ok_and(|j| j.stream_sequence == seq))
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

/// The `type` of a CloudEvents JSON message, read without decoding the rest
/// (borrowed: no allocation unless the type holds escapes).
#[derive(serde::Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
}

/// False when the message's type is readable and `filter` refuses it; true
/// otherwise (an unreadable message is decoded in full, which reports why).
fn wanted(payload: &[u8], filter: fn(&str) -> bool) -> bool {
    serde_json::from_slice::<TypeOnly>(payload).map_or(true, |t| filter(&t.event_type))
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
        let mut fetched = self.fetched.lock().await;
        let (held_len, reoffered): (usize, Vec<jetstream::Message>) = {
            let held = self.held();
            (held.buffer.len(), held.buffer.iter().take(max).map(|i| i.msg.clone()).collect())
        };
        if !reoffered.is_empty() && self.progress_due() {
            // Offered again (a retry, a failed commit): still ours, tell the broker.
            tokio::spawn(async move {
                for m in reoffered {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            });
        }
        // Both lanes, each with its own budget, so a bulk backlog never holds
        // back priority events (bulkhead); merged by producer position.
        let mut msgs = Vec::new();
        let room = max.saturating_sub(held_len);
        for rx in fetched.iter_mut() {
            while msgs.len() < room {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
        }
        drop(fetched);
        if !msgs.is_empty() {
            let items = self.admit(msgs).await?;
            let mut held = self.held();
            for mut item in items {
                held.next += 1;
                item.position = held.next;
                if let Some(row) = item.dead.take() {
                    held.dead.push((item.position, row));
                }
                held.buffer.push_back(item);
            }
        }
        let held = self.held();
        let offered: Vec<&Item> = held.buffer.iter().take(max).collect();
        let upto = offered.last().map_or(held.acked, |i| i.position);
        let records = offered
            .iter()
            .filter_map(|i| {
                i.envelope.clone().map(|envelope| Arc::new(OutboxRecord { position: i.position, envelope }))
            })
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
            let item = held.buffer.pop_front().expect("front exists");
            self.ownership.finished(item.partition);
            done.push(item.msg);
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
        self.pending.total() + self.held().buffer.len() as u64
    }

    fn at_least_once(&self) -> bool {
        true
    }

    fn oldest_pending(&self) -> Option<Timestamp> {
        self.held().buffer.front().map(|i| Timestamp(i.published_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::wanted;

    fn only_created(t: &str) -> bool {
        t == "orderly.order.created"
    }

    #[test]
    fn the_type_alone_decides_which_messages_are_decoded_in_full() {
        let event =
            |t: &str| format!(r#"{{"specversion":"1.0","id":"e1","data":{{"type":"x"}},"type":"{t}","sequence":1}}"#);
        assert!(wanted(event("orderly.order.created").as_bytes(), only_created));
        assert!(!wanted(event("orderly.order.confirmed").as_bytes(), only_created), "a nested type is not the event's");
        // Escapes in the type are undone before the filter sees it.
        assert!(wanted(event(r"orderly.order.cre\u0061ted").as_bytes(), only_created));
        // Without a readable type the message is decoded in full, which
        // reports why it cannot be used.
        assert!(wanted(b"not json", only_created));
        assert!(wanted(br#"{"id":"e1"}"#, only_created));
        assert!(wanted(br#"{"type":7}"#, only_created));
    }
}
