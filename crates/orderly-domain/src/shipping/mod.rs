//! Shipping policies: the pure state machines the shipping service drives
//! around every carrier label (PRODUCT.md §4.2, §4.9-4.12).
//!
//! - [`token_bucket`] paces label requests and says when the next batch may go;
//! - [`breaker`] stops calling a failing downstream and probes it after a cooldown;
//! - [`retry`] spaces retries with capped exponential backoff and equal jitter,
//!   and says when to dead-letter;
//! - [`carrier_routing`] picks the primary or the secondary carrier of a zone;
//! - [`rates`] parses versioned carrier rate tables and swaps in uploads between batches.
//!
//! These are in-process policies, not event-sourced aggregates: the service holds
//! them in memory, rebuilds them at startup from configuration and the rate file,
//! and records what they decided (label time, carrier, fallback, cost difference)
//! in its own events. Like the rest of the domain they take time and randomness
//! as arguments.

pub mod breaker;
pub mod carrier_routing;
pub mod rates;
pub mod retry;
pub mod token_bucket;

pub use breaker::{BreakerConfig, BreakerError, BreakerState, CircuitBreaker};
pub use carrier_routing::{CarrierChoice, CarrierId, CarrierPair, CarrierRoutes, RoutingError, cost_difference};
pub use rates::{Bracket, RateBook, RateBookError, RateError, RateTable, RateVersion, RateVersionError};
pub use retry::{RetryError, RetryPolicy};
pub use token_bucket::{TokenBucket, TokenBucketError};
