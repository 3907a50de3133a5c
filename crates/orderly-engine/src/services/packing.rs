//! The packing service: it learns of finished picks from events and packs
//! them into packages on request; a package emits `pack.completed`, which
//! shipping turns into a label.

use super::common::{ApiError, Reply};
use crate::events::{self, AllocationData, PackCompleted, PickData};
use crate::prefetch::Reads;
use crate::runtime::{EventError, Service, Tx};
use crate::table::{CACHE_ENTRIES_MAX, Staged, Table};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::{LocationId, OrderId, PickId, Timestamp, Zone};
use serde::{Deserialize, Serialize};

/// Most picks in one package.
pub const PACKAGE_PICKS_MAX: usize = 500;

/// A finished pick waiting to be packed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickedItem {
    /// The pick as reported.
    pub pick: PickData,
    /// Package it went into, once packed.
    pub package_id: Option<String>,
}

/// What packing knows of an order, from its first allocation on: where it
/// ships, and whether it was canceled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderInfo {
    /// Destination zone.
    pub zone: Zone,
    /// Canceled: its picked units go back on the shelf, nothing more is packed.
    #[serde(default)]
    pub canceled: bool,
}

/// A package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Package id.
    pub id: String,
    /// Order id.
    pub order_id: OrderId,
    /// Location it ships from.
    pub location: LocationId,
    /// Picks in it.
    pub pick_ids: Vec<PickId>,
    /// Units per line.
    pub lines: Vec<AllocationData>,
    /// Parcel weight.
    pub weight_g: u32,
    /// When it was packed.
    pub packed_at: Timestamp,
}

/// Commands from the API.
pub enum Command {
    /// Packs picks into a package.
    Pack {
        /// Order.
        order_id: OrderId,
        /// Where.
        location: LocationId,
        /// Which picks.
        pick_ids: Vec<PickId>,
        /// Answer.
        reply: Reply<Package>,
    },
}

/// The packing service.
pub struct Packing {
    picked: Table<PickedItem>,
    orders: Table<OrderInfo>,
    packages: Table<Package>,
    unit_weight_g: u32,
}

impl Packing {
    /// A packing service assuming `unit_weight_g` grams per unit.
    pub fn new(unit_weight_g: u32) -> Packing {
        Packing {
            picked: Table::new("picked", CACHE_ENTRIES_MAX, |p: &PickedItem| Some(p.pick.order_id.as_str().to_owned()))
                .settled_when(|p| p.package_id.is_some()),
            orders: Table::new("orders", CACHE_ENTRIES_MAX, |_| None).settled_when(|o| o.canceled),
            // A package is written once and never read back by the service.
            packages: Table::new("packages", CACHE_ENTRIES_MAX, |p: &Package| Some(p.order_id.as_str().to_owned()))
                .settled_when(|_| true),
            unit_weight_g,
        }
    }

    async fn pack(
        &mut self,
        tx: &mut Tx,
        order_id: OrderId,
        location: LocationId,
        pick_ids: Vec<PickId>,
    ) -> Result<Package, ApiError> {
        if pick_ids.is_empty() || pick_ids.len() > PACKAGE_PICKS_MAX {
            return Err(ApiError::invalid(
                "invalid-pick-list",
                format!("pick_ids must list 1 to {PACKAGE_PICKS_MAX} picks"),
            ));
        }
        self.orders.load(tx.store(), order_id.as_str()).await?;
        let zone = match self.orders.get(order_id.as_str()) {
            None => return Err(ApiError::conflict("order-unknown", "packing has not seen this order yet")),
            Some(o) if o.canceled => {
                return Err(ApiError::conflict("order-canceled", "the order was canceled; put the items back"));
            }
            Some(o) => o.zone.clone(),
        };
        let mut lines = Vec::new();
        let mut priority = orderly_domain::Priority::Standard;
        for id in &pick_ids {
            if !self.picked.load(tx.store(), id.as_str()).await? {
                return Err(ApiError::conflict("pick-not-completed", format!("pick {id} is not completed (yet)")));
            }
            let item = self.picked.get(id.as_str()).ok_or_else(|| ApiError::NotFound(id.to_string()))?;
            if item.pick.order_id != order_id || item.pick.location != location {
                return Err(ApiError::invalid(
                    "pick-mismatch",
                    format!("pick {id} belongs to another order or location"),
                ));
            }
            if let Some(p) = &item.package_id {
                return Err(ApiError::conflict("already-packed", format!("pick {id} is already in package {p}")));
            }
            priority = priority.min(item.pick.priority);
            add_units(&mut lines, item, &location);
        }
        let mut dedup = pick_ids.clone();
        dedup.sort();
        dedup.dedup();
        if dedup.len() != pick_ids.len() {
            return Err(ApiError::invalid("duplicate-pick", "a pick is listed twice"));
        }
        let units: u32 = lines.iter().map(|l| l.qty).sum();
        let package = Package {
            id: format!("pkg-{}", tx.new_id()),
            order_id: order_id.clone(),
            location: location.clone(),
            pick_ids: pick_ids.clone(),
            lines: lines.clone(),
            weight_g: units.saturating_mul(self.unit_weight_g).max(1),
            packed_at: tx.now,
        };
        for id in &pick_ids {
            if let Some(item) = self.picked.get_mut(id.as_str()) {
                item.package_id = Some(package.id.clone());
            }
        }
        let data = PackCompleted {
            package_id: package.id.clone(),
            order_id: order_id.clone(),
            location,
            pick_ids,
            lines,
            zone,
            priority,
            weight_g: package.weight_g,
        };
        tx.emit(EventType::PackCompleted, order_id.as_str(), events::data(&data));
        self.packages.insert(package.id.clone(), package.clone());
        Ok(package)
    }
}

/// Adds a pick's units to the package's lines: one entry per line, however
/// many picks of it (a re-allocated remainder is a second pick) it holds.
fn add_units(lines: &mut Vec<AllocationData>, item: &PickedItem, location: &LocationId) {
    match lines.iter_mut().find(|l| l.line_id == item.pick.line_id) {
        Some(line) => line.qty += item.pick.qty_picked,
        None => lines.push(AllocationData {
            line_id: item.pick.line_id.clone(),
            sku: item.pick.sku.clone(),
            location: location.clone(),
            qty: item.pick.qty_picked,
        }),
    }
}

impl Service for Packing {
    type Command = Command;

    async fn on_command(&mut self, tx: &mut Tx, cmd: Command) {
        match cmd {
            Command::Pack { order_id, location, pick_ids, reply } => {
                let r = self.pack(tx, order_id, location, pick_ids).await;
                tx.reply(reply, r);
            }
        }
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        use tracing::Instrument;
        let span = super::common::event_span(event);
        async move {
            match event.event_type {
                EventType::PickCompleted | EventType::PickShort => {
                    let pick: PickData = events::parse(event)?;
                    if pick.qty_picked == 0 {
                        return Ok(());
                    }
                    // The runtime delivers each event once (cursor or inbox): no store lookup.
                    if self.picked.get(pick.pick_id.as_str()).is_none() {
                        self.picked.insert(pick.pick_id.as_str().to_owned(), PickedItem { pick, package_id: None });
                    }
                    Ok(())
                }
                EventType::OrderAllocated => {
                    // Only an allocated order can be picked, so packing learns
                    // of an order at its first allocation (a flash sale's
                    // backordered orders cost packing nothing until then);
                    // later allocations (a backorder filled) change nothing.
                    // Rows stored from `order.created` by earlier versions
                    // are found here and kept.
                    let allocated: events::OrderAllocated = events::parse(event)?;
                    let id = allocated.order_id.as_str();
                    if !self.orders.load(tx.store(), id).await? {
                        self.orders.insert(id.to_owned(), OrderInfo { zone: allocated.zone, canceled: false });
                    }
                    Ok(())
                }
                EventType::OrderCanceled => {
                    let canceled: events::OrderCanceled = events::parse(event)?;
                    if self.orders.load(tx.store(), canceled.order_id.as_str()).await?
                        && let Some(info) = self.orders.get_mut(canceled.order_id.as_str())
                    {
                        info.canceled = true;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn on_tick(&mut self, _tx: &mut Tx) {}

    fn next_deadline(&self) -> Option<Timestamp> {
        None
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![&mut self.picked, &mut self.orders, &mut self.packages]
    }

    fn event_reads(&self, event: &Envelope, reads: &mut Reads) {
        // An allocation reads whether packing knows the order (its subject) yet.
        if event.event_type == EventType::OrderAllocated {
            self.orders.want(&event.subject, reads);
        }
    }
}
