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
use serde_json::{Value, json};

/// Orders kept in memory beyond what the store holds.
const ORDER_CACHE_MAX: usize = 100_000;

/// Commands from the API.
pub enum Command {
    /// Creates an order (synchronous allocations, if any, are in its lines).
    Create {
        /// The order.
        new: Box<NewOrder>,
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
    policy: OrderPolicy,
}

impl Orders {
    /// An orders service with the given split policy.
    pub fn new(policy: OrderPolicy) -> Orders {
        Orders {
            orders: Table::new("orders", ORDER_CACHE_MAX, |o: &Order| Some(o.state().as_str().to_owned())),
            policy,
        }
    }

    async fn create(&mut self, tx: &mut Tx, new: &NewOrder) -> Result<Order, ApiError> {
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
        Ok(order)
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
            Command::Create { new, reply } => {
                let r = self.create(tx, &new).await;
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
            Command::RecordReturn { order_id, location, reply } => {
                let r = self.execute_api(tx, &order_id, OrderCommand::RecordReturn { location }).await;
                tx.reply(reply, r);
            }
        }
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        self.on_bus_event(tx, event).await
    }

    async fn on_tick(&mut self, _tx: &mut Tx) {}

    fn next_deadline(&self) -> Option<Timestamp> {
        None
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![&mut self.orders]
    }
}
