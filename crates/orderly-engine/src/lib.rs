//! Orderly's engine: the services (orders, inventory, picking, packing,
//! shipping, notifications) as handlers over ports, the runtime loop that
//! batches their inputs and commits each batch with its outbox in one
//! transaction, and the embedded event bus.
//!
//! No SQL, no NATS, no HTTP here: adapters implement [`ports`].

pub mod app;
pub mod broker;
pub mod bus;
pub mod bus_contract;
pub mod config;
pub mod contract;
pub mod engine;
pub mod events;
pub mod memory_store;
pub mod metrics;
pub mod partitions;
pub mod ports;
pub mod prefetch;
pub mod runtime;
pub mod services;
pub mod table;
pub mod versioned;
