//! The six services as the simulator runs them: each a [`Driver`] stepped one
//! batch at a time, with its queue of API commands and, for shipping and
//! notifications, the worker task that makes its outside calls. A crash drops
//! the driver (its caches and uncommitted work), the queued commands and the
//! worker; a restart rebuilds the service from its store, exactly as a
//! process start does.

use crate::world::World;
use orderly_engine::app::{ledger_config, order_policy};
use orderly_engine::ports::StoreError;
use orderly_engine::runtime::{Driver, Mutations, Service};
use orderly_engine::services::inventory::Inventory;
use orderly_engine::services::notifications::Notifications;
use orderly_engine::services::orders::Orders;
use orderly_engine::services::packing::Packing;
use orderly_engine::services::picking::Picking;
use orderly_engine::services::shipping::Shipping;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Starts a service's worker task, given the sender of its results.
type SpawnWorker<C> = Box<dyn FnOnce(mpsc::Sender<C>) -> JoinHandle<()>>;

/// Worker results buffered between two steps of their service.
const RESULTS_MAX: usize = 4_096;

/// Why a service could not (re)start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its store failed while it loaded its state.
    #[error("{service} could not load its state: {error}")]
    Store {
        /// The service.
        service: &'static str,
        /// The error.
        error: StoreError,
    },
    /// Its configuration was refused.
    #[error("{service} refused its configuration: {detail}")]
    Config {
        /// The service.
        service: &'static str,
        /// Why.
        detail: String,
    },
}

/// One service process: running (a driver) or down.
pub struct Slot<S: Service> {
    name: &'static str,
    driver: Option<Driver<S>>,
    queue: Vec<S::Command>,
    results: Option<mpsc::Receiver<S::Command>>,
    worker: Option<JoinHandle<()>>,
}

impl<S: Service> Slot<S> {
    fn new(name: &'static str) -> Slot<S> {
        Slot { name, driver: None, queue: Vec::new(), results: None, worker: None }
    }

    /// Whether the process is up.
    pub fn is_up(&self) -> bool {
        self.driver.is_some()
    }

    /// Queues an API command; a down service refuses it (the caller sees its
    /// reply channel closed, as with a refused connection).
    pub fn send(&mut self, cmd: S::Command) {
        if self.is_up() {
            self.queue.push(cmd);
        }
    }

    /// The commands waiting for the next batch.
    pub fn queued(&self) -> &[S::Command] {
        &self.queue
    }

    async fn start(
        &mut self,
        world: &World,
        service: S,
        mutations: Mutations,
        spawn_worker: Option<SpawnWorker<S::Command>>,
    ) -> Result<(), StartError> {
        let ctx = world.ctx(self.name);
        let mut driver = Driver::new(service, ctx, world.sources_of(self.name), |_| {})
            .await
            .map_err(|error| StartError::Store { service: self.name, error })?;
        driver.set_mutations(mutations);
        if let Some(spawn) = spawn_worker {
            let (tx, rx) = mpsc::channel(RESULTS_MAX);
            self.worker = Some(spawn(tx));
            self.results = Some(rx);
        }
        self.driver = Some(driver);
        Ok(())
    }

    /// One batch: the worker's results and the queued commands, pending
    /// events and due timers. Returns the number of commands it carried.
    async fn step(&mut self) -> usize {
        let Some(driver) = self.driver.as_mut() else { return 0 };
        if let Some(rx) = self.results.as_mut() {
            while let Ok(cmd) = rx.try_recv() {
                self.queue.push(cmd);
            }
        }
        let commands = std::mem::take(&mut self.queue);
        let n = commands.len();
        driver.step(commands, Vec::new()).await;
        n
    }

    fn crash(&mut self) {
        self.driver = None;
        self.queue.clear();
        self.results = None;
        if let Some(worker) = self.worker.take() {
            worker.abort();
        }
    }
}

/// The six service processes.
pub struct Nodes {
    /// Orders.
    pub orders: Slot<Orders>,
    /// Inventory.
    pub inventory: Slot<Inventory>,
    /// Picking.
    pub picking: Slot<Picking>,
    /// Packing.
    pub packing: Slot<Packing>,
    /// Shipping.
    pub shipping: Slot<Shipping>,
    /// Notifications.
    pub notifications: Slot<Notifications>,
    mutations: Mutations,
    reserve_ignores_safety: bool,
}

impl Nodes {
    /// Every service down; `mutations` are the runtime's deliberate bugs, and
    /// `reserve_ignores_safety` the ledger's.
    pub fn new(mutations: Mutations, reserve_ignores_safety: bool) -> Nodes {
        Nodes {
            orders: Slot::new("orders"),
            inventory: Slot::new("inventory"),
            picking: Slot::new("picking"),
            packing: Slot::new("packing"),
            shipping: Slot::new("shipping"),
            notifications: Slot::new("notifications"),
            mutations,
            reserve_ignores_safety,
        }
    }

    /// Whether a service is up.
    pub fn is_up(&self, name: &str) -> bool {
        match name {
            "orders" => self.orders.is_up(),
            "inventory" => self.inventory.is_up(),
            "picking" => self.picking.is_up(),
            "packing" => self.packing.is_up(),
            "shipping" => self.shipping.is_up(),
            "notifications" => self.notifications.is_up(),
            _ => false,
        }
    }

    /// Starts a service from its store.
    pub async fn start(&mut self, world: &World, name: &str) -> Result<(), StartError> {
        let m = self.mutations;
        let s = &world.settings;
        match name {
            "orders" => self.orders.start(world, Orders::new(order_policy(s)), m, None).await,
            "inventory" => {
                let svc = self.open_inventory(world).await?;
                self.inventory.start(world, svc, m, None).await
            }
            "picking" => {
                let store = world.store("picking");
                let svc = Picking::open(store.as_ref(), s.picking.starvation_limit.0)
                    .await
                    .map_err(|error| StartError::Store { service: "picking", error })?;
                self.picking.start(world, svc, m, None).await
            }
            "packing" => self.packing.start(world, Packing::new(s.shipping.unit_weight_g), m, None).await,
            "shipping" => self.start_shipping(world).await,
            "notifications" => self.start_notifications(world).await,
            _ => Ok(()),
        }
    }

    async fn open_inventory(&self, world: &World) -> Result<Inventory, StartError> {
        let s = &world.settings;
        let config = |e: &dyn std::fmt::Display| StartError::Config { service: "inventory", detail: e.to_string() };
        let mut ledger = ledger_config(s).map_err(|e| config(&e))?;
        if self.reserve_ignores_safety {
            ledger = ledger.with_reservations_ignoring_safety();
        }
        let store = world.store("inventory");
        Inventory::open(store.as_ref(), ledger, s.inventory.hold_ttl.0, s.inventory.hold_release_jitter.0)
            .await
            .map_err(|error| StartError::Store { service: "inventory", error })
    }

    async fn start_shipping(&mut self, world: &World) -> Result<(), StartError> {
        let store = world.store("shipping");
        let (svc, worker) =
            Shipping::open(store.as_ref(), &world.settings, world.carrier_apis(), None, world.clock.as_ref())
                .await
                .map_err(|e| StartError::Config { service: "shipping", detail: e.to_string() })?;
        let spawn = Box::new(move |tx| tokio::spawn(worker.run(tx)));
        self.shipping.start(world, svc, self.mutations, Some(spawn)).await
    }

    async fn start_notifications(&mut self, world: &World) -> Result<(), StartError> {
        let store = world.store("notifications");
        let (svc, worker) = Notifications::open(store.as_ref(), &world.settings, world.webhook.clone())
            .await
            .map_err(|e| StartError::Config { service: "notifications", detail: e.to_string() })?;
        let spawn = Box::new(move |tx| tokio::spawn(worker.run(tx)));
        self.notifications.start(world, svc, self.mutations, Some(spawn)).await
    }

    /// One batch of a service; returns the number of commands it carried.
    pub async fn step(&mut self, name: &str) -> usize {
        match name {
            "orders" => self.orders.step().await,
            "inventory" => self.inventory.step().await,
            "picking" => self.picking.step().await,
            "packing" => self.packing.step().await,
            "shipping" => self.shipping.step().await,
            "notifications" => self.notifications.step().await,
            _ => 0,
        }
    }

    /// Kills a service process.
    pub fn crash(&mut self, name: &str) {
        match name {
            "orders" => self.orders.crash(),
            "inventory" => self.inventory.crash(),
            "picking" => self.picking.crash(),
            "packing" => self.packing.crash(),
            "shipping" => self.shipping.crash(),
            "notifications" => self.notifications.crash(),
            _ => {}
        }
    }
}
