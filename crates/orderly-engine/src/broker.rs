//! The distributed topology: which services this process runs, and the
//! broker (NATS JetStream in `orderly-bus-nats`) that carries events between
//! processes instead of the embedded outbox reader.
//!
//! With a broker, every producing service's outbox is relayed to it after
//! commit (the outbox stays the source of truth), and every consumer reads
//! through a broker [`EventSource`] that is at-least-once: the runtime then
//! deduplicates through the consumer's inbox in the same commit as the effect.

use crate::bus::EventSource;
use crate::partitions::Ownership;
use crate::ports::{Clock, Store, StoreError};
use crate::runtime::Sharing;
use async_trait::async_trait;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which event types a subscription delivers (by CloudEvents type name).
pub type EventFilter = fn(&str) -> bool;

/// A message broker as the engine sees it.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The source through which `consumer` reads `producer`'s events of the
    /// types that pass `filter`. `store` and `clock` are the consumer's, for
    /// events the broker itself gives up on (dead letters). The source reads
    /// only the partitions `ownership` gives this replica.
    async fn source(
        &self,
        consumer: &'static str,
        producer: &'static str,
        filter: EventFilter,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        ownership: Arc<Ownership>,
    ) -> Result<Arc<dyn EventSource>, StoreError>;

    /// How many partitions each producer's events are spread over.
    fn partitions(&self) -> u32;

    /// Starts relaying `producer`'s outbox (in `store`) to the broker, woken
    /// by `head` (the outbox head after each commit), until `shutdown`.
    fn relay(
        &self,
        producer: &'static str,
        store: Arc<dyn Store>,
        head: watch::Receiver<u64>,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()>;
}

/// Which services this process runs, and over which bus.
#[derive(Clone, Default)]
pub struct Topology {
    /// The broker between processes; `None` is the embedded bus.
    pub broker: Option<Arc<dyn Broker>>,
    /// The services this process runs; `None` runs them all.
    pub services: Option<BTreeSet<&'static str>>,
    /// Services whose work this process shares with other replicas (their
    /// partitions and versioned stores); the rest run alone.
    pub sharing: HashMap<&'static str, Sharing>,
}

impl Topology {
    /// True when this process runs `service`.
    pub fn runs(&self, service: &str) -> bool {
        self.services.as_ref().is_none_or(|s| s.contains(service))
    }

    /// Parses a comma-separated list of service names (`orders,inventory`).
    pub fn parse_services(list: &str) -> Result<BTreeSet<&'static str>, String> {
        let mut out = BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let known = crate::engine::SERVICES
                .iter()
                .find(|s| **s == name)
                .ok_or_else(|| format!("unknown service {name:?}: use {}", crate::engine::SERVICES.join(", ")))?;
            out.insert(*known);
        }
        if out.is_empty() {
            return Err(format!("--services names at least one of {}", crate::engine::SERVICES.join(", ")));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Topology;

    #[test]
    fn services_parse_and_select() {
        let s = Topology::parse_services("orders, inventory,orders").expect("valid list");
        assert_eq!(s.into_iter().collect::<Vec<_>>(), vec!["inventory", "orders"]);
        assert!(Topology::parse_services("orders,billing").unwrap_err().contains("billing"));
        assert!(Topology::parse_services(" , ").is_err());
        let t = Topology { services: Some(Topology::parse_services("packing").expect("valid")), ..Topology::default() };
        assert!(t.runs("packing") && !t.runs("orders"));
        assert!(Topology::default().runs("orders"));
    }
}
