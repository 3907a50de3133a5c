//! The inventory service: stock per SKU × location × partition, cart holds,
//! per-SKU backorder queues, and the routing of order lines to locations.
//!
//! Oversell protection lives in the ledger (available = on hand − reserved −
//! safety, asserted after every change); this service feeds it. Every handler
//! first loads everything it will touch, then decides and applies in memory,
//! so a store failure can only happen before state changes.

use super::common::{ApiError, Reply};
use super::orders::RequestKey;
use super::reconcile;
use crate::events::{
    self, AllocationData, InventoryBackordered, InventoryReserved, OrderCanceled, OrderCreated, PickData, StockMoved,
    UnfilledData,
};
use crate::runtime::{EventError, Service, Tx};
use crate::table::{CACHE_ENTRIES_MAX, IndexGuard, LEDGER_CACHE_MAX, LedgerTable, Staged, Table};
use orderly_domain::allocation::{Location, RouteLine, route};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::ids::fnv1a;
use orderly_domain::ledger::{
    InventorySnapshot, LedgerCommand, LedgerConfig, LedgerError, LedgerEvent, ReleaseReason, SkuLedger,
};
use orderly_domain::{HoldId, LineId, LocationId, OrderId, Qty, Sku, Timestamp, Zone};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// How far out a backordered line is promised, absent better information.
pub const BACKORDER_ETA_MS: i64 = 3 * 86_400_000;
/// Most lines in one order.
pub const ORDER_LINES_MAX: usize = 100;
/// The table mapping a caller's scoped idempotency key to the answer of the
/// receipt, adjustment, cycle count or hold it made.
pub const REQUEST_KEYS: &str = "request_keys";
/// Request keys kept in memory beyond what the store holds.
const REQUEST_KEY_CACHE_MAX: usize = 10_000;

/// The answer a request key got (table [`REQUEST_KEYS`]), stored in the same
/// commit as the stock change it made, so a retry whose first answer was lost
/// to a crash or a timeout gets that answer again instead of a second change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedRequest {
    /// The fingerprint of the request that made it (kind and parameters).
    pub fingerprint: u64,
    /// The answer it got, as JSON.
    pub answer: serde_json::Value,
}

/// What inventory remembers of an order: its lines (to release them on cancel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Order id.
    pub order_id: OrderId,
    /// Destination zone.
    pub zone: Zone,
    /// Lines and their SKUs.
    pub lines: Vec<(LineId, Sku, Qty)>,
    /// Units the ledger committed as picked, per line and location: what goes
    /// back on the shelf (less what shipped) if the order is canceled.
    #[serde(default)]
    pub picked: Vec<(LineId, LocationId, Qty)>,
}

impl OrderRecord {
    /// Every unit of every line picked: only a cancel or a return still
    /// needs the record (and reloads it).
    fn fully_picked(&self) -> bool {
        self.lines.iter().all(|(line, _, qty)| {
            self.picked.iter().filter(|(l, _, _)| l == line).map(|(_, _, q)| u64::from(*q)).sum::<u64>()
                >= u64::from(*qty)
        })
    }
}

/// Where a hold lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRef {
    /// SKU.
    pub sku: Sku,
    /// When a cart hold expires; for a synchronous reservation, when
    /// inventory first asks whether its order exists (it never expires).
    pub expires_at: Timestamp,
    /// For a synchronous reservation: the line it is for.
    #[serde(default)]
    pub line: Option<LineId>,
    /// For a synchronous reservation: the order it is for.
    #[serde(default)]
    pub order: Option<OrderId>,
}

/// A hold as shown to the storefront.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldInfo {
    /// Hold id (pass it in the order's `hold_ids`).
    pub id: HoldId,
    /// SKU.
    pub sku: Sku,
    /// Units.
    pub qty: u64,
    /// Location.
    pub location: LocationId,
    /// When it lapses.
    pub expires_at: Timestamp,
}

/// The result of a synchronous reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReservation {
    /// What was reserved where.
    pub allocations: Vec<AllocationData>,
    /// The holds backing them, consumed when the order is created.
    pub hold_ids: Vec<HoldId>,
}

/// Commands from the API.
pub enum Command {
    /// Creates or updates a location.
    PutLocation {
        /// The location.
        location: Location,
        /// Answer.
        reply: Reply<Location>,
    },
    /// Lists locations.
    Locations {
        /// Answer.
        reply: Reply<Vec<Location>>,
    },
    /// Stock arrived.
    Receive {
        /// Where.
        location: LocationId,
        /// What.
        sku: Sku,
        /// How many.
        qty: Qty,
        /// The caller's idempotency key: a repeat answers the first receipt's answer.
        key: Option<RequestKey>,
        /// Answer: the SKU's stock after.
        reply: Reply<InventorySnapshot>,
    },
    /// A manual adjustment (or a cycle count when `counted` is set).
    Adjust {
        /// What.
        sku: Sku,
        /// Where.
        location: LocationId,
        /// Signed change (ignored for a count).
        delta: i64,
        /// A cycle count's result: on hand becomes this.
        counted: Option<u64>,
        /// Why.
        reason: String,
        /// Who.
        user: String,
        /// The caller's idempotency key: a repeat answers the first change's answer.
        key: Option<RequestKey>,
        /// Answer.
        reply: Reply<InventorySnapshot>,
    },
    /// A cart hold.
    CreateHold {
        /// What.
        sku: Sku,
        /// How many.
        qty: Qty,
        /// Where, if the storefront cares.
        location: Option<LocationId>,
        /// The caller's idempotency key: a repeat answers the hold it made.
        key: Option<RequestKey>,
        /// Answer.
        reply: Reply<HoldInfo>,
    },
    /// Reserves lines before an order is acknowledged.
    ReserveSync {
        /// The order being created.
        order_id: OrderId,
        /// Destination.
        zone: Zone,
        /// Lines to reserve in full.
        lines: Vec<RouteLine>,
        /// Answer: allocations, or a conflict when stock is short.
        reply: Reply<SyncReservation>,
    },
    /// A SKU's stock.
    Get {
        /// What.
        sku: Sku,
        /// Answer.
        reply: Reply<InventorySnapshot>,
    },
    /// Reconciliation: every reservation, backorder and books drift.
    ReconcileView {
        /// Answer.
        reply: Reply<reconcile::InventoryView>,
    },
    /// Reconciliation: apply compensating changes (reason `reconciliation`).
    Repair {
        /// The changes, each re-checked against the current ledger.
        repairs: Vec<reconcile::Repair>,
        /// Who runs the reconciliation (recorded).
        user: String,
        /// Answer: one outcome per repair.
        reply: Reply<Vec<reconcile::RepairOutcome>>,
    },
}

/// What a handler's ledger changes add up to, emitted once at the end.
#[derive(Default)]
struct Outcome {
    deallocated: BTreeMap<OrderId, Vec<AllocationData>>,
    reserved: BTreeMap<OrderId, (Vec<AllocationData>, bool)>,
    backordered: BTreeMap<OrderId, Vec<UnfilledData>>,
    moves: Vec<(EventType, StockMoved)>,
    holds: Vec<(EventType, Sku, serde_json::Value)>,
}

impl Outcome {
    /// Units reserved for an order's line at a location: part of its `inventory.reserved`.
    fn note_reserved(&mut self, order: &OrderId, line: &LineId, sku: &Sku, location: &LocationId, qty: u64) {
        let entry = self.reserved.entry(order.clone()).or_default();
        let a = AllocationData { line_id: line.clone(), sku: sku.clone(), location: location.clone(), qty: qty as Qty };
        add_allocation(&mut entry.0, a);
    }
}

/// The inventory service.
pub struct Inventory {
    cfg: LedgerConfig,
    hold_ttl_ms: i64,
    hold_jitter_ms: i64,
    ledgers: LedgerTable,
    locations: Table<Location>,
    orders: Table<OrderRecord>,
    holds: Table<HoldRef>,
    request_keys: Table<KeyedRequest>,
    expiries: BTreeSet<(Timestamp, Sku)>,
    /// When to ask again whether the order of an unconsumed synchronous
    /// reservation exists (`hold.unclaimed`), per hold id.
    asks: BTreeSet<(Timestamp, String)>,
    indexes: IndexGuard,
}

impl Inventory {
    /// Opens the service: loads locations and the hold expiry schedule.
    pub async fn open(
        store: &dyn crate::ports::Store,
        cfg: LedgerConfig,
        hold_ttl_ms: i64,
        hold_jitter_ms: i64,
    ) -> Result<Inventory, crate::ports::StoreError> {
        let mut svc = Inventory {
            cfg,
            hold_ttl_ms,
            hold_jitter_ms,
            ledgers: LedgerTable::new(LEDGER_CACHE_MAX),
            locations: Table::whole("locations", |_| None),
            orders: Table::new("orders", CACHE_ENTRIES_MAX, |_| None).settled_when(OrderRecord::fully_picked),
            holds: Table::whole("holds", |_| None),
            request_keys: Table::new(REQUEST_KEYS, REQUEST_KEY_CACHE_MAX, |_| None),
            expiries: BTreeSet::new(),
            asks: BTreeSet::new(),
            indexes: IndexGuard::unbuilt(),
        };
        svc.locations.load_all(store).await?;
        svc.refresh(store).await?;
        Ok(svc)
    }

    /// Reloads the holds (kept whole in memory) and rebuilds the expiry
    /// schedule from them when they are stale: at startup, and after a failed
    /// commit, which may have dropped holds from the cache and expiries from
    /// the schedule that the store still has.
    async fn refresh(&mut self, store: &dyn crate::ports::Store) -> Result<(), crate::ports::StoreError> {
        if !self.indexes.is_stale() {
            return Ok(());
        }
        self.locations.load_all(store).await?;
        self.holds.load_all(store).await?;
        self.expiries.clear();
        self.asks.clear();
        for (id, h) in self.holds.iter() {
            match h.order {
                None => self.expiries.insert((h.expires_at, h.sku.clone())),
                Some(_) => self.asks.insert((h.expires_at, id.clone())),
            };
        }
        self.indexes.rebuilt();
        Ok(())
    }

    async fn load_ledgers(
        &mut self,
        store: &dyn crate::ports::Store,
        skus: Vec<Sku>,
    ) -> Result<(), crate::ports::StoreError> {
        for sku in &skus {
            if !self.ledgers.load(store, sku.as_str()).await? {
                self.ledgers.insert(sku.as_str().to_owned(), SkuLedger::new(sku.clone()));
            }
        }
        Ok(())
    }

    /// Decides and applies one ledger command (its ledger must be loaded).
    fn exec(&mut self, sku: &Sku, cmd: &LedgerCommand, out: &mut Outcome) -> Result<Vec<LedgerEvent>, LedgerError> {
        let ledger = self
            .ledgers
            .get(sku.as_str())
            .ok_or_else(|| LedgerError::Impossible(format!("ledger {sku} not loaded")))?;
        let evs = ledger.decide(cmd, &self.cfg)?;
        if evs.is_empty() {
            return Ok(evs);
        }
        let ledger = self.ledgers.get_mut(sku.as_str()).expect("checked above");
        for ev in &evs {
            ledger.apply(ev);
        }
        debug_assert!(ledger.check_invariants().is_ok(), "{:?}", ledger.check_invariants());
        for ev in &evs {
            self.note(sku, ev, out);
        }
        Ok(evs)
    }

    /// Turns ledger events into what the service publishes.
    fn note(&mut self, sku: &Sku, ev: &LedgerEvent, out: &mut Outcome) {
        let mv = |location: &LocationId, delta: i64, reason: &str, order: Option<&OrderId>| StockMoved {
            sku: sku.clone(),
            location: location.clone(),
            delta,
            reason: reason.to_owned(),
            user: None,
            order_id: order.cloned(),
        };
        match ev {
            LedgerEvent::Reserved { order, line, location, qty, from_backorder, .. } => {
                out.note_reserved(order, line, sku, location, *qty);
                out.reserved.entry(order.clone()).or_default().1 |= *from_backorder;
            }
            LedgerEvent::HoldConsumed { order, line, location, qty, hold_id, .. } => {
                // A synchronous hold's allocation is already in the order
                // (it was acknowledged with it); only cart holds are news.
                let synchronous = self.holds.get(hold_id.as_str()).is_some_and(|h| h.line.is_some());
                if !synchronous {
                    out.note_reserved(order, line, sku, location, *qty);
                }
                self.holds.remove(hold_id.as_str());
                out.holds.push((
                    EventType::HoldConsumed,
                    sku.clone(),
                    serde_json::json!({"hold_id": hold_id, "order_id": order}),
                ));
            }
            LedgerEvent::Backordered { order, line, qty, .. } => {
                out.backordered.entry(order.clone()).or_default().push(UnfilledData {
                    line_id: line.clone(),
                    sku: sku.clone(),
                    qty: *qty as Qty,
                });
            }
            LedgerEvent::Released { order, line, location, qty, reason, .. } => {
                if *reason == ReleaseReason::StockLoss {
                    out.deallocated.entry(order.clone()).or_default().push(AllocationData {
                        line_id: line.clone(),
                        sku: sku.clone(),
                        location: location.clone(),
                        qty: *qty as Qty,
                    });
                }
                let reason =
                    serde_json::to_value(reason).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                out.moves.push((EventType::InventoryReleased, mv(location, *qty as i64, &reason, Some(order))));
            }
            LedgerEvent::Received { location, qty, .. } => {
                out.moves.push((EventType::InventoryReceived, mv(location, *qty as i64, "receipt", None)))
            }
            LedgerEvent::Committed { order, location, qty, .. } => {
                out.moves.push((EventType::InventoryCommitted, mv(location, -(*qty as i64), "pick", Some(order))));
            }
            LedgerEvent::Adjusted { location, delta, reason, user, .. } => {
                let mut m = mv(location, *delta, reason, None);
                m.user = Some(user.clone());
                out.moves.push((EventType::InventoryAdjusted, m));
            }
            LedgerEvent::Restated { location, delta, reason, user, .. } => {
                let mut m = mv(location, *delta, reason, None);
                m.user = Some(user.clone());
                out.moves.push((EventType::InventoryAdjusted, m));
            }
            LedgerEvent::HoldCreated { hold_id, location, qty, expires_at, .. } => {
                self.expiries.insert((*expires_at, sku.clone()));
                out.holds.push((EventType::HoldCreated, sku.clone(), serde_json::json!({"hold_id": hold_id, "location": location, "qty": qty, "expires_at": expires_at.to_string()})));
            }
            LedgerEvent::HoldExpired { hold_id, location, qty, .. }
            | LedgerEvent::HoldReleased { hold_id, location, qty, .. } => {
                self.holds.remove(hold_id.as_str());
                out.holds.push((
                    EventType::HoldExpired,
                    sku.clone(),
                    serde_json::json!({"hold_id": hold_id, "location": location, "qty": qty}),
                ));
            }
            _ => {}
        }
    }

    /// Emits what a handler decided: per-order reservations and backorders,
    /// stock movements and hold events.
    fn flush(&mut self, tx: &mut Tx, out: Outcome) {
        let m = &tx.ctx().metrics;
        let picks = out.moves.iter().filter(|(t, m)| *t == EventType::InventoryCommitted && m.reason == "pick").count();
        if picks > 0 {
            m.inc("orderly_automated_picks_total", &[], picks as u64);
            m.count_at("automated_picks", tx.now.0, picks as u64);
        }
        // Taken back first: the order frees the units before it hears they wait.
        for (order_id, allocations) in out.deallocated {
            let data = events::Deallocated { order_id: order_id.clone(), allocations, reason: "stock_loss".into() };
            tx.emit(EventType::InventoryDeallocated, order_id.as_str(), events::data(&data));
        }
        for (order_id, (allocations, from_backorder)) in out.reserved {
            let data = InventoryReserved { order_id: order_id.clone(), allocations, from_backorder };
            tx.emit(EventType::InventoryReserved, order_id.as_str(), events::data(&data));
        }
        for (order_id, lines) in out.backordered {
            tx.ctx().metrics.inc("orderly_backorders_total", &[], lines.len() as u64);
            let data = InventoryBackordered {
                order_id: order_id.clone(),
                lines,
                expected_ship_date: tx.now.plus_ms(BACKORDER_ETA_MS),
            };
            tx.emit(EventType::InventoryBackordered, order_id.as_str(), events::data(&data));
        }
        for (event_type, moved) in out.moves {
            let subject = moved.sku.as_str().to_owned();
            tx.emit(event_type, &subject, events::data(&moved));
        }
        for (event_type, sku, data) in out.holds {
            tx.emit(event_type, sku.as_str(), data);
        }
    }

    fn all_locations(&self) -> Vec<Location> {
        let mut v: Vec<Location> = self.locations.iter().map(|(_, l)| l.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Routes `lines` and reserves what routing found; returns what stayed unfilled.
    /// The allocation partition an order's reservations start from.
    fn partition_hint(&self, order: &OrderId) -> u32 {
        (fnv1a(order.as_str().as_bytes()) % u64::from(self.cfg.partitions().max(1))) as u32
    }

    fn route_and_reserve(
        &mut self,
        order: &OrderId,
        zone: &Zone,
        lines: &[RouteLine],
        out: &mut Outcome,
    ) -> Vec<(LineId, Sku, Qty)> {
        let locations = self.all_locations();
        let (ledgers, cfg) = (&self.ledgers, &self.cfg);
        let plan = route(lines, zone, &locations, |sku: &Sku, loc: &LocationId| {
            ledgers.get(sku.as_str()).map_or(0, |l| l.reservable_at(loc, cfg))
        });
        let hint = self.partition_hint(order);
        let mut unfilled: Vec<(LineId, Sku, Qty)> = Vec::new();
        for line in plan.lines() {
            let mut missing = 0;
            for (location, qty) in &line.allocations {
                let cmd = LedgerCommand::Reserve {
                    order: order.clone(),
                    line: line.line_id.clone(),
                    qty: *qty,
                    location: location.clone(),
                    partition_hint: hint,
                };
                if self.exec(&line.sku, &cmd, out).is_err() {
                    missing += qty;
                }
            }
            let unrouted: Qty = plan.unfilled().iter().filter(|(l, _)| l == &line.line_id).map(|(_, q)| *q).sum();
            if missing + unrouted > 0 {
                unfilled.push((line.line_id.clone(), line.sku.clone(), missing + unrouted));
            }
        }
        unfilled
    }

    /// Runs a per-location stock command and answers with the SKU's stock.
    async fn stock_command(
        &mut self,
        tx: &mut Tx,
        sku: &Sku,
        location: &LocationId,
        cmd: LedgerCommand,
    ) -> Result<InventorySnapshot, ApiError> {
        // A miss is checked in the store: another replica may have just created it.
        if !self.locations.load(tx.store(), location.as_str()).await? {
            return Err(ApiError::invalid(
                "unknown-location",
                format!("location {location} does not exist; create it with PUT /v1/locations/{location}"),
            ));
        }
        self.load_ledgers(tx.store(), vec![sku.clone()]).await?;
        let mut out = Outcome::default();
        self.exec(sku, &cmd, &mut out).map_err(ledger_error)?;
        self.flush(tx, out);
        Ok(self.ledgers.get(sku.as_str()).map(SkuLedger::snapshot).expect("loaded above"))
    }

    /// The answer a request key already got, if any; a different request
    /// under the same key is refused (422).
    async fn keyed<T: serde::de::DeserializeOwned>(
        &mut self,
        tx: &mut Tx,
        key: Option<&RequestKey>,
    ) -> Result<Option<T>, ApiError> {
        let Some(key) = key else { return Ok(None) };
        if !self.request_keys.load(tx.store(), &key.key).await? {
            return Ok(None);
        }
        let found = self.request_keys.get(&key.key).expect("loaded above");
        if found.fingerprint != key.fingerprint {
            return Err(ApiError::invalid(
                "idempotency-key-reuse",
                "this Idempotency-Key was already used for a different request; use a new key for a new request",
            ));
        }
        let answer = serde_json::from_value(found.answer.clone())
            .map_err(|e| ApiError::Unavailable(format!("stored answer of an idempotency key unreadable: {e}")))?;
        Ok(Some(answer))
    }

    /// Records a successful answer under its request key, in the commit that
    /// holds the change it answers (a refusal changed nothing: not recorded).
    fn remember_key<T: Serialize>(&mut self, key: Option<RequestKey>, answer: &Result<T, ApiError>) {
        if let (Some(key), Ok(answer)) = (key, answer) {
            let answer = serde_json::to_value(answer).expect("an answer is plain data and always serializes");
            self.request_keys.insert(key.key, KeyedRequest { fingerprint: key.fingerprint, answer });
        }
    }
}

/// Maps a ledger rejection to what the API answers.
impl Inventory {
    /// A manual write-off may only take stock no order holds: taking reserved
    /// units would leave orders allocated to stock that is gone. (A cycle
    /// count records physical truth and may; the bumped lines are backordered.)
    async fn check_free_stock(
        &mut self,
        tx: &mut Tx,
        sku: &Sku,
        location: &LocationId,
        units: u64,
    ) -> Result<(), ApiError> {
        self.load_ledgers(tx.store(), vec![sku.clone()]).await?;
        let free = self
            .ledgers
            .get(sku.as_str())
            .and_then(|l| l.location(location))
            .map_or(0, |l| l.on_hand.saturating_sub(l.reserved));
        if units > free {
            return Err(ApiError::conflict(
                "stock-reserved",
                format!(
                    "only {free} units at {location} are not reserved; cancel or reassign orders first, or record a cycle count"
                ),
            ));
        }
        Ok(())
    }
}

fn ledger_error(e: LedgerError) -> ApiError {
    match e {
        LedgerError::Insufficient { .. } => ApiError::conflict("insufficient-stock", e.to_string()),
        LedgerError::AdjustBelowZero { .. } | LedgerError::HoldExists { .. } => {
            ApiError::conflict("stock-conflict", e.to_string())
        }
        LedgerError::UnknownHold { .. } => ApiError::NotFound(e.to_string()),
        LedgerError::Impossible(_) => ApiError::Unavailable(e.to_string()),
        other => ApiError::invalid("invalid-stock-command", other.to_string()),
    }
}

impl Inventory {
    async fn create_hold(
        &mut self,
        tx: &mut Tx,
        sku: Sku,
        qty: Qty,
        location: Option<LocationId>,
    ) -> Result<HoldInfo, ApiError> {
        if let Some(l) = &location
            && !self.locations.load(tx.store(), l.as_str()).await?
        {
            return Err(ApiError::invalid("unknown-location", format!("location {l} does not exist")));
        }
        self.load_ledgers(tx.store(), vec![sku.clone()]).await?;
        let id = HoldId::parse(format!("h-{}", tx.new_id())).map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let jitter = (tx.random() % (self.hold_jitter_ms.max(0) as u64 + 1)) as i64;
        let cmd = LedgerCommand::CreateHold {
            hold_id: id.clone(),
            qty,
            location,
            now: tx.now,
            ttl_ms: self.hold_ttl_ms,
            jitter_offset_ms: jitter,
        };
        let mut out = Outcome::default();
        self.exec(&sku, &cmd, &mut out).map_err(ledger_error)?;
        self.flush(tx, out);
        let view = self
            .ledgers
            .get(sku.as_str())
            .and_then(|l| l.hold(&id))
            .ok_or_else(|| ApiError::Unavailable("hold vanished".into()))?;
        self.holds.insert(
            id.as_str().to_owned(),
            HoldRef { sku: sku.clone(), expires_at: view.expires_at, line: None, order: None },
        );
        tx.ctx().metrics.inc("orderly_holds_created_total", &[], 1);
        Ok(HoldInfo { id, sku, qty: view.qty, location: view.location, expires_at: view.expires_at })
    }

    async fn reserve_sync(
        &mut self,
        tx: &mut Tx,
        order_id: OrderId,
        zone: Zone,
        lines: Vec<RouteLine>,
    ) -> Result<SyncReservation, ApiError> {
        if lines.is_empty() || lines.len() > ORDER_LINES_MAX {
            return Err(ApiError::invalid("invalid-lines", format!("an order has 1 to {ORDER_LINES_MAX} lines")));
        }
        self.load_ledgers(tx.store(), lines.iter().map(|l| l.sku.clone()).collect()).await?;
        let locations = self.all_locations();
        let (ledgers, cfg) = (&self.ledgers, &self.cfg);
        let plan = route(&lines, &zone, &locations, |sku: &Sku, loc: &LocationId| {
            ledgers.get(sku.as_str()).map_or(0, |l| l.reservable_at(loc, cfg))
        });
        if !plan.is_complete() {
            let short: Vec<String> = plan.unfilled().iter().map(|(l, q)| format!("{l} short by {q}")).collect();
            return Err(ApiError::conflict(
                "insufficient-stock",
                format!("not enough stock to reserve: {}", short.join(", ")),
            ));
        }
        let mut out = Outcome::default();
        let mut result = SyncReservation { allocations: Vec::new(), hold_ids: Vec::new() };
        for line in plan.lines() {
            for (location, qty) in &line.allocations {
                let n = result.hold_ids.len() + 1;
                let id = HoldId::parse(super::common::derived_id(order_id.as_str(), &format!(".s{n}")))
                    .map_err(|e| ApiError::invalid("invalid-order-id", e.to_string()))?;
                // No lifetime: the order, acknowledged with these units, is
                // on its way here; only the orders service can void it.
                let cmd = LedgerCommand::CreateOrderHold {
                    hold_id: id.clone(),
                    qty: *qty,
                    location: location.clone(),
                    now: tx.now,
                };
                if let Err(e) = self.exec(&line.sku, &cmd, &mut out) {
                    self.undo_holds(&result, &mut out);
                    return Err(ledger_error(e));
                }
                let ask_at = tx.now.plus_ms(self.hold_ttl_ms);
                self.asks.insert((ask_at, id.as_str().to_owned()));
                let href = HoldRef {
                    sku: line.sku.clone(),
                    expires_at: ask_at,
                    line: Some(line.line_id.clone()),
                    order: Some(order_id.clone()),
                };
                self.holds.insert(id.as_str().to_owned(), href);
                result.hold_ids.push(id);
                result.allocations.push(AllocationData {
                    line_id: line.line_id.clone(),
                    sku: line.sku.clone(),
                    location: location.clone(),
                    qty: *qty,
                });
            }
        }
        self.flush(tx, out);
        Ok(result)
    }

    fn undo_holds(&mut self, made: &SyncReservation, out: &mut Outcome) {
        for (id, a) in made.hold_ids.iter().zip(&made.allocations) {
            let _ = self.exec(&a.sku, &LedgerCommand::ReleaseHold { hold_id: id.clone() }, out);
        }
    }

    async fn on_order_created(&mut self, tx: &mut Tx, ev: OrderCreated) -> Result<(), EventError> {
        if ev.lines.is_empty() || ev.lines.len() > ORDER_LINES_MAX {
            return Err(EventError::Poison(format!("order {} has {} lines", ev.order_id, ev.lines.len())));
        }
        let hold_skus: Vec<Sku> = ev.hold_ids.iter().filter_map(|h| self.holds.get(h).map(|r| r.sku.clone())).collect();
        let skus = ev.lines.iter().map(|l| l.sku.clone()).chain(hold_skus).collect();
        self.load_ledgers(tx.store(), skus).await?;
        let mut out = Outcome::default();
        let mut remaining: BTreeMap<LineId, Qty> = ev.lines.iter().map(|l| (l.line_id.clone(), l.qty)).collect();
        let mut covered: BTreeMap<(LineId, LocationId), Qty> = BTreeMap::new();
        for hold_id in &ev.hold_ids {
            if let Some((line, location, qty)) = self.consume_hold(&ev, hold_id, &mut remaining, &mut out) {
                *covered.entry((line, location)).or_default() += qty;
            }
        }
        for a in &ev.preallocated {
            let held = covered.get_mut(&(a.line_id.clone(), a.location.clone())).map_or(0, |c| {
                let t = (*c).min(a.qty);
                *c -= t;
                t
            });
            if a.qty > held {
                self.restore_lapsed(tx, &ev.order_id, a, a.qty - held, &mut remaining);
            }
        }
        let rest: Vec<RouteLine> = ev
            .lines
            .iter()
            .filter_map(|l| {
                let qty = remaining.get(&l.line_id).copied().unwrap_or(0);
                (qty > 0).then(|| RouteLine { line_id: l.line_id.clone(), sku: l.sku.clone(), qty })
            })
            .collect();
        let unfilled = self.route_and_reserve(&ev.order_id, &ev.zone, &rest, &mut out);
        self.backorder(&ev.order_id, unfilled, tx.now, &mut out);
        let record = OrderRecord {
            order_id: ev.order_id.clone(),
            zone: ev.zone.clone(),
            lines: ev.lines.iter().map(|l| (l.line_id.clone(), l.sku.clone(), l.qty)).collect(),
            picked: Vec::new(),
        };
        self.orders.insert(ev.order_id.as_str().to_owned(), record);
        self.flush(tx, out);
        Ok(())
    }

    /// Turns a hold into a reservation for the line it belongs to (a
    /// synchronous hold names its line; a cart hold matches a line of its SKU).
    /// Returns the line, location and units a synchronous hold covered.
    fn consume_hold(
        &mut self,
        ev: &OrderCreated,
        hold_id: &str,
        remaining: &mut BTreeMap<LineId, Qty>,
        out: &mut Outcome,
    ) -> Option<(LineId, LocationId, Qty)> {
        let href = self.holds.get(hold_id).cloned()?;
        let hid = HoldId::parse(hold_id).ok()?;
        let view = self.ledgers.get(href.sku.as_str()).and_then(|l| l.hold(&hid))?;
        let qty = view.qty as Qty;
        let line = ev.lines.iter().find(|l| {
            l.sku == href.sku
                && remaining.get(&l.line_id).is_some_and(|r| *r >= qty)
                && href.line.as_ref().is_none_or(|hl| hl == &l.line_id)
        })?;
        let cmd = LedgerCommand::ConsumeHold { hold_id: hid, order: ev.order_id.clone(), line: line.line_id.clone() };
        self.exec(&href.sku, &cmd, out).ok()?;
        if let Some(r) = remaining.get_mut(&line.line_id) {
            *r -= qty;
        }
        href.line.is_some().then(|| (line.line_id.clone(), view.location, qty))
    }

    /// A synchronous reservation whose hold is gone (or smaller) when its
    /// order arrives. Holds of synchronous reservations no longer expire
    /// (see [`Self::ask_unclaimed`]), so this is left for holds made before
    /// that, and for held units a cycle count found missing. The order was
    /// acknowledged with the allocation, so inventory reserves the same units
    /// at the same location again, with no event (the order holds them
    /// already). When those units are gone, the line is routed like any
    /// other (the order then keeps an allocation inventory does not hold;
    /// counted as `orderly_lapsed_reservations_total{outcome="routed_anew"}`).
    fn restore_lapsed(
        &mut self,
        tx: &Tx,
        order: &OrderId,
        a: &AllocationData,
        qty: Qty,
        remaining: &mut BTreeMap<LineId, Qty>,
    ) {
        let hint = self.partition_hint(order);
        let reserve = LedgerCommand::Reserve {
            order: order.clone(),
            line: a.line_id.clone(),
            qty,
            location: a.location.clone(),
            partition_hint: hint,
        };
        // The order has this allocation: the reservation is not news to it.
        let again = self.exec(&a.sku, &reserve, &mut Outcome::default()).is_ok();
        let outcome = if again { "reserved_again" } else { "routed_anew" };
        tx.ctx().metrics.inc("orderly_lapsed_reservations_total", &[("outcome", outcome)], 1);
        if again && let Some(r) = remaining.get_mut(&a.line_id) {
            *r = r.saturating_sub(qty);
        }
    }

    /// Asks the orders service about each synchronous reservation whose
    /// order has not reached inventory within the hold lifetime, and again
    /// every lifetime after that (`hold.unclaimed`). The units stay held: the
    /// order may have been acknowledged and its `order.created` be delayed
    /// (a broker outage, a consumer down); only `order.voided` frees them.
    async fn ask_unclaimed(&mut self, tx: &mut Tx) -> Result<(), crate::ports::StoreError> {
        let due: Vec<(Timestamp, String)> = self.asks.iter().take_while(|(t, _)| *t <= tx.now).cloned().collect();
        if due.is_empty() {
            return Ok(());
        }
        let skus = due.iter().filter_map(|(_, id)| self.holds.get(id).map(|h| h.sku.clone())).collect();
        self.load_ledgers(tx.store(), skus).await?;
        let mut asked = 0u64;
        for entry in due {
            self.asks.remove(&entry);
            let Some(HoldRef { sku, order: Some(order), .. }) = self.holds.get(&entry.1).cloned() else { continue };
            let view = HoldId::parse(entry.1.as_str())
                .ok()
                .and_then(|id| self.ledgers.get(sku.as_str()).and_then(|l| l.hold(&id)));
            // Consumed or released meanwhile: nothing to ask.
            let Some(view) = view else { continue };
            let (location, qty) = (view.location, view.qty);
            let data = events::HoldUnclaimed { order_id: order.clone(), hold_id: entry.1.clone(), sku, location, qty };
            tx.emit(EventType::HoldUnclaimed, order.as_str(), events::data(&data));
            self.asks.insert((tx.now.plus_ms(self.hold_ttl_ms.max(1)), entry.1));
            asked += 1;
        }
        if asked > 0 {
            tx.ctx().metrics.inc("orderly_holds_unclaimed_total", &[], asked);
        }
        Ok(())
    }

    /// The orders service voided the order a synchronous reservation was
    /// made for (it was never created, and now never will be): the hold goes.
    async fn on_order_voided(&mut self, tx: &mut Tx, ev: events::OrderVoided) -> Result<(), EventError> {
        let Some(href) = self.holds.get(&ev.hold_id).cloned() else { return Ok(()) };
        if href.order.as_ref() != Some(&ev.order_id) {
            return Err(EventError::Poison(format!(
                "hold {} is not a reservation of order {}",
                ev.hold_id, ev.order_id
            )));
        }
        let hold_id = HoldId::parse(ev.hold_id.as_str()).map_err(|e| EventError::Poison(e.to_string()))?;
        self.load_ledgers(tx.store(), vec![href.sku.clone()]).await?;
        let mut out = Outcome::default();
        if let Err(e) = self.exec(&href.sku, &LedgerCommand::ReleaseHold { hold_id }, &mut out) {
            tracing::warn!(order_id = %ev.order_id, error = %e, "voided reservation not released");
        }
        tx.ctx().metrics.inc("orderly_voided_reservations_total", &[], 1);
        self.flush(tx, out);
        Ok(())
    }

    fn backorder(&mut self, order: &OrderId, unfilled: Vec<(LineId, Sku, Qty)>, now: Timestamp, out: &mut Outcome) {
        for (line, sku, qty) in unfilled {
            let cmd = LedgerCommand::Backorder { order: order.clone(), line, qty, since: now };
            if let Err(e) = self.exec(&sku, &cmd, out) {
                tracing::error!(order_id = %order, error = %e, "could not backorder a line");
            }
        }
    }

    async fn on_order_canceled(&mut self, tx: &mut Tx, ev: OrderCanceled) -> Result<(), EventError> {
        if !self.orders.load(tx.store(), ev.order_id.as_str()).await? {
            return Ok(());
        }
        let record = self.orders.get(ev.order_id.as_str()).cloned().expect("loaded above");
        let lines: Vec<(LineId, Sku)> = record
            .lines
            .iter()
            .filter(|(l, _, _)| ev.lines.contains(l))
            .map(|(l, s, _)| (l.clone(), s.clone()))
            .collect();
        // Every SKU of the order: released lines and restocked picks alike.
        self.load_ledgers(tx.store(), record.lines.iter().map(|(_, s, _)| s.clone()).collect()).await?;
        let mut out = Outcome::default();
        for (line, sku) in lines {
            if let Err(e) = self.exec(&sku, &LedgerCommand::Release { line }, &mut out) {
                tracing::debug!(order_id = %ev.order_id, error = %e, "nothing to release");
            }
        }
        self.restock_unshipped(tx.now, &ev, &mut out);
        self.flush(tx, out);
        Ok(())
    }

    /// Puts the picked but unshipped units of a canceled order back on the
    /// shelf, as an adjustment with a recorded reason. Inventory counts what
    /// its own ledger committed, so a pick confirmed while the cancel was in
    /// flight (which the order never recorded) goes back too. The order's
    /// ledgers must be loaded.
    fn restock_unshipped(&mut self, now: Timestamp, ev: &OrderCanceled, out: &mut Outcome) {
        let Some(record) = self.orders.get(ev.order_id.as_str()) else { return };
        let mut back: Vec<(Sku, LocationId, Qty)> = Vec::new();
        for (line, location, picked) in &record.picked {
            let shipped: Qty =
                ev.shipped.iter().filter(|a| &a.line_id == line && &a.location == location).map(|a| a.qty).sum();
            let sku = record.lines.iter().find(|(l, _, _)| l == line).map(|(_, s, _)| s.clone());
            if let Some(sku) = sku
                && *picked > shipped
            {
                back.push((sku, location.clone(), picked - shipped));
            }
        }
        if back.is_empty() {
            return;
        }
        if let Some(record) = self.orders.get_mut(ev.order_id.as_str()) {
            record.picked.clear(); // Restocked once: a repeat gives nothing back.
        }
        for (sku, location, qty) in back {
            let cmd = LedgerCommand::Adjust {
                location,
                delta: i64::from(qty),
                reason: "canceled_after_pick".into(),
                user: format!("order:{}", ev.order_id),
                at: now,
            };
            if let Err(e) = self.exec(&sku, &cmd, out) {
                tracing::warn!(order_id = %ev.order_id, error = %e, "canceled units not restocked");
            }
        }
    }

    /// Remembers what the ledger committed for an order's lines.
    fn record_picked(&mut self, order: &OrderId, evs: &[LedgerEvent]) {
        let committed: Vec<(&LineId, &LocationId, u64)> = evs
            .iter()
            .filter_map(|e| match e {
                LedgerEvent::Committed { line, location, qty, .. } => Some((line, location, *qty)),
                _ => None,
            })
            .collect();
        if committed.is_empty() {
            return;
        }
        let Some(record) = self.orders.get_mut(order.as_str()) else { return };
        for (line, location, qty) in committed {
            let qty = Qty::try_from(qty).unwrap_or(Qty::MAX);
            match record.picked.iter_mut().find(|(l, loc, _)| l == line && loc == location) {
                Some(entry) => entry.2 = entry.2.saturating_add(qty),
                None => record.picked.push((line.clone(), location.clone(), qty)),
            }
        }
    }

    async fn on_pick(&mut self, tx: &mut Tx, pick: PickData, short: bool) -> Result<(), EventError> {
        if !self.orders.load(tx.store(), pick.order_id.as_str()).await? {
            // Its order.created (and the line's reservation) is still on the way.
            return Err(EventError::Early(format!("pick of order {} before the order", pick.order_id)));
        }
        self.load_ledgers(tx.store(), vec![pick.sku.clone()]).await?;
        let mut out = Outcome::default();
        let cmd = if short {
            LedgerCommand::Short {
                line: pick.line_id.clone(),
                location: pick.location.clone(),
                qty: pick.qty,
                qty_found: pick.qty_picked,
                instruction_key: pick.instruction_key.clone(),
                at: tx.now,
            }
        } else {
            LedgerCommand::Commit {
                line: pick.line_id.clone(),
                location: pick.location.clone(),
                qty: pick.qty_picked,
                instruction_key: pick.instruction_key.clone(),
            }
        };
        match self.exec(&pick.sku, &cmd, &mut out) {
            Ok(evs) => {
                self.record_picked(&pick.order_id, &evs);
                let missing: u64 = evs
                    .iter()
                    .map(|e| if let LedgerEvent::Shorted { qty_missing, .. } = e { *qty_missing } else { 0 })
                    .sum();
                if missing > 0 {
                    let zone = self.orders.get(pick.order_id.as_str()).map(|o| o.zone.clone());
                    if let Some(zone) = zone {
                        let line =
                            RouteLine { line_id: pick.line_id.clone(), sku: pick.sku.clone(), qty: missing as Qty };
                        let unfilled = self.route_and_reserve(&pick.order_id, &zone, &[line], &mut out);
                        self.backorder(&pick.order_id, unfilled, tx.now, &mut out);
                    }
                }
            }
            Err(e) => {
                tx.ctx().metrics.inc("orderly_pick_ledger_rejections_total", &[], 1);
                tracing::warn!(order_id = %pick.order_id, pick_id = %pick.pick_id, error = %e, "pick not applied to the ledger");
            }
        }
        self.flush(tx, out);
        Ok(())
    }

    async fn on_returned(&mut self, tx: &mut Tx, ev: events::OrderReturned) -> Result<(), EventError> {
        self.load_ledgers(tx.store(), ev.allocations.iter().map(|a| a.sku.clone()).collect()).await?;
        let mut out = Outcome::default();
        for a in ev.allocations {
            let cmd = LedgerCommand::Adjust {
                location: a.location,
                delta: i64::from(a.qty),
                reason: "return".into(),
                user: format!("order:{}", ev.order_id),
                at: tx.now,
            };
            if let Err(e) = self.exec(&a.sku, &cmd, &mut out) {
                tracing::warn!(order_id = %ev.order_id, error = %e, "return not restocked");
            }
        }
        self.flush(tx, out);
        Ok(())
    }
}

/// Adds units reserved for a line to an event's allocations: one entry per
/// line and location, however many ledger events made it (a cart hold
/// consumed and the rest of the line reserved at the same location).
fn add_allocation(allocations: &mut Vec<AllocationData>, a: AllocationData) {
    match allocations.iter_mut().find(|x| x.line_id == a.line_id && x.location == a.location) {
        Some(x) => x.qty = x.qty.saturating_add(a.qty),
        None => allocations.push(a),
    }
}

impl Service for Inventory {
    type Command = Command;

    async fn on_command(&mut self, tx: &mut Tx, cmd: Command) {
        if let Err(e) = self.refresh(tx.store()).await {
            tracing::warn!(error = %e, "could not rebuild the hold indexes; retrying at the next input");
        }
        match cmd {
            Command::PutLocation { location, reply } => {
                // Read first: a replica replaces the stored row, not its stale copy.
                if let Err(e) = self.locations.load(tx.store(), location.id.as_str()).await {
                    tx.reply(reply, Err(e.into()));
                    return;
                }
                self.locations.insert(location.id.as_str().to_owned(), location.clone());
                tx.reply(reply, Ok(location));
            }
            Command::Locations { reply } => {
                let all = self.all_locations();
                tx.reply(reply, Ok(all));
            }
            Command::Receive { location, sku, qty, key, reply } => {
                match self.keyed(tx, key.as_ref()).await {
                    Ok(None) => {}
                    Ok(Some(answer)) => return tx.reply(reply, Ok(answer)),
                    Err(e) => return tx.reply(reply, Err(e)),
                }
                let r = self.stock_command(tx, &sku, &location.clone(), LedgerCommand::Receive { location, qty }).await;
                self.remember_key(key, &r);
                tx.reply(reply, r);
            }
            Command::Adjust { sku, location, delta, counted, reason, user, key, reply } => {
                match self.keyed(tx, key.as_ref()).await {
                    Ok(None) => {}
                    Ok(Some(answer)) => return tx.reply(reply, Ok(answer)),
                    Err(e) => return tx.reply(reply, Err(e)),
                }
                if counted.is_none()
                    && delta < 0
                    && let Err(e) = self.check_free_stock(tx, &sku, &location, delta.unsigned_abs()).await
                {
                    tx.reply(reply, Err(e));
                    return;
                }
                let cmd = match counted {
                    Some(counted) => {
                        LedgerCommand::CycleCount { location: location.clone(), counted, user, at: tx.now }
                    }
                    None => LedgerCommand::Adjust { location: location.clone(), delta, reason, user, at: tx.now },
                };
                let r = self.stock_command(tx, &sku, &location, cmd).await;
                if r.is_ok() {
                    tx.ctx().metrics.inc("orderly_manual_adjustments_total", &[], 1);
                    tx.ctx().metrics.count_at("manual_adjustments", tx.now.0, 1);
                }
                self.remember_key(key, &r);
                tx.reply(reply, r);
            }
            Command::CreateHold { sku, qty, location, key, reply } => {
                match self.keyed(tx, key.as_ref()).await {
                    Ok(None) => {}
                    Ok(Some(answer)) => return tx.reply(reply, Ok(answer)),
                    Err(e) => return tx.reply(reply, Err(e)),
                }
                let r = self.create_hold(tx, sku, qty, location).await;
                self.remember_key(key, &r);
                tx.reply(reply, r);
            }
            Command::ReserveSync { order_id, zone, lines, reply } => {
                let r = self.reserve_sync(tx, order_id, zone, lines).await;
                tx.reply(reply, r);
            }
            Command::ReconcileView { reply } => {
                let r = self.reconcile_view(tx).await;
                tx.reply(reply, r);
            }
            Command::Repair { repairs, user, reply } => {
                let r = self.repair(tx, repairs, &user).await;
                tx.reply(reply, r);
            }
            Command::Get { sku, reply } => {
                let r = match self.ledgers.load(tx.store(), sku.as_str()).await {
                    Ok(true) => Ok(self.ledgers.get(sku.as_str()).map(SkuLedger::snapshot).expect("loaded")),
                    Ok(false) => Err(ApiError::NotFound(format!("sku {sku}"))),
                    Err(e) => Err(e.into()),
                };
                tx.reply(reply, r);
            }
        }
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        self.refresh(tx.store()).await?;
        use tracing::Instrument;
        let span = super::common::event_span(event);
        async move {
            match event.event_type {
                EventType::OrderCreated => self.on_order_created(tx, events::parse(event)?).await,
                EventType::OrderCanceled => self.on_order_canceled(tx, events::parse(event)?).await,
                EventType::OrderReturned => self.on_returned(tx, events::parse(event)?).await,
                EventType::OrderVoided => self.on_order_voided(tx, events::parse(event)?).await,
                EventType::PickCompleted => self.on_pick(tx, events::parse(event)?, false).await,
                EventType::PickShort => self.on_pick(tx, events::parse(event)?, true).await,
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn on_tick(&mut self, tx: &mut Tx) {
        if self.refresh(tx.store()).await.is_err() {
            return;
        }
        if self.ask_unclaimed(tx).await.is_err() {
            return;
        }
        let due: Vec<Sku> = self.expiries.iter().take_while(|(t, _)| *t <= tx.now).map(|(_, s)| s.clone()).collect();
        if due.is_empty() || self.load_ledgers(tx.store(), due.clone()).await.is_err() {
            return;
        }
        self.expiries.retain(|(t, _)| *t > tx.now);
        let mut out = Outcome::default();
        let mut expired = 0u64;
        for sku in due {
            if let Ok(evs) = self.exec(&sku, &LedgerCommand::ExpireHolds { now: tx.now }, &mut out) {
                expired += evs.iter().filter(|e| matches!(e, LedgerEvent::HoldExpired { .. })).count() as u64;
            }
            if let Some(next) = self.ledgers.get(sku.as_str()).and_then(SkuLedger::next_expiry) {
                self.expiries.insert((next, sku));
            }
        }
        tx.ctx().metrics.inc("orderly_holds_expired_total", &[], expired);
        tx.ctx().metrics.set("orderly_holds_active", &[], self.holds.len() as f64);
        self.flush(tx, out);
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        if self.indexes.is_stale() {
            // Rebuild at the next turn: the schedule may be missing due holds.
            return Some(Timestamp(i64::MIN));
        }
        let asks = self.asks.first().map(|(t, _)| *t);
        self.expiries.first().map(|(t, _)| *t).into_iter().chain(asks).min()
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![
            &mut self.ledgers,
            &mut self.locations,
            &mut self.orders,
            &mut self.holds,
            &mut self.request_keys,
            &mut self.indexes,
        ]
    }

    /// Ledgers, holds and locations are written by every replica (the API
    /// goes to any); orders by the owner of their partition, which moves.
    fn drop_shared(&mut self) {
        self.ledgers.clear();
        self.orders.clear();
        self.holds.clear();
        self.request_keys.clear();
        self.locations.clear();
        self.indexes.mark_stale();
    }
}

// Reconciliation (see `services::reconcile`).
impl Inventory {
    /// Every SKU's reservations, backorders and books drift, and what the
    /// ledger committed as picked for the reserved lines.
    async fn reconcile_view(&mut self, tx: &mut Tx) -> Result<reconcile::InventoryView, ApiError> {
        const PAGE: u32 = 1000;
        let mut skus: BTreeSet<String> = self.ledgers.iter().map(|(k, _)| k.clone()).collect();
        let mut after: Option<String> = None;
        loop {
            let rows = tx.store().scan(crate::table::LEDGERS, None, after.as_deref(), PAGE).await?;
            let done = rows.len() < PAGE as usize;
            after = rows.last().map(|r| r.key.clone());
            skus.extend(rows.into_iter().map(|r| r.key));
            if done {
                break;
            }
        }
        let mut view = reconcile::InventoryView::default();
        let mut orders: BTreeSet<OrderId> = BTreeSet::new();
        for key in skus {
            let Ok(sku) = Sku::parse(key.as_str()) else { continue };
            self.load_ledgers(tx.store(), vec![sku.clone()]).await?;
            let Some(ledger) = self.ledgers.get(sku.as_str()) else { continue };
            view.skus += 1;
            for r in ledger.reservations() {
                orders.insert(r.order.clone());
                for a in r.allocations {
                    view.reservations.push(reconcile::ReservedUnits {
                        order_id: r.order.clone(),
                        line_id: r.line.clone(),
                        sku: sku.clone(),
                        location: a.location,
                        qty: a.qty,
                    });
                }
            }
            for b in ledger.backorders() {
                view.backorders.push(reconcile::WaitingUnits {
                    order_id: b.order.clone(),
                    line_id: b.line.clone(),
                    sku: sku.clone(),
                    qty: b.qty,
                });
            }
            for (location, delta) in ledger.drift() {
                view.drift.push(reconcile::StockDrift { sku: sku.clone(), location, delta });
            }
        }
        for order in orders {
            if self.orders.load(tx.store(), order.as_str()).await?
                && let Some(record) = self.orders.get(order.as_str())
            {
                view.picked.extend(record.picked.iter().cloned());
            }
        }
        Ok(view)
    }

    /// Applies compensating changes with reason `reconciliation`. Each is
    /// checked against the ledger as it is now: what is already right is
    /// left alone, so running the same repairs twice changes things once.
    async fn repair(
        &mut self,
        tx: &mut Tx,
        repairs: Vec<reconcile::Repair>,
        user: &str,
    ) -> Result<Vec<reconcile::RepairOutcome>, ApiError> {
        use reconcile::{Repair, RepairOutcome};
        let skus: Vec<Sku> = repairs
            .iter()
            .map(|r| match r {
                Repair::Release { sku, .. } | Repair::CommitPick { sku, .. } | Repair::Restate { sku, .. } => {
                    sku.clone()
                }
            })
            .collect();
        self.load_ledgers(tx.store(), skus).await?;
        for r in &repairs {
            if let Repair::CommitPick { order_id, .. } = r {
                self.orders.load(tx.store(), order_id.as_str()).await?;
            }
        }
        let mut out = Outcome::default();
        let mut outcomes = vec![RepairOutcome::Unchanged; repairs.len()];
        // Books first: a drifted partition refuses every other change.
        let mut turn: Vec<usize> = (0..repairs.len()).collect();
        turn.sort_by_key(|i| !matches!(repairs[*i], Repair::Restate { .. }));
        for i in turn {
            let (sku, cmd, pick_of) = match &repairs[i] {
                Repair::Release { line_id, sku, .. } => {
                    (sku.clone(), LedgerCommand::Release { line: line_id.clone() }, None)
                }
                Repair::CommitPick { order_id, line_id, sku, location, qty, instruction_key, .. } => (
                    sku.clone(),
                    LedgerCommand::Commit {
                        line: line_id.clone(),
                        location: location.clone(),
                        qty: *qty,
                        instruction_key: instruction_key.clone(),
                    },
                    Some(order_id.clone()),
                ),
                Repair::Restate { sku, location } => (
                    sku.clone(),
                    LedgerCommand::Restate {
                        location: location.clone(),
                        reason: reconcile::REASON.into(),
                        user: user.to_owned(),
                        at: tx.now,
                    },
                    None,
                ),
            };
            let outcome = match self.exec(&sku, &cmd, &mut out) {
                Ok(evs) if evs.is_empty() => RepairOutcome::Unchanged,
                Ok(evs) => {
                    if let Some(order_id) = pick_of {
                        self.record_picked(&order_id, &evs);
                    }
                    RepairOutcome::Applied
                }
                Err(e) => RepairOutcome::Failed { error: e.to_string() },
            };
            outcomes[i] = outcome;
        }
        let applied = outcomes.iter().filter(|o| **o == RepairOutcome::Applied).count() as u64;
        tx.ctx().metrics.inc("orderly_reconciliation_repairs_total", &[], applied);
        for (_, moved) in &mut out.moves {
            moved.reason = reconcile::REASON.to_owned();
            moved.user = Some(user.to_owned());
        }
        self.flush(tx, out);
        Ok(outcomes)
    }
}
