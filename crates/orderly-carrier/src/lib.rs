//! Orderly's carrier adapter: the HTTP client of a carrier's label API
//! ([`client`]), a carrier simulator with scriptable faults for tests, demos
//! and `orderly carrier-sim` ([`sim`]), and a webhook receiver for tests
//! ([`webhook`]). The JSON shapes they share live in [`wire`].
//!
//! Only this crate knows how carriers are spoken to over HTTP; the shipping
//! service sees labels and typed [`CarrierError`]s.

#![warn(missing_docs)]

pub mod client;
mod lease;
mod rng;
pub mod signing;
pub mod sim;
pub mod webhook;
pub mod wire;

pub use client::{CarrierClient, CarrierError};
pub use wire::{
    CarrierSettings, CarrierStats, Label, LabelRequest, Outage, Problem, SecondCount, SimStats, TrackingInfo,
};

/// Makes `ring` the process's rustls crypto provider, unless one is installed
/// already. reqwest is built here without a provider of its own (so only one
/// ever links), and panics when building a client if none is installed;
/// [`CarrierClient::new`] calls this, and binaries may call it at startup.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is in place either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
