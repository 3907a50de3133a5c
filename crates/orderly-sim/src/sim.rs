//! The simulation loop. Each step, the seeded scheduler moves virtual time,
//! restarts crashed services that are due, injects faults, lets the workload
//! call the engine, and steps a random selection of services in a random
//! order (so processing is interleaved and reordered across services); then
//! every invariant is checked on committed state. After the fault phase comes
//! a quiet phase: faults stop, the backorders get stock, every service steps
//! every step and the warehouse, carriers and ops work everything off; then
//! liveness is checked.

use crate::clients::{Books, Clients, Env};
use crate::faults::{FaultCounts, FaultKind, FaultSet};
use crate::invariants::{Checker, Failure, scan_all};
use crate::nodes::Nodes;
use crate::report::{Fingerprint, SeedReport, Trace, Violation};
use crate::rng::SimRng;
use crate::workload::{self, HOT_SKU, LOCATIONS, SKUS, id};
use crate::world::World;
use orderly_domain::order::OrderState;
use orderly_domain::{LocationId, OrderId, Qty, Sku};
use orderly_engine::engine::SERVICES;
use orderly_engine::ports::{Clock, Store};
use orderly_engine::runtime;
use orderly_engine::services::picking::{self, PickTask};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Yields after a step or a time move, so worker tasks run to their next wait.
const SETTLE_YIELDS: usize = 8;
/// Tasks each location's pickers ask for per quiet step.
const QUIET_PULLS_PER_LOCATION: usize = 10;
/// Lines of trace a violation shows.
pub const TRACE_LEN_DEFAULT: usize = 40;

/// Deliberate bugs, to prove the invariants catch them. Never on in a real run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Consumers skip the inbox check: redelivered events are applied again.
    pub skip_inbox_check: bool,
    /// Reservations treat the safety buffer as available stock.
    pub reserve_ignores_safety: bool,
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Steps of the fault phase.
    pub steps: u64,
    /// Most steps of the quiet phase (it ends early once everything settled).
    pub quiet_steps_max: u64,
    /// Fault kinds that may be injected.
    pub faults: FaultSet,
    /// Deliberate bugs (tests only).
    pub mutations: Mutations,
    /// Lines of trace kept for a violation.
    pub trace_len: usize,
    /// Hold lifetime in ms instead of the world's (5 min): a short one makes
    /// synchronous reservations lapse before their order reaches inventory.
    pub hold_ttl_ms: Option<i64>,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            steps: 200,
            quiet_steps_max: 600,
            faults: FaultSet::all(),
            mutations: Mutations::default(),
            trace_len: TRACE_LEN_DEFAULT,
            hold_ttl_ms: None,
        }
    }
}

/// Where a run is, readable after a panic.
#[derive(Debug, Default)]
struct Progress {
    step: u64,
    trace: Vec<String>,
}

/// Stack of the thread a seed runs on: deep async state machines in debug builds.
const SEED_STACK_BYTES: usize = 64 << 20;

/// Runs one seed to the end (or its first violation) on its own thread, with
/// a fresh single-threaded runtime whose time is paused. A panic in the
/// engine is reported as a violation, with the step and trace it happened at.
pub fn run_seed(config: &SimConfig, seed: u64) -> SeedReport {
    let progress = Arc::new(Mutex::new(Progress::default()));
    let (shared, cfg) = (progress.clone(), config.clone());
    let thread =
        std::thread::Builder::new().name(format!("sim-{seed}")).stack_size(SEED_STACK_BYTES).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
            match rt {
                // The world (its clock above all) is built inside the runtime, on paused time.
                Ok(rt) => rt.block_on(async { Sim::new(cfg.clone(), seed, shared).run().await }),
                Err(e) => panicked_report(&cfg, seed, 0, Vec::new(), format!("no runtime: {e}")),
            }
        });
    let outcome = match thread {
        Ok(handle) => handle.join(),
        Err(e) => return panicked_report(config, seed, 0, Vec::new(), format!("no thread: {e}")),
    };
    outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned());
        let p = progress.lock().unwrap_or_else(|p| p.into_inner());
        panicked_report(config, seed, p.step, p.trace.clone(), message)
    })
}

fn panicked_report(config: &SimConfig, seed: u64, step: u64, trace: Vec<String>, detail: String) -> SeedReport {
    SeedReport {
        seed,
        steps: step,
        quiet_steps: 0,
        faults_injected: FaultCounts::default().by_name(&config.faults),
        orders_by_state: BTreeMap::new(),
        invariants_checked: BTreeMap::new(),
        violations: vec![Violation { seed, step, invariant: "no_panic".to_owned(), detail, trace }],
        stats: BTreeMap::new(),
        fingerprint: String::new(),
    }
}

/// One seed's simulation.
struct Sim {
    seed: u64,
    cfg: SimConfig,
    rng: SimRng,
    world: World,
    nodes: Nodes,
    clients: Clients,
    books: Books,
    checker: Checker,
    faults: FaultCounts,
    trace: Trace,
    step: u64,
    quiet_steps: u64,
    quiet: bool,
    down: BTreeMap<&'static str, u64>,
    stampede_at: Option<u64>,
    progress: Arc<Mutex<Progress>>,
}

impl Sim {
    fn new(cfg: SimConfig, seed: u64, progress: Arc<Mutex<Progress>>) -> Sim {
        let mut rng = SimRng::new(seed, 1);
        let world = World::new(seed, &mut rng, cfg.hold_ttl_ms);
        let m = cfg.mutations;
        let engine_mutations = runtime::Mutations { skip_inbox_check: m.skip_inbox_check };
        Sim {
            seed,
            rng,
            checker: Checker::new(&world),
            nodes: Nodes::new(engine_mutations, m.reserve_ignores_safety),
            world,
            clients: Clients::default(),
            books: Books::default(),
            faults: FaultCounts::default(),
            trace: Trace::new(cfg.trace_len),
            cfg,
            step: 0,
            quiet_steps: 0,
            quiet: false,
            down: BTreeMap::new(),
            stampede_at: None,
            progress,
        }
    }

    async fn run(mut self) -> SeedReport {
        let outcome = self.run_phases().await;
        self.report(outcome.err()).await
    }

    async fn run_phases(&mut self) -> Result<(), Failure> {
        self.setup().await?;
        for _ in 0..self.cfg.steps {
            self.step().await?;
        }
        self.heal().await?;
        for i in 0..self.cfg.quiet_steps_max {
            self.step().await?;
            self.quiet_steps += 1;
            if (i + 1).is_multiple_of(10) && self.settled().await {
                break;
            }
        }
        let now = self.world.clock.now();
        self.checker.liveness(&self.world, &self.books, now).await
    }

    /// Whether the quiet phase may end: no call out, no work left, and
    /// liveness already holds (checked on a scratch checker).
    async fn settled(&mut self) -> bool {
        if self.clients.in_flight() > 0 || self.clients.returns_open() > 0 || self.clients.packing_backlog() > 0 {
            return false;
        }
        let now = self.world.clock.now();
        let mut probe = Checker::new(&self.world);
        probe.liveness(&self.world, &self.books, now).await.is_ok()
    }

    /// Starts every service, creates the locations and receives opening stock.
    async fn setup(&mut self) -> Result<(), Failure> {
        for name in SERVICES {
            self.start(name).await?;
        }
        if self.enabled(FaultKind::Duplicate) {
            self.clients.lose_create_answers(40);
        }
        for location in workload::locations() {
            self.clients.put_location(&mut self.nodes, location);
        }
        for sku in SKUS {
            for (location, _, _) in LOCATIONS {
                if self.rng.chance(700) {
                    let qty = self.rng.range(20, 80) as Qty;
                    self.clients.receive(&mut self.nodes, id(sku), id(location), qty);
                }
            }
        }
        let hot = self.rng.range(15, 40) as Qty;
        self.clients.receive(&mut self.nodes, id(HOT_SKU), id("WH-EU-1"), hot);
        self.nodes.step("inventory").await;
        self.resolve();
        self.checker.after_step(&self.world, &self.books).await
    }

    async fn start(&mut self, name: &'static str) -> Result<(), Failure> {
        self.nodes
            .start(&self.world, name)
            .await
            .map_err(|e| Failure { invariant: "restart_from_durable_state", detail: e.to_string() })
    }

    async fn step(&mut self) -> Result<(), Failure> {
        self.step += 1;
        self.trace.at(self.step);
        self.advance_time().await;
        self.restart_due().await?;
        if !self.quiet {
            self.inject_faults().await;
            self.workload().await;
        } else {
            self.quiet_workload().await;
        }
        for name in self.schedule() {
            self.step_service(name).await?;
        }
        self.checker.after_step(&self.world, &self.books).await?;
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        p.step = self.step;
        p.trace = self.trace.lines();
        Ok(())
    }

    async fn advance_time(&mut self) {
        let ms = if self.quiet { self.rng.range(4_000, 8_000) } else { self.rng.range(10, 1_500) };
        tokio::time::advance(Duration::from_millis(ms)).await;
        settle().await;
    }

    async fn restart_due(&mut self) -> Result<(), Failure> {
        let due: Vec<&'static str> =
            self.down.iter().filter(|(_, at)| **at <= self.step || self.quiet).map(|(n, _)| *n).collect();
        for name in due {
            self.down.remove(name);
            self.start(name).await?;
            self.trace.push(format!("{name} restarted from its store"));
        }
        Ok(())
    }

    /// The services that take a batch this step, in order: all of them in
    /// the quiet phase; a random selection (some twice) otherwise.
    fn schedule(&mut self) -> Vec<&'static str> {
        let mut order: Vec<&'static str> = if self.quiet {
            SERVICES.to_vec()
        } else {
            SERVICES.iter().copied().filter(|_| self.rng.chance(600)).collect()
        };
        if !self.quiet {
            let again: Vec<&'static str> = order.iter().copied().filter(|_| self.rng.chance(150)).collect();
            order.extend(again);
        }
        self.rng.shuffle(&mut order);
        order
    }

    async fn step_service(&mut self, name: &'static str) -> Result<(), Failure> {
        let before = self.queued_tasks_if_pulling(name).await?;
        let n = self.nodes.step(name).await;
        settle().await;
        if n > 0 {
            self.trace.push(format!("{name} took a batch with {n} commands"));
        }
        self.resolve();
        let handouts = self.clients.take_handouts();
        if !handouts.is_empty() {
            self.checker.check_handouts(&self.world, &before, &handouts).await?;
        }
        Ok(())
    }

    /// Queued pick tasks, read before a picking batch that hands tasks out.
    async fn queued_tasks_if_pulling(&self, name: &str) -> Result<Vec<PickTask>, Failure> {
        let pulling =
            name == "picking" && self.nodes.picking.queued().iter().any(|c| matches!(c, picking::Command::Next { .. }));
        if !pulling {
            return Ok(Vec::new());
        }
        scan_all(&self.world.store("picking"), "picks", Some("queued")).await
    }

    fn resolve(&mut self) {
        let mut env = Env {
            nodes: &mut self.nodes,
            world: &self.world,
            rng: &mut self.rng,
            books: &mut self.books,
            trace: &mut self.trace,
        };
        let lost = env.books.counters.get("order_answers_lost").copied().unwrap_or(0);
        self.clients.resolve(&mut env);
        let now_lost = self.books.counters.get("order_answers_lost").copied().unwrap_or(0);
        if now_lost > lost {
            self.faults.add(FaultKind::Duplicate, now_lost - lost);
        }
    }

    fn fault(&mut self, kind: FaultKind, what: String) {
        self.faults.add(kind, 1);
        self.trace.push(format!("fault {kind}: {what}"));
    }

    fn enabled(&self, kind: FaultKind) -> bool {
        self.cfg.faults.has(kind)
    }
}

/// Lets spawned tasks (the workers, their calls) run to their next wait.
async fn settle() {
    for _ in 0..SETTLE_YIELDS {
        tokio::task::yield_now().await;
    }
}

// The workload: what customers, the warehouse, carriers and ops do.
impl Sim {
    async fn workload(&mut self) {
        if self.rng.chance(550) {
            for _ in 0..self.rng.range(1, 2) {
                let n = self.clients.orders_placed();
                let req = workload::random_order(&mut self.rng, n);
                let mut env = Env {
                    nodes: &mut self.nodes,
                    world: &self.world,
                    rng: &mut self.rng,
                    books: &mut self.books,
                    trace: &mut self.trace,
                };
                self.clients.place(&mut env, req);
            }
        }
        if self.rng.chance(100) {
            let sku: Sku = id(SKUS[self.rng.index(SKUS.len())]);
            let qty = self.rng.range(1, 3) as Qty;
            let for_order = self.rng.chance(600);
            self.clients.hold(&mut self.nodes, sku, qty, for_order);
        }
        if self.rng.chance(70) {
            let sku: Sku = if self.rng.chance(200) { id(HOT_SKU) } else { id(SKUS[self.rng.index(SKUS.len())]) };
            let location = workload::random_location(&mut self.rng);
            let qty = self.rng.range(5, 40) as Qty;
            self.clients.receive(&mut self.nodes, sku, location, qty);
        }
        self.warehouse(350, 400).await;
        self.customer_service().await;
    }

    /// Pickers pull and finish tasks, packers pack, carriers report deliveries.
    async fn warehouse(&mut self, pull_per_mille: u64, finish_per_mille: u64) {
        for (location, _, _) in LOCATIONS {
            if self.rng.chance(pull_per_mille) {
                for _ in 0..self.rng.range(1, 2) {
                    self.clients.pull(&mut self.nodes, id(location));
                }
            }
        }
        for task in self.clients.held_tasks() {
            if !self.rng.chance(finish_per_mille) {
                continue;
            }
            if !self.quiet && self.rng.chance(8) {
                self.clients.abandon(&task.id);
                self.trace.push(format!("picker walked away from {}", task.id));
                continue;
            }
            self.finish(&task);
        }
        if self.quiet || self.rng.chance(350) {
            self.clients.pack(&mut self.nodes, if self.quiet { usize::MAX } else { 3 });
        }
        if self.quiet || self.rng.chance(300) {
            let twice = !self.quiet && self.enabled(FaultKind::Duplicate) && self.rng.chance(80);
            let max = if self.quiet { usize::MAX } else { 3 };
            if self.clients.deliver(&mut self.nodes, &self.world, max, twice) > 0 && twice {
                self.fault(FaultKind::Duplicate, "a carrier repeated its delivery callback".to_owned());
            }
        }
    }

    fn finish(&mut self, task: &PickTask) {
        let short = !self.quiet && self.enabled(FaultKind::ShortPick) && self.rng.chance(120);
        let found = short.then(|| self.rng.below(u64::from(task.qty)) as Qty);
        let twice = !self.quiet && self.enabled(FaultKind::Duplicate) && self.rng.chance(50);
        if let Some(found) = found {
            self.fault(FaultKind::ShortPick, format!("{} found {found} of {}", task.id, task.qty));
        }
        if twice {
            self.fault(FaultKind::Duplicate, format!("scanner sent {} twice", task.id));
        }
        self.clients.finish(&mut self.nodes, task, found, twice);
    }

    /// Cancellations mid-flow and returns of delivered orders.
    async fn customer_service(&mut self) {
        if self.enabled(FaultKind::CancelMidFlow) && self.rng.chance(50) {
            let states = [
                OrderState::Allocating,
                OrderState::Allocated,
                OrderState::Backordered,
                OrderState::Picking,
                OrderState::Picked,
                OrderState::Packed,
                OrderState::PartiallyShipped,
            ];
            let state = states[self.rng.index(states.len())];
            if let Some(order) = self.some_order(state).await {
                self.fault(FaultKind::CancelMidFlow, format!("cancel {order} while {state}"));
                self.clients.cancel(&mut self.nodes, order);
            }
        }
        if self.rng.chance(40)
            && let Some(order) = self.some_order(OrderState::Delivered).await
        {
            self.trace.push(format!("customer asks to return {order}"));
            self.clients.request_return(&mut self.nodes, order);
        }
        if self.rng.chance(150) {
            let location = workload::random_location(&mut self.rng);
            self.clients.record_returns(&mut self.nodes, &location, 2);
        }
    }

    /// A random order in `state`, from the orders store.
    async fn some_order(&mut self, state: OrderState) -> Option<OrderId> {
        let rows = self.world.store("orders").scan("orders", Some(state.as_str()), None, 20).await.ok()?;
        let row = self.rng.pick(&rows)?;
        OrderId::parse(row.key.clone()).ok()
    }

    /// The quiet phase's work: everything the warehouse, carriers and ops
    /// can do, done; no new orders.
    async fn quiet_workload(&mut self) {
        for (location, _, _) in LOCATIONS {
            for _ in 0..QUIET_PULLS_PER_LOCATION {
                self.clients.pull(&mut self.nodes, id(location));
            }
        }
        self.warehouse(1_000, 1_000).await;
        let location: LocationId = id("WH-EU-1");
        self.clients.record_returns(&mut self.nodes, &location, usize::MAX);
        if self.quiet_steps.is_multiple_of(10) {
            self.retry_failed_notifications().await;
        }
    }

    async fn retry_failed_notifications(&mut self) {
        let store = self.world.store("notifications");
        let Ok(rows) = store.scan("notifications", Some("failed"), None, 100).await else { return };
        for row in rows {
            self.trace.push(format!("ops retries notification {}", row.key));
            self.clients.retry_notification(&mut self.nodes, row.key);
        }
    }

    /// Faults stop: every service up, every carrier, endpoint, store and
    /// subscription healthy; backordered stock arrives.
    async fn heal(&mut self) -> Result<(), Failure> {
        self.quiet = true;
        self.trace.push("faults stop; quiet phase".to_owned());
        self.clients.lose_create_answers(0);
        self.restart_due().await?;
        for c in self.world.carriers.values() {
            c.set_faults(|f| *f = Default::default());
        }
        self.world.webhook.set_faults(|f| *f = Default::default());
        for s in &self.world.sources {
            s.heal();
        }
        for store in self.world.stores.values() {
            store.fail_next_commits(0);
        }
        let ledgers = orderly_engine::table::read_all_ledgers(&*self.world.store("inventory"))
            .await
            .map_err(crate::invariants::store_failure)?;
        for l in ledgers {
            let waiting: u64 = l.backorders().map(|b| b.qty).sum();
            if waiting > 0 {
                let qty = Qty::try_from(waiting + waiting / 5 + 3).unwrap_or(Qty::MAX);
                self.trace.push(format!("restock {} × {qty} for its backorders", l.sku()));
                self.clients.receive(&mut self.nodes, l.sku().clone(), id("WH-EU-1"), qty);
            }
        }
        Ok(())
    }
}

// Faults.
impl Sim {
    async fn inject_faults(&mut self) {
        self.bus_faults();
        self.process_faults().await;
        self.outside_faults();
        self.time_faults();
        self.load_faults();
    }

    fn random_source(&mut self) -> usize {
        self.rng.index(self.world.sources.len())
    }

    fn bus_faults(&mut self) {
        let now = self.world.clock.now();
        if self.enabled(FaultKind::Duplicate) && self.rng.chance(80) {
            let i = self.random_source();
            let s = self.world.sources[i].clone();
            let what = if self.rng.chance(500) {
                s.drop_acks(1);
                "ack lost after commit"
            } else {
                s.copy();
                "event copied in a batch"
            };
            self.fault(FaultKind::Duplicate, format!("{what} ({} <- {})", s.consumer(), s.producer()));
        }
        if self.enabled(FaultKind::Reorder) && self.rng.chance(150) {
            let i = self.random_source();
            let s = self.world.sources[i].clone();
            s.reorder();
            self.fault(FaultKind::Reorder, format!("{} <- {}", s.consumer(), s.producer()));
        }
        if self.enabled(FaultKind::Delay) && self.rng.chance(60) {
            let i = self.random_source();
            let s = self.world.sources[i].clone();
            if self.rng.chance(500) {
                let ms = self.rng.range(1_000, 20_000) as i64;
                s.delay(now.plus_ms(ms));
                self.fault(FaultKind::Delay, format!("{} <- {} held {ms} ms", s.consumer(), s.producer()));
            } else {
                let n = self.rng.range(1, 3) as usize;
                s.prefix(n);
                self.fault(FaultKind::Delay, format!("{} <- {} gets {n} events only", s.consumer(), s.producer()));
            }
        }
        if self.enabled(FaultKind::BrokerOutage) && self.rng.chance(20) {
            let producer = SERVICES[self.rng.index(SERVICES.len())];
            let ms = self.rng.range(2_000, 30_000) as i64;
            for s in self.world.sources.iter().filter(|s| s.producer() == producer) {
                s.outage(now.plus_ms(ms));
            }
            self.fault(FaultKind::BrokerOutage, format!("{producer}'s stream down {ms} ms"));
        }
    }

    async fn process_faults(&mut self) {
        if self.enabled(FaultKind::Crash) && self.rng.chance(25) {
            let name = SERVICES[self.rng.index(SERVICES.len())];
            if self.nodes.is_up(name) {
                self.crash(name).await;
            }
        }
        if self.enabled(FaultKind::CommitFailure) && self.rng.chance(30) {
            let name = SERVICES[self.rng.index(SERVICES.len())];
            let n = self.rng.range(1, 2) as u32;
            self.world.store(name).fail_next_commits(n);
            self.fault(FaultKind::CommitFailure, format!("{name}'s next {n} commits fail"));
        }
    }

    /// Kills a service between batches, in the middle of a commit, or right
    /// after a commit whose acks never reach the broker; it restarts 0–4 steps later.
    async fn crash(&mut self, name: &'static str) {
        let how = match self.rng.below(3) {
            0 => "between batches",
            1 => {
                self.world.store(name).fail_next_commits(1);
                self.nodes.step(name).await;
                "in the middle of a commit"
            }
            _ => {
                for s in self.world.sources.iter().filter(|s| s.consumer() == name) {
                    s.drop_acks(1);
                }
                self.nodes.step(name).await;
                "after a commit, before its acks"
            }
        };
        self.nodes.crash(name);
        settle().await;
        self.resolve();
        let back = self.step + self.rng.below(5);
        self.down.insert(name, back);
        self.fault(FaultKind::Crash, format!("{name} crashed {how}; back at step {back}"));
    }

    fn outside_faults(&mut self) {
        let now = self.world.clock.now();
        use crate::fakes::Window;
        let carriers: Vec<_> = self.world.carriers.values().cloned().collect();
        if self.enabled(FaultKind::CarrierError) && self.rng.chance(25) {
            let (c, until, rate) =
                (self.rng.index(2), now.plus_ms(self.rng.range(5_000, 60_000) as i64), self.rng.range(300, 1_000));
            carriers[c].set_faults(|f| f.errors = Window::new(until, rate));
            self.fault(FaultKind::CarrierError, format!("carrier {} fails {rate}‰ until {until}", workload_carrier(c)));
        }
        if self.enabled(FaultKind::CarrierTimeout) && self.rng.chance(15) {
            let (c, until, rate) =
                (self.rng.index(2), now.plus_ms(self.rng.range(5_000, 40_000) as i64), self.rng.range(300, 700));
            carriers[c].set_faults(|f| f.timeouts = Window::new(until, rate));
            self.fault(
                FaultKind::CarrierTimeout,
                format!("carrier {} times out {rate}‰ until {until}", workload_carrier(c)),
            );
        }
        if self.enabled(FaultKind::CarrierOutage) && self.rng.chance(10) {
            let (c, until) = (self.rng.index(2), now.plus_ms(self.rng.range(10_000, 120_000) as i64));
            carriers[c].set_faults(|f| f.outage = Window::new(until, 1_000));
            self.fault(FaultKind::CarrierOutage, format!("carrier {} down until {until}", workload_carrier(c)));
        }
        if self.enabled(FaultKind::WebhookFailure) && self.rng.chance(25) {
            let until = now.plus_ms(self.rng.range(5_000, 60_000) as i64);
            let mode = self.rng.below(3);
            let rate = self.rng.range(300, 1_000);
            self.world.webhook.set_faults(|f| match mode {
                0 => f.errors = Window::new(until, rate),
                1 => f.timeouts = Window::new(until, rate),
                _ => f.outage = Window::new(until, 1_000),
            });
            let what = ["errors", "timeouts", "outage"][mode as usize];
            self.fault(FaultKind::WebhookFailure, format!("webhook {what} until {until}"));
        }
    }

    fn time_faults(&mut self) {
        if self.enabled(FaultKind::ClockJump) && self.rng.chance(15) {
            let ms = if self.rng.chance(850) {
                self.rng.range(60_000, 20 * 60_000) as i64
            } else {
                -(self.rng.range(5_000, 60_000) as i64)
            };
            self.world.clock.jump(ms);
            self.fault(FaultKind::ClockJump, format!("wall clock moved {ms} ms"));
        }
        if self.stampede_at.is_some_and(|at| at <= self.step) {
            self.stampede_at = None;
            let s = &self.world.settings.inventory;
            let ms = s.hold_ttl.0 + s.hold_release_jitter.0 + 5_000;
            self.world.clock.jump(ms);
            self.trace.push(format!("clock jumps {ms} ms past the stampede's holds"));
        }
    }

    fn load_faults(&mut self) {
        if self.enabled(FaultKind::HoldStampede) && self.stampede_at.is_none() && self.rng.chance(10) {
            let n = self.rng.range(10, 25);
            for _ in 0..n {
                let sku: Sku = id(if self.rng.chance(300) { HOT_SKU } else { SKUS[self.rng.index(SKUS.len())] });
                let qty = self.rng.range(1, 2) as Qty;
                self.clients.hold(&mut self.nodes, sku, qty, false);
            }
            self.stampede_at = Some(self.step + 3);
            self.fault(FaultKind::HoldStampede, format!("{n} holds, expiring together in 3 steps"));
        }
        if self.enabled(FaultKind::FlashSale) && self.rng.chance(20) {
            let n = self.rng.range(15, 40);
            for _ in 0..n {
                let k = self.clients.orders_placed();
                let req = workload::flash_order(&mut self.rng, k);
                let mut env = Env {
                    nodes: &mut self.nodes,
                    world: &self.world,
                    rng: &mut self.rng,
                    books: &mut self.books,
                    trace: &mut self.trace,
                };
                self.clients.place(&mut env, req);
            }
            self.fault(FaultKind::FlashSale, format!("{n} orders for {HOT_SKU} at once"));
        }
    }
}

fn workload_carrier(i: usize) -> &'static str {
    crate::world::CARRIERS[i % crate::world::CARRIERS.len()]
}

// The report.
impl Sim {
    async fn report(&mut self, failure: Option<Failure>) -> SeedReport {
        let violations = failure
            .map(|f| Violation {
                seed: self.seed,
                step: self.step,
                invariant: f.invariant.to_owned(),
                detail: f.detail,
                trace: self.trace.lines(),
            })
            .into_iter()
            .collect();
        let orders_by_state = match self.world.store("orders").count_by_idx("orders").await {
            Ok(counts) => counts.into_iter().collect(),
            Err(_) => BTreeMap::new(),
        };
        SeedReport {
            seed: self.seed,
            steps: self.step,
            quiet_steps: self.quiet_steps,
            faults_injected: self.faults.by_name(&self.cfg.faults),
            orders_by_state,
            invariants_checked: self.checker.checks(),
            violations,
            stats: self.stats(),
            fingerprint: self.fingerprint().await,
        }
    }

    fn stats(&self) -> BTreeMap<String, u64> {
        let mut s: BTreeMap<String, u64> = self.books.counters.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        let m = &self.world.metrics;
        for (name, metric) in [
            ("events_deduplicated", "orderly_duplicate_events_total"),
            ("stale_events_rejected", "orderly_stale_events_total"),
            ("commit_failures", "orderly_commit_failures_total"),
            ("event_retries", "orderly_event_retries_total"),
            ("carrier_fallbacks", "orderly_carrier_fallbacks_total"),
            ("holds_expired", "orderly_holds_expired_total"),
            ("holds_unclaimed", "orderly_holds_unclaimed_total"),
            ("orders_voided", "orderly_voided_orders_total"),
            ("lapsed_reservations", "orderly_lapsed_reservations_total"),
        ] {
            s.insert(name.to_owned(), m.counter_total(metric));
        }
        let (deliveries, accepted, resends, _) = self.world.webhook.counts();
        s.insert("webhook_deliveries".to_owned(), deliveries);
        s.insert("notifications_accepted".to_owned(), accepted);
        s.insert("notification_resends_dropped".to_owned(), resends);
        let acks: u64 = self.world.sources.iter().map(|x| x.stats().acks_dropped).sum();
        s.insert("acks_dropped".to_owned(), acks);
        let labels: u64 = self.world.carriers.values().map(|c| c.counts().1).sum();
        s.insert("labels_made".to_owned(), labels);
        s
    }

    /// Every outbox and every document of every store, plus what the
    /// outside world received: equal for two runs of one seed.
    async fn fingerprint(&self) -> String {
        let mut f = Fingerprint::default();
        for name in SERVICES {
            let store = self.world.store(name);
            f.feed(name.as_bytes());
            if let Ok(records) = store.outbox_after(0, u32::MAX).await {
                for r in records {
                    f.feed(&serde_json::to_vec(&r.envelope).unwrap_or_default());
                }
            }
            for table in store.tables() {
                f.feed(table.as_bytes());
                if let Ok(rows) = store.scan(table, None, None, u32::MAX).await {
                    for row in rows {
                        f.feed(row.key.as_bytes());
                        f.feed(&row.doc);
                    }
                }
            }
        }
        for (id, n) in self.world.webhook.accepted() {
            f.feed(id.as_bytes());
            f.feed(n.kind.as_bytes());
        }
        for c in self.world.carriers.values() {
            for (shipment, tracking) in c.labeled() {
                f.feed(shipment.as_bytes());
                f.feed(tracking.as_bytes());
            }
        }
        f.hex()
    }
}
