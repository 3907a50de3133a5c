//! Routing order lines to stock locations, and the small policies around
//! allocation: whether a line is reserved before the order is acknowledged
//! (synchronous) or after (asynchronous), and whether a split order may ship
//! partially.
//!
//! Routing is pure: stock availability comes in as a function, the plan goes
//! out as data, and the inventory service reserves exactly what the plan names.

use crate::{LineId, LocationId, Money, Qty, Sku, Zone};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// Most candidate locations (locations holding stock of some ordered SKU) for
/// which [`route`] searches every subset exactly: 2^10 = 1024 subsets, each
/// checked in time linear in the number of SKUs. Beyond it, a greedy set cover.
pub const ROUTE_EXACT_LOCATIONS_MAX: usize = 10;

/// Default of `split.min_order_value_for_partial`: 50.00.
pub const DEFAULT_MIN_ORDER_VALUE_FOR_PARTIAL: Money = Money::from_minor(5_000);

/// Routes order lines to the locations that should fill them.
///
/// The policy, in order of importance:
/// 1. fill as many units as the given locations can;
/// 2. use the fewest distinct locations (shipments);
/// 3. among those, use the most locations in the customer's zone (`ship_to`);
/// 4. among those, the smallest location ids, so the answer is deterministic.
///
/// Within the chosen locations a line goes whole to one location whenever one
/// can fill it (best fit: the one with the least stock to spare); it is split,
/// largest pieces first, only when none can. Lines of the same SKU share that
/// SKU's stock, so a plan never allocates more than `available` per
/// (sku, location). Up to [`ROUTE_EXACT_LOCATIONS_MAX`] candidate locations the
/// choice is exact; beyond, a greedy cover pruned of redundant locations.
///
/// `available` is called once per (ordered SKU, location). A location listed
/// twice counts once, with its first zone. The location's kind does not
/// influence routing.
pub fn route(
    lines: &[RouteLine],
    ship_to: &Zone,
    locations: &[Location],
    available: impl Fn(&Sku, &LocationId) -> u64,
) -> RoutePlan {
    let stock = Stock::gather(lines, ship_to, locations, &available);
    let chosen =
        if stock.candidates.len() <= ROUTE_EXACT_LOCATIONS_MAX { stock.exact_cover() } else { stock.greedy_cover() };
    stock.assign(lines, &chosen)
}

/// One order line as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteLine {
    /// The line being routed.
    pub line_id: LineId,
    /// What it orders.
    pub sku: Sku,
    /// How many units.
    pub qty: Qty,
}

/// What kind of stock location a [`Location`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationKind {
    /// One of the brand's own warehouses.
    Warehouse,
    /// A supplier that ships directly to the customer.
    Dropship,
    /// Stock held by a marketplace's fulfilment network.
    Marketplace,
}

/// A place stock can ship from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Its id.
    pub id: LocationId,
    /// The shipping zone it sits in.
    pub zone: Zone,
    /// Warehouse, drop-shipper or marketplace.
    pub kind: LocationKind,
}

/// Where each line's units come from, and what could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutePlan {
    lines: Vec<LineRoute>,
    unfilled: Vec<(LineId, Qty)>,
}

/// One line of a [`RoutePlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRoute {
    /// The line.
    pub line_id: LineId,
    /// What it orders.
    pub sku: Sku,
    /// How many units it asked for.
    pub qty: Qty,
    /// Where its units come from: one entry unless no single location could
    /// fill it, every quantity positive, their sum at most `qty`.
    pub allocations: Vec<(LocationId, Qty)>,
}

impl RoutePlan {
    /// Every routed line, in the order they were given.
    pub fn lines(&self) -> &[LineRoute] {
        &self.lines
    }

    /// The allocations of one line (empty if the line is unknown or unfilled).
    pub fn allocations(&self, line_id: &LineId) -> &[(LocationId, Qty)] {
        self.lines.iter().find(|l| &l.line_id == line_id).map_or(&[], |l| l.allocations.as_slice())
    }

    /// The lines that could not be fully allocated, with the missing quantity.
    pub fn unfilled(&self) -> &[(LineId, Qty)] {
        &self.unfilled
    }

    /// Whether every unit of every line is allocated.
    pub fn is_complete(&self) -> bool {
        self.unfilled.is_empty()
    }

    /// The distinct locations the plan ships from, sorted by id.
    pub fn locations(&self) -> BTreeSet<&LocationId> {
        self.lines.iter().flat_map(|l| l.allocations.iter().map(|(loc, _)| loc)).collect()
    }

    /// How many shipments the plan makes: the number of distinct locations used.
    pub fn shipments(&self) -> usize {
        self.locations().len()
    }

    /// Units allocated over all lines.
    pub fn allocated_qty(&self) -> u64 {
        self.lines.iter().flat_map(|l| &l.allocations).map(|(_, qty)| u64::from(*qty)).sum()
    }
}

/// When a line's stock is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocationMode {
    /// Before the order is acknowledged: the API answers with the reservation or 409.
    Sync,
    /// After the order is created, from the `order.created` event.
    Async,
}

/// The mode of one line: `Sync` when its value (`unit_price.times(qty)`) is at
/// or above `allocation.sync_min_line_value`. A threshold of zero makes every
/// line synchronous.
pub fn allocation_mode(line_value: Money, sync_min_line_value: Money) -> AllocationMode {
    if line_value >= sync_min_line_value { AllocationMode::Sync } else { AllocationMode::Async }
}

/// The mode of a whole order, given its line values: `Sync` if any line is.
/// The order is then acknowledged only once its reservation is known, so the
/// customer never sees an acknowledged order whose valuable line cannot ship.
pub fn order_allocation_mode(
    line_values: impl IntoIterator<Item = Money>,
    sync_min_line_value: Money,
) -> AllocationMode {
    let any_sync = line_values.into_iter().any(|v| allocation_mode(v, sync_min_line_value) == AllocationMode::Sync);
    if any_sync { AllocationMode::Sync } else { AllocationMode::Async }
}

/// What to do with an order whose lines are not all ready to ship together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitDecision {
    /// Ship what is ready now; the rest follows.
    ShipPartial,
    /// Hold everything until it can ship together.
    WaitForConsolidation,
}

/// Orders worth at least `split.min_order_value_for_partial` ship partially;
/// smaller ones wait, since a second shipment would cost more than it is worth.
pub fn split_decision(order_value: Money, min_order_value_for_partial: Money) -> SplitDecision {
    if order_value >= min_order_value_for_partial {
        SplitDecision::ShipPartial
    } else {
        SplitDecision::WaitForConsolidation
    }
}

/// Demand and supply of one routing problem, indexed densely.
struct Stock<'a> {
    /// Distinct ordered SKUs, sorted.
    skus: Vec<&'a Sku>,
    /// Units ordered per SKU (same index as `skus`).
    demand: Vec<u64>,
    /// Locations holding some ordered SKU, in preference order: the
    /// customer's zone first, then by id. An index into this is a location's
    /// rank, so "smaller index" means "preferred".
    candidates: Vec<Candidate<'a>>,
}

struct Candidate<'a> {
    id: &'a LocationId,
    in_zone: bool,
    /// Units available per SKU (same index as `Stock::skus`).
    available: Vec<u64>,
}

impl<'a> Stock<'a> {
    fn gather(
        lines: &'a [RouteLine],
        ship_to: &Zone,
        locations: &'a [Location],
        available: &impl Fn(&Sku, &LocationId) -> u64,
    ) -> Stock<'a> {
        let mut by_sku: BTreeMap<&Sku, u64> = BTreeMap::new();
        for line in lines {
            *by_sku.entry(&line.sku).or_default() += u64::from(line.qty);
        }
        let (skus, demand): (Vec<&Sku>, Vec<u64>) = by_sku.into_iter().unzip();
        let mut seen = BTreeSet::new();
        let mut candidates = Vec::new();
        for location in locations.iter().filter(|l| seen.insert(&l.id)) {
            let available: Vec<u64> = skus.iter().map(|sku| available(sku, &location.id)).collect();
            if available.iter().zip(&demand).any(|(a, d)| *a > 0 && *d > 0) {
                candidates.push(Candidate { id: &location.id, in_zone: &location.zone == ship_to, available });
            }
        }
        candidates.sort_by(|a, b| (!a.in_zone, a.id).cmp(&(!b.in_zone, b.id)));
        Stock { skus, demand, candidates }
    }

    /// Units a set of candidates can fill, each SKU capped by its demand.
    fn fill(&self, chosen: &[usize]) -> u64 {
        let supply =
            |sku: usize| chosen.iter().map(|&c| self.candidates[c].available[sku]).fold(0, u64::saturating_add);
        self.demand.iter().enumerate().map(|(sku, demand)| supply(sku).min(*demand)).sum()
    }

    fn out_of_zone(&self, chosen: &[usize]) -> usize {
        chosen.iter().filter(|&&c| !self.candidates[c].in_zone).count()
    }

    fn max_fill(&self) -> u64 {
        self.fill(&(0..self.candidates.len()).collect::<Vec<_>>())
    }

    /// The best set by the policy of [`route`], by trying every subset in
    /// increasing size; the first size that reaches the maximum fill wins.
    fn exact_cover(&self) -> Vec<usize> {
        let n = self.candidates.len();
        let target = self.max_fill();
        if target == 0 {
            return Vec::new();
        }
        for size in 1..=n {
            let best = subsets(n, size)
                .filter(|set| self.fill(set) == target)
                .min_by(|a, b| (self.out_of_zone(a), a).cmp(&(self.out_of_zone(b), b)));
            if let Some(best) = best {
                return best;
            }
        }
        unreachable!("the set of all candidates reaches the maximum fill by definition")
    }

    /// Greedy set cover: repeatedly add the location that fills the most
    /// units (ties to the preferred one), then drop locations the others make
    /// redundant, least preferred first. A single location that fills the
    /// whole order is always found first, so such an order ships once.
    fn greedy_cover(&self) -> Vec<usize> {
        let target = self.max_fill();
        let mut chosen: Vec<usize> = Vec::new();
        let mut filled = 0;
        while filled < target {
            let best = (0..self.candidates.len())
                .filter(|c| !chosen.contains(c))
                .map(|c| (c, self.fill(&[chosen.as_slice(), &[c]].concat())))
                .max_by_key(|&(c, fill)| (fill, Reverse(c)));
            // While the fill is short of the maximum, some unchosen location
            // holds a missing SKU, so every step strictly gains.
            let Some((c, fill)) = best.filter(|&(_, fill)| fill > filled) else { break };
            chosen.push(c);
            filled = fill;
        }
        chosen.sort_unstable();
        for c in chosen.clone().into_iter().rev() {
            let without: Vec<usize> = chosen.iter().copied().filter(|&x| x != c).collect();
            if self.fill(&without) == target {
                chosen = without;
            }
        }
        chosen
    }

    /// Turns a chosen set of candidates into allocations, larger lines first
    /// so they get the whole-location fits.
    fn assign(&self, lines: &[RouteLine], chosen: &[usize]) -> RoutePlan {
        let mut remaining: Vec<Vec<u64>> = chosen.iter().map(|&c| self.candidates[c].available.clone()).collect();
        let ids: Vec<&LocationId> = chosen.iter().map(|&c| self.candidates[c].id).collect();
        let mut order: Vec<usize> = (0..lines.len()).collect();
        order.sort_by_key(|&i| (Reverse(lines[i].qty), i));
        let mut allocations = vec![Vec::new(); lines.len()];
        for i in order {
            let sku = self.skus.binary_search(&&lines[i].sku).expect("every line's sku was gathered");
            let mut column: Vec<&mut u64> = remaining.iter_mut().map(|r| &mut r[sku]).collect();
            allocations[i] = assign_line(lines[i].qty, &mut column, &ids);
        }
        let mut plan = RoutePlan { lines: Vec::with_capacity(lines.len()), unfilled: Vec::new() };
        for (line, allocations) in lines.iter().zip(allocations) {
            let allocated: Qty = allocations.iter().map(|(_, qty)| qty).sum();
            if allocated < line.qty {
                plan.unfilled.push((line.line_id.clone(), line.qty - allocated));
            }
            plan.lines.push(LineRoute {
                line_id: line.line_id.clone(),
                sku: line.sku.clone(),
                qty: line.qty,
                allocations,
            });
        }
        plan
    }
}

/// Allocates one line from the remaining stock of its SKU at the chosen
/// locations: whole from the best-fitting location if one can, else split
/// over the locations with the most stock first.
fn assign_line(qty: Qty, remaining: &mut [&mut u64], ids: &[&LocationId]) -> Vec<(LocationId, Qty)> {
    let want = u64::from(qty);
    if want == 0 {
        return Vec::new();
    }
    let whole = (0..remaining.len()).filter(|&j| *remaining[j] >= want).min_by_key(|&j| (*remaining[j], j));
    if let Some(j) = whole {
        *remaining[j] -= want;
        return vec![(ids[j].clone(), qty)];
    }
    let mut by_stock: Vec<usize> = (0..remaining.len()).filter(|&j| *remaining[j] > 0).collect();
    by_stock.sort_by_key(|&j| (Reverse(*remaining[j]), j));
    let mut left = want;
    let mut pieces = Vec::new();
    for j in by_stock {
        if left == 0 {
            break;
        }
        let take = left.min(*remaining[j]);
        *remaining[j] -= take;
        left -= take;
        pieces.push((ids[j].clone(), Qty::try_from(take).expect("a piece is at most the line's qty, a Qty")));
    }
    pieces
}

/// Every subset of `0..n` with `size` members, as sorted index lists.
fn subsets(n: usize, size: usize) -> impl Iterator<Item = Vec<usize>> {
    debug_assert!(n <= ROUTE_EXACT_LOCATIONS_MAX, "exact search is bounded");
    (0u32..1 << n)
        .filter(move |mask| mask.count_ones() as usize == size)
        .map(move |mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(id: &str, zone: &str) -> Location {
        Location {
            id: LocationId::parse(id).expect("valid id"),
            zone: Zone::parse(zone).expect("valid zone"),
            kind: LocationKind::Warehouse,
        }
    }

    fn line(id: &str, sku: &str, qty: Qty) -> RouteLine {
        RouteLine { line_id: LineId::parse(id).expect("valid id"), sku: Sku::parse(sku).expect("valid sku"), qty }
    }

    /// Availability from `(sku, location, units)` rows; anything unlisted is zero.
    fn stock(rows: &[(&str, &str, u64)]) -> impl Fn(&Sku, &LocationId) -> u64 + use<> {
        let map: BTreeMap<(String, String), u64> =
            rows.iter().map(|(s, l, q)| ((s.to_string(), l.to_string()), *q)).collect();
        move |sku, location| map.get(&(sku.to_string(), location.to_string())).copied().unwrap_or(0)
    }

    fn eu() -> Zone {
        Zone::parse("EU").expect("valid zone")
    }

    fn allocs(plan: &RoutePlan, line_id: &str) -> Vec<(String, Qty)> {
        let id = LineId::parse(line_id).expect("valid id");
        plan.allocations(&id).iter().map(|(l, q)| (l.to_string(), *q)).collect()
    }

    #[test]
    fn single_location_fills_all_lines() {
        // Given one warehouse holding both SKUs and another holding only one
        let locations = [loc("WH-A", "EU"), loc("WH-B", "EU")];
        let available = stock(&[("S1", "WH-A", 5), ("S2", "WH-A", 5), ("S1", "WH-B", 50)]);
        // When a two-line order is routed
        let plan = route(&[line("o:1", "S1", 3), line("o:2", "S2", 2)], &eu(), &locations, available);
        // Then it ships once, from the warehouse that has everything
        assert_eq!(plan.shipments(), 1);
        assert_eq!(allocs(&plan, "o:1"), [("WH-A".to_string(), 3)]);
        assert_eq!(allocs(&plan, "o:2"), [("WH-A".to_string(), 2)]);
        assert!(plan.is_complete());
        assert_eq!(plan.allocated_qty(), 5);
    }

    #[test]
    fn prefers_the_customers_zone() {
        // Given two warehouses that can each fill the order, one in the customer's zone
        let locations = [loc("A-US", "US"), loc("Z-EU", "EU")];
        let available = stock(&[("S1", "A-US", 10), ("S1", "Z-EU", 10)]);
        // When it is routed for an EU customer
        let plan = route(&[line("o:1", "S1", 4)], &eu(), &locations, available);
        // Then the EU warehouse ships it, although its id sorts later
        assert_eq!(allocs(&plan, "o:1"), [("Z-EU".to_string(), 4)]);
    }

    #[test]
    fn ties_go_to_the_smallest_location_id() {
        // Given two equally good in-zone warehouses, listed in reverse id order
        let locations = [loc("WH-B", "EU"), loc("WH-A", "EU")];
        let available = stock(&[("S1", "WH-A", 10), ("S1", "WH-B", 10)]);
        // When an order is routed
        let plan = route(&[line("o:1", "S1", 4)], &eu(), &locations, available);
        // Then the smaller id wins
        assert_eq!(allocs(&plan, "o:1"), [("WH-A".to_string(), 4)]);
    }

    #[test]
    fn splits_a_line_only_when_no_single_location_can_fill_it() {
        // Given two in-zone warehouses that together hold 10, and an
        // out-of-zone one that holds 10 alone
        let locations = [loc("EU-1", "EU"), loc("EU-2", "EU"), loc("US-1", "US")];
        let rows = [("S1", "EU-1", 6), ("S1", "EU-2", 4), ("S1", "US-1", 10)];
        // When a line of 10 is routed
        let plan = route(&[line("o:1", "S1", 10)], &eu(), &locations, stock(&rows));
        // Then it is not split: one location can fill it
        assert_eq!(allocs(&plan, "o:1"), [("US-1".to_string(), 10)]);

        // Given the out-of-zone warehouse has too little too
        let rows = [("S1", "EU-1", 6), ("S1", "EU-2", 4), ("S1", "US-1", 3)];
        // When the same line is routed
        let plan = route(&[line("o:1", "S1", 10)], &eu(), &locations, stock(&rows));
        // Then it is split over the two in-zone warehouses, largest piece first
        assert_eq!(allocs(&plan, "o:1"), [("EU-1".to_string(), 6), ("EU-2".to_string(), 4)]);
        assert_eq!(plan.shipments(), 2);
    }

    #[test]
    fn fewest_shipments_beats_the_customers_zone() {
        // Given each in-zone warehouse holds one of the SKUs, and an
        // out-of-zone warehouse holds both
        let locations = [loc("EU-1", "EU"), loc("EU-2", "EU"), loc("US-1", "US")];
        let available = stock(&[("S1", "EU-1", 5), ("S2", "EU-2", 5), ("S1", "US-1", 5), ("S2", "US-1", 5)]);
        // When a two-SKU order is routed for an EU customer
        let plan = route(&[line("o:1", "S1", 1), line("o:2", "S2", 1)], &eu(), &locations, available);
        // Then one out-of-zone shipment beats two in-zone ones
        assert_eq!(plan.shipments(), 1);
        assert_eq!(allocs(&plan, "o:1"), [("US-1".to_string(), 1)]);
        assert_eq!(allocs(&plan, "o:2"), [("US-1".to_string(), 1)]);
    }

    #[test]
    fn reports_the_unfilled_remainder() {
        // Given too little stock for one line and none for another
        let locations = [loc("EU-1", "EU"), loc("EU-2", "EU")];
        let available = stock(&[("S1", "EU-1", 2), ("S1", "EU-2", 1)]);
        // When the order is routed
        let plan = route(&[line("o:1", "S1", 5), line("o:2", "S2", 4)], &eu(), &locations, available);
        // Then everything that exists is allocated and the rest is reported
        assert_eq!(allocs(&plan, "o:1"), [("EU-1".to_string(), 2), ("EU-2".to_string(), 1)]);
        assert!(allocs(&plan, "o:2").is_empty());
        let unfilled: Vec<(String, Qty)> = plan.unfilled().iter().map(|(l, q)| (l.to_string(), *q)).collect();
        assert_eq!(unfilled, [("o:1".to_string(), 2), ("o:2".to_string(), 4)]);
        assert!(!plan.is_complete());
    }

    #[test]
    fn lines_of_one_sku_share_its_stock() {
        // Given 5 units at each of two warehouses
        let locations = [loc("EU-1", "EU"), loc("EU-2", "EU")];
        let available = stock(&[("S1", "EU-1", 5), ("S1", "EU-2", 5)]);
        // When two lines of that SKU ask for 4 and 5
        let plan = route(&[line("o:1", "S1", 4), line("o:2", "S1", 5)], &eu(), &locations, available);
        // Then each line comes whole from its own warehouse, none overdrawn
        assert_eq!(allocs(&plan, "o:1"), [("EU-2".to_string(), 4)]);
        assert_eq!(allocs(&plan, "o:2"), [("EU-1".to_string(), 5)]);
    }

    #[test]
    fn routing_is_deterministic_whatever_the_location_order() {
        // Given a split-prone order and the same locations in two orders
        let mut locations = vec![loc("EU-1", "EU"), loc("EU-2", "EU"), loc("US-1", "US"), loc("US-2", "US")];
        let rows = [("S1", "EU-1", 3), ("S1", "EU-2", 3), ("S1", "US-1", 3), ("S2", "US-2", 9), ("S2", "EU-1", 1)];
        let lines = [line("o:1", "S1", 7), line("o:2", "S2", 2)];
        // When it is routed twice, and once more with the locations reversed
        let first = route(&lines, &eu(), &locations, stock(&rows));
        let again = route(&lines, &eu(), &locations, stock(&rows));
        locations.reverse();
        let reversed = route(&lines, &eu(), &locations, stock(&rows));
        // Then all three plans are identical
        assert_eq!(first, again);
        assert_eq!(first, reversed);
    }

    #[test]
    fn many_locations_use_the_greedy_cover() {
        // Given more candidates than the exact search takes, one of which holds everything
        let mut locations: Vec<Location> = (0..20).map(|i| loc(&format!("L{i:02}"), "US")).collect();
        locations.push(loc("L99", "EU"));
        let available = |sku: &Sku, location: &LocationId| match (sku.as_str(), location.as_str()) {
            (_, "L07") => 100,
            ("S1", _) => 1,
            _ => 0,
        };
        // When an order is routed
        let plan = route(&[line("o:1", "S1", 10), line("o:2", "S2", 10)], &eu(), &locations, available);
        // Then it still ships once, from that location
        assert_eq!(plan.shipments(), 1);
        assert_eq!(allocs(&plan, "o:2"), [("L07".to_string(), 10)]);
    }

    #[test]
    fn greedy_cover_drops_redundant_locations() {
        // Given ten one-unit locations, X holding some of both SKUs, and Y and
        // Z each holding all of one SKU: greedy takes X first, which Y and Z
        // later make redundant
        let mut locations: Vec<Location> = (0..10).map(|i| loc(&format!("L{i:02}"), "EU")).collect();
        locations.extend([loc("X", "US"), loc("Y", "US"), loc("Z", "US")]);
        let available = |sku: &Sku, location: &LocationId| match (sku.as_str(), location.as_str()) {
            (_, "X") => 6,
            ("S1", "Y") | ("S2", "Z") => 10,
            ("S1", "Z") | ("S2", _) => 0,
            ("S1", _) => 1,
            _ => 0,
        };
        // When an order needs 10 of each
        let plan = route(&[line("o:1", "S1", 10), line("o:2", "S2", 10)], &eu(), &locations, available);
        // Then it ships from Y and Z only
        assert!(plan.is_complete());
        let used: Vec<&str> = plan.locations().into_iter().map(LocationId::as_str).collect();
        assert_eq!(used, ["Y", "Z"]);
    }

    #[test]
    fn empty_and_zero_quantity_orders_route_to_nothing() {
        let locations = [loc("EU-1", "EU")];
        let plan = route(&[], &eu(), &locations, stock(&[("S1", "EU-1", 5)]));
        assert_eq!((plan.shipments(), plan.is_complete()), (0, true));
        let plan = route(&[line("o:1", "S1", 0)], &eu(), &locations, stock(&[("S1", "EU-1", 5)]));
        assert_eq!((plan.shipments(), plan.is_complete(), plan.lines().len()), (0, true, 1));
    }

    #[test]
    fn lines_at_or_above_the_threshold_allocate_synchronously() {
        let threshold = Money::parse("100.00").expect("valid");
        let unit = Money::parse("25.00").expect("valid");
        assert_eq!(allocation_mode(unit.times(4), threshold), AllocationMode::Sync);
        assert_eq!(allocation_mode(unit.times(3), threshold), AllocationMode::Async);
        assert_eq!(order_allocation_mode([unit.times(1), unit.times(4)], threshold), AllocationMode::Sync);
        assert_eq!(order_allocation_mode([unit.times(1), unit.times(2)], threshold), AllocationMode::Async);
        assert_eq!(order_allocation_mode([], threshold), AllocationMode::Async);
        assert_eq!(serde_json::to_value(AllocationMode::Sync).expect("serializable"), "sync");
    }

    #[test]
    fn orders_at_or_above_the_partial_threshold_ship_partially() {
        let min = DEFAULT_MIN_ORDER_VALUE_FOR_PARTIAL;
        assert_eq!(split_decision(Money::parse("50.00").expect("valid"), min), SplitDecision::ShipPartial);
        assert_eq!(split_decision(Money::parse("49.99").expect("valid"), min), SplitDecision::WaitForConsolidation);
    }

    #[test]
    fn location_kinds_use_wire_names() {
        let json = serde_json::json!({"id": "DS-1", "zone": "EU", "kind": "dropship"});
        let location: Location = serde_json::from_value(json).expect("parses");
        assert_eq!(location.kind, LocationKind::Dropship);
    }
}
