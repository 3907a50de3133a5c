//! The engine as the API sees it: start every service with its subscriptions,
//! and one method per API operation. Queries read the owning service's store
//! (which is never behind an acknowledged answer); commands go through the
//! owning service's queue.

use crate::broker::Topology;
use crate::config::Settings;
use crate::engine::{Adapters, EngineBuilder, Handle, Runtime, StartError, Subscription};
use crate::events::AllocationData;
use crate::ports::{CarrierApi, OutboxRecord, WebhookSink};
use crate::runtime::{Control, ControlError, DEAD_LETTERS, DeadLetter};
use crate::services::common::ApiError;
use crate::services::inventory::{self, HoldInfo, Inventory, SyncReservation};
use crate::services::notifications::{self, NotificationSummary, Notifications};
use crate::services::orders::{self, Orders};
use crate::services::packing::{self, Package, Packing};
use crate::services::picking::{self, PickOutcome, PickTask, Picking};
use crate::services::reconcile;
use crate::services::shipping::{self, RatesInfo, Shipment, Shipping, ShippingSummary};
use orderly_domain::allocation::{AllocationMode, Location, RouteLine, allocation_mode};
use orderly_domain::ledger::{InventorySnapshot, LedgerConfig};
use orderly_domain::order::{DeliveryWindow, LocationQty, NewLine, NewOrder, Order, OrderPolicy, OrderState};
use orderly_domain::shipping::rates::RateTable;
use orderly_domain::{CustomerId, HoldId, LineId, LocationId, Money, OrderId, PickId, Priority, Qty, Sku, Zone};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Most orders returned by one list call.
pub const LIST_LIMIT_MAX: u32 = 500;

/// A new order as the storefront sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Who.
    pub customer: Customer,
    /// Where to.
    pub ship_to: ShipTo,
    /// How fast.
    #[serde(default)]
    pub priority: Priority,
    /// What.
    pub lines: Vec<LineRequest>,
    /// Cart holds to consume.
    #[serde(default)]
    pub hold_ids: Vec<HoldId>,
    /// The customer's chosen delivery window.
    #[serde(default)]
    pub delivery_window: Option<DeliveryWindow>,
}

/// The customer of an order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    /// Customer id.
    pub id: CustomerId,
    /// E-mail for notifications.
    pub email: String,
}

/// Where an order ships.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipTo {
    /// Shipping zone.
    pub zone: Zone,
}

/// One requested line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: Qty,
    /// At what price.
    pub unit_price: Money,
}

/// The running engine.
pub struct Engine {
    /// Shared parts: settings, metrics, stores, lag, shutdown.
    pub runtime: Runtime,
    orders: Handle<orders::Command>,
    inventory: Handle<inventory::Command>,
    picking: Handle<picking::Command>,
    packing: Handle<packing::Command>,
    shipping: Handle<shipping::Command>,
    notifications: Handle<notifications::Command>,
    last_reconcile: std::sync::Mutex<Option<reconcile::Report>>,
    reconciling: tokio::sync::Mutex<()>,
}

impl Engine {
    /// Starts every service over `adapters`, with the carriers' APIs, the
    /// rate table in force at startup and the notification sink.
    pub async fn start(
        settings: Settings,
        adapters: Adapters,
        carriers: HashMap<String, Arc<dyn CarrierApi>>,
        rates: Option<RateTable>,
        webhook: Arc<dyn WebhookSink>,
    ) -> Result<Engine, StartError> {
        Engine::start_with(settings, adapters, carriers, rates, webhook, Topology::default()).await
    }

    /// Like [`Engine::start`], running only the services `topology` selects
    /// (the others answer [`ApiError::Unavailable`]), over its broker.
    pub async fn start_with(
        settings: Settings,
        adapters: Adapters,
        carriers: HashMap<String, Arc<dyn CarrierApi>>,
        rates: Option<RateTable>,
        webhook: Arc<dyn WebhookSink>,
        topology: Topology,
    ) -> Result<Engine, StartError> {
        let mut b = EngineBuilder::with_topology(settings, adapters, topology).await?;
        let s = b.settings().clone();
        let ledger = ledger_config(&s)?;
        let orders = b.spawn("orders", Orders::new(order_policy(&s)), subscriptions("orders")).await?;
        let inv = Inventory::open(
            b.store("inventory").as_ref(),
            ledger,
            s.inventory.hold_ttl.0,
            s.inventory.hold_release_jitter.0,
        )
        .await?;
        let inventory = b.spawn("inventory", inv, subscriptions("inventory")).await?;
        let pick = Picking::open(b.store("picking").as_ref(), s.picking.starvation_limit.0).await?;
        let picking = b.spawn("picking", pick, subscriptions("picking")).await?;
        let packing = b.spawn("packing", Packing::new(s.shipping.unit_weight_g), subscriptions("packing")).await?;
        let (svc, worker) = Shipping::open(b.store("shipping").as_ref(), &s, carriers, rates, b.clock().as_ref())
            .await
            .map_err(|e| match e {
                shipping::OpenError::Store(e) => StartError::Store(e),
                other => StartError::Config(other.to_string()),
            })?;
        let shipping = b.spawn("shipping", svc, subscriptions("shipping")).await?;
        if shipping.runs_here() {
            b.keep(tokio::spawn(worker.run(shipping.sender())));
        }
        let (svc, worker) =
            Notifications::open(b.store("notifications").as_ref(), &s, webhook).await.map_err(|e| match e {
                notifications::OpenError::Store(e) => StartError::Store(e),
                other => StartError::Config(other.to_string()),
            })?;
        let notifications = b.spawn("notifications", svc, subscriptions("notifications")).await?;
        if notifications.runs_here() {
            b.keep(tokio::spawn(worker.run(notifications.sender())));
        }
        let m = b.metrics();
        shipping::describe_metrics(&m);
        notifications::describe_metrics(&m);
        m.describe("orderly_reconciliation_runs_total", "Reconciliation runs.");
        m.describe("orderly_reconciliation_discrepancies", "Discrepancies found by the last reconciliation run.");
        m.describe("orderly_reconciliation_repairs_total", "Compensating changes applied by reconciliation.");
        Ok(Engine {
            runtime: b.finish(),
            orders,
            inventory,
            picking,
            packing,
            shipping,
            notifications,
            last_reconcile: std::sync::Mutex::new(None),
            reconciling: tokio::sync::Mutex::new(()),
        })
    }

    /// Stops every service after its batch in flight.
    pub async fn shutdown(&self) {
        self.runtime.shutdown().await;
    }

    /// Creates or updates a location.
    pub async fn put_location(&self, location: Location) -> Result<Location, ApiError> {
        self.inventory
            .call_retrying(|reply| inventory::Command::PutLocation { location: location.clone(), reply })
            .await
    }

    /// Every location.
    pub async fn locations(&self) -> Result<Vec<Location>, ApiError> {
        self.inventory.call(|reply| inventory::Command::Locations { reply }).await
    }

    /// Stock arrived.
    pub async fn receive(&self, location: LocationId, sku: Sku, qty: Qty) -> Result<InventorySnapshot, ApiError> {
        self.receive_keyed(location, sku, qty, None).await
    }

    /// Stock arrived, at most once per caller's idempotency key
    /// (`request_key`): the key is committed with the receipt, so a retry
    /// whose first answer was lost (a crash, a timeout) gets that answer
    /// again and receives nothing twice; the same key with a different
    /// request is refused (422).
    pub async fn receive_keyed(
        &self,
        location: LocationId,
        sku: Sku,
        qty: Qty,
        request_key: Option<String>,
    ) -> Result<InventorySnapshot, ApiError> {
        positive(qty)?;
        let key = request_key
            .map(|key| orders::RequestKey { key, fingerprint: fingerprint_of(&("receive", &location, &sku, qty)) });
        self.inventory
            .call_retrying(|reply| inventory::Command::Receive {
                location: location.clone(),
                sku: sku.clone(),
                qty,
                key: key.clone(),
                reply,
            })
            .await
    }

    /// A manual adjustment (`counted: None`) or a cycle count.
    pub async fn adjust(
        &self,
        sku: Sku,
        location: LocationId,
        delta: i64,
        counted: Option<u64>,
        reason: String,
        user: String,
    ) -> Result<InventorySnapshot, ApiError> {
        self.adjust_keyed(sku, location, delta, counted, reason, user, None).await
    }

    /// Like [`Engine::adjust`], at most once per caller's idempotency key
    /// (committed with the change, as in [`Engine::receive_keyed`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn adjust_keyed(
        &self,
        sku: Sku,
        location: LocationId,
        delta: i64,
        counted: Option<u64>,
        reason: String,
        user: String,
        request_key: Option<String>,
    ) -> Result<InventorySnapshot, ApiError> {
        let key = request_key.map(|key| orders::RequestKey {
            key,
            fingerprint: fingerprint_of(&("adjust", &sku, &location, delta, counted, &reason, &user)),
        });
        self.inventory
            .call_retrying(|reply| inventory::Command::Adjust {
                sku: sku.clone(),
                location: location.clone(),
                delta,
                counted,
                reason: reason.clone(),
                user: user.clone(),
                key: key.clone(),
                reply,
            })
            .await
    }

    /// A SKU's stock.
    pub async fn inventory(&self, sku: Sku) -> Result<InventorySnapshot, ApiError> {
        self.inventory.call(|reply| inventory::Command::Get { sku, reply }).await
    }

    /// A cart hold.
    pub async fn create_hold(&self, sku: Sku, qty: Qty, location: Option<LocationId>) -> Result<HoldInfo, ApiError> {
        self.create_hold_keyed(sku, qty, location, None).await
    }

    /// A cart hold, at most once per caller's idempotency key (committed with
    /// the hold, as in [`Engine::receive_keyed`]): a retry gets the same hold.
    pub async fn create_hold_keyed(
        &self,
        sku: Sku,
        qty: Qty,
        location: Option<LocationId>,
        request_key: Option<String>,
    ) -> Result<HoldInfo, ApiError> {
        positive(qty)?;
        let key = request_key
            .map(|key| orders::RequestKey { key, fingerprint: fingerprint_of(&("hold", &sku, qty, &location)) });
        self.inventory
            .call_retrying(|reply| inventory::Command::CreateHold {
                sku: sku.clone(),
                qty,
                location: location.clone(),
                key: key.clone(),
                reply,
            })
            .await
    }

    /// Creates an order. Lines worth at least `allocation.sync_min_line_value`
    /// are reserved first (a shortage answers 409 and creates nothing);
    /// the rest is allocated after the order is acknowledged.
    pub async fn create_order(&self, req: OrderRequest) -> Result<Order, ApiError> {
        self.create_order_keyed(req, None).await
    }

    /// Creates an order at most once per caller's idempotency key
    /// (`request_key`): the key is committed with the order, so a retry whose
    /// first answer was lost (a crash, a timeout) gets the order it created,
    /// and the same key with a different request is refused (422).
    pub async fn create_order_keyed(&self, req: OrderRequest, request_key: Option<String>) -> Result<Order, ApiError> {
        if req.lines.is_empty() || req.lines.len() > inventory::ORDER_LINES_MAX {
            return Err(ApiError::invalid(
                "invalid-lines",
                format!("an order has 1 to {} lines", inventory::ORDER_LINES_MAX),
            ));
        }
        for l in &req.lines {
            positive(l.qty)?;
        }
        let key = request_key.map(|key| orders::RequestKey { key, fingerprint: fingerprint_of(&req) });
        if let Some(k) = &key
            && let Some(existing) = self.keyed_order(k).await?
        {
            return Ok(existing);
        }
        let now = self.runtime.now();
        let order_id = OrderId::parse(["o-", self.runtime.new_id(now).as_str()].concat())
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let sync_lines = sync_lines(&order_id, &req, self.runtime.settings.allocation.sync_min_line_value);
        let reserved = if sync_lines.is_empty() {
            SyncReservation { allocations: Vec::new(), hold_ids: Vec::new() }
        } else {
            let (id, zone) = (order_id.clone(), req.ship_to.zone.clone());
            self.inventory
                .call_retrying(|reply| inventory::Command::ReserveSync {
                    order_id: id.clone(),
                    zone: zone.clone(),
                    lines: sync_lines.clone(),
                    reply,
                })
                .await?
        };
        let new = new_order(order_id, req, &reserved);
        self.orders.call(|reply| orders::Command::Create { new: Box::new(new), key, reply }).await
    }

    /// The order a request key created, if it is committed.
    async fn keyed_order(&self, key: &orders::RequestKey) -> Result<Option<Order>, ApiError> {
        let Some(row) = self.store("orders")?.get(orders::ORDER_KEYS, &key.key).await? else { return Ok(None) };
        let found: orders::KeyedOrder = serde_json::from_slice(&row.doc)
            .map_err(|e| ApiError::Unavailable(format!("stored order key unreadable: {e}")))?;
        if found.fingerprint != key.fingerprint {
            return Err(orders::key_reuse());
        }
        self.order(&found.order_id).await.map(Some)
    }

    /// Cancels an order or the unshipped rest of it.
    pub async fn cancel_order(&self, order_id: OrderId, reason: String) -> Result<Order, ApiError> {
        self.orders.call(|reply| orders::Command::Cancel { order_id, reason, reply }).await
    }

    /// The customer asks to return an order.
    pub async fn request_return(&self, order_id: OrderId, reason: String) -> Result<Order, ApiError> {
        self.orders.call(|reply| orders::Command::RequestReturn { order_id, reason, reply }).await
    }

    /// A return arrived at a location.
    pub async fn record_return(&self, order_id: OrderId, location: LocationId) -> Result<Order, ApiError> {
        self.orders.call(|reply| orders::Command::RecordReturn { order_id, location, reply }).await
    }

    /// One order.
    pub async fn order(&self, order_id: &OrderId) -> Result<Order, ApiError> {
        let store = self.store("orders")?;
        let row = store
            .get("orders", order_id.as_str())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("order {order_id}")))?;
        serde_json::from_slice(&row.doc).map_err(|e| ApiError::Unavailable(format!("stored order unreadable: {e}")))
    }

    /// Orders, optionally in one state, in id order after a cursor.
    pub async fn orders(
        &self,
        state: Option<OrderState>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Order>, ApiError> {
        let store = self.store("orders")?;
        let rows = store.scan("orders", state.map(|s| s.as_str()), after, limit.clamp(1, LIST_LIMIT_MAX)).await?;
        rows.iter()
            .map(|r| {
                serde_json::from_slice(&r.doc)
                    .map_err(|e| ApiError::Unavailable(format!("stored order unreadable: {e}")))
            })
            .collect()
    }

    /// Orders per state.
    pub async fn orders_by_state(&self) -> Result<Vec<(String, u64)>, ApiError> {
        Ok(self.store("orders")?.count_by_idx("orders").await?)
    }

    /// An order's events, oldest first.
    pub async fn order_events(&self, order_id: &OrderId) -> Result<Vec<OutboxRecord>, ApiError> {
        let events = self.store("orders")?.outbox_for_subject(order_id.as_str(), 10_000).await?;
        if events.is_empty() {
            return Err(ApiError::NotFound(format!("order {order_id}")));
        }
        Ok(events)
    }

    /// The next pick task for a location.
    pub async fn next_pick(&self, location: LocationId) -> Result<Option<PickTask>, ApiError> {
        self.picking.call_retrying(|reply| picking::Command::Next { location: location.clone(), reply }).await
    }

    /// Confirms a pick.
    pub async fn confirm_pick(
        &self,
        pick_id: PickId,
        instruction_key: String,
        qty: Qty,
    ) -> Result<PickOutcome, ApiError> {
        self.picking
            .call_retrying(|reply| picking::Command::Confirm {
                pick_id: pick_id.clone(),
                instruction_key: instruction_key.clone(),
                qty,
                reply,
            })
            .await
    }

    /// Reports a short pick.
    pub async fn short_pick(
        &self,
        pick_id: PickId,
        instruction_key: String,
        qty_found: Qty,
        reason: String,
    ) -> Result<PickOutcome, ApiError> {
        self.picking
            .call_retrying(|reply| picking::Command::Short {
                pick_id: pick_id.clone(),
                instruction_key: instruction_key.clone(),
                qty_found,
                reason: reason.clone(),
                reply,
            })
            .await
    }

    /// Packs picks into a package.
    pub async fn pack(
        &self,
        order_id: OrderId,
        location: LocationId,
        pick_ids: Vec<PickId>,
    ) -> Result<Package, ApiError> {
        self.packing.call(|reply| packing::Command::Pack { order_id, location, pick_ids, reply }).await
    }

    /// A shipment.
    pub async fn shipment(&self, shipment_id: orderly_domain::ShipmentId) -> Result<Shipment, ApiError> {
        self.shipping.call(|reply| shipping::Command::Get { shipment_id, reply }).await
    }

    /// The carrier reports a delivery (a repeat changes nothing).
    pub async fn delivered(&self, shipment_id: orderly_domain::ShipmentId) -> Result<Shipment, ApiError> {
        self.shipping.call(|reply| shipping::Command::Delivered { shipment_id, reply }).await
    }

    /// Uploads a carrier rate table; it takes effect at the next label batch.
    pub async fn upload_rates(&self, text: String) -> Result<RatesInfo, ApiError> {
        self.shipping.call(|reply| shipping::Command::UploadRates { text, reply }).await
    }

    /// Breakers, label queue and rate versions.
    pub async fn shipping_summary(&self) -> Result<ShippingSummary, ApiError> {
        self.shipping.call(|reply| shipping::Command::Summary { reply }).await
    }

    /// Webhook breaker and delivery counts.
    pub async fn notification_summary(&self) -> Result<NotificationSummary, ApiError> {
        self.notifications.call(|reply| notifications::Command::Summary { reply }).await
    }

    /// Notifications that failed after every attempt, oldest id first,
    /// resuming after `after`.
    pub async fn failed_notifications(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<notifications::Notification>, ApiError> {
        self.notifications.call(|reply| notifications::Command::ListFailed { after, limit, reply }).await
    }

    /// Puts a failed notification back in the delivery queue with a fresh
    /// set of attempts. Idempotent while it is pending; 409 once sent.
    pub async fn retry_notification(&self, id: String) -> Result<notifications::Notification, ApiError> {
        self.notifications.call(|reply| notifications::Command::Retry { id, reply }).await
    }

    /// Every service's dead letters (at most `limit` per service).
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, ApiError> {
        let mut out = Vec::new();
        for name in crate::engine::SERVICES {
            let rows = self.store(name)?.scan(DEAD_LETTERS, None, None, limit).await?;
            for r in rows {
                if let Ok(d) = serde_json::from_slice::<DeadLetter>(&r.doc) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Which service holds a dead letter.
    async fn dead_letter_owner(&self, id: &str) -> Result<&'static str, ApiError> {
        for name in crate::engine::SERVICES {
            if self.store(name)?.get(DEAD_LETTERS, id).await?.is_some() {
                return Ok(name);
            }
        }
        Err(ApiError::NotFound(format!("dead letter {id}")))
    }

    /// Runs a dead-lettered event again. Replay is idempotent: a replayed
    /// event leaves the store with its effect, so a second replay is a 404.
    pub async fn replay_dead_letter(&self, id: &str) -> Result<(), ApiError> {
        let owner = self.dead_letter_owner(id).await?;
        let id = id.to_owned();
        self.runtime.control(owner, |reply| Control::Replay { id, reply }).await.map_err(control_error)
    }

    /// Drops a dead letter for good.
    pub async fn discard_dead_letter(&self, id: &str) -> Result<(), ApiError> {
        let owner = self.dead_letter_owner(id).await?;
        let id = id.to_owned();
        self.runtime.control(owner, |reply| Control::Discard { id, reply }).await.map_err(control_error)
    }

    /// Runs reconciliation once (runs never overlap): gathers inventory's,
    /// orders' and picking's views through their command handles, finds
    /// every discrepancy, has inventory apply the compensating changes
    /// (reason `reconciliation`, recorded with `trigger` as the user) and
    /// picking republish picks whose event was lost. The report is kept as
    /// the last one.
    pub async fn reconcile(&self, trigger: &str) -> Result<reconcile::Report, ApiError> {
        let _one_at_a_time = self.reconciling.lock().await;
        let started_at = self.runtime.now();
        let (view, orders, picks) = self.reconcile_views().await?;
        let mut findings = reconcile::diff(&view, &orders, &picks);
        // What is only reported may be an event still in flight between two
        // services: keep it only if it is still there once consumers caught up.
        if findings.discrepancies.iter().any(|(_, r)| r.is_none()) {
            self.settle(std::time::Duration::from_secs(2)).await;
            let (v, o, p) = self.reconcile_views().await?;
            let again = reconcile::diff(&v, &o, &p);
            let key = |d: &reconcile::Discrepancy| {
                (d.kind.clone(), d.line_id.clone(), d.location.clone(), d.order_id.clone())
            };
            let still: std::collections::BTreeSet<_> = again.discrepancies.iter().map(|(d, _)| key(d)).collect();
            findings.discrepancies.retain(|(d, r)| r.is_some() || still.contains(&key(d)));
        }
        let repairs: Vec<reconcile::Repair> = findings.discrepancies.iter().filter_map(|(_, r)| r.clone()).collect();
        let user = format!("reconciliation:{trigger}");
        let outcomes = if repairs.is_empty() {
            Vec::new()
        } else {
            let rs = repairs.clone();
            self.inventory.call(|reply| inventory::Command::Repair { repairs: rs, user, reply }).await?
        };
        let republish: Vec<PickId> = repairs
            .iter()
            .zip(&outcomes)
            .filter_map(|(r, o)| match (r, o) {
                (reconcile::Repair::CommitPick { pick_id, .. }, reconcile::RepairOutcome::Applied) => {
                    Some(pick_id.clone())
                }
                _ => None,
            })
            .collect();
        if !republish.is_empty() {
            self.picking
                .call(|reply| {
                    picking::Command::Reconcile(picking::ReconcileCommand::Republish { pick_ids: republish, reply })
                })
                .await?;
        }
        let mut outcome_of = outcomes.into_iter();
        let mut discrepancies = Vec::with_capacity(findings.discrepancies.len());
        let mut repaired = 0;
        for (mut d, repair) in findings.discrepancies {
            if repair.is_some() {
                match outcome_of.next() {
                    Some(reconcile::RepairOutcome::Applied) => {
                        d.repaired = true;
                        repaired += 1;
                    }
                    Some(reconcile::RepairOutcome::Unchanged) | None => {}
                    Some(reconcile::RepairOutcome::Failed { error }) => d.error = Some(error),
                }
            }
            discrepancies.push(d);
        }
        let finished_at = self.runtime.now();
        let report = reconcile::Report {
            id: self.runtime.new_id(finished_at),
            trigger: trigger.to_owned(),
            started_at,
            finished_at,
            skus_checked: view.skus,
            reservations_checked: view.reservations.len() as u64,
            orders_checked: orders.len() as u64,
            picks_checked: picks.len() as u64,
            repaired,
            discrepancies,
        };
        let m = &self.runtime.metrics;
        m.inc(
            "orderly_reconciliation_runs_total",
            &[("trigger", if trigger == "scheduler" { "scheduler" } else { "manual" })],
            1,
        );
        m.set("orderly_reconciliation_discrepancies", &[], report.discrepancies.len() as f64);
        if !report.clean() {
            tracing::warn!(run = %report.id, discrepancies = report.discrepancies.len(), repaired, "reconciliation found discrepancies");
        } else {
            tracing::info!(run = %report.id, "reconciliation found no discrepancy");
        }
        *self.last_reconcile.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// Inventory's, then orders' and picking's views of what inventory reserves.
    async fn reconcile_views(
        &self,
    ) -> Result<(reconcile::InventoryView, Vec<Order>, Vec<picking::PickTask>), ApiError> {
        let view = self.inventory.call(|reply| inventory::Command::ReconcileView { reply }).await?;
        let mut order_ids: Vec<OrderId> = view
            .reservations
            .iter()
            .map(|r| r.order_id.clone())
            .chain(view.backorders.iter().map(|b| b.order_id.clone()))
            .collect();
        order_ids.sort();
        order_ids.dedup();
        let mut line_ids: Vec<LineId> = view.reservations.iter().map(|r| r.line_id.clone()).collect();
        line_ids.sort();
        line_ids.dedup();
        let orders = self.orders.call(|reply| orders::Command::ReconcileView { order_ids, reply }).await?;
        let picks = self
            .picking
            .call(|reply| picking::Command::Reconcile(picking::ReconcileCommand::View { line_ids, reply }))
            .await?;
        Ok((view, orders, picks))
    }

    /// Waits (at most `limit`) until every consumer has caught up.
    async fn settle(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.runtime.consumer_lag().await.iter().all(|l| l.backlog == 0) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Starts the scheduled reconciliation (every `reconcile.interval`, first
    /// run one interval after start; none when the interval is 0). It stops
    /// with the engine.
    pub fn spawn_reconciler(self: &Arc<Engine>) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.runtime.settings.reconcile.interval.0;
        if every <= 0 {
            return None;
        }
        let engine = Arc::downgrade(self);
        let mut stopping = self.runtime.stopping();
        let period = std::time::Duration::from_millis(every as u64);
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stopping.changed() => return,
                }
                if *stopping.borrow() {
                    return;
                }
                let Some(engine) = engine.upgrade() else { return };
                if let Err(e) = engine.reconcile("scheduler").await {
                    tracing::warn!(error = %e, "scheduled reconciliation failed; next try in one interval");
                }
            }
        }))
    }

    /// The last reconciliation report since the engine started, if any.
    pub fn last_reconcile(&self) -> Option<reconcile::Report> {
        self.last_reconcile.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn store(&self, name: &str) -> Result<Arc<dyn crate::ports::Store>, ApiError> {
        self.runtime.store(name).ok_or_else(|| ApiError::Unavailable(format!("no store for {name}")))
    }
}

fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotFound(what) => ApiError::NotFound(what),
        ControlError::Failed(detail) => ApiError::conflict("replay-failed", detail),
        ControlError::Unavailable(detail) => ApiError::Unavailable(detail),
    }
}

/// A stable hash of an order request, to tell a retry from a reused key.
/// A hash of a request's kind and parameters, to tell a retry from a reuse of its key.
fn fingerprint_of(req: &impl serde::Serialize) -> u64 {
    let bytes = serde_json::to_vec(req).expect("a request is plain data and always serializes");
    orderly_domain::ids::fnv1a(&bytes)
}

fn positive(qty: Qty) -> Result<(), ApiError> {
    if qty == 0 || qty > orderly_domain::order::LINE_QTY_MAX {
        return Err(ApiError::invalid(
            "invalid-quantity",
            format!("qty must be 1..={}", orderly_domain::order::LINE_QTY_MAX),
        ));
    }
    Ok(())
}

/// What each service consumes: per producer, the event types it wants.
/// The engine and the simulator wire their buses from this one table.
pub fn subscriptions(consumer: &str) -> &'static [Subscription] {
    match consumer {
        "orders" => ORDERS_SUBSCRIPTIONS,
        "inventory" => INVENTORY_SUBSCRIPTIONS,
        "picking" => PICKING_SUBSCRIPTIONS,
        "packing" => PACKING_SUBSCRIPTIONS,
        "shipping" => SHIPPING_SUBSCRIPTIONS,
        "notifications" => NOTIFICATIONS_SUBSCRIPTIONS,
        _ => &[],
    }
}

const ORDERS_SUBSCRIPTIONS: &[Subscription] = &[
    ("inventory", |t| {
        matches!(
            t,
            "orderly.inventory.reserved"
                | "orderly.inventory.backordered"
                | "orderly.inventory.deallocated"
                | "orderly.hold.unclaimed"
        )
    }),
    ("picking", |t| matches!(t, "orderly.pick.requested" | "orderly.pick.completed" | "orderly.pick.short")),
    ("packing", |t| t == "orderly.pack.completed"),
    ("shipping", |t| matches!(t, "orderly.shipment.label_created" | "orderly.shipment.delivered")),
];
const INVENTORY_SUBSCRIPTIONS: &[Subscription] = &[
    ("orders", |t| {
        matches!(
            t,
            "orderly.order.created" | "orderly.order.canceled" | "orderly.order.returned" | "orderly.order.voided"
        )
    }),
    ("picking", |t| matches!(t, "orderly.pick.completed" | "orderly.pick.short")),
];
const PICKING_SUBSCRIPTIONS: &[Subscription] =
    &[("orders", |t| matches!(t, "orderly.order.allocated" | "orderly.order.canceled" | "orderly.order.deallocated"))];
const PACKING_SUBSCRIPTIONS: &[Subscription] = &[
    ("picking", |t| matches!(t, "orderly.pick.completed" | "orderly.pick.short")),
    ("orders", |t| matches!(t, "orderly.order.allocated" | "orderly.order.canceled")),
];
const SHIPPING_SUBSCRIPTIONS: &[Subscription] = &[("packing", shipping::wants), ("orders", shipping::wants)];
const NOTIFICATIONS_SUBSCRIPTIONS: &[Subscription] =
    &[("orders", notifications::wants), ("shipping", notifications::wants)];

/// The ledger settings (`inventory.partitions`, `inventory.safety_stock_pct`), validated.
pub fn ledger_config(s: &Settings) -> Result<LedgerConfig, StartError> {
    let pct = u8::try_from(s.inventory.safety_stock_pct)
        .map_err(|_| StartError::Config("inventory.safety_stock_pct must be 0..=100".into()))?;
    LedgerConfig::new(s.inventory.partitions, pct).map_err(|e| StartError::Config(e.to_string()))
}

/// The order split policy (`split.min_order_value_for_partial`).
pub fn order_policy(s: &Settings) -> OrderPolicy {
    OrderPolicy { min_order_value_for_partial: s.split.min_order_value_for_partial }
}

/// The lines of a new order reserved before it is acknowledged: those worth
/// at least `threshold` (`allocation.sync_min_line_value`).
pub fn sync_lines(order_id: &OrderId, req: &OrderRequest, threshold: Money) -> Vec<RouteLine> {
    req.lines
        .iter()
        .zip(1u32..)
        .filter(|(l, _)| allocation_mode(l.unit_price.times(l.qty), threshold) == AllocationMode::Sync)
        .map(|(l, n)| RouteLine { line_id: LineId::for_order(order_id, n), sku: l.sku.clone(), qty: l.qty })
        .collect()
}

/// The order to create from a request and its synchronous reservation.
pub fn new_order(order_id: OrderId, req: OrderRequest, reserved: &SyncReservation) -> NewOrder {
    let allocations_for = |line: &LineId| -> Vec<LocationQty> {
        reserved
            .allocations
            .iter()
            .filter(|a: &&AllocationData| &a.line_id == line)
            .map(|a| LocationQty { location: a.location.clone(), qty: a.qty })
            .collect()
    };
    let lines = req
        .lines
        .into_iter()
        .zip(1u32..)
        .map(|(l, n)| NewLine {
            allocations: allocations_for(&LineId::for_order(&order_id, n)),
            sku: l.sku,
            qty: l.qty,
            unit_price: l.unit_price,
        })
        .collect();
    let mut hold_ids = req.hold_ids;
    hold_ids.extend(reserved.hold_ids.iter().cloned());
    NewOrder {
        order_id,
        customer_id: req.customer.id,
        email: req.customer.email,
        ship_to: req.ship_to.zone,
        priority: req.priority,
        lines,
        hold_ids,
        delivery_window: req.delivery_window,
    }
}
