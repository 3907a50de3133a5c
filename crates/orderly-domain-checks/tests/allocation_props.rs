//! Invariants of routing: a plan never allocates stock that is not there or
//! units nobody ordered, accounts for every ordered unit, fills as much as the
//! locations can, ships once when one location can fill the order, needs every
//! location it uses, is optimal when the search is exact, and does not depend on
//! the order of inputs.

use orderly_domain::allocation::{Location, LocationKind, ROUTE_EXACT_LOCATIONS_MAX, RouteLine, RoutePlan, route};
use orderly_domain::{LineId, LocationId, Qty, Sku, Zone};
use proptest::prelude::*;
use std::collections::BTreeMap;

const SKUS: usize = 3;

/// A routing problem: locations with zones and stock, and order lines.
#[derive(Debug, Clone)]
struct Problem {
    locations: Vec<Location>,
    /// Units per (location index, sku index).
    stock: Vec<[u64; SKUS]>,
    lines: Vec<RouteLine>,
}

impl Problem {
    fn available(&self, sku: &Sku, location: &LocationId) -> u64 {
        let l = self.locations.iter().position(|x| &x.id == location).expect("routing asks about known locations");
        self.stock[l][sku_index(sku)]
    }

    fn route(&self) -> RoutePlan {
        route(&self.lines, &ship_to(), &self.locations, |s, l| self.available(s, l))
    }

    fn demand(&self) -> [u64; SKUS] {
        let mut demand = [0; SKUS];
        for line in &self.lines {
            demand[sku_index(&line.sku)] += u64::from(line.qty);
        }
        demand
    }

    /// Units a set of locations (by index) can fill.
    fn fill(&self, set: &[usize]) -> u64 {
        let demand = self.demand();
        (0..SKUS).map(|s| demand[s].min(set.iter().map(|&l| self.stock[l][s]).sum())).sum()
    }
}

fn ship_to() -> Zone {
    Zone::parse("EU").expect("valid zone")
}

fn sku_index(sku: &Sku) -> usize {
    sku.as_str()[1..].parse().expect("test skus are S0..S2")
}

fn problem(locations_max: usize) -> impl Strategy<Value = Problem> {
    let units = prop_oneof![2 => Just(0u64), 3 => 0u64..12];
    let location = (any::<bool>(), prop::array::uniform3(units));
    let line = (0..SKUS, 0u32..=20);
    (prop::collection::vec(location, 1..=locations_max), prop::collection::vec(line, 0..=5)).prop_map(
        |(locations, lines)| Problem {
            locations: locations
                .iter()
                .enumerate()
                .map(|(i, (in_zone, _))| Location {
                    id: LocationId::parse(format!("L{i:02}")).expect("valid id"),
                    zone: Zone::parse(if *in_zone { "EU" } else { "US" }).expect("valid zone"),
                    kind: LocationKind::Warehouse,
                })
                .collect(),
            stock: locations.iter().map(|(_, stock)| *stock).collect(),
            lines: lines
                .into_iter()
                .enumerate()
                .map(|(i, (sku, qty))| RouteLine {
                    line_id: LineId::parse(format!("o:{i}")).expect("valid id"),
                    sku: Sku::parse(format!("S{sku}")).expect("valid sku"),
                    qty,
                })
                .collect(),
        },
    )
}

fn unfilled_of(plan: &RoutePlan, line_id: &LineId) -> Qty {
    plan.unfilled().iter().filter(|(l, _)| l == line_id).map(|(_, q)| *q).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_allocates_more_than_is_available(p in problem(14)) {
        let plan = p.route();
        let mut taken: BTreeMap<(usize, LocationId), u64> = BTreeMap::new();
        for line in plan.lines() {
            for (location, qty) in &line.allocations {
                prop_assert!(*qty > 0, "empty allocation {:?}", line);
                *taken.entry((sku_index(&line.sku), location.clone())).or_default() += u64::from(*qty);
            }
        }
        for ((sku, location), qty) in taken {
            let sku = Sku::parse(format!("S{sku}")).expect("valid sku");
            prop_assert!(qty <= p.available(&sku, &location), "{} of {} at {}", qty, sku, location);
        }
    }

    #[test]
    fn accounts_for_every_ordered_unit(p in problem(14)) {
        let plan = p.route();
        prop_assert_eq!(plan.lines().len(), p.lines.len());
        for (line, routed) in p.lines.iter().zip(plan.lines()) {
            prop_assert_eq!(&routed.line_id, &line.line_id);
            let allocated: u64 = routed.allocations.iter().map(|(_, q)| u64::from(*q)).sum();
            prop_assert!(allocated <= u64::from(line.qty));
            prop_assert_eq!(allocated + u64::from(unfilled_of(&plan, &line.line_id)), u64::from(line.qty));
        }
        prop_assert!(plan.unfilled().iter().all(|(_, q)| *q > 0));
    }

    #[test]
    fn fills_as_much_as_the_locations_can(p in problem(14)) {
        let all: Vec<usize> = (0..p.locations.len()).collect();
        prop_assert_eq!(p.route().allocated_qty(), p.fill(&all));
    }

    #[test]
    fn ships_once_when_one_location_can_fill_the_order(
        mut p in problem(14),
        which in any::<prop::sample::Index>(),
        spare in prop::array::uniform3(0u64..3),
    ) {
        // Given one location that holds at least the whole order
        let demand = p.demand();
        let l = which.index(p.locations.len());
        for s in 0..SKUS {
            p.stock[l][s] = p.stock[l][s].max(demand[s] + spare[s]);
        }
        // Then the order ships once, complete (or not at all if it is empty)
        let plan = p.route();
        let ordered = demand.iter().any(|d| *d > 0);
        prop_assert_eq!(plan.shipments(), usize::from(ordered));
        prop_assert!(plan.is_complete());
    }

    #[test]
    fn exact_search_is_optimal(p in problem(ROUTE_EXACT_LOCATIONS_MAX)) {
        // Brute force: the fewest locations reaching the maximum fill, then
        // the most of them in the customer's zone.
        let n = p.locations.len();
        let target = p.fill(&(0..n).collect::<Vec<_>>());
        let in_zone = |set: &[usize]| set.iter().filter(|&&l| p.locations[l].zone == ship_to()).count();
        let best = (0u32..1 << n)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect::<Vec<usize>>())
            .filter(|set| p.fill(set) == target)
            .map(|set| (set.len(), std::cmp::Reverse(in_zone(&set))))
            .min()
            .expect("the full set reaches the maximum fill");
        let plan = p.route();
        let used: Vec<usize> = plan.locations().into_iter().map(|id| id.as_str()[1..].parse().expect("L00..")).collect();
        prop_assert_eq!((used.len(), std::cmp::Reverse(in_zone(&used))), best);
    }

    #[test]
    fn uses_no_redundant_location(p in problem(14)) {
        // Every location the plan ships from is needed to reach the fill,
        // whether the search was exact or greedy.
        let plan = p.route();
        let used: Vec<usize> = plan.locations().into_iter().map(|id| id.as_str()[1..].parse().expect("L00..")).collect();
        for l in &used {
            let without: Vec<usize> = used.iter().copied().filter(|x| x != l).collect();
            prop_assert!(p.fill(&without) < plan.allocated_qty(), "L{:02} is redundant in {:?}", l, used);
        }
    }

    #[test]
    fn is_deterministic_whatever_the_location_order(p in problem(14), seed in any::<u64>()) {
        let plan = p.route();
        prop_assert_eq!(&p.route(), &plan);
        // Rotate and reverse the location list (stock moves with it).
        let mut shuffled = p.clone();
        let k = (seed as usize) % p.locations.len();
        let mut pairs: Vec<(Location, [u64; SKUS])> = p.locations.iter().cloned().zip(p.stock.iter().copied()).collect();
        pairs.rotate_left(k);
        if seed % 2 == 0 {
            pairs.reverse();
        }
        (shuffled.locations, shuffled.stock) = pairs.into_iter().unzip();
        prop_assert_eq!(shuffled.route(), plan);
    }
}
