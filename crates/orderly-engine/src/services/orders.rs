//! The orders service: the order state machine owns the truth. API commands
//! and other services' events become order commands; each resulting order
//! event is published with the order's version as its sequence. An event
//! that is stale (not newer than what was seen from its source) or illegal in
//! the order's state changes nothing and is counted.

use super::common::{ApiError, Reply};
use crate::events::{
    self, AllocationData, InventoryBackordered, InventoryReserved, LabelCreated, PackCompleted, PickData,
    ShipmentDelivered,
};
use crate::runtime::{EventError, Service, Tx};
use crate::table::{Staged, Table};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::order::{
    AllocationEntry, LineQty, NewOrder, Order, OrderChange, OrderCommand, OrderError, OrderEvent, OrderPolicy,
    OrderState, Origin,
};
use orderly_domain::{LocationId, OrderId, Priority, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Orders kept in memory beyond what the store holds.
const ORDER_CACHE_MAX: usize = 100_000;
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

/// The orders service.
pub struct Orders {
    orders: Table<Order>,
    keys: Table<KeyedOrder>,
    policy: OrderPolicy,
}

impl Orders {
    /// An orders service with the given split policy.
    pub fn new(policy: OrderPolicy) -> Orders {
        Orders {
            orders: Table::new("orders", ORDER_CACHE_MAX, |o: &Order| Some(o.state().as_str().to_owned())),
            keys: Table::new(ORDER_KEYS, ORDER_CACHE_MAX, |_| None),
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
        let evs = Order::decide_create(new, &self.policy, tx.now).map_err(order_error)?;
        let order = Order::from_events(&evs)
            .ok_or_else(|| ApiError::Unavailable("order history must start with created".into()))?;
        for ev in &evs {
            publish(tx, &order, ev);
        }
        tx.ctx().metrics.inc("orderly_orders_created_total", &[("priority", order.priority().as_str())], 1);
        self.orders.insert(order.id().as_str().to_owned(), order.clone());
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

    async fn on_bus_event(&mut self, tx: &mut Tx, env: &Envelope) -> Result<(), EventError> {
        let cmds = commands_for(env)?;
        if cmds.is_empty() {
            return Ok(());
        }
        let order_id = OrderId::parse(env.subject.as_str()).map_err(|e| EventError::Poison(format!("subject: {e}")))?;
        if !self.orders.load(tx.store(), order_id.as_str()).await? {
            return Err(EventError::Poison(format!("{} for unknown order {order_id}", env.event_type)));
        }
        let metrics = tx.ctx().metrics.clone();
        let before = self.orders.get(order_id.as_str()).map(Order::state);
        for (i, cmd) in cmds.iter().enumerate() {
            let order = self.orders.get_mut(order_id.as_str()).expect("loaded above");
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
                // re-allocation can overtake the pick itself): a rejection
                // may only mean "not yet", so retry before dead-lettering.
                Err(OrderError::Rejected(r)) if i == 0 => return Err(EventError::Transient(r.to_string())),
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
        Ok(())
    }
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
    let mut data = match &ev.change {
        OrderChange::Created(_) => events::data(&events::OrderCreated {
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
            preallocated: Vec::new(),
            hold_ids: order.hold_ids().iter().map(|h| h.as_str().to_owned()).collect(),
        }),
        OrderChange::Allocated { ready_to_pick, .. } => events::data(&events::OrderAllocated {
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
        }),
        OrderChange::Canceled { reason, lines, .. } => events::data(&events::OrderCanceled {
            order_id: order.id().clone(),
            reason: reason.clone(),
            lines: lines.iter().map(|l| l.line_id.clone()).collect(),
            shipped: shipped_units(order),
        }),
        OrderChange::Deallocated { allocations, .. } => events::data(&events::Deallocated {
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
        }),
        OrderChange::Returned { location, lines } => events::data(&events::OrderReturned {
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
        }),
        _ => json!({}),
    };
    decorate(&mut data, order, ev);
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

/// Adds what every order event carries for notifications: state, e-mail,
/// the promised ship date and the shipment concerned.
fn decorate(data: &mut Value, order: &Order, ev: &OrderEvent) {
    let Value::Object(map) = data else { return };
    map.insert("order_id".into(), json!(order.id()));
    map.insert("state".into(), json!(ev.state().unwrap_or(order.state()).as_str()));
    map.insert("email".into(), json!(order.email()));
    if let OrderChange::Backordered { expected_ship_date, .. } = &ev.change {
        map.insert("expected_ship_date".into(), json!(expected_ship_date));
    }
    if let OrderChange::Shipped { shipment_id, charge_shipping, .. } = &ev.change {
        map.insert("shipment_id".into(), json!(shipment_id));
        map.insert("charge_shipping".into(), json!(charge_shipping));
    }
    if let OrderChange::Delivered { shipment_id, .. } = &ev.change {
        map.insert("shipment_id".into(), json!(shipment_id));
    }
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
        vec![&mut self.orders, &mut self.keys]
    }
}
