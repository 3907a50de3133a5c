//! Orderly's pure domain core: the order state machine, the inventory ledger,
//! allocation and routing policies, the pick queue, shipping policies and the
//! event envelope.
//!
//! Nothing here does I/O, awaits, reads a clock or draws a random number: time,
//! ids and random offsets are arguments. Every rule is a `decide` that returns
//! events or a typed error; every state change is an `apply` that cannot fail.

pub mod allocation;
pub mod event;
pub mod ids;
pub mod ledger;
pub mod money;
pub mod order;
pub mod pick_queue;
pub mod shipping;
pub mod time;

pub use ids::{CustomerId, HoldId, IdError, LineId, LocationId, OrderId, PickId, ShipmentId, Sku, Zone};
pub use money::{Money, MoneyError};
pub use time::Timestamp;

/// A count of units of one SKU. Always positive where it names a line or a
/// movement; ledger balances use plain `u64`.
pub type Qty = u32;

/// How urgently an order must ship. `SameDay` work (and flash-sale orders that
/// promise it) travels on the high-priority channel and pick queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served first.
    SameDay,
    /// Served after same-day work, but never starved past the configured limit.
    #[default]
    Standard,
}

impl Priority {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::SameDay => "same_day",
            Priority::Standard => "standard",
        }
    }
}
