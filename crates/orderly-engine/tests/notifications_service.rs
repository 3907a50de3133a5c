//! The notifications service driven through the real runtime loop: order and
//! shipment events are committed into two producer outboxes (orders and
//! shipping) and reach the service through the embedded bus; the webhook is an
//! in-test fake that can fail; time is a manual clock the tests move, so
//! backoffs and the breaker cooldown are exact. Every wait polls a condition
//! with a deadline.

use async_trait::async_trait;
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::{CustomerId, Money, OrderId, Priority, ShipmentId, Timestamp, Zone};
use orderly_engine::bus::{EventSource, OutboxSource, Publisher};
use orderly_engine::config::Settings;
use orderly_engine::events::{LabelCreated, OrderCreated, OrderStateChanged};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::metrics::Metrics;
use orderly_engine::ports::{Batch, Clock, SeededRng, Store, WebhookSink};
use orderly_engine::runtime::{self, Ctx};
use orderly_engine::services::common::{ApiError, Reply};
use orderly_engine::services::notifications::{
    self, Command, Notification, NotificationStatus, NotificationSummary, Notifications,
};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const T0: i64 = 1_790_000_000_000;
const WAIT_MAX: Duration = Duration::from_secs(10);

struct ManualClock(AtomicI64);

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

impl ManualClock {
    fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

/// A webhook endpoint that fails the next `fail_next` calls (or all while
/// `down`), counts calls, and records what it accepted.
#[derive(Default)]
struct FakeSink {
    fail_next: AtomicU32,
    down: AtomicBool,
    calls: AtomicU32,
    accepted: Mutex<Vec<(String, serde_json::Value)>>,
    /// On its next accepted delivery, makes the service's next commit fail.
    fail_commit: Mutex<Option<Arc<MemoryStore>>>,
}

impl FakeSink {
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> Vec<(String, serde_json::Value)> {
        self.accepted.lock().expect("not poisoned").clone()
    }
}

#[async_trait]
impl WebhookSink for FakeSink {
    async fn deliver(&self, event_id: &str, body: &[u8]) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err("503 from fake".into());
        }
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err("502 from fake".into());
        }
        let body = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        self.accepted.lock().expect("not poisoned").push((event_id.to_owned(), body));
        if let Some(store) = self.fail_commit.lock().expect("not poisoned").take() {
            store.fail_next_commits(1);
        }
        Ok(())
    }
}

struct Producer {
    name: &'static str,
    store: Arc<MemoryStore>,
    publisher: Publisher,
}

struct Running {
    commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// One notifications service over a memory store, fed by orders and shipping outboxes.
struct Harness {
    store: Arc<MemoryStore>,
    orders: Producer,
    shipping: Producer,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
    settings: Settings,
    sink: Arc<FakeSink>,
    produced: u64,
    running: Option<Running>,
}

impl Harness {
    async fn started(tune: impl FnOnce(&mut Settings)) -> Harness {
        let mut settings = Settings::default();
        settings.notifications.webhook_url = Some("https://hooks.example.com/orderly".into());
        tune(&mut settings);
        let producer = |name| Producer { name, store: Arc::new(MemoryStore::new()), publisher: Publisher::new(0) };
        let mut h = Harness {
            store: Arc::new(MemoryStore::new()),
            orders: producer("orders"),
            shipping: producer("shipping"),
            clock: Arc::new(ManualClock(AtomicI64::new(T0))),
            metrics: Arc::new(Metrics::default()),
            settings,
            sink: Arc::new(FakeSink::default()),
            produced: 0,
            running: None,
        };
        h.start(false).await;
        h
    }

    /// Starts the service; with `replay` its cursors are ignored and both outboxes are delivered again.
    async fn start(&mut self, replay: bool) {
        let (svc, worker) =
            Notifications::open(self.store.as_ref(), &self.settings, self.sink.clone()).await.expect("opens");
        let mut sources: Vec<Arc<dyn EventSource>> = Vec::new();
        for p in [&self.orders, &self.shipping] {
            let cursor = if replay { 0 } else { self.store.cursor(p.name).await.expect("cursor") };
            let producer: Arc<dyn Store> = p.store.clone();
            let source = OutboxSource::new(p.name, producer, p.publisher.clone(), cursor, notifications::wants);
            sources.push(Arc::new(source));
        }
        let ctx = Arc::new(Ctx {
            service: "notifications",
            source: "/orderly/notifications".into(),
            clock: self.clock.clone(),
            rng: Arc::new(SeededRng::new(11)),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            max_attempts: 3,
        });
        let (commands, rx) = mpsc::channel(256);
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(worker.run(commands.clone()));
        let driver = runtime::Driver::new(svc, ctx, sources, |_| {}).await.expect("driver");
        let (_control_tx, control_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let _keep = _control_tx;
            runtime::run(driver, rx, control_rx, shutdown_rx).await
        });
        self.running = Some(Running { commands, shutdown, task });
    }

    async fn stop(&mut self) {
        let running = self.running.take().expect("running");
        running.shutdown.send(true).expect("the service listens");
        running.task.await.expect("the service stops cleanly");
    }

    /// Commits one event into the orders (or shipping) outbox; returns its id.
    async fn produce(&mut self, shipping: bool, kind: EventType, order: &str, data: serde_json::Value) -> String {
        self.produced += 1;
        let id = format!("evt-{}", self.produced);
        let p = if shipping { &self.shipping } else { &self.orders };
        let source = format!("/orderly/{}", p.name);
        let env = Envelope::new(id.clone(), &source, kind, order, self.clock.now(), self.produced, data);
        let head = p.store.commit(Batch { outbox: vec![env], ..Batch::default() }).await.expect("commit");
        p.publisher.publish(head);
        id
    }

    async fn order_created(&mut self, order: &str) {
        let data = OrderCreated {
            order_id: OrderId::parse(order).expect("order id"),
            customer_id: CustomerId::parse("c-1").expect("customer id"),
            email: format!("{order}@example.com"),
            zone: Zone::parse("EU").expect("zone"),
            priority: Priority::Standard,
            lines: Vec::new(),
            total: Money::parse("10.00").expect("money"),
            preallocated: Vec::new(),
            hold_ids: Vec::new(),
        };
        self.produce(false, EventType::OrderCreated, order, serde_json::to_value(data).expect("json")).await;
    }

    async fn state_changed(&mut self, kind: EventType, order: &str, state: &str) -> String {
        let data = OrderStateChanged {
            order_id: OrderId::parse(order).expect("order id"),
            state: state.to_owned(),
            email: format!("{order}@example.com"),
            expected_ship_date: (state == "backordered").then_some(Timestamp(T0 + 86_400_000)),
            shipment_id: None,
        };
        self.produce(false, kind, order, serde_json::to_value(data).expect("json")).await
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let running = self.running.as_ref().expect("running");
        running.commands.send(make(tx)).await.expect("the service takes commands");
        rx.await.expect("the service answers")
    }

    async fn summary(&self) -> NotificationSummary {
        self.ask(|reply| Command::Summary { reply }).await.expect("summary")
    }

    /// Two round trips: the turn after the first includes any tick due now,
    /// and a delivery dispatched by it is either still out or answered.
    async fn sync(&self) -> NotificationSummary {
        self.summary().await;
        self.summary().await
    }

    async fn advance_when_idle(&self, ms: i64) {
        if self.summary().await.in_flight == 0 {
            self.clock.advance(ms);
        }
    }

    async fn notifications(&self) -> Vec<Notification> {
        let rows = self.store.scan("notifications", None, None, 1_000).await.expect("scan");
        rows.iter().map(|r| serde_json::from_slice(&r.doc).expect("a notification")).collect()
    }

    async fn contacts(&self) -> usize {
        self.store.scan("contacts", None, None, 1_000).await.expect("scan").len()
    }

    async fn status(&self, id: &str) -> Option<NotificationStatus> {
        self.notifications().await.into_iter().find(|n| n.id == id).map(|n| n.status)
    }

    async fn events(&self, kind: EventType) -> Vec<Envelope> {
        let records = self.store.outbox_after(0, 10_000).await.expect("outbox");
        records.into_iter().map(|r| r.envelope).filter(|e| e.event_type == kind).collect()
    }
}

/// Polls `check` every few milliseconds until it holds, failing after [`WAIT_MAX`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

#[tokio::test]
async fn given_order_and_shipment_events_when_redelivered_then_each_notification_is_delivered_once() {
    let mut h = Harness::started(|_| {}).await;
    h.order_created("o-1").await;
    let backordered = h.state_changed(EventType::OrderBackordered, "o-1", "backordered").await;
    eventually("the backorder notice", async || h.notifications().await.len() == 1).await;
    assert_eq!(h.contacts().await, 0, "order.created notifies nothing and stores no contact");
    let allocated = h.state_changed(EventType::OrderAllocated, "o-1", "allocated").await;
    let label = LabelCreated {
        shipment_id: ShipmentId::parse("pkg-1.shp").expect("id"),
        order_id: OrderId::parse("o-1").expect("order id"),
        package_id: "pkg-1".into(),
        carrier: "fast".into(),
        tracking_number: "TRK-1".into(),
        cost: Money::parse("4.00").expect("money"),
        label_created_at: Timestamp(T0),
        fallback_from: None,
        lines: Vec::new(),
    };
    let labeled =
        h.produce(true, EventType::ShipmentLabelCreated, "o-1", serde_json::to_value(label).expect("json")).await;
    eventually("three deliveries", async || h.sink.accepted().len() == 3).await;
    eventually("all marked sent", async || h.events(EventType::NotificationSent).await.len() == 3).await;
    assert_eq!(h.contacts().await, 1, "the contact is stored at the order's allocation");
    assert!(h.sink.accepted().iter().any(|(id, _)| *id == allocated));

    let accepted = h.sink.accepted();
    let (id, body) = accepted.iter().find(|(id, _)| *id == backordered).expect("the backorder notice");
    assert_eq!(body["notification_id"], id.as_str());
    assert_eq!(body["kind"], "orderly.order.backordered");
    assert_eq!((body["order_id"].as_str(), body["email"].as_str()), (Some("o-1"), Some("o-1@example.com")));
    assert_eq!(body["state"], "backordered");
    assert_eq!(body["expected_ship_date"], Timestamp(T0 + 86_400_000).to_string());
    let (_, body) = accepted.iter().find(|(id, _)| *id == labeled).expect("the label notice");
    assert_eq!((body["tracking"].as_str(), body["carrier"].as_str()), (Some("TRK-1"), Some("fast")));
    assert_eq!(body["email"], "o-1@example.com", "the e-mail remembered from order.allocated");
    assert_eq!(h.status(&backordered).await, Some(NotificationStatus::Sent));
    assert_eq!(h.metrics.counter_total("orderly_notifications_sent_total"), 3);

    // A lost cursor: both outboxes are delivered again after a restart.
    h.stop().await;
    h.start(true).await;
    h.sync().await;
    assert_eq!(h.notifications().await.len(), 3, "one notification per source event");
    assert_eq!(h.sink.calls(), 3, "nothing delivered twice");
    assert_eq!(h.events(EventType::NotificationSent).await.len(), 3);
    h.stop().await;
}

#[tokio::test]
async fn given_a_webhook_failing_twice_when_it_recovers_then_the_notification_is_delivered_exactly_once() {
    let mut h = Harness::started(|_| {}).await;
    h.sink.fail_next.store(2, Ordering::SeqCst);
    let id = h.state_changed(EventType::OrderShipped, "o-1", "shipped").await;

    eventually("a first failure", async || h.notifications().await.first().is_some_and(|n| n.attempts == 1)).await;
    let n = h.notifications().await.remove(0);
    let backoff_ms = n.next_attempt_at.since(Timestamp(T0));
    assert!((500..=1_000).contains(&backoff_ms), "backoff {backoff_ms} ms");
    assert_eq!(n.last_error.as_deref(), Some("502 from fake"));

    eventually("a delivery", async || {
        if h.status(&id).await == Some(NotificationStatus::Sent) {
            return true;
        }
        h.advance_when_idle(250).await;
        false
    })
    .await;
    h.sync().await;
    assert_eq!(h.sink.calls(), 3);
    assert_eq!(h.sink.accepted().len(), 1, "delivered exactly once");
    let n = h.notifications().await.remove(0);
    assert_eq!((n.attempts, n.total_attempts), (2, 3));
    let sent = h.events(EventType::NotificationSent).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].data.value()["notification_id"].as_str(), sent[0].data.value()["attempts"].as_u64()),
        (Some(id.as_str()), Some(3))
    );
    assert_eq!(h.metrics.counter_total("orderly_notification_retries_total"), 2);
    assert_eq!(h.metrics.counter_total("orderly_notifications_failed_total"), 0);
    h.stop().await;
}

#[tokio::test]
async fn given_a_webhook_down_past_the_limit_when_ops_retry_then_it_fails_visibly_and_is_delivered_once() {
    let mut h = Harness::started(|_| {}).await;
    h.sink.down.store(true, Ordering::SeqCst);
    let id = h.state_changed(EventType::OrderCanceled, "o-1", "canceled").await;
    eventually("a failed notification", async || {
        if h.status(&id).await == Some(NotificationStatus::Failed) {
            return true;
        }
        h.advance_when_idle(250).await;
        false
    })
    .await;
    assert_eq!(h.sink.calls(), 3, "bus.max_attempts attempts");
    let failed = h.events(EventType::NotificationFailed).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].data.value()["notification_id"].as_str(), failed[0].data.value()["attempts"].as_u64()),
        (Some(id.as_str()), Some(3))
    );
    assert_eq!(failed[0].subject, "o-1");
    assert_eq!(h.metrics.counter_total("orderly_notifications_failed_total"), 1);
    let listed = h.ask(|reply| Command::ListFailed { after: None, limit: 10, reply }).await.expect("listed");
    assert_eq!(listed.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    h.clock.advance(600_000);
    assert_eq!(h.sync().await.in_flight, 0);
    assert_eq!(h.sink.calls(), 3, "a failed notification is not retried on its own");

    h.sink.down.store(false, Ordering::SeqCst);
    let n = h.ask(|reply| Command::Retry { id: id.clone(), reply }).await.expect("requeued");
    assert_eq!((n.status, n.attempts), (NotificationStatus::Pending, 0));
    eventually("a delivery", async || h.status(&id).await == Some(NotificationStatus::Sent)).await;
    assert_eq!(h.sink.accepted().len(), 1);
    assert_eq!(h.events(EventType::NotificationSent).await.len(), 1);
    let err = h.ask(|reply| Command::Retry { id: id.clone(), reply }).await.expect_err("already sent");
    assert!(matches!(err, ApiError::Conflict { kind: "notification-sent", .. }), "{err:?}");
    let err = h.ask(|reply| Command::Retry { id: "nope".into(), reply }).await.expect_err("unknown");
    assert!(matches!(err, ApiError::NotFound(_)), "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn given_a_failing_endpoint_when_its_breaker_opens_then_deliveries_wait_for_one_probe() {
    let mut h = Harness::started(|s| s.bus.max_attempts = 10).await;
    h.sink.down.store(true, Ordering::SeqCst);
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(h.state_changed(EventType::OrderConfirmed, &format!("o-{n}"), "confirmed").await);
    }
    eventually("five failures", async || h.sink.calls() == 5 && h.sync().await.in_flight == 0).await;
    let labels = [("endpoint", "https://hooks.example.com")];
    eventually("an open breaker", async || h.metrics.gauge("orderly_webhook_breaker_state", &labels) == Some(2.0))
        .await;
    assert_eq!(h.summary().await.breaker.name(), "open");

    // Backoffs are over, but the breaker holds every delivery for its cooldown.
    h.clock.advance(10_000);
    assert_eq!(h.sync().await.in_flight, 0);
    assert_eq!(h.sink.calls(), 5);

    h.sink.down.store(false, Ordering::SeqCst);
    h.clock.advance(25_000);
    eventually("every delivery", async || {
        if h.sink.accepted().len() == 5 {
            return true;
        }
        h.advance_when_idle(1_000).await;
        false
    })
    .await;
    h.sync().await;
    assert_eq!(h.sink.calls(), 10, "one call each after the probe, none twice");
    assert_eq!(h.summary().await.breaker.name(), "closed");
    for id in &ids {
        assert_eq!(h.status(id).await, Some(NotificationStatus::Sent));
    }
    h.stop().await;
}

#[tokio::test]
async fn given_a_failed_commit_after_delivery_when_it_is_repeated_then_the_receiver_sees_the_same_notification_id() {
    let mut h = Harness::started(|_| {}).await;
    h.sink.fail_next.store(1, Ordering::SeqCst);
    let id = h.state_changed(EventType::OrderDelivered, "o-1", "delivered").await;
    eventually("a first failure", async || h.notifications().await.first().is_some_and(|n| n.attempts == 1)).await;

    // The endpoint accepts the retry, but the commit recording it fails (as if
    // the process died): the delivery is repeated with the same notification id.
    *h.sink.fail_commit.lock().expect("not poisoned") = Some(h.store.clone());
    eventually("a delivery", async || {
        if h.status(&id).await == Some(NotificationStatus::Sent) {
            return true;
        }
        h.advance_when_idle(250).await;
        false
    })
    .await;
    assert_eq!(h.metrics.counter("orderly_commit_failures_total", &[("service", "notifications")]), 1);
    let accepted = h.sink.accepted();
    assert_eq!(accepted.len(), 2);
    assert!(accepted.iter().all(|(event_id, body)| *event_id == id && body["notification_id"] == id.as_str()));
    assert_eq!(accepted[0].1, accepted[1].1, "the very same body, so the receiver can drop the repeat");
    assert_eq!(h.events(EventType::NotificationSent).await.len(), 1);
    h.stop().await;
}
