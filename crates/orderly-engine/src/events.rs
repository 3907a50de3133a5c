//! The bus contract: the `data` of every event Orderly services exchange.
//! Producers serialize these; consumers parse them and treat a payload that
//! does not parse as poison (dead-lettered, never guessed at).

use crate::runtime::EventError;
use orderly_domain::event::{Envelope, EventData};
use orderly_domain::{
    CustomerId, LineId, LocationId, Money, OrderId, PickId, Priority, Qty, ShipmentId, Sku, Timestamp, Zone,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Parses an event's data, mapping failure to poison.
pub fn parse<T: DeserializeOwned>(env: &Envelope) -> Result<T, EventError> {
    env.data.read().map_err(|e| EventError::Poison(format!("{} data does not match the contract: {e}", env.event_type)))
}

/// Serializes an event's data (once: the text is shared by every copy of the event).
pub fn data<T: Serialize>(value: &T) -> EventData {
    EventData::of(value)
}

/// One line of an order as other services see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineData {
    /// Line id.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Units.
    pub qty: Qty,
    /// Unit price.
    pub unit_price: Money,
}

/// Units of a line at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationData {
    /// Line id.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Location.
    pub location: LocationId,
    /// Units.
    pub qty: Qty,
}

/// `orderly.order.created`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Order id.
    pub order_id: OrderId,
    /// Customer id.
    pub customer_id: CustomerId,
    /// Customer e-mail (for notifications).
    pub email: String,
    /// Destination zone.
    pub zone: Zone,
    /// Priority.
    pub priority: Priority,
    /// Lines.
    pub lines: Vec<LineData>,
    /// Order total.
    pub total: Money,
    /// Reserved synchronously before acknowledgement (inventory confirms them).
    #[serde(default)]
    pub preallocated: Vec<AllocationData>,
    /// Cart holds to consume for these lines.
    #[serde(default)]
    pub hold_ids: Vec<String>,
}

/// `orderly.order.allocated`: new allocations the warehouse can pick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAllocated {
    /// Order id.
    pub order_id: OrderId,
    /// Priority.
    pub priority: Priority,
    /// Destination zone.
    pub zone: Zone,
    /// The allocations released to picking by this event.
    pub allocations: Vec<AllocationData>,
}

/// `orderly.order.canceled`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCanceled {
    /// Order id.
    pub order_id: OrderId,
    /// Why.
    pub reason: String,
    /// Lines whose unshipped units are released.
    pub lines: Vec<LineId>,
    /// Units of each line that had shipped, per location, when the order was
    /// canceled: inventory puts every unit it saw picked beyond these back on
    /// the shelf.
    #[serde(default)]
    pub shipped: Vec<AllocationData>,
}

/// `orderly.order.returned`: units back in stock at a location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderReturned {
    /// Order id.
    pub order_id: OrderId,
    /// Units returned, per line and location.
    pub allocations: Vec<AllocationData>,
}

/// Any other `orderly.order.*` event: the order's new state, for notifications.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStateChanged {
    /// Order id.
    pub order_id: OrderId,
    /// The new state.
    pub state: String,
    /// Customer e-mail.
    pub email: String,
    /// When a backordered order is expected to ship.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_ship_date: Option<Timestamp>,
    /// Shipment concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment_id: Option<ShipmentId>,
}

/// `orderly.inventory.reserved`: allocations made for an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    /// Order id.
    pub order_id: OrderId,
    /// What was reserved where.
    pub allocations: Vec<AllocationData>,
    /// Filled from the backorder queue on receipt.
    #[serde(default)]
    pub from_backorder: bool,
}

/// `orderly.inventory.deallocated` and `orderly.order.deallocated`: reserved
/// units taken back from an order (a count or adjustment found less stock
/// than was reserved); inventory backorders them in the same batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deallocated {
    /// Order id.
    pub order_id: OrderId,
    /// Units taken back, per line and location.
    pub allocations: Vec<AllocationData>,
    /// Why (`stock_loss`).
    pub reason: String,
}

/// `orderly.hold.unclaimed`: a synchronous reservation outlived the hold
/// lifetime (`inventory.hold_ttl`) without its order reaching inventory.
/// Inventory keeps the units and asks the orders service, which owns the
/// truth, whether the order exists; it repeats the question every lifetime
/// until the order arrives or is voided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldUnclaimed {
    /// The order the reservation was made for.
    pub order_id: OrderId,
    /// The hold.
    pub hold_id: String,
    /// What it holds.
    pub sku: Sku,
    /// Where.
    pub location: LocationId,
    /// How many.
    pub qty: u64,
}

/// `orderly.order.voided`: the order a synchronous reservation was made for
/// does not exist, and now never will (its creation is refused from here
/// on): inventory releases the hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderVoided {
    /// The order id that will never be used.
    pub order_id: OrderId,
    /// The hold to release.
    pub hold_id: String,
}

/// A line (part) that could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfilledData {
    /// Line id.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Units waiting.
    pub qty: Qty,
}

/// `orderly.inventory.backordered`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryBackordered {
    /// Order id.
    pub order_id: OrderId,
    /// Units waiting for stock, per line.
    pub lines: Vec<UnfilledData>,
    /// When stock is expected (a promise to the customer).
    pub expected_ship_date: Timestamp,
}

/// `orderly.inventory.released` / `adjusted` / `received`: a stock movement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockMoved {
    /// SKU.
    pub sku: Sku,
    /// Location.
    pub location: LocationId,
    /// Signed change in units.
    pub delta: i64,
    /// Why (receipt, cancel, hold_expired, short_pick, manual, cycle_count, reconciliation, return).
    pub reason: String,
    /// Who, for manual changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Order concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<OrderId>,
}

/// `orderly.pick.requested`, `completed`, `short`, `canceled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickData {
    /// Pick task id.
    pub pick_id: PickId,
    /// Order id.
    pub order_id: OrderId,
    /// Line id.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Location.
    pub location: LocationId,
    /// Units requested.
    pub qty: Qty,
    /// Units actually picked (completed/short).
    #[serde(default)]
    pub qty_picked: Qty,
    /// Priority.
    pub priority: Priority,
    /// The warehouse instruction key (`line id + sequence`).
    pub instruction_key: String,
    /// For a short pick: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `orderly.pack.completed`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackCompleted {
    /// Package id.
    pub package_id: String,
    /// Order id.
    pub order_id: OrderId,
    /// Location it ships from.
    pub location: LocationId,
    /// Picks in it.
    pub pick_ids: Vec<PickId>,
    /// Units per line.
    pub lines: Vec<AllocationData>,
    /// Destination zone.
    pub zone: Zone,
    /// Priority.
    pub priority: Priority,
    /// Parcel weight.
    pub weight_g: u32,
}

/// `orderly.shipment.label_created`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelCreated {
    /// Shipment id.
    pub shipment_id: ShipmentId,
    /// Order id.
    pub order_id: OrderId,
    /// Package id.
    pub package_id: String,
    /// Carrier.
    pub carrier: String,
    /// Tracking number.
    pub tracking_number: String,
    /// What the label cost.
    pub cost: Money,
    /// When the label was created.
    pub label_created_at: Timestamp,
    /// The primary carrier, when this label went to the secondary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// Units shipped per line.
    pub lines: Vec<AllocationData>,
}

/// `orderly.shipment.carrier_fallback`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarrierFallback {
    /// Shipment id.
    pub shipment_id: ShipmentId,
    /// Order id.
    pub order_id: OrderId,
    /// Primary carrier.
    pub from: String,
    /// Secondary carrier used.
    pub to: String,
    /// Secondary price − primary price.
    pub cost_difference: Money,
}

/// `orderly.shipment.delivered`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDelivered {
    /// Shipment id.
    pub shipment_id: ShipmentId,
    /// Order id.
    pub order_id: OrderId,
}
