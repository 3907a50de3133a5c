//! A cache must never change a result. The same lifecycle (sync and async
//! allocation, backorders filled by a receipt, cancels before and after a
//! pick, a short pick, packing, labels, delivery, a return, notifications)
//! runs twice over memory stores, step by step: once with the services'
//! default caches, once with every bounded cache limited to two entries, so
//! that nearly every row is evicted after each batch and reloaded from the
//! store. Both runs must end in the same state.
//!
//! One test in this binary: the cache limit is process-wide.

use async_trait::async_trait;
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::order::{Order, OrderState};
use orderly_domain::shipping::RateTable;
use orderly_domain::{CustomerId, Money, OrderId, PickId, Priority, ShipmentId, Sku, Zone};
use orderly_engine::app::{Customer, Engine, LineRequest, OrderRequest, ShipTo};
use orderly_engine::config::{CarrierEndpoint, Settings, ZoneRoute};
use orderly_engine::engine::{Adapters, SERVICES};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::{CarrierApi, CarrierCallError, Label, LabelRequest, SeededRng, Store, SystemClock};
use orderly_engine::services::picking::PickTask;
use orderly_engine::services::shipping::ShipmentState;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RATES: &str = "version,2026-11-01.1\ncarrier,zone,max_weight_g,price\nfast,EU,100000,5.00\nslow,EU,100000,7.50\n";
const WAIT_MAX: Duration = Duration::from_secs(20);

struct NoWebhook;
#[async_trait]
impl orderly_engine::ports::WebhookSink for NoWebhook {
    async fn deliver(&self, _id: &str, _body: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// A carrier that always answers with a label.
struct Carrier(&'static str);
#[async_trait]
impl CarrierApi for Carrier {
    async fn create_label(&self, req: &LabelRequest) -> Result<Label, CarrierCallError> {
        Ok(Label { tracking_number: format!("T-{}", req.shipment_id), carrier: self.0.to_owned(), cost: "5.00".into() })
    }
}

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).expect("valid id")
}

async fn engine() -> Engine {
    let stores: HashMap<&'static str, Arc<dyn Store>> =
        SERVICES.iter().map(|s| (*s, Arc::new(MemoryStore::new()) as Arc<dyn Store>)).collect();
    let adapters = Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::new(7)) };
    let mut settings = Settings::default();
    for c in ["fast", "slow"] {
        settings.carriers.endpoints.push(CarrierEndpoint { id: c.into(), url: "http://127.0.0.1:9".into() });
    }
    settings.carriers.routes.push(ZoneRoute { zone: "EU".into(), primary: "fast".into(), secondary: "slow".into() });
    let carriers: HashMap<String, Arc<dyn CarrierApi>> = [("fast", Carrier("fast")), ("slow", Carrier("slow"))]
        .into_iter()
        .map(|(name, c)| (name.to_owned(), Arc::new(c) as Arc<dyn CarrierApi>))
        .collect();
    let rates = RateTable::parse(RATES).expect("valid rates");
    Engine::start(settings, adapters, carriers, Some(rates), Arc::new(NoWebhook)).await.expect("engine starts")
}

fn order_req(n: usize, sku: &str, qty: u32, price: &str) -> OrderRequest {
    OrderRequest {
        customer: Customer { id: id::<CustomerId>(&format!("c-{n}")), email: format!("c{n}@example.com") },
        ship_to: ShipTo { zone: id::<Zone>("EU") },
        priority: if n.is_multiple_of(4) { Priority::SameDay } else { Priority::Standard },
        lines: vec![LineRequest { sku: id::<Sku>(sku), qty, unit_price: Money::parse(price).expect("money") }],
        hold_ids: vec![],
        delivery_window: None,
    }
}

async fn wait_for(e: &Engine, order: &OrderId, what: &str, pred: impl Fn(&Order) -> bool) -> Order {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let o = e.order(order).await.expect("order exists");
        if pred(&o) {
            return o;
        }
        assert!(Instant::now() < deadline, "order {order} stuck in {:?} waiting for {what}", o.state());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn decided(o: &Order) -> bool {
    !matches!(o.state(), OrderState::Created | OrderState::Allocating)
}

/// Units each order still has to pick (orders being fulfilled only).
async fn to_pick(e: &Engine, orders: &[OrderId]) -> BTreeMap<OrderId, u64> {
    let mut need = BTreeMap::new();
    for order in orders {
        let o = e.order(order).await.expect("order");
        if matches!(o.state(), OrderState::Allocated | OrderState::Picking | OrderState::PartiallyShipped) {
            let left: u64 = o.lines().iter().map(|l| u64::from(l.allocated_qty() - l.picked_qty())).sum();
            if left > 0 {
                need.insert(order.clone(), left);
            }
        }
    }
    need
}

/// Takes the pick tasks of every order being fulfilled (picking creates them
/// as its events arrive), grouped per order. Tasks of an order canceled
/// meanwhile are left out.
async fn take_tasks(e: &Engine, orders: &[OrderId]) -> BTreeMap<OrderId, Vec<PickTask>> {
    let mut tasks: BTreeMap<OrderId, Vec<PickTask>> = BTreeMap::new();
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        while let Some(task) = e.next_pick(id("WH-EU-1")).await.expect("next pick") {
            tasks.entry(task.order_id.clone()).or_default().push(task);
        }
        let need = to_pick(e, orders).await;
        let complete = need.iter().all(|(order, qty)| {
            tasks.get(order).is_some_and(|t| t.iter().map(|t| u64::from(t.qty)).sum::<u64>() >= *qty)
        });
        if complete {
            tasks.retain(|order, _| need.contains_key(order));
            return tasks;
        }
        if Instant::now() > deadline {
            let dead = e.dead_letters(10).await.expect("dead letters");
            let states = order_states(e, orders).await;
            let have: Vec<_> = tasks.keys().collect();
            panic!("pick tasks missing: need {need:?}, have {have:?}; dead letters {dead:?}; orders {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn order_states(e: &Engine, orders: &[OrderId]) -> Vec<(OrderId, OrderState, u64, u64)> {
    let mut v = Vec::new();
    for o in orders {
        let o = e.order(o).await.expect("order");
        let picked = o.lines().iter().map(|l| u64::from(l.picked_qty())).sum();
        v.push((o.id().clone(), o.state(), o.allocated_qty(), picked));
    }
    v
}

async fn confirm(e: &Engine, tasks: &[PickTask], short: bool) {
    for task in tasks {
        if short && task.qty > 1 {
            e.short_pick(task.id.clone(), task.instruction_key.clone(), task.qty - 1, "damaged".into())
                .await
                .expect("short");
        } else {
            e.confirm_pick(task.id.clone(), task.instruction_key.clone(), task.qty).await.expect("confirm");
        }
    }
}

/// Packs each order's picks (in `orders` order), waits for the labels and
/// delivers; returns the shipments.
async fn ship(e: &Engine, orders: &[OrderId], mut tasks: BTreeMap<OrderId, Vec<PickTask>>) -> Vec<ShipmentId> {
    let mut shipments = Vec::new();
    for order in orders {
        let Some(picks) = tasks.remove(order) else { continue };
        let pick_ids: Vec<PickId> = picks.iter().map(|t| t.id.clone()).collect();
        // The order reaches `picked` once picking's events are consumed.
        let deadline = Instant::now() + WAIT_MAX;
        let package = loop {
            match e.pack(order.clone(), id("WH-EU-1"), pick_ids.clone()).await {
                Ok(p) => break p,
                Err(err) => {
                    assert!(Instant::now() < deadline, "order {order} never packable: {err:?}");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        shipments.push(id::<ShipmentId>(&format!("{}.shp", package.id)));
    }
    for shipment in &shipments {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Ok(s) = e.shipment(shipment.clone()).await
                && s.state == ShipmentState::Labeled
            {
                break;
            }
            assert!(Instant::now() < deadline, "shipment {shipment} never labeled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        e.delivered(shipment.clone()).await.expect("delivered");
    }
    shipments
}

/// What a run ends with, independent of generated ids.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Per order, in creation order: state, units allocated, units picked.
    orders: Vec<(OrderState, u64, u64)>,
    /// Per SKU and location: on hand, reserved, safety.
    stock: BTreeMap<String, Vec<(String, u64, u64, u64)>>,
    shipments: Vec<ShipmentState>,
    /// Statuses of notifications (every one sent).
    notifications: Vec<String>,
    dead_letters: usize,
}

async fn lifecycle() -> Outcome {
    let e = engine().await;
    for (loc, zone) in [("WH-EU-1", "EU"), ("WH-US-1", "US")] {
        e.put_location(Location { id: id(loc), zone: id(zone), kind: LocationKind::Warehouse })
            .await
            .expect("location");
    }
    e.receive(id("WH-EU-1"), id("A"), 60).await.expect("receipt");
    e.receive(id("WH-EU-1"), id("B"), 8).await.expect("receipt");

    // 24 orders, one at a time: A is plentiful, B runs out (backorders); every
    // fifth order of A is worth enough to be allocated synchronously.
    let mut ids = Vec::new();
    for n in 0..24 {
        let (sku, qty) = if n % 3 == 0 { ("B", 2) } else { ("A", 1 + (n % 2) as u32) };
        let price = if n % 5 == 0 && sku == "A" { "400.00" } else { "9.99" };
        let order = e.create_order(order_req(n, sku, qty, price)).await.expect("accepted");
        wait_for(&e, order.id(), "its allocation", decided).await;
        ids.push(order.id().clone());
    }
    // Two cancels before any pick.
    for n in [1, 3] {
        e.cancel_order(ids[n].clone(), "changed mind".into()).await.expect("cancel");
        wait_for(&e, &ids[n], "the cancel", |o| o.state() == OrderState::Canceled).await;
    }
    // Picking: one order is canceled after its pick (its units go back on
    // the shelf), one is picked short; the rest are packed and delivered.
    let mut tasks = take_tasks(&e, &ids).await;
    let victim = ids[2].clone();
    confirm(&e, &tasks.remove(&victim).expect("the victim has a task"), false).await;
    wait_for(&e, &victim, "its pick", |o| o.lines().iter().all(|l| l.picked_qty() == l.allocated_qty())).await;
    e.cancel_order(victim.clone(), "too late".into()).await.expect("cancel after pick");
    wait_for(&e, &victim, "the cancel", |o| o.state() == OrderState::Canceled).await;
    for (order, t) in &tasks {
        confirm(&e, t, *order == ids[0]).await;
    }
    let mut shipments = ship(&e, &ids, tasks).await;

    // Stock for the backorders (and the short pick) arrives; they are allocated, picked and shipped too.
    e.receive(id("WH-EU-1"), id("B"), 30).await.expect("receipt");
    for order in &ids {
        wait_for(&e, order, "the backorder to fill", |o| o.state() != OrderState::Backordered).await;
    }
    let tasks = take_tasks(&e, &ids).await;
    for t in tasks.values() {
        confirm(&e, t, false).await;
    }
    shipments.extend(ship(&e, &ids, tasks).await);

    for order in &ids {
        wait_for(&e, order, "delivery", |o| matches!(o.state(), OrderState::Delivered | OrderState::Canceled)).await;
    }

    // One delivered order comes back.
    let returned = ids[4].clone();
    e.request_return(returned.clone(), "too small".into()).await.expect("return requested");
    e.record_return(returned.clone(), id("WH-EU-1")).await.expect("return recorded");
    wait_for(&e, &returned, "the return", |o| o.state() == OrderState::Returned).await;

    // Everything settles: no order moves, every notification is sent.
    let deadline = Instant::now() + WAIT_MAX;
    let notifications = loop {
        let s = e.notification_summary().await.expect("summary");
        if s.queue_depth == 0 && !s.by_status.contains_key("pending") {
            // How many there are depends on timing (an order allocated from a
            // backorder or at once); that every one was sent does not.
            break s.by_status.into_keys().collect();
        }
        assert!(Instant::now() < deadline, "notifications never settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Every consumer has caught up (inventory restocks the return after the order records it).
    loop {
        let lags = e.runtime.consumer_lag().await;
        if lags.iter().all(|l| l.backlog == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "consumers never caught up: {lags:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut orders = Vec::new();
    for order in &ids {
        let o = e.order(order).await.expect("order");
        let picked = o.lines().iter().map(|l| u64::from(l.picked_qty())).sum();
        orders.push((o.state(), o.allocated_qty(), picked));
    }
    let mut stock = BTreeMap::new();
    for sku in ["A", "B"] {
        let inv = e.inventory(id(sku)).await.expect("inventory");
        let locs =
            inv.locations.iter().map(|l| (l.location.to_string(), l.on_hand, l.reserved, l.safety)).collect::<Vec<_>>();
        stock.insert(sku.to_owned(), locs);
    }
    let mut states = Vec::new();
    for s in &shipments {
        states.push(e.shipment(s.clone()).await.expect("shipment").state);
    }
    let dead_letters = e.dead_letters(100).await.expect("dead letters").len();
    e.shutdown().await;
    Outcome { orders, stock, shipments: states, notifications, dead_letters }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_caches_give_the_same_results_as_large_ones() {
    let large = lifecycle().await;
    assert_eq!(large.dead_letters, 0, "{large:#?}");
    let states: Vec<OrderState> = large.orders.iter().map(|o| o.0).collect();
    for expected in [OrderState::Delivered, OrderState::Canceled, OrderState::Returned] {
        assert!(states.contains(&expected), "the lifecycle reaches {expected:?}: {states:?}");
    }
    orderly_engine::table::limit_cache_entries(2);
    let tiny = lifecycle().await;
    assert_eq!(tiny, large, "tiny caches changed the outcome");
}
