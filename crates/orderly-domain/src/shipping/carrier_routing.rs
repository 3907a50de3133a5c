//! Which carrier gets a label (PRODUCT.md §4.10): each zone has a primary and a
//! secondary carrier; a label goes to the primary until it has failed
//! `shipping.max_retries` times (default 3) or its breaker is open, then to the
//! secondary, and the shipment records the fallback and its cost difference.
//!
//! ```
//! use orderly_domain::shipping::carrier_routing::{CarrierId, CarrierPair, CarrierRoutes};
//! use orderly_domain::Zone;
//!
//! let fast = CarrierId::parse("fastship").expect("valid id");
//! let slow = CarrierId::parse("slowpost").expect("valid id");
//! let eu = Zone::parse("EU").expect("valid zone");
//! let mut routes = CarrierRoutes::new();
//! let pair = CarrierPair::new(fast.clone(), slow.clone()).expect("distinct carriers");
//! routes.insert(eu.clone(), pair).expect("a new zone");
//!
//! let first = routes.choose(&eu, 0, 3, false).expect("EU is routed");
//! assert_eq!((first.carrier, first.fallback_from), (fast.clone(), None));
//! let after_three_failures = routes.choose(&eu, 3, 3, false).expect("EU is routed");
//! assert_eq!((after_three_failures.carrier, after_three_failures.fallback_from), (slow, Some(fast)));
//! ```

use crate::ids::{ID_LEN_MAX, IdError, Zone};
use crate::money::Money;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Default number of failures on the primary carrier before falling back.
pub const MAX_RETRIES_DEFAULT: u32 = 3;

/// Most zones a routing table holds.
pub const ZONES_MAX: usize = 1_024;

/// A carrier's id, e.g. `fastship`: the same alphabet and length limit as every
/// other id ([`crate::ids`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CarrierId(String);

impl CarrierId {
    /// Parses and validates a carrier id.
    pub fn parse(s: impl Into<String>) -> Result<CarrierId, IdError> {
        const KIND: &str = "carrier id";
        let s = s.into();
        if s.is_empty() {
            return Err(IdError::Empty { kind: KIND });
        }
        if s.len() > ID_LEN_MAX {
            return Err(IdError::TooLong { kind: KIND, max: ID_LEN_MAX });
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
            return Err(IdError::BadChar { kind: KIND });
        }
        Ok(CarrierId(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CarrierId {
    type Error = IdError;
    fn try_from(s: String) -> Result<CarrierId, IdError> {
        CarrierId::parse(s)
    }
}

impl From<CarrierId> for String {
    fn from(id: CarrierId) -> String {
        id.0
    }
}

impl fmt::Display for CarrierId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for CarrierId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Why a route cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// Primary and secondary are the same carrier, so there is nothing to fall back to.
    #[error("zone's primary and secondary carrier are both {0}")]
    SameCarrier(CarrierId),
    /// The zone already has a route.
    #[error("zone {0} already has a route")]
    DuplicateZone(Zone),
    /// More than [`ZONES_MAX`] zones.
    #[error("more than {max} zones")]
    TooManyZones {
        /// The limit.
        max: usize,
    },
}

/// A zone's two carriers; always different.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CarrierPair {
    primary: CarrierId,
    secondary: CarrierId,
}

impl CarrierPair {
    /// A pair of distinct carriers.
    pub fn new(primary: CarrierId, secondary: CarrierId) -> Result<CarrierPair, RoutingError> {
        if primary == secondary {
            return Err(RoutingError::SameCarrier(primary));
        }
        Ok(CarrierPair { primary, secondary })
    }

    /// The carrier tried first.
    pub fn primary(&self) -> &CarrierId {
        &self.primary
    }

    /// The carrier a label falls back to.
    pub fn secondary(&self) -> &CarrierId {
        &self.secondary
    }
}

/// The carrier chosen for a label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CarrierChoice {
    /// Who gets the label request.
    pub carrier: CarrierId,
    /// The primary carrier, when this is a fallback to the secondary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<CarrierId>,
}

impl CarrierChoice {
    /// Whether the label falls back from the primary carrier.
    pub fn is_fallback(&self) -> bool {
        self.fallback_from.is_some()
    }
}

/// Zone → (primary, secondary) carriers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CarrierRoutes {
    routes: BTreeMap<Zone, CarrierPair>,
}

impl CarrierRoutes {
    /// No routes.
    pub fn new() -> CarrierRoutes {
        CarrierRoutes::default()
    }

    /// Adds a zone's route; each zone is routed once.
    pub fn insert(&mut self, zone: Zone, pair: CarrierPair) -> Result<(), RoutingError> {
        if self.routes.contains_key(&zone) {
            return Err(RoutingError::DuplicateZone(zone));
        }
        if self.routes.len() >= ZONES_MAX {
            return Err(RoutingError::TooManyZones { max: ZONES_MAX });
        }
        self.routes.insert(zone, pair);
        Ok(())
    }

    /// The carrier for a label to `zone`: the primary until it has failed
    /// `max_retries` times for this label or its breaker is open, then the
    /// secondary with `fallback_from` set. `None` for a zone with no route (the
    /// caller turns that into its error). With `max_retries` 0 the primary is
    /// never tried. Whether the secondary's own breaker is open is the caller's
    /// next question.
    pub fn choose(
        &self,
        zone: &Zone,
        primary_failures: u32,
        max_retries: u32,
        primary_breaker_open: bool,
    ) -> Option<CarrierChoice> {
        let pair = self.routes.get(zone)?;
        let choice = if primary_failures >= max_retries || primary_breaker_open {
            CarrierChoice { carrier: pair.secondary.clone(), fallback_from: Some(pair.primary.clone()) }
        } else {
            CarrierChoice { carrier: pair.primary.clone(), fallback_from: None }
        };
        Some(choice)
    }

    /// The route for `zone`.
    pub fn get(&self, zone: &Zone) -> Option<&CarrierPair> {
        self.routes.get(zone)
    }

    /// Every route, by zone.
    pub fn iter(&self) -> impl Iterator<Item = (&Zone, &CarrierPair)> {
        self.routes.iter()
    }

    /// How many zones are routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no zone is routed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// What falling back costs: `secondary_price - primary_price` (negative when
/// the secondary is cheaper). Recorded on the shipment and in metrics.
pub fn cost_difference(primary_price: Money, secondary_price: Money) -> Money {
    secondary_price.saturating_sub(primary_price)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carrier(s: &str) -> CarrierId {
        CarrierId::parse(s).expect("valid carrier id")
    }

    fn zone(s: &str) -> Zone {
        Zone::parse(s).expect("valid zone")
    }

    fn eu_routes() -> CarrierRoutes {
        let mut routes = CarrierRoutes::new();
        let pair = CarrierPair::new(carrier("fastship"), carrier("slowpost")).expect("distinct carriers");
        routes.insert(zone("EU"), pair).expect("new zone");
        routes
    }

    #[test]
    fn carrier_ids_are_validated_like_other_ids() {
        assert_eq!(carrier("fast-ship_2").as_str(), "fast-ship_2");
        assert_eq!(CarrierId::parse(""), Err(IdError::Empty { kind: "carrier id" }));
        assert!(matches!(CarrierId::parse("fast ship"), Err(IdError::BadChar { .. })));
        assert!(matches!(CarrierId::parse("x".repeat(ID_LEN_MAX + 1)), Err(IdError::TooLong { .. })));
        assert!(serde_json::from_str::<CarrierId>("\"bad id\"").is_err());
        assert_eq!(serde_json::to_string(&carrier("fastship")).expect("serializable"), "\"fastship\"");
    }

    #[test]
    fn rejects_routes_without_a_real_fallback_or_twice_for_a_zone() {
        assert_eq!(
            CarrierPair::new(carrier("fastship"), carrier("fastship")),
            Err(RoutingError::SameCarrier(carrier("fastship")))
        );
        let mut routes = eu_routes();
        let again = CarrierPair::new(carrier("a"), carrier("b")).expect("distinct carriers");
        assert_eq!(routes.insert(zone("EU"), again), Err(RoutingError::DuplicateZone(zone("EU"))));
        assert_eq!(routes.len(), 1);
    }

    #[test]
    fn given_a_healthy_primary_when_choosing_then_the_primary_gets_the_label() {
        let choice = eu_routes().choose(&zone("EU"), 2, 3, false).expect("routed zone");
        assert_eq!(choice, CarrierChoice { carrier: carrier("fastship"), fallback_from: None });
        assert!(!choice.is_fallback());
    }

    #[test]
    fn given_max_retries_failures_when_choosing_then_the_secondary_gets_the_label() {
        let choice = eu_routes().choose(&zone("EU"), 3, MAX_RETRIES_DEFAULT, false).expect("routed zone");
        assert_eq!(choice, CarrierChoice { carrier: carrier("slowpost"), fallback_from: Some(carrier("fastship")) });
        assert!(choice.is_fallback());
    }

    #[test]
    fn given_an_open_primary_breaker_when_choosing_then_the_secondary_gets_the_label_at_once() {
        let choice = eu_routes().choose(&zone("EU"), 0, 3, true).expect("routed zone");
        assert_eq!(choice.carrier, carrier("slowpost"));
        assert_eq!(choice.fallback_from, Some(carrier("fastship")));
    }

    #[test]
    fn given_an_unknown_zone_when_choosing_then_there_is_no_carrier() {
        assert_eq!(eu_routes().choose(&zone("US"), 0, 3, false), None);
    }

    #[test]
    fn cost_difference_is_secondary_minus_primary() {
        let (primary, secondary) = (Money::parse("4.95").expect("money"), Money::parse("6.10").expect("money"));
        assert_eq!(cost_difference(primary, secondary).to_string(), "1.15");
        assert_eq!(cost_difference(secondary, primary).to_string(), "-1.15");
    }

    #[test]
    fn serializes_a_fallback_choice_for_the_shipment() {
        let choice = eu_routes().choose(&zone("EU"), 3, 3, false).expect("routed zone");
        assert_eq!(
            serde_json::to_value(&choice).expect("serializable"),
            serde_json::json!({"carrier": "slowpost", "fallback_from": "fastship"})
        );
    }
}
