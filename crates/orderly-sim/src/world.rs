//! Everything the services share in a simulation: settings, the virtual
//! clock, the engine's seeded random source, one store per service, the bus
//! subscriptions and the fake carriers and webhook. Built once per seed; a
//! crashed service is rebuilt from these.

use crate::bus::SimSource;
use crate::clock::VirtualClock;
use crate::fakes::{FakeCarrier, FakeWebhook};
use crate::rng::SimRng;
use crate::store::SimStore;
use orderly_engine::app::subscriptions;
use orderly_engine::bus::EventSource;
use orderly_engine::config::{Millis, Settings, ZoneRoute};
use orderly_engine::engine::SERVICES;
use orderly_engine::metrics::Metrics;
use orderly_engine::ports::{CarrierApi, SeededRng};
use orderly_engine::runtime::Ctx;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The carriers, by id.
pub const CARRIERS: [&str; 2] = ["fastship", "postal"];
/// Zones and their (primary, secondary) carriers.
pub const ROUTES: [(&str, &str, &str); 2] = [("EU", "fastship", "postal"), ("US", "postal", "fastship")];

/// The shared parts of one simulated engine.
pub struct World {
    /// Engine settings (tuned so timers fire within a run).
    pub settings: Settings,
    /// Virtual time.
    pub clock: Arc<VirtualClock>,
    /// The engine's random source (ids, jitter).
    pub rng: Arc<SeededRng>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// One store per service.
    pub stores: BTreeMap<&'static str, Arc<SimStore>>,
    /// Subscriptions by (consumer, producer), in each consumer's subscription order.
    pub sources: Vec<Arc<SimSource>>,
    /// Carriers by id.
    pub carriers: BTreeMap<&'static str, Arc<FakeCarrier>>,
    /// The customers' webhook endpoint.
    pub webhook: Arc<FakeWebhook>,
}

impl World {
    /// A world for `seed`. Must be called inside the simulation's runtime.
    /// `hold_ttl_ms` replaces the settings' hold lifetime.
    pub fn new(seed: u64, rng: &mut SimRng, hold_ttl_ms: Option<i64>) -> World {
        let mut settings = settings(rng);
        if let Some(ms) = hold_ttl_ms {
            settings.inventory.hold_ttl = Millis(ms);
        }
        let clock = Arc::new(VirtualClock::new());
        let stores: BTreeMap<&'static str, Arc<SimStore>> =
            SERVICES.iter().map(|s| (*s, Arc::new(SimStore::new()))).collect();
        let mut sources = Vec::new();
        for consumer in SERVICES {
            for (producer, filter) in subscriptions(consumer) {
                let store = stores[producer].clone();
                sources.push(Arc::new(SimSource::new(consumer, producer, store, *filter, clock.clone(), seed)));
            }
        }
        let timeout_ms = u64::try_from(settings.shipping.carrier_timeout.0).unwrap_or(5_000);
        let carriers =
            CARRIERS.iter().map(|c| (*c, Arc::new(FakeCarrier::new(c, clock.clone(), timeout_ms, seed)))).collect();
        World {
            settings,
            clock: clock.clone(),
            rng: Arc::new(SeededRng::new(seed)),
            metrics: Arc::new(Metrics::default()),
            stores,
            sources,
            carriers,
            webhook: Arc::new(FakeWebhook::new(clock, seed)),
        }
    }

    /// A service's store.
    pub fn store(&self, name: &str) -> Arc<SimStore> {
        self.stores.get(name).cloned().unwrap_or_default()
    }

    /// The runtime context of a service.
    pub fn ctx(&self, name: &'static str) -> Arc<Ctx> {
        Arc::new(Ctx {
            service: name,
            source: format!("/orderly/{name}"),
            clock: self.clock.clone(),
            rng: self.rng.clone(),
            store: self.store(name),
            metrics: self.metrics.clone(),
            max_attempts: self.settings.bus.max_attempts.max(1),
        })
    }

    /// A consumer's subscriptions, as the runtime takes them.
    pub fn sources_of(&self, consumer: &str) -> Vec<Arc<dyn EventSource>> {
        self.sources.iter().filter(|s| s.consumer() == consumer).map(|s| s.clone() as Arc<dyn EventSource>).collect()
    }

    /// The carriers as the shipping service takes them.
    pub fn carrier_apis(&self) -> HashMap<String, Arc<dyn CarrierApi>> {
        self.carriers.iter().map(|(id, c)| ((*id).to_owned(), c.clone() as Arc<dyn CarrierApi>)).collect()
    }
}

/// Settings for a run: the defaults, with timers short enough to fire within
/// a run, carrier routes for the two zones, and 1 to 4 allocation partitions.
fn settings(rng: &mut SimRng) -> Settings {
    let mut s = Settings::default();
    s.inventory.hold_ttl = Millis(5 * 60_000);
    s.inventory.hold_release_jitter = Millis(60_000);
    s.inventory.partitions = [1, 1, 2, 4][rng.index(4)];
    s.picking.starvation_limit = Millis(10 * 60_000);
    s.carriers.routes = ROUTES
        .iter()
        .map(|(zone, p, sec)| ZoneRoute { zone: (*zone).into(), primary: (*p).into(), secondary: (*sec).into() })
        .collect();
    s
}
