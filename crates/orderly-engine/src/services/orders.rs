//! The orders service: the order state machine owns the truth. API commands
//! and other services' events become order commands; each resulting order
//! event is published with the order's version as its sequence. An event
//! that is stale (not newer than what was seen from its source) or illegal in
//! the order's state changes nothing and is counted. Producers do not order
//! their streams with each other, so an event that depends on a fact from
//! another producer not recorded yet (a re-allocation before its short pick,
//! a package before its picks) is parked with its order, durably, and applied
//! once the order has changed enough for it.

use super::common::{ApiError, Reply};
use crate::events::{
    self, AllocationData, InventoryBackordered, InventoryReserved, LabelCreated, PackCompleted, PickData,
    ShipmentDelivered,
};
use crate::ports::Row;
use crate::prefetch::Reads;
use crate::runtime::{DEAD_LETTERS, DeadLetter, EventError, Service, Tx};
use crate::table::{CACHE_ENTRIES_MAX, Staged, Table};
use orderly_domain::event::{Envelope, EventData, EventType};
use orderly_domain::order::{
    AllocationEntry, LineQty, NewOrder, Order, OrderChange, OrderCommand, OrderError, OrderEvent, OrderPolicy,
    OrderState, Origin, Rejection,
};
use orderly_domain::{LocationId, OrderId, Priority, ShipmentId, Timestamp};
use serde::{Deserialize, Serialize};

/// The table mapping a caller's scoped idempotency key to the order it created.
pub const ORDER_KEYS: &str = "order_keys";

/// A caller's scoped idempotency key and the fingerprint of its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    /// The key, scoped to the caller (see `orderly_http::idempotency::scoped_key`).
    pub key: String,
    /// A hash of the request body, to tell a retry from a reuse of the key.
    pub fingerprint: u64,
}

/// The order a request key created (table [`ORDER_KEYS`]), stored in the
/// same commit as the order, so a retry whose first answer was lost to a
/// crash or a timeout finds the order instead of creating a second one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedOrder {
    /// The order.
    pub order_id: OrderId,
    /// The fingerprint of the request that created it.
    pub fingerprint: u64,
}

/// The table of order ids voided before their order was created (a
/// synchronous reservation whose order never committed).
pub const VOIDED_ORDERS: &str = "voided_orders";

/// An order id that will never be used: its synchronous reservation was
/// released because the order did not exist when inventory asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoidedOrder {
    /// When it was voided.
    pub voided_at: Timestamp,
}

/// Commands from the API.
pub enum Command {
    /// Creates an order (synchronous allocations, if any, are in its lines).
    Create {
        /// The order.
        new: Box<NewOrder>,
        /// The caller's idempotency key: a second create with it answers the first order.
        key: Option<RequestKey>,
        /// Answer.
        reply: Reply<Order>,
    },
    /// Cancels an order (or the unshipped rest of it).
    Cancel {
        /// Which.
        order_id: OrderId,
        /// Why.
        reason: String,
        /// Answer.
        reply: Reply<Order>,
    },
    /// The customer asks to return a delivered order.
    RequestReturn {
        /// Which.
        order_id: OrderId,
        /// Why.
        reason: String,
        /// Answer.
        reply: Reply<Order>,
    },
    /// Reconciliation: the orders with these ids that exist.
    ReconcileView {
        /// Which.
        order_ids: Vec<OrderId>,
        /// Answer.
        reply: Reply<Vec<Order>>,
    },
    /// The return arrived at a location.
    RecordReturn {
        /// Which.
        order_id: OrderId,
        /// Where it arrived.
        location: LocationId,
        /// Answer.
        reply: Reply<Order>,
    },
}

/// Most events one order may have waiting for an earlier fact.
pub const PARKED_PER_ORDER_MAX: usize = 64;

/// The orders service.
pub struct Orders {
    orders: Table<Order>,
    parked: Table<Vec<Envelope>>,
    keys: Table<KeyedOrder>,
    voided: Table<VoidedOrder>,
    policy: OrderPolicy,
}

impl Orders {
    /// An orders service with the given split policy.
    pub fn new(policy: OrderPolicy) -> Orders {
        Orders {
            orders: Table::new("orders", CACHE_ENTRIES_MAX, |o: &Order| Some(o.state().as_str().to_owned()))
                .settled_when(|o| {
                    matches!(o.state(), OrderState::Delivered | OrderState::Canceled | OrderState::Returned)
                }),
            // A key is looked up once per create (a retry reloads it): nothing to keep.
            keys: Table::new(ORDER_KEYS, CACHE_ENTRIES_MAX, |_| None).settled_when(|_| true),
            // Asked for each event about an order, and almost never there.
            parked: Table::new("parked", CACHE_ENTRIES_MAX, |_| None).remembering_absent(),
            // Read once per synchronous create: nothing to keep.
            voided: Table::new(VOIDED_ORDERS, CACHE_ENTRIES_MAX, |_| None).settled_when(|_| true),
            policy,
        }
    }

    async fn create(&mut self, tx: &mut Tx, new: &NewOrder, key: Option<RequestKey>) -> Result<Order, ApiError> {
        if let Some(k) = &key
            && let Some(existing) = self.keyed(tx, k).await?
        {
            return Ok(existing);
        }
        // Ids are server-made UUIDv7s, so a new id cannot exist in the store;
        // only a repeat within the cache is possible (a client-chosen id).
        if self.orders.get(new.order_id.as_str()).is_some() {
            return Err(ApiError::conflict("order-exists", format!("order {} already exists", new.order_id)));
        }
        // Stock reserved before acknowledgement is held for this id until
        // the order reaches inventory, unless this service voided the id
        // first (inventory asked after the hold lifetime and the order did
        // not exist): then the units are gone and the order must not be.
        let synchronous = new.lines.iter().any(|l| !l.allocations.is_empty());
        if synchronous && self.voided.load(tx.store(), new.order_id.as_str()).await? {
            return Err(ApiError::Unavailable(format!(
                "the stock reserved for order {} was released before the order was created; retry the request",
                new.order_id
            )));
        }
        let evs = Order::decide_create(new, &self.policy, tx.now).map_err(order_error)?;
        let order = Order::from_events(&evs)
            .ok_or_else(|| ApiError::Unavailable("order history must start with created".into()))?;
        for ev in &evs {
            publish(tx, &order, ev);
        }
        tx.ctx().metrics.inc("orderly_orders_created_total", &[("priority", order.priority().as_str())], 1);
        self.orders.insert(order.id().as_str().to_owned(), order.clone());
        // Events park only behind an order that exists: a new one has none.
        self.parked.known_absent(order.id().as_str());
        if let Some(k) = key {
            self.keys.insert(k.key, KeyedOrder { order_id: order.id().clone(), fingerprint: k.fingerprint });
        }
        Ok(order)
    }

    /// The order a request key already created, if any; a different request
    /// under the same key is refused.
    async fn keyed(&mut self, tx: &mut Tx, key: &RequestKey) -> Result<Option<Order>, ApiError> {
        if !self.keys.load(tx.store(), &key.key).await? {
            return Ok(None);
        }
        let found = self.keys.get(&key.key).cloned().expect("loaded above");
        if found.fingerprint != key.fingerprint {
            return Err(key_reuse());
        }
        if !self.orders.load(tx.store(), found.order_id.as_str()).await? {
            return Err(ApiError::Unavailable(format!("order {} of an idempotency key is missing", found.order_id)));
        }
        Ok(self.orders.get(found.order_id.as_str()).cloned())
    }

    async fn execute_api(&mut self, tx: &mut Tx, order_id: &OrderId, cmd: OrderCommand) -> Result<Order, ApiError> {
        if !self.orders.load(tx.store(), order_id.as_str()).await? {
            return Err(ApiError::NotFound(format!("order {order_id}")));
        }
        let order = self.orders.get_mut(order_id.as_str()).expect("loaded above");
        let evs = order.execute(&cmd, &self.policy, tx.now).map_err(order_error)?;
        let order = order.clone();
        for ev in &evs {
            publish(tx, &order, ev);
        }
        Ok(order)
    }

    /// Inventory asks whether the order of a synchronous reservation exists
    /// (`hold.unclaimed`). If it does, its `order.created` is on its way and
    /// will consume the hold: nothing to say. If not, the id is voided in
    /// this commit (a create still in flight for it is refused from now on)
    /// and inventory is told to release the hold (`order.voided`).
    async fn on_hold_unclaimed(&mut self, tx: &mut Tx, env: &Envelope) -> Result<(), EventError> {
        let ask: events::HoldUnclaimed = events::parse(env)?;
        if self.orders.load(tx.store(), ask.order_id.as_str()).await? {
            return Ok(());
        }
        if !self.voided.load(tx.store(), ask.order_id.as_str()).await? {
            self.voided.insert(ask.order_id.as_str().to_owned(), VoidedOrder { voided_at: tx.now });
        }
        tx.ctx().metrics.inc("orderly_voided_orders_total", &[], 1);
        tracing::info!(order_id = %ask.order_id, hold_id = %ask.hold_id, "synchronous reservation of an order never created: voided");
        let data = events::OrderVoided { order_id: ask.order_id.clone(), hold_id: ask.hold_id };
        tx.emit(EventType::OrderVoided, ask.order_id.as_str(), events::data(&data));
        Ok(())
    }

    async fn on_bus_event(&mut self, tx: &mut Tx, env: &Envelope) -> Result<(), EventError> {
        if env.event_type == EventType::HoldUnclaimed {
            return self.on_hold_unclaimed(tx, env).await;
        }
        let cmds = commands_for(env)?;
        if cmds.is_empty() {
            return Ok(());
        }
        let order_id = OrderId::parse(env.subject.as_str()).map_err(|e| EventError::Poison(format!("subject: {e}")))?;
        if !self.orders.load(tx.store(), order_id.as_str()).await? {
            return Err(EventError::Poison(format!("{} for unknown order {order_id}", env.event_type)));
        }
        self.parked.load(tx.store(), order_id.as_str()).await?;
        let behind = self.parked.get(order_id.as_str()).is_some_and(|p| p.iter().any(|e| e.source == env.source));
        if behind {
            // An earlier event of the same source waits: this one keeps its place.
            return self.park(tx, &order_id, env);
        }
        match self.apply_event(tx, &order_id, env, &cmds) {
            Applied::Done => {
                self.unpark(tx, &order_id);
                Ok(())
            }
            Applied::Early => self.park(tx, &order_id, env),
            Applied::Poison(detail) => Err(EventError::Poison(detail)),
        }
    }

    /// Applies an event's commands to its (loaded) order.
    fn apply_event(&mut self, tx: &mut Tx, order_id: &OrderId, env: &Envelope, cmds: &[OrderCommand]) -> Applied {
        let metrics = tx.ctx().metrics.clone();
        let before = self.orders.get(order_id.as_str()).map(Order::state);
        for (i, cmd) in cmds.iter().enumerate() {
            let order = self.orders.get_mut(order_id.as_str()).expect("loaded by the caller");
            let state = order.state();
            match order.execute(cmd, &self.policy, tx.now) {
                Ok(evs) => {
                    let order = order.clone();
                    for ev in &evs {
                        publish(tx, &order, ev);
                    }
                }
                Err(OrderError::Stale { .. }) => {
                    metrics.inc("orderly_stale_events_total", &[("consumer", "orders")], 1)
                }
                Err(OrderError::IllegalTransition { .. }) => {
                    metrics.inc("orderly_ignored_events_total", &[("consumer", "orders")], 1);
                    tracing::debug!(order_id = %order_id, event_id = %env.id, event_type = %env.event_type, "event not applicable in the order's state");
                }
                // Events from different producers race (a short pick's
                // re-allocation can overtake the pick itself): such a
                // rejection only means "not yet", so the event waits.
                // A shipment labeled while the order was being canceled: the
                // cancel came first here (its label was ignored), so its
                // delivery has nothing to apply to either.
                Err(OrderError::Rejected(Rejection::UnknownShipment(_))) if state == OrderState::Canceled => {
                    metrics.inc("orderly_ignored_events_total", &[("consumer", "orders")], 1);
                    tracing::info!(order_id = %order_id, event_id = %env.id, "delivery of a shipment labeled after its order was canceled");
                }
                Err(OrderError::Rejected(r)) if i == 0 && waits_for_another_fact(&r) => return Applied::Early,
                Err(OrderError::Rejected(r)) if i == 0 => return Applied::Poison(r.to_string()),
                Err(e) => {
                    tracing::warn!(order_id = %order_id, event_id = %env.id, error = %e, "follow-up command rejected")
                }
            }
        }
        let after = self.orders.get(order_id.as_str()).map(Order::state);
        if before == Some(OrderState::Allocating) && after != before {
            // The order's first allocation decision: allocated (in part) or backordered.
            metrics.inc("orderly_orders_decided_total", &[], 1);
        }
        Applied::Done
    }

    /// Keeps an event that came before a fact it depends on, in the same commit.
    fn park(&mut self, tx: &mut Tx, order_id: &OrderId, env: &Envelope) -> Result<(), EventError> {
        let waiting = self.parked.get(order_id.as_str()).map_or(0, Vec::len);
        if waiting >= PARKED_PER_ORDER_MAX {
            return Err(EventError::Poison(format!("{waiting} events already wait for order {order_id}")));
        }
        tx.ctx().metrics.inc("orderly_parked_events_total", &[("consumer", "orders")], 1);
        tracing::debug!(order_id = %order_id, event_id = %env.id, event_type = %env.event_type, "event parked until an earlier fact arrives");
        match self.parked.get_mut(order_id.as_str()) {
            Some(p) => p.push(env.clone()),
            None => self.parked.insert(order_id.as_str().to_owned(), vec![env.clone()]),
        }
        Ok(())
    }

    /// Retries an order's parked events after it changed: the oldest of each
    /// source, again and again while one applies. One that can never apply
    /// goes to the dead letters.
    fn unpark(&mut self, tx: &mut Tx, order_id: &OrderId) {
        let mut progress = true;
        while progress {
            progress = false;
            let parked = self.parked.get(order_id.as_str()).cloned().unwrap_or_default();
            let mut sources = std::collections::BTreeSet::new();
            for (i, env) in parked.iter().enumerate() {
                if !sources.insert(env.source.clone()) {
                    continue;
                }
                let outcome = match commands_for(env) {
                    Ok(cmds) => self.apply_event(tx, order_id, env, &cmds),
                    Err(e) => Applied::Poison(e.to_string()),
                };
                if let Applied::Poison(detail) = &outcome {
                    dead_letter(tx, env, detail);
                }
                if !matches!(outcome, Applied::Early) {
                    self.take_parked(order_id, i);
                    progress = true;
                    break;
                }
            }
        }
    }

    fn take_parked(&mut self, order_id: &OrderId, i: usize) {
        let empty = match self.parked.get_mut(order_id.as_str()) {
            Some(p) => {
                p.remove(i);
                p.is_empty()
            }
            None => false,
        };
        if empty {
            self.parked.remove(order_id.as_str());
        }
    }
}

/// What became of an event applied to its order.
enum Applied {
    /// Applied (or ignored as stale or not applicable).
    Done,
    /// It depends on a fact from another producer not recorded yet.
    Early,
    /// It can never apply.
    Poison(String),
}

/// A rejection that only means a fact from another producer has not been
/// recorded yet: a re-allocation before the short pick that freed its units,
/// a package before its picks, a label before its package. Producers do not
/// order their streams with each other, so such an event waits for that fact.
fn waits_for_another_fact(r: &Rejection) -> bool {
    matches!(
        r,
        Rejection::OverAllocated { .. }
            | Rejection::BackorderExceedsUnallocated { .. }
            | Rejection::ExceedsAvailable { .. }
            | Rejection::NotAllocatedAt { .. }
    )
}

/// Records a parked event that can never apply as a dead letter, replayable by ops.
fn dead_letter(tx: &mut Tx, env: &Envelope, detail: &str) {
    let producer = env.source.rsplit('/').next().unwrap_or_default().to_owned();
    let letter = DeadLetter {
        id: env.id.clone(),
        consumer: "orders".to_owned(),
        producer: producer.clone(),
        error: format!("poison: {detail}"),
        attempts: 1,
        failed_at: tx.now,
        envelope: env.clone(),
    };
    let doc = serde_json::to_vec(&letter).expect("a dead letter always serializes");
    tx.put_row(Row { table: DEAD_LETTERS, key: env.id.clone(), idx: Some(producer), doc });
    tx.ctx().metrics.inc("orderly_dead_letters_total", &[("consumer", "orders")], 1);
}

/// The order commands an event from another service stands for.
fn commands_for(env: &Envelope) -> Result<Vec<OrderCommand>, EventError> {
    let origin = Origin::new(env.source.clone(), env.sequence);
    let entries = |a: &[AllocationData]| {
        a.iter()
            .map(|a| AllocationEntry { line_id: a.line_id.clone(), location: a.location.clone(), qty: a.qty })
            .collect()
    };
    let line_qty =
        |a: &[AllocationData]| a.iter().map(|a| LineQty { line_id: a.line_id.clone(), qty: a.qty }).collect::<Vec<_>>();
    Ok(match env.event_type {
        EventType::InventoryReserved => {
            let r: InventoryReserved = events::parse(env)?;
            vec![OrderCommand::RecordAllocation { origin, allocations: entries(&r.allocations) }]
        }
        EventType::InventoryBackordered => {
            let b: InventoryBackordered = events::parse(env)?;
            let lines = b.lines.iter().map(|l| LineQty { line_id: l.line_id.clone(), qty: l.qty }).collect();
            vec![OrderCommand::RecordBackorder { origin, lines, expected_ship_date: b.expected_ship_date }]
        }
        EventType::InventoryDeallocated => {
            let d: events::Deallocated = events::parse(env)?;
            vec![OrderCommand::RecordDeallocation { origin, allocations: entries(&d.allocations) }]
        }
        EventType::PickRequested => vec![OrderCommand::StartPicking { origin }],
        EventType::PickCompleted => {
            let p: PickData = events::parse(env)?;
            vec![OrderCommand::RecordPicked { origin, line_id: p.line_id, location: p.location, qty: p.qty_picked }]
        }
        EventType::PickShort => {
            let p: PickData = events::parse(env)?;
            let missing = p.qty.saturating_sub(p.qty_picked);
            // One event, two facts: the short part gets its own origin key so
            // the second command is not taken for a stale repeat of the first.
            let short_origin = Origin::new(format!("{}#short", env.source), env.sequence);
            let mut cmds = Vec::new();
            if p.qty_picked > 0 {
                cmds.push(OrderCommand::RecordPicked {
                    origin,
                    line_id: p.line_id.clone(),
                    location: p.location.clone(),
                    qty: p.qty_picked,
                });
            }
            cmds.push(OrderCommand::RecordShort {
                origin: short_origin,
                line_id: p.line_id,
                location: p.location,
                qty: missing,
            });
            cmds
        }
        EventType::PackCompleted => {
            let p: PackCompleted = events::parse(env)?;
            vec![OrderCommand::RecordPacked { origin, location: p.location, lines: line_qty(&p.lines) }]
        }
        EventType::ShipmentLabelCreated => {
            let l: LabelCreated = events::parse(env)?;
            let Some(location) = l.lines.first().map(|a| a.location.clone()) else {
                return Err(EventError::Poison("label for an empty shipment".into()));
            };
            vec![OrderCommand::RecordShipment {
                origin,
                shipment_id: l.shipment_id,
                location,
                lines: line_qty(&l.lines),
            }]
        }
        EventType::ShipmentDelivered => {
            let d: ShipmentDelivered = events::parse(env)?;
            vec![OrderCommand::RecordDelivery { origin, shipment_id: d.shipment_id }]
        }
        _ => Vec::new(),
    })
}

/// Publishes one order event with the order's version as its sequence.
fn publish(tx: &mut Tx, order: &Order, ev: &OrderEvent) {
    let data = match &ev.change {
        OrderChange::Created(created) => decorated(
            order,
            ev,
            Own::Contact,
            events::OrderCreated {
                order_id: order.id().clone(),
                customer_id: order.customer_id().clone(),
                email: order.email().to_owned(),
                zone: order.ship_to().clone(),
                priority: order.priority(),
                lines: order
                    .lines()
                    .iter()
                    .map(|l| events::LineData {
                        line_id: l.line_id.clone(),
                        sku: l.sku.clone(),
                        qty: l.qty,
                        unit_price: l.unit_price,
                    })
                    .collect(),
                total: order.total(),
                // Reserved before acknowledgement: inventory confirms these
                // through their holds, or again if a hold lapsed first.
                preallocated: created
                    .lines
                    .iter()
                    .flat_map(|l| {
                        l.allocations.iter().map(|a| events::AllocationData {
                            line_id: l.line_id.clone(),
                            sku: l.sku.clone(),
                            location: a.location.clone(),
                            qty: a.qty,
                        })
                    })
                    .collect(),
                hold_ids: order.hold_ids().iter().map(|h| h.as_str().to_owned()).collect(),
            },
        ),
        OrderChange::Allocated { ready_to_pick, .. } => decorated(
            order,
            ev,
            Own::OrderId,
            events::OrderAllocated {
                order_id: order.id().clone(),
                priority: order.priority(),
                zone: order.ship_to().clone(),
                allocations: ready_to_pick
                    .iter()
                    .map(|p| AllocationData {
                        line_id: p.line_id.clone(),
                        sku: p.sku.clone(),
                        location: p.location.clone(),
                        qty: p.qty,
                    })
                    .collect(),
            },
        ),
        OrderChange::Canceled { reason, lines, .. } => decorated(
            order,
            ev,
            Own::OrderId,
            events::OrderCanceled {
                order_id: order.id().clone(),
                reason: reason.clone(),
                lines: lines.iter().map(|l| l.line_id.clone()).collect(),
                shipped: shipped_units(order),
            },
        ),
        OrderChange::Deallocated { allocations, .. } => decorated(
            order,
            ev,
            Own::OrderId,
            events::Deallocated {
                order_id: order.id().clone(),
                allocations: allocations
                    .iter()
                    .map(|a| AllocationData {
                        line_id: a.line_id.clone(),
                        sku: order
                            .lines()
                            .iter()
                            .find(|l| l.line_id == a.line_id)
                            .map(|l| l.sku.clone())
                            .unwrap_or_else(|| orderly_domain::Sku::parse("unknown").expect("a valid sku")),
                        location: a.location.clone(),
                        qty: a.qty,
                    })
                    .collect(),
                reason: "stock_loss".into(),
            },
        ),
        OrderChange::Returned { location, lines } => decorated(
            order,
            ev,
            Own::OrderId,
            events::OrderReturned {
                order_id: order.id().clone(),
                allocations: lines
                    .iter()
                    .map(|l| AllocationData {
                        line_id: l.line_id.clone(),
                        sku: l.sku.clone(),
                        location: location.clone(),
                        qty: l.qty,
                    })
                    .collect(),
            },
        ),
        _ => decorated(order, ev, Own::Nothing, Nothing {}),
    };
    let event_type = ev.event_type();
    let subject = order.id().as_str().to_owned();
    let envelope = tx.emit_seq(event_type, &subject, ev.sequence, data);
    if order.priority() == Priority::SameDay {
        envelope.priority = Some("high".to_owned());
    }
    tracing::debug!(order_id = %subject, event_id = %envelope.id, event_type = ev.type_name(), "order event");
}

/// Units shipped per line and location.
fn shipped_units(order: &Order) -> Vec<AllocationData> {
    order
        .lines()
        .iter()
        .flat_map(|l| {
            l.allocations.iter().filter(|a| a.shipped > 0).map(|a| AllocationData {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                location: a.location.clone(),
                qty: a.shipped,
            })
        })
        .collect()
}

/// What every order event carries for notifications beside its own
/// fields: the order id, state and e-mail, the promised ship date and the
/// shipment concerned. Written in the same pass as the body.
#[derive(Serialize)]
struct Decorated<'a, T> {
    #[serde(flatten)]
    body: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a OrderId>,
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_ship_date: Option<&'a Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipment_id: Option<&'a ShipmentId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    charge_shipping: Option<bool>,
}

/// The decoration fields a body already carries itself (each field is written once).
#[derive(Clone, Copy, PartialEq)]
enum Own {
    Nothing,
    OrderId,
    /// `order_id` and `email`.
    Contact,
}

/// The body of an event that carries only the decoration.
#[derive(Serialize)]
struct Nothing {}

fn decorated<T: Serialize>(order: &Order, ev: &OrderEvent, own: Own, body: T) -> EventData {
    let (mut expected_ship_date, mut shipment_id, mut charge_shipping) = (None, None, None);
    match &ev.change {
        OrderChange::Backordered { expected_ship_date: at, .. } => expected_ship_date = Some(at),
        OrderChange::Shipped { shipment_id: id, charge_shipping: charge, .. } => {
            shipment_id = Some(id);
            charge_shipping = Some(*charge);
        }
        OrderChange::Delivered { shipment_id: id, .. } => shipment_id = Some(id),
        _ => {}
    }
    let data = EventData::of(&Decorated {
        body,
        order_id: (own == Own::Nothing).then(|| order.id()),
        state: ev.state().unwrap_or(order.state()).as_str(),
        email: (own != Own::Contact).then(|| order.email()),
        expected_ship_date,
        shipment_id,
        charge_shipping,
    });
    debug_assert!(
        {
            let mut keys = data.keys();
            let n = keys.len();
            keys.sort_unstable();
            keys.dedup();
            keys.len() == n
        },
        "an order event names a field twice: {data:?}"
    );
    data
}

/// The answer to an idempotency key reused for a different order.
pub fn key_reuse() -> ApiError {
    ApiError::invalid(
        "idempotency-key-reuse",
        "this Idempotency-Key was already used for a different order; use a new key for a new request",
    )
}

/// Maps an order rejection to what the API answers.
fn order_error(e: OrderError) -> ApiError {
    match e {
        OrderError::IllegalTransition { .. } => ApiError::conflict("illegal-transition", e.to_string()),
        OrderError::Stale { .. } => ApiError::conflict("stale", e.to_string()),
        OrderError::Rejected(r) => ApiError::invalid("invalid-order", r.to_string()),
    }
}

impl Service for Orders {
    type Command = Command;

    async fn on_command(&mut self, tx: &mut Tx, cmd: Command) {
        match cmd {
            Command::Create { new, key, reply } => {
                let r = self.create(tx, &new, key).await;
                tx.reply(reply, r);
            }
            Command::Cancel { order_id, reason, reply } => {
                let r = self.execute_api(tx, &order_id, OrderCommand::Cancel { reason }).await;
                tx.reply(reply, r);
            }
            Command::RequestReturn { order_id, reason, reply } => {
                let r = self.execute_api(tx, &order_id, OrderCommand::RequestReturn { reason }).await;
                tx.reply(reply, r);
            }
            Command::ReconcileView { order_ids, reply } => {
                let mut found = Vec::new();
                let mut r = Ok(());
                for id in order_ids {
                    match self.orders.load(tx.store(), id.as_str()).await {
                        Ok(true) => found.extend(self.orders.get(id.as_str()).cloned()),
                        Ok(false) => {}
                        Err(e) => {
                            r = Err(ApiError::from(e));
                            break;
                        }
                    }
                }
                tx.reply(reply, r.map(|()| found));
            }
            Command::RecordReturn { order_id, location, reply } => {
                let r = self.execute_api(tx, &order_id, OrderCommand::RecordReturn { location }).await;
                tx.reply(reply, r);
            }
        }
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        use tracing::Instrument;
        let span = super::common::event_span(event);
        async move { self.on_bus_event(tx, event).await }.instrument(span).await
    }

    async fn on_tick(&mut self, _tx: &mut Tx) {}

    fn next_deadline(&self) -> Option<Timestamp> {
        None
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![&mut self.orders, &mut self.keys, &mut self.parked, &mut self.voided]
    }

    fn event_reads(&self, event: &Envelope, reads: &mut Reads) {
        // The order the event is about, and its parked events (almost never any).
        if event.event_type != EventType::HoldUnclaimed {
            self.orders.want(&event.subject, reads);
            self.parked.want(&event.subject, reads);
        }
    }

    fn command_reads(&self, cmd: &Command, reads: &mut Reads) {
        match cmd {
            Command::Create { new, key, .. } => {
                if let Some(k) = key {
                    self.keys.want(&k.key, reads);
                }
                if new.lines.iter().any(|l| !l.allocations.is_empty()) {
                    self.voided.want(new.order_id.as_str(), reads);
                }
            }
            Command::Cancel { order_id, .. }
            | Command::RequestReturn { order_id, .. }
            | Command::RecordReturn { order_id, .. } => self.orders.want(order_id.as_str(), reads),
            Command::ReconcileView { order_ids, .. } => {
                order_ids.iter().for_each(|id| self.orders.want(id.as_str(), reads));
            }
        }
    }
}
