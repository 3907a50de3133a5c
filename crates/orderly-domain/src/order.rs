//! The order aggregate: PRODUCT.md §3's order state machine as decide/apply.
//!
//! [`Order::decide`] holds every rule (which command is legal in which state,
//! stale detection per event source, the split policy, charging shipping once)
//! and answers with events or a typed [`OrderError`]. [`Order::apply`] folds one
//! event into the order, cannot fail and has no rules; an event the order has
//! already applied (its `sequence` is not above the order's `version`) changes
//! nothing, so replays and duplicate deliveries are harmless.

use crate::event::EventType;
use crate::ids::{CustomerId, HoldId, LineId, LocationId, OrderId, ShipmentId, Sku, Zone};
use crate::money::{MONEY_MINOR_MAX, Money};
use crate::time::Timestamp;
use crate::{Priority, Qty};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Most lines one order may have.
pub const LINES_PER_ORDER_MAX: usize = 100;
/// Most units one line may order.
pub const LINE_QTY_MAX: Qty = 10_000;
/// Most distinct locations one line may be allocated at.
pub const LOCATIONS_PER_LINE_MAX: usize = 16;
/// Most shipments one order may have.
pub const SHIPMENTS_PER_ORDER_MAX: usize = 64;
/// Most cart holds one order may consume.
pub const HOLDS_PER_ORDER_MAX: usize = LINES_PER_ORDER_MAX;
/// Most distinct event sources one order remembers for stale detection.
pub const SOURCES_PER_ORDER_MAX: usize = 16;
/// Longest event source name, in bytes.
pub const SOURCE_LEN_MAX: usize = 128;
/// Longest cancel or return reason, in bytes.
pub const REASON_LEN_MAX: usize = 500;
/// Longest email address, in bytes (RFC 5321).
pub const EMAIL_LEN_MAX: usize = 254;
/// Most entries (line × location pairs) one command may carry.
pub const ENTRIES_PER_COMMAND_MAX: usize = LINES_PER_ORDER_MAX * LOCATIONS_PER_LINE_MAX;
/// The default `split.min_order_value_for_partial`: 50.00.
pub const MIN_ORDER_VALUE_FOR_PARTIAL_DEFAULT: Money = Money::from_minor(5_000);

/// One customer order: its lines, where each line is allocated, how far each
/// unit got (picked, packed, shipped), and the state the order is in.
///
/// Fields are private: the only way to change an order is to [`apply`](Order::apply)
/// an event that [`decide`](Order::decide) produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    id: OrderId,
    customer_id: CustomerId,
    email: String,
    ship_to: Zone,
    priority: Priority,
    delivery_window: Option<DeliveryWindow>,
    hold_ids: Vec<HoldId>,
    lines: Vec<OrderLine>,
    state: OrderState,
    version: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
    total: Money,
    shipping_charged: bool,
    expected_ship_date: Option<Timestamp>,
    shipments: Vec<OrderShipment>,
    seen: BTreeMap<String, u64>,
    cancel_reason: Option<String>,
    return_reason: Option<String>,
}

impl Order {
    /// Decides the events that create a new order: `created`, `confirmed`
    /// (the order now waits for allocation) and, when the allocations made
    /// synchronously before acknowledgment may proceed under the split policy,
    /// `allocated` with the units handed to the warehouse.
    pub fn decide_create(new: &NewOrder, policy: &OrderPolicy, now: Timestamp) -> Result<Vec<OrderEvent>, OrderError> {
        let total = validate_new_order(new)?;
        let lines = new.lines.iter().zip(1..).map(|(l, n)| created_line(&new.order_id, l, n)).collect();
        let created = OrderCreated {
            customer_id: new.customer_id.clone(),
            email: new.email.clone(),
            ship_to: new.ship_to.clone(),
            priority: new.priority,
            delivery_window: new.delivery_window,
            hold_ids: new.hold_ids.clone(),
            lines,
            total,
        };
        let first = OrderEvent {
            order_id: new.order_id.clone(),
            sequence: 1,
            at: now,
            origin: None,
            change: OrderChange::Created(Box::new(created.clone())),
        };
        let mut order = Order::from_created(&first, &created);
        let mut events = vec![first];
        let confirmed = order.event(now, None, OrderChange::Confirmed);
        order.apply(&confirmed);
        events.push(confirmed);
        // Synchronous allocations were recorded held; the split policy decides whether they proceed.
        if let Some(change) = order.release_held(policy) {
            let allocated = order.event(now, None, change);
            order.apply(&allocated);
            events.push(allocated);
        }
        Ok(events)
    }

    /// Rebuilds an order from its history. `None` if the history does not
    /// start with a `created` event.
    pub fn from_events(events: &[OrderEvent]) -> Option<Order> {
        let (first, rest) = events.split_first()?;
        let OrderChange::Created(created) = &first.change else {
            return None;
        };
        let mut order = Order::from_created(first, created);
        for event in rest {
            order.apply(event);
        }
        Some(order)
    }

    /// Decides what a command does to this order: the events to record, or why
    /// not. Never panics; `now` is the caller's clock.
    ///
    /// Checks run in this order: the command's origin (a sequence not newer
    /// than the last one seen from its source is [`OrderError::Stale`]), the
    /// state ([`OrderError::IllegalTransition`]), then the command's data
    /// ([`OrderError::Rejected`]).
    pub fn decide(
        &self,
        cmd: &OrderCommand,
        policy: &OrderPolicy,
        now: Timestamp,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        if let Some(origin) = cmd.origin() {
            self.check_origin(origin)?;
        }
        if !cmd.is_legal_in(self.state) {
            return Err(OrderError::IllegalTransition { state: self.state, command: cmd.name() });
        }
        let change = match cmd {
            OrderCommand::Create(_) => {
                return Err(OrderError::IllegalTransition { state: self.state, command: "create" });
            }
            OrderCommand::RecordAllocation { allocations, .. } => self.decide_allocation(allocations, policy, now)?,
            OrderCommand::RecordBackorder { lines, expected_ship_date, .. } => {
                self.decide_backorder(lines, *expected_ship_date, now)?
            }
            OrderCommand::RecordDeallocation { allocations, .. } => self.decide_deallocation(allocations, now)?,
            OrderCommand::StartPicking { .. } => self.decide_start_picking()?,
            OrderCommand::RecordPicked { line_id, location, qty, .. } => {
                self.decide_pick(line_id, location, *qty, Step::Pick, now)?
            }
            OrderCommand::RecordShort { line_id, location, qty, .. } => {
                self.decide_pick(line_id, location, *qty, Step::Short, now)?
            }
            OrderCommand::RecordPacked { location, lines, .. } => self.decide_packed(location, lines, now)?,
            OrderCommand::RecordShipment { shipment_id, location, lines, .. } => {
                self.decide_shipment(shipment_id, location, lines, now)?
            }
            OrderCommand::RecordDelivery { shipment_id, .. } => self.decide_delivery(shipment_id, now)?,
            OrderCommand::Cancel { reason } => self.decide_cancel(reason)?,
            OrderCommand::RequestReturn { reason } => {
                check_reason(reason)?;
                OrderChange::ReturnRequested { reason: reason.clone() }
            }
            OrderCommand::RecordReturn { location } => self.decide_return(location),
        };
        Ok(vec![self.event(now, cmd.origin().cloned(), change)])
    }

    /// Folds one event into the order. Cannot fail and has no rules: an event
    /// whose sequence is not above `version` (already applied), or that names
    /// another order, changes nothing.
    pub fn apply(&mut self, event: &OrderEvent) {
        if event.sequence <= self.version || event.order_id != self.id {
            return;
        }
        self.apply_change(event);
        for line in &mut self.lines {
            // Units that got allocated or canceled are no longer waiting.
            line.backordered = line.backordered.min(line.unallocated_qty());
        }
        self.version = event.sequence;
        self.updated_at = event.at;
        if let Some(origin) = &event.origin {
            let last = self.seen.entry(origin.source.clone()).or_default();
            *last = (*last).max(origin.sequence);
        }
        debug_assert_eq!(self.check_invariants(), Ok(()), "event {} broke an order invariant", event.sequence);
    }

    /// Decides and applies a command in one step; returns the applied events.
    pub fn execute(
        &mut self,
        cmd: &OrderCommand,
        policy: &OrderPolicy,
        now: Timestamp,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let events = self.decide(cmd, policy, now)?;
        for event in &events {
            self.apply(event);
        }
        Ok(events)
    }

    /// Checks the order's structural invariants: per-location counters are
    /// ordered (shipped ≤ packed ≤ picked ≤ allocated), no line has more units
    /// accounted for than ordered, shipping is charged iff something shipped,
    /// and each state agrees with the counters. The simulator calls this after
    /// every step; `apply` asserts it in debug builds.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |what: String| Err(InvariantViolation(format!("order {}: {what}", self.id)));
        for line in &self.lines {
            for a in &line.allocations {
                if !(a.shipped <= a.packed && a.packed <= a.picked && a.picked <= a.qty) {
                    return fail(format!("line {} at {} has counters out of order", line.line_id, a.location));
                }
            }
            let accounted = u64::from(line.allocated_qty()) + u64::from(line.canceled) + u64::from(line.backordered);
            if accounted > u64::from(line.qty) || line.returned > line.shipped_qty() {
                return fail(format!("line {} accounts for more units than it has", line.line_id));
            }
        }
        if self.shipping_charged == self.shipments.is_empty() {
            return fail("shipping must be charged exactly when something has shipped".to_owned());
        }
        if self.seen.len() > SOURCES_PER_ORDER_MAX || self.shipments.len() > SHIPMENTS_PER_ORDER_MAX {
            return fail("a bounded collection outgrew its limit".to_owned());
        }
        if !self.state_matches_counters() {
            return fail(format!("state {} does not match the line counters", self.state));
        }
        Ok(())
    }
}

/// Read access.
impl Order {
    /// The order's id.
    pub fn id(&self) -> &OrderId {
        &self.id
    }

    /// Who ordered.
    pub fn customer_id(&self) -> &CustomerId {
        &self.customer_id
    }

    /// Where notifications go.
    pub fn email(&self) -> &str {
        &self.email
    }

    /// The destination zone.
    pub fn ship_to(&self) -> &Zone {
        &self.ship_to
    }

    /// How urgently the order must ship.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The delivery window the customer chose, if any.
    pub fn delivery_window(&self) -> Option<DeliveryWindow> {
        self.delivery_window
    }

    /// Cart holds the order consumes.
    pub fn hold_ids(&self) -> &[HoldId] {
        &self.hold_ids
    }

    /// The lines, in order.
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }

    /// One line by id.
    pub fn line(&self, line_id: &LineId) -> Option<&OrderLine> {
        self.lines.iter().find(|l| &l.line_id == line_id)
    }

    /// The current state.
    pub fn state(&self) -> OrderState {
        self.state
    }

    /// How many events have been applied; the last event's sequence.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the order was created.
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// When the last event was decided.
    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }

    /// The order value: the sum of quantity × unit price over all lines.
    pub fn total(&self) -> Money {
        self.total
    }

    /// Whether shipping has been charged. It is charged once, with the first
    /// shipment; later shipments and cancellations never charge it again.
    pub fn shipping_charged(&self) -> bool {
        self.shipping_charged
    }

    /// The last delayed ship date the customer was told, if any.
    pub fn expected_ship_date(&self) -> Option<Timestamp> {
        self.expected_ship_date
    }

    /// Shipments that left, oldest first.
    pub fn shipments(&self) -> &[OrderShipment] {
        &self.shipments
    }

    /// The last applied sequence per event source.
    pub fn seen(&self) -> &BTreeMap<String, u64> {
        &self.seen
    }

    /// The last applied sequence from `source` (0 if none).
    pub fn last_seen(&self, source: &str) -> u64 {
        self.seen.get(source).copied().unwrap_or(0)
    }

    /// Why the order was canceled, if it was.
    pub fn cancel_reason(&self) -> Option<&str> {
        self.cancel_reason.as_deref()
    }

    /// Why the customer asked for a return, if they did.
    pub fn return_reason(&self) -> Option<&str> {
        self.return_reason.as_deref()
    }

    /// Units still to deliver: ordered, not canceled, not yet shipped.
    pub fn outstanding_qty(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.outstanding_qty())).sum()
    }

    /// Units allocated somewhere (including those already picked or shipped).
    pub fn allocated_qty(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.allocated_qty())).sum()
    }

    /// Units neither allocated nor canceled.
    pub fn unallocated_qty(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.unallocated_qty())).sum()
    }

    /// Units known to wait for stock.
    pub fn backordered_qty(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.backordered)).sum()
    }

    /// Units allocated but not yet picked.
    pub fn unpicked_qty(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.allocated_qty().saturating_sub(l.picked_qty()))).sum()
    }

    /// Units shipped.
    pub fn shipped_qty(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.shipped_qty())).sum()
    }

    /// Whether every unit not canceled is allocated.
    pub fn is_fully_allocated(&self) -> bool {
        self.unallocated_qty() == 0
    }

    /// Whether the next shipment must charge shipping.
    pub fn shipping_charge_due(&self) -> bool {
        !self.shipping_charged
    }
}

// Deciding, one command at a time.
impl Order {
    fn check_origin(&self, origin: &Origin) -> Result<(), OrderError> {
        if origin.source.is_empty() || origin.source.len() > SOURCE_LEN_MAX {
            return Err(Rejection::InvalidSource { max: SOURCE_LEN_MAX }.into());
        }
        let last_seen = self.last_seen(&origin.source);
        if origin.sequence <= last_seen {
            return Err(OrderError::Stale { source: origin.source.clone(), sequence: origin.sequence, last_seen });
        }
        if !self.seen.contains_key(&origin.source) && self.seen.len() >= SOURCES_PER_ORDER_MAX {
            return Err(Rejection::TooManySources { max: SOURCES_PER_ORDER_MAX }.into());
        }
        Ok(())
    }

    /// New allocations. While the order consolidates (nothing handed to the
    /// warehouse yet) they are held unless the order is now fully allocated or
    /// large enough to ship partially; once released, new allocations go
    /// straight to picking.
    fn decide_allocation(
        &self,
        entries: &[AllocationEntry],
        policy: &OrderPolicy,
        now: Timestamp,
    ) -> Result<OrderChange, OrderError> {
        self.validate_allocations(entries)?;
        let record =
            OrderChange::Allocated { allocations: entries.to_vec(), ready_to_pick: Vec::new(), state: self.state };
        let after = self.projected(&record, now);
        let (ready_to_pick, state) = if !self.state.is_consolidating() {
            (self.pick_entries(entries), after.progress_state(self.state.is_picking_started()))
        } else if after.is_fully_allocated() || policy.ships_partially(self.total) {
            (after.pickable_entries(), after.progress_state(false))
        } else {
            (Vec::new(), after.waiting_state())
        };
        Ok(OrderChange::Allocated { allocations: entries.to_vec(), ready_to_pick, state })
    }

    /// The change that releases allocations held for consolidation, if the
    /// split policy now lets them proceed.
    fn release_held(&self, policy: &OrderPolicy) -> Option<OrderChange> {
        let due = self.allocated_qty() > 0 && (self.is_fully_allocated() || policy.ships_partially(self.total));
        (self.state.is_consolidating() && due).then(|| OrderChange::Allocated {
            allocations: Vec::new(),
            ready_to_pick: self.pickable_entries(),
            state: self.progress_state(false),
        })
    }

    /// Units that wait for stock. A consolidating order (nothing handed to the
    /// warehouse) becomes backordered; one whose allocated part proceeds keeps
    /// going, and the event still tells the customer the delayed date.
    fn decide_backorder(
        &self,
        lines: &[LineQty],
        expected_ship_date: Timestamp,
        now: Timestamp,
    ) -> Result<OrderChange, OrderError> {
        let units = self.validate_lines(lines, |line, qty| {
            let unallocated = line.unallocated_qty();
            if qty > unallocated {
                return Err(Rejection::BackorderExceedsUnallocated { line_id: line.line_id.clone(), unallocated });
            }
            Ok(())
        })?;
        let record = OrderChange::Backordered { lines: units.clone(), expected_ship_date, state: self.state };
        let state = if self.state.is_consolidating() {
            OrderState::Backordered
        } else {
            self.projected(&record, now).progress_state(self.state.is_picking_started())
        };
        Ok(OrderChange::Backordered { lines: units, expected_ship_date, state })
    }

    /// Inventory took back reserved units (a count or adjustment found less
    /// stock than was reserved): they are no longer allocated there and wait
    /// for inventory's backorder. Picked units are never taken back.
    fn decide_deallocation(&self, entries: &[AllocationEntry], now: Timestamp) -> Result<OrderChange, OrderError> {
        check_entry_count(entries.len())?;
        for e in entries {
            let line = self.line(&e.line_id).ok_or_else(|| Rejection::UnknownLine(e.line_id.clone()))?;
            check_available(line, &e.location, e.qty, Step::Short)?;
        }
        let record = OrderChange::Deallocated { allocations: entries.to_vec(), state: self.state };
        let after = self.projected(&record, now);
        let state = if self.state.is_consolidating() {
            after.waiting_state()
        } else {
            after.progress_state(self.state.is_picking_started())
        };
        Ok(record.with_state(state))
    }

    fn decide_start_picking(&self) -> Result<OrderChange, OrderError> {
        if self.unpicked_qty() == 0 {
            return Err(Rejection::NothingToPick.into());
        }
        Ok(OrderChange::PickingStarted { state: self.progress_state(true) })
    }

    /// A pick confirmation or a short pick at one location. A short removes
    /// the missing units from the allocation; they become unallocated again
    /// and wait for the inventory service to reallocate or backorder them.
    fn decide_pick(
        &self,
        line_id: &LineId,
        location: &LocationId,
        qty: Qty,
        step: Step,
        now: Timestamp,
    ) -> Result<OrderChange, OrderError> {
        let line = self.line(line_id).ok_or_else(|| Rejection::UnknownLine(line_id.clone()))?;
        check_available(line, location, qty, step)?;
        let (line_id, sku, location) = (line_id.clone(), line.sku.clone(), location.clone());
        let (record, started) = match step {
            Step::Short => (OrderChange::Shorted { line_id, sku, location, qty, state: self.state }, false),
            _ => (OrderChange::Picked { line_id, sku, location, qty, state: self.state }, true),
        };
        let state = self.projected(&record, now).progress_state(started || self.state.is_picking_started());
        Ok(record.with_state(state))
    }

    fn decide_packed(
        &self,
        location: &LocationId,
        lines: &[LineQty],
        now: Timestamp,
    ) -> Result<OrderChange, OrderError> {
        let units = self.validate_lines(lines, |line, qty| check_available(line, location, qty, Step::Pack))?;
        let record = OrderChange::Packed { location: location.clone(), lines: units, state: self.state };
        let state = self.projected(&record, now).progress_state(true);
        Ok(record.with_state(state))
    }

    /// A shipment left. The first shipment of an order charges shipping; no
    /// later one does.
    fn decide_shipment(
        &self,
        shipment_id: &ShipmentId,
        location: &LocationId,
        lines: &[LineQty],
        now: Timestamp,
    ) -> Result<OrderChange, OrderError> {
        if self.shipments.iter().any(|s| &s.shipment_id == shipment_id) {
            return Err(Rejection::DuplicateShipment(shipment_id.clone()).into());
        }
        if self.shipments.len() >= SHIPMENTS_PER_ORDER_MAX {
            return Err(Rejection::TooManyShipments { max: SHIPMENTS_PER_ORDER_MAX }.into());
        }
        let units = self.validate_lines(lines, |line, qty| check_available(line, location, qty, Step::Ship))?;
        let record = OrderChange::Shipped {
            shipment_id: shipment_id.clone(),
            location: location.clone(),
            lines: units,
            charge_shipping: !self.shipping_charged,
            state: self.state,
        };
        let state = self.projected(&record, now).progress_state(true);
        Ok(record.with_state(state))
    }

    /// The carrier delivered a shipment. The order is delivered once it is
    /// fully shipped and every shipment has arrived; a canceled order whose
    /// shipped part arrives stays canceled.
    fn decide_delivery(&self, shipment_id: &ShipmentId, now: Timestamp) -> Result<OrderChange, OrderError> {
        let shipment = self
            .shipments
            .iter()
            .find(|s| &s.shipment_id == shipment_id)
            .ok_or_else(|| Rejection::UnknownShipment(shipment_id.clone()))?;
        if shipment.delivered_at.is_some() {
            return Err(Rejection::AlreadyDelivered(shipment_id.clone()).into());
        }
        let record = OrderChange::Delivered { shipment_id: shipment_id.clone(), state: self.state };
        let all_delivered = self.projected(&record, now).shipments.iter().all(|s| s.delivered_at.is_some());
        let state = if self.state == OrderState::Shipped && all_delivered { OrderState::Delivered } else { self.state };
        Ok(record.with_state(state))
    }

    /// Cancels everything not yet shipped and lists the allocations the
    /// inventory service must release. Never charges shipping.
    fn decide_cancel(&self, reason: &str) -> Result<OrderChange, OrderError> {
        check_reason(reason)?;
        let lines = self
            .lines
            .iter()
            .filter(|l| l.outstanding_qty() > 0)
            .map(|l| LineUnits { line_id: l.line_id.clone(), sku: l.sku.clone(), qty: l.outstanding_qty() })
            .collect();
        let release = self
            .lines
            .iter()
            .flat_map(|l| l.allocations.iter().map(move |a| (l, a)))
            .filter(|(_, a)| a.qty > a.shipped)
            .map(|(l, a)| Release {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                location: a.location.clone(),
                reserved_qty: a.qty.saturating_sub(a.picked),
                picked_qty: a.picked.saturating_sub(a.shipped),
            })
            .collect();
        Ok(OrderChange::Canceled { reason: reason.to_owned(), lines, release })
    }

    fn decide_return(&self, location: &LocationId) -> OrderChange {
        let lines = self
            .lines
            .iter()
            .filter(|l| l.shipped_qty() > l.returned)
            .map(|l| LineUnits {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                qty: l.shipped_qty().saturating_sub(l.returned),
            })
            .collect();
        OrderChange::Returned { location: location.clone(), lines }
    }
}

// Helpers of decide: validation, projection and the derived state.
impl Order {
    fn validate_allocations(&self, entries: &[AllocationEntry]) -> Result<(), Rejection> {
        check_entry_count(entries.len())?;
        let mut pairs = BTreeSet::new();
        let mut added: BTreeMap<&LineId, (u64, BTreeSet<&LocationId>)> = BTreeMap::new();
        for e in entries {
            let line = self.line(&e.line_id).ok_or_else(|| Rejection::UnknownLine(e.line_id.clone()))?;
            if e.qty == 0 {
                return Err(Rejection::ZeroQty { line_id: e.line_id.clone() });
            }
            if !pairs.insert((&e.line_id, &e.location)) {
                return Err(Rejection::DuplicateEntry(e.line_id.clone()));
            }
            let (sum, locations) = added.entry(&e.line_id).or_default();
            *sum += u64::from(e.qty);
            if *sum > u64::from(line.unallocated_qty()) {
                return Err(Rejection::OverAllocated {
                    line_id: e.line_id.clone(),
                    unallocated: line.unallocated_qty(),
                });
            }
            if line.allocation_at(&e.location).is_none() {
                locations.insert(&e.location);
            }
            if line.allocations.len() + locations.len() > LOCATIONS_PER_LINE_MAX {
                return Err(Rejection::TooManyLocations { line_id: e.line_id.clone(), max: LOCATIONS_PER_LINE_MAX });
            }
        }
        Ok(())
    }

    /// Validates per-line quantities (non-empty, bounded, known lines, no
    /// duplicates, positive) plus the step's own `check`.
    fn validate_lines(
        &self,
        lines: &[LineQty],
        check: impl Fn(&OrderLine, Qty) -> Result<(), Rejection>,
    ) -> Result<Vec<LineUnits>, Rejection> {
        check_entry_count(lines.len())?;
        let mut ids = BTreeSet::new();
        lines
            .iter()
            .map(|l| {
                let line = self.line(&l.line_id).ok_or_else(|| Rejection::UnknownLine(l.line_id.clone()))?;
                if !ids.insert(&l.line_id) {
                    return Err(Rejection::DuplicateEntry(l.line_id.clone()));
                }
                if l.qty == 0 {
                    return Err(Rejection::ZeroQty { line_id: l.line_id.clone() });
                }
                check(line, l.qty)?;
                Ok(LineUnits { line_id: l.line_id.clone(), sku: line.sku.clone(), qty: l.qty })
            })
            .collect()
    }

    /// The order as it would be after `change`, so the resulting state is
    /// computed from the same bookkeeping `apply` does.
    fn projected(&self, change: &OrderChange, now: Timestamp) -> Order {
        let mut after = self.clone();
        after.apply_change(&self.event(now, None, change.clone()));
        after
    }

    /// Where a released order stands, from its counters. `picking_started`
    /// tells an order that was picking from one only allocated.
    fn progress_state(&self, picking_started: bool) -> OrderState {
        let shipped = self.shipped_qty();
        if shipped > 0 {
            let need = self.shipped_qty() + self.outstanding_qty();
            return if shipped >= need { OrderState::Shipped } else { OrderState::PartiallyShipped };
        }
        let sum = |f: fn(&LineAllocation) -> Qty| -> u64 {
            self.lines.iter().flat_map(|l| &l.allocations).map(|a| u64::from(f(a))).sum()
        };
        let (allocated, picked, packed) = (sum(|a| a.qty), sum(|a| a.picked), sum(|a| a.packed));
        if allocated == 0 {
            self.waiting_state()
        } else if picked < allocated {
            if picking_started || picked > 0 { OrderState::Picking } else { OrderState::Allocated }
        } else if packed < picked {
            OrderState::Picked
        } else {
            OrderState::Packed
        }
    }

    /// The state of an order with nothing handed to the warehouse.
    fn waiting_state(&self) -> OrderState {
        if self.backordered_qty() > 0 { OrderState::Backordered } else { OrderState::Allocating }
    }

    /// Every allocated unit not yet picked, as warehouse work.
    fn pickable_entries(&self) -> Vec<PickEntry> {
        self.lines
            .iter()
            .flat_map(|l| l.allocations.iter().map(move |a| (l, a)))
            .filter(|(_, a)| a.qty > a.picked)
            .map(|(l, a)| PickEntry {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                location: a.location.clone(),
                qty: a.qty.saturating_sub(a.picked),
            })
            .collect()
    }

    /// `entries` as warehouse work.
    fn pick_entries(&self, entries: &[AllocationEntry]) -> Vec<PickEntry> {
        entries
            .iter()
            .filter_map(|e| {
                let line = self.line(&e.line_id)?;
                Some(PickEntry {
                    line_id: e.line_id.clone(),
                    sku: line.sku.clone(),
                    location: e.location.clone(),
                    qty: e.qty,
                })
            })
            .collect()
    }

    /// The next event of this order.
    fn event(&self, at: Timestamp, origin: Option<Origin>, change: OrderChange) -> OrderEvent {
        OrderEvent { order_id: self.id.clone(), sequence: self.version + 1, at, origin, change }
    }

    fn state_matches_counters(&self) -> bool {
        let (shipped, outstanding) = (self.shipped_qty(), self.outstanding_qty());
        let picked: u64 = self.lines.iter().map(|l| u64::from(l.picked_qty())).sum();
        let all_delivered = self.shipments.iter().all(|s| s.delivered_at.is_some());
        match self.state {
            OrderState::Created | OrderState::Allocating | OrderState::Backordered | OrderState::Allocated => {
                picked == 0 && shipped == 0
            }
            OrderState::Picking | OrderState::Picked | OrderState::Packed => shipped == 0 && self.allocated_qty() > 0,
            OrderState::PartiallyShipped => shipped > 0 && outstanding > 0,
            OrderState::Shipped => shipped > 0 && outstanding == 0,
            OrderState::Delivered | OrderState::ReturnRequested | OrderState::Returned => {
                shipped > 0 && outstanding == 0 && all_delivered
            }
            OrderState::Canceled => outstanding == 0,
        }
    }
}

// Applying: bookkeeping only.
impl Order {
    fn from_created(event: &OrderEvent, created: &OrderCreated) -> Order {
        let lines = created
            .lines
            .iter()
            .map(|l| OrderLine {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                qty: l.qty,
                unit_price: l.unit_price,
                allocations: l.allocations.iter().map(|a| LineAllocation::new(a.location.clone(), a.qty)).collect(),
                canceled: 0,
                backordered: 0,
                returned: 0,
            })
            .collect();
        Order {
            id: event.order_id.clone(),
            customer_id: created.customer_id.clone(),
            email: created.email.clone(),
            ship_to: created.ship_to.clone(),
            priority: created.priority,
            delivery_window: created.delivery_window,
            hold_ids: created.hold_ids.clone(),
            lines,
            state: OrderState::Created,
            version: event.sequence,
            created_at: event.at,
            updated_at: event.at,
            total: created.total,
            shipping_charged: false,
            expected_ship_date: None,
            shipments: Vec::new(),
            seen: BTreeMap::new(),
            cancel_reason: None,
            return_reason: None,
        }
    }

    fn apply_change(&mut self, event: &OrderEvent) {
        match &event.change {
            // An order exists once; a second creation changes nothing.
            OrderChange::Created(_) => {}
            OrderChange::Confirmed => self.state = OrderState::Allocating,
            OrderChange::Allocated { allocations, state, .. } => {
                for a in allocations {
                    if let Some(line) = self.line_mut(&a.line_id) {
                        line.add_allocation(&a.location, a.qty);
                    }
                }
                self.state = *state;
            }
            OrderChange::Backordered { lines, expected_ship_date, state } => {
                for units in lines {
                    if let Some(line) = self.line_mut(&units.line_id) {
                        line.backordered = units.qty;
                    }
                }
                self.expected_ship_date = Some(*expected_ship_date);
                self.state = *state;
            }
            OrderChange::PickingStarted { state } => self.state = *state,
            OrderChange::Picked { line_id, location, qty, state, .. } => {
                self.with_allocation(line_id, location, |a| a.picked = a.picked.saturating_add(*qty));
                self.state = *state;
            }
            OrderChange::Shorted { line_id, location, qty, state, .. } => {
                self.with_allocation(line_id, location, |a| a.qty = a.qty.saturating_sub(*qty).max(a.picked));
                self.state = *state;
            }
            OrderChange::Deallocated { allocations, state } => {
                for e in allocations {
                    self.with_allocation(&e.line_id, &e.location, |a| {
                        a.qty = a.qty.saturating_sub(e.qty).max(a.picked)
                    });
                }
                self.state = *state;
            }
            OrderChange::Packed { location, lines, state } => {
                for u in lines {
                    self.with_allocation(&u.line_id, location, |a| a.packed = a.packed.saturating_add(u.qty));
                }
                self.state = *state;
            }
            OrderChange::Shipped { .. } => self.apply_shipped(event),
            OrderChange::Delivered { shipment_id, state } => {
                if let Some(s) = self.shipments.iter_mut().find(|s| &s.shipment_id == shipment_id) {
                    s.delivered_at = Some(event.at);
                }
                self.state = *state;
            }
            OrderChange::Canceled { reason, lines, release } => self.apply_canceled(reason, lines, release),
            OrderChange::ReturnRequested { reason } => {
                self.return_reason = Some(reason.clone());
                self.state = OrderState::ReturnRequested;
            }
            OrderChange::Returned { lines, .. } => {
                for u in lines {
                    if let Some(line) = self.line_mut(&u.line_id) {
                        line.returned = line.returned.saturating_add(u.qty);
                    }
                }
                self.state = OrderState::Returned;
            }
        }
    }

    fn apply_shipped(&mut self, event: &OrderEvent) {
        let OrderChange::Shipped { shipment_id, location, lines, charge_shipping, state } = &event.change else {
            return;
        };
        for u in lines {
            self.with_allocation(&u.line_id, location, |a| a.shipped = a.shipped.saturating_add(u.qty));
        }
        self.shipments.push(OrderShipment {
            shipment_id: shipment_id.clone(),
            location: location.clone(),
            lines: lines.clone(),
            shipped_at: event.at,
            delivered_at: None,
        });
        self.shipping_charged |= *charge_shipping;
        self.state = *state;
    }

    fn apply_canceled(&mut self, reason: &str, lines: &[LineUnits], release: &[Release]) {
        for u in lines {
            if let Some(line) = self.line_mut(&u.line_id) {
                line.canceled = line.canceled.saturating_add(u.qty);
            }
        }
        for r in release {
            self.with_allocation(&r.line_id, &r.location, |a| {
                a.qty = a.qty.saturating_sub(r.reserved_qty.saturating_add(r.picked_qty));
                a.picked = a.picked.saturating_sub(r.picked_qty);
                a.packed = a.packed.min(a.picked);
            });
        }
        self.cancel_reason = Some(reason.to_owned());
        self.state = OrderState::Canceled;
    }

    fn line_mut(&mut self, line_id: &LineId) -> Option<&mut OrderLine> {
        self.lines.iter_mut().find(|l| &l.line_id == line_id)
    }

    fn with_allocation(&mut self, line_id: &LineId, location: &LocationId, f: impl FnOnce(&mut LineAllocation)) {
        if let Some(a) = self.line_mut(line_id).and_then(|l| l.allocations.iter_mut().find(|a| &a.location == location))
        {
            f(a);
        }
    }
}

/// The states of PRODUCT.md §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Recorded, not yet acknowledged.
    Created,
    /// Acknowledged, waiting for the inventory service to reserve stock.
    Allocating,
    /// Stock reserved; the allocated units are handed to the warehouse.
    Allocated,
    /// Waiting for stock; the customer was told the delayed ship date.
    Backordered,
    /// The warehouse is picking.
    Picking,
    /// Every allocated unit is picked.
    Picked,
    /// Every picked unit is packed.
    Packed,
    /// Some units shipped, others are still outstanding.
    PartiallyShipped,
    /// Every unit shipped.
    Shipped,
    /// Every shipment arrived.
    Delivered,
    /// Canceled (the unshipped rest, if part had shipped).
    Canceled,
    /// The customer asked to send the order back.
    ReturnRequested,
    /// The order came back.
    Returned,
}

impl OrderState {
    /// Every state, in flow order.
    pub const ALL: [OrderState; 13] = [
        OrderState::Created,
        OrderState::Allocating,
        OrderState::Allocated,
        OrderState::Backordered,
        OrderState::Picking,
        OrderState::Picked,
        OrderState::Packed,
        OrderState::PartiallyShipped,
        OrderState::Shipped,
        OrderState::Delivered,
        OrderState::Canceled,
        OrderState::ReturnRequested,
        OrderState::Returned,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Created => "created",
            OrderState::Allocating => "allocating",
            OrderState::Allocated => "allocated",
            OrderState::Backordered => "backordered",
            OrderState::Picking => "picking",
            OrderState::Picked => "picked",
            OrderState::Packed => "packed",
            OrderState::PartiallyShipped => "partially_shipped",
            OrderState::Shipped => "shipped",
            OrderState::Delivered => "delivered",
            OrderState::Canceled => "canceled",
            OrderState::ReturnRequested => "return_requested",
            OrderState::Returned => "returned",
        }
    }

    /// Parses a wire name, e.g. from `?state=backordered`.
    pub fn parse(s: &str) -> Option<OrderState> {
        OrderState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether the order's flow has ended: delivered, canceled or returned.
    pub fn is_terminal(self) -> bool {
        matches!(self, OrderState::Delivered | OrderState::Canceled | OrderState::Returned)
    }

    /// Whether the order waits for something outside the engine (stock).
    pub fn is_waiting(self) -> bool {
        self == OrderState::Backordered
    }

    /// Nothing has been handed to the warehouse yet; allocations are held
    /// until the split policy lets them proceed.
    fn is_consolidating(self) -> bool {
        matches!(self, OrderState::Created | OrderState::Allocating | OrderState::Backordered)
    }

    fn is_picking_started(self) -> bool {
        matches!(self, OrderState::Picking | OrderState::Picked | OrderState::Packed | OrderState::PartiallyShipped)
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order rules that come from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPolicy {
    /// `split.min_order_value_for_partial`: orders whose total is at or above
    /// this ship the allocated part while the rest waits; smaller ones wait
    /// (backordered) until everything is allocated.
    pub min_order_value_for_partial: Money,
}

impl Default for OrderPolicy {
    fn default() -> OrderPolicy {
        OrderPolicy { min_order_value_for_partial: MIN_ORDER_VALUE_FOR_PARTIAL_DEFAULT }
    }
}

impl OrderPolicy {
    /// Whether an order of this total ships partially rather than waiting for consolidation.
    pub fn ships_partially(&self, total: Money) -> bool {
        total >= self.min_order_value_for_partial
    }
}

/// One order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Unique across orders (`<order id>:<n>`).
    pub line_id: LineId,
    /// What was ordered.
    pub sku: Sku,
    /// How many units were ordered.
    pub qty: Qty,
    /// Price per unit.
    pub unit_price: Money,
    /// Where the line's units are allocated, one entry per location, with how
    /// far the units there got.
    pub allocations: Vec<LineAllocation>,
    /// Units canceled.
    pub canceled: Qty,
    /// Units known to wait for stock.
    pub backordered: Qty,
    /// Units returned.
    pub returned: Qty,
}

impl OrderLine {
    /// The line's value: qty × unit price.
    pub fn value(&self) -> Money {
        self.unit_price.times(self.qty)
    }

    /// Units allocated (including those picked or shipped since).
    pub fn allocated_qty(&self) -> Qty {
        self.allocations.iter().map(|a| a.qty).sum()
    }

    /// Units picked.
    pub fn picked_qty(&self) -> Qty {
        self.allocations.iter().map(|a| a.picked).sum()
    }

    /// Units packed.
    pub fn packed_qty(&self) -> Qty {
        self.allocations.iter().map(|a| a.packed).sum()
    }

    /// Units shipped.
    pub fn shipped_qty(&self) -> Qty {
        self.allocations.iter().map(|a| a.shipped).sum()
    }

    /// Units neither allocated nor canceled.
    pub fn unallocated_qty(&self) -> Qty {
        self.qty.saturating_sub(self.canceled).saturating_sub(self.allocated_qty())
    }

    /// Units still to deliver: neither canceled nor shipped.
    pub fn outstanding_qty(&self) -> Qty {
        self.qty.saturating_sub(self.canceled).saturating_sub(self.shipped_qty())
    }

    /// The allocation at one location.
    pub fn allocation_at(&self, location: &LocationId) -> Option<&LineAllocation> {
        self.allocations.iter().find(|a| &a.location == location)
    }

    fn add_allocation(&mut self, location: &LocationId, qty: Qty) {
        match self.allocations.iter_mut().find(|a| &a.location == location) {
            Some(a) => a.qty = a.qty.saturating_add(qty),
            None => self.allocations.push(LineAllocation::new(location.clone(), qty)),
        }
    }
}

/// A line's units at one location and how far they got. Always
/// `shipped <= packed <= picked <= qty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineAllocation {
    /// Where.
    pub location: LocationId,
    /// Units allocated here (short picks reduce it; cancellation reduces it to what shipped).
    pub qty: Qty,
    /// Units picked here.
    pub picked: Qty,
    /// Units packed here.
    pub packed: Qty,
    /// Units shipped from here.
    pub shipped: Qty,
}

impl LineAllocation {
    fn new(location: LocationId, qty: Qty) -> LineAllocation {
        LineAllocation { location, qty, picked: 0, packed: 0, shipped: 0 }
    }
}

/// A shipment of (part of) the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipment {
    /// The shipping service's id.
    pub shipment_id: ShipmentId,
    /// Where it left from.
    pub location: LocationId,
    /// What it carries.
    pub lines: Vec<LineUnits>,
    /// When it left.
    pub shipped_at: Timestamp,
    /// When it arrived, once it did.
    pub delivered_at: Option<Timestamp>,
}

/// The delivery window a customer chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryWindow {
    /// Earliest delivery.
    pub start: Timestamp,
    /// Latest delivery; not before `start`.
    pub end: Timestamp,
}

/// What the storefront asked for, parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// The new order's id (from the caller's id source).
    pub order_id: OrderId,
    /// Who orders.
    pub customer_id: CustomerId,
    /// Where notifications go.
    pub email: String,
    /// The destination zone.
    pub ship_to: Zone,
    /// How urgently it must ship.
    pub priority: Priority,
    /// The lines, in order; line ids are `LineId::for_order(order_id, n)`, n from 1.
    pub lines: Vec<NewLine>,
    /// Cart holds the order consumes.
    #[serde(default)]
    pub hold_ids: Vec<HoldId>,
    /// The delivery window the customer chose, if any.
    #[serde(default)]
    pub delivery_window: Option<DeliveryWindow>,
}

/// One line of a new order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewLine {
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: Qty,
    /// Price per unit.
    pub unit_price: Money,
    /// Stock reserved synchronously before the order was acknowledged
    /// (lines at or above `allocation.sync_min_line_value`); empty otherwise.
    #[serde(default)]
    pub allocations: Vec<LocationQty>,
}

/// Units at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationQty {
    /// Where.
    pub location: LocationId,
    /// How many.
    pub qty: Qty,
}

/// Units of one line at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationEntry {
    /// Which line.
    pub line_id: LineId,
    /// Where.
    pub location: LocationId,
    /// How many.
    pub qty: Qty,
}

/// Units of one line, in a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineQty {
    /// Which line.
    pub line_id: LineId,
    /// How many.
    pub qty: Qty,
}

/// Units of one line, in an event (with the SKU so consumers need not look it up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineUnits {
    /// Which line.
    pub line_id: LineId,
    /// Its SKU.
    pub sku: Sku,
    /// How many.
    pub qty: Qty,
}

/// Warehouse work an `allocated` event hands over: pick these units here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickEntry {
    /// Which line (with a sequence, the pick instruction's idempotency key).
    pub line_id: LineId,
    /// What to pick.
    pub sku: Sku,
    /// Where.
    pub location: LocationId,
    /// How many.
    pub qty: Qty,
}

/// Stock a cancellation gives back at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Which line.
    pub line_id: LineId,
    /// Its SKU.
    pub sku: Sku,
    /// Where.
    pub location: LocationId,
    /// Reserved units not yet picked: release the reservation.
    pub reserved_qty: Qty,
    /// Units picked (or packed) but not shipped: put them back on the shelf.
    pub picked_qty: Qty,
}

/// Where an event-driven command came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The stream whose `sequence` strictly increases for this order, e.g.
    /// `/orderly/picking`. When a producer's sequence is per another subject
    /// (a SKU), the caller makes the stream name include that subject.
    pub source: String,
    /// The producer's sequence within `source`.
    pub sequence: u64,
}

impl Origin {
    /// An origin.
    pub fn new(source: impl Into<String>, sequence: u64) -> Origin {
        Origin { source: source.into(), sequence }
    }
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum OrderCommand {
    /// Create an order; see [`Order::decide_create`]. Illegal on an existing order.
    Create(NewOrder),
    /// The inventory service reserved stock for some lines.
    RecordAllocation {
        /// Where it came from.
        origin: Origin,
        /// What was reserved where.
        allocations: Vec<AllocationEntry>,
    },
    /// The inventory service could not reserve these units (absolute count per line).
    RecordBackorder {
        /// Where it came from.
        origin: Origin,
        /// Units waiting for stock, per line.
        lines: Vec<LineQty>,
        /// When the customer can expect the order to ship.
        expected_ship_date: Timestamp,
    },
    /// The inventory service took back reserved units (stock loss).
    RecordDeallocation {
        /// Where it came from.
        origin: Origin,
        /// Units no longer allocated, per line and location.
        allocations: Vec<AllocationEntry>,
    },
    /// The picking service started on the order.
    StartPicking {
        /// Where it came from.
        origin: Origin,
    },
    /// A picker confirmed units of a line at a location.
    RecordPicked {
        /// Where it came from.
        origin: Origin,
        /// Which line.
        line_id: LineId,
        /// Where.
        location: LocationId,
        /// How many were picked.
        qty: Qty,
    },
    /// A picker did not find units of a line at a location.
    RecordShort {
        /// Where it came from.
        origin: Origin,
        /// Which line.
        line_id: LineId,
        /// Where.
        location: LocationId,
        /// How many were missing.
        qty: Qty,
    },
    /// Picked units were packed at a location.
    RecordPacked {
        /// Where it came from.
        origin: Origin,
        /// Where.
        location: LocationId,
        /// Units packed, per line.
        lines: Vec<LineQty>,
    },
    /// A shipment of packed units left a location.
    RecordShipment {
        /// Where it came from.
        origin: Origin,
        /// The shipping service's id.
        shipment_id: ShipmentId,
        /// Where it left from.
        location: LocationId,
        /// Units shipped, per line.
        lines: Vec<LineQty>,
    },
    /// The carrier delivered a shipment.
    RecordDelivery {
        /// Where it came from.
        origin: Origin,
        /// Which shipment.
        shipment_id: ShipmentId,
    },
    /// Cancel everything not yet shipped.
    Cancel {
        /// Why (may be empty).
        reason: String,
    },
    /// The customer asks to return a delivered order.
    RequestReturn {
        /// Why (may be empty).
        reason: String,
    },
    /// The returned goods arrived.
    RecordReturn {
        /// Where they arrived.
        location: LocationId,
    },
}

impl OrderCommand {
    /// The command's name, as used in errors.
    pub fn name(&self) -> &'static str {
        match self {
            OrderCommand::Create(_) => "create",
            OrderCommand::RecordAllocation { .. } => "record_allocation",
            OrderCommand::RecordBackorder { .. } => "record_backorder",
            OrderCommand::RecordDeallocation { .. } => "record_deallocation",
            OrderCommand::StartPicking { .. } => "start_picking",
            OrderCommand::RecordPicked { .. } => "record_picked",
            OrderCommand::RecordShort { .. } => "record_short",
            OrderCommand::RecordPacked { .. } => "record_packed",
            OrderCommand::RecordShipment { .. } => "record_shipment",
            OrderCommand::RecordDelivery { .. } => "record_delivery",
            OrderCommand::Cancel { .. } => "cancel",
            OrderCommand::RequestReturn { .. } => "request_return",
            OrderCommand::RecordReturn { .. } => "record_return",
        }
    }

    /// Where an event-driven command came from; `None` for API commands,
    /// which the HTTP layer deduplicates by idempotency key.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            OrderCommand::RecordAllocation { origin, .. }
            | OrderCommand::RecordBackorder { origin, .. }
            | OrderCommand::RecordDeallocation { origin, .. }
            | OrderCommand::StartPicking { origin }
            | OrderCommand::RecordPicked { origin, .. }
            | OrderCommand::RecordShort { origin, .. }
            | OrderCommand::RecordPacked { origin, .. }
            | OrderCommand::RecordShipment { origin, .. }
            | OrderCommand::RecordDelivery { origin, .. } => Some(origin),
            OrderCommand::Create(_)
            | OrderCommand::Cancel { .. }
            | OrderCommand::RequestReturn { .. }
            | OrderCommand::RecordReturn { .. } => None,
        }
    }

    /// Whether the command may be issued to an order in `state` (its data is
    /// checked separately). This is the transition table of PRODUCT.md §3.
    pub fn is_legal_in(&self, state: OrderState) -> bool {
        use OrderState as S;
        let legal: &[OrderState] = match self {
            OrderCommand::Create(_) => &[],
            OrderCommand::RecordAllocation { .. }
            | OrderCommand::RecordBackorder { .. }
            | OrderCommand::RecordDeallocation { .. } => {
                &[S::Allocating, S::Backordered, S::Allocated, S::Picking, S::Picked, S::Packed, S::PartiallyShipped]
            }
            OrderCommand::StartPicking { .. }
            | OrderCommand::RecordPicked { .. }
            | OrderCommand::RecordShort { .. }
            | OrderCommand::RecordPacked { .. }
            | OrderCommand::RecordShipment { .. } => {
                &[S::Allocated, S::Picking, S::Picked, S::Packed, S::PartiallyShipped]
            }
            OrderCommand::RecordDelivery { .. } => &[S::PartiallyShipped, S::Shipped, S::Canceled],
            OrderCommand::Cancel { .. } => &[
                S::Created,
                S::Allocating,
                S::Backordered,
                S::Allocated,
                S::Picking,
                S::Picked,
                S::Packed,
                S::PartiallyShipped,
            ],
            OrderCommand::RequestReturn { .. } => &[S::Delivered],
            OrderCommand::RecordReturn { .. } => &[S::ReturnRequested],
        };
        legal.contains(&state)
    }
}

/// One recorded fact about an order. `sequence` is the order's version after
/// applying it (1 for `created`) and becomes the CloudEvents `sequence`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// The order (the CloudEvents `subject`).
    pub order_id: OrderId,
    /// Strictly increasing per order, from 1.
    pub sequence: u64,
    /// When it was decided.
    pub at: Timestamp,
    /// The event-driven command it answers, so replay restores stale detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// What happened.
    pub change: OrderChange,
}

impl OrderEvent {
    /// The CloudEvents type name, e.g. `orderly.order.allocated`.
    pub fn type_name(&self) -> &'static str {
        match &self.change {
            OrderChange::Created(_) => "orderly.order.created",
            OrderChange::Confirmed => "orderly.order.confirmed",
            OrderChange::Allocated { .. } => "orderly.order.allocated",
            OrderChange::Backordered { .. } => "orderly.order.backordered",
            OrderChange::PickingStarted { .. } => "orderly.order.picking_started",
            OrderChange::Picked { .. } => "orderly.order.picked",
            OrderChange::Shorted { .. } => "orderly.order.pick_shorted",
            OrderChange::Deallocated { .. } => "orderly.order.deallocated",
            OrderChange::Packed { .. } => "orderly.order.packed",
            OrderChange::Shipped { state: OrderState::Shipped, .. } => "orderly.order.shipped",
            OrderChange::Shipped { .. } => "orderly.order.partially_shipped",
            OrderChange::Delivered { state: OrderState::Delivered, .. } => "orderly.order.delivered",
            OrderChange::Delivered { .. } => "orderly.order.shipment_delivered",
            OrderChange::Canceled { .. } => "orderly.order.canceled",
            OrderChange::ReturnRequested { .. } => "orderly.order.return_requested",
            OrderChange::Returned { .. } => "orderly.order.returned",
        }
    }

    /// The CloudEvents type from [`EventType`]'s catalog.
    pub fn event_type(&self) -> EventType {
        EventType::parse(self.type_name())
    }

    /// The order state this event leaves behind, when the event sets one.
    pub fn state(&self) -> Option<OrderState> {
        match &self.change {
            OrderChange::Created(_) => Some(OrderState::Created),
            OrderChange::Confirmed => Some(OrderState::Allocating),
            OrderChange::Allocated { state, .. }
            | OrderChange::Backordered { state, .. }
            | OrderChange::PickingStarted { state }
            | OrderChange::Picked { state, .. }
            | OrderChange::Shorted { state, .. }
            | OrderChange::Deallocated { state, .. }
            | OrderChange::Packed { state, .. }
            | OrderChange::Shipped { state, .. }
            | OrderChange::Delivered { state, .. } => Some(*state),
            OrderChange::Canceled { .. } => Some(OrderState::Canceled),
            OrderChange::ReturnRequested { .. } => Some(OrderState::ReturnRequested),
            OrderChange::Returned { .. } => Some(OrderState::Returned),
        }
    }
}

/// What happened to an order. Tags carry a schema version (`.v1`): a changed
/// payload becomes a new variant, and `apply` keeps reading the old one.
///
/// Each variant carries everything `apply` needs, including the state it
/// leaves the order in when that was a decision (the split policy's, say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OrderChange {
    /// The order was recorded (with any synchronous allocations, held).
    #[serde(rename = "created.v1")]
    Created(Box<OrderCreated>),
    /// The order was acknowledged and waits for allocation.
    #[serde(rename = "confirmed.v1")]
    Confirmed,
    /// Stock was reserved (`allocations`, possibly none when held ones are
    /// released), and `ready_to_pick` is handed to the warehouse now (empty
    /// while a small order waits for consolidation).
    #[serde(rename = "allocated.v1")]
    Allocated {
        /// Newly reserved units.
        allocations: Vec<AllocationEntry>,
        /// Warehouse work released by this event.
        ready_to_pick: Vec<PickEntry>,
        /// The state afterwards.
        state: OrderState,
    },
    /// Units wait for stock; the customer is told `expected_ship_date`.
    #[serde(rename = "backordered.v1")]
    Backordered {
        /// Units waiting, per line (absolute).
        lines: Vec<LineUnits>,
        /// The delayed ship date.
        expected_ship_date: Timestamp,
        /// The state afterwards: backordered if the order waits, unchanged if its allocated part proceeds.
        state: OrderState,
    },
    /// Picking started.
    #[serde(rename = "picking_started.v1")]
    PickingStarted {
        /// The state afterwards.
        state: OrderState,
    },
    /// Units were picked.
    #[serde(rename = "picked.v1")]
    Picked {
        /// Which line.
        line_id: LineId,
        /// Its SKU.
        sku: Sku,
        /// Where.
        location: LocationId,
        /// How many.
        qty: Qty,
        /// The state afterwards.
        state: OrderState,
    },
    /// Units were not found; they are no longer allocated there.
    #[serde(rename = "pick_shorted.v1")]
    Shorted {
        /// Which line.
        line_id: LineId,
        /// Its SKU.
        sku: Sku,
        /// Where.
        location: LocationId,
        /// How many were missing.
        qty: Qty,
        /// The state afterwards.
        state: OrderState,
    },
    /// Inventory took back reserved units (stock loss); they wait for stock again.
    #[serde(rename = "deallocated.v1")]
    Deallocated {
        /// Units no longer allocated, per line and location.
        allocations: Vec<AllocationEntry>,
        /// The state afterwards.
        state: OrderState,
    },
    /// Units were packed.
    #[serde(rename = "packed.v1")]
    Packed {
        /// Where.
        location: LocationId,
        /// Units, per line.
        lines: Vec<LineUnits>,
        /// The state afterwards.
        state: OrderState,
    },
    /// A shipment left.
    #[serde(rename = "shipped.v1")]
    Shipped {
        /// The shipping service's id.
        shipment_id: ShipmentId,
        /// Where from.
        location: LocationId,
        /// Units, per line.
        lines: Vec<LineUnits>,
        /// Whether this shipment charges shipping (only the order's first does).
        charge_shipping: bool,
        /// `partially_shipped` or `shipped`.
        state: OrderState,
    },
    /// A shipment arrived.
    #[serde(rename = "delivered.v1")]
    Delivered {
        /// Which shipment.
        shipment_id: ShipmentId,
        /// `delivered` once everything arrived; otherwise unchanged.
        state: OrderState,
    },
    /// Everything not yet shipped was canceled. Never charges shipping.
    #[serde(rename = "canceled.v1")]
    Canceled {
        /// Why.
        reason: String,
        /// Units canceled, per line.
        lines: Vec<LineUnits>,
        /// Stock the inventory service must give back.
        release: Vec<Release>,
    },
    /// The customer asked for a return.
    #[serde(rename = "return_requested.v1")]
    ReturnRequested {
        /// Why.
        reason: String,
    },
    /// The returned goods arrived.
    #[serde(rename = "returned.v1")]
    Returned {
        /// Where.
        location: LocationId,
        /// Units returned, per line.
        lines: Vec<LineUnits>,
    },
}

impl OrderChange {
    /// The same change leaving the order in `state` (for variants that carry one).
    fn with_state(mut self, new: OrderState) -> OrderChange {
        match &mut self {
            OrderChange::Allocated { state, .. }
            | OrderChange::Backordered { state, .. }
            | OrderChange::PickingStarted { state }
            | OrderChange::Picked { state, .. }
            | OrderChange::Shorted { state, .. }
            | OrderChange::Deallocated { state, .. }
            | OrderChange::Packed { state, .. }
            | OrderChange::Shipped { state, .. }
            | OrderChange::Delivered { state, .. } => *state = new,
            OrderChange::Created(_)
            | OrderChange::Confirmed
            | OrderChange::Canceled { .. }
            | OrderChange::ReturnRequested { .. }
            | OrderChange::Returned { .. } => {}
        }
        self
    }
}

/// The payload of `created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Who ordered.
    pub customer_id: CustomerId,
    /// Where notifications go.
    pub email: String,
    /// The destination zone.
    pub ship_to: Zone,
    /// How urgently it must ship.
    pub priority: Priority,
    /// The chosen delivery window.
    pub delivery_window: Option<DeliveryWindow>,
    /// Cart holds consumed.
    pub hold_ids: Vec<HoldId>,
    /// The lines.
    pub lines: Vec<CreatedLine>,
    /// Σ qty × unit price.
    pub total: Money,
}

/// A line as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedLine {
    /// Its id.
    pub line_id: LineId,
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: Qty,
    /// Price per unit.
    pub unit_price: Money,
    /// Stock reserved synchronously before acknowledgment.
    pub allocations: Vec<LocationQty>,
}

/// Why a command was not accepted.
///
/// Implemented by hand rather than with `thiserror`: thiserror treats a field
/// named `source` as the error's cause, and `Stale.source` is a stream name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderError {
    /// The command's sequence is not newer than the last one applied from its
    /// source: a duplicate or reordered delivery. Counted, then dropped.
    Stale {
        /// The stream.
        source: String,
        /// The command's sequence.
        sequence: u64,
        /// The last sequence applied from that stream.
        last_seen: u64,
    },
    /// The command is not legal in the order's state (a conflict).
    IllegalTransition {
        /// The order's state.
        state: OrderState,
        /// The command's name.
        command: &'static str,
    },
    /// The command's data is invalid (the caller's fault).
    Rejected(Rejection),
}

impl fmt::Display for OrderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderError::Stale { source, sequence, last_seen } => {
                write!(f, "stale event: {source} sequence {sequence} is not newer than {last_seen}")
            }
            OrderError::IllegalTransition { state, command } => write!(f, "cannot {command} an order that is {state}"),
            OrderError::Rejected(r) => write!(f, "rejected: {r}"),
        }
    }
}

impl std::error::Error for OrderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OrderError::Rejected(r) => Some(r),
            OrderError::Stale { .. } | OrderError::IllegalTransition { .. } => None,
        }
    }
}

impl From<Rejection> for OrderError {
    fn from(r: Rejection) -> OrderError {
        OrderError::Rejected(r)
    }
}

/// What is wrong with a command's data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// An order needs lines.
    #[error("an order needs at least one line")]
    NoLines,
    /// Too many lines.
    #[error("an order has at most {max} lines")]
    TooManyLines {
        /// The limit.
        max: usize,
    },
    /// A line's quantity is zero or above [`LINE_QTY_MAX`].
    #[error("line {line_id}: quantity must be between 1 and {max}")]
    LineQty {
        /// Which line.
        line_id: LineId,
        /// The limit.
        max: Qty,
    },
    /// A unit price is negative or too large.
    #[error("line {line_id}: unit price must be between 0 and the maximum amount")]
    UnitPrice {
        /// Which line.
        line_id: LineId,
    },
    /// The order total exceeds the largest amount.
    #[error("the order total is too large")]
    TotalTooLarge,
    /// Not an email address.
    #[error("email must be an address like name@example.com of at most {max} characters")]
    InvalidEmail {
        /// The limit.
        max: usize,
    },
    /// The delivery window ends before it starts.
    #[error("the delivery window ends before it starts")]
    DeliveryWindow,
    /// Too many cart holds.
    #[error("an order consumes at most {max} holds")]
    TooManyHolds {
        /// The limit.
        max: usize,
    },
    /// A reason is too long.
    #[error("the reason is longer than {max} characters")]
    ReasonTooLong {
        /// The limit.
        max: usize,
    },
    /// The origin's source is empty or too long.
    #[error("the event source must be 1 to {max} characters")]
    InvalidSource {
        /// The limit.
        max: usize,
    },
    /// The order already tracks as many sources as it may.
    #[error("an order tracks at most {max} event sources")]
    TooManySources {
        /// The limit.
        max: usize,
    },
    /// The command names no lines, or too many entries.
    #[error("the command must name between 1 and {max} entries")]
    EntryCount {
        /// The limit.
        max: usize,
    },
    /// The command names a line the order does not have.
    #[error("the order has no line {0}")]
    UnknownLine(LineId),
    /// The command names a line (or line and location) twice.
    #[error("line {0} appears twice in the command")]
    DuplicateEntry(LineId),
    /// A quantity is zero.
    #[error("line {line_id}: quantity must be positive")]
    ZeroQty {
        /// Which line.
        line_id: LineId,
    },
    /// More units allocated than the line still needs.
    #[error("line {line_id}: only {unallocated} units are left to allocate")]
    OverAllocated {
        /// Which line.
        line_id: LineId,
        /// What it still needs.
        unallocated: Qty,
    },
    /// Allocated at too many locations.
    #[error("line {line_id}: allocated at more than {max} locations")]
    TooManyLocations {
        /// Which line.
        line_id: LineId,
        /// The limit.
        max: usize,
    },
    /// Backordered more units than are unallocated.
    #[error("line {line_id}: only {unallocated} units are unallocated")]
    BackorderExceedsUnallocated {
        /// Which line.
        line_id: LineId,
        /// Units neither allocated nor canceled.
        unallocated: Qty,
    },
    /// Picking was started with nothing left to pick.
    #[error("nothing is waiting to be picked")]
    NothingToPick,
    /// The line has no allocation at the location.
    #[error("line {line_id} has no allocation at {location}")]
    NotAllocatedAt {
        /// Which line.
        line_id: LineId,
        /// Where.
        location: LocationId,
    },
    /// More units than the step can take at this location.
    #[error("line {line_id} at {location}: cannot {step} {qty} units, only {available} are ready for it")]
    ExceedsAvailable {
        /// `pick`, `short`, `pack` or `ship`.
        step: &'static str,
        /// Which line.
        line_id: LineId,
        /// Where.
        location: LocationId,
        /// Asked for.
        qty: Qty,
        /// Ready for the step.
        available: Qty,
    },
    /// A shipment id already recorded.
    #[error("shipment {0} is already recorded")]
    DuplicateShipment(ShipmentId),
    /// Too many shipments.
    #[error("an order has at most {max} shipments")]
    TooManyShipments {
        /// The limit.
        max: usize,
    },
    /// A shipment this order does not have.
    #[error("shipment {0} is not part of this order")]
    UnknownShipment(ShipmentId),
    /// A shipment already delivered.
    #[error("shipment {0} is already delivered")]
    AlreadyDelivered(ShipmentId),
}

/// An order broke one of its invariants: a bug, never the caller's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated: {0}")]
pub struct InvariantViolation(pub String);

/// A warehouse step and which units it can take at a location.
#[derive(Debug, Clone, Copy)]
enum Step {
    Pick,
    Short,
    Pack,
    Ship,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Pick => "pick",
            Step::Short => "short",
            Step::Pack => "pack",
            Step::Ship => "ship",
        }
    }

    fn available(self, a: &LineAllocation) -> Qty {
        match self {
            Step::Pick | Step::Short => a.qty.saturating_sub(a.picked),
            Step::Pack => a.picked.saturating_sub(a.packed),
            Step::Ship => a.packed.saturating_sub(a.shipped),
        }
    }
}

fn check_available(line: &OrderLine, location: &LocationId, qty: Qty, step: Step) -> Result<(), Rejection> {
    if qty == 0 {
        return Err(Rejection::ZeroQty { line_id: line.line_id.clone() });
    }
    let allocation = line
        .allocation_at(location)
        .ok_or_else(|| Rejection::NotAllocatedAt { line_id: line.line_id.clone(), location: location.clone() })?;
    let available = step.available(allocation);
    if qty > available {
        return Err(Rejection::ExceedsAvailable {
            step: step.as_str(),
            line_id: line.line_id.clone(),
            location: location.clone(),
            qty,
            available,
        });
    }
    Ok(())
}

fn check_entry_count(n: usize) -> Result<(), Rejection> {
    if n == 0 || n > ENTRIES_PER_COMMAND_MAX {
        return Err(Rejection::EntryCount { max: ENTRIES_PER_COMMAND_MAX });
    }
    Ok(())
}

fn check_reason(reason: &str) -> Result<(), Rejection> {
    if reason.len() > REASON_LEN_MAX {
        return Err(Rejection::ReasonTooLong { max: REASON_LEN_MAX });
    }
    Ok(())
}

/// Validates a new order and returns its total.
fn validate_new_order(new: &NewOrder) -> Result<Money, Rejection> {
    if new.lines.is_empty() {
        return Err(Rejection::NoLines);
    }
    if new.lines.len() > LINES_PER_ORDER_MAX {
        return Err(Rejection::TooManyLines { max: LINES_PER_ORDER_MAX });
    }
    if !is_email(&new.email) {
        return Err(Rejection::InvalidEmail { max: EMAIL_LEN_MAX });
    }
    if new.hold_ids.len() > HOLDS_PER_ORDER_MAX {
        return Err(Rejection::TooManyHolds { max: HOLDS_PER_ORDER_MAX });
    }
    if new.delivery_window.is_some_and(|w| w.end < w.start) {
        return Err(Rejection::DeliveryWindow);
    }
    for (line, n) in new.lines.iter().zip(1..) {
        validate_new_line(line, &LineId::for_order(&new.order_id, n))?;
    }
    let total: Money = new.lines.iter().map(|l| l.unit_price.times(l.qty)).sum();
    if total.minor() > MONEY_MINOR_MAX {
        return Err(Rejection::TotalTooLarge);
    }
    Ok(total)
}

fn validate_new_line(line: &NewLine, line_id: &LineId) -> Result<(), Rejection> {
    if line.qty == 0 || line.qty > LINE_QTY_MAX {
        return Err(Rejection::LineQty { line_id: line_id.clone(), max: LINE_QTY_MAX });
    }
    if line.unit_price < Money::ZERO || line.unit_price.minor() > MONEY_MINOR_MAX {
        return Err(Rejection::UnitPrice { line_id: line_id.clone() });
    }
    if line.allocations.len() > LOCATIONS_PER_LINE_MAX {
        return Err(Rejection::TooManyLocations { line_id: line_id.clone(), max: LOCATIONS_PER_LINE_MAX });
    }
    let mut locations = BTreeSet::new();
    let mut allocated = 0u64;
    for a in &line.allocations {
        if a.qty == 0 {
            return Err(Rejection::ZeroQty { line_id: line_id.clone() });
        }
        if !locations.insert(&a.location) {
            return Err(Rejection::DuplicateEntry(line_id.clone()));
        }
        allocated += u64::from(a.qty);
    }
    if allocated > u64::from(line.qty) {
        return Err(Rejection::OverAllocated { line_id: line_id.clone(), unallocated: line.qty });
    }
    Ok(())
}

fn created_line(order_id: &OrderId, line: &NewLine, n: u32) -> CreatedLine {
    CreatedLine {
        line_id: LineId::for_order(order_id, n),
        sku: line.sku.clone(),
        qty: line.qty,
        unit_price: line.unit_price,
        allocations: line.allocations.clone(),
    }
}

/// A plausible address: one `@` with text on both sides, no spaces or
/// control characters, bounded length. Deliverability is the mailer's job.
fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= EMAIL_LEN_MAX
        && !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_764_150_000_000);
    const LATER: Timestamp = Timestamp(1_764_750_000_000);
    const SOURCE: &str = "/orderly/test";
    const WH1: &str = "WH-1";
    const WH2: &str = "WH-2";

    fn order_id() -> OrderId {
        OrderId::parse("o-1").expect("valid id")
    }

    fn lid(n: u32) -> LineId {
        LineId::for_order(&order_id(), n)
    }

    fn loc(s: &str) -> LocationId {
        LocationId::parse(s).expect("valid id")
    }

    fn sid(s: &str) -> ShipmentId {
        ShipmentId::parse(s).expect("valid id")
    }

    fn money(s: &str) -> Money {
        Money::parse(s).expect("valid amount")
    }

    fn line_qtys(lines: &[(u32, Qty)]) -> Vec<LineQty> {
        lines.iter().map(|&(n, qty)| LineQty { line_id: lid(n), qty }).collect()
    }

    /// An order of (sku, qty, unit price) lines.
    fn new_order(lines: &[(&str, Qty, &str)]) -> NewOrder {
        NewOrder {
            order_id: order_id(),
            customer_id: CustomerId::parse("c-1").expect("valid id"),
            email: "ada@example.com".to_owned(),
            ship_to: Zone::parse("EU").expect("valid id"),
            priority: Priority::Standard,
            lines: lines
                .iter()
                .map(|&(sku, qty, price)| NewLine {
                    sku: Sku::parse(sku).expect("valid id"),
                    qty,
                    unit_price: money(price),
                    allocations: Vec::new(),
                })
                .collect(),
            hold_ids: Vec::new(),
            delivery_window: None,
        }
    }

    /// 2 × 30.00 + 1 × 30.00 = 90.00: ships partially under the default policy.
    fn large() -> NewOrder {
        new_order(&[("SKU-A", 2, "30.00"), ("SKU-B", 1, "30.00")])
    }

    /// 1 × 10.00 + 1 × 10.00 = 20.00: waits for consolidation.
    fn small() -> NewOrder {
        new_order(&[("SKU-A", 1, "10.00"), ("SKU-B", 1, "10.00")])
    }

    fn rejection(result: Result<Vec<OrderEvent>, OrderError>) -> Rejection {
        match result {
            Err(OrderError::Rejected(r)) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn assert_illegal(result: Result<Vec<OrderEvent>, OrderError>, state: OrderState) {
        assert!(
            matches!(result, Err(OrderError::IllegalTransition { state: s, .. }) if s == state),
            "expected an illegal transition from {state}, got {result:?}"
        );
    }

    /// A state to reach and the command that reaches it.
    type Stage = (OrderState, fn(&mut World) -> OrderCommand);

    /// Given an order, when a command, then events or an error.
    struct World {
        order: Order,
        policy: OrderPolicy,
        seq: u64,
        history: Vec<OrderEvent>,
    }

    impl World {
        fn given(new: NewOrder) -> World {
            World::given_with(new, OrderPolicy::default())
        }

        fn given_with(new: NewOrder, policy: OrderPolicy) -> World {
            let events = Order::decide_create(&new, &policy, NOW).expect("a valid order");
            let order = Order::from_events(&events).expect("history starts with created");
            World { order, policy, seq: 0, history: events }
        }

        fn when(&self, cmd: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
            self.order.decide(cmd, &self.policy, NOW)
        }

        /// Runs a command that must succeed with exactly one event.
        fn run(&mut self, cmd: OrderCommand) -> OrderEvent {
            let events = self.order.execute(&cmd, &self.policy, NOW);
            let mut events = events.unwrap_or_else(|e| panic!("{} failed in {}: {e}", cmd.name(), self.state()));
            assert_eq!(events.len(), 1, "one event per command");
            self.history.extend(events.iter().cloned());
            events.remove(0)
        }

        fn state(&self) -> OrderState {
            self.order.state()
        }

        fn origin(&mut self) -> Origin {
            self.seq += 1;
            Origin::new(SOURCE, self.seq)
        }

        fn allocate(&mut self, entries: &[(u32, &str, Qty)]) -> OrderCommand {
            let allocations =
                entries.iter().map(|&(n, l, qty)| AllocationEntry { line_id: lid(n), location: loc(l), qty }).collect();
            OrderCommand::RecordAllocation { origin: self.origin(), allocations }
        }

        fn backorder(&mut self, lines: &[(u32, Qty)]) -> OrderCommand {
            OrderCommand::RecordBackorder { origin: self.origin(), lines: line_qtys(lines), expected_ship_date: LATER }
        }

        fn start_picking(&mut self) -> OrderCommand {
            OrderCommand::StartPicking { origin: self.origin() }
        }

        fn pick(&mut self, n: u32, l: &str, qty: Qty) -> OrderCommand {
            OrderCommand::RecordPicked { origin: self.origin(), line_id: lid(n), location: loc(l), qty }
        }

        fn short(&mut self, n: u32, l: &str, qty: Qty) -> OrderCommand {
            OrderCommand::RecordShort { origin: self.origin(), line_id: lid(n), location: loc(l), qty }
        }

        fn pack(&mut self, l: &str, lines: &[(u32, Qty)]) -> OrderCommand {
            OrderCommand::RecordPacked { origin: self.origin(), location: loc(l), lines: line_qtys(lines) }
        }

        fn ship(&mut self, id: &str, l: &str, lines: &[(u32, Qty)]) -> OrderCommand {
            OrderCommand::RecordShipment {
                origin: self.origin(),
                shipment_id: sid(id),
                location: loc(l),
                lines: line_qtys(lines),
            }
        }

        fn deliver(&mut self, id: &str) -> OrderCommand {
            OrderCommand::RecordDelivery { origin: self.origin(), shipment_id: sid(id) }
        }

        /// The large order, allocated at WH-1 and driven to `until`.
        fn large_at(until: OrderState) -> World {
            let mut w = World::given(large());
            let steps: [Stage; 6] = [
                (OrderState::Allocated, |w| w.allocate(&[(1, WH1, 2), (2, WH1, 1)])),
                (OrderState::Picking, |w| w.start_picking()),
                (OrderState::Picked, |w| {
                    let cmd = w.pick(1, WH1, 2);
                    w.run(cmd);
                    w.pick(2, WH1, 1)
                }),
                (OrderState::Packed, |w| w.pack(WH1, &[(1, 2), (2, 1)])),
                (OrderState::Shipped, |w| w.ship("s-1", WH1, &[(1, 2), (2, 1)])),
                (OrderState::Delivered, |w| w.deliver("s-1")),
            ];
            for (state, step) in steps {
                if w.state() == until {
                    break;
                }
                let cmd = step(&mut w);
                w.run(cmd);
                assert_eq!(w.state(), state);
            }
            w
        }

        /// The large order with line 1 shipped alone (s-1) and line 2 still to come.
        fn partially_shipped() -> World {
            let mut w = World::given(large());
            for cmd in
                [w.allocate(&[(1, WH1, 2)]), w.pick(1, WH1, 2), w.pack(WH1, &[(1, 2)]), w.ship("s-1", WH1, &[(1, 2)])]
            {
                w.run(cmd);
            }
            assert_eq!(w.state(), OrderState::PartiallyShipped);
            w
        }
    }

    // ---- create ----

    #[test]
    fn create_records_and_confirms_the_order() {
        let events = Order::decide_create(&large(), &OrderPolicy::default(), NOW).expect("valid");
        let types: Vec<_> = events.iter().map(OrderEvent::type_name).collect();
        assert_eq!(types, ["orderly.order.created", "orderly.order.confirmed"]);
        assert_eq!(events.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
        let order = Order::from_events(&events).expect("rebuilds");
        assert_eq!(order.state(), OrderState::Allocating);
        assert_eq!(order.version(), 2);
        assert_eq!(order.total(), money("90.00"));
        assert_eq!(order.created_at(), NOW);
        assert_eq!(order.lines()[1].line_id.as_str(), "o-1:2");
        assert_eq!(order.outstanding_qty(), 3);
        assert!(!order.shipping_charged() && order.shipping_charge_due());
    }

    #[test]
    fn create_with_complete_sync_allocation_hands_everything_to_picking() {
        let mut new = small();
        for line in &mut new.lines {
            line.allocations = vec![LocationQty { location: loc(WH1), qty: 1 }];
        }
        let events = Order::decide_create(&new, &OrderPolicy::default(), NOW).expect("valid");
        assert_eq!(events.len(), 3);
        let OrderChange::Allocated { allocations, ready_to_pick, state } = &events[2].change else {
            panic!("expected allocated, got {:?}", events[2].change)
        };
        assert!(allocations.is_empty(), "recorded with created, released here");
        assert_eq!(ready_to_pick.len(), 2);
        assert_eq!(*state, OrderState::Allocated);
        assert_eq!(Order::from_events(&events).map(|o| o.state()), Some(OrderState::Allocated));
    }

    #[test]
    fn create_with_partial_sync_allocation_follows_the_split_policy() {
        let mut new = large();
        new.lines[0].allocations = vec![LocationQty { location: loc(WH1), qty: 2 }];
        let events = Order::decide_create(&new, &OrderPolicy::default(), NOW).expect("valid");
        assert_eq!(events.len(), 3, "a large order's synchronous part proceeds");
        assert_eq!(Order::from_events(&events).map(|o| o.state()), Some(OrderState::Allocated));

        let mut new = small();
        new.lines[0].allocations = vec![LocationQty { location: loc(WH1), qty: 1 }];
        let events = Order::decide_create(&new, &OrderPolicy::default(), NOW).expect("valid");
        assert_eq!(events.len(), 2, "a small order holds it for consolidation");
        let order = Order::from_events(&events).expect("rebuilds");
        assert_eq!((order.state(), order.allocated_qty()), (OrderState::Allocating, 1));
    }

    #[test]
    fn create_rejects_invalid_orders() {
        type Edit = fn(&mut NewOrder);
        let cases: Vec<(Edit, Rejection)> = vec![
            (|o| o.lines.clear(), Rejection::NoLines),
            (|o| o.lines = vec![o.lines[0].clone(); 101], Rejection::TooManyLines { max: 100 }),
            (|o| o.lines[0].qty = 0, Rejection::LineQty { line_id: lid(1), max: LINE_QTY_MAX }),
            (|o| o.lines[1].qty = LINE_QTY_MAX + 1, Rejection::LineQty { line_id: lid(2), max: LINE_QTY_MAX }),
            (|o| o.lines[0].unit_price = Money::from_minor(-1), Rejection::UnitPrice { line_id: lid(1) }),
            (|o| o.email = "not-an-address".into(), Rejection::InvalidEmail { max: EMAIL_LEN_MAX }),
            (|o| o.email = "a b@example.com".into(), Rejection::InvalidEmail { max: EMAIL_LEN_MAX }),
            (|o| o.email = "a@b@c".into(), Rejection::InvalidEmail { max: EMAIL_LEN_MAX }),
            (|o| o.delivery_window = Some(DeliveryWindow { start: LATER, end: NOW }), Rejection::DeliveryWindow),
            (
                |o| {
                    o.lines[0].qty = LINE_QTY_MAX;
                    o.lines[0].unit_price = Money::from_minor(MONEY_MINOR_MAX);
                },
                Rejection::TotalTooLarge,
            ),
            (
                |o| o.lines[1].allocations = vec![LocationQty { location: loc(WH1), qty: 2 }],
                Rejection::OverAllocated { line_id: lid(2), unallocated: 1 },
            ),
            (
                |o| o.lines[0].allocations = vec![LocationQty { location: loc(WH1), qty: 1 }; 2],
                Rejection::DuplicateEntry(lid(1)),
            ),
            (
                |o| o.lines[0].allocations = vec![LocationQty { location: loc(WH1), qty: 0 }],
                Rejection::ZeroQty { line_id: lid(1) },
            ),
        ];
        for (edit, expected) in cases {
            let mut new = large();
            edit(&mut new);
            let result = Order::decide_create(&new, &OrderPolicy::default(), NOW);
            assert_eq!(result, Err(OrderError::Rejected(expected)));
        }
    }

    #[test]
    fn create_on_an_existing_order_is_illegal() {
        let w = World::given(large());
        assert_illegal(w.when(&OrderCommand::Create(large())), OrderState::Allocating);
    }

    // ---- allocation and the split policy ----

    #[test]
    fn full_allocation_hands_every_unit_to_picking() {
        let mut w = World::given(large());
        let cmd = w.allocate(&[(1, WH1, 2), (2, WH2, 1)]);
        let event = w.run(cmd);
        assert_eq!(event.type_name(), "orderly.order.allocated");
        let OrderChange::Allocated { ready_to_pick, .. } = &event.change else { panic!("allocated expected") };
        assert_eq!(ready_to_pick.len(), 2);
        assert_eq!(w.state(), OrderState::Allocated);
        assert!(w.order.is_fully_allocated());
        assert_eq!(w.order.line(&lid(2)).and_then(|l| l.allocation_at(&loc(WH2))).map(|a| a.qty), Some(1));
    }

    #[test]
    fn partial_allocation_of_a_large_order_lets_the_allocated_part_proceed() {
        let mut w = World::given(large());
        let cmd = w.allocate(&[(1, WH1, 2)]);
        let event = w.run(cmd);
        let OrderChange::Allocated { ready_to_pick, .. } = &event.change else { panic!("allocated expected") };
        assert_eq!(ready_to_pick.len(), 1);
        assert_eq!(w.state(), OrderState::Allocated);
        assert_eq!(w.order.unallocated_qty(), 1);
    }

    #[test]
    fn partial_allocation_of_a_small_order_waits_for_consolidation() {
        let mut w = World::given(small());
        let cmd = w.allocate(&[(1, WH1, 1)]);
        let event = w.run(cmd);
        assert!(matches!(&event.change, OrderChange::Allocated { ready_to_pick, .. } if ready_to_pick.is_empty()));
        assert_eq!(w.state(), OrderState::Allocating);

        let cmd = w.backorder(&[(2, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Backordered);
        let cmd = w.start_picking();
        assert_illegal(w.when(&cmd), OrderState::Backordered);

        let cmd = w.allocate(&[(2, WH2, 1)]);
        let event = w.run(cmd);
        let OrderChange::Allocated { ready_to_pick, .. } = &event.change else { panic!("allocated expected") };
        assert_eq!(ready_to_pick.len(), 2, "the held line is released with the new one");
        assert_eq!(w.state(), OrderState::Allocated);
        assert_eq!(w.order.backordered_qty(), 0);
    }

    #[test]
    fn the_split_threshold_is_inclusive() {
        let at_threshold = new_order(&[("SKU-A", 1, "25.00"), ("SKU-B", 1, "25.00")]);
        let mut w = World::given(at_threshold.clone());
        let cmd = w.allocate(&[(1, WH1, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Allocated);

        let stricter = OrderPolicy { min_order_value_for_partial: money("50.01") };
        let mut w = World::given_with(at_threshold, stricter);
        let cmd = w.allocate(&[(1, WH1, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Allocating);
    }

    #[test]
    fn allocation_arriving_after_release_goes_straight_to_picking() {
        let mut w = World::given(large());
        for cmd in [w.allocate(&[(1, WH1, 2)]), w.start_picking()] {
            w.run(cmd);
        }
        let cmd = w.allocate(&[(2, WH2, 1)]);
        let event = w.run(cmd);
        let OrderChange::Allocated { ready_to_pick, .. } = &event.change else { panic!("allocated expected") };
        assert_eq!(ready_to_pick.iter().map(|p| p.line_id.clone()).collect::<Vec<_>>(), [lid(2)]);
        assert_eq!(w.state(), OrderState::Picking);
    }

    #[test]
    fn allocation_data_is_checked() {
        let mut w = World::given(large());
        let unknown = OrderCommand::RecordAllocation {
            origin: w.origin(),
            allocations: vec![AllocationEntry {
                line_id: LineId::parse("o-9:1").expect("valid"),
                location: loc(WH1),
                qty: 1,
            }],
        };
        assert!(matches!(rejection(w.when(&unknown)), Rejection::UnknownLine(_)));
        let cmd = w.allocate(&[(1, WH1, 0)]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::ZeroQty { line_id: lid(1) });
        let cmd = w.allocate(&[(1, WH1, 2), (1, WH2, 1)]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::OverAllocated { line_id: lid(1), unallocated: 2 });
        let cmd = w.allocate(&[(1, WH1, 1), (1, WH1, 1)]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::DuplicateEntry(lid(1)));
        let cmd = w.allocate(&[]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::EntryCount { max: ENTRIES_PER_COMMAND_MAX });
        assert_eq!(w.order.version(), 2, "rejections change nothing");
    }

    #[test]
    fn a_line_is_allocated_at_a_bounded_number_of_locations() {
        let mut w = World::given(new_order(&[("SKU-A", 100, "1.00")]));
        let names: Vec<String> = (0..=LOCATIONS_PER_LINE_MAX).map(|i| format!("WH-{i}")).collect();
        for name in &names[..LOCATIONS_PER_LINE_MAX] {
            let cmd = w.allocate(&[(1, name, 1)]);
            w.run(cmd);
        }
        let cmd = w.allocate(&[(1, &names[LOCATIONS_PER_LINE_MAX], 1)]);
        assert_eq!(
            rejection(w.when(&cmd)),
            Rejection::TooManyLocations { line_id: lid(1), max: LOCATIONS_PER_LINE_MAX }
        );
        let cmd = w.allocate(&[(1, &names[0], 1)]);
        w.run(cmd);
    }

    // ---- backorders ----

    #[test]
    fn a_backorder_tells_the_customer_the_delayed_ship_date() {
        let mut w = World::given(large());
        let cmd = w.backorder(&[(1, 2), (2, 1)]);
        let event = w.run(cmd);
        assert_eq!(event.type_name(), "orderly.order.backordered");
        assert!(matches!(event.change, OrderChange::Backordered { expected_ship_date: LATER, .. }));
        assert_eq!(w.state(), OrderState::Backordered);
        assert!(w.state().is_waiting());
        assert_eq!((w.order.expected_ship_date(), w.order.backordered_qty()), (Some(LATER), 3));

        let cmd = w.allocate(&[(1, WH1, 2), (2, WH1, 1)]);
        w.run(cmd);
        assert_eq!((w.state(), w.order.backordered_qty()), (OrderState::Allocated, 0));
    }

    #[test]
    fn a_backorder_does_not_stop_a_large_orders_allocated_part() {
        let mut w = World::given(large());
        let cmd = w.allocate(&[(1, WH1, 2)]);
        w.run(cmd);
        let cmd = w.backorder(&[(2, 1)]);
        let event = w.run(cmd);
        assert_eq!(event.state(), Some(OrderState::Allocated));
        assert_eq!((w.state(), w.order.expected_ship_date()), (OrderState::Allocated, Some(LATER)));
    }

    #[test]
    fn a_backorder_cannot_exceed_the_unallocated_units() {
        let mut w = World::given(large());
        let cmd = w.allocate(&[(1, WH1, 2)]);
        w.run(cmd);
        let cmd = w.backorder(&[(1, 1)]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::BackorderExceedsUnallocated { line_id: lid(1), unallocated: 0 });
        let cmd = w.backorder(&[(2, 1), (2, 1)]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::DuplicateEntry(lid(2)));
    }

    // ---- picking ----

    #[test]
    fn picking_starts_only_with_work_handed_over() {
        let mut w = World::given(large());
        let cmd = w.start_picking();
        assert_illegal(w.when(&cmd), OrderState::Allocating);
        let mut w = World::large_at(OrderState::Allocated);
        let cmd = w.start_picking();
        let event = w.run(cmd);
        assert_eq!((event.type_name(), w.state()), ("orderly.order.picking_started", OrderState::Picking));
        let mut w = World::large_at(OrderState::Picked);
        let cmd = w.start_picking();
        assert_eq!(rejection(w.when(&cmd)), Rejection::NothingToPick);
    }

    #[test]
    fn picks_move_the_order_to_picked_when_every_allocated_unit_is_picked() {
        let mut w = World::large_at(OrderState::Allocated);
        let cmd = w.pick(1, WH1, 1);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Picking, "a pick without start_picking still starts picking");
        let cmd = w.pick(1, WH1, 2);
        let expected =
            Rejection::ExceedsAvailable { step: "pick", line_id: lid(1), location: loc(WH1), qty: 2, available: 1 };
        assert_eq!(rejection(w.when(&cmd)), expected);
        let cmd = w.pick(1, WH2, 1);
        assert_eq!(rejection(w.when(&cmd)), Rejection::NotAllocatedAt { line_id: lid(1), location: loc(WH2) });
        for cmd in [w.pick(1, WH1, 1), w.pick(2, WH1, 1)] {
            w.run(cmd);
        }
        assert_eq!(w.state(), OrderState::Picked);
        assert_eq!(w.order.unpicked_qty(), 0);
    }

    #[test]
    fn a_short_pick_unallocates_the_missing_units() {
        let mut w = World::large_at(OrderState::Picking);
        let cmd = w.pick(1, WH1, 2);
        w.run(cmd);
        let cmd = w.short(2, WH1, 1);
        let event = w.run(cmd);
        assert_eq!(event.type_name(), "orderly.order.pick_shorted");
        assert_eq!(w.state(), OrderState::Picked, "what is left is picked");
        assert_eq!(w.order.line(&lid(2)).map(OrderLine::unallocated_qty), Some(1));

        let cmd = w.backorder(&[(2, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Picked);
        let cmd = w.allocate(&[(2, WH2, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Picking);
    }

    #[test]
    fn shorting_everything_sends_the_order_back_to_allocation() {
        let mut w = World::large_at(OrderState::Picking);
        for cmd in [w.short(1, WH1, 2), w.short(2, WH1, 1)] {
            w.run(cmd);
        }
        assert_eq!((w.state(), w.order.allocated_qty()), (OrderState::Allocating, 0));
        let cmd = w.allocate(&[(1, WH2, 2), (2, WH2, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Allocated);
        let cmd = w.short(1, WH2, 3);
        assert!(matches!(rejection(w.when(&cmd)), Rejection::ExceedsAvailable { step: "short", .. }));
    }

    #[test]
    fn a_stock_loss_deallocates_and_the_backorder_then_waits_for_stock() {
        let mut w = World::large_at(OrderState::Allocated);
        let origin = w.origin();
        let lost = |n, qty| AllocationEntry { line_id: lid(n), location: loc(WH1), qty };
        let cmd = OrderCommand::RecordDeallocation { origin, allocations: vec![lost(1, 2), lost(2, 1)] };
        let event = w.run(cmd);
        assert_eq!(event.type_name(), "orderly.order.deallocated");
        assert_eq!((w.state(), w.order.allocated_qty()), (OrderState::Allocating, 0));
        let cmd = w.backorder(&[(1, 2), (2, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Backordered);
        let cmd = w.allocate(&[(1, WH1, 2), (2, WH1, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Allocated);
        let origin = w.origin();
        let too_much = OrderCommand::RecordDeallocation { origin, allocations: vec![lost(1, 3)] };
        assert!(matches!(rejection(w.when(&too_much)), Rejection::ExceedsAvailable { .. }));
    }

    // ---- packing and shipping ----

    #[test]
    fn packing_every_picked_unit_packs_the_order() {
        let mut w = World::large_at(OrderState::Picked);
        let cmd = w.pack(WH1, &[(1, 1)]);
        w.run(cmd);
        assert_eq!(w.state(), OrderState::Picked);
        let cmd = w.pack(WH1, &[(1, 2)]);
        assert!(matches!(rejection(w.when(&cmd)), Rejection::ExceedsAvailable { step: "pack", available: 1, .. }));
        let cmd = w.pack(WH1, &[(1, 1), (2, 1)]);
        let event = w.run(cmd);
        assert_eq!((event.type_name(), w.state()), ("orderly.order.packed", OrderState::Packed));
    }

    #[test]
    fn packing_needs_picked_units() {
        let mut w = World::large_at(OrderState::Allocated);
        let cmd = w.pack(WH1, &[(1, 1)]);
        assert!(matches!(rejection(w.when(&cmd)), Rejection::ExceedsAvailable { step: "pack", available: 0, .. }));
    }

    #[test]
    fn shipping_everything_ships_the_order_and_charges_shipping() {
        let mut w = World::large_at(OrderState::Packed);
        let cmd = w.ship("s-1", WH1, &[(1, 2), (2, 1)]);
        let event = w.run(cmd);
        assert_eq!(event.type_name(), "orderly.order.shipped");
        assert!(matches!(event.change, OrderChange::Shipped { charge_shipping: true, .. }));
        assert_eq!(w.state(), OrderState::Shipped);
        assert!(w.order.shipping_charged() && !w.order.shipping_charge_due());
        assert_eq!(w.order.shipments().len(), 1);
    }

    #[test]
    fn a_split_order_charges_shipping_once_over_two_shipments() {
        let mut w = World::partially_shipped();
        assert!(w.order.shipping_charged());
        for cmd in [w.allocate(&[(2, WH2, 1)]), w.pick(2, WH2, 1), w.pack(WH2, &[(2, 1)])] {
            w.run(cmd);
        }
        assert_eq!(w.state(), OrderState::PartiallyShipped);
        let cmd = w.ship("s-2", WH2, &[(2, 1)]);
        let event = w.run(cmd);
        assert!(matches!(event.change, OrderChange::Shipped { charge_shipping: false, .. }));
        assert_eq!((event.type_name(), w.state()), ("orderly.order.shipped", OrderState::Shipped));
    }

    #[test]
    fn the_first_of_several_shipments_is_a_partial_shipment() {
        let w = World::partially_shipped();
        assert_eq!(w.order.shipments()[0].lines[0].qty, 2);
        assert_eq!(w.order.outstanding_qty(), 1);
    }

    #[test]
    fn shipment_data_is_checked() {
        let mut w = World::partially_shipped();
        let cmd = w.ship("s-1", WH1, &[(1, 1)]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::DuplicateShipment(sid("s-1")));
        let cmd = w.ship("s-2", WH1, &[(1, 1)]);
        assert!(matches!(rejection(w.when(&cmd)), Rejection::ExceedsAvailable { step: "ship", available: 0, .. }));
        let cmd = w.ship("s-2", WH1, &[]);
        assert_eq!(rejection(w.when(&cmd)), Rejection::EntryCount { max: ENTRIES_PER_COMMAND_MAX });
    }

    // ---- delivery ----

    #[test]
    fn the_order_is_delivered_when_its_last_shipment_arrives() {
        let mut w = World::partially_shipped();
        let cmd = w.deliver("s-1");
        let event = w.run(cmd);
        assert_eq!((event.type_name(), w.state()), ("orderly.order.shipment_delivered", OrderState::PartiallyShipped));
        let cmd = w.deliver("s-1");
        assert_eq!(rejection(w.when(&cmd)), Rejection::AlreadyDelivered(sid("s-1")));
        let cmd = w.deliver("s-9");
        assert_eq!(rejection(w.when(&cmd)), Rejection::UnknownShipment(sid("s-9")));
        for cmd in
            [w.allocate(&[(2, WH2, 1)]), w.pick(2, WH2, 1), w.pack(WH2, &[(2, 1)]), w.ship("s-2", WH2, &[(2, 1)])]
        {
            w.run(cmd);
        }
        let cmd = w.deliver("s-2");
        let event = w.run(cmd);
        assert_eq!((event.type_name(), w.state()), ("orderly.order.delivered", OrderState::Delivered));
        assert!(w.state().is_terminal());
        let cmd = w.deliver("s-2");
        assert_illegal(w.when(&cmd), OrderState::Delivered);
    }

    #[test]
    fn delivery_before_anything_shipped_is_illegal() {
        let mut w = World::large_at(OrderState::Packed);
        let cmd = w.deliver("s-1");
        assert_illegal(w.when(&cmd), OrderState::Packed);
    }

    // ---- cancel ----

    #[test]
    fn cancel_before_shipping_releases_every_allocation() {
        let stages = [
            OrderState::Allocating,
            OrderState::Allocated,
            OrderState::Picking,
            OrderState::Picked,
            OrderState::Packed,
        ];
        for stage in stages {
            let mut w = World::large_at(stage);
            let event = w.run(OrderCommand::Cancel { reason: "customer asked".into() });
            assert_eq!((event.type_name(), w.state()), ("orderly.order.canceled", OrderState::Canceled));
            let OrderChange::Canceled { lines, release, .. } = &event.change else { panic!("canceled expected") };
            assert_eq!(lines.iter().map(|l| l.qty).sum::<Qty>(), 3, "{stage}");
            let released: Qty = release.iter().map(|r| r.reserved_qty + r.picked_qty).sum();
            let picked: Qty = release.iter().map(|r| r.picked_qty).sum();
            let expect_picked = if matches!(stage, OrderState::Picked | OrderState::Packed) { 3 } else { 0 };
            assert_eq!(
                (released, picked),
                (if stage == OrderState::Allocating { 0 } else { 3 }, expect_picked),
                "{stage}"
            );
            assert_eq!((w.order.allocated_qty(), w.order.outstanding_qty()), (0, 0), "{stage}");
            assert!(!w.order.shipping_charged());
            assert_eq!(w.order.cancel_reason(), Some("customer asked"));
        }
    }

    #[test]
    fn cancel_releases_allocations_held_for_consolidation() {
        let mut w = World::given(small());
        let cmd = w.allocate(&[(1, WH1, 1)]);
        w.run(cmd);
        let cmd = w.backorder(&[(2, 1)]);
        w.run(cmd);
        let event = w.run(OrderCommand::Cancel { reason: String::new() });
        let OrderChange::Canceled { release, .. } = &event.change else { panic!("canceled expected") };
        assert_eq!(release.len(), 1);
        assert_eq!((release[0].line_id.clone(), release[0].reserved_qty), (lid(1), 1));
        assert_eq!(w.order.backordered_qty(), 0);
    }

    #[test]
    fn canceling_the_rest_of_a_partially_shipped_order_never_charges_shipping_again() {
        let mut w = World::partially_shipped();
        let cmd = w.allocate(&[(2, WH2, 1)]);
        w.run(cmd);
        let event = w.run(OrderCommand::Cancel { reason: "rest no longer wanted".into() });
        let OrderChange::Canceled { lines, release, .. } = &event.change else { panic!("canceled expected") };
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].line_id.clone(), lines[0].qty), (lid(2), 1));
        assert_eq!(release.len(), 1, "only the unshipped rest is released");
        assert_eq!((release[0].location.clone(), release[0].reserved_qty), (loc(WH2), 1));
        assert_eq!(w.state(), OrderState::Canceled);
        assert!(w.order.shipping_charged(), "the one charge stays; nothing is charged again");

        let cmd = w.deliver("s-1");
        let event = w.run(cmd);
        assert_eq!((event.type_name(), w.state()), ("orderly.order.shipment_delivered", OrderState::Canceled));
    }

    #[test]
    fn cancel_is_illegal_once_everything_shipped() {
        for stage in [OrderState::Shipped, OrderState::Delivered] {
            let w = World::large_at(stage);
            assert_illegal(w.when(&OrderCommand::Cancel { reason: String::new() }), stage);
        }
        let mut w = World::given(large());
        w.run(OrderCommand::Cancel { reason: String::new() });
        assert_illegal(w.when(&OrderCommand::Cancel { reason: String::new() }), OrderState::Canceled);
        let too_long = OrderCommand::Cancel { reason: "x".repeat(REASON_LEN_MAX + 1) };
        let w = World::given(large());
        assert_eq!(rejection(w.when(&too_long)), Rejection::ReasonTooLong { max: REASON_LEN_MAX });
    }

    // ---- returns ----

    #[test]
    fn a_delivered_order_can_be_returned() {
        let mut w = World::large_at(OrderState::Delivered);
        assert_illegal(w.when(&OrderCommand::RecordReturn { location: loc(WH1) }), OrderState::Delivered);
        let event = w.run(OrderCommand::RequestReturn { reason: "wrong size".into() });
        assert_eq!((event.type_name(), w.state()), ("orderly.order.return_requested", OrderState::ReturnRequested));
        assert_eq!(w.order.return_reason(), Some("wrong size"));
        let event = w.run(OrderCommand::RecordReturn { location: loc(WH1) });
        assert_eq!((event.type_name(), w.state()), ("orderly.order.returned", OrderState::Returned));
        let OrderChange::Returned { lines, .. } = &event.change else { panic!("returned expected") };
        assert_eq!(lines.iter().map(|l| l.qty).sum::<Qty>(), 3);
        assert_eq!(w.order.lines()[0].returned, 2);
    }

    #[test]
    fn returns_are_illegal_before_delivery() {
        let w = World::large_at(OrderState::Shipped);
        assert_illegal(w.when(&OrderCommand::RequestReturn { reason: String::new() }), OrderState::Shipped);
        assert_illegal(w.when(&OrderCommand::RecordReturn { location: loc(WH1) }), OrderState::Shipped);
    }

    // ---- stale and duplicate events ----

    #[test]
    fn stale_and_duplicate_sequences_are_rejected() {
        let mut w = World::given(large());
        let origin = |s: &str, n| Origin::new(s, n);
        let allocate = |origin: Origin| OrderCommand::RecordAllocation {
            origin,
            allocations: vec![AllocationEntry { line_id: lid(1), location: loc(WH1), qty: 1 }],
        };
        w.run(allocate(origin("/orderly/inventory", 5)));
        assert_eq!(w.order.last_seen("/orderly/inventory"), 5);
        for sequence in [0, 3, 5] {
            let expected = OrderError::Stale { source: "/orderly/inventory".into(), sequence, last_seen: 5 };
            assert_eq!(w.when(&allocate(origin("/orderly/inventory", sequence))), Err(expected));
        }
        w.run(allocate(origin("/orderly/inventory", 9)));
        w.run(OrderCommand::StartPicking { origin: origin("/orderly/picking", 1) });
        assert_eq!(w.order.last_seen("/orderly/picking"), 1);
    }

    #[test]
    fn staleness_is_checked_before_the_state() {
        let mut w = World::given(large());
        let cmd = w.backorder(&[(1, 1)]);
        w.run(cmd.clone());
        w.run(OrderCommand::Cancel { reason: String::new() });
        assert!(matches!(w.when(&cmd), Err(OrderError::Stale { last_seen: 1, .. })));
    }

    #[test]
    fn event_sources_are_checked_and_bounded() {
        let mut w = World::given(large());
        let backorder = |source: String| OrderCommand::RecordBackorder {
            origin: Origin::new(source, 1),
            lines: line_qtys(&[(1, 1)]),
            expected_ship_date: LATER,
        };
        assert_eq!(rejection(w.when(&backorder(String::new()))), Rejection::InvalidSource { max: SOURCE_LEN_MAX });
        assert_eq!(
            rejection(w.when(&backorder("s".repeat(SOURCE_LEN_MAX + 1)))),
            Rejection::InvalidSource { max: SOURCE_LEN_MAX }
        );
        for i in 0..SOURCES_PER_ORDER_MAX {
            w.run(backorder(format!("/source/{i}")));
        }
        let overflow = backorder("/source/new".into());
        assert_eq!(rejection(w.when(&overflow)), Rejection::TooManySources { max: SOURCES_PER_ORDER_MAX });
    }

    // ---- apply and replay ----

    #[test]
    fn replaying_an_applied_event_changes_nothing() {
        let mut w = World::given(large());
        for cmd in [w.allocate(&[(1, WH1, 2)]), w.pick(1, WH1, 1)] {
            w.run(cmd);
        }
        let events = w.history.clone();
        let live = w.order.clone();
        for event in &events {
            w.order.apply(event);
        }
        assert_eq!(w.order, live);
        assert_eq!(Order::from_events(&events), Some(live.clone()));

        let mut foreign = events[3].clone();
        foreign.order_id = OrderId::parse("o-2").expect("valid");
        foreign.sequence = 4;
        w.order.apply(&foreign);
        assert_eq!(w.order, live, "another order's event is ignored");
    }

    #[test]
    fn history_must_start_with_creation() {
        let events = Order::decide_create(&large(), &OrderPolicy::default(), NOW).expect("valid");
        assert_eq!(Order::from_events(&events[1..]), None);
        assert_eq!(Order::from_events(&[]), None);
    }

    #[test]
    fn terminal_orders_refuse_every_command_without_panicking() {
        let mut canceled = World::given(large());
        canceled.run(OrderCommand::Cancel { reason: String::new() });
        let mut returned = World::large_at(OrderState::Delivered);
        returned.run(OrderCommand::RequestReturn { reason: String::new() });
        returned.run(OrderCommand::RecordReturn { location: loc(WH1) });
        for mut w in [World::large_at(OrderState::Delivered), canceled, returned] {
            let state = w.state();
            let commands = [
                OrderCommand::Create(large()),
                w.allocate(&[(1, WH1, 1)]),
                w.backorder(&[(1, 1)]),
                w.start_picking(),
                w.pick(1, WH1, 1),
                w.short(1, WH1, 1),
                w.pack(WH1, &[(1, 1)]),
                w.ship("s-9", WH1, &[(1, 1)]),
                OrderCommand::Cancel { reason: String::new() },
                OrderCommand::RecordReturn { location: loc(WH1) },
            ];
            for cmd in commands {
                assert!(w.when(&cmd).is_err(), "{} accepted in {state}", cmd.name());
            }
            assert!(state.is_terminal());
        }
    }

    // ---- wire formats ----

    #[test]
    fn events_orders_and_commands_round_trip_as_json() {
        let mut w = World::partially_shipped();
        let cmd = w.deliver("s-1");
        w.run(cmd.clone());
        let events = w.history.clone();
        let json = serde_json::to_value(&events[1]).expect("serializable");
        assert_eq!(json["change"]["type"], "confirmed.v1");
        assert_eq!(json["order_id"], "o-1");
        let back: Vec<OrderEvent> =
            serde_json::from_str(&serde_json::to_string(&events).expect("serializable")).expect("parses");
        assert_eq!(back, events);
        let order: Order =
            serde_json::from_value(serde_json::to_value(&w.order).expect("serializable")).expect("parses");
        assert_eq!(order, w.order);
        let json = serde_json::to_value(&cmd).expect("serializable");
        assert_eq!(json["command"], "record_delivery");
        assert_eq!(serde_json::from_value::<OrderCommand>(json).ok(), Some(cmd));
        assert_eq!(serde_json::to_value(OrderState::PartiallyShipped).ok(), Some("partially_shipped".into()));
    }

    #[test]
    fn every_event_type_is_in_the_catalog() {
        let mut split = World::partially_shipped();
        for cmd in [split.allocate(&[(2, WH2, 1)]), split.start_picking(), split.short(2, WH2, 1), split.deliver("s-1")]
        {
            split.run(cmd);
        }
        split.run(OrderCommand::Cancel { reason: String::new() });
        let mut backordered = World::given(large());
        let cmd = backordered.backorder(&[(1, 1)]);
        backordered.run(cmd);
        let mut returned = World::large_at(OrderState::Delivered);
        returned.run(OrderCommand::RequestReturn { reason: String::new() });
        returned.run(OrderCommand::RecordReturn { location: loc(WH1) });
        let events: Vec<OrderEvent> = [split, backordered, returned].into_iter().flat_map(|w| w.history).collect();
        let names: BTreeSet<&str> = events.iter().map(OrderEvent::type_name).collect();
        assert_eq!(names.len(), 15, "every kind of order event is covered: {names:?}");
        for event in &events {
            assert!(!matches!(event.event_type(), EventType::Unknown(_)), "{} is not catalogued", event.type_name());
            assert_eq!(event.event_type().domain(), "order");
        }
    }

    #[test]
    fn states_have_stable_names() {
        for state in OrderState::ALL {
            assert_eq!(OrderState::parse(state.as_str()), Some(state));
            assert_eq!(state.to_string(), state.as_str());
        }
        let terminal: Vec<_> = OrderState::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [OrderState::Delivered, OrderState::Canceled, OrderState::Returned]);
        assert_eq!(OrderState::parse("lost"), None);
    }

    #[test]
    fn errors_read_as_sentences() {
        let stale = OrderError::Stale { source: "/orderly/picking".into(), sequence: 3, last_seen: 4 };
        assert_eq!(stale.to_string(), "stale event: /orderly/picking sequence 3 is not newer than 4");
        let illegal = OrderError::IllegalTransition { state: OrderState::Shipped, command: "cancel" };
        assert_eq!(illegal.to_string(), "cannot cancel an order that is shipped");
        let rejected = OrderError::from(Rejection::NothingToPick);
        assert!(std::error::Error::source(&rejected).is_some());
    }
}
