//! What the outside world asks of the engine: the catalog (SKUs, one of them
//! hot; warehouses, a drop-shipper and a marketplace in two zones) and the
//! storefront's orders — mixed priorities, multi-line, several SKUs, some
//! worth enough to be reserved before they are acknowledged, some flash-sale
//! bursts on the hot SKU.

use crate::rng::SimRng;
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::{LocationId, Money, Priority, Qty, Sku, Zone};
use orderly_engine::app::{Customer, LineRequest, OrderRequest, ShipTo};

/// Regular SKUs.
pub const SKUS: [&str; 6] = ["SKU-A", "SKU-B", "SKU-C", "SKU-D", "SKU-E", "SKU-F"];
/// The flash-sale SKU.
pub const HOT_SKU: &str = "HOT-1";
/// Stock locations: (id, zone, kind).
pub const LOCATIONS: [(&str, &str, LocationKind); 4] = [
    ("WH-EU-1", "EU", LocationKind::Warehouse),
    ("WH-EU-2", "EU", LocationKind::Warehouse),
    ("WH-US-1", "US", LocationKind::Warehouse),
    ("MP-US-1", "US", LocationKind::Marketplace),
];
/// Unit prices, minor units: cheap lines, mid lines, and lines worth a
/// synchronous reservation (at or above the default 100.00 threshold).
const PRICES_MINOR: [i64; 6] = [499, 999, 1_999, 4_999, 12_000, 25_000];

/// Parses an id known to be valid (the catalog's constants).
pub fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).expect("catalog ids are valid")
}

/// The locations as the inventory service takes them.
pub fn locations() -> Vec<Location> {
    LOCATIONS.iter().map(|(l, z, k)| Location { id: id(l), zone: id(z), kind: *k }).collect()
}

/// A random location.
pub fn random_location(rng: &mut SimRng) -> LocationId {
    id(LOCATIONS[rng.index(LOCATIONS.len())].0)
}

/// A storefront order: 1 to 3 lines of distinct SKUs, small quantities with
/// now and then a large one, 30% same-day.
pub fn random_order(rng: &mut SimRng, n: u64) -> OrderRequest {
    let lines = rng.range(1, 3) as usize;
    let mut skus: Vec<&str> = SKUS.to_vec();
    rng.shuffle(&mut skus);
    let lines = skus
        .iter()
        .take(lines)
        .map(|sku| {
            let qty: Qty = if rng.chance(80) { rng.range(6, 15) as Qty } else { rng.range(1, 4) as Qty };
            let price = PRICES_MINOR[rng.index(PRICES_MINOR.len())];
            LineRequest { sku: id(sku), qty, unit_price: Money::from_minor(price) }
        })
        .collect();
    let p = priority(rng, 300);
    request(rng, n, lines, p)
}

/// A flash-sale order: one or two units of the hot SKU, half of them same-day.
pub fn flash_order(rng: &mut SimRng, n: u64) -> OrderRequest {
    let qty = rng.range(1, 2) as Qty;
    let line = LineRequest { sku: id(HOT_SKU), qty, unit_price: Money::from_minor(1_999) };
    let p = priority(rng, 500);
    request(rng, n, vec![line], p)
}

/// An order for exactly what a cart hold holds.
pub fn held_order(rng: &mut SimRng, n: u64, sku: Sku, qty: Qty) -> OrderRequest {
    let line = LineRequest { sku, qty, unit_price: Money::from_minor(2_499) };
    let p = priority(rng, 300);
    request(rng, n, vec![line], p)
}

fn priority(rng: &mut SimRng, same_day_per_mille: u64) -> Priority {
    if rng.chance(same_day_per_mille) { Priority::SameDay } else { Priority::Standard }
}

fn request(rng: &mut SimRng, n: u64, lines: Vec<LineRequest>, priority: Priority) -> OrderRequest {
    let zone: Zone = id(if rng.chance(600) { "EU" } else { "US" });
    OrderRequest {
        customer: Customer { id: id(&format!("c-{}", n % 97)), email: format!("c{}@example.com", n % 97) },
        ship_to: ShipTo { zone },
        priority,
        lines,
        hold_ids: Vec::new(),
        delivery_window: None,
    }
}
