//! The shipping service: it turns every `pack.completed` into a shipment,
//! buys its carrier label through a worker task that keeps network calls off
//! the service loop, falls back to a zone's secondary carrier, prices labels
//! with a versioned rate table, and records delivery callbacks.
//!
//! The loop owns every decision (token bucket, breakers, carrier choice,
//! retries, pricing); the [`LabelWorker`] only makes the calls it is handed,
//! each bounded by `shipping.carrier_timeout`, and feeds each result back as a
//! [`Command::LabelResult`]. A label request carries the idempotency key
//! `<shipment id>:<carrier>`, so a call repeated after a crash, a timeout or a
//! lost result creates no second label.

use super::common::{ApiError, Reply, derived_id};
use crate::config::Settings;
use crate::events::{self, AllocationData, CarrierFallback, LabelCreated, PackCompleted, ShipmentDelivered};
use crate::metrics::Metrics;
use crate::ports::{Batch, CarrierApi, CarrierCallError, Clock, Label, LabelRequest, Store, StoreError};
use crate::runtime::{EventError, Service, Tx};
use crate::table::{CACHE_ENTRIES_MAX, Staged, Table};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::shipping::{
    BreakerConfig, BreakerState, CarrierChoice, CarrierId, CarrierPair, CarrierRoutes, CircuitBreaker, RateBook,
    RateTable, RateVersion, RetryPolicy, TokenBucket, cost_difference,
};
use orderly_domain::{Money, OrderId, Priority, ShipmentId, Timestamp, Zone};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Most label calls out at once (also the capacity of the worker's job channel).
pub const LABEL_CALLS_IN_FLIGHT_MAX: usize = 64;
/// Most due shipments looked at when a label batch is formed.
pub const DISPATCH_SCAN_MAX: usize = 1_024;
/// Backoff between attempts at the primary carrier: first cap.
pub const PRIMARY_RETRY_BASE_MS: u64 = 500;
/// Backoff between attempts at the primary carrier: longest wait.
pub const PRIMARY_RETRY_MAX_MS: u64 = 10_000;
/// Backoff after both carriers failed (or the zone has no route): first cap.
pub const ROUND_RETRY_BASE_MS: u64 = 5_000;
/// Backoff after both carriers failed: longest wait. Shipments are never dropped.
pub const ROUND_RETRY_MAX_MS: u64 = 300_000;
/// How long past the carrier timeout a call may stay unanswered before the
/// service presumes its result lost and tries again.
pub const CALL_GRACE_MS: i64 = 5_000;
/// How long a shipment waits when its carrier's breaker is blocked with no known end.
pub const BREAKER_RECHECK_MS: i64 = 1_000;
/// The key of the accepted rate table in table `rates`.
pub const RATES_KEY: &str = "latest";

/// Where a shipment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentState {
    /// Waiting for a carrier label (queued, backing off, or on a call).
    LabelPending,
    /// The carrier created a label.
    Labeled,
    /// The carrier reported delivery.
    Delivered,
    /// Both carriers rejected the label request outright; parked for ops
    /// ([`Command::Retry`] puts it back in the queue).
    Failed,
    /// Its order was canceled before a label was made: no label will be.
    Canceled,
}

impl ShipmentState {
    /// The wire name, also the `shipments` index value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentState::LabelPending => "label_pending",
            ShipmentState::Labeled => "labeled",
            ShipmentState::Delivered => "delivered",
            ShipmentState::Failed => "failed",
            ShipmentState::Canceled => "canceled",
        }
    }
}

/// A shipment, as stored (table `shipments`, indexed by state) and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// Shipment id, derived from the package id.
    pub id: ShipmentId,
    /// Order id.
    pub order_id: OrderId,
    /// The package it ships.
    pub package_id: String,
    /// Destination zone.
    pub zone: Zone,
    /// Parcel weight.
    pub weight_g: u32,
    /// Units per line.
    pub lines: Vec<AllocationData>,
    /// Same-day shipments go first in a label batch.
    pub priority: Priority,
    /// State.
    pub state: ShipmentState,
    /// Carrier of the label.
    pub carrier: Option<CarrierId>,
    /// Carrier's tracking number.
    pub tracking_number: Option<String>,
    /// What the label cost (the carrier's charge, else the rate table's price).
    pub cost: Option<Money>,
    /// When the label was created.
    pub label_created_at: Option<Timestamp>,
    /// The primary carrier, when the label went to the secondary.
    pub fallback_from: Option<CarrierId>,
    /// Secondary price − primary price, on a fallback.
    pub cost_difference: Option<Money>,
    /// The label's price in the active rate table when it was requested.
    pub quoted_price: Option<Money>,
    /// Failed calls to the primary carrier, over all rounds.
    pub primary_attempts: u32,
    /// Calls to any carrier, over all rounds.
    pub label_attempts: u32,
    /// Rounds in which both carriers failed (or the zone had no route).
    pub failed_rounds: u32,
    /// Failed calls to the primary carrier in the current round.
    pub round_primary_failures: u32,
    /// The primary rejected the request (4xx) in the current round.
    pub round_primary_rejected: bool,
    /// When the next label attempt is due (restored after a restart).
    pub next_attempt_at: Timestamp,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The rate table version the label was priced with.
    pub rate_version: Option<String>,
    /// When the shipment was created.
    pub created_at: Timestamp,
    /// When the carrier reported delivery.
    pub delivered_at: Option<Timestamp>,
}

impl Shipment {
    /// The shipment as `GET /v1/shipments/{id}` shows it.
    pub fn view(&self) -> ShipmentView {
        ShipmentView {
            id: self.id.clone(),
            order_id: self.order_id.clone(),
            package_id: self.package_id.clone(),
            state: self.state,
            zone: self.zone.clone(),
            carrier: self.carrier.as_ref().map(CarrierId::to_string),
            tracking_number: self.tracking_number.clone(),
            label_created_at: self.label_created_at,
            cost: self.cost,
            fallback_from: self.fallback_from.as_ref().map(CarrierId::to_string),
            cost_difference: self.cost_difference,
            rate_version: self.rate_version.clone(),
            created_at: self.created_at,
            delivered_at: self.delivered_at,
            last_error: self.last_error.clone(),
        }
    }
}

/// A shipment in the API's shape (PRODUCT.md §8): carriers as plain strings,
/// times in RFC 3339, money as decimal strings, no retry bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShipmentView {
    /// Shipment id.
    pub id: ShipmentId,
    /// Order id.
    pub order_id: OrderId,
    /// Package id.
    pub package_id: String,
    /// State.
    pub state: ShipmentState,
    /// Destination zone.
    pub zone: Zone,
    /// Carrier of the label.
    pub carrier: Option<String>,
    /// Tracking number.
    pub tracking_number: Option<String>,
    /// When the label was created.
    pub label_created_at: Option<Timestamp>,
    /// What the label cost.
    pub cost: Option<Money>,
    /// The primary carrier, on a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// Secondary price − primary price, on a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_difference: Option<Money>,
    /// Rate table version the label was priced with.
    pub rate_version: Option<String>,
    /// When the shipment was created.
    pub created_at: Timestamp,
    /// When the carrier reported delivery.
    pub delivered_at: Option<Timestamp>,
    /// Why the last label attempt failed, while it has no label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A carrier's result, fed back into the service by the [`LabelWorker`].
#[derive(Debug, Clone)]
pub struct LabelOutcome {
    /// The call's job number (results of superseded calls are ignored).
    pub job: u64,
    /// Shipment.
    pub shipment_id: ShipmentId,
    /// Carrier called.
    pub carrier: CarrierId,
    /// What the carrier said (a timeout is `Unavailable`).
    pub result: Result<Label, CarrierCallError>,
}

/// What the rate tables look like now, answered to an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatesInfo {
    /// The version labels are priced with now.
    pub active_version: Option<String>,
    /// The version that takes over at the start of the next label batch.
    pub pending_version: Option<String>,
}

/// Shipping's part of `/v1/ops/summary`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShippingSummary {
    /// Breaker state per carrier.
    pub breakers: BTreeMap<String, BreakerState>,
    /// Shipments waiting for a label (queued, backing off or on a call).
    pub label_queue_depth: u64,
    /// Label calls out now.
    pub labels_in_flight: u64,
    /// Rate table versions.
    pub rates: RatesInfo,
}

/// Commands from the API (and from the label worker).
pub enum Command {
    /// The carrier's delivery callback; a repeat returns the shipment unchanged.
    Delivered {
        /// Shipment.
        shipment_id: ShipmentId,
        /// Answer.
        reply: Reply<Shipment>,
    },
    /// A shipment, for `GET /v1/shipments/{id}`.
    Get {
        /// Shipment.
        shipment_id: ShipmentId,
        /// Answer.
        reply: Reply<Shipment>,
    },
    /// Puts a failed shipment back in the label queue.
    Retry {
        /// Shipment.
        shipment_id: ShipmentId,
        /// Answer.
        reply: Reply<Shipment>,
    },
    /// A new rate table (the file's text); it takes effect at the next batch.
    UploadRates {
        /// The rate file.
        text: String,
        /// Answer.
        reply: Reply<RatesInfo>,
    },
    /// Breakers, queue depth and rate versions.
    Summary {
        /// Answer.
        reply: Reply<ShippingSummary>,
    },
    /// A carrier call's result, from the [`LabelWorker`].
    LabelResult(LabelOutcome),
}

/// Why the shipping service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The `[shipping]` / `[carriers]` settings are unusable.
    #[error("invalid shipping configuration: {0}")]
    Config(String),
}

/// One label call the service hands to the worker.
#[derive(Debug)]
struct LabelJob {
    job: u64,
    shipment_id: ShipmentId,
    carrier: CarrierId,
    request: LabelRequest,
}

/// What the service remembers about a call out.
#[derive(Debug, Clone)]
struct LabelFlight {
    job: u64,
    choice: CarrierChoice,
    rate_version: Option<RateVersion>,
    quoted_price: Option<Money>,
    cost_difference: Option<Money>,
    dispatched_at: Timestamp,
}

/// A shipment ready to go out in this batch.
struct Plan {
    id: String,
    priority: Priority,
    due_at: Timestamp,
    choice: CarrierChoice,
}

/// The shipping service.
pub struct Shipping {
    shipments: Table<Shipment>,
    /// Orders canceled, so a package of one packed after the cancel (the
    /// events race) never reaches a carrier.
    canceled_orders: Table<Timestamp>,
    rates: Rates,
    queue: DueQueue<LabelFlight>,
    routes: CarrierRoutes,
    breakers: BTreeMap<CarrierId, CircuitBreaker>,
    bucket: TokenBucket,
    bucket_ready_at: Option<Timestamp>,
    jobs: mpsc::Sender<LabelJob>,
    next_job: u64,
    max_retries: u32,
    primary_retry: RetryPolicy,
    round_retry: RetryPolicy,
    call_deadline_ms: i64,
}

impl Shipping {
    /// Opens the service over its store: routes, breakers and the token bucket
    /// from `settings`, the newer of `initial_rates` (the rates file) and the
    /// last accepted upload, and every `label_pending` shipment back in the
    /// queue. The engine spawns the returned worker with
    /// `tokio::spawn(worker.run(command_sender))`, where `command_sender` feeds
    /// the same channel the runtime reads this service's commands from.
    pub async fn open(
        store: &dyn Store,
        settings: &Settings,
        carriers: HashMap<String, Arc<dyn CarrierApi>>,
        initial_rates: Option<RateTable>,
        clock: &dyn Clock,
    ) -> Result<(Shipping, LabelWorker), OpenError> {
        let config = ShippingConfig::from_settings(settings, &carriers)?;
        let apis = carriers
            .into_iter()
            .map(|(id, api)| CarrierId::parse(id.clone()).map(|c| (c, api)))
            .collect::<Result<HashMap<_, _>, _>>()
            .map_err(|e| OpenError::Config(e.to_string()))?;
        let (jobs_tx, jobs_rx) = mpsc::channel(LABEL_CALLS_IN_FLIGHT_MAX);
        let timeout_ms = u64::try_from(settings.shipping.carrier_timeout.0.max(1)).unwrap_or(u64::MAX);
        let worker = LabelWorker { jobs: jobs_rx, carriers: apis, timeout_ms };
        let mut svc = Shipping {
            shipments: Table::new("shipments", CACHE_ENTRIES_MAX, |s: &Shipment| Some(s.state.as_str().to_owned()))
                .settled_when(|s| {
                    matches!(s.state, ShipmentState::Delivered | ShipmentState::Failed | ShipmentState::Canceled)
                }),
            // Looked up once per package of the order (a miss reads the store).
            canceled_orders: Table::new("canceled_orders", CACHE_ENTRIES_MAX, |_| None).settled_when(|_| true),
            rates: Rates::open(store, initial_rates).await?,
            queue: DueQueue::new(),
            routes: config.routes,
            breakers: config.breakers,
            bucket: config.bucket.reset(clock.now()),
            bucket_ready_at: None,
            jobs: jobs_tx,
            next_job: 0,
            max_retries: settings.shipping.max_retries,
            primary_retry: config.primary_retry,
            round_retry: config.round_retry,
            call_deadline_ms: settings.shipping.carrier_timeout.0.saturating_add(CALL_GRACE_MS),
        };
        svc.requeue_pending(store).await?;
        Ok((svc, worker))
    }

    /// Puts every stored `label_pending` shipment back in the queue, due when it was due.
    async fn requeue_pending(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        const PAGE: u32 = 1_000;
        let mut after: Option<String> = None;
        loop {
            let rows =
                store.scan("shipments", Some(ShipmentState::LabelPending.as_str()), after.as_deref(), PAGE).await?;
            let done = rows.len() < PAGE as usize;
            for row in rows {
                let shipment: Shipment = serde_json::from_slice(&row.doc).map_err(|e| StoreError::Corrupt {
                    table: "shipments".to_owned(),
                    key: row.key.clone(),
                    detail: e.to_string(),
                })?;
                self.queue.schedule_stored(&row.key, shipment.next_attempt_at);
                after = Some(row.key);
            }
            if done {
                return Ok(());
            }
        }
    }

    /// A canceled order's packages must not reach a carrier: every shipment
    /// of it still waiting for a label is canceled (a call already in flight
    /// is ignored when it answers).
    async fn on_order_canceled(&mut self, tx: &mut Tx, ev: events::OrderCanceled) -> Result<(), EventError> {
        self.canceled_orders.insert(ev.order_id.as_str().to_owned(), tx.now);
        let ids = self.queue.ids();
        for id in &ids {
            self.shipments.load(tx.store(), id).await?;
        }
        for id in ids {
            let Some(s) = self.shipments.get_mut(&id) else { continue };
            if s.order_id != ev.order_id || !matches!(s.state, ShipmentState::LabelPending | ShipmentState::Failed) {
                continue;
            }
            s.state = ShipmentState::Canceled;
            self.queue.unschedule(&id);
            tx.ctx().metrics.inc("orderly_shipments_canceled_total", &[], 1);
            tracing::info!(shipment = %id, order_id = %ev.order_id, "label canceled with its order");
        }
        Ok(())
    }

    async fn on_packed(&mut self, tx: &mut Tx, ev: PackCompleted) -> Result<(), EventError> {
        let id = ShipmentId::parse(derived_id(&ev.package_id, ".shp"))
            .map_err(|e| EventError::Poison(format!("package id {:?}: {e}", ev.package_id)))?;
        if self.shipments.load(tx.store(), id.as_str()).await? {
            // A redelivered or repeated pack.completed: the shipment exists.
            return Ok(());
        }
        let canceled = self.canceled_orders.load(tx.store(), ev.order_id.as_str()).await?;
        let shipment = Shipment {
            id: id.clone(),
            order_id: ev.order_id,
            package_id: ev.package_id,
            zone: ev.zone,
            weight_g: ev.weight_g,
            lines: ev.lines,
            priority: ev.priority,
            state: if canceled { ShipmentState::Canceled } else { ShipmentState::LabelPending },
            carrier: None,
            tracking_number: None,
            cost: None,
            label_created_at: None,
            fallback_from: None,
            cost_difference: None,
            quoted_price: None,
            primary_attempts: 0,
            label_attempts: 0,
            failed_rounds: 0,
            round_primary_failures: 0,
            round_primary_rejected: false,
            next_attempt_at: tx.now,
            last_error: None,
            rate_version: None,
            created_at: tx.now,
            delivered_at: None,
        };
        self.shipments.insert(id.as_str().to_owned(), shipment);
        if canceled {
            tracing::info!(shipment = %id, "packed after its order was canceled: no label");
            tx.ctx().metrics.inc("orderly_shipments_canceled_total", &[], 1);
            return Ok(());
        }
        self.queue.schedule(id.as_str(), tx.now);
        tx.ctx().metrics.inc("orderly_shipments_created_total", &[], 1);
        Ok(())
    }

    /// One label batch: takes tokens for the due shipments whose carrier can
    /// be called, switches to an uploaded rate table, and hands the calls to
    /// the worker. When the bucket is short, the rest waits for the next window.
    async fn dispatch_batch(&mut self, tx: &mut Tx) {
        let capacity = LABEL_CALLS_IN_FLIGHT_MAX.saturating_sub(self.queue.in_flight());
        if capacity == 0 {
            return;
        }
        let mut ready = Vec::new();
        for (due_at, id) in self.queue.due(tx.now, DISPATCH_SCAN_MAX) {
            match self.plan(tx, &id, due_at).await {
                Ok(Some(plan)) => ready.push(plan),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(shipment = %id, error = %e, "could not load shipment; retrying shortly");
                    self.queue.schedule(&id, tx.now.plus_ms(BREAKER_RECHECK_MS));
                }
            }
        }
        ready.sort_by_key(|p| (p.priority, p.due_at));
        ready.truncate(capacity);
        let wanted = u32::try_from(ready.len()).expect("a batch is at most LABEL_CALLS_IN_FLIGHT_MAX");
        if wanted == 0 {
            return;
        }
        let granted = self.bucket.try_take(tx.now, wanted);
        self.bucket_ready_at =
            (granted < wanted).then(|| self.bucket.ready_at(tx.now, (wanted - granted).min(self.bucket.burst())));
        if granted == 0 {
            return;
        }
        if let Some(version) = self.rates.activate_pending() {
            tracing::info!(%version, "rate table activated for this label batch");
        }
        for plan in ready.into_iter().take(granted as usize) {
            self.send(tx, plan);
        }
    }

    /// Decides where a due shipment's label goes, or reschedules it.
    async fn plan(&mut self, tx: &mut Tx, id: &str, due_at: Timestamp) -> Result<Option<Plan>, StoreError> {
        if !self.shipments.load(tx.store(), id).await? {
            self.queue.unschedule(id);
            return Ok(None);
        }
        let Some(s) = self.shipments.get(id) else { return Ok(None) };
        if s.state != ShipmentState::LabelPending {
            self.queue.unschedule(id);
            return Ok(None);
        }
        let (zone, failures, priority) = (s.zone.clone(), s.round_primary_failures, s.priority);
        let Some(primary) = self.routes.get(&zone).map(|p| p.primary().clone()) else {
            self.fail_round(tx, id, format!("no carrier route for zone {zone}"), "no_route");
            return Ok(None);
        };
        let primary_blocked = self.blocked_until(&primary, tx.now).is_some();
        let choice = self
            .routes
            .choose(&zone, failures, self.max_retries, primary_blocked)
            .expect("the zone has a route: it was just looked up");
        if let Some(until) = self.blocked_until(&choice.carrier, tx.now) {
            // Both carriers are held off by their breakers: wait, without counting an attempt.
            self.queue.schedule(id, until);
            return Ok(None);
        }
        Ok(Some(Plan { id: id.to_owned(), priority, due_at, choice }))
    }

    /// Hands one label call to the worker.
    fn send(&mut self, tx: &mut Tx, plan: Plan) {
        let Some(s) = self.shipments.get(&plan.id) else { return };
        // Reserve the worker slot first, so a call the breaker admits always goes out.
        let permit = match self.jobs.try_reserve() {
            Ok(permit) => permit,
            Err(e) => {
                tracing::error!(shipment = %plan.id, error = %e, "label worker unavailable; retrying shortly");
                self.queue.schedule(&plan.id, tx.now.plus_ms(BREAKER_RECHECK_MS));
                return;
            }
        };
        let carrier = plan.choice.carrier.clone();
        let admitted = self.breakers.get_mut(&carrier).is_none_or(|b| b.allow(tx.now));
        if !admitted {
            // Another shipment of this batch took the half-open breaker's one probe.
            self.queue.schedule(&plan.id, tx.now.plus_ms(BREAKER_RECHECK_MS));
            return;
        }
        let quoted_price = self.rates.quote(&carrier, &s.zone, s.weight_g);
        let difference = plan.choice.fallback_from.as_ref().and_then(|primary| {
            let primary_price = self.rates.quote(primary, &s.zone, s.weight_g)?;
            Some(cost_difference(primary_price, quoted_price?))
        });
        self.next_job += 1;
        let request = LabelRequest {
            carrier: carrier.to_string(),
            shipment_id: plan.id.clone(),
            zone: s.zone.to_string(),
            weight_g: s.weight_g,
            idempotency_key: format!("{}:{carrier}", plan.id),
        };
        permit.send(LabelJob { job: self.next_job, shipment_id: s.id.clone(), carrier, request });
        let flight = LabelFlight {
            job: self.next_job,
            choice: plan.choice,
            rate_version: self.rates.active_version(),
            quoted_price,
            cost_difference: difference,
            dispatched_at: tx.now,
        };
        self.queue.start(&plan.id, flight);
    }

    /// When a carrier's breaker lets calls through again, if it is blocked now
    /// (open, or half-open with its probe out). Does not admit a probe.
    fn blocked_until(&self, carrier: &CarrierId, now: Timestamp) -> Option<Timestamp> {
        let mut breaker = self.breakers.get(carrier)?.clone();
        breaker.refresh(now);
        match breaker.state() {
            BreakerState::Open { until } => Some(until),
            BreakerState::HalfOpen { probe_in_flight: true } => Some(now.plus_ms(BREAKER_RECHECK_MS)),
            BreakerState::Closed { .. } | BreakerState::HalfOpen { probe_in_flight: false } => None,
        }
    }

    /// Processes a carrier call's result.
    async fn on_label_result(&mut self, tx: &mut Tx, outcome: LabelOutcome) {
        let id = outcome.shipment_id.as_str().to_owned();
        if self.queue.flight(&id).is_none_or(|f| f.job != outcome.job) {
            // A superseded call (presumed lost, then retried): its breaker slot was settled then.
            return;
        }
        let flight = self.queue.finish(&id).expect("the flight was just found");
        if let Some(b) = self.breakers.get_mut(&outcome.carrier) {
            match &outcome.result {
                Ok(_) | Err(CarrierCallError::Rejected(_)) => b.on_success(tx.now),
                Err(CarrierCallError::Unavailable(_)) => b.on_failure(tx.now),
            }
        }
        let pending = match self.shipments.load(tx.store(), &id).await {
            Ok(found) => found && self.shipments.get(&id).is_some_and(|s| s.state == ShipmentState::LabelPending),
            Err(e) => {
                tracing::warn!(shipment = %id, error = %e, "could not load shipment for its label result");
                self.queue.schedule(&id, tx.now.plus_ms(BREAKER_RECHECK_MS));
                return;
            }
        };
        if !pending {
            return;
        }
        match outcome.result {
            Ok(label) => self.record_label(tx, &id, flight, label),
            Err(e) => self.record_failure(tx, &id, &flight, e),
        }
    }

    /// Records a created label and emits `label_created` (and `carrier_fallback`).
    fn record_label(&mut self, tx: &mut Tx, id: &str, flight: LabelFlight, label: Label) {
        let Some(s) = self.shipments.get_mut(id) else { return };
        let cost = Money::parse(&label.cost).ok().or(flight.quoted_price).unwrap_or(Money::ZERO);
        s.state = ShipmentState::Labeled;
        s.carrier = Some(flight.choice.carrier.clone());
        s.tracking_number = Some(label.tracking_number);
        s.cost = Some(cost);
        s.label_created_at = Some(tx.now);
        s.fallback_from = flight.choice.fallback_from.clone();
        s.cost_difference = flight.cost_difference;
        s.quoted_price = flight.quoted_price;
        s.rate_version = flight.rate_version.map(|v| v.to_string());
        s.label_attempts += 1;
        s.last_error = None;
        let s = s.clone();
        emit_label_events(tx, &s);
    }

    /// Records a failed call and schedules the next attempt: the primary again
    /// after a backoff, the secondary at once, or a new round after a capped backoff.
    fn record_failure(&mut self, tx: &mut Tx, id: &str, flight: &LabelFlight, error: CarrierCallError) {
        let rejected = matches!(error, CarrierCallError::Rejected(_));
        let at_primary = flight.choice.fallback_from.is_none();
        let jitter = tx.random();
        let Some(s) = self.shipments.get_mut(id) else { return };
        tracing::info!(shipment = %id, order_id = %s.order_id, carrier = %flight.choice.carrier, error = %error, "label call failed");
        s.label_attempts += 1;
        s.last_error = Some(format!("{}: {error}", flight.choice.carrier));
        if at_primary {
            s.primary_attempts += 1;
            s.round_primary_failures = if rejected { self.max_retries } else { s.round_primary_failures + 1 };
            s.round_primary_rejected = rejected;
            let delay_ms = self.primary_retry.delay_ms(s.round_primary_failures, jitter).unwrap_or(0);
            s.next_attempt_at = tx.now.plus_ms(i64::try_from(delay_ms).unwrap_or(i64::MAX));
            let at = s.next_attempt_at;
            self.queue.schedule(id, at);
            return;
        }
        if rejected && s.round_primary_rejected {
            s.state = ShipmentState::Failed;
            tx.ctx().metrics.inc("orderly_label_failures_total", &[("reason", "rejected")], 1);
            tracing::warn!(shipment = %id, order_id = %s.order_id, "both carriers rejected the label; shipment parked as failed");
            return;
        }
        let error = s.last_error.clone().unwrap_or_default();
        self.fail_round(tx, id, error, "unavailable");
    }

    /// Ends a round in which no carrier could label the shipment: it stays
    /// pending and tries again (primary first) after a capped backoff.
    fn fail_round(&mut self, tx: &mut Tx, id: &str, error: String, reason: &'static str) {
        let jitter = tx.random();
        let Some(s) = self.shipments.get_mut(id) else { return };
        s.failed_rounds += 1;
        s.round_primary_failures = 0;
        s.round_primary_rejected = false;
        s.last_error = Some(error);
        let attempt = s.failed_rounds.min(self.round_retry.max_attempts() - 1);
        let delay_ms = self.round_retry.delay_ms(attempt, jitter).unwrap_or(ROUND_RETRY_MAX_MS);
        s.next_attempt_at = tx.now.plus_ms(i64::try_from(delay_ms).unwrap_or(i64::MAX));
        let (at, order_id) = (s.next_attempt_at, s.order_id.clone());
        self.queue.schedule(id, at);
        tx.ctx().metrics.inc("orderly_label_failures_total", &[("reason", reason)], 1);
        tracing::warn!(shipment = %id, order_id = %order_id, reason, retry_in_ms = delay_ms, "no label this round; will retry");
    }

    /// Calls whose result never came back (past the timeout and a grace) are
    /// counted as failures and tried again.
    async fn reap_lost_calls(&mut self, tx: &mut Tx) {
        let lost: Vec<(String, LabelOutcome)> = self
            .queue
            .flights()
            .filter(|(_, f)| tx.now.since(f.dispatched_at) > self.call_deadline_ms)
            .filter_map(|(id, f)| {
                let shipment_id = ShipmentId::parse(id.clone()).ok()?;
                let result = Err(CarrierCallError::Unavailable("no result from the label worker".to_owned()));
                Some((id.clone(), LabelOutcome { job: f.job, shipment_id, carrier: f.choice.carrier.clone(), result }))
            })
            .collect();
        for (id, outcome) in lost {
            tracing::warn!(shipment = %id, "label call presumed lost");
            self.on_label_result(tx, outcome).await;
        }
    }

    async fn delivered(&mut self, tx: &mut Tx, id: &ShipmentId) -> Result<Shipment, ApiError> {
        let s = self.load(tx, id).await?;
        match s.state {
            ShipmentState::Delivered => return Ok(s),
            ShipmentState::LabelPending | ShipmentState::Failed => {
                return Err(ApiError::conflict("shipment-not-labeled", format!("shipment {id} has no label yet")));
            }
            ShipmentState::Canceled => {
                return Err(ApiError::conflict(
                    "shipment-canceled",
                    format!("shipment {id} was canceled with its order"),
                ));
            }
            ShipmentState::Labeled => {}
        }
        let s = self.shipments.get_mut(id.as_str()).ok_or_else(|| ApiError::NotFound(format!("shipment {id}")))?;
        s.state = ShipmentState::Delivered;
        s.delivered_at = Some(tx.now);
        let s = s.clone();
        let data = ShipmentDelivered { shipment_id: s.id.clone(), order_id: s.order_id.clone() };
        tx.emit(EventType::ShipmentDelivered, s.order_id.as_str(), events::data(&data));
        tx.ctx().metrics.inc("orderly_shipments_delivered_total", &[], 1);
        Ok(s)
    }

    async fn retry(&mut self, tx: &mut Tx, id: &ShipmentId) -> Result<Shipment, ApiError> {
        let s = self.load(tx, id).await?;
        match s.state {
            ShipmentState::LabelPending => return Ok(s),
            ShipmentState::Labeled | ShipmentState::Delivered => {
                return Err(ApiError::conflict("shipment-labeled", format!("shipment {id} already has a label")));
            }
            ShipmentState::Canceled => {
                return Err(ApiError::conflict(
                    "shipment-canceled",
                    format!("shipment {id} was canceled with its order"),
                ));
            }
            ShipmentState::Failed => {}
        }
        let s = self.shipments.get_mut(id.as_str()).ok_or_else(|| ApiError::NotFound(format!("shipment {id}")))?;
        s.state = ShipmentState::LabelPending;
        s.round_primary_failures = 0;
        s.round_primary_rejected = false;
        s.next_attempt_at = tx.now;
        let s = s.clone();
        self.queue.schedule(id.as_str(), tx.now);
        Ok(s)
    }

    async fn load(&mut self, tx: &mut Tx, id: &ShipmentId) -> Result<Shipment, ApiError> {
        let not_found = || ApiError::NotFound(format!("shipment {id}"));
        if !self.shipments.load(tx.store(), id.as_str()).await? {
            return Err(not_found());
        }
        self.shipments.get(id.as_str()).cloned().ok_or_else(not_found)
    }

    fn upload_rates(&mut self, tx: &mut Tx, text: String) -> Result<RatesInfo, ApiError> {
        let table = RateTable::parse(&text).map_err(|e| ApiError::invalid("invalid-rate-table", e.to_string()))?;
        let missing = table.missing_routes(&self.routes);
        if !missing.is_empty() {
            let pairs: Vec<String> = missing.iter().map(|(zone, carrier)| format!("{carrier} in {zone}")).collect();
            let detail = format!("rate table {} has no rates for {}", table.version(), pairs.join(", "));
            return Err(ApiError::invalid("rate-table-incomplete", detail));
        }
        self.rates.upload(table, text, tx.now)?;
        tx.ctx().metrics.inc("orderly_rate_uploads_total", &[], 1);
        Ok(self.rates.info())
    }

    fn summary(&mut self, now: Timestamp) -> ShippingSummary {
        let breakers = self
            .breakers
            .iter_mut()
            .map(|(carrier, b)| {
                b.refresh(now);
                (carrier.to_string(), b.state())
            })
            .collect();
        ShippingSummary {
            breakers,
            label_queue_depth: self.queue.len() as u64,
            labels_in_flight: self.queue.in_flight() as u64,
            rates: self.rates.info(),
        }
    }

    fn publish_gauges(&mut self, tx: &Tx) {
        let m = &tx.ctx().metrics;
        m.set("orderly_label_queue_depth", &[], self.queue.len() as f64);
        for (carrier, b) in &mut self.breakers {
            b.refresh(tx.now);
            m.set("orderly_carrier_breaker_state", &[("carrier", carrier.as_str())], breaker_gauge(b.state()));
        }
    }
}

impl Service for Shipping {
    type Command = Command;

    async fn on_command(&mut self, tx: &mut Tx, cmd: Command) {
        match cmd {
            Command::Delivered { shipment_id, reply } => {
                let r = self.delivered(tx, &shipment_id).await;
                tx.reply(reply, r);
            }
            Command::Get { shipment_id, reply } => {
                let r = self.load(tx, &shipment_id).await;
                tx.reply(reply, r);
            }
            Command::Retry { shipment_id, reply } => {
                let r = self.retry(tx, &shipment_id).await;
                tx.reply(reply, r);
            }
            Command::UploadRates { text, reply } => {
                let r = self.upload_rates(tx, text);
                tx.reply(reply, r);
            }
            Command::Summary { reply } => {
                let r = Ok(self.summary(tx.now));
                tx.reply(reply, r);
            }
            Command::LabelResult(outcome) => self.on_label_result(tx, outcome).await,
        }
        self.publish_gauges(tx);
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        use tracing::Instrument;
        let span = super::common::event_span(event);
        async move {
            match event.event_type {
                EventType::PackCompleted => self.on_packed(tx, events::parse(event)?).await,
                EventType::OrderCanceled => self.on_order_canceled(tx, events::parse(event)?).await,
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn on_tick(&mut self, tx: &mut Tx) {
        self.reap_lost_calls(tx).await;
        self.dispatch_batch(tx).await;
        self.publish_gauges(tx);
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        // With every call slot taken, the next result (a command) wakes the loop.
        let dispatch = (self.queue.in_flight() < LABEL_CALLS_IN_FLIGHT_MAX)
            .then(|| self.queue.earliest())
            .flatten()
            .map(|due| self.bucket_ready_at.map_or(due, |ready| due.max(ready)));
        let lost = self.queue.flights().map(|(_, f)| f.dispatched_at.plus_ms(self.call_deadline_ms + 1)).min();
        [dispatch, lost].into_iter().flatten().min()
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![&mut self.shipments, &mut self.canceled_orders, &mut self.rates, &mut self.queue]
    }
}

/// Registers the help text of the metrics this service updates.
pub fn describe_metrics(m: &Metrics) {
    m.describe("orderly_shipments_created_total", "Shipments created from pack.completed.");
    m.describe("orderly_shipments_delivered_total", "Shipments the carrier reported delivered.");
    m.describe("orderly_labels_created_total", "Carrier labels created, per carrier.");
    m.describe("orderly_label_failures_total", "Label rounds in which no carrier could label a shipment, per reason.");
    m.describe("orderly_carrier_fallbacks_total", "Labels that went to the secondary carrier.");
    m.describe("orderly_carrier_fallback_cost_difference_total", "Extra cost of fallbacks, in minor units.");
    m.describe(
        "orderly_carrier_fallback_savings_total",
        "Savings of fallbacks to a cheaper secondary, in minor units.",
    );
    m.describe("orderly_rate_uploads_total", "Rate tables accepted through the ops API.");
    m.describe("orderly_label_queue_depth", "Shipments waiting for a label.");
    m.describe("orderly_carrier_breaker_state", "Carrier breaker: 0 closed, 1 half-open, 2 open.");
}

/// Whether the shipping service consumes an event type (the embedded bus's
/// filter for its subscriptions: packages from packing, cancellations from orders).
pub fn wants(event_type: &str) -> bool {
    event_type == EventType::PackCompleted.as_str() || event_type == EventType::OrderCanceled.as_str()
}

fn emit_label_events(tx: &mut Tx, s: &Shipment) {
    let carrier = s.carrier.as_ref().map(CarrierId::to_string).unwrap_or_default();
    let data = LabelCreated {
        shipment_id: s.id.clone(),
        order_id: s.order_id.clone(),
        package_id: s.package_id.clone(),
        carrier: carrier.clone(),
        tracking_number: s.tracking_number.clone().unwrap_or_default(),
        cost: s.cost.unwrap_or(Money::ZERO),
        label_created_at: s.label_created_at.unwrap_or(tx.now),
        fallback_from: s.fallback_from.as_ref().map(CarrierId::to_string),
        lines: s.lines.clone(),
    };
    if s.priority == Priority::SameDay {
        tx.emit_high(EventType::ShipmentLabelCreated, s.order_id.as_str(), events::data(&data));
    } else {
        tx.emit(EventType::ShipmentLabelCreated, s.order_id.as_str(), events::data(&data));
    }
    let metrics = tx.ctx().metrics.clone();
    metrics.inc("orderly_labels_created_total", &[("carrier", &carrier)], 1);
    let Some(from) = s.fallback_from.as_ref() else { return };
    let difference = s.cost_difference.unwrap_or(Money::ZERO);
    let data = CarrierFallback {
        shipment_id: s.id.clone(),
        order_id: s.order_id.clone(),
        from: from.to_string(),
        to: carrier.clone(),
        cost_difference: difference,
    };
    tx.emit(EventType::ShipmentCarrierFallback, s.order_id.as_str(), events::data(&data));
    let labels = [("from", from.as_str()), ("to", carrier.as_str())];
    metrics.inc("orderly_carrier_fallbacks_total", &labels, 1);
    let minor = difference.minor();
    if minor >= 0 {
        metrics.inc("orderly_carrier_fallback_cost_difference_total", &labels, minor.unsigned_abs());
    } else {
        // A counter cannot go down: a cheaper secondary is counted as savings.
        metrics.inc("orderly_carrier_fallback_savings_total", &labels, minor.unsigned_abs());
    }
}

/// The `orderly_carrier_breaker_state` value: 0 closed, 1 half-open, 2 open.
pub fn breaker_gauge(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed { .. } => 0.0,
        BreakerState::HalfOpen { .. } => 1.0,
        BreakerState::Open { .. } => 2.0,
    }
}

/// The policies built from settings, validated once at startup.
struct ShippingConfig {
    routes: CarrierRoutes,
    breakers: BTreeMap<CarrierId, CircuitBreaker>,
    bucket: TokenBucketSpec,
    primary_retry: RetryPolicy,
    round_retry: RetryPolicy,
}

/// The token bucket's limits, built into a bucket once the clock is read.
struct TokenBucketSpec {
    per_minute: u32,
    burst: u32,
}

impl TokenBucketSpec {
    fn reset(&self, now: Timestamp) -> TokenBucket {
        TokenBucket::new(self.per_minute, self.burst, now).expect("the limits were validated at startup")
    }
}

impl ShippingConfig {
    fn from_settings(
        settings: &Settings,
        apis: &HashMap<String, Arc<dyn CarrierApi>>,
    ) -> Result<ShippingConfig, OpenError> {
        let config = |e: &dyn std::fmt::Display| OpenError::Config(e.to_string());
        let shipping = &settings.shipping;
        let (per_minute, burst) = (shipping.labels_per_minute, shipping.label_burst);
        TokenBucket::new(per_minute, burst, Timestamp(0)).map_err(|e| config(&e))?;
        let mut routes = CarrierRoutes::new();
        for r in &settings.carriers.routes {
            let zone = Zone::parse(r.zone.clone()).map_err(|e| config(&e))?;
            let primary = CarrierId::parse(r.primary.clone()).map_err(|e| config(&e))?;
            let secondary = CarrierId::parse(r.secondary.clone()).map_err(|e| config(&e))?;
            for carrier in [&primary, &secondary] {
                if !apis.contains_key(carrier.as_str()) {
                    return Err(OpenError::Config(format!(
                        "zone {zone} routes to carrier {carrier}, which has no API"
                    )));
                }
            }
            routes
                .insert(zone, CarrierPair::new(primary, secondary).map_err(|e| config(&e))?)
                .map_err(|e| config(&e))?;
        }
        let cooldown_ms = u64::try_from(settings.carriers.breaker_cooldown.0).map_err(|e| config(&e))?;
        let breaker = BreakerConfig::new(settings.carriers.breaker_failures, cooldown_ms).map_err(|e| config(&e))?;
        let breakers = apis
            .keys()
            .map(|id| CarrierId::parse(id.clone()).map(|c| (c, CircuitBreaker::new(breaker))))
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(|e| config(&e))?;
        let primary_retry =
            RetryPolicy::new(shipping.max_retries.clamp(1, 100), PRIMARY_RETRY_BASE_MS, PRIMARY_RETRY_MAX_MS, 2)
                .map_err(|e| config(&e))?;
        let round_retry = RetryPolicy::new(100, ROUND_RETRY_BASE_MS, ROUND_RETRY_MAX_MS, 2).map_err(|e| config(&e))?;
        Ok(ShippingConfig {
            routes,
            breakers,
            bucket: TokenBucketSpec { per_minute, burst },
            primary_retry,
            round_retry,
        })
    }
}

/// The accepted rate table, as stored in table `rates` under [`RATES_KEY`] so
/// an upload survives a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRates {
    /// Its version.
    pub version: String,
    /// The file as uploaded.
    pub text: String,
    /// When it was accepted.
    pub uploaded_at: Timestamp,
}

/// The rate book and its stored copy, rolled back together when a commit fails.
struct Rates {
    book: Option<RateBook>,
    /// The book before this batch's first upload, restored on rollback.
    before: Option<Option<RateBook>>,
    stored: Table<StoredRates>,
}

impl Rates {
    /// The newer of the rates file and the last accepted upload.
    async fn open(store: &dyn Store, initial: Option<RateTable>) -> Result<Rates, StoreError> {
        let mut stored = Table::new("rates", 4, |_: &StoredRates| None);
        let mut active = initial;
        if stored.load(store, RATES_KEY).await? {
            let text = stored.get(RATES_KEY).map(|r| r.text.clone()).unwrap_or_default();
            let uploaded = RateTable::parse(&text).map_err(|e| StoreError::Corrupt {
                table: "rates".to_owned(),
                key: RATES_KEY.to_owned(),
                detail: e.to_string(),
            })?;
            if active.as_ref().is_none_or(|a| uploaded.version() > a.version()) {
                active = Some(uploaded);
            }
        }
        Ok(Rates { book: active.map(RateBook::new), before: None, stored })
    }

    fn upload(&mut self, table: RateTable, text: String, now: Timestamp) -> Result<(), ApiError> {
        let before = self.book.clone();
        let version = table.version().to_string();
        match &mut self.book {
            Some(book) => book.upload(table).map_err(|e| ApiError::invalid("rate-version-not-newer", e.to_string()))?,
            // With no rates at all, the first table is active at once.
            None => self.book = Some(RateBook::new(table)),
        }
        self.before.get_or_insert(before);
        self.stored.insert(RATES_KEY.to_owned(), StoredRates { version, text, uploaded_at: now });
        Ok(())
    }

    fn activate_pending(&mut self) -> Option<RateVersion> {
        self.book.as_mut()?.activate_pending()
    }

    fn quote(&self, carrier: &CarrierId, zone: &Zone, weight_g: u32) -> Option<Money> {
        self.book.as_ref()?.active().price(carrier, zone, weight_g)
    }

    fn active_version(&self) -> Option<RateVersion> {
        self.book.as_ref().map(|b| b.active().version())
    }

    fn info(&self) -> RatesInfo {
        RatesInfo {
            active_version: self.active_version().map(|v| v.to_string()),
            pending_version: self.book.as_ref().and_then(RateBook::pending).map(|t| t.version().to_string()),
        }
    }
}

impl Staged for Rates {
    fn stage(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        self.stored.stage(batch)
    }

    fn rollback(&mut self) {
        self.stored.rollback();
        if let Some(book) = self.before.take() {
            self.book = book;
        }
    }

    fn committed(&mut self) {
        self.stored.committed();
        self.before = None;
    }
}

/// Makes the carrier calls the service hands it, off the service loop, each
/// bounded by `shipping.carrier_timeout`, and feeds every result back as a
/// [`Command::LabelResult`]. At most [`LABEL_CALLS_IN_FLIGHT_MAX`] calls are out at once.
pub struct LabelWorker {
    jobs: mpsc::Receiver<LabelJob>,
    carriers: HashMap<CarrierId, Arc<dyn CarrierApi>>,
    timeout_ms: u64,
}

impl LabelWorker {
    /// Runs until the service is gone (its job channel closes); outstanding
    /// calls are then abandoned (their shipments are still pending in the store).
    pub async fn run(mut self, results: mpsc::Sender<Command>) {
        let mut calls = JoinSet::new();
        loop {
            // Biased: an unbiased select picks among ready branches with a
            // per-process random number, so a simulated seed would not replay.
            tokio::select! {
                biased;
                job = self.jobs.recv() => match job {
                    Some(job) => {
                        let api = self.carriers.get(&job.carrier).cloned();
                        calls.spawn(call_carrier(api, job, self.timeout_ms, results.clone()));
                    }
                    None => return,
                },
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
            }
        }
    }
}

async fn call_carrier(
    api: Option<Arc<dyn CarrierApi>>,
    job: LabelJob,
    timeout_ms: u64,
    results: mpsc::Sender<Command>,
) {
    let result = match api {
        None => Err(CarrierCallError::Rejected(format!("no API configured for carrier {}", job.carrier))),
        Some(api) => {
            let call = api.create_label(&job.request);
            match tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), call).await {
                Ok(result) => result,
                Err(_) => Err(CarrierCallError::Unavailable(format!("no answer within {timeout_ms} ms"))),
            }
        }
    };
    let outcome = LabelOutcome { job: job.job, shipment_id: job.shipment_id, carrier: job.carrier, result };
    // The service may be shutting down; its shipments stay pending in the store.
    let _ = results.send(Command::LabelResult(outcome)).await;
}

/// Work items (by id) waiting for their due time, and those out on a call,
/// for a service that calls out through a worker (shipping, notifications).
/// It is a [`Staged`] table without rows, journaled per batch: when a commit
/// fails, the batch's schedule changes are undone (the store still has the
/// state from before it), and the items whose results were processed in that
/// batch are put back, due at once, because the store still has them pending.
/// A call started in the batch stays out: it really went out (its breaker
/// slot is taken), and its result decides what happens next.
#[derive(Debug)]
pub struct DueQueue<F> {
    due: BTreeSet<(Timestamp, String)>,
    due_at: HashMap<String, Timestamp>,
    // Ordered: calls presumed lost are settled in id order, so a seed replays.
    in_flight: BTreeMap<String, F>,
    journal: Vec<Undo>,
}

/// How to undo one change of the batch in progress.
#[derive(Debug)]
enum Undo {
    /// The item was due then (or not scheduled).
    Due(String, Option<Timestamp>),
    /// The item's call result was processed: it is due again at once.
    Finished(String),
}

impl<F> Default for DueQueue<F> {
    fn default() -> Self {
        DueQueue { due: BTreeSet::new(), due_at: HashMap::new(), in_flight: BTreeMap::new(), journal: Vec::new() }
    }
}

impl<F> DueQueue<F> {
    /// An empty queue.
    pub fn new() -> DueQueue<F> {
        DueQueue::default()
    }

    /// Schedules `id` at `at`, replacing an earlier schedule. An item out on a
    /// call is left alone: its result decides what happens next.
    pub fn schedule(&mut self, id: &str, at: Timestamp) {
        if self.in_flight.contains_key(id) {
            return;
        }
        let before = self.set_due(id, Some(at));
        self.journal.push(Undo::Due(id.to_owned(), before));
    }

    /// Schedules an item read from the store (committed state, not this
    /// batch's work): a rollback leaves it scheduled.
    pub fn schedule_stored(&mut self, id: &str, at: Timestamp) {
        if !self.in_flight.contains_key(id) {
            self.set_due(id, Some(at));
        }
    }

    /// Sets (or clears) when `id` is due; returns when it was due before.
    fn set_due(&mut self, id: &str, at: Option<Timestamp>) -> Option<Timestamp> {
        let before = match at {
            Some(at) => self.due_at.insert(id.to_owned(), at),
            None => self.due_at.remove(id),
        };
        if let Some(old) = before {
            self.due.remove(&(old, id.to_owned()));
        }
        if let Some(at) = at {
            self.due.insert((at, id.to_owned()));
        }
        before
    }

    /// Every id scheduled or in flight.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.due.iter().map(|(_, id)| id.clone()).collect();
        ids.extend(self.in_flight.keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Forgets a scheduled item.
    pub fn unschedule(&mut self, id: &str) {
        if let Some(before) = self.set_due(id, None) {
            self.journal.push(Undo::Due(id.to_owned(), Some(before)));
        }
    }

    /// Up to `max` items due at `now`, earliest first, with their due times.
    pub fn due(&self, now: Timestamp, max: usize) -> Vec<(Timestamp, String)> {
        self.due.iter().take_while(|(at, _)| *at <= now).take(max).cloned().collect()
    }

    /// When the earliest scheduled item is due.
    pub fn earliest(&self) -> Option<Timestamp> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Moves an item out on a call (for good: a rollback leaves it out).
    pub fn start(&mut self, id: &str, flight: F) {
        self.set_due(id, None);
        self.in_flight.insert(id.to_owned(), flight);
    }

    /// The call an item is out on.
    pub fn flight(&self, id: &str) -> Option<&F> {
        self.in_flight.get(id)
    }

    /// Takes an item back from its call (its result is being processed).
    pub fn finish(&mut self, id: &str) -> Option<F> {
        let flight = self.in_flight.remove(id)?;
        self.journal.push(Undo::Finished(id.to_owned()));
        Some(flight)
    }

    /// True when `id` is scheduled or out on a call.
    pub fn contains(&self, id: &str) -> bool {
        self.due_at.contains_key(id) || self.in_flight.contains_key(id)
    }

    /// Every call out.
    pub fn flights(&self) -> impl Iterator<Item = (&String, &F)> {
        self.in_flight.iter()
    }

    /// How many calls are out.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Scheduled items plus calls out.
    pub fn len(&self) -> usize {
        self.due_at.len() + self.in_flight.len()
    }

    /// True when nothing is scheduled or out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<F: Send> Staged for DueQueue<F> {
    fn stage(&mut self, _batch: &mut Batch) -> Result<(), StoreError> {
        Ok(())
    }

    /// Undoes the batch's changes, newest first. An item out on a call stays
    /// out; an item whose result the batch processed is due again at once.
    fn rollback(&mut self) {
        while let Some(undo) = self.journal.pop() {
            match undo {
                Undo::Due(id, at) => {
                    if !self.in_flight.contains_key(&id) {
                        self.set_due(&id, at);
                    }
                }
                Undo::Finished(id) => {
                    if !self.in_flight.contains_key(&id) {
                        self.set_due(&id, Some(Timestamp(i64::MIN)));
                    }
                }
            }
        }
    }

    fn committed(&mut self) {
        self.journal.clear();
    }
}

#[cfg(test)]
mod due_queue_tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    /// A queue with `a` due at 10 and `b` out on call 1, committed.
    fn queue() -> DueQueue<u32> {
        let mut q = DueQueue::new();
        q.schedule("a", t(10));
        q.schedule("b", t(20));
        q.start("b", 1);
        q.committed();
        q
    }

    /// What is due (with when) and what is out (with its call).
    type State = (Vec<(Timestamp, String)>, Vec<(String, u32)>);

    fn state(q: &DueQueue<u32>) -> State {
        (q.due(t(i64::MAX), usize::MAX), q.flights().map(|(id, f)| (id.clone(), *f)).collect())
    }

    #[test]
    fn a_failed_batch_loses_everything_it_did_to_the_queue() {
        let mut q = queue();
        let before = state(&q);
        q.unschedule("a"); // e.g. its order was canceled
        q.schedule("c", t(5)); // a new shipment
        q.schedule("c", t(7));
        q.schedule("a", t(3));
        q.rollback();
        assert_eq!(state(&q), before);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn what_a_failed_batch_read_from_the_store_stays_scheduled() {
        let mut q = queue();
        q.schedule_stored("e", t(30)); // paged in from the store
        q.rollback();
        assert!(q.contains("e"));
    }

    #[test]
    fn a_call_started_in_a_failed_batch_stays_out() {
        let mut q = queue();
        q.start("a", 2);
        q.rollback();
        assert_eq!(state(&q), (vec![], vec![("a".to_owned(), 2), ("b".to_owned(), 1)]));
    }

    #[test]
    fn a_result_processed_in_a_failed_batch_is_due_again_at_once() {
        let mut q = queue();
        assert_eq!(q.finish("b"), Some(1));
        q.schedule("b", t(500)); // its retry, decided in the lost batch
        q.rollback();
        assert_eq!(q.flight("b"), None);
        assert_eq!(q.due(t(0), 10), vec![(t(i64::MIN), "b".to_owned())]);
        assert_eq!(q.earliest(), Some(t(i64::MIN)));
    }

    #[test]
    fn a_committed_batch_is_never_undone_by_a_later_failed_one() {
        let mut q = queue();
        q.unschedule("a");
        q.committed();
        q.schedule("d", t(1));
        q.rollback();
        assert_eq!(state(&q), (vec![], vec![("b".to_owned(), 1)]));
        q.rollback();
        assert_eq!(q.len(), 1, "a second rollback has nothing left to undo");
    }
}
