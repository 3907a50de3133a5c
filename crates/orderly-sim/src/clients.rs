//! The engine's callers, as the API layer would serve them: the storefront
//! (locations, receipts, holds, orders — reserving high-value lines before
//! the order is acknowledged, exactly as `Engine::create_order` does),
//! pickers, packers, carriers' delivery callbacks, customer service
//! (cancellations, returns) and ops (notification retries).
//!
//! Every call carries a reply channel, answered only after the batch holding
//! it committed; a closed channel means it did not commit (a failed commit or
//! a crash). The [`Books`] record only answered calls, so they are exactly
//! what the engine acknowledged.

use crate::nodes::{Nodes, Slot};
use crate::report::Trace;
use crate::rng::SimRng;
use crate::workload;
use crate::world::World;
use orderly_domain::allocation::Location;
use orderly_domain::ids::fnv1a;
use orderly_domain::ledger::InventorySnapshot;
use orderly_domain::order::Order;
use orderly_domain::{LineId, LocationId, OrderId, PickId, Qty, ShipmentId, Sku};
use orderly_engine::app::{OrderRequest, new_order, sync_lines};
use orderly_engine::ports::{Clock, uuid_v7};
use orderly_engine::runtime::Service;
use orderly_engine::services::common::ApiError;
use orderly_engine::services::inventory::{self, HoldInfo, SyncReservation};
use orderly_engine::services::notifications::{self, Notification};
use orderly_engine::services::orders;
use orderly_engine::services::packing::{self, Package};
use orderly_engine::services::picking::{self, PickOutcome, PickTask};
use orderly_engine::services::shipping::{self, Shipment};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::oneshot;

type Rx<T> = oneshot::Receiver<Result<T, ApiError>>;

/// What a caller got back, so far.
enum Answer<T> {
    Waiting,
    Done(T),
    Refused(ApiError),
    Lost,
}

fn answer<T>(rx: &mut Rx<T>) -> Answer<T> {
    match rx.try_recv() {
        Ok(Ok(v)) => Answer::Done(v),
        Ok(Err(e)) => Answer::Refused(e),
        Err(oneshot::error::TryRecvError::Empty) => Answer::Waiting,
        Err(oneshot::error::TryRecvError::Closed) => Answer::Lost,
    }
}

fn ask<S: Service, T>(
    slot: &mut Slot<S>,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> S::Command,
) -> Rx<T> {
    let (tx, rx) = oneshot::channel();
    slot.send(make(tx));
    rx
}

/// What the engine acknowledged: the simulator's own bookkeeping.
#[derive(Debug, Default)]
pub struct Books {
    /// Units received per SKU (answered receipts).
    pub received: BTreeMap<Sku, u64>,
    /// Units pickers confirmed per SKU (first confirmations only).
    pub confirmed: BTreeMap<Sku, u64>,
    /// Units pickers reported missing per SKU.
    pub short_missing: BTreeMap<Sku, u64>,
    /// Units returned to stock per SKU (answered return receipts).
    pub returned: BTreeMap<Sku, u64>,
    /// Acknowledged orders, as acknowledged.
    pub acked: BTreeMap<OrderId, Order>,
    /// Units ordered per line of an acknowledged order.
    pub line_qty: BTreeMap<LineId, Qty>,
    /// Call outcomes by name, for the report.
    pub counters: BTreeMap<&'static str, u64>,
    /// Idempotency keys that created a second order on a retry.
    pub keys_broken: Vec<String>,
}

impl Books {
    fn count(&mut self, what: &'static str) {
        *self.counters.entry(what).or_insert(0) += 1;
    }
}

/// An order on its way to being acknowledged.
struct OrderPlan {
    order_id: OrderId,
    req: OrderRequest,
    /// The storefront's idempotency key: the same on a retry.
    key: String,
    /// The order the first try created, when its answer was lost on the way back.
    first: Option<OrderId>,
}

/// A call in flight.
enum Call {
    Location(Rx<Location>),
    Receive { sku: Sku, qty: Qty, rx: Rx<InventorySnapshot> },
    Hold { for_order: bool, rx: Rx<HoldInfo> },
    Reserve { plan: OrderPlan, rx: Rx<SyncReservation> },
    Create { key: String, req: OrderRequest, first: Option<OrderId>, rx: Rx<Order> },
    Next { rx: Rx<Option<PickTask>> },
    Finish { pick: PickId, rx: Rx<PickOutcome> },
    Pack { key: (OrderId, LocationId), rx: Rx<Package> },
    Deliver { shipment: String, rx: Rx<Shipment> },
    Cancel { rx: Rx<Order> },
    RequestReturn { order: OrderId, rx: Rx<Order> },
    RecordReturn { order: OrderId, rx: Rx<Order> },
    Retry { rx: Rx<Notification> },
}

/// Everything the callers are doing.
#[derive(Default)]
pub struct Clients {
    calls: Vec<Call>,
    orders_placed: u64,
    /// Tasks pickers hold.
    held: BTreeMap<PickId, PickTask>,
    finishing: BTreeSet<PickId>,
    /// Picked units waiting for a packer, per (order, location).
    ready: BTreeMap<(OrderId, LocationId), BTreeSet<PickId>>,
    packing: BTreeSet<(OrderId, LocationId)>,
    delivered: BTreeSet<String>,
    delivering: BTreeSet<String>,
    returns: BTreeSet<OrderId>,
    returning: BTreeSet<OrderId>,
    returned: BTreeSet<OrderId>,
    handouts: Vec<PickTask>,
    /// Per mille of order answers lost on the way back (then retried with the same key).
    lose_create_answers: u64,
}

/// What resolving answers needs.
pub struct Env<'a> {
    /// The services.
    pub nodes: &'a mut Nodes,
    /// Shared parts.
    pub world: &'a World,
    /// The scheduler's randomness.
    pub rng: &'a mut SimRng,
    /// Bookkeeping.
    pub books: &'a mut Books,
    /// The trace.
    pub trace: &'a mut Trace,
}

impl Clients {
    /// Calls still waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Creates or updates a location.
    pub fn put_location(&mut self, nodes: &mut Nodes, location: Location) {
        let rx = ask(&mut nodes.inventory, |reply| inventory::Command::PutLocation { location, reply });
        self.calls.push(Call::Location(rx));
    }

    /// Stock arrives.
    pub fn receive(&mut self, nodes: &mut Nodes, sku: Sku, location: LocationId, qty: Qty) {
        let s = sku.clone();
        let rx =
            ask(&mut nodes.inventory, |reply| inventory::Command::Receive { location, sku: s, qty, key: None, reply });
        self.calls.push(Call::Receive { sku, qty, rx });
    }

    /// A cart hold; with `for_order` the customer then orders what it holds.
    pub fn hold(&mut self, nodes: &mut Nodes, sku: Sku, qty: Qty, for_order: bool) {
        let rx = ask(&mut nodes.inventory, |reply| inventory::Command::CreateHold {
            sku,
            qty,
            location: None,
            key: None,
            reply,
        });
        self.calls.push(Call::Hold { for_order, rx });
    }

    /// Loses `per_mille` of the answers to order creations on the way back
    /// (the storefront then retries with the same idempotency key).
    pub fn lose_create_answers(&mut self, per_mille: u64) {
        self.lose_create_answers = per_mille;
    }

    /// Places an order the way the API does: lines worth a synchronous
    /// reservation are reserved first, then the order is created.
    pub fn place(&mut self, env: &mut Env<'_>, req: OrderRequest) {
        self.orders_placed += 1;
        let key = format!("storefront:order-{}", self.orders_placed);
        self.try_place(env, req, key, None);
    }

    /// One try at placing an order under `key`; `first` is the order an
    /// earlier try created (its answer lost).
    fn try_place(&mut self, env: &mut Env<'_>, req: OrderRequest, key: String, first: Option<OrderId>) {
        let now = env.world.clock.now();
        let Ok(order_id) = OrderId::parse(format!("o-{}", uuid_v7(now, env.world.rng.as_ref()))) else { return };
        let lines = sync_lines(&order_id, &req, env.world.settings.allocation.sync_min_line_value);
        let plan = OrderPlan { order_id, req, key, first };
        if lines.is_empty() {
            self.create(env.nodes, plan, &SyncReservation { allocations: Vec::new(), hold_ids: Vec::new() });
            return;
        }
        let (id, zone) = (plan.order_id.clone(), plan.req.ship_to.zone.clone());
        let rx =
            ask(&mut env.nodes.inventory, |reply| inventory::Command::ReserveSync { order_id: id, zone, lines, reply });
        self.calls.push(Call::Reserve { plan, rx });
    }

    fn create(&mut self, nodes: &mut Nodes, plan: OrderPlan, reserved: &SyncReservation) {
        let req = plan.req.clone();
        let new = Box::new(new_order(plan.order_id, plan.req, reserved));
        let key = orders::RequestKey { key: plan.key.clone(), fingerprint: fnv1a(plan.key.as_bytes()) };
        let rx = ask(&mut nodes.orders, |reply| orders::Command::Create { new, key: Some(key), reply });
        self.calls.push(Call::Create { key: plan.key, req, first: plan.first, rx });
    }

    /// Orders placed so far (numbers customers).
    pub fn orders_placed(&self) -> u64 {
        self.orders_placed
    }

    /// A picker asks for the next task at a location.
    pub fn pull(&mut self, nodes: &mut Nodes, location: LocationId) {
        let rx = ask(&mut nodes.picking, |reply| picking::Command::Next { location, reply });
        self.calls.push(Call::Next { rx });
    }

    /// Tasks pickers hold and are not already reporting.
    pub fn held_tasks(&self) -> Vec<PickTask> {
        self.held.values().filter(|t| !self.finishing.contains(&t.id)).cloned().collect()
    }

    /// A picker walks away from a task (it times out and goes back to the queue).
    pub fn abandon(&mut self, pick: &PickId) {
        self.held.remove(pick);
    }

    /// Confirms a held task, or reports it short with `found` units;
    /// `twice` sends the same scanner message again.
    pub fn finish(&mut self, nodes: &mut Nodes, task: &PickTask, found: Option<Qty>, twice: bool) {
        self.finishing.insert(task.id.clone());
        for _ in 0..if twice { 2 } else { 1 } {
            let (pick_id, instruction_key) = (task.id.clone(), task.instruction_key.clone());
            let rx = match found {
                None => ask(&mut nodes.picking, |reply| picking::Command::Confirm {
                    pick_id,
                    instruction_key,
                    qty: task.qty,
                    reply,
                }),
                Some(qty_found) => ask(&mut nodes.picking, |reply| picking::Command::Short {
                    pick_id,
                    instruction_key,
                    qty_found,
                    reason: "bin empty".to_owned(),
                    reply,
                }),
            };
            self.calls.push(Call::Finish { pick: task.id.clone(), rx });
        }
    }

    /// Packs the picked units of up to `max` (order, location) pairs.
    pub fn pack(&mut self, nodes: &mut Nodes, max: usize) {
        let keys: Vec<(OrderId, LocationId)> = self
            .ready
            .iter()
            .filter(|(k, picks)| !picks.is_empty() && !self.packing.contains(*k))
            .map(|(k, _)| k.clone())
            .take(max)
            .collect();
        for key in keys {
            let pick_ids: Vec<PickId> = self.ready[&key].iter().cloned().collect();
            let (order_id, location) = key.clone();
            let rx = ask(&mut nodes.packing, |reply| packing::Command::Pack { order_id, location, pick_ids, reply });
            self.packing.insert(key.clone());
            self.calls.push(Call::Pack { key, rx });
        }
    }

    /// Whether picked units wait for a packer.
    pub fn packing_backlog(&self) -> usize {
        self.ready.values().filter(|p| !p.is_empty()).count()
    }

    /// Carriers report up to `max` labeled shipments delivered; `twice` repeats the callback.
    pub fn deliver(&mut self, nodes: &mut Nodes, world: &World, max: usize, twice: bool) -> usize {
        let labeled: BTreeSet<String> = world.carriers.values().flat_map(|c| c.labeled().into_keys()).collect();
        let due: Vec<String> = labeled
            .into_iter()
            .filter(|s| !self.delivered.contains(s) && !self.delivering.contains(s))
            .take(max)
            .collect();
        for shipment in &due {
            let Ok(shipment_id) = ShipmentId::parse(shipment.clone()) else { continue };
            for _ in 0..if twice { 2 } else { 1 } {
                let id = shipment_id.clone();
                let rx = ask(&mut nodes.shipping, |reply| shipping::Command::Delivered { shipment_id: id, reply });
                self.calls.push(Call::Deliver { shipment: shipment.clone(), rx });
            }
            self.delivering.insert(shipment.clone());
        }
        due.len()
    }

    /// Customer service cancels an order.
    pub fn cancel(&mut self, nodes: &mut Nodes, order_id: OrderId) {
        let reason = "customer changed their mind".to_owned();
        let rx = ask(&mut nodes.orders, |reply| orders::Command::Cancel { order_id, reason, reply });
        self.calls.push(Call::Cancel { rx });
    }

    /// A customer asks to return a delivered order.
    pub fn request_return(&mut self, nodes: &mut Nodes, order: OrderId) {
        if self.returns.contains(&order) || self.returned.contains(&order) {
            return;
        }
        let (order_id, reason) = (order.clone(), "does not fit".to_owned());
        let rx = ask(&mut nodes.orders, |reply| orders::Command::RequestReturn { order_id, reason, reply });
        self.calls.push(Call::RequestReturn { order, rx });
    }

    /// Returns arrive at a location, up to `max` of them.
    pub fn record_returns(&mut self, nodes: &mut Nodes, location: &LocationId, max: usize) {
        let due: Vec<OrderId> =
            self.returns.iter().filter(|o| !self.returning.contains(*o)).take(max).cloned().collect();
        for order in due {
            let (order_id, location) = (order.clone(), location.clone());
            let rx = ask(&mut nodes.orders, |reply| orders::Command::RecordReturn { order_id, location, reply });
            self.returning.insert(order.clone());
            self.calls.push(Call::RecordReturn { order, rx });
        }
    }

    /// Returns requested and not yet received.
    pub fn returns_open(&self) -> usize {
        self.returns.len()
    }

    /// Ops puts a failed notification back in the queue.
    pub fn retry_notification(&mut self, nodes: &mut Nodes, id: String) {
        let rx = ask(&mut nodes.notifications, |reply| notifications::Command::Retry { id, reply });
        self.calls.push(Call::Retry { rx });
    }

    /// Pick tasks handed out since the last call (for the starvation check).
    pub fn take_handouts(&mut self) -> Vec<PickTask> {
        std::mem::take(&mut self.handouts)
    }

    /// Processes every answer that arrived; follow-up calls are queued.
    pub fn resolve(&mut self, env: &mut Env<'_>) {
        let calls = std::mem::take(&mut self.calls);
        for call in calls {
            if let Some(waiting) = self.resolve_one(env, call) {
                self.calls.push(waiting);
            }
        }
    }

    /// Handles one call's answer; gives the call back while it waits.
    fn resolve_one(&mut self, env: &mut Env<'_>, call: Call) -> Option<Call> {
        match call {
            Call::Location(mut rx) => waiting(answer(&mut rx)).then_some(Call::Location(rx)),
            Call::Receive { sku, qty, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Receive { sku, qty, rx }),
                Answer::Done(_) => {
                    *env.books.received.entry(sku).or_insert(0) += u64::from(qty);
                    env.books.count("receipts");
                    None
                }
                _ => None,
            },
            Call::Hold { for_order, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Hold { for_order, rx }),
                got => {
                    self.on_hold(env, for_order, got);
                    None
                }
            },
            Call::Reserve { plan, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Reserve { plan, rx }),
                Answer::Done(reserved) => {
                    self.create(env.nodes, plan, &reserved);
                    None
                }
                Answer::Refused(_) => {
                    env.books.count("orders_refused");
                    None
                }
                Answer::Lost => {
                    env.books.count("orders_lost");
                    None
                }
            },
            Call::Create { key, req, first, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Create { key, req, first, rx }),
                Answer::Done(order) => {
                    if let Some(first) = &first
                        && first != order.id()
                    {
                        env.books
                            .keys_broken
                            .push(format!("key {key} created {first}, and its retry created {} as well", order.id()));
                    }
                    if first.is_none() && env.rng.chance(self.lose_create_answers) {
                        env.books.count("order_answers_lost");
                        env.trace.push(format!("answer for order {} lost; the storefront retries {key}", order.id()));
                        self.try_place(env, req, key, Some(order.id().clone()));
                        return None;
                    }
                    self.acknowledge(env, order);
                    None
                }
                Answer::Refused(_) => {
                    env.books.count("orders_refused");
                    None
                }
                Answer::Lost => {
                    env.books.count("orders_lost");
                    None
                }
            },
            other => self.resolve_warehouse(env, other),
        }
    }

    fn on_hold(&mut self, env: &mut Env<'_>, for_order: bool, got: Answer<HoldInfo>) {
        let Answer::Done(hold) = got else { return };
        env.books.count("holds");
        if for_order {
            let n = self.orders_placed;
            let qty = Qty::try_from(hold.qty).unwrap_or(Qty::MAX);
            let mut req = workload::held_order(env.rng, n, hold.sku.clone(), qty);
            req.hold_ids = vec![hold.id.clone()];
            self.place(env, req);
        }
    }

    fn acknowledge(&mut self, env: &mut Env<'_>, order: Order) {
        env.books.count("orders_acknowledged");
        for line in order.lines() {
            env.books.line_qty.insert(line.line_id.clone(), line.qty);
        }
        env.trace.push(format!("order {} acknowledged ({} lines, {})", order.id(), order.lines().len(), order.state()));
        env.books.acked.insert(order.id().clone(), order);
    }

    fn resolve_warehouse(&mut self, env: &mut Env<'_>, call: Call) -> Option<Call> {
        match call {
            Call::Next { mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Next { rx }),
                Answer::Done(Some(task)) => {
                    self.handouts.push(task.clone());
                    self.held.insert(task.id.clone(), task);
                    None
                }
                _ => None,
            },
            Call::Finish { pick, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Finish { pick, rx }),
                got => {
                    self.on_finished(env.books, &pick, got);
                    None
                }
            },
            Call::Pack { key, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Pack { key, rx }),
                got => {
                    self.on_packed(env.books, key, got);
                    None
                }
            },
            other => self.resolve_customer(env, other),
        }
    }

    fn on_finished(&mut self, books: &mut Books, pick: &PickId, got: Answer<PickOutcome>) {
        self.finishing.remove(pick);
        match got {
            Answer::Done(outcome) => {
                self.held.remove(pick);
                let t = outcome.task;
                if outcome.duplicate {
                    books.count("pick_duplicates");
                    return;
                }
                *books.confirmed.entry(t.sku.clone()).or_insert(0) += u64::from(t.qty_picked);
                if t.qty_picked < t.qty {
                    *books.short_missing.entry(t.sku.clone()).or_insert(0) += u64::from(t.qty - t.qty_picked);
                    books.count("picks_short");
                } else {
                    books.count("picks_confirmed");
                }
                if t.qty_picked > 0 {
                    self.ready.entry((t.order_id.clone(), t.location.clone())).or_default().insert(t.id);
                }
            }
            Answer::Refused(_) => {
                self.held.remove(pick);
                books.count("picks_refused");
            }
            Answer::Waiting | Answer::Lost => {}
        }
    }

    fn on_packed(&mut self, books: &mut Books, key: (OrderId, LocationId), got: Answer<Package>) {
        self.packing.remove(&key);
        match got {
            Answer::Done(package) => {
                books.count("packages");
                if let Some(picks) = self.ready.get_mut(&key) {
                    package.pick_ids.iter().for_each(|p| {
                        picks.remove(p);
                    });
                }
            }
            Answer::Refused(ApiError::Conflict { kind: "pick-not-completed" | "order-unknown", .. }) => {}
            Answer::Refused(_) => {
                books.count("packs_refused");
                self.ready.remove(&key);
            }
            Answer::Waiting | Answer::Lost => {}
        }
    }

    fn resolve_customer(&mut self, env: &mut Env<'_>, call: Call) -> Option<Call> {
        match call {
            Call::Deliver { shipment, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Deliver { shipment, rx }),
                Answer::Done(_) => {
                    self.delivering.remove(&shipment);
                    self.delivered.insert(shipment);
                    None
                }
                _ => {
                    self.delivering.remove(&shipment);
                    None
                }
            },
            Call::Cancel { mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::Cancel { rx }),
                Answer::Done(order) => {
                    env.books.count("cancels");
                    env.trace.push(format!("order {} canceled", order.id()));
                    None
                }
                _ => None,
            },
            Call::RequestReturn { order, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::RequestReturn { order, rx }),
                Answer::Done(_) => {
                    self.returns.insert(order);
                    None
                }
                _ => None,
            },
            Call::RecordReturn { order, mut rx } => match answer(&mut rx) {
                Answer::Waiting => Some(Call::RecordReturn { order, rx }),
                got => {
                    self.on_returned(env.books, order, got);
                    None
                }
            },
            Call::Retry { mut rx } => waiting(answer(&mut rx)).then_some(Call::Retry { rx }),
            other => Some(other),
        }
    }

    fn on_returned(&mut self, books: &mut Books, order: OrderId, got: Answer<Order>) {
        self.returning.remove(&order);
        match got {
            Answer::Done(o) => {
                books.count("returns");
                for line in o.lines() {
                    *books.returned.entry(line.sku.clone()).or_insert(0) += u64::from(line.returned);
                }
                self.returns.remove(&order);
                self.returned.insert(order);
            }
            Answer::Refused(_) => {
                self.returns.remove(&order);
            }
            Answer::Waiting | Answer::Lost => {}
        }
    }
}

fn waiting<T>(a: Answer<T>) -> bool {
    matches!(a, Answer::Waiting)
}
