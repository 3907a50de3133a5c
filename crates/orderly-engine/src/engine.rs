//! The engine: every service started over its own store, wired to the
//! producers it subscribes to, with a typed way for the API to call them.
//! The embedded mode, the simulator and the benchmark all start this.

use crate::broker::Topology;
use crate::bus::{EventSource, OutboxSource, Publisher};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::partitions::Ownership;
use crate::ports::{Clock, Rng, Store, StoreError};
use crate::runtime::{self, Control, ControlError, Ctx, Service};
use crate::services::common::ApiError;
use orderly_domain::Timestamp;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Every service, in start order.
pub const SERVICES: [&str; 6] = ["orders", "inventory", "picking", "packing", "shipping", "notifications"];
/// The services on the intake path: API callers wait on their commits
/// (an order's acknowledgement, a synchronous reservation), so they never
/// linger between batches (`bus.linger` is for the others).
pub const INTAKE: [&str; 2] = ["orders", "inventory"];

/// How many times [`Handle::call_retrying`] sends a command whose batch did
/// not commit.
pub const CALL_ATTEMPTS: u32 = 8;

/// What a caller hears when the batch holding its command did not commit.
const NOT_COMMITTED: &str = "the batch holding this request did not commit; retry";

/// Longest the API waits for a service to answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the engine runs on: a store per service, time and randomness.
#[derive(Clone)]
pub struct Adapters {
    /// One store per service name in [`SERVICES`].
    pub stores: HashMap<&'static str, Arc<dyn Store>>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Randomness.
    pub rng: Arc<dyn Rng>,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A service's store is missing from [`Adapters`].
    #[error("no store configured for service {0}")]
    MissingStore(&'static str),
    /// A store failed while the engine loaded its state.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A consumer's position behind one producer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConsumerLag {
    /// Consuming service.
    pub consumer: &'static str,
    /// Producing service.
    pub producer: &'static str,
    /// Events published but not yet processed.
    pub backlog: u64,
    /// Age of the oldest unprocessed event, in seconds (0 when caught up).
    pub lag_seconds: f64,
}

/// A producer to consume, and which of its event types to deliver.
pub type Subscription = (&'static str, fn(&str) -> bool);

/// A running service's command channel (none when the service runs in
/// another process: calls then answer [`ApiError::Unavailable`]).
pub struct Handle<C> {
    tx: Option<mpsc::Sender<C>>,
    service: &'static str,
}

impl<C> Clone for Handle<C> {
    fn clone(&self) -> Self {
        Handle { tx: self.tx.clone(), service: self.service }
    }
}

impl<C: Send + 'static> Handle<C> {
    /// Sends a command built around a reply channel and waits for the answer.
    /// A full queue is [`ApiError::Busy`] (the API answers 429); a service that
    /// does not answer in time, or whose batch failed to commit, is
    /// [`ApiError::Unavailable`].
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> C) -> Result<T, ApiError> {
        let Some(tx) = &self.tx else {
            return Err(ApiError::Unavailable(format!(
                "the {} service does not run in this process; send this request to a process started with \
                 --services including {}",
                self.service, self.service
            )));
        };
        let (reply, answer) = oneshot::channel();
        tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::Busy,
            mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable("service stopped".into()),
        })?;
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ApiError::Unavailable(NOT_COMMITTED.into())),
            Err(_) => Err(ApiError::Unavailable("timed out waiting for the engine".into())),
        }
    }

    /// Like [`Handle::call`], for a service whose replicas share its rows: a
    /// command whose batch did not commit (a conflict with another replica)
    /// had no effect, so it is sent again, up to [`CALL_ATTEMPTS`] times with
    /// a short pause, before the caller sees [`ApiError::Unavailable`] (503
    /// with `Retry-After`).
    pub async fn call_retrying<T>(
        &self,
        make: impl Fn(oneshot::Sender<Result<T, ApiError>>) -> C,
    ) -> Result<T, ApiError> {
        let mut attempt = 1;
        loop {
            match self.call(&make).await {
                Err(ApiError::Unavailable(detail)) if detail == NOT_COMMITTED && attempt < CALL_ATTEMPTS => {
                    attempt += 1;
                    let pause = 2
                        + (std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.subsec_nanos())
                            % 20);
                    tokio::time::sleep(Duration::from_millis(u64::from(pause))).await;
                }
                Err(ApiError::Unavailable(detail)) if detail == NOT_COMMITTED => {
                    return Err(ApiError::Unavailable(format!(
                        "{detail} (tried {CALL_ATTEMPTS} times: other replicas keep changing the same rows)"
                    )));
                }
                other => return other,
            }
        }
    }

    /// The sending side of the command channel (for a service's own workers).
    ///
    /// # Panics
    /// When the service does not run in this process (see [`Handle::runs_here`]).
    pub fn sender(&self) -> mpsc::Sender<C> {
        self.tx.clone().unwrap_or_else(|| panic!("the {} service does not run in this process", self.service))
    }

    /// True when the service runs in this process.
    pub fn runs_here(&self) -> bool {
        self.tx.is_some()
    }

    /// Commands waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

/// Builds and runs the services.
pub struct EngineBuilder {
    adapters: Adapters,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    publishers: HashMap<&'static str, Publisher>,
    sources: Vec<(&'static str, Arc<dyn EventSource>)>,
    controls: HashMap<&'static str, mpsc::Sender<Control>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    topology: Topology,
}

/// Control commands queued per service.
const CONTROL_QUEUE_MAX: usize = 64;

impl EngineBuilder {
    /// Prepares an engine: checks every store and reads every outbox head.
    pub async fn new(settings: Settings, adapters: Adapters) -> Result<EngineBuilder, StartError> {
        EngineBuilder::with_topology(settings, adapters, Topology::default()).await
    }

    /// Like [`EngineBuilder::new`], running only the services `topology`
    /// selects, over its broker if it has one.
    pub async fn with_topology(
        settings: Settings,
        adapters: Adapters,
        topology: Topology,
    ) -> Result<EngineBuilder, StartError> {
        let mut publishers = HashMap::new();
        for name in SERVICES {
            let store = adapters.stores.get(name).ok_or(StartError::MissingStore(name))?;
            publishers.insert(name, Publisher::new(store.outbox_head().await?));
        }
        Ok(EngineBuilder {
            adapters,
            settings: Arc::new(settings),
            metrics: Arc::new(Metrics::default()),
            publishers,
            sources: Vec::new(),
            controls: HashMap::new(),
            shutdown: watch::Sender::new(false),
            tasks: Vec::new(),
            topology,
        })
    }

    /// True when this process runs `service`.
    pub fn runs(&self, service: &str) -> bool {
        self.topology.runs(service)
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The shared metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A service's store.
    pub fn store(&self, name: &'static str) -> Arc<dyn Store> {
        self.adapters.stores[name].clone()
    }

    /// The clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.adapters.clock.clone()
    }

    /// The random source.
    pub fn rng(&self) -> Arc<dyn Rng> {
        self.adapters.rng.clone()
    }

    /// A receiver that turns true when the engine shuts down (for workers).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Keeps a worker task to be awaited on shutdown.
    pub fn keep(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Starts `service` under `name`, consuming the given producers (each with a
    /// filter on event type names), and returns its command handle.
    pub async fn spawn<S: Service>(
        &mut self,
        name: &'static str,
        service: S,
        subscriptions: &[Subscription],
    ) -> Result<Handle<S::Command>, StartError> {
        if !self.runs(name) {
            return Ok(Handle { tx: None, service: name });
        }
        let store = self.store(name);
        let sharing = self.topology.sharing.get(name).cloned();
        let ownership = sharing.as_ref().map_or_else(|| Arc::new(Ownership::all()), |s| s.ownership.clone());
        let mut sources: Vec<Arc<dyn EventSource>> = Vec::new();
        for (producer, filter) in subscriptions {
            let source: Arc<dyn EventSource> = match &self.topology.broker {
                Some(broker) => {
                    let clock = self.adapters.clock.clone();
                    broker.source(name, producer, *filter, store.clone(), clock, ownership.clone()).await?
                }
                None => Arc::new(OutboxSource::new(
                    producer,
                    self.store(producer),
                    self.publishers[producer].clone(),
                    store.cursor(producer).await?,
                    *filter,
                )),
            };
            self.sources.push((name, source.clone()));
            sources.push(source);
        }
        let ctx = Arc::new(Ctx {
            service: name,
            source: format!("/orderly/{name}"),
            clock: self.adapters.clock.clone(),
            rng: self.adapters.rng.clone(),
            store,
            metrics: self.metrics.clone(),
            max_attempts: self.settings.bus.max_attempts.max(1),
        });
        let (tx, rx) = mpsc::channel(self.settings.bus.queue_capacity.max(1));
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE_MAX);
        let publisher = self.publishers[name].clone();
        if let Some(broker) = &self.topology.broker {
            let relay = broker.relay(name, self.store(name), publisher.subscribe(), self.shutdown.subscribe());
            self.tasks.push(relay);
        }
        let shutdown = self.shutdown.subscribe();
        let tail = publisher.clone();
        let mut driver = runtime::Driver::new(service, ctx, sources, move |h| publisher.publish(h)).await?;
        if self.topology.broker.is_none() && sharing.is_none() {
            driver.retain_committed(tail);
        }
        if let Some(sharing) = sharing {
            driver.set_sharing(sharing);
        }
        if !INTAKE.contains(&name) {
            let ms = self.settings.bus.linger.0.clamp(0, crate::config::LINGER_MAX_MS);
            driver.set_linger(std::time::Duration::from_millis(ms as u64));
        }
        self.tasks.push(tokio::spawn(runtime::run(driver, rx, control_rx, shutdown)));
        self.controls.insert(name, control_tx);
        Ok(Handle { tx: Some(tx), service: name })
    }

    /// Finishes building: the running engine's shared parts.
    pub fn finish(self) -> Runtime {
        Runtime {
            settings: self.settings,
            metrics: self.metrics,
            adapters: self.adapters,
            sources: self.sources,
            controls: self.controls,
            shutdown: self.shutdown,
            tasks: tokio::sync::Mutex::new(self.tasks),
        }
    }
}

/// The running services' shared parts: stores, metrics, lag, shutdown.
pub struct Runtime {
    /// Settings.
    pub settings: Arc<Settings>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    adapters: Adapters,
    sources: Vec<(&'static str, Arc<dyn EventSource>)>,
    controls: HashMap<&'static str, mpsc::Sender<Control>>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Runtime {
    /// A service's store (read-only use: queries).
    pub fn store(&self, name: &str) -> Option<Arc<dyn Store>> {
        self.adapters.stores.get(name).cloned()
    }

    /// A receiver that turns true when the engine shuts down (for jobs).
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Now, by the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.adapters.clock.now()
    }

    /// A fresh UUIDv7 from the engine's clock and random source.
    pub fn new_id(&self, now: Timestamp) -> String {
        crate::ports::uuid_v7(now, self.adapters.rng.as_ref())
    }

    /// Lag of every consumer behind every producer it reads.
    pub async fn consumer_lag(&self) -> Vec<ConsumerLag> {
        let now = self.now();
        let mut out = Vec::new();
        for (consumer, source) in &self.sources {
            let backlog = source.backlog();
            let mut lag_seconds = 0.0;
            if source.at_least_once() {
                // A broker source has no stored cursor: it knows its oldest event.
                if let Some(oldest) = source.oldest_pending() {
                    lag_seconds = (now.since(oldest).max(0) as f64) / 1000.0;
                }
            } else if backlog > 0 {
                let producer = self.adapters.stores[source.producer()].clone();
                let cursor = match source.position() {
                    Some(position) => position,
                    None => self.adapters.stores[consumer].cursor(source.producer()).await.unwrap_or(0),
                };
                if let Ok(first) = producer.outbox_after(cursor, 1).await
                    && let Some(r) = first.first()
                {
                    lag_seconds = (now.since(r.envelope.time).max(0) as f64) / 1000.0;
                }
            }
            out.push(ConsumerLag { consumer, producer: source.producer(), backlog, lag_seconds });
        }
        out
    }

    /// Sends a control command to the service that holds a dead letter.
    pub async fn control(
        &self,
        service: &str,
        make: impl FnOnce(oneshot::Sender<Result<(), ControlError>>) -> Control,
    ) -> Result<(), ControlError> {
        let Some(tx) = self.controls.get(service) else {
            return Err(ControlError::Unavailable(format!(
                "the {service} service does not run in this process; send this to a process running it"
            )));
        };
        let (reply, answer) = oneshot::channel();
        tx.try_send(make(reply)).map_err(|_| ControlError::Unavailable(format!("{service} is busy or stopped")))?;
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            _ => Err(ControlError::Unavailable("the batch did not commit; retry".into())),
        }
    }

    /// Stops every service after its batch in flight and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().await);
        for t in tasks {
            let _ = t.await;
        }
    }
}
