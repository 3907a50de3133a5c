//! The shipping service driven through the real runtime loop: `pack.completed`
//! events are committed into a packing outbox (a producer `MemoryStore`) and
//! reach the service through the embedded bus; carriers are in-test fakes;
//! time is a manual clock the tests move, so token-bucket windows, backoffs
//! and breaker cooldowns are exact. Every wait polls a condition with a deadline.

use async_trait::async_trait;
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::shipping::RateTable;
use orderly_domain::{LineId, LocationId, Money, OrderId, Priority, ShipmentId, Sku, Timestamp, Zone};
use orderly_engine::bus::{OutboxSource, Publisher};
use orderly_engine::config::{Settings, ZoneRoute};
use orderly_engine::events::{AllocationData, PackCompleted};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::metrics::Metrics;
use orderly_engine::ports::{Batch, CarrierApi, CarrierCallError, Clock, Label, LabelRequest, SeededRng, Store};
use orderly_engine::runtime::{self, Ctx};
use orderly_engine::services::common::{ApiError, Reply};
use orderly_engine::services::shipping::{
    self, Command, RatesInfo, Shipment, ShipmentState, Shipping, ShippingSummary,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const T0: i64 = 1_790_000_000_000;
const WAIT_MAX: Duration = Duration::from_secs(10);

const RATES_V1: &str = "version,2026-11-01.1\ncarrier,zone,max_weight_g,price\nfast,EU,5000,5.00\nslow,EU,5000,7.50\n";
const RATES_V2: &str = "version,2026-11-02.1\ncarrier,zone,max_weight_g,price\nfast,EU,5000,6.00\nslow,EU,5000,9.00\n";

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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Up,
    Down,
    Rejecting,
}

/// A carrier that is up, down (`Unavailable`) or rejecting, counts its calls
/// and honours idempotency keys like a real one.
struct FakeCarrier {
    id: &'static str,
    mode: Mutex<Mode>,
    calls: Mutex<Vec<LabelRequest>>,
    labels: Mutex<HashMap<String, Label>>,
    /// On its next call, makes the service's next commit fail (the one recording the result).
    fail_commit: Mutex<Option<Arc<MemoryStore>>>,
}

impl FakeCarrier {
    fn new(id: &'static str) -> Arc<FakeCarrier> {
        Arc::new(FakeCarrier {
            id,
            mode: Mutex::new(Mode::Up),
            calls: Mutex::default(),
            labels: Mutex::default(),
            fail_commit: Mutex::default(),
        })
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("not poisoned") = mode;
    }

    fn calls(&self) -> usize {
        self.calls.lock().expect("not poisoned").len()
    }

    fn requests(&self) -> Vec<LabelRequest> {
        self.calls.lock().expect("not poisoned").clone()
    }
}

#[async_trait]
impl CarrierApi for FakeCarrier {
    async fn create_label(&self, req: &LabelRequest) -> Result<Label, CarrierCallError> {
        self.calls.lock().expect("not poisoned").push(req.clone());
        if let Some(store) = self.fail_commit.lock().expect("not poisoned").take() {
            store.fail_next_commits(1);
        }
        match *self.mode.lock().expect("not poisoned") {
            Mode::Down => return Err(CarrierCallError::Unavailable("503 from fake".into())),
            Mode::Rejecting => return Err(CarrierCallError::Rejected("422 from fake".into())),
            Mode::Up => {}
        }
        let mut labels = self.labels.lock().expect("not poisoned");
        let n = labels.len();
        let label = labels.entry(req.idempotency_key.clone()).or_insert_with(|| Label {
            tracking_number: format!("{}-{n}", self.id),
            carrier: self.id.to_owned(),
            cost: "4.00".to_owned(),
        });
        Ok(label.clone())
    }
}

struct Running {
    commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// One shipping service over a memory store, fed by a packing outbox.
struct Harness {
    store: Arc<MemoryStore>,
    producer: Arc<MemoryStore>,
    publisher: Publisher,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
    settings: Settings,
    fast: Arc<FakeCarrier>,
    slow: Arc<FakeCarrier>,
    produced: u64,
    running: Option<Running>,
}

impl Harness {
    fn new(tune: impl FnOnce(&mut Settings)) -> Harness {
        let mut settings = Settings::default();
        settings.carriers.routes =
            vec![ZoneRoute { zone: "EU".into(), primary: "fast".into(), secondary: "slow".into() }];
        tune(&mut settings);
        Harness {
            store: Arc::new(MemoryStore::new()),
            producer: Arc::new(MemoryStore::new()),
            publisher: Publisher::new(0),
            clock: Arc::new(ManualClock(AtomicI64::new(T0))),
            metrics: Arc::new(Metrics::default()),
            settings,
            fast: FakeCarrier::new("fast"),
            slow: FakeCarrier::new("slow"),
            produced: 0,
            running: None,
        }
    }

    async fn started(tune: impl FnOnce(&mut Settings)) -> Harness {
        let mut h = Harness::new(tune);
        h.start(None).await;
        h
    }

    /// Starts the service; `cursor` overrides the stored packing cursor (0 replays everything).
    async fn start(&mut self, cursor: Option<u64>) {
        let mut carriers: HashMap<String, Arc<dyn CarrierApi>> = HashMap::new();
        carriers.insert("fast".into(), self.fast.clone());
        carriers.insert("slow".into(), self.slow.clone());
        let rates = RateTable::parse(RATES_V1).expect("valid rates");
        let (svc, worker) =
            Shipping::open(self.store.as_ref(), &self.settings, carriers, Some(rates), self.clock.as_ref())
                .await
                .expect("shipping opens");
        let cursor = match cursor {
            Some(c) => c,
            None => self.store.cursor("packing").await.expect("cursor"),
        };
        let producer: Arc<dyn Store> = self.producer.clone();
        let source = OutboxSource::new("packing", producer, self.publisher.clone(), cursor, shipping::wants);
        let ctx = Arc::new(Ctx {
            service: "shipping",
            source: "/orderly/shipping".into(),
            clock: self.clock.clone(),
            rng: Arc::new(SeededRng::new(7)),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            max_attempts: 3,
        });
        let (commands, rx) = mpsc::channel(256);
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(worker.run(commands.clone()));
        let driver = runtime::Driver::new(svc, ctx, vec![Arc::new(source)], |_| {}).await.expect("driver");
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

    /// Commits a `pack.completed` for `package` into the packing outbox.
    async fn pack(&mut self, package: &str, order: &str, zone: &str) {
        self.produced += 1;
        let data = PackCompleted {
            package_id: package.to_owned(),
            order_id: OrderId::parse(order).expect("order id"),
            location: LocationId::parse("WH-EU-1").expect("location"),
            pick_ids: Vec::new(),
            lines: vec![AllocationData {
                line_id: LineId::parse(format!("{order}:1")).expect("line id"),
                sku: Sku::parse("SKU-1").expect("sku"),
                location: LocationId::parse("WH-EU-1").expect("location"),
                qty: 2,
            }],
            zone: Zone::parse(zone).expect("zone"),
            priority: Priority::Standard,
            weight_g: 1_000,
        };
        let env = Envelope::new(
            format!("evt-{}", self.produced),
            "/orderly/packing",
            EventType::PackCompleted,
            order,
            self.clock.now(),
            self.produced,
            serde_json::to_value(&data).expect("serializable"),
        );
        let head = self.producer.commit(Batch { outbox: vec![env], ..Batch::default() }).await.expect("commit");
        self.publisher.publish(head);
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let running = self.running.as_ref().expect("running");
        running.commands.send(make(tx)).await.expect("the service takes commands");
        rx.await.expect("the service answers")
    }

    async fn summary(&self) -> ShippingSummary {
        self.ask(|reply| Command::Summary { reply }).await.expect("summary")
    }

    /// Two round trips: the turn after the first includes any tick due now,
    /// and a call dispatched by it is either still in flight or answered.
    async fn sync(&self) -> ShippingSummary {
        self.summary().await;
        self.summary().await
    }

    /// Moves the clock on, but only while no call is out (so no call is ever
    /// presumed lost because virtual time raced ahead of a real one).
    async fn advance_when_idle(&self, ms: i64) {
        if self.summary().await.labels_in_flight == 0 {
            self.clock.advance(ms);
        }
    }

    async fn shipments(&self) -> Vec<Shipment> {
        let rows = self.store.scan("shipments", None, None, 1_000).await.expect("scan");
        rows.iter().map(|r| serde_json::from_slice(&r.doc).expect("a shipment")).collect()
    }

    async fn shipment_for(&self, package: &str) -> Option<Shipment> {
        self.shipments().await.into_iter().find(|s| s.package_id == package)
    }

    async fn labeled(&self) -> Vec<Shipment> {
        self.shipments().await.into_iter().filter(|s| s.state == ShipmentState::Labeled).collect()
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

fn money(s: &str) -> Money {
    Money::parse(s).expect("money")
}

#[tokio::test]
async fn given_a_packed_order_when_the_primary_is_up_then_a_label_is_created_with_its_timestamp() {
    let mut h = Harness::started(|_| {}).await;
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("a label", async || h.labeled().await.len() == 1).await;

    let s = h.shipment_for("pkg-1").await.expect("a shipment");
    assert_eq!(s.label_created_at, Some(Timestamp(T0)));
    assert_eq!(s.carrier.as_ref().map(|c| c.as_str()), Some("fast"));
    assert_eq!(s.tracking_number.as_deref(), Some("fast-0"));
    assert_eq!((s.cost, s.quoted_price), (Some(money("4.00")), Some(money("5.00"))));
    assert_eq!(s.rate_version.as_deref(), Some("2026-11-01.1"));
    assert_eq!((s.fallback_from.clone(), s.primary_attempts), (None, 0));
    let view = serde_json::to_value(s.view()).expect("json");
    assert_eq!(view["label_created_at"], Timestamp(T0).to_string());
    assert_eq!((view["cost"].as_str(), view["state"].as_str()), (Some("4.00"), Some("labeled")));
    assert!(view.get("fallback_from").is_none());
    let requests = h.fast.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].idempotency_key, format!("{}:fast", s.id));
    assert_eq!(requests[0].weight_g, 1_000);

    let created = h.events(EventType::ShipmentLabelCreated).await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].subject, "o-1");
    assert_eq!(created[0].data.value()["label_created_at"], Timestamp(T0).to_string());
    assert_eq!(created[0].data.value()["tracking_number"], "fast-0");
    assert!(h.events(EventType::ShipmentCarrierFallback).await.is_empty());
    assert_eq!(h.metrics.counter("orderly_labels_created_total", &[("carrier", "fast")]), 1);
    assert_eq!(h.metrics.gauge("orderly_label_queue_depth", &[]), Some(0.0));
    h.stop().await;
}

#[tokio::test]
async fn given_a_failing_primary_when_labeling_then_it_is_tried_max_retries_times_then_the_secondary() {
    let mut h = Harness::started(|_| {}).await;
    h.fast.set(Mode::Down);
    h.pack("pkg-1", "o-1", "EU").await;

    // After the first failure the next attempt waits for a jittered backoff.
    eventually("a first failed attempt", async || {
        h.shipment_for("pkg-1").await.is_some_and(|s| s.primary_attempts == 1)
    })
    .await;
    let s = h.shipment_for("pkg-1").await.expect("a shipment");
    let backoff_ms = s.next_attempt_at.since(Timestamp(T0));
    assert!((250..=500).contains(&backoff_ms), "backoff {backoff_ms} ms");
    h.sync().await;
    assert_eq!(h.fast.calls(), 1, "nothing is retried before the backoff");

    eventually("a label from the secondary", async || {
        if h.labeled().await.len() == 1 {
            return true;
        }
        h.advance_when_idle(200).await;
        false
    })
    .await;
    let s = h.shipment_for("pkg-1").await.expect("a shipment");
    assert_eq!(h.fast.calls(), 3, "exactly shipping.max_retries attempts at the primary");
    assert_eq!(h.slow.calls(), 1);
    assert_eq!(h.slow.requests()[0].idempotency_key, format!("{}:slow", s.id));
    assert_eq!(s.carrier.as_ref().map(|c| c.as_str()), Some("slow"));
    assert_eq!(s.fallback_from.as_ref().map(|c| c.as_str()), Some("fast"));
    assert_eq!(s.cost_difference, Some(money("2.50")));
    assert_eq!(s.primary_attempts, 3);

    let fallbacks = h.events(EventType::ShipmentCarrierFallback).await;
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(fallbacks[0].data.value()["from"], "fast");
    assert_eq!(fallbacks[0].data.value()["to"], "slow");
    assert_eq!(fallbacks[0].data.value()["cost_difference"], "2.50");
    assert_eq!(h.events(EventType::ShipmentLabelCreated).await[0].data.value()["fallback_from"], "fast");
    let labels = [("from", "fast"), ("to", "slow")];
    assert_eq!(h.metrics.counter("orderly_carrier_fallbacks_total", &labels), 1);
    assert_eq!(h.metrics.counter("orderly_carrier_fallback_cost_difference_total", &labels), 250);
    h.stop().await;
}

#[tokio::test]
async fn given_an_open_primary_breaker_when_labeling_then_the_secondary_is_used_at_once() {
    let mut h = Harness::started(|s| {
        s.carriers.breaker_failures = 2;
        s.shipping.max_retries = 5;
    })
    .await;
    h.fast.set(Mode::Down);
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("the first label", async || {
        if h.labeled().await.len() == 1 {
            return true;
        }
        h.advance_when_idle(200).await;
        false
    })
    .await;
    assert_eq!(h.fast.calls(), 2, "the breaker opened after two failures, before max_retries");
    assert_eq!(h.metrics.gauge("orderly_carrier_breaker_state", &[("carrier", "fast")]), Some(2.0));
    let summary = h.summary().await;
    assert_eq!(summary.breakers["fast"].name(), "open");
    assert_eq!(summary.breakers["slow"].name(), "closed");

    h.pack("pkg-2", "o-2", "EU").await;
    eventually("the second label", async || h.labeled().await.len() == 2).await;
    let s = h.shipment_for("pkg-2").await.expect("a shipment");
    assert_eq!(h.fast.calls(), 2, "no call to a carrier whose breaker is open");
    assert_eq!(s.primary_attempts, 0);
    assert_eq!(s.fallback_from.as_ref().map(|c| c.as_str()), Some("fast"));
    assert_eq!(s.label_created_at, Some(h.clock.now()));
    h.stop().await;
}

#[tokio::test]
async fn given_a_small_burst_when_many_parcels_wait_then_labels_go_out_in_batches_per_window() {
    let mut h = Harness::started(|s| {
        s.shipping.labels_per_minute = 6; // one token every 10 s
        s.shipping.label_burst = 2;
    })
    .await;
    for n in 1..=5 {
        h.pack(&format!("pkg-{n}"), &format!("o-{n}"), "EU").await;
    }
    eventually("the first burst", async || h.labeled().await.len() == 2).await;
    let summary = h.sync().await;
    assert_eq!((summary.label_queue_depth, summary.labels_in_flight), (3, 0));
    assert_eq!(h.fast.calls(), 2);
    assert_eq!(h.metrics.gauge("orderly_label_queue_depth", &[]), Some(3.0));

    // One token is not a batch: the rest waits for a batch's worth (the burst).
    h.clock.advance(10_000);
    assert_eq!(h.sync().await.labels_in_flight, 0);
    assert_eq!(h.fast.calls(), 2);

    h.clock.advance(10_000);
    eventually("the second batch", async || h.labeled().await.len() == 4).await;
    assert_eq!(h.fast.calls(), 4);
    h.clock.advance(10_000);
    eventually("the last label", async || h.labeled().await.len() == 5).await;

    let mut times: Vec<i64> = h.labeled().await.iter().filter_map(|s| s.label_created_at).map(|t| t.0 - T0).collect();
    times.sort();
    assert_eq!(times, [0, 0, 20_000, 20_000, 30_000]);
    assert_eq!(h.fast.calls(), 5);
    h.stop().await;
}

#[tokio::test]
async fn given_a_rate_upload_when_the_next_batch_starts_then_it_prices_labels_and_survives_a_restart() {
    let mut h = Harness::started(|s| {
        s.shipping.labels_per_minute = 60;
        s.shipping.label_burst = 1;
    })
    .await;
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("the first label", async || h.labeled().await.len() == 1).await;

    let bad = RATES_V2.replace("fast,EU,5000,6.00", "fast,EU,5000,six");
    let err = h.ask(|reply| Command::UploadRates { text: bad, reply }).await.expect_err("a bad table");
    assert!(
        matches!(&err, ApiError::Invalid { kind: "invalid-rate-table", detail } if detail.contains("line 3")),
        "{err:?}"
    );
    let same = RATES_V1.to_owned();
    let err = h.ask(|reply| Command::UploadRates { text: same, reply }).await.expect_err("not newer");
    assert!(matches!(err, ApiError::Invalid { kind: "rate-version-not-newer", .. }), "{err:?}");
    let partial = "version,2026-11-03.1\ncarrier,zone,max_weight_g,price\nfast,EU,5000,6.00\n".to_owned();
    let err = h.ask(|reply| Command::UploadRates { text: partial, reply }).await.expect_err("incomplete");
    assert!(matches!(err, ApiError::Invalid { kind: "rate-table-incomplete", .. }), "{err:?}");
    assert_eq!(h.summary().await.rates.active_version.as_deref(), Some("2026-11-01.1"));

    let info = h.ask(|reply| Command::UploadRates { text: RATES_V2.to_owned(), reply }).await.expect("accepted");
    let expected =
        RatesInfo { active_version: Some("2026-11-01.1".into()), pending_version: Some("2026-11-02.1".into()) };
    assert_eq!(info, expected);

    // The bucket is empty: the next parcel waits for the next window, and with it the new table.
    h.pack("pkg-2", "o-2", "EU").await;
    eventually("the second shipment", async || h.shipment_for("pkg-2").await.is_some()).await;
    assert_eq!(h.sync().await.rates, expected);
    h.clock.advance(1_000);
    eventually("the second label", async || h.labeled().await.len() == 2).await;

    let first = h.shipment_for("pkg-1").await.expect("a shipment");
    let second = h.shipment_for("pkg-2").await.expect("a shipment");
    assert_eq!((first.rate_version.as_deref(), first.quoted_price), (Some("2026-11-01.1"), Some(money("5.00"))));
    assert_eq!((second.rate_version.as_deref(), second.quoted_price), (Some("2026-11-02.1"), Some(money("6.00"))));
    assert_eq!(h.summary().await.rates.pending_version, None);

    let stored = h.store.get("rates", shipping::RATES_KEY).await.expect("get").expect("stored rates");
    let stored: shipping::StoredRates = serde_json::from_slice(&stored.doc).expect("stored rates");
    assert_eq!((stored.version.as_str(), stored.text.as_str()), ("2026-11-02.1", RATES_V2));
    h.stop().await;
    h.start(None).await;
    let rates = h.summary().await.rates;
    assert_eq!(rates.active_version.as_deref(), Some("2026-11-02.1"), "the upload outlives the rates file");
    h.stop().await;
}

#[tokio::test]
async fn given_a_labeled_shipment_when_the_carrier_reports_delivery_twice_then_it_is_delivered_once() {
    let mut h = Harness::started(|_| {}).await;
    h.pack("pkg-1", "o-1", "EU").await;
    h.pack("pkg-2", "o-2", "MARS").await;
    eventually("a label", async || h.labeled().await.len() == 1).await;
    let id = h.shipment_for("pkg-1").await.expect("a shipment").id;

    h.clock.advance(5_000);
    let first = h.ask(|reply| Command::Delivered { shipment_id: id.clone(), reply }).await.expect("delivered");
    assert_eq!((first.state, first.delivered_at), (ShipmentState::Delivered, Some(Timestamp(T0 + 5_000))));
    h.clock.advance(5_000);
    let again = h.ask(|reply| Command::Delivered { shipment_id: id.clone(), reply }).await.expect("a repeat");
    assert_eq!(again, first, "a repeated callback changes nothing");
    let delivered = h.events(EventType::ShipmentDelivered).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].data.value()["shipment_id"], id.as_str());

    let unknown = ShipmentId::parse("nope").expect("id");
    let err = h.ask(|reply| Command::Delivered { shipment_id: unknown, reply }).await.expect_err("unknown");
    assert!(matches!(err, ApiError::NotFound(_)), "{err:?}");
    let unrouted = h.shipment_for("pkg-2").await.expect("a shipment for an unrouted zone");
    assert_eq!(unrouted.state, ShipmentState::LabelPending, "an unrouted zone keeps the shipment pending");
    let err = h.ask(|reply| Command::Delivered { shipment_id: unrouted.id.clone(), reply }).await.expect_err("pending");
    assert!(matches!(err, ApiError::Conflict { kind: "shipment-not-labeled", .. }), "{err:?}");
    assert!(h.metrics.counter("orderly_label_failures_total", &[("reason", "no_route")]) >= 1);
    h.stop().await;
}

#[tokio::test]
async fn given_a_repeated_or_redelivered_pack_completed_when_consumed_then_there_is_one_shipment() {
    let mut h = Harness::started(|_| {}).await;
    h.pack("pkg-1", "o-1", "EU").await;
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("a label", async || h.labeled().await.len() == 1).await;
    h.sync().await;
    assert_eq!(h.shipments().await.len(), 1);
    assert_eq!(h.fast.calls(), 1);

    // A lost cursor: the whole packing outbox is delivered again.
    h.stop().await;
    h.start(Some(0)).await;
    // The first turn polls the replayed events, so one round trip covers them.
    h.sync().await;
    assert_eq!(h.shipments().await.len(), 1);
    assert_eq!(h.fast.calls(), 1);
    assert_eq!(h.events(EventType::ShipmentLabelCreated).await.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn given_both_carriers_down_when_labeling_then_the_shipment_stays_pending_and_is_labeled_after_a_restart() {
    let mut h = Harness::started(|_| {}).await;
    h.fast.set(Mode::Down);
    h.slow.set(Mode::Down);
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("a failed round", async || {
        if h.shipment_for("pkg-1").await.is_some_and(|s| s.failed_rounds == 1) {
            return true;
        }
        h.advance_when_idle(200).await;
        false
    })
    .await;
    let s = h.shipment_for("pkg-1").await.expect("a shipment");
    assert_eq!(s.state, ShipmentState::LabelPending);
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("slow")), "{:?}", s.last_error);
    assert_eq!(h.metrics.counter("orderly_label_failures_total", &[("reason", "unavailable")]), 1);
    assert_eq!((h.fast.calls(), h.slow.calls()), (3, 1));

    // The process dies while the shipment waits; the restarted service finds it pending.
    h.stop().await;
    h.fast.set(Mode::Up);
    h.start(None).await;
    assert_eq!(h.summary().await.label_queue_depth, 1);
    eventually("a label after the round backoff", async || {
        if h.labeled().await.len() == 1 {
            return true;
        }
        h.advance_when_idle(1_000).await;
        false
    })
    .await;
    let s = h.shipment_for("pkg-1").await.expect("a shipment");
    assert_eq!(s.carrier.as_ref().map(|c| c.as_str()), Some("fast"), "a new round starts at the primary");
    assert_eq!(s.fallback_from, None);
    h.stop().await;
}

#[tokio::test]
async fn given_both_carriers_rejecting_when_labeling_then_the_shipment_is_parked_until_ops_retry() {
    let mut h = Harness::started(|_| {}).await;
    h.fast.set(Mode::Rejecting);
    h.slow.set(Mode::Rejecting);
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("a failed shipment", async || {
        h.shipment_for("pkg-1").await.is_some_and(|s| s.state == ShipmentState::Failed)
    })
    .await;
    assert_eq!((h.fast.calls(), h.slow.calls()), (1, 1), "a rejection is not retried at the same carrier");
    assert_eq!(h.metrics.counter("orderly_label_failures_total", &[("reason", "rejected")]), 1);

    h.fast.set(Mode::Up);
    let id = h.shipment_for("pkg-1").await.expect("a shipment").id;
    let s = h.ask(|reply| Command::Retry { shipment_id: id.clone(), reply }).await.expect("requeued");
    assert_eq!(s.state, ShipmentState::LabelPending);
    eventually("a label", async || h.labeled().await.len() == 1).await;
    let err = h.ask(|reply| Command::Retry { shipment_id: id.clone(), reply }).await.expect_err("labeled");
    assert!(matches!(err, ApiError::Conflict { .. }), "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn given_a_failed_commit_when_a_label_is_recorded_then_the_same_label_is_recorded_on_a_later_batch() {
    let mut h = Harness::started(|s| {
        s.shipping.labels_per_minute = 60;
        s.shipping.label_burst = 1;
    })
    .await;
    h.pack("pkg-1", "o-1", "EU").await;
    eventually("the first label", async || h.labeled().await.len() == 1).await;
    // The bucket is empty, so pkg-2's shipment is committed before its label call.
    h.pack("pkg-2", "o-2", "EU").await;
    eventually("a pending shipment", async || h.shipment_for("pkg-2").await.is_some()).await;
    assert_eq!(h.sync().await.label_queue_depth, 1);

    // The commit recording pkg-2's label fails: nothing of it is kept, and the
    // shipment goes out again, in a later window, with the same idempotency key.
    *h.fast.fail_commit.lock().expect("not poisoned") = Some(h.store.clone());
    eventually("the second label", async || {
        if h.labeled().await.len() == 2 {
            return true;
        }
        h.advance_when_idle(500).await;
        false
    })
    .await;
    assert_eq!(h.metrics.counter("orderly_commit_failures_total", &[("service", "shipping")]), 1);
    let s = h.shipment_for("pkg-2").await.expect("a shipment");
    let requests: Vec<LabelRequest> =
        h.fast.requests().into_iter().filter(|r| r.shipment_id == s.id.as_str()).collect();
    assert_eq!(requests.len(), 2, "the label call is repeated after the failed commit");
    assert!(requests.iter().all(|r| r.idempotency_key == format!("{}:fast", s.id)));
    assert_eq!(s.tracking_number.as_deref(), Some("fast-1"), "the carrier's one label for this key");
    let created = h.events(EventType::ShipmentLabelCreated).await;
    assert_eq!(created.iter().filter(|e| e.subject == "o-2").count(), 1);
    h.stop().await;
}
