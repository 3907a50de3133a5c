//! Deterministic simulation of the whole Orderly engine with fault injection
//! (PRODUCT.md §6). The six real services — the same code `orderly serve`
//! runs — are stepped one batch at a time over in-memory stores, a simulated
//! at-least-once bus, fake carriers and a fake webhook endpoint, in one
//! thread under a paused virtual clock. A seeded scheduler decides the
//! workload, the faults and which services take a batch, in which order;
//! invariants are checked on committed state after every step, and liveness
//! once the faults stop. Same seed, same run, byte for byte.
//!
//! ```no_run
//! let report = orderly_sim::run_seed(&orderly_sim::SimConfig::default(), 42);
//! assert!(report.violations.is_empty(), "{:?}", report.violations);
//! ```

mod bus;
mod clients;
mod clock;
mod fakes;
mod faults;
mod invariants;
mod nodes;
mod report;
mod rng;
mod sim;
mod store;
mod workload;
mod world;

pub use faults::{FaultKind, FaultSet, FaultSetError};
pub use report::{SeedReport, Violation};
pub use sim::{Mutations, SimConfig, TRACE_LEN_DEFAULT, run_seed};
