//! Shipping policies.
