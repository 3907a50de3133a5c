//! NATS JetStream against the bus contract (the embedded bus runs the same
//! checks in `orderly-engine`), on the machine's NATS at 127.0.0.1:4222 with
//! streams under a prefix of this test's own, deleted afterwards. Under
//! `CI=true` an unreachable server fails the test; elsewhere it skips.

use async_trait::async_trait;
use orderly_bus_nats::{NatsBus, NatsOptions};
use orderly_engine::broker::{Broker, EventFilter};
use orderly_engine::bus::{EventSource, Publisher};
use orderly_engine::bus_contract::{BusFixture, PRODUCER, check_bus};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::partitions::Ownership;
use orderly_engine::ports::{Store, SystemClock};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const NATS: &str = "127.0.0.1:4222";

struct JetStream {
    bus: NatsBus,
    consumer: Arc<dyn Store>,
    publisher: Publisher,
}

#[async_trait]
impl BusFixture for JetStream {
    async fn source(&self, filter: EventFilter) -> Arc<dyn EventSource> {
        self.bus
            .source(
                "inventory",
                PRODUCER,
                filter,
                self.consumer.clone(),
                Arc::new(SystemClock),
                Arc::new(Ownership::all()),
            )
            .await
            .expect("source")
    }

    fn published(&self, head: u64) {
        self.publisher.publish(head);
    }
}

fn nats_up() -> bool {
    if std::net::TcpStream::connect_timeout(&NATS.parse().expect("addr"), Duration::from_secs(1)).is_ok() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "NATS at {NATS} is required under CI=true");
    eprintln!("\n*** SKIPPED: NATS is not reachable at {NATS} (set CI=true to make this a failure) ***\n");
    false
}

fn prefix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("contract_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_meets_the_bus_contract() {
    if !nats_up() {
        return;
    }
    let bus = NatsBus::connect(NatsOptions::new(&format!("nats://{NATS}"), &prefix())).await.expect("connect");
    bus.ensure_streams().await.expect("streams");
    bus.ensure_streams().await.expect("creating the streams again is harmless");
    let producer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let consumer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let publisher = Publisher::new(0);
    let (stop, shutdown) = watch::channel(false);
    let relay = bus.relay(PRODUCER, producer.clone(), publisher.subscribe(), shutdown);
    let fixture = JetStream { bus: bus.clone(), consumer: consumer.clone(), publisher };
    let checked = tokio::spawn(async move { check_bus(producer.as_ref(), consumer.as_ref(), &fixture).await });
    let result = checked.await;
    stop.send_replace(true);
    let _ = relay.await;
    bus.delete_streams().await.expect("streams deleted");
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_the_outbox_is_deduplicated_by_the_broker() {
    if !nats_up() {
        return;
    }
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::ports::Batch;
    let bus = NatsBus::connect(NatsOptions::new(&format!("nats://{NATS}"), &prefix())).await.expect("connect");
    let store = MemoryStore::new();
    let outbox = (1..=5)
        .map(|n| {
            Envelope::new(
                format!("r{n}"),
                "/orderly/orders",
                EventType::OrderCreated,
                &format!("o-{n}"),
                Timestamp(1),
                1,
                serde_json::json!({}),
            )
        })
        .collect();
    store.commit(Batch { outbox, ..Batch::default() }).await.expect("commit");
    let sent = bus.republish(PRODUCER, &store, 1).await.expect("publish");
    assert_eq!(sent, 5);
    let again = bus.republish(PRODUCER, &store, 3).await.expect("publish again");
    assert_eq!(again, 3, "positions 3..=5");
    let stored = bus.stream_messages(orderly_bus_nats::Lane::Events).await;
    bus.delete_streams().await.expect("streams deleted");
    assert_eq!(stored.expect("stream info"), 5, "Nats-Msg-Id dropped the duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_max_deliver_times_is_dead_lettered_not_applied() {
    if !nats_up() {
        return;
    }
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::ports::Batch;
    use orderly_engine::runtime::{DEAD_LETTERS, DeadLetter};
    let mut opts = NatsOptions::new(&format!("nats://{NATS}"), &prefix());
    opts.max_deliver = 2;
    opts.ack_wait = Duration::from_secs(1);
    let bus = NatsBus::connect(opts).await.expect("connect");
    let producer = MemoryStore::new();
    let env = Envelope::new(
        "poison-1".into(),
        "/orderly/orders",
        EventType::OrderCreated,
        "o-1",
        Timestamp(1),
        1,
        serde_json::json!({}),
    );
    producer.commit(Batch { outbox: vec![env], ..Batch::default() }).await.expect("commit");
    bus.republish(PRODUCER, &producer, 1).await.expect("publish");
    let consumer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let all: EventFilter = |_| true;

    // A consumer that takes the message and dies before committing, twice.
    let mut last = None;
    for delivery in 1..=2 {
        let source = bus
            .source("inventory", PRODUCER, all, consumer.clone(), Arc::new(SystemClock), Arc::new(Ownership::all()))
            .await
            .expect("source");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let p = source.poll(16).await.expect("poll");
            if delivery == 1 && !p.records.is_empty() {
                assert_eq!(p.records[0].envelope.id, "poison-1");
                break;
            }
            if delivery == 2 && p.upto > p.from {
                assert!(p.records.is_empty(), "the last delivery is not offered to the service: {:?}", p.records);
                let mut batch = Batch::default();
                source.mark(p.upto, &mut batch);
                consumer.commit(batch).await.expect("commit the dead letter");
                source.committed(p.upto);
                last = Some(source);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "delivery {delivery} never came");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let row = consumer.get(DEAD_LETTERS, "poison-1").await.expect("read").expect("dead-lettered");
    let letter: DeadLetter = serde_json::from_slice(&row.doc).expect("a dead letter");
    assert_eq!((letter.consumer.as_str(), letter.producer.as_str(), letter.attempts), ("inventory", "orders", 2));
    drop(last);
    bus.delete_streams().await.expect("streams deleted");
}

/// A process holding a message unacknowledged dies; the replica that takes
/// its place must get that message before the newer ones of the same
/// subject, not after the ack wait (30 s): the orders service drops an
/// event older than one applied from the same source as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_gets_what_a_dead_one_held_first_and_in_order() {
    if !nats_up() {
        return;
    }
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::ports::Batch;
    let bus = NatsBus::connect(NatsOptions::new(&format!("nats://{NATS}"), &prefix())).await.expect("connect");
    assert_eq!(bus.options().ack_wait, Duration::from_secs(30));
    let producer = MemoryStore::new();
    let event = |n: u64| {
        Envelope::new(
            format!("e{n}"),
            "/orderly/orders",
            EventType::OrderCreated,
            "o-1",
            Timestamp(1),
            n,
            serde_json::json!({}),
        )
    };
    let consumer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let all: EventFilter = |_| true;
    let source =
        || bus.source("inventory", PRODUCER, all, consumer.clone(), Arc::new(SystemClock), Arc::new(Ownership::all()));
    // Offered until `want` events came (or the deadline): their ids, in order.
    async fn offered(source: &Arc<dyn EventSource>, want: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let p = source.poll(16).await.expect("poll");
            if p.records.len() >= want || std::time::Instant::now() >= deadline {
                return p.records.iter().map(|r| r.envelope.id.clone()).collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // e1, then e2 committed and acknowledged: the ack floor.
    producer.commit(Batch { outbox: vec![event(1), event(2)], ..Batch::default() }).await.expect("commit");
    bus.republish(PRODUCER, &producer, 1).await.expect("publish");
    let first = source().await.expect("source");
    assert_eq!(offered(&first, 2).await, ["e1", "e2"]);
    let p = first.poll(16).await.expect("poll");
    consumer.commit(Batch::default()).await.expect("commit");
    first.committed(p.upto);
    tokio::time::sleep(Duration::from_millis(500)).await; // the acks are sent in the background

    // e3 is taken by a process that dies before committing it.
    producer.commit(Batch { outbox: vec![event(3)], ..Batch::default() }).await.expect("commit");
    bus.republish(PRODUCER, &producer, 3).await.expect("publish");
    assert_eq!(offered(&first, 1).await, ["e3"]);
    drop(first);
    // Its last pull request at the broker has expired too.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // e4 follows; the restarted consumer gets e3 first, at once.
    producer.commit(Batch { outbox: vec![event(4)], ..Batch::default() }).await.expect("commit");
    bus.republish(PRODUCER, &producer, 4).await.expect("publish");
    let started = std::time::Instant::now();
    let second = source().await.expect("source");
    let got = offered(&second, 2).await;
    let took = started.elapsed();
    bus.delete_streams().await.expect("streams deleted");
    assert_eq!(got, ["e3", "e4"], "what the dead consumer held comes first, in order");
    assert!(took < Duration::from_secs(10), "without waiting for the ack wait: {took:?}");
}

/// Each engine service's consumers filter on its audience token: the broker
/// hands picking only the order events picking subscribes to (nothing it
/// would read and drop), and a stream made for the previous subject layout
/// (`<prefix>.*.<lane>.*`) is widened in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_delivers_a_service_only_the_events_it_subscribes_to() {
    if !nats_up() {
        return;
    }
    use orderly_bus_nats::Lane;
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::app::subscriptions;
    use orderly_engine::ports::Batch;
    let prefix = prefix();
    let client = async_nats::connect(NATS).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("{prefix}_events"),
        subjects: vec![format!("{prefix}.*.events.*")],
        ..Default::default()
    })
    .await
    .expect("a stream of the previous layout");
    let bus = NatsBus::connect(NatsOptions::new(&format!("nats://{NATS}"), &prefix)).await.expect("connect");
    bus.ensure_streams().await.expect("streams");
    let subjects =
        js.get_stream(format!("{prefix}_events")).await.expect("stream").cached_info().config.subjects.clone();
    assert_eq!(subjects, [format!("{prefix}.*.events.>")], "widened for the audience tokens");

    let producer = MemoryStore::new();
    let event = |n: u64, t: EventType| {
        Envelope::new(format!("e{n}"), "/orderly/orders", t, &format!("o-{n}"), Timestamp(1), n, serde_json::json!({}))
    };
    let outbox = vec![
        event(1, EventType::OrderCreated),
        event(2, EventType::OrderAllocated),
        event(3, EventType::OrderCreated),
        event(4, EventType::OrderCanceled),
    ];
    producer.commit(Batch { outbox, ..Batch::default() }).await.expect("commit");
    bus.republish(PRODUCER, &producer, 1).await.expect("publish");
    let (_, picking) = subscriptions("picking").iter().find(|(p, _)| *p == PRODUCER).expect("picking reads orders");
    let consumer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let source = bus
        .source("picking", PRODUCER, *picking, consumer, Arc::new(SystemClock), Arc::new(Ownership::all()))
        .await
        .expect("source");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        let p = source.poll(16).await.expect("poll");
        if p.records.len() >= 2 || std::time::Instant::now() >= deadline {
            break p.records.iter().map(|r| r.envelope.id.clone()).collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let interest = orderly_bus_nats::interest("picking", PRODUCER, *picking);
    let mut durable = bus.pull_consumer("picking", PRODUCER, Lane::Events, interest, None).await.expect("durable");
    let info = durable.info().await.expect("consumer info").clone();
    bus.delete_streams().await.expect("streams deleted");
    assert_eq!(got, ["e2", "e4"], "allocated and canceled, in order");
    assert_eq!(info.delivered.consumer_sequence, 2, "the broker delivered picking two of the four events");
    assert_eq!(info.num_pending, 0);
}

/// The relay stores its cursor (a durable commit in the producer's store)
/// at most once a second while events keep coming, not once per publish,
/// and stores it once the producer goes quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_stores_its_cursor_once_a_second_under_load_and_when_quiet() {
    if !nats_up() {
        return;
    }
    use orderly_bus_nats::RELAY_CURSOR;
    use orderly_domain::Timestamp;
    use orderly_domain::event::{Envelope, EventType};
    use orderly_engine::ports::Batch;
    let bus = NatsBus::connect(NatsOptions::new(&format!("nats://{NATS}"), &prefix())).await.expect("connect");
    bus.ensure_streams().await.expect("streams");
    let producer = Arc::new(MemoryStore::new());
    let publisher = Publisher::new(0);
    let (stop, shutdown) = watch::channel(false);
    let relay = bus.relay(PRODUCER, producer.clone(), publisher.subscribe(), shutdown);
    let started = std::time::Instant::now();
    const EVENTS: u64 = 30;
    for n in 1..=EVENTS {
        let env = Envelope::new(
            format!("c{n}"),
            "/orderly/orders",
            EventType::OrderCreated,
            &format!("o-{n}"),
            Timestamp(1),
            1,
            serde_json::json!({}),
        );
        let head = producer.commit(Batch { outbox: vec![env], ..Batch::default() }).await.expect("commit");
        publisher.publish(head);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = started.elapsed();
    let relay_commits_while_busy = producer.commits() - EVENTS;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while producer.cursor(RELAY_CURSOR).await.expect("cursor") < EVENTS && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cursor = producer.cursor(RELAY_CURSOR).await.expect("cursor");
    let published = bus.stream_messages(orderly_bus_nats::Lane::Events).await.expect("stream info");
    stop.send_replace(true);
    let _ = relay.await;
    bus.delete_streams().await.expect("streams deleted");
    assert_eq!(published, EVENTS);
    assert_eq!(cursor, EVENTS, "stored once the producer went quiet");
    let most = busy.as_secs() + 1;
    assert!(
        relay_commits_while_busy <= most,
        "{relay_commits_while_busy} cursor commits in {busy:?} of steady publishing (at most {most})"
    );
}
