//! Reconciliation: compares what inventory reserves against what orders,
//! picking and inventory's own books say, and decides the compensating
//! changes. Each service's view is gathered through its own command handle
//! (no service reads another's store); [`diff`] is a pure function over the
//! views, and inventory applies the repairs with reason `reconciliation`,
//! re-checking each against its current state, so a repeated run repairs
//! nothing twice.

use crate::services::picking::{PickStatus, PickTask};
use orderly_domain::order::Order;
use orderly_domain::{LineId, LocationId, OrderId, PickId, Qty, Sku, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The reason recorded on every reconciliation change.
pub const REASON: &str = "reconciliation";

/// A line's reservation at one location, as inventory holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedUnits {
    /// Order.
    pub order_id: OrderId,
    /// Line.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Location.
    pub location: LocationId,
    /// Units reserved there.
    pub qty: u64,
}

/// A line waiting in a backorder queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingUnits {
    /// Order.
    pub order_id: OrderId,
    /// Line.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Units waiting.
    pub qty: u64,
}

/// On-hand units of a SKU at a location that no recorded movement explains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockDrift {
    /// SKU.
    pub sku: Sku,
    /// Location.
    pub location: LocationId,
    /// On hand minus `received + adjusted - committed`.
    pub delta: i64,
}

/// Inventory's side: open reservations, backorders, what its ledger
/// committed as picked (for the orders it reserves for), and its books.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryView {
    /// Every open line reservation.
    pub reservations: Vec<ReservedUnits>,
    /// Every backordered line.
    pub backorders: Vec<WaitingUnits>,
    /// Units committed as picked, per (line, location), for reserved lines.
    pub picked: Vec<(LineId, LocationId, Qty)>,
    /// Locations whose on hand differs from their books.
    pub drift: Vec<StockDrift>,
    /// SKUs examined.
    pub skus: u64,
}

/// A compensating change inventory applies (each re-checked when applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "repair", rename_all = "snake_case")]
pub enum Repair {
    /// Release a line's reservation and backorder (its order no longer needs it).
    Release {
        /// Order.
        order_id: OrderId,
        /// Line.
        line_id: LineId,
        /// SKU.
        sku: Sku,
    },
    /// Commit a pick picking recorded but inventory never saw (its instruction
    /// key makes a second commit of the same pick a no-op).
    CommitPick {
        /// Order.
        order_id: OrderId,
        /// Line.
        line_id: LineId,
        /// SKU.
        sku: Sku,
        /// Location.
        location: LocationId,
        /// Units picked.
        qty: Qty,
        /// The pick's instruction key.
        instruction_key: String,
        /// The pick task.
        pick_id: PickId,
    },
    /// Record on-hand units no movement explains as an adjustment.
    Restate {
        /// SKU.
        sku: Sku,
        /// Location.
        location: LocationId,
    },
}

/// What applying one repair did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RepairOutcome {
    /// Changed the ledger.
    Applied,
    /// Nothing left to change (already repaired, e.g. by a concurrent run).
    Unchanged,
    /// Refused; the discrepancy stays.
    Failed {
        /// Why.
        error: String,
    },
}

/// One discrepancy found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrepancy {
    /// Stable kind: `stock_drift`, `reservation_for_closed_order`,
    /// `backorder_for_closed_order`, `reservation_for_unknown_order`,
    /// `pick_not_committed`, `allocation_mismatch`.
    pub kind: String,
    /// Order concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<OrderId>,
    /// Line concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line_id: Option<LineId>,
    /// SKU.
    pub sku: Sku,
    /// Location concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<LocationId>,
    /// What is wrong, in words.
    pub detail: String,
    /// The compensating change, if one applies (`none` when only reported).
    pub action: String,
    /// Whether the compensating change was applied in this run.
    pub repaired: bool,
    /// Why the repair failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A reconciliation run's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Run id.
    pub id: String,
    /// Who or what started it (`scheduler`, `cli`, an API key's name).
    pub trigger: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it finished.
    pub finished_at: Timestamp,
    /// SKUs examined.
    pub skus_checked: u64,
    /// Open reservations examined.
    pub reservations_checked: u64,
    /// Orders examined.
    pub orders_checked: u64,
    /// Pick tasks examined.
    pub picks_checked: u64,
    /// Compensating changes applied.
    pub repaired: u64,
    /// Every discrepancy found.
    pub discrepancies: Vec<Discrepancy>,
}

impl Report {
    /// Whether anything was found.
    pub fn clean(&self) -> bool {
        self.discrepancies.is_empty()
    }
}

/// What [`diff`] found, each discrepancy with the repair that fixes it (if any).
#[derive(Debug, Default)]
pub struct Findings {
    /// Discrepancies, in a stable order.
    pub discrepancies: Vec<(Discrepancy, Option<Repair>)>,
}

fn found(kind: &str, sku: &Sku, detail: String) -> Discrepancy {
    Discrepancy {
        kind: kind.to_owned(),
        order_id: None,
        line_id: None,
        sku: sku.clone(),
        location: None,
        detail,
        action: "none".to_owned(),
        repaired: false,
        error: None,
    }
}

/// Compares the views. `orders` holds the orders inventory reserves or
/// backorders for (missing ones are unknown to the orders service); `picks`
/// holds the pick tasks of the reserved lines.
pub fn diff(inv: &InventoryView, orders: &[Order], picks: &[PickTask]) -> Findings {
    let mut out = Findings::default();
    for d in &inv.drift {
        let mut x = found(
            "stock_drift",
            &d.sku,
            format!("on hand differs by {:+} units from what received, adjusted and picked units explain", d.delta),
        );
        x.location = Some(d.location.clone());
        x.action = format!("record {:+} units as an adjustment (reason {REASON})", d.delta);
        out.discrepancies.push((x, Some(Repair::Restate { sku: d.sku.clone(), location: d.location.clone() })));
    }
    let by_id: BTreeMap<&OrderId, &Order> = orders.iter().map(|o| (o.id(), o)).collect();
    // Lines already released by this run (one release covers every location and the backorder).
    let mut released: BTreeSet<&LineId> = BTreeSet::new();
    let closed = |order: &Order, line: &LineId| {
        order.state().is_terminal()
            || order.lines().iter().find(|l| &l.line_id == line).is_none_or(|l| l.outstanding_qty() == 0)
    };
    for r in &inv.reservations {
        let Some(order) = by_id.get(&r.order_id) else {
            let mut x = found(
                "reservation_for_unknown_order",
                &r.sku,
                format!("{} units reserved for order {}, which the orders service does not know", r.qty, r.order_id),
            );
            x.order_id = Some(r.order_id.clone());
            x.line_id = Some(r.line_id.clone());
            x.location = Some(r.location.clone());
            out.discrepancies.push((x, None));
            continue;
        };
        if closed(order, &r.line_id) {
            let mut x = found(
                "reservation_for_closed_order",
                &r.sku,
                format!(
                    "{} units still reserved for line {} of order {}, which is {}",
                    r.qty,
                    r.line_id,
                    r.order_id,
                    order.state().as_str()
                ),
            );
            x.order_id = Some(r.order_id.clone());
            x.line_id = Some(r.line_id.clone());
            x.location = Some(r.location.clone());
            let first = released.insert(&r.line_id);
            x.action = format!("release the line's reservation (reason {REASON})");
            let repair = first.then(|| Repair::Release {
                order_id: r.order_id.clone(),
                line_id: r.line_id.clone(),
                sku: r.sku.clone(),
            });
            out.discrepancies.push((x, repair));
            continue;
        }
        pick_findings(inv, r, picks, &mut out);
        allocation_findings(inv, r, order, picks, &mut out);
    }
    for b in &inv.backorders {
        let Some(order) = by_id.get(&b.order_id) else { continue };
        if closed(order, &b.line_id) {
            let mut x = found(
                "backorder_for_closed_order",
                &b.sku,
                format!(
                    "line {} of order {} waits for {} units, but the order is {}",
                    b.line_id,
                    b.order_id,
                    b.qty,
                    order.state().as_str()
                ),
            );
            x.order_id = Some(b.order_id.clone());
            x.line_id = Some(b.line_id.clone());
            x.action = format!("take the line off the backorder queue (reason {REASON})");
            let repair = released.insert(&b.line_id).then(|| Repair::Release {
                order_id: b.order_id.clone(),
                line_id: b.line_id.clone(),
                sku: b.sku.clone(),
            });
            out.discrepancies.push((x, repair));
        }
    }
    out
}

/// Units inventory committed for a line at a location.
fn committed(inv: &InventoryView, line: &LineId, location: &LocationId) -> u64 {
    inv.picked.iter().filter(|(l, loc, _)| l == line && loc == location).map(|(_, _, q)| u64::from(*q)).sum()
}

/// Completed picks of a reserved line that inventory's ledger never committed.
fn pick_findings(inv: &InventoryView, r: &ReservedUnits, picks: &[PickTask], out: &mut Findings) {
    let done: Vec<&PickTask> = picks
        .iter()
        .filter(|p| p.line_id == r.line_id && p.location == r.location && p.status == PickStatus::Completed)
        .collect();
    let picked: u64 = done.iter().map(|p| u64::from(p.qty_picked)).sum();
    let seen = committed(inv, &r.line_id, &r.location);
    if picked <= seen {
        return;
    }
    // Skip the oldest picks the ledger already committed; commit the rest.
    let mut covered = seen;
    for p in done {
        let qty = u64::from(p.qty_picked);
        if covered >= qty {
            covered -= qty;
            continue;
        }
        covered = 0;
        let mut x = found(
            "pick_not_committed",
            &r.sku,
            format!(
                "pick {} of {} units is complete in picking, but inventory still reserves the line ({} units)",
                p.id, p.qty_picked, r.qty
            ),
        );
        x.order_id = Some(r.order_id.clone());
        x.line_id = Some(r.line_id.clone());
        x.location = Some(r.location.clone());
        x.action = format!("commit the pick in the ledger (reason {REASON}) and republish it");
        let repair = Repair::CommitPick {
            order_id: r.order_id.clone(),
            line_id: r.line_id.clone(),
            sku: r.sku.clone(),
            location: r.location.clone(),
            qty: p.qty_picked,
            instruction_key: p.instruction_key.clone(),
            pick_id: p.id.clone(),
        };
        out.discrepancies.push((x, Some(repair)));
    }
}

/// The order's unpicked allocation at the location differs from inventory's
/// reservation (reported only: which side is right needs a person).
fn allocation_findings(inv: &InventoryView, r: &ReservedUnits, order: &Order, picks: &[PickTask], out: &mut Findings) {
    let Some(line) = order.lines().iter().find(|l| l.line_id == r.line_id) else { return };
    let open = line.allocation_at(&r.location).map_or(0, |a| u64::from(a.qty.saturating_sub(a.picked)));
    // Picks inventory has not seen yet are explained by `pick_not_committed`.
    let unseen: u64 = picks
        .iter()
        .filter(|p| p.line_id == r.line_id && p.location == r.location && p.status == PickStatus::Completed)
        .map(|p| u64::from(p.qty_picked))
        .sum::<u64>()
        .saturating_sub(committed(inv, &r.line_id, &r.location));
    if open == r.qty || open + unseen == r.qty {
        return;
    }
    let mut x = found(
        "allocation_mismatch",
        &r.sku,
        format!(
            "order {} has {open} unpicked units of line {} allocated here, inventory reserves {}",
            r.order_id, r.line_id, r.qty
        ),
    );
    x.order_id = Some(r.order_id.clone());
    x.line_id = Some(r.line_id.clone());
    x.location = Some(r.location.clone());
    out.discrepancies.push((x, None));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<T: TryFrom<String>>(s: &str) -> T
    where
        T::Error: std::fmt::Debug,
    {
        T::try_from(s.to_owned()).expect("a valid id")
    }

    #[test]
    fn drift_is_restated_and_a_reservation_for_an_unknown_order_is_only_reported() {
        let inv = InventoryView {
            reservations: vec![ReservedUnits {
                order_id: id("o-ghost"),
                line_id: id("o-ghost:1"),
                sku: id("SKU-1"),
                location: id("WH-1"),
                qty: 2,
            }],
            drift: vec![StockDrift { sku: id("SKU-2"), location: id("WH-1"), delta: -3 }],
            skus: 2,
            ..InventoryView::default()
        };
        let found = diff(&inv, &[], &[]);
        let kinds: Vec<(&str, bool)> =
            found.discrepancies.iter().map(|(d, r)| (d.kind.as_str(), r.is_some())).collect();
        assert_eq!(kinds, vec![("stock_drift", true), ("reservation_for_unknown_order", false)]);
        assert_eq!(found.discrepancies[0].1, Some(Repair::Restate { sku: id("SKU-2"), location: id("WH-1") }));
        assert!(diff(&InventoryView::default(), &[], &[]).discrepancies.is_empty());
    }
}
